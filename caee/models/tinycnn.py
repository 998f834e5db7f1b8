"""TinyCNN: a small plain CNN for CPU demos on the synthetic dataset (docs/METHOD.md §10).

Four stages, each one 3x3 conv (padding 1, no bias) + BatchNorm + ReLU; channels 16/32/48/64
times ``width``; strides 1, 2, 1, 2, so the output stride is 4:

    d  after                           channels  stride
    0  input image                     3         1
    1  stage1: conv3x3 s1, BN, ReLU    16        1
    2  stage2: conv3x3 s2, BN, ReLU    32        2
    3  stage3: conv3x3 s1, BN, ReLU    48        2
    4  stage4: conv3x3 s2, BN, ReLU    64        4

Receptive field: r = 1 + sum_i (k_i - 1) * j_i, where j_i is the product of the strides before
conv i (the input spacing it samples): j = 1, 1, 2, 2 and k_i = 3, so
r = 1 + 2 * (1 + 1 + 2 + 2) = 13 px. Output pixel (i, j) sees input rows 4i-6 .. 4i+6 and
columns 4j-6 .. 4j+6 (centred on pixel (4i, 4j)). Placing the strides later (1, 1, 2, 2) would
give 11 px, earlier (2, 1, 1, 2) 15 px; 13 px against 30-40 px objects is what the synthetic set needs
(docs/METHOD.md §10) to make the ordinary CAM focus on the small discriminative part.

``output_stride=8`` strides the third stage as well (strides 1, 2, 2, 2: j = 1, 1, 2, 4, so
r = 1 + 2 * (1 + 1 + 2 + 4) = 17 px): the same weights (stride does not change a layer's shape),
a last feature map of H/8 x W/8, and so coarser CAMs (docs/METHOD.md §10).

Unlike the ImageNet backbones nothing is frozen and BatchNorm trains normally (it is trained from
scratch); note its output stride is 4, not 8.
"""
from __future__ import annotations

import torch
from torch import nn

from caee.models.backbone import Backbone

_CHANNELS = (16, 32, 48, 64)
# output stride -> the four stages' strides
_STRIDES = {4: (1, 2, 1, 2), 8: (1, 2, 2, 2)}


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class TinyCNN(Backbone):
    """4 conv stages (16/32/48/64 x ``width`` channels), output stride 4 (receptive field 13 px) or 8 (17 px)."""

    depths = (0, 1, 2, 3, 4)
    frozen_prefixes = ()
    freeze_bn = False
    receptive_field = 13
    output_strides = tuple(_STRIDES)

    def __init__(self, width: float = 1.0, output_stride: int = 4):
        super().__init__()
        if output_stride not in _STRIDES:
            raise ValueError(f"TinyCNN's output stride is 4 or 8, got {output_stride}")
        chans = [max(1, int(round(c * width))) for c in _CHANNELS]
        in_ch, stride, jump, rf = 3, 1, 1, 1
        self.channels, self.strides = {0: 3}, {0: 1}
        for d, (out_ch, s) in enumerate(zip(chans, _STRIDES[output_stride]), start=1):
            rf += 2 * jump
            jump *= s
            setattr(self, f"stage{d}", ConvBNReLU(in_ch, out_ch, s))
            stride *= s
            self.channels[d], self.strides[d] = out_ch, stride
            in_ch = out_ch
        self.out_channels = chans[-1]
        self.receptive_field = rf

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        if depth not in (1, 2, 3, 4):
            raise ValueError(f"TinyCNN has depths 1..4, got {depth}")
        return getattr(self, f"stage{depth}")(x)
