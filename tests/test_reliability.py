"""Nothing lost, nothing silently wrong: checksums, damaged checkpoints, a clean history,
settings refused up front, the held-out set checked at start-up, the workdir lock."""

import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from vqvae.checkpoint import CheckpointError, Checkpoints, load_model, tree_checksums
from vqvae.data import DataError
from vqvae.lock import WorkdirBusy, WorkdirLock
from vqvae.sharding import make_mesh
from vqvae.tokenizer import Tokenizer
from vqvae.trainer import Trainer

from .conftest import config


@pytest.fixture(scope="module")
def trained20(trained10, tmp_path_factory):
    """Checkpoints 10 and 20 of the tiny tokenizer (tiny's learning rate is constant)."""
    workdir = tmp_path_factory.mktemp("trained20") / "w"
    shutil.copytree(trained10, workdir)
    Trainer(config(steps=20), workdir).train()
    return workdir


def test_checksums_ignore_sharding_and_catch_one_flipped_bit():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    tree = {"w": x, "step": jnp.int32(7), "half": x.astype(jnp.bfloat16)}
    plain = tree_checksums(tree)
    mesh = make_mesh()
    sharded = {**tree, "w": jax.device_put(x, NamedSharding(mesh, P("data")))}
    assert tree_checksums(sharded) == plain
    bits = np.asarray(x).view(np.uint32).copy()
    bits[37, 5] ^= 1 << 3  # one bit of one float
    flipped = tree_checksums({**tree, "w": jnp.asarray(bits.view(np.float32))})
    assert flipped["['w']"] != plain["['w']"] and flipped["['step']"] == plain["['step']"]
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same words in another order
    assert tree_checksums({**tree, "w": jnp.asarray(swapped)})["['w']"] != plain["['w']"]


def test_silently_changed_weights_are_caught_on_restore(trained10, tmp_path):
    """Arrays rewritten with other values (storage that returns wrong bytes without an
    error) restore without complaint from orbax; the checksums in the meta catch them."""
    workdir = tmp_path / "w"
    shutil.copytree(trained10, workdir)
    model_dir = workdir / "checkpoints" / "10" / "model"
    tree = ocp.StandardCheckpointer().restore(model_dir)
    tree = jax.tree.map(np.array, tree)  # writable copies
    leaf = tree["params"]["encoder"]["proj"]["kernel"]["value"]
    leaf.reshape(-1)[3] += 0.5
    shutil.rmtree(model_dir)
    with ocp.StandardCheckpointer() as writer:
        writer.save(model_dir, tree)
    with pytest.raises(CheckpointError, match=r"checkpoint 10 .* damaged \(checksum mismatch"):
        load_model(workdir, step=10)
    with pytest.raises(CheckpointError, match="damaged.*no older one restores"):
        Tokenizer.load(workdir)


def _data_file(step_dir):
    return glob.glob(str(step_dir / "model" / "d" / "*"))[0]


DAMAGE = {
    "deleted data file": lambda d: os.remove(_data_file(d)),
    "truncated data file": lambda d: os.truncate(
        _data_file(d), os.path.getsize(_data_file(d)) // 2
    ),
    "corrupt meta": lambda d: (d / "meta" / "metadata").write_text("{garbage"),
    "corrupt array metadata": lambda d: (d / "model" / "_METADATA").write_text("{garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_skipped_and_kept(trained20, tmp_path, damage, caplog):
    workdir = tmp_path / "w"
    shutil.copytree(trained20, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "20")

    # reading: a given step is one clear error; without one, the newest intact checkpoint
    with pytest.raises(CheckpointError, match=r"checkpoint 20 in .* is damaged \(.*--step \(10\)"):
        Tokenizer.load(workdir, step=20)
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.load(workdir)
    assert tok.meta["checksums"] and any("using checkpoint 10" in r.message for r in caplog.records)

    # training: resumes from 10, says which it skipped and why, keeps the damaged one
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vqvae.trainer"):
        trainer = Trainer(config(steps=30), workdir)
        trainer.train()
    skipped = [r.message for r in caplog.records if "skipped checkpoint 20" in r.message]
    assert len(skipped) == 1 and "damaged (" in skipped[0] and "damaged/20" in skipped[0]
    assert (workdir / "damaged" / "20" / "model").is_dir()  # moved aside, never deleted
    assert Checkpoints(workdir).steps() == [30, 20, 10]  # the new 20 was trained again


def test_history_is_trimmed_to_the_restored_step(trained10, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained10, workdir)
    with open(workdir / "metrics.jsonl", "a") as f:  # a run killed after step 13's log line
        for step in (11, 12, 13):
            f.write(json.dumps({"step": step, "split": "train", "loss": 9.0}) + "\n")
        f.write('{"step": 14, "spl')  # torn by the kill
    Trainer(config(steps=20, log_every=1), workdir).train()
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20  # once each
    assert all(r.get("loss") != 9.0 for r in records)
    assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"keep_checkpoints": 0}, r"keep_checkpoints must be an integer >= 1"),
        ({"checkpoint_every": 0}, r"checkpoint_every must be an integer >= 1"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"log_every": -1}, r"log_every must be an integer >= 0 \(0: no periodic logging\)"),
        ({"num_devices": 16}, r"num_devices=16, but only 8 device\(s\) are visible"),
        ({"eval_batch_size": 12}, r"eval_batch_size 12 is not divisible by the 8 devices"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(config(**overrides), tmp_path / "w").train()
    assert not (tmp_path / "w").exists()


def test_log_and_eval_every_zero_mean_off(tmp_path):
    result = Trainer(
        config(steps=4, log_every=0, eval_every=0, checkpoint_every=2), tmp_path
    ).train()
    assert result == {}  # no evaluation ran
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (4, "train")]  # saves
    assert not (tmp_path / "eval_grid.png").exists()


def _folder(root, n=16, bad_val=False):
    """A folder of 20x20 images; with ``bad_val`` the held-out files are all corrupt."""
    import zlib

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        name = f"{i}.png"
        held_out = zlib.crc32(name.encode()) % 10_000 < 3000  # val_fraction 0.3
        if bad_val and held_out:
            (root / name).write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name)


def test_an_unreadable_held_out_set_fails_at_start_up(tmp_path):
    _folder(tmp_path / "imgs", bad_val=True)
    c = config(eval_every=5, checkpoint_every=5)
    c.data.source, c.data.val_fraction = f"folder:{tmp_path / 'imgs'}", 0.3
    with pytest.raises(DataError, match="no readable example"):
        Trainer(c, tmp_path / "w").train()
    assert Checkpoints(tmp_path / "w").steps() == []  # nothing trained, nothing lost


def test_the_step_is_saved_before_it_is_evaluated(tmp_path):
    class FailingEval(Trainer):
        def evaluate(self, state):
            raise RuntimeError("evaluation broke")

    with pytest.raises(RuntimeError, match="evaluation broke"):
        FailingEval(config(eval_every=10, checkpoint_every=10), tmp_path).train()
    assert Checkpoints(tmp_path).steps() == [10]  # a rerun resumes from it


def test_a_second_trainer_on_a_busy_workdir_is_refused(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with (
        WorkdirLock(tmp_path),
        pytest.raises(WorkdirBusy, match=rf"in use by another training run \(PID {os.getpid()}\)"),
    ):
        Trainer(config(steps=2), tmp_path).train()
    Trainer(config(steps=2, eval_every=0), tmp_path).train()  # released: the next one runs


def test_skipped_files_are_summarised_at_the_end(tmp_path, caplog):
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    c = config(steps=6, eval_every=0, checkpoint_every=6, batch_size=16)
    c.data.source, c.data.val_fraction = f"folder:{tmp_path / 'imgs'}", 0.0
    with caplog.at_level(logging.WARNING, logger="vqvae.trainer"):
        Trainer(c, tmp_path / "w").train()
    summary = [r.message for r in caplog.records if "unreadable file(s) were skipped" in r.message]
    assert len(summary) == 1 and "broken.png" in summary[0] and summary[0].startswith("1 ")
