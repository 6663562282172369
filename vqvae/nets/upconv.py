"""The Sonnet decoder's 4x4 stride-2 transposed convolution, computed fast on a CPU.

XLA's CPU backend runs ``lax.conv_transpose`` as a convolution over an input dilated with
zeros, at a fraction of its rate for a plain convolution: in the ``sonnet-cifar`` train step
the 128 -> 64 layer took half the step. The same layer is one stride-1 2x2 convolution
with four outputs per channel, one per output phase, whose results are interleaved (a
"sub-pixel" convolution). Same parameters, same result up to float rounding. On other
backends ``lax.conv_transpose`` stays, since their convolution libraries run it directly.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")
_CANONICAL = contextvars.ContextVar("vqvae_upconv_canonical", default=False)


@contextlib.contextmanager
def canonical_form():
    """Trace every ``UpConv`` left to choose as ``lax.conv_transpose``, whatever the
    backend: FLOP counts trace under this, so a model's count is the same on every device."""
    token = _CANONICAL.set(True)
    try:
        yield
    finally:
        _CANONICAL.reset(token)


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """``lax.conv_transpose(x, kernel, (2, 2), "SAME")`` for a 4x4 kernel, as one conv.

    x (B, H, W, C), kernel (4, 4, C, O) -> (B, 2H, 2W, O). Output row 2a + p is
    x[a + p - 1] * k[p] + x[a + p] * k[p + 2] (p in {0, 1}), and likewise for columns: a
    2x2 window over x padded by one, with the kernel's taps of that phase.
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    k = kernel.reshape(2, 2, 2, 2, c, o)  # (u, p, v, q, C, O) = kernel[p + 2u, q + 2v]
    k = k.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c, 4 * o)  # out channels (p, q, O)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z = lax.conv_general_dilated(
        xp, k, (1, 1), "VALID", dimension_numbers=_DIMS, precision=precision
    )
    z = z.reshape(b, h + 1, w + 1, 2, 2, o)  # phase (p, q) reads z[p:p+H, q:q+W, p, q]
    rows = [jnp.stack([z[:, p : p + h, q : q + w, p, q] for q in (0, 1)], axis=3) for p in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)  # (B, H, 2, W, 2, O) -> ...


class UpConv(nnx.ConvTranspose):
    """``nnx.ConvTranspose(in, out, (4, 4), strides=2)``, with the same variables, that runs
    as a sub-pixel convolution on a CPU. ``subpixel`` forces one way (None: by backend)."""

    def __init__(
        self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, subpixel=None
    ):
        super().__init__(in_features, out_features, (4, 4), strides=2, dtype=dtype, rngs=rngs)
        self.subpixel = subpixel

    def __call__(self, x: jax.Array) -> jax.Array:
        subpixel = self.subpixel
        if subpixel is None:
            subpixel = jax.default_backend() == "cpu" and not _CANONICAL.get()
        if not subpixel:
            return super().__call__(x)
        x, kernel, bias = self.promote_dtype(
            (x, self.kernel[...], self.bias[...]), dtype=self.dtype
        )
        return subpixel_conv_transpose(x, kernel, self.precision) + bias
