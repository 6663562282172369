"""Training the masked generator (``vqvae.maskgit``) over a trained tokenizer's token grids.

The same data, tokenizer checks, label handling and label dropout as the prior's task; the
loss is MaskGIT's (cross-entropy on the masked positions, mask ratios from the cosine
schedule), its key drawn from the seed and the step so a resumed run masks the same.
Evaluation: held-out bits per masked token, masks drawn from the same schedule with a fixed
key (the same masks at every evaluation, so evaluations compare).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.maskgit import MaskGITConfig, masked_cross_entropy, maskgit_loss, training_mask
from vqvae.tasks.prior import PriorTask


class MaskGITTask(PriorTask):
    kind = "maskgit"
    best_metric = "bits_per_masked_token"

    def make_model_config(self) -> MaskGITConfig:
        p = super().make_model_config()  # the tokenizer's vocabulary and grid, checked
        return MaskGITConfig(
            vocab_size=p.vocab_size, grid=p.grid, levels=p.levels, **self.config.model
        )

    def loss(self, model, batch):
        return maskgit_loss(
            model, batch["tokens"], batch["label"], jax.random.fold_in(batch["key"], 1)
        )

    def eval_step(self, graphdef):
        key = jax.random.key(self.config.seed + 1)

        def sums(state, batch):
            model = nnx.merge(graphdef, state["params"], state["rest"])
            tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)  # (B, L)
            mask = training_mask(key, *tokens.shape)
            logits = model(jnp.where(mask, model.mask_id, tokens), batch["label"])
            nats = masked_cross_entropy(logits, tokens, mask)  # (B,)
            return {"nats": jnp.sum(nats * batch["weight"]), "examples": jnp.sum(batch["weight"])}

        return sums

    def eval_finish(self, sums, state):
        bits = sums["nats"] / jnp.maximum(sums["examples"], 1.0) / math.log(2)
        return {
            "bits_per_masked_token": bits,
            "uniform_bits_per_token": jnp.float32(math.log2(self.model_config.vocab_size)),
            "examples": sums["examples"],
        }

    def eval_summary(self, metrics):
        what = "token grids" if self.config.data.source.startswith("tokens:") else "images"
        return (
            f"{metrics['bits_per_masked_token']:.3f} bits per masked token (uniform "
            f"{metrics['uniform_bits_per_token']:.2f}), over {int(metrics['examples']):,} "
            f"held-out {what}"
        )
