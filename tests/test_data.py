"""Data sources: photos, folders (with bad files), arrays, tfds (mocked) and sharded batches."""

import logging
import time

import jax
import numpy as np
import pytest
from PIL import Image

from vqvae.data import DataError, FolderSource, global_batches, host_batches, make_source
from vqvae.sharding import batch_sharding, make_mesh


def _write_folder(root, per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(img).save(root / c / f"{i}{suffix}")
    return root


def test_sample_photos_are_offline_deterministic_and_held_out():
    src = make_source("sample_photos", image_size=32, seed=3)
    a, b = src.batch(5, 16), src.batch(5, 16)
    assert a["image"].shape == (16, 32, 32, 3) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])  # same step, same batch
    assert not np.array_equal(a["image"], src.batch(6, 16)["image"])
    assert len(src.photos) >= 10 and src.num_examples > 1000
    assert a["image"].std() > 20  # real photographs, not flat tiles
    val = make_source("sample_photos", image_size=32, train=False)
    assert val.num_examples < src.num_examples / 5  # the bottom eighth of each photo
    grey = make_source("sample_photos", image_size=16, channels=1)
    assert grey.batch(0, 4)["image"].shape == (4, 16, 16, 1)


def test_folder_source_reads_classes_and_skips_a_corrupt_file(tmp_path, caplog):
    root = _write_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    src = FolderSource(str(root), image_size=16, channels=3, val_fraction=0.0)
    assert src.num_examples == 13 and src.classes == ["cat", "dog"]
    with caplog.at_level(logging.WARNING, logger="vqvae.data"):
        batches = [src.batch(s, 8) for s in range(4)]  # 32 draws: every file at least twice
    for b in batches:
        assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
        assert set(b["label"].tolist()) <= {0, 1}
    assert src.skipped == {str(root / "cat" / "broken.png")}
    warnings = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(warnings) == 1  # one warning naming the file, however often it is drawn


def test_folder_source_split_is_stable_and_disjoint(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=30)
    train = FolderSource(str(root), 16, 3, train=True, val_fraction=0.3)
    val = FolderSource(str(root), 16, 3, train=False, val_fraction=0.3)
    assert not set(train.files) & set(val.files)
    assert len(train.files) + len(val.files) == 60 and 5 <= len(val.files) <= 30
    again = FolderSource(str(root), 16, 3, train=False, val_fraction=0.3)
    assert again.files == val.files
    np.testing.assert_array_equal(val.batch(0, 4)["image"], again.batch(0, 4)["image"])


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_source(f"folder:{tmp_path / 'missing'}", image_size=16)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        make_source(f"folder:{tmp_path / 'empty'}", image_size=16)
    with pytest.raises(DataError, match="needs a path"):
        make_source("folder:", image_size=16)
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        make_source("imagenet", image_size=16)


def test_array_source_epochs_cover_every_example_once():
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((10, 4, 4, 1), np.uint8)
    src = make_source("arrays", image_size=4, channels=1, arrays=(images, np.arange(10)))
    seen = np.concatenate([src.batch(s, 5)["label"] for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))  # one shuffled epoch
    first = src.batch(0, 5, shard=(0, 2))["label"]
    second = src.batch(0, 5, shard=(1, 2))["label"]
    np.testing.assert_array_equal(np.concatenate([first, second]), src.batch(0, 5)["label"])
    floats = make_source("arrays", image_size=4, channels=1, arrays=(images / 255.0, None))
    np.testing.assert_array_equal(floats.batch(0, 5)["image"], src.batch(0, 5)["image"])


def test_global_batches_are_sharded_over_the_mesh():
    assert jax.device_count() == 8
    mesh = make_mesh()
    src = make_source("sample_photos", image_size=16)
    batch = next(global_batches(src, 16, batch_sharding(mesh), start_step=2))
    assert batch["image"].shape == (16, 16, 16, 3)
    assert len(batch["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(batch["image"]), src.batch(2, 16)["image"])
    it = host_batches(src, 16, start_step=7)
    np.testing.assert_array_equal(next(it)["image"], src.batch(7, 16)["image"])
    it.close()  # stops the prefetch thread


def test_tfds_source_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        train = make_source("tfds:cifar10", image_size=16, train=True)
        batch = next(host_batches(train, 8))
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0
        it = host_batches(train, 8)
        first_three = [next(it)["image"] for _ in range(3)]
        again = make_source("tfds:cifar10", image_size=16, train=True)
        resumed = next(host_batches(again, 8, start_step=2))  # same order after a restart
        np.testing.assert_array_equal(resumed["image"], first_three[2])
        val = make_source("tfds:cifar10", image_size=16, train=False)
        assert val.num_examples == 40
        assert sum(len(b["image"]) for b in host_batches(val, 8)) == 40  # one pass, held out


def test_tfds_unprepared_fails_fast_with_advice(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.time()
    with pytest.raises(DataError, match="tfds build cifar10") as e:
        make_source("tfds:cifar10", image_size=32, data_dir=str(tmp_path))
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
    from vqvae.data import decode_image

    values = np.random.default_rng(color_type).integers(0, 65536, shape, dtype=np.uint16)
    _png16(tmp_path / "x.png", values, color_type)
    got = decode_image(tmp_path / "x.png", 8, 3, None)  # no resampling at the same size
    grey = values if values.ndim == 2 else values[..., 0]
    expected = values[..., :3] if color_type == 2 else np.repeat(grey[..., None], 3, -1)
    np.testing.assert_array_equal(got, (expected >> 8).astype(np.uint8))  # the top 8 bits
    assert got.std() > 30  # not the all-white image clipping makes


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path, monkeypatch):
    from vqvae import data as data_lib

    big = np.asarray(Image.fromarray(_photo()).resize((2400, 1800), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    seen = []
    real = data_lib._to_8bit
    monkeypatch.setattr(data_lib, "_to_8bit", lambda im, c: seen.append(im.size) or real(im, c))
    crop = data_lib.decode_image(tmp_path / "big.jpg", 64, 3, None)
    assert seen == [(300, 225)]  # libjpeg decoded it at 1/8 scale, both sides still >= 64
    with Image.open(tmp_path / "big.jpg") as im:  # the same crop from the full decode
        side = 1800
        full = np.asarray(
            im.convert("RGB").resize((64, 64), Image.BICUBIC, box=(300, 0, 2100, side))
        )
    assert np.abs(crop.astype(int) - full).mean() < 6  # a misplaced crop: tens of levels


def _photo():
    import skimage.data

    return skimage.data.astronaut()
