"""ResNet50 as IRN uses it (net/resnet50_irn.py): output stride 16, layer4 without stride or dilation.

Built from ``torchvision.models.resnet50(weights=None)`` with the stride of layer4's first block
(its 3x3 ``conv2`` and the 1x1 ``downsample`` convolution) set to 1, which is IRN's
``strides=[2, 2, 2, 1]`` (torchvision's and IRN's bottlenecks both stride in the 3x3 convolution).
The modules keep torchvision's names, so torchvision's ImageNet file ``resnet50-*.pth`` loads key for
key once its ``fc.*`` classifier is dropped. Depths follow IRN's five stages (stage 1 ends after the
max-pool):

    d  after                                  channels  stride
    0  input image                            3         1
    1  conv1 (7x7, s2), bn1, ReLU, maxpool    64        4
    2  layer1                                 256       4
    3  layer2 (s2)                            512       8
    4  layer3 (s2)                            1024      16
    5  layer4 (s1)                            2048      16

Freezing: the stem ``conv1``/``bn1`` is never trained and every BatchNorm stays in eval mode with its
affine parameters frozen (IRN's FixedBatchNorm); IRN's boundary network freezes the whole backbone
(caee/models/irn.py).
"""
from __future__ import annotations

import torch
import torchvision

from caee.models.resnet101 import TorchvisionResNet


class ResNet50(TorchvisionResNet):
    """torchvision ResNet50, output stride 16 (IRN). No width multiplier."""

    def __init__(self) -> None:
        tv = torchvision.models.resnet50(weights=None)
        tv.layer4[0].conv2.stride = (1, 1)
        tv.layer4[0].downsample[0].stride = (1, 1)
        super().__init__(tv, {0: 1, 1: 4, 2: 4, 3: 8, 4: 16, 5: 16})

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        if depth == 1:
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if depth in (2, 3, 4, 5):
            return getattr(self, f"layer{depth - 1}")(x)
        raise ValueError(f"ResNet50 has depths 1..5, got {depth}")
