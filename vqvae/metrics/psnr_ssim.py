"""PSNR and SSIM per image on the 0..255 scale, in jax.numpy (jittable, batched).

Both follow scikit-image exactly: ``peak_signal_noise_ratio(a, b, data_range=255)`` and
``structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`` (Wang et al. 2004's settings), so figures compare
with the papers that use them. SSIM's window: a Gaussian of sigma 1.5 truncated at 3.5 sigma
(radius 5, 11 taps, as ``scipy.ndimage.gaussian_filter``). skimage filters with reflected
borders, then averages the SSIM map over the image less a strip of the window's radius on
each side (each channel alone, then over channels): the windows of that region never reach
past the image, so here the filter runs only there and no border mode is needed. Images
must be at least 11 px on each side, as scikit-image requires.

Precision: scikit-image works in float64. These functions compute in float64 when JAX's
x64 mode is on (``with jax.enable_x64(True):`` around the call, as
``ReconstructionMetrics`` does), in float32 otherwise. Measured against scikit-image on
random and photo crops of 11-64 px: float64 agrees to 4e-15 (SSIM and PSNR), float32 only
to 2.4e-6 in SSIM (its variances are differences of squares near 255**2) and 3e-6 dB.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vqvae.errors import InvalidValueError

DATA_RANGE = 255.0
SIGMA = 1.5
TRUNCATE = 3.5
K1, K2 = 0.01, 0.03
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # ndimage's radius: 5
WIN_SIZE = 2 * RADIUS + 1  # skimage's win_size for gaussian_weights: 11


def gaussian_taps(sigma: float = SIGMA, radius: int = RADIUS) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter1d`` (float64)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / (sigma * sigma) * x**2)
    return w / w.sum()


def _compute_dtype():
    """float64 under JAX's x64 mode, float32 otherwise."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _check(a: jax.Array, b: jax.Array, name: str) -> None:
    if a.shape != b.shape:
        raise InvalidValueError(f"{name}: the two batches differ in shape: {a.shape} and {b.shape}")
    if a.ndim != 4:
        raise InvalidValueError(f"{name}: expected batches (B, H, W, C); got shape {a.shape}")
    for x in (a, b):
        if not (x.dtype == jnp.uint8 or jnp.issubdtype(x.dtype, jnp.floating)):
            raise InvalidValueError(
                f"{name}: expected uint8 (or float on 0..255) images; got {x.dtype}"
            )


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image PSNR in dB, (B, H, W, C) x2 -> (B,); identical images give inf."""
    _check(a, b, "psnr")
    dtype = _compute_dtype()
    d = a.astype(dtype) - b.astype(dtype)
    mse = jnp.mean(d * d, axis=(1, 2, 3))
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)


def _blur_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """The Gaussian filter over axes 1 and 2 of (N, H, W, C) where the window fits inside.

    (N, H - 2r, W - 2r, C): exactly the region skimage averages, whose windows never reach
    the reflected border, so the border mode cannot change the figure.
    """
    r = (len(taps) - 1) // 2
    h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
    x = sum(float(t) * x[:, k : k + h] for k, t in enumerate(taps))
    return sum(float(t) * x[:, :, k : k + w] for k, t in enumerate(taps))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image SSIM (mean over channels), (B, H, W, C) x2 -> (B,), as scikit-image."""
    _check(a, b, "ssim")
    if min(a.shape[1], a.shape[2]) < WIN_SIZE:
        raise InvalidValueError(
            f"ssim: images must be at least {WIN_SIZE} px on each side (the Gaussian window, "
            f"as scikit-image requires); got {a.shape[1]}x{a.shape[2]}"
        )
    dtype = _compute_dtype()
    x, y = a.astype(dtype), b.astype(dtype)
    # the five filtered quantities in one pass: mean x, mean y, E[x^2], E[y^2], E[xy]
    ux, uy, uxx, uyy, uxy = jnp.split(
        _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y]), gaussian_taps()), 5
    )
    vx = uxx - ux * ux  # population covariances (use_sample_covariance=False)
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (K1 * DATA_RANGE) ** 2
    c2 = (K2 * DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))
