"""Quantizers: one interface (``base.Quantizer``), one module per kind with its config.

    vq    VectorQuantizer (VQConfig): nearest code in a learned codebook (EMA or gradient)
    rvq   ResidualVQ (RVQConfig): VQ levels on successive residuals, quantizer dropout
    fsq   FSQ (FSQConfig): finite scalar quantization, per-dimension levels
    lfq   LFQ (LFQConfig): lookup-free (sign) quantization with entropy terms

``KINDS`` finds a kind's config by name; ``assign`` holds the nearest-code kernels and
k-means. The estimators (straight-through, the rotation trick) live in ``vqvae.ste``.
"""

from vqvae.quantizers.assign import code_counts, codebook_health, kmeans, nearest_codes
from vqvae.quantizers.base import (
    Codebook,
    CodebookStats,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    health,
    level_counts,
    level_means,
)
from vqvae.quantizers.config import (
    KINDS,
    every_setting,
    kind_of,
    quantizer_from_dict,
    register_kind,
)
from vqvae.quantizers.fsq import FSQ, FSQConfig
from vqvae.quantizers.lfq import LFQ, LFQConfig
from vqvae.quantizers.rvq import ResidualVQ, RVQConfig
from vqvae.quantizers.vq import VectorQuantizer, VQConfig

__all__ = [
    "FSQ",
    "KINDS",
    "LFQ",
    "Codebook",
    "CodebookStats",
    "FSQConfig",
    "LFQConfig",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "RVQConfig",
    "ResidualVQ",
    "VQConfig",
    "VectorQuantizer",
    "code_counts",
    "codebook_health",
    "every_setting",
    "health",
    "kind_of",
    "kmeans",
    "level_counts",
    "level_means",
    "nearest_codes",
    "quantizer_from_dict",
    "register_kind",
]
