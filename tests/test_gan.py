"""The VQGAN losses on the task seam: adaptive weight, discriminator losses, LPIPS, and a
discriminator that trains, shards, checkpoints and resumes with the generator."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae import adversarial
from vqvae.lpips import LPIPS, SCALE, SHIFT, convert, load_weights

from .conftest import config, photos


def gan_config(**overrides):
    c = config(**overrides)
    c.gan.weight, c.gan.start_step, c.gan.layers = 0.8, 0, 1
    return c


def test_adaptive_weight_against_a_hand_computation():
    """A last layer y = h W: both losses' gradients at W in closed form."""
    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(6, 4)), rng.normal(size=(4, 3))
    x, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    y = h @ w
    rec = lambda out: jnp.mean(jnp.square(out - x))  # noqa: E731
    adv = lambda out: jnp.mean(out * v)  # noqa: E731
    layer = lambda kernel: jnp.asarray(h, jnp.float32) @ kernel  # noqa: E731
    weight = adversarial.adaptive_weight(rec, adv, jnp.asarray(y), layer, jnp.asarray(w))
    grad_rec = h.T @ (2 * (y - x) / y.size)  # d rec / dW
    grad_adv = h.T @ (v / y.size)  # d adv / dW
    expected = np.linalg.norm(grad_rec) / (np.linalg.norm(grad_adv) + 1e-4)
    np.testing.assert_allclose(weight, expected, rtol=1e-5)
    clipped = adversarial.adaptive_weight(rec, adv, jnp.asarray(y), layer, jnp.asarray(w), 0.1)
    assert float(clipped) == pytest.approx(min(expected, 0.1))
    # held constant: no gradient flows through it
    g = jax.grad(lambda k: adversarial.adaptive_weight(rec, adv, layer(k), layer, k))(
        jnp.asarray(w)
    )
    np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("kind", adversarial.LOSSES)
def test_discriminator_and_generator_losses_against_numpy(kind):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(4, 3, 3, 1)) * 2, rng.normal(size=(4, 3, 3, 1)) * 2
    softplus = lambda t: np.log1p(np.exp(t))  # noqa: E731
    if kind == "hinge":
        d = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
        g = -fake.mean()
    else:  # the cross-entropy of sigmoid(logit): -log sigmoid(real) - log(1 - sigmoid(fake))
        d = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
        g = softplus(-fake).mean()
    np.testing.assert_allclose(adversarial.discriminator_loss(real, fake, kind), d, rtol=1e-5)
    np.testing.assert_allclose(adversarial.generator_loss(fake, kind), g, rtol=1e-5)
    with pytest.raises(ValueError, match="adversarial loss must be one of"):
        adversarial.discriminator_loss(real, fake, "wasserstein")


def _conv3x3_same(x, kernel, bias):
    """NumPy 3x3 'SAME' convolution: x (B, H, W, I), kernel (3, 3, I, O)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + x.shape[1], j : j + x.shape[2]] @ kernel[i, j]
    return out + bias


def test_lpips_reads_a_weights_file_and_gives_the_distance_by_hand(tmp_path):
    rng = np.random.default_rng(2)
    weights = {  # the conversion layout: one convolution, its ReLU compared
        "conv0_kernel": rng.normal(size=(3, 3, 3, 2)).astype(np.float32),
        "conv0_bias": rng.normal(size=(2,)).astype(np.float32),
        "lin0": np.array([0.3, 1.7], np.float32),
        "pool_after": np.array([], np.int32),
        "tap_after": np.array([0], np.int32),
    }
    np.savez(tmp_path / "one.npz", **weights)
    net = LPIPS(load_weights(tmp_path / "one.npz"))
    x = rng.uniform(-0.5, 0.5, size=(2, 5, 5, 3))
    y = rng.uniform(-0.5, 0.5, size=(2, 5, 5, 3))

    def by_hand(a, b):
        feats = []
        for img in (a, b):
            scaled = (2 * img - SHIFT) / SCALE  # training range -> [-1, 1] -> LPIPS's scaling
            f = np.maximum(_conv3x3_same(scaled, weights["conv0_kernel"], weights["conv0_bias"]), 0)
            feats.append(f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10))
        return (((feats[0] - feats[1]) ** 2) * weights["lin0"]).sum(-1).mean((1, 2))

    np.testing.assert_allclose(net(jnp.asarray(x), jnp.asarray(y)), by_hand(x, y), rtol=1e-4)
    np.testing.assert_allclose(net(jnp.asarray(x), jnp.asarray(x)), 0, atol=1e-6)


def test_conversion_maps_the_pytorch_layout():
    from vqvae.lpips import VGG16_FEATURES, VGG16_TAP_AFTER

    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg, cin = {}, 3
    for i, cout in zip(VGG16_FEATURES, widths, strict=True):
        vgg[f"features.{i}.weight"] = np.arange(cout * cin * 9, dtype=np.float32).reshape(
            cout, cin, 3, 3
        )
        vgg[f"features.{i}.bias"] = np.zeros(cout, np.float32)
        cin = cout
    taps = [widths[k] for k in VGG16_TAP_AFTER]
    lin = {f"lin{t}.model.1.weight": np.ones((1, c, 1, 1), np.float32) for t, c in enumerate(taps)}
    out = convert(vgg, lin)
    assert out["conv0_kernel"].shape == (3, 3, 3, 64)  # OIHW -> HWIO
    assert out["conv0_kernel"][1, 2, 0, 5] == vgg["features.0.weight"][5, 0, 1, 2]
    assert [out[f"lin{t}"].shape for t in range(5)] == [(c,) for c in taps]


def test_perceptual_term_off_without_a_file_and_an_error_with_a_missing_one(tmp_path, caplog):
    from vqvae.trainer import Trainer

    c = config()
    c.loss.perceptual_weight = 1.0
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(c, tmp_path / "a")
    assert trainer.task.lpips is None
    assert any("perceptual term off: no LPIPS weights file" in r.message for r in caplog.records)
    c.loss.lpips_weights = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz not found; make them once"):
        Trainer(c, tmp_path / "b")


def test_sharded_gan_step_equals_single_device_step(tmp_path):
    from vqvae.sharding import batch_sharding
    from vqvae.trainer import Trainer

    from .conftest import photos
    from .test_trainer import _assert_trees_close

    images = photos(32, train=True)
    batches = [
        {"image": images[16 * s : 16 * (s + 1)], "label": np.zeros(16, np.int32)} for s in range(2)
    ]
    out = {}
    for n in (1, 8):
        trainer = Trainer(gan_config(num_devices=n), tmp_path / str(n))
        trainer.task.stats = {"data_variance": 0.05}
        state, step = trainer.init_state(), trainer.compile_step()
        metrics = []
        with jax.set_mesh(trainer.mesh):
            for b in batches:
                state, m = step(
                    state, jax.device_put(b, batch_sharding(trainer.mesh)), trainer.consts
                )
                metrics.append(jax.device_get(m))
        out[n] = (jax.device_get(state), metrics)
    assert out[8][1][0]["gan_on"] == 1 and "disc_loss" in out[8][1][0]
    _assert_trees_close(out[1][1], out[8][1], rtol=1e-4, atol=1e-5)
    _assert_trees_close(out[1][0], out[8][0], rtol=1e-4, atol=2e-5)  # both models and optimizers


@pytest.mark.slow  # script launches
def test_a_killed_gan_run_resumes_with_both_models_exact(tmp_path):
    from .test_scripts import checkpoints, run, start, wait_for

    args = ["--config.gan.weight=0.8", "--config.gan.start_step=2", "--config.gan.layers=1"]
    args += ["--config.steps=12", "--config.checkpoint_every=2", "--config.eval_every=0"]
    args += ["--config.log_every=2"]
    tiny = ["--config", "configs/tiny.py", "--config.tensorboard=False"]
    proc = start("train.py", *tiny, f"--workdir={tmp_path / 'killed'}", *args)
    wait_for(lambda: len(checkpoints(tmp_path / "killed")) >= 2, proc)
    proc.kill()
    proc.communicate()
    assert checkpoints(tmp_path / "killed")[-1] < 12
    for name in ("killed", "straight"):
        done = run("train.py", *tiny, f"--workdir={tmp_path / name}", *args)
        assert done.returncode == 0, done.stderr
    sums = []
    for name in ("killed", "straight"):
        meta = json.loads(
            (tmp_path / name / "checkpoints" / "12" / "meta" / "metadata").read_text()
        )
        sums.append(meta["checksums"])
    assert any("['disc']" in k for k in sums[0]["train"])  # the discriminator is in it
    assert sums[0] == sums[1]  # every array of both models, optimizers included, bit for bit


def test_lecam_averages_update_with_the_batch_before_the_penalty_and_start_unbiased():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(4, 3, 3, 1)) + 1, rng.normal(size=(4, 3, 3, 1)) - 1
    means = np.array([real.mean(), fake.mean()])
    ema = jnp.asarray([0.3, -0.2])
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    for decay in (0.0, 0.9):
        loss, new = adversarial.discriminator_objective(real, fake, ema, decay, "hinge", 0.5)
        expected = decay * np.asarray(ema) + (1 - decay) * means  # this batch first
        np.testing.assert_allclose(new, expected, rtol=1e-6)
        penalty = (relu(real - expected[1]) ** 2).mean() + (relu(expected[0] - fake) ** 2).mean()
        hinge = 0.5 * (relu(1 - real).mean() + relu(1 + fake).mean())
        np.testing.assert_allclose(loss, hinge + 0.5 * penalty, rtol=1e-5)
    # the averages carry no gradient into the discriminator
    g = jax.grad(lambda r: adversarial.discriminator_objective(r, fake, ema, 0.9, "hinge", 1.0)[0])
    grad = g(jnp.asarray(real))
    ref = jax.grad(
        lambda r: (
            adversarial.discriminator_loss(r, fake, "hinge")
            + adversarial.lecam_penalty(r, fake, expected[0], expected[1])
        )
    )(jnp.asarray(real))
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)


def test_lecam_averages_track_the_logits_exactly_until_the_discriminator_starts(tmp_path):
    from vqvae.sharding import batch_sharding
    from vqvae.trainer import Trainer

    images = photos(48, train=True)
    c = gan_config()
    c.gan.start_step, c.gan.lecam_weight, c.gan.lecam_decay = 1, 0.1, 0.9
    trainer = Trainer(c, tmp_path)
    trainer.task.stats = {"data_variance": 0.05}
    state, step = trainer.init_state(), trainer.compile_step()
    lecam, logits, on = [], [], []
    with jax.set_mesh(trainer.mesh):
        for s in range(3):
            b = {"image": images[16 * s : 16 * (s + 1)], "label": np.zeros(16, np.int32)}
            state, m = step(state, jax.device_put(b, batch_sharding(trainer.mesh)), trainer.consts)
            lecam.append(np.asarray(state["disc"]["lecam"]))
            logits.append(np.array([m["logits_real"], m["logits_fake"]]))
            on.append(float(m["gan_on"]))
    assert on == [0.0, 1.0, 1.0]
    np.testing.assert_allclose(lecam[0], logits[0], rtol=1e-6)  # before the start: exact
    np.testing.assert_allclose(lecam[1], 0.9 * logits[0] + 0.1 * logits[1], rtol=1e-5)
    np.testing.assert_allclose(lecam[2], 0.9 * lecam[1] + 0.1 * logits[2], rtol=1e-5)


def test_l1_pixel_loss_is_used_without_a_discriminator_or_lpips(tmp_path):
    """loss.pixel='l1' with no GAN and no LPIPS term: the step's loss is the L1 distance."""
    from flax import nnx

    from vqvae.model import to_model_range
    from vqvae.trainer import Trainer

    from .test_trainer import _steps

    images = photos(16, train=True)
    batch = {"image": images, "label": np.zeros(16, np.int32)}
    losses = {}
    for pixel in ("mse", "l1"):
        c = config()
        c.loss.pixel = pixel
        trainer = Trainer(c, tmp_path / pixel)
        state0 = jax.device_get(trainer.init_state())
        _, metrics = _steps(trainer, 1, [batch])
        model = nnx.merge(trainer.graphdef, state0["params"], state0["rest"], copy=True)
        x = to_model_range(images)
        recon = np.asarray(model(x, train=True).reconstruction)
        err = recon - np.asarray(x)
        expected = np.abs(err).mean() if pixel == "l1" else np.square(err).mean() / 0.05
        np.testing.assert_allclose(metrics[0]["recon_loss"], expected, rtol=1e-4)
        losses[pixel] = float(metrics[0]["loss"])
    assert losses["l1"] != pytest.approx(losses["mse"], rel=1e-3)
