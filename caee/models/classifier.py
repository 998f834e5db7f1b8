"""The CAM classifier: any backbone + Dropout2d + a 1x1 ``fc8`` (no bias) giving class maps.

Used for the ordinary classifier (OC) and, with ResNet38 and no dropout, for the CGNet.
logits = global average pooling of the class maps; CAM of class c = ReLU of map c.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models.backbone import Backbone, FeatureEdit, net_from_meta


class CamClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

    def forward(self, x: torch.Tensor, edit: FeatureEdit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, C) and class maps (B, C, H/8, W/8) (before ReLU).

        GAP and fc8 commute, so these logits equal PSA's (pool first, then fc8).
        """
        maps = self.fc8(self.dropout(self.backbone(x, edit=edit)))
        return maps.mean(dim=(2, 3)), maps


def build_classifier(net: NetConfig, num_classes: int) -> CamClassifier:
    """A CAM classifier on the backbone ``net`` describes (ImageNet weights if ``net.pretrained``)."""
    from caee.models import build_backbone
    return CamClassifier(build_backbone(net), num_classes, dropout=net.dropout)


def load_classifier(path: str | Path, fallback_net: NetConfig, num_classes: int) -> CamClassifier:
    """A trained CAM classifier from our ``model.pth`` (its recorded architecture is used) or from a
    PSA-format checkpoint (architecture from ``fallback_net``). Every key must match."""
    from caee.weights.checkpoints import checkpoint_meta, load_model_weights

    meta = checkpoint_meta(path)
    if meta.get("arch", "classifier") != "classifier":
        raise CaeeError(f"{path} is a {meta['arch']} checkpoint, not a CAM classifier (OC or CGNet)")
    net = net_from_meta(meta, fallback_net, path)
    model = build_classifier(net, num_classes)
    load_model_weights(model, path, arch=f"classifier/{net.backbone} (width {net.width}, {num_classes} classes)")
    return model
