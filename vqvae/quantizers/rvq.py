"""Residual vector quantization (SoundStream, Zeghidour et al. 2021): L vector quantizers,
each coding what the levels before it left over.

A vector's tokens are (..., L), one id per level; its code is the sum of its levels' codes,
and decoding from the first l levels gives a coarser vector. The gradient to the input is
the straight-through estimator's on that sum; each level adds a commitment term on its own
residual and keeps its own codebook (EMA by default), counts and restarts. With quantizer
dropout, a training batch uses only the first n levels (n uniform in 1..L, with probability
``dropout``), so that fewer levels still decode well.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.quantizers.assign import nearest_codes
from vqvae.quantizers.base import (
    CodebookStats,
    Quantizer,
    QuantizerOutput,
    health,
    level_counts,
)
from vqvae.quantizers.vq import CodebookSettings, VectorQuantizer, vq_options
from vqvae.ste import ste_replace


class ResidualVQ(Quantizer):
    """``levels`` vector quantizers of ``num_codes`` codes on successive residuals."""

    def __init__(
        self,
        code_dim: int,
        num_codes: int,
        levels: int,
        *,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        **vq_options,
    ):
        if levels < 1:
            raise InvalidValueError(f"residual_levels must be at least 1, got {levels}")
        if not 0.0 <= dropout <= 1.0:
            raise InvalidValueError(f"quantizer dropout must be in [0, 1], got {dropout}")
        if vq_options.get("normalize", False):
            # each level's unit-norm code is added whatever its residual's size, so extra
            # levels do not shrink the error
            raise InvalidValueError("residual VQ does not support cosine codes (normalize=True)")
        if vq_options.get("estimator", "ste") != "ste":
            raise InvalidValueError(
                "residual VQ uses the straight-through estimator on the sum of levels"
            )
        self.code_dim, self.vocab_size, self.num_levels = code_dim, num_codes, levels
        self.dropout = dropout
        self.levels = nnx.List(
            [VectorQuantizer(num_codes, code_dim, rngs=rngs, **vq_options) for _ in range(levels)]
        )
        self.dropout_key = CodebookStats(jax.random.key_data(rngs.params()))

    def _active_levels(self, train: bool) -> jax.Array:
        """How many levels this call uses: all, or in training with quantizer dropout, n
        uniform in 1..L with probability ``dropout`` (drawn from the state's key)."""
        if not (train and self.dropout > 0):
            return jnp.asarray(self.num_levels)
        key = jax.random.wrap_key_data(self.dropout_key.get_value())
        key, k_use, k_n = jax.random.split(key, 3)
        self.dropout_key.set_value(jax.random.key_data(key))
        n = jax.random.randint(k_n, (), 1, self.num_levels + 1)
        return jnp.where(jax.random.uniform(k_use) < self.dropout, n, self.num_levels)

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        self.check_input(z)
        z = z.astype(jnp.float32)
        n_active = self._active_levels(train)
        residual, total = z, jnp.zeros_like(z)
        loss, ids, restarted = jnp.zeros((), jnp.float32), [], jnp.zeros((), jnp.int32)
        for level, vq in enumerate(self.levels):
            active = level < n_active
            q = vq(residual, train=train, active=active)
            code = jax.lax.stop_gradient(q.quantized)  # this level's code vectors (..., D)
            total = total + jnp.where(active, code, 0.0)
            loss = loss + jnp.where(active, q.loss, 0.0)  # commitment on its own residual
            residual = residual - code  # what the next level codes
            ids.append(q.indices)
            restarted = restarted + q.metrics.get("codes_restarted", 0)
        indices = jnp.stack(ids, axis=-1)  # (..., L)
        metrics = {
            "commitment_loss": loss,
            "levels_used": n_active.astype(jnp.float32),
            "residual_norm": jnp.mean(jnp.sum(jnp.square(z - total), axis=-1)),
            **health(
                level_counts(indices, self.num_levels, self.vocab_size),
                active=jnp.arange(self.num_levels) < n_active,  # dropped levels not counted
            ),
        }
        if train:
            metrics["codes_restarted"] = restarted
        return QuantizerOutput(ste_replace(z, total), indices, loss, metrics)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Tokens (..., l) of the first l <= L levels -> the sum of their codes (..., D)."""
        self.check_ids(indices)
        used = indices.shape[-1] if indices.ndim else 0
        if not 1 <= used <= self.num_levels:
            raise InvalidValueError(
                f"residual VQ tokens need a last axis of 1..{self.num_levels} levels, got "
                f"shape {indices.shape}"
            )
        return sum(self.levels[k].lookup(indices[..., k]) for k in range(used))

    def codes(self) -> jax.Array:
        """Every level's codes: (L, K, D)."""
        return jnp.stack([vq.codes() for vq in self.levels])

    def usage(self) -> jax.Array:
        return jnp.concatenate([vq.usage() for vq in self.levels])  # (L, K)

    def init_from_batch(self, z: jax.Array, key: jax.Array) -> None:
        """k-means level by level: each level's codebook from the residuals it will see."""
        self.check_input(z)
        residual = z.reshape(-1, self.code_dim).astype(jnp.float32)
        for level, vq in enumerate(self.levels):
            vq.init_from_batch(residual, jax.random.fold_in(key, level))
            residual = residual - vq.codes()[nearest_codes(residual, vq.codes())]


@dataclasses.dataclass(frozen=True)
class RVQConfig(CodebookSettings):
    """kind "rvq": ``residual_levels`` codebooks of ``num_codes`` on successive residuals,
    with quantizer dropout (the probability that a training batch uses only its first n
    levels, n uniform in 1..levels)."""

    kind: ClassVar[str] = "rvq"
    example: ClassVar[dict] = {"num_codes": 16, "residual_levels": 2, "quantizer_dropout": 0.5}
    residual_levels: int = 1
    quantizer_dropout: float = 0.0

    def build(self, code_dim, rngs):
        return ResidualVQ(
            code_dim,
            self.num_codes,
            self.residual_levels,
            dropout=self.quantizer_dropout,
            rngs=rngs,
            **vq_options(self),
        )

    @property
    def num_levels(self) -> int:
        return self.residual_levels

    def describe(self, code_dim):
        return f"rvq {self.residual_levels} levels x {self.num_codes} x {code_dim}"
