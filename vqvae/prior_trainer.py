"""Training the token prior with the tokenizer's trainer machinery.

The same loop, sharding, checkpoints and logging as the VQ-VAE; what differs is the model
(``vqvae.prior``), the batches (token grids: from exported shards with ``tokens:PATH``, or
encoded on the fly from an image source by the tokenizer in ``config.tokenizer``) and the
evaluation (held-out cross-entropy in bits per token and per image dimension).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae import data as data_lib
from vqvae.data import DataError
from vqvae.prior import PriorConfig, prior_loss
from vqvae.sharding import batch_sharding
from vqvae.tokenizer import Tokenizer
from vqvae.trainer import Trainer


class PriorTrainer(Trainer):
    """Trains a ``Prior`` over the token grids of a trained tokenizer."""

    kind = "prior"

    def _model_config(self) -> PriorConfig:
        self.tokenizer = Tokenizer.load(self.config.tokenizer)
        tok = self.tokenizer
        kind, _, path = self.config.data.source.partition(":")
        if kind == "tokens":  # the manifest alone: the shards are loaded once, for training
            manifest = data_lib.read_token_manifest(path)
            if manifest["codebook"]["sha256"] != tok.codebook_sha256():
                raise DataError(
                    f"{self.config.data.source} was exported with another tokenizer than "
                    f"{self.config.tokenizer} (codebook checksums differ)"
                )
        return PriorConfig(vocab_size=tok.vocab_size, grid=tok.grid_shape(), **self.config.model)

    def _data_stats(self) -> float:
        return 1.0  # no data statistics enter the prior's loss

    def loss_fn(self, _unused: float):
        return lambda model, batch: prior_loss(model, batch["tokens"], batch["label"])

    def _source(self, train: bool):
        d = self.config.data
        return data_lib.make_source(
            d.source,
            image_size=self.tokenizer.image_size,
            channels=self.tokenizer.channels,
            train=train,
            seed=self.config.seed,
            val_fraction=d.val_fraction,
            data_dir=d.get("data_dir") or None,
            download=d.get("download", False),
        )

    def _as_tokens(self, batch: dict) -> dict:
        """A host batch of images -> of tokens (encoded by the tokenizer); tokens pass as is."""
        if "tokens" in batch:
            return batch
        return {"tokens": self.tokenizer.encode(batch["image"]), "label": batch["label"]}

    def _labels(self, labels: np.ndarray) -> np.ndarray:
        """Labels the model can use: -1 (unconditional) where conditioning is off or unknown."""
        n = self.model_config.num_classes
        return np.where((labels >= 0) & (labels < n), labels, -1).astype(np.int32)

    def _train_batches(self, start: int):
        host = data_lib.host_batches(self.train_source, self.config.batch_size, start)
        fixed = (self._as_tokens(b) for b in host)
        fixed = ({**b, "label": self._labels(b["label"])} for b in fixed)
        return data_lib.to_global(fixed, batch_sharding(self.mesh))

    def _meta(self, data_variance: float) -> dict[str, Any]:
        return {**super()._meta(data_variance), "tokenizer": str(self.tokenizer.workdir)}

    def _make_eval_step(self):
        graphdef = self.graphdef

        def nats(params, rest, batch):  # summed over the batch
            model = nnx.merge(graphdef, params, rest)
            tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
            logits = model(tokens, batch["label"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # (B, L)
            return jnp.sum(ce * batch["weight"][:, None])

        return nats

    def evaluate(self, state: dict, step: int) -> dict[str, float]:
        """Held-out cross-entropy: bits per token and bits per image dimension."""
        cfg = self.config
        if not hasattr(self, "_eval_source"):
            self._prepare_eval()
        bs = cfg.eval_batch_size
        n = self._eval_source.num_examples
        total = min(cfg.eval_batches * bs, n) if cfg.eval_batches else n  # each one once
        nats_sum, count = 0.0, 0
        for host, keep in data_lib.held_out(self._eval_source, bs, total):
            host = self._as_tokens(host)
            weight = (np.arange(len(host["tokens"])) < keep).astype(np.float32)
            batch = {"tokens": host["tokens"], "label": self._labels(host["label"])}
            batch["weight"] = weight
            batch = jax.device_put(batch, batch_sharding(self.mesh))
            nats_sum += float(self._eval_step(state["params"], state["rest"], batch))
            count += keep
        m = self.model_config
        per_token = nats_sum / (count * m.seq_len) / math.log(2)
        dims = self.tokenizer.image_size**2 * self.tokenizer.channels
        return {
            "bits_per_token": per_token,
            "bits_per_dim": per_token * m.seq_len / dims,
            "uniform_bits_per_token": math.log2(m.vocab_size),
            "examples": float(count),
        }
