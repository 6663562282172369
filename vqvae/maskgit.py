"""A MaskGIT-style masked generator: a bidirectional transformer over token grids.

Training (MaskGIT, Chang et al. 2022): per example, a mask ratio ``r = cos(pi/2 * u)``
with ``u ~ U[0, 1)``; ``ceil(r * L)`` positions, chosen at random, are replaced by the mask
token, and the cross-entropy is taken on those positions only. The sequence is the class
token (one per class, plus an unconditional one) followed by the L = h*w*levels tokens in
the prior's order; labels dropped at a rate train the unconditional token for guidance.

Decoding: T parallel steps from an all-masked grid. Step t samples every masked position,
keeps the masked ones' samples ranked by confidence (log-probability plus Gumbel noise of
weight ``choice_temperature * (1 - t/T)``, annealed as in MaskGIT) and masks again exactly
``decode_schedule(L, T)[t]`` of the newly sampled ones; a kept token is never masked again.
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.prior import Block, GridModelConfig, cfg_scale_at, guide, pick


@dataclasses.dataclass(frozen=True)
class MaskGITConfig(GridModelConfig):
    """Everything needed to rebuild the masked generator; stored in its checkpoints."""

    what: ClassVar[str] = "masked generator"

    def build(self, rngs: nnx.Rngs) -> "MaskGIT":
        return MaskGIT(self, rngs=rngs)


class MaskGIT(nnx.Module):
    """Logits for every position of a partly masked grid, given a class token."""

    def __init__(self, config: MaskGITConfig, *, rngs: nnx.Rngs):
        c = config
        self.vocab_size, self.seq_len, self.num_classes = c.vocab_size, c.seq_len, c.num_classes
        self.mask_id = c.vocab_size
        # rows: the vocabulary, the mask token, the unconditional class token, the classes
        self.embed = nnx.Embed(c.vocab_size + 2 + c.num_classes, c.width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.seq_len + 1, c.width)))
        blocks = [Block(c.width, c.heads, c.mlp_ratio, rngs=rngs) for _ in range(c.depth)]
        self.blocks = nnx.List(blocks)
        self.norm = nnx.LayerNorm(c.width, rngs=rngs)
        self.head = nnx.Linear(c.width, c.vocab_size, rngs=rngs)

    def check_labels(self, labels) -> None:
        """A clear error for labels out of range (concrete labels only, as the prior's)."""
        if isinstance(labels, jax.core.Tracer):
            return
        labels = np.asarray(labels)
        bad = labels[(labels < -1) | (labels >= max(self.num_classes, 0))]
        bad = bad[bad != -1]
        if bad.size:
            raise InvalidValueError(
                f"class label {int(bad[0])} is out of range: this generator knows "
                f"{self.num_classes} classes (-1: unconditional)"
            )

    def class_tokens(self, labels: jax.Array) -> jax.Array:
        """labels (B,) (-1: none) -> class token ids (B,)."""
        self.check_labels(labels)
        uncond = self.vocab_size + 1
        if self.num_classes == 0:
            return jnp.full(labels.shape, uncond, jnp.int32)
        return jnp.where(labels >= 0, uncond + 1 + labels, uncond).astype(jnp.int32)

    def __call__(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """tokens (B, L) int (``mask_id`` where masked), labels (B,) -> logits (B, L, V)."""
        inputs = jnp.concatenate([self.class_tokens(labels)[:, None], tokens], axis=1)
        x = self.embed(inputs) + self.pos[...]  # (B, L + 1, W)
        for block in self.blocks:
            x = block(x, causal=False)
        return self.head(self.norm(x[:, 1:])).astype(jnp.float32)


def mask_ratio(u: jax.Array) -> jax.Array:
    """MaskGIT's cosine schedule: the share of masked tokens at u in [0, 1]."""
    return jnp.cos(0.5 * math.pi * u)


def training_mask(key: jax.Array, batch: int, length: int) -> jax.Array:
    """A bool (B, L) mask: per example ``ceil(cos(pi/2 * u) * L)`` (at least 1) positions,
    chosen uniformly, with u ~ U[0, 1)."""
    k_ratio, k_pos = jax.random.split(key)
    u = jax.random.uniform(k_ratio, (batch,))
    return mask_from(u, jax.random.uniform(k_pos, (batch, length)))


def mask_from(u: jax.Array, scores: jax.Array) -> jax.Array:
    """The mask for ratios drawn at u (B,): the ``n = ceil(r * L)`` positions of lowest
    ``scores`` (B, L) are masked (a uniform score makes a uniform choice of n)."""
    length = scores.shape[1]
    n = jnp.clip(jnp.ceil(mask_ratio(u) * length), 1, length).astype(jnp.int32)  # (B,)
    rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)  # each position's rank (B, L)
    return rank < n[:, None]


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example mean cross-entropy (nats) over the masked positions: (B,)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # (B, L)
    return jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)


def maskgit_loss(model: MaskGIT, tokens: jax.Array, labels: jax.Array, key: jax.Array):
    """Mean over examples of the cross-entropy on masked positions, nats; tokens (B, ...)."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    mask = training_mask(key, *tokens.shape)
    logits = model(jnp.where(mask, model.mask_id, tokens), labels)
    nats = masked_cross_entropy(logits, tokens, mask).mean()
    return nats, {"loss": nats, "bits_per_masked_token": nats / math.log(2)}


def decode_schedule(length: int, steps: int) -> np.ndarray:
    """How many tokens stay masked after each of ``steps`` decoding steps: (steps,) int,
    ``floor(L * cos(pi/2 * t/T))`` kept strictly falling (each step unmasks at least one)
    and 0 after the last."""
    if not 1 <= steps <= length:
        raise InvalidValueError(
            f"decoding steps must be in [1, {length}] (the tokens), got {steps}"
        )
    left, out = length, []
    for t in range(1, steps + 1):
        n = 0 if t == steps else math.floor(length * math.cos(0.5 * math.pi * t / steps))
        left = max(min(n, left - 1), steps - t)  # room for the steps still to come
        out.append(left)
    return np.asarray(out, np.int32)


def sample(
    model: MaskGIT,
    key: jax.Array,
    labels: jax.Array,
    *,
    steps: int = 8,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    choice_temperature: float = 4.5,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    history: bool = False,
):
    """Token sequences (B, L) for labels (B,) by ``steps`` parallel decoding steps; with
    ``history`` also each step's grid (steps, B, L) (``mask_id`` where still masked)."""
    model.check_labels(labels)
    b, n = labels.shape[0], model.seq_len
    left = jnp.asarray(decode_schedule(n, steps))  # (T,)
    guided = cfg_scale != 1.0 or cfg_schedule != "constant"
    cfg_scale_at(cfg_scale, cfg_schedule, 0.0)  # a bad schedule name fails here
    rows = jnp.concatenate([labels, jnp.full_like(labels, -1)]) if guided else labels

    def body(t, carry):
        tokens, seen = carry  # (B, L), (T, B, L)
        k_tok, k_choice = jax.random.split(jax.random.fold_in(key, t))
        logits = model(jnp.concatenate([tokens, tokens]) if guided else tokens, rows)
        if guided:
            logits = guide(logits, cfg_scale_at(cfg_scale, cfg_schedule, t / max(steps - 1, 1)))
        drawn = pick(logits, k_tok, temperature, top_k, top_p)  # (B, L)
        unknown = tokens == model.mask_id
        drawn = jnp.where(unknown, drawn, tokens)
        logp = jax.nn.log_softmax(logits / max(temperature, 1e-6), axis=-1)
        chosen = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]  # (B, L)
        anneal = choice_temperature * (1.0 - (t + 1) / steps)
        confidence = chosen + anneal * jax.random.gumbel(k_choice, chosen.shape)
        confidence = jnp.where(unknown, confidence, jnp.inf)  # kept tokens stay kept
        rank = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)  # 0: least confident
        tokens = jnp.where(rank < left[t], model.mask_id, drawn)
        return tokens, seen.at[t].set(tokens)

    start = jnp.full((b, n), model.mask_id, jnp.int32)
    tokens, seen = jax.lax.fori_loop(0, steps, body, (start, jnp.zeros((steps, b, n), jnp.int32)))
    return (tokens, seen) if history else tokens
