"""The one place that talks to orbax: save, find, verify and restore checkpoints.

A checkpoint has up to four items: ``model`` (parameters and the EMA codebook state),
``train`` (optimizer state, step and any other training state), ``meta`` (JSON: the model
config, everything needed to use the model without a config file, and a checksum of every
saved array) and ``data`` (grain's iterator state, one file per process). Orbax writes each
step to a temporary folder and renames it when complete, so a killed process never leaves
a half-written checkpoint that a restore would pick up. A checkpoint that does not restore
(a missing or truncated file, unreadable metadata) or whose arrays do not match their
checksums is *damaged*: it is never deleted, only moved out of the way (``set_aside``).
"""

import errno
import importlib
import logging
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae.errors import UserError
from vqvae.sharding import make_mesh, replicated

# Checkpoints name their model config's class ("model_class" in the meta); older ones only
# their kind, translated here. Only the package's own classes are imported from a name.
OLDER_MODEL_CLASSES = {"vqvae": "vqvae.model:VQVAEConfig", "prior": "vqvae.prior:PriorConfig"}
log = logging.getLogger(__name__)


def _says_disk_full(text: str) -> bool:
    """An error message of a full disk (tensorstore's: RESOURCE_EXHAUSTED on a write)."""
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    return "RESOURCE_EXHAUSTED" in text and "writing" in text.lower()


def disk_full(e: BaseException | None) -> bool:
    """Whether an error (or one it was raised from or during) is a full disk or quota."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _says_disk_full(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietOrbax(logging.Filter):
    """Drop orbax's notes that a folder opened read-only is read-only, and, once a write
    has met a full disk, the tracebacks its background threads and asyncio's futures log
    about it (dozens of them): ``Checkpoints`` reports it in one line instead."""

    seen_disk_full = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "read only" in msg or "read_only=True" in msg:
            return False
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if disk_full(exc) or _says_disk_full(msg):
            _QuietOrbax.seen_disk_full = True
        from_orbax = "orbax" in record.pathname or record.name == "asyncio"
        return not (from_orbax and _QuietOrbax.seen_disk_full)


def _drop_closed_loop_noise(previous):
    """When a restore fails, tensorstore's pending callbacks reach orbax's event loop after
    it closed, and each prints a 'RuntimeError: Event loop is closed' traceback. That one
    message is dropped, and so is a full disk met at exit (a writer flushing): the run
    reports that in one line. Every other unraisable exception goes to the
    previous hook."""

    def hook(unraisable):
        e = unraisable.exc_value
        closed = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        if not (closed or disk_full(e)):
            previous(unraisable)

    return hook


def _drop_disk_full_in_threads(previous):
    """A background writer's thread (orbax's) that dies of a full disk prints a traceback;
    the run's next write meets the same disk and says so in one line."""

    def hook(args):
        if not disk_full(args.exc_value):
            previous(args)

    return hook


_QUIETED = []


def quiet_background_errors() -> None:
    """Install the filters and hooks above (once per process; the scripts' set-up calls
    it). Importing the package changes no global hook."""
    if _QUIETED:
        return
    logging.getLogger("absl").addFilter(_QuietOrbax())
    logging.getLogger("asyncio").addFilter(_QuietOrbax())  # "Future exception was never ..."
    sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
    threading.excepthook = _drop_disk_full_in_threads(threading.excepthook)
    _QUIETED.append(True)


class CheckpointError(UserError, FileNotFoundError):
    """No usable checkpoint where one was expected."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, most often); the complete ones are kept."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that exists but does not restore, or restores other values than saved."""

    def __init__(self, step: int, directory: Path, reason: str):
        super().__init__(f"checkpoint {step} in {directory} is damaged ({reason})")
        self.step, self.reason = step, reason


# --- checksums ----------------------------------------------------------------------------
def _words(x: jax.Array) -> jax.Array:
    """Any array -> its bits as flat uint32 words (16- and 8-bit values widened)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if size in unsigned:
        bits = jax.lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)
    else:  # 8 bytes: two words each
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return bits.reshape(-1)


def _checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of an array's words, position-weighted: (2,) uint32.

    Every weight of the first sum is odd, so any single flipped bit changes it; the second
    mixes positions so that swapped words do too. Integer sums wrap exactly, so the result
    does not depend on how the array is sharded or in which order it is reduced.
    """
    w = _words(x)
    i = jnp.arange(w.shape[0], dtype=jnp.uint32)
    first = jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)
    second = jnp.sum((w ^ (i * jnp.uint32(0x9E3779B9))) * (i | 1), dtype=jnp.uint32)
    return jnp.stack([first, second])


def tree_checksums(tree: Any) -> dict[str, str]:
    """Checksum of every array leaf, keyed by its path: computed on the devices in one
    program, so only the checksums (a few bytes per array) come back to the host."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree.leaves_with_path(tree)]
    leaves = [(k, x) for k, x in leaves if isinstance(x, jax.Array)]
    if not leaves:
        return {}
    shardings = [x.sharding for _, x in leaves if isinstance(x.sharding, NamedSharding)]
    out = NamedSharding(shardings[0].mesh, P()) if shardings else None
    sums = jax.jit(lambda xs: jnp.stack([_checksum(x) for x in xs]), out_shardings=out)(
        [x for _, x in leaves]
    )
    sums = np.asarray(jax.device_get(sums)).astype(np.uint64)
    return {k: f"{int(a) << 32 | int(b):016x}" for (k, _), (a, b) in zip(leaves, sums, strict=True)}


def _reason(e: BaseException) -> str:
    """A short cause for a failed restore (tensorstore messages are long)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    code = re.match(r"([A-Z_]+): ", first)
    array = re.search(r'Error (?:reading|opening) "([^"/]+)/', first)
    if code:
        what = array.group(1).removesuffix(".value") if array else "its arrays"
        return f"cannot read {what}: {code.group(1).lower().replace('_', ' ')}"
    if isinstance(e, ValueError) and "json" in type(e).__name__.lower():
        return f"unreadable metadata: {first[:120]}"
    return f"{type(e).__name__}: {first[:160]}"


def _with_sharding(abstract, sharding):
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if hasattr(x, "shape") else x
        ),
        abstract,
    )


class Checkpoints:
    """Checkpoints of one workdir (``WORKDIR/checkpoints/STEP``), keeping the last few."""

    def __init__(self, workdir: str | Path, max_to_keep: int = 3, read_only: bool = False):
        self.workdir = Path(workdir).expanduser().resolve()
        self.directory = self.workdir / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {Path(workdir)} (no checkpoints/ folder)")
        options = (
            ocp.CheckpointManagerOptions(read_only=True, create=False)
            if read_only
            else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("model", "train", "meta", "data")
        )
        self._writing: int | None = None  # the step whose write may still be in flight
        _QuietOrbax.seen_disk_full = False  # a new run: orbax's errors are shown again
        self._failed: CheckpointWriteError | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every complete checkpoint's step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(
        self, step: int, model: Any, train: Any, meta: dict[str, Any], data_iterator=None
    ) -> None:
        """Start writing checkpoint ``step`` (asynchronously; see ``wait``).

        The arrays' checksums go into its meta, to be verified on restore. A grain
        ``data_iterator``'s state is written now, as of the batches consumed so far.
        """
        checksums = {"model": tree_checksums(model), "train": tree_checksums(train)}
        items = {
            "model": ocp.args.StandardSave(model),
            "train": ocp.args.StandardSave(train),
            "meta": ocp.args.JsonSave({**meta, "checksums": checksums}),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.wait()  # the previous write's failure is that step's, said as such
        self._writing = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._write_failed(e) from None

    def restore_data(self, step: int, data_iterator) -> bool:
        """Set a grain iterator to the state saved with ``step``; False where there is none
        (a checkpoint from before, or written by another number of processes)."""
        try:
            restore = grain.checkpoint.CheckpointRestore(data_iterator)
            self.manager.restore(step, args=ocp.args.Composite(data=restore))
        except Exception as e:
            log.info("no data iterator state in checkpoint %d (%s)", step, _reason(e))
            return False
        return True

    def restore(self, step: int, abstract_model: Any, abstract_train: Any | None = None):
        """(model, train or None, meta) of ``step``; abstract trees carry target shardings.

        Raises ``DamagedCheckpoint`` when it does not restore or its checksums differ.
        """
        items = {
            "model": ocp.args.StandardRestore(abstract_model),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_train is not None:
            items["train"] = ocp.args.StandardRestore(abstract_train)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # any failure to read a complete checkpoint is damage
            why = self._missing_file(step, items) or _reason(e)
            raise DamagedCheckpoint(step, self.directory, why) from None
        meta = out["meta"]
        expected = meta.get("checksums")  # absent in checkpoints written before checksums
        if expected is not None:
            for name in ("model", "train") if abstract_train is not None else ("model",):
                found = tree_checksums(out[name])
                bad = [k for k, v in expected[name].items() if found.get(k) != v]
                if bad or set(found) != set(expected[name]):
                    what = bad[0] if bad else "the set of arrays"
                    raise DamagedCheckpoint(
                        step, self.directory, f"checksum mismatch in {name}{what}"
                    )
        train = out.get("train") if abstract_train is not None else None
        return out["model"], train, meta

    def _missing_file(self, step: int, items) -> str | None:
        """ "model/_METADATA is missing" where a file every checkpoint has is gone (orbax
        reports that as a pytree structure error), else None."""
        folder = self.directory / str(step)
        for name in items:
            file = "metadata" if name == "meta" else "_METADATA"
            if not (folder / name).is_dir():
                return f"{name}/ is missing"
            if not (folder / name / file).is_file():
                return f"{name}/{file} is missing"
        return None

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            why = self._missing_file(step, ("meta",)) or _reason(e)
            raise DamagedCheckpoint(step, self.directory, why) from None
        return restored["meta"]

    def set_aside(self, step: int) -> Path:
        """Move a damaged checkpoint to ``WORKDIR/damaged/STEP`` (never deleted)."""
        target = self.workdir / "damaged" / str(step)
        n = 1
        while target.exists():
            n += 1
            target = self.workdir / "damaged" / f"{step}-{n}"
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()
        return target

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        step = steps[0] if step is None and steps else step
        if step is None or step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(
                f"no checkpoint {'' if step is None else step} in {self.directory} "
                f"(checkpoints there: {have})"
            )
        return step

    def wait(self) -> None:
        """Wait for the write in flight; ``CheckpointWriteError`` if it failed (raised once:
        the error is not repeated by a later ``wait``, as in a ``finally``)."""
        if self._failed is not None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_failed(e) from None
        self._writing = None

    def _write_failed(self, e: BaseException) -> "CheckpointWriteError":
        """The one-line error for a failed write: why, and which complete step is kept (the
        partial write is in a temporary folder that no restore picks up)."""
        why = "no space left on device" if disk_full(e) else _reason(e)
        step = "" if self._writing is None else f" {self._writing}"
        self._failed = CheckpointWriteError(
            f"cannot write checkpoint{step} in {self.directory}: {why}; {self._kept(e)}"
        )
        return self._failed

    def _kept(self, e: BaseException) -> str:
        """Which complete checkpoint a rerun resumes from, and when to rerun."""
        kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        if kept:
            said = f"checkpoint {kept[-1]} is kept intact; rerun to resume from it"
        else:
            said = "no checkpoint was written yet"
        return said + (" once there is room" if disk_full(e) else "")

    def disk_full(self, e: OSError) -> "CheckpointWriteError":
        """The one-line error for a full disk met by any other write of the run (the
        metrics, TensorBoard, an image): the write in flight is waited for first, so the
        checkpoint named as kept is complete."""
        if self._failed is not None:
            return self._failed
        try:
            self.wait()
        except CheckpointWriteError as failed:
            return failed
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return CheckpointWriteError(f"no space left on device{where}; {self._kept(e)}")

    def close(self) -> None:
        self.manager.close()


ROTATION_RETRIES = 5  # listings of a workdir whose trainer removes what was just listed


def model_config_class(meta: dict[str, Any]) -> type:
    """The model config class a checkpoint's meta names (older checkpoints: by kind)."""
    name = meta.get("model_class") or OLDER_MODEL_CLASSES.get(meta.get("kind", "vqvae"), "")
    module, _, qualname = name.partition(":")
    if not (module == "vqvae" or module.startswith("vqvae.")) or not qualname:
        raise CheckpointError(f"the checkpoint names no model config of this package ({name!r})")
    try:
        return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's model config {name} is not in this version") from e


def load_model(
    workdir: str | Path, step: int | None = None, kind: str = "vqvae"
) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint alone (its meta carries the model config).

    ``kind``: "vqvae" (the tokenizer) or "prior". Without ``step``, the newest intact
    checkpoint (a damaged newer one is named in a warning); a damaged ``step`` is an error.
    A checkpoint removed while it is read (a running trainer keeps only its newest few) is
    passed over like a damaged one, and the checkpoints are listed again if need be.
    """
    workdir = Path(workdir).expanduser()
    if not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} does not exist")
    for _ in range(ROTATION_RETRIES):
        ckpt = _open_read_only(workdir)
        try:
            loaded = _load_newest(ckpt, step, kind, workdir)
        finally:
            ckpt.close()
        if loaded is not None:
            return loaded
    raise CheckpointError(
        f"the checkpoints in {workdir / 'checkpoints'} were removed while being read "
        f"{ROTATION_RETRIES} times over: a running trainer replaces them faster than they load"
    )


def _open_read_only(workdir: Path) -> Checkpoints:
    """The workdir's checkpoints, read-only; listed again when one vanishes while orbax
    lists them (it reads each step folder's time after finding it)."""
    for _ in range(ROTATION_RETRIES - 1):
        try:
            return Checkpoints(workdir, read_only=True)
        except CheckpointError:
            raise
        except FileNotFoundError:
            continue
    return Checkpoints(workdir, read_only=True)


def _load_newest(ckpt: Checkpoints, step: int | None, kind: str, workdir: Path):
    """(model, meta) of ``step``, or of the newest checkpoint that restores; None when every
    one tried was removed while being read (newer ones have appeared: list them again)."""
    candidates = [ckpt._step(step)] if step is not None else ckpt.steps()
    if not candidates:
        raise CheckpointError(f"no checkpoints in {ckpt.directory}")
    damaged, vanished = [], []
    for s in candidates:
        try:
            model, meta = _load_step(ckpt, s, kind, workdir)
        except DamagedCheckpoint as e:
            if (ckpt.directory / str(s)).exists():
                damaged.append(e)
            elif step is not None:
                raise CheckpointError(
                    f"checkpoint {s} in {ckpt.directory} was removed while being read (a "
                    "running trainer keeps only its newest checkpoints)"
                ) from None
            else:
                vanished.append(s)
            continue
        for e in damaged:
            log.warning("%s; using checkpoint %d", e, s)
        if vanished:
            log.info(
                "checkpoint(s) %s removed while being read (a running trainer keeps only its "
                "newest); using checkpoint %d",
                ", ".join(map(str, vanished)),
                s,
            )
        return model, meta
    if vanished:
        return None
    e = damaged[-1]
    intact = "" if step is not None else " and no older one restores"
    others = [s for s in ckpt.steps() if s != e.step]
    hint = f"; pick another with --step ({', '.join(map(str, others))})" if others else ""
    raise CheckpointError(f"{e}{intact}{hint if step is not None else ''}") from None


def _load_step(ckpt: Checkpoints, step: int, kind: str, workdir: Path):
    meta = ckpt.meta(step)
    found = meta.get("kind", "vqvae")
    if found != kind:
        raise CheckpointError(f"{workdir} holds a {found} checkpoint, not a {kind} one")
    config = model_config_class(meta).from_dict(meta["model"])
    abstract = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = _with_sharding({"params": params, "rest": rest}, replicated(make_mesh()))
    model_state, _, meta = ckpt.restore(step, target)
    return nnx.merge(graphdef, model_state["params"], model_state["rest"]), meta
