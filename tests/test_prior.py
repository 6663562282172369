"""The token prior: it learns, cached sampling equals uncached, and it trains end to end."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vqvae.checkpoint import Checkpoints, load_model
from vqvae.prior import PriorConfig, prior_loss, sample
from vqvae.tasks import make_train_step
from vqvae.trainer import Trainer

from .conftest import config

ROOT = Path(__file__).resolve().parent.parent
SMALL = PriorConfig(vocab_size=32, grid=(4, 4), num_classes=3, width=32, depth=2, heads=2)


def test_prior_overfits_a_tiny_token_set():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 32, (8, 4, 4)), jnp.int32)
    labels = jnp.asarray([0, 1, 2, -1, 0, 1, 2, -1], jnp.int32)
    model = SMALL.build(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    step = jax.jit(
        make_train_step(graphdef, tx, lambda m, b: prior_loss(m, b["tokens"], b["label"]))
    )
    state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), int)}
    batch = {"tokens": tokens, "label": labels}
    first = None
    for _ in range(300):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert first > 0.8 * math.log(32)  # starts near uniform
    assert float(metrics["loss"]) < 0.1 * math.log(32)  # memorised


@pytest.mark.parametrize("labels", [[0, 1, 2, -1], [-1, -1, -1, -1]])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_cached_sampling_equals_uncached(labels, temperature, top_k):
    model = SMALL.build(nnx.Rngs(1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, key, labels):
        m = nnx.merge(graphdef, state)
        kw = dict(temperature=temperature, top_k=top_k)
        return sample(m, key, labels, cached=True, **kw), sample(m, key, labels, **kw, cached=0)

    cached, full = both(state, jax.random.key(3), jnp.asarray(labels, jnp.int32))
    assert cached.shape == (4, 16) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, full)
    assert int(cached.min()) >= 0 and int(cached.max()) < 32
    # a different key gives different tokens: the sampler is not stuck
    other, _ = both(state, jax.random.key(4), jnp.asarray(labels, jnp.int32))
    assert not np.array_equal(other, cached)


def test_top_k_limits_choices():
    model = SMALL.build(nnx.Rngs(2))
    labels = jnp.full((64,), -1, jnp.int32)
    tokens = sample(model, jax.random.key(0), labels, top_k=1)  # greedy
    assert len(np.unique(np.asarray(tokens[:, 0]))) == 1  # same first token for everyone


@pytest.mark.slow  # script launches
def test_prior_trains_checkpoints_and_generates(trained10, tmp_path):
    c = config(steps=6, batch_size=16, log_every=3, eval_every=6, checkpoint_every=6)
    c.task = "prior"  # the same loop, another task
    c.model = ml_collections.ConfigDict(dict(num_classes=0, width=16, depth=1, heads=2))
    c.model.mlp_ratio = 2
    c.tokenizer = str(trained10)
    c.eval_batches = 2
    result = Trainer(c, tmp_path / "prior").train()
    assert result["uniform_bits_per_token"] == 5.0
    assert 0 < result["bits_per_token"] < 8 and result["examples"] == 32
    assert result["bits_per_dim"] == pytest.approx(result["bits_per_token"] * 16 / (16 * 16 * 3))
    assert Checkpoints(tmp_path / "prior").latest_step() == 6
    prior, meta = load_model(tmp_path / "prior", kind="prior")
    assert meta["kind"] == "prior" and Path(meta["tokenizer"]) == trained10.resolve()

    out = tmp_path / "samples.png"
    args = ["--workdir", str(tmp_path / "prior"), "--mode", "generate", "--num", "16"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args, "--top-k", "8", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    with Image.open(out) as im:  # 2 rows of 8 samples, 16 px tiles shown 6x, 2 px borders
        assert im.size == (2 + 8 * (6 * 16 + 2), 2 + 2 * (6 * 16 + 2))


def test_out_of_range_class_labels_are_a_clear_error():
    model = SMALL.build(nnx.Rngs(0))  # 3 classes
    tokens = jnp.zeros((2, 16), jnp.int32)
    assert np.isfinite(np.asarray(model(tokens, jnp.asarray([2, -1])))).all()
    for bad in (3, -2):
        with pytest.raises(ValueError, match=f"class label {bad} is out of range.*3 classes"):
            model(tokens, jnp.asarray([0, bad]))
        with pytest.raises(ValueError, match="out of range"):
            sample(model, jax.random.key(0), jnp.asarray([bad]))


def test_top_k_keeps_exactly_k_ids_when_scores_tie():
    from vqvae.prior import pick as _pick

    logits = jnp.asarray([[5.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # four ids tie at the 2nd score
    keys = jax.random.split(jax.random.key(0), 400)
    picked = {int(_pick(logits, k, 1.0, top_k=2)[0]) for k in keys}
    assert picked == {0, 1}  # the best, and the lowest of the tied ids


def _prior_config(trained10, **kw):
    c = config(batch_size=16, log_every=0, eval_batches=2, **kw)
    c.task = "prior"
    c.model = ml_collections.ConfigDict(dict(num_classes=0, width=16, depth=1, heads=2))
    c.model.mlp_ratio = 2
    c.tokenizer = str(trained10)
    return c


def test_best_checkpoint_is_kept_and_a_rising_held_out_loss_stops_the_run(
    trained10, tmp_path, caplog
):
    import logging

    from vqvae.prior import TokenPrior

    caplog.set_level(logging.INFO, logger="vqvae.trainer")
    script = {2: 5.0, 4: 4.0, 6: 4.1, 8: 4.3, 10: 4.2, 12: 4.2}  # held-out bits per token

    class Scripted(Trainer):  # the real evaluation, its bits per token replaced by the script
        def evaluate(self, state):
            return {**super().evaluate(state), "bits_per_token": script[int(state["step"])]}

    c = _prior_config(trained10, steps=12, eval_every=2, checkpoint_every=3)
    c.keep_best, c.early_stop_rise = True, 0.05
    work = tmp_path / "prior"
    Scripted(c, work).train()
    said = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("eval at step 2: 5.000 bits per token (uniform 5.00)")
        and "over 32 held-out images" in m
        for m in said
    )
    assert any(
        m.startswith("held-out bits_per_token rose to 4.3, 7% above its best 4") for m in said
    )
    assert Checkpoints(work).latest_step() == 8  # the step it stopped at is saved (not a save step)
    best = TokenPrior.load(work / "best")
    assert best.meta["best"] == {"metric": "bits_per_token", "step": 4, "value": 4.0}

    caplog.clear()  # rerun: it would stop again, so it says so and does nothing
    assert Scripted(c, work).train() == {}
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("stopped early at step 8 of 12") and "nothing to do" in m for m in said)

    c.early_stop_rise = 0.1  # a looser limit goes on from step 8, with the best it had
    caplog.clear()
    Scripted(c, work).train()
    assert Checkpoints(work).latest_step() == 12
    said = [r.getMessage() for r in caplog.records]
    last = [m for m in said if m.startswith("eval at step 12")]
    assert len(last) == 1 and last[0].endswith("; the best: 4 at step 4")
    assert TokenPrior.load(work / "best").meta["best"]["step"] == 4

    shutil.rmtree(work / "best" / "checkpoints" / "4" / "meta")  # a damaged best: said, not fatal
    caplog.clear()
    assert Scripted(c, work).train() == {}
    said = [r.getMessage() for r in caplog.records]
    assert any("is damaged" in m and m.endswith("tracking the best anew") for m in said)
    assert "already at step 12 of 12: nothing to do" in said


def test_token_prior_loads_samples_generates_and_scores(trained10, tmp_path):
    from vqvae.checkpoint import CheckpointError
    from vqvae.prior import TokenPrior

    c = _prior_config(trained10, steps=4, eval_every=0, checkpoint_every=4)
    Trainer(c, tmp_path / "prior").train()
    prior = TokenPrior.load(tmp_path / "prior")
    same = TokenPrior.load(tmp_path / "prior" / "checkpoints" / "4")
    tokens = prior.sample(5, seed=1)
    assert tokens.shape == (5, 4, 4) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < 32
    np.testing.assert_array_equal(tokens, same.sample(5, seed=1))  # seeded
    assert not np.array_equal(tokens, prior.sample(5, seed=2))
    np.testing.assert_array_equal(prior.sample(3, top_k=1)[0], prior.sample(3, top_k=1)[1])
    images = prior.generate(3, temperature=0.8)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    bits = prior.bits_per_token(tokens)
    nats, _ = prior_loss(prior.model, jnp.asarray(tokens), jnp.full((5,), -1))
    assert bits.shape == (5,) and bits.mean() == pytest.approx(float(nats) / math.log(2), 1e-5)
    with pytest.raises(ValueError, match=r"token grids must be \(B, 4, 4\)"):
        prior.bits_per_token(tokens[:, :2])
    with pytest.raises(CheckpointError, match="holds a vqvae checkpoint, not a prior one"):
        TokenPrior.load(trained10)
    with pytest.raises(CheckpointError, match="no prior at"):
        TokenPrior.load(tmp_path / "nowhere")


def test_the_default_prior_keeps_its_best_and_holds_out_enough_of_an_export():
    from configs import default, prior_default
    from vqvae.sources import make_source

    c = prior_default.get_config()
    assert c.keep_best and c.early_stop_rise > 0
    assert c.eval_every and c.eval_every % c.checkpoint_every == 0  # a stop lands on a save
    size = default.get_config().model.image_size
    tiles = len(make_source({"source": "sample_photos"}, image_size=size, train=True))
    assert tiles * c.data.val_fraction >= 100  # the export's held-out grids: about 100, not 20
    assert c.eval_batches == 0  # every one of them evaluated


def test_label_dropout_drops_at_its_rate_and_keeps_the_unlabelled():
    from vqvae.prior import drop_labels

    labels = jnp.asarray(np.arange(20_000) % 3, jnp.int32).at[:1000].set(-1)
    dropped = np.asarray(drop_labels(jax.random.key(0), labels, 0.1))
    kept = dropped[1000:] == np.asarray(labels[1000:])
    assert set(np.unique(dropped[1000:][~kept])) == {-1}  # a dropped label becomes -1
    assert (dropped[:1000] == -1).all()
    assert abs((~kept).mean() - 0.1) < 0.01  # 19,000 draws: 4 standard deviations is 0.009
    np.testing.assert_array_equal(drop_labels(jax.random.key(0), labels, 0.0), labels)
    again = np.asarray(drop_labels(jax.random.key(0), labels, 0.1))
    np.testing.assert_array_equal(again, dropped)  # the same key drops the same ones


def _guided_reference(model, key, labels, scale, schedule, top_k=0, top_p=1.0):
    """Guided sampling by two separate full forwards per position (no cache, no batching
    of the conditional and unconditional rows), the logits mixed by the formula."""
    from vqvae.prior import pick

    b, n = labels.shape[0], model.seq_len
    tokens = jnp.zeros((b, n), jnp.int32)
    for t in range(n):
        cond = model(tokens, labels)[:, t]
        uncond = model(tokens, jnp.full_like(labels, -1))[:, t]
        s = scale if schedule == "constant" else 1 + (scale - 1) * t / (n - 1)
        logits = uncond + s * (cond - uncond)
        tokens = tokens.at[:, t].set(pick(logits, jax.random.fold_in(key, t), 1.0, top_k, top_p))
    return tokens


@pytest.mark.parametrize("schedule,top_k,top_p", [("constant", 0, 1.0), ("linear", 4, 0.8)])
def test_guided_cached_sampling_equals_the_formula_and_uncached_sampling(schedule, top_k, top_p):
    model = SMALL.build(nnx.Rngs(5))
    graphdef, state = nnx.split(model)
    labels = jnp.asarray([0, 1, 2, 2], jnp.int32)
    kw = dict(top_k=top_k, top_p=top_p, cfg_scale=3.0, cfg_schedule=schedule)

    @jax.jit
    def both(state, key):
        m = nnx.merge(graphdef, state)
        return sample(m, key, labels, cached=True, **kw), sample(m, key, labels, cached=False, **kw)

    cached, full = both(state, jax.random.key(7))
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(
        cached, _guided_reference(model, jax.random.key(7), labels, 3.0, schedule, top_k, top_p)
    )
    plain = sample(model, jax.random.key(7), labels, top_k=top_k, top_p=top_p)
    assert not np.array_equal(cached, plain)  # guidance changed the samples
    unit = sample(model, jax.random.key(7), labels, top_k=top_k, top_p=top_p, cfg_scale=1.0)
    np.testing.assert_array_equal(unit, plain)  # scale 1 is no guidance


def test_guided_sampling_works_for_residual_levels():
    cfg = PriorConfig(
        vocab_size=16, grid=(2, 2), levels=3, num_classes=2, width=16, depth=1, heads=2
    )
    model = cfg.build(nnx.Rngs(0))
    labels = jnp.asarray([0, 1], jnp.int32)
    a = sample(model, jax.random.key(1), labels, cfg_scale=2.0, cached=True)
    b = sample(model, jax.random.key(1), labels, cfg_scale=2.0, cached=False)
    assert a.shape == (2, 12)
    np.testing.assert_array_equal(a, b)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from vqvae.prior import pick

    probs = jnp.asarray([[0.5, 0.3, 0.15, 0.05]])
    keys = jax.random.split(jax.random.key(0), 400)
    picked = {int(pick(jnp.log(probs), k, 1.0, 0, top_p=0.8)[0]) for k in keys}
    assert picked == {0, 1}  # 0.5 + 0.3 reaches 0.8
    picked = {int(pick(jnp.log(probs), k, 1.0, 0, top_p=0.81)[0]) for k in keys}
    assert picked == {0, 1, 2}


def test_sampling_settings_out_of_range_are_one_line_errors():
    from vqvae.prior import check_sampling

    for kw, said in [
        (dict(temperature=0), "temperature must be positive"),
        (dict(top_p=0), "top_p must be in"),
        (dict(cfg_scale=-1), "cfg_scale must be at least 0"),
        (dict(cfg_schedule="cosine"), "cfg schedule must be one of"),
    ]:
        with pytest.raises(ValueError, match=said):
            check_sampling(**kw)


def test_flip_export_round_trips_and_the_source_draws_one_view_per_example(trained10, tmp_path):
    from vqvae.data import local_examples
    from vqvae.export import export_tokens
    from vqvae.sources import TokenSource, make_source
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(trained10)
    out = tmp_path / "flip"
    m = export_tokens(tok, "sample_photos", out, split="val", augment="flip", log=lambda _: 0)
    assert m["augment"] == "flip" and m["views"] == ["none", "flip"]
    z = np.load(out / m["shards"][0]["file"])
    tokens = z["tokens"]  # (n, 2, 4, 4)
    n = m["num_examples"]
    assert tokens.shape == (n, 2, 4, 4) and len(z["labels"]) == n
    source = make_source({"source": "sample_photos"}, image_size=16, train=False)
    examples = local_examples(source, n)
    images = next(examples)["image"]
    examples.close()
    np.testing.assert_array_equal(tokens[:, 0], tok.encode(images))
    np.testing.assert_array_equal(tokens[:, 1], tok.encode(images[:, :, ::-1]))  # the mirror's
    assert not np.array_equal(tokens[:, 0], tokens[:, 1])

    grids = TokenSource(str(out), train=True, val_fraction=0.0)
    held = TokenSource(str(out), train=False, val_fraction=1.0)
    i = int(np.flatnonzero((tokens[:, 0] != tokens[:, 1]).any(axis=(1, 2)))[0])
    np.testing.assert_array_equal(held.decode(i, None)["tokens"], tokens[i, 0])  # held out: view 0
    drawn = [grids.decode(i, np.random.default_rng([0, t]))["tokens"] for t in range(40)]
    flipped = [np.array_equal(g, tokens[i, 1]) for g in drawn]
    assert all(f or np.array_equal(g, tokens[i, 0]) for f, g in zip(flipped, drawn, strict=True))
    assert 5 < sum(flipped) < 35  # both views drawn, about half each
    with pytest.raises(ValueError, match="augment must be one of"):
        export_tokens(tok, "sample_photos", tmp_path / "bad", augment="rotate")


def test_tencrop_export_holds_each_crop_and_its_mirror(trained10, tmp_path):
    """Ten-crop reads images 1.1x larger (17 px for the 16-px model) and exports the
    centre and corner crops and their mirrors, each the tokens of that crop (cut here by
    hand); the token source draws among all ten."""
    from vqvae.data import local_examples
    from vqvae.export import export_tokens
    from vqvae.sources import TokenSource, make_source
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(trained10)
    out = tmp_path / "tencrop"
    m = export_tokens(tok, "sample_photos", out, split="val", augment="tencrop", log=lambda _: 0)
    assert m["views"][:2] == ["center", "top_left"] and len(m["views"]) == 10
    assert m["read_at"] == 17
    tokens = np.load(out / m["shards"][0]["file"])["tokens"]  # (n, 10, 4, 4)
    source = make_source({"source": "sample_photos"}, image_size=17, train=False)
    examples = local_examples(source, m["num_examples"])
    big = next(examples)["image"]
    examples.close()
    crops = {"center": big[:, 0:16, 0:16], "top_left": big[:, :16, :16],  # offset round(0.5)
             "top_right": big[:, :16, 1:], "bottom_left": big[:, 1:, :16],
             "bottom_right": big[:, 1:, 1:]}  # fmt: skip
    for j, view in enumerate(m["views"]):
        crop = crops[view.removeprefix("flip_")]
        crop = crop[:, :, ::-1] if view.startswith("flip_") else crop
        np.testing.assert_array_equal(tokens[:, j], tok.encode(crop), err_msg=view)
    assert len({tokens[:, j].tobytes() for j in range(10)}) > 5  # the views differ
    grids = TokenSource(str(out), train=True, val_fraction=0.0)
    distinct = [{tokens[i, j].tobytes() for j in range(10)} for i in range(len(tokens))]
    i = int(np.argmax([len(d) for d in distinct]))  # the example whose views differ most
    drawn = {grids.decode(i, np.random.default_rng([0, t]))["tokens"].tobytes() for t in range(80)}
    assert drawn <= distinct[i] and len(drawn) == len(distinct[i]) > 3


@pytest.mark.slow  # a short training
def test_the_prior_trains_on_a_flip_export(trained10, tmp_path):
    from vqvae.export import export_tokens
    from vqvae.tokenizer import Tokenizer

    out = tmp_path / "flip"
    export_tokens(Tokenizer.load(trained10), "sample_photos", out, augment="flip", log=print)
    c = _prior_config(trained10, steps=2, eval_every=2, checkpoint_every=2)
    c.data.source, c.data.val_fraction = f"tokens:{out}", 0.1
    result = Trainer(c, tmp_path / "prior").train()
    assert 0 < result["bits_per_token"] < 8 and result["examples"] == 32
