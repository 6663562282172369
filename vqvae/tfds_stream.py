"""tensorflow-datasets sources: the one module that imports tensorflow-datasets (lazily).

A dataset prepared as array_record is random access (``sources.TfdsRecords``) and goes
through the grain pipeline like a folder. One prepared as TFRecord is read by tf.data
(``TfdsStream``), which decodes in parallel itself: sequential, so a resumed run skips the
batches it has seen.
"""

from collections.abc import Iterator

from vqvae.sources import DataError, TfdsRecords, fit_channels


def source(rest: str, data, *, image_size: int, channels: int, train: bool, seed: int, **_):
    """The ``tfds:`` entry of ``vqvae.sources.SOURCES``."""
    return open_tfds(data, image_size, channels, train, seed)


def open_tfds(data, image_size: int, channels: int, train: bool, seed: int):
    """``tfds:NAME[:SPLIT]`` -> TfdsRecords (array_record) or TfdsStream (TFRecord)."""
    name, _, split = data["source"].partition(":")[2].partition(":")
    if not name:
        raise DataError("tfds source needs a dataset name: tfds:cifar10[:split]")
    split = split or ("train" if train else "test")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "tfds sources need tensorflow-datasets: pip install 'vqvae[tfds]', or use "
            "folder:PATH / sample_photos"
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data.get("data_dir") or None)
        if data.get("download", False):
            builder.download_and_prepare()
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            return TfdsRecords(builder, split, image_size, channels)
        return TfdsStream(builder, split, image_size, channels, seed, train)
    except DataError:
        raise
    except Exception as e:
        raise _unavailable(name, split, data.get("data_dir") or "", e) from None


# datasets tfds cannot fetch itself, and the files it needs for them
MANUAL_FILES = {"imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"}


def _unavailable(name: str, split: str, data_dir: str, error: Exception) -> DataError:
    """One line for a dataset that is not prepared: tfds's reason (shortened at a word),
    and how to prepare it: `tfds build`, after a manual download where tfds needs one."""
    import textwrap

    import tensorflow_datasets as tfds

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = textwrap.shorten(first.split(". ")[0], 160, placeholder=" ...")  # its own advice goes
    root = data_dir or "~/tensorflow_datasets"
    flag = f" --data_dir {data_dir}" if data_dir else ""
    try:
        manual = bool(getattr(tfds.builder_cls(name), "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
    except Exception:  # noqa: BLE001  (an unknown name: tfds's reason says so)
        manual = False
    if manual or name in MANUAL_FILES:
        files = MANUAL_FILES.get(name, "the files its tfds catalog page lists")
        how = (
            f"{name} needs a manual download (tfds cannot fetch it): put {files} in "
            f"{root}/downloads/manual/, then run `tfds build {name}{flag}`"
        )
    else:
        how = (
            f"Prepare it once with internet: `tfds build {name}{flag}` (or set "
            "config.data.download=True)"
        )
    return DataError(
        f"tfds:{name}:{split} is not prepared ({reason}). {how}; or use "
        "--config.data.source=folder:/path/to/images or sample_photos"
    )


class TfdsStream:
    """A TFRecord tfds dataset read by tf.data: this process's part, decoded in parallel."""

    parallel = False  # tf.data runs its own parallel decoding

    def __init__(self, builder, split, image_size, channels, seed, train):
        try:
            import tensorflow as tf
        except ImportError as e:
            raise DataError(
                "TFRecord tfds datasets need tensorflow-cpu: pip install 'vqvae[tfds]'"
            ) from e
        import jax
        import tensorflow_datasets as tfds

        tf.config.set_visible_devices([], "GPU")  # TensorFlow must leave the GPU to JAX
        self.tf, self.image_size, self.channels = tf, image_size, channels
        self.split, self.seed, self.train = split, seed, train
        self.process = jax.process_index(), jax.process_count()
        part = split if self.process[1] == 1 else tfds.even_splits(split, self.process[1])
        part = part if self.process[1] == 1 else part[self.process[0]]
        # Opened once, here: it fails fast on an unprepared dataset and counts its examples.
        # The training order shuffles files (seeded: a resumed run sees the same data).
        self.in_order = builder.as_dataset(split=part, shuffle_files=False)
        self.shuffled = self.in_order
        if train:
            config = tfds.ReadConfig(shuffle_seed=seed)
            self.shuffled = builder.as_dataset(split=part, shuffle_files=True, read_config=config)
        self.num_examples = int(builder.as_dataset(split=split).cardinality())
        if self.num_examples < 0:  # unknown to tf.data: ask the dataset's metadata
            self.num_examples = builder.info.splits[split].num_examples

    def __len__(self) -> int:
        return self.num_examples

    def batches(self, local_batch: int, start_step: int, one_pass: bool) -> Iterator[dict]:
        """This process's batches of ``local_batch`` (its part of the split where there are
        several processes); ``one_pass``: every example once, in order, the last batch
        smaller. Training skips the ``start_step`` batches seen."""
        tf, size = self.tf, self.image_size
        ds = self.in_order if one_pass else self.shuffled

        def prep(ex):
            img = ex["image"]
            shape = tf.shape(img)
            side = tf.minimum(shape[0], shape[1])
            img = tf.image.resize_with_crop_or_pad(img, side, side)
            img = tf.cast(tf.image.resize(img, (size, size), antialias=True), tf.uint8)
            label = tf.cast(ex.get("label", tf.constant(-1)), tf.int32)
            return {"image": img, "label": label}

        ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
        if not one_pass:
            ds = ds.shuffle(10_000, seed=self.seed).repeat() if self.train else ds.repeat()
        ds = ds.batch(local_batch, drop_remainder=not one_pass)
        if not one_pass:
            ds = ds.skip(start_step)
        for b in ds.prefetch(2).as_numpy_iterator():
            yield {"image": fit_channels(b["image"], self.channels), "label": b["label"]}

    def name(self, index: int) -> str:
        return f"{self.split}[{index}]"
