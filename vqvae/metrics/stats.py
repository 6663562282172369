"""Feature statistics (mu, sigma) for FID: a streaming accumulator and the files they live in.

``FeatureStats`` keeps the count, the sum and the sum of outer products of the feature
vectors in float64 NumPy on the host, so batches can arrive one at a time and from several
devices or processes: the sums add (``merge``, or an all-reduce of ``state()``). sigma is
the sample covariance (N - 1), as ``np.cov`` in pytorch-fid and the ADM evaluator.

Files: pytorch-fid's ``.npz`` holds ``mu`` (D,) and ``sigma`` (D, D) (``write_stats`` /
``read_stats``). The ADM evaluator's reference batches (``VIRTUAL_imagenet256_labeled.npz``
and the like, guided-diffusion's evaluations/evaluator.py) hold the same ``mu``/``sigma`` for
the 2048-d pool features, ``mu_s``/``sigma_s`` for its spatial features, and the images as
``arr_0`` (``read_adm_reference``).
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqvae.errors import InvalidValueError


@dataclass(frozen=True)
class Gaussian:
    """A mean (D,) and covariance (D, D), float64."""

    mu: np.ndarray
    sigma: np.ndarray


class FeatureStats:
    """Running count, sum and outer-product sum of feature vectors (float64, host)."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.total = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> None:
        """Add a batch of feature vectors (N, D) (any float dtype; NumPy or JAX arrays)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise InvalidValueError(
                f"FeatureStats: expected features (N, {self.dim}); got {f.shape}"
            )
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureStats") -> None:
        """Add another accumulator's vectors (another device's or process's share)."""
        if other.dim != self.dim:
            raise InvalidValueError(f"FeatureStats: cannot merge {other.dim}-d into {self.dim}-d")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    def state(self) -> np.ndarray:
        """The sums as one float64 vector [count, total, outer], for an all-reduce."""
        return np.concatenate([[float(self.count)], self.total, self.outer.ravel()])

    @classmethod
    def from_state(cls, state: np.ndarray, dim: int) -> "FeatureStats":
        """The accumulator whose ``state()`` (or a sum of them) is ``state``."""
        state = np.asarray(state, np.float64)
        if state.shape != (1 + dim + dim * dim,):
            raise InvalidValueError(
                f"FeatureStats: a {dim}-d state has {1 + dim + dim * dim} values"
            )
        s = cls(dim)
        s.count = int(round(state[0]))
        s.total = state[1 : 1 + dim].copy()
        s.outer = state[1 + dim :].reshape(dim, dim).copy()
        return s

    def gaussian(self) -> Gaussian:
        """mu and the sample covariance (N - 1) of every vector added."""
        if self.count < 2:
            raise InvalidValueError(
                f"FeatureStats: a covariance needs 2 or more vectors; have {self.count}"
            )
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return Gaussian(mu, (sigma + sigma.T) / 2)


def write_stats(path, stats: Gaussian) -> Path:
    """Write pytorch-fid's statistics file (``mu``, ``sigma``; compressed as it does)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InvalidValueError(
            f"{path}: a statistics file must end in .npz (NumPy adds it otherwise)"
        )
    np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma)
    return path


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidValueError(f"{path}: not a NumPy .npz file ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InvalidValueError(f"{path}: a single .npy array, not an .npz file with named arrays")
    return npz


def _gaussian(path: Path, npz, mu_key: str, sigma_key: str) -> Gaussian:
    for key in (mu_key, sigma_key):
        if key not in npz.files:
            raise InvalidValueError(
                f"{path}: no '{key}' array (has {', '.join(npz.files) or 'none'}; "
                f"statistics need '{mu_key}' and '{sigma_key}')"
            )
    mu = np.asarray(npz[mu_key], np.float64)
    sigma = np.asarray(npz[sigma_key], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InvalidValueError(
            f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are not (D,) and (D, D)"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InvalidValueError(f"{path}: '{mu_key}' or '{sigma_key}' has non-finite entries")
    return Gaussian(mu, sigma)


def read_stats(path) -> Gaussian:
    """The pool statistics (``mu``, ``sigma``) of a pytorch-fid file or an ADM reference batch."""
    path = Path(path)
    with _open(path) as npz:
        return _gaussian(path, npz, "mu", "sigma")


@dataclass(frozen=True)
class ADMReference:
    """An ADM evaluator reference batch: pool and spatial statistics, images on demand."""

    path: Path
    pool: Gaussian
    spatial: Gaussian

    def images(self) -> np.ndarray:
        """The batch's images ``arr_0`` (N, H, W, 3) uint8 (loaded now: 10k images is ~2 GB)."""
        with _open(self.path) as npz:
            if "arr_0" not in npz.files:
                raise InvalidValueError(f"{self.path}: no 'arr_0' array (the reference images)")
            return npz["arr_0"]


def read_adm_reference(path) -> ADMReference:
    """Read ``mu``/``sigma`` (pool) and ``mu_s``/``sigma_s`` (spatial) of an ADM reference batch."""
    path = Path(path)
    with _open(path) as npz:
        return ADMReference(
            path, _gaussian(path, npz, "mu", "sigma"), _gaussian(path, npz, "mu_s", "sigma_s")
        )
