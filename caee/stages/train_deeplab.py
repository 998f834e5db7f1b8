"""Stage 6: train DeepLab (LargeFOV / ASPP) on the pseudo labels, then segment and evaluate.

Input:  data.root (images of train_deeplab.split, "" = pseudo_labels.split or data.cam_split;
        images and ground truth of train_deeplab.eval_split, "" = data.val_split);
        train_deeplab.label_dir ("" = <work_dir>/pseudo_labels, or pseudo_labels.out_dir): one
        <id>.png label map per training image (0 = background, 1..C, 255 = ignore), checked first;
        train_deeplab.net.pretrained (ImageNet weights) or train_deeplab.init (a checkpoint).
Output: <work_dir>/train_deeplab/
          model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, label_histogram.json
          pred_<split>/<id>.png          predictions (VOC palette)
          pred_<split>_crf/<id>.png      with train_deeplab.test_crf=true
          results_<split>.json           mIoU / per-class IoU; scales, flip, CRF, init, label source

    caee train-deeplab --config configs/voc/r38.yaml
    torchrun --nproc_per_node 4 -m caee train-deeplab --config configs/voc/r38.yaml
    # re-evaluate a trained model.pth with other test settings (no training):
    caee train-deeplab --config configs/voc/r38.yaml train_deeplab.eval_only=true \\\\
        'train_deeplab.test_scales=[0.5,0.75,1,1.25,1.5]' train_deeplab.test_flip=true train_deeplab.test_crf=true

Training images: every image of ``train_deeplab.split`` ("" = ``pseudo_labels.split``, itself
defaulting to ``data.cam_split``: the images the pseudo labels were made for). The label folder
must hold ``<id>.png`` for each of them; it is checked before training (existence, size = image
size, values in {0..C, 255}) and a missing or bad file stops the stage: train on a subset by
giving a split list (``split`` may be a .txt path). For an upper bound point ``label_dir`` at
ground truth (e.g. ``<root>/SegmentationClassAug``) and set ``split`` to the images it covers.

Loss: cross-entropy over the C+1 classes of the logits upsampled bilinearly to the crop size,
255 ignored, averaged over the labelled pixels of the batch (a batch with none gives 0, not NaN).
Augmentation: the shared train transform (random long-side resize, flip, crop padded with 255).
Schedule: poly SGD, head (LargeFOV / ASPP) at ``head_lr_mult`` x lr; bf16, DDP and resume from
``last.pth`` come from the engine. Afterwards :mod:`caee.method.segment` segments ``eval_split`` ("" =
``data.val_split``) and writes ``results_<split>.json``. ``eval_only: true`` skips training.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from caee.core import distributed, records

from caee.stages import predictions as segment
from caee.core.config import Config, config_to_dict, expand_work_dir
from caee.data import SegmentationDataset, SplitIndex, dataset_class_names, ensure_dataset, load_split
from caee.data.transforms import build_train_transform
from caee.engine.trainer import StepContext, TrainTask, fit
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, write_json
from caee.core.logs import setup_logging
from caee.models.deeplab import DeepLab, build_deeplab
from caee.core.layout import Layout
from caee.core.parallel import available_cpus, run_pool, workers_for
from caee.stages import table
from caee.stages.common import resume_check, stage_settings
from caee.stages.setup import start_stage
from caee.weights.checkpoints import init_weights_from

logger = logging.getLogger(__name__)

STAGE = "train_deeplab"
IGNORE = 255
_SHOWN = 5  # bad files named in an error message


# ---------------------------------------------------------------- label check


def _check_one(item: tuple[str, str, int]) -> tuple[str | None, np.ndarray | None]:
    """(problem message or None, (256,) pixel counts per value or None) for one label file."""
    image_path, label_path, num_classes = item
    if not os.path.isfile(label_path):
        return f"{label_path}: missing", None
    try:
        label = load_label_png(label_path)
        with Image.open(image_path) as im:
            w, h = im.size
    except CaeeError as e:
        return str(e), None
    except OSError as e:
        return f"{image_path}: unreadable image ({e})", None
    if label.shape != (h, w):
        return (f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from its image {image_path} "
                f"({w}x{h})"), None
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes + 1:IGNORE]) + num_classes + 1
    if bad.size:
        return f"{label_path}: values {bad[:8].tolist()} outside 0..{num_classes} and 255", None
    return None, counts


def check_label_dir(index: SplitIndex, label_dir: str | os.PathLike, workers: int | None = None) -> np.ndarray:
    """Check ``label_dir/<id>.png`` of every image of ``index`` and count pixels per class.

    Every file must exist, be the size of its image and hold only 0..C and 255. Files are read on
    a process pool (``workers``: None = all cores), each rank of a torchrun job checking its share.
    Returns (C+2,) int64: pixels of classes 0..C, then of 255 (ignore), summed over all ranks.
    Raises CaeeError naming the first bad files.
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise CaeeError(f"label folder {label_dir} does not exist (train_deeplab.label_dir); make the pseudo labels "
                        "first (make_pseudo_labels.py) or point it at a ground-truth folder")
    c = index.num_classes
    items = [(str(index.image_path(i)), str(label_dir / f"{image_id}.png"), c) for i, image_id in enumerate(index.ids)]
    mine = distributed.shard(items)
    if workers is None:
        workers = max(1, available_cpus() // distributed.world_size())
    results = run_pool(_check_one, mine, workers)
    problems = [msg for msg, _ in results if msg is not None]
    hist = np.zeros(256, np.int64)
    for _, counts in results:
        if counts is not None:
            hist += counts
    summary = torch.tensor([len(problems)] + hist[:c + 1].tolist() + [int(hist[IGNORE])], dtype=torch.float64)
    summary = distributed.all_reduce_sum(summary.to(_reduce_device())).cpu()
    total_bad = int(summary[0])
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise CaeeError(f"{len(problems)} of {len(mine)} label maps in {label_dir} for split '{index.split}' are "
                        f"missing or bad:\n  {shown}{more}\nregenerate them (make_pseudo_labels.py) or choose a split "
                        "the folder covers (train_deeplab.split)")
    if total_bad:
        raise CaeeError(f"{total_bad} label maps in {label_dir} are missing or bad (reported by another process)")
    return summary[1:].round().to(torch.int64).numpy()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only
    if distributed.world_size() > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def log_histogram(hist: np.ndarray, class_names: list[str]) -> dict:
    """Log pixels per class (background, classes, ignore); return them as {name: pixels}."""
    names = ["background"] + list(class_names) + ["ignore (255)"]
    total = max(int(hist.sum()), 1)
    table = {name: int(n) for name, n in zip(names, hist)}
    width = max(len(n) for n in names)
    lines = [f"  {name:<{width}} {n:>14,d} {100 * n / total:6.2f} %" for name, n in table.items()]
    logger.info("label pixels per class (%s pixels):\n%s", f"{total:,d}", "\n".join(lines))
    return table


# ---------------------------------------------------------------- training


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of logits (B, C+1, h, w) upsampled to target (B, H, W) long (255 = ignore).

    Averaged over labelled pixels; a batch without any gives a zero loss (still differentiable).
    Returns (loss, pixel accuracy on the labelled pixels, NaN when there are none).
    """
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = target != IGNORE
    n = int(valid.sum())
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / max(n, 1)
    acc = float((logits.argmax(1)[valid] == target[valid]).float().mean()) if n else float("nan")
    return loss, acc


class DeeplabTask(TrainTask):
    def __init__(self, model: DeepLab, meta: dict):
        self.model = model
        self.meta = meta

    def head_modules(self):
        return self.model.head_modules()

    def train_step(self, model, batch, ctx: StepContext):
        images = ctx.to_device(batch["image"], image=True)
        target = ctx.to_device(batch["mask"])
        loss, acc = segmentation_loss(model(images), target)
        return loss, {"pixel_acc": acc}

    def export(self) -> dict:
        return dict(self.meta)


def _init_description(cfg: Config) -> str:
    tc = cfg.train_deeplab
    if tc.init:
        return f"checkpoint {tc.init}"
    if tc.net.pretrained:
        return f"imagenet {tc.net.pretrained}"
    return "random"


def resolve_inputs(cfg: Config) -> tuple[str, Path]:
    """(training split, label folder) after applying the defaults."""
    tc = cfg.train_deeplab
    split = tc.split or cfg.pseudo_labels.split or cfg.data.cam_split
    label_dir = table.stage(STAGE).input(cfg, "labels")
    return split, label_dir


def settings_from_config(cfg: Config) -> segment.TestSettings:
    """The test settings of ``cfg.train_deeplab`` (+ ``cfg.crf``); checks pydensecrf when test_crf is on."""
    tc = cfg.train_deeplab
    if any(s <= 0 for s in tc.test_scales):
        raise CaeeError(f"config key 'train_deeplab.test_scales' must be positive, got {tc.test_scales}")
    crf = cfg.crf if tc.test_crf else None
    if crf is not None:
        segment.require_crf()
    return segment.TestSettings(list(tc.test_scales), tc.test_flip, crf, tc.amp, cfg.data.num_workers,
                                workers_for(cfg.crf.workers), cfg.eval.workers or None, cfg.eval.allow_missing)


def evaluate_only(cfg: Config) -> dict | None:
    """Inference only: segment ``eval_split`` with ``train_deeplab.weights`` and evaluate.

    Leaves the training run's ``config.yaml`` alone; the test settings go into the results JSON.
    """
    tc = cfg.train_deeplab
    device = distributed.resolve_device(cfg.device)
    distributed.init_distributed(device)
    out_dir = Layout(cfg).stage_dir(STAGE)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir)
    ensure_dataset(cfg.data)
    weights = Path(tc.weights) if tc.weights else Layout(cfg).model(STAGE)
    names = dataset_class_names(cfg.data)
    model, meta = segment.load_deeplab(weights, cfg, len(names))
    model.to(device)
    index = load_split(cfg.data, tc.eval_split or cfg.data.val_split)
    info = {"weights": str(weights), "init": meta.get("init", "unknown"),
            "label_source": meta.get("label_source", "unknown"), "head": model.head_name,
            "backbone": meta.get("net", {}).get("backbone", tc.net.backbone), "eval_only": True}
    return segment.segment_split(model, index, out_dir, settings_from_config(cfg), device, info)


def main(cfg: Config) -> dict | None:
    """Train (unless ``eval_only``), then segment and evaluate; returns the results (rank 0)."""
    cfg = expand_work_dir(cfg)
    tc = cfg.train_deeplab
    if tc.eval_only:
        return evaluate_only(cfg)
    t0 = time.perf_counter()
    recorded = stage_settings(cfg, "train_deeplab")
    env = start_stage(cfg, STAGE, before_write=resume_check(cfg, "train_deeplab", recorded))
    settings = settings_from_config(cfg)  # bad test settings fail before training, not after
    ensure_dataset(cfg.data)
    names = dataset_class_names(cfg.data)
    split, label_dir = resolve_inputs(cfg)
    index = load_split(cfg.data, split)
    workers = cfg.eval.workers or None
    hist = check_label_dir(index, label_dir, workers)
    table = log_histogram(hist, names)
    label_source = f"{'pseudo labels' if not tc.label_dir else 'labels'} {label_dir}"
    if distributed.is_main():
        write_json(env.out_dir / "label_histogram.json", {"label_dir": str(label_dir), "split": split,
                                                          "num_images": len(index), "pixels": table})

    torch.manual_seed(tc.seed)  # the head's initial weights (the engine seeds only after the model exists)
    model = build_deeplab(tc.net, len(names) + 1, tc.head, tc.head_channels, tc.head_dilations, tc.head_dropout)
    if tc.init:
        init_weights_from(model, tc.init, arch=f"deeplab/{tc.net.backbone} ({tc.head})", config_key="train_deeplab.init")
    model.backbone.freeze(bool(tc.net.pretrained or tc.init))
    meta = {"arch": "deeplab", "net": dataclasses.asdict(tc.net), "head": tc.head,
            "head_channels": model.head.fc6.out_channels if tc.head == "largefov" else 0,
            "head_dilations": list(tc.head_dilations), "head_dropout": tc.head_dropout,
            "num_classes": len(names), "class_names": names, "init": _init_description(cfg),
            "label_source": label_source, "train_split": split}
    logger.info("DeepLab %s on %s (width %g, output stride %d, init: %s): %d images of %s, labels %s, "
                "batch %d, %d epochs, lr %g", tc.head, tc.net.backbone, tc.net.width, model.output_stride,
                meta["init"], len(index), split, label_dir, tc.batch_size, tc.epochs, tc.lr)
    dataset = SegmentationDataset(index, label_dir, build_train_transform(tc))
    fitted = fit(DeeplabTask(model, meta), dataset, tc, env.out_dir, env.device, config_to_dict(cfg),
                 cfg.data.num_workers, "train_deeplab")

    eval_index = load_split(cfg.data, tc.eval_split or cfg.data.val_split)
    info = {"weights": str(fitted.model_path), "init": meta["init"], "label_source": label_source,
            "train_split": split, "head": tc.head, "backbone": tc.net.backbone, "steps": fitted.steps,
            "train_images_per_s": fitted.images_per_s, "eval_only": False,
            "settings": recorded}
    results = segment.segment_split(model, eval_index, env.out_dir, settings, env.device, info)
    if distributed.is_main():
        records.finish(env.out_dir, records.read(env.out_dir), "all", time.perf_counter() - t0, fitted.images_per_s)
    return results
