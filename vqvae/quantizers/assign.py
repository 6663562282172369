"""Nearest-code assignment and its helpers: the kernels every codebook quantizer shares.

Small pure functions over flat arrays (``z`` is ``(N, D)``, a codebook ``(K, D)``).
Assignment is exact (float32, HIGHEST precision by default) and its extra memory is bounded
by a tile size, never by N x K: no distance matrix and no one-hot is built. Codes are
counted by segment sums; k-means (with k-means++ seeding) initialises codebooks from data.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from vqvae.errors import InvalidValueError

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
        raise InvalidValueError(
            f"nearest_codes needs z (..., D) and codebook (K, D) with the same D; "
            f"got z {z.shape} and codebook {codebook.shape}"
        )
    if precision not in _PRECISIONS:
        raise InvalidValueError(
            f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}"
        )
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
