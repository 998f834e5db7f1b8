"""DeepLab's predictions of a split: prediction PNGs (with and without the dense CRF) and their mIoU.

Used after training by :mod:`caee.stages.train_deeplab` and by its inference-only mode
(``train_deeplab.eval_only: true``) to re-evaluate a trained ``model.pth`` with other test settings::

    caee train-deeplab --config X train_deeplab.eval_only=true 'train_deeplab.test_scales=[0.5,1,1.5,2]' \
        train_deeplab.test_flip=true train_deeplab.test_crf=true

Outputs under ``<work_dir>/train_deeplab/`` (its record covers them):

    pred_<split>/<id>.png        argmax of the fused probabilities (caee.method.segment; VOC palette, 0..C)
    pred_<split>_crf/<id>.png    the same after the dense CRF (only with test_crf)
    results_<split>.json         mIoU and per-class IoU without (and with) CRF, with the test
                                 settings (scales, flip, CRF), init, label source and weights
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from caee.core import distributed
from caee.core.config import Config, CrfConfig
from caee.core.errors import CaeeError, not_found
from caee.core.io import save_label_png, write_json
from caee.core.layout import predictions_name, results_name
from caee.core.logs import show_progress
from caee.core.parallel import run_pool
from caee.data import InferenceDataset, SplitIndex, collate_list, normalize_image
from caee.engine.scoring import evaluate_label_dir, format_report, to_jsonable
from caee.method.crf import crf_labels_from_scores, dense_crf
from caee.method.segment import predict
from caee.models.backbone import net_from_meta
from caee.models.deeplab import build_deeplab
from caee.weights.checkpoints import checkpoint_meta, load_model_weights

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TestSettings:
    scales: list[float]
    flip: bool
    crf: CrfConfig | None       # None = no CRF
    amp: bool = True            # bf16 autocast on CUDA
    num_workers: int = 2        # DataLoader workers reading images
    crf_workers: int | None = None  # CRF processes; None = all cores
    eval_workers: int | None = None  # scoring processes; None = all cores
    allow_missing: bool = False      # images without ground truth are skipped (else an error)


def _crf_job(crf_dir: Path, params: CrfConfig):
    def job(item: tuple[str, np.ndarray, np.ndarray]) -> None:
        image_id, image, probs = item
        save_label_png(crf_dir / f"{image_id}.png", crf_labels_from_scores(image, probs.astype(np.float32), params))
    return job


def segment_images(model: nn.Module, index: SplitIndex, pred_dir: Path, crf_dir: Path | None,
                   settings: TestSettings, device: torch.device) -> int:
    """Write ``pred_dir/<id>.png`` (and ``crf_dir/<id>.png``) for this rank's share of ``index``.

    CRF jobs are collected in chunks and run on a process pool while the model waits (the CRF is
    CPU-bound and pydensecrf is single-threaded). Returns the number of images done here.
    """
    model.eval()
    mine = distributed.shard(list(range(len(index))))
    sub = index.subset(mine)
    loader = DataLoader(InferenceDataset(sub), batch_size=1, collate_fn=collate_list,
                        num_workers=settings.num_workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and settings.amp) \
        else nullcontext()
    job = _crf_job(crf_dir, settings.crf) if crf_dir is not None and settings.crf is not None else None
    chunk = 8 * (settings.crf_workers or 8)
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []
    for (item,) in tqdm(loader, desc=f"segment {index.split}", disable=not show_progress(),
                        dynamic_ncols=True, leave=False):
        x = normalize_image(item["image"].to(device))
        with autocast:
            probs = predict(model, x, settings.scales, settings.flip)
        save_label_png(pred_dir / f"{item['id']}.png", probs.argmax(0).to(torch.uint8).cpu().numpy())
        if job is not None:
            pending.append((item["id"], item["image"].numpy(), probs.half().cpu().numpy()))
            if len(pending) >= chunk:
                run_pool(job, pending, settings.crf_workers)
                pending = []
    if job is not None and pending:
        run_pool(job, pending, settings.crf_workers)
    return len(sub)


def evaluate_predictions(index: SplitIndex, pred_dir: Path, workers: int | None = None,
                         allow_missing: bool = False) -> dict:
    """mIoU of ``pred_dir/<id>.png`` against each image's ``eval_mask_path`` through
    :func:`caee.engine.scoring.evaluate_label_dir` (one confusion matrix over all images, 255 ignored;
    images without ground truth are an error unless ``allow_missing``). Logs the per-class table."""
    res = evaluate_label_dir(pred_dir, index, workers, allow_missing)
    logger.info("%s", format_report(res))
    summary, scores = res["summary"], res["result"]
    return to_jsonable({"miou": summary["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                        "iou": dict(zip(res["classes"], scores["iou"])), "num_evaluated": summary["num_evaluated"],
                        "num_missing": summary["num_missing"], "skipped": res["skipped"], "pred_dir": str(pred_dir)})


def segment_split(model: nn.Module, index: SplitIndex, out_dir: Path, settings: TestSettings,
                  device: torch.device, info: dict) -> dict | None:
    """Predict, (CRF,) evaluate and write ``out_dir/results_<split>.json`` (a split given as a
    ``.txt`` list is named by the file's stem).

    ``info`` is copied into the results (init, label source, weights, ...). Returns the results on
    rank 0, None on the other ranks.
    """
    split = index.split
    pred_dir = out_dir / predictions_name(split)
    crf_dir = out_dir / predictions_name(split, crf=True) if settings.crf is not None else None
    logger.info("segmenting %d images of %s: scales %s, flip %s, CRF %s", len(index), split, settings.scales,
                settings.flip, "on" if crf_dir else "off")
    segment_images(model, index, pred_dir, crf_dir, settings, device)
    distributed.barrier()
    if not distributed.is_main():
        return None
    results = {"split": split, "num_images": len(index), "scales": list(settings.scales),
               "multi_scale": len(settings.scales) > 1 or settings.scales[0] != 1.0, "flip": settings.flip,
               "crf": crf_dir is not None, **info}
    results["without_crf"] = evaluate_predictions(index, pred_dir, settings.eval_workers, settings.allow_missing)
    if crf_dir is not None:
        results["with_crf"] = evaluate_predictions(index, crf_dir, settings.eval_workers, settings.allow_missing)
        results["crf_params"] = dataclasses.asdict(settings.crf)
    results["miou"] = results["with_crf" if crf_dir else "without_crf"]["miou"]
    write_json(out_dir / results_name(split), results)
    ms = "multi-scale " + str(settings.scales) if results["multi_scale"] else "single-scale"
    pct = lambda r: "n/a" if r["miou"] is None else f"{100 * r['miou']:.2f}"  # noqa: E731
    logger.info("DeepLab on %s (%d images, %d evaluated), %s, flip %s: mIoU %s without CRF%s",
                split, len(index), results["without_crf"]["num_evaluated"], ms, "on" if settings.flip else "off",
                pct(results["without_crf"]), f", {pct(results['with_crf'])} with CRF" if crf_dir else "")
    return results


# ---------------------------------------------------------------- loading a trained model


def require_crf() -> None:
    """Fail now, not after training and inference, when the CRF is asked for but pydensecrf is missing."""
    dense_crf(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1, 1), np.float32), CrfConfig(iterations=1))


def load_deeplab(path: str | Path, cfg: Config, num_classes: int) -> tuple[nn.Module, dict]:
    """A trained DeepLab from our ``model.pth``: the architecture recorded in the file wins over
    ``cfg.train_deeplab``. ``num_classes`` = C (foreground). Returns (model, the file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CaeeError(f"DeepLab weights {not_found(path)}; train first (train_deeplab.py) or set "
                        "train_deeplab.weights")
    meta = checkpoint_meta(path)
    tc = cfg.train_deeplab
    net = net_from_meta(meta, tc.net, path)
    if meta.get("num_classes", num_classes) != num_classes:
        raise CaeeError(f"{path} was trained with {meta['num_classes']} classes but the dataset has {num_classes}")
    model = build_deeplab(net, num_classes + 1, meta.get("head", tc.head), meta.get("head_channels", tc.head_channels),
                          meta.get("head_dilations", tc.head_dilations), meta.get("head_dropout", tc.head_dropout))
    load_model_weights(model, path, arch=f"deeplab/{net.backbone} ({model.head_name})", config_key="train_deeplab.weights")
    return model, meta
