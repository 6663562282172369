"""A workdir's tokenizer out: ``model.safetensors`` + ``config.json`` in the package's
layout, or a state dict in taming's or LlamaGen's layout (the inverse of the import).

``model.safetensors`` holds the generator's variables named by their path in the
package's model joined by dots (``encoder.down.0.block.0.conv1.kernel``, HWIO kernels,
``quantizer.codebook`` (K, D), learned or EMA, and an EMA codebook's statistics);
``config.json`` the model config, the quantizer's kind and codebook shape, and where the
weights came from. Both read without the package. ``--full`` adds the training state, and
``unpack`` turns such a folder back into a workdir that resumes exactly.
"""

import json
from pathlib import Path

import numpy as np

from vqvae.convert import taming
from vqvae.convert.common import (
    CONVERTER_VERSION,
    ConvertError,
    build_with,
    dotted,
    model_params,
    other_shapes,
    other_variables,
)
from vqvae.model import VQVAE, VQVAEConfig

FORMAT = "vqvae-safetensors"
TORCH_CONTAINERS = {"taming": "state_dict", "llamagen": "model"}


def load_workdir(workdir: str | Path, step: int | None = None) -> tuple[VQVAE, dict]:
    from vqvae.checkpoint import load_model

    return load_model(Path(workdir).expanduser(), step)


def export_safetensors(
    workdir, to, step: int | None = None, full: bool = False, loaded: tuple | None = None
) -> Path:
    """``to/model.safetensors`` and ``to/config.json`` from a workdir's checkpoint; with
    ``full`` also ``to/train.safetensors``: the rest of the checkpoint (the discriminator,
    both optimizers' states, the step) and the checkpoint's meta in config.json, which
    ``unpack`` turns back into a workdir that resumes exactly. ``loaded``: the workdir's
    (model, meta) where the caller has them already. The folder is written whole or not
    at all (staged, then renamed)."""
    from safetensors.numpy import save_file

    from vqvae.export import Staging

    model, meta = loaded or load_workdir(workdir, step)
    config = VQVAEConfig.from_dict(meta["model"])
    variables = model_params(model) | other_variables(model)
    params = {dotted(p): np.ascontiguousarray(a) for p, a in variables.items()}
    q = config.quantizer
    codes = params.get("quantizer.codebook")
    info = {
        "format": FORMAT,
        "version": CONVERTER_VERSION,
        "model_class": f"{VQVAEConfig.__module__}:{VQVAEConfig.__qualname__}",
        "model": config.to_dict(),
        "quantizer": {
            "kind": q.kind,
            "num_codes": int(codes.shape[0]) if codes is not None else None,
            "codebook_dim": int(codes.shape[1]) if codes is not None else None,
            "normalize": bool(getattr(q, "normalize", False)),
        },
        "source": meta.get("source")
        or ({"workdir": str(Path(workdir).resolve())} if workdir else None),  # fmt: skip
        "step": meta.get("step"),
    }
    train = None
    if full:
        if workdir is None:
            raise ConvertError("a full export needs a workdir's checkpoint")
        train, saved_meta = _checkpoint_state(workdir, step)
        info["train"] = sorted(train)
        info["meta"] = {k: v for k, v in saved_meta.items() if k != "checksums"}
    stage = Staging(Path(to), "--to")
    try:
        save_file(params, str(stage.tmp / "model.safetensors"), metadata={"format": FORMAT})
        if train is not None:
            save_file(train, str(stage.tmp / "train.safetensors"), metadata={"format": FORMAT})
        (stage.tmp / "config.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    except BaseException:
        stage.abandon()
        raise
    stage.finish()
    return stage.out


def _flat_names(tree) -> dict[str, object]:
    """A pytree's leaves by their path's names joined by dots."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                       for k in path)  # fmt: skip
        out[key] = leaf
    return out


def _checkpoint_state(workdir, step) -> tuple[dict[str, np.ndarray], dict]:
    """(the checkpoint's train item flattened, its meta)."""
    import orbax.checkpoint as ocp

    from vqvae.checkpoint import Checkpoints

    ckpt = Checkpoints(workdir, read_only=True)
    try:
        s = ckpt._step(step)
        out = ckpt.manager.restore(s, args=ocp.args.Composite(train=ocp.args.StandardRestore()))
        meta = ckpt.meta(s)
    finally:
        ckpt.close()
    flat = {k: np.array(v, order="C") for k, v in _flat_names(out["train"]).items()}  # 0-d kept
    return flat, meta


def load_export(directory: str | Path) -> tuple[VQVAE, dict]:
    """(model, config.json's content) from ``export_safetensors``'s folder."""
    from safetensors.numpy import load_file

    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise ConvertError(f"{directory} holds no model.safetensors and config.json")
    info = json.loads((directory / "config.json").read_text())
    config = VQVAEConfig.from_dict(info["model"])
    tensors = load_file(str(directory / "model.safetensors"))
    from vqvae.convert.common import abstract_params

    shapes, others = abstract_params(config), other_shapes(config)
    for path, shape in shapes.items():
        name = dotted(path)
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise ConvertError(f"tensor {name} is missing or of another shape in {directory}")
    for path, shape in others.items():  # an EMA codebook: exports before it had none
        name = dotted(path)
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ConvertError(f"tensor {name} is of another shape in {directory}")
    model = build_with(
        config,
        {p: tensors[dotted(p)] for p in shapes},
        {p: tensors[dotted(p)] for p in others if dotted(p) in tensors},
    )
    return model, info


def original_state_dict(model: VQVAE, config: VQVAEConfig, family: str) -> dict:
    """The model's parameters in ``family``'s state-dict layout ("taming" or "llamagen")."""
    if family not in TORCH_CONTAINERS:
        raise ConvertError(f"export to {family!r} is not supported: taming or llamagen")
    if config.net != "vqgan" or config.vqgan.style != "taming":
        raise ConvertError(f"only taming-style VQGAN models export to {family}")
    params = model_params(model)
    shapes = {p: a.shape for p, a in params.items()}
    entries = taming.entries(config, shapes, family)
    return {entries[p].key: np.ascontiguousarray(entries[p].from_ours(a)).astype(np.float32)
            for p, a in params.items()}  # fmt: skip


def export_original(
    workdir, to, family: str, step: int | None = None, loaded: tuple | None = None
) -> Path:
    """``to`` (.safetensors: no torch needed; .ckpt/.pt: a torch file in the original's
    container) holding the workdir's tokenizer in taming's or LlamaGen's layout."""
    model, meta = loaded or load_workdir(workdir, step)
    sd = original_state_dict(model, VQVAEConfig.from_dict(meta["model"]), family)
    to = Path(to).expanduser()
    to.parent.mkdir(parents=True, exist_ok=True)
    if to.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(sd, str(to))
        return to
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"writing {to.name} needs PyTorch; write a .safetensors file instead"
        ) from None
    torch.save({TORCH_CONTAINERS[family]: {k: torch.from_numpy(v) for k, v in sd.items()}}, to)
    return to


__all__ = ["export_original", "export_safetensors", "load_export"]
