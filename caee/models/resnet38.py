"""ResNet38 ("Wider or Deeper", model A1) exactly as PSA builds it, with a width multiplier.

Pre-activation residual blocks, output stride 8. Module names match PSA's PyTorch state dicts
(``conv1a``, ``b2``, ``b2_1``, ..., ``b7``, ``bn7``), so released checkpoints load key for key.
The network is a sequence of stages; the output of stage ``d`` is the feature at masking depth
``d`` (docs/METHOD.md §2):

    d  after                                channels  resolution
    1  conv1a                               64        H
    2  b2, b2_1, b2_2                       128       H/2
    3  b3, b3_1, b3_2                       256       H/4
    4  b4, b4_1 .. b4_5                     512       H/8
    5  b5, b5_1, b5_2 (dilation 2)          1024      H/8
    6  b6 (bottleneck, dilation 4)          2048      H/8
    7  b7 (bottleneck, dilation 4), bn7, ReLU  4096   H/8
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caee.models.backbone import Backbone


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class _PreActBlock(nn.Module):
    """What PSA's two block types share: the BN-ReLU'd input feeds the first conv and, when the
    shape changes, the projection shortcut; the identity shortcut takes the raw input."""

    def _shortcut(self, in_ch: int, out_ch: int, stride: int) -> None:
        self.same_shape = in_ch == out_ch and stride == 1
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def _enter(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shortcut, output of conv_branch2a) for input x (N, C, H, W)."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(x_bn_relu)
        return shortcut, self.conv_branch2a(x_bn_relu)


class ResBlock(_PreActBlock):
    """Pre-activation basic block: BN-ReLU, 3x3 conv, BN-ReLU, 3x3 conv (+ projection shortcut)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self._shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, y = self._enter(x)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y


class ResBlockBottleneck(_PreActBlock):
    """Pre-activation bottleneck (1x1 -> 3x3 -> 1x1, out/4 -> out/2 -> out) with Dropout2d."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self._shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, y = self._enter(x)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class ResNet38(Backbone):
    """PSA's ResNet38. ``width`` scales every channel count (1.0 = the paper, ~105 M parameters).

    Frozen as in PSA's classifier: conv1a, b2, b2_1, b2_2 and every BatchNorm (see ``frozen_prefixes``),
    when it starts from trained weights; from random weights nothing is (``Backbone.freeze``).
    """
    imagenet_format = "resnet38"  # MXNet .params or a .pth with PSA's keys (caee.weights.mxnet_params)

    depths = (0, 1, 2, 3, 4, 5, 6, 7)
    frozen_prefixes = ("conv1a.", "b2.", "b2_1.", "b2_2.")

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = lambda n: _ch(n, width)  # noqa: E731
        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = ResBlock(c(64), c(128), c(128), stride=2)
        self.b2_1 = ResBlock(c(128), c(128), c(128))
        self.b2_2 = ResBlock(c(128), c(128), c(128))
        self.b3 = ResBlock(c(128), c(256), c(256), stride=2)
        self.b3_1 = ResBlock(c(256), c(256), c(256))
        self.b3_2 = ResBlock(c(256), c(256), c(256))
        self.b4 = ResBlock(c(256), c(512), c(512), stride=2)
        self.b4_1 = ResBlock(c(512), c(512), c(512))
        self.b4_2 = ResBlock(c(512), c(512), c(512))
        self.b4_3 = ResBlock(c(512), c(512), c(512))
        self.b4_4 = ResBlock(c(512), c(512), c(512))
        self.b4_5 = ResBlock(c(512), c(512), c(512))
        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b6 = ResBlockBottleneck(c(1024), c(2048), dilation=4, dropout=0.3)
        self.b7 = ResBlockBottleneck(c(2048), c(4096), dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.channels = {0: 3, 1: c(64), 2: c(128), 3: c(256), 4: c(512), 5: c(1024), 6: c(2048), 7: c(4096)}
        self.strides = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 8, 6: 8, 7: 8}
        self.out_channels = c(4096)

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        if depth == 1:
            return self.conv1a(x)
        if depth == 7:
            return F.relu(self.bn7(self.b7(x)))
        blocks = {2: ("b2", "b2_1", "b2_2"), 3: ("b3", "b3_1", "b3_2"),
                  4: ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"), 5: ("b5", "b5_1", "b5_2"), 6: ("b6",)}
        for name in blocks[depth]:
            x = getattr(self, name)(x)
        return x

    def affinity_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """PSA's AffinityNet inputs: conv4 = BN-ReLU input of b5 (512 ch), conv5 = BN-ReLU input
        of b6 (1024 ch), conv6 = relu(bn7(b7)) (4096 ch), all at stride 8."""
        feats = self.forward_features(x, keep=(4, 5, 7))
        return {"conv4": F.relu(self.b5.bn_branch2a(feats[4])),
                "conv5": F.relu(self.b6.bn_branch2a(feats[5])),
                "conv6": feats[7]}
