"""Class-specific adversarial erasing (OC-CSE, docs/METHOD.md §3).

For each image one present class k is drawn; its CAM from the CGNet becomes a soft mask M that
erases the image (depth 0) or the ordinary classifier's feature map at depth d; the frozen OC must
then still find every other class and no longer find k:  L_cse = BCE(OC(erased), t - e_k).
The mask is not detached: L_cse trains the CGNet through the frozen OC.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from caee.models.classifier import CamClassifier

Normalization = Literal["batch", "per_image"]


def sample_targets(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one present class per image, uniformly.

    labels: (B, C) multi-hot. Returns (B,) long class ids; -1 for an image without any class.
    """
    present = (labels > 0.5).float().cpu()
    # uniform among present classes: argmax of uniform noise restricted to them
    noise = torch.rand(present.shape, generator=generator) * present
    targets = noise.argmax(dim=1)
    targets[present.sum(dim=1) == 0] = -1
    return targets.to(labels.device)


def erasing_mask(maps: torch.Tensor, targets: torch.Tensor, size: tuple[int, int],
                 normalization: Normalization = "batch", eps: float = 1e-5) -> torch.Tensor:
    """Soft mask from the target classes' maps.

    maps: (B, C, h, w) CGNet class maps before ReLU; targets: (B,) (-1 = no target: mask 0).
    Returns (B, 1, H, W) in [0, 1]: the official order is upsample (bilinear), ReLU, then divide by
    the maximum over the whole batch (``batch``) or over each image (``per_image``), + eps.
    """
    b = maps.shape[0]
    idx = targets.clamp(min=0)
    target_maps = maps[torch.arange(b, device=maps.device), idx].unsqueeze(1)
    mask = F.relu(F.interpolate(target_maps.float(), size=size, mode="bilinear", align_corners=False))
    mask = mask * (targets >= 0).view(b, 1, 1, 1)
    if normalization == "batch":
        peak = mask.amax()
    else:
        peak = mask.amax(dim=(1, 2, 3), keepdim=True)
    return mask / (peak + eps)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, h, w): area averaging when shrinking (each feature cell gets the mean
    mask over the pixels it covers), bilinear when the size grows or stays."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]:
        return F.adaptive_avg_pool2d(mask, size)
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def erased_logits(oc: CamClassifier, images: torch.Tensor, mask: torch.Tensor, depth: int = 0) -> torch.Tensor:
    """OC logits with ``1 - mask`` applied at ``depth`` (0 = the normalised image).

    images: (B, 3, H, W) normalised; mask: (B, 1, H, W). Returns (B, C).
    """
    keep = 1.0 - mask

    def edit(d: int, feat: torch.Tensor) -> torch.Tensor:
        if d != depth:
            return feat
        return feat * resize_mask(keep, tuple(feat.shape[-2:])).to(feat.dtype)

    logits, _ = oc(images, edit=edit)
    return logits


def cse_loss(oc_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE(OC(erased), t - e_k): the erased class k must vanish, the others must stay."""
    remaining = labels.clone()
    has_target = targets >= 0
    remaining[has_target, targets[has_target]] = 0.0
    return F.multilabel_soft_margin_loss(oc_logits.float(), remaining)


def cse_weight(epoch: int, init: float = 0.3, slope: float = 0.05) -> float:
    """w(epoch) = init + slope * epoch (epoch from 0): 0.30 -> 1.00 over 15 epochs."""
    return init + slope * epoch
