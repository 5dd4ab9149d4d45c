"""PyTorch PFANet-S (the sairajk port) written from docs/architecture.md (PFANet): the parity reference.

Module and state-dict names follow the port (vgg16.{0,2,5,...}, cpfe_conv3_3.conv_1_1, cha_att.linear_1,
hl_conv1, ll_conv_1, spa_att.grp1_conv1k, ff_conv_1, ...). NCHW; forward returns (probability, ca_act_reg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's vgg16().features: "M" is a 2x2 max pool; every number is a 3x3 conv + ReLU.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices of the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 in that Sequential.
_FEATURE_RELUS = (3, 8, 15, 22, 29)


def _vgg16_features() -> nn.Sequential:
    modules, channels = [], 3
    for item in _VGG16_CFG:
        if item == "M":
            modules.append(nn.MaxPool2d(2, 2))
        else:
            modules += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*modules)


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class CPFE(nn.Module):
    """1x1 conv and dilated 3x3 convs (rates 3, 5, 7), 32 channels each, no bias; concat, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int = 32):
        super().__init__()
        self.conv_1_1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.conv_dil_3 = nn.Conv2d(in_channels, out_channels, 3, padding=3, dilation=3, bias=False)
        self.conv_dil_5 = nn.Conv2d(in_channels, out_channels, 3, padding=5, dilation=5, bias=False)
        self.conv_dil_7 = nn.Conv2d(in_channels, out_channels, 3, padding=7, dilation=7, bias=False)
        self.bn = nn.BatchNorm2d(4 * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.conv_1_1(x), self.conv_dil_3(x), self.conv_dil_5(x), self.conv_dil_7(x)], 1)
        return F.relu(self.bn(y))


class ChannelwiseAttention(nn.Module):
    """Returns the [N,C,1,1] sigmoid gates and their mean (the activity regulariser)."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, channels // 4)
        self.linear_2 = nn.Linear(channels // 4, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.sigmoid(self.linear_2(F.relu(self.linear_1(x.mean(dim=(2, 3))))))
        return gates[:, :, None, None], gates.mean()


class SpatialAttention(nn.Module):
    """Branches (1,k)->(k,1) and (k,1)->(1,k), each conv + BN + ReLU; sigmoid of their sum, [N,1,H,W]."""

    def __init__(self, channels: int, k: int = 9):
        super().__init__()
        half, p = channels // 2, k // 2
        self.grp1_conv1k = nn.Conv2d(channels, half, (1, k), padding=(0, p))
        self.grp1_bn1 = nn.BatchNorm2d(half)
        self.grp1_convk1 = nn.Conv2d(half, 1, (k, 1), padding=(p, 0))
        self.grp1_bn2 = nn.BatchNorm2d(1)
        self.grp2_convk1 = nn.Conv2d(channels, half, (k, 1), padding=(p, 0))
        self.grp2_bn1 = nn.BatchNorm2d(half)
        self.grp2_conv1k = nn.Conv2d(half, 1, (1, k), padding=(0, p))
        self.grp2_bn2 = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g1 = F.relu(self.grp1_bn2(self.grp1_convk1(F.relu(self.grp1_bn1(self.grp1_conv1k(x))))))
        g2 = F.relu(self.grp2_bn2(self.grp2_conv1k(F.relu(self.grp2_bn1(self.grp2_convk1(x))))))
        return torch.sigmoid(g1 + g2)


class SODModel(nn.Module):
    """PFANet-S; input ImageNet-normalised RGB [N,3,H,W]."""

    def __init__(self):
        super().__init__()
        self.vgg16 = _vgg16_features()
        self.cpfe_conv3_3 = CPFE(256)
        self.cpfe_conv4_3 = CPFE(512)
        self.cpfe_conv5_3 = CPFE(512)
        self.cha_att = ChannelwiseAttention(384)
        self.hl_conv1 = nn.Conv2d(384, 64, 3, padding=1)
        self.hl_bn1 = nn.BatchNorm2d(64)
        self.ll_conv_1 = nn.Conv2d(64, 64, 3, padding=1)
        self.ll_bn_1 = nn.BatchNorm2d(64)
        self.ll_conv_2 = nn.Conv2d(128, 64, 3, padding=1)
        self.ll_bn_2 = nn.BatchNorm2d(64)
        self.ll_conv_3 = nn.Conv2d(128, 64, 3, padding=1)
        self.ll_bn_3 = nn.BatchNorm2d(64)
        self.spa_att = SpatialAttention(64)
        self.ff_conv_1 = nn.Conv2d(128, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = []
        for i, module in enumerate(self.vgg16):
            x = module(x)
            if i in _FEATURE_RELUS:
                feats.append(x)
        c1, c2, c3, c4, c5 = feats

        high = torch.cat([self.cpfe_conv3_3(c3), _up(self.cpfe_conv4_3(c4), 2), _up(self.cpfe_conv5_3(c5), 4)], 1)
        gates, ca_act_reg = self.cha_att(high)
        high = _up(F.relu(self.hl_bn1(self.hl_conv1(high * gates))), 4)

        low1 = F.relu(self.ll_bn_1(self.ll_conv_1(c1)))
        low2 = _up(F.relu(self.ll_bn_2(self.ll_conv_2(c2))), 2)
        low = F.relu(self.ll_bn_3(self.ll_conv_3(torch.cat([low1, low2], 1))))
        low = low * self.spa_att(high)

        return torch.sigmoid(self.ff_conv_1(torch.cat([low, high], 1))), ca_act_reg
