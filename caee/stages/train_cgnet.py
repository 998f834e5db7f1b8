"""Stage 2: train the CGNet with class-specific adversarial erasing against the frozen OC.

Input:  data.root; the OC from <work_dir>/train_classifier/model.pth or train_cgnet.oc_weights
        (our model.pth or PSA's res38_cls.pth / OC-CSE's od_cam.pth); train_cgnet.net.pretrained.
Output: <work_dir>/train_cgnet/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-cgnet --config configs/voc/r38.yaml data.root=/data/VOC2012
    caee train-cgnet --config configs/demo.yaml masking.depth=3   # feature-level masking
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from caee.core.config import Config, config_to_dict
from caee.data import ClassificationDataset, SplitIndex, load_split
from caee.data.transforms import build_train_transform
from caee.core import distributed
from caee.engine.trainer import FitResult, StepContext, fit
from caee.method.erasing import cse_loss, cse_weight, erased_logits, erasing_mask, sample_targets
from caee.core.errors import CaeeError, not_found
from caee.models.classifier import CamClassifier, build_classifier, load_classifier
from caee.method.epoch_selection import is_better, train_cam_miou
from caee.stages import table
from caee.stages.common import finish_trainer, start_trainer
from caee.stages.train_classifier import ClassifierTask, multilabel_accuracy
from caee.core.io import load_image, load_label_png
from caee.weights.checkpoints import load_model_weights, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


def freeze_module(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: gradients still flow *through* it to its inputs."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class OracleSelector:
    """The official epoch selection (caee.method.epoch_selection) with its best epoch kept in
    ``<out_dir>/oracle_best.pth``, so that it survives resume."""

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

    def samples(self):
        for i in range(len(self.index)):
            gt_path = self.index.eval_mask_path(i)
            if gt_path is not None and gt_path.is_file():
                yield load_image(self.index.image_path(i)), load_label_png(gt_path), self.index.labels[i]

    def update(self, model: torch.nn.Module, epoch: int) -> None:
        miou = train_cam_miou(model, self.samples(), self.index.num_classes, self.device)
        prev = self.best()
        logger.info("oracle: epoch %d CAM mIoU %.2f on %s (best so far %s)", epoch + 1, 100 * miou,
                    self.index.split, "-" if prev is None else f"{100 * prev['miou']:.2f} at epoch {prev['epoch'] + 1}")
        if is_better(miou, prev):
            save_checkpoint(self.path, {"model": model.state_dict(), "epoch": epoch, "miou": miou})


class CGNetTask(ClassifierTask):
    def __init__(self, cgnet: CamClassifier, oc: CamClassifier, cfg: Config, class_names: list[str],
                 oracle: OracleSelector | None = None):
        super().__init__(cgnet, cfg.train_cgnet.net, class_names)
        self.oc = oc
        self.oracle = oracle
        self.masking = cfg.masking

    def train_step(self, model, batch, ctx: StepContext):
        images, labels, logits, maps, loss_cls = self.classify(model, batch, ctx)
        w = cse_weight(ctx.epoch, self.masking.cse_init, self.masking.cse_slope)
        metrics = {"loss_cls": float(loss_cls.detach()), "w": w, "acc": multilabel_accuracy(logits.detach(), labels)}
        if w == 0.0:  # the no-erasing control: the OC pass would not change a single gradient
            return loss_cls, metrics
        targets = sample_targets(labels, ctx.generator())
        mask = erasing_mask(maps, targets, tuple(images.shape[-2:]), self.masking.normalization)
        oc_logits = erased_logits(self.oc, images, mask, self.masking.depth)
        loss_cse = cse_loss(oc_logits, labels, targets)
        metrics.update(loss_cse=float(loss_cse.detach()),
                       oc_erased_acc=_erased_accuracy(oc_logits.detach(), labels, targets))
        return loss_cls + w * loss_cse, metrics

    def on_epoch_end(self, epoch: int, out_dir) -> None:
        if self.oracle is not None and distributed.is_main():
            self.oracle.update(self.model, epoch)
        distributed.barrier()

    def export(self) -> dict:
        return {**super().export(), "masking": dataclasses.asdict(self.masking)}


def _erased_accuracy(oc_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    """How often the OC, shown the erased image, predicts exactly the remaining classes."""
    remaining = labels.clone()
    has = targets >= 0
    remaining[has, targets[has]] = 0
    return multilabel_accuracy(oc_logits, remaining)


def check_depth(depth: int, oc: CamClassifier) -> None:
    depths = oc.backbone.depths
    if depth not in depths:
        raise CaeeError(f"masking.depth={depth} is not a depth of the {type(oc.backbone).__name__} OC; "
                        f"valid depths: {', '.join(map(str, depths))}")



def main(cfg: Config) -> FitResult:
    start = start_trainer(cfg, "train_cgnet")
    cfg, env, index, names = start.cfg, start.env, start.index, start.names
    tc = cfg.train_cgnet
    oc_path = table.stage("train_cgnet").input(cfg, "oc")
    if not oc_path.is_file():
        raise CaeeError(f"OC weights {not_found(oc_path)}; run train_classifier.py first or set train_cgnet.oc_weights")
    oc = freeze_module(load_classifier(oc_path, cfg.train_classifier.net, len(names))).to(env.device)
    if tc.channels_last and env.device.type == "cuda":
        oc = oc.to(memory_format=torch.channels_last)
    check_depth(cfg.masking.depth, oc)
    cgnet = build_classifier(tc.net, len(names))
    if tc.init:
        load_model_weights(cgnet, tc.init, arch=f"classifier/{tc.net.backbone}")
    cgnet.backbone.freeze(bool(tc.net.pretrained or tc.init))
    oracle = OracleSelector(env.out_dir, load_split(cfg.data, cfg.data.cam_split), env.device) \
        if tc.select_by_oracle else None
    logger.info("CGNet %s (width %g) vs OC %s from %s: masking depth %d (%s), w = %.2f + %.2f * epoch",
                tc.net.backbone, tc.net.width, type(oc.backbone).__name__, oc_path, cfg.masking.depth,
                cfg.masking.normalization, cfg.masking.cse_init, cfg.masking.cse_slope)
    dataset = ClassificationDataset(index, build_train_transform(tc))
    task = CGNetTask(cgnet, oc, cfg, names, oracle)
    result = fit(task, dataset, tc, env.out_dir, env.device, config_to_dict(cfg), cfg.data.num_workers,
                 "train_cgnet")
    if oracle is not None and distributed.is_main() and oracle.best() is not None:
        best = oracle.best()
        logger.info("oracle selection: model.pth holds epoch %d (train CAM mIoU %.2f)", best["epoch"] + 1,
                    100 * best["miou"])
        save_checkpoint(result.model_path, {"model": best["model"], **task.export(), "oracle_epoch": best["epoch"],
                                            "oracle_miou": best["miou"]})
    finish_trainer(start, result.images_per_s)
    return result
