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

import logging
import re
import shutil
import sys
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

from vqvae.model import VQVAEConfig
from vqvae.prior import PriorConfig
from vqvae.sharding import make_mesh, replicated

CONFIGS = {"vqvae": VQVAEConfig, "prior": PriorConfig}
log = logging.getLogger(__name__)


class _QuietReadOnly(logging.Filter):
    """Drop orbax's notes that a folder opened read-only is read-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "read only" not in msg and "read_only=True" not in msg


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _drop_closed_loop_noise(previous):
    """When a restore fails, tensorstore's pending callbacks reach orbax's event loop after
    it closed, and each prints a 'RuntimeError: Event loop is closed' traceback. That one
    message is dropped; every other unraisable exception goes to the previous hook."""

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    return hook


sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


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
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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
            raise DamagedCheckpoint(step, self.directory, _reason(e)) from None
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

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise DamagedCheckpoint(step, self.directory, _reason(e)) from None
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_model(
    workdir: str | Path, step: int | None = None, kind: str = "vqvae"
) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint alone (its meta carries the model config).

    ``kind``: "vqvae" (the tokenizer) or "prior". Without ``step``, the newest intact
    checkpoint (a damaged newer one is named in a warning); a damaged ``step`` is an error.
    """
    workdir = Path(workdir).expanduser()
    if not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} does not exist")
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        candidates = [ckpt._step(step)] if step is not None else ckpt.steps()
        if not candidates:
            raise CheckpointError(f"no checkpoints in {ckpt.directory}")
        damaged = []
        for s in candidates:
            try:
                model, meta = _load_step(ckpt, s, kind, workdir)
            except DamagedCheckpoint as e:
                damaged.append(e)
                continue
            for e in damaged:
                log.warning("%s; using checkpoint %d", e, s)
            return model, meta
        e = damaged[-1]
        intact = "" if step is not None else " and no older one restores"
        others = [s for s in ckpt.steps() if s != e.step]
        hint = f"; pick another with --step ({', '.join(map(str, others))})" if others else ""
        raise CheckpointError(f"{e}{intact}{hint if step is not None else ''}") from None
    finally:
        ckpt.close()


def _load_step(ckpt: Checkpoints, step: int, kind: str, workdir: Path):
    meta = ckpt.meta(step)
    found = meta.get("kind", "vqvae")
    if found != kind:
        raise CheckpointError(f"{workdir} holds a {found} checkpoint, not a {kind} one")
    config = CONFIGS[kind].from_dict(meta["model"])
    abstract = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = _with_sharding({"params": params, "rest": rest}, replicated(make_mesh()))
    model_state, _, meta = ckpt.restore(step, target)
    return nnx.merge(graphdef, model_state["params"], model_state["rest"]), meta
