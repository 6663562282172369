"""The adversarial half of the VQGAN recipe: a patch discriminator and its losses.

taming-transformers' ``VQLPIPSWithDiscriminator`` in small pure functions: the PatchGAN
discriminator (pix2pix's, with spectral, group or batch normalisation), hinge or non-saturating
losses, the adaptive weight that balances the generator's adversarial gradient against the
reconstruction's at the decoder's last layer, and LeCam regularisation (Tseng et al. 2021)
for the discriminator.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.errors import InvalidValueError

LOSSES = ("hinge", "non_saturating")
NORMS = ("spectral", "group", "batch", "none")
PADDINGS = ("same", "one")  # "one": taming's padding=1 (its stride-1 convs shrink by 1)


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm2d in training mode, as taming's discriminator runs it: the
    batch's own mean and (biased) variance normalise; with ``update`` the running
    averages move by ``momentum`` towards the batch's mean and unbiased variance (kept for
    export; the discriminator never normalises with them). Over a sharded global batch
    the statistics are the global batch's, as SyncBatchNorm's are."""

    def __init__(self, channels: int, *, momentum: float = 0.1, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones(channels, jnp.float32))
        self.bias = nnx.Param(jnp.zeros(channels, jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros(channels, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(channels, jnp.float32))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x: jax.Array, *, update: bool = False) -> jax.Array:  # (B, H, W, C)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(0, 1, 2))  # (C,)
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
        if update:
            n = xf.size // xf.shape[-1]
            m = self.momentum
            self.mean.set_value((1 - m) * self.mean.get_value() + m * mean)
            self.var.set_value((1 - m) * self.var.get_value() + m * var * n / max(n - 1, 1))
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale.get_value()
        return (y + self.bias.get_value()).astype(x.dtype)


class PatchDiscriminator(nnx.Module):
    """PatchGAN: images (B, H, W, C) in the training range -> real/fake logits (B, h, w, 1),
    one per overlapping patch.

    A 4x4 stride-2 convolution to ``channels``, ``layers`` more that halve the resolution
    and double the width (up to 8x), a stride-1 one, and a 4x4 convolution to one logit;
    LeakyReLU(0.2) between, and spectral, group or batch normalisation on the inner ones
    (normalised convolutions have no bias, as in taming's ``NLayerDiscriminator``, which
    ``norm="batch", padding="one"`` reproduces layer for layer).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        channels: int = 64,
        layers: int = 3,
        norm: str = "spectral",
        padding: str = "same",
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise InvalidValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        if padding not in PADDINGS:
            raise InvalidValueError(
                f"discriminator padding must be one of {PADDINGS}, got {padding!r}"
            )
        pad = "SAME" if padding == "same" else 1
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]  # (64, 128, 256, 512)
        strides = [2] * layers + [1]
        self.first = nnx.Conv(in_channels, widths[0], (4, 4), strides=2, padding=pad, rngs=rngs)
        convs, norms = [], []
        for cin, cout, stride in zip(widths[:-1], widths[1:], strides[1:], strict=True):
            conv = nnx.Conv(
                cin, cout, (4, 4), strides=stride, padding=pad,
                use_bias=norm in ("spectral", "none"), rngs=rngs,
            )  # fmt: skip
            if norm == "spectral":
                conv = nnx.SpectralNorm(conv, rngs=rngs)
            convs.append(conv)
            norms.append(
                nnx.GroupNorm(cout, num_groups=min(32, cout), rngs=rngs) if norm == "group"
                else BatchNorm(cout) if norm == "batch"
                else None
            )  # fmt: skip
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.last = nnx.Conv(widths[-1], 1, (4, 4), padding=pad, rngs=rngs)
        self.norm_type = norm

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``train``: the discriminator's own step (spectral norm's power iteration and
        batch norm's running averages move); the generator's step leaves them."""
        h = jax.nn.leaky_relu(self.first(x), 0.2)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = conv(h, update_stats=train) if self.norm_type == "spectral" else conv(h)
            if self.norm_type == "batch":
                h = norm(h, update=train)
            elif norm is not None:
                h = norm(h)
            h = jax.nn.leaky_relu(h, 0.2)
        return self.last(h).astype(jnp.float32)


def discriminator_loss(real: jax.Array, fake: jax.Array, loss: str) -> jax.Array:
    """The discriminator's loss on logits of real and reconstructed images.

    hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2; non-saturating:
    (mean softplus(-real) + mean softplus(fake)) / 2, the cross-entropy of sigmoid(logit).
    """
    if loss == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    if loss == "non_saturating":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))
    raise InvalidValueError(f"adversarial loss must be one of {LOSSES}, got {loss!r}")


def generator_loss(fake: jax.Array, loss: str) -> jax.Array:
    """The generator's adversarial loss on the logits of its reconstructions: hinge uses
    -mean(fake) (taming's); non-saturating mean softplus(-fake), i.e. -log sigmoid(fake)."""
    if loss == "hinge":
        return -jnp.mean(fake)
    if loss == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake))
    raise InvalidValueError(f"adversarial loss must be one of {LOSSES}, got {loss!r}")


def adaptive_weight(
    reconstruction_loss: Callable[[jax.Array], jax.Array],
    adversarial_loss: Callable[[jax.Array], jax.Array],
    output: jax.Array,
    last_layer: Callable[[jax.Array], jax.Array],
    kernel: jax.Array,
    max_weight: float = 1e4,
) -> jax.Array:
    """taming's adaptive weight: |d rec / d W| / (|d adv / d W| + 1e-4), clipped to
    [0, max_weight], with W the decoder's last layer's kernel. Held constant (no gradient).

    ``output`` is the decoder's output, ``last_layer(W) == output`` its last layer as a
    function of the kernel (the layer's input fixed), and the two losses are functions of
    the output: their gradients reach W through that one layer only, so this costs two
    small backward passes and no second pass through the model.
    """
    grad_rec = jax.grad(reconstruction_loss)(output)
    grad_adv = jax.grad(adversarial_loss)(output)
    _, to_kernel = jax.vjp(last_layer, kernel)
    (w_rec,) = to_kernel(grad_rec)
    (w_adv,) = to_kernel(grad_adv)
    weight = jnp.linalg.norm(w_rec) / (jnp.linalg.norm(w_adv) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def lecam_update(ema: jax.Array, means: jax.Array, decay) -> jax.Array:
    """The moving averages (2,) of the discriminator's mean real and fake logits, updated
    with this batch's ``means`` (2,). The caller passes ``decay`` 0 until the discriminator
    starts (and at the first step), so the averages track the logits exactly until then and
    carry no bias from their zero start (lecam-gan's ``ema_losses``)."""
    return decay * ema + (1.0 - decay) * means


def lecam_penalty(real: jax.Array, fake: jax.Array, ema_real, ema_fake) -> jax.Array:
    """LeCam regularisation: mean relu(real - ema_fake)^2 + mean relu(ema_real - fake)^2,
    with exponential moving averages of the discriminator's mean logits (already updated
    with this batch, as lecam-gan does before taking the penalty)."""
    return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(
        jnp.square(jax.nn.relu(ema_real - fake))
    )


def discriminator_objective(
    real: jax.Array, fake: jax.Array, ema: jax.Array, decay, loss_type: str, lecam_weight: float
) -> tuple[jax.Array, jax.Array]:
    """The discriminator's loss on its logits, with LeCam's penalty where weighted: ->
    (loss, the moving averages updated with this batch, which the penalty uses)."""
    means = jax.lax.stop_gradient(jnp.stack([jnp.mean(real), jnp.mean(fake)]))
    ema = lecam_update(ema, means, decay)
    loss = discriminator_loss(real, fake, loss_type)
    if lecam_weight > 0:
        loss = loss + lecam_weight * lecam_penalty(real, fake, ema[0], ema[1])
    return loss, ema
