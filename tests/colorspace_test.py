"""Parity of smsanet_jax.colorspace with scikit-image on real photographs and random colours."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import color, data

from smsanet_jax import colorspace

NUM_RANDOM = 10**6


def _lab2rgb(lab: np.ndarray) -> np.ndarray:
    # skimage warns whenever it clamps negative z, which out-of-gamut test colours do on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return color.lab2rgb(lab)


def _to_ubyte(rgb: np.ndarray) -> np.ndarray:
    """skimage's img_as_ubyte for float images in [0, 1]: x * 255, round half to even."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_pixels() -> np.ndarray:
    """Every colour photograph in the scikit-image wheel, as uint8 pixels [M, 3]."""
    left, right, _ = data.stereo_motorcycle()
    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.immunohistochemistry(),
        data.retina(),
        data.colorwheel(),
        left,
        right,
    ]
    return np.concatenate([p.reshape(-1, 3) for p in photos])


@pytest.fixture(scope="module")
def photo_lab(photo_pixels) -> np.ndarray:
    """skimage's float64 Lab of the photographs, the reference for both directions."""
    return color.rgb2lab(photo_pixels)


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_rgb_to_lab_matches_skimage(photo_pixels, photo_lab, rng):
    to_lab = jax.jit(colorspace.rgb_to_lab)
    random_rgb = rng.random((NUM_RANDOM, 3), dtype=np.float32)
    cases = (
        (photo_pixels.astype(np.float32) / 255, photo_lab),
        (random_rgb, color.rgb2lab(random_rgb.astype(np.float64))),
    )
    for rgb, lab64 in cases:
        ours = np.asarray(to_lab(rgb))
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, color.rgb2lab(rgb), atol=1e-3, rtol=0)
        np.testing.assert_allclose(ours, lab64, atol=1e-3, rtol=0)


def test_rgb_uint8_to_lab_matches_skimage(photo_pixels, photo_lab):
    ours = np.asarray(jax.jit(colorspace.rgb_uint8_to_lab)(photo_pixels))
    np.testing.assert_allclose(ours, photo_lab, atol=1e-3, rtol=0)


def test_lab_to_rgb_uint8_matches_skimage(photo_pixels, photo_lab, rng):
    # Random Lab covers the whole a/b box, so most of it is out of gamut (clipped RGB, negative z),
    # plus a band far outside the usual range.
    random_lab = np.stack(
        [rng.uniform(0, 100, NUM_RANDOM), rng.uniform(-128, 127, NUM_RANDOM), rng.uniform(-128, 127, NUM_RANDOM)],
        axis=-1,
    )
    extreme_lab = np.stack(
        [rng.uniform(-10, 110, 10**5), rng.uniform(-300, 300, 10**5), rng.uniform(-300, 300, 10**5)], axis=-1
    )
    to_rgb_uint8 = jax.jit(colorspace.lab_to_rgb_uint8)
    for lab in (photo_lab, random_lab, extreme_lab):
        ours = np.asarray(to_rgb_uint8(lab.astype(np.float32))).astype(np.int32)
        expected = _to_ubyte(_lab2rgb(lab)).astype(np.int32)
        diff = np.abs(ours - expected)
        assert diff.max() <= 1
        assert np.mean(diff > 0) <= 1e-4
    # uint8 -> Lab -> uint8 reproduces the photographs.
    round_trip = jax.jit(lambda u8: colorspace.lab_to_rgb_uint8(colorspace.rgb_uint8_to_lab(u8)))
    np.testing.assert_array_equal(np.asarray(round_trip(photo_pixels)), photo_pixels)


def test_lab_to_rgb_float_matches_skimage(rng):
    lab = np.stack([rng.uniform(0, 100, 10**5), rng.uniform(-128, 127, 10**5), rng.uniform(-128, 127, 10**5)], axis=-1)
    ours = np.asarray(jax.jit(colorspace.lab_to_rgb)(lab.astype(np.float32)))
    assert ours.min() >= 0 and ours.max() <= 1
    np.testing.assert_allclose(ours, _lab2rgb(lab), atol=2e-5, rtol=0)


def test_float64_is_kept_and_exact(rng):
    rgb = rng.random((1000, 3))
    with jax.enable_x64(True):
        lab = colorspace.rgb_to_lab(jnp.asarray(rgb))
        back = colorspace.lab_to_rgb(lab)
        assert lab.dtype == jnp.float64 and back.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(lab), color.rgb2lab(rgb), atol=1e-9, rtol=0)
        np.testing.assert_allclose(np.asarray(back), color.lab2rgb(color.rgb2lab(rgb)), atol=1e-9, rtol=0)


def test_jit_over_leading_axes(rng):
    rgb = rng.random((2, 3, 4, 5, 3), dtype=np.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def round_trip(x):
        return colorspace.lab_to_rgb(colorspace.rgb_to_lab(x))

    lab = colorspace.rgb_to_lab(rgb)
    chex.assert_shape(lab, (2, 3, 4, 5, 3))
    np.testing.assert_allclose(np.asarray(lab).reshape(-1, 3), np.asarray(colorspace.rgb_to_lab(rgb.reshape(-1, 3))))
    np.testing.assert_allclose(np.asarray(round_trip(rgb)), rgb, atol=1e-5)
    round_trip(rgb + 0.0)  # Same shape and dtype: no retrace.
    chex.assert_shape(colorspace.rgb_to_lab(rgb[0, 0, 0, 0]), (3,))


def _summed(fn):
    return lambda x: jnp.sum(fn(x))


def test_gradients_are_finite_at_zero_and_gamut_edges():
    rgb = jnp.array(
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.04045] * 3, [0.0, 0.5, 1.0], [1e-30, 0.0, 1e-8], [-0.1, 1.2, 0.0]]
    )
    lab = jnp.array(
        [
            [0.0, 0.0, 0.0],
            [100.0, 0.0, 0.0],
            [8.0, 0.0, 0.0],
            [50.0, 127.0, -128.0],
            [50.0, -128.0, 127.0],
            [0.0, -128.0, 127.0],
            [100.0, 127.0, 127.0],
            [20.0, 0.0, 100.0],
            [50.0, 0.0, 500.0],
            [-5.0, 300.0, -300.0],
        ]
    )

    def round_trip(x):
        return colorspace.lab_to_rgb(colorspace.rgb_to_lab(x))

    for fn, x in ((colorspace.rgb_to_lab, rgb), (colorspace.lab_to_rgb, lab), (round_trip, rgb)):
        chex.assert_tree_all_finite(jax.jit(jax.jacfwd(fn))(x))
        chex.assert_tree_all_finite(jax.jit(jax.grad(_summed(fn)))(x))


def test_normalisation_helpers():
    l = jnp.array([[0.0], [50.0], [100.0]])
    ab = jnp.array([[-110.0, 55.0], [0.0, 0.0], [110.0, -22.0]])
    np.testing.assert_allclose(colorspace.normalize_l(l), [[-0.5], [0.0], [0.5]])
    np.testing.assert_allclose(colorspace.normalize_ab(ab), [[-1.0, 0.5], [0.0, 0.0], [1.0, -0.2]])
    np.testing.assert_allclose(colorspace.denormalize_ab(colorspace.normalize_ab(ab)), ab, rtol=1e-6)
    chex.assert_shape(colorspace.lab_from_l_ab(l, ab), (3, 3))
