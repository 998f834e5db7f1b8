"""ResNet101 at output stride 8 (torchvision's network with the last two stages dilated).

Built from ``torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True,
True])``: layer3 runs at dilation 2 and layer4 at dilation 4 instead of striding, so the output is
H/8 (docs/METHOD.md §1, Table I of the supplementary). The modules keep torchvision's names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so torchvision's ImageNet file ``resnet101-*.pth``
loads key for key once its ``fc.*`` classifier is dropped (dilation does not change any shape).

    d  after                          channels  stride
    0  input image                    3         1
    1  conv1 (7x7, s2), bn1, ReLU     64        2
    2  maxpool (3x3, s2), layer1      256       4
    3  layer2 (s2)                    512       8
    4  layer3 (dilation 2)            1024      8
    5  layer4 (dilation 4)            2048      8

Freezing (common WSSS practice for torchvision ResNets): the stem ``conv1``/``bn1`` is never
trained (``frozen_prefixes``), and every BatchNorm is kept in eval mode with its affine parameters
frozen (``freeze_bn``), because classification batches are too small for reliable batch statistics.
From random weights nothing is frozen (``Backbone.freeze``).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from caee.models.backbone import Backbone


class TorchvisionResNet(Backbone):
    """A torchvision ResNet's modules under torchvision's names (its ImageNet file loads key for key
    once ``fc.*`` is dropped), without ``avgpool``/``fc``; subclasses choose the strides and stages."""
    imagenet_extra = ("fc.",)  # torchvision's ImageNet classifier

    depths = (0, 1, 2, 3, 4, 5)
    frozen_prefixes = ("conv1.", "bn1.")
    freeze_bn = True

    def __init__(self, tv: nn.Module, strides: dict[int, int]) -> None:
        super().__init__()
        self.conv1: nn.Conv2d = tv.conv1
        self.bn1: nn.BatchNorm2d = tv.bn1
        self.relu: nn.ReLU = tv.relu
        self.maxpool: nn.MaxPool2d = tv.maxpool
        self.layer1: nn.Sequential = tv.layer1
        self.layer2: nn.Sequential = tv.layer2
        self.layer3: nn.Sequential = tv.layer3
        self.layer4: nn.Sequential = tv.layer4
        self.channels = {0: 3, 1: 64, 2: 256, 3: 512, 4: 1024, 5: 2048}
        self.strides = strides
        self.out_channels = 2048


class ResNet101(TorchvisionResNet):
    """torchvision ResNet101, output stride 8. No width multiplier."""

    def __init__(self) -> None:
        tv = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        super().__init__(tv, {0: 1, 1: 2, 2: 4, 3: 8, 4: 8, 5: 8})

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        if depth == 1:
            return self.relu(self.bn1(self.conv1(x)))
        if depth == 2:
            return self.layer1(self.maxpool(x))
        if depth in (3, 4, 5):
            return getattr(self, f"layer{depth - 1}")(x)
        raise ValueError(f"ResNet101 has depths 1..5, got {depth}")
