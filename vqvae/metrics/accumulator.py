"""``ReconstructionMetrics``: PSNR and SSIM over a stream of (original, reconstruction) batches.

Each batch is scored per image (``psnr_ssim``, jitted, in float64 under JAX's x64 mode so
the figures equal scikit-image's), and the per-image values are summed on the host in
float64; the result is their mean over every image seen. Several processes each update
with their own images and add their ``state()`` vectors (or ``merge`` accumulators).

The seam for the feature metrics: ``extra`` takes objects with ``update(originals,
reconstructions)`` and ``result() -> dict``; every batch goes to them too and their figures
join the result. ``vqvae.metrics.FIDMetric`` (rFID) and ``vqvae.metrics.LPIPSMetric`` are
two such metrics; ``vqvae.evaluate`` uses them.
"""

from typing import Protocol

import jax
import numpy as np

from vqvae.errors import InvalidValueError
from vqvae.metrics.psnr_ssim import psnr, ssim


class BatchMetric(Protocol):
    """A metric fed the same batches: how FID and LPIPS are to plug in."""

    def update(self, originals: np.ndarray, reconstructions: np.ndarray) -> None: ...

    def result(self) -> dict: ...


@jax.jit
def _per_image(a, b):
    return psnr(a, b), ssim(a, b)


def _as_uint8(x, name: str):
    """x as given if a JAX array (kept on its devices), else as a NumPy array; uint8 only."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    if x.dtype != np.uint8:
        raise InvalidValueError(
            f"ReconstructionMetrics: {name} must be uint8 images (round reconstructions to "
            f"0..255 first); got {x.dtype}"
        )
    return x


class ReconstructionMetrics:
    """Streaming mean PSNR (dB, data range 255) and SSIM (skimage's Gaussian settings)."""

    def __init__(self, extra: list[BatchMetric] | tuple = ()):
        self.count = 0
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.identical = 0  # pairs equal pixel for pixel: PSNR inf (and so its mean)
        self.extra = list(extra)

    def update(self, originals, reconstructions) -> None:
        """Score a batch: two uint8 arrays (B, H, W, C) of the same shape, H and W >= 11."""
        a = _as_uint8(originals, "originals")
        b = _as_uint8(reconstructions, "reconstructions")
        with jax.enable_x64(True):
            p, s = _per_image(a, b)
            p, s = np.asarray(p, np.float64), np.asarray(s, np.float64)
        self.count += a.shape[0]
        self.identical += int(np.isinf(p).sum())
        self.psnr_sum += float(p.sum())
        self.ssim_sum += float(s.sum())
        for m in self.extra:
            m.update(a, b)

    def merge(self, other: "ReconstructionMetrics") -> None:
        """Add another accumulator's images (another process's share; not its ``extra``)."""
        self._add(other.state())

    def state(self) -> np.ndarray:
        """[count, psnr_sum, ssim_sum, identical] in float64, for an all-reduce."""
        return np.array([self.count, self.psnr_sum, self.ssim_sum, self.identical], np.float64)

    def _add(self, state) -> None:
        count, psnr_sum, ssim_sum, identical = np.asarray(state, np.float64)
        self.count += int(count)
        self.psnr_sum += psnr_sum
        self.ssim_sum += ssim_sum
        self.identical += int(identical)

    def result(self) -> dict:
        """Means over every image so far, the image count, and the ``extra`` metrics' figures."""
        if self.count == 0:
            raise InvalidValueError("ReconstructionMetrics: no images scored yet")
        out = {
            "psnr": self.psnr_sum / self.count,
            "ssim": self.ssim_sum / self.count,
            "count": self.count,
            "identical": self.identical,
        }
        for m in self.extra:
            figures = m.result()
            clash = sorted(set(figures) & set(out))
            if clash:
                raise InvalidValueError(
                    f"ReconstructionMetrics: an extra metric reports {clash} again"
                )
            out.update(figures)
        return out
