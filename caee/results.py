"""The pipeline's results table: every stage output measured against ground truth, with how it was made.

Writes ``<work_dir>/results.json`` and ``results.md`` and, for a few images, ``fig3_cams.png``
(image | GT | OC CAM | CGNet CAM) and ``fig4_segmentation.png`` (image | GT | pseudo label | DeepLab).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from caee.config import Config
from caee.data import ensure_dataset, load_split
from caee.evaluation import evaluate_cam_dir, evaluate_label_dir
from caee.io import load_cam_npz, load_image, load_label_png, write_json, write_text
from caee.pictures import compare_cams, compare_labels, save_picture
from caee.stages.common import crf_dir, default_path

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


def _label_row(name: str, folder: Path, index, cfg: Config, how: str) -> dict | None:
    if not folder.is_dir():
        return None
    r = evaluate_label_dir(folder, index, cfg.eval.workers or None)["summary"]
    return {"output": name, "miou": r["miou"], "split": index.split, "num_images": r["num_evaluated"],
            "folder": str(folder), "how": how}


def _deeplab_row(cfg: Config) -> dict | None:
    split = cfg.train_deeplab.eval_split or cfg.data.val_split
    path = Path(cfg.work_dir) / "train_deeplab" / f"results_{Path(split).stem}.json"
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
    work = Path(cfg.work_dir)
    split = cfg.eval.split or cfg.data.cam_split
    index = load_split(cfg.data, split)
    cams = f"scales {cfg.cam.scales}, flip {'on' if cfg.cam.flip else 'off'}; background threshold sweep"
    cgnet_cams = work / "cam_cgnet"
    rows = [
        _cam_row("OC CAM", work / "cam_classifier", index, cfg,
                 f"ordinary classifier ({cfg.train_classifier.net.backbone}); {cams}"),
        _cam_row("CGNet CAM", cgnet_cams, index, cfg,
                 f"CGNet ({cfg.train_cgnet.net.backbone}), masking depth {cfg.masking.depth}, "
                 f"w = {cfg.masking.cse_init} + {cfg.masking.cse_slope} * epoch; {cams}"),
        _cam_row("control CAM (w = 0)", work / "control" / "cam_cgnet", index, cfg,
                 f"the same CGNet trained without the erasing loss; {cams}"),
    ]
    for alpha in cfg.cam.crf_alphas:
        rows.append(_label_row(f"CGNet CAM + CRF (alpha {alpha:g})", crf_dir(cgnet_cams, alpha), index, cfg,
                               f"dense CRF of the CGNet CAMs, background (1 - max)^{alpha:g}"))
    pl = cfg.pseudo_labels
    rows.append(_label_row("pseudo labels", default_path(pl.out_dir, cfg, "pseudo_labels"), index, cfg,
                           f"random walk on AffinityNet affinities (beta {pl.beta:g}, t {pl.steps}, "
                           f"alpha {pl.alpha:g}{_grid(cfg)}){', + CRF' if pl.crf else ''}"))
    rows.append(_deeplab_row(cfg))
    return [r for r in rows if r is not None]


def _grid(cfg: Config) -> str:
    """``, grid stride s`` when the AffinityNet's embeddings are not at its backbone's stride."""
    s = cfg.train_affinity.embed_stride
    return f", grid stride {s}" if s else ""


def markdown(rows: list[dict], seconds: dict[str, float]) -> str:
    lines = ["| output | mIoU (%) | at fixed threshold | split | images | how it was produced |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fixed = (f"{_pct(r['miou_at_threshold'])} (t = {r['threshold']:g}; best t = {r['best_threshold']:g})"
                 if "miou_at_threshold" in r else "")
        lines.append(f"| {r['output']} | {_pct(r['miou'])} | {fixed} | {r['split']} | {r['num_images']} | {r['how']} |")
    if seconds:
        lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
        lines.append(f"| total | {sum(seconds.values()):.0f} |")
    return "\n".join(lines) + "\n"


def _fig3(cfg: Config, n: int) -> Path | None:
    work = Path(cfg.work_dir)
    a, b = work / "cam_classifier", work / "cam_cgnet"
    index = load_split(cfg.data, cfg.eval.split or cfg.data.cam_split)
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
    path = work / "fig3_cams.png"
    save_picture(path, compare_cams(rows))
    return path


def _fig4(cfg: Config, n: int) -> Path | None:
    work = Path(cfg.work_dir)
    split = cfg.train_deeplab.eval_split or cfg.data.val_split
    pred_dir = work / "train_deeplab" / f"pred_{Path(split).stem}"
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
    path = work / "fig4_segmentation.png"
    save_picture(path, compare_labels(rows, titles=("image", "ground truth", "DeepLab")))
    return path


def write_results(cfg: Config, marker_dir: Path) -> dict:
    """Measure, print and write results.md / results.json (+ pictures); returns the JSON dict."""
    from caee.pipeline import stage_seconds

    ensure_dataset(cfg.data)
    from caee.pipeline import stages

    rows = measure(cfg)
    done = stage_seconds(marker_dir)
    seconds = {s.name: done[s.name] for s in stages(cfg) if s.name in done}
    pictures = [p for p in (_fig3(cfg, cfg.pipeline.pictures), _fig4(cfg, cfg.pipeline.pictures)) if p]
    md = markdown(rows, seconds)
    if pictures:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pictures) + "\n"
    work = Path(cfg.work_dir)
    result = {"rows": rows, "stage_seconds": seconds, "pictures": [str(p) for p in pictures]}
    write_text(work / "results.md", md)
    write_json(work / "results.json", result)
    print(md)
    return result
