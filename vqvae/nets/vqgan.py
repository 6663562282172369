"""The VQGAN encoder and decoder family (taming-transformers, LlamaGen, MaskGIT).

ResNet blocks of two 3x3 convolutions, each after GroupNorm (32 groups) and swish; a 1x1
shortcut where the width changes. One level per entry of ``ch_mult`` (width ``ch * mult``);
between levels the encoder halves the resolution and the decoder doubles it (nearest
neighbour, then a 3x3 convolution). Single-head self-attention (1x1 q/k/v/out convolutions)
follows every block of a level whose grid side is in ``attn_resolutions``, and sits between
the two middle blocks. 1x1 ``quant_conv`` / ``post_quant_conv`` map the ``z_channels``
features to the quantizer's ``code_dim`` and back.

Two block layouts (``style``):

- ``"taming"`` (taming-transformers and LlamaGen): convolutions with biases, the shortcut
  applied to the block's input, ``num_res_blocks`` blocks per encoder level and one more per
  decoder level, a 3x3 ``conv_out``, and a middle of block-attention-block.
- ``"maskgit"`` (MaskGIT's tokenizer): no biases in the blocks or the encoder's first
  convolution, the shortcut applied to the block's own output (as MaskGIT's code does), no
  attention anywhere, ``num_res_blocks`` blocks per level in both halves and a middle of
  ``num_res_blocks`` blocks, average-pool down-sampling, a 1x1 ``conv_out`` straight to
  ``code_dim`` and no quant convs.

Module names follow taming's state dict (``down[i].block[j].norm1``, ``mid.attn_1``,
``up[i].upsample.conv``, ...) so that released weights map onto them one to one.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError

STYLES = ("taming", "maskgit")
DOWNSAMPLES = ("asymmetric", "symmetric", "avgpool")
NORM_EPS = 1e-6  # taming's and LlamaGen's GroupNorm epsilon (Flax's default, MaskGIT's)


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The VQGAN net's shape; stored in the checkpoint inside the model config."""

    ch: int = 128  # the first level's width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multipliers, one level each
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # grid sides (pixels) with attention
    mid_attention: bool = True  # attention between the two middle blocks
    z_channels: int = 256  # the encoder's output width before quant_conv
    # taming's: in every res block, between the second swish and conv2; training only
    dropout: float = 0.0
    style: str = "taming"  # block layout: "taming" (also LlamaGen's) or "maskgit"
    # down-sampling: "asymmetric" (taming: zero pad bottom/right, 3x3 stride-2 conv),
    # "symmetric" (pad 1 all round), "avgpool" (MaskGIT: 2x2 average pooling)
    downsample: str = "asymmetric"
    quant_conv: bool = True  # 1x1 convs between z_channels and code_dim
    out_norm: bool = True  # the decoder's GroupNorm and swish before its last conv
    # added to the images before the encoder's first conv: 0.5 runs MaskGIT's imported weights
    # (made for [0, 1] pixels, padded with zeros) on the package's [-0.5, 0.5]
    input_offset: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.style not in STYLES:
            raise InvalidValueError(f"vqgan.style must be one of {STYLES}, got {self.style!r}")
        if self.downsample not in DOWNSAMPLES:
            raise InvalidValueError(
                f"vqgan.downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}"
            )
        if not self.ch_mult or self.num_res_blocks < 1:
            raise InvalidValueError("vqgan needs at least one level and one res block per level")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidValueError(f"vqgan.dropout must be in [0, 1), got {self.dropout}")
        if self.style == "maskgit" and (self.attn_resolutions or self.mid_attention):
            raise InvalidValueError(
                "the maskgit style has no attention: set attn_resolutions=() and "
                "mid_attention=False"
            )
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise InvalidValueError(
                    f"vqgan widths must be multiples of 32 (GroupNorm's groups), "
                    f"got ch={self.ch} x {mult}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def widths(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    def attention_sides(self, image_size: int) -> list[int]:
        """The grid side of every attention block, encoder then decoder, middle included
        (what the nets below build: one after each res block of a level in
        ``attn_resolutions``, the decoder's levels having one block more in taming)."""
        levels = len(self.ch_mult)
        sides = [image_size // 2**i for i in range(levels)]  # each level's grid side
        low = sides[-1]
        decoder_blocks = self.num_res_blocks + (1 if self.style == "taming" else 0)
        enc = [r for r in sides if r in self.attn_resolutions for _ in range(self.num_res_blocks)]
        dec = [r for r in sides if r in self.attn_resolutions for _ in range(decoder_blocks)]
        mid = [low] if self.mid_attention else []
        return enc + mid + mid + dec


def _norm(channels: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=32, epsilon=NORM_EPS, dtype=dtype, rngs=rngs)


def _conv(cin: int, cout: int, k: int, dtype, rngs, *, bias=True, stride=1, padding="SAME"):
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=padding, use_bias=bias, dtype=dtype, rngs=rngs
    )


class ResnetBlock(nnx.Module):
    """norm-swish-conv3x3 twice, plus the input (through a 1x1 conv where widths differ).
    ``style="maskgit"``: no biases, and the 1x1 conv applies to the block's output.

    ``dropout`` > 0: taming's dropout before ``conv2``, applied only when the call is given
    ``rngs`` (the train step's); a block with dropout 0 has no dropout module, so its state
    is that of a block built before dropout existed."""

    def __init__(self, cin: int, cout: int, style: str, dtype, *, dropout: float = 0.0,
                 rngs: nnx.Rngs):  # fmt: skip
        bias = style == "taming"
        self.style = style
        self.norm1 = _norm(cin, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, dtype, rngs, bias=bias)
        self.norm2 = _norm(cout, dtype, rngs)
        self.dropout = nnx.Dropout(dropout) if dropout else None  # no state: keys come per call
        self.conv2 = _conv(cout, cout, 3, dtype, rngs, bias=bias)
        if cin == cout:
            self.nin_shortcut = None
        else:
            self.nin_shortcut = _conv(cout if style == "maskgit" else cin, cout, 1, dtype, rngs,
                                      bias=bias)  # fmt: skip

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = jax.nn.silu(self.norm2(h))
        if self.dropout is not None and rngs is not None:  # training
            h = self.dropout(h, rngs=rngs)
        h = self.conv2(h)
        if self.nin_shortcut is None:
            return x + h
        return h + self.nin_shortcut(h if self.style == "maskgit" else x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head softmax attention over positions: (B, N, C) each -> (B, N, C), scaled by
    1/sqrt(C). ``jax.nn.dot_product_attention`` picks a fused kernel where the backend has
    one (cuDNN on GPU) and XLA's otherwise, whose (B, N, N) logits at a 32x32 grid are 4 MiB
    per image in float32."""
    out = jax.nn.dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :])
    return out[:, :, 0, :]  # (B, N, C)


class AttnBlock(nnx.Module):
    """x + proj_out(attention(q, k, v)) over the grid's positions, q/k/v from norm(x)."""

    def __init__(self, channels: int, dtype, *, rngs: nnx.Rngs):
        self.norm = _norm(channels, dtype, rngs)
        self.q = _conv(channels, channels, 1, dtype, rngs)
        self.k = _conv(channels, channels, 1, dtype, rngs)
        self.v = _conv(channels, channels, 1, dtype, rngs)
        self.proj_out = _conv(channels, channels, 1, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        n = self.norm(x)
        q, k, v = (f(n).reshape(b, h * w, c) for f in (self.q, self.k, self.v))  # (B, N, C)
        return x + self.proj_out(attention(q, k, v).reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Halve the resolution: a 3x3 stride-2 conv after zero padding (asymmetric: bottom and
    right by one, taming's; symmetric: one on every side), or 2x2 average pooling."""

    def __init__(self, channels: int, mode: str, dtype, *, rngs: nnx.Rngs):
        self.mode = mode
        pad = ((0, 1), (0, 1)) if mode == "asymmetric" else ((1, 1), (1, 1))
        self.conv = (
            None if mode == "avgpool" else _conv(channels, channels, 3, dtype, rngs, stride=2,
                                                 padding=pad)
        )  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nnx.Module):
    """Double the resolution: nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int, dtype, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, C)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution: res blocks (each followed by attention where asked), then the
    encoder's ``downsample`` or the decoder's ``upsample`` where there is one."""

    def __init__(self, blocks: list, attn: list, *, downsample=None, upsample=None):
        self.block, self.attn = nnx.List(blocks), nnx.List(attn)
        self.downsample, self.upsample = downsample, upsample

    def __call__(self, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        for i, block in enumerate(self.block):
            h = block(h, rngs)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, H/2, W/2, C)
        if self.upsample is not None:
            h = self.upsample(h)  # (B, 2H, 2W, C)
        return h


class Mid(nnx.Module):
    """The lowest resolution's middle: block_1, attn_1 (optional), block_2 (taming); or
    ``num_res_blocks`` plain blocks (MaskGIT)."""

    def __init__(self, blocks: list, attn):
        self.block = nnx.List(blocks)
        self.attn_1 = attn

    def __call__(self, h: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        for i, block in enumerate(self.block):
            h = block(h, rngs)
            if i == 0 and self.attn_1 is not None:
                h = self.attn_1(h)
        return h


def _block(config: VQGANConfig, cin: int, cout: int, dtype, rngs) -> ResnetBlock:
    return ResnetBlock(cin, cout, config.style, dtype, dropout=config.dropout, rngs=rngs)


def _mid(config: VQGANConfig, width: int, dtype, rngs) -> Mid:
    n = 2 if config.style == "taming" else config.num_res_blocks
    blocks = [_block(config, width, width, dtype, rngs) for _ in range(n)]
    return Mid(blocks, AttnBlock(width, dtype, rngs=rngs) if config.mid_attention else None)


class VQGANEncoder(nnx.Module):
    """Images (B, R, R, C) -> codes (B, R/f, R/f, code_dim), f = 2 ** (levels - 1)."""

    def __init__(self, config: VQGANConfig, image_size: int, in_channels: int, code_dim: int,
                 *, dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        c, widths = config, config.widths()
        self.conv_in = _conv(in_channels, c.ch, 3, dtype, rngs, bias=c.style == "taming")
        res, cin, down = image_size, c.ch, []
        for i, width in enumerate(widths):
            blocks, attn = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(_block(c, cin, width, dtype, rngs))
                cin = width
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(width, dtype, rngs=rngs))
            last = i == len(widths) - 1
            resample = None if last else Downsample(width, c.downsample, dtype, rngs=rngs)
            down.append(Level(blocks, attn, downsample=resample))
            res = res if last else res // 2
        self.down = nnx.List(down)
        self.input_offset = c.input_offset
        self.mid = _mid(c, cin, dtype, rngs)
        self.norm_out = _norm(cin, dtype, rngs)
        if c.style == "maskgit":  # straight to the codes, 1x1
            self.conv_out, self.quant_conv = _conv(cin, code_dim, 1, dtype, rngs), None
        else:
            self.conv_out = _conv(cin, c.z_channels, 3, dtype, rngs)
            self.quant_conv = (
                _conv(c.z_channels, code_dim, 1, dtype, rngs) if c.quant_conv else None
            )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``rngs``: the train step's dropout stream; None (evaluation): no dropout."""
        h = self.conv_in(x + self.input_offset if self.input_offset else x)  # (B, R, R, ch)
        for level in self.down:
            h = level(h, rngs)
        h = self.mid(h, rngs)  # (B, R/f, R/f, ch * ch_mult[-1])
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h if self.quant_conv is None else self.quant_conv(h)  # (B, R/f, R/f, code_dim)


class VQGANDecoder(nnx.Module):
    """Codes (B, r, r, code_dim) -> images (B, r f, r f, out_channels); mirrors the encoder,
    with taming's ``up`` indexed by level (``up[0]`` the full-resolution one)."""

    def __init__(self, config: VQGANConfig, image_size: int, out_channels: int, code_dim: int,
                 *, dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        c, widths = config, config.widths()
        taming = c.style == "taming"
        z = c.z_channels if taming else code_dim
        self.post_quant_conv = (
            _conv(code_dim, z, 1, dtype, rngs) if taming and c.quant_conv else None
        )
        if taming and not c.quant_conv and z != code_dim:
            raise InvalidValueError("vqgan without quant_conv needs z_channels == code_dim")
        cin = widths[-1]
        self.conv_in = _conv(z, cin, 3, dtype, rngs)
        self.mid = _mid(c, cin, dtype, rngs)
        res = image_size // c.downsample_factor
        up = [None] * len(widths)
        per_level = c.num_res_blocks + 1 if taming else c.num_res_blocks
        for i in reversed(range(len(widths))):
            blocks, attn = [], []
            for _ in range(per_level):
                blocks.append(_block(c, cin, widths[i], dtype, rngs))
                cin = widths[i]
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(cin, dtype, rngs=rngs))
            up[i] = Level(blocks, attn, upsample=Upsample(cin, dtype, rngs=rngs) if i else None)
            res = res * 2 if i else res
        self.up = nnx.List(up)
        self.norm_out = _norm(cin, dtype, rngs) if c.out_norm else None
        self.conv_out = _conv(cin, out_channels, 3, dtype, rngs)

    @property
    def last_layer(self) -> nnx.Module:
        """The convolution that makes the image (the VQGAN loss's adaptive weight is taken
        at its kernel)."""
        return self.conv_out

    def features(self, z: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Codes (B, r, r, code_dim) -> the last layer's input (B, R, R, ch * ch_mult[0]);
        ``rngs``: the train step's dropout stream (None: no dropout)."""
        h = z if self.post_quant_conv is None else self.post_quant_conv(z)
        h = self.mid(self.conv_in(h), rngs)
        for level in reversed(self.up):
            h = level(h, rngs)
        return h if self.norm_out is None else jax.nn.silu(self.norm_out(h))

    def __call__(self, z: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.conv_out(self.features(z, rngs=rngs))
