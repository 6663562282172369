"""Gradient estimators for discrete operations: forward through the operation, backward
through something differentiable.

The straight-through estimator (STE) passes the gradient unchanged: its value is ``f(x)``
and its derivative with respect to ``x`` is exactly 1, whatever ``f`` is. A custom estimator
(``estimator``) multiplies it by the derivative of a smooth surrogate of ``f`` instead; for
weight quantization under SGD, ``sgd_equivalence`` gives the weight map and learning-rate
factor under which the STE trains like it. The rotation trick (for vector quantizers)
carries the gradient through the rotation that maps an input onto its code.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


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


# Surrogate derivatives for the custom estimators of rounding (and of sign), after the
# estimators compared by Schoenbauer et al. 2024 ("Custom Gradient Estimators are
# Straight-Through Estimators in Disguise"). Each rounding surrogate has period 1 and rises
# by 1 over a period, as rounding does; its derivative is what ``estimator`` multiplies the
# upstream gradient by.


def piecewise_linear(flat: float = 0.5) -> Callable[[jax.Array], jax.Array]:
    """Derivative of a piecewise-linear surrogate of rounding: ``flat`` within 1/4 of an
    integer (where rounding is flat), ``2 - flat`` near the thresholds k + 1/2; 0 < flat < 2.
    ``flat = 1`` is the STE."""
    if not 0 < flat < 2:
        raise ValueError(f"piecewise_linear needs 0 < flat < 2, got {flat}")

    def derivative(x):
        near_integer = jnp.abs(x - jnp.round(x)) < 0.25
        return jnp.where(near_integer, flat, 2.0 - flat).astype(x.dtype)

    return derivative


def soft_round(alpha: float = 2.0) -> Callable[[jax.Array], jax.Array]:
    """Derivative of the tanh-shaped soft rounding of Agustsson & Theis 2020,
    ``s(x) = m + tanh(alpha r) / (2 tanh(alpha / 2))`` with ``m = floor(x) + 1/2`` and
    ``r = x - m``: ``alpha (1 - tanh(alpha r)^2) / (2 tanh(alpha / 2))``, steepest at the
    thresholds. alpha -> 0 is the STE; large alpha approaches rounding itself."""
    if alpha <= 0:
        raise ValueError(f"soft_round needs alpha > 0, got {alpha}")

    def derivative(x):
        r = x - jnp.floor(x) - 0.5
        return (alpha * (1 - jnp.tanh(alpha * r) ** 2) / (2 * np.tanh(alpha / 2))).astype(x.dtype)

    return derivative


def sigmoid_derivative(beta: float = 4.0) -> Callable[[jax.Array], jax.Array]:
    """For sign: the derivative of ``2 sigmoid(beta x) - 1``, i.e.
    ``2 beta sigmoid(beta x) (1 - sigmoid(beta x))``; 1 at 0 when beta = 2."""

    def derivative(x):
        s = jax.nn.sigmoid(beta * x)
        return (2 * beta * s * (1 - s)).astype(x.dtype)

    return derivative


def sgd_equivalence(
    derivative: Callable[[jax.Array], jax.Array], points: int = 4096
) -> tuple[Callable[[jax.Array], jax.Array], float]:
    """The weight map ``M`` and learning-rate factor ``a`` that make the STE train like the
    custom estimator of rounding whose backward multiplies by ``derivative`` (period 1,
    positive), under SGD at small learning rates (Schoenbauer et al. 2024).

    With the estimator, SGD moves a weight by ``-lr d(w) G`` (G the loss's gradient at the
    quantized weight); with the STE, by ``-a lr G``. A map with ``M'(w) = a / d(w)`` turns the
    first into the second to first order in lr, and it keeps the forward pass unchanged
    (``round(M(w)) == round(w)``) if it maps each rounding bin [k - 1/2, k + 1/2] onto
    itself: ``a = 1 / mean(1 / d)`` over a bin (the harmonic mean of d) and
    ``M(w) = k - 1/2 + a * integral from k - 1/2 to w of 1 / d``. So: train the STE from
    ``M(w0)`` at learning rate ``a * lr``. Weights in grid units; for a grid of step s, use
    ``s * M(w / s)`` and the same ``a``. Computed from ``derivative`` on ``points`` cells.
    """
    edges = np.linspace(-0.5, 0.5, points + 1)
    middles = (edges[:-1] + edges[1:]) / 2
    d = np.asarray(derivative(jnp.asarray(middles, jnp.float32)), np.float64)
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise ValueError("sgd_equivalence needs a derivative that is finite and positive")
    inverse = 1.0 / d
    factor = float(1.0 / inverse.mean())
    # M(k - 1/2 + t) - (k - 1/2) at the cell edges, from 0 to 1
    table = np.concatenate([[0.0], np.cumsum(inverse) / points]) * factor
    edges_j, table_j = jnp.asarray(edges, jnp.float32), jnp.asarray(table, jnp.float32)

    def weight_map(w: jax.Array) -> jax.Array:
        k = jnp.round(w)
        return (k - 0.5 + jnp.interp(w - k, edges_j, table_j)).astype(w.dtype)

    return weight_map, factor


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
