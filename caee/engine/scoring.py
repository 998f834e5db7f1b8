"""mIoU of a folder of CAMs (background-threshold sweep) or of label PNGs against the ground truth.

docs/METHOD.md §8: one confusion matrix accumulated over all images of a split, C + 1 classes,
ground truth 255 ignored. CAM folders are scored at every threshold of a sweep in ONE pass over the
files (:class:`caee.core.metrics.ThresholdSweep`); the best threshold (an oracle) and the value at a
threshold fixed in advance are both reported. Label folders (CRF labels, pseudo labels, network
predictions) are scored as they are; prediction pixels equal to 255 (unsure) are left out and
their share is reported.

Files are read and scored in a process pool: each worker accumulates the images of its chunks and
returns its sweep / confusion matrix, which are summed. A missing, unreadable or wrongly sized
prediction (or missing ground truth) is an error naming the image unless ``allow_missing``, in
which case such images are left out of the scores and counted.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from caee.core import records
from caee.core.parallel import available_cpus, run_pool
from caee.core.errors import CaeeError
from caee.core.io import load_cam_npz, load_label_png
from caee.core.metrics import IGNORE, ThresholdSweep, confusion_matrix, iou_from_confusion

logger = logging.getLogger(__name__)

Kind = Literal["cam", "label"]
# why an image was left out (allow_missing); anything else is always an error
PROBLEMS = ("missing", "unreadable", "size_mismatch", "no_gt")


# ---------------------------------------------------------------- per-image work


class _Skip(Exception):
    """An image that cannot be scored: ``reason`` is one of PROBLEMS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Partial:
    """What one worker returns for its chunk of images."""
    acc: ThresholdSweep | np.ndarray
    skipped: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PROBLEMS})
    ignored_pred: int = 0     # prediction pixels equal to 255 (label folders)
    scored_pixels: int = 0


def _ground_truth(index, i: int) -> np.ndarray:
    path = index.eval_mask_path(i)
    if path is None or not Path(path).is_file():
        raise _Skip("no_gt", f"ground truth of image {index.ids[i]} not found: {path} (does split "
                             f"'{index.split}' have ground truth in data.eval_mask_dir?)")
    return load_label_png(path)


def _check_size(image_id: str, path: Path, shape: tuple, gt: np.ndarray, what: str) -> None:
    """``what``: the file being scored ("CAMs", "label map"): it is that file's size that is wrong."""
    if tuple(shape) != gt.shape:
        raise _Skip("size_mismatch", f"{path}: {what} of size {shape[1]}x{shape[0]} for image {image_id}, but its "
                                     f"ground truth is {gt.shape[1]}x{gt.shape[0]}; regenerate the {what}")


def _score_cam(folder: Path, index, i: int, acc: ThresholdSweep, part: _Partial) -> None:
    gt = _ground_truth(index, i)
    path = folder / f"{index.ids[i]}.npz"
    if not path.is_file():
        raise _Skip("missing", f"CAM of image {index.ids[i]} not found: {path}")
    try:
        keys, cams = load_cam_npz(path, index.num_classes, dtype=None)  # float16 stays float16: the sweep compares exactly
    except CaeeError as e:
        raise _Skip("unreadable", f"image {index.ids[i]}: {e}") from None
    _check_size(index.ids[i], path, cams.shape[1:], gt, "CAMs")
    acc.update(gt, keys, cams)


def _score_label(folder: Path, index, i: int, acc: np.ndarray, part: _Partial) -> None:
    gt = _ground_truth(index, i)
    path = folder / f"{index.ids[i]}.png"
    if not path.is_file():
        raise _Skip("missing", f"label map of image {index.ids[i]} not found: {path}")
    try:
        pred = load_label_png(path)
    except CaeeError as e:
        raise _Skip("unreadable", f"image {index.ids[i]}: {e}") from None
    _check_size(index.ids[i], path, pred.shape, gt, "label map")
    unsure = pred == IGNORE
    if unsure.any():
        part.ignored_pred += int(np.count_nonzero(unsure & (gt != IGNORE)))
        gt = np.where(unsure, IGNORE, gt).astype(np.uint8)
    part.scored_pixels += int(np.count_nonzero(gt != IGNORE))
    acc += confusion_matrix(gt, pred, index.num_classes)


def _run_chunk(kind: Kind, folder: Path, index, thresholds: np.ndarray | None, allow_missing: bool,
               chunk: Sequence[int]) -> _Partial:
    n = index.num_classes
    acc = ThresholdSweep(n, thresholds) if kind == "cam" else np.zeros((n + 1, n + 1), np.int64)
    part = _Partial(acc)
    score = _score_cam if kind == "cam" else _score_label
    for i in chunk:
        try:
            score(folder, index, int(i), acc, part)
        except _Skip as s:
            if not allow_missing:
                raise CaeeError(f"{s} (set eval.allow_missing=true to skip such images)") from None
            part.skipped[s.reason].append(index.ids[int(i)])
        except CaeeError as e:
            raise CaeeError(f"image {index.ids[int(i)]} in {folder}: {e}") from None
    return part


def _accumulate(kind: Kind, folder: Path, index, thresholds, allow_missing: bool,
                workers: int | None) -> _Partial:
    folder = Path(folder)
    if not folder.is_dir():
        raise CaeeError(f"folder to evaluate does not exist: {folder} (config key 'eval.dir')")
    if index.eval_mask_dir is None and not allow_missing:
        raise CaeeError(f"split '{index.split}' has no ground-truth folder (data.eval_mask_dir under data.root)")
    n_workers = _num_workers(workers, len(index.ids))
    chunks = np.array_split(np.arange(len(index.ids)), max(1, min(len(index.ids), n_workers * 4)))
    job = functools.partial(_run_chunk, kind, folder, index, thresholds, allow_missing)
    parts = run_pool(job, [c.tolist() for c in chunks], workers=n_workers, chunksize=1)
    total = parts[0]
    for p in parts[1:]:
        if kind == "cam":
            total.acc.merge(p.acc)
        else:
            total.acc += p.acc
        for reason in PROBLEMS:
            total.skipped[reason] += p.skipped[reason]
        total.ignored_pred += p.ignored_pred
        total.scored_pixels += p.scored_pixels
    return total


def _num_workers(workers: int | None, n_items: int) -> int:
    n = available_cpus() if not workers else int(workers)
    return max(1, min(n, n_items))


# ---------------------------------------------------------------- results


def _score_dict(res: dict) -> dict:
    """An iou_from_confusion dict with plain lists."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}


def _skipped_summary(part: _Partial) -> dict:
    return {reason: ids for reason, ids in part.skipped.items() if ids}


def _base_result(kind: Kind, folder: Path, index, part: _Partial) -> dict:
    num_skipped = sum(len(v) for v in part.skipped.values())
    return {
        "summary": {"kind": kind, "source": str(folder), "split": index.split, "num_images": len(index.ids),
                    "num_evaluated": len(index.ids) - num_skipped, "num_missing": num_skipped},
        "classes": ["background"] + list(index.class_names),
        "skipped": _skipped_summary(part),
        "info": folder_info(folder),
    }


def sweep_thresholds(thresholds: Sequence[float], threshold: float) -> list[float]:
    """The thresholds to sweep: ``thresholds`` plus the fixed ``threshold`` when it is not among them."""
    out = [float(t) for t in thresholds]
    if not any(math.isclose(t, threshold, abs_tol=1e-9) for t in out):
        out.append(float(threshold))
    return out


def evaluate_cam_dir(cam_dir: str | Path, index, thresholds: Sequence[float], threshold: float,
                     workers: int | None = None, allow_missing: bool = False) -> dict:
    """Score ``<cam_dir>/<id>.npz`` for every image of ``index`` (a SplitIndex) in one pass.

    thresholds: the background thresholds swept (``threshold`` is added when missing);
    threshold: the value fixed in advance. Returns a dict with ``summary`` (miou = best of the
    sweep, best_threshold, miou_at_threshold, threshold, thresholds, split, num_images,
    num_evaluated, num_missing, source, kind), ``best`` and ``fixed`` (per-class iou / precision /
    recall lists, background first, plus the confusion matrix), ``sweep`` (threshold, miou pairs),
    ``classes``, ``skipped`` (ids by reason) and ``info`` (the folder's recorded settings).
    Ready for JSON: undefined scores (NaN: a class absent from GT and prediction) are None.
    """
    folder = Path(cam_dir)
    ts = sweep_thresholds(thresholds, threshold)
    part = _accumulate("cam", folder, index, np.asarray(ts), allow_missing, workers)
    sweep: ThresholdSweep = part.acc  # type: ignore[assignment]
    results = sweep.results()
    confs = sweep.confusion_matrices()
    best_i = next(i for i, t in enumerate(ts) if t == sweep.best()["threshold"])
    fixed_i = next(i for i, t in enumerate(ts) if math.isclose(t, threshold, abs_tol=1e-9))
    best = dict(_score_dict(results[best_i]), confusion=confs[best_i].tolist())
    fixed = dict(_score_dict(results[fixed_i]), confusion=confs[fixed_i].tolist())
    out = _base_result("cam", folder, index, part)
    out["summary"].update(miou=best["miou"], best_threshold=best["threshold"], miou_at_threshold=fixed["miou"],
                          threshold=float(threshold), thresholds=ts)
    out.update(best=best, fixed=fixed, sweep=[{"threshold": r["threshold"], "miou": r["miou"]} for r in results])
    return to_jsonable(out)


def evaluate_label_dir(label_dir: str | Path, index, workers: int | None = None,
                       allow_missing: bool = False) -> dict:
    """Score the label maps ``<label_dir>/<id>.png`` of every image of ``index`` (a SplitIndex).

    Prediction pixels equal to 255 are left out (their share is ``summary.ignored_prediction``).
    Returns ``summary`` (miou, split, num_images, num_evaluated, num_missing, source, kind,
    ignored_prediction), ``result`` (per-class iou / precision / recall, confusion), ``classes``,
    ``skipped`` and ``info``. Undefined scores are None, as in :func:`evaluate_cam_dir`.
    """
    folder = Path(label_dir)
    part = _accumulate("label", folder, index, None, allow_missing, workers)
    conf: np.ndarray = part.acc  # type: ignore[assignment]
    res = dict(_score_dict(iou_from_confusion(conf)), confusion=conf.tolist())
    out = _base_result("label", folder, index, part)
    seen = part.scored_pixels + part.ignored_pred
    out["summary"].update(miou=res["miou"], ignored_prediction=part.ignored_pred / seen if seen else 0.0)
    out["result"] = res
    return to_jsonable(out)


def detect_kind(folder: str | Path) -> Kind:
    """``cam`` for a folder of .npz files, ``label`` for one of .png files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaeeError(f"folder to evaluate does not exist: {folder} (config key 'eval.dir')")
    has_npz = next(folder.glob("*.npz"), None) is not None
    has_png = next(folder.glob("*.png"), None) is not None
    if has_npz and not has_png:
        return "cam"
    if has_png and not has_npz:
        return "label"
    what = "both .npz and .png files" if has_npz else "no .npz or .png files"
    raise CaeeError(f"{folder} holds {what}; set eval.kind to cam or label")


def evaluate_dir(folder: str | Path, index, eval_cfg, kind: str = "auto") -> dict:
    """Score ``folder`` as CAMs or labels (``kind`` auto: by its files) with an EvalConfig's settings."""
    kind = detect_kind(folder) if kind == "auto" else kind
    workers = eval_cfg.workers or None
    if kind == "cam":
        return evaluate_cam_dir(folder, index, eval_cfg.thresholds, eval_cfg.threshold, workers,
                                eval_cfg.allow_missing)
    if kind == "label":
        return evaluate_label_dir(folder, index, workers, eval_cfg.allow_missing)
    raise CaeeError(f"config key 'eval.kind' must be auto, cam or label, got {kind!r}")


# ---------------------------------------------------------------- settings recorded with a folder


def folder_info(folder: str | Path) -> dict:
    """How a folder was made, from its record (caee/core/records.py): the CAM settings of a CAM
    folder, the CRF settings and alpha of a CRF label folder, the CRF switch of pseudo labels.
    ``done``: whether the record says a part is complete; ``record``: its path (None without one)."""
    folder = Path(folder)
    try:
        record = records.read(folder)
    except CaeeError as e:
        logger.warning("%s", e)
        record = None
    info: dict = {"record": str(folder / records.RECORD) if record else None,
                  "done": bool(record and record["complete"])}
    settings = record["settings"] if record else {}
    if "cam.scales" in settings:
        info.update(scales=settings["cam.scales"], flip=settings.get("cam.flip"), cam_source=settings.get("cam.source"))
    if "crf.alpha" in settings:
        info["crf_alpha"] = settings["crf.alpha"]
        info["crf"] = {k[4:]: v for k, v in settings.items() if k.startswith("crf.") and k != "crf.alpha"}
    elif "pseudo_labels.crf" in settings:
        info["crf"] = settings["pseudo_labels.crf"]
    return info


# ---------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return f"{'-':>5}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def _describe_settings(kind: str, info: dict) -> str:
    parts = []
    if info.get("scales") is not None:
        parts.append(f"scales {info['scales']}, flip {'on' if info.get('flip') else 'off'}"
                     f"{', CAMs of the ' + str(info['cam_source']) if info.get('cam_source') else ''}")
    crf = info.get("crf")
    if info.get("crf_alpha") is not None:
        extra = ", ".join(f"{k} {v}" for k, v in crf.items() if k != "workers") if isinstance(crf, dict) else ""
        parts.append(f"CRF on (background alpha {info['crf_alpha']:g}{', ' + extra if extra else ''})")
    elif isinstance(crf, bool):
        parts.append(f"CRF {'on' if crf else 'off'}")
    elif kind == "cam":
        parts.append("CRF off")
    else:
        parts.append("CRF not recorded")
    if info.get("record") is None:
        parts.append("(no record.json in the folder to tell more)")
    return "; ".join(parts)


def _table(classes: list[str], columns: list[tuple[str, dict]]) -> list[str]:
    width = max(12, max(len(c) for c in classes) + 1)
    head = f"{'class':<{width}}" + "".join(f" | {name:^19}" for name, _ in columns)
    sub = f"{'':<{width}}" + " | {:>5} {:>6} {:>6}".format("IoU", "prec", "rec") * len(columns)
    lines = [head, sub, "-" * len(sub)]
    for c, name in enumerate(classes):
        row = f"{name:<{width}}"
        for _, res in columns:
            row += f" | {_pct(res['iou'][c])} {_pct(res['precision'][c]):>6} {_pct(res['recall'][c]):>6}"
        lines.append(row)
    lines.append("-" * len(sub))
    lines.append(f"{'mIoU':<{width}}" + "".join(f" | {_pct(res['miou'])} {'':>13}" for _, res in columns))
    return lines


def format_report(result: dict) -> str:
    """The human-readable report of an :func:`evaluate_cam_dir` / :func:`evaluate_label_dir` result."""
    s = result["summary"]
    lines = [f"evaluating {s['source']} ({s['kind']}s) on split '{s['split']}': {s['num_evaluated']} of "
             f"{s['num_images']} images",
             _describe_settings(s["kind"], result.get("info", {}))]
    if not result.get("info", {}).get("done", True):
        lines.append("warning: the folder's record does not say it is complete: the stage that writes it may not "
                     "have finished")
    if s["num_missing"]:
        detail = ", ".join(f"{len(ids)} {reason} (first: {ids[0]})" for reason, ids in result["skipped"].items())
        lines.append(f"skipped {s['num_missing']} images (eval.allow_missing): {detail}")
    if s["kind"] == "cam":
        ts = s["thresholds"]
        lines.append(f"background thresholds: {len(ts)} values {min(ts):g}..{max(ts):g}; fixed threshold "
                     f"{s['threshold']:g}")
        lines += _table(result["classes"], [(f"best t={s['best_threshold']:g}", result["best"]),
                                            (f"fixed t={s['threshold']:g}", result["fixed"])])
        lines.append(f"mIoU {_pct(s['miou']).strip()} at the best threshold {s['best_threshold']:g} (an oracle); "
                     f"{_pct(s['miou_at_threshold']).strip()} at the fixed threshold {s['threshold']:g}")
    else:
        if s.get("ignored_prediction"):
            lines.append(f"prediction 255 (unsure) on {100 * s['ignored_prediction']:.1f}% of the labelled pixels: "
                         "left out")
        lines += _table(result["classes"], [("labels", result["result"])])
        lines.append(f"mIoU {_pct(s['miou']).strip()}")
    return "\n".join(lines)


def to_jsonable(obj):
    """``obj`` with NaN / inf floats replaced by None (strict JSON) and numpy scalars made plain."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
