"""VGG16 at output stride 8: torchvision's ``vgg16().features`` without pool4/pool5, conv5 dilated.

As docs/METHOD.md §1 asks: pool1..pool3 are kept, pool4 and pool5 are replaced by ``nn.Identity``
(so the remaining layers keep their indices) and the three conv5 layers use dilation 2 with
padding 2, which keeps their field of view in input pixels while the map stays at H/8. Parameter
names are torchvision's (``features.0.weight`` ... ``features.28.bias``), so ``vgg16-*.pth`` loads
once its ``classifier.*`` entries are dropped. The ReLU after conv5_3 is part of the last stage.

    d  after                                   features[i]  channels  stride
    0  input image                             -            3         1
    1  conv1_1, conv1_2, pool1                 0..4         64        2
    2  conv2_1, conv2_2, pool2                 5..9         128       4
    3  conv3_1 .. conv3_3, pool3               10..16       256       8
    4  conv4_1 .. conv4_3 (pool4 removed)      17..23       512       8
    5  conv5_1 .. conv5_3 (dilation 2, pool5 removed)  24..30  512    8

``width`` scales every channel count (1.0 = torchvision's, the only width ImageNet weights fit); the
synthetic demo's Table I uses a narrow VGG16 trained from random weights. Every conv is followed by
ReLU. There is no BatchNorm (``freeze_bn`` False). Frozen: conv1_x
(``features.0``, ``features.2``), the generic low-level filters, as is usual when fine-tuning VGG.
Pools use torchvision's 2x2 / stride 2 (floor), so inputs divisible by 8 give exactly H/8.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from caee.models.backbone import Backbone

# features[start:end] of each depth
_STAGE_SLICES = {1: (0, 5), 2: (5, 10), 3: (10, 17), 4: (17, 24), 5: (24, 31)}
_POOL4, _POOL5 = 23, 30
_CONV5 = (24, 26, 28)


def _vgg16_features(width: float) -> nn.Sequential:
    """``torchvision.models.vgg16(weights=None).features`` (configuration "D"), every channel count
    times ``width``, without the 120 M parameter classifier; initialised as torchvision does
    (Kaiming normal, fan-out, zero bias)."""
    cfg = [v if v == "M" else max(1, int(round(v * width))) for v in torchvision.models.vgg.cfgs["D"]]
    # built on the current device: the layers' own initialisation draws from the random stream before
    # the re-initialisation below, and the demo's measured VGG16 OCs (docs/DEMO.md) started this way
    features = torchvision.models.vgg.make_layers(cfg)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


class VGG16(Backbone):
    """torchvision VGG16 ``features`` (channels times ``width``), output stride 8, conv5 dilated by 2."""
    imagenet_extra = ("classifier.",)  # torchvision's ImageNet classifier

    depths = (0, 1, 2, 3, 4, 5)
    frozen_prefixes = ("features.0.", "features.2.")
    freeze_bn = False

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        features = _vgg16_features(width)
        for i in (_POOL4, _POOL5):
            assert isinstance(features[i], nn.MaxPool2d)
            features[i] = nn.Identity()
        for i in _CONV5:
            conv = features[i]
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
            # same weights, wider sampling: the removed pool4 is compensated by dilation
            conv.dilation, conv.padding = (2, 2), (2, 2)
        self.features = features
        self.channels = {0: 3, **{d: features[end - 3].out_channels for d, (_, end) in _STAGE_SLICES.items()}}
        self.strides = {0: 1, 1: 2, 2: 4, 3: 8, 4: 8, 5: 8}
        self.out_channels = self.channels[5]

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        if depth not in _STAGE_SLICES:
            raise ValueError(f"VGG16 has depths 1..5, got {depth}")
        start, end = _STAGE_SLICES[depth]
        for i in range(start, end):
            x = self.features[i](x)
        return x
