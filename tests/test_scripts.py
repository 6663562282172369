"""train.py and sample.py as users run them: errors, hard kills, signals, reconstructions."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # script launches: left out of make test-fast

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", str(ROOT / "configs" / "tiny.py"), "--config.tensorboard=False"]


def run(script, *args, timeout=180):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(script, *args):
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_line_error(proc, prog, pattern):
    """Exit status 2 and a single stderr line ``prog: error: ...`` matching ``pattern``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def wait_for(predicate, proc, timeout=180):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def checkpoints(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--config.modle.num_codes=3"], r"key 'modle.num_codes' \(did you mean \"model\.q"),
        (["--config.model.num_codes=1024"], r"did you mean \"model\.quantizer\.num_codes\"\?"),
        (["extra"], r"unexpected argument\(s\): extra"),
        (["--config.stepz=3"], r"unknown config key 'stepz' \(did you mean \"steps\""),
        (["--config.num_devices=16"], r"num_devices=16, but only 8 device\(s\) are visible"),
        (["--config.keep_checkpoints=0"], r"keep_checkpoints must be an integer >= 1"),
        (["--config.steps=many"], r"steps"),
        (["--config.model.image_size=18"], r"image_size 18 is not divisible"),
        (["--config.batch_size=12"], r"batch_size 12 is not divisible by the 8 devices"),
        (["--config.data.source=folder:/no/such/dir"], r"/no/such/dir does not exist"),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, args, pattern):
    one_line_error(run("train.py", *TINY, f"--workdir={tmp_path}", *args), "train.py", pattern)


def test_train_missing_workdir_or_config_is_one_line(tmp_path):
    one_line_error(run("train.py", *TINY), "train.py", r"workdir")
    missing = run("train.py", "--config", "configs/nope.py", f"--workdir={tmp_path}")
    one_line_error(missing, "train.py", r"config file")


def test_sample_without_checkpoint_is_one_line(tmp_path):
    one_line_error(run("sample.py", "--workdir", str(tmp_path / "x")), "sample.py", "not exist")
    one_line_error(run("sample.py", "--workdir", str(tmp_path)), "sample.py", "no checkpoints")


def test_sigkill_mid_run_then_rerun_resumes_and_finishes(tmp_path):
    args = [*TINY, f"--workdir={tmp_path}", "--config.steps=300", "--config.checkpoint_every=10"]
    args += ["--config.eval_every=1000", "--config.log_every=10"]
    proc = start("train.py", *args)
    wait_for(lambda: len(checkpoints(tmp_path)) >= 2, proc)
    proc.kill()  # SIGKILL: no chance to save or clean up
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = checkpoints(tmp_path)
    assert 0 < done[-1] < 300

    again = run("train.py", *args)
    assert again.returncode == 0, again.stderr
    resumed = int(re.search(r"resumed from step (\d+)", again.stderr).group(1))
    assert resumed >= done[-1]  # the newest complete checkpoint (a later one may have landed)
    assert checkpoints(tmp_path)[-1] == 300
    assert again.stderr.count("final evaluation") == 1


def interrupt_training(workdir, sig) -> list[int]:
    """Start a long run, send ``sig`` once it has logged; it must save and exit 0.

    Returns the checkpoint steps left in ``workdir``."""
    args = [*TINY, f"--workdir={workdir}", "--config.steps=100000", "--config.log_every=2"]
    args += ["--config.checkpoint_every=100000", "--config.eval_every=100000"]
    proc = start("train.py", *args)
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{signal.Signals(sig).name}: saved step" in err
    return checkpoints(workdir)


def test_sigterm_saves_and_exits_cleanly_then_sample_reconstructs(tmp_path):
    saved = interrupt_training(tmp_path, signal.SIGTERM)
    assert len(saved) == 1 and 0 < saved[0] < 100000

    out = tmp_path / "recon.png"
    sample = run("sample.py", "--workdir", str(tmp_path), "--out", str(out), "--num", "16")
    assert sample.returncode == 0, sample.stderr
    assert re.search(r"16 images, MSE 0\.\d+, PSNR \d+\.\d+ dB", sample.stdout)
    from PIL import Image

    with Image.open(out) as im:  # 2 rows of inputs over reconstructions, 8 of 16px shown 6x
        assert im.size == (2 + 8 * (6 * 16 + 2), 2 + 4 * (6 * 16 + 2))  # 2 px borders


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_ctrl_c_is_handled_like_sigterm(tmp_path):
    assert len(interrupt_training(tmp_path, signal.SIGINT)) == 1


class Lines:
    """A running process's stderr, read line by line in the background."""

    def __init__(self, proc):
        import threading

        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern, timeout=180):
        wait_for(lambda: any(re.search(pattern, x) for x in self.lines), self.proc, timeout)

    def text(self):
        self.thread.join(timeout=60)
        return "".join(self.lines)


def test_kill_during_a_checkpoint_write_resumes_to_the_same_result(tmp_path):
    """SIGKILL while orbax is writing a checkpoint: the partial one is never restored, and
    the rerun ends exactly where an uninterrupted run does."""
    from vqvae.checkpoint import load_model

    args = [*TINY, f"--workdir={tmp_path / 'killed'}", "--config.steps=40"]
    args += ["--config.checkpoint_every=1", "--config.eval_every=0", "--config.log_every=0"]
    proc = start("train.py", *args)
    ckpts = tmp_path / "killed" / "checkpoints"

    def writing():  # a temporary folder orbax renames once the write is complete
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        return len([n for n in names if n.isdigit()]) >= 3 and any(not n.isdigit() for n in names)

    t0 = time.time()
    while not writing():
        assert proc.poll() is None, "the run ended before a write could be interrupted"
        assert time.time() - t0 < 180
    proc.kill()
    proc.communicate()
    partial = [n for n in os.listdir(ckpts) if not n.isdigit()]
    assert partial, "killed between writes"  # the kill did land mid-write
    rest = [a.replace("checkpoint_every=1", "checkpoint_every=40") for a in args]  # faster
    again = run("train.py", *rest)
    assert again.returncode == 0, again.stderr
    assert checkpoints(tmp_path / "killed")[-1] == 40

    straight = run("train.py", *[a.replace("killed", "straight") for a in rest])
    assert straight.returncode == 0, straight.stderr
    import jax
    import numpy as np
    from flax import nnx

    a, _ = load_model(tmp_path / "killed")
    b, _ = load_model(tmp_path / "straight")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_skips_a_damaged_latest_checkpoint_in_one_line(trained10, tmp_path):
    import shutil

    shutil.copytree(trained10, tmp_path / "w")
    for f in (tmp_path / "w" / "checkpoints" / "10" / "model" / "d").iterdir():
        f.unlink()  # the only checkpoint loses its data
    args = [*TINY, f"--workdir={tmp_path / 'w'}", "--config.steps=12"]
    proc = run("train.py", *args)
    assert proc.returncode == 0, proc.stderr
    skipped = [x for x in proc.stderr.splitlines() if "skipped checkpoint 10" in x]
    assert len(skipped) == 1 and "damaged (cannot read" in skipped[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    assert (tmp_path / "w" / "damaged" / "10").is_dir() and checkpoints(tmp_path / "w") == [10, 12]
    sample = run("sample.py", "--workdir", str(tmp_path / "w"), "--step", "3")
    one_line_error(sample, "sample.py", r"no checkpoint 3 in .*checkpoints there: 12, 10")


def test_sample_on_a_damaged_step_is_one_line(trained10, tmp_path):
    import shutil

    shutil.copytree(trained10, tmp_path / "w")
    (tmp_path / "w" / "checkpoints" / "10" / "meta" / "metadata").write_text("{garbage")
    proc = run("sample.py", "--workdir", str(tmp_path / "w"), "--step", "10")
    one_line_error(proc, "sample.py", r"checkpoint 10 in .* is damaged \(unreadable metadata")


def test_a_second_trainer_is_refused_with_the_holders_pid(tmp_path):
    args = [*TINY, f"--workdir={tmp_path}", "--config.steps=100000", "--config.log_every=2"]
    args += ["--config.checkpoint_every=100000", "--config.eval_every=0"]
    first = start("train.py", *args)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, first)
    second = run("train.py", *args)
    one_line_error(second, "train.py", rf"in use by another training run \(PID {first.pid}\)")
    assert first.poll() is None  # the first goes on, untouched
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "SIGTERM: saved step" in err


def test_ctrl_c_during_start_up_exits_cleanly(trained10, tmp_path):
    import shutil

    shutil.copytree(trained10, tmp_path / "w")
    proc = start("train.py", *TINY, f"--workdir={tmp_path / 'w'}", "--config.steps=1000")
    lines = Lines(proc)
    lines.wait_for(r"starting: ")  # logged before the restore, the compile and the data
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = lines.text()
    assert proc.returncode == 0, err
    assert "SIGINT during start-up: stopped before training; nothing new to save" in err
    assert "Traceback" not in err and "saved step" not in err
    assert checkpoints(tmp_path / "w") == [10]


def test_help_exits_0_and_says_where_the_config_keys_are(tmp_path):
    helped = run("train.py", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--config.KEY=VALUE" in helped.stdout and "--list-config" in helped.stdout
    listed = run("train.py", *TINY, "--list-config", "--config.steps=7")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "steps = 7" in lines and "model.quantizer.num_codes = 32" in lines
    assert "data.val_source = ''" in lines


def _main_exit(argv, capsys):
    import sample

    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return e.value.code, capsys.readouterr()


def test_sample_help_shows_defaults_and_examples_and_errors_are_one_line(tmp_path, capsys):
    code, out = _main_exit(["--help"], capsys)
    assert code == 0 and "examples:" in out.out and "(default: 16)" in out.out
    for bad in (["--num", "-1"], ["--mode", "generate", "--num", "0"], ["--bogus"]):
        code, out = _main_exit(["--workdir", str(tmp_path), *bad], capsys)
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), out.err
    existing = tmp_path / "tokens"
    existing.mkdir()  # checked before any model is loaded (the workdir does not even exist)
    code, out = _main_exit(
        ["--workdir", str(tmp_path / "nope"), "--mode", "tokens", "--out", str(existing)], capsys
    )
    assert code == 2 and "already exists" in out.err and "nope" not in out.err


def test_sample_scores_a_whole_folder_and_says_over_how_many(trained10, tmp_path, capsys):
    import shutil

    import numpy as np
    from PIL import Image

    import sample

    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(100):  # 2% held out: a couple of images
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    work = shutil.copytree(trained10, tmp_path / "work")
    sample.main(["--workdir", str(work), "--source", f"folder:{imgs}", "--num", "0"])
    out = capsys.readouterr()
    assert (work / "recon.png").is_file()  # the default --out is inside the workdir
    held = re.search(r"over (\d+) of (\d+) held-out images of folder:", out.out)
    assert held and held[1] == held[2] and int(held[1]) < 32, out.out
    assert f"only {held[1]} image(s) scored" in out.err  # a tiny set is said to be one
    sample.main(["--workdir", str(work), "--source", f"folder:{imgs}", "--split", "all",
                 "--num", "0", "--out", str(tmp_path / "all.png")])  # fmt: skip
    out = capsys.readouterr()
    assert re.search(r"MSE 0\.\d+, PSNR [\d.]+ dB over 100 of 100 images of folder:", out.out)
    assert "only" not in out.err


def test_token_manifest_records_the_tokenizer_relative_to_itself(trained10, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    import sample

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"imgs/{i}.png")
    out = tmp_path / "export" / "tokens"
    sample.main(["--workdir", str(trained10), "--mode", "tokens", "--split", "train",
                 "--source", f"folder:{tmp_path / 'imgs'}", "--out", str(out)])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert not Path(manifest["tokenizer"]).is_absolute(), manifest["tokenizer"]
    assert (out / manifest["tokenizer"]).resolve() == trained10.resolve()


def test_a_failed_start_up_leaves_no_workdir_behind(tmp_path):
    new = tmp_path / "new"
    bad = "--config.data.source=folder:/no/such/dir"
    one_line_error(run("train.py", *TINY, f"--workdir={new}", bad), "train.py", "does not exist")
    assert not new.exists()  # not a folder holding only .lock
    from tests.conftest import config
    from vqvae.data import DataError
    from vqvae.trainer import Trainer

    empty = tmp_path / "empty"
    empty.mkdir()  # a folder the user made stays, empty
    with pytest.raises(DataError):
        Trainer(config(**{"data.source": "folder:/no/such/dir"}), empty).train()
    assert empty.is_dir() and not list(empty.iterdir())


def test_a_folder_run_warns_of_a_tiny_held_out_set_and_ends_without_grains_shm_noise(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    args = [f"--config.data.source=folder:{imgs}", "--config.data.workers=1"]
    proc = run("train.py", *TINY, f"--workdir={tmp_path / 'w'}", *args, "--config.steps=2")
    assert proc.returncode == 0, proc.stderr
    assert "leaked shared_memory" not in proc.stderr  # grain's workers, closed or not
    (warned,) = [x for x in proc.stderr.splitlines() if "held-out set: only" in x]
    assert re.search(r"only \d example\(s\) \(data\.val_fraction=0\.02 of folder:", warned)
