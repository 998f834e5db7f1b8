"""Stage 1: train the ordinary classifier (OC) on image-level labels.

Input:  data.root (images + image-level labels of data.train_split); train_classifier.net.pretrained
        (ImageNet weights: MXNet .params or .pth) or train_classifier.init (a PSA/caee checkpoint).
Output: <work_dir>/train_classifier/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-classifier --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-classifier --config configs/voc/r38.yaml
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from caee.core.config import Config, config_to_dict
from caee.data import ClassificationDataset
from caee.data.transforms import build_train_transform
from caee.engine.trainer import FitResult, StepContext, TrainTask, fit
from caee.models.classifier import CamClassifier, build_classifier
from caee.stages.common import finish_trainer, start_trainer
from caee.weights.checkpoints import load_model_weights

logger = logging.getLogger(__name__)


def multilabel_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted label set (logit > 0) equals the true set exactly."""
    return float(((logits > 0) == (labels > 0.5)).all(dim=1).float().mean())


class ClassifierTask(TrainTask):
    def __init__(self, model: CamClassifier, net_cfg, class_names: list[str]):
        self.model = model
        self.net_cfg = net_cfg
        self.class_names = class_names

    def head_modules(self):
        return [self.model.fc8]

    def classify(self, model, batch, ctx: StepContext) -> tuple[torch.Tensor, ...]:
        """(images, labels, logits, CAM maps, classification loss) of one batch."""
        images = ctx.to_device(batch["image"], image=True)
        labels = ctx.to_device(batch["label"])
        logits, maps = model(images)
        # multi-label soft margin = mean BCE-with-logits over classes
        return images, labels, logits, maps, F.multilabel_soft_margin_loss(logits.float(), labels)

    def train_step(self, model, batch, ctx: StepContext):
        _, labels, logits, _, loss = self.classify(model, batch, ctx)
        return loss, {"acc": multilabel_accuracy(logits.detach(), labels)}

    def export(self) -> dict:
        return {"arch": "classifier", "net": dataclasses.asdict(self.net_cfg),
                "num_classes": len(self.class_names), "class_names": self.class_names}



def main(cfg: Config) -> FitResult:
    start = start_trainer(cfg, "train_classifier")
    cfg, env, index, names = start.cfg, start.env, start.index, start.names
    tc = cfg.train_classifier
    model = build_classifier(tc.net, len(names))
    if tc.init:
        load_model_weights(model, tc.init, arch=f"classifier/{tc.net.backbone}")
    model.backbone.freeze(bool(tc.net.pretrained or tc.init))
    logger.info("OC %s (width %g): %d images of %s, %d classes, batch %d, %d epochs",
                tc.net.backbone, tc.net.width, len(index.ids), cfg.data.train_split, len(names), tc.batch_size, tc.epochs)
    dataset = ClassificationDataset(index, build_train_transform(tc))
    result = fit(ClassifierTask(model, tc.net, names), dataset, tc, env.out_dir, env.device,
               config_to_dict(cfg), cfg.data.num_workers,
                 "train_classifier")
    finish_trainer(start, result.images_per_s)
    return result
