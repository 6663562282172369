"""Training the token prior over a trained tokenizer's token grids.

Batches are token grids: from exported shards (``tokens:PATH``), or encoded on the fly from
an image source by the tokenizer in ``config.tokenizer``. Evaluation is held-out
cross-entropy in bits per token and per image dimension.

With ``label_dropout`` each training label is dropped to unconditional at that rate (a key
drawn from the seed and the step, so a resumed run drops the same ones), which is what
classifier-free guidance needs of the model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.prior import PriorConfig, drop_labels, prior_loss
from vqvae.sources import DataError, make_source, token_manifest
from vqvae.tasks.base import Task, make_train_step
from vqvae.tokenizer import Tokenizer


class PriorTask(Task):
    kind = "prior"
    best_metric = "bits_per_token"

    def make_model_config(self) -> PriorConfig:
        self.tokenizer = tok = Tokenizer.load(self.config.tokenizer)
        # a token export's manifest alone (None for images): its shards load once, to train
        manifest = token_manifest(self.config.data.source)
        if manifest is not None and manifest["codebook"]["sha256"] != tok.codebook_sha256():
            raise DataError(
                f"{self.config.data.source} was exported with another tokenizer than "
                f"{self.config.tokenizer} (codebook checksums differ)"
            )
        return PriorConfig(
            vocab_size=tok.vocab_size,
            grid=tok.grid_shape(),
            levels=tok.num_levels,
            **self.config.model,
        )

    def loss(self, model, batch):
        return prior_loss(model, batch["tokens"], batch["label"])

    @property
    def label_dropout(self) -> float:
        rate = float(self.config.get("label_dropout", 0.0))
        if not 0 <= rate < 1:
            raise InvalidValueError(f"label_dropout must be in [0, 1), got {rate}")
        return rate

    def step_key(self, step: jax.Array) -> jax.Array:
        """The step's random key: from the seed and the step alone (resumes draw the same)."""
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def train_step(self, graphdef):
        """The loop's step, with the labels dropped at ``label_dropout`` first; the step's
        key is also passed to the loss as ``batch["key"]``."""
        inner, rate = make_train_step(graphdef, self.tx, self.loss), self.label_dropout

        def step(state, batch, consts=None):
            key = self.step_key(state["step"])
            labels = drop_labels(jax.random.fold_in(key, 0), batch["label"], rate)
            return inner(state, {**batch, "label": labels, "key": key}, consts)

        return step

    def source(self, train: bool):
        return make_source(
            self.config.data,
            image_size=self.tokenizer.image_size,
            channels=self.tokenizer.channels,
            train=train,
            seed=self.config.seed,
        )

    def host_fn(self):
        """Images -> tokens (by the tokenizer); labels the prior does not know -> -1."""
        tok, n = self.tokenizer, self.model_config.num_classes

        def to_tokens(batch: dict) -> dict:
            out = dict(batch)
            if "tokens" not in out:
                out["tokens"] = tok.encode(out.pop("image"))
            labels = out["label"]
            out["label"] = np.where((labels >= 0) & (labels < n), labels, -1).astype(np.int32)
            return out

        return to_tokens

    def eval_step(self, graphdef):
        def sums(state, batch):
            model = nnx.merge(graphdef, state["params"], state["rest"])
            tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)  # (B, L)
            logits = model(tokens, batch["label"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # (B, L)
            return {
                "nats": jnp.sum(ce * batch["weight"][:, None]),
                "examples": jnp.sum(batch["weight"]),
            }

        return sums

    def eval_finish(self, sums, state):
        m = self.model_config
        per_token = sums["nats"] / (jnp.maximum(sums["examples"], 1.0) * m.seq_len) / math.log(2)
        dims = self.tokenizer.image_size**2 * self.tokenizer.channels
        return {
            "bits_per_token": per_token,
            "bits_per_dim": per_token * m.seq_len / dims,
            "uniform_bits_per_token": jnp.float32(math.log2(m.vocab_size)),
            "examples": sums["examples"],
        }

    def eval_summary(self, metrics):
        what = "token grids" if self.config.data.source.startswith("tokens:") else "images"
        return (
            f"{metrics['bits_per_token']:.3f} bits per token (uniform "
            f"{metrics['uniform_bits_per_token']:.2f}), {metrics['bits_per_dim']:.4f} bits per "
            f"dim, over {int(metrics['examples']):,} held-out {what}"
        )

    def meta(self):
        return {**super().meta(), "tokenizer": str(self.tokenizer.workdir)}
