"""A trained VQ-VAE as an image tokenizer: images <-> int32 token grids, from a checkpoint.

    tok = Tokenizer.load("workdir/default")      # or workdir/default/checkpoints/1500
    tokens = tok.encode(images)                  # uint8 (B, H, W, C) -> int32 (B, h, w)
    images = tok.decode(tokens)                  # -> uint8 (B, H, W, C)

With a residual quantizer of L levels, tokens are (B, h, w, L), and ``decode`` takes the
first l <= L of them (B, h, w, l) for a coarser image.

Any batch size: batches are padded up to one of a few bucket sizes (and split above the
largest), so only a handful of programs are ever compiled.
"""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.checkpoint import CheckpointError, load_model
from vqvae.errors import InvalidValueError
from vqvae.model import VQVAE, VQVAEConfig, to_model_range, to_uint8

BUCKETS = (1, 8, 64, 256)
# Float images beyond +-1 are in another convention (0..255, most likely), not the
# training range [-0.5, 0.5] with some overshoot: refused rather than silently mis-encoded.
FLOAT_LIMIT = 1.0


def _resolve(path: str | Path) -> tuple[Path, int | None]:
    """A workdir, or one checkpoint step folder inside it -> (workdir, step or None)."""
    path = Path(path).expanduser()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    return path, None


def _buckets(n: int) -> list[tuple[int, int]]:
    """Split n items into (start, padded size) chunks of bucket sizes."""
    out, start, top = [], 0, BUCKETS[-1]
    while start < n:
        rest = n - start
        size = top if rest >= top else next(b for b in BUCKETS if b >= rest)
        out.append((start, size))
        start += min(size, rest)
    return out


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class Tokenizer:
    """Encode images to token grids and decode them back with a trained VQ-VAE."""

    def __init__(self, model: VQVAE, meta: dict, workdir: Path | None = None):
        self.meta, self.workdir = meta, workdir
        self.config = meta["model"]
        graphdef, self._state = nnx.split(model)

        def encode(state, x):  # uint8 images are mapped to the training range first
            x = to_model_range(x) if x.dtype == jnp.uint8 else x
            return nnx.merge(graphdef, state).encode_to_indices(x)

        self._encode = jax.jit(encode)
        self._decode = jax.jit(
            lambda state, t: to_uint8(nnx.merge(graphdef, state).decode_indices(t))
        )
        q = model.quantizer
        self._vocab, self.num_levels = int(q.vocab_size), int(q.num_levels)
        self.kind = self.config.get("quantizer", {}).get("kind", "vq")
        self._codebook = np.asarray(q.codes())

    @classmethod
    def load(cls, path: str | Path, step: int | None = None) -> "Tokenizer":
        """From a training workdir (latest checkpoint) or a ``checkpoints/STEP`` folder."""
        workdir, found = _resolve(path)
        if not workdir.is_dir():
            raise CheckpointError(f"no tokenizer at {path}: {workdir} does not exist")
        model, meta = load_model(workdir, step if step is not None else found)
        return cls(model, meta, workdir.resolve())

    # --- properties --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids per token (per level, with a residual quantizer)."""
        return self._vocab

    @property
    def token_levels(self) -> tuple[int, ...]:
        """The tokens' trailing axis: () with one level, (L,) with a residual quantizer."""
        return () if self.num_levels == 1 else (self.num_levels,)

    @property
    def downsample_factor(self) -> int:
        return VQVAEConfig.from_dict(self.config).downsample_factor

    @property
    def image_size(self) -> int:
        """The size it was trained at (any multiple of ``downsample_factor`` works)."""
        return int(self.config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def codebook(self) -> np.ndarray:
        """The code vectors as the decoder sees them, float32: (K, D), or (L, K, D) for a
        residual quantizer (FSQ and LFQ: their implicit grid, through any projection)."""
        return self._codebook

    def codebook_sha256(self) -> str:
        return hashlib.sha256(self._codebook.tobytes()).hexdigest()

    def grid_shape(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid (h, w) of an image of ``image_size`` (default: the training size)."""
        size = self.image_size if image_size is None else image_size
        h, w = (size, size) if isinstance(size, int) else size
        self._check_size(h, w)
        return h // self.downsample_factor, w // self.downsample_factor

    # --- encode / decode ---------------------------------------------------------------
    def _check_size(self, h: int, w: int) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise InvalidValueError(
                f"image size {h}x{w} is not divisible by the tokenizer's downsampling factor {f}"
            )

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4:
            raise InvalidValueError(f"images must be (B, H, W, C), got shape {images.shape}")
        if images.shape[-1] != self.channels:
            raise InvalidValueError(
                f"images have {images.shape[-1]} channels; the tokenizer takes {self.channels}"
            )
        self._check_size(*images.shape[1:3])
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise InvalidValueError(
                f"images must be uint8 (0..255) or float in [-0.5, 0.5], got {images.dtype}"
            )
        if images.dtype != np.uint8 and images.size:
            if not np.isfinite(images).all():
                raise InvalidValueError("images contain NaN or infinite values")
            lo, hi = float(images.min()), float(images.max())
            if lo < -FLOAT_LIMIT or hi > FLOAT_LIMIT:
                raise InvalidValueError(
                    f"float images must be in the training range [-0.5, 0.5], got values in "
                    f"[{lo:g}, {hi:g}]; pass uint8 for 0..255 pixels"
                )
        return images

    def encode(self, images) -> np.ndarray:
        """uint8 (0..255) or float (training range [-0.5, 0.5]) images (B, H, W, C)
        -> int32 tokens (B, H/f, W/f) ((B, H/f, W/f, L) with L residual levels)."""
        images = self._check_images(images)
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        return self._batched(self._encode, images)

    def decode(self, tokens) -> np.ndarray:
        """int tokens (B, h, w) in [0, vocab_size) -> uint8 images (B, h*f, w*f, C).

        With L residual levels: tokens (B, h, w, l), the first l <= L levels."""
        tokens = np.asarray(tokens)
        levels = self.num_levels > 1
        if tokens.ndim != 3 + levels:
            want = "(B, h, w, levels)" if levels else "(B, h, w)"
            raise InvalidValueError(f"tokens must be {want}, got shape {tokens.shape}")
        if levels and not 1 <= tokens.shape[-1] <= self.num_levels:
            raise InvalidValueError(
                f"tokens have {tokens.shape[-1]} levels; this tokenizer has 1..{self.num_levels}"
            )
        if 0 in tokens.shape[1:]:
            raise InvalidValueError(f"token grids must not be empty, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise InvalidValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise InvalidValueError(
                f"token ids must be in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}"
            )
        return self._batched(self._decode, tokens.astype(np.int32))

    def reconstruct(self, images) -> np.ndarray:
        """decode(encode(images)): the model's reconstruction as uint8."""
        return self.decode(self.encode(images))

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise InvalidValueError("got an empty batch")
        parts = []
        for start, size in _buckets(len(x)):
            chunk = x[start : start + size]
            out = fn(self._state, jnp.asarray(_pad_to(chunk, size)))
            parts.append(np.asarray(out)[: len(chunk)])
        return np.concatenate(parts)
