"""Faults at the worst moments: kills between a save and its evaluation, signals during
start-up, dead decoding workers, a full disk, checkpoints that vanish while read, killed
exports, unreadable files met by several pipelines, a checkpoint missing a file.

The kill tests run train.py and sample.py as real processes (marked slow); the rest inject
the fault in-process.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import config
from .test_scripts import ROOT, TINY, Lines, checkpoints, start, wait_for

pytestmark = pytest.mark.slow  # real processes killed: left out of make test-fast

LINUX = sys.platform.startswith("linux")


# --- helpers ------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux: read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def survivors(pids, within: float = 10.0) -> list[str]:
    """The processes of ``pids`` still alive after ``within`` seconds, with their commands."""
    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < within:
        time.sleep(0.2)
    left = []
    for p in pids:
        if alive(p):
            with_cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
            left.append(f"{p}: {with_cmd.decode(errors='replace')[:120]}")
            os.kill(p, signal.SIGKILL)  # do not leave it to other tests
    return left


def error_lines(text: str) -> list[str]:
    """What a run said besides its INFO log lines and progress lines."""
    return [
        x
        for x in text.splitlines()
        if x.strip() and not re.match(r"I\d{4} ", x) and not x.startswith("[")
    ]


def png_folder(root: Path, n: int, size: int = 20, bad: tuple[str, ...] = ()) -> Path:
    """``n`` random PNGs (0.png ...) under ``root``, and files named ``bad`` that are not
    images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"{i}.png"
        )
    for name in bad:
        (root / name).write_bytes(b"not an image")
    return root


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill
            out.append(json.loads(line))
    return out


def eval_steps(workdir: Path) -> list[int]:
    return [r["step"] for r in metrics(workdir) if r["split"] == "eval"]


# --- a kill between a checkpoint and its evaluation ---------------------------------------
def test_a_restored_step_whose_evaluation_is_missing_is_evaluated(trained10, tmp_path):
    """Checkpoint 10 is saved before step 10 is evaluated: a run killed in between has no
    evaluation at 10. The rerun evaluates it (once), also when 10 is the last step."""
    from vqvae.trainer import Trainer

    workdir = tmp_path / "w"
    shutil.copytree(trained10, workdir)
    kept = [r for r in metrics(workdir) if r["split"] != "eval"]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert eval_steps(workdir) == []

    result = Trainer(config(steps=10), workdir).train()  # nothing to train, one to evaluate
    assert eval_steps(workdir) == [10] and set(result) >= {"mse"}, result
    Trainer(config(steps=20), workdir).train()
    assert eval_steps(workdir) == [10, 20]  # 10 not again


@pytest.mark.slow
def test_kill_after_a_checkpoint_before_its_evaluation(tmp_path):
    args = [*TINY, f"--workdir={tmp_path}", "--config.steps=45", "--config.checkpoint_every=5"]
    args += ["--config.eval_every=40", "--config.log_every=5"]
    proc = start("train.py", *args)
    forty = tmp_path / "checkpoints" / "40"
    t0 = time.time()
    while not forty.is_dir():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < 300, "timed out"
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    if 40 in eval_steps(tmp_path):
        pytest.skip("the evaluation at 40 finished before the kill landed")

    again = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert re.search(r"resumed from step 40\b", again.stderr), again.stderr
    assert eval_steps(tmp_path) == [40, 45]


# --- signals before train.py's handler would have been installed --------------------------
def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` yet (its SigCgt mask, Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
    return bool(caught >> (sig - 1) & 1)


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_early_in_start_up_ends_in_one_line(tmp_path, sig):
    """Sent 0.2, 0.5 and 1 s after launch, while train.py imports JAX: one line, no
    traceback, nothing written. (Never before the interpreter itself is up, which is when
    it handles SIGINT, plus 0.1 s for it to reach the script's first line.) Later in
    start-up the trainer's own line says the same."""
    name = signal.Signals(sig).name
    for i, delay in enumerate((0.2, 0.5, 1.0)):
        workdir = tmp_path / str(i)
        t0 = time.time()
        proc = start("train.py", *TINY, f"--workdir={workdir}", "--config.steps=5")
        while not _catches(proc.pid, signal.SIGINT) and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(max(delay - (time.time() - t0), 0.1))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        said = error_lines(err)
        assert "Traceback" not in err and len(said) == 1, (delay, proc.returncode, err)
        if proc.returncode == 128 + sig:
            assert said == [f"train.py: interrupted by {name} during start-up: nothing written"]
        else:  # the trainer's start-up took it (a slow machine)
            assert proc.returncode == 0 and f"{name} during start-up: stopped" in said[0], err
        assert not (workdir / "checkpoints").exists()


# --- decoding workers ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_decoding_workers_die_with_the_run_and_a_dead_worker_is_one_line(tmp_path):
    """A decoding worker killed: training stops with one line saying so. The rerun resumes;
    killed itself (SIGKILL), it leaves no worker and no resource tracker behind."""
    images = png_folder(tmp_path / "imgs", 40)
    args = [*TINY, f"--workdir={tmp_path / 'w'}", "--config.steps=100000"]
    args += ["--config.eval_every=0", "--config.log_every=5", "--config.checkpoint_every=10"]
    args += [f"--config.data.source=folder:{images}", "--config.data.workers=2"]

    def workers(proc):
        return [p for p in descendants(proc.pid) if b"spawn_main" in _cmdline(p)]

    workdir = tmp_path / "w"
    proc = start("train.py", *args)
    lines = Lines(proc)
    wait_for(lambda: checkpoints(workdir), proc)
    first = descendants(proc.pid)
    os.kill(workers(proc)[0], signal.SIGKILL)
    proc.wait(timeout=120)
    err = lines.text()
    assert proc.returncode == 2, err
    said = error_lines(err)
    died = [x for x in said if x.startswith("train.py: error:")]
    assert len(died) == 1 and "Traceback" not in err, err
    assert re.search(
        r"decoding worker process died \(killed by SIGKILL\); rerunning resumes", died[0]
    )
    assert not survivors(first), "the other worker or the resource tracker outlived the run"

    again = start("train.py", *args)
    lines = Lines(again)
    lines.wait_for(r"resumed from step \d+")
    resumed = checkpoints(workdir)[-1]
    wait_for(lambda: checkpoints(workdir)[-1] > resumed, again)  # the workers are decoding
    below = descendants(again.pid)
    assert len([p for p in below if b"spawn_main" in _cmdline(p)]) == 2
    again.kill()
    again.wait()
    assert not survivors(below), "outlived a SIGKILL of their run"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# --- a full disk -----------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_write_is_one_error(tmp_path, monkeypatch, caplog):
    """The meta file of checkpoint 4 fails to write with ENOSPC in orbax's background
    thread (as on a full disk): one error naming the disk and the step kept, none of
    orbax's tracebacks, and checkpoint 2 intact."""
    from etils import epath

    from vqvae.checkpoint import CheckpointError, load_model, quiet_background_errors
    from vqvae.trainer import Trainer

    quiet_background_errors()  # what train.py's set-up installs (importing installs nothing)
    write_text = epath.abstract_path.Path.write_text

    def full_from_4(self, *args, **kwargs):
        step = re.search(r"checkpoints/(\d+)\.orbax-checkpoint-tmp", os.fspath(self))
        if step and int(step.group(1)) >= 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(epath.abstract_path.Path, "write_text", full_from_4)
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointError) as e:
        Trainer(config(steps=8, checkpoint_every=2, eval_every=0), tmp_path).train()
    assert re.fullmatch(
        r"cannot write checkpoint 4 in \S+: no space left on device; checkpoint 2 is kept "
        r"intact; rerun to resume from it once there is room",
        str(e.value),
    ), e.value
    # what asyncio says of a tensorstore write future that failed likewise, at collection
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    logging.getLogger("asyncio").error(
        "Future exception was never retrieved", exc_info=(OSError, full, None)
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:200] for r in errors]
    monkeypatch.undo()
    assert checkpoints(tmp_path) == [2]
    load_model(tmp_path, step=2)  # intact


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (needs the right to mount: skipped where there is none)."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        made = None
    if made is None or made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected test covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="tmpfs")
def test_a_full_disk_ends_training_in_one_line(small_disk):
    """A real full disk (TensorBoard on, a checkpoint every step)."""
    workdir = small_disk / "w"
    args = ["--config", str(ROOT / "configs" / "tiny.py"), f"--workdir={workdir}"]
    args += ["--config.steps=1000", "--config.checkpoint_every=1", "--config.eval_every=5"]
    args += ["--config.keep_checkpoints=1000"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = error_lines(proc.stderr)
    assert len(said) == 1, proc.stderr[-3000:]
    found = re.fullmatch(
        r"train\.py: error: (cannot write checkpoint \d+ in \S+: )?no space left on device"
        r".*; checkpoint (\d+) is kept intact; rerun to resume from it once there is room",
        said[0],
    )
    assert found, said[0]
    assert int(found.group(2)) in checkpoints(workdir)


# --- checkpoints that vanish while read -----------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(trained10, tmp_path_factory):
    """Checkpoints 10 and 20 of the tiny tokenizer."""
    from vqvae.trainer import Trainer

    workdir = tmp_path_factory.mktemp("faults20") / "w"
    shutil.copytree(trained10, workdir)
    Trainer(config(steps=20, eval_every=0), workdir).train()
    return workdir


def _vanish_when_listed(monkeypatch, victim: str):
    """Remove checkpoint ``victim`` right after orbax has found it and before it reads the
    folder's time: what a trainer that rotates its checkpoints does now and then."""
    from orbax.checkpoint._src.path import step as step_lib

    build = step_lib._StandardNameFormat._build_metadata

    def build_then_vanish(self, path, step=None):
        found = build(self, path, step)
        if found is not None and path.name == victim and path.exists():
            shutil.rmtree(path)
        return found

    monkeypatch.setattr(step_lib._StandardNameFormat, "_build_metadata", build_then_vanish)


@pytest.mark.parametrize("victim,left", [("10", 20), ("20", 10)])
def test_a_checkpoint_removed_while_listed_is_passed_over(
    two_checkpoints, tmp_path, monkeypatch, caplog, victim, left
):
    from vqvae.tokenizer import Tokenizer

    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    _vanish_when_listed(monkeypatch, victim)
    with caplog.at_level(logging.WARNING, logger="vqvae"):
        tok = Tokenizer.load(workdir)
    assert checkpoints(workdir) == [left] and tok.workdir == workdir.resolve()
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def test_a_checkpoint_removed_while_read_falls_back_to_the_next(
    two_checkpoints, tmp_path, monkeypatch, caplog
):
    """The newest checkpoint goes after the listing, while its files are read: the next
    newest is used, said as a removal (not as damage)."""
    from vqvae.checkpoint import Checkpoints
    from vqvae.tokenizer import Tokenizer

    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    meta = Checkpoints.meta

    def rotated(self, step=None):
        if step == 20:
            shutil.rmtree(self.directory / "20", ignore_errors=True)
        return meta(self, step)

    monkeypatch.setattr(Checkpoints, "meta", rotated)
    with caplog.at_level(logging.INFO, logger="vqvae"):
        tok = Tokenizer.load(workdir)
    assert tok.meta["checksums"] and checkpoints(workdir) == [10]
    said = [r.getMessage() for r in caplog.records]
    assert any("20 removed while being read" in m and "using checkpoint 10" in m for m in said)
    assert not [m for m in said if "damaged" in m], said


def test_a_deleted_array_metadata_file_is_named(trained10, tmp_path):
    from vqvae.checkpoint import CheckpointError
    from vqvae.tokenizer import Tokenizer

    workdir = tmp_path / "w"
    shutil.copytree(trained10, workdir)
    (workdir / "checkpoints" / "10" / "model" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"damaged \(model/_METADATA is missing\)"):
        Tokenizer.load(workdir, step=10)


# --- unreadable files met by several pipelines --------------------------------------------
def _held_out(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < int(val_fraction * 10_000)  # as FolderSource


def test_unreadable_files_are_warned_about_once_and_all_counted(tmp_path, caplog):
    """Two unreadable training files and one held-out: met at start-up, in training and in
    every evaluation, each is warned about once, and the count is 3."""
    from vqvae.trainer import Trainer

    names = [f"bad{i}.png" for i in range(100)]
    train_bad = [n for n in names if not _held_out(n, 0.3)][:2]
    val_bad = [n for n in names if _held_out(n, 0.3)][:1]
    images = png_folder(tmp_path / "imgs", 24, bad=(*train_bad, *val_bad))
    c = config(steps=6, eval_every=2, checkpoint_every=6, log_every=2)
    c.data.source, c.data.val_fraction = f"folder:{images}", 0.3
    with caplog.at_level(logging.WARNING):
        Trainer(c, tmp_path / "w").train()
    said = [r.getMessage() for r in caplog.records]
    warned = [m for m in said if m.startswith("skipping unreadable example")]
    assert sorted(Path(m.split()[-1]).name for m in warned) == sorted(train_bad + val_bad)
    summary = [m for m in said if "unreadable file(s) were skipped" in m]
    assert len(summary) == 1 and summary[0].startswith("3 "), summary
    last = [r for r in metrics(tmp_path / "w") if r["split"] == "train"][-1]
    assert last["unreadable_files"] == 3


# --- exports ---------------------------------------------------------------------------------
def test_an_export_removes_what_killed_exports_left(trained10, tmp_path):
    """A killed export's hidden folder goes at the next export into the same folder; a
    running export's (its lock held) stays."""
    from vqvae.export import export_codebook
    from vqvae.tokenizer import Tokenizer

    for name in ("killed", "running"):
        (tmp_path / f".{name}.partial").mkdir()
        (tmp_path / f".{name}.partial" / "tokens-00000.npz").write_bytes(b"half")
        (tmp_path / f".{name}.partial.lock").touch()
    with open(tmp_path / ".running.partial.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        export_codebook(Tokenizer.load(trained10), tmp_path / "codebook")
        assert (tmp_path / ".running.partial").is_dir()
    assert sorted(os.listdir(tmp_path)) == [".running.partial", ".running.partial.lock", "codebook"]


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_a_killed_export_leaves_no_worker_and_is_cleaned_up_next_time(trained10, tmp_path):
    images = png_folder(tmp_path / "imgs", 3000, size=16)
    out = tmp_path / "exports" / "tokens"
    proc = start(
        "sample.py", "--workdir", str(trained10), "--mode", "tokens", "--out", str(out),
        "--source", f"folder:{images}",
    )  # fmt: skip
    partial = out.parent / ".tokens.partial"

    def decoding():
        below = descendants(proc.pid)
        return partial.is_dir() and any(b"spawn_main" in _cmdline(p) for p in below)

    t0 = time.time()
    while not decoding():
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.time() - t0 < 180, "timed out"
        time.sleep(0.02)
    below = descendants(proc.pid)
    proc.kill()
    proc.communicate()
    assert not survivors(below), "outlived a SIGKILL of their export"
    assert partial.is_dir() and not out.exists()

    again = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--workdir", str(trained10), "--mode",
         "codebook", "--out", str(out.parent / "codebook")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(out.parent)) == ["codebook"]
