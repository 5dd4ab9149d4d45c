"""The full-resolution merge: a photo's own L with the network's ab upsampled to its size.

The network sees a 256x256 resize of the photo; only its predicted ab is resized (bilinear, half-pixel
centres, as Zhang et al.'s postprocess) to the original size and merged with the original L, then
converted to uint8 sRGB. Out-of-gamut colours lose chroma rather than lightness (`fit_chroma`), so
the output's L is the original's within uint8 rounding.

Like `colorspace`, every function runs on NumPy arrays (the onnxruntime path, without JAX) and on
JAX arrays inside `jit` (`inference.merge_full_resolution`), computing with the input's module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from smsanet_jax import colorspace

# Bisection steps of `fit_chroma`: out-of-gamut chroma is kept to within 2^-12 of the largest that fits.
CHROMA_STEPS = 12


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights [out_size, taps] of a 1-D linear resize, as `jax.image.resize`.

    Output pixel o samples the input at (o + 0.5) * in/out - 0.5 with a triangle kernel, widened by
    in/out when downsampling (antialiasing); each output's weights are normalised to sum to one,
    so the edges repeat. Only the nonzero taps are kept: 2 when upsampling.
    """
    inv_scale = in_size / out_size
    kernel_scale = max(inv_scale, 1.0)
    sample = (np.arange(out_size) + 0.5) * inv_scale - 0.5
    dense = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(in_size)[None, :]) / kernel_scale)
    dense /= dense.sum(axis=1, keepdims=True)
    nonzero = dense > 0
    taps = int(nonzero.sum(axis=1).max())
    # Each row's nonzero weights are contiguous: `taps` indices from the first; those past the end weigh 0.
    index = nonzero.argmax(axis=1)[:, None] + np.arange(taps)
    inside = index < in_size
    index = np.where(inside, index, 0)
    weights = np.where(inside, np.take_along_axis(dense, index, axis=1), 0.0)
    return index, weights.astype(np.float32)


def _resize_axis(x: Any, axis: int, size: int) -> Any:
    xp = colorspace.array_module(x)
    index, weights = _linear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    out = 0.0
    for k in range(index.shape[1]):
        out = out + xp.take(x, index[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def resize_bilinear(image: Any, height: int, width: int) -> Any:
    """Resizes a float image [h, w, C] to [height, width, C] as `jax.image.resize(..., "bilinear")`."""
    return _resize_axis(_resize_axis(image, 0, height), 1, width)


def _fori_loop(xp: Any, steps: int, body: Callable[[Any], Any], carry: Any) -> Any:
    """`steps` calls of `body(carry) -> carry`: a Python loop on NumPy, one `lax.fori_loop` under JAX.

    Unrolled under `jit`, XLA would fuse the loop's inputs (the resized ab's gathers) into every
    step and compute them 12 times over: twice the merge's time.
    """
    if xp is np:
        for _ in range(steps):
            carry = body(carry)
        return carry
    lax = importlib.import_module("jax.lax")  # Already loaded: `xp` is jax.numpy.
    return lax.fori_loop(0, steps, lambda _, c: body(c), carry)


def _fits(l: Any, ab: Any) -> Any:
    """Whether each pixel's colour is inside sRGB, [..., 1]."""
    # lab_to_rgb clips to [0, 1]: a channel at a bound means the colour was (at least) on the edge.
    rgb = colorspace.lab_to_rgb(colorspace.lab_from_l_ab(l, ab))
    return colorspace.array_module(rgb).all((rgb > 0.0) & (rgb < 1.0), axis=-1, keepdims=True)


def _largest_fitting_scale(l: Any, ab: Any) -> Any:
    """Bisects [0, 1] for the largest scale of ab that fits, [..., 1]; 0 when none does."""
    xp = colorspace.array_module(l, ab)

    def bisect(bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = _fits(l, ab * mid)
        return xp.where(good, mid, lo), xp.where(good, hi, mid)

    hi = xp.ones_like(l[..., :1]).astype(ab.dtype)
    return _fori_loop(xp, CHROMA_STEPS, bisect, (0.0 * hi, hi))[0]


def fit_chroma(l: Any, ab: Any) -> Any:
    """Shrinks each pixel's ab toward gray just enough that its colour fits in sRGB.

    Clipping an out-of-gamut colour in RGB (what lab2rgb does) changes its lightness, by up to
    ~10 L units for saturated dark or bright predictions; scaling the chroma instead keeps L and
    hue. The scale is the largest in [0, 1] (bisection, 2^-`CHROMA_STEPS` resolution) at which
    no sRGB channel needs clipping; gray (scale 0) is always kept.

    Args:
      l: L in [0, 100], [..., 1].
      ab: raw ab, [..., 2].

    Returns:
      The scaled ab, [..., 2].
    """
    xp = colorspace.array_module(l, ab)
    inside = _fits(l, ab)
    if xp is not np:  # Static shapes: every pixel is bisected, and the in-gamut ones keep scale 1.
        return ab * xp.where(inside, 1.0, _largest_fitting_scale(l, ab))
    # Pixels are independent: NumPy bisects only the out-of-gamut ones (usually few).
    outside = ~inside[..., 0]
    scale = np.ones(l.shape, ab.dtype)
    scale[outside] = _largest_fitting_scale(l[outside], ab[outside])
    return ab * scale


def merge(rgb: Any, ab_small: Any) -> Any:
    """The original L with the network's ab upsampled to its size, as uint8 sRGB.

    Args:
      rgb: the original image, uint8 [H, W, 3].
      ab_small: predicted raw ab [h, w, 2] at the network's resolution.

    Returns:
      uint8 [H, W, 3], whose L equals the original's within uint8 rounding (see `fit_chroma`).
    """
    l = colorspace.rgb_uint8_to_lab(rgb)[..., :1]
    ab = resize_bilinear(ab_small, *rgb.shape[:2])
    return colorspace.lab_to_rgb_uint8(colorspace.lab_from_l_ab(l, fit_chroma(l, ab)))
