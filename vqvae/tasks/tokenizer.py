"""Training the VQ-VAE tokenizer: pixel loss over the data's variance plus the quantizer's
loss; held-out MSE, PSNR, codebook usage and dead codes; an evaluation grid."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.data import local_examples
from vqvae.logs import psnr
from vqvae.model import VQVAEConfig, to_model_range, to_uint8, vqvae_loss
from vqvae.quantizers import health, level_counts
from vqvae.tasks.base import Task

log = logging.getLogger(__name__)


class TokenizerTask(Task):
    kind = "vqvae"

    def make_model_config(self) -> VQVAEConfig:
        return VQVAEConfig.from_dict(dict(self.config.model))

    def loss(self, model, batch):
        x = to_model_range(batch["image"])  # (B, H, W, C)
        normalize = self.config.loss.normalize_by_variance
        variance = self.stats["data_variance"] if normalize else 1.0
        return vqvae_loss(model, x, train=True, data_variance=variance)

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
            return nnx.state(model, nnx.Not(nnx.Param))

        fn = jax.jit(init, out_shardings=shardings["rest"])
        rest = fn(state["params"], state["rest"], first_batch["image"])
        log.info("codebook initialised by k-means on the first batch")
        return {**state, "rest": rest}

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
            return {"squared_error": jnp.sum(err * w), "examples": jnp.sum(w), "counts": counts}

        return sums

    def eval_finish(self, sums, state):
        mse = sums["squared_error"] / jnp.maximum(sums["examples"], 1.0)  # pixels in [0, 1]
        quantizer = nnx.merge(self.graphdef(), state["params"], state["rest"]).quantizer
        usage = quantizer.usage()  # running usage (L, K), where the kind keeps one
        if usage is None:  # implicit codebooks: codes this evaluation never used
            dead = jnp.sum(sums["counts"] == 0)
        else:
            dead = jnp.sum(usage < self.config.dead_code_report_threshold)
        return {
            "mse": mse,
            "normalized_mse": mse / self.stats["data_variance"],  # the VQ-VAE paper's figure
            **health(sums["counts"]),
            "dead_codes": dead.astype(jnp.float32),
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
        return {**super().meta(), "data_variance": self.stats["data_variance"]}
