"""What every converter shares: reading weight files into flat NumPy dicts, checking them
against a model's parameters with one-line errors, and writing a normal workdir."""

import dataclasses
import functools
import hashlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.errors import UserError
from vqvae.model import PRESETS, VQVAE, VQVAEConfig

CONVERTER_VERSION = 1
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Where the weights sit inside a container: taming's Lightning checkpoint, LlamaGen's
# training checkpoint (its "ema" copy is not the released one), Flax variables.
CONTAINER_KEYS = ("state_dict", "model", "params")


class ConvertError(UserError, ValueError):
    """A file or preset that cannot be converted, said in one line."""


Path_ = tuple  # a parameter's path in the package's model, e.g. ("encoder", "conv_in", "kernel")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the original file: its name there, and the maps between its layout
    there (``to_ours``) and the package's (``from_ours``)."""

    key: str
    to_ours: Callable[[np.ndarray], np.ndarray] = lambda a: a
    from_ours: Callable[[np.ndarray], np.ndarray] = lambda a: a


def oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    """A torch conv weight (out, in, kh, kw) -> a Flax kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


def hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))


def dotted(path: tuple) -> str:
    """A variable's path in a model -> its name in the package's safetensors files."""
    return ".".join(str(p) for p in path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(tree: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a<sep>b": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out |= flatten(v, sep, f"{prefix}{sep}{k}" if prefix else str(k))
    return out


def _unwrap(obj: Any) -> Any:
    """The weights inside a training checkpoint's container, if it is one."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


# torch storage classes as pickled by torch.save -> NumPy dtypes
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}  # fmt: skip


class _Opaque:
    """Anything else a training checkpoint pickles (hyper-parameters, callbacks)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return self


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 over a flat NumPy storage -> an array."""
    if not size:
        return np.array(storage[offset])
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    ).copy()


class _TorchUnpickler(pickle.Unpickler):
    """Reads torch.save's data.pkl without torch: tensors become NumPy arrays."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "torch" and name in _STORAGES:
            return name
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module in ("builtins", "copyreg") or module.startswith(("numpy", "_codecs")):
            return super().find_class(module, name)
        return _Opaque

    def persistent_load(self, pid):
        _, kind, key, _location, _numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            dtype = _STORAGES.get(kind) if isinstance(kind, str) else None
            if dtype is None:
                raise ConvertError(f"tensor storage of type {kind} is not readable without torch")
            if dtype == "bfloat16":  # the upper half of a float32
                a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, dtype)
            self.storages[key] = a
        return self.storages[key]


def _read_torch_zip(path: Path) -> dict:
    """A torch.save zip file -> its object, tensors as NumPy arrays (no torch needed)."""
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ConvertError(f"{path} is a zip file but no torch checkpoint (no data.pkl)")
        with archive.open(pkl) as f:
            return _TorchUnpickler(f, archive, pkl[: -len("/data.pkl")]).load()


def _read_torch(path: Path) -> dict:
    """A torch ``.ckpt``/``.pt``: read without torch (the zip format of torch >= 1.6);
    the older pickle-stream format needs torch."""
    if zipfile.is_zipfile(path):
        obj = _read_torch_zip(path)
        return {k: v for k, v in flatten(_unwrap(obj), ".").items() if isinstance(v, np.ndarray)}
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"{path.name} is not a zip-format torch file (truncated, or saved by torch < 1.6, "
            "which needs PyTorch to read: pip install torch)"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConvertError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in flatten(_unwrap(obj), ".").items()
        if isinstance(v, torch.Tensor)
    }


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """A weight file -> {name: array}: torch ``.ckpt``/``.pt`` (needs torch), Flax msgpack
    (names joined by "/"), ``.safetensors`` or ``.npz``. Containers (a Lightning
    ``state_dict``, LlamaGen's ``model``, Flax's ``params``) are opened."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConvertError(f"no file {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in TORCH_SUFFIXES:
            return _read_torch(path)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k].astype(np.float32) if f[k].dtype == np.float16 else f[k]
                        for k in f.files}  # fmt: skip
        from flax import serialization  # anything else: Flax msgpack bytes (MaskGIT's)

        tree = serialization.msgpack_restore(path.read_bytes())
        return {k: np.asarray(v) for k, v in flatten(_unwrap(tree), "/").items()}
    except ConvertError:
        raise
    except Exception as e:  # any reader's failure: a damaged or foreign file
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise ConvertError(f"cannot read {path} (truncated or not a weight file?): {why}") from None


def resolve_config(preset: str | Path) -> tuple[str, VQVAEConfig]:
    """A preset name, or a JSON file of a model config (``VQVAEConfig.to_dict``'s form)."""
    if str(preset) in PRESETS:
        return str(preset), PRESETS[str(preset)]
    path = Path(preset).expanduser()
    if path.suffix == ".json" and path.is_file():
        import json

        d = json.loads(path.read_text())
        return path.name, VQVAEConfig.from_dict(d.get("model", d))
    raise ConvertError(f"unknown preset {preset!r}: one of {sorted(PRESETS)} or a .json config")


def model_params(model: VQVAE) -> dict[Path_, np.ndarray]:
    """The model's parameters by path, as NumPy arrays."""
    return {
        tuple(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@functools.lru_cache(maxsize=4)
def _skeleton(config: VQVAEConfig):
    """(graphdef, abstract parameters, concrete non-parameter state) of ``config``'s model:
    traced once per config (building a model is slow; only the few non-parameter arrays,
    codebook statistics and keys, are made, in one program)."""
    abstract = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(config.build(nnx.Rngs(0)), nnx.Param, ...)[2])()
    return graphdef, params, rest


def abstract_params(config: VQVAEConfig) -> dict[Path_, tuple]:
    """Every parameter's path and shape, without building the arrays."""
    _, params, _ = _skeleton(config)
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(params)}


def match(
    tensors: dict[str, np.ndarray],
    entries: dict[Path_, Entry],
    shapes: dict[Path_, tuple],
    preset: str,
    ignored: Callable[[str], bool] = lambda key: False,
) -> dict[Path_, np.ndarray]:
    """The file's tensors mapped onto the model's parameters, or a ``ConvertError`` naming
    the first tensor that is missing, of the wrong shape, or left over."""
    out = {}
    for path, shape in shapes.items():
        e = entries[path]
        if e.key not in tensors:
            raise ConvertError(f"tensor {e.key} is missing from the file (preset {preset})")
        a = e.to_ours(np.asarray(tensors[e.key]))
        if tuple(a.shape) != tuple(shape):
            raise ConvertError(
                f"tensor {e.key} has shape {tuple(tensors[e.key].shape)}; preset {preset} "
                f"expects {tuple(e.from_ours(np.zeros(shape, np.float32)).shape)}"
            )
        out[path] = a.astype(np.float32)
    used = {e.key for e in entries.values()}
    extra = [k for k in tensors if k not in used and not ignored(k)]
    if extra:
        raise ConvertError(f"tensor {extra[0]} is not in preset {preset} ({len(extra)} extra)")
    return out


def build_with(
    config: VQVAEConfig,
    params: dict[Path_, np.ndarray],
    others: dict[Path_, np.ndarray] | None = None,
) -> VQVAE:
    """The model of ``config`` holding ``params`` (every parameter given) and, where given,
    ``others``: its non-parameter variables by path (an EMA codebook and its statistics);
    the rest keep their initial values."""
    graphdef, abstract, rest = _skeleton(config)
    flat = [
        (p, v.replace(jnp.asarray(params[tuple(p)], jnp.float32)))
        for p, v in nnx.to_flat_state(abstract)
    ]
    if others:
        rest = nnx.from_flat_state([
            (p, v.replace(jnp.asarray(others[tuple(p)], v.get_value().dtype))
             if tuple(p) in others else v)
            for p, v in nnx.to_flat_state(rest)
        ])  # fmt: skip
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def other_variables(model: VQVAE) -> dict[Path_, np.ndarray]:
    """The model's non-parameter variables by path (an EMA codebook, its statistics)."""
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(rest)}


def other_shapes(config: VQVAEConfig) -> dict[Path_, tuple]:
    _, _, rest = _skeleton(config)
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(rest)}


def new_workdir(workdir: str | Path) -> Path:
    """``workdir``, created, or a ``ConvertError`` where it already holds checkpoints."""
    workdir = Path(workdir).expanduser()
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise ConvertError(f"{workdir} already holds checkpoints; pick a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def write_workdir(workdir: str | Path, model: VQVAE, config: VQVAEConfig, source: dict) -> Path:
    """A workdir holding ``model`` as checkpoint 0, readable by ``Tokenizer.load`` (files
    beside it are written first: a checkpoint means the workdir is whole)."""
    from vqvae.checkpoint import Checkpoints

    workdir = new_workdir(workdir)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    meta = {
        "kind": "vqvae",
        "model_class": f"{VQVAEConfig.__module__}:{VQVAEConfig.__qualname__}",
        "model": config.to_dict(),
        "source": source,
    }
    ckpt = Checkpoints(workdir)
    try:
        ckpt.save(0, {"params": params, "rest": rest}, {"step": jnp.int32(0)}, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    return workdir
