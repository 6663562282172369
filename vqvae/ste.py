"""Straight-through primitives: forward through a discrete op, backward as the identity.

Every function here is built on one construction, ``x + stop_gradient(f(x) - x)``: its value
is ``f(x)`` and its derivative with respect to ``x`` is exactly 1, whatever ``f`` is.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Return ``g`` with ``g(x) == fn(x)`` in the forward pass and ``dg/dx == 1``.

    ``fn`` must return an array of the same shape as ``x``; it need not be differentiable.
    """

    def wrapped(x: jax.Array) -> jax.Array:
        return x + jax.lax.stop_gradient(fn(x) - x)

    return wrapped


ste_quantize = straight_through(jnp.sign)
ste_quantize.__doc__ = "Binary quantizer: forward ``sign(x)`` (so 0 maps to 0), gradient identity."

ste_round = straight_through(jnp.round)
ste_round.__doc__ = "Rounding to the nearest integer in the forward pass, gradient identity."


def ste_replace(x: jax.Array, value: jax.Array) -> jax.Array:
    """Forward ``value``, gradient identity to ``x``: the VQ straight-through output.

    The same estimator as ``x + stop_gradient(value - x)``, written ``sg(value) + (x - sg(x))``
    so that the forward value is ``value`` to the bit (``x - x`` is exactly 0), not ``value``
    up to rounding: decoding token ids then matches the model's own forward pass exactly.
    """
    return jax.lax.stop_gradient(value) + (x - jax.lax.stop_gradient(x))
