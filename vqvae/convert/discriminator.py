"""taming's discriminator (``loss.discriminator.main.*`` in a released ``.ckpt``) in and out.

taming's ``NLayerDiscriminator`` is an ``nn.Sequential``: the first 4x4 convolution at
index 0, then for each inner layer a convolution (no bias) at ``2 + 3i`` and its
BatchNorm at ``3 + 3i``, and the last convolution at ``2 + 3n``. The package's
``PatchDiscriminator(norm="batch", padding="one")`` is the same net; as for the
generator, the first kernel is doubled on import because taming's images are in [-1, 1].
The discriminator is stored beside a converted workdir's checkpoint in
``discriminator.safetensors`` (names: the parameter paths joined by dots) and its shape in
the checkpoint's ``source`` record; a fine-tune with ``gan.weight > 0`` starts from it.
"""

import json
from pathlib import Path

import numpy as np
from flax import nnx

from vqvae.convert.common import ConvertError, Entry, dotted, hwio_to_oihw, oihw_to_hwio

PREFIX = "loss.discriminator.main."
FILE = "discriminator.safetensors"
FORMAT = "vqvae-discriminator"
_NORM_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def present(tensors: dict) -> bool:
    return any(k.startswith(PREFIX) for k in tensors)


def config_of(tensors: dict) -> dict:
    """The ``PatchDiscriminator`` settings of a file's taming discriminator."""
    first = tensors.get(PREFIX + "0.weight")
    if first is None or np.ndim(first) != 4:
        raise ConvertError(f"tensor {PREFIX}0.weight is missing or not a convolution")
    if any(k.endswith((".loc", ".logdet")) for k in tensors if k.startswith(PREFIX)):
        raise ConvertError("the discriminator uses ActNorm (use_actnorm=True): not supported")
    layers = len({k.split(".")[3] for k in tensors if k.startswith(PREFIX)
                  and k.endswith(".running_mean")})  # fmt: skip
    if layers == 0:
        raise ConvertError("the discriminator has no BatchNorm layers: not taming's layout")
    return {
        "in_channels": int(first.shape[1]),
        "channels": int(first.shape[0]),
        "layers": layers,
        "norm": "batch",
        "padding": "one",
    }


def build(cfg: dict, seed: int = 0):
    from vqvae.adversarial import PatchDiscriminator

    return PatchDiscriminator(
        cfg["in_channels"], channels=cfg["channels"], layers=cfg["layers"], norm=cfg["norm"],
        padding=cfg["padding"], rngs=nnx.Rngs(seed),
    )  # fmt: skip


def _key(path: tuple, layers: int) -> str:
    """A discriminator variable's path -> its key in taming's state dict."""
    if path[0] == "first":
        return f"{PREFIX}0.{'weight' if path[1] == 'kernel' else 'bias'}"
    if path[0] == "last":
        return f"{PREFIX}{2 + 3 * layers}.{'weight' if path[1] == 'kernel' else 'bias'}"
    i = int(path[1])
    if path[0] == "convs":
        return f"{PREFIX}{2 + 3 * i}.weight"
    return f"{PREFIX}{3 + 3 * i}.{_NORM_LEAVES[path[2]]}"


def _double(a):
    return oihw_to_hwio(a) * 2.0


def _halve(a):
    return hwio_to_oihw(a) * 0.5


def entries(shapes: dict, layers: int) -> dict:
    out = {}
    for path, shape in shapes.items():
        if path == ("first", "kernel"):
            out[path] = Entry(_key(path, layers), _double, _halve)
        elif len(shape) == 4:
            out[path] = Entry(_key(path, layers), oihw_to_hwio, hwio_to_oihw)
        else:
            out[path] = Entry(_key(path, layers))
    return out


def shapes_of(cfg: dict) -> dict[tuple, tuple]:
    """Every variable's path and shape, without building the arrays."""
    state = nnx.state(nnx.eval_shape(lambda: build(cfg)))
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def variables(model) -> dict[tuple, np.ndarray]:
    """Every variable of a discriminator (parameters and BatchNorm averages) by path."""
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def import_tensors(tensors: dict) -> tuple[dict, dict[tuple, np.ndarray]]:
    """(settings, variables by path) of a file's taming discriminator; one line on the
    first tensor missing, left over or of the wrong shape."""
    from vqvae.convert.common import match

    cfg = config_of(tensors)
    shapes = shapes_of(cfg)
    own = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    ignored = lambda k: k.endswith(".num_batches_tracked")  # noqa: E731
    return cfg, match(own, entries(shapes, cfg["layers"]), shapes, "taming discriminator", ignored)


def to_state_dict(cfg: dict, arrays: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Variables by path -> taming's ``loss.discriminator.main.*`` state dict."""
    es = entries({p: a.shape for p, a in arrays.items()}, cfg["layers"])
    return {es[p].key: np.ascontiguousarray(es[p].from_ours(a)).astype(np.float32)
            for p, a in arrays.items()}  # fmt: skip


def save(directory: Path, cfg: dict, arrays: dict[tuple, np.ndarray]) -> Path:
    """``directory/discriminator.safetensors`` (written whole, then renamed into place)."""
    from safetensors.numpy import save_file

    to = Path(directory) / FILE
    tmp = to.with_name(to.name + ".tmp")
    flat = {dotted(p): np.ascontiguousarray(a) for p, a in arrays.items()}
    save_file(flat, str(tmp), metadata={"format": FORMAT, "config": json.dumps(cfg)})
    tmp.replace(to)
    return to


def load(directory: Path) -> tuple[dict, dict[tuple, np.ndarray]] | None:
    """(settings, variables by path) saved by ``save``, or None where there is none."""
    from safetensors import safe_open

    path = Path(directory) / FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        cfg = json.loads(f.metadata()["config"])
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (not a dict)
    return cfg, {tuple(int(p) if p.isdigit() else p for p in k.split(".")): a
                 for k, a in flat.items()}  # fmt: skip


def place(model, arrays: dict[tuple, np.ndarray]) -> None:
    """Set a built discriminator's variables to ``arrays`` (every one given, same shapes)."""
    state = nnx.state(model)
    flat = []
    for p, v in nnx.to_flat_state(state):
        a = arrays.get(tuple(p))
        if a is None or tuple(a.shape) != tuple(v.get_value().shape):
            raise ConvertError(f"discriminator variable {dotted(p)} is missing or of another shape")
        flat.append((p, v.replace(np.asarray(a, np.float32))))
    nnx.update(model, nnx.from_flat_state(flat))
