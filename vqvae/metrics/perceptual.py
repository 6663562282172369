"""LPIPS as an evaluation metric, with either backbone papers use: VGG16 or AlexNet.

VGG16 is ``vqvae.lpips.LPIPS`` (the training loss's network, its file made by
``python -m vqvae.lpips``). AlexNet (LPIPS's default, ``lpips.LPIPS(net="alex")``) is here:
torchvision's AlexNet ``features`` (convolutions 11x11/4 pad 2, 5x5 pad 2, then three 3x3
pad 1; 3x3 max-pools of stride 2 after the first two), compared at the five ReLUs. Its
file is made once from torchvision's ``alexnet-owt-7be5be79.pth`` and the lpips package's
``weights/v0.1/alex.pth`` by

    python -m vqvae.metrics.perceptual --alex alexnet-owt-7be5be79.pth --lin alex.pth --out F

and holds ``conv{k}_kernel`` (HWIO), ``conv{k}_bias``, ``lin{t}`` and ``net = "alex"``.
Both score uint8 pairs as the lpips package does with inputs scaled to [-1, 1].
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae import lpips as vgg_lpips
from vqvae.errors import InvalidValueError

ALEX_FEATURES = [0, 3, 6, 8, 10]  # torchvision alexnet.features indices of the convolutions
ALEX_CONV = [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]  # kernel, stride, padding
ALEX_CHANNELS = [(3, 64), (64, 192), (192, 384), (384, 256), (256, 256)]
ALEX_POOL_BEFORE = (1, 2)  # a 3x3/2 max-pool before convolutions 1 and 2
ALEX_MIN_SIZE = 31  # smaller images leave nothing after the second pool


def _unit(a):
    return a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)


class AlexLPIPS(nnx.Module):
    """LPIPS with the AlexNet trunk, from its weights file's arrays."""

    def __init__(self, weights: dict[str, np.ndarray]):
        check_alex(weights)
        self.kernels = nnx.List(
            [vgg_lpips.Pretrained(jnp.asarray(weights[f"conv{k}_kernel"])) for k in range(5)]
        )
        self.biases = nnx.List(
            [vgg_lpips.Pretrained(jnp.asarray(weights[f"conv{k}_bias"])) for k in range(5)]
        )
        self.lins = nnx.List(
            [vgg_lpips.Pretrained(jnp.asarray(weights[f"lin{t}"])) for t in range(5)]
        )

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x (B, H, W, 3) in [-1, 1] -> the five ReLU activations."""
        if min(x.shape[1:3]) < ALEX_MIN_SIZE:
            raise InvalidValueError(
                f"AlexNet LPIPS needs images of at least {ALEX_MIN_SIZE} px (got "
                f"{x.shape[1]}x{x.shape[2]}); use the VGG16 weights for smaller images"
            )
        h = (x - vgg_lpips.SHIFT) / vgg_lpips.SCALE
        taps = []
        for k, (kernel, bias) in enumerate(zip(self.kernels, self.biases, strict=True)):
            if k in ALEX_POOL_BEFORE:
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"
                )
            _, stride, pad = ALEX_CONV[k]
            h = jax.lax.conv_general_dilated(
                h,
                kernel.get_value(),
                (stride, stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            h = jax.nn.relu(h + bias.get_value())
            taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in the training range [-0.5, 0.5] -> distances (B,)."""
        fx = self.features(2.0 * x.astype(jnp.float32))
        fy = self.features(2.0 * y.astype(jnp.float32))
        total = jnp.zeros(x.shape[0], jnp.float32)
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            d = jnp.sum(jnp.square(_unit(a) - _unit(b)) * lin.get_value(), axis=-1)
            total = total + jnp.mean(d, axis=(1, 2))
        return total


def check_alex(weights: dict, path: str = "the AlexNet LPIPS weights") -> None:
    for k, ((kh, _, _), (cin, cout)) in enumerate(zip(ALEX_CONV, ALEX_CHANNELS, strict=True)):
        w, b = weights.get(f"conv{k}_kernel"), weights.get(f"conv{k}_bias")
        if w is None or tuple(w.shape) != (kh, kh, cin, cout) or b is None or b.shape != (cout,):
            raise InvalidValueError(
                f"{path}: convolution {k} is missing or not ({kh}, {kh}, {cin}, {cout})"
            )
        lin = weights.get(f"lin{k}")
        if lin is None or lin.shape != (cout,):
            raise InvalidValueError(f"{path}: lin{k} is missing or not ({cout},)")


def convert_alex(alex: dict[str, np.ndarray], lin: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision AlexNet (``features.{i}.weight`` OIHW) + lpips's ``alex.pth`` -> arrays."""
    out = {"net": np.array("alex")}
    for k, i in enumerate(ALEX_FEATURES):
        out[f"conv{k}_kernel"] = np.transpose(alex[f"features.{i}.weight"], (2, 3, 1, 0))
        out[f"conv{k}_bias"] = np.asarray(alex[f"features.{i}.bias"])
        w = lin.get(f"lin{k}.model.1.weight", lin.get(f"lin{k}.weight"))
        if w is None:
            raise KeyError(f"the LPIPS linear weights have no lin{k}.model.1.weight")
        out[f"lin{k}"] = np.asarray(w).reshape(-1)
    out = vgg_lpips.float32_weights(out)
    check_alex(out, "the converted state dicts")
    return out


HOW_TO_MAKE = (
    "make it once on a machine with PyTorch: VGG16 by `python -m vqvae.lpips --vgg "
    "vgg16-397923af.pth --lin vgg.pth --out FILE`, AlexNet by `python -m "
    "vqvae.metrics.perceptual --alex alexnet-owt-7be5be79.pth --lin alex.pth --out FILE`"
)


def load(path: str | Path) -> tuple[nnx.Module, str]:
    """(network, backbone name "vgg16" or "alex") from an LPIPS weights file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights {path} not found; {HOW_TO_MAKE}")
    try:
        with np.load(path) as z:
            weights = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InvalidValueError(f"{path} is not an LPIPS weights file ({e}); {HOW_TO_MAKE}") from e
    if str(weights.get("net", "")) == "alex":
        check_alex(weights, str(path))
        return AlexLPIPS(weights), "alex"
    return vgg_lpips.LPIPS(vgg_lpips.load_weights(path)), "vgg16"


class LPIPSMetric:
    """Mean LPIPS over (original, reconstruction) uint8 batches (a ``BatchMetric``)."""

    def __init__(self, net: nnx.Module, backbone: str):
        self.backbone = backbone
        graphdef, state = nnx.split(net)
        self._state = state

        def distances(state, a, b):
            n = nnx.merge(graphdef, state)
            return n(a.astype(jnp.float32) / 255.0 - 0.5, b.astype(jnp.float32) / 255.0 - 0.5)

        self._fn = jax.jit(distances)
        self.total, self.count = 0.0, 0

    def distances(self, a, b) -> np.ndarray:
        return np.asarray(self._fn(self._state, jnp.asarray(a), jnp.asarray(b)), np.float64)

    def update(self, originals, reconstructions) -> None:
        d = self.distances(originals, reconstructions)
        self.total += float(d.sum())
        self.count += len(d)

    def result(self) -> dict:
        return {"lpips": self.total / max(self.count, 1), "lpips_backbone": self.backbone}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Convert PyTorch AlexNet + LPIPS weights to .npz")
    p.add_argument("--alex", required=True, help="torchvision's alexnet-owt-7be5be79.pth")
    p.add_argument("--lin", required=True, help="the lpips package's weights/v0.1/alex.pth")
    p.add_argument("--out", required=True, help="the .npz to write")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("python -m vqvae.metrics.perceptual: error: reading .pth files needs PyTorch")
    to_numpy = lambda path: {  # noqa: E731
        k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
    }
    weights = convert_alex(to_numpy(args.alex), to_numpy(args.lin))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **weights)
    tmp.replace(out)
    load(out)
    print(f"wrote {out}: AlexNet LPIPS")


if __name__ == "__main__":
    main()
