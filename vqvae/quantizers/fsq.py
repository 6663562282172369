"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple"): each of a few dimensions is bounded and rounded to one of L_i levels.

The codebook is implicit, the grid of every combination of levels (prod L_i codes), so
there is no codebook loss, no commitment and no EMA; rounding's gradient is the
straight-through estimator's. A token is the mixed-radix number of the per-dimension
levels. Inputs of another width are projected to the levels' dimensions and back.
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.quantizers.base import (
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    health,
    level_counts,
)
from vqvae.ste import ste_round


def fsq_bound(z: jax.Array, levels: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Squash z (..., d) so that rounding gives L_i values per dimension.

    Odd L: rounding lands on -(L-1)/2 .. (L-1)/2; even L: the grid is shifted by half a step
    (tanh's offset moves the centre) so it still has exactly L integer values.
    """
    half = (levels - 1) * (1 + eps) / 2
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half)
    return jnp.tanh(z + shift) * half - offset


def fsq_quantize(z: jax.Array, levels: jax.Array) -> jax.Array:
    """z (..., d) -> codes (..., d) in [-1, 1]: bounded, rounded (straight-through)."""
    half_width = levels // 2
    return ste_round(fsq_bound(z, levels)) / half_width


def fsq_codes_to_indices(codes: jax.Array, levels: jax.Array) -> jax.Array:
    """Codes (..., d) on the grid -> int32 ids (...): digit i is the level of dimension i
    (0 .. L_i - 1), in mixed radix with dimension 0 the least significant."""
    half_width = levels // 2
    digits = jnp.round(codes * half_width + half_width).astype(jnp.int32)  # (..., d)
    basis = jnp.cumprod(jnp.concatenate([jnp.ones(1, jnp.int32), levels[:-1]]))
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)


def fsq_indices_to_codes(indices: jax.Array, levels: jax.Array) -> jax.Array:
    """int ids (...) -> codes (..., d) in [-1, 1]: the inverse of fsq_codes_to_indices."""
    basis = jnp.cumprod(jnp.concatenate([jnp.ones(1, jnp.int32), levels[:-1]]))
    digits = (indices[..., None] // basis) % levels  # (..., d)
    half_width = levels // 2
    return (digits - half_width) / half_width


class FSQ(Quantizer):
    """Finite scalar quantizer over inputs (..., code_dim) with ``levels`` per dimension."""

    def __init__(self, code_dim: int, levels: tuple[int, ...], *, rngs: nnx.Rngs):
        levels = tuple(int(x) for x in levels)
        if not levels or min(levels) < 2:
            raise InvalidValueError(
                f"fsq_levels needs at least one dimension of >= 2 levels: {levels}"
            )
        self.code_dim, self.levels = code_dim, levels
        self.vocab_size = int(np.prod(levels))
        d = len(levels)
        # projections where the encoder's width differs from the number of dimensions
        self.project_in = nnx.Linear(code_dim, d, rngs=rngs) if code_dim != d else None
        self.project_out = nnx.Linear(d, code_dim, rngs=rngs) if code_dim != d else None

    def _levels(self) -> jax.Array:
        return jnp.asarray(self.levels, jnp.int32)

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        self.check_input(z)
        z = z.astype(jnp.float32)
        h = self.project_in(z) if self.project_in is not None else z  # (..., d)
        codes = fsq_quantize(h, self._levels())
        indices = fsq_codes_to_indices(jax.lax.stop_gradient(codes), self._levels())
        out = self.project_out(codes) if self.project_out is not None else codes
        metrics = health(level_counts(indices, 1, self.vocab_size))
        return QuantizerOutput(out, indices, jnp.zeros((), jnp.float32), metrics)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Token ids (...) -> vectors (..., code_dim)."""
        self.check_ids(indices)
        codes = fsq_indices_to_codes(indices, self._levels()).astype(jnp.float32)
        return self.project_out(codes) if self.project_out is not None else codes

    def codes(self) -> jax.Array:
        """Every code of the implicit grid, as the decoder sees it: (K, code_dim)."""
        return self.lookup(jnp.arange(self.vocab_size, dtype=jnp.int32))


@dataclasses.dataclass(frozen=True)
class FSQConfig(QuantizerConfig):
    """kind "fsq": an implicit grid of ``fsq_levels`` per dimension (their product of codes)."""

    kind: ClassVar[str] = "fsq"
    example: ClassVar[dict] = {"fsq_levels": (4, 4, 2)}
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)

    def __post_init__(self):
        object.__setattr__(self, "fsq_levels", tuple(int(x) for x in self.fsq_levels))

    def build(self, code_dim, rngs):
        return FSQ(code_dim, self.fsq_levels, rngs=rngs)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.fsq_levels)

    def describe(self, code_dim):
        return f"fsq {self.fsq_levels}: {self.vocab_size} implicit codes"
