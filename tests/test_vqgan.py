"""The VQGAN net family: presets shaped like the released models, attention against NumPy,
the resampling choices, the sharded step, and a tiny VQGAN tokenizer end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.model import PRESETS, VQVAEConfig, to_model_range
from vqvae.nets import VQGANConfig
from vqvae.nets.vqgan import AttnBlock, Downsample, ResnetBlock, attention

# Parameters of each released generator, counted by building the original from its own
# project's code with random weights: taming-transformers' Encoder/Decoder
# (taming/modules/diffusionmodules/model.py) with configs/imagenet_vqgan.yaml's ddconfig and
# the released f16-16384 config's codebook, its VectorQuantizer and 1x1 quant convs
# (taming/models/vqgan.py); LlamaGen's VQ_16 / VQ_8 (tokenizer/tokenizer_image/vq_model.py);
# MaskGIT's linen VQVAE (maskgit/nets/vqgan_tokenizer.py) with configs/vqgan_config.py.
# name: (encoder, quant_conv, decoder, post_quant_conv, codebook) of the original
RELEASED = {
    "taming-f16-16384": (29_298_176, 65_792, 42_449_795, 65_792, 4_194_304),  # 76,073,859
    "taming-f16-1024": (29_298_176, 65_792, 42_449_795, 65_792, 262_144),  # 72,141,699
    "llamagen-vq16": (29_298_176, 2_056, 42_449_795, 2_304, 131_072),  # 71,883,403
    "llamagen-vq8": (28_559_232, 2_056, 41_415_171, 2_304, 131_072),  # 70,109,835
    "maskgit-f16-1024": (23_775_104, 0, 30_478_339, 0, 262_144),  # 54,515,587
}


def _count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_have_the_released_models_parameter_counts_and_shapes(name):
    config = PRESETS[name]
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    encoder, quant_conv, decoder, post_quant_conv, codebook = RELEASED[name]
    # the package's encoder holds quant_conv and its decoder post_quant_conv
    assert _count(model.encoder) == encoder + quant_conv
    assert _count(model.decoder) == decoder + post_quant_conv
    assert _count(model.quantizer) == codebook
    assert _count(model) == sum(RELEASED[name])
    f = 8 if name == "llamagen-vq8" else 16
    assert config.downsample_factor == f and config.grid_size == 256 // f
    graphdef, state = nnx.split(model)  # shapes only: nothing is computed

    def shape(method, *args):
        return jax.eval_shape(
            lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a), state, *args
        )

    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    z = shape("encode", x)
    assert z.shape == (2, 256 // f, 256 // f, config.code_dim)
    assert shape("decode", z).shape == (2, 256, 256, 3)
    ids = shape("encode_to_indices", x)
    assert ids.shape == (2, 256 // f, 256 // f) and ids.dtype == jnp.int32


def numpy_attention(q, k, v):
    logits = np.einsum("bnc,bmc->bnm", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnm,bmc->bnc", w / w.sum(-1, keepdims=True), v)


def test_attention_equals_numpy_and_the_block_is_permutation_equivariant():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 20, 8)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(attention(q, k, v), numpy_attention(q, k, v), rtol=1e-5, atol=1e-6)
    block = AttnBlock(32, jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 4, 5, 32)), jnp.float32)
    perm = rng.permutation(20)
    permute = lambda a: a.reshape(2, 20, 32)[:, perm].reshape(2, 4, 5, 32)  # noqa: E731
    np.testing.assert_allclose(block(permute(x)), permute(block(x)), rtol=1e-5, atol=1e-5)
    # taming's block by hand: x + proj_out(softmax(q k^T / sqrt(C)) v) on the normalised x
    n = block.norm(x).reshape(2, 20, 32)
    qkv = [np.asarray(f(n)) for f in (block.q, block.k, block.v)]
    expected = np.asarray(x) + np.asarray(
        block.proj_out(jnp.asarray(numpy_attention(*qkv)).reshape(2, 4, 5, 32))
    )
    np.testing.assert_allclose(block(x), expected, rtol=1e-4, atol=1e-5)


def test_downsampling_pads_as_each_project_does():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 32)), jnp.float32)
    asym = Downsample(32, "asymmetric", jnp.float32, rngs=nnx.Rngs(0))
    sym = Downsample(32, "symmetric", jnp.float32, rngs=nnx.Rngs(0))
    kernel, bias = asym.conv.kernel.get_value(), asym.conv.bias.get_value()
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # taming: bottom and right only
    ref = jax.lax.conv_general_dilated(
        padded, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(asym(x), ref + bias, rtol=1e-5, atol=1e-5)
    assert asym(x).shape == sym(x).shape == (1, 4, 4, 32)
    assert not np.allclose(asym(x), sym(x), atol=1e-3)  # same kernel, other padding
    pool = Downsample(32, "avgpool", jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(pool(x), x.reshape(1, 4, 2, 4, 2, 32).mean((2, 4)), rtol=1e-6)
    assert pool.conv is None


def test_maskgit_blocks_have_no_biases_and_take_the_shortcut_from_their_output():
    block = ResnetBlock(32, 64, "maskgit", jnp.float32, rngs=nnx.Rngs(0))
    assert block.conv1.bias is None and block.nin_shortcut.kernel.shape == (1, 1, 64, 64)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 32)), jnp.float32)
    h = block.conv2(jax.nn.silu(block.norm2(block.conv1(jax.nn.silu(block.norm1(x))))))
    np.testing.assert_allclose(block(x), h + block.nin_shortcut(h), rtol=1e-5, atol=1e-5)
    taming = ResnetBlock(32, 64, "taming", jnp.float32, rngs=nnx.Rngs(0))
    assert taming.nin_shortcut.kernel.shape == (1, 1, 32, 64)  # from the input


def test_bad_vqgan_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="vqgan.style must be one of"):
        VQGANConfig(style="vit")
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGANConfig(ch=48)
    with pytest.raises(ValueError, match="the maskgit style has no attention"):
        VQGANConfig(style="maskgit")
    with pytest.raises(ValueError, match="unknown vqgan config keys: \\['chmult'\\]"):
        VQVAEConfig.from_dict({"net": "vqgan", "vqgan": {"chmult": (1, 2)}})
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 16"):
        PRESETS["taming-f16-1024"].replace(image_size=200)


def _tiny_vqgan(**overrides):
    from configs import tiny_vqgan

    from .conftest import config

    c = config(**overrides)
    c.model = tiny_vqgan.get_config().model
    return c


def test_sharded_vqgan_step_equals_single_device_step(tmp_path):
    from vqvae.trainer import Trainer

    from .conftest import photos
    from .test_trainer import _assert_trees_close, _steps

    images = photos(32, train=True)
    batches = [
        {"image": images[16 * s : 16 * (s + 1)], "label": np.zeros(16, np.int32)} for s in range(2)
    ]
    # SGD: its step is the gradient itself, so the states compare the sharded gradients
    # (Adam's normalised first steps turn the rounding-level gradients of the conv biases
    # before each GroupNorm into full-size moves in either direction)
    sgd = {"optim.name": "sgd", "optim.lr": 0.001}
    s1, m1 = _steps(Trainer(_tiny_vqgan(num_devices=1, **sgd), tmp_path / "one"), 2, batches)
    s8, m8 = _steps(Trainer(_tiny_vqgan(num_devices=8, **sgd), tmp_path / "eight"), 2, batches)
    _assert_trees_close(m1, m8, rtol=1e-4, atol=1e-5)  # losses, gradient norm, usage
    _assert_trees_close(s1, s8, rtol=1e-4, atol=1e-6)  # parameters, codebook


def test_a_vqgan_tokenizer_trains_tokenizes_exports_and_feeds_the_prior(tmp_path):
    import ml_collections

    from vqvae.export import export_tokens
    from vqvae.tokenizer import Tokenizer
    from vqvae.trainer import Trainer

    from .conftest import config, photos

    c = _tiny_vqgan(steps=4, checkpoint_every=4, eval_every=4)
    result = Trainer(c, tmp_path / "tok").train()
    assert np.isfinite(result["mse"]) and result["codes_used"] > 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.downsample_factor == 4 and tok.grid_shape() == (4, 4)
    x = photos(4)
    tokens = tok.encode(x)
    assert tokens.shape == (4, 4, 4)
    assert tok.decode(tokens).shape == x.shape
    manifest = export_tokens(
        tok, "sample_photos", tmp_path / "tokens", split="val", log=lambda _: 0
    )
    assert manifest["token_shape"] == [4, 4]
    p = config(steps=2, batch_size=16, checkpoint_every=2, eval_every=2, eval_batches=1)
    p.task, p.tokenizer = "prior", str(tmp_path / "tok")
    p.data.source, p.data.val_fraction = f"tokens:{tmp_path / 'tokens'}", 0.3
    p.model = ml_collections.ConfigDict(dict(num_classes=0, width=16, depth=1, heads=2))
    assert np.isfinite(Trainer(p, tmp_path / "prior").train()["bits_per_token"])


@pytest.mark.parametrize("name", ["taming-f16-16384", "maskgit-f16-1024", "tiny"])
def test_the_report_counts_every_attention_block_the_net_builds(name):
    from configs import tiny_vqgan
    from vqvae.report import _attention_cost

    if name == "tiny":
        config = VQVAEConfig.from_dict(dict(tiny_vqgan.get_config().model))
    else:
        config = PRESETS[name]
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    built = [x for _, x in nnx.iter_graph(model) if isinstance(x, AttnBlock)]
    sides = config.vqgan.attention_sides(config.image_size)
    assert len(built) == len(sides)
    cost = _attention_cost(config)
    assert cost["attention_blocks"] == len(sides)
    assert cost["attention_logits_mib_per_image"] == sum(s**4 * 4 for s in sides) / 2**20


def _dropout_pair(rate):
    """A tiny VQGAN model with ``dropout=rate`` holding the weights of the same model with
    dropout 0 (the state trees must agree for that), and that dropout-0 model."""
    base = VQVAEConfig.from_dict(dict(_tiny_vqgan().model))
    plain = base.build(nnx.Rngs(0))
    dropped = base.replace(vqgan=dataclasses.replace(base.vqgan, dropout=rate))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: dropped.build(nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(plain)), plain


def test_dropout_zero_builds_the_same_state_and_dropout_is_off_outside_training():
    from vqvae.model import dropout_rngs

    from .conftest import photos

    model, plain = _dropout_pair(0.5)
    # the same state tree as dropout 0 (which builds no dropout at all): checkpoints agree
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(plain))
    x = to_model_range(photos(4))
    # evaluation, tokenizing, export: no rngs, no dropout, the dropout-0 model's outputs
    np.testing.assert_array_equal(model(x).reconstruction, plain(x).reconstruction)
    np.testing.assert_array_equal(model.encode_to_indices(x), plain.encode_to_indices(x))
    # training: masks in every res block, drawn from the seed and step alone
    z = model.encode(x, rngs=dropout_rngs(0, 3))
    assert not np.allclose(z, plain.encode(x), atol=1e-3)
    np.testing.assert_array_equal(z, model.encode(x, rngs=dropout_rngs(0, 3)))
    assert not np.allclose(z, model.encode(x, rngs=dropout_rngs(0, 4)), atol=1e-3)
    h = plain.features(plain.quantizer(z).quantized)
    assert not np.allclose(model.features(plain.quantizer(z).quantized, rngs=dropout_rngs(0, 3)), h)
    # a model without dropout ignores the rngs: training equals evaluation
    np.testing.assert_array_equal(plain.encode(x, rngs=dropout_rngs(0, 3)), plain.encode(x))
    with pytest.raises(ValueError, match=r"vqgan.dropout must be in \[0, 1\), got 1.0"):
        VQGANConfig(dropout=1.0)


def test_dropout_follows_taming_between_the_second_swish_and_conv2():
    block = ResnetBlock(32, 64, "taming", jnp.float32, dropout=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 32)), jnp.float32)
    key = jax.random.key(7)
    h = jax.nn.silu(block.norm2(block.conv1(jax.nn.silu(block.norm1(x)))))
    keep = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, h.shape)
    expected = block.nin_shortcut(x) + block.conv2(jnp.where(keep, h / 0.5, 0.0))
    np.testing.assert_allclose(block(x, rngs=nnx.Rngs(dropout=key)), expected, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(block(x), block.nin_shortcut(x) + block.conv2(h), rtol=1e-5)


@pytest.mark.slow  # four short runs through the loop
def test_a_vqgan_tokenizer_with_dropout_trains_and_resumes_exactly(tmp_path):
    from vqvae.trainer import Trainer

    from .test_trainer import _assert_trees_close

    def run(steps, workdir):
        c = _tiny_vqgan(steps=steps, checkpoint_every=1, eval_every=0)
        c.model.vqgan.dropout = 0.5
        trainer = Trainer(c, workdir)
        trainer.train()
        return jax.device_get(trainer.state)

    run(1, tmp_path / "split")
    resumed = run(2, tmp_path / "split")  # step 2 after a restart from step 1's checkpoint
    straight = run(2, tmp_path / "straight")
    _assert_trees_close(resumed, straight, rtol=0, atol=0)
    # and dropout is on in training: the same run without it ends elsewhere
    c = _tiny_vqgan(steps=2, checkpoint_every=2, eval_every=0)
    off = Trainer(c, tmp_path / "off")
    off.train()
    off_params = jax.tree.leaves(jax.device_get(off.state["params"]))
    assert any(
        not np.allclose(a, b, atol=1e-6)
        for a, b in zip(off_params, jax.tree.leaves(straight["params"]), strict=True)
    )
