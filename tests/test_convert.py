"""Released tokenizers in and out (vqvae.convert): parity with the originals' own code on
reduced-width models with random weights (tests/data/convert/, written by
tests/reference/make_convert_data.py), refusals, workdirs, exports and round trips."""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from vqvae.convert import ConvertError, convert, import_tensors
from vqvae.convert.__main__ import main
from vqvae.convert.common import flatten, model_params, read_tensors
from vqvae.model import PRESETS, to_model_range

DATA = Path(__file__).parent / "data" / "convert"
FAMILIES = ("taming", "llamagen", "maskgit")
TOL = 1e-4  # relative, float32


def reduced_config(family: str):
    """The preset of ``family`` at the reference data's reduced shapes."""
    c = json.loads((DATA / f"{family}_config.json").read_text())
    if family == "maskgit":
        p = PRESETS["maskgit-f16-1024"]
        net = dataclasses.replace(p.vqgan, ch=c["filters"], ch_mult=tuple(c["channel_multipliers"]),
                                  num_res_blocks=c["num_res_blocks"])  # fmt: skip
        dim, codes = c["embedding_dim"], c["codebook_size"]
    else:
        p = PRESETS["taming-f16-1024" if family == "taming" else "llamagen-vq16"]
        net = dataclasses.replace(p.vqgan, ch=c["ch"], ch_mult=tuple(c["ch_mult"]),
                                  num_res_blocks=c["num_res_blocks"], z_channels=c["z_channels"],
                                  attn_resolutions=(c["image_size"] // 4,))  # fmt: skip
        dim = c.get("embed_dim", c.get("codebook_embed_dim"))
        codes = c.get("n_embed", c.get("codebook_size"))
    q = dataclasses.replace(p.quantizer, num_codes=codes)
    return p.replace(image_size=c["image_size"], vqgan=net, code_dim=dim, quantizer=q)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """{family: a .json model config file of the reduced preset}."""
    d = tmp_path_factory.mktemp("presets")
    out = {}
    for f in FAMILIES:
        out[f] = d / f"{f}.json"
        out[f].write_text(json.dumps(reduced_config(f).to_dict()))
    return out


def weights(family: str) -> dict:
    return read_tensors(DATA / f"{family}_weights.npz")


def reference(family: str) -> dict:
    """The original's outputs, in the package's pixel range [-0.5, 0.5]."""
    o = dict(np.load(DATA / f"{family}_outputs.npz"))
    o["decoded"] = o["decoded"] - 0.5 if family == "maskgit" else o["decoded"] / 2.0
    return o


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _close_ids(model, z: np.ndarray, ids: np.ndarray, ref: np.ndarray) -> None:
    """Ids equal the original's except where two codes tie (distances within 1e-5)."""
    q = model.quantizer
    zz = np.asarray(q.project(jnp.asarray(z)))
    zz = zz.reshape(-1, zz.shape[-1])
    e = np.asarray(q.assignment_codes())
    d = ((zz[:, None, :] - e[None]) ** 2).sum(-1)  # (N, K)
    differ = ids.reshape(-1) != ref.reshape(-1)
    gap = np.abs(d[np.arange(len(d)), ids.reshape(-1)] - d[np.arange(len(d)), ref.reshape(-1)])
    assert np.all(gap[differ] <= 1e-5 * d.max()), f"{differ.sum()} ids differ beyond ties"


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_the_original(family, presets):
    """The converted model reproduces the original's encoder output, code ids and decoded
    image (from the original's ids) on the same images."""
    model, _, _ = import_tensors(family, weights(family), presets[family])
    o = reference(family)
    x = to_model_range(jnp.asarray(o["images"]))
    z = np.asarray(model.encode(x))
    assert rel(z, o["encoded"]) < TOL
    ids = np.asarray(model.encode_to_indices(x))
    assert len(np.unique(o["ids"])) > 8  # the data exercises many codes
    _close_ids(model, z, ids, o["ids"])
    assert rel(model.decode_indices(jnp.asarray(o["ids"])), o["decoded"]) < TOL


def test_torch_files_read_without_torch():
    """torch.save's zip format: dtypes (bfloat16 too), 0-d, strided and offset tensors, and
    an opaque non-tensor object, read without importing torch."""
    got = read_tensors(DATA / "torch_sample.ckpt")
    want = dict(np.load(DATA / "torch_sample_expected.npz"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _one_line(excinfo, *words):
    text = str(excinfo.value)
    assert "\n" not in text
    for w in words:
        assert w in text, text


def test_refuses_truncated_files(tmp_path):
    ckpt = (DATA / "torch_sample.ckpt").read_bytes()
    npz = (DATA / "taming_weights.npz").read_bytes()
    for name, data in [("a.ckpt", ckpt[: len(ckpt) // 2]), ("a.npz", npz[: len(npz) // 2]),
                       ("a.msgpack", _msgpack("maskgit")[:1000])]:  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConvertError) as e:
            read_tensors(tmp_path / name)
        _one_line(e, name)


def test_refuses_another_family_and_a_preset_mismatch(presets):
    with pytest.raises(ConvertError) as e:
        import_tensors("taming", weights("llamagen"), presets["taming"])
    _one_line(e, "llamagen", "not a taming")
    with pytest.raises(ConvertError) as e:
        import_tensors("llamagen", weights("maskgit"), presets["llamagen"])
    _one_line(e, "maskgit")
    with pytest.raises(ConvertError) as e:  # the full-size preset
        import_tensors("taming", weights("taming"), "taming-f16-1024")
    _one_line(e, "tensor ", "taming-f16-1024", "shape")
    t = weights("taming")
    del t["decoder.up.1.block.0.conv2.bias"]
    with pytest.raises(ConvertError) as e:
        import_tensors("taming", t, presets["taming"])
    _one_line(e, "decoder.up.1.block.0.conv2.bias", "missing")
    t = weights("taming") | {"encoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConvertError) as e:
        import_tensors("taming", t, presets["taming"])
    _one_line(e, "encoder.extra.weight", "not in")


def _msgpack(family: str) -> bytes:
    """MaskGIT's own file format: Flax msgpack of {"params": nested}."""
    from flax import serialization, traverse_util

    flat = {tuple(k.split("/")): v for k, v in weights(family).items()}
    return serialization.to_bytes({"params": traverse_util.unflatten_dict(flat)})


@pytest.fixture(scope="module")
def imported(tmp_path_factory, presets):
    """{family: workdir} written by the command line from the originals' formats (MaskGIT's
    msgpack; taming's and LlamaGen's tensors as .safetensors, which torch users share too)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("imported")
    out = {}
    for f in FAMILIES:
        file = d / f"{f}.msgpack"
        if f == "maskgit":
            file.write_bytes(_msgpack(f))
        else:
            file = d / f"{f}.safetensors"
            save_file(weights(f), str(file))
        assert main([f, str(file), "--workdir", str(d / f), "--preset", str(presets[f])]) == 0
        out[f] = d / f
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_workdir_tokenizes_like_the_original(family, imported):
    import hashlib

    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(imported[family])
    o = reference(family)
    ids = tok.encode(o["images"])
    agree = (ids == o["ids"]).mean()
    assert agree > 0.99, agree  # ties aside (checked exactly in the parity test)
    src = tok.meta["source"]
    file = Path(src["file"])
    assert (
        src["family"] == family and src["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    )
    assert src["converter"].startswith("vqvae.convert")


def test_command_line_errors_are_one_line(tmp_path, capsys, presets):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["taming", str(bad), "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "x.ckpt" in err


@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_export_safetensors_and_read_it_with_numpy(family, imported, tmp_path):
    """model.safetensors + config.json load back bit for bit, and NumPy alone (with the
    safetensors NumPy API) turns token ids into the tokenizer's code vectors."""
    from safetensors.numpy import load_file

    from vqvae.convert.export import load_export
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(imported[family])
    out = tmp_path / "export"
    assert main(["export", str(imported[family]), "--to", str(out)]) == 0
    model, info = load_export(out)
    again = Tokenizer(model, {"model": info["model"]})
    images = reference(family)["images"]
    np.testing.assert_array_equal(again.encode(images), tok.encode(images))
    a, b = model_params(model), _params_of(tok)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # without the package: the codebook lookup in NumPy
    tensors = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    codes = tensors["quantizer.codebook"]
    assert codes.shape == (cfg["quantizer"]["num_codes"], cfg["quantizer"]["codebook_dim"])
    if cfg["quantizer"]["normalize"]:
        codes = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    ids = tok.encode(images)
    np.testing.assert_allclose(codes[ids], tok.codebook[ids], rtol=1e-6, atol=1e-7)


def _params_of(tok) -> dict:
    from flax import nnx

    return {tuple(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(tok._state.filter(nnx.Param))}  # fmt: skip


@pytest.mark.parametrize("family", ["taming", "llamagen"])
def test_round_trip_through_the_original_layout(family, imported, tmp_path, presets):
    """export --to-FAMILY gives back the original's tensors bit for bit, and importing that
    file gives the workdir's parameters bit for bit."""
    file = tmp_path / f"{family}.safetensors"
    assert main(["export", str(imported[family]), f"--to-{family}", str(file)]) == 0
    back = read_tensors(file)
    orig = {k: v for k, v in weights(family).items()
            if not k.startswith(("loss.", "quantize.codebook_used"))}  # fmt: skip
    assert set(back) == set(orig)
    for k, v in orig.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    w2 = tmp_path / "again"
    convert(family, file, w2, presets[family])
    from vqvae.tokenizer import Tokenizer

    a, b = _params_of(Tokenizer.load(w2)), _params_of(Tokenizer.load(imported[family]))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_flatten_joins_nested_names():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}, "/") == {"a/b": 1, "a/c/d": 2}
