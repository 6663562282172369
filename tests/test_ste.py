import jax
import jax.numpy as jnp
import numpy as np

from vqvae.ste import ste_quantize, ste_replace, ste_round, straight_through

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
