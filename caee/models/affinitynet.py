"""AffinityNet (PSA, docs/METHOD.md §6): a backbone plus four 1x1 layers giving pixel embeddings.

Layers, named as in PSA so that ``res38_aff.pth`` loads key for key (after
``psa_to_caee(state, head_keys=AffinityNet.HEAD_KEYS)``, which :func:`load_affinitynet` applies)::

    f8_3: conv4 (512*w ch, BN-ReLU input of b5)  -> 64,  1x1, no bias, ELU
    f8_4: conv5 (1024*w ch, BN-ReLU input of b6) -> 128, 1x1, no bias, ELU
    f8_5: conv6 (4096*w ch, relu(bn7(b7)))       -> 256, 1x1, no bias, ELU
    f9:   concat (448)                           -> 448, 1x1, no bias, ELU

Initialisation as PSA: Kaiming-normal for f8_3/f8_4/f8_5, Xavier-uniform with gain 4 for f9.
The head widths 64/128/256/448 do NOT follow the backbone's width multiplier (only their input
channels do): PSA defines them as fixed numbers, and the affinity ``exp(-mean |f_i - f_j|)`` is a
mean over channels, so the width matters little; ``head_channels`` can change them.

Key layout: backbone under ``backbone.``, the four head layers at top level.

Backbones other than ResNet38 (no ``affinity_features``) get a generic stand-in: the features of
their last three depths, each average-pooled to the stride of the last one.

``embed_stride`` (0 = the deepest input's stride, PSA's 8 for ResNet38) sets the stride of the
embeddings, and so of the random walk's grid: each input feature is average-pooled (finer than the
target) or bilinearly upsampled (coarser) to it. A finer grid than the backbone's makes sense
where objects are only a few cells across, e.g. TinyCNN's stride 4 on the 96-pixel synthetic images:
every second cell of a 9-cell object is a boundary cell. The image is zero-padded to a multiple of
every stride involved so that the grids line up exactly, and the result cropped to
``ceil(H / s) x ceil(W / s)``.
"""
from __future__ import annotations

from typing import Sequence

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models.backbone import Backbone, net_from_meta

logger = logging.getLogger(__name__)

HEAD_KEYS = ("f8_3", "f8_4", "f8_5", "f9")


def _input_depths(backbone: Backbone) -> tuple[int, ...]:
    """Depths whose features feed f8_3/f8_4/f8_5 for a backbone without ``affinity_features``."""
    depths = [d for d in backbone.depths if d > 0]
    if len(depths) < 3:
        raise CaeeError(f"AffinityNet needs a backbone with at least 3 feature depths; "
                        f"{type(backbone).__name__} has {depths}")
    return tuple(depths[-3:])


class AffinityNet(nn.Module):
    """Backbone + f8_3/f8_4/f8_5/f9: ``(B, 3, H, W)`` image -> ``(B, 448, h, w)`` embeddings.

    ``h, w`` are the backbone's last feature size (ResNet38: ``ceil(H/8), ceil(W/8)``), or
    ``ceil(H/s), ceil(W/s)`` with ``embed_stride`` s.
    """

    HEAD_KEYS = HEAD_KEYS

    def __init__(self, backbone: Backbone, head_channels: tuple[int, int, int] = (64, 128, 256),
                 embed_stride: int = 0):
        super().__init__()
        self.backbone = backbone
        if embed_stride < 0:
            raise CaeeError(f"config key 'train_affinity.embed_stride' must be >= 0, got {embed_stride}")
        self.embed_stride = embed_stride
        if hasattr(backbone, "affinity_features"):
            in_ch = (backbone.channels[4], backbone.channels[5], backbone.channels[7])
        else:
            in_ch = tuple(backbone.channels[d] for d in _input_depths(backbone))
        self.f8_3 = nn.Conv2d(in_ch[0], head_channels[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(in_ch[1], head_channels[1], 1, bias=False)
        self.f8_5 = nn.Conv2d(in_ch[2], head_channels[2], 1, bias=False)
        total = sum(head_channels)
        self.f9 = nn.Conv2d(total, total, 1, bias=False)
        for layer in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(layer.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.out_channels = total

    @property
    def native_stride(self) -> int:
        """Stride of the deepest input feature (8 for ResNet38, 4 for TinyCNN)."""
        return self.backbone.strides[self.backbone.last_depth]

    @property
    def feature_stride(self) -> int:
        """Stride of the embeddings against the input: ``embed_stride`` or the native one."""
        return self.embed_stride or self.native_stride

    def head_modules(self) -> list[nn.Module]:
        """The newly initialised layers (PSA trains them at 10x lr)."""
        return [self.f8_3, self.f8_4, self.f8_5, self.f9]

    def _inputs(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The three input features, each resized to ``size`` (None: the deepest one's size)."""
        if hasattr(self.backbone, "affinity_features"):
            d = self.backbone.affinity_features(x)
            feats = [d["conv4"], d["conv5"], d["conv6"]]
        else:
            depths = _input_depths(self.backbone)
            kept = self.backbone.forward_features(x, keep=depths)
            feats = [kept[d] for d in depths]
        size = size or tuple(feats[-1].shape[-2:])
        return [_resize(f, size) for f in feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D, ceil(H / s), ceil(W / s))`` with ``s = feature_stride``."""
        if not self.embed_stride:
            return self._embed(self._inputs(x))
        s = self.embed_stride
        hh, ww = x.shape[-2:]
        step = math.lcm(s, self.native_stride)
        x = F.pad(x, (0, -ww % step, 0, -hh % step))
        # each feature goes straight from its own stride to s (no detour through the deepest one's)
        out = self._embed(self._inputs(x, (x.shape[-2] // s, x.shape[-1] // s)))
        return out[..., :-(-hh // s), :-(-ww // s)]

    def _embed(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        c4, c5, c6 = inputs
        f = torch.cat([F.elu(self.f8_3(c4)), F.elu(self.f8_4(c5)), F.elu(self.f8_5(c6))], dim=1)
        return F.elu(self.f9(f))


def _resize(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool ``f`` down to ``size``, or upsample it bilinearly, whichever it needs."""
    if tuple(f.shape[-2:]) == size:
        return f
    if f.shape[-2] > size[0]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def build_affinitynet(net: NetConfig, head_channels: Sequence[int] = (64, 128, 256),
                      embed_stride: int = 0) -> AffinityNet:
    """An AffinityNet on the backbone ``net`` describes (ImageNet weights if ``net.pretrained``)."""
    from caee.models import build_backbone
    return AffinityNet(build_backbone(net), tuple(head_channels), embed_stride)


def _arch_name(net: NetConfig) -> str:
    return f"affinitynet/{net.backbone} (width {net.width:g})"


def init_affinitynet_from(model: AffinityNet, path: str | os.PathLike, net: NetConfig,
                          config_key: str = "train_affinity.init") -> str:
    """Initialise ``model`` from ``path`` and say how: ``"affinitynet"`` (our AffinityNet
    checkpoint or PSA's ``res38_aff.pth``: every key loaded) or ``"classifier-backbone"`` (a
    classifier checkpoint, ours or PSA's ``res38_cls.pth``: only its backbone weights are
    loaded, fc8 is dropped and the heads keep their fresh initialisation)."""
    from caee.weights.checkpoints import init_weights_from

    how = init_weights_from(model, path, arch=_arch_name(net), config_key=config_key)
    return "affinitynet" if how == "model" else "classifier-backbone"


def load_affinitynet(path: str | os.PathLike, fallback_net: NetConfig) -> tuple[AffinityNet, dict]:
    """A trained AffinityNet from our ``model.pth`` (its recorded ``net`` is used) or PSA's
    ``res38_aff.pth`` (architecture from ``fallback_net``). Every key must match.
    Returns ``(model, meta)``."""
    from caee.weights.checkpoints import checkpoint_meta, load_model_weights

    meta = checkpoint_meta(path)
    if meta.get("arch", "affinitynet") != "affinitynet":
        raise CaeeError(f"{path} is a {meta['arch']} checkpoint, not an AffinityNet; point "
                        "pseudo_labels.weights at train_affinity/model.pth or a PSA res38_aff.pth")
    net = net_from_meta(meta, fallback_net, path)
    model = build_affinitynet(net, meta.get("head_channels", (64, 128, 256)), meta.get("embed_stride", 0))
    load_model_weights(model, path, arch=_arch_name(net), config_key="pseudo_labels.weights")
    return model, meta
