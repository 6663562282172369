"""Convolutional encoder and decoder: residual blocks and stride-2 levels.

One layout covers both reference nets. Per level a 4x4 stride-2 convolution halves (encoder)
or doubles (decoder) the resolution, followed by ``res_blocks`` residual blocks; a level with
none gets an activation instead. ``stem`` adds a 3x3 convolution at full resolution (image
side); ``mid_blocks`` adds a 3x3 convolution and a residual stack at the lowest resolution.
Sonnet's CIFAR net is levels (64, 128), no stem, 0 blocks per level, 2 mid blocks of hidden
width 32; the f8 tokenizer is a stem and levels (128, 256, 512) with 2 blocks each.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.nets.upconv import UpConv

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}


def _groups(channels: int) -> int:
    """The largest group count <= 32 that divides ``channels``."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


class Norm(nnx.Module):
    """GroupNorm when asked for, identity otherwise."""

    def __init__(self, channels: int, enabled: bool, dtype, *, rngs: nnx.Rngs):
        self.norm = (
            nnx.GroupNorm(channels, num_groups=_groups(channels), dtype=dtype, rngs=rngs)
            if enabled
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)


class ResBlock(nnx.Module):
    """Pre-activation residual block: x + conv1x1(act(conv3x3(act(x)))), with optional norms."""

    def __init__(self, channels, hidden, *, act, group_norm, dtype, rngs: nnx.Rngs):
        self.act = act
        self.norm1 = Norm(channels, group_norm, dtype, rngs=rngs)
        self.conv1 = nnx.Conv(channels, hidden, (3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = Norm(hidden, group_norm, dtype, rngs=rngs)
        self.conv2 = nnx.Conv(hidden, channels, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


def _stack(n, channels, hidden, act, group_norm, dtype, rngs) -> nnx.List:
    """``n`` residual blocks of width ``channels`` (hidden width: ``hidden`` or half)."""
    hidden = hidden or max(1, channels // 2)
    kw = dict(act=act, group_norm=group_norm, dtype=dtype, rngs=rngs)
    return nnx.List([ResBlock(channels, hidden, **kw) for _ in range(n)])


class Encoder(nnx.Module):
    """Images (B, H, W, C) -> continuous codes (B, H/f, W/f, code_dim), f = 2**len(levels)."""

    def __init__(
        self,
        in_channels: int,
        levels: Sequence[int],
        code_dim: int,
        *,
        res_blocks: int = 2,
        mid_blocks: int = 0,
        res_hidden: int | None = None,
        stem: bool = True,
        group_norm: bool = False,
        activation: str = "relu",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.act = ACTIVATIONS[activation]
        self.res_blocks = res_blocks
        kw = dict(dtype=dtype, rngs=rngs)
        ch = in_channels
        self.stem = nnx.Conv(ch, levels[0], (3, 3), **kw) if stem else None
        ch = levels[0] if stem else ch
        self.down, self.blocks = nnx.List(), nnx.List()
        for out in levels:
            self.down.append(nnx.Conv(ch, out, (4, 4), strides=2, **kw))
            self.blocks.append(_stack(res_blocks, out, res_hidden, self.act, group_norm, **kw))
            ch = out
        self.mid_conv = nnx.Conv(ch, ch, (3, 3), **kw) if mid_blocks else None
        self.mid = _stack(mid_blocks, ch, res_hidden, self.act, group_norm, **kw)
        self.norm_out = Norm(ch, group_norm, dtype, rngs=rngs)
        self.proj = nnx.Conv(ch, code_dim, (1, 1), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.stem is None else self.stem(x)
        for down, blocks in zip(self.down, self.blocks, strict=True):
            h = down(h)  # (B, H/2, W/2, C')
            if self.res_blocks == 0:
                h = self.act(h)
            for block in blocks:
                h = block(h)
        if self.mid_conv is not None:
            h = self.mid_conv(h)
            for block in self.mid:
                h = block(h)
        return self.proj(self.act(self.norm_out(h)))  # (B, h, w, code_dim)


class Decoder(nnx.Module):
    """Codes (B, h, w, code_dim) -> images (B, h*f, w*f, out_channels); mirrors the Encoder."""

    def __init__(
        self,
        out_channels: int,
        levels: Sequence[int],
        code_dim: int,
        *,
        res_blocks: int = 2,
        mid_blocks: int = 0,
        res_hidden: int | None = None,
        stem: bool = True,
        group_norm: bool = False,
        activation: str = "relu",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.act = ACTIVATIONS[activation]
        self.res_blocks = res_blocks
        kw = dict(dtype=dtype, rngs=rngs)
        ch = levels[-1]
        self.proj = nnx.Conv(code_dim, ch, (3, 3), **kw)
        self.mid = _stack(mid_blocks, ch, res_hidden, self.act, group_norm, **kw)
        self.mid_norm = Norm(ch, group_norm and mid_blocks > 0, dtype, rngs=rngs)
        self.blocks, self.up = nnx.List(), nnx.List()
        # With a stem, level i's transposed conv outputs levels[i] and a 3x3 conv makes the
        # image; without, it outputs the next level's width and the last one the image.
        for i in reversed(range(len(levels))):
            out = levels[i] if stem else (levels[i - 1] if i > 0 else out_channels)
            self.blocks.append(_stack(res_blocks, ch, res_hidden, self.act, group_norm, **kw))
            self.up.append(UpConv(ch, out, **kw))
            ch = out
        self.norm_out = Norm(ch, group_norm and stem, dtype, rngs=rngs)
        self.stem = nnx.Conv(ch, out_channels, (3, 3), **kw) if stem else None

    @property
    def last_layer(self) -> nnx.Module:
        """The layer that makes the image: the 3x3 convolution with a stem, else the last
        transposed convolution (the VQGAN loss balances its gradients there)."""
        return self.stem if self.stem is not None else self.up[-1]

    def features(self, z: jax.Array) -> jax.Array:
        """Codes (B, h, w, code_dim) -> the last layer's input."""
        h = self.proj(z)
        if len(self.mid):
            for block in self.mid:
                h = block(h)
            h = self.act(self.mid_norm(h))
        last = len(self.up) - 1
        for i, (blocks, up) in enumerate(zip(self.blocks, self.up, strict=True)):
            for block in blocks:
                h = block(h)
            if i == last and self.stem is None:
                return h  # the last transposed convolution makes the image
            h = up(h)  # (B, 2h, 2w, C')
            if self.res_blocks == 0 and i < last:
                h = self.act(h)
        return self.act(self.norm_out(h))  # the stem makes the image

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.last_layer(self.features(z))
