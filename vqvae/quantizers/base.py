"""The one interface every quantizer kind meets: the model, trainer, tokenizer, export,
report and prior use nothing else.

A quantizer maps continuous vectors (..., D) to tokens and back. It has ``num_levels``
tokens per vector (1, or a residual quantizer's levels), each one of ``vocab_size`` ids:
token grids are (..., ) with one level and (..., L) with several.
"""

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.quantizers.assign import codebook_health


class QuantizerOutput(NamedTuple):
    quantized: jax.Array  # (..., D) codes in the forward pass, an estimator's gradient
    indices: jax.Array  # (...) int32, or (..., L) with several levels
    loss: jax.Array  # the quantizer's own loss (commitment, codebook, entropy terms)
    metrics: dict[str, jax.Array]  # its losses and health on this batch


class Codebook(nnx.Variable):
    """A codebook learned by EMA: written in the forward pass, never by gradients."""


class CodebookStats(nnx.Variable):
    """Running statistics (EMA counts and sums, usage) and keys: state, not parameters."""


def level_counts(
    indices: jax.Array, num_levels: int, vocab_size: int, weights: jax.Array | None = None
) -> jax.Array:
    """How often each id occurs at each level: indices (...) or (..., L) -> (L, K) float32.

    ``weights`` (...) (one per vector, 0 for padding) weigh each vector's ids.
    """
    ids = indices.reshape(-1, num_levels)  # (N, L)
    w = jnp.ones(ids.shape[0], jnp.float32) if weights is None else weights.reshape(-1)
    flat = ids + jnp.arange(num_levels, dtype=ids.dtype) * vocab_size  # level l: l K + id
    counts = jax.ops.segment_sum(
        jnp.broadcast_to(w[:, None], ids.shape).reshape(-1),
        flat.reshape(-1),
        num_segments=num_levels * vocab_size,
    )
    return counts.reshape(num_levels, vocab_size)


def health(counts: jax.Array, active: jax.Array | None = None) -> dict[str, jax.Array]:
    """Codebook health from per-level counts (L, K), defined alike for every kind.

    Each figure (perplexity, codes used, their fraction, the largest code's share) is
    taken per level; the unsuffixed figure is the mean over the
    levels, and where there are several levels each one's is reported too, as
    ``{figure}_level{l}``. ``active`` (L,) bool marks the levels this batch used (quantizer
    dropout): the mean counts only those, and a dropped level's own figures read 0.
    """
    num_levels = counts.shape[0]
    per_level = jax.vmap(codebook_health)(counts)
    return level_means(per_level, active if active is not None else jnp.ones(num_levels, bool))


def level_means(per_level: dict[str, jax.Array], active: jax.Array) -> dict[str, jax.Array]:
    """Per-level figures {name: (L,)} -> their mean over the ``active`` (L,) levels, plus
    ``{name}_level{l}`` for each level where there are several (0 where not active)."""
    weight = active.astype(jnp.float32)
    out = {}
    for name, values in per_level.items():
        values = jnp.where(active, values.astype(jnp.float32), 0.0)
        out[name] = jnp.sum(values) / jnp.maximum(jnp.sum(weight), 1.0)
        if values.shape[0] > 1:
            for level in range(values.shape[0]):
                out[f"{name}_level{level}"] = values[level]
    return out


class Quantizer(nnx.Module):
    """The interface. Subclasses set ``code_dim``, ``vocab_size`` and ``num_levels`` and
    implement ``__call__``, ``lookup`` and ``codes``; the rest has defaults.

    - ``__call__(z, train=False) -> QuantizerOutput``: z (..., code_dim); ``train=True``
      also advances the kind's running state (EMA codebook, restarts) on this batch.
    - ``lookup(indices)``: tokens (...) or (..., l) -> vectors (..., code_dim); a residual
      quantizer decodes from its first l <= L levels.
    - ``codes()``: the code vectors as the decoder sees them, (K, D) or (L, K, D).
    - ``usage()``: running usage counts (L, K), or None where the kind keeps none.
    - ``init_from_batch(z, key)``: optional initialisation from encoder outputs.
    """

    code_dim: int
    vocab_size: int
    num_levels: int = 1

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Tokens per vector: () with one level, (L,) with several."""
        return () if self.num_levels == 1 else (self.num_levels,)

    @property
    def bits_per_token(self) -> float:
        """Bits of all tokens of one vector (every level)."""
        return self.num_levels * math.log2(self.vocab_size)

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        raise NotImplementedError

    def lookup(self, indices: jax.Array) -> jax.Array:
        raise NotImplementedError

    def codes(self) -> jax.Array:
        raise NotImplementedError

    def usage(self) -> jax.Array | None:
        return None

    def init_from_batch(self, z: jax.Array, key: jax.Array) -> None:
        """No initialisation from data unless the kind has one."""

    def check_input(self, z: jax.Array) -> None:
        if z.ndim < 1 or z.shape[-1] != self.code_dim:
            raise InvalidValueError(
                f"{type(self).__name__} expects inputs (..., {self.code_dim}), got shape {z.shape}"
            )
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise TypeError(f"{type(self).__name__} expects floating-point inputs, got {z.dtype}")

    def check_ids(self, indices: jax.Array) -> None:
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"lookup needs integer indices, got dtype {indices.dtype}")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """What quantizes the encoder's outputs: each kind subclasses this with its own fields
    (``vqvae.quantizers.config.KINDS`` names it) and says how it builds, counts and
    describes itself. Stored inside the model's config as ``{"kind": ..., **fields}``.

    ``example``: the settings of a small instance (tests build every kind from these).
    """

    kind: ClassVar[str] = ""
    example: ClassVar[dict] = {}

    def build(self, code_dim: int, rngs: nnx.Rngs) -> Quantizer:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Ids per token."""
        raise NotImplementedError

    @property
    def num_levels(self) -> int:
        """Tokens per vector."""
        return 1

    def describe(self, code_dim: int) -> str:
        """The quantizer in a few words: kind, codes and their width (the report's line)."""
        return f"{self.kind} {self.vocab_size} codes x {code_dim}"

    def replace(self, **changes) -> "QuantizerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The kind and its fields (tuples stay tuples: overridable on the command line)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **fields}
