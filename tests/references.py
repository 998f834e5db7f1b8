"""Plain reference procedures the tests compare the library's fast paths against."""
from __future__ import annotations

import torch


def pairwise_affinity(features: torch.Tensor, from_idx: torch.Tensor, to_idx: torch.Tensor) -> torch.Tensor:
    """``a_ij = exp(-mean_c |f_i - f_j|)`` for every pair, by gathering the two pixels of each pair.

    features: ``(B, D, h, w)`` float; from_idx, to_idx: ``(P,) long`` flat indices into ``h*w``.
    Returns ``(B, P)`` in ``(0, 1]``, differentiable w.r.t. features.
    """
    flat = features.flatten(2)
    dev = flat.device
    diff = flat.index_select(2, from_idx.to(dev)) - flat.index_select(2, to_idx.to(dev))
    return torch.exp(-diff.abs().mean(dim=1))
