"""FID's Inception-v3 (the "inception-2015-12-05" graph) in Flax NNX, and its weights file.

The layout is pytorch-fid's ``fid_inception_v3`` (torchvision's Inception3 with the FID
blocks FIDInceptionA/C/E_1/E_2: average pools that leave padding out of the count, and a
max pool in the last block), which torch-fidelity's ``FeatureExtractorInceptionV3`` shares
name for name. Features are the 2048-d average pool after ``Mixed_7c``.

Nothing is downloaded. The weights come from a local ``.npz`` made once from pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` has the same names) by

    python -m vqvae.metrics.inception --pth pt_inception-2015-12-05-6726825d.pth --out FILE

(this one step needs PyTorch). The file holds, per convolution NAME (``Conv2d_1a_3x3``,
``Mixed_5b.branch1x1``, ...): ``NAME.kernel`` (HWIO) and the batch norm's ``NAME.mean``,
``NAME.var``, ``NAME.gamma``, ``NAME.beta`` (eps 1e-3, applied as PyTorch does, unfolded).

The input side is the protocol's (``vqvae.metrics.protocols``): uint8 images are resized
to ``size`` (299) by pytorch-fid's bilinear resize (``F.interpolate(..., align_corners=
False)``, no antialias) or torch-fidelity's TF1-compatible one, and scaled to [-1, 1]
(pytorch-fid: x/255*2-1; torch-fidelity: (x-128)/128). Both resizes are written here as
two interpolation matrices, so they equal the references' for any input size.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.errors import InvalidValueError

BN_EPS = 1e-3
FEATURE_DIM = 2048
FORMAT = "vqvae-fid-inception-1"


class Pretrained(nnx.Variable):
    """Weights read from a file: never trained."""


# --- the layout: every convolution (name, in, out, kernel (kh, kw), stride, padding) ------
def _block_a(p, cin, pool):
    return [
        (f"{p}.branch1x1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
        (f"{p}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
        (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch_pool", cin, pool, (1, 1), 1, (0, 0)),
    ]


def _block_b(p, cin):
    return [
        (f"{p}.branch3x3", cin, 384, (3, 3), 2, (0, 0)),
        (f"{p}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]


def _block_c(p, cin, c7):
    a, b = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    return [
        (f"{p}.branch1x1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7_2", c7, c7, *a[:1], 1, a[1]),
        (f"{p}.branch7x7_3", c7, 192, *b[:1], 1, b[1]),
        (f"{p}.branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7dbl_2", c7, c7, *b[:1], 1, b[1]),
        (f"{p}.branch7x7dbl_3", c7, c7, *a[:1], 1, a[1]),
        (f"{p}.branch7x7dbl_4", c7, c7, *b[:1], 1, b[1]),
        (f"{p}.branch7x7dbl_5", c7, 192, *a[:1], 1, a[1]),
        (f"{p}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


def _block_d(p, cin):
    return [
        (f"{p}.branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        (f"{p}.branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{p}.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        (f"{p}.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        (f"{p}.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]


def _block_e(p, cin):
    return [
        (f"{p}.branch1x1", cin, 320, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{p}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{p}.branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
        (f"{p}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
        (f"{p}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{p}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{p}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


STEM = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
]
CONVS = (
    STEM
    + _block_a("Mixed_5b", 192, 32)
    + _block_a("Mixed_5c", 256, 64)
    + _block_a("Mixed_5d", 288, 64)
    + _block_b("Mixed_6a", 288)
    + _block_c("Mixed_6b", 768, 128)
    + _block_c("Mixed_6c", 768, 160)
    + _block_c("Mixed_6d", 768, 160)
    + _block_c("Mixed_6e", 768, 192)
    + _block_d("Mixed_7a", 768)
    + _block_e("Mixed_7b", 1280)
    + _block_e("Mixed_7c", 2048)
)
LAYOUT = {name: (cin, cout, k, s, p) for name, cin, cout, k, s, p in CONVS}
MIN_SIZE = 75  # the smallest input every stride-2 stage accepts


# --- the network ---------------------------------------------------------------------------
def _max_pool(x, k=3, s=2, pad=0):
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pads)


def _avg_pool_exclusive(x):
    """3x3, stride 1, padding 1, dividing by the window's pixels inside the image
    (``count_include_pad=False``, the FID blocks' pool)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class FIDInception(nnx.Module):
    """The FID Inception network from a weights file's arrays (``load_weights``)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        check_weights(weights)
        self.kernel = nnx.Dict(
            {n.replace(".", "/"): Pretrained(jnp.asarray(weights[f"{n}.kernel"])) for n in LAYOUT}
        )
        bn = {}
        for n in LAYOUT:  # batch norm as PyTorch's eval: (x - mean) / sqrt(var + eps) * g + b
            inv = weights[f"{n}.gamma"] / np.sqrt(weights[f"{n}.var"] + np.float32(BN_EPS))
            bn[n.replace(".", "/")] = np.stack([weights[f"{n}.mean"], inv, weights[f"{n}.beta"]])
        self.bn = nnx.Dict({k: Pretrained(jnp.asarray(v, jnp.float32)) for k, v in bn.items()})

    def _conv(self, name: str, x: jax.Array) -> jax.Array:
        _, _, _, s, (ph, pw) = LAYOUT[name]
        key = name.replace(".", "/")
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[key].get_value(),
            (s, s),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        mean, inv, beta = self.bn[key].get_value()
        return jax.nn.relu((y - mean) * inv + beta)

    def _a(self, p, x):
        c = lambda n, h: self._conv(f"{p}.{n}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        b5 = c("branch5x5_2", c("branch5x5_1", x))
        b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        bp = c("branch_pool", _avg_pool_exclusive(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)

    def _b(self, p, x):
        c = lambda n, h: self._conv(f"{p}.{n}", h)  # noqa: E731
        b3 = c("branch3x3", x)
        bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)

    def _c(self, p, x):
        c = lambda n, h: self._conv(f"{p}.{n}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        bd = x
        for k in range(1, 6):
            bd = c(f"branch7x7dbl_{k}", bd)
        bp = c("branch_pool", _avg_pool_exclusive(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)

    def _d(self, p, x):
        c = lambda n, h: self._conv(f"{p}.{n}", h)  # noqa: E731
        b3 = c("branch3x3_2", c("branch3x3_1", x))
        b7 = x
        for k in range(1, 5):
            b7 = c(f"branch7x7x3_{k}", b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)

    def _e(self, p, x, last: bool):
        c = lambda n, h: self._conv(f"{p}.{n}", h)  # noqa: E731
        b1 = c("branch1x1", x)
        h3 = c("branch3x3_1", x)
        b3 = jnp.concatenate([c("branch3x3_2a", h3), c("branch3x3_2b", h3)], axis=-1)
        hd = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
        bd = jnp.concatenate([c("branch3x3dbl_3a", hd), c("branch3x3dbl_3b", hd)], axis=-1)
        # FIDInceptionE_1 pools by average (padding not counted), FIDInceptionE_2 by max
        pooled = _max_pool(x, 3, 1, 1) if last else _avg_pool_exclusive(x)
        return jnp.concatenate([b1, b3, bd, c("branch_pool", pooled)], axis=-1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, 3) float32 in [-1, 1], H and W >= 75 -> pool features (B, 2048)."""
        if min(x.shape[1:3]) < MIN_SIZE:
            raise InvalidValueError(
                f"FIDInception: inputs must be at least {MIN_SIZE} px; got {x.shape}"
            )
        x = x.astype(jnp.float32)
        for n in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = self._conv(n, x)
        x = _max_pool(x)
        x = self._conv("Conv2d_4a_3x3", self._conv("Conv2d_3b_1x1", x))
        x = _max_pool(x)
        for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = self._a(p, x)
        x = self._b("Mixed_6a", x)
        for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = self._c(p, x)
        x = self._d("Mixed_7a", x)
        x = self._e("Mixed_7b", x, last=False)
        x = self._e("Mixed_7c", x, last=True)
        return jnp.mean(x, axis=(1, 2))


# --- resizes (as matrices: out = Rh @ x @ Rw^T over the spatial axes) ------------------------
def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) float64 weights of a 1-D bilinear resize.

    ``torch``: ``F.interpolate(mode="bilinear", align_corners=False)`` without antialias:
    source x = (i + 0.5) * n_in / n_out - 0.5, clamped at 0. ``tf1``: TensorFlow 1's
    ``resize_bilinear(align_corners=False)`` as torch-fidelity reproduces it: x = i * n_in /
    n_out. Both take the two neighbours floor(x) and floor(x) + 1 (clamped to the last)."""
    i = np.arange(n_out, dtype=np.float64)
    scale = n_in / n_out
    if mode == "torch":
        src = np.maximum((i + 0.5) * scale - 0.5, 0.0)
    elif mode == "tf1":
        src = i * scale
    else:
        raise InvalidValueError(f"resize_matrix: mode is 'torch' or 'tf1'; got {mode!r}")
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize(x: jax.Array, size: int, mode: str) -> jax.Array:
    """(B, H, W, C) float32 -> (B, size, size, C) by ``resize_matrix`` on both axes."""
    rh = jnp.asarray(resize_matrix(x.shape[1], size, mode), jnp.float32)
    rw = jnp.asarray(resize_matrix(x.shape[2], size, mode), jnp.float32)
    return resize_with(x, rh, rw)


def resize_with(x: jax.Array, rh: jax.Array, rw: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, out_h, out_w, C) by given (out_h, H) and (out_w, W) matrices."""
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", rw, x, precision=hp)


def preprocess(images: jax.Array, size: int, resize_mode: str, scaling: str) -> jax.Array:
    """uint8 (or float on 0..255) images (B, H, W, 3) -> the network's input in [-1, 1].

    ``scaling``: ``"unit"`` (pytorch-fid: x/255 then resize then 2x-1) or ``"128"``
    (torch-fidelity: resize the 0..255 values then (x-128)/128)."""
    rh = jnp.asarray(resize_matrix(images.shape[1], size, resize_mode), jnp.float32)
    rw = jnp.asarray(resize_matrix(images.shape[2], size, resize_mode), jnp.float32)
    return preprocess_with(images, rh, rw, scaling)


def preprocess_with(images: jax.Array, rh: jax.Array, rw: jax.Array, scaling: str) -> jax.Array:
    """``preprocess`` with the resize matrices given (so one program serves both resizes)."""
    x = images.astype(jnp.float32)
    if scaling == "unit":
        return 2.0 * resize_with(x / 255.0, rh, rw) - 1.0
    if scaling == "128":
        return (resize_with(x, rh, rw) - 128.0) / 128.0
    raise InvalidValueError(f"preprocess: scaling is 'unit' or '128'; got {scaling!r}")


# --- weights -------------------------------------------------------------------------------
def check_weights(weights: dict, path: str = "the Inception weights") -> None:
    """Every convolution of the layout present with its shapes; a clear error otherwise."""
    for n, (cin, cout, (kh, kw), _, _) in LAYOUT.items():
        k = weights.get(f"{n}.kernel")
        if k is None or tuple(k.shape) != (kh, kw, cin, cout):
            got = None if k is None else tuple(k.shape)
            raise InvalidValueError(
                f"{path}: {n}.kernel is {got}; the layout needs {(kh, kw, cin, cout)}"
            )
        for part in ("mean", "var", "gamma", "beta"):
            v = weights.get(f"{n}.{part}")
            if v is None or tuple(v.shape) != (cout,):
                raise InvalidValueError(f"{path}: {n}.{part} is missing or not ({cout},)")


def convert(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A PyTorch state dict (as NumPy) of pytorch-fid's FID Inception or torch-fidelity's
    (``NAME.conv.weight`` OIHW, ``NAME.bn.{weight,bias,running_mean,running_var}``; ``fc``
    and ``num_batches_tracked`` are ignored) -> this module's arrays."""
    out = {"format": np.array(FORMAT)}
    for n in LAYOUT:
        try:
            w = state_dict[f"{n}.conv.weight"]
            bn = {p: state_dict[f"{n}.bn.{p}"] for p in ("weight", "bias")}
            bn |= {p: state_dict[f"{n}.bn.running_{p}"] for p in ("mean", "var")}
        except KeyError as e:
            raise KeyError(
                f"not an FID Inception state dict: {e.args[0]} is missing (expected pytorch-fid's "
                "pt_inception-2015-12-05-*.pth or torch-fidelity's weights-inception-*.pth)"
            ) from None
        out[f"{n}.kernel"] = np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))
        out[f"{n}.gamma"] = np.asarray(bn["weight"], np.float32)
        out[f"{n}.beta"] = np.asarray(bn["bias"], np.float32)
        out[f"{n}.mean"] = np.asarray(bn["mean"], np.float32)
        out[f"{n}.var"] = np.asarray(bn["var"], np.float32)
    check_weights(out, "the converted state dict")
    return out


HOW_TO_MAKE = (
    "make it once, on a machine with PyTorch, from pytorch-fid's pt_inception-2015-12-05-"
    "6726825d.pth: `python -m vqvae.metrics.inception --pth FILE.pth --out inception.npz`"
)


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an Inception weights file, checked; one clear line if it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found; {HOW_TO_MAKE}")
    try:
        with np.load(path) as z:
            weights = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InvalidValueError(
            f"{path} is not an FID Inception weights file ({e}); {HOW_TO_MAKE}"
        ) from e
    if str(weights.get("format", "")) != FORMAT:
        raise InvalidValueError(
            f"{path} is not an FID Inception weights file (no format {FORMAT!r})"
        )
    check_weights(weights, str(path))
    return weights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Convert pytorch-fid's FID Inception .pth to .npz")
    p.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--out", required=True, help="the .npz to write")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("python -m vqvae.metrics.inception: error: reading .pth files needs PyTorch")
    sd = torch.load(args.pth, map_location="cpu", weights_only=True)
    weights = convert({k: v.numpy() for k, v in sd.items()})
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **weights)
    tmp.replace(out)
    load_weights(out)
    print(f"wrote {out}: {len(LAYOUT)} convolutions")


if __name__ == "__main__":
    main()
