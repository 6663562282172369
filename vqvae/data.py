"""Sources -> global batches: grain shuffles, shards per process, decodes and batches.

The global batch of step ``s`` is a pure function of the seed and ``s``: grain shuffles the
example ids of every epoch afresh (seeded), and process p of P takes rows [p b, (p + 1) b)
of every global batch of B = P b rows, so the global batch does not depend on how many
processes read it. Each example's random crop is seeded by its position in the global
stream, likewise. Decoding runs in worker processes (grain's ``mp_prefetch``) where the
source says it pays; ``workers=0`` decodes inline. An unreadable example is replaced by the
next readable one, inside the workers too, and named once in a warning by the process that
met it. A TFRecord tfds dataset is read by tf.data instead (``vqvae.tfds_stream``).

Batches are ``{"image": uint8 (B, H, W, C), "label": int32 (B,)}`` (tokens sources:
``"tokens"`` int32 (B, h, w)); held-out batches add ``"weight"`` float32 (B,): 1 for an
example, 0 for padding.
"""

import contextlib
import functools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np

from vqvae.sources import (  # noqa: F401  (re-exported: the data API in one place)
    SOURCES,
    DataError,
    Source,
    Stream,
    decode_image,
    make_source,
    read_token_manifest,
    register_source,
)

log = logging.getLogger(__name__)
MAX_AUTO_WORKERS = 16
BUFFER_PER_WORKER = 2  # batches each worker decodes ahead
THREADS_PER_WORKER = 2  # reading threads in each worker: file I/O overlaps decoding
PARENT_POLL_S = 0.5  # how often a decoding worker checks that its parent is alive


class WorkerDied(DataError):
    """A decoding worker process ended unexpectedly (killed, or out of memory)."""


def resolve_workers(setting: int, parallel: bool) -> int:
    """``data.workers``: 0 decodes inline; -1 (auto) is one worker per two CPU cores (each
    worker's two reading threads decode in parallel: Pillow releases the GIL), at most 16,
    for a source whose decoding pays for worker processes (``parallel``: folders, tfds
    array_record)."""
    if setting >= 0:
        return setting
    if not parallel:
        return 0
    cores = len(os.sched_getaffinity(0)) or 1
    return min(MAX_AUTO_WORKERS, max(1, cores // THREADS_PER_WORKER))


class _ProcessRows(grain.MapDataset):
    """Process p's rows of every global batch, each with its position in the global stream.

    Local element j is global element t = (j // b) * B + p * b + j % b, with b = B / P.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process: tuple[int, int]):
        super().__init__(parent)
        (self.p, n), self.global_batch = process, global_batch
        self.local = global_batch // n
        self.length = len(parent) // n

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        t = (j // self.local) * self.global_batch + self.p * self.local + j % self.local
        return t, self._parent[t]


class _Decode(grain.transforms.Map):
    """(position t, example id) -> the decoded example, seeded by (seed, t).

    An unreadable example is replaced by the next readable one (ids i + 1, i + 2, ...); the
    example says how many it passed over (``unreadable``) and the first (``unreadable_id``).
    """

    def __init__(self, source, seed: int | None, total: int | None = None):
        self.source, self.seed, self.total = source, seed, total

    def map(self, element):
        t, i = element
        rng = None if self.seed is None else np.random.default_rng([self.seed, t])
        n = len(self.source)
        for tries in range(n):
            j = (int(i) + tries) % n
            try:
                example = self.source.decode(self.source[j], rng)
            except Exception:  # corrupt or not an image: the next one stands in
                continue
            example["unreadable"] = np.int32(tries)
            example["unreadable_id"] = np.int64(i if tries else -1)
            if self.total is not None:  # held-out: padding past the end weighs nothing
                example["weight"] = np.float32(t < self.total)
            return example
        raise DataError(f"no readable example in the source ({self.source.name(0)}, ...)")


class _Wrap(grain.transforms.Map):
    """Position t -> example id t mod n (padding repeats the first examples)."""

    def __init__(self, n: int):
        self.n = n

    def map(self, t):
        return t % self.n


def _ensure_absl_flags() -> None:
    """grain's worker processes read absl flags: give them their defaults if unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_dataset(source, global_batch: int, seed: int, process: tuple[int, int]):
    """Endless batched MapDataset of this process's rows; element s is step s's batch."""
    ids = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
    rows = _ProcessRows(ids, global_batch, process)
    return rows.map(_Decode(source, seed)).batch(global_batch // process[1], drop_remainder=True)


def eval_dataset(source, global_batch: int, total: int, process: tuple[int, int]):
    """``total`` held-out examples once, in order, centre-cropped, padded to whole batches."""
    padded = -(-total // global_batch) * global_batch
    ids = grain.MapDataset.range(padded).map(_Wrap(len(source)))
    rows = _ProcessRows(ids, global_batch, process)
    return rows.map(_Decode(source, None, total)).batch(global_batch // process[1])


def _end_with_parent(parent: int, _index: int, _count: int) -> None:
    """In a decoding worker: kill itself once the process that started it is gone, however
    it went (SIGKILL included), so no worker outlives its training run or export. A thread
    polls the parent's pid: the kernel's parent-death signal (PR_SET_PDEATHSIG) would fire
    when the *thread* that started the worker ends, and grain starts them from a pool."""

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="vqvae-parent-watch", daemon=True).start()


def _iterate(dataset, workers: int):
    """Inline (``workers=0``: no threads either, for tests and debugging), or in workers."""
    threads = THREADS_PER_WORKER if workers else 0
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    it = dataset.to_iter_dataset(read)
    if workers:
        _ensure_absl_flags()
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=BUFFER_PER_WORKER
        )
        it = it.mp_prefetch(
            options, worker_init_fn=functools.partial(_end_with_parent, os.getpid())
        )
    return iter(it)


def _worker_died(e: BaseException) -> WorkerDied | None:
    """grain's error for a worker process that ended -> one line saying so, else None."""
    found = re.search(r"Worker process was terminated unexpectedly with exit code (-?\d+)", str(e))
    if not found:
        return None
    code = int(found.group(1))
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return WorkerDied(
        f"a data decoding worker process died ({how}); rerunning resumes from the last checkpoint"
    )


# the unreadable files met by every pipeline of a run (innermost ``unreadable_files``)
_RUNS: list[set[str]] = []


@contextlib.contextmanager
def unreadable_files():
    """Collect the names of the unreadable files that every pipeline meets meanwhile
    (training, start-up statistics, each evaluation): each is warned about once, the
    first time, and the set counts them all."""
    met: set[str] = set()
    _RUNS.append(met)
    try:
        yield met
    finally:
        _RUNS.remove(met)


def this_process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class Batches:
    """Host batches -> global arrays, one per ``next``; closes its workers on ``close``.

    ``host_fn`` changes a host batch before it becomes global (the prior encodes images to
    tokens there). ``wait_seconds`` is the time ``next`` spent waiting for data;
    ``unreadable`` the ids of unreadable examples this process met.
    """

    def __init__(self, it: Iterator, source, sharding, host_fn: Callable | None = None):
        self.it, self.source, self.sharding, self.host_fn = it, source, sharding, host_fn
        self.wait_seconds, self.unreadable = 0.0, set()
        self._warned: set[str] = set()  # outside ``unreadable_files``: once per pipeline
        self._pending: dict | None = None

    def peek(self) -> dict:
        """Shapes, dtypes and shardings of the global batches, from the first one (which
        ``next`` still returns)."""
        if self._pending is None:
            self._pending = self.next_host()
        return {
            k: jax.ShapeDtypeStruct(
                (v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype, sharding=self.sharding
            )
            for k, v in self._pending.items()
        }

    def next_host(self) -> dict:
        """This process's next batch as NumPy arrays (weight kept, bookkeeping taken out)."""
        if self._pending is not None:
            host, self._pending = self._pending, None
            return host
        t0 = time.perf_counter()
        try:
            host = next(self.it)
        except RuntimeError as e:
            died = _worker_died(e)
            if died is None:
                raise
            raise died from None
        self.wait_seconds += time.perf_counter() - t0
        host = dict(host)
        passed, first = host.pop("unreadable", None), host.pop("unreadable_id", None)
        self.last_passed = passed  # per row: unreadable examples it stands in for
        if passed is not None:
            for i in np.unique(first[passed > 0]):
                self.unreadable.add(int(i))
                name = self.source.name(int(i))
                warned = _RUNS[-1] if _RUNS else self._warned
                if name not in warned:
                    warned.add(name)
                    log.warning("skipping unreadable example %s", name)
        return self.host_fn(host) if self.host_fn else host

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return to_global(self.next_host(), self.sharding)

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrainBatches(Batches):
    """The training stream from step ``start`` on, with grain's iterator state.

    The dataset starts at step ``base`` (grain states are positions relative to it); a state
    saved under the same layout (base, workers, processes) restores exactly, any other
    resume is positioned from the step alone, which is as exact.
    """

    def __init__(self, source, data, global_batch, seed, sharding, start, saved=None, host_fn=None):
        self.workers = resolve_workers(data.get("workers", -1), source.parallel)
        process = this_process()
        self.layout = {"workers": self.workers, "processes": process[1]}
        if isinstance(source, Stream):
            it = source.batches(global_batch // process[1], start, one_pass=False)
            self.base, self.grain_iterator, self.restore_state = start, None, False
        else:
            dataset = train_dataset(source, global_batch, seed, process)
            usable = saved is not None and saved.get("layout") == self.layout
            self.base = saved["base"] if usable else start
            it = _iterate(dataset[self.base :], self.workers)
            self.grain_iterator = it
            self.restore_state = usable  # the trainer then restores grain state from the checkpoint
        super().__init__(it, source, sharding, host_fn)

    def position(self) -> dict:
        """What a checkpoint keeps beside grain's own state (the meta's ``data_position``)."""
        return {"base": self.base, "layout": self.layout}


def held_out(source, global_batch: int, total: int, sharding, workers: int = 0, host_fn=None):
    """Global held-out batches covering ``total`` examples, each with its host part:
    yields (global batch, this process's host batch)."""
    process = this_process()
    if isinstance(source, Stream):
        it = _padded_stream(source, global_batch, total, process)
    else:
        it = _iterate(eval_dataset(source, global_batch, total, process), workers)
    with Batches(it, source, sharding, host_fn) as batches:
        for _ in range(-(-total // global_batch)):
            host = batches.next_host()
            yield to_global(host, sharding), host


def _padded_stream(stream: Stream, global_batch: int, total: int, process) -> Iterator:
    """A tf.data one-pass stream as whole local batches with weights: 1 for this process's
    examples, 0 for the padding once its part of the split runs out."""
    local = global_batch // process[1]
    last = None
    for b in stream.batches(local, 0, one_pass=True):
        n = len(b["label"])
        last = {k: np.concatenate([v, np.repeat(v[-1:], local - n, 0)]) for k, v in b.items()}
        yield {**last, "weight": (np.arange(local) < n).astype(np.float32)}
    while last is not None:
        yield {**last, "weight": np.zeros(local, np.float32)}


def local_examples(source, batch_size: int, workers: int = 0, skipped: set | None = None):
    """Every readable example of ``source`` once, in order, centre-cropped, read by this
    process alone (for export and statistics; a tf.data stream: this process's part);
    batches of ``batch_size``, fewer where unreadable examples were left out (their names
    go into ``skipped``)."""
    total = len(source)
    if isinstance(source, Stream):  # this process's part of the split
        yield from source.batches(batch_size, 0, one_pass=True)
        return
    it = _iterate(eval_dataset(source, batch_size, total, (0, 1)), workers)
    batches = Batches(it, source, None)
    try:
        for start in range(0, total, batch_size):
            host = batches.next_host()
            keep = np.arange(batch_size) < total - start
            # a row standing in for unreadable examples is read again at its own place
            keep &= batches.last_passed == 0
            yield {k: v[keep] for k, v in host.items() if k != "weight"}
    finally:
        batches.close()
        if skipped is not None:
            skipped.update(source.name(i) for i in batches.unreadable)


def to_global(host: dict, sharding) -> dict:
    """This process's host batch -> global jax.Arrays laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}
