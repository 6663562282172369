"""Image reconstruction metrics: PSNR and SSIM (as scikit-image), the Fréchet distance and
the feature statistics files FID uses, a streaming accumulator over image pairs, rFID with
the FID Inception under named protocols, and LPIPS (VGG16 or AlexNet) as a metric."""

from vqvae.metrics.accumulator import BatchMetric, ReconstructionMetrics
from vqvae.metrics.frechet import frechet_distance, frechet_distance_gram
from vqvae.metrics.psnr_ssim import psnr, ssim
from vqvae.metrics.stats import (
    ADMReference,
    FeatureStats,
    Gaussian,
    read_adm_reference,
    read_stats,
    write_stats,
)

__all__ = [
    "PROTOCOLS",
    "ADMReference",
    "BatchMetric",
    "FIDMetric",
    "FeatureExtractor",
    "FeatureStats",
    "Gaussian",
    "LPIPSMetric",
    "Protocol",
    "ReconstructionMetrics",
    "frechet_distance",
    "frechet_distance_gram",
    "protocol",
    "psnr",
    "read_adm_reference",
    "read_stats",
    "ssim",
    "write_stats",
]

_LAZY = {  # imported on first use, so `python -m vqvae.metrics.inception` runs it only once
    **dict.fromkeys(("PROTOCOLS", "FeatureExtractor", "FIDMetric", "Protocol", "protocol"), "fid"),
    "LPIPSMetric": "perceptual",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"vqvae.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vqvae.metrics' has no attribute {name!r}")
