"""Where examples come from: one small interface, one class per kind of source.

A source spec is a string, so it can be set from the command line:
  sample_photos        photographs bundled with scikit-image, scikit-learn and matplotlib
  folder:PATH          a folder of png/jpg/webp images (recursive; class sub-folders allowed)
  tfds:NAME[:SPLIT]    a prepared tensorflow-datasets dataset (downloads only when asked)
  tokens:PATH          token grids exported by ``sample.py --mode tokens`` (for the prior)
  arrays               in-memory NumPy arrays, passed as ``arrays=(images, labels)``

Every source but a TFRecord tfds dataset is random access (``Source``): the pipeline in
``vqvae.data`` shuffles, shards and batches indices and calls ``decode`` on each example, in
worker processes where that pays. This module imports no JAX and no TensorFlow.
"""

import importlib
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vqvae.errors import InvalidValueError, UserError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class DataError(UserError, ValueError):
    """A data source that cannot be used, with a message saying why and what to do."""


@runtime_checkable
class Source(Protocol):
    """What every random-access source provides; a new source is one class with these.

    ``len(source)`` examples; ``source[i]`` is example i's raw record (cheap and picklable:
    a path, an index); ``decode(record, rng)`` makes the example from it, a dict of NumPy
    arrays: ``image`` uint8 (H, W, C) or ``tokens`` int32 (h, w), and ``label`` int32 ()
    (-1 where there is none). ``rng`` None means evaluation: deterministic, centred crops.
    ``decode`` raises on an unreadable example; the pipeline then takes the next one.
    ``parallel``: decoding is heavy enough for worker processes. ``name(i)`` says which
    example i is, for warnings.
    """

    parallel: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def decode(self, record: Any, rng: np.random.Generator | None) -> dict[str, np.ndarray]: ...

    def name(self, index: int) -> str: ...


@runtime_checkable
class Stream(Protocol):
    """A source read in order only (tf.data over TFRecord files): whole batches, no index.

    ``len(stream)`` examples in the split; ``batches(local_batch, start_step, one_pass)``
    yields this process's batches (dicts as ``Source.decode`` makes, stacked), from step
    ``start_step`` on, repeating unless ``one_pass``. ``parallel``: as for ``Source``.
    """

    parallel: bool

    def __len__(self) -> int: ...

    def batches(self, local_batch: int, start_step: int, one_pass: bool) -> Iterator[dict]: ...


# --- images -------------------------------------------------------------------------------
def fit_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(..., C) -> (..., channels): grey to RGB by repetition, RGBA/RGB to RGB/grey."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1:
        return np.repeat(images, channels, axis=-1)
    if channels == 1:
        return images[..., :3].mean(-1, keepdims=True).astype(images.dtype)
    return images[..., :channels]


def crop(arr: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Random (rng given) or centre size x size crop of (H, W, C)."""
    h, w = arr.shape[:2]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return arr[top : top + size, left : left + size]


def _to_8bit(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> 8-bit "RGB" or "L". 16-bit greyscale (modes I;16*, and I beyond
    255) keeps its top 8 bits, as Pillow does for 16-bit RGB; ``convert`` would clip it."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        grey = np.clip(np.asarray(im, np.int64), 0, 65535) >> 8
        im = Image.fromarray(grey.astype(np.uint8), "L")
    return im.convert("RGB" if channels >= 3 else "L")


def decode_image(path, size: int, channels: int, rng: np.random.Generator | None) -> np.ndarray:
    """An image file -> a size x size crop, uint8 (size, size, channels).

    The crop is the square of the image's short side (at a random place along the long
    side with ``rng``, else centred), resized to ``size``: the same as resizing the short
    side to ``size`` and cropping, but only the crop is resampled (bilinear, antialiased).
    A JPEG much larger than ``size`` is decoded at 1/2, 1/4 or 1/8 scale first (libjpeg's
    draft mode), which keeps a 6000 x 6000 photo as cheap as a small one.
    """
    with Image.open(path) as im:
        im.draft(None, (size, size))  # JPEG only; both sides stay >= size
        im = _to_8bit(im, channels)
        w, h = im.size
        side = min(w, h)
        slack = max(w, h) - side
        offset = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        left, top = (offset, 0) if w > h else (0, offset)
        box = (left, top, left + side, top + side)
        arr = np.asarray(im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=3.0))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return fit_channels(arr, channels)


def _example(image: np.ndarray, label) -> dict[str, np.ndarray]:
    return {"image": image, "label": np.int32(label)}


@dataclass
class FolderSource:
    """Image files under a folder, decoded on demand; class = first sub-folder, if any.

    Files go to validation by a stable hash of their relative path (``val_fraction`` of them).
    """

    root: str
    image_size: int
    channels: int
    train: bool = True
    val_fraction: float = 0.02
    parallel: bool = field(default=True, init=False)
    files: list = field(init=False)
    labels: np.ndarray = field(init=False)
    classes: list = field(init=False)

    def __post_init__(self):
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataError(f"folder source: {root} does not exist or is not a folder")
        files = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not files:
            raise DataError(f"folder source: no image files (png/jpg/webp) under {root}")
        bucket = int(self.val_fraction * 10_000)
        held_out = [zlib.crc32(f.encode()) % 10_000 < bucket for f in files]
        chosen = [f for f, h in zip(files, held_out, strict=True) if h != self.train]
        if not chosen:
            part = "training" if self.train else "validation"
            raise DataError(f"folder source: no {part} files under {root} (val_fraction)")
        self.classes = sorted({f.split("/")[0] for f in chosen if "/" in f})
        index = {c: i for i, c in enumerate(self.classes)}
        self.files = [str(root / f) for f in chosen]
        self.labels = np.array([index.get(f.split("/")[0], -1) if "/" in f else -1 for f in chosen])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.files[index], int(self.labels[index])

    def decode(self, record, rng) -> dict[str, np.ndarray]:
        path, label = record
        return _example(decode_image(path, self.image_size, self.channels, rng), label)

    def name(self, index: int) -> str:
        return self.files[index]


def _photo_list() -> list[tuple[str, np.ndarray]]:
    """The RGB photographs that ship inside scikit-image, scikit-learn and matplotlib."""
    try:
        import matplotlib.cbook
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise DataError(
            f"sample_photos needs scikit-image, scikit-learn and matplotlib ({e.name} is "
            "missing): pip install 'vqvae[photos]'"
        ) from e
    photos = [
        (n, getattr(skimage.data, n)())
        for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
        + ("hubble_deep_field", "retina")
    ]
    photos.append(("motorcycle", skimage.data.stereo_motorcycle()[0]))
    photos += [(n, load_sample_image(f"{n}.jpg")) for n in ("china", "flower")]
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        photos.append(("grace_hopper", np.asarray(im.convert("RGB"))))
    return photos


@dataclass
class PhotoSource:
    """Crops of the bundled photographs, shrunk ``shrink`` times so crops hold detail.

    The bottom eighth of every photo is held out: validation crops come from there only.
    Examples are the non-overlapping tiles of every photo; training takes a random crop of
    the example's photo (any place, so the tiles only set how often each photo is drawn),
    evaluation the tile itself. The label is the photo.
    """

    image_size: int
    channels: int
    train: bool = True
    shrink: int = 2
    parallel: bool = field(default=False, init=False)
    photos: list = field(init=False)
    tiles: list = field(init=False)

    def __post_init__(self):
        self.photos = []
        for _, arr in _photo_list():
            im = Image.fromarray(arr)
            im = im.resize((im.width // self.shrink, im.height // self.shrink), Image.LANCZOS)
            a = np.asarray(im)
            cut = a.shape[0] * 7 // 8
            part = a[:cut] if self.train else a[cut:]
            if min(part.shape[:2]) >= self.image_size:
                self.photos.append(part)
        if not self.photos:
            raise DataError(f"sample_photos has no photo large enough for {self.image_size}px")
        s = self.image_size
        self.tiles = [
            (i, top, left)
            for i, p in enumerate(self.photos)
            for top in range(0, p.shape[0] - s + 1, s)
            for left in range(0, p.shape[1] - s + 1, s)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        return self.tiles[index]

    def decode(self, record, rng) -> dict[str, np.ndarray]:
        photo, top, left = record
        s = self.image_size
        if rng is None:
            image = self.photos[photo][top : top + s, left : left + s]
        else:
            image = crop(self.photos[photo], s, rng)
        return _example(fit_channels(image, self.channels), photo)

    def name(self, index: int) -> str:
        return f"sample photo {self.tiles[index][0]}, tile {index}"


@dataclass
class ArraySource:
    """Images (N, H, W, C) uint8 or float in [0, 1], labels (N,) optional."""

    images: np.ndarray
    labels: np.ndarray | None
    image_size: int
    channels: int
    train: bool = True
    parallel: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if self.images.ndim != 4 or len(self.images) == 0:
            raise DataError(f"arrays source needs images (N, H, W, C), got {self.images.shape}")
        if self.images.dtype != np.uint8:
            self.images = np.clip(np.round(self.images * 255.0), 0, 255).astype(np.uint8)
        h, w = self.images.shape[1:3]
        if min(h, w) < self.image_size:
            raise DataError(f"arrays of {h}x{w} are smaller than image_size {self.image_size}")
        if self.labels is None:
            self.labels = np.full(len(self.images), -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> int:
        return index

    def decode(self, record, rng) -> dict[str, np.ndarray]:
        image = crop(self.images[record], self.image_size, rng)
        return _example(fit_channels(image, self.channels), self.labels[record])

    def name(self, index: int) -> str:
        return f"array {index}"


def token_manifest(spec: str) -> dict | None:
    """The manifest of the token export a ``data.source`` names (``tokens:PATH``), or None
    for a source of images."""
    prefix, _, path = spec.partition(":")
    return read_token_manifest(path) if SOURCES.get(prefix) is _tokens else None


def read_token_manifest(root: str | Path) -> dict:
    """The manifest.json of a token export (vocabulary, grid, codebook checksum, shards)."""
    manifest = Path(root).expanduser() / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"tokens source: no manifest.json in {manifest.parent} (export first)")
    return json.loads(manifest.read_text())


class TokenSource:
    """Token grids exported by ``sample.py --mode tokens`` (a manifest.json and .npz shards).

    Examples are ``{"tokens": int32 (h, w), "label": int32 ()}``; ``val_fraction`` of them
    (a fixed random subset) are held out. An augmented export's several views per example:
    training draws one by the example's rng (one per example and epoch), held-out view 0.
    """

    parallel = False

    def __init__(self, root: str, train: bool = True, val_fraction: float = 0.02):
        root_path = Path(root).expanduser()
        self.manifest = read_token_manifest(root_path)
        tokens, labels = [], []
        for shard in self.manifest["shards"]:
            with np.load(root_path / shard["file"]) as z:
                tokens.append(z["tokens"])
                labels.append(z["labels"])
        tokens, labels = np.concatenate(tokens), np.concatenate(labels)
        held = np.random.default_rng([0, 99]).random(len(tokens)) < val_fraction
        keep = ~held if train else held
        if not keep.any():
            raise DataError(f"tokens source: no {'training' if train else 'held-out'} examples")
        self.tokens, self.labels = tokens[keep].astype(np.int32), labels[keep].astype(np.int32)
        self.views = len(self.manifest.get("views", ["none"]))  # (n, A, h, w) when A > 1

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> int:
        return index

    def decode(self, record, rng) -> dict[str, np.ndarray]:
        if self.views == 1:
            return {"tokens": self.tokens[record], "label": self.labels[record]}
        view = 0 if rng is None else int(rng.integers(self.views))
        return {"tokens": self.tokens[record, view], "label": self.labels[record]}

    def name(self, index: int) -> str:
        return f"token grid {index}"


class TfdsRecords:
    """A tfds dataset prepared as array_record: random access through ``tfds.data_source``,
    so it goes through the same pipeline (and worker processes) as a folder."""

    parallel = True

    def __init__(self, builder, split: str, image_size: int, channels: int):
        self.records = builder.as_data_source(split=split)
        self.image_size, self.channels, self.split = image_size, channels, split

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.records[index]

    def decode(self, record, rng) -> dict[str, np.ndarray]:
        image = np.asarray(record["image"])
        image = image[..., None] if image.ndim == 2 else image
        square = crop(image, min(image.shape[:2]), rng)  # the short side's square
        if square.shape[0] != self.image_size:
            size = (self.image_size, self.image_size)
            resized = Image.fromarray(square[..., 0] if square.shape[-1] == 1 else square)
            square = np.asarray(resized.resize(size, Image.BILINEAR))
            square = square[..., None] if square.ndim == 2 else square
        return _example(fit_channels(square, self.channels), record.get("label", -1))

    def name(self, index: int) -> str:
        return f"{self.split}[{index}]"


def make_source(
    data, *, image_size: int, channels: int = 3, train: bool = True, seed: int = 0, arrays=None
):
    """The source ``data["source"]`` names (see the module docstring).

    ``data``: the config's ``data`` section, or any mapping with its keys (a checkpoint's
    meta keeps one): ``source``, and optionally ``val_fraction``, ``data_dir``,
    ``download``. A tfds dataset prepared as array_record is a random-access source; one
    prepared as TFRecord is read by tf.data (``vqvae.tfds_stream``), a stream.
    With ``train=False`` and a ``val_source`` (a separate validation set, ImageNet's val,
    say), the held-out set is that source in full.
    """
    if not train and data.get("val_source"):
        val = data["val_source"]
        if val.partition(":")[0] in ("sample_photos", "arrays"):
            raise DataError(
                f"{val} cannot be used whole (data.val_source, --split all): its held-out "
                "part is fixed; use folder:PATH, tfds:NAME:SPLIT or tokens:PATH"
            )
        data, train = {**data, "source": val, "val_source": "", "val_fraction": 0.0}, True
    prefix, _, rest = data["source"].partition(":")
    if prefix not in SOURCES:
        known = ", ".join(SOURCES)
        raise DataError(f"unknown data source {data['source']!r}: the sources are {known}")
    factory = SOURCES[prefix]
    if isinstance(factory, str):  # "module:function", imported when first used
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    return factory(
        rest, data, image_size=image_size, channels=channels, train=train, seed=seed, arrays=arrays
    )


def _photos(rest, data, *, image_size, channels, train, **_) -> "PhotoSource":
    return PhotoSource(image_size, channels, train)


def _folder(rest, data, *, image_size, channels, train, **_) -> "FolderSource":
    if not rest:
        raise DataError("folder source needs a path: folder:/path/to/images")
    return FolderSource(rest, image_size, channels, train, data.get("val_fraction", 0.02))


def _arrays(rest, data, *, image_size, channels, train, arrays=None, **_) -> "ArraySource":
    if arrays is None:
        raise DataError("the arrays source needs arrays=(images, labels)")
    images, labels = arrays
    return ArraySource(np.asarray(images), labels, image_size, channels, train)


def _tokens(rest, data, *, train, **_) -> "TokenSource":
    return TokenSource(rest, train, data.get("val_fraction", 0.02))


# ``data.source`` is PREFIX[:REST]; a factory gets REST, the data section and the keywords
# of ``make_source`` and returns a ``Source`` (random access) or a ``Stream``. A new source
# is one module with its factory and one line here (or ``register_source`` from outside).
SOURCES: dict[str, Callable | str] = {
    "sample_photos": _photos,
    "folder": _folder,
    "tfds": "vqvae.tfds_stream:source",
    "tokens": _tokens,
    "arrays": _arrays,
}


def register_source(prefix: str, factory: Callable | str) -> None:
    """Make ``data.source = "PREFIX[:REST]"`` build its source with ``factory``."""
    if not prefix or ":" in prefix:
        raise InvalidValueError(f"a source prefix is a name without ':', got {prefix!r}")
    SOURCES[prefix] = factory
