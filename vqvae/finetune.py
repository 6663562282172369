"""Fine-tuning from imported (or any) weights: ``config.init_from`` and ``config.freeze``.

``init_from`` names a workdir (or its ``checkpoints/STEP``), a folder written by
``python -m vqvae.convert export``, or a released weight file (taming ``.ckpt``, LlamaGen
``.pt``, MaskGIT msgpack, a ``.safetensors``/``.npz`` of one of them: the family is read
off the tensor names, the preset from ``init_preset`` or the family's default). The run
takes the source's model config, starts from its parameters with a fresh optimizer, and
records the source in its checkpoints' meta. With ``gan.weight > 0`` the discriminator is
the source's where it has one (taming's, imported by ``python -m vqvae.convert taming``:
its shape replaces the run's ``gan`` shape keys), else a fresh one; either way it joins at
``gan.start_step``, counted from the fine-tune's own step 0.

``freeze="encoder_codebook"`` keeps the encoder (with quant_conv) and the codebook fixed,
bit for bit: their gradients are zeroed before the optimizer (so clipping sees only the
trained part) and their updates after it (decoder-only fine-tuning).
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from vqvae.convert.common import ConvertError, model_params, read_tensors, sha256
from vqvae.errors import InvalidValueError

log = logging.getLogger(__name__)

FREEZE = {"": (), "encoder_codebook": ("encoder", "quantizer")}


@dataclasses.dataclass
class Source:
    """Where a fine-tune starts: the model and a record of it for the meta."""

    model: Any
    model_config: dict  # VQVAEConfig.to_dict()'s form
    record: dict
    discriminator: tuple[dict, dict] | None = None  # (settings, variables by path)

    def apply(self, state: dict, shardings: dict) -> dict:
        """A fresh train state with the source's parameters and model state in place (and
        its discriminator's, where both have one)."""
        _, params, rest = nnx.split(self.model, nnx.Param, ...)
        where = {"params": shardings["params"], "rest": shardings["rest"]}
        placed = jax.device_put({"params": params, "rest": rest}, where)
        state = {**state, "params": placed["params"], "rest": placed["rest"]}
        if "disc" in state and self.discriminator is not None:
            from vqvae.convert import discriminator as disc_io

            cfg, arrays = self.discriminator
            disc = disc_io.build(cfg)
            disc_io.place(disc, arrays)
            _, d_params, d_rest = nnx.split(disc, nnx.Param, ...)
            d_where = {"params": shardings["disc"]["params"], "rest": shardings["disc"]["rest"]}
            d = jax.device_put({"params": d_params, "rest": d_rest}, d_where)
            state["disc"] = {**state["disc"], "params": d["params"], "rest": d["rest"]}
        return state


def load_source(path: str | Path, preset: str | None = None) -> Source:
    """The model at ``path`` (workdir, export folder or weight file) and its record."""
    from vqvae.checkpoint import load_model
    from vqvae.convert import _family_of, import_tensors
    from vqvae.convert import discriminator as disc_io
    from vqvae.convert.export import load_export

    path = Path(path).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():
        model, info = load_export(path)
        record = {"export": str(path.resolve()), "source": info.get("source")}
        return Source(model, info["model"], record)
    if path.is_dir():
        from vqvae.tokenizer import _resolve

        workdir, step = _resolve(path)
        model, meta = load_model(workdir, step)
        record = {"workdir": str(workdir.resolve()), "step": step}
        if meta.get("source"):
            record["source"] = meta["source"]
        return Source(model, meta["model"], record, disc_io.load(workdir))
    tensors = read_tensors(path)
    family = _family_of(tensors)
    if family is None:
        raise ConvertError(f"init_from {path}: no taming, LlamaGen or MaskGIT tensors in it")
    model, config, name = import_tensors(family, tensors, preset or None)
    record = {"file": str(path.resolve()), "sha256": sha256(path), "family": family,
              "preset": name}  # fmt: skip
    disc = None
    if family == "taming" and disc_io.present(tensors):
        disc = disc_io.import_tensors(tensors)
    return Source(model, config.to_dict(), record, disc)


def prepare(config: ml_collections.ConfigDict) -> Source | None:
    """With ``config.init_from``: the source, and ``config.model`` set to its model config
    (the run's own model keys are replaced: the weights decide the shapes)."""
    path = config.get("init_from", "")
    if not path:
        return None
    source = load_source(path, config.get("init_preset", ""))
    with config.unlocked():
        config.model = ml_collections.ConfigDict(source.model_config)
    gan = config.get("gan")
    if source.discriminator is not None:
        cfg = source.discriminator[0]
        if gan is None or gan.weight <= 0:
            log.info("the source's discriminator is not used: gan.weight is 0")
            source.discriminator = None
        else:  # its shape decides the run's discriminator
            with config.unlocked():
                for key in ("channels", "layers", "norm", "padding"):
                    gan[key] = cfg[key]
            source.record["discriminator"] = "the source's"
            log.info("discriminator: the source's (%s)", cfg)
    return source


def frozen_prefixes(what: str) -> tuple[str, ...]:
    if what not in FREEZE:
        raise InvalidValueError(f"freeze must be one of {sorted(FREEZE)}, got {what!r}")
    return FREEZE[what]


def freeze_optimizer(tx: optax.GradientTransformation, what: str, model_config):
    """``tx`` with the parts named by ``what`` held fixed (zero gradients in, zero
    updates out). EMA codebooks are not parameters and are refused."""
    prefixes = frozen_prefixes(what)
    if not prefixes:
        return tx
    if "quantizer" in prefixes and model_config.quantizer.learning != "gradient":
        raise InvalidValueError(
            "freeze=encoder_codebook needs a gradient-learned codebook (quantizer.learning="
            "'gradient'): an EMA codebook is updated outside the optimizer"
        )

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _first_key(path) in prefixes, params
        )

    zero = optax.masked(optax.set_to_zero(), mask)
    return optax.chain(zero, tx, zero)


def _first_key(path) -> str:
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", k)))


def frozen_params(model, what: str) -> dict:
    """The frozen parameters by path (for checks)."""
    prefixes = frozen_prefixes(what)
    return {p: a for p, a in model_params(model).items() if p[0] in prefixes}


__all__ = ["Source", "freeze_optimizer", "frozen_params", "load_source", "prepare"]
