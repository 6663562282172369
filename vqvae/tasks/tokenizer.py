"""Training the VQ-VAE tokenizer: pixel loss over the data's variance plus the quantizer's
loss; held-out MSE, PSNR, sharpness, codebook usage and dead codes; an evaluation grid.

As an option, the VQGAN recipe (taming-transformers): a patch discriminator whose
adversarial loss is balanced by the adaptive weight (``config.gan``), and the LPIPS
perceptual distance (``config.loss.perceptual_weight`` with ``loss.lpips_weights``).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae import adversarial
from vqvae.data import local_examples
from vqvae.errors import InvalidValueError
from vqvae.logs import psnr
from vqvae.lpips import LPIPS, load_weights
from vqvae.model import VQVAEConfig, dropout_rngs, to_model_range, to_uint8
from vqvae.quantizers import health, level_counts, level_means
from vqvae.tasks.base import Task, apply_update, make_optimizer

log = logging.getLogger(__name__)


class TokenizerTask(Task):
    kind = "vqvae"

    def __init__(self, config, arrays=None):
        super().__init__(config, arrays)
        gan = config.get("gan")
        self.gan = gan if gan is not None and gan.weight > 0 else None
        if self.gan is not None:
            if gan.loss not in adversarial.LOSSES:
                raise InvalidValueError(
                    f"gan.loss must be one of {adversarial.LOSSES}, got {gan.loss!r}"
                )
            self.disc_tx = make_optimizer(gan.optim, config.steps)
            self.disc_graphdef = nnx.graphdef(nnx.eval_shape(lambda: self.discriminator(0)))
        self.lpips = self._perceptual()
        if config.get("freeze", ""):  # decoder-only fine-tuning (vqvae.finetune)
            from vqvae.finetune import freeze_optimizer

            self.tx = freeze_optimizer(self.tx, config.freeze, self.model_config)
        pixel = config.loss.get("pixel", "mse")
        if pixel not in ("mse", "l1"):
            raise InvalidValueError(f"loss.pixel must be 'mse' or 'l1', got {pixel!r}")

    def make_model_config(self) -> VQVAEConfig:
        return VQVAEConfig.from_dict(dict(self.config.model))

    def _perceptual(self) -> LPIPS | None:
        """The LPIPS network, where asked for and a weights file is given."""
        weight = self.config.loss.get("perceptual_weight", 0.0)
        path = self.config.loss.get("lpips_weights", "")
        if weight <= 0:
            return None
        if not path:
            log.warning(
                "perceptual term off: no LPIPS weights file given (loss.lpips_weights; "
                "make one with python -m vqvae.lpips)"
            )
            return None
        if self.model_config.channels != 3:
            raise InvalidValueError("the LPIPS perceptual term needs RGB images (channels=3)")
        return LPIPS(load_weights(path))

    def discriminator(self, seed: int) -> adversarial.PatchDiscriminator:
        g = self.gan
        return adversarial.PatchDiscriminator(
            self.model_config.channels,
            channels=g.channels,
            layers=g.layers,
            norm=g.norm,
            padding=g.get("padding", "same"),
            rngs=nnx.Rngs(seed),
        )

    def init_state(self):
        state = super().init_state()
        if self.gan is not None:  # a second model and optimizer: the discriminator's
            _, params, rest = nnx.split(self.discriminator(self.config.seed + 1), nnx.Param, ...)
            state["disc"] = {
                "params": params,
                "rest": rest,
                "opt": self.disc_tx.init(params),
                "lecam": jnp.zeros(2, jnp.float32),  # EMAs of its mean real and fake logits
            }
        return state

    def constants(self):
        """The data's variance (the normalised MSE's denominator) and LPIPS's weights: data
        the step reads, passed in rather than closed over."""
        consts = {"data_variance": jnp.float32(self.stats["data_variance"])}
        if self.lpips is not None:
            consts["lpips"] = nnx.state(self.lpips)
        return consts

    def train_step(self, graphdef):
        """(state, batch, consts) -> (state, metrics): the one step for every setting. The
        generator's loss sums the pixel term (MSE over the data's variance, or L1), LPIPS
        where configured, the quantizer's loss and, with a discriminator, past
        ``gan.start_step``, the adversarial term under the adaptive weight; the
        discriminator then takes its own step on real images and the reconstructions."""
        gan, tx, cfg = self.gan, self.tx, self.config.loss
        pixel, normalize = cfg.get("pixel", "mse"), cfg.normalize_by_variance
        perceptual_weight = cfg.get("perceptual_weight", 0.0)
        lpips_graphdef = nnx.graphdef(self.lpips) if self.lpips is not None else None

        def step(state, batch, consts):
            x = to_model_range(batch["image"])
            variance = consts["data_variance"] if normalize else 1.0
            lpips = nnx.merge(lpips_graphdef, consts["lpips"]) if lpips_graphdef else None
            on = (state["step"] >= gan.start_step).astype(jnp.float32) if gan else 0.0

            def rec_loss(recon):  # every loss that compares to the input
                loss = pixel_loss(recon, x, pixel, variance)
                if lpips is not None:
                    loss = loss + perceptual_weight * jnp.mean(lpips(x, recon))
                return loss

            def gen_loss(params):
                model = nnx.merge(graphdef, params, state["rest"], copy=True)
                drop = dropout_rngs(self.config.seed, state["step"])  # where the nets have it
                q = model.quantizer(model.encode(x, rngs=drop), train=True)
                h = model.features(q.quantized, rngs=drop)  # the last layer's input
                last = model.decoder.last_layer
                recon = last(h).astype(jnp.float32)
                rec = rec_loss(recon)
                metrics = {"mse": jnp.mean(jnp.square(recon - x)), "recon_loss": rec, **q.metrics}
                total = rec + q.loss
                if gan is not None:
                    g, weight = self._adversarial(state["disc"], rec_loss, recon, h, last)
                    total = total + on * gan.weight * weight * g
                    metrics |= {"generator_loss": g, "adaptive_weight": weight}
                metrics["loss"] = total
                return total, (nnx.state(model, nnx.Not(nnx.Param)), metrics, recon)

            grads, (rest, metrics, recon) = jax.grad(gen_loss, has_aux=True)(state["params"])
            params, opt = apply_update(tx, grads, state["params"], state["opt"])
            metrics["grad_norm"] = optax.tree.norm(grads)
            new = {**state, "params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
            if gan is not None:
                new["disc"], disc_metrics = self._disc_step(state["disc"], x, recon, state["step"])
                metrics |= disc_metrics
            return new, metrics

        return step

    def _adversarial(self, disc_state, rec_loss, recon, h, last):
        """The generator's adversarial loss on ``recon`` and its adaptive weight, taken at
        the decoder's last layer (``last``, whose input is ``h``)."""
        gan = self.gan

        def adv(r):  # merged in each trace: spectral norm writes its kernel
            disc = nnx.merge(self.disc_graphdef, *_frozen(disc_state), copy=True)
            return adversarial.generator_loss(disc(r), gan.loss)

        layer, layer_state = nnx.split(last)

        def with_kernel(w):  # the last layer as a function of its kernel
            s = jax.tree_util.tree_map_with_path(
                lambda path, v: w if jax.tree_util.keystr(path).startswith("['kernel']") else v,
                layer_state,
            )
            return nnx.merge(layer, s)(h).astype(jnp.float32)

        kernel = last.kernel.get_value()
        weight = adversarial.adaptive_weight(
            rec_loss, adv, recon, with_kernel, kernel, gan.max_adaptive_weight
        )
        return adv(recon), weight

    def _disc_step(self, disc_state, x, recon, step):
        """One discriminator step on real images and (fixed) reconstructions; off (no
        update) before ``gan.start_step``. LeCam's moving averages of the mean logits are
        updated with this batch first, tracking it exactly until the discriminator starts
        (as the reference implementation does), and the penalty uses them."""
        gan = self.gan
        on = (step >= gan.start_step).astype(jnp.float32)
        decay = jnp.where((step < gan.start_step) | (step == 0), 0.0, gan.lecam_decay)

        def loss(params):
            disc = nnx.merge(self.disc_graphdef, params, disc_state["rest"], copy=True)
            real = disc(x, train=True)
            fake = disc(jax.lax.stop_gradient(recon), train=True)
            d, ema = adversarial.discriminator_objective(
                real, fake, disc_state["lecam"], decay, gan.loss, gan.lecam_weight
            )
            return on * d, (
                nnx.state(disc, nnx.Not(nnx.Param)),
                jnp.mean(real),
                jnp.mean(fake),
                ema,
                d,
            )

        grads, aux = jax.grad(loss, has_aux=True)(disc_state["params"])
        rest, real, fake, ema, d = aux
        params, opt = apply_update(self.disc_tx, grads, disc_state["params"], disc_state["opt"])
        new = {"params": params, "rest": rest, "opt": opt, "lecam": ema}
        metrics = {"disc_loss": d, "logits_real": real, "logits_fake": fake, "gan_on": on}
        return new, metrics

    def compute_stats(self, train_source, batches: int = 8, batch_size: int = 256):
        """Pixel variance of a few thousand training images, for the normalised MSE.

        Every process reads the same images, so every process gets the same figure.
        """
        n = total = total_sq = 0.0
        examples = local_examples(train_source, batch_size)
        try:
            for _, host in zip(range(batches), examples, strict=False):
                x = host["image"].astype(np.float64) / 255.0
                n, total, total_sq = n + x.size, total + x.sum(), total_sq + np.square(x).sum()
        finally:
            examples.close()
        return {"data_variance": float(total_sq / n - (total / n) ** 2)}

    def restore_stats(self, meta: dict) -> dict:
        stats = meta.get("stats") or {"data_variance": meta["data_variance"]}  # older meta
        return {"data_variance": float(stats["data_variance"])}

    def first_state(self, state, first_batch, graphdef, shardings):
        """With ``kmeans_init``: the codebook (and EMA state) from k-means on the encoder's
        outputs for the first batch."""
        if not self.config.get("kmeans_init", False):
            return state
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1)

        def init(params, rest, images):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.quantizer.init_from_batch(model.encode(to_model_range(images)), key)
            # both: a gradient-learned codebook is a parameter, an EMA one state
            return nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param))

        fn = jax.jit(init, out_shardings=(shardings["params"], shardings["rest"]))
        params, rest = fn(state["params"], state["rest"], first_batch["image"])
        log.info("codebook initialised by k-means on the first batch")
        return {**state, "params": params, "rest": rest}

    def eval_step(self, graphdef):
        def sums(state, batch):
            model = nnx.merge(graphdef, state["params"], state["rest"])
            q = model.quantizer
            x = to_model_range(batch["image"])
            out = model(x)
            w = batch["weight"]  # (B,) 1 for examples, 0 for padding
            err = jnp.mean(jnp.square(out.reconstruction - x), axis=(1, 2, 3))  # (B,)
            grid = jnp.broadcast_to(w[:, None, None], out.indices.shape[:3])  # (B, h, w)
            counts = level_counts(out.indices, q.num_levels, q.vocab_size, grid)  # (L, K)
            return {
                "squared_error": jnp.sum(err * w),
                "examples": jnp.sum(w),
                "counts": counts,
                "detail_recon": jnp.sum(high_frequency_energy(out.reconstruction) * w),
                "detail_input": jnp.sum(high_frequency_energy(x) * w),
            }

        return sums

    def eval_finish(self, sums, state):
        mse = sums["squared_error"] / jnp.maximum(sums["examples"], 1.0)  # pixels in [0, 1]
        quantizer = nnx.merge(self.graphdef(), state["params"], state["rest"]).quantizer
        usage = quantizer.usage()  # running usage (L, K), where the kind keeps one
        if usage is None:  # implicit codebooks: codes this evaluation never used
            dead = sums["counts"] == 0
        else:
            dead = usage < self.config.dead_code_report_threshold
        active = jnp.ones(dead.shape[0], bool)
        return {
            "mse": mse,
            "normalized_mse": mse / self.stats["data_variance"],  # the VQ-VAE paper's figure
            **health(sums["counts"]),
            **level_means({"dead_codes": jnp.sum(dead, axis=-1)}, active),  # like the others
            # high-frequency energy kept: 1 as sharp as the input, under 1 blurred
            "sharpness": sums["detail_recon"] / jnp.maximum(sums["detail_input"], 1e-12),
            "examples": sums["examples"],
        }

    def host_metrics(self, metrics):
        return {**metrics, "psnr": psnr(metrics["mse"])}  # of the mean MSE

    def preview(self, graphdef):
        def reconstruct(state, batch):
            model = nnx.merge(graphdef, state["params"], state["rest"])
            return to_uint8(model(to_model_range(batch["image"])).reconstruction)

        return reconstruct

    def meta(self):
        meta = {**super().meta(), "data_variance": self.stats["data_variance"]}
        if getattr(self, "init_from", None):  # set by the trainer when fine-tuning
            meta["init_from"] = self.init_from
        return meta


def pixel_loss(recon: jax.Array, x: jax.Array, pixel: str, variance=1.0) -> jax.Array:
    """The pixel term: MSE over the data's variance (the VQ-VAE paper's), or L1 (taming's)."""
    if pixel == "l1":
        return jnp.mean(jnp.abs(recon - x))
    return jnp.mean(jnp.square(recon - x)) / variance


def _frozen(disc_state: dict) -> tuple:
    """A discriminator's parameters held constant (the generator's step does not train it)
    and its other state, for ``nnx.merge``."""
    return jax.lax.stop_gradient(disc_state["params"]), disc_state["rest"]


LAPLACIAN = jnp.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency_energy(images: jax.Array) -> jax.Array:
    """Each image's mean squared response to a 3x3 Laplacian (every channel, interior
    pixels): images (B, H, W, C) -> (B,). Blur takes it down; the evaluation reports the
    reconstructions' over the originals' as ``sharpness``."""
    c = images.shape[-1]
    kernel = jnp.tile(LAPLACIAN[:, :, None, None], (1, 1, 1, c))  # (3, 3, 1, C): per channel
    response = jax.lax.conv_general_dilated(
        images.astype(jnp.float32),
        kernel,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )
    return jnp.mean(jnp.square(response), axis=(1, 2, 3))
