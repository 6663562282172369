"""Training across real processes: two train.py processes on 127.0.0.1 (jax.distributed with
a local coordinator, 4 fake CPU devices each) against one process of 8 devices."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from vqvae.checkpoint import load_model

pytestmark = pytest.mark.slow  # several processes: left out of make test-fast

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", str(ROOT / "configs" / "tiny.py"), "--config.tensorboard=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, *args, processes=2, devices=4):
    """Start ``processes`` train.py processes on one coordinator; returns the Popen list.

    This is the README's worked local example of a multi-host launch.
    """
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    procs = []
    for i in range(processes):
        cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"--workdir={workdir}", *args]
        if processes > 1:
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
            cmd += [f"--process_id={i}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=240):
    """Wait for every process; returns their (exit status, stderr)."""
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]


def _state(workdir):
    model, _ = load_model(workdir)
    return jax.tree.leaves(nnx.state(model))  # parameters and the EMA codebook state


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
    args = ["--config.checkpoint_every=2", "--config.eval_every=4", "--config.log_every=2"]
    two = tmp_path / "two"
    for steps in (4, 6):  # train and stop at 4; resume to 6 (and evaluate at both)
        out = finish(launch(two, f"--config.steps={steps}", *args))
        for status, err in out:
            assert status == 0, err
        assert "2 process(es), 8 device(s)" in out[0][1]
    assert "resumed from step 4" in out[0][1] and "resumed from step 4" in out[1][1]
    evals = [re.search(r"final evaluation: (.*)", err).group(1) for _, err in out]
    assert evals[0] == evals[1]  # both processes hold the same global figures

    one = launch(tmp_path / "one", "--config.steps=6", *args, processes=1, devices=8)
    ((status, err),) = finish(one)
    assert status == 0, err
    for a, b in zip(_state(two), _state(tmp_path / "one"), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # process 0 alone wrote the history: each step once
    lines = (two / "metrics.jsonl").read_text().splitlines()
    steps = [int(re.search(r'"step": (\d+)', x).group(1)) for x in lines if '"train"' in x]
    assert steps == [2, 4, 6]


def test_a_killed_process_ends_the_other_with_a_message_and_both_resume(tmp_path):
    workdir = tmp_path / "w"
    args = ["--config.steps=100000", "--config.checkpoint_every=4", "--config.eval_every=0"]
    procs = launch(workdir, *args, "--config.log_every=4", "--config.step_timeout_s=10")
    ckpts = workdir / "checkpoints"
    t0 = time.time()
    while not (ckpts.is_dir() and any(n.isdigit() and int(n) >= 4 for n in os.listdir(ckpts))):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()
        assert time.time() - t0 < 240, "no checkpoint"
        time.sleep(0.2)
    procs[1].kill()
    t_kill = time.time()
    status, err = procs[0].wait(timeout=120), procs[0].stderr.read()
    procs[1].wait()
    # not hanging: the watchdog's or a failed collective's exit (3), or the runtime's abort,
    # which the supervisor reports; either way the last line says what happened
    assert status != 0 and time.time() - t_kill < 90, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and "Rerun every process" in last, last

    saved = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
    out = finish(launch(workdir, f"--config.steps={saved + 4}", *args[1:]))
    for code, text in out:
        assert code == 0, text
        assert f"resumed from step {saved}" in text
