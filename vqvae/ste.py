"""Gradient estimators for discrete operations: forward through the operation, backward
through something differentiable.

The straight-through estimator (STE) passes the gradient unchanged: its value is ``f(x)``
and its derivative with respect to ``x`` is exactly 1, whatever ``f`` is. A custom estimator
(``estimator``) multiplies it by the derivative of a smooth surrogate of ``f`` instead (the
surrogates, and the SGD equivalence between them and the STE, are research tools in
``vqvae.study.surrogates``). The rotation trick (for vector quantizers) carries the
gradient through the rotation that maps an input onto its code.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def estimator(
    fn: Callable[[jax.Array], jax.Array],
    derivative: Callable[[jax.Array], jax.Array],
) -> Callable[[jax.Array], jax.Array]:
    """Return ``g`` with ``g(x) == fn(x)`` exactly and ``dg/dx == derivative(x)``.

    The custom gradient estimator: forward through the discrete ``fn``, backward as if it
    were a smooth surrogate whose derivative is ``derivative`` (the upstream gradient is
    multiplied by ``derivative(x)`` elementwise). ``fn`` must keep the shape and dtype of
    ``x``. Built with ``jax.custom_jvp``, so the forward value is ``fn(x)`` to the bit in
    every dtype, infinities included, and ``jit``, ``vmap`` and ``grad`` all apply.
    """

    @jax.custom_jvp
    def g(x):
        return fn(x)

    @g.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return fn(x), (t * derivative(x)).astype(t.dtype)

    return g


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Return ``g`` with ``g(x) == fn(x)`` in the forward pass and ``dg/dx == 1``.

    The estimator usually written ``x + stop_gradient(fn(x) - x)``; that form rounds in low
    precision (in bfloat16 ``300 + (1 - 300)`` is 0) and gives NaN at infinities, so the
    value here is ``fn(x)`` exactly. ``fn`` must keep the shape and dtype of ``x``; it need
    not be differentiable.
    """
    return estimator(fn, jnp.ones_like)


ste_quantize = straight_through(jnp.sign)
ste_quantize.__doc__ = "Binary quantizer: forward ``sign(x)`` (so 0 maps to 0), gradient identity."
ste_binary = straight_through(lambda x: jnp.where(x > 0, 1, -1).astype(x.dtype))
ste_binary.__doc__ = (
    "Two-level quantizer: forward +1 where x > 0, else -1 (0 too), gradient identity."
)

ste_round = straight_through(jnp.round)
ste_round.__doc__ = "Rounding to the nearest integer in the forward pass, gradient identity."


def ste_replace(x: jax.Array, value: jax.Array) -> jax.Array:
    """Forward ``value``, gradient identity to ``x``: the VQ straight-through output.

    The same estimator as ``x + stop_gradient(value - x)``, written ``sg(value) + (x - sg(x))``
    so that the forward value is ``value`` to the bit (``x - x`` is exactly 0), not ``value``
    up to rounding: decoding token ids then matches the model's own forward pass exactly.
    """
    return jax.lax.stop_gradient(value) + (x - jax.lax.stop_gradient(x))


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
