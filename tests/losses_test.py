"""Tests of smsanet_jax.losses: hand-computed values, gradient paths and the alpha = 0 shortcut."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from skimage import color

from smsanet_jax import losses


def _batch(rng: np.random.Generator, n: int = 2, size: int = 4, dtype=np.float32):
    l = rng.uniform(20.0, 90.0, (n, size, size, 1)).astype(dtype)
    true_ab = rng.uniform(-60.0, 60.0, (n, size, size, 2)).astype(dtype)
    pred_ab = rng.uniform(-60.0, 60.0, (n, size, size, 2)).astype(dtype)
    return l, true_ab, pred_ab


def _brightness_saliency(rgb255: jax.Array) -> jax.Array:
    """A smooth stand-in for PFANet: brighter pixels are more salient."""
    return jax.nn.sigmoid((jnp.mean(rgb255, axis=-1, keepdims=True) - 120.0) / 20.0)


def test_huber_hand_computed():
    # Raw ab errors 0.5 and -0.25 fall in the quadratic branch (|e| < 1), 3 and -2 in the linear one.
    pred = jnp.array([[[[0.5, 3.0], [10.0, -2.0]], [[-0.25, 0.0], [7.0, 7.0]]]])
    true = jnp.array([[[[0.0, 0.0], [10.0, 0.0]], [[0.0, 0.0], [7.0, 7.0]]]])
    per_element = np.array([0.5 * 0.5**2, 3.0 - 0.5, 0.0, 2.0 - 0.5, 0.5 * 0.25**2, 0.0, 0.0, 0.0]) / 110.0
    np.testing.assert_allclose(losses.huber(pred, true), per_element.mean(), rtol=1e-6)


def test_huber_is_raw_unit_huber_over_110():
    l, true_ab, pred_ab = _batch(np.random.default_rng(0))
    pred_ab = true_ab + np.random.default_rng(1).normal(0.0, 2.0, true_ab.shape).astype(np.float32)
    expected = jnp.mean(optax.huber_loss(pred_ab, true_ab, delta=1.0)) / 110.0
    np.testing.assert_allclose(losses.huber(pred_ab, true_ab), expected, rtol=1e-5)


def test_salient_hand_computed():
    pred_ab = jnp.array([[[[11.0, -22.0], [33.0, 44.0]]]])  # [1, 1, 2, 2]
    true_ab = jnp.array([[[[55.0, 0.0], [-11.0, 22.0]]]])
    pred_mask = jnp.array([[[[1.0], [0.0]]]])
    true_mask = jnp.array([[[[1.0], [1.0]]]])
    # m_true * true - m_pred * pred, in units of 110: [44, 22, -11, 22] / 110.
    diff = np.array([0.4, 0.2, -0.1, 0.2])
    np.testing.assert_allclose(losses.salient(pred_ab, true_ab, pred_mask, true_mask), np.abs(diff).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        losses.salient(pred_ab, true_ab, pred_mask, true_mask, norm="l2"), (diff**2).mean(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="norm"):
        losses.salient(pred_ab, true_ab, pred_mask, true_mask, norm="l3")


def test_saliency_masks_render_rgb_and_threshold():
    l, true_ab, pred_ab = _batch(np.random.default_rng(2))
    seen = []

    def saliency_fn(rgb255):
        seen.append(rgb255)
        return _brightness_saliency(rgb255)

    true_mask, pred_mask = losses.saliency_masks(saliency_fn, l, true_ab, pred_ab, threshold=0.5)
    (rgb255,) = seen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # out-of-gamut random ab
        expected_rgb = (
            np.concatenate(
                [
                    color.lab2rgb(np.concatenate([l, true_ab], -1).astype(np.float64)),
                    color.lab2rgb(np.concatenate([l, pred_ab], -1).astype(np.float64)),
                ]
            )
            * 255
        )
    np.testing.assert_allclose(rgb255, expected_rgb, atol=1e-3)
    expected_masks = (np.asarray(_brightness_saliency(rgb255)) >= 0.5).astype(np.float32)
    chex.assert_shape([true_mask, pred_mask], (2, 4, 4, 1))
    np.testing.assert_array_equal(np.concatenate([true_mask, pred_mask]), expected_masks)
    assert 0 < expected_masks.mean() < 1  # both classes occur, so the threshold is exercised
    # The threshold is inclusive.
    half = losses.saliency_masks(lambda x: jnp.full(x.shape[:-1] + (1,), 0.5), l, true_ab, pred_ab, 0.5)
    np.testing.assert_array_equal(np.concatenate(half), 1.0)


def test_saliency_fn_input_carries_no_gradient():
    l, true_ab, pred_ab = _batch(np.random.default_rng(3))
    seen = []

    def saliency_fn(rgb255):
        seen.append(rgb255)
        return _brightness_saliency(rgb255)

    def what_saliency_fn_sees(pred):
        losses.saliency_masks(saliency_fn, l, true_ab, pred, threshold=0.5)
        return seen[-1]

    _, tangent = jax.jvp(what_saliency_fn_sees, (pred_ab,), (jnp.ones_like(pred_ab),))
    np.testing.assert_array_equal(tangent, 0.0)


def test_mask_path_contributes_no_gradient():
    l, true_ab, pred_ab = _batch(np.random.default_rng(4))
    total = functools.partial(losses.total, alpha=1.0, saliency_fn=_brightness_saliency)
    grad = jax.grad(lambda p: total(p, true_ab, l)[0])(pred_ab)
    true_mask, pred_mask = losses.saliency_masks(_brightness_saliency, l, true_ab, pred_ab, 0.5)
    fixed_masks = jax.grad(lambda p: losses.huber(p, true_ab) + losses.salient(p, true_ab, pred_mask, true_mask))(
        pred_ab
    )
    np.testing.assert_allclose(grad, fixed_masks, rtol=1e-6, atol=1e-12)
    assert np.any(np.asarray(pred_mask) == 1) and np.any(np.asarray(pred_mask) == 0)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_matches_finite_differences(norm):
    eps = 1e-6
    with jax.enable_x64(True):
        l, true_ab, pred_ab = _batch(np.random.default_rng(5), n=1, size=3, dtype=np.float64)

        def loss(pred):
            return losses.total(pred, true_ab, l, alpha=1.0, saliency_fn=_brightness_saliency, norm=norm)[0]

        grad = np.asarray(jax.grad(loss)(pred_ab))
        basis = np.eye(pred_ab.size).reshape(-1, *pred_ab.shape) * eps
        loss_batch = jax.jit(jax.vmap(loss))
        numeric = (np.asarray(loss_batch(pred_ab + basis)) - np.asarray(loss_batch(pred_ab - basis))) / (2 * eps)
        assert grad.dtype == np.float64
        np.testing.assert_allclose(grad.ravel(), numeric, rtol=1e-6, atol=1e-9)
        masks = losses.saliency_masks(_brightness_saliency, l, true_ab, pred_ab, 0.5)
        assert 0 < np.mean(np.concatenate(masks)) < 1


def test_total_combines_terms():
    l, true_ab, pred_ab = _batch(np.random.default_rng(6))
    loss, terms = jax.jit(functools.partial(losses.total, alpha=2.0, saliency_fn=_brightness_saliency, norm="l2"))(
        pred_ab, true_ab, l
    )
    true_mask, pred_mask = losses.saliency_masks(_brightness_saliency, l, true_ab, pred_ab, 0.5)
    np.testing.assert_allclose(terms["huber"], losses.huber(pred_ab, true_ab), rtol=1e-6)
    np.testing.assert_allclose(
        terms["salient"], losses.salient(pred_ab, true_ab, pred_mask, true_mask, "l2"), rtol=1e-6
    )
    np.testing.assert_allclose(loss, terms["huber"] + 2.0 * terms["salient"], rtol=1e-6)
    assert loss == terms["total"]


def test_alpha_zero_never_runs_saliency():
    l, true_ab, pred_ab = _batch(np.random.default_rng(7))

    def saliency_fn(rgb255):
        raise AssertionError("saliency_fn called with alpha = 0")

    loss, terms = jax.jit(functools.partial(losses.total, alpha=0.0, saliency_fn=saliency_fn))(pred_ab, true_ab, l)
    assert terms["salient"] == 0.0
    np.testing.assert_allclose(loss, losses.huber(pred_ab, true_ab), rtol=1e-7)
    assert set(terms) == {"huber", "salient", "total"}
    with pytest.raises(ValueError, match="saliency_fn"):
        losses.total(pred_ab, true_ab, l, alpha=1.0)


def test_bfloat16_predictions_are_scored_in_float32():
    l, true_ab, pred_ab = _batch(np.random.default_rng(8))
    loss, terms = losses.total(pred_ab.astype(jnp.bfloat16), true_ab, l, alpha=1.0, saliency_fn=_brightness_saliency)
    assert loss.dtype == jnp.float32 and terms["salient"].dtype == jnp.float32
