"""The pipeline's results table: every stage output measured against ground truth, with how it was made.

Writes ``<work_dir>/results.json`` and ``results.md`` and, for a few images, ``fig3_cams.png``
(image | GT | OC CAM | CGNet CAM) and ``fig4_segmentation.png`` (image | GT | pseudo label | DeepLab).
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

from caee.core.config import Config, expand_work_dir
from caee.data import ensure_dataset, load_split
from caee.engine.scoring import evaluate_cam_dir, evaluate_label_dir
from caee.core.io import load_cam_npz, load_image, load_label_png, write_text
from caee.core.layout import Layout, crf_dir
from caee.core.pictures import compare_cams, compare_labels, save_picture
from caee.pipeline.runner import step_timings
from caee.stages.table import STAGES, control_config

logger = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cam_row(name: str, folder: Path, index, cfg: Config, how: str) -> dict | None:
    if not folder.is_dir():
        return None
    r = evaluate_cam_dir(folder, index, cfg.eval.thresholds, cfg.eval.threshold, cfg.eval.workers or None)["summary"]
    return {"output": name, "miou": r["miou"], "best_threshold": r["best_threshold"],
            "miou_at_threshold": r["miou_at_threshold"], "threshold": r["threshold"], "split": index.split,
            "num_images": r["num_evaluated"], "folder": str(folder), "how": how}


def _label_row(name: str, how: str, folder: Path, index, cfg: Config) -> dict | None:
    if not folder.is_dir():
        return None
    r = evaluate_label_dir(folder, index, cfg.eval.workers or None)["summary"]
    return {"output": name, "miou": r["miou"], "split": index.split, "num_images": r["num_evaluated"],
            "folder": str(folder), "how": how}


def _deeplab_row(cfg: Config) -> dict | None:
    path = Layout(cfg).deeplab_results()
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    scales = "multi-scale " + str(r["scales"]) if r["multi_scale"] else "single-scale"
    how = (f"DeepLab ({r['head']}, {r['backbone']}, init: {r['init']}) trained on {r['label_source']}; "
           f"{scales}, flip {'on' if r['flip'] else 'off'}, CRF {'on' if r['crf'] else 'off'}")
    return {"output": "DeepLab prediction", "miou": r["miou"], "split": r["split"],
            "num_images": r["without_crf"]["num_evaluated"], "folder": str(path.parent), "how": how}


def measure(cfg: Config) -> list[dict]:
    """Evaluate every output the pipeline wrote (missing ones are left out)."""
    cfg = expand_work_dir(cfg)  # a folder given as {work_dir}/... is found
    layout = Layout(cfg)
    index = load_split(cfg.data, layout.eval_split())
    cams = f"scales {cfg.cam.scales}, flip {'on' if cfg.cam.flip else 'off'}; background threshold sweep"
    cgnet_cams = layout.cam_dir("cgnet")
    rows = [
        _cam_row("OC CAM", layout.cam_dir("classifier"), index, cfg,
                 f"ordinary classifier ({cfg.train_classifier.net.backbone}); {cams}"),
        _cam_row("CGNet CAM", cgnet_cams, index, cfg,
                 f"CGNet ({cfg.train_cgnet.net.backbone}), masking depth {cfg.masking.depth}, "
                 f"w = {cfg.masking.cse_init} + {cfg.masking.cse_slope} * epoch; {cams}"),
        _cam_row("control CAM (w = 0)", Layout(control_config(cfg), derived_only=True).cam_dir("cgnet"), index, cfg,
                 f"the same CGNet trained without the erasing loss; {cams}"),
    ]
    for alpha in cfg.cam.crf_alphas:
        rows.append(_label_row(f"CGNet CAM + CRF (alpha {alpha:g})",
                               f"dense CRF of the CGNet CAMs, background (1 - max)^{alpha:g}",
                               crf_dir(cgnet_cams, alpha), index, cfg))
    for row in STAGES.values():  # the pseudo labels of each generator the pipeline ran
        if row.generates and (row.generates == cfg.pseudo_labels.method or cfg.pseudo_labels.compare):
            rows.append(_label_row(*importlib.import_module(row.module).describe(cfg), row.output(layout), index, cfg))
    rows.append(_deeplab_row(cfg))
    return [r for r in rows if r is not None]


def _stage_label(step: str, cfg: Config) -> str:
    """``cam_cgnet (+ 2 CRFs)`` when the step also made CRF labels."""
    n = len(cfg.cam.crf_alphas) if step == "cam_cgnet" else 0
    return f"{step} (+ {n} CRF{'s' if n > 1 else ''})" if n else step


def _speed_cell(timing: dict) -> str:
    """Training images/s of a trainer; ``(N images/s)`` of an inference step; blank when unknown."""
    ips = timing.get("images_per_s")
    if ips is None:
        return ""
    return f"{ips:.0f}" if timing.get("speed") == "train" else f"({ips:.0f} images/s)"


def stage_table(cfg: Config, jobs: list) -> list[dict]:
    """``[{"step", "stage" (its label), "seconds", "images_per_s", "speed"}]`` of the finished steps, from their records."""
    return [{**t, "stage": _stage_label(t["step"], cfg)} for t in step_timings(jobs)]


def markdown(rows: list[dict], stages: list[dict]) -> str:
    lines = ["| output | mIoU (%) | at fixed threshold | split | images | how it was produced |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fixed = (f"{_pct(r['miou_at_threshold'])} (t = {r['threshold']:g}; best t = {r['best_threshold']:g})"
                 if "miou_at_threshold" in r else "")
        lines.append(f"| {r['output']} | {_pct(r['miou'])} | {fixed} | {r['split']} | {r['num_images']} | {r['how']} |")
    if stages:
        lines += ["", "| stage | seconds | training images/s |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.0f} | {_speed_cell(s)} |" for s in stages]
        lines.append(f"| total | {sum(s['seconds'] for s in stages):.0f} | |")
    return "\n".join(lines) + "\n"


def _fig3(cfg: Config, n: int) -> Path | None:
    layout = Layout(cfg)
    a, b = layout.cam_dir("classifier"), layout.cam_dir("cgnet")
    index = load_split(cfg.data, layout.eval_split())
    rows = []
    for i, image_id in enumerate(index.ids):
        if len(rows) == n:
            break
        pa, pb, gt = a / f"{image_id}.npz", b / f"{image_id}.npz", index.eval_mask_path(i)
        if pa.is_file() and pb.is_file():
            rows.append((load_image(index.image_path(i)), load_label_png(gt) if gt and gt.is_file() else None,
                         load_cam_npz(pa)[1], load_cam_npz(pb)[1]))
    if not rows:
        return None
    path = layout.work / "fig3_cams.png"
    save_picture(path, compare_cams(rows))
    return path


def _fig4(cfg: Config, n: int) -> Path | None:
    layout = Layout(cfg)
    split = layout.deeplab_eval_split()
    pred_dir = layout.predictions(split)
    if not pred_dir.is_dir():
        return None
    index = load_split(cfg.data, split)
    rows = []
    for i, image_id in enumerate(index.ids[:n]):
        gt, pred = index.eval_mask_path(i), pred_dir / f"{image_id}.png"
        if pred.is_file():
            rows.append((load_image(index.image_path(i)), load_label_png(gt) if gt and gt.is_file() else None,
                         load_label_png(pred)))
    if not rows:
        return None
    path = layout.work / "fig4_segmentation.png"
    save_picture(path, compare_labels(rows, titles=("image", "ground truth", "DeepLab")))
    return path


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"  # as caee.core.io.write_json


def write_results(cfg: Config, jobs: list) -> dict:
    """Measure and write results.md / results.json (+ pictures); ``jobs``: the pipeline's steps,
    whose records give the stage table. Returns the JSON dict (``markdown``: the text)."""
    cfg = expand_work_dir(cfg)
    ensure_dataset(cfg.data)
    layout = Layout(cfg)
    rows = measure(cfg)
    stages = stage_table(cfg, jobs)
    pictures = [p for p in (_fig3(cfg, cfg.pipeline.pictures), _fig4(cfg, cfg.pipeline.pictures)) if p]
    md = markdown(rows, stages)
    if pictures:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures) + "\n"
    # results.json holds only what the seeds determine, so two runs of one config on one machine
    # give identical files; the wall times go to timings.json
    result = {"rows": rows, "pictures": [str(p) for p in pictures]}
    timings = {"stages": stages, "stage_seconds": {s["step"]: s["seconds"] for s in stages}}
    # a finished work_dir copied elsewhere (even read-only) re-runs nothing and rewrites nothing
    files = [layout.work / name for name in ("results.md", "results.json", "timings.json")]
    for path, text in zip(files, (md, _json_text(result), _json_text(timings))):
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
    logger.info("results: %s, %s (wall times: %s)", *files)
    return {**result, **timings, "markdown": md}
