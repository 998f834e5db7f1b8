"""DeepLab inference: the multi-scale + flip fusion of one image's class probabilities.

Fusion rule: every pass (scale s, optionally mirrored) gives logits at the feature resolution;
they are upsampled bilinearly to the image size, mirrored back, turned into softmax probabilities,
and the probabilities of all passes are averaged. The CRF takes those averaged probabilities as its
unary (``-log p``, caee.method.crf). Writing and scoring the predictions is the stage's
(caee/stages/predictions.py).
"""
from __future__ import annotations

import logging
from typing import Sequence


import torch
import torch.nn.functional as F
from torch import nn

from caee.core.errors import CaeeError


logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:
    """Class probabilities of one image, fused over scales and flips.

    model: maps (B, 3, h, w) to logits (B, C+1, h', w') (any resolution). image: (3, H, W) float,
    normalised, on the model's device. Each scale ``s`` resizes the image bilinearly to
    (round(H s), round(W s)) (at least 1 px); with ``flip`` its mirror image runs in the same batch.
    Returns (C+1, H, W) float32: the mean over the passes of softmax(upsampled logits).
    """
    if image.ndim != 3:
        raise ValueError(f"predict takes one (3, H, W) image, got shape {tuple(image.shape)}")
    if not scales:
        raise CaeeError("config key 'train_deeplab.test_scales' must list at least one scale")
    h, w = image.shape[-2:]
    total: torch.Tensor | None = None
    passes = 0
    for s in scales:
        x = image[None]
        if s != 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = F.interpolate(model(x).float(), size=(h, w), mode="bilinear", align_corners=False)
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        probs = torch.softmax(logits, dim=1).sum(0)
        total = probs if total is None else total + probs
        passes += logits.shape[0]
    return total / passes


# ---------------------------------------------------------------- a split
