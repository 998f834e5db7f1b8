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

import logging
from pathlib import Path

import torch

from caee.method.cam import image_keys, multiscale_cam
from caee.data import SplitIndex
from caee.core.errors import CaeeError
from caee.core.io import load_image, load_label_png
from caee.core.metrics import ThresholdSweep
from caee.weights.checkpoints import read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)
SCALES = (0.5, 1.0, 1.5, 2.0)
FLIP = True
RESIZE = "pil_bicubic"
THRESHOLDS = [round(0.10 + 0.01 * i, 2) for i in range(30)]  # 0.10 .. 0.39


def train_cam_miou(model: torch.nn.Module, index: SplitIndex, device: torch.device) -> float:
    """Best-threshold mIoU of the official multi-scale + flip CAMs over the images of ``index`` that
    have ground truth."""
    sweep = ThresholdSweep(index.num_classes, THRESHOLDS)
    was_training = model.training
    model.eval()
    for i in range(len(index)):
        gt_path = index.eval_mask_path(i)
        if gt_path is None or not gt_path.is_file():
            continue
        keys = image_keys(index.labels[i])
        # float32 (amp off) as the official selection; bf16 could swap the ranking of close epochs
        cams = multiscale_cam(model, load_image(index.image_path(i)), keys, SCALES, FLIP, device, amp=False,
                              resize=RESIZE)
        sweep.update(load_label_png(gt_path), keys, cams)
    model.train(was_training)
    return float(sweep.best()["miou"])


class OracleSelector:
    """Remembers the best epoch in ``<out_dir>/oracle_best.pth`` (survives resume)."""

    def __init__(self, out_dir: Path, index: SplitIndex, device: torch.device):
        self.path = Path(out_dir) / "oracle_best.pth"
        self.index, self.device = index, device

    def best(self) -> dict | None:
        if not self.path.exists():
            return None
        best = read_checkpoint(self.path, "delete it to restart the oracle selection")
        if not (isinstance(best, dict) and isinstance(best.get("model"), dict) and isinstance(best.get("epoch"), int)
                and isinstance(best.get("miou"), float)):
            raise CaeeError(f"{self.path}: not an oracle record (model, epoch, miou); delete it to restart the "
                            "oracle selection")
        return best

    def update(self, model: torch.nn.Module, epoch: int) -> None:
        miou = train_cam_miou(model, self.index, self.device)
        prev = self.best()
        logger.info("oracle: epoch %d CAM mIoU %.2f on %s (best so far %s)", epoch + 1, 100 * miou,
                    self.index.split, "-" if prev is None else f"{100 * prev['miou']:.2f} at epoch {prev['epoch'] + 1}")
        if prev is None or miou > prev["miou"]:
            save_checkpoint(self.path, {"model": model.state_dict(), "epoch": epoch, "miou": miou})

