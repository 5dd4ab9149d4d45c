"""Per-image PSNR, SSIM and colourfulness of uint8 RGB batches, in jnp, matching scikit-image."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 255.0
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# skimage's default uniform window, and Wang et al.'s Gaussian (sigma 1.5, truncate 3.5 -> radius 5).
UNIFORM_WINDOW = 7
GAUSSIAN_SIGMA = 1.5
GAUSSIAN_RADIUS = int(3.5 * GAUSSIAN_SIGMA + 0.5)


def _gaussian_taps() -> np.ndarray:
    """The 1-D kernel of scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5)."""
    x = np.arange(-GAUSSIAN_RADIUS, GAUSSIAN_RADIUS + 1)
    taps = np.exp(-0.5 * (x / GAUSSIAN_SIGMA) ** 2)
    return taps / taps.sum()


def _check_images(*images: jax.Array) -> None:
    for image in images:
        if image.dtype != jnp.uint8 or image.ndim != 4 or image.shape[-1] != 3:
            raise TypeError(f"expected uint8 RGB images [N, H, W, 3], got {image.dtype} {image.shape}")
    if len({image.shape for image in images}) != 1:
        raise ValueError(f"image shapes differ: {[image.shape for image in images]}")


def _spatial_mean(x: jax.Array) -> jax.Array:
    """Mean over H, W of [N, H, W, C] -> [N, C]; rows first, so float32 sums stay short and accurate."""
    return jnp.mean(jnp.mean(x, axis=2), axis=1)


def psnr(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio with data_range 255, as `skimage.metrics.peak_signal_noise_ratio`.

    Args:
        pred: uint8 RGB [N, H, W, 3].
        true: uint8 RGB [N, H, W, 3].

    Returns:
        float32 [N], PSNR in dB per image (inf for identical images).

    Raises:
        TypeError: if an input is not uint8 [N, H, W, 3].
        ValueError: if the shapes differ or rows are too wide for exact int32 sums.
    """
    _check_images(pred, true)
    _, h, w, c = pred.shape
    if w * c * 255**2 >= 2**31:
        raise ValueError(f"rows of {w} pixels are too wide for exact int32 sums")
    diff = pred.astype(jnp.int32) - true.astype(jnp.int32)
    # Squared uint8 differences summed along a row are exact in int32; only the H row sums are
    # added in float32, which keeps the relative error of the MSE near float32 epsilon.
    row_sse = jnp.sum(diff * diff, axis=(2, 3)).astype(jnp.float32)
    mse = jnp.sum(row_sse, axis=1) / (h * w * c)
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable correlation of [N, H, W, C] with `taps` along H and W, 'valid' (no padding)."""
    for axis in (1, 2):
        size = x.shape[axis] - len(taps) + 1
        x = sum(float(t) * jax.lax.slice_in_dim(x, i, i + size, axis=axis) for i, t in enumerate(taps))
    return x


def _local_covariances(
    x: jax.Array,
    y: jax.Array,
    ux: jax.Array,
    uy: jax.Array,
    taps: np.ndarray,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted variances of x, y and their covariance over every window with local means ux, uy.

    The deviations are taken from each window's own mean: skimage's E[x^2] - E[x]^2 cancels
    catastrophically in float32 on flat regions (black borders, sky), costing ~1e-5 of SSIM.
    """
    h, w = ux.shape[1:3]
    vx = vy = vxy = jnp.zeros_like(ux)
    for (i, ti), (j, tj) in itertools.product(enumerate(taps), repeat=2):
        dx = x[:, i : i + h, j : j + w] - ux
        dy = y[:, i : i + h, j : j + w] - uy
        weight = float(ti * tj)
        vx += weight * dx * dx
        vy += weight * dy * dy
        vxy += weight * dx * dy
    return vx, vy, vxy


def ssim(pred: jax.Array, true: jax.Array, gaussian: bool = False) -> jax.Array:
    """Mean structural similarity per image, with data_range 255, averaged over the RGB channels.

    `gaussian=False` matches `structural_similarity(pred, true, channel_axis=-1, data_range=255)`
    (skimage defaults: 7x7 uniform window, sample covariance). `gaussian=True` matches Wang et al.
    2004, i.e. skimage with `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`
    (11x11 window). As in skimage the SSIM map is cropped by the window radius before averaging, so
    only fully covered windows are used and border handling never matters.

    Args:
        pred: uint8 RGB [N, H, W, 3].
        true: uint8 RGB [N, H, W, 3].
        gaussian: Gaussian (Wang et al.) instead of uniform (skimage default) windows.

    Returns:
        float32 [N], SSIM per image.

    Raises:
        TypeError: if an input is not uint8 [N, H, W, 3].
        ValueError: if the shapes differ or an image is smaller than the window.
    """
    _check_images(pred, true)
    if gaussian:
        taps, cov_norm = _gaussian_taps(), 1.0
    else:
        taps = np.full(UNIFORM_WINDOW, 1.0 / UNIFORM_WINDOW)
        cov_norm = UNIFORM_WINDOW**2 / (UNIFORM_WINDOW**2 - 1.0)
    if min(pred.shape[1:3]) < len(taps):
        raise ValueError(f"images {pred.shape[1:3]} are smaller than the {len(taps)}x{len(taps)} window")
    # In units of data_range, so that C1 = K1^2 and C2 = K2^2.
    x = pred.astype(jnp.float32) / DATA_RANGE
    y = true.astype(jnp.float32) / DATA_RANGE
    ux = _filter_valid(x, taps)
    uy = _filter_valid(y, taps)
    vx, vy, vxy = (cov_norm * v for v in _local_covariances(x, y, ux, uy, taps))
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(_spatial_mean(ssim_map), axis=-1)


def colorfulness(rgb: jax.Array) -> jax.Array:
    """Hasler & Suesstrunk (2003) colourfulness of each image, on 0..255 values.

    rg = R - G, yb = (R + G) / 2 - B;
    M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), population std.

    Args:
        rgb: uint8 RGB [N, H, W, 3].

    Returns:
        float32 [N], colourfulness per image.

    Raises:
        TypeError: if the input is not uint8 [N, H, W, 3].
    """
    _check_images(rgb)
    rgb = rgb.astype(jnp.float32)
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    opponents = jnp.concatenate([r - g, 0.5 * (r + g) - b], axis=-1)  # [N, H, W, 2]
    means = _spatial_mean(opponents)  # [N, 2]
    variances = _spatial_mean((opponents - means[:, None, None]) ** 2)
    return jnp.sqrt(jnp.sum(variances, axis=-1)) + 0.3 * jnp.sqrt(jnp.sum(means**2, axis=-1))
