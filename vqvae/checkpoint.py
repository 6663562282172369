"""The one place that talks to orbax: save, find and restore checkpoints.

A checkpoint has three items: ``model`` (parameters and the EMA codebook state), ``train``
(optimizer state and step) and ``meta`` (JSON: the model config and everything needed to
use the model without a config file). Orbax writes each step to a temporary folder and
renames it when complete, so a killed process never leaves a half-written checkpoint that
a restore would pick up.
"""

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vqvae.model import VQVAEConfig
from vqvae.prior import PriorConfig
from vqvae.sharding import make_mesh, replicated

CONFIGS = {"vqvae": VQVAEConfig, "prior": PriorConfig}


class _QuietReadOnly(logging.Filter):
    """Drop orbax's notes that a folder opened read-only is read-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "read only" not in msg and "read_only=True" not in msg


logging.getLogger("absl").addFilter(_QuietReadOnly())


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


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
        self.directory = Path(workdir).expanduser().resolve() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {Path(workdir)} (no checkpoints/ folder)")
        options = (
            ocp.CheckpointManagerOptions(read_only=True, create=False)
            if read_only
            else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("model", "train", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model: Any, train: Any, meta: dict[str, Any]) -> None:
        """Start writing checkpoint ``step`` (asynchronously; see ``wait``)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_model: Any, abstract_train: Any | None = None):
        """(model, train or None, meta) of ``step``; abstract trees carry target shardings."""
        items = {
            "model": ocp.args.StandardRestore(abstract_model),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_train is not None:
            items["train"] = ocp.args.StandardRestore(abstract_train)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["model"], out.get("train") if abstract_train is not None else None, out["meta"]

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint {'' if step is None else step} in {self.directory}"
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

    ``kind``: "vqvae" (the tokenizer) or "prior".
    """
    workdir = Path(workdir).expanduser()
    if not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} does not exist")
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step = ckpt._step(step)
        meta = ckpt.meta(step)
        found = meta.get("kind", "vqvae")
        if found != kind:
            raise CheckpointError(f"{workdir} holds a {found} checkpoint, not a {kind} one")
        config = CONFIGS[kind].from_dict(meta["model"])
        abstract = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        target = _with_sharding({"params": params, "rest": rest}, replicated(make_mesh()))
        model_state, _, meta = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, model_state["params"], model_state["rest"]), meta
