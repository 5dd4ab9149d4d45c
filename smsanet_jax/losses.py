"""Colorization losses: Huber on ab (paper Eq. 5), salient loss (Eq. 6) and their sum (Eq. 7)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from smsanet_jax import colorspace

# delta = 1 in raw ab units, i.e. 1/110 on the normalised ab the loss is computed on (Zhang et al.).
HUBER_DELTA = 1.0 / colorspace.AB_NORM
NORMS = ("l1", "l2")

# Maps RGB in [0, 255], [N, H, W, 3], to a saliency probability [N, H, W, 1] (PFANet).
SaliencyFn = Callable[[jax.Array], jax.Array]


def _at_least_f32(x: jax.Array) -> jax.Array:
    """bf16/f16 network outputs are scored in float32; float64 (x64 tests) stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def huber(pred_ab: jax.Array, true_ab: jax.Array) -> jax.Array:
    """Huber loss of Eq. 5 in Zhang et al.'s smooth-L1 form on normalised ab.

    With d = |pred_ab - true_ab| / 110 and delta = 1/110, each element costs
    0.5 d^2 / delta if d < delta else d - 0.5 delta, and the loss is the mean over N, H, W, C
    (Eq. 5's 1/(CHW); Zhang's code sums over C instead). This equals Huber with delta = 1 on the raw
    ab error, divided by 110.

    Args:
        pred_ab: predicted ab in raw Lab units, [N, H, W, 2].
        true_ab: ground-truth ab in raw Lab units, [N, H, W, 2].

    Returns:
        float32 scalar (float64 for float64 inputs).
    """
    d = jnp.abs(colorspace.normalize_ab(_at_least_f32(pred_ab) - _at_least_f32(true_ab)))
    return jnp.mean(jnp.where(d < HUBER_DELTA, 0.5 * d * d / HUBER_DELTA, d - 0.5 * HUBER_DELTA))


def salient(
    pred_ab: jax.Array, true_ab: jax.Array, pred_mask: jax.Array, true_mask: jax.Array, norm: str = "l1"
) -> jax.Array:
    """Salient loss of Eq. 6: mean over N, H, W, C of |m_true ab_true - m_pred ab_pred| on ab / 110.

    Args:
        pred_ab: predicted ab in raw Lab units, [N, H, W, 2].
        true_ab: ground-truth ab in raw Lab units, [N, H, W, 2].
        pred_mask: {0, 1} saliency mask of the prediction, [N, H, W, 1]; no gradient flows into it.
        true_mask: {0, 1} saliency mask of the ground truth, [N, H, W, 1]; no gradient flows into it.
        norm: "l1" (mean absolute difference) or "l2" (mean squared difference).

    Returns:
        float32 scalar (float64 for float64 inputs).

    Raises:
        ValueError: for an unknown norm.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    pred_mask, true_mask = jax.lax.stop_gradient((pred_mask, true_mask))
    diff = colorspace.normalize_ab(true_mask * _at_least_f32(true_ab) - pred_mask * _at_least_f32(pred_ab))
    return jnp.mean(jnp.abs(diff) if norm == "l1" else diff * diff)


def saliency_masks(
    saliency_fn: SaliencyFn, l: jax.Array, true_ab: jax.Array, pred_ab: jax.Array, threshold: float
) -> tuple[jax.Array, jax.Array]:
    """Binary saliency masks of the ground truth and of the prediction, both without gradient.

    The two RGB renderings (L + true ab, L + predicted ab, via `colorspace.lab_to_rgb`, scaled to
    [0, 255]) go through `saliency_fn` as one concatenated batch of 2N images.

    Args:
        saliency_fn: RGB in [0, 255] [2N, H, W, 3] -> probability [2N, H, W, 1].
        l: ground-truth L in [0, 100], [N, H, W, 1].
        true_ab: ground-truth ab in raw Lab units, [N, H, W, 2].
        pred_ab: predicted ab in raw Lab units, [N, H, W, 2].
        threshold: a pixel is salient where its probability is >= threshold.

    Returns:
        (true_mask, pred_mask), float32 {0, 1} masks [N, H, W, 1].
    """
    lab = jnp.concatenate([colorspace.lab_from_l_ab(l, true_ab), colorspace.lab_from_l_ab(l, pred_ab)])
    rgb255 = colorspace.lab_to_rgb(jax.lax.stop_gradient(lab)) * 255.0
    masks = (saliency_fn(rgb255) >= threshold).astype(jnp.float32)
    true_mask, pred_mask = jnp.split(jax.lax.stop_gradient(masks), 2)
    return true_mask, pred_mask


def total(
    pred_ab: jax.Array,
    true_ab: jax.Array,
    l: jax.Array,
    *,
    alpha: float,
    saliency_fn: SaliencyFn | None = None,
    threshold: float = 0.5,
    norm: str = "l1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss of Eq. 7: huber + alpha * salient.

    Args:
        pred_ab: predicted ab in raw Lab units, [N, H, W, 2].
        true_ab: ground-truth ab in raw Lab units, [N, H, W, 2].
        l: ground-truth L in [0, 100], [N, H, W, 1].
        alpha: weight of the salient loss (a static Python float); with 0 the saliency network is
            never run and "salient" is reported as 0.
        saliency_fn: RGB in [0, 255] -> saliency probability (see `saliency_masks`); needed if
            alpha != 0.
        threshold: saliency probability at or above which a pixel is foreground.
        norm: "l1" or "l2" for the salient loss.

    Returns:
        (loss, {"huber", "salient", "total"}), float32 scalars.

    Raises:
        ValueError: if alpha != 0 and saliency_fn is None or norm is unknown.
    """
    huber_loss = huber(pred_ab, true_ab)
    if alpha:
        if saliency_fn is None:
            raise ValueError("alpha != 0 needs a saliency_fn")
        true_mask, pred_mask = saliency_masks(saliency_fn, l, true_ab, pred_ab, threshold)
        salient_loss = salient(pred_ab, true_ab, pred_mask, true_mask, norm)
    else:
        salient_loss = jnp.zeros((), huber_loss.dtype)
    loss = huber_loss + alpha * salient_loss
    return loss, {"huber": huber_loss, "salient": salient_loss, "total": loss}
