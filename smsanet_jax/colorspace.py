"""sRGB <-> CIE Lab (D65, 2 degree observer) in jnp, matching scikit-image's rgb2lab / lab2rgb."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """float64 stays float64 (x64 mode); everything else is computed in float32."""
    return jnp.dtype(jnp.float64) if x.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _apply_matrix(matrix: np.ndarray, x: jax.Array) -> jax.Array:
    """`x @ matrix.T` over the last axis, as explicit products so that no TF32 matmul path is taken."""
    m = jnp.asarray(matrix, x.dtype)
    return x[..., 0:1] * m[:, 0] + x[..., 1:2] * m[:, 1] + x[..., 2:3] * m[:, 2]


def _srgb_to_linear(rgb: jax.Array) -> jax.Array:
    mask = rgb > 0.04045
    # The unused branch sees a safe base, so the power never yields NaN values or gradients.
    base = jnp.where(mask, (rgb + 0.055) / 1.055, 1.0)
    return jnp.where(mask, base**2.4, rgb / 12.92)


def _linear_to_srgb(linear: jax.Array) -> jax.Array:
    mask = linear > 0.0031308
    base = jnp.where(mask, linear, 1.0)
    return jnp.where(mask, 1.055 * base ** (1 / 2.4) - 0.055, linear * 12.92)


def _xyz_to_lab(xyz: jax.Array) -> jax.Array:
    t = xyz / jnp.asarray(D65_WHITE, xyz.dtype)
    mask = t > 0.008856
    f = jnp.where(mask, jnp.cbrt(jnp.where(mask, t, 1.0)), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _lab_to_xyz(lab: jax.Array) -> jax.Array:
    l, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (l + 16.0) / 116.0
    fx = a / 500.0 + fy
    # skimage clamps negative z (very saturated blue-less colours) to 0 before the inverse map.
    fz = jnp.maximum(fy - b / 200.0, 0.0)
    f = jnp.stack([fx, fy, fz], axis=-1)
    t = jnp.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    return t * jnp.asarray(D65_WHITE, lab.dtype)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
    """Converts sRGB to CIE Lab exactly as `skimage.color.rgb2lab` (D65, 2 degree observer).

    Args:
        rgb: float RGB in [0, 1], shape [..., 3]. float64 is kept (with x64 enabled); any other
            dtype is computed in float32.

    Returns:
        Lab of shape [..., 3] with L in [0, 100] and a, b roughly in [-128, 127].
    """
    rgb = jnp.asarray(rgb)
    rgb = rgb.astype(_compute_dtype(rgb))
    return _xyz_to_lab(_apply_matrix(XYZ_FROM_RGB, _srgb_to_linear(rgb)))


def lab_to_rgb(lab: jax.Array) -> jax.Array:
    """Converts CIE Lab to sRGB exactly as `skimage.color.lab2rgb`, clipped to [0, 1].

    Out-of-gamut colours are handled as skimage does: negative z is clamped to 0 in XYZ and the
    final RGB is clipped to [0, 1]. Gradients are finite everywhere (zero where clipped).

    Args:
        lab: Lab of shape [..., 3] with L in [0, 100]. float64 is kept (with x64 enabled); any other
            dtype is computed in float32.

    Returns:
        float RGB in [0, 1], shape [..., 3].
    """
    lab = jnp.asarray(lab)
    lab = lab.astype(_compute_dtype(lab))
    rgb = _linear_to_srgb(_apply_matrix(RGB_FROM_XYZ, _lab_to_xyz(lab)))
    return jnp.clip(rgb, 0.0, 1.0)


def rgb_uint8_to_lab(rgb: jax.Array) -> jax.Array:
    """Converts uint8 RGB [..., 3] to float32 Lab (as `rgb2lab(img_as_float(rgb))`)."""
    return rgb_to_lab(jnp.asarray(rgb).astype(jnp.float32) / 255.0)


def rgb_uint8_to_l_ab(rgb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 RGB [..., 3] -> (L [..., 1], ab [..., 2]), the network's input and target."""
    lab = rgb_uint8_to_lab(rgb)
    return lab[..., :1], lab[..., 1:]


def lab_to_rgb_uint8(lab: jax.Array) -> jax.Array:
    """Converts Lab [..., 3] to uint8 RGB, rounding half to even as `img_as_ubyte(lab2rgb(lab))`."""
    return jnp.clip(jnp.rint(lab_to_rgb(lab) * 255.0), 0, 255).astype(jnp.uint8)


def lab_from_l_ab(l: jax.Array, ab: jax.Array) -> jax.Array:
    """Concatenates L [..., 1] and ab [..., 2] (raw Lab units) into Lab [..., 3]."""
    return jnp.concatenate([l, ab], axis=-1)


def normalize_l(l: jax.Array) -> jax.Array:
    """Maps L in [0, 100] to BaseNet's input range [-0.5, 0.5]."""
    return (l - L_CENT) / L_NORM


def normalize_ab(ab: jax.Array) -> jax.Array:
    """Maps raw ab to BaseNet's normalised ab (ab / 110)."""
    return ab / AB_NORM


def denormalize_ab(ab: jax.Array) -> jax.Array:
    """Maps normalised ab back to raw Lab units (ab * 110)."""
    return ab * AB_NORM
