"""The quantizer family behind one interface: each kind against a NumPy reference, sharded
against single-device, and every kind through the model, tokenizer, export and prior."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae.model import VQVAEConfig
from vqvae.quantizers import KINDS as REGISTERED
from vqvae.quantizers import LFQ, ResidualVQ, RVQConfig, VQConfig, kind_of, quantizer_from_dict
from vqvae.quantizers.fsq import fsq_codes_to_indices, fsq_indices_to_codes, fsq_quantize
from vqvae.quantizers.lfq import lfq_codes_to_indices, lfq_entropies, lfq_indices_to_codes

# every registered kind, from its own small example; and factorised l2 codes,
# gradient-learned (LlamaGen's way): 32 codes of 4 dims behind projections from the 8
KINDS = {name: kind_of(name)(**kind_of(name).example) for name in REGISTERED}
KINDS["vq-l2"] = VQConfig(num_codes=32, codebook_dim=4, normalize=True, learning="gradient")


# --- FSQ ------------------------------------------------------------------------------------
def numpy_fsq(z, levels, eps=1e-3):
    """The FSQ paper's bound-and-round in float64 NumPy: codes in [-1, 1] and their ids."""
    levels = np.asarray(levels)
    half = (levels - 1) * (1 + eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z + np.arctanh(offset / half)) * half - offset
    digits_centred = np.round(bounded)
    codes = digits_centred / (levels // 2)
    digits = digits_centred + levels // 2  # 0 .. L - 1
    basis = np.cumprod([1, *levels[:-1]])
    return codes, (digits * basis).sum(-1).astype(np.int64)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8), (3, 2)])
def test_fsq_rounding_and_index_arithmetic_against_numpy(levels):
    z = np.random.default_rng(0).normal(size=(2000, len(levels))) * 2
    ref_codes, ref_ids = numpy_fsq(z, levels)
    codes = fsq_quantize(jnp.asarray(z, jnp.float32), jnp.asarray(levels))
    np.testing.assert_allclose(codes, ref_codes, atol=1e-6)
    ids = fsq_codes_to_indices(codes, jnp.asarray(levels))
    np.testing.assert_array_equal(ids, ref_ids)
    # every id once, both ways: the implicit codebook is the whole grid
    k = int(np.prod(levels))
    every = fsq_indices_to_codes(jnp.arange(k), jnp.asarray(levels))
    assert len({tuple(np.round(c, 6)) for c in np.asarray(every)}) == k
    np.testing.assert_array_equal(fsq_codes_to_indices(every, jnp.asarray(levels)), np.arange(k))
    assert set(np.unique(np.asarray(ids))) <= set(range(k)) and len(np.unique(ids)) > k // 2


def test_fsq_gradient_is_straight_through_the_rounding():
    levels = jnp.asarray((8, 5))
    z = jnp.asarray([[0.3, -1.2], [2.0, 0.1]])
    w = jnp.asarray([[1.0, 2.0], [3.0, -1.0]])
    g = jax.grad(lambda z: jnp.sum(fsq_quantize(z, levels) * w))(z)
    half = (np.asarray(levels) - 1) * 1.001 / 2
    shift = np.arctanh(np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0) / half)
    bound_grad = (1 - np.tanh(np.asarray(z) + shift) ** 2) * half  # d bound / dz
    np.testing.assert_allclose(g, np.asarray(w) * bound_grad / (np.asarray(levels) // 2), rtol=1e-5)


# --- LFQ ------------------------------------------------------------------------------------
def numpy_lfq_entropies(z, temperature):
    """Brute force over all 2^d codes: softmax(-|z - c|^2 / T), its mean entropy per vector and
    the entropy of its batch mean (nats)."""
    d = z.shape[1]
    codes = np.array([[1.0 if (c >> i) & 1 else -1.0 for i in range(d)] for c in range(2**d)])
    logits = -((z[:, None, :] - codes[None]) ** 2).sum(-1) / temperature
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    ent = lambda p: -(p * np.log(np.where(p > 0, p, 1))).sum(-1)  # noqa: E731
    return ent(q).mean(), ent(q.mean(0))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_lfq_entropy_terms_against_a_brute_force_over_every_code(temperature):
    z = np.random.default_rng(1).normal(size=(300, 5)) * 0.7
    per_vector, batch = lfq_entropies(jnp.asarray(z, jnp.float32), temperature)
    ref_per_vector, ref_batch = numpy_lfq_entropies(z, temperature)
    np.testing.assert_allclose(per_vector, ref_per_vector, rtol=1e-4)
    np.testing.assert_allclose(batch, ref_batch, rtol=1e-4)


def test_lfq_signs_ids_and_straight_through_gradient():
    ids = jnp.arange(32)
    codes = lfq_indices_to_codes(ids, 5)
    assert set(np.unique(np.asarray(codes))) == {-1.0, 1.0}
    np.testing.assert_array_equal(lfq_codes_to_indices(codes), ids)
    lfq = LFQ(5, 5, rngs=nnx.Rngs(0))  # no projection: the codes are the signs
    z = jax.random.normal(jax.random.key(2), (64, 5))
    out = lfq(z)
    np.testing.assert_array_equal(out.quantized, np.sign(np.asarray(z)))
    np.testing.assert_array_equal(out.indices, lfq_codes_to_indices(jnp.sign(z)))
    g = jax.grad(lambda z: jnp.sum(lfq(z).quantized * 3.0))(z)
    np.testing.assert_allclose(g, 3.0)  # sign's gradient, straight through
    np.testing.assert_allclose(lfq.lookup(out.indices), out.quantized)


def test_lfq_maps_an_exact_zero_to_minus_one_so_the_forward_equals_lookup():
    lfq = LFQ(4, 4, rngs=nnx.Rngs(0))
    h = jnp.asarray([[0.3, 0.0, -0.2, 0.5], [0.0, 0.0, 0.0, 0.0]])
    out = lfq(h)
    np.testing.assert_array_equal(out.quantized, [[1, -1, -1, 1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(out.indices, [9, 0])
    np.testing.assert_array_equal(lfq.lookup(out.indices), out.quantized)
    g = jax.grad(lambda h: jnp.sum(lfq(h).quantized * 2.0))(h)
    np.testing.assert_allclose(g, 2.0)  # straight through at 0 too


# --- residual VQ ----------------------------------------------------------------------------
def test_residual_levels_sum_to_the_output_and_decode_from_fewer():
    rvq = ResidualVQ(6, 16, 3, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (4, 5, 6))
    out = rvq(z)
    assert out.indices.shape == (4, 5, 3)
    per_level = [rvq.levels[k].lookup(out.indices[..., k]) for k in range(3)]
    np.testing.assert_allclose(out.quantized, sum(per_level), atol=1e-5)
    np.testing.assert_allclose(
        rvq.lookup(out.indices[..., :2]), per_level[0] + per_level[1], atol=1e-6
    )
    # each level codes the residual the levels before it left
    np.testing.assert_array_equal(out.indices[..., 1], rvq.levels[1](z - per_level[0]).indices)
    errors = [float(jnp.mean((z - rvq.lookup(out.indices[..., :n])) ** 2)) for n in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]  # every level refines the vector
    with pytest.raises(ValueError, match="1..3 levels"):
        rvq.lookup(out.indices[..., :0])


def test_quantizer_dropout_trains_only_the_first_levels_it_draws():
    rvq = ResidualVQ(4, 8, 3, dropout=1.0, rngs=nnx.Rngs(0))  # every batch drops some
    z = jax.random.normal(jax.random.key(1), (256, 4)) * 2
    seen = set()
    for _ in range(12):
        before = [np.asarray(vq.codebook.get_value()) for vq in rvq.levels]
        out = rvq(z, train=True)
        n = int(out.metrics["levels_used"])
        seen.add(n)
        codes = [before[k][np.asarray(out.indices[..., k])] for k in range(n)]  # as they were
        np.testing.assert_allclose(out.quantized, sum(codes), atol=1e-5)  # the first n only
        for k, vq in enumerate(rvq.levels):
            changed = not np.allclose(before[k], np.asarray(vq.codebook.get_value()))
            assert changed == (k < n), (k, n)  # unused levels keep their EMA state
    assert seen == {1, 2, 3}
    assert int(rvq(z).metrics["levels_used"]) == 3  # evaluation uses every level


def test_residual_vq_refuses_cosine_codes_in_one_line():
    with pytest.raises(ValueError, match="residual VQ does not support cosine codes"):
        RVQConfig(residual_levels=3, normalize=True).build(8, nnx.Rngs(0))


def test_dropped_levels_are_left_out_of_the_health_figures():
    from vqvae.quantizers import code_counts, codebook_health

    rvq = ResidualVQ(4, 8, 3, dropout=1.0, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(1), (256, 4)) * 2
    seen = set()
    for _ in range(12):
        out = rvq(z, train=True)
        n = int(out.metrics["levels_used"])
        seen.add(n)
        for name in ("perplexity", "codes_used", "usage_fraction", "max_code_share"):
            per_level = [  # each level on its own; a level the batch did not use reads 0
                float(codebook_health(code_counts(out.indices[..., k], 8))[name]) if k < n else 0
                for k in range(3)
            ]
            got = [float(out.metrics[f"{name}_level{k}"]) for k in range(3)]
            np.testing.assert_allclose(got, per_level, rtol=1e-6)
            np.testing.assert_allclose(out.metrics[name], np.mean(per_level[:n]), rtol=1e-6)
    assert seen == {1, 2, 3}


# --- every kind -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_meets_the_interface_and_shards_like_one_device(kind):
    q = KINDS[kind].build(8, nnx.Rngs(0))
    assert q.vocab_size == 32 if kind != "rvq" else q.vocab_size == 16
    assert q.token_shape == ((2,) if kind == "rvq" else ())
    graphdef, state = nnx.split(q)
    z = jax.random.normal(jax.random.key(3), (64, 4, 8))

    @jax.jit
    def step(state, z):
        model = nnx.merge(graphdef, state)
        out = model(z, train=True)
        return nnx.state(model), out.quantized, out.indices, out.metrics

    one = step(state, z)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        eight = step(jax.device_put(state, NamedSharding(mesh, P())), sharded)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    out = q(z)
    assert out.indices.shape == (64, 4, *q.token_shape) and out.indices.dtype == jnp.int32
    np.testing.assert_allclose(q.lookup(out.indices), out.quantized, atol=1e-5)
    codes = q.codes()
    assert codes.shape == ((2, 16, 8) if kind == "rvq" else (32, 8))


def test_a_model_config_of_the_older_flat_layout_still_loads():
    old = {  # the model config as checkpoints wrote it before the quantizer had its own
        "image_size": 16, "channels": 3, "base_channels": 8, "channel_mult": [1, 2],
        "res_blocks": 0, "mid_blocks": 1, "res_hidden": 8, "stem": False,
        "group_norm": False, "activation": "relu", "code_dim": 8, "num_codes": 32,
        "beta": 0.25, "codebook_learning": "ema", "decay": 0.99, "epsilon": 1e-5,
        "estimator": "ste", "normalize_codes": False, "dead_code_threshold": 0.0,
        "assign_precision": "highest", "compute_dtype": "float32",
    }  # fmt: skip
    config = VQVAEConfig.from_dict(old)
    assert config.quantizer == VQConfig(num_codes=32)
    with pytest.raises(ValueError, match="unknown model config keys: \\['widht'\\]"):
        VQVAEConfig.from_dict({**old, "widht": 3})


@pytest.fixture(scope="module")
def trained_kinds(tmp_path_factory):
    """A tiny tokenizer of every kind, trained for 4 steps."""
    from vqvae.trainer import Trainer

    from .conftest import config

    out = {}
    for kind, qc in KINDS.items():
        workdir = tmp_path_factory.mktemp(f"kind_{kind}")
        c = config(steps=4, checkpoint_every=4, eval_every=4)
        c.model.quantizer = qc.to_dict()
        result = Trainer(c, workdir).train()
        assert np.isfinite(result["mse"]) and result["codes_used"] > 0
        out[kind] = workdir
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_tokenizes_exports_and_feeds_the_prior(trained_kinds, kind, tmp_path):
    import ml_collections

    from vqvae.checkpoint import load_model
    from vqvae.export import export_tokens
    from vqvae.model import to_model_range, to_uint8
    from vqvae.tokenizer import Tokenizer
    from vqvae.trainer import Trainer

    from .conftest import config, photos

    tok = Tokenizer.load(trained_kinds[kind])
    x = photos(6)
    tokens = tok.encode(x)
    assert tokens.shape == (6, 4, 4, *tok.token_levels) and tok.kind == KINDS[kind].kind
    model, _ = load_model(trained_kinds[kind])
    expected = np.asarray(to_uint8(model(to_model_range(x)).reconstruction))
    assert np.abs(tok.decode(tokens).astype(int) - expected).max() <= 1
    if kind == "rvq":  # the first level alone decodes too
        assert tok.decode(tokens[..., :1]).shape == x.shape

    manifest = export_tokens(
        tok, "sample_photos", tmp_path / "tokens", split="val", log=lambda _: 0
    )
    assert quantizer_from_dict(manifest["quantizer"]) == KINDS[kind]  # codebook_dim too
    assert manifest["token_shape"] == [4, 4, *tok.token_levels]
    shard = np.load(tmp_path / "tokens" / manifest["shards"][0]["file"])["tokens"]
    assert shard.shape[1:] == (4, 4, *tok.token_levels)
    assert json.loads((tmp_path / "tokens" / "manifest.json").read_text()) == manifest

    c = config(steps=2, batch_size=16, checkpoint_every=2, eval_every=2, eval_batches=1)
    c.task, c.tokenizer = "prior", str(trained_kinds[kind])
    c.data.source = f"tokens:{tmp_path / 'tokens'}"
    c.data.val_fraction = 0.3
    c.model = ml_collections.ConfigDict(dict(num_classes=0, width=16, depth=1, heads=2))
    result = Trainer(c, tmp_path / "prior").train()
    levels = tok.num_levels
    assert result["uniform_bits_per_token"] == pytest.approx(np.log2(tok.vocab_size))
    assert result["bits_per_dim"] == pytest.approx(
        result["bits_per_token"] * 16 * levels / (16 * 16 * 3), rel=1e-5
    )


def test_codebook_figures_are_means_over_levels_with_each_level_besides(trained_kinds):
    """Every kind reports perplexity, codes used and dead codes the same way: the mean over
    its levels, and each level's figure where it has several."""
    for kind, workdir in trained_kinds.items():
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        ev = [r for r in map(json.loads, lines) if r["split"] == "eval"][-1]
        vocab = KINDS[kind].vocab_size
        for name in ("perplexity", "codes_used", "dead_codes"):
            assert 0 <= ev[name] <= vocab, (kind, name, ev[name])
            if kind == "rvq":
                levels = [ev[f"{name}_level{level}"] for level in range(2)]
                assert ev[name] == pytest.approx(np.mean(levels), rel=1e-6), (kind, name)
            else:
                assert f"{name}_level0" not in ev


def test_a_checkpoint_in_the_older_layout_loads_and_resumes(trained_kinds, tmp_path):
    """The meta of a checkpoint written before quantizers had their own config: flat keys."""
    from vqvae.tokenizer import Tokenizer
    from vqvae.trainer import Trainer

    from .conftest import config

    workdir = tmp_path / "old"
    shutil.copytree(trained_kinds["vq"], workdir)
    meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    q = meta["model"].pop("quantizer")
    meta["model"].update(num_codes=q["num_codes"], beta=q["beta"], codebook_learning="ema",
                         decay=q["decay"], epsilon=q["epsilon"], estimator="ste",
                         normalize_codes=False, dead_code_threshold=0.0,
                         assign_precision="highest")  # fmt: skip
    meta.pop("stats")
    meta_file.write_text(json.dumps(meta))
    assert Tokenizer.load(workdir).vocab_size == 32
    trainer = Trainer(config(steps=6, checkpoint_every=2, eval_every=0), workdir)
    trainer.train()
    assert int(trainer.state["step"]) == 6
