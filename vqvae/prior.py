"""A decoder-only transformer prior over token grids, and autoregressive sampling.

The grid (h, w) is flattened in raster order to L = h*w tokens; with a residual quantizer's
``levels`` tokens per position, to L = h*w*levels, each position's levels in a row, coarse
to fine (the order of ``tokens.reshape(B, -1)`` on (B, h, w, levels)). The input at position 0 is
a start token (one per class when class-conditional, plus an unconditional one), then the
tokens shifted right; the output at position t predicts token t. Sampling runs one position
at a time with a key/value cache, so each new token costs one position's work.

Classifier-free guidance: trained with labels dropped to the unconditional start token at a
rate (``drop_labels``), the prior is sampled with logits ``u + s * (c - u)`` from the
conditional ``c`` and unconditional ``u`` ones, both rows of one batched forward (2B) sharing
one key/value cache, so guidance costs no second pass over the prefix.
"""

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae.errors import InvalidValueError


@dataclasses.dataclass(frozen=True)
class GridModelConfig:
    """The shape of a transformer over token grids (the prior's and the masked
    generator's); each subclass is stored in its own checkpoints and builds its model."""

    vocab_size: int = 256
    grid: tuple[int, int] = (8, 8)
    levels: int = 1  # tokens per grid position (a residual quantizer's levels)
    num_classes: int = 0  # 0: unconditional
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    what: ClassVar[str] = "token model"  # in error messages

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        if self.width % self.heads:
            raise InvalidValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.vocab_size < 2 or min(self.grid) < 1:
            raise InvalidValueError(f"the {self.what} needs vocab_size >= 2 and a non-empty grid")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.levels

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One example's token grid: (h, w), or (h, w, levels)."""
        return self.grid if self.levels == 1 else (*self.grid, self.levels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidValueError(f"unknown {cls.what} config keys: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class PriorConfig(GridModelConfig):
    """Everything needed to rebuild the prior; stored in its checkpoints."""

    what: ClassVar[str] = "prior"

    def build(self, rngs: nnx.Rngs) -> "Prior":
        return Prior(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            num_classes=self.num_classes,
            width=self.width,
            depth=self.depth,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            rngs=rngs,
        )


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, Q, H, d), k/v (B, K, H, d), mask (Q, K) bool -> (B, Q, H, d)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.out = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.down = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, n, H, d)

    def _finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        x = x + self.out(attended.reshape(x.shape))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    def __call__(self, x: jax.Array, causal: bool = True) -> jax.Array:
        """Whole sequence x (B, L, W) -> (B, L, W), causal (or bidirectional)."""
        q, k, v = self._qkv(x)
        n = x.shape[1]
        mask = jnp.tril(jnp.ones((n, n), bool)) if causal else jnp.ones((n, n), bool)
        return self._finish(x, attend(q, k, v, mask))

    def step(self, x: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One position x (B, 1, W) at ``pos`` with cache k/v (B, L, H, d) -> (B, 1, W)."""
        q, k, v = self._qkv(x)
        k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, pos, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, pos, axis=1)
        mask = (jnp.arange(k_all.shape[1]) <= pos)[None, :]  # (1, L)
        return self._finish(x, attend(q, k_all, v_all, mask)), {"k": k_all, "v": v_all}


class Prior(nnx.Module):
    """p(tokens | class) = prod_t p(token_t | tokens_<t, class) over L = h*w positions."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        rngs: nnx.Rngs,
    ):
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.width, self.heads = width, heads
        # rows: the vocabulary, the unconditional start token, one start token per class
        self.embed = nnx.Embed(vocab_size + 1 + num_classes, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, width)))
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab_size, rngs=rngs)

    def check_labels(self, labels: jax.Array) -> None:
        """A clear error for class labels the prior has no start token for.

        Runs on concrete labels only: inside ``jax.jit`` the values are unknown, and an
        out-of-range label gives NaN logits (the trainer maps unknown labels to -1 first).
        """
        if self.num_classes == 0 or isinstance(labels, jax.core.Tracer):
            return
        labels = np.asarray(labels)
        bad = labels[(labels < -1) | (labels >= self.num_classes)]
        if bad.size:
            raise InvalidValueError(
                f"class label {int(bad[0])} is out of range: this prior knows "
                f"{self.num_classes} classes (0..{self.num_classes - 1}; -1: unconditional)"
            )

    def start_tokens(self, labels: jax.Array) -> jax.Array:
        """labels (B,) (-1: none) -> start token ids (B,)."""
        self.check_labels(labels)
        if self.num_classes == 0:
            return jnp.full(labels.shape, self.vocab_size, jnp.int32)
        return jnp.where(labels >= 0, self.vocab_size + 1 + labels, self.vocab_size)

    def __call__(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """tokens (B, L) int, labels (B,) -> logits (B, L, V) predicting each token."""
        start = self.start_tokens(labels)[:, None]  # (B, 1)
        inputs = jnp.concatenate([start, tokens[:, :-1]], axis=1)  # (B, L)
        x = self.embed(inputs) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).astype(jnp.float32)

    def init_cache(self, batch: int) -> list[dict]:
        d = self.width // self.heads
        zeros = jnp.zeros((batch, self.seq_len, self.heads, d), jnp.float32)
        return [{"k": zeros, "v": zeros} for _ in self.blocks]

    def step(self, token: jax.Array, pos: jax.Array, cache: list[dict]):
        """Input token (B,) at position ``pos`` -> logits (B, V) for that position, new cache."""
        x = self.embed(token)[:, None] + self.pos[pos][None, None]  # (B, 1, W)
        new = []
        for block, c in zip(self.blocks, cache, strict=True):
            x, c = block.step(x, pos, c)
            new.append(c)
        return self.head(self.norm(x))[:, 0].astype(jnp.float32), new


def drop_labels(key: jax.Array, labels: jax.Array, rate: float) -> jax.Array:
    """labels (B,) with each one replaced by -1 (unconditional) at probability ``rate``: the
    training that lets one model give both logits classifier-free guidance mixes."""
    if rate <= 0:
        return labels
    return jnp.where(jax.random.uniform(key, labels.shape) < rate, -1, labels)


def prior_loss(model: Prior, tokens: jax.Array, labels: jax.Array):
    """Mean cross-entropy in nats per token; tokens (B, h, w[, levels]) or (B, L)."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    logits = model(tokens, labels)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    return nats, {"loss": nats, "bits_per_token": nats / math.log(2)}


CFG_SCHEDULES = ("constant", "linear")


def cfg_scale_at(scale: float, schedule: str, frac: jax.Array) -> jax.Array:
    """The guidance scale at ``frac`` in [0, 1] of the way through sampling: ``constant``
    (``scale`` throughout) or ``linear`` (1, no guidance, at the start to ``scale`` at the
    end, as VAR and MUSE ramp it)."""
    if schedule == "constant":
        return jnp.float32(scale)
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * frac
    raise InvalidValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def guide(logits: jax.Array, scale: jax.Array) -> jax.Array:
    """Guided logits (B, ..., V) from the stacked (2B, ..., V): conditional rows first, then
    the unconditional: ``u + scale * (c - u)``."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + scale * (cond - uncond)


def pick(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float = 1.0
) -> jax.Array:
    """Sample ids (...,) from logits (..., V) at ``temperature``, among the ``top_k`` best
    and the smallest set of best ids whose probability reaches ``top_p`` (nucleus).

    Exactly ``top_k`` candidates are kept: where several ids tie at the k-th score, the
    lower ids are kept (as ``jax.lax.top_k`` orders them).
    """
    logits = logits / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1] or top_p < 1.0:
        k = top_k if 0 < top_k < logits.shape[-1] else logits.shape[-1]
        best, ids = jax.lax.top_k(logits, k)  # (..., k) each, best first
        if top_p < 1.0:  # drop the ids after the first whose cumulative probability >= top_p
            probs = jax.nn.softmax(best, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better ids
            best = jnp.where(before < top_p, best, -jnp.inf)
        choice = jax.random.categorical(key, best)  # (...,) positions among the k
        return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def sample(
    model: Prior,
    key: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cached: bool = True,
) -> jax.Array:
    """Token sequences (B, L) for labels (B,) (-1: unconditional). Position t uses the key
    ``fold_in(key, t)``, so cached and uncached sampling give the same tokens.

    ``cfg_scale`` other than 1 samples with classifier-free guidance: the batch runs doubled
    (the labels, then unconditional), and position t's logits are mixed at
    ``cfg_scale_at(cfg_scale, cfg_schedule, t / (L - 1))``.
    """
    model.check_labels(labels)
    b, n = labels.shape[0], model.seq_len
    guided = cfg_scale != 1.0 or cfg_schedule != "constant"
    cfg_scale_at(cfg_scale, cfg_schedule, 0.0)  # a bad schedule name fails here, in one line
    rows = jnp.concatenate([labels, jnp.full_like(labels, -1)]) if guided else labels

    def choose(logits, t):  # logits (2B or B, V) -> ids (B,)
        if guided:
            logits = guide(logits, cfg_scale_at(cfg_scale, cfg_schedule, t / max(n - 1, 1)))
        return pick(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)

    def both(ids):  # the guided batch carries the chosen tokens in both its halves
        return jnp.concatenate([ids, ids]) if guided else ids

    tokens = jnp.zeros((b, n), jnp.int32)
    if cached:

        def body(t, carry):
            tokens, prev, cache = carry
            logits, cache = model.step(prev, t, cache)
            new = choose(logits, t)
            return tokens.at[:, t].set(new), both(new), cache

        init = (tokens, model.start_tokens(rows), model.init_cache(len(rows)))
        return jax.lax.fori_loop(0, n, body, init)[0]

    def full(t, tokens):  # recompute the whole prefix every step: quadratic, for checking
        logits = model(both(tokens), rows)[:, t]
        return tokens.at[:, t].set(choose(logits, t))

    return jax.lax.fori_loop(0, n, full, tokens)


SAMPLING = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule")


def check_sampling(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
) -> None:
    """One-line errors for sampling settings out of range."""
    if temperature <= 0:
        raise InvalidValueError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise InvalidValueError(f"top_k must be 0 (all) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise InvalidValueError(f"top_p must be in (0, 1], got {top_p}")
    if cfg_scale < 0:
        raise InvalidValueError(f"cfg_scale must be at least 0, got {cfg_scale}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise InvalidValueError(
            f"cfg schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}"
        )


class TokenPrior:
    """A trained prior from a checkpoint, with its tokenizer: token grids and images.

        prior = TokenPrior.load("workdir/prior/best")  # or workdir/prior (newest checkpoint)
        tokens = prior.sample(16)                     # int32 (16, h, w) ((16, h, w, L))
        images = prior.generate(16, temperature=0.9)  # uint8 (16, H, W, C), decoded
        prior.bits_per_token(tokens)                  # cross-entropy of grids, in bits

    ``model`` is the ``Prior`` module itself (for ``sample`` with other settings);
    ``tokenizer`` the ``Tokenizer`` it was trained on, loaded when first used.
    """

    def __init__(self, model: Prior, meta: dict, workdir: Any = None):
        self.model, self.meta, self.workdir = model, meta, workdir
        self.config = PriorConfig.from_dict(meta["model"])
        graphdef, self._state = nnx.split(model)

        def draw(state, key, labels, **kw):
            return sample(nnx.merge(graphdef, state), key, labels, **kw)

        def bits(state, tokens, labels):
            logits = nnx.merge(graphdef, state)(tokens, labels)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
            return ce.mean(axis=1) / math.log(2)

        self._draw = jax.jit(draw, static_argnames=SAMPLING)
        self._bits = jax.jit(bits)
        self._tokenizer = None

    @classmethod
    def load(cls, path, step: int | None = None) -> "TokenPrior":
        """From a prior's training workdir (newest intact checkpoint), its ``best`` folder
        (the best held-out checkpoint) or a ``checkpoints/STEP`` folder."""
        from pathlib import Path

        from vqvae.checkpoint import CheckpointError, load_model

        path = Path(path).expanduser()
        workdir, found = path, None
        if path.name.isdigit() and path.parent.name == "checkpoints":
            workdir, found = path.parent.parent, int(path.name)
        if not workdir.is_dir():
            raise CheckpointError(f"no prior at {path}: {workdir} does not exist")
        model, meta = load_model(workdir, step if step is not None else found, kind="prior")
        return cls(model, meta, workdir.resolve())

    @property
    def tokenizer(self):
        """The tokenizer whose tokens the prior was trained on (its checkpoint's path)."""
        if self._tokenizer is None:
            from vqvae.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.meta["tokenizer"])
        return self._tokenizer

    def _labels(self, num: int, label) -> jax.Array:
        labels = np.broadcast_to(np.asarray(label, np.int32), (num,))
        self.model.check_labels(labels)
        return jnp.asarray(labels)

    def sample(self, num: int, *, label=-1, seed: int = 0, **kw) -> np.ndarray:
        """``num`` token grids int32 (num, h, w) (or (num, h, w, levels)); ``label`` one
        class or one per grid (-1: unconditional); ``kw``: ``sample``'s settings
        (temperature, top_k, top_p, cfg_scale, cfg_schedule). The same seed gives the
        same grids."""
        if num < 1:
            raise InvalidValueError(f"num must be at least 1, got {num}")
        check_sampling(**kw)
        key = jax.random.key(seed)
        tokens = self._draw(self._state, key, self._labels(num, label), **kw)
        return np.asarray(tokens).reshape(num, *self.config.token_shape)

    def generate(self, num: int, **kw) -> np.ndarray:
        """``num`` sampled grids decoded by the tokenizer: uint8 images (num, H, W, C)."""
        return self.tokenizer.decode(self.sample(num, **kw))

    def bits_per_token(self, tokens, label=-1) -> np.ndarray:
        """Each grid's cross-entropy under the prior, in bits per token: (B,) float32."""
        tokens = np.asarray(tokens)
        if tokens.shape[1:] != self.config.token_shape:
            raise InvalidValueError(
                f"token grids must be (B, {', '.join(map(str, self.config.token_shape))}), "
                f"got shape {tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise InvalidValueError(f"token ids must be in [0, {self.config.vocab_size})")
        flat = jnp.asarray(tokens.reshape(len(tokens), -1), jnp.int32)
        return np.asarray(self._bits(self._state, flat, self._labels(len(tokens), label)))
