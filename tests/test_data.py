"""Sources and the grain pipeline: epochs, process shards, resume, workers, bad files, tfds."""

import hashlib
import logging
import time

import jax
import numpy as np
import pytest
from PIL import Image

from vqvae import data as data_lib
from vqvae.data import DataError, TrainBatches, local_examples, make_source, train_dataset
from vqvae.sharding import batch_sharding, make_mesh
from vqvae.sources import FolderSource, Source


def _write_folder(root, per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(img).save(root / c / f"{i}{suffix}")
    return root


def _arrays(n=10, size=4):
    """n images of one grey level each (the level is the example's id) and labels 0..n-1."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
        (n, size, size, 1), np.uint8
    )
    return images, np.arange(n)


def src(spec, **kw):
    data = {"source": spec, "val_fraction": kw.pop("val_fraction", 0.02)}
    return make_source(data, **kw)


def test_every_source_meets_the_interface(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    for s in (
        src("sample_photos", image_size=16),
        src(f"folder:{root}", image_size=16, val_fraction=0.0),
        src("arrays", image_size=4, channels=1, arrays=_arrays()),
    ):
        assert isinstance(s, Source) and len(s) > 0
        example = s.decode(s[0], None)
        assert example["image"].dtype == np.uint8 and example["label"].dtype == np.int32
        assert isinstance(s.name(0), str)


def test_sample_photos_are_offline_real_and_held_out():
    train = src("sample_photos", image_size=32)
    val = src("sample_photos", image_size=32, train=False)
    assert len(train.photos) >= 10 and len(train) > 1000
    assert len(val) < len(train) / 5  # the bottom eighth of each photo
    batch = next(local_examples(val, 16))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].std() > 20  # real photos
    grey = src("sample_photos", image_size=16, channels=1)
    assert grey.decode(grey[0], None)["image"].shape == (16, 16, 1)


def _ids(batch):
    """Example ids of an arrays-source batch (each image is its id's grey level)."""
    return batch["image"][:, 0, 0, 0].astype(int)


def _stream(source, global_batch, seed, process, steps, start=0):
    it = iter(train_dataset(source, global_batch, seed, process)[start:].to_iter_dataset())
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("n,global_batch", [(10, 4), (12, 6)])
def test_each_epoch_gives_every_example_once_for_one_and_two_processes(n, global_batch):
    source = src("arrays", image_size=4, channels=1, arrays=_arrays(n))
    steps = -(-3 * n // global_batch)  # three epochs, or a little more
    one = [_ids(b) for b in _stream(source, global_batch, 7, (0, 1), steps)]
    parts = [[_ids(b) for b in _stream(source, global_batch, 7, (p, 2), steps)] for p in (0, 1)]
    for s in range(steps):
        # the two processes' rows, stacked, are the one-process global batch: no overlap
        np.testing.assert_array_equal(np.concatenate([parts[0][s], parts[1][s]]), one[s])
    flat = np.concatenate(one)
    epochs = [sorted(flat[e * n : (e + 1) * n].tolist()) for e in range(3)]
    assert epochs == [list(range(n))] * 3
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # reshuffled every epoch
    other_seed = np.concatenate([_ids(b) for b in _stream(source, global_batch, 8, (0, 1), steps)])
    assert not np.array_equal(flat, other_seed)


def _checksums(batches, steps):
    out = []
    for _ in range(steps):
        host = batches.next_host()
        out.append(hashlib.sha256(b"".join(v.tobytes() for v in host.values())).hexdigest())
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_reads_exactly_the_batches_of_an_uninterrupted_one(workers, tmp_path):
    import jax.numpy as jnp

    from vqvae.checkpoint import Checkpoints

    data = {"source": "sample_photos", "workers": workers}
    source = src("sample_photos", image_size=16)
    sharding = batch_sharding(make_mesh())
    with TrainBatches(source, data, 16, 3, sharding, 0) as straight:
        expected = _checksums(straight, 12)
        assert len(set(expected)) == 12
    # a run stopped after step 6 keeps grain's iterator state in its checkpoint
    ckpt = Checkpoints(tmp_path)
    with TrainBatches(source, data, 16, 3, sharding, 0) as first:
        assert _checksums(first, 6) == expected[:6]
        meta = {"data_position": first.position()}
        tree = {"x": jnp.zeros(2)}
        ckpt.save(6, tree, tree, meta, data_iterator=first.grain_iterator)
        ckpt.wait()
    saved = ckpt.meta(6)["data_position"]
    with TrainBatches(source, data, 16, 3, sharding, 6, saved) as resumed:
        assert resumed.restore_state  # same layout: grain's own state applies
        assert ckpt.restore_data(6, resumed.grain_iterator)
        assert _checksums(resumed, 6) == expected[6:]
    other = {**data, "workers": 1 - workers // 2}
    with TrainBatches(source, other, 16, 3, sharding, 6, saved) as moved:
        assert not moved.restore_state  # another worker count: positioned from the step
        assert _checksums(moved, 6) == expected[6:]


def test_corrupt_files_are_skipped_inside_workers_and_counted(tmp_path, caplog):
    root = _write_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    source = src(f"folder:{root}", image_size=16, val_fraction=0.0)
    assert len(source) == 13
    data = {"source": f"folder:{root}", "workers": 2}
    sharding = batch_sharding(make_mesh())
    with (
        caplog.at_level(logging.WARNING, logger="vqvae.data"),
        TrainBatches(source, data, 8, 0, sharding, 0) as batches,
    ):
        hosts = [batches.next_host() for _ in range(4)]  # 32 draws: every file at least twice
        assert batches.workers == 2
        bad = [i for i, f in enumerate(source.files) if f.endswith("broken.png")]
        assert batches.unreadable == set(bad)
    for b in hosts:
        assert b["image"].shape == (8, 16, 16, 3) and set(b["label"].tolist()) <= {0, 1}
    warnings = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(warnings) == 1  # named once, however often it is drawn
    # a pass over every example leaves it out, and says which it was
    skipped = set()
    everything = np.concatenate([b["label"] for b in local_examples(source, 5, 0, skipped)])
    assert len(everything) == 12 and skipped == {str(root / "cat" / "broken.png")}


def test_folder_source_reads_classes_and_a_stable_disjoint_split(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=30)
    (root / "notes.txt").write_text("ignored: not an image suffix")
    train = FolderSource(str(root), 16, 3, train=True, val_fraction=0.3)
    val = FolderSource(str(root), 16, 3, train=False, val_fraction=0.3)
    assert train.classes == ["cat", "dog"]
    assert not set(train.files) & set(val.files)
    assert len(train.files) + len(val.files) == 60 and 5 <= len(val.files) <= 30
    again = FolderSource(str(root), 16, 3, train=False, val_fraction=0.3)
    assert again.files == val.files
    first = next(local_examples(val, 4))["image"]
    np.testing.assert_array_equal(first, next(local_examples(again, 4))["image"])


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        src(f"folder:{tmp_path / 'missing'}", image_size=16)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        src(f"folder:{tmp_path / 'empty'}", image_size=16)
    with pytest.raises(DataError, match="needs a path"):
        src("folder:", image_size=16)
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        src("imagenet", image_size=16)


def test_held_out_batches_are_global_weighted_and_padded():
    assert jax.device_count() == 8
    source = src("arrays", image_size=4, channels=1, arrays=_arrays(10))
    sharding = batch_sharding(make_mesh())
    batches = list(data_lib.held_out(source, 8, 10, sharding))
    assert len(batches) == 2
    (g0, h0), (g1, h1) = batches
    assert g0["image"].shape == (8, 4, 4, 1) and len(g0["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g1["weight"]), [1, 1, 0, 0, 0, 0, 0, 0])
    ids = np.concatenate([_ids(h0), _ids(h1)[:2]])
    np.testing.assert_array_equal(ids, np.arange(10))  # in order, each once


def test_tfds_source_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    sharding = batch_sharding(make_mesh())
    with tfds.testing.mock_data(num_examples=40):
        train = src("tfds:cifar10", image_size=16, train=True)
        data = {"source": "tfds:cifar10"}
        with TrainBatches(train, data, 8, 0, sharding, 0) as it:
            batch = it.next_host()
            assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0
            first_three = [batch["image"]] + [it.next_host()["image"] for _ in range(2)]
        with TrainBatches(train, data, 8, 0, sharding, 2) as resumed:  # skips what it saw
            np.testing.assert_array_equal(resumed.next_host()["image"], first_three[2])
        val = src("tfds:cifar10", image_size=16, train=False)
        assert len(val) == 40
        held = list(data_lib.held_out(val, 16, 40, sharding))
        assert sum(float(np.asarray(g["weight"]).sum()) for g, _ in held) == 40  # one pass


def test_tfds_unprepared_fails_fast_with_advice(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.time()
    with pytest.raises(DataError, match="tfds build cifar10") as e:
        make_source({"source": "tfds:cifar10", "data_dir": str(tmp_path)}, image_size=32)
    assert time.time() - t0 < 20  # no download attempts, no retries
    assert "folder:" in str(e.value) and "\n" not in str(e.value)


def _png16(path, values, color_type):
    """A 16-bit PNG of ``values`` (H, W) or (H, W, C) uint16: grey 0, RGB 2, grey+alpha 4."""
    import struct
    import zlib

    h, w = values.shape[:2]
    rows = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("color_type,shape", [(0, (8, 8)), (2, (8, 8, 3)), (4, (8, 8, 2))])
def test_16_bit_pngs_keep_their_values(tmp_path, color_type, shape):
    from vqvae.sources import decode_image

    values = np.random.default_rng(color_type).integers(0, 65536, shape, dtype=np.uint16)
    _png16(tmp_path / "x.png", values, color_type)
    got = decode_image(tmp_path / "x.png", 8, 3, None)  # no resampling at the same size
    grey = values if values.ndim == 2 else values[..., 0]
    expected = values[..., :3] if color_type == 2 else np.repeat(grey[..., None], 3, -1)
    np.testing.assert_array_equal(got, (expected >> 8).astype(np.uint8))  # the top 8 bits
    assert got.std() > 30  # not the all-white image clipping makes


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path, monkeypatch):
    import skimage.data

    from vqvae import sources

    big = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((2400, 1800), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    seen = []
    real = sources._to_8bit
    monkeypatch.setattr(sources, "_to_8bit", lambda im, c: seen.append(im.size) or real(im, c))
    crop = sources.decode_image(tmp_path / "big.jpg", 64, 3, None)
    assert seen == [(300, 225)]  # libjpeg decoded it at 1/8 scale, both sides still >= 64
    with Image.open(tmp_path / "big.jpg") as im:  # the same crop from the full decode
        box = (300, 0, 2100, 1800)
        full = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR, box=box))
    assert np.abs(crop.astype(int) - full).mean() < 6  # a misplaced crop: tens of levels


def test_tfds_array_record_datasets_go_through_the_grain_pipeline(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from vqvae.sources import TfdsRecords

    array_record = tfds.core.FileFormat.ARRAY_RECORD
    monkeypatch.setattr(tfds.core.DatasetInfo, "file_format", property(lambda self: array_record))
    with tfds.testing.mock_data(num_examples=24):
        train = src("tfds:cifar10", image_size=16)
        assert isinstance(train, TfdsRecords) and train.parallel and len(train) == 24
        data = {"source": "tfds:cifar10", "workers": 0}
        with TrainBatches(train, data, 8, 0, batch_sharding(make_mesh()), 0) as it:
            labels = np.concatenate([it.next_host()["label"] for _ in range(3)])
        assert len(labels) == 24 and labels.dtype == np.int32  # one epoch, random access
        val = src("tfds:cifar10", image_size=16, train=False)
        batch = next(local_examples(val, 8))
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_tfds_unprepared_message_is_whole_and_names_a_manual_download(tmp_path, name):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        make_source({"source": f"tfds:{name}", "data_dir": str(tmp_path)}, image_size=32)
    msg = str(e.value)
    assert "\n" not in msg and f"`tfds build {name} --data_dir {tmp_path}`" in msg
    reason = msg[msg.index("(") + 1 : msg.index(")")]
    assert reason.endswith(str(tmp_path)) or reason.endswith(" ..."), reason  # whole words
    if name == "imagenet2012":  # tfds cannot fetch ImageNet: where its files go
        assert "manual download" in msg and "ILSVRC2012_img_val.tar" in msg
        assert f"{tmp_path}/downloads/manual/" in msg
    else:
        assert "manual" not in msg


def test_val_source_is_the_held_out_set_in_full(tmp_path):
    train_root = _write_folder(tmp_path / "train", per_class=6)
    val_root = _write_folder(tmp_path / "val", per_class=3)
    data = {"source": f"folder:{train_root}", "val_fraction": 0.5, "val_source": ""}
    held = make_source(data, image_size=16, train=False)
    assert 0 < len(held) < 12  # the held-out half of the training folder
    data["val_source"] = f"folder:{val_root}"
    held = make_source(data, image_size=16, train=False)
    assert sorted(held.files) == sorted(str(p) for p in val_root.rglob("*.*"))  # all 6
    alone = make_source({**data, "val_source": ""}, image_size=16, train=True)
    assert make_source(data, image_size=16, train=True).files == alone.files  # training: same
    with pytest.raises(DataError, match="cannot be used whole"):
        make_source({**data, "val_source": "sample_photos"}, image_size=16, train=False)


def test_a_tiny_held_out_set_is_warned_about_with_its_size(tmp_path, caplog):
    from tests.conftest import config
    from vqvae.trainer import Trainer

    root = _write_folder(tmp_path / "imgs", per_class=20)
    cfg = config(**{"data.source": f"folder:{root}", "data.val_fraction": 0.1})
    with caplog.at_level(logging.WARNING):
        n = len(Trainer(cfg, tmp_path / "w").eval_source)
    warned = [r.getMessage() for r in caplog.records if "held-out set" in r.getMessage()]
    assert len(warned) == 1 and f"only {n} example(s)" in warned[0] and n < 32, warned
    caplog.clear()
    cfg.data.val_source = f"folder:{root}"  # all 40 files: no longer tiny
    with caplog.at_level(logging.WARNING):
        assert len(Trainer(cfg, tmp_path / "w2").eval_source) == 40
    assert not [r for r in caplog.records if "held-out set" in r.getMessage()]
