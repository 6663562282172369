"""Input sources -> global, sharded batches of uint8 images.

A source spec is a string, so it can be set from the command line:
  sample_photos        photographs bundled with scikit-image, scikit-learn and matplotlib
  folder:PATH          a folder of png/jpg/webp images (recursive; class sub-folders allowed)
  tfds:NAME[:SPLIT]    a prepared tensorflow-datasets dataset (downloads only when asked)
  tokens:PATH          token grids exported by ``sample.py --mode tokens`` (for the prior)
  arrays               in-memory NumPy arrays, passed as ``arrays=(images, labels)``

Every source but tfds is random access: the batch of step ``s`` depends only on the seed and
``s``, so a resumed run sees exactly the data order it would have seen. Batches are
``{"image": uint8 (B, H, W, C), "label": int32 (B,)}`` (label -1 where there is none).
"""

import json
import logging
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class DataError(ValueError):
    """A data source that cannot be used, with a message saying why and what to do."""


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _fit_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(..., C) -> (..., channels): grey to RGB by repetition, RGBA/RGB to RGB/grey."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1:
        return np.repeat(images, channels, axis=-1)
    if channels == 1:
        return images[..., :3].mean(-1, keepdims=True).astype(images.dtype)
    return images[..., :channels]


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
    side to ``size`` and cropping, but only the crop is resampled. A JPEG much larger than
    ``size`` is decoded at 1/2, 1/4 or 1/8 scale first (libjpeg's draft mode), which
    keeps a 6000 x 6000 photo as cheap as a small one.
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
        arr = np.asarray(im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return _fit_channels(arr, channels)


def _crop(arr: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Random (rng given) or centre size x size crop of (H, W, C)."""
    h, w = arr.shape[:2]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return arr[top : top + size, left : left + size]


def _epoch_indices(n: int, seed: int, start: int, count: int, shuffle: bool) -> np.ndarray:
    """Indices start .. start+count of an endless sequence of per-epoch permutations of n."""
    out = np.empty(count, np.int64)
    pos = 0
    while pos < count:
        epoch, offset = divmod(start + pos, n)
        order = _rng(seed, epoch).permutation(n) if shuffle else np.arange(n)
        take = min(count - pos, n - offset)
        out[pos : pos + take] = order[offset : offset + take]
        pos += take
    return out


@dataclass
class ArraySource:
    """Images (N, H, W, C) uint8 or float in [0, 1], labels (N,) optional."""

    images: np.ndarray
    labels: np.ndarray | None
    image_size: int
    channels: int
    seed: int = 0
    train: bool = True

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

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict:
        idx = _epoch_indices(len(self.images), self.seed, step * batch_size, batch_size, self.train)
        idx = np.array_split(idx, shard[1])[shard[0]]
        rng = _rng(self.seed, step, 1) if self.train else None
        imgs = np.stack([_crop(self.images[i], self.image_size, rng) for i in idx])
        labels = self.labels[idx] if self.labels is not None else np.full(len(idx), -1)
        return {"image": _fit_channels(imgs, self.channels), "label": labels.astype(np.int32)}

    def take(self, idx: np.ndarray) -> dict:
        """Examples ``idx``, centre-cropped (for one pass over the data)."""
        imgs = np.stack([_crop(self.images[i], self.image_size, None) for i in idx])
        labels = self.labels[idx] if self.labels is not None else np.full(len(idx), -1)
        return {"image": _fit_channels(imgs, self.channels), "label": labels.astype(np.int32)}


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
    """Random crops of the bundled photographs, shrunk ``shrink`` times so crops hold detail.

    The bottom eighth of every photo is held out: validation crops come from there only.
    """

    image_size: int
    channels: int
    seed: int = 0
    train: bool = True
    shrink: int = 2
    photos: list = field(init=False)

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

    @property
    def num_examples(self) -> int:
        """Distinct non-overlapping tiles, a rough size of the source."""
        return len(self._tiles())

    def _tiles(self) -> list[tuple[int, int, int]]:
        """(photo, top, left) of every non-overlapping tile."""
        s = self.image_size
        return [
            (i, top, left)
            for i, p in enumerate(self.photos)
            for top in range(0, p.shape[0] - s + 1, s)
            for left in range(0, p.shape[1] - s + 1, s)
        ]

    def take(self, idx: np.ndarray) -> dict:
        """Tiles ``idx`` of the non-overlapping grid over every photo; label = photo."""
        tiles, s = self._tiles(), self.image_size
        picked = [tiles[i] for i in idx]
        imgs = np.stack([self.photos[p][t : t + s, x : x + s] for p, t, x in picked])
        labels = np.array([p for p, _, _ in picked], np.int32)
        return {"image": _fit_channels(imgs, self.channels), "label": labels}

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict:
        rng = _rng(self.seed, step, 0 if self.train else 7)
        which = rng.integers(0, len(self.photos), batch_size)
        crops = np.stack([_crop(self.photos[i], self.image_size, rng) for i in which])
        crops = np.array_split(crops, shard[1])[shard[0]]
        labels = np.array_split(which, shard[1])[shard[0]].astype(np.int32)
        return {"image": _fit_channels(crops, self.channels), "label": labels}


@dataclass
class FolderSource:
    """Image files under a folder, decoded on demand; class = first sub-folder, if any.

    Files go to validation by a stable hash of their relative path (``val_fraction`` of them).
    Unreadable files are skipped (one warning each) and counted in ``skipped``.
    """

    root: str
    image_size: int
    channels: int
    seed: int = 0
    train: bool = True
    val_fraction: float = 0.02
    files: list = field(init=False)
    labels: np.ndarray = field(init=False)
    classes: list = field(init=False)
    skipped: set = field(init=False, default_factory=set)

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

    @property
    def num_examples(self) -> int:
        return len(self.files)

    def _load(self, i: int, rng) -> np.ndarray | None:
        path = self.files[i]
        try:
            return decode_image(path, self.image_size, self.channels, rng)
        except Exception as e:  # corrupt or not an image: skip it, say so once
            if path not in self.skipped:
                self.skipped.add(path)
                log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
            return None

    def take(self, idx: np.ndarray) -> dict:
        """Files ``idx``, centre-cropped; unreadable ones are left out (and counted)."""
        loaded = [(self._load(int(i), None), self.labels[i]) for i in idx]
        kept = [(a, lab) for a, lab in loaded if a is not None]
        size, c = self.image_size, self.channels
        images = np.stack([a for a, _ in kept]) if kept else np.zeros((0, size, size, c), np.uint8)
        return {"image": images, "label": np.array([lab for _, lab in kept], np.int32)}

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict:
        n = len(self.files)
        idx = _epoch_indices(n, self.seed, step * batch_size, batch_size, self.train)
        idx = np.array_split(idx, shard[1])[shard[0]]
        rng = _rng(self.seed, step, 1) if self.train else None
        images, labels = [], []
        for i in idx:
            for tries in range(n):  # a bad file is replaced by the next good one
                arr = self._load((int(i) + tries) % n, rng)
                if arr is not None:
                    images.append(arr)
                    labels.append(self.labels[(int(i) + tries) % n])
                    break
            else:
                raise DataError(f"folder source: no readable image under {self.root}")
        return {"image": np.stack(images), "label": np.array(labels, np.int32)}


class TfdsSource:
    """A prepared tensorflow-datasets dataset, read sequentially (this process's shard only)."""

    def __init__(self, name, split, image_size, channels, seed, train, data_dir, download):
        try:
            import tensorflow as tf
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(
                "tfds sources need tensorflow-datasets and tensorflow-cpu: "
                "pip install 'vqvae[tfds]', or use folder:PATH / sample_photos"
            ) from e
        tf.config.set_visible_devices([], "GPU")  # TensorFlow must leave the GPU to JAX
        self.tf, self.image_size, self.channels = tf, image_size, channels
        self.seed, self.train = seed, train
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            if download:
                builder.download_and_prepare()
            split = tfds.split_for_jax_process(split) if jax.process_count() > 1 else split
            self.ds = builder.as_dataset(  # seeded file order: a resumed run sees the same data
                split=split, shuffle_files=train, read_config=tfds.ReadConfig(shuffle_seed=seed)
            )
            self.num_examples = int(self.ds.cardinality())
            if self.num_examples < 0:  # unknown to tf.data: ask the dataset's metadata
                self.num_examples = builder.info.splits[split].num_examples
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(
                f"tfds:{name}:{split} is not available offline ({first[:200]}). Prepare it "
                f"once with internet: `tfds build {name}` (or set config.data.download=True), "
                "or use --config.data.source=folder:/path/to/images or sample_photos"
            ) from None

    def batches(
        self, batch_size: int, start_step: int, shard: tuple[int, int], one_pass: bool = False
    ) -> Iterator:
        """Batches of this process's shard; ``one_pass``: every example once, in order."""
        tf, size = self.tf, self.image_size
        local = batch_size // shard[1]

        def prep(ex):
            img = ex["image"]
            shape = tf.shape(img)
            side = tf.minimum(shape[0], shape[1])
            img = tf.image.resize_with_crop_or_pad(img, side, side)
            img = tf.cast(tf.image.resize(img, (size, size), antialias=True), tf.uint8)
            label = tf.cast(ex.get("label", tf.constant(-1)), tf.int32)
            return {"image": img, "label": label}

        ds = self.ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
        if self.train and not one_pass:
            ds = ds.shuffle(10_000, seed=self.seed).repeat()
        ds = ds.batch(local, drop_remainder=not one_pass)
        ds = ds.skip(start_step if self.train and not one_pass else 0)
        for b in ds.prefetch(2).as_numpy_iterator():
            yield {"image": _fit_channels(b["image"], self.channels), "label": b["label"]}


def read_token_manifest(root: str | Path) -> dict:
    """The manifest.json of a token export (vocabulary, grid, codebook checksum, shards)."""
    manifest = Path(root).expanduser() / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"tokens source: no manifest.json in {manifest.parent} (export first)")
    return json.loads(manifest.read_text())


class TokenSource:
    """Token grids exported by ``sample.py --mode tokens`` (a manifest.json and .npz shards).

    Batches are ``{"tokens": int32 (B, h, w), "label": int32 (B,)}``; ``val_fraction`` of
    the examples (a fixed random subset) are held out.
    """

    def __init__(self, root: str, seed: int = 0, train: bool = True, val_fraction: float = 0.02):
        root_path = Path(root).expanduser()
        self.manifest = read_token_manifest(root_path)
        tokens, labels = [], []
        for shard in self.manifest["shards"]:
            with np.load(root_path / shard["file"]) as z:
                tokens.append(z["tokens"])
                labels.append(z["labels"])
        tokens, labels = np.concatenate(tokens), np.concatenate(labels)
        held = _rng(0, 99).random(len(tokens)) < val_fraction
        keep = ~held if train else held
        if not keep.any():
            raise DataError(f"tokens source: no {'training' if train else 'held-out'} examples")
        self.tokens, self.labels = tokens[keep].astype(np.int32), labels[keep].astype(np.int32)
        self.seed, self.train = seed, train

    @property
    def num_examples(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> dict:
        idx = _epoch_indices(len(self.tokens), self.seed, step * batch_size, batch_size, self.train)
        idx = np.array_split(idx, shard[1])[shard[0]]
        return {"tokens": self.tokens[idx], "label": self.labels[idx]}

    def take(self, idx: np.ndarray) -> dict:
        return {"tokens": self.tokens[idx], "label": self.labels[idx]}


def make_source(
    spec: str,
    *,
    image_size: int,
    channels: int = 3,
    train: bool = True,
    seed: int = 0,
    arrays: tuple[np.ndarray, np.ndarray | None] | None = None,
    val_fraction: float = 0.02,
    data_dir: str | None = None,
    download: bool = False,
):
    """Turn a source spec into a source object (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "sample_photos":
        return PhotoSource(image_size, channels, seed, train)
    if kind == "folder":
        if not rest:
            raise DataError("folder source needs a path: folder:/path/to/images")
        return FolderSource(rest, image_size, channels, seed, train, val_fraction)
    if kind == "arrays":
        if arrays is None:
            raise DataError("the arrays source needs arrays=(images, labels)")
        images, labels = arrays
        return ArraySource(np.asarray(images), labels, image_size, channels, seed, train)
    if kind == "tokens":
        return TokenSource(rest, seed, train, val_fraction)
    if kind == "tfds":
        name, _, split = rest.partition(":")
        if not name:
            raise DataError("tfds source needs a dataset name: tfds:cifar10[:split]")
        split = split or ("train" if train else "test")
        return TfdsSource(name, split, image_size, channels, seed, train, data_dir, download)
    raise DataError(
        f"unknown data source {spec!r}: use sample_photos, folder:PATH, tfds:NAME[:SPLIT], "
        "tokens:PATH or arrays"
    )


def host_batches(source, batch_size: int, start_step: int = 0) -> Iterator[dict]:
    """This process's part of every global batch from ``start_step`` on, prefetched."""
    shard = (jax.process_index(), jax.process_count())
    if isinstance(source, TfdsSource):
        it = source.batches(batch_size, start_step, shard)
    else:
        it = (source.batch(s, batch_size, shard) for s in _count(start_step))
    return _prefetch(it, size=2)


def one_pass(source, batch_size: int) -> Iterator[dict]:
    """Every example of ``source`` once (centre crops; the last batch may be smaller)."""
    if isinstance(source, TfdsSource):
        yield from source.batches(batch_size, 0, (0, 1), one_pass=True)
        return
    n = source.num_examples
    for start in range(0, n, batch_size):
        yield source.take(np.arange(start, min(n, start + batch_size)))


def held_out(source, batch_size: int, total: int) -> Iterator[tuple[dict, int]]:
    """(host batch, how many of its examples count) covering ``total`` held-out examples.

    The last batch may wrap around to the start; only its first ``count`` examples are new.
    """
    batches = host_batches(source, batch_size)
    try:
        for i, host in zip(range(-(-total // batch_size)), batches, strict=False):
            yield host, min(batch_size, total - i * batch_size)
    finally:
        batches.close()


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def _prefetch(it: Iterator, size: int) -> Iterator:
    """Run ``it`` in a background thread, ``size`` items ahead; stops when closed."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in it:
                if not put(item):
                    return
        except Exception as e:  # surfaced to the consumer
            put(e)
        put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


def to_global(host: Iterator[dict], sharding) -> Iterator[dict]:
    """Each process's host batches -> global jax.Arrays laid out by ``sharding``."""
    for local in host:
        yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def global_batches(source, batch_size: int, sharding, start_step: int = 0) -> Iterator[dict]:
    """Global batches (batch axis first, laid out by ``sharding``) from every process."""
    return to_global(host_batches(source, batch_size, start_step), sharding)
