"""The Tokenizer API and the token/codebook export, on a tiny trained checkpoint."""

import json

import numpy as np
import pytest

from vqvae.checkpoint import CheckpointError, load_model
from vqvae.data import local_examples, make_source
from vqvae.export import export_codebook, export_tokens
from vqvae.model import to_model_range, to_uint8
from vqvae.tokenizer import Tokenizer

from .conftest import photos


@pytest.fixture(scope="module")
def tok(trained10):
    return Tokenizer.load(trained10)


def _images(n, size=16):
    return photos(n, size)


def test_load_from_workdir_or_checkpoint_folder(trained10, tok):
    assert tok.vocab_size == 32 and tok.downsample_factor == 4 and tok.image_size == 16
    assert tok.grid_shape() == (4, 4) and tok.grid_shape(32) == (8, 8)
    assert tok.codebook.shape == (32, 8) and tok.codebook.dtype == np.float32
    same = Tokenizer.load(trained10 / "checkpoints" / "10")
    np.testing.assert_array_equal(same.codebook, tok.codebook)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.load(trained10 / "nowhere")


def test_round_trip_equals_the_models_reconstruction(trained10, tok):
    x = _images(12)
    tokens = tok.encode(x)
    assert tokens.shape == (12, 4, 4) and tokens.dtype == np.int32
    model, _ = load_model(trained10)
    expected = np.asarray(to_uint8(model(to_model_range(x)).reconstruction))
    decoded = tok.decode(tokens)
    assert decoded.dtype == np.uint8 and decoded.shape == x.shape
    assert np.abs(decoded.astype(int) - expected).max() <= 1  # rounding at most
    assert (decoded == expected).mean() > 0.999
    # floats in the training range give the same tokens as uint8
    np.testing.assert_array_equal(tok.encode(np.asarray(to_model_range(x))), tokens)


def test_any_batch_size_gives_the_same_tokens(tok):
    x = _images(300)  # above the largest bucket: split and padded
    whole = tok.encode(x)
    assert whole.shape == (300, 4, 4)
    np.testing.assert_array_equal(tok.encode(x[:1])[0], whole[0])
    np.testing.assert_array_equal(tok.encode(x[5:14]), whole[5:14])
    big = tok.encode(_images(2, size=32))  # any multiple of the downsampling factor
    assert big.shape == (2, 8, 8)


def test_bad_input_is_a_value_error(tok):
    with pytest.raises(ValueError, match="1 channels; the tokenizer takes 3"):
        tok.encode(np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="18x18 is not divisible by .* factor 4"):
        tok.encode(np.zeros((2, 18, 18, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        tok.encode(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        tok.decode(np.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        tok.decode(np.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="must not be empty"):
        tok.decode(np.zeros((1, 0, 4), np.int32))
    x = np.asarray(to_model_range(_images(2)))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            tok.encode(np.where(np.arange(x.size).reshape(x.shape) == 7, bad, x))
    with pytest.raises(
        ValueError, match=r"training range \[-0.5, 0.5\], got values in \[\d+, \d+\].*uint8"
    ):
        tok.encode(np.round((x + 0.5) * 255).astype(np.float32))  # 0..255 as floats
    tok.encode(x * 1.5)  # overshoot of the training range is still that convention


def test_token_export_reads_back_with_plain_numpy(tok, tmp_path):
    out = tmp_path / "tokens"
    lines = []
    manifest = export_tokens(tok, "sample_photos", out, shard_size=2000, log=lines.append)
    assert lines and lines[-1].startswith("tokens: 4340/4340 images")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["vocab_size"] == 32 and manifest["grid_shape"] == [4, 4]
    assert manifest["num_examples"] == 4340 and len(manifest["shards"]) == 3
    tokens = np.concatenate([np.load(out / s["file"])["tokens"] for s in manifest["shards"]])
    labels = np.concatenate([np.load(out / s["file"])["labels"] for s in manifest["shards"]])
    source = make_source({"source": "sample_photos"}, image_size=16)
    images = np.concatenate([b["image"] for b in local_examples(source, 500)])
    np.testing.assert_array_equal(tokens, tok.encode(images))
    assert labels.min() == 0 and manifest["has_labels"]  # sample_photos: label = photo
    np.testing.assert_array_equal(np.load(out / "codebook.npy"), tok.codebook)
    assert manifest["codebook"]["sha256"] == tok.codebook_sha256()
    with pytest.raises(FileExistsError, match="already exists"):
        export_tokens(tok, "sample_photos", out)


def test_interrupted_export_leaves_nothing(tok, tmp_path):
    def stop(_line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_tokens(tok, "sample_photos", tmp_path / "tokens", batch_size=64, log=stop)
    assert list(tmp_path.iterdir()) == []


def test_codebook_export(tok, tmp_path):
    export_codebook(tok, tmp_path / "cb")
    np.testing.assert_array_equal(np.load(tmp_path / "cb" / "codebook.npy"), tok.codebook)
    with np.load(tmp_path / "cb" / "codebook.npz") as z:
        np.testing.assert_array_equal(z["codebook"], tok.codebook)
        assert str(z["sha256"]) == tok.codebook_sha256()
