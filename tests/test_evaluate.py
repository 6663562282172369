"""python -m vqvae.evaluate: the record on a trained checkpoint, --pairs, the protocols, and
the one-line errors. The networks have the parity data's random weights (real layouts)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqvae import evaluate as ev
from vqvae.metrics import ReconstructionMetrics
from vqvae.metrics.fid import protocol

from .reference.metrics_parity import random_state_dict

PARITY = Path(__file__).parent / "data" / "metrics" / "parity.npz"
SIZE = 80  # a shrunk FID input (the layout is unchanged), to keep the tests fast


@pytest.fixture(scope="module")
def parity():
    with np.load(PARITY) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def weights(parity, tmp_path_factory):
    """(inception.npz, lpips_alex.npz, lpips_vgg.npz) converted from the reference's random
    weights (AlexNet: the cheaper backbone, for 31 px and up; VGG16 for the 16 px model)."""
    from vqvae import lpips as vgg_lpips
    from vqvae.metrics import inception, perceptual

    d = tmp_path_factory.mktemp("weights")
    shapes = json.loads(str(parity["inception_shapes"]))
    np.savez(d / "inception.npz", **inception.convert(random_state_dict(shapes)))
    alex = random_state_dict(json.loads(str(parity["lpips_alex_shapes"])))
    lin = {k[len("lpips_alex_") :]: v for k, v in parity.items() if k.startswith("lpips_alex_lin")}
    np.savez(d / "lpips.npz", **perceptual.convert_alex(alex, lin))
    vgg = random_state_dict(json.loads(str(parity["lpips_vgg_shapes"])))
    lin = {k[len("lpips_vgg_") :]: v for k, v in parity.items() if k.startswith("lpips_vgg_lin")}
    np.savez(d / "lpips_vgg.npz", **vgg_lpips.convert(vgg, lin))
    return d / "inception.npz", d / "lpips.npz", d / "lpips_vgg.npz"


def test_evaluate_a_trained_checkpoint_writes_the_whole_record(
    trained10, weights, tmp_path, capsys
):
    out = tmp_path / "results.json"
    inception, _, lpips = weights
    args = ["--workdir", str(trained10), "--num", "6", "--batch-size", "6", "--quiet"]
    args += ["--inception", str(inception), "--lpips", str(lpips), "--fid-size", str(SIZE)]
    args += ["--frechet", "gram"]  # exact for 6 images, and seconds faster than a 2048-d root
    ev.main([*args, "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["mode"] == "checkpoint" and r["checkpoint"] == str(Path(trained10).resolve())
    assert r["step"] == 10 and r["source"] == "sample_photos" and r["images"] == 6
    assert r["protocol"]["name"] == f"pytorch-fid[frechet=gram,size={SIZE}]"
    assert r["protocol"]["resize"] == "torch" and r["protocol"]["round_uint8"] is True
    m = r["metrics"]
    for key in ("rfid", "psnr", "ssim", "lpips"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), key
    assert m["lpips_backbone"] == "vgg16" and m["rfid"] > 0
    cb = m["codebook"]
    assert cb["vocab_size"] == 32 and 0 < cb["usage"] <= 1 and 1 <= cb["perplexity"] <= 32
    assert cb["perplexity"] == pytest.approx(2 ** cb["entropy_bits"])
    assert r["images_per_second"] > 0 and r["skipped"] == {}
    assert len(r["weights"]["inception_sha256"]) == 64
    assert "rFID" in capsys.readouterr().out

    # PSNR/SSIM equal the accumulator on the tokenizer's own uint8 reconstructions
    from vqvae.data import local_examples
    from vqvae.sources import make_source
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(trained10)
    source = make_source({"source": "sample_photos"}, image_size=16, train=False)
    examples = local_examples(source, 6)
    x = next(examples)["image"]
    examples.close()
    acc = ReconstructionMetrics()
    acc.update(x, tok.reconstruct(x))
    assert m["psnr"] == pytest.approx(acc.result()["psnr"], rel=1e-12)
    assert m["ssim"] == pytest.approx(acc.result()["ssim"], rel=1e-12)


@pytest.mark.slow
def test_the_command_runs_as_a_module(trained10, tmp_path):
    """python -m vqvae.evaluate itself, without weights files: PSNR, SSIM and usage still
    run, and the record says why not FID and LPIPS (pairs mode checks the same in-process)."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "vqvae.evaluate", "--workdir", str(trained10), "--num", "4"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "skipped: no --inception weights file given" in done.stdout
    r = json.loads(out.read_text())
    assert r["images"] == 4 and r["metrics"]["rfid"] is None and r["metrics"]["lpips"] is None
    assert "--inception" in r["skipped"]["rfid"] and r["metrics"]["psnr"] > 0
    assert r["metrics"]["codebook"]["used"] > 0


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir()
    for k, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{k:03d}.png")


def test_pairs_scores_two_folders_of_pngs(parity, weights, tmp_path, capsys):
    a, b = parity["images_a"][:8], parity["images_b"][:8]
    _write_pngs(tmp_path / "a", a)
    _write_pngs(tmp_path / "b", b)
    out = tmp_path / "r.json"
    args = ["--pairs", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet", "--out", str(out)]
    ev.main([*args, "--lpips", str(weights[1])])
    r = json.loads(out.read_text())
    acc = ReconstructionMetrics()
    acc.update(a, b)
    assert r["mode"] == "pairs" and r["images"] == 8 and r["checkpoint"] is None
    assert r["metrics"]["psnr"] == pytest.approx(acc.result()["psnr"], rel=1e-12)
    ref = parity["lpips_alex"][:8].mean()
    assert r["metrics"]["lpips"] == pytest.approx(float(ref), rel=1e-5)
    assert "codebook" not in r["metrics"]
    # without an Inception file PSNR, SSIM and LPIPS still run; the record and table say why
    assert r["metrics"]["rfid"] is None and "--inception" in r["skipped"]["rfid"]
    assert "skipped: no --inception weights file given" in capsys.readouterr().out

    (tmp_path / "b" / "000.png").rename(tmp_path / "b" / "x.png")
    with pytest.raises(SystemExit, match="the folders hold different files"):
        ev.main(args)


def test_reference_stats_are_what_the_record_scores_against(parity, weights, tmp_path, monkeypatch):
    """--reference-stats (pytorch-fid's mu/sigma .npz): the originals' features are not
    computed, the Fréchet distance is between the file's Gaussian and the reconstructions',
    and the record names the file. (The distance itself is tested in test_metrics.py; a spy
    stands in for the 2048-d matrix root, 20-60 s here.)"""
    from vqvae.metrics import fid as fid_module
    from vqvae.metrics.fid import FeatureExtractor
    from vqvae.metrics.stats import FeatureStats, Gaussian, write_stats

    a, b = parity["images_a"][:8], parity["images_b"][:8]
    _write_pngs(tmp_path / "a", a)
    _write_pngs(tmp_path / "b", b)
    rng = np.random.default_rng(0)
    ref = Gaussian(rng.normal(size=2048), np.diag(rng.uniform(0.5, 2.0, 2048)))
    stats = write_stats(tmp_path / "ref.npz", ref)
    seen = []

    def spy(mu1, sigma1, mu2, sigma2, method):
        seen.append((mu1, sigma1, mu2, sigma2, method))
        return float(np.sum((mu1 - mu2) ** 2))

    monkeypatch.setattr(fid_module, "frechet_distance", spy)
    out = tmp_path / "r.json"
    args = ["--pairs", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet", "--out", str(out)]
    args += ["--inception", str(weights[0]), "--fid-size", str(SIZE), "--frechet", "eigh"]
    ev.main([*args, "--reference-stats", str(stats)])
    r = json.loads(out.read_text())
    ((mu1, sigma1, mu2, sigma2, method),) = seen
    np.testing.assert_array_equal(mu1, ref.mu)
    np.testing.assert_array_equal(sigma1, ref.sigma)
    extractor = FeatureExtractor.from_file(weights[0], protocol("pytorch-fid", size=SIZE))
    fake = FeatureStats(2048)
    fake.update(extractor(b))
    np.testing.assert_allclose(mu2, fake.gaussian().mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma2, fake.gaussian().sigma, rtol=1e-5, atol=1e-9)
    assert method == "eigh" and r["metrics"]["rfid"] == float(np.sum((ref.mu - mu2) ** 2))
    assert r["weights"]["reference_stats"] == str(stats.resolve())

    # files of the wrong shapes, and the gram root (it needs both feature sets): one line
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2048), sigma=np.eye(16))
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))  # not pool features
    # (read before the weights: these runs need no --inception)
    pairs = ["--pairs", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]
    for extra, what in (
        (["--reference-stats", str(tmp_path / "bad.npz")], r"bad\.npz.*are not \(D,\) and"),
        (["--reference-stats", str(tmp_path / "d64.npz")], r"d64\.npz holds 64-d .* 2048-d"),
        (["--reference-stats", str(stats), "--frechet", "gram"], "gram' needs both"),
    ):
        with pytest.raises(SystemExit, match="--reference-stats: .*" + what) as e:
            ev.main([*pairs, *extra])
        assert "\n" not in str(e.value)


def test_protocol_rounding_and_resize_each_change_fid_and_nothing_else(parity, weights):
    """The same originals and float reconstructions under three protocols."""
    a = parity["images_a"][:8]
    rng = np.random.default_rng(0)
    recon = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.float32)
    tokens = rng.integers(0, 8, (8, 4, 4))

    def run(**overrides):
        usage = ev.CodeUsage(8, 1)
        batches = [(a, recon, tokens)]
        proto = protocol("pytorch-fid", size=SIZE, frechet="gram", **overrides)
        r = ev.evaluate(
            batches, proto, inception=weights[0], lpips=weights[1], usage=usage, progress=False
        )
        return r["metrics"]

    base, tf1, float_ = run(), run(resize="tf1"), run(round_uint8=False)
    assert tf1["rfid"] != base["rfid"] and float_["rfid"] != base["rfid"]
    for m in (tf1, float_):
        assert m["psnr"] == base["psnr"] and m["ssim"] == base["ssim"]
        assert m["codebook"] == base["codebook"]
    assert tf1["lpips"] == base["lpips"]  # the resize is FID's alone
    assert float_["lpips"] != base["lpips"]  # rounding moves what LPIPS sees too


def test_bad_weight_files_are_one_line_naming_the_converter(trained10, weights, tmp_path):
    args = ["--workdir", str(trained10), "--num", "2", "--quiet"]
    with pytest.raises(SystemExit) as e:
        ev.main([*args, "--inception", str(tmp_path / "missing.npz")])
    msg = str(e.value)
    assert "missing.npz not found" in msg and "python -m vqvae.metrics.inception" in msg
    assert "PSNR, SSIM and codebook usage run without it" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="vqvae.metrics.perceptual"):
        ev.main([*args, "--lpips", str(tmp_path / "missing.npz")])
    with pytest.raises(SystemExit, match="AlexNet LPIPS needs images of at least 31 px"):
        ev.main([*args, "--lpips", str(weights[1])])  # the tiny model's 16 px images


def test_code_usage_per_level_and_joint():
    u = ev.CodeUsage(4, 2)
    u.update(np.array([[[[0, 1], [0, 1]], [[2, 1], [3, 3]]]]))  # (1, 2, 2, 2)
    r = u.result()["codebook"]
    assert r["joint"]["distinct"] == 3
    assert r["joint"]["perplexity"] == pytest.approx(2 ** (1.5))  # p = 1/2, 1/4, 1/4
    assert [lv["used"] for lv in r["per_level"]] == [3, 2]
    assert r["per_level"][0]["usage"] == 0.75


@pytest.fixture(scope="module")
def small_prior(trained10, tmp_path_factory):
    """A class-conditional prior over trained10's tokens, 4 steps, evaluated at the end."""
    from vqvae.trainer import Trainer

    from .test_maskgit import _maskgit_config

    c = _maskgit_config(trained10, eval_every=4, steps=4, checkpoint_every=4)
    c.task, c.model.num_classes = "prior", 4
    workdir = tmp_path_factory.mktemp("prior")
    Trainer(c, workdir).train()
    return workdir


def test_generation_fid_is_the_fid_of_the_samples_and_the_held_out_set(
    small_prior, weights, tmp_path
):
    """--generator scores N guided samples (every class in turn) against the tokenizer's
    held-out images: the record's FID is the Frechet distance of exactly those two sets'
    features, beside the checkpoint's held-out bits per token; without Inception weights
    the FID is skipped with its reason and the bits remain; a bad label is one line."""
    from vqvae.data import local_examples
    from vqvae.generate import Generator
    from vqvae.metrics.fid import FeatureExtractor
    from vqvae.metrics.frechet import frechet_distance_gram
    from vqvae.sources import make_source

    inception = weights[0]
    out = tmp_path / "gen.json"
    args = ["--generator", str(small_prior), "--num", "6", "--batch-size", "4", "--quiet"]
    args += ["--cfg-scale", "2", "--seed", "3"]
    ev.main([*args, "--inception", str(inception), "--fid-size", str(SIZE), "--frechet", "gram",
             "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert r["mode"] == "generate" and r["kind"] == "prior" and r["images"] == 6
    assert r["labels"] == "every class in turn" and r["sampling"]["cfg_scale"] == 2.0
    assert r["source"] == "sample_photos" and r["skipped"] == {}
    assert 0 < r["metrics"]["held_out"]["bits_per_token"] < 8

    gen = Generator(small_prior, cfg_scale=2.0)
    labels = gen.labels(6, "all")
    assert labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert gen.labels(8, "each").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # a grid's rows
    assert gen.labels(2).tolist() == [-1, -1] and gen.labels(2, 3).tolist() == [3, 3]
    with pytest.raises(ValueError, match="divisible by its 4 classes"):
        gen.labels(6, "each")
    fakes = np.concatenate(list(gen.images(labels, 3, batch=4)))
    source = make_source({"source": "sample_photos"}, image_size=16, train=False)
    examples = local_examples(source, 4)
    reals = np.concatenate([next(examples)["image"], next(examples)["image"][:2]])
    examples.close()
    extractor = FeatureExtractor.from_file(inception, protocol("pytorch-fid", size=SIZE))
    want = frechet_distance_gram(extractor(reals), extractor(fakes))
    assert r["metrics"]["fid"] == pytest.approx(want, rel=1e-6) and want > 0

    record = ev.run(ev.parser().parse_args(args))  # no Inception: the NLL only
    assert record["metrics"]["fid"] is None and "no --inception" in record["skipped"]["fid"]
    assert (
        record["metrics"]["held_out"]["bits_per_token"]
        == r["metrics"]["held_out"]["bits_per_token"]
    )
    with pytest.raises(ev.EvaluateError, match="label 7: the prior knows 4 classes"):
        ev.run(ev.parser().parse_args([*args, "--label", "7"]))
