"""Parity of smsanet_jax.metrics with scikit-image (PSNR, SSIM) and NumPy (colourfulness)."""

import functools
import warnings

import chex
import jax
import numpy as np
import pytest
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from smsanet_jax import metrics

SIZE = 256


def _to_ubyte(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _lab2rgb_ubyte(lab: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # negative-z clamping of noisy ab.
        return _to_ubyte(color.lab2rgb(lab))


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """(pred, true) uint8 batches: crops of skimage photos against realistic colorization errors."""
    rng = np.random.default_rng(0)
    left, _, _ = data.stereo_motorcycle()
    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.immunohistochemistry(),
        data.retina(),
        left,
    ]
    # Top-left crops: retina's and hubble's include large flat black areas, the hard case for SSIM.
    true = np.stack([p[:SIZE, :SIZE] for p in photos])
    lab = color.rgb2lab(true)
    gray = _lab2rgb_ubyte(np.concatenate([lab[..., :1], np.zeros_like(lab[..., 1:])], axis=-1))
    ab_noise = _lab2rgb_ubyte(
        lab + np.concatenate([np.zeros_like(lab[..., :1]), rng.normal(0.0, 6.0, lab[..., 1:].shape)], axis=-1)
    )
    shifted = true.copy()
    shifted[..., 1:] = np.roll(true[..., 1:], 3, axis=2)  # chroma misregistered by 3 pixels.
    noise = np.clip(true + rng.normal(0.0, 8.0, true.shape).round(), 0, 255).astype(np.uint8)
    preds = np.concatenate([gray, ab_noise, shifted, noise, true])
    return preds, np.concatenate([true] * 5)


def _reference(fn, preds: np.ndarray, trues: np.ndarray) -> np.ndarray:
    return np.array([fn(t, p) for p, t in zip(preds, trues)])


def test_psnr_matches_skimage(pairs):
    preds, trues = pairs
    ours = np.asarray(jax.jit(metrics.psnr)(preds, trues))
    expected = _reference(functools.partial(peak_signal_noise_ratio, data_range=255), preds[:-8], trues[:-8])
    chex.assert_shape(ours, (len(preds),))
    np.testing.assert_allclose(ours[:-8], expected, atol=1e-3, rtol=0)
    assert np.all(np.isposinf(ours[-8:]))  # identical images


def test_psnr_is_exact_for_maximal_errors():
    black = np.zeros((2, 256, 256, 3), np.uint8)
    white = np.full_like(black, 255)
    # Sum of squared errors 256*256*3*255^2 overflows int32 if summed in one go.
    np.testing.assert_array_equal(np.asarray(metrics.psnr(black, white)), [0.0, 0.0])


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_matches_skimage(pairs, gaussian):
    preds, trues = pairs
    if gaussian:
        kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    else:
        kwargs = {}
    reference = functools.partial(structural_similarity, channel_axis=-1, data_range=255, **kwargs)
    ours = np.asarray(jax.jit(functools.partial(metrics.ssim, gaussian=gaussian))(preds, trues))
    chex.assert_shape(ours, (len(preds),))
    # The target is 1e-4; 1e-5 also catches a float32 E[x^2] - E[x]^2, which is ~1.5e-5 off here.
    np.testing.assert_allclose(ours, _reference(reference, preds, trues), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[-8:], 1.0, atol=1e-6)


def _colorfulness_np(image: np.ndarray) -> float:
    r, g, b = np.moveaxis(image.astype(np.float64), -1, 0)
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)


def test_colorfulness_matches_numpy(pairs):
    preds, _ = pairs
    ours = np.asarray(jax.jit(metrics.colorfulness)(preds))
    expected = np.array([_colorfulness_np(p) for p in preds])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


def test_rejects_bad_inputs():
    image = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(TypeError):
        metrics.psnr(image.astype(np.float32), image)
    with pytest.raises(ValueError):
        metrics.psnr(image, image[:, :8])
    with pytest.raises(ValueError):
        metrics.ssim(image[:, :6, :6], image[:, :6, :6])
    with pytest.raises(ValueError):
        metrics.ssim(image[:, :10, :10], image[:, :10, :10], gaussian=True)
