"""The VQ-VAE: encoder -> quantizer -> decoder, its config dataclass, presets and loss."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.nets import ACTIVATIONS, Decoder, Encoder, VQGANConfig, VQGANDecoder, VQGANEncoder
from vqvae.quantizers import QuantizerConfig, VQConfig, quantizer_from_dict

# The quantizer's fields as the model config held them before the quantizer had its own
# (checkpoints written then): old name -> VQConfig field.
_FLAT_QUANTIZER_KEYS = {
    "num_codes": "num_codes",
    "beta": "beta",
    "codebook_learning": "learning",
    "decay": "decay",
    "epsilon": "epsilon",
    "estimator": "estimator",
    "normalize_codes": "normalize",
    "dead_code_threshold": "dead_code_threshold",
    "assign_precision": "precision",
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NETS = ("sonnet", "vqgan")


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 images (B, H, W, C) -> float32 in [-0.5, 0.5], the training range."""
    return images.astype(jnp.float32) / 255.0 - 0.5


def to_uint8(x: jax.Array) -> jax.Array:
    """Training range -> uint8 images, clipped."""
    return jnp.clip(jnp.round((x + 0.5) * 255.0), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Everything needed to rebuild the model; stored in every checkpoint.

    ``net`` picks the encoder/decoder family: ``"sonnet"`` reads the fields from
    ``base_channels`` to ``activation``; ``"vqgan"`` reads its own ``vqgan`` config.
    """

    image_size: int = 32
    channels: int = 3
    net: str = "sonnet"
    vqgan: VQGANConfig = VQGANConfig()
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)  # one stride-2 level each: factor 2**len
    res_blocks: int = 0  # residual blocks per level
    mid_blocks: int = 2  # residual blocks at the lowest resolution
    res_hidden: int | None = 32  # None: half the block's width
    stem: bool = False
    group_norm: bool = False
    activation: str = "relu"
    code_dim: int = 64  # the encoder's output width, what the quantizer sees
    quantizer: QuantizerConfig = VQConfig()  # the kind's own config
    compute_dtype: str = "float32"  # "bfloat16": convolutions in bf16, parameters in f32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if not isinstance(self.quantizer, QuantizerConfig):  # a dict or a ConfigDict
            object.__setattr__(self, "quantizer", quantizer_from_dict(dict(self.quantizer)))
        if not isinstance(self.vqgan, VQGANConfig):
            object.__setattr__(self, "vqgan", _from_dict(VQGANConfig, self.vqgan, "vqgan"))
        if self.net not in NETS:
            raise InvalidValueError(f"model.net must be one of {NETS}, got {self.net!r}")
        if self.image_size % self.downsample_factor:
            raise InvalidValueError(
                f"image_size {self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} of the {self.net} net"
            )
        if self.compute_dtype not in DTYPES:
            raise InvalidValueError(f"compute_dtype must be one of {sorted(DTYPES)}")
        if self.activation not in ACTIVATIONS:
            raise InvalidValueError(f"activation must be one of {sorted(ACTIVATIONS)}")

    @property
    def downsample_factor(self) -> int:
        if self.net == "vqgan":
            return self.vqgan.downsample_factor
        return 2 ** len(self.channel_mult)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    def replace(self, **changes) -> "VQVAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples stay tuples, so configs can override them)."""
        return {**dataclasses.asdict(self), "quantizer": self.quantizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQVAEConfig":
        """From ``to_dict``'s form, or a checkpoint's older form with the (vector)
        quantizer's fields flat in the model config."""
        d = dict(d)
        flat = {_FLAT_QUANTIZER_KEYS[k]: d.pop(k) for k in list(d) if k in _FLAT_QUANTIZER_KEYS}
        if flat:
            if "quantizer" in d:
                raise InvalidValueError(
                    f"model config has both a quantizer and flat keys {sorted(flat)}"
                )
            d["quantizer"] = {"kind": "vq", **flat}
        return _from_dict(cls, d, "model")

    def build(self, rngs: nnx.Rngs) -> "VQVAE":
        return VQVAE(self, rngs=rngs)


def _from_dict(cls, d, name: str):
    """A frozen config dataclass from a dict, refusing keys it does not have."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise InvalidValueError(f"unknown {name} config keys: {sorted(unknown)}")
    return cls(**d)


def _vqgan(net: VQGANConfig, code_dim: int, quantizer: QuantizerConfig) -> VQVAEConfig:
    """A VQGAN-family model at 256 px."""
    return VQVAEConfig(
        image_size=256, net="vqgan", vqgan=net, code_dim=code_dim, quantizer=quantizer
    )


PRESETS = {
    # DeepMind Sonnet's CIFAR-10 VQ-VAE: 32x32 -> 8x8 grid, 512 x 64 codebook.
    "sonnet-cifar": VQVAEConfig(),
    # A tokenizer-sized net: 256x256 -> 32x32 grid, 16384 x 256 codebook, bf16 convolutions.
    "f8-256": VQVAEConfig(
        image_size=256,
        base_channels=128,
        channel_mult=(1, 2, 4),
        res_blocks=2,
        mid_blocks=0,
        res_hidden=None,
        stem=True,
        code_dim=256,
        quantizer=VQConfig(num_codes=16384),
        compute_dtype="bfloat16",
    ),
    # The VQGAN family at 256 px (f16: 16x16 grids), shapes equal to the released models
    # (parameter counts in tests/test_vqgan.py, read off the originals' code). Codebooks
    # are gradient-learned, as theirs are.
    # taming-transformers' ImageNet VQGANs (configs/imagenet_vqgan.yaml's net)
    "taming-f16-16384": _vqgan(VQGANConfig(), 256, VQConfig(num_codes=16384, learning="gradient")),
    "taming-f16-1024": _vqgan(VQGANConfig(), 256, VQConfig(num_codes=1024, learning="gradient")),
    # MaskGIT's ImageNet tokenizer (maskgit/configs/vqgan_config.py): no attention, average
    # pooling, 1024 x 256 codes
    "maskgit-f16-1024": _vqgan(
        VQGANConfig(
            style="maskgit",
            attn_resolutions=(),
            mid_attention=False,
            downsample="avgpool",
            quant_conv=False,
        ),
        256,
        VQConfig(num_codes=1024, learning="gradient"),
    ),
    # LlamaGen's VQ-16 and VQ-8: 16384 codes of 8 dimensions, l2-normalised (cosine search)
    "llamagen-vq16": _vqgan(
        VQGANConfig(), 8, VQConfig(num_codes=16384, learning="gradient", normalize=True)
    ),
    "llamagen-vq8": _vqgan(
        VQGANConfig(ch_mult=(1, 2, 2, 4), attn_resolutions=(32,)),
        8,
        VQConfig(num_codes=16384, learning="gradient", normalize=True),
    ),
}


DROPOUT_STREAM = 2  # folded into the seed's key (k-means init takes 1): the dropout's own


def dropout_rngs(seed: int, step: jax.Array) -> nnx.Rngs:
    """The train step's dropout stream: from the run's seed and the step alone, so a
    resumed run draws the same masks as one that never stopped."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)
    return nnx.Rngs(dropout=key)


class ModelOutput(NamedTuple):
    reconstruction: jax.Array  # (B, H, W, C) float32
    indices: jax.Array  # (B, h, w) int32, or (B, h, w, L) with L residual levels
    quantizer_loss: jax.Array
    metrics: dict[str, jax.Array]


class VQVAE(nnx.Module):
    """Encoder, quantizer (any kind; always float32) and decoder, built from the config.

    ``rngs`` (the train step's ``dropout_rngs``) turns on the nets' dropout where they have
    one (VQGAN with ``dropout`` > 0); without it, and for every other net, there is none.
    """

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        c, dtype = config, DTYPES[config.compute_dtype]
        self.has_dropout = c.net == "vqgan" and c.vqgan.dropout > 0
        if c.net == "vqgan":
            size = (c.vqgan, c.image_size)
            self.encoder = VQGANEncoder(*size, c.channels, c.code_dim, dtype=dtype, rngs=rngs)
            self.quantizer = c.quantizer.build(c.code_dim, rngs)
            self.decoder = VQGANDecoder(*size, c.channels, c.code_dim, dtype=dtype, rngs=rngs)
            return
        levels = [c.base_channels * m for m in c.channel_mult]
        net = dict(
            res_blocks=c.res_blocks,
            mid_blocks=c.mid_blocks,
            res_hidden=c.res_hidden,
            stem=c.stem,
            group_norm=c.group_norm,
            activation=c.activation,
            dtype=dtype,
            rngs=rngs,
        )
        self.encoder = Encoder(c.channels, levels, c.code_dim, **net)
        self.quantizer = c.quantizer.build(c.code_dim, rngs)
        self.decoder = Decoder(c.channels, levels, c.code_dim, **net)

    def _train(self, rngs: nnx.Rngs | None) -> dict:
        """The nets' keyword arguments: the dropout stream where they use one."""
        return {"rngs": rngs} if self.has_dropout and rngs is not None else {}

    def encode(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Images (B, H, W, C) in the training range -> continuous codes (B, h, w, D) float32."""
        return self.encoder(x, **self._train(rngs)).astype(jnp.float32)

    def decode(self, z_q: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Quantized codes (B, h, w, D) -> images (B, H, W, C) float32."""
        return self.decoder(z_q, **self._train(rngs)).astype(jnp.float32)

    def features(self, z_q: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Quantized codes -> the decoder's last layer's input (compute dtype)."""
        return self.decoder.features(z_q, **self._train(rngs))

    def encode_to_indices(self, x: jax.Array) -> jax.Array:
        """Images (B, H, W, C) -> token ids (B, h, w) int32 ((B, h, w, L) with levels)."""
        return self.quantizer(self.encode(x)).indices

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Token ids (B, h, w) ((B, h, w, l): the first l levels) -> images float32."""
        return self.decode(self.quantizer.lookup(indices))

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> ModelOutput:
        q = self.quantizer(self.encode(x, rngs=rngs), train=train)
        return ModelOutput(self.decode(q.quantized, rngs=rngs), q.indices, q.loss, q.metrics)


def vqvae_loss(
    model: VQVAE, x: jax.Array, *, train: bool, data_variance: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MSE / data_variance (the VQ-VAE paper's normalisation when given) + quantizer loss."""
    out = model(x, train=train)
    mse = jnp.mean(jnp.square(out.reconstruction - x.astype(jnp.float32)))
    recon = mse / data_variance
    loss = recon + out.quantizer_loss
    metrics = {"loss": loss, "mse": mse, "recon_loss": recon, **out.metrics}
    return loss, metrics
