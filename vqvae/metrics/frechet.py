"""The Fréchet distance between two Gaussians, the number FID reports.

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)

in float64 NumPy on the host. The default square root is ``scipy.linalg.sqrtm`` (the Schur
method) with pytorch-fid's and the ADM evaluator's handling around it: when the root of the
product is not finite, ``eps`` is added to both diagonals and it is taken again; an
imaginary part from rounding is dropped if the diagonal's is below 1e-3, an error
otherwise. Why sqrtm: it is what pytorch-fid, torch-fidelity and the ADM evaluator call, so
the figures and the edge cases (singular products, the imaginary-part error) are theirs.

``method="eigh"`` takes tr sqrt(sigma1 sigma2) as the sum of sqrt(eigvalsh(r sigma2 r))
with r = sqrt(sigma1) from a symmetric eigendecomposition, exact for PSD matrices (the two
products are similar). Measured on 2048-d random features: it agrees with sqrtm to 1e-14
relative with 5000 samples and 2e-8 with 500 (rank-deficient covariances), and ran 2.5-3.7x
faster on a loaded 2-core CPU (18-24 s against 60-67 s), so it suits frequent evaluation
during training. scipy comes with JAX.
"""

import warnings

import numpy as np
from scipy import linalg

from vqvae.errors import InvalidValueError


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid."""
    if method not in ("sqrtm", "eigh"):
        raise InvalidValueError(f"frechet_distance: method is 'sqrtm' or 'eigh'; got {method!r}")
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise InvalidValueError(
            f"frechet_distance: means differ in shape: {mu1.shape} and {mu2.shape}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise InvalidValueError(
                f"frechet_distance: {name} has shape {s.shape}; the means need ({d}, {d})"
            )
    for name, x in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise InvalidValueError(f"frechet_distance: {name} has non-finite entries")
    diff = mu1 - mu2
    if method == "eigh":
        return float(
            diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt(sigma1, sigma2)
        )
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: singular product; adding {eps} to the covariances' diagonals",
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise InvalidValueError(f"frechet_distance: the matrix root has imaginary part {m}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, quiet about the precision warning pytorch-fid disables."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return linalg.sqrtm(a)


def _trace_sqrt(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for PSD matrices, by symmetric eigendecompositions."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(r @ sigma2 @ r)
    return float(np.sqrt(np.clip(e, 0, None)).sum())


def frechet_distance_gram(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Fréchet distance of two feature sets' Gaussians (sample covariances, N - 1) from
    the features themselves, exact and fast when there are fewer vectors than dimensions.

    With centred features A (n, D) and B (m, D), sigma1 sigma2 = A^T A B^T B / c, whose
    non-zero eigenvalues are those of M M^T for M = A B^T / sqrt(c), c = (n-1)(m-1): so
    tr sqrt(sigma1 sigma2) is the sum of M's singular values, an (n, m) SVD instead of a
    (D, D) root. This is the case where sqrtm is worst off (singular covariances)."""
    a = np.asarray(features1, np.float64)
    b = np.asarray(features2, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InvalidValueError(
            f"frechet_distance_gram: expected two (N >= 2, D) feature sets; got {a.shape}, "
            f"{b.shape}"
        )
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    n, m = len(a) - 1, len(b) - 1
    s = np.linalg.svd(a @ b.T / np.sqrt(n * m), compute_uv=False)
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / n + (b * b).sum() / m - 2 * s.sum())
