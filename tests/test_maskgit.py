"""The masked generator: its schedule and loss against NumPy, its decoding's invariants, and
training through the one loop (resume, sampling through sample.py)."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vqvae.maskgit import (
    MaskGITConfig,
    decode_schedule,
    mask_from,
    mask_ratio,
    masked_cross_entropy,
    sample,
)
from vqvae.trainer import Trainer

from .conftest import config

ROOT = Path(__file__).resolve().parent.parent
SMALL = MaskGITConfig(vocab_size=32, grid=(4, 4), num_classes=3, width=32, depth=2, heads=2)


def test_cosine_mask_and_loss_on_masked_only_equal_numpy():
    rng = np.random.default_rng(0)
    u = rng.uniform(size=6).astype(np.float32)
    u[0], u[1] = 0.0, 0.999  # every token masked; the least (one)
    scores = rng.uniform(size=(6, 16)).astype(np.float32)
    mask = np.asarray(mask_from(jnp.asarray(u), jnp.asarray(scores)))
    want_n = np.clip(np.ceil(np.cos(np.pi / 2 * u) * 16), 1, 16).astype(int)
    np.testing.assert_array_equal(mask.sum(1), want_n)
    assert want_n[0] == 16 and want_n[1] == 1
    for row, n in zip(range(6), want_n, strict=True):  # the n lowest scores are the masked
        np.testing.assert_array_equal(
            np.sort(np.argsort(scores[row])[:n]), np.flatnonzero(mask[row])
        )
    np.testing.assert_allclose(mask_ratio(jnp.asarray(u)), np.cos(np.pi / 2 * u), rtol=1e-6)

    logits = rng.normal(size=(6, 16, 32)).astype(np.float32)
    tokens = rng.integers(0, 32, (6, 16))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    want = (ce * mask).sum(1) / mask.sum(1)
    got = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the unmasked positions do not count: changing their logits changes nothing
    other = np.where(mask[..., None], logits, 100 * rng.normal(size=logits.shape))
    np.testing.assert_allclose(
        masked_cross_entropy(jnp.asarray(other), jnp.asarray(tokens), jnp.asarray(mask)),
        want,
        rtol=1e-5,
    )


def test_decode_schedule_follows_the_cosine_and_falls_each_step():
    left = decode_schedule(256, 8)
    want = [math.floor(256 * math.cos(math.pi / 2 * t / 8)) for t in range(1, 8)] + [0]
    np.testing.assert_array_equal(left, want)  # no clipping needed at this size
    tight = decode_schedule(4, 4)  # the cosine would unmask none at some step: one at least
    np.testing.assert_array_equal(tight, [3, 2, 1, 0])
    with pytest.raises(ValueError, match=r"decoding steps must be in \[1, 4\]"):
        decode_schedule(4, 5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_decoding_unmasks_the_scheduled_number_and_never_remasks(cfg_scale):
    model = SMALL.build(nnx.Rngs(0))
    labels = jnp.asarray([0, 1, 2, -1], jnp.int32)
    steps = 6
    tokens, seen = jax.jit(
        lambda k: sample(model, k, labels, steps=steps, cfg_scale=cfg_scale, history=True)
    )(jax.random.key(3))
    seen, tokens = np.asarray(seen), np.asarray(tokens)
    masked = seen == SMALL.vocab_size  # (T, B, L)
    np.testing.assert_array_equal(
        masked.sum(2), np.tile(decode_schedule(16, steps)[:, None], (1, 4))
    )
    for t in range(1, steps):  # a token kept at step t-1 is there, unchanged, at step t
        kept = ~masked[t - 1]
        np.testing.assert_array_equal(seen[t][kept], seen[t - 1][kept])
    np.testing.assert_array_equal(tokens, seen[-1])
    assert tokens.min() >= 0 and tokens.max() < 32
    again = sample(model, jax.random.key(3), labels, steps=steps, cfg_scale=cfg_scale)
    np.testing.assert_array_equal(again, tokens)  # seeded
    assert not np.array_equal(sample(model, jax.random.key(4), labels, steps=steps), tokens)


def test_guided_decoding_uses_the_guided_logits():
    """Greedy (top_k 1) with no choice noise: the first step's kept tokens are the argmax of
    u + s (c - u) from two separate forwards over the all-masked grid."""
    model = SMALL.build(nnx.Rngs(1))
    # a fresh model barely tells classes or positions apart: make both count
    model.embed.embedding[...] = model.embed.embedding[...].at[SMALL.vocab_size + 1 :].mul(30.0)
    model.pos[...] = 30.0 * model.pos[...]
    labels = jnp.asarray([0, 2], jnp.int32)
    masked = jnp.full((2, 16), SMALL.vocab_size, jnp.int32)
    c, u = model(masked, labels), model(masked, jnp.full_like(labels, -1))
    want = np.asarray(jnp.argmax(u + 3.0 * (c - u), -1))
    _, seen = sample(
        model,
        jax.random.key(0),
        labels,
        steps=4,
        top_k=1,
        choice_temperature=0.0,
        cfg_scale=3.0,
        history=True,
    )
    first = np.asarray(seen[0])
    kept = first != SMALL.vocab_size
    np.testing.assert_array_equal(first[kept], want[kept])
    plain = np.asarray(jnp.argmax(c, -1))
    assert not np.array_equal(want, plain)  # guidance does change the argmax here


def _maskgit_config(trained10, **kw):
    c = config(batch_size=16, log_every=0, eval_batches=2, **kw)
    c.task = "maskgit"
    c.model = ml_collections.ConfigDict(dict(num_classes=0, width=16, depth=1, heads=2))
    c.model.mlp_ratio = 2
    c.tokenizer = str(trained10)
    c.label_dropout = 0.1
    return c


def _trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _resumes_exactly(c, tmp_path) -> Trainer:
    """Stopped at step 2 (the checkpoint a kill leaves) and resumed to 4: the same state as
    4 steps straight, label dropout and masks included (tiny's learning rate is constant).
    Returns the straight run's trainer."""
    c.steps, c.checkpoint_every = 4, 2
    straight = Trainer(c, tmp_path / "straight")
    straight.result = straight.train()
    c.steps = 2
    Trainer(c, tmp_path / "split").train()
    c.steps = 4
    resumed = Trainer(c, tmp_path / "split")
    resumed.train()
    _trees_equal(jax.device_get(resumed.state), jax.device_get(straight.state))
    return straight


@pytest.mark.slow  # three short trainings
def test_prior_with_label_dropout_resumes_exactly(trained10, tmp_path):
    c = _maskgit_config(trained10, eval_every=0)
    c.task = "prior"
    c.model.num_classes = 4  # sample_photos' labels: the photo a tile is from
    _resumes_exactly(c, tmp_path)


@pytest.mark.slow  # three short trainings and a script launch
def test_maskgit_trains_resumes_evaluates_and_samples_through_sample_py(trained10, tmp_path):
    from vqvae.checkpoint import load_model

    c = _maskgit_config(trained10, eval_every=4)
    c.model.num_classes = 4
    result = _resumes_exactly(c, tmp_path).result
    assert result["uniform_bits_per_token"] == 5.0
    assert 0 < result["bits_per_masked_token"] < 8 and result["examples"] == 32
    model, meta = load_model(tmp_path / "straight", kind="maskgit")
    assert meta["kind"] == "maskgit" and model.seq_len == 16 and model.num_classes == 4

    out = tmp_path / "samples.png"
    args = ["--workdir", str(tmp_path / "straight"), "--mode", "generate", "--num", "8"]
    args += ["--steps", "4", "--label", "1", "--cfg-scale", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 samples" in proc.stdout and "from the maskgit" in proc.stdout
    from PIL import Image

    with Image.open(out) as im:  # 1 row of 8 samples, 16 px tiles shown 6x, 2 px borders
        assert im.size == (2 + 8 * (6 * 16 + 2), 2 + 1 * (6 * 16 + 2))


@pytest.mark.slow  # three launches of train.py per generator
@pytest.mark.parametrize("task", ["prior", "maskgit"])
def test_a_generator_killed_mid_run_resumes_to_the_uninterrupted_result(trained10, tmp_path, task):
    """SIGKILL (no chance to save) during a class-conditional run with label dropout; the
    rerun resumes from the newest complete checkpoint and ends bit for bit where a run that
    was never killed ends (dropped labels and masks come from the seed and the step)."""
    import signal

    from vqvae.checkpoint import load_model

    from .test_scripts import checkpoints, run, start, wait_for

    def args(workdir):
        a = ["--config", str(ROOT / "configs" / f"{task}_default.py"), f"--workdir={workdir}"]
        a += [f"--config.tokenizer={trained10}", "--config.data.source=sample_photos"]
        a += ["--config.model.num_classes=4", "--config.model.width=16", "--config.model.depth=1"]
        a += ["--config.model.heads=2", "--config.model.mlp_ratio=2", "--config.batch_size=16"]
        a += ["--config.steps=200", "--config.checkpoint_every=10", "--config.eval_every=0"]
        a += ["--config.keep_best=False", "--config.log_every=0", "--config.tensorboard=False"]
        return [*a, "--config.data.workers=0"]

    killed = tmp_path / "killed"
    proc = start("train.py", *args(killed))
    wait_for(lambda: len(checkpoints(killed)) >= 2, proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and 0 < checkpoints(killed)[-1] < 200
    again = run("train.py", *args(killed))
    assert again.returncode == 0 and "resumed from step" in again.stderr, again.stderr
    straight = run("train.py", *args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a, _ = load_model(killed, kind=task)
    b, _ = load_model(tmp_path / "straight", kind=task)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
