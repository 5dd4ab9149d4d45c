"""PyTorch SIGGRAPH17 generator written from the layer table in docs/architecture.md (BaseNet), as a reference.

Independent of the Flax code: it is the parity reference for tests and the torch side of the
benchmark. Same I/O convention as `smsanet_jax.models.BaseNet`, but in torch's NCHW layout:
L in [0, 100] [N,1,H,W], optional raw ab hints [N,2,H,W] and mask [N,1,H,W] (zeros by default),
normalised inside; returns raw ab = 110 * tanh(regression head). State-dict keys are those of the
released `siggraph17` weights, class head (`model_class`, never computed) included.
"""

from __future__ import annotations

import torch
from torch import nn

L_CENT, L_NORM, AB_NORM = 50.0, 100.0, 110.0


def _encoder_block(channels: list[int], dilation: int = 1) -> nn.Sequential:
    """conv3x3 -> ReLU for each channel step, then BN: indices 0, 2, 4 ... are convs, the last is BN."""
    ops: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        ops += [nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation), nn.ReLU(True)]
    return nn.Sequential(*ops, nn.BatchNorm2d(channels[-1]))


def _decoder_block(channels: list[int], batch_norm: bool = True) -> nn.Sequential:
    """ReLU on the merged input, then conv3x3 -> ReLU (LeakyReLU 0.2 without BN) steps, then BN."""
    ops: list[nn.Module] = [nn.ReLU(True)]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        ops += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(True) if batch_norm else nn.LeakyReLU(0.2, True)]
    if batch_norm:
        ops.append(nn.BatchNorm2d(channels[-1]))
    return nn.Sequential(*ops)


class SIGGRAPH17(nn.Module):
    """Zhang et al. 2017 generator; `width` 64 is the released network (channels w, 2w, 4w, 8w)."""

    def __init__(self, width: int = 64, classes: int = 529):
        super().__init__()
        w = width
        self.model1 = _encoder_block([4, w, w])
        self.model2 = _encoder_block([w, 2 * w, 2 * w])
        self.model3 = _encoder_block([2 * w, 4 * w, 4 * w, 4 * w])
        self.model4 = _encoder_block([4 * w, 8 * w, 8 * w, 8 * w])
        self.model5 = _encoder_block([8 * w] * 4, dilation=2)
        self.model6 = _encoder_block([8 * w] * 4, dilation=2)
        self.model7 = _encoder_block([8 * w] * 4)
        self.model8up = nn.Sequential(nn.ConvTranspose2d(8 * w, 4 * w, 4, stride=2, padding=1))
        self.model8 = _decoder_block([4 * w] * 3)
        self.model9up = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1))
        self.model9 = _decoder_block([2 * w] * 2)
        self.model10up = nn.Sequential(nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1))
        self.model10 = _decoder_block([2 * w] * 2, batch_norm=False)
        self.model3short8 = nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1))
        self.model2short9 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1))
        self.model1short10 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1))
        self.model_class = nn.Sequential(nn.Conv2d(4 * w, classes, 1))
        self.model_out = nn.Sequential(nn.Conv2d(2 * w, 2, 1), nn.Tanh())

    def forward(
        self, l: torch.Tensor, ab_hint: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L [N,1,H,W] in [0,100] (H, W divisible by 8) -> raw ab [N,2,H,W]."""
        if ab_hint is None:
            ab_hint = torch.zeros_like(l).repeat(1, 2, 1, 1)
        if mask is None:
            mask = torch.zeros_like(l)
        x = torch.cat([(l - L_CENT) / L_NORM, ab_hint / AB_NORM, mask], dim=1)
        conv1 = self.model1(x)
        conv2 = self.model2(conv1[:, :, ::2, ::2])
        conv3 = self.model3(conv2[:, :, ::2, ::2])
        conv4 = self.model4(conv3[:, :, ::2, ::2])
        conv7 = self.model7(self.model6(self.model5(conv4)))
        conv8 = self.model8(self.model8up(conv7) + self.model3short8(conv3))
        conv9 = self.model9(self.model9up(conv8) + self.model2short9(conv2))
        conv10 = self.model10(self.model10up(conv9) + self.model1short10(conv1))
        return AB_NORM * self.model_out(conv10)
