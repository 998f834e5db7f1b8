"""Backbones by name and the one function that builds them from a :class:`~caee.core.config.NetConfig`."""
from __future__ import annotations

import logging

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models.backbone import Backbone
from caee.models.resnet38 import ResNet38
from caee.models.resnet50 import ResNet50
from caee.models.resnet101 import ResNet101
from caee.models.tinycnn import TinyCNN
from caee.models.vgg16 import VGG16

logger = logging.getLogger(__name__)

BACKBONES: dict[str, type[Backbone]] = {
    "resnet38": ResNet38,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "vgg16": VGG16,
    "tinycnn": TinyCNN,
}
# backbones whose constructor takes a channel multiplier
_WIDTH_BACKBONES = ("resnet38", "tinycnn", "vgg16")
# backbones whose constructor takes an output stride (net.output_stride)
_STRIDE_BACKBONES = ("tinycnn",)


def build_backbone(net_cfg: NetConfig) -> Backbone:
    """The backbone ``net_cfg.backbone`` at ``net_cfg.width``, with ImageNet weights from
    ``net_cfg.pretrained`` when that is non-empty. Freezing is left to the caller (``freeze()``)."""
    name = net_cfg.backbone
    if name not in BACKBONES:
        raise CaeeError(f"config key 'net.backbone': unknown backbone {name!r}; choose one of "
                        f"{', '.join(BACKBONES)}")
    if not net_cfg.width > 0:
        raise CaeeError(f"config key 'net.width' must be > 0, got {net_cfg.width}")
    stride = getattr(net_cfg, "output_stride", 0)
    kwargs = {}
    if name in _STRIDE_BACKBONES and stride:
        if stride not in BACKBONES[name].output_strides:
            raise CaeeError(f"config key 'net.output_stride' = {stride}: backbone {name!r} offers "
                            f"{', '.join(map(str, BACKBONES[name].output_strides))} (or 0, its own)")
        kwargs["output_stride"] = stride
    if name in _WIDTH_BACKBONES:
        backbone = BACKBONES[name](width=net_cfg.width, **kwargs)
    elif net_cfg.width != 1.0:
        raise CaeeError(f"config key 'net.width' = {net_cfg.width}: backbone {name!r} has no width "
                        f"multiplier (only {', '.join(_WIDTH_BACKBONES)} do); set net.width=1.0")
    else:
        backbone = BACKBONES[name](**kwargs)
    if stride and backbone.strides[backbone.last_depth] != stride:
        raise CaeeError(f"config key 'net.output_stride' = {stride}: backbone {name!r} has output stride "
                        f"{backbone.strides[backbone.last_depth]} only (0 = its own; tinycnn also takes 8)")
    if net_cfg.pretrained:
        from caee.weights.checkpoints import load_imagenet_weights
        load_imagenet_weights(backbone, net_cfg.pretrained)
        logger.info("%s: ImageNet weights from %s", name, net_cfg.pretrained)
    return backbone


__all__ = ["BACKBONES", "Backbone", "build_backbone", "ResNet38", "ResNet50", "ResNet101", "VGG16", "TinyCNN"]
