"""train.py and sample.py as users run them: errors, hard kills, signals, reconstructions."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        (["--config.modle.num_codes=3"], r"unknown config key .*modle"),
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
    assert "final evaluation" in again.stderr


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

    with Image.open(out) as im:  # 2 rows of inputs over reconstructions, 8 of 16px each
        assert im.size == (8 * 16, 4 * 16)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_ctrl_c_is_handled_like_sigterm(tmp_path):
    assert len(interrupt_training(tmp_path, signal.SIGINT)) == 1
