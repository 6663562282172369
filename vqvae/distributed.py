"""Runs over several processes: JAX's multi-controller runtime, and ending cleanly when a
peer dies.

``initialize`` starts ``jax.distributed`` when asked (``--config.distributed=True``, or the
coordinator flags of train.py) or when a cluster launcher is detected (Slurm or Open MPI
with more than one task, or ``JAX_COORDINATOR_ADDRESS``). Each process then loads its rows of
every batch, and all of them run the same jitted steps.

When a peer dies, a collective either fails (``peer_lost`` recognises the error) or hangs
(``Watchdog``: no progress for ``timeout_s``). Either way the survivor says so in one line
and leaves at once with ``abandon``, skipping the runtime's shutdown barrier, which would
wait minutes for the dead peer. A collective library may also abort the process from C++
(gloo does, on a peer that died mid-transfer), where no Python runs: ``supervise`` runs a
multi-process training in a child process so that even then the last line says what
happened. Rerunning every process resumes from the last checkpoint.
"""

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax

log = logging.getLogger(__name__)
EXIT_PEER_LOST = 3
SUPERVISED = "VQVAE_SUPERVISED"  # set in the child a supervisor runs
PEER_HINT = "Rerun every process to resume from the last checkpoint"

STEP_TIMEOUT_S = 300  # several processes: a step this late means a peer has died


def cluster_detected() -> str | None:
    """The launcher that started this process as one of several, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "Slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    return None


def initialize(
    enabled: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    step_timeout_s: int = STEP_TIMEOUT_S,
) -> bool:
    """Start the multi-controller runtime if asked or launched as one of several processes.

    Must run before anything touches a JAX device. Returns whether it started. The
    runtime's own check on dead peers waits a minute longer than the loop's ``Watchdog``
    (``step_timeout_s``), so a run whose peer died ends with the watchdog's one line rather
    than the runtime's abort.
    """
    if not multi_process(enabled, coordinator, num_processes, process_id):
        return False
    launcher = cluster_detected()
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=num_processes or None,
        process_id=process_id if process_id is not None and process_id >= 0 else None,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=max(step_timeout_s, 40) + 60,
    )
    log.info(
        "jax.distributed: process %d of %d (%s), %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        launcher or "flags",
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def supervise(argv: list[str]) -> None:
    """Run ``python argv`` in a child and exit with its status, adding one line when it dies
    by a signal. The child dies with its supervisor (a kill of either stops the process);
    SIGTERM and SIGINT are passed on to it, and it handles them as any run does."""
    env = {**os.environ, SUPERVISED: "1"}
    child = subprocess.Popen([sys.executable, *argv], env=env, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    status = child.wait()
    if status < 0:
        name = signal.Signals(-status).name
        print(
            f"train.py: error: the training process ended by {name}; in a run of several "
            f"processes that most often means another one stopped. {PEER_HINT}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 - status)
    sys.exit(status)


def _die_with_parent() -> None:
    """In the child (Linux): SIGKILL when the supervisor goes, however it goes."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def multi_process(
    enabled: bool, coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """Whether ``initialize`` will start the multi-controller runtime."""
    explicit = coordinator or num_processes or (process_id is not None and process_id >= 0)
    return bool(enabled or explicit or cluster_detected())


def peer_lost(error: BaseException) -> bool:
    """Whether an error from a step means another process went away."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return False
    text = str(error).lower()
    words = ("connection reset", "connection refused", "socket closed", "broken pipe")
    return any(w in text for w in words) or "gloo" in text or "nccl" in text


def abandon(message: str) -> None:
    """Say ``message`` in one line and leave now (exit status 3), skipping the shutdown
    barrier that would wait for a peer that is gone."""
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


class Watchdog:
    """Abandons the run when the loop makes no progress (``beat``) for ``timeout_s``: in a
    multi-process run, a collective waiting for a dead peer can otherwise hang for good."""

    def __init__(self, timeout_s: float, what: str):
        self.timeout_s, self.what = timeout_s, what
        self.last = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> "Watchdog":
        """Start watching (counted from now); again: a beat."""
        self.beat()
        if self.timeout_s > 0 and not self.thread.is_alive() and not self.done.is_set():
            self.thread.start()
        return self

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                abandon(
                    f"no progress for {idle:.0f} s ({self.what}): another process has "
                    f"probably stopped. {PEER_HINT}"
                )
