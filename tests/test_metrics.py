"""vqvae.metrics: PSNR/SSIM parity with scikit-image, the Fréchet distance, statistics files,
and the streaming accumulator."""

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from vqvae.metrics import (
    FeatureStats,
    Gaussian,
    ReconstructionMetrics,
    frechet_distance,
    psnr,
    read_adm_reference,
    read_stats,
    ssim,
    write_stats,
)

from .conftest import photos

skm = pytest.importorskip("skimage.metrics")

SKIMAGE_SSIM = dict(
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=255,
    channel_axis=-1,
)


def ref_ssim(a, b):
    pairs = zip(a, b, strict=True)
    return np.array([skm.structural_similarity(x, y, **SKIMAGE_SSIM) for x, y in pairs])


def ref_psnr(a, b):
    pairs = zip(a, b, strict=True)
    return np.array([skm.peak_signal_noise_ratio(x, y, data_range=255) for x, y in pairs])


@functools.cache
def real(n, size):
    return photos(n, size)


def noisy(a, amount, seed):
    rng = np.random.default_rng(seed)
    return np.clip(a.astype(int) + rng.integers(-amount, amount + 1, a.shape), 0, 255).astype(
        np.uint8
    )


def pairs(kind, h, w):
    rng = np.random.default_rng(h * 100 + w)
    if kind == "photo":
        a = real(6, h)
        return a, noisy(a, 20, 1)
    a = rng.integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    if kind == "random-near":
        return a, noisy(a, 40, 2)
    return a, rng.integers(0, 256, a.shape, dtype=np.uint8)  # independent: SSIM near 0


CASES = [(k, s, s) for s in (11, 16, 32) for k in ("random-near", "random-far")]
CASES += [("random-near", 16, 24), ("photo", 16, 16), ("photo", 32, 32)]


@pytest.mark.parametrize("kind,h,w", CASES)
def test_psnr_ssim_equal_skimage_in_float64(kind, h, w):
    a, b = pairs(kind, h, w)
    with jax.enable_x64(True):
        s = np.asarray(jax.jit(ssim)(a, b))
        p = np.asarray(jax.jit(psnr)(a, b))
    assert s.dtype == np.float64 and s.shape == (a.shape[0],)
    np.testing.assert_allclose(s, ref_ssim(a, b), rtol=0, atol=1e-10)
    np.testing.assert_allclose(p, ref_psnr(a, b), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,h,w", [("random-near", 16, 16), ("photo", 32, 32)])
def test_psnr_ssim_float32_within_1e5_of_skimage(kind, h, w):
    a, b = pairs(kind, h, w)
    s, p = np.asarray(jax.jit(ssim)(a, b)), np.asarray(jax.jit(psnr)(a, b))
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, ref_ssim(a, b), rtol=0, atol=1e-5)
    np.testing.assert_allclose(p, ref_psnr(a, b), rtol=0, atol=1e-5)


def test_ssim_refuses_images_below_the_window_as_skimage():
    a = np.zeros((1, 10, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="win_size exceeds"):
        skm.structural_similarity(a[0], a[0], **SKIMAGE_SSIM)
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(a, a)


def test_identical_images_give_ssim_1_and_psnr_inf():
    a = real(2, 16)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(ssim(a, a)), 1.0, atol=1e-12)
        assert np.isinf(np.asarray(psnr(a, a))).all()


def test_bad_batches_are_named():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[:1])
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        psnr(a[0], a[0])
    with pytest.raises(ValueError, match="int32"):
        ssim(a, a.astype(np.int32))


# The Fréchet distance


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_of_diagonal_gaussians_is_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a), method=method) == pytest.approx(
        0, abs=1e-12
    )


def eigvals_reference(mu1, s1, mu2, s2):
    """tr sqrt(s1 s2) as the sum of square roots of the (real, >= 0) eigenvalues of s1 s2."""
    ev = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum()


@pytest.mark.parametrize("n", [200, 30])  # full rank, and rank-deficient (n < d)
@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_of_random_covariances_equals_an_eigenvalue_reference(n, method):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 64)), np.abs(rng.normal(size=(n, 64))) * 1.2 + 0.1
    g1 = Gaussian(x.mean(0), np.cov(x, rowvar=False))
    g2 = Gaussian(y.mean(0), np.cov(y, rowvar=False))
    got = frechet_distance(g1.mu, g1.sigma, g2.mu, g2.sigma, method=method)
    assert got == pytest.approx(eigvals_reference(g1.mu, g1.sigma, g2.mu, g2.sigma), rel=1e-6)


def test_frechet_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma2 has shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# Feature statistics


def test_streaming_stats_equal_numpy_mean_and_cov_across_batches_and_processes():
    rng = np.random.default_rng(0)
    f = (rng.normal(size=(101, 16)) * 3 + 5).astype(np.float32)
    one = FeatureStats(16)
    for lo, hi in ((0, 7), (7, 50), (50, 101)):
        one.update(f[lo:hi])
    mu, sigma = f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(one.gaussian().mu, mu, rtol=1e-12)
    np.testing.assert_allclose(one.gaussian().sigma, sigma, rtol=1e-10, atol=1e-12)
    a, b = FeatureStats(16), FeatureStats(16)
    a.update(f[:40])
    b.update(f[40:])
    summed = FeatureStats.from_state(a.state() + b.state(), 16)  # as an all-reduce would
    a.merge(b)
    for s in (a, summed):
        assert s.count == 101
        np.testing.assert_allclose(s.gaussian().sigma, one.gaussian().sigma, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        one.update(f[:, :8])
    with pytest.raises(ValueError, match="2 or more"):
        FeatureStats(4).gaussian()


def test_stats_files_in_pytorch_fid_layout(tmp_path):
    rng = np.random.default_rng(0)
    g = Gaussian(rng.normal(size=6), np.cov(rng.normal(size=(20, 6)), rowvar=False))
    path = write_stats(tmp_path / "ours.npz", g)
    with np.load(path) as f:  # as pytorch-fid reads it
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"], g.mu)
    np.savez_compressed(tmp_path / "theirs.npz", mu=g.mu.astype(np.float32), sigma=g.sigma)
    back = read_stats(tmp_path / "theirs.npz")
    assert back.mu.dtype == np.float64
    np.testing.assert_allclose(back.mu, g.mu, rtol=1e-6)
    np.testing.assert_array_equal(back.sigma, g.sigma)


def test_adm_reference_batch_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=4), np.eye(4)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2) * 2)
    ref = read_adm_reference(path)
    np.testing.assert_array_equal(ref.pool.mu, mu)
    np.testing.assert_array_equal(ref.spatial.sigma, np.eye(2) * 2)
    np.testing.assert_array_equal(ref.images(), images)
    np.testing.assert_array_equal(read_stats(path).mu, mu)  # its pool statistics


def test_bad_stats_files_are_one_line_naming_file_and_key(tmp_path):
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    np.savez(tmp_path / "nospatial.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    cases = [
        (read_stats, "nosigma.npz", "no 'sigma' array"),
        (read_adm_reference, "nospatial.npz", "no 'mu_s' array"),
        (read_stats, "shape.npz", r"are not \(D,\) and \(D, D\)"),
        (read_stats, "single.npy", "single .npy array"),
        (read_stats, "junk.npz", "not a NumPy .npz file"),
    ]
    for fn, name, what in cases:
        with pytest.raises(ValueError, match=what) as e:
            fn(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.npz: no such statistics file"):
        read_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "noimages.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=[0.0], sigma_s=[[1]])
    with pytest.raises(ValueError, match="noimages.npz: no 'arr_0'"):
        read_adm_reference(tmp_path / "noimages.npz").images()


# The accumulator


def test_accumulator_means_equal_skimage_over_every_batch():
    a = real(6, 32)
    b = noisy(a, 20, 3)
    m = ReconstructionMetrics()
    m.update(a[:4], b[:4])
    m.update(jax.numpy.asarray(a[4:]), jax.numpy.asarray(b[4:]))  # device arrays too
    r = m.result()
    assert r["count"] == 6 and r["identical"] == 0
    assert r["ssim"] == pytest.approx(ref_ssim(a, b).mean(), abs=1e-10)
    assert r["psnr"] == pytest.approx(ref_psnr(a, b).mean(), abs=1e-10)
    other = ReconstructionMetrics()
    other.update(a[:4], b[:4])
    rest = ReconstructionMetrics()
    rest.update(a[4:], b[4:])
    other.merge(rest)
    assert other.result() == r


def test_accumulator_counts_identical_pairs_and_refuses_floats_and_nothing():
    a = real(2, 16)
    m = ReconstructionMetrics()
    with pytest.raises(ValueError, match="no images"):
        m.result()
    m.update(a, a)
    assert m.result()["identical"] == 2 and np.isinf(m.result()["psnr"])
    with pytest.raises(ValueError, match="reconstructions must be uint8.*float32"):
        m.update(a, a.astype(np.float32))


class Counting:
    """A stand-in for a feature metric plugged into the accumulator's seam."""

    def __init__(self, key="seen"):
        self.key, self.n = key, 0

    def update(self, originals, reconstructions):
        assert originals.dtype == reconstructions.dtype == np.uint8
        self.n += originals.shape[0]

    def result(self):
        return {self.key: self.n}


def test_accumulator_feeds_extra_metrics_and_joins_their_figures():
    a = real(3, 16)
    m = ReconstructionMetrics(extra=[Counting()])
    m.update(a, a)
    m.update(a[:1], a[:1])
    assert m.result()["seen"] == 4 and m.result()["count"] == 4
    clash = ReconstructionMetrics(extra=[Counting("ssim")])
    clash.update(a, a)
    with pytest.raises(ValueError, match=r"reports \['ssim'\] again"):
        clash.result()


# --- parity with the reference tools (tests/reference/metrics_parity.py's outputs) ----------
PARITY = Path(__file__).parent / "data" / "metrics" / "parity.npz"


@functools.cache
def _parity() -> dict:
    with np.load(PARITY) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def _inception():
    """The package's FID Inception with the reference's random weights, through convert."""
    from vqvae.metrics import inception

    from .reference.metrics_parity import random_state_dict

    shapes = json.loads(str(_parity()["inception_shapes"]))
    return inception.FIDInception(inception.convert(random_state_dict(shapes)))


def _relative(x, ref) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


@functools.cache
def _small_features(name: str) -> np.ndarray:
    from vqvae.metrics.fid import FeatureExtractor, protocol

    p = _parity()
    extractor = FeatureExtractor(_inception(), protocol(name, size=int(p["small_size"])))
    return extractor(np.concatenate([p["images_a"], p["images_b"]]))


def _fid(feats: np.ndarray, n: int, method: str) -> float:
    from vqvae.metrics.frechet import frechet_distance_gram
    from vqvae.metrics.stats import FeatureStats

    if method == "gram":
        return frechet_distance_gram(feats[:n], feats[n:])
    stats = []
    for part in (feats[:n], feats[n:]):
        s = FeatureStats(feats.shape[1])
        s.update(part)
        stats.append(s.gaussian())
    return frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma, method=method)


@pytest.mark.parametrize("name,key", [("pytorch-fid", "pfid"), ("torch-fidelity", "tfid")])
def test_fid_features_and_fid_equal_the_reference_tools(name, key):
    """Features to 1e-4, and FID by the exact Gram form (a 2048-d root takes 20-60 s here;
    the protocols' own roots are the slow test below) to 1e-3."""
    p = _parity()
    feats = _small_features(name)
    assert _relative(feats, p[f"{key}_small"].astype(np.float64)) < 1e-4
    ref = float(p[f"{key}_small_fid"])
    assert abs(_fid(feats, len(p["images_a"]), "gram") - ref) / ref < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name,key", [("pytorch-fid", "pfid"), ("torch-fidelity", "tfid")])
def test_fid_by_the_protocols_own_root_equals_the_reference_tools(name, key):
    from vqvae.metrics.fid import PROTOCOLS

    p = _parity()
    fid = _fid(_small_features(name), len(p["images_a"]), PROTOCOLS[name].frechet)
    ref = float(p[f"{key}_small_fid"])
    assert abs(fid - ref) / ref < 1e-3


def test_gram_frechet_equals_the_covariance_form():
    from vqvae.metrics.frechet import frechet_distance_gram

    rng = np.random.default_rng(3)
    for n, d in ((10, 40), (60, 20)):  # fewer and more vectors than dimensions
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n + 3, d))
        cov = [np.cov(x, rowvar=False) for x in (a, b)]
        want = frechet_distance(a.mean(0), cov[0], b.mean(0), cov[1], method="eigh")
        assert frechet_distance_gram(a, b) == pytest.approx(want, rel=1e-6)  # eigh: 1e-8


def test_the_two_protocols_give_different_features():
    """The resize and the scaling are what the two presets differ in: the tools disagree."""
    assert _relative(_small_features("torch-fidelity"), _parity()["pfid_small"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name,key", [("pytorch-fid", "pfid"), ("torch-fidelity", "tfid")])
def test_fid_features_at_299_equal_the_reference_tools(name, key):
    from vqvae.metrics.fid import FeatureExtractor, protocol

    p = _parity()
    full = p[f"{key}_full"]
    feats = FeatureExtractor(_inception(), protocol(name))(p["images_a"][: len(full)])
    assert _relative(feats, full.astype(np.float64)) < 1e-4


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_equals_the_lpips_package_for_both_backbones(net):
    from vqvae import lpips as vgg_lpips
    from vqvae.metrics import perceptual

    from .reference.metrics_parity import random_state_dict

    p = _parity()
    backbone = random_state_dict(json.loads(str(p[f"lpips_{net}_shapes"])))
    prefix = f"lpips_{net}_"
    lin = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix + "lin")}
    if net == "vgg":
        model, name = vgg_lpips.LPIPS(vgg_lpips.convert(backbone, lin)), "vgg16"
    else:
        model, name = perceptual.AlexLPIPS(perceptual.convert_alex(backbone, lin)), "alex"
    metric = perceptual.LPIPSMetric(model, name)
    n = 4 if net == "vgg" else len(p["images_a"])  # VGG16: ~0.5 s an image here
    a, b = p["images_a"][:n], p["images_b"][:n]
    d = metric.distances(a, b)
    ref = p[f"lpips_{net}"][:n].astype(np.float64)
    assert np.max(np.abs(d - ref) / np.abs(ref)) < 1e-5
    metric.update(a, b)
    assert metric.result() == {"lpips": pytest.approx(ref.mean(), rel=1e-5), "lpips_backbone": name}


def test_psnr_ssim_equal_the_committed_scikit_image_outputs():
    p = _parity()
    m = ReconstructionMetrics()
    m.update(p["images_a"], p["images_b"])
    out = m.result()
    assert abs(out["psnr"] - p["psnr"].mean()) / p["psnr"].mean() < 1e-6
    assert abs(out["ssim"] - p["ssim"].mean()) / abs(p["ssim"].mean()) < 1e-6


def test_inception_converter_names_what_is_missing_or_wrong(tmp_path):
    from vqvae.metrics import inception

    from .reference.metrics_parity import random_state_dict

    shapes = json.loads(str(_parity()["inception_shapes"]))
    sd = random_state_dict({k: v for k, v in shapes.items() if "Mixed_7c.branch_pool" not in k})
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.conv.weight is missing"):
        inception.convert(sd)
    with pytest.raises(FileNotFoundError, match="python -m vqvae.metrics.inception"):
        inception.load_weights(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(1))
    with pytest.raises(ValueError, match="not an FID Inception weights file"):
        inception.load_weights(tmp_path / "other.npz")
