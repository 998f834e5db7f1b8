"""Stage 4: train AffinityNet (PSA) on pair labels from the CAMs' low/high-alpha CRF labels.

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet/<id>.npz (or
        train_affinity.cam_dir) and their CRF labels <cam_dir>_crf_<la_alpha>/ and
        <cam_dir>_crf_<ha_alpha>/ (computed from the CAMs and cached there when absent);
        train_affinity.net.pretrained (ImageNet weights) or train_affinity.init (our AffinityNet
        model.pth, PSA's res38_aff.pth, or a classifier model.pth / res38_cls.pth whose backbone
        alone is used).
Output: <work_dir>/train_affinity/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-affinity --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-affinity --config configs/voc/r38.yaml

Labels (``train_affinity.label_rule``, :mod:`caee.method.affinity_labels`): ``psa`` reads cell label
tables from ``<cam_dir>_cells_<la>_<ha>_s<stride>/<id>.png`` and crops them with the image
(:class:`caee.data.transforms.AffinityAugment`); ``top_left`` reads the CRF label PNGs of
``<cam_dir>_crf_<alpha>/``. Missing ones are computed from the CAMs first.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from caee.method.affinity import GridPairs, affinity_loss, offset_affinity, pair_label_targets
from caee.stages.label_cache import AffinityLabelDataset, CellLabelDataset, ensure_cell_tables, ensure_crf_labels
from caee.core.config import AffinityTrainConfig, Config, config_to_dict
from caee.data import SplitIndex
from caee.data.transforms import AffinityAugment, build_train_transform
from caee.engine.trainer import FitResult, StepContext, TrainTask, fit
from caee.core.errors import CaeeError
from caee.models.affinitynet import AffinityNet, build_affinitynet, init_affinitynet_from
from caee.core.layout import crf_dir
from caee.stages import table
from caee.stages.common import finish_trainer, start_trainer

logger = logging.getLogger(__name__)


class AffinityTask(TrainTask):
    """One step: embeddings of the crop, affinities of every pair of the crop's feature grid,
    PSA's three-term loss. Pair indices are computed once per feature size and device."""

    def __init__(self, model: AffinityNet, cfg: AffinityTrainConfig, class_names: list[str]):
        self.model = model
        self.cfg = cfg
        self.class_names = class_names
        self.pairs = GridPairs(cfg.radius, cfg.psa_border, "train_affinity.radius", "train_affinity.crop_size")

    def head_modules(self) -> list[nn.Module]:
        return self.model.head_modules()

    def train_step(self, model, batch, ctx: StepContext):
        images = ctx.to_device(batch["image"], image=True)
        labels = ctx.to_device(batch["aff_label"])
        feats = model(images)
        h, w = feats.shape[-2:]
        if tuple(labels.shape[-2:]) != (h, w):
            raise CaeeError(f"affinity labels are {tuple(labels.shape[-2:])} but the features "
                            f"{(h, w)} for {tuple(images.shape[-2:])} crops; use a crop_size divisible by "
                            f"the feature stride {self.model.feature_stride}")
        from_idx, to_idx = self.pairs(h, w, feats.device)
        bg, fg, neg = pair_label_targets(labels, from_idx, to_idx)
        # exp(-mean |f_i - f_j|) in float32: bf16 would round affinities near 1
        aff = offset_affinity(feats.float(), self.cfg.radius, self.cfg.psa_border)
        loss, terms = affinity_loss(aff, bg, fg, neg)
        metrics = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        metrics.update(n_bg=int(bg.sum()), n_fg=int(fg.sum()), n_neg=int(neg.sum()), n_pairs=int(bg.numel()))
        return loss, metrics

    def export(self) -> dict:
        return {"arch": "affinitynet", "net": dataclasses.asdict(self.cfg.net), "radius": self.cfg.radius,
                "head_channels": list(self.cfg.head_channels), "embed_stride": self.model.embed_stride,
                "feature_stride": self.model.feature_stride, "num_classes": len(self.class_names),
                "class_names": self.class_names}


def build_model(tc: AffinityTrainConfig) -> AffinityNet:
    """The AffinityNet to train: ImageNet backbone (``net.pretrained``) or the ``init`` checkpoint
    (AffinityNet, or a classifier whose backbone alone is used); backbone frozen as PSA."""
    net = dataclasses.replace(tc.net, pretrained="") if tc.init else tc.net
    model = build_affinitynet(net, tc.head_channels, tc.embed_stride)
    if tc.init:
        how = init_affinitynet_from(model, tc.init, tc.net)
        logger.info("AffinityNet initialised from %s (%s)", tc.init, how)
    elif not tc.net.pretrained:
        logger.warning("AffinityNet starts from random weights (neither train_affinity.net.pretrained "
                       "nor train_affinity.init is set)")
    model.backbone.freeze(bool(tc.net.pretrained or tc.init))
    return model



def main(cfg: Config) -> FitResult:
    start = start_trainer(cfg, "train_affinity")
    cfg, env, index, names = start.cfg, start.env, start.index, start.names
    tc = cfg.train_affinity
    cam_dir = table.stage("train_affinity").input(cfg, "cams")
    if not cam_dir.is_dir():
        raise CaeeError(f"CAM folder {cam_dir} does not exist; run make_cam.py on split "
                        f"'{cfg.data.train_split}' first or set train_affinity.cam_dir")
    if tc.label_rule == "psa" and tc.resize_long[1] > 0:
        raise CaeeError(f"train_affinity.label_rule=psa crops without rescaling (as PSA), but resize_long is "
                        f"{tc.resize_long}; set train_affinity.resize_long=[0,0] or label_rule=top_left")
    model = build_model(tc)
    stride = model.feature_stride
    if tc.crop_size <= 0 or tc.crop_size % stride:
        raise CaeeError(f"train_affinity.crop_size={tc.crop_size} must be a positive multiple of the feature "
                        f"stride {stride} (images of a batch must share one size)")
    dataset = build_dataset(cfg, index, cam_dir, stride)
    logger.info("AffinityNet %s (width %g, embeddings at stride %d): %d images of %s, labels (%s rule) la alpha %g / "
                "ha alpha %g from %s, radius %d (%s pairs), batch %d, %d epochs, lr %g", tc.net.backbone, tc.net.width,
                stride, len(index.ids), cfg.data.train_split, tc.label_rule, tc.la_alpha, tc.ha_alpha, cam_dir,
                tc.radius, "PSA" if tc.psa_border else "all", tc.batch_size, tc.epochs, tc.lr)
    result = fit(AffinityTask(model, tc, names), dataset, tc, env.out_dir, env.device,
               config_to_dict(cfg), cfg.data.num_workers,
                 "train_affinity")
    finish_trainer(start, result.images_per_s)
    return result


def build_dataset(cfg: Config, index: SplitIndex, cam_dir: Path, stride: int) -> Dataset:
    """The training samples of ``train_affinity.label_rule`` (CRF results computed where missing)."""
    tc = cfg.train_affinity
    if tc.label_rule == "psa":
        table_dir = ensure_cell_tables(index, cam_dir, tc.la_alpha, tc.ha_alpha, stride, cfg.crf,
                                       overwrite=tc.overwrite)
        return CellLabelDataset(index, table_dir, AffinityAugment(tc.crop_size, tc.hflip, tc.color_jitter), stride)
    dirs = ensure_crf_labels(index, cam_dir, {a: crf_dir(cam_dir, a) for a in (tc.la_alpha, tc.ha_alpha)}, cfg.crf,
                             overwrite=tc.overwrite)
    return AffinityLabelDataset(index, dirs[float(tc.la_alpha)], dirs[float(tc.ha_alpha)],
                                build_train_transform(tc), stride)
