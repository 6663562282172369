from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqvae.quantizers import Codebook, CodebookStats, VectorQuantizer
from vqvae.quantizers.assign import (
    DEFAULT_TILE,
    code_counts,
    codebook_health,
    l2_normalize,
    nearest_codes,
)
from vqvae.ste import rotation_trick


def brute_force(z, codebook):
    """Float64 squared distances (N, K) and their argmin."""
    z64, e64 = np.asarray(z, np.float64), np.asarray(codebook, np.float64)
    d = ((z64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)
    return d, d.argmin(1)


def assert_nearest(z, codebook, idx, rel=1e-5):
    """Every index is the float64 argmin, or ties with it to within float32 rounding."""
    d, best = brute_force(z, codebook)
    rows = np.arange(len(best))
    gap = d[rows, idx] - d[rows, best]
    scale = (np.asarray(z, np.float64) ** 2).sum(-1) + (np.asarray(codebook) ** 2).sum(-1).max()
    assert np.all(gap <= rel * scale), f"{np.sum(gap > rel * scale)} wrong assignments"
    assert np.mean(idx == best) > 0.99  # near-ties are rare on random data


@pytest.mark.parametrize(
    "n,k,d,tile,block",
    [
        (500, 64, 16, 2**24, 4096),  # one tile
        (1001, 300, 8, 4096, 4096),  # vectors in blocks, padded
        (777, 301, 5, 256, 100),  # vectors and codes in blocks, both padded
    ],
)
def test_nearest_codes_equals_float64_brute_force(n, k, d, tile, block):
    kz, ke = jax.random.split(jax.random.key(n + k))
    z = jax.random.normal(kz, (n, d)) * 2.0 + 0.5
    codebook = jax.random.normal(ke, (k, d))
    idx = jax.jit(lambda z, e: nearest_codes(z, e, tile=tile, code_block=block))(z, codebook)
    assert idx.dtype == jnp.int32 and idx.shape == (n,)
    assert_nearest(z, codebook, np.asarray(idx))


def assert_exact(z, codebook, idx):
    """Every index is the float64 argmin, but for ties closer than float32 resolves.

    The resolution is relative to the centred problem (distances do not change when vectors
    and codes move together), so a large common offset earns no extra slack.
    """
    z64, e64 = np.asarray(z, np.float64), np.asarray(codebook, np.float64)
    centre = e64.mean(0)
    d, best = brute_force(z64 - centre, e64 - centre)
    rows = np.arange(len(best))
    gap = d[rows, idx] - d[rows, best]
    scale = ((z64 - centre) ** 2).sum(-1) + ((e64 - centre) ** 2).sum(-1).max()
    wrong = gap > 1e-6 * scale
    assert not wrong.any(), f"{wrong.sum()} of {len(idx)} assignments are wrong"


@pytest.mark.parametrize("precision", ["highest", "default", "rerank"])
@pytest.mark.parametrize("offset,d,k", [(1000.0, 16, 64), (100.0, 16, 64), (30.0, 64, 512)])
def test_a_common_offset_does_not_change_assignments(precision, offset, d, k):
    kz, ke = jax.random.split(jax.random.key(d + k))
    codebook = jax.random.normal(ke, (k, d)) + offset
    z = jax.random.normal(kz, (2048, d)) + offset
    idx = np.asarray(jax.jit(partial(nearest_codes, precision=precision))(z, codebook))
    assert_exact(z, codebook, idx)


@pytest.mark.parametrize("precision", ["highest", "rerank"])
def test_clustered_codes_and_near_ties_far_from_the_origin(precision):
    kc, ka, kn = jax.random.split(jax.random.key(5), 3)
    centres = 1000.0 + jax.random.normal(kc, (32, 8)) * 4.0  # tight pairs of codes
    codebook = jnp.repeat(centres, 2, axis=0) + 0.05 * jax.random.normal(kn, (64, 8))
    # near-ties: each vector sits just off the midpoint of two neighbouring codes, on the
    # side of the first; the gap in squared distance is 4 * 0.01 * |a|^2, far below what
    # float32 resolves at |e|^2 ~ 8e6 but clear once centred
    a = (codebook[0::2] - codebook[1::2]) / 2  # (32, 8)
    mid = (codebook[0::2] + codebook[1::2]) / 2
    z = mid + 0.01 * a
    idx = np.asarray(nearest_codes(z, codebook, precision=precision))
    assert_exact(z, codebook, idx)
    np.testing.assert_array_equal(idx, np.arange(0, 64, 2))


@pytest.mark.parametrize("precision", ["highest", "rerank"])
def test_non_finite_vectors_get_code_zero(precision):
    codebook = jax.random.normal(jax.random.key(1), (16, 8))
    z = jnp.tile(codebook[5], (4, 1)).at[1, 3].set(jnp.nan).at[2, 0].set(jnp.inf)
    np.testing.assert_array_equal(nearest_codes(z, codebook, precision=precision), [5, 0, 0, 5])


@pytest.mark.parametrize("precision", ["highest", "rerank"])
@pytest.mark.parametrize("k", [8, 4096])
def test_extra_memory_stays_within_the_tile(precision, k):
    # XLA's plan for the compiled program (no run): 262,144 vectors of D = 256 (a 256 MiB
    # input), K codes. Beside the 64 MiB tile only copies of the codebook may appear; a
    # copy of the input, or the re-rank's (N, 4, D) gather, would blow the bound.
    n, d = 262144, 256
    shapes = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((k, d), jnp.float32)
    fn = jax.jit(partial(nearest_codes, precision=precision)).lower(*shapes).compile()
    temp = fn.memory_analysis().temp_size_in_bytes
    assert temp < 4 * DEFAULT_TILE + 4 * k * d * 4 + 8 * n, f"{temp / 2**20:.0f} MiB"


def test_nearest_codes_keeps_leading_shape_accepts_bf16_and_breaks_ties_low():
    codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    z = jnp.array([[[0.9, 0.0], [0.1, 0.0]], [[2.0, 0.0], [0.5, 0.0]]], jnp.bfloat16)
    np.testing.assert_array_equal(nearest_codes(z, codebook), [[1, 0], [1, 0]])


def test_nearest_codes_faster_precision_is_an_option():
    kz, ke = jax.random.split(jax.random.key(0))
    z, e = jax.random.normal(kz, (256, 32)), jax.random.normal(ke, (128, 32))
    fast = nearest_codes(z, e, precision="default")
    _, best = brute_force(z, e)
    assert np.mean(np.asarray(fast) == best) > 0.95
    with pytest.raises(ValueError, match="precision"):
        nearest_codes(z, e, precision="fp8")


@pytest.mark.parametrize("tile,block", [(2**24, 4096), (2**12, 96)])
def test_rerank_assignment_equals_float64_brute_force(tile, block):
    kz, ke, kn = jax.random.split(jax.random.key(7), 3)
    # a hard case for low precision: far from the origin, codes in tight clusters
    centres = jax.random.normal(ke, (40, 32)) * 4.0 + 10.0
    codebook = jnp.repeat(centres, 10, axis=0) + 0.02 * jax.random.normal(kn, (400, 32))
    z = codebook[jax.random.randint(kz, (3000,), 0, 400)] + 0.02 * jax.random.normal(kz, (3000, 32))
    fn = jax.jit(lambda z, e: nearest_codes(z, e, precision="rerank", tile=tile, code_block=block))
    idx = np.asarray(fn(z, codebook))
    assert idx.dtype == np.int32 and idx.shape == (3000,)
    _, best = brute_force(z, codebook)
    assert np.mean(idx == best) >= 0.999
    lowered = np.asarray(nearest_codes(z.astype(jnp.bfloat16), codebook.astype(jnp.bfloat16)))
    assert np.mean(lowered == best) < 0.99  # bfloat16 inputs alone would not do


def test_rerank_breaks_ties_low_and_handles_tiny_codebooks():
    codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0], [1.0, 0.0], [9.0, 9.0]])
    z = jnp.array([[0.9, 0.0], [0.1, 0.0], [6.0, 6.0]])
    np.testing.assert_array_equal(nearest_codes(z, codebook, precision="rerank"), [1, 0, 3])
    small = codebook[:3]  # K <= candidates: the exact path
    np.testing.assert_array_equal(nearest_codes(z, small, precision="rerank"), [1, 0, 1])


def test_code_counts_and_health():
    idx = jnp.array([[0, 2], [2, 2]])
    counts = code_counts(idx, 4)
    np.testing.assert_array_equal(counts, [1, 0, 3, 0])
    h = codebook_health(counts)
    p = np.array([0.25, 0.75])
    np.testing.assert_allclose(h["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    assert int(h["codes_used"]) == 2 and float(h["usage_fraction"]) == 0.5
    np.testing.assert_allclose(h["max_code_share"], 0.75)
    uniform = codebook_health(jnp.full((8,), 3.0))
    np.testing.assert_allclose(uniform["perplexity"], 8.0, rtol=1e-6)


def make_vq(**kw):
    kw = {"num_codes": 16, "code_dim": 4, "rngs": nnx.Rngs(0)} | kw
    return VectorQuantizer(**kw)


def test_forward_is_nearest_code_and_gradient_is_identity():
    vq = make_vq()
    z = jax.random.normal(jax.random.key(3), (2, 3, 5, 4))
    out = vq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5)
    np.testing.assert_array_equal(out.indices, nearest_codes(z, vq.codes()))
    np.testing.assert_allclose(out.quantized, vq.codes()[out.indices], atol=1e-6)
    w = jax.random.normal(jax.random.key(4), z.shape)
    g = jax.grad(lambda z: jnp.sum(vq(z).quantized * w))(z)
    np.testing.assert_allclose(g, w, atol=1e-6)
    np.testing.assert_allclose(vq.lookup(out.indices), vq.codes()[out.indices])


def quantizer_loss_grads(beta):
    """Gradients of the quantizer's own loss w.r.t. the input and the codebook (gradient mode)."""
    vq = make_vq(learning="gradient", beta=beta)
    z = jax.random.normal(jax.random.key(5), (64, 4))
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)

    def loss(params, z):
        return nnx.merge(graphdef, params, rest)(z).loss

    gp, gz = jax.grad(loss, argnums=(0, 1))(params, z)
    e = vq.codes()[vq(z).indices]
    return gz, gp["codebook"].get_value(), z, e


def test_beta_weighs_the_commitment_term_on_the_encoder_not_the_codebook():
    gz1, gcode1, z, e = quantizer_loss_grads(beta=1.0)
    gz025, gcode025, _, _ = quantizer_loss_grads(beta=0.25)
    np.testing.assert_allclose(gz025, 2 * 0.25 * (z - e) / z.size, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gz025, 0.25 * gz1, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gcode025, gcode1, rtol=1e-6)  # beta never reaches the codebook
    assert float(jnp.abs(gcode1).sum()) > 0


def test_codebook_lives_outside_parameters_in_ema_mode_and_inside_in_gradient_mode():
    ema = make_vq()
    assert len(nnx.state(ema, nnx.Param)) == 0
    assert isinstance(ema.codebook, Codebook) and isinstance(ema.counts, CodebookStats)
    grads = nnx.grad(lambda m, z: m(z, train=True).loss)(ema, jnp.ones((8, 4)))
    assert len(jax.tree.leaves(grads)) == 0
    grad_mode = make_vq(learning="gradient")
    assert set(nnx.state(grad_mode, nnx.Param).keys()) == {"codebook"}


def numpy_ema_reference(codebook, batches, decay, eps):
    """The EMA formula step by step in float64 NumPy: counts, sums, codebook after each batch."""
    k = codebook.shape[0]
    counts, sums, e = np.ones(k), codebook.astype(np.float64).copy(), codebook.astype(np.float64)
    history = []
    for z in batches:
        _, idx = brute_force(z, e)
        n = np.bincount(idx, minlength=k)
        s = np.zeros_like(sums)
        np.add.at(s, idx, z)
        counts = decay * counts + (1 - decay) * n
        sums = decay * sums + (1 - decay) * s
        total = counts.sum()
        e = sums / ((counts + eps) / (total + k * eps) * total)[:, None]
        history.append((counts.copy(), sums.copy(), e.copy()))
    return history


def test_ema_update_equals_numpy_reference_step_for_step():
    decay, eps = 0.9, 1e-5
    vq = make_vq(num_codes=8, code_dim=3, decay=decay, epsilon=eps)
    batches = [np.asarray(jax.random.normal(jax.random.key(i), (50, 3))) for i in range(5)]
    ref = numpy_ema_reference(np.asarray(vq.codes()), batches, decay, eps)
    for z, (counts, sums, e) in zip(batches, ref, strict=True):
        vq(jnp.asarray(z), train=True)
        np.testing.assert_allclose(vq.counts.get_value(), counts, rtol=1e-5)
        np.testing.assert_allclose(vq.sums.get_value(), sums, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vq.codes(), e, rtol=1e-4, atol=1e-5)


def test_eval_call_leaves_state_alone():
    vq = make_vq()
    before = jax.tree.map(np.asarray, nnx.state(vq))
    vq(jax.random.normal(jax.random.key(0), (32, 4)))
    after = jax.tree.map(np.asarray, nnx.state(vq))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_sharded_ema_update_equals_single_device():
    assert jax.device_count() == 8, "conftest sets 8 CPU devices"
    vq = make_vq(num_codes=32, code_dim=8, dead_code_threshold=0.9)
    vq.counts.set_value(jnp.linspace(0.5, 2.0, 32))  # some codes die: restarts run too
    graphdef, state = nnx.split(vq)
    z = jax.random.normal(jax.random.key(7), (64, 10, 8))

    @jax.jit
    def step(state, z):
        model = nnx.merge(graphdef, state)
        out = model(z, train=True)
        return nnx.state(model), out.metrics

    single_state, single_metrics = step(state, z)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    z_sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
    assert len(z_sharded.addressable_shards) == 8
    assert z_sharded.addressable_shards[0].data.shape == (8, 10, 8)
    state_rep = jax.device_put(state, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        sharded_state, sharded_metrics = step(state_rep, z_sharded)
    for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(sharded_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for key in ("perplexity", "codes_used", "codes_restarted"):
        np.testing.assert_allclose(single_metrics[key], sharded_metrics[key], rtol=1e-5)
    assert int(sharded_metrics["codes_restarted"]) > 0
    # Usage is counted over the global batch, not one device's shard.
    global_used = len(np.unique(np.asarray(nearest_codes(z, vq.codes()))))
    assert int(sharded_metrics["codes_used"]) == global_used > 10


def test_dead_code_restart_reseeds_exactly_the_dead_codes_deterministically():
    threshold, decay = 0.5, 0.9
    z = jax.random.normal(jax.random.key(11), (40, 4)) + 3.0  # far from most initial codes

    def run(seed):
        vq = make_vq(decay=decay, dead_code_threshold=threshold, rngs=nnx.Rngs(seed))
        vq.counts.set_value(jnp.linspace(0.0, 1.2, 16))  # some codes are dying already
        plain = make_vq(decay=decay, rngs=nnx.Rngs(seed))
        plain.counts.set_value(vq.counts.get_value())
        out = vq(z, train=True)
        plain(z, train=True)
        return vq, plain, out

    vq, plain, out = run(0)
    dead = np.asarray(plain.counts.get_value()) < threshold
    assert 0 < dead.sum() < 16
    assert int(out.metrics["codes_restarted"]) == dead.sum()
    new, ref = np.asarray(vq.codes()), np.asarray(plain.codes())
    np.testing.assert_allclose(new[~dead], ref[~dead], rtol=1e-6)  # live codes untouched
    zs = np.asarray(z)
    for row in new[dead]:  # every dead code is now one of the batch's vectors
        assert np.min(np.abs(zs - row).sum(1)) < 1e-6
    np.testing.assert_allclose(vq.counts.get_value()[dead], threshold)
    np.testing.assert_array_equal(np.asarray(vq.dead_codes(threshold)), np.zeros(16, bool))
    again, _, _ = run(0)
    np.testing.assert_array_equal(np.asarray(again.codes()), new)


def test_an_empty_batch_trains_without_restarting_codes():
    vq = make_vq(dead_code_threshold=0.5)
    vq.counts.set_value(jnp.zeros(16))  # every code is dead
    out = vq(jnp.zeros((0, 4)), train=True)
    assert out.indices.shape == (0,) and int(out.metrics["codes_restarted"]) == 0


def test_counts_over_time_find_codes_no_vector_uses():
    vq = make_vq(num_codes=8, code_dim=2, decay=0.5)
    vq.codebook.set_value(jnp.array([[i, 0.0] for i in range(8)]))
    vq.sums.set_value(vq.codebook.get_value())
    z = jnp.array([[0.0, 0.1], [1.0, 0.1], [2.0, -0.1], [3.0, 0.0]] * 4)  # only codes 0..3
    for _ in range(10):
        vq(z, train=True)
    np.testing.assert_array_equal(vq.dead_codes(0.01), [False] * 4 + [True] * 4)


def test_kmeans_init_finds_the_clusters():
    centres = jax.random.normal(jax.random.key(0), (8, 6)) * 10
    labels = jax.random.randint(jax.random.key(1), (800,), 0, 8)
    z = centres[labels] + 0.1 * jax.random.normal(jax.random.key(2), (800, 6))
    vq = make_vq(num_codes=8, code_dim=6)
    err_before = float(jnp.mean((z - vq(z).quantized) ** 2))
    vq.init_from_batch(z, jax.random.key(3), iters=20)
    err_after = float(jnp.mean((z - vq(z).quantized) ** 2))
    assert err_after < 0.05 < err_before
    np.testing.assert_allclose(vq.counts.get_value().sum(), 800, rtol=1e-5)
    np.testing.assert_allclose(
        vq.sums.get_value() / vq.counts.get_value()[:, None], vq.codes(), rtol=1e-6
    )


def test_rotation_trick_forward_equals_ste_and_gradient_is_a_finite_rotation():
    vq_ste, vq_rot = make_vq(), make_vq(estimator="rotation")
    z = jax.random.normal(jax.random.key(3), (64, 4))
    np.testing.assert_array_equal(vq_rot(z).quantized, vq_ste(z).quantized)
    w = jax.random.normal(jax.random.key(4), z.shape)
    g_ste = jax.grad(lambda z: jnp.sum(vq_ste(z).quantized * w))(z)
    g_rot = jax.grad(lambda z: jnp.sum(vq_rot(z).quantized * w))(z)
    assert np.all(np.isfinite(g_rot)) and not np.allclose(g_rot, g_ste, atol=1e-3)
    # Rotation and rescaling: each row's gradient has norm |w| * |e| / |z|.
    e = vq_rot.codes()[vq_rot(z).indices]
    ratio = np.linalg.norm(e, axis=1) / np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(
        np.linalg.norm(g_rot, axis=1), ratio * np.linalg.norm(w, axis=1), rtol=1e-4
    )


def test_rotation_trick_exact_cases_and_zero_norms():
    w = jnp.array([[0.3, -0.7], [0.3, -0.7], [0.3, -0.7], [0.3, -0.7]])
    z = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    e = jnp.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    out = rotation_trick(z, e)
    np.testing.assert_array_equal(out, e)
    g = jax.grad(lambda z: jnp.sum(rotation_trick(z, e) * w))(z)
    np.testing.assert_allclose(g[0], 2.0 * w[0])  # parallel: rescaling only
    np.testing.assert_allclose(g[1], [-0.3, -0.7])  # opposite: the reflection x -> -x
    np.testing.assert_allclose(g[2:], w[2:])  # zero-norm input or code: identity, finite


def test_cosine_mode_uses_unit_vectors_and_cosine_similarity():
    vq = make_vq(normalize=True)
    z = jax.random.normal(jax.random.key(8), (100, 4)) * 5
    out = vq(z, train=True)
    np.testing.assert_allclose(np.linalg.norm(out.quantized, axis=-1), 1.0, rtol=1e-5)
    codes_before = make_vq(normalize=True).codes()
    cos = np.asarray(l2_normalize(z) @ codes_before.T)
    np.testing.assert_array_equal(out.indices, cos.argmax(1))
    np.testing.assert_allclose(np.linalg.norm(vq.codes(), axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,call,exc,match",
    [
        ({}, lambda vq: vq(jnp.ones((3, 5))), ValueError, r"expects inputs \(\.\.\., 4\)"),
        ({}, lambda vq: vq(jnp.ones((3, 4), jnp.int32)), TypeError, "floating-point"),
        ({}, lambda vq: vq.lookup(jnp.ones((3,))), TypeError, "integer indices"),
        ({"num_codes": 0}, None, ValueError, "num_codes must be at least 1"),
        ({"decay": 1.0}, None, ValueError, r"decay must be in \[0, 1\)"),
        ({"decay": -0.1}, None, ValueError, r"decay must be in \[0, 1\)"),
        ({"estimator": "gumbel"}, None, ValueError, "estimator"),
        ({"learning": "gradient", "dead_code_threshold": 1.0}, None, ValueError, "needs"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, call, exc, match):
    with pytest.raises(exc, match=match):
        vq = make_vq(**kwargs)
        call(vq)
