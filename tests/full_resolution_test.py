"""The full-resolution merge and the colour conversions on NumPy: the same results as in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import color, data

from smsanet_jax import colorspace, full_resolution, inference

# Photo sizes around the network's 256: upsampled, downsampled (antialiased) and mixed.
SIZES = ((683, 1024), (171, 300), (32, 17), (256, 256), (1, 1))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("size", SIZES)
def test_resize_matches_jax_image_resize(size, rng):
    ab = rng.uniform(-110, 110, (256, 256, 2)).astype(np.float32)
    reference = np.asarray(jax.image.resize(jnp.asarray(ab), size + (2,), "bilinear"))
    in_jax = jax.jit(full_resolution.resize_bilinear, static_argnums=(1, 2))
    for ours in (full_resolution.resize_bilinear(ab, *size), in_jax(ab, *size)):
        # jax.image.resize computes its weights in float32 (~1e-5 of an index); ours in float64.
        np.testing.assert_allclose(np.asarray(ours), reference, atol=3e-3, rtol=0)


def test_colorspace_numpy_matches_jax(rng):
    pixels = np.concatenate([data.astronaut().reshape(-1, 3), data.coffee().reshape(-1, 3)])
    lab_np = colorspace.rgb_uint8_to_lab(pixels)
    assert isinstance(lab_np, np.ndarray) and lab_np.dtype == np.float32
    np.testing.assert_allclose(lab_np, np.asarray(jax.jit(colorspace.rgb_uint8_to_lab)(pixels)), atol=1e-3, rtol=0)
    np.testing.assert_allclose(lab_np, color.rgb2lab(pixels), atol=1e-3, rtol=0)
    lab = np.concatenate([lab_np, rng.uniform([0, -128, -128], [100, 127, 127], (10**5, 3)).astype(np.float32)])
    back = colorspace.lab_to_rgb_uint8(lab)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - np.asarray(jax.jit(colorspace.lab_to_rgb_uint8)(lab)).astype(int)).max() <= 1


@pytest.mark.parametrize("photo", [data.coffee(), data.astronaut()[::3, ::2], data.chelsea()[:40, :30]])
def test_merge_numpy_matches_jax(photo, rng):
    for spread in (30.0, 110.0):  # Mostly in gamut; mostly out of it (fit_chroma at work).
        ab = rng.uniform(-spread, spread, (256, 256, 2)).astype(np.float32)
        ours = full_resolution.merge(photo, ab)
        assert isinstance(ours, np.ndarray) and ours.dtype == np.uint8 and ours.shape == photo.shape
        jax_merge = np.asarray(inference.merge_full_resolution(photo, ab))
        assert np.abs(ours.astype(int) - jax_merge.astype(int)).max() <= 1
        # The merge keeps the photo's lightness (uint8 rounding moves L by < 0.3).
        assert np.abs(color.rgb2lab(ours)[..., 0] - color.rgb2lab(photo)[..., 0]).max() < 0.3
