import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae.ste import estimator, ste_quantize, ste_replace, ste_round, straight_through
from vqvae.study.surrogates import piecewise_linear, sgd_equivalence, sigmoid_derivative, soft_round

X = jnp.array([-1.5, 0.0, 0.5, 2.0])


def test_ste_quantize_forward_is_sign_with_sign_of_zero_zero():
    np.testing.assert_array_equal(ste_quantize(X), [-1.0, 0.0, 1.0, 1.0])


def test_ste_quantize_gradient_is_identity_where_sign_has_none():
    grad = jax.grad(lambda x: ste_quantize(x).sum())(X)
    np.testing.assert_array_equal(grad, jnp.ones(4))
    plain = jax.grad(lambda x: jnp.sign(x).sum())(X)
    np.testing.assert_array_equal(plain, jnp.zeros(4))


def test_ste_round_forward_and_gradient():
    x = jnp.array([-1.6, -0.4, 0.4, 1.5, 2.7])
    np.testing.assert_array_equal(ste_round(x), jnp.round(x))
    np.testing.assert_array_equal(jax.grad(lambda x: ste_round(x).sum())(x), jnp.ones(5))


def test_straight_through_of_any_function_passes_upstream_gradient_unchanged():
    floor = straight_through(jnp.floor)
    x = jnp.linspace(-3.0, 3.0, 13)
    w = jnp.arange(13.0)
    assert jnp.array_equal(jax.jit(floor)(x), jnp.floor(x))
    np.testing.assert_array_equal(jax.grad(lambda x: (floor(x) * w).sum())(x), w)
    per_row = jax.vmap(jax.grad(lambda v: (ste_quantize(v) ** 2).sum()))(x.reshape(13, 1))
    np.testing.assert_allclose(per_row[:, 0], 2 * jnp.sign(x))  # chain rule through the forward


def test_ste_replace_forward_is_value_gradient_is_identity():
    x, v = jnp.array([0.3, -2.0]), jnp.array([1.0, 5.0])
    np.testing.assert_array_equal(ste_replace(x, v), v)
    np.testing.assert_array_equal(jax.grad(lambda x: (ste_replace(x, v) * 3).sum())(x), [3, 3])


# --- exact forward values in every dtype ----------------------------------------------------

SEED_EXAMPLE = [-1.5, 0.0, 0.5, 2.0]


def test_seed_example_ste_quantize():
    """The package's founding example: sign forward, gradient 1."""
    x = jnp.array(SEED_EXAMPLE)
    np.testing.assert_array_equal(ste_quantize(x), [-1, 0, 1, 1])
    np.testing.assert_array_equal(jax.grad(lambda v: ste_quantize(v).sum())(x), [1, 1, 1, 1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_exact_for_large_and_infinite_values(dtype):
    big = {jnp.float32: 2.0**25 + 2, jnp.bfloat16: 300.0, jnp.float16: 3000.0}[dtype]
    x = jnp.array([-jnp.inf, -big, -2.5, 0.0, 0.5, big, jnp.inf], dtype)
    for fn in (jnp.sign, jnp.round, jnp.floor):
        out = jax.jit(straight_through(fn))(x)
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(fn(x), np.float64))
    assert ste_quantize(jnp.array(300.0, jnp.bfloat16)) == 1  # the old form gave 0
    grad = jax.grad(lambda v: ste_round(v).astype(jnp.float32).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.ones(7))


def test_custom_estimator_is_exact_forward_and_scales_the_gradient():
    x = jnp.array([-jnp.inf, -1.25, 0.1, 0.4, 7.0, jnp.inf], jnp.bfloat16)
    g = estimator(jnp.round, piecewise_linear(0.5))
    np.testing.assert_array_equal(g(x), jnp.round(x))
    w = jnp.arange(1.0, 5.0, dtype=jnp.bfloat16)
    grad = jax.grad(lambda v: (g(v) * w).astype(jnp.float32).sum())(x[1:-1])
    np.testing.assert_array_equal(np.float32(grad), np.float32(w) * [1.5, 0.5, 1.5, 0.5])


# --- surrogates: their derivatives by hand and by finite differences -----------------------


def test_piecewise_linear_derivative_by_hand():
    x = jnp.array([-0.6, -0.3, -0.2, 0.0, 0.24, 0.26, 0.5, 1.1, 1.4])
    np.testing.assert_allclose(
        piecewise_linear(0.4)(x), [1.6, 1.6, 0.4, 0.4, 0.4, 1.6, 1.6, 0.4, 1.6]
    )
    with pytest.raises(ValueError, match="0 < flat < 2"):
        piecewise_linear(2.0)


def _soft_round_value(x, alpha):
    m = np.floor(x) + 0.5
    return m + np.tanh(alpha * (x - m)) / (2 * np.tanh(alpha / 2))


@pytest.mark.parametrize("alpha", [0.5, 2.0, 6.0])
def test_soft_round_derivative_against_finite_differences(alpha):
    x = np.linspace(-2.45, 2.45, 50) + 1e-3  # off the integers, where floor jumps in m
    h = 1e-5
    numeric = (_soft_round_value(x + h, alpha) - _soft_round_value(x - h, alpha)) / (2 * h)
    np.testing.assert_allclose(soft_round(alpha)(jnp.asarray(x)), numeric, rtol=1e-4, atol=1e-5)
    # it rises by exactly 1 per period, as rounding does
    np.testing.assert_allclose(_soft_round_value(1.5, alpha) - _soft_round_value(0.5, alpha), 1)


def test_sigmoid_derivative_is_the_derivative_of_the_sign_surrogate():
    x = jnp.linspace(-3.0, 3.0, 31)
    beta = 3.0
    exact = jax.vmap(jax.grad(lambda v: 2 * jax.nn.sigmoid(beta * v) - 1))(x)
    np.testing.assert_allclose(sigmoid_derivative(beta)(x), exact, rtol=1e-6)
    g = estimator(jnp.sign, sigmoid_derivative(2.0))
    np.testing.assert_array_equal(g(jnp.array([-2.0, 0.0, 3.0])), [-1, 0, 1])
    np.testing.assert_allclose(jax.grad(lambda v: g(v).sum())(jnp.array(0.0)), 1.0)


# --- the SGD weight map and learning-rate factor --------------------------------------------


def test_sgd_map_and_factor_on_the_piecewise_linear_case_by_hand():
    """d = 0.5 near integers, 1.5 near thresholds: the harmonic mean is
    1 / (0.5/0.5 + 0.5/1.5) = 0.75; M has slope 0.75/1.5 = 0.5 near thresholds and
    0.75/0.5 = 1.5 near integers, so M(-0.25) = -0.5 + 0.25 * 0.5 = -0.375, M(0) = 0."""
    weight_map, factor = sgd_equivalence(piecewise_linear(0.5))
    assert factor == pytest.approx(0.75, abs=1e-9)
    w = jnp.array([-0.5, -0.25, -0.1, 0.0, 0.25, 0.5, 1.25, 2.9, -3.2])
    want = [-0.5, -0.375, -0.15, 0.0, 0.375, 0.5, 1.375, 2.85, -3.3]
    np.testing.assert_allclose(weight_map(w), want, atol=1e-6)
    np.testing.assert_array_equal(jnp.round(weight_map(w[1:-3])), jnp.round(w[1:-3]))


def test_sgd_map_of_the_ste_is_the_identity():
    weight_map, factor = sgd_equivalence(jnp.ones_like)
    w = jnp.linspace(-3.3, 3.3, 23)
    assert factor == pytest.approx(1.0)
    np.testing.assert_allclose(weight_map(w), w, atol=1e-6)


def test_one_sgd_step_of_the_estimator_equals_the_mapped_ste_step_to_first_order():
    derivative = soft_round(3.0)
    weight_map, factor = sgd_equivalence(derivative)
    w = jnp.linspace(-2.4, 2.4, 41)
    grad_at_q = jnp.cos(jnp.arange(41.0))  # the loss's gradient at the quantized weights
    for lr in (1e-2, 1e-3):
        custom = w - lr * derivative(w) * grad_at_q
        ste = weight_map(w) - factor * lr * grad_at_q
        gap = float(jnp.max(jnp.abs(weight_map(custom) - ste)))
        assert gap < 30 * lr**2  # second order in lr
    with pytest.raises(ValueError, match="positive"):
        sgd_equivalence(lambda x: jnp.zeros_like(x))
