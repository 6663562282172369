"""LPIPS (Zhang et al. 2018), the perceptual distance, with a VGG16 trunk in Flax NNX.

Nothing is downloaded: the weights come from a local ``.npz`` file made once from the
published PyTorch files by

    python -m vqvae.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.npz

(torchvision's VGG16 ImageNet weights and the ``lpips`` package's linear layers for VGG;
this one step needs PyTorch to read them). The file holds ``conv{k}_kernel`` (HWIO) and
``conv{k}_bias`` for the trunk's convolutions, ``lin{t}`` (C,) for each compared
activation, and the trunk's layout: ``pool_after`` (2x2 max-pool after those convolutions)
and ``tap_after`` (the ReLU outputs compared). The distance between images x and y: for
each tap, unit-normalise the activations over channels, square their difference, weigh the
channels by ``lin``, average over space; sum over taps.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.errors import InvalidValueError

# VGG16's 13 convolutions (torchvision ``features`` indices) and LPIPS's taps on them
VGG16_FEATURES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_POOL_AFTER = [1, 3, 6, 9]  # the max-pools after conv1_2, conv2_2, conv3_3, conv4_3
VGG16_TAP_AFTER = [1, 3, 6, 9, 12]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS's input scaling
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class Pretrained(nnx.Variable):
    """Weights read from a file: never trained, never in the optimizer."""


class LPIPS(nnx.Module):
    """The perceptual distance from a weights file's arrays (``load_weights``)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        n = len([k for k in weights if k.endswith("_kernel")])
        self.kernels = nnx.List(
            [Pretrained(jnp.asarray(weights[f"conv{k}_kernel"])) for k in range(n)]
        )
        self.biases = nnx.List(
            [Pretrained(jnp.asarray(weights[f"conv{k}_bias"])) for k in range(n)]
        )
        self.pool_after = tuple(int(k) for k in weights["pool_after"])
        self.tap_after = tuple(int(k) for k in weights["tap_after"])
        self.lins = nnx.List(
            [Pretrained(jnp.asarray(weights[f"lin{t}"])) for t in range(len(self.tap_after))]
        )

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x (B, H, W, 3) in [-1, 1] -> the tapped ReLU activations (B, h, w, C) each."""
        h = (x - SHIFT) / SCALE
        taps = []
        for k, (kernel, bias) in enumerate(zip(self.kernels, self.biases, strict=True)):
            h = jax.lax.conv_general_dilated(
                h, kernel.get_value(), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + bias.get_value())
            if k in self.tap_after:
                taps.append(h)
            if k in self.pool_after:
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in the training range [-0.5, 0.5] -> distances (B,)."""
        fx, fy = (
            self.features(2.0 * x.astype(jnp.float32)),
            self.features(2.0 * y.astype(jnp.float32)),
        )
        total = jnp.zeros(x.shape[0], jnp.float32)
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            na = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)
            nb = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + 1e-10)
            per_pixel = jnp.sum(jnp.square(na - nb) * lin.get_value(), axis=-1)  # (B, h, w)
            total = total + jnp.mean(per_pixel, axis=(1, 2))
        return total


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an LPIPS weights file, checked; a clear error names what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights {path} not found; make them once with `python -m vqvae.lpips "
            "--vgg VGG16.pth --lin vgg.pth --out FILE`, or set loss.perceptual_weight=0"
        )
    with np.load(path) as z:
        weights = {k: z[k] for k in z.files}
    for key in ("pool_after", "tap_after", "conv0_kernel"):
        if key not in weights:
            raise InvalidValueError(f"{path} is not an LPIPS weights file (no {key})")
    n = len([k for k in weights if k.endswith("_kernel")])
    for k in range(n):
        kernel, bias = weights.get(f"conv{k}_kernel"), weights.get(f"conv{k}_bias")
        if kernel is None or bias is None or kernel.ndim != 4 or bias.shape != kernel.shape[-1:]:
            raise InvalidValueError(
                f"{path}: convolution {k} is missing or not (H, W, I, O) + (O,)"
            )
    for t, k in enumerate(weights["tap_after"]):
        lin = weights.get(f"lin{t}")
        if lin is None or lin.shape != weights[f"conv{int(k)}_kernel"].shape[-1:]:
            raise InvalidValueError(f"{path}: lin{t} is missing or does not match convolution {k}")
    return weights


def convert(vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch state dicts (as NumPy) -> this module's layout: torchvision VGG16
    (``features.{i}.weight`` OIHW, ``features.{i}.bias``) and the lpips package's linear
    layers (``lin{t}.model.1.weight`` (1, C, 1, 1))."""
    out = {
        "pool_after": np.array(VGG16_POOL_AFTER, np.int32),
        "tap_after": np.array(VGG16_TAP_AFTER, np.int32),
    }
    for k, i in enumerate(VGG16_FEATURES):
        out[f"conv{k}_kernel"] = np.transpose(vgg[f"features.{i}.weight"], (2, 3, 1, 0))
        out[f"conv{k}_bias"] = np.asarray(vgg[f"features.{i}.bias"])
    for t in range(len(VGG16_TAP_AFTER)):
        w = lin.get(f"lin{t}.model.1.weight", lin.get(f"lin{t}.weight"))
        if w is None:
            raise KeyError(f"the LPIPS linear weights have no lin{t}.model.1.weight")
        out[f"lin{t}"] = np.asarray(w).reshape(-1)
    return float32_weights(out)


def float32_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converted weights with every floating-point array in float32 (others unchanged)."""
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in weights.items()
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Convert PyTorch VGG16 + LPIPS weights to .npz")
    p.add_argument("--vgg", required=True, help="torchvision's vgg16-*.pth (ImageNet weights)")
    p.add_argument("--lin", required=True, help="the lpips package's weights/v0.1/vgg.pth")
    p.add_argument("--out", required=True, help="the .npz to write")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit(
            "python -m vqvae.lpips: error: reading .pth files needs PyTorch (pip install torch)"
        )
    to_numpy = lambda path: {  # noqa: E731
        k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
    }
    weights = convert(to_numpy(args.vgg), to_numpy(args.lin))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **weights)
    tmp.replace(out)
    load_weights(out)  # the file reads back as written
    print(f"wrote {out}: {len(VGG16_FEATURES)} convolutions, {len(VGG16_TAP_AFTER)} taps")


if __name__ == "__main__":
    main()
