"""The quantizer's config: ``kind`` picks the quantizer, the other fields set it up.

Stored in every checkpoint inside the model's config. Adding a kind: one module with a
``Quantizer`` subclass and its ``Kind`` (check, build, vocab size, levels, description),
and one line in ``KINDS`` (or ``register_kind`` from outside the package). A kind reads
the shared fields below; one that needs its own adds them here.
"""

import dataclasses
import importlib
from typing import Any

from flax import nnx

from vqvae.quantizers.base import Kind, Quantizer

# kind -> its ``Kind`` ("module:attribute", imported when first used, or the object)
KINDS: dict[str, str | Kind] = {
    "vq": "vqvae.quantizers.vq:KIND",
    "rvq": "vqvae.quantizers.rvq:KIND",
    "fsq": "vqvae.quantizers.fsq:KIND",
    "lfq": "vqvae.quantizers.lfq:KIND",
}


def register_kind(name: str, kind: Kind | str) -> None:
    """Make ``quantizer.kind = name`` use ``kind`` (a ``Kind`` or "module:attribute")."""
    KINDS[name] = kind


def kind_of(name: str) -> Kind:
    """The registered ``Kind`` called ``name``."""
    if name not in KINDS:
        raise ValueError(f"quantizer kind must be one of {sorted(KINDS)}, got {name!r}")
    kind = KINDS[name]
    if isinstance(kind, str):
        module, _, attr = kind.partition(":")
        kind = KINDS[name] = getattr(importlib.import_module(module), attr)
    return kind


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
        if self.codebook_dim < 0:
            raise ValueError(
                f"codebook_dim must be >= 0 (0: the input's width), got {self.codebook_dim}"
            )
        self.kind_spec.check(self)

    @property
    def kind_spec(self) -> Kind:
        """This kind's ``Kind``: what builds, counts and describes it."""
        return kind_of(self.kind)

    @property
    def vocab_size(self) -> int:
        """Ids per token."""
        return self.kind_spec.vocab_size(self)

    @property
    def num_levels(self) -> int:
        """Tokens per vector."""
        return self.kind_spec.num_levels(self)

    def build(self, code_dim: int, rngs: nnx.Rngs) -> Quantizer:
        return self.kind_spec.build(self, code_dim, rngs)

    def describe(self, code_dim: int) -> str:
        """The quantizer in a few words: kind, codes and their width."""
        return self.kind_spec.describe(self, code_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # tuples stay tuples: overridable on the command line

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizerConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown quantizer config keys: {sorted(unknown)}")
        return cls(**d)
