"""The sharded train step, resuming, divergence, evaluation and logging (tiny config)."""

import json
import math
import re
import shutil

import jax
import numpy as np
import pytest

from vqvae.checkpoint import Checkpoints, load_model
from vqvae.sharding import batch_sharding
from vqvae.tasks import make_optimizer
from vqvae.trainer import Trainer, TrainingDiverged

from .conftest import config, photos


def _steps(trainer, n, batches):
    state = trainer.init_state()
    trainer.task.stats = {"data_variance": 0.05}
    step = trainer.compile_step()
    metrics = []
    with jax.set_mesh(trainer.mesh):
        for b in batches[:n]:
            state, m = step(state, jax.device_put(b, batch_sharding(trainer.mesh)), trainer.consts)
            metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_step_equals_single_device_step(tmp_path, fsdp):
    images = photos(48, train=True)
    batches = [
        {"image": images[16 * s : 16 * (s + 1)], "label": np.zeros(16, np.int32)} for s in range(3)
    ]
    wide = {"model.base_channels": 32}  # kernels big enough (>= 2**14) for FSDP to split
    one = Trainer(config(num_devices=1, **wide), tmp_path / "one")
    eight = Trainer(config(num_devices=8, fsdp=fsdp, **wide), tmp_path / "eight")
    assert eight.mesh.shape["data"] == 8
    if fsdp:  # the biggest kernels really are split over the devices
        specs = [s.spec for s in jax.tree.leaves(eight.shardings["params"])]
        assert any("data" in spec for spec in specs)
    s1, m1 = _steps(one, 3, batches)
    s8, m8 = _steps(eight, 3, batches)
    _assert_trees_close(m1, m8)  # losses and codebook health over the global batch
    # parameters, EMA codebook state, optimizer state (Adam's normalised steps amplify
    # reduction-order rounding a little: a few 1e-6 after three steps)
    _assert_trees_close(s1, s8, atol=2e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 devices"):
        Trainer(config(batch_size=12), tmp_path)


def test_resume_continues_exactly_and_logs(trained10, tmp_path):
    # tiny's learning rate is constant, so stopping at 10 and going on to 20 changes nothing
    shutil.copytree(trained10, tmp_path / "split")
    resumed = Trainer(config(steps=20), tmp_path / "split")
    resumed.train()
    straight = Trainer(config(steps=20), tmp_path / "straight")
    result = straight.train()
    _assert_trees_close(jax.device_get(resumed.state), jax.device_get(straight.state), atol=1e-6)

    for key in ("mse", "normalized_mse", "psnr", "perplexity", "codes_used", "dead_codes"):
        assert math.isfinite(result[key])
    assert result["psnr"] == pytest.approx(10 * math.log10(1 / result["mse"]))
    jsonl = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in jsonl]
    assert [x["step"] for x in lines if x["split"] == "eval"] == [10, 20]
    assert {"loss", "mse", "perplexity", "grad_norm"} <= set(lines[0])
    assert (tmp_path / "straight" / "eval_grid.png").is_file()
    assert Checkpoints(tmp_path / "straight").latest_step() == 20
    model, meta = load_model(tmp_path / "straight")  # no config needed
    assert meta["model"]["quantizer"]["num_codes"] == 32
    assert meta["data"]["source"] == "sample_photos"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained10, tmp_path):
    shutil.copytree(trained10, tmp_path, dirs_exist_ok=True)
    bad = config(steps=20)
    bad.optim.lr = float("nan")  # poisons the parameters at the first step
    with pytest.raises(TrainingDiverged, match="not finite at step 15.*step 10"):
        Trainer(bad, tmp_path).train()
    assert Checkpoints(tmp_path).latest_step() == 10


def test_checkpoint_of_another_model_is_refused(trained10):
    with pytest.raises(ValueError, match="different model"):
        Trainer(config(**{"model.quantizer.num_codes": 64}), trained10).train()
    assert Checkpoints(trained10).latest_step() == 10


def test_optimizer_schedule_warms_up_and_decays():
    c = config()
    c.optim.update(lr=1e-2, warmup_steps=10, final_lr_fraction=0.1, grad_clip=1.0)
    tx = make_optimizer(c.optim, total_steps=100)
    params = {"w": np.zeros(3, np.float32)}
    state = tx.init(params)
    grads = {"w": np.full(3, 100.0, np.float32)}  # clipped to global norm 1
    sizes = []
    for _ in range(100):
        updates, state = tx.update(grads, state, params)
        sizes.append(float(np.abs(updates["w"]).max()))
    assert sizes[0] < sizes[5] < sizes[10]  # warm-up
    assert sizes[10] > sizes[50] > sizes[99]  # cosine decay
    with pytest.raises(ValueError, match="optim.name"):
        c.optim.name = "lamb"
        make_optimizer(c.optim, 10)


def test_trains_and_evaluates_from_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = config(steps=4, checkpoint_every=4, eval_every=4, log_every=2)
    c.data.source = "tfds:cifar10"
    c.eval_batches = 0  # the whole (mocked) test split, once
    with tfds.testing.mock_data(num_examples=48):
        result = Trainer(c, tmp_path).train()
        assert result["examples"] == 48 and math.isfinite(result["normalized_mse"])
        assert Checkpoints(tmp_path).latest_step() == 4
        # sample.py reconstructs from the checkpoint's own source, tfds included
        import sample

        out = tmp_path / "recon.png"
        sample.main(["--workdir", str(tmp_path), "--out", str(out), "--num", "8"])
    from PIL import Image

    with Image.open(out) as im:  # inputs over reconstructions, 8 of 16 px shown 6x, borders
        assert im.size == (2 + 8 * (6 * 16 + 2), 2 + 2 * (6 * 16 + 2))


def test_kmeans_init_seeds_the_codebook_from_the_first_batch(tmp_path):
    from flax import nnx

    from vqvae.model import to_model_range
    from vqvae.quantizers import nearest_codes

    trainer = Trainer(config(kmeans_init=True, num_devices=1), tmp_path)
    plain = trainer.init_state()
    state, _, _ = trainer.restore_or_init()
    codebook = np.asarray(state["rest"]["quantizer"]["codebook"].get_value())
    assert not np.allclose(codebook, plain["rest"]["quantizer"]["codebook"].get_value())
    # every code is a centre of the first batch's encoder outputs: each is near some of them
    model = nnx.merge(trainer.graphdef, state["params"], state["rest"])
    with trainer.train_batches(0) as first:  # the batch k-means saw
        images = first.next_host()["image"]
    z = np.asarray(model.encode(to_model_range(images))).reshape(-1, 8)  # 256 vectors
    used = len(np.unique(np.asarray(nearest_codes(z, codebook))))
    random_init = plain["rest"]["quantizer"]["codebook"].get_value()
    used_before = len(np.unique(np.asarray(nearest_codes(z, random_init))))
    assert used >= 30 and used > used_before  # k-means spreads the codes over the data


def test_a_signal_arriving_mid_step_still_saves_before_stopping(tmp_path):
    import signal

    class SignalDuringEval(Trainer):
        def evaluate(self, state):
            out = super().evaluate(state)
            if int(state["step"]) == 5:  # as if SIGTERM landed after the step chose not to save
                self.stop(signal.SIGTERM, None)
            return out

    SignalDuringEval(config(eval_every=5, checkpoint_every=100), tmp_path).train()
    assert Checkpoints(tmp_path).latest_step() == 6  # saved at the next step, then stopped


def test_console_says_evaluations_saves_and_the_learning_rate(tmp_path, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO, logger="vqvae.trainer")
    c = config(steps=10, log_every=5, checkpoint_every=5, eval_every=10)
    c.optim.warmup_steps = 5  # lr after n updates: 1e-3 * n / 5, then 1e-3
    Trainer(c, tmp_path).train()
    said = [r.getMessage() for r in caplog.records]
    saves = [m for m in said if m.startswith("saving checkpoint")]
    assert saves == [f"saving checkpoint {s} in {tmp_path.resolve()}/checkpoints" for s in (5, 10)]
    evals = [m for m in said if m.startswith("eval at step")]
    assert len(evals) == 1  # one line, with the figures and over how many images
    assert re.fullmatch(
        r"eval at step 10: PSNR \(dB\) \d+\.\d\d, normalised MSE \d\.\d{4}, codes used \d+, "
        r"perplexity [\d.]+, dead codes \d+, sharpness [\d.]+, over 32 held-out examples",
        evals[0],
    )
    progress = [x for x in capsys.readouterr().err.splitlines() if "step 5/10" in x]
    assert len(progress) == 1 and " lr 0.0008 " in progress[0]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    assert train == pytest.approx({5: 8e-4, 10: 1e-3})

    caplog.clear()  # a finished run, rerun: one line, and nothing else happens
    assert Trainer(c, tmp_path).train() == {}
    said = [r.getMessage() for r in caplog.records]
    assert "already at step 10 of 10: nothing to do" in said
    assert not [m for m in said if m.startswith(("saving", "eval", "data:"))]


def test_a_log_line_on_a_terminal_starts_below_the_progress_line(monkeypatch):
    import io
    import logging
    import sys

    from vqvae.logs import Progress

    err = io.StringIO()
    err.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", err)
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        progress = Progress(10, 0, 4)
        progress.update(5, 1.0, lr=1e-3)
        logging.getLogger("vqvae.trainer").warning("saving checkpoint 5")
        progress.update(6, 0.9, lr=1e-3)
        progress.close()
    finally:
        logging.getLogger().removeHandler(handler)
    lines = err.getvalue().split("\n")
    assert lines[0].startswith("\r[") and "step 5/10" in lines[0] and " lr 0.001 " in lines[0]
    assert lines[1] == "saving checkpoint 5"  # not glued to the end of the progress line
    assert lines[2].startswith("\r[") and "step 6/10" in lines[2] and lines[3:] == [""]
    assert not handler.filters  # the progress line's filter is gone with it
