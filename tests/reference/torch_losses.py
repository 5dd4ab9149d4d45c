"""PyTorch colorization losses (paper Eqs. 5-7) in NCHW, written from the paper: the benchmark's PyTorch salient step.

Same conventions as `smsanet_jax.losses`: raw Lab units in, losses on ab / 110. The saliency masks
come from a PFANet-S module (tests/reference/torch_pfanet.py) in eval mode on the two RGB
renderings (L + true ab, L + predicted ab), without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AB_NORM = 110.0
HUBER_DELTA = 1.0 / AB_NORM
# sRGB (D65) from CIE XYZ: the inverse of the sRGB -> XYZ matrix scikit-image uses.
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB).float()
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def _channels(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel constant shaped [1, C, 1, 1] on `like`'s device."""
    return values.to(like.device, like.dtype)[None, :, None, None]


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab [N,3,H,W] (D65) -> sRGB in [0, 1], as scikit-image's lab2rgb (negative z clamped, RGB clipped)."""
    l, a, b = lab.unbind(1)
    fy = (l + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, torch.clamp(fy - b / 200.0, min=0.0)], 1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _channels(_D65_WHITE, lab)
    linear = torch.einsum("rc,nchw->nrhw", _RGB_FROM_XYZ.to(lab.device), xyz)
    srgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return srgb.clamp(0.0, 1.0)


def huber(pred_ab: torch.Tensor, true_ab: torch.Tensor) -> torch.Tensor:
    """Eq. 5: smooth L1 with delta 1/110 on ab / 110, mean over every element."""
    return F.smooth_l1_loss(pred_ab / AB_NORM, true_ab / AB_NORM, beta=HUBER_DELTA)


@torch.no_grad()
def saliency_masks(
    pfanet: torch.nn.Module, l: torch.Tensor, true_ab: torch.Tensor, pred_ab: torch.Tensor, size: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """{0, 1} masks [N,1,H,W] of the truth and the prediction: PFANet-S at size x size on both renderings at once."""
    lab = torch.cat([torch.cat([l, true_ab], 1), torch.cat([l, pred_ab], 1)])
    rgb = lab_to_rgb(lab)
    height, width = rgb.shape[-2:]
    if (height, width) != (size, size):
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    prob, _ = pfanet((rgb - _channels(_IMAGENET_MEAN, rgb)) / _channels(_IMAGENET_STD, rgb))
    if (height, width) != (size, size):
        prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    masks = (prob.clamp(0.0, 1.0) >= threshold).float()
    true_mask, pred_mask = masks.chunk(2)
    return true_mask, pred_mask


def total(
    pred_ab: torch.Tensor,
    true_ab: torch.Tensor,
    l: torch.Tensor,
    *,
    alpha: float,
    pfanet: torch.nn.Module | None = None,
    size: int = 256,
    threshold: float = 0.5,
    norm: str = "l1",
) -> torch.Tensor:
    """Eq. 7: huber + alpha * salient (Eq. 6, |m_true ab_true - m_pred ab_pred| on ab / 110, l1 or l2)."""
    loss = huber(pred_ab, true_ab)
    if not alpha:
        return loss
    true_mask, pred_mask = saliency_masks(pfanet, l, true_ab, pred_ab, size, threshold)
    diff = (true_mask * true_ab - pred_mask * pred_ab) / AB_NORM
    return loss + alpha * (diff.abs() if norm == "l1" else diff * diff).mean()
