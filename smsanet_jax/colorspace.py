"""sRGB <-> CIE Lab (D65, 2 degree observer), matching scikit-image's rgb2lab / lab2rgb.

Every function works on NumPy and on JAX arrays (inside `jit` too): the array module is the
input's own (the array API's `__array_namespace__`), so the result is of the input's kind and
this module never imports JAX. The ONNX runtime path (`onnx_runtime`) runs it on NumPy alone.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

# scikit-image's sRGB -> XYZ matrix and D65 white point (skimage.color.colorconv); the inverse is
# taken in float64 as skimage does, so both directions use the same numbers.
XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
D65_WHITE = np.array([0.95047, 1.0, 1.08883])

# BaseNet (SIGGRAPH17) input/output normalisation.
L_CENT = 50.0
L_NORM = 100.0
AB_NORM = 110.0


def array_module(*arrays: Any) -> ModuleType:
    """The module to compute `arrays` with: jax.numpy if any is a JAX array (or tracer), else numpy."""
    for x in arrays:
        if hasattr(x, "__array_namespace__") and x.__array_namespace__() is not np:
            return x.__array_namespace__()
    return np


def _as_float(x: Any) -> Any:
    """`x` as an array of its own module: float64 stays float64 (x64 mode in JAX), the rest becomes float32."""
    xp = array_module(x)
    x = xp.asarray(x)
    return x.astype(np.float64 if x.dtype == np.float64 else np.float32)


def _apply_matrix(matrix: np.ndarray, x: Any) -> Any:
    """`x @ matrix.T` over the last axis, as explicit products so that no TF32 matmul path is taken."""
    m = array_module(x).asarray(matrix, dtype=x.dtype)
    return x[..., 0:1] * m[:, 0] + x[..., 1:2] * m[:, 1] + x[..., 2:3] * m[:, 2]


def _srgb_to_linear(rgb: Any) -> Any:
    xp = array_module(rgb)
    mask = rgb > 0.04045
    # The unused branch sees a safe base, so the power never yields NaN values or gradients.
    base = xp.where(mask, (rgb + 0.055) / 1.055, 1.0)
    return xp.where(mask, base**2.4, rgb / 12.92)


def _linear_to_srgb(linear: Any) -> Any:
    xp = array_module(linear)
    mask = linear > 0.0031308
    base = xp.where(mask, linear, 1.0)
    return xp.where(mask, 1.055 * base ** (1 / 2.4) - 0.055, linear * 12.92)


def _xyz_to_lab(xyz: Any) -> Any:
    xp = array_module(xyz)
    t = xyz / xp.asarray(D65_WHITE, dtype=xyz.dtype)
    mask = t > 0.008856
    f = xp.where(mask, xp.cbrt(xp.where(mask, t, 1.0)), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return xp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _lab_to_xyz(lab: Any) -> Any:
    xp = array_module(lab)
    l, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (l + 16.0) / 116.0
    fx = a / 500.0 + fy
    # skimage clamps negative z (very saturated blue-less colours) to 0 before the inverse map.
    fz = xp.maximum(fy - b / 200.0, 0.0)
    f = xp.stack([fx, fy, fz], axis=-1)
    t = xp.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    return t * xp.asarray(D65_WHITE, dtype=lab.dtype)


def rgb_to_lab(rgb: Any) -> Any:
    """Converts sRGB to CIE Lab exactly as `skimage.color.rgb2lab` (D65, 2 degree observer).

    Args:
        rgb: float RGB in [0, 1], shape [..., 3]. float64 is kept (with x64 enabled); any other
            dtype is computed in float32.

    Returns:
        Lab of shape [..., 3] with L in [0, 100] and a, b roughly in [-128, 127].
    """
    return _xyz_to_lab(_apply_matrix(XYZ_FROM_RGB, _srgb_to_linear(_as_float(rgb))))


def lab_to_rgb(lab: Any) -> Any:
    """Converts CIE Lab to sRGB exactly as `skimage.color.lab2rgb`, clipped to [0, 1].

    Out-of-gamut colours are handled as skimage does: negative z is clamped to 0 in XYZ and the
    final RGB is clipped to [0, 1]. Gradients are finite everywhere (zero where clipped).

    Args:
        lab: Lab of shape [..., 3] with L in [0, 100]. float64 is kept (with x64 enabled); any other
            dtype is computed in float32.

    Returns:
        float RGB in [0, 1], shape [..., 3].
    """
    rgb = _linear_to_srgb(_apply_matrix(RGB_FROM_XYZ, _lab_to_xyz(_as_float(lab))))
    return array_module(rgb).clip(rgb, 0.0, 1.0)


def rgb_uint8_to_lab(rgb: Any) -> Any:
    """Converts uint8 RGB [..., 3] to float32 Lab (as `rgb2lab(img_as_float(rgb))`)."""
    return rgb_to_lab(array_module(rgb).asarray(rgb).astype(np.float32) / 255.0)


def rgb_uint8_to_l_ab(rgb: Any) -> tuple[Any, Any]:
    """uint8 RGB [..., 3] -> (L [..., 1], ab [..., 2]), the network's input and target."""
    lab = rgb_uint8_to_lab(rgb)
    return lab[..., :1], lab[..., 1:]


def lab_to_rgb_uint8(lab: Any) -> Any:
    """Converts Lab [..., 3] to uint8 RGB, rounding half to even as `img_as_ubyte(lab2rgb(lab))`."""
    rgb = lab_to_rgb(lab)
    xp = array_module(rgb)
    return xp.clip(xp.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def lab_from_l_ab(l: Any, ab: Any) -> Any:
    """Concatenates L [..., 1] and ab [..., 2] (raw Lab units) into Lab [..., 3]."""
    return array_module(l, ab).concatenate([l, ab], axis=-1)


def normalize_l(l: Any) -> Any:
    """Maps L in [0, 100] to BaseNet's input range [-0.5, 0.5]."""
    return (l - L_CENT) / L_NORM


def normalize_ab(ab: Any) -> Any:
    """Maps raw ab to BaseNet's normalised ab (ab / 110)."""
    return ab / AB_NORM


def denormalize_ab(ab: Any) -> Any:
    """Maps normalised ab back to raw Lab units (ab * 110)."""
    return ab * AB_NORM
