"""The interface every backbone offers: a fixed sequence of stages indexed by depth.

Depth 0 is the input image; the output of stage ``d`` is the feature map at depth ``d``; the last
depth is the feature map the heads read (output stride 8). Class-specific erasing at depth ``d``
(docs/METHOD.md §3) multiplies that map by ``1 - M`` and lets the remaining stages run on the
result, which :meth:`Backbone.forward` supports through ``edit``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError

FeatureEdit = Callable[[int, torch.Tensor], torch.Tensor]


class Backbone(nn.Module):
    depths: tuple[int, ...] = ()          # 0 .. last
    channels: dict[int, int]              # depth -> channels
    strides: dict[int, int]               # depth -> stride against the input
    out_channels: int
    frozen_prefixes: tuple[str, ...] = ()  # parameter-name prefixes never trained (besides BatchNorm)
    freeze_bn: bool = True                 # BatchNorm in eval mode, affine parameters frozen (PSA)
    # the ImageNet file (net.pretrained): its format ("torch" state dict of our keys, or "resnet38":
    # MXNet .params / PSA .pth) and the key prefixes it holds that the backbone lacks (its classifier)
    imagenet_format: str = "torch"
    imagenet_extra: tuple[str, ...] = ()

    def stage(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        """Map the depth-``(depth-1)`` feature to the depth-``depth`` feature."""
        raise NotImplementedError

    @property
    def last_depth(self) -> int:
        return self.depths[-1]

    def forward(self, x: torch.Tensor, edit: FeatureEdit | None = None) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, out_channels, H/8, W/8) features.

        ``edit(depth, feat)`` may replace the feature at any depth (0 = the image) before the next
        stage reads it.
        """
        if edit is not None:
            x = edit(0, x)
        for d in range(1, self.last_depth + 1):
            x = self.stage(d, x)
            if edit is not None:
                x = edit(d, x)
        return x

    def forward_features(self, x: torch.Tensor, keep: Iterable[int]) -> dict[int, torch.Tensor]:
        """Run every stage and return the features at the depths in ``keep``."""
        keep = set(keep)
        out = {0: x} if 0 in keep else {}
        for d in range(1, self.last_depth + 1):
            x = self.stage(d, x)
            if d in keep:
                out[d] = x
        return out

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def freeze(self, trained: bool = True) -> None:
        """Apply the backbone's training-time freezing (frozen prefixes and BatchNorm affines, and
        BatchNorm in eval mode). ``trained`` False (random weights: no ImageNet file, no ``init``)
        freezes nothing and lets BatchNorm train: the freezing keeps ImageNet's low-level filters and
        statistics, and random ones are not worth keeping; frozen random statistics (mean 0, variance
        1) would leave a deep network such as ResNet38 unnormalised, and it does not learn (the
        synthetic Table I demo, docs/METHOD.md §10)."""
        # instance attribute (train() reads it): False leaves BatchNorm in training mode
        self.freeze_bn = type(self).freeze_bn and trained
        if not trained:
            return
        for name, p in self.named_parameters():
            if name.startswith(self.frozen_prefixes):
                p.requires_grad_(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)


def net_from_meta(meta: dict, fallback: NetConfig, path: Any) -> NetConfig:
    """The network a checkpoint records (``meta["net"]``; keys another version added are ignored),
    else ``fallback``; ``pretrained`` cleared, since the checkpoint's weights replace ImageNet's."""
    net = meta.get("net")
    if net is None:
        return dataclasses.replace(fallback, pretrained="")
    if not isinstance(net, dict):
        raise CaeeError(f"{path}: the recorded network ('net') is not a mapping but {type(net).__name__}")
    known = {f.name for f in dataclasses.fields(NetConfig)}
    return dataclasses.replace(NetConfig(**{k: v for k, v in net.items() if k in known}), pretrained="")
