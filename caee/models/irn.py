"""IRN's class-boundary branch (net/resnet50_irn.py, ``fc_edge1..6``) over any caee backbone.

Each backbone stage's output (depths 1..last) goes through a 1x1 convolution to ``channels`` (no
bias), GroupNorm with ``groups`` groups, a resize to the boundary grid (stride ``edge_stride``)
and a ReLU; the maps are cut to the grid size ``ceil(H/edge_stride) x ceil(W/edge_stride)``,
concatenated and reduced to one logit map by a 1x1 convolution with bias. With IRN's ResNet50
(caee/models/resnet50.py: strides 4, 4, 8, 16, 16), 32 channels, 4 groups and stride 4 this is
IRN's branch layer for layer: coarser maps are upsampled by ``stride / edge_stride`` (bilinear,
align_corners False, after the GroupNorm and before the ReLU, as IRN). Finer maps (tinycnn's
stride 1 and 2 stages, not in IRN) are average-pooled to the grid.

The backbone is frozen as in IRN: it runs without gradient and always in eval mode, and only the
branch is trained. The displacement branch (instance masks) is not built.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models.backbone import Backbone, net_from_meta


class EdgeBlock(nn.Module):
    """1x1 conv (no bias) + GroupNorm, resized to the boundary grid, then ReLU."""

    def __init__(self, in_ch: int, channels: int, groups: int, factor: float):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, channels, 1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        self.factor = factor  # feature stride / grid stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=int(self.factor), mode="bilinear", align_corners=False)
        elif self.factor < 1:
            k = int(round(1 / self.factor))
            x = F.avg_pool2d(x, k, k, ceil_mode=True)
        return F.relu(x)


class IrnEdgeNet(nn.Module):
    """Frozen backbone + boundary branch: ``(B, 3, H, W)`` -> ``(B, 1, ceil(H/s), ceil(W/s))`` logits."""

    def __init__(self, backbone: Backbone, channels: int = 32, groups: int = 4, edge_stride: int = 4):
        super().__init__()
        if channels % groups:
            raise CaeeError(f"irn.edge_channels={channels} must be divisible by irn.edge_groups={groups}")
        self.backbone = backbone
        self.edge_stride = edge_stride
        self.depths = tuple(d for d in backbone.depths if d > 0)
        blocks = []
        for d in self.depths:
            s = backbone.strides[d]
            if not (s % edge_stride == 0 or edge_stride % s == 0):
                raise CaeeError(f"irn.edge_stride={edge_stride} and the {type(backbone).__name__} stride {s} "
                                f"of depth {d} must divide one another")
            blocks.append(EdgeBlock(backbone.channels[d], channels, groups, s / edge_stride))
        self.edge_blocks = nn.ModuleList(blocks)
        self.edge_out = nn.Conv2d(channels * len(blocks), 1, 1, bias=True)
        backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "IrnEdgeNet":
        super().train(mode)
        self.backbone.eval()  # frozen, BatchNorm statistics included (IRN)
        return self

    def head_modules(self) -> list[nn.Module]:
        """The trained layers (all of them sit at the base lr in IRN)."""
        return [self.edge_blocks, self.edge_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = -(-x.shape[-2] // self.edge_stride), -(-x.shape[-1] // self.edge_stride)
        with torch.no_grad():
            feats = self.backbone.forward_features(x, keep=self.depths)
        maps = [blk(feats[d])[..., :h, :w] for d, blk in zip(self.depths, self.edge_blocks)]
        if any(tuple(m.shape[-2:]) != (h, w) for m in maps):
            raise CaeeError(f"boundary maps {[tuple(m.shape[-2:]) for m in maps]} do not cover the {h}x{w} grid; "
                            "pad the input to a multiple of the backbone's largest stride")
        return self.edge_out(torch.cat(maps, dim=1))


def build_irn(net: NetConfig, channels: int = 32, groups: int = 4, edge_stride: int = 4) -> IrnEdgeNet:
    """The boundary network on the backbone ``net`` describes (ImageNet weights if ``net.pretrained``)."""
    from caee.models import build_backbone
    return IrnEdgeNet(build_backbone(net), channels, groups, edge_stride)


def arch_name(net: NetConfig) -> str:
    return f"irn/{net.backbone} (width {net.width:g})"


def load_irn(path: str | os.PathLike, fallback_net: NetConfig) -> tuple[IrnEdgeNet, dict]:
    """A trained boundary network from our ``model.pth`` (its recorded ``net`` and branch sizes).
    Returns ``(model, meta)``."""
    from caee.weights.checkpoints import checkpoint_meta, load_model_weights

    meta = checkpoint_meta(path)
    if meta.get("arch") != "irn":
        raise CaeeError(f"{path} is a {meta.get('arch', 'non-caee')} checkpoint, not an IRN boundary network; "
                        "point irn.weights at <work_dir>/train_irn/model.pth")
    net = net_from_meta(meta, fallback_net, path)
    model = build_irn(net, meta.get("edge_channels", 32), meta.get("edge_groups", 4), meta.get("edge_stride", 4))
    load_model_weights(model, path, arch=arch_name(net), config_key="irn.weights")
    return model, {**meta, "net": dataclasses.asdict(net)}
