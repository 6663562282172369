"""rFID: the FID Inception's pool features of originals and reconstructions, and protocols.

A protocol fixes everything that moves the number besides the images and the weights:

=================  ==========================  ==========================
setting            ``pytorch-fid`` (default)   ``torch-fidelity``
=================  ==========================  ==========================
resize to 299      bilinear, ``F.interpolate``  TF1 ``resize_bilinear``
                   (half-pixel, no antialias)  (no half-pixel offset)
scaling            x/255, resize, 2x - 1       resize, (x - 128) / 128
uint8 rounding     yes                         yes
Fréchet root       ``scipy.linalg.sqrtm``      eigenvalues (``eigh``)
=================  ==========================  ==========================

Features run jitted on batches spread over every local device (split along the batch when
it divides; otherwise on one), in float32; the statistics add up in float64 on the host.
"""

import dataclasses
import functools
import hashlib
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae.errors import InvalidValueError
from vqvae.metrics.frechet import frechet_distance, frechet_distance_gram
from vqvae.metrics.inception import (
    FEATURE_DIM,
    FIDInception,
    load_weights,
    preprocess_with,
    resize_matrix,
)
from vqvae.metrics.stats import FeatureStats, Gaussian


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What an rFID/LPIPS/SSIM/PSNR figure depends on besides images and weights."""

    name: str
    resize: str  # "torch" (pytorch-fid) or "tf1" (torch-fidelity)
    scaling: str  # "unit" (x/255 -> 2x-1) or "128" ((x-128)/128)
    size: int = 299
    round_uint8: bool = True  # reconstructions rounded to uint8 before FID and LPIPS
    frechet: str = "sqrtm"  # "sqrtm", "eigh", or "gram" (from the kept features)
    # SSIM and PSNR are scikit-image's on the uint8 RGB images, whatever the protocol:
    ssim: str = "skimage gaussian sigma=1.5, K=(0.01, 0.03), data_range=255, uint8 RGB"
    psnr: str = "skimage data_range=255 on uint8, per image then mean"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS = {
    "pytorch-fid": Protocol("pytorch-fid", resize="torch", scaling="unit", frechet="sqrtm"),
    "torch-fidelity": Protocol("torch-fidelity", resize="tf1", scaling="128", frechet="eigh"),
}


def protocol(name: str, **overrides) -> Protocol:
    """A preset by name, with any of its settings changed (the record names both)."""
    if name not in PROTOCOLS:
        raise InvalidValueError(f"unknown protocol {name!r}: use one of {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("resize", p.resize) not in ("torch", "tf1"):
        raise InvalidValueError(f"resize is 'torch' or 'tf1'; got {overrides['resize']!r}")
    if overrides.get("frechet", p.frechet) not in ("sqrtm", "eigh", "gram"):
        raise InvalidValueError(
            f"frechet is 'sqrtm', 'eigh' or 'gram'; got {overrides['frechet']!r}"
        )
    changed = {k: v for k, v in overrides.items() if getattr(p, k) != v}
    if changed:
        tag = ",".join(f"{k}={v}" for k, v in sorted(changed.items()))
        p = dataclasses.replace(p, name=f"{p.name}[{tag}]", **changed)
    return p


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.partial(jax.jit, static_argnames=("graphdef", "scaling"))
def _features(graphdef, state, x, rh, rw, scaling):
    """One program per network, input shape and scaling: the resize is an argument."""
    return nnx.merge(graphdef, state)(preprocess_with(x, rh, rw, scaling))


class FeatureExtractor:
    """images (B, H, W, 3) on 0..255 (uint8 or float) -> pool features (B, 2048) float32."""

    def __init__(self, net: FIDInception, proto: Protocol):
        self.protocol = proto
        self._graphdef, self._state = nnx.split(net)
        devices = jax.local_devices()
        self._mesh = jax.sharding.Mesh(np.array(devices), ("data",))

    @classmethod
    def from_file(cls, path: str | Path, proto: Protocol) -> "FeatureExtractor":
        return cls(FIDInception(load_weights(path)), proto)

    def __call__(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise InvalidValueError(f"FID features: expected images (B, H, W, 3); got {x.shape}")
        if x.shape[-1] == 1:  # grey images as RGB, as pytorch-fid's PIL convert("RGB")
            x = np.repeat(x, 3, axis=-1)
        x = x.astype(np.float32)  # exact for uint8; one program for both input kinds
        if len(x) % self._mesh.size == 0:
            x = jax.device_put(x, NamedSharding(self._mesh, P("data")))
        p = self.protocol
        rh = resize_matrix(x.shape[1], p.size, p.resize).astype(np.float32)
        rw = resize_matrix(x.shape[2], p.size, p.resize).astype(np.float32)
        out = _features(self._graphdef, self._state, x, rh, rw, p.scaling)
        return np.asarray(out, np.float32)


class FIDMetric:
    """rFID between the originals (or a reference ``Gaussian``) and the reconstructions.

    A ``BatchMetric``: ``update`` takes (originals, reconstructions) on 0..255; with the
    protocol's rounding the caller passes uint8 reconstructions. With the protocol's
    ``frechet="gram"`` the features themselves are kept (N x 2048 float32) and the distance
    is ``frechet_distance_gram``'s; otherwise only their float64 sums."""

    def __init__(self, extractor: FeatureExtractor, reference: Gaussian | None = None):
        self.extractor = extractor
        self.reference = reference
        self.gram = extractor.protocol.frechet == "gram"
        if self.gram and reference is not None:
            raise InvalidValueError(
                "frechet 'gram' needs both feature sets, not a reference stats file"
            )
        self.real = FeatureStats(FEATURE_DIM)
        self.fake = FeatureStats(FEATURE_DIM)
        self.kept: tuple[list, list] = ([], [])

    def update(self, originals, reconstructions) -> None:
        if self.reference is None:
            self.add(originals, real=True)
        self.add(reconstructions, real=False)

    def add(self, images, *, real: bool) -> None:
        """One side's images alone (a generation FID's two sets come apart)."""
        f = self.extractor(images)
        (self.real if real else self.fake).update(f)
        if self.gram:
            self.kept[0 if real else 1].append(f)

    def result(self) -> dict:
        if self.gram:
            real, fake = (np.concatenate(k) for k in self.kept)
            return {"rfid": frechet_distance_gram(real, fake)}
        ref = self.reference if self.reference is not None else self.real.gaussian()
        fake = self.fake.gaussian()
        method = self.extractor.protocol.frechet
        return {"rfid": frechet_distance(ref.mu, ref.sigma, fake.mu, fake.sigma, method=method)}


def features_of(extractor: FeatureExtractor, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Features of many images, ``batch`` at a time."""
    parts = [extractor(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM), np.float32)


__all__ = ["PROTOCOLS", "FIDMetric", "FeatureExtractor", "Protocol", "features_of", "protocol"]
