"""Surrogate derivatives for custom gradient estimators, and their SGD equivalence to the
straight-through estimator: research tools for the estimator study
(``notebooks/estimators.ipynb``), not used in training a tokenizer.

Each is a ``derivative`` for ``vqvae.ste.estimator(fn, derivative)``.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vqvae.errors import InvalidValueError

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
        raise InvalidValueError(f"piecewise_linear needs 0 < flat < 2, got {flat}")

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
        raise InvalidValueError(f"soft_round needs alpha > 0, got {alpha}")

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
        raise InvalidValueError("sgd_equivalence needs a derivative that is finite and positive")
    inverse = 1.0 / d
    factor = float(1.0 / inverse.mean())
    # M(k - 1/2 + t) - (k - 1/2) at the cell edges, from 0 to 1
    table = np.concatenate([[0.0], np.cumsum(inverse) / points]) * factor
    edges_j, table_j = jnp.asarray(edges, jnp.float32), jnp.asarray(table, jnp.float32)

    def weight_map(w: jax.Array) -> jax.Array:
        k = jnp.round(w)
        return (k - 0.5 + jnp.interp(w - k, edges_j, table_j)).astype(w.dtype)

    return weight_map, factor
