"""The codebook quantizer: nearest-code assignment, straight-through output, losses, EMA codebook.

The math lives in small pure functions over flat arrays (``z`` is ``(N, D)``, the codebook
``(K, D)``) so that each can be used and tested alone; ``VectorQuantizer`` wires them into a
Flax NNX module. Assignment is exact (float32, HIGHEST precision by default) and its extra
memory is bounded by a tile size, never by N x K: no distance matrix and no one-hot is built.
"""

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.ste import ste_replace

Precision = Literal["highest", "high", "default", "rerank"]
_PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
    # bfloat16 shortlist, exact float32 re-rank; with no more codes than candidates the
    # plain path runs, at float32
    "rerank": jax.lax.Precision.HIGHEST,
}
# Candidates per vector that the bfloat16 shortlist keeps for the exact re-rank.
RERANK_CANDIDATES = 4
# Largest distance tile computed at once, in elements: 2**24 float32 = 64 MiB.
DEFAULT_TILE = 2**24
# Codes are scanned in blocks of at most this many; vectors in blocks that fill the tile.
CODE_BLOCK = 4096


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scale each vector (last axis) to unit length; zero vectors stay zero."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_codes(
    z: jax.Array,
    codebook: jax.Array,
    *,
    precision: Precision = "highest",
    tile: int = DEFAULT_TILE,
    code_block: int = CODE_BLOCK,
) -> jax.Array:
    """Index of the nearest code (squared Euclidean) for every vector of ``z``.

    z: (..., D), codebook: (K, D) -> int32 (...). Vectors and codes are first centred on
    (nearly) the codebook's mean: distances do not change when both move together, and without it a
    common offset (inputs and codes near +1000, say) cancels the differences between codes
    in float32. Distances are then ``|e|^2 - 2 z.e`` (``|z|^2`` is the same for every code of
    a row), computed tile by tile with a running min/argmin, so extra memory is about
    ``tile`` floats whatever N and K are (codes are taken ``code_block`` at a time). Ties go
    to the lower index, as with ``argmin``. A vector with a NaN or infinite component gets
    code 0 (callers that must not see such input check for it: the Tokenizer raises, the
    trainer stops on a non-finite loss).

    ``precision="rerank"``: the product runs in bfloat16 and keeps the best
    ``RERANK_CANDIDATES`` codes per vector; those few are then compared exactly in float32.
    The answer differs from the exact one only where the true nearest code falls out of the
    shortlist.
    """
    if codebook.ndim != 2 or z.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"nearest_codes needs z (..., D) and codebook (K, D) with the same D; "
            f"got z {z.shape} and codebook {codebook.shape}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    lead, d = z.shape[:-1], z.shape[-1]
    z = z.reshape(-1, d).astype(jnp.float32)  # (N, D)
    e = codebook.astype(jnp.float32)  # (K, D)
    n, k = z.shape[0], e.shape[0]
    if n == 0:
        return jnp.zeros(lead, jnp.int32)
    # Same distances, no common offset. The centre keeps 8 significant bits: that removes
    # all but 0.4% of any offset, and on inputs with few significant bits (small integers,
    # say) the centred arithmetic stays exact, so exact ties still go to the lower index.
    # Vectors are centred block by block inside the kernels: no centred copy of z is made.
    centre = jnp.mean(e, axis=0).astype(jnp.bfloat16).astype(jnp.float32)  # (D,)
    ec = e - centre
    if precision == "rerank" and k > RERANK_CANDIDATES:
        idx = _shortlist_rerank(z, centre, ec, tile, code_block)
    else:
        idx = _exact(z, centre, ec, _PRECISIONS[precision], tile, code_block)
    idx = jnp.where(jnp.all(jnp.isfinite(z), axis=-1), idx, 0)  # documented, in range
    return idx.reshape(lead)


def _exact(z: jax.Array, centre, e: jax.Array, prec, tile: int, code_block: int) -> jax.Array:
    """z (N, D), centred codes e (K, D) -> (N,): blocked argmin of float32 distances."""
    e_blocks, e_sq_blocks, offsets = _code_blocks(e, tile, code_block)

    def assign_block(zb: jax.Array) -> jax.Array:  # (bn, D) -> (bn,)
        zb = zb - centre

        def scan_codes(carry, block):
            best_d, best_i = carry
            eb, eb_sq, offset = block
            dist = eb_sq[None, :] - 2.0 * jnp.dot(zb, eb.T, precision=prec)  # (bn, bk)
            i = jnp.argmin(dist, axis=1)
            m = jnp.min(dist, axis=1)
            better = m < best_d  # strict: an earlier block wins ties
            return (jnp.where(better, m, best_d), jnp.where(better, i + offset, best_i)), None

        init = (jnp.full((zb.shape[0],), jnp.inf, jnp.float32), jnp.zeros(zb.shape[0], jnp.int32))
        (_, best_i), _ = jax.lax.scan(scan_codes, init, (e_blocks, e_sq_blocks, offsets))
        return best_i

    # per vector: its distances to a block of codes and its centred copy (D floats)
    return _map_vector_blocks(assign_block, z, tile // (e_blocks.shape[1] + z.shape[1]))


def _code_blocks(e: jax.Array, tile: int, code_block: int):
    """Codes (K, D) -> blocks (Kb, bk, D), their norms (Kb, bk) and offsets (Kb,).

    Padded codes get infinite norm, so they never win.
    """
    k, d = e.shape
    bk = max(1, min(k, code_block, tile))
    kp = _ceil_to(k, bk)
    e_sq = jnp.pad(jnp.sum(e * e, axis=-1), (0, kp - k), constant_values=jnp.inf)  # (Kp,)
    e_blocks = jnp.pad(e, ((0, kp - k), (0, 0))).reshape(kp // bk, bk, d)
    offsets = jnp.arange(0, kp, bk, dtype=jnp.int32)
    return e_blocks, e_sq.reshape(kp // bk, bk), offsets


def _vector_layout(n: int, max_rows: int) -> tuple[int, int]:
    """(rows per block bn, blocks nb) with bn <= max_rows; bn * nb == n where n allows.

    The smallest block count that divides n, so that z (N, D) reshapes to (bn, nb, D) for
    free; where n has no divisor near the ideal count, n is padded up instead.
    """
    ideal = -(-n // max(1, max_rows))
    for nb in range(ideal, min(2 * ideal, n) + 1):
        if n % nb == 0:
            return n // nb, nb
    return -(-n // ideal), ideal


def _map_vector_blocks(fn, z: jax.Array, max_rows: int) -> jax.Array:
    """Apply ``fn`` ((bn, D) -> (bn,) int32) to blocks of the rows of z (N, D) -> (N,).

    Block j holds rows j, j + nb, j + 2 nb, ...: z (N, D) is viewed as (bn, nb, D) with no
    copy and block j sliced out of its middle axis, so a batch sharded along N stays spread
    over every device inside each block, and only one block is materialised at a time.
    """
    n, d = z.shape
    bn, nb = _vector_layout(n, max_rows)
    if bn * nb != n:  # no usable divisor: pad (a copy of z, the only case that makes one)
        z = jnp.pad(z, ((0, bn * nb - n), (0, 0)))
    if nb == 1:
        return fn(z)[:n]
    z3 = z.reshape(bn, nb, d)

    def body(j, out):  # out (bn, nb)
        idx = fn(jax.lax.dynamic_index_in_dim(z3, j, axis=1, keepdims=False))
        return jax.lax.dynamic_update_index_in_dim(out, idx, j, axis=1)

    out = jax.lax.fori_loop(0, nb, body, jnp.zeros((bn, nb), jnp.int32))
    return out.reshape(-1)[:n]  # row r * nb + j is z's row r * nb + j


def _shortlist_rerank(z: jax.Array, centre, e: jax.Array, tile: int, code_block: int):
    """z (N, D), centred codes e (K, D) -> (N,): bfloat16 shortlist, exact float32 choice."""
    c = RERANK_CANDIDATES
    # |e|^2 of the *rounded* codes: the shortlist then ranks exact distances between rounded
    # points, whose error 2 (e - z) . de is small exactly where it matters, near the codes.
    e_lo32 = e.astype(jnp.bfloat16).astype(jnp.float32)
    e_blocks, e_sq_blocks, offsets = _code_blocks(e_lo32, tile, code_block)
    e_lo = e_blocks.astype(jnp.bfloat16)

    def assign_block(zb: jax.Array) -> jax.Array:  # (bn, D) -> (bn,)
        zb = zb - centre
        zb_lo = zb.astype(jnp.bfloat16)

        def scan_codes(carry, block):
            best_d, best_i = carry  # (bn, c) shortlist so far
            eb, eb_sq, offset = block
            prod = jnp.dot(zb_lo, eb.T, preferred_element_type=jnp.float32)  # (bn, bk)
            dist = eb_sq[None, :] - 2.0 * prod
            neg, i = jax.lax.top_k(-dist, min(c, dist.shape[1]))
            all_d = jnp.concatenate([best_d, -neg], axis=1)
            all_i = jnp.concatenate([best_i, i.astype(jnp.int32) + offset], axis=1)
            keep_neg, pos = jax.lax.top_k(-all_d, c)
            return (-keep_neg, jnp.take_along_axis(all_i, pos, axis=1)), None

        bn = zb.shape[0]
        init = (jnp.full((bn, c), jnp.inf, jnp.float32), jnp.zeros((bn, c), jnp.int32))
        (_, cand), _ = jax.lax.scan(scan_codes, init, (e_lo, e_sq_blocks, offsets))
        cand = jnp.minimum(cand, e.shape[0] - 1)  # a padded code can only be a last resort
        exact = jnp.sum(jnp.square(zb[:, None, :] - e[cand]), axis=-1)  # (bn, c) float32
        exact = jnp.where(jnp.isnan(exact), jnp.inf, exact)
        tied = exact == jnp.min(exact, axis=1, keepdims=True)
        return jnp.min(jnp.where(tied, cand, jnp.iinfo(jnp.int32).max), axis=1)

    # per vector beside its distances: its centred copy and a bfloat16 one (2 D floats at
    # most) and its c candidate codes for the exact re-rank (c D floats)
    per_row = e_blocks.shape[1] + (c + 2) * z.shape[1]
    return _map_vector_blocks(assign_block, z, tile // per_row)


def code_counts(indices: jax.Array, num_codes: int) -> jax.Array:
    """How many vectors chose each code: int indices (...) -> float32 (K,), by segment sum."""
    flat = indices.reshape(-1)
    return jax.ops.segment_sum(jnp.ones(flat.shape, jnp.float32), flat, num_segments=num_codes)


def codebook_health(counts: jax.Array) -> dict[str, jax.Array]:
    """Perplexity, codes used, their fraction and the largest code's share, from counts (K,)."""
    total = jnp.maximum(jnp.sum(counts), 1.0)
    p = counts / total
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    used = jnp.sum(counts > 0)
    return {
        "perplexity": jnp.exp(entropy),
        "codes_used": used.astype(jnp.int32),
        "usage_fraction": used / counts.shape[0],
        "max_code_share": jnp.max(p),
    }


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


def rotation_trick(z: jax.Array, e: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Forward value ``e``; gradient to ``z`` through the rotation that carries z onto e.

    z, e: (..., D). Fifty et al. 2024: ``e = lambda R z`` with ``R`` the rotation taking
    ``z/|z|`` to ``e/|e|`` and ``lambda = |e|/|z|``, both held constant in the backward pass.
    ``R z = z - 2 r (r.z) + 2 q (u.z)`` with u, q the unit vectors and r = (u+q)/|u+q| (r = 0
    when u = -q, where that formula is the reflection that still maps u to q). Where z or e
    has (near) zero norm the gradient falls back to the identity, so it is always finite.
    """
    z_norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
    e_norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
    ok = (z_norm > eps) & (e_norm > eps)
    u = jax.lax.stop_gradient(z / jnp.where(ok, z_norm, 1.0))
    q = jax.lax.stop_gradient(e / jnp.where(ok, e_norm, 1.0))
    w = u + q
    w_norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    r = jax.lax.stop_gradient(jnp.where(w_norm > eps, w / jnp.where(w_norm > eps, w_norm, 1.0), 0))
    scale = jax.lax.stop_gradient(jnp.where(ok, e_norm / jnp.where(ok, z_norm, 1.0), 1.0))
    dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)  # noqa: E731
    rotated = scale * (z - 2.0 * r * dot(r, z) + 2.0 * q * dot(u, z))
    rotated = jnp.where(ok, rotated, z)
    return ste_replace(rotated, e)


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


def kmeans_plus_plus(z: jax.Array, num_codes: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: z (N, D) -> K starting centres (K, D), spread by squared distance."""
    n, d = z.shape

    def pick(i, carry):
        centres, d2 = carry
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        logits = jnp.where(i == 0, 0.0, logits)  # the first centre is uniform
        logits = jnp.where(jnp.all(jnp.isinf(logits)), 0.0, logits)  # all points taken
        c = z[jax.random.categorical(jax.random.fold_in(key, i), logits)]  # (D,)
        return centres.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(z - c), axis=-1))

    init = (jnp.zeros((num_codes, d), z.dtype), jnp.full((n,), jnp.inf, jnp.float32))
    centres, _ = jax.lax.fori_loop(0, num_codes, pick, init)
    return centres


def kmeans(
    z: jax.Array, num_codes: int, key: jax.Array, iters: int = 10, precision: Precision = "highest"
) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means on z (N, D) -> centres (K, D), cluster sizes (K,).

    Seeded by k-means++ with ``key``; a centre whose cluster empties keeps its place.
    """
    n = z.shape[0]
    centres = kmeans_plus_plus(z, num_codes, key)

    def step(centres, _):
        idx = nearest_codes(z, centres, precision=precision)
        sizes = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), idx, num_codes)
        sums = jax.ops.segment_sum(z, idx, num_codes)
        new = jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1.0)[:, None], centres)
        return new, sizes

    centres, sizes = jax.lax.scan(step, centres, None, length=iters)
    return centres, sizes[-1]


class Codebook(nnx.Variable):
    """A codebook learned by EMA: written in the forward pass, never by gradients."""


class CodebookStats(nnx.Variable):
    """EMA cluster counts and sums and the restart key: state, not parameters."""


class QuantizerOutput(NamedTuple):
    quantized: jax.Array  # (..., D) codes in the forward pass, straight-through gradient
    indices: jax.Array  # (...) int32
    loss: jax.Array  # commitment (+ codebook loss when the codebook is learned by gradient)
    metrics: dict[str, jax.Array]  # losses and codebook health of this batch


class VectorQuantizer(nnx.Module):
    """Codebook quantizer over inputs (..., code_dim) with a straight-through backward pass.

    learning="ema" (default) updates the codebook from running cluster statistics when called
    with ``train=True``; learning="gradient" makes it an ``nnx.Param`` trained by the codebook
    loss. estimator="ste" (default) or "rotation" picks the gradient to the encoder output.
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
        rngs: nnx.Rngs,
    ):
        if num_codes < 1:
            raise ValueError(f"num_codes must be at least 1, got {num_codes}")
        if code_dim < 1:
            raise ValueError(f"code_dim must be at least 1, got {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if beta < 0 or epsilon <= 0:
            raise ValueError(f"beta must be >= 0 and epsilon > 0, got {beta} and {epsilon}")
        if learning not in ("ema", "gradient"):
            raise ValueError(f"learning must be 'ema' or 'gradient', got {learning!r}")
        if estimator not in ("ste", "rotation"):
            raise ValueError(f"estimator must be 'ste' or 'rotation', got {estimator!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        if dead_code_threshold > 0 and learning != "ema":
            raise ValueError("dead_code_threshold needs learning='ema' (restarts edit EMA state)")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.learning, self.decay, self.epsilon = beta, learning, decay, epsilon
        self.estimator, self.normalize, self.precision = estimator, normalize, precision
        self.dead_code_threshold = dead_code_threshold

        limit = math.sqrt(3.0 / code_dim)  # unit-variance uniform, as a fan-in init
        init = jax.random.uniform(rngs.params(), (num_codes, code_dim), jnp.float32, -limit, limit)
        if normalize:
            init = l2_normalize(init)
        self.codebook = nnx.Param(init) if learning == "gradient" else Codebook(init)
        # Counts start at one per code and sums at the codes, so e = m / N holds from step 0.
        self.counts = CodebookStats(jnp.ones((num_codes,), jnp.float32))
        self.sums = CodebookStats(init) if learning == "ema" else None
        self.restart_key = CodebookStats(jax.random.key_data(rngs.params()))

    def codes(self) -> jax.Array:
        """The codebook (K, D) as used for assignment (unit vectors in cosine mode)."""
        e = self.codebook.get_value()
        return l2_normalize(e) if self.normalize else e

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors for int indices (...) -> (..., D), for decoding tokens."""
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"lookup needs integer indices, got dtype {indices.dtype}")
        return jnp.take(self.codes(), indices, axis=0)

    def _check(self, z: jax.Array) -> None:
        if z.ndim < 1 or z.shape[-1] != self.code_dim:
            raise ValueError(
                f"VectorQuantizer expects inputs (..., {self.code_dim}), got shape {z.shape}"
            )
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise TypeError(f"VectorQuantizer expects floating-point inputs, got {z.dtype}")

    def __call__(self, z: jax.Array, *, train: bool = False) -> QuantizerOutput:
        """Quantize z (..., D); with ``train=True`` also update the EMA state from this batch."""
        self._check(z)
        z = z.astype(jnp.float32)  # the quantizer always runs in float32
        if self.normalize:
            z = l2_normalize(z)
        codebook = self.codes()  # (K, D)
        indices = nearest_codes(jax.lax.stop_gradient(z), codebook, precision=self.precision)
        e = jnp.take(codebook, indices, axis=0)  # (..., D)

        # beta weighs the encoder's pull towards its code, never the codebook's update.
        commitment = self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        if self.learning == "gradient":
            codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
        else:
            codebook_loss = jnp.zeros((), jnp.float32)
        quantized = rotation_trick(z, e) if self.estimator == "rotation" else ste_replace(z, e)

        counts = code_counts(indices, self.num_codes)  # (K,)
        metrics = {"commitment_loss": commitment, "codebook_loss": codebook_loss}
        metrics |= codebook_health(counts)
        if train:
            metrics["codes_restarted"] = self._update(jax.lax.stop_gradient(z), indices)
        return QuantizerOutput(quantized, indices, commitment + codebook_loss, metrics)

    def _update(self, z: jax.Array, indices: jax.Array) -> jax.Array:
        """Advance the EMA state on one batch; returns how many codes were restarted."""
        z_flat = z.reshape(-1, self.code_dim)  # (N, D)
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
        """k-means initialisation of the codebook (and EMA state) from encoder outputs (..., D)."""
        self._check(z)
        z_flat = z.reshape(-1, self.code_dim).astype(jnp.float32)
        if self.normalize:
            z_flat = l2_normalize(z_flat)
        centres, sizes = kmeans(z_flat, self.num_codes, key, iters, self.precision)
        if self.normalize:
            centres = l2_normalize(centres)
        self.codebook.set_value(centres)
        sizes = jnp.maximum(sizes, 1.0)  # keep e = m / N exact for codes no vector chose
        self.counts.set_value(sizes)
        if self.sums is not None:
            self.sums.set_value(centres * sizes[:, None])
