"""The official OC-CSE epoch selection: keep the CGNet epoch whose CAMs score best against the
ground truth of the training images. This is an oracle (it looks at pixel labels the method is not
supposed to have), so it is off by default (``train_cgnet.select_by_oracle``).

As OC-CSE's train.py does after every epoch: multi-scale + flip CAMs of the ``data.cam_split``
images (scales 0.5 / 1 / 1.5 / 2, PIL bicubic input resize, as its VOC12ClsDatasetMSF), scored by
the best mIoU over the background thresholds 0.10, 0.11, ..., 0.39 (its evaluation.validation);
an epoch replaces the kept one only when it scores strictly higher. These settings are fixed here,
not read from the ``cam`` section, so that changing how the final CAMs are made does not change
which CGNet epoch is kept.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from caee.core.metrics import ThresholdSweep
from caee.method.cam import image_keys, multiscale_cam

SCALES = (0.5, 1.0, 1.5, 2.0)
FLIP = True
RESIZE = "pil_bicubic"
THRESHOLDS = [round(0.10 + 0.01 * i, 2) for i in range(30)]  # 0.10 .. 0.39


def train_cam_miou(model: torch.nn.Module, samples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   num_classes: int, device: torch.device) -> float:
    """Best-threshold mIoU of the official multi-scale + flip CAMs over ``samples``: (image uint8
    (H, W, 3), ground truth uint8 (H, W), image-level label float (C,)) of the images with ground truth."""
    sweep = ThresholdSweep(num_classes, THRESHOLDS)
    was_training = model.training
    model.eval()
    for image, gt, label in samples:
        keys = image_keys(label)
        # float32 (amp off) as the official selection; bf16 could swap the ranking of close epochs
        cams = multiscale_cam(model, image, keys, SCALES, FLIP, device, amp=False, resize=RESIZE)
        sweep.update(gt, keys, cams)
    model.train(was_training)
    return float(sweep.best()["miou"])


def is_better(miou: float, best: dict | None) -> bool:
    """An epoch replaces the kept one only when it scores strictly higher (as OC-CSE's train.py)."""
    return best is None or miou > best["miou"]
