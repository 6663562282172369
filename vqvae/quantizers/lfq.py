"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): each dimension quantized to its
sign, so a token is the binary number of the signs and the codebook is implicit (2^d codes
of +-1 entries).

The forward value is +1 where z > 0 and -1 elsewhere (an exact 0 too, so the forward
always equals ``lookup(indices)``), by the straight-through estimator
(``vqvae.ste.ste_binary``). Two entropy terms keep the codes sharp and all in use: with
code probabilities q(c | z) = softmax over codes of -|z - c|^2 / temperature, the loss is
``entropy_weight * (mean over vectors of H(q(. | z)) - diversity_weight * H(mean over the
batch of q(. | z)))`` plus a commitment term. Over codes of +-1 entries the softmax
factorises into one Bernoulli per dimension, p_i = sigmoid(4 z_i / temperature), so the
per-vector entropy is exact at any size; the batch entropy is exact over all 2^d codes up
to 2^12 of them, and above that the sum of the per-dimension entropies of the batch's mean
bit probabilities (an upper bound on it, as in MAGVIT-v2's factorised form).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.quantizers.base import (
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    health,
    level_counts,
)
from vqvae.ste import ste_binary

EXACT_BATCH_ENTROPY_BITS = 12  # up to 4,096 codes the batch entropy sums over every code


def _binary_entropy(p: jax.Array) -> jax.Array:
    """Entropy in nats of Bernoulli(p), elementwise, 0 at p = 0 and 1."""
    q = 1.0 - p
    return -(
        jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
        + jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
    )


def lfq_bit_probs(z: jax.Array, temperature: float) -> jax.Array:
    """P(bit i of the code is +1 | z): sigmoid(4 z_i / temperature), (N, d)."""
    return jax.nn.sigmoid(4.0 * z / temperature)


def lfq_entropies(z: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(mean per-vector entropy, entropy of the batch's mean code distribution), in nats.

    z (N, d). The code distribution of each vector is softmax(-|z - c|^2 / T) over the 2^d
    codes c in {-1, +1}^d.
    """
    n, d = z.shape
    p = lfq_bit_probs(z, temperature)  # (N, d)
    per_vector = jnp.mean(jnp.sum(_binary_entropy(p), axis=-1))
    if d <= EXACT_BATCH_ENTROPY_BITS:
        bits = ((jnp.arange(2**d)[:, None] >> jnp.arange(d)[None, :]) & 1).astype(jnp.float32)
        # log q(c | z) = sum_i log p_i or log (1 - p_i), for every code c: (N, 2^d)
        log_p, log_q = (
            jax.nn.log_sigmoid(4.0 * z / temperature),
            jax.nn.log_sigmoid(-4.0 * z / temperature),
        )
        log_codes = log_p @ bits.T + log_q @ (1.0 - bits).T
        mean = jnp.mean(jnp.exp(log_codes), axis=0)  # (2^d,)
        batch = -jnp.sum(jnp.where(mean > 0, mean * jnp.log(jnp.where(mean > 0, mean, 1.0)), 0))
    else:
        batch = jnp.sum(_binary_entropy(jnp.mean(p, axis=0)))
    return per_vector, batch


def lfq_codes_to_indices(codes: jax.Array) -> jax.Array:
    """Codes (..., d) of +-1 -> int32 ids (...): bit i (1 where the code is positive) is worth
    2^i (dimension 0 the least significant)."""
    d = codes.shape[-1]
    bits = (codes > 0).astype(jnp.int32)
    return jnp.sum(bits << jnp.arange(d, dtype=jnp.int32), axis=-1)


def lfq_indices_to_codes(indices: jax.Array, d: int) -> jax.Array:
    """int ids (...) -> codes (..., d) of +-1."""
    bits = (indices[..., None] >> jnp.arange(d, dtype=indices.dtype)) & 1
    return bits.astype(jnp.float32) * 2.0 - 1.0


class LFQ(Quantizer):
    """Lookup-free quantizer over inputs (..., code_dim) with ``bits`` binary dimensions."""

    def __init__(
        self,
        code_dim: int,
        bits: int,
        *,
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        rngs: nnx.Rngs,
    ):
        if not 1 <= bits <= 30:
            raise InvalidValueError(f"lfq_bits must be in 1..30, got {bits}")
        if temperature <= 0:
            raise InvalidValueError(f"lfq temperature must be positive, got {temperature}")
        self.code_dim, self.bits, self.vocab_size = code_dim, bits, 2**bits
        self.beta, self.entropy_weight = beta, entropy_weight
        self.diversity_weight, self.temperature = diversity_weight, temperature
        self.project_in = nnx.Linear(code_dim, bits, rngs=rngs) if code_dim != bits else None
        self.project_out = nnx.Linear(bits, code_dim, rngs=rngs) if code_dim != bits else None

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        self.check_input(z)
        z = z.astype(jnp.float32)
        h = self.project_in(z) if self.project_in is not None else z  # (..., d)
        codes = ste_binary(h)  # +-1 forward (0 -> -1, a codebook entry), identity gradient
        indices = lfq_codes_to_indices(jax.lax.stop_gradient(codes))
        commitment = self.beta * jnp.mean(jnp.square(h - jax.lax.stop_gradient(codes)))
        per_vector, batch = lfq_entropies(h.reshape(-1, self.bits), self.temperature)
        entropy = self.entropy_weight * (per_vector - self.diversity_weight * batch)
        out = self.project_out(codes) if self.project_out is not None else codes
        metrics = {
            "commitment_loss": commitment,
            "entropy_loss": entropy,
            "per_vector_entropy": per_vector,
            "batch_entropy": batch,
            **health(level_counts(indices, 1, self.vocab_size)),
        }
        return QuantizerOutput(out, indices, commitment + entropy, metrics)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Token ids (...) -> vectors (..., code_dim)."""
        self.check_ids(indices)
        codes = lfq_indices_to_codes(indices.astype(jnp.int32), self.bits)
        return self.project_out(codes) if self.project_out is not None else codes

    def codes(self) -> jax.Array:
        """Every code, as the decoder sees it: (2^bits, code_dim)."""
        return self.lookup(jnp.arange(self.vocab_size, dtype=jnp.int32))


@dataclasses.dataclass(frozen=True)
class LFQConfig(QuantizerConfig):
    """kind "lfq": ``lfq_bits`` signs per token (2^bits codes) and the entropy terms."""

    kind: ClassVar[str] = "lfq"
    example: ClassVar[dict] = {"lfq_bits": 5}
    lfq_bits: int = 9
    beta: float = 0.25  # commitment cost
    entropy_weight: float = 0.1
    diversity_weight: float = 1.0
    entropy_temperature: float = 0.01

    def build(self, code_dim, rngs):
        return LFQ(
            code_dim,
            self.lfq_bits,
            beta=self.beta,
            entropy_weight=self.entropy_weight,
            diversity_weight=self.diversity_weight,
            temperature=self.entropy_temperature,
            rngs=rngs,
        )

    @property
    def vocab_size(self) -> int:
        return 2**self.lfq_bits

    def describe(self, code_dim):
        return f"lfq {self.lfq_bits} bits: {self.vocab_size} implicit codes"
