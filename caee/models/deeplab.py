"""DeepLab segmentation network: any backbone + a LargeFOV (v1) or ASPP (v2) head (docs/METHOD.md §7).

    logits = head(backbone(image))        (B, C+1, H/s, W/s), s = the backbone's output stride

ResNet38, ResNet101 and VGG16 run at output stride 8; TinyCNN (CPU demos) at 4. The model returns
logits at the feature resolution and never upsamples: the loss upsamples them bilinearly to the
label size (so the CE is computed on every labelled pixel, as in current DeepLab code; DeepLab-v1
downsampled the labels instead) and inference (:mod:`caee.method.segment`) upsamples them to the image
size. Keeping the resize out of the model keeps one forward usable at any test scale.

Heads (channel 0 of the output is the background, 1..C the classes):

* ``LargeFOV`` (DeepLab-v1): fc6 = 3x3 conv dilation 12 -> ``mid``, ReLU, Dropout2d; fc7 = 1x1
  -> ``mid``, ReLU, Dropout2d; fc8 = 1x1 -> C+1. ``mid`` is 1024 in DeepLab-v1; see
  :func:`default_head_channels` for narrow backbones.
* ``ASPP`` (DeepLab-v2, the ResNet-101 "ASPP-L" variant): four parallel 3x3 convs straight to C+1
  channels with dilations 6 / 12 / 18 / 24, summed.

Every head conv starts from N(0, 0.01) weights and zero biases (as DeepLab does); ``head_modules()``
lists the newly initialised layers (trained at ``head_lr_mult`` x lr).
"""
from __future__ import annotations

import torch
from torch import nn

from caee.core.errors import CaeeError
from caee.models.backbone import Backbone

HEADS = ("largefov", "aspp")
DEFAULT_DILATIONS = {"largefov": [12], "aspp": [6, 12, 18, 24]}


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)


class LargeFOV(nn.Module):
    """DeepLab-v1 LargeFOV: (B, in_ch, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, in_ch: int, num_classes: int, mid_ch: int = 1024, dilation: int = 12,
                 dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(in_ch, mid_ch, 3, padding=dilation, dilation=dilation)
        self.fc7 = nn.Conv2d(mid_ch, mid_ch, 1)
        self.fc8 = nn.Conv2d(mid_ch, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(dropout)
        self.drop7 = nn.Dropout2d(dropout)
        # fc6/fc7 come from random init here (DeepLab-v1 took them from VGG's fc layers): He init
        # keeps the signal alive through two ReLU layers; the classifier fc8 starts small
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        _init_conv(self.fc8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop6(self.relu(self.fc6(x)))
        x = self.drop7(self.relu(self.fc7(x)))
        return self.fc8(x)


class ASPP(nn.Module):
    """DeepLab-v2 ASPP: sum of parallel 3x3 convs (one per dilation), (B, in_ch, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, in_ch: int, num_classes: int, dilations: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.branches:
            _init_conv(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def default_head_channels(backbone_name: str, width: float, out_channels: int) -> int:
    """Width of LargeFOV's fc6 / fc7 when ``train_deeplab.head_channels`` is 0.

    * ResNet101 (no width multiplier): 1024, as in DeepLab-v1.
    * ResNet38, VGG16: ``1024 * width`` (at least 16; 1024 at width 1, as in DeepLab-v1): the head
      shrinks with the backbone it sits on, so a width-0.0625 test network gets a 64-channel head,
      not a 1024-channel one that dwarfs it.
    * TinyCNN: ``4 * out_channels`` (256 at width 1): it is a 64-channel demo network, far narrower
      than any ImageNet backbone, and a 1024-wide head would cost 15x its FLOPs.
    """
    if backbone_name in ("resnet38", "vgg16"):
        return max(16, int(round(1024 * width)))
    if backbone_name == "tinycnn":
        return max(16, 4 * out_channels)
    return 1024


class DeepLab(nn.Module):
    """Backbone + segmentation head. ``num_classes`` counts the background (C + 1).

    head: "largefov" or "aspp". head_channels: LargeFOV's fc6/fc7 width (ignored by ASPP).
    dilations: LargeFOV takes one, ASPP any number (default 12 / 6, 12, 18, 24).
    """

    def __init__(self, backbone: Backbone, num_classes: int, head: str = "largefov",
                 head_channels: int = 1024, dilations: list[int] | tuple[int, ...] | None = None,
                 dropout: float = 0.5):
        super().__init__()
        if head not in HEADS:
            raise CaeeError(f"config key 'train_deeplab.head': unknown head {head!r}; choose one of {', '.join(HEADS)}")
        dilations = list(dilations) if dilations else DEFAULT_DILATIONS[head]
        if any(d < 1 for d in dilations):
            raise CaeeError(f"config key 'train_deeplab.head_dilations': dilations must be >= 1, got {dilations}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_name = head
        if head == "largefov":
            if len(dilations) != 1:
                raise CaeeError(f"config key 'train_deeplab.head_dilations': LargeFOV takes one dilation, got {dilations}")
            self.head: nn.Module = LargeFOV(backbone.out_channels, num_classes, head_channels, dilations[0], dropout)
        else:
            self.head = ASPP(backbone.out_channels, num_classes, tuple(dilations))

    @property
    def output_stride(self) -> int:
        return self.backbone.strides[self.backbone.last_depth]

    def head_modules(self) -> list[nn.Module]:
        """The newly initialised layers (everything but the backbone)."""
        return [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, C+1, H/s, W/s) logits, not upsampled."""
        return self.head(self.backbone(x))


def build_deeplab(net_cfg, num_classes: int, head: str = "largefov", head_channels: int = 0,
                  dilations: list[int] | None = None, dropout: float = 0.5) -> DeepLab:
    """A DeepLab on the backbone ``net_cfg`` (a :class:`~caee.core.config.NetConfig`; ImageNet weights
    when ``net_cfg.pretrained`` is set). ``num_classes`` counts the background;
    ``head_channels`` 0 = :func:`default_head_channels`."""
    from caee.models import build_backbone
    backbone = build_backbone(net_cfg)
    if head_channels <= 0:
        head_channels = default_head_channels(net_cfg.backbone, net_cfg.width, backbone.out_channels)
    return DeepLab(backbone, num_classes, head, head_channels, dilations, dropout)


__all__ = ["DeepLab", "LargeFOV", "ASPP", "HEADS", "DEFAULT_DILATIONS", "build_deeplab", "default_head_channels"]
