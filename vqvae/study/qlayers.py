"""Layers with quantized weights, for studying gradient estimators (notebooks/estimators).

The weights are kept in float ("latent" weights) and quantized in every forward pass to a
uniform grid: ``scale * clip(round(w / scale), -2^(bits-1), 2^(bits-1) - 1)``. The gradient
to the latent weights comes from an estimator of that rounding (``vqvae.ste``): the STE by
default, or a custom one given by its surrogate's derivative (in grid units).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.ste import estimator


def uniform_quantizer(
    bits: int, derivative: Callable[[jax.Array], jax.Array] | None = None
) -> Callable[[jax.Array], jax.Array]:
    """u (grid units) -> the nearest of the 2^bits integers in [-2^(bits-1), 2^(bits-1) - 1],
    with the gradient ``derivative(u)`` (the STE's 1 when None)."""
    if bits < 1:
        raise InvalidValueError(f"bits must be at least 1, got {bits}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return estimator(lambda u: jnp.clip(jnp.round(u), lo, hi), derivative or jnp.ones_like)


class QuantizedLinear(nnx.Module):
    """Dense layer x (..., in) -> (..., out) whose kernel is quantized in the forward pass;
    the bias stays in float."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        scale: float,
        derivative: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.scale, self.quantize = scale, uniform_quantizer(bits, derivative)

    def quantized_kernel(self) -> jax.Array:
        return self.scale * self.quantize(self.kernel.get_value() / self.scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.quantized_kernel() + self.bias.get_value()


class QuantizedConv(nnx.Module):
    """2-D convolution x (B, H, W, in) -> (B, H', W', out), "SAME" padding, whose kernel
    (kh, kw, in, out) is quantized in the forward pass; the bias stays in float."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, int] = (3, 3),
        *,
        strides: int = 1,
        bits: int,
        scale: float,
        derivative: Callable[[jax.Array], jax.Array] | None = None,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.strides = strides
        self.scale, self.quantize = scale, uniform_quantizer(bits, derivative)

    def quantized_kernel(self) -> jax.Array:
        return self.scale * self.quantize(self.kernel.get_value() / self.scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x,
            self.quantized_kernel(),
            (self.strides, self.strides),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias.get_value()
