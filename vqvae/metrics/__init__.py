"""Image reconstruction metrics: PSNR and SSIM (as scikit-image), the Fréchet distance and
the feature statistics files FID uses, and a streaming accumulator over image pairs."""

from vqvae.metrics.accumulator import BatchMetric, ReconstructionMetrics
from vqvae.metrics.frechet import frechet_distance
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
    "ADMReference",
    "BatchMetric",
    "FeatureStats",
    "Gaussian",
    "ReconstructionMetrics",
    "frechet_distance",
    "psnr",
    "read_adm_reference",
    "read_stats",
    "ssim",
    "write_stats",
]
