"""The vector quantizer: nearest code, straight-through output, commitment, EMA codebook.

Factorised codes (ViT-VQGAN, Yu et al. 2022; LlamaGen): with ``codebook_dim`` under the
input's width, a learned linear map takes each input vector down to ``codebook_dim`` before
the lookup and another takes its code back up; with ``normalize`` both the projected vectors
and the codes are unit vectors, so the nearest code is the one of largest cosine.

The math lives in small pure functions (assignment in ``vqvae.quantizers.assign``; here the
EMA update and dead-code restarts, over flat arrays ``z`` (N, D) and a codebook (K, D)), so
each can be used and tested alone; ``VectorQuantizer`` wires them into a Flax NNX module.
"""

import dataclasses
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.quantizers.assign import (
    _PRECISIONS,
    Precision,
    code_counts,
    codebook_health,
    kmeans,
    l2_normalize,
    nearest_codes,
)
from vqvae.quantizers.base import (
    Codebook,
    CodebookStats,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
)
from vqvae.ste import rotation_trick, ste_replace


def ema_update(
    counts: jax.Array,
    sums: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    *,
    decay: float,
    epsilon: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA codebook step (VQ-VAE paper, appendix; Laplace-smoothed counts).

    counts (K,), sums (K, D), z (N, D), indices (N,) -> new counts, new sums, codebook (K, D):
        N_k <- decay N_k + (1 - decay) n_k          n_k: vectors assigned to code k
        m_k <- decay m_k + (1 - decay) sum z_i      over the vectors assigned to k
        e_k  = m_k / ((N_k + eps) / (sum N + K eps) * sum N)
    On a batch sharded over devices the segment sums are global, so is the update.
    """
    k = counts.shape[0]
    batch_counts = jax.ops.segment_sum(jnp.ones(indices.shape, jnp.float32), indices, k)  # (K,)
    batch_sums = jax.ops.segment_sum(z, indices, k)  # (K, D)
    counts = decay * counts + (1.0 - decay) * batch_counts
    sums = decay * sums + (1.0 - decay) * batch_sums
    total = jnp.sum(counts)
    smoothed = (counts + epsilon) / (total + k * epsilon) * total  # (K,)
    return counts, sums, sums / smoothed[:, None]


def restart_dead_codes(
    codebook: jax.Array,
    counts: jax.Array,
    sums: jax.Array,
    z: jax.Array,
    key: jax.Array,
    threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Re-seed every code whose EMA count is under ``threshold`` from a vector of ``z``.

    codebook (K, D), counts (K,), sums (K, D), z (N, D) -> codebook, counts, sums, dead (K,).
    Each dead code takes a vector of the batch drawn uniformly with ``key`` (deterministic);
    its count restarts at ``threshold`` and its sum at ``threshold * vector`` so the next EMA
    step starts from the new code. Live codes are untouched.
    """
    dead = counts < threshold  # (K,)
    picks = jax.random.randint(key, (codebook.shape[0],), 0, z.shape[0])  # (K,)
    fresh = z[picks]  # (K, D), a gather
    codebook = jnp.where(dead[:, None], fresh, codebook)
    counts = jnp.where(dead, threshold, counts)
    sums = jnp.where(dead[:, None], threshold * fresh, sums)
    return codebook, counts, sums, dead


class VectorQuantizer(Quantizer):
    """Codebook quantizer over inputs (..., code_dim) with a straight-through backward pass.

    learning="ema" (default) updates the codebook from running cluster statistics when called
    with ``train=True``; learning="gradient" makes it an ``nnx.Param`` trained by the codebook
    loss. estimator="ste" (default) or "rotation" picks the gradient to the encoder output.

    ``codebook_dim`` (0: ``code_dim``) under ``code_dim`` factorises the codes: inputs are
    projected to ``codebook_dim`` (``project_in``), assigned, and their codes projected back
    (``project_out``); losses, EMA statistics, restarts and k-means live in the projected
    space, while ``lookup`` and ``codes`` give vectors as the decoder sees them (code_dim).
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        *,
        beta: float = 0.25,
        learning: Literal["ema", "gradient"] = "ema",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        estimator: Literal["ste", "rotation"] = "ste",
        normalize: bool = False,
        dead_code_threshold: float = 0.0,
        precision: Precision = "highest",
        codebook_dim: int = 0,
        rngs: nnx.Rngs,
    ):
        if num_codes < 1:
            raise InvalidValueError(f"num_codes must be at least 1, got {num_codes}")
        if code_dim < 1:
            raise InvalidValueError(f"code_dim must be at least 1, got {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise InvalidValueError(f"decay must be in [0, 1), got {decay}")
        if beta < 0 or epsilon <= 0:
            raise InvalidValueError(f"beta must be >= 0 and epsilon > 0, got {beta} and {epsilon}")
        if learning not in ("ema", "gradient"):
            raise InvalidValueError(f"learning must be 'ema' or 'gradient', got {learning!r}")
        if estimator not in ("ste", "rotation"):
            raise InvalidValueError(f"estimator must be 'ste' or 'rotation', got {estimator!r}")
        if precision not in _PRECISIONS:
            raise InvalidValueError(
                f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}"
            )
        if dead_code_threshold > 0 and learning != "ema":
            raise InvalidValueError(
                "dead_code_threshold needs learning='ema' (restarts edit EMA state)"
            )
        if not 0 <= codebook_dim < code_dim:
            raise InvalidValueError(
                f"codebook_dim must be 0 (codes of the input's width) or from 1 to "
                f"code_dim - 1 = {code_dim - 1}, got {codebook_dim}"
            )
        self.num_codes, self.code_dim, self.vocab_size = num_codes, code_dim, num_codes
        self.codebook_dim = codebook_dim or code_dim  # the width of the stored codes
        if codebook_dim:  # float32 at full precision, as the rest of the quantizer
            linear = dict(param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, rngs=rngs)
            self.project_in = nnx.Linear(code_dim, codebook_dim, **linear)
            self.project_out = nnx.Linear(codebook_dim, code_dim, **linear)
        else:
            self.project_in = self.project_out = None
        self.beta, self.learning, self.decay, self.epsilon = beta, learning, decay, epsilon
        self.estimator, self.normalize, self.precision = estimator, normalize, precision
        self.dead_code_threshold = dead_code_threshold

        width = self.codebook_dim
        limit = math.sqrt(3.0 / width)  # unit-variance uniform, as a fan-in init
        init = jax.random.uniform(rngs.params(), (num_codes, width), jnp.float32, -limit, limit)
        if normalize:
            init = l2_normalize(init)
        self.codebook = nnx.Param(init) if learning == "gradient" else Codebook(init)
        # Counts start at one per code and sums at the codes, so e = m / N holds from step 0.
        self.counts = CodebookStats(jnp.ones((num_codes,), jnp.float32))
        self.sums = CodebookStats(init) if learning == "ema" else None
        self.restart_key = CodebookStats(jax.random.key_data(rngs.params()))

    @property
    def factorised(self) -> bool:
        return self.project_in is not None

    def assignment_codes(self) -> jax.Array:
        """The codebook (K, codebook_dim) as used for assignment (unit vectors in cosine mode)."""
        e = self.codebook.get_value()
        return l2_normalize(e) if self.normalize else e

    def project(self, z: jax.Array) -> jax.Array:
        """Inputs (..., code_dim) -> the vectors that are assigned (..., codebook_dim), float32:
        through ``project_in`` where the codes are factorised, unit vectors in cosine mode."""
        z = z.astype(jnp.float32)
        if self.factorised:
            z = self.project_in(z)
        return l2_normalize(z) if self.normalize else z

    def unproject(self, e: jax.Array) -> jax.Array:
        """Codes (..., codebook_dim) -> vectors as the decoder sees them (..., code_dim)."""
        return self.project_out(e) if self.factorised else e

    def codes(self) -> jax.Array:
        """The code vectors as the decoder sees them (K, code_dim): the codebook, unit vectors
        in cosine mode, and through ``project_out`` where the codes are factorised."""
        return self.unproject(self.assignment_codes())

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors for int indices (...) -> (..., code_dim), for decoding tokens."""
        self.check_ids(indices)
        return self.unproject(jnp.take(self.assignment_codes(), indices, axis=0))

    def usage(self) -> jax.Array:
        """EMA usage counts (1, K)."""
        return self.counts.get_value()[None]

    def __call__(
        self, z: jax.Array, *, train: bool = False, active: jax.Array | bool = True
    ) -> QuantizerOutput:
        """Quantize z (..., D); with ``train=True`` also update the EMA state from this batch
        (unless ``active`` is false: a residual level that quantizer dropout left out)."""
        self.check_input(z)
        z = self.project(z)  # float32 always; (..., codebook_dim)
        codebook = self.assignment_codes()  # (K, codebook_dim)
        indices = nearest_codes(jax.lax.stop_gradient(z), codebook, precision=self.precision)
        e = jnp.take(codebook, indices, axis=0)  # (..., D)

        # beta weighs the encoder's pull towards its code, never the codebook's update.
        commitment = self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        if self.learning == "gradient":
            codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
        else:
            codebook_loss = jnp.zeros((), jnp.float32)
        quantized = rotation_trick(z, e) if self.estimator == "rotation" else ste_replace(z, e)
        quantized = self.unproject(quantized)  # (..., code_dim)

        counts = code_counts(indices, self.num_codes)  # (K,)
        metrics = {"commitment_loss": commitment, "codebook_loss": codebook_loss}
        metrics |= codebook_health(counts)
        if train:
            # a snapshot: nnx.state holds the live Variables, which the update rewrites
            before = jax.tree.map(lambda x: x, nnx.state(self, nnx.Any(CodebookStats, Codebook)))
            metrics["codes_restarted"] = self._update(jax.lax.stop_gradient(z), indices)
            if active is not True:  # keep the state of a level that sat this batch out
                after = nnx.state(self, nnx.Any(CodebookStats, Codebook))
                nnx.update(self, jax.tree.map(lambda a, b: jnp.where(active, a, b), after, before))
                metrics["codes_restarted"] = jnp.where(active, metrics["codes_restarted"], 0)
        return QuantizerOutput(quantized, indices, commitment + codebook_loss, metrics)

    def _update(self, z: jax.Array, indices: jax.Array) -> jax.Array:
        """Advance the EMA state on one batch; returns how many codes were restarted."""
        z_flat = z.reshape(-1, self.codebook_dim)  # (N, codebook_dim)
        idx = indices.reshape(-1)  # (N,)
        if self.learning == "gradient":  # usage counts only, for finding dead codes
            batch = code_counts(idx, self.num_codes)
            self.counts.set_value(self.decay * self.counts.get_value() + (1 - self.decay) * batch)
            return jnp.zeros((), jnp.int32)
        counts, sums, codebook = ema_update(
            self.counts.get_value(),
            self.sums.get_value(),
            z_flat,
            idx,
            decay=self.decay,
            epsilon=self.epsilon,
        )
        restarted = jnp.zeros((), jnp.int32)
        if self.dead_code_threshold > 0 and z_flat.shape[0] > 0:  # an empty batch has no seeds
            key, sub = jax.random.split(jax.random.wrap_key_data(self.restart_key.get_value()))
            self.restart_key.set_value(jax.random.key_data(key))
            codebook, counts, sums, dead = restart_dead_codes(
                codebook, counts, sums, z_flat, sub, self.dead_code_threshold
            )
            restarted = jnp.sum(dead).astype(jnp.int32)
        if self.normalize:
            codebook = l2_normalize(codebook)
        self.counts.set_value(counts)
        self.sums.set_value(sums)
        self.codebook.set_value(codebook)
        return restarted

    def dead_codes(self, threshold: float) -> jax.Array:
        """Boolean mask (K,) of codes whose EMA usage count is under ``threshold``."""
        return self.counts.get_value() < threshold

    def init_from_batch(self, z: jax.Array, key: jax.Array, iters: int = 10) -> None:
        """k-means initialisation of the codebook (and EMA state) from encoder outputs (..., D),
        in the space of assignment (after ``project_in`` where the codes are factorised)."""
        self.check_input(z)
        z_flat = self.project(jax.lax.stop_gradient(z)).reshape(-1, self.codebook_dim)
        centres, sizes = kmeans(z_flat, self.num_codes, key, iters, self.precision)
        if self.normalize:
            centres = l2_normalize(centres)
        self.codebook.set_value(centres)
        sizes = jnp.maximum(sizes, 1.0)  # keep e = m / N exact for codes no vector chose
        self.counts.set_value(sizes)
        if self.sums is not None:
            self.sums.set_value(centres * sizes[:, None])


@dataclasses.dataclass(frozen=True)
class CodebookSettings(QuantizerConfig):
    """A learned codebook's settings: vq's, and each level's of rvq."""

    num_codes: int = 512
    beta: float = 0.25  # commitment cost
    learning: str = "ema"  # "ema" or "gradient"
    decay: float = 0.99
    epsilon: float = 1e-5
    estimator: str = "ste"  # "ste" or "rotation"
    normalize: bool = False  # cosine codes
    dead_code_threshold: float = 0.0  # EMA: re-seed codes used less than this
    precision: str = "highest"  # the assignment: "highest", "default" or "rerank"

    @property
    def vocab_size(self) -> int:
        return self.num_codes


def vq_options(q: CodebookSettings) -> dict:
    """The settings a ``VectorQuantizer`` takes as keywords (all but the codebook's size)."""
    fields = dataclasses.fields(CodebookSettings)
    return {f.name: getattr(q, f.name) for f in fields if f.name != "num_codes"}


@dataclasses.dataclass(frozen=True)
class VQConfig(CodebookSettings):
    """kind "vq": the nearest code in one learned codebook."""

    kind: ClassVar[str] = "vq"
    example: ClassVar[dict] = {"num_codes": 32}
    # factorised codes (ViT-VQGAN, LlamaGen): codes of this width under the encoder's, with
    # learned projections in and out; 0: codes of the encoder's width
    codebook_dim: int = 0

    def __post_init__(self):
        if self.codebook_dim < 0:
            raise InvalidValueError(
                f"codebook_dim must be >= 0 (0: the input's width), got {self.codebook_dim}"
            )

    def build(self, code_dim, rngs):
        return VectorQuantizer(
            self.num_codes, code_dim, codebook_dim=self.codebook_dim, rngs=rngs, **vq_options(self)
        )

    def describe(self, code_dim):
        cosine = ", cosine" if self.normalize else ""
        if self.codebook_dim:  # factorised: the stored codes' width
            return f"vq {self.num_codes} x {self.codebook_dim}{cosine} (projected from {code_dim})"
        return f"vq {self.num_codes} x {code_dim}{cosine}"
