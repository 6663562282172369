"""Reference outputs for the metrics' parity tests: tests/data/metrics/parity.npz.

Not run by CI. Run in a separate environment with PyTorch and the reference tools:

    pip install torch torchvision pytorch-fid torch-fidelity lpips scikit-image
    python tests/reference/metrics_parity.py [--out tests/data/metrics/parity.npz]

No weights can be downloaded, so every network has random weights and its real layout:
pytorch-fid's FID Inception (``fid_inception_v3`` without its URL), torch-fidelity's
``FeatureExtractorInceptionV3`` (read from a saved state dict), and ``lpips.LPIPS(
pnet_rand=True)`` for VGG and AlexNet (random backbones; the linear heads are the ones its
wheel ships). The random weights are not stored: ``random_state_dict`` (NumPy only, so the
tests call it too) rebuilds them from the names and shapes of the reference modules' state
dicts, which the file keeps; the tests run those through the package's converters.

Stored: 24 image pairs of 32 px (16 crops of scikit-image's photos, 8 random; the second of
each pair a noisy, shifted copy), each tool's pool features at a shrunk input size (80 px:
the networks' layout unchanged, the input smaller) and at 299 px for 4 images, the FID of
the two sets, LPIPS distances per backbone, scikit-image's SSIM and PSNR per pair.
"""

import argparse
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

SEED = 0
SMALL = 80  # the shrunk FID input size (the network accepts >= 75)
N_PAIRS = 24
N_FULL = 4  # images also run at 299 px


def random_state_dict(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Random float32 weights for a state dict's names and shapes, the same on every machine:
    He-normal convolution and linear weights, batch norms near the identity (gamma and
    running variance in [0.5, 1.5], beta and running mean ~ N(0, 0.1)), biases ~ N(0, 0.01)."""
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
        elif re.search(r"\.bn\.(weight|running_var)$", name):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif re.search(r"\.bn\.(bias|running_mean)$", name):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("weight") and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.01 * rng.standard_normal(shape)).astype(np.float32)
    return out


def test_images() -> tuple[np.ndarray, np.ndarray]:
    """(originals, distorted copies), uint8 (N_PAIRS, 32, 32, 3) each."""
    import skimage.data

    rng = np.random.default_rng(SEED)
    crops = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = getattr(skimage.data, name)()[:, :, :3]
        for k in range(4):
            top, left = (k // 2) * 96 + 40, (k % 2) * 96 + 40
            crops.append(photo[top : top + 128 : 4, left : left + 128 : 4])
    crops += list(rng.integers(0, 256, (N_PAIRS - len(crops), 32, 32, 3), dtype=np.uint8))
    a = np.stack(crops).astype(np.uint8)
    noisy = a.astype(np.float64) + rng.normal(0, 12, a.shape)
    b = np.clip(np.roll(noisy, 1, axis=2), 0, 255).round().astype(np.uint8)
    return a, b


def _torchvision():
    """Import torchvision even where its compiled ops do not load (a CPU torch with another
    build's torchvision): only its model definitions are used."""
    import torch.library as lib

    original = lib.register_fake

    def tolerant(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda f: f
        return original(op, *args, **kwargs)

    lib.register_fake = tolerant
    try:
        import torchvision
    finally:
        lib.register_fake = original
    return torchvision


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(here / "data" / "metrics" / "parity.npz"))
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    _torchvision()
    from importlib.metadata import version

    import lpips
    import pytorch_fid
    import pytorch_fid.inception as pfi
    import skimage
    import torch_fidelity
    from pytorch_fid.fid_score import calculate_frechet_distance
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    a, b = test_images()
    out["images_a"], out["images_b"] = a, b
    both = np.concatenate([a, b])

    # --- pytorch-fid: fid_inception_v3 with random weights instead of its URL -------------
    shapes_model = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for n, cls, args_ in [
        ("Mixed_5b", pfi.FIDInceptionA, (192, 32)),
        ("Mixed_5c", pfi.FIDInceptionA, (256, 64)),
        ("Mixed_5d", pfi.FIDInceptionA, (288, 64)),
        ("Mixed_6b", pfi.FIDInceptionC, (768, 128)),
        ("Mixed_6c", pfi.FIDInceptionC, (768, 160)),
        ("Mixed_6d", pfi.FIDInceptionC, (768, 160)),
        ("Mixed_6e", pfi.FIDInceptionC, (768, 192)),
        ("Mixed_7b", pfi.FIDInceptionE_1, (1280,)),
        ("Mixed_7c", pfi.FIDInceptionE_2, (2048,)),
    ]:
        setattr(shapes_model, n, cls(*args_))
    shapes = {k: list(v.shape) for k, v in shapes_model.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in random_state_dict(shapes).items()}
    out["inception_shapes"] = np.array(json.dumps(shapes))
    pfi.load_state_dict_from_url = lambda *a, **k: state  # the URL's file, replaced
    net = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    small = pfi.InceptionV3([3], resize_input=False, normalize_input=True).eval()

    def to_unit(x):  # pytorch-fid's ToTensor: uint8 HWC -> float CHW in [0, 1]
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0

    with torch.no_grad():
        x = F.interpolate(to_unit(both), size=(SMALL, SMALL), mode="bilinear", align_corners=False)
        feats = small(x)[0].squeeze(-1).squeeze(-1).numpy()
        out["pfid_small"] = feats
        out["pfid_full"] = net(to_unit(a[:N_FULL]))[0].squeeze(-1).squeeze(-1).numpy()
    f1, f2 = feats[:N_PAIRS].astype(np.float64), feats[N_PAIRS:].astype(np.float64)
    out["pfid_small_fid"] = np.float64(
        calculate_frechet_distance(
            f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
        )
    )

    # --- torch-fidelity: its own extractor, read from the same random state dict -----------
    path = Path(args.out).with_suffix(".inception.pth.tmp")
    torch.save(state, path)
    try:
        fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).eval()
    finally:
        path.unlink()
    with torch.no_grad():
        full = fe(torch.from_numpy(a[:N_FULL]).permute(0, 3, 1, 2).contiguous())[0]
        out["tfid_full"] = full.numpy()
        fe.INPUT_IMAGE_SIZE = SMALL  # its resize, to the shrunk size
        feats = fe(torch.from_numpy(both).permute(0, 3, 1, 2).contiguous())[0]
    out["tfid_small"] = feats.numpy()
    s1 = fid_features_to_statistics(feats[:N_PAIRS].double())
    s2 = fid_features_to_statistics(feats[N_PAIRS:].double())
    out["tfid_small_fid"] = np.float64(
        fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    )

    # --- LPIPS with random backbones and the wheel's linear heads ---------------------------
    for net_name in ("vgg", "alex"):
        lp = lpips.LPIPS(net=net_name, pnet_rand=True, verbose=False).eval()
        sd = lp.state_dict()
        feat = {}  # torchvision's features.{i}.* names for the backbone
        for k, v in sd.items():
            m = re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", k)
            if m:
                feat[f"features.{m[1]}.{m[2]}"] = (k, list(v.shape))
        weights = random_state_dict({n: s for n, (_, s) in feat.items()})
        lp.load_state_dict(
            {**sd, **{k: torch.from_numpy(weights[n]) for n, (k, _) in feat.items()}}
        )
        out[f"lpips_{net_name}_shapes"] = np.array(json.dumps({n: s for n, (_, s) in feat.items()}))
        for k, v in sd.items():
            if k.startswith("lin"):
                out[f"lpips_{net_name}_{k}"] = v.numpy()
        with torch.no_grad():
            ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
            tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1
            out[f"lpips_{net_name}"] = lp(ta, tb).reshape(-1).numpy()

    # --- scikit-image ----------------------------------------------------------------------
    out["ssim"] = np.array(
        [
            structural_similarity(
                x,
                y,
                data_range=255,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for x, y in zip(a, b, strict=True)
        ]
    )
    out["psnr"] = np.array(
        [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b, strict=True)]
    )
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pytorch-fid": pytorch_fid.__version__,
        "torch-fidelity": torch_fidelity.__version__,
        "lpips": version("lpips"),
        "scikit-image": skimage.__version__,
        "numpy": np.__version__,
    }
    out["versions"] = np.array(json.dumps(versions))
    out["small_size"] = np.int64(SMALL)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB); {versions}")


if __name__ == "__main__":
    main()
