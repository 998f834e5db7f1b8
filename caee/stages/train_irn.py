"""Train IRN's class-boundary network on relation labels from a CAM folder (pseudo_labels.method: irn).

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet (or irn.cam_dir: any
        CAM folder); irn.net.pretrained (torchvision ImageNet ResNet50) or irn.init.
Output: <work_dir>/train_irn/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json};
        relation labels cached in <cam_dir>_irlabels_<fg>_<bg>/ (with their record).

    caee train-irn --config configs/voc/r38_irn.yaml data.root=/data/VOC2012

1. Relation labels (:func:`caee.method.irn.ir_labels`, IRN's cam_to_ir_label.py) of every training
   image, cached per CAM folder in ``<cam_dir>_irlabels_<fg>_<bg>/<id>.png`` (the folder's record holds
   the CAMs' run and the label settings; other settings are refused unless ``irn.overwrite``).
2. IRN's augmentation: a random rescale by a factor in ``irn.scale_range`` (image bicubic, labels
   nearest), flip, normalisation, a random ``crop_size`` crop (image padded with 0 = the mean
   colour, labels with 255); labels taken on the boundary grid (:func:`caee.method.irn.reduce_labels`).
3. Loss :func:`caee.method.irn.boundary_loss` on the path affinities of every pair within
   ``irn.train_radius`` (IRN's training pair set), the backbone frozen; poly lr, SGD.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision import tv_tensors

from caee.core import distributed
from caee.core.config import Config, IrnConfig, config_to_dict
from caee.core.errors import CaeeError
from caee.core.io import load_cam_npz, load_image, save_label_png
from caee.core.parallel import run_pool, workers_for
from caee.data import SegmentationDataset, SplitIndex
from caee.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from caee.engine.trainer import FitResult, StepContext, TrainTask, fit
from caee.method.affinity import GridPairs, pair_label_targets
from caee.method.irn import boundary_affinity, boundary_loss, ir_labels, reduce_labels
from caee.models.irn import IrnEdgeNet, arch_name, build_irn
from caee.stages import table
from caee.stages.common import finish_label_folders, finish_trainer, open_label_folders, run_id, start_trainer

logger = logging.getLogger(__name__)

STAGE = "train_irn"


# ---------------------------------------------------------------- relation labels


def ir_label_dir(cam_dir: str | Path, fg: float, bg: float) -> Path:
    """IRN's relation labels of the CAMs in ``cam_dir`` at thresholds ``fg`` / ``bg``:
    ``.../cam_cgnet`` -> ``.../cam_cgnet_irlabels_0.3_0.05``."""
    cam_dir = Path(cam_dir)
    return cam_dir.parent / f"{cam_dir.name}_irlabels_{fg:g}_{bg:g}"


def ir_label_settings(cam_dir: Path, ic: IrnConfig) -> dict:
    """What determines a folder of relation labels: the CAMs, the two thresholds and the CRF."""
    crf = {f"crf.{k}": v for k, v in dataclasses.asdict(ic.crf).items() if k != "workers"}
    return {"input.cams": run_id(cam_dir), "conf_fg_thres": float(ic.conf_fg_thres),
            "conf_bg_thres": float(ic.conf_bg_thres), "crf_gt_prob": float(ic.crf_gt_prob), **crf}


def _ir_job(job: tuple) -> None:
    image_path, cam_path, out_path, ic, num_classes = job
    image = load_image(image_path)
    keys, cams = load_cam_npz(cam_path, num_classes)
    if cams.shape[1:] != image.shape[:2]:
        raise CaeeError(f"{cam_path}: CAMs are {cams.shape[2]}x{cams.shape[1]} but the image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; regenerate the CAMs with make_cam")
    save_label_png(out_path, ir_labels(image, keys, cams, ic.conf_fg_thres, ic.conf_bg_thres, ic.crf, ic.crf_gt_prob))


def ensure_ir_labels(index: SplitIndex, cam_dir: Path, ic: IrnConfig, workers: int | None = None) -> Path:
    """Make sure ``ir_label_dir(cam_dir)/<id>.png`` exists for every image of ``index`` (missing ones
    computed in a process pool, each rank taking its share). Returns the folder."""
    out_dir = ir_label_dir(cam_dir, ic.conf_fg_thres, ic.conf_bg_thres)
    open_label_folders({out_dir: ir_label_settings(cam_dir, ic)}, ic.overwrite, "train_irn")
    jobs = [(str(index.image_path(i)), str(cam_dir / f"{image_id}.npz"), str(out_dir / f"{image_id}.png"), ic,
             index.num_classes) for i, image_id in enumerate(index.ids) if not (out_dir / f"{image_id}.png").is_file()]
    if jobs:
        missing = [j[1] for j in jobs if not Path(j[1]).is_file()]
        if missing:
            raise CaeeError(f"{len(missing)} CAM files needed for the IRN relation labels are missing (first: "
                            f"{', '.join(missing[:3])}); run make_cam on split '{index.split}' or set irn.cam_dir")
        logger.info("computing %d IRN relation label maps (fg %g / bg %g) from %s -> %s", len(jobs),
                    ic.conf_fg_thres, ic.conf_bg_thres, cam_dir, out_dir)
        run_pool(_ir_job, distributed.shard(jobs), workers if workers is not None else workers_for(ic.crf.workers))
    finish_label_folders([out_dir], index.split)
    return out_dir


# ---------------------------------------------------------------- augmentation


class RandomRescale(v2.Transform):
    """Rescale by a uniform random factor in [low, high] (IRN's random_scale): image bicubic, masks nearest."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = float(low), float(high)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        s = self.low + float(torch.rand(())) * (self.high - self.low)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.resize, inpt, size=params["size"],
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def build_irn_transform(ic: IrnConfig) -> v2.Compose:
    steps: list[v2.Transform] = []
    if ic.scale_range[0] != 1.0 or ic.scale_range[1] != 1.0:
        steps.append(RandomRescale(*ic.scale_range))
    if ic.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
              v2.RandomCrop(ic.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: 255})]
    return v2.Compose(steps)


# ---------------------------------------------------------------- training


class IrnTask(TrainTask):
    """One step: boundary logits of the crop, path affinities of IRN's training pairs, IRN's loss."""

    def __init__(self, model: IrnEdgeNet, ic: IrnConfig, class_names: list[str]):
        self.model, self.ic, self.class_names = model, ic, class_names
        self.pairs = GridPairs(self.ic.train_radius, True, "irn.train_radius", "irn.crop_size")

    def head_modules(self) -> list[nn.Module]:
        return self.model.head_modules()

    def train_step(self, model, batch, ctx: StepContext):
        images = ctx.to_device(batch["image"], image=True)
        labels = reduce_labels(ctx.to_device(batch["mask"]), self.ic.edge_stride)
        edge = torch.sigmoid(model(images)[:, 0].float())
        h, w = edge.shape[-2:]
        if tuple(labels.shape[-2:]) != (h, w):
            raise CaeeError(f"relation labels are {tuple(labels.shape[-2:])} on the grid but the boundary map is "
                            f"{(h, w)}; use an irn.crop_size divisible by irn.edge_stride={self.ic.edge_stride}")
        from_idx, to_idx = self.pairs(h, w, edge.device)
        bg, fg, neg = pair_label_targets(labels, from_idx, to_idx)
        loss, terms = boundary_loss(boundary_affinity(edge, self.ic.train_radius, psa_border=True), bg, fg, neg)
        metrics = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        metrics.update(n_bg=int(bg.sum()), n_fg=int(fg.sum()), n_neg=int(neg.sum()))
        return loss, metrics

    def export(self) -> dict:
        return {"arch": "irn", "net": dataclasses.asdict(self.ic.net), "edge_channels": self.ic.edge_channels,
                "edge_groups": self.ic.edge_groups, "edge_stride": self.ic.edge_stride,
                "train_radius": self.ic.train_radius, "num_classes": len(self.class_names),
                "class_names": self.class_names}


def build_model(ic: IrnConfig) -> IrnEdgeNet:
    """The boundary network: ImageNet backbone (``net.pretrained``) or the backbone of ``init`` (e.g. a
    classifier checkpoint), frozen; fresh boundary layers."""
    from caee.weights.checkpoints import init_weights_from

    net = dataclasses.replace(ic.net, pretrained="") if ic.init else ic.net
    model = build_irn(net, ic.edge_channels, ic.edge_groups, ic.edge_stride)
    if ic.init:
        how = init_weights_from(model, ic.init, arch_name(ic.net), config_key="irn.init")
        logger.info("IRN initialised from %s (%s)", ic.init, how)
    elif not ic.net.pretrained:
        logger.warning("IRN's frozen backbone has random weights (neither irn.net.pretrained nor irn.init is set)")
    return model


def main(cfg: Config) -> FitResult:
    start = start_trainer(cfg, STAGE)  # the walk's settings are not recorded: they do not change the network
    cfg, env, index, names = start.cfg, start.env, start.index, start.names
    ic = cfg.irn
    cam_dir = table.stage(STAGE).input(cfg, "cams")
    if ic.crop_size <= 0 or ic.crop_size % ic.edge_stride:
        raise CaeeError(f"irn.crop_size={ic.crop_size} must be a positive multiple of irn.edge_stride={ic.edge_stride}")
    model = build_model(ic)
    label_dir = ensure_ir_labels(index, cam_dir, ic)
    dataset = SegmentationDataset(index, label_dir, build_irn_transform(ic))
    logger.info("IRN boundary branch on %s (frozen): %d images of %s, relation labels %s, train radius %d, "
                "batch %d, %d epochs, lr %g", ic.net.backbone, len(index.ids), cfg.data.train_split, label_dir,
                ic.train_radius, ic.batch_size, ic.epochs, ic.lr)
    result = fit(IrnTask(model, ic, names), dataset, ic, env.out_dir, env.device, config_to_dict(cfg),
                 cfg.data.num_workers, STAGE)
    finish_trainer(start, result.images_per_s)
    return result
