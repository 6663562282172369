"""Quantizers: one interface (``base.Quantizer``), one module per kind.

    vq    VectorQuantizer: nearest code in a learned codebook (EMA or gradient)
    rvq   ResidualVQ: several VQ levels on successive residuals, optional quantizer dropout
    fsq   FSQ: finite scalar quantization, an implicit grid of per-dimension levels
    lfq   LFQ: lookup-free (sign) quantization with entropy terms

``QuantizerConfig(kind=...)`` builds one; ``assign`` holds the nearest-code kernels and
k-means. The estimators (straight-through, the rotation trick) live in ``vqvae.ste``.
"""

from vqvae.quantizers.assign import code_counts, codebook_health, kmeans, nearest_codes
from vqvae.quantizers.base import (
    Codebook,
    CodebookStats,
    Kind,
    Quantizer,
    QuantizerOutput,
    health,
    level_counts,
    level_means,
)
from vqvae.quantizers.config import KINDS, QuantizerConfig, kind_of, register_kind
from vqvae.quantizers.fsq import FSQ
from vqvae.quantizers.lfq import LFQ
from vqvae.quantizers.rvq import ResidualVQ
from vqvae.quantizers.vq import VectorQuantizer

__all__ = [
    "FSQ",
    "KINDS",
    "LFQ",
    "Codebook",
    "CodebookStats",
    "Kind",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantizer",
    "code_counts",
    "codebook_health",
    "health",
    "kind_of",
    "kmeans",
    "level_counts",
    "level_means",
    "nearest_codes",
    "register_kind",
]
