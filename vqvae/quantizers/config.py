"""The quantizer's config: ``kind`` picks the quantizer, the other fields set it up.

Stored in every checkpoint inside the model's config. Adding a kind: a module in this
package with a ``Quantizer`` subclass, a line in ``KINDS`` and its fields here (and, where
its options need checking, in ``check``).
"""

import dataclasses
from typing import Any

from flax import nnx

from vqvae.quantizers.base import Quantizer

# kind -> "module:class" in this package, imported when built
KINDS = {
    "vq": "vq:VectorQuantizer",
    "rvq": "rvq:ResidualVQ",
    "fsq": "fsq:FSQ",
    "lfq": "lfq:LFQ",
}
_VQ_OPTIONS = (
    "beta",
    "learning",
    "decay",
    "epsilon",
    "estimator",
    "normalize",
    "dead_code_threshold",
    "precision",
)


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """What quantizes the encoder's outputs. Fields are grouped by the kinds that read them."""

    kind: str = "vq"  # vq | rvq | fsq | lfq
    # vq and rvq: a codebook of num_codes per level
    num_codes: int = 512
    beta: float = 0.25  # commitment cost (vq, rvq, lfq)
    learning: str = "ema"  # "ema" or "gradient"
    decay: float = 0.99
    epsilon: float = 1e-5
    estimator: str = "ste"  # vq: "ste" or "rotation"
    normalize: bool = False  # cosine codes
    dead_code_threshold: float = 0.0  # EMA: re-seed codes used less than this
    precision: str = "highest"  # the assignment: "highest", "default" or "rerank"
    # vq: factorised codes (ViT-VQGAN, LlamaGen): codes of this width under the encoder's,
    # with learned projections in and out; 0: codes of the encoder's width
    codebook_dim: int = 0
    # rvq: levels of num_codes each, and quantizer dropout (probability a training batch
    # uses only its first n levels, n uniform in 1..levels)
    residual_levels: int = 1
    quantizer_dropout: float = 0.0
    # fsq: levels per dimension (the codebook is their product)
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # lfq: bits per token (2^bits codes) and the entropy terms
    lfq_bits: int = 9
    entropy_weight: float = 0.1
    diversity_weight: float = 1.0
    entropy_temperature: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "fsq_levels", tuple(int(x) for x in self.fsq_levels))
        if self.kind not in KINDS:
            raise ValueError(f"quantizer kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.codebook_dim < 0:
            raise ValueError(
                f"codebook_dim must be >= 0 (0: the input's width), got {self.codebook_dim}"
            )
        if self.codebook_dim and self.kind != "vq":
            raise ValueError(
                f"codebook_dim (factorised codes) is for kind 'vq' only, not {self.kind!r}; "
                f"set it to 0"
            )

    @property
    def vocab_size(self) -> int:
        """Ids per token."""
        if self.kind == "fsq":
            out = 1
            for level in self.fsq_levels:
                out *= level
            return out
        return 2**self.lfq_bits if self.kind == "lfq" else self.num_codes

    @property
    def num_levels(self) -> int:
        """Tokens per vector."""
        return self.residual_levels if self.kind == "rvq" else 1

    def build(self, code_dim: int, rngs: nnx.Rngs) -> Quantizer:
        import importlib

        module, _, cls = KINDS[self.kind].partition(":")
        make = getattr(importlib.import_module(f"vqvae.quantizers.{module}"), cls)
        vq = {k: getattr(self, k) for k in _VQ_OPTIONS}
        if self.kind == "vq":
            return make(self.num_codes, code_dim, codebook_dim=self.codebook_dim, rngs=rngs, **vq)
        if self.kind == "rvq":
            return make(
                code_dim,
                self.num_codes,
                self.residual_levels,
                dropout=self.quantizer_dropout,
                rngs=rngs,
                **vq,
            )
        if self.kind == "fsq":
            return make(code_dim, self.fsq_levels, rngs=rngs)
        return make(
            code_dim,
            self.lfq_bits,
            beta=self.beta,
            entropy_weight=self.entropy_weight,
            diversity_weight=self.diversity_weight,
            temperature=self.entropy_temperature,
            rngs=rngs,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # tuples stay tuples: overridable on the command line

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizerConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown quantizer config keys: {sorted(unknown)}")
        return cls(**d)
