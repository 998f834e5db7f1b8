"""Supplementary Table I: a CGNet trained against ordinary classifiers (OCs) with different backbones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from caee.core.config import Config
from caee.core.layout import Layout
from caee.core.logs import setup_logging
from caee.reports.common import (DEMO_WORK_DIR, Report, cam_scores, eval_settings, failure_lines, fmt_pct,
                                 fmt_threshold, footer, grouped_bars, markdown_table, save_chart, settings_line,
                                 write_report)
from caee.pipeline.variants import Outcome, Variant, make_variant, run_variants


TABLE1_STAGES = ("train_classifier", "cam_classifier", "train_cgnet", "cam_cgnet")
# supplementary Table I, VOC 2012 train CAM mIoU (%): OC -> CGNet (CGNet always ResNet38)
TABLE1_PAPER = {"resnet38": (47.8, 56.0), "resnet101": (46.8, 52.4), "vgg16": (48.9, 52.3)}
DISPLAY = {"resnet38": "ResNet38", "resnet101": "ResNet101", "vgg16": "VGG16", "tinycnn": "TinyCNN"}
# demo: configs/demo.yaml's TinyCNN OC and CGNet on its own synthetic data, the other OCs from
# configs/demo_*_oc.yaml (tools/reproduce_table1.py); the table compares CAMs without CRF, so the
# demo's two CRF passes of every CGNet CAM (about 50 s each variant on 2 cores) are not made
TABLE1_DEMO_CAPS = {"work_dir": DEMO_WORK_DIR, "cam.crf_alphas": []}


def table1_variants(base: Config, ocs: Mapping[str, Mapping[str, Any]]) -> list[Variant]:
    """One variant per OC: ``{name: overrides}`` (e.g. ``{"resnet101": {"train_classifier.net.backbone":
    "resnet101", ...}}``); each trains its OC and a CGNet (``base``'s train_cgnet) against it."""
    root = Layout(base).stage_dir("table1")
    return [make_variant(base, root, name, ov, TABLE1_STAGES, meta={"oc": name}) for name, ov in ocs.items()]


def table1_row(variant: Variant, outcome: Outcome) -> dict:
    """One JSON row: backbones, OC / CGNet CAM mIoU (percent, best and fixed), paper numbers, status."""
    oc, cg = cam_scores(outcome.scores.get("cam_classifier")), cam_scores(outcome.scores.get("cam_cgnet"))
    paper = TABLE1_PAPER.get(variant.name, (None, None))
    return {"variant": variant.name, "oc_backbone": variant.cfg.train_classifier.net.backbone,
            "oc_width": variant.cfg.train_classifier.net.width, "cgnet_backbone": variant.cfg.train_cgnet.net.backbone,
            **{f"oc_{k}": v for k, v in oc.items()}, **{f"cgnet_{k}": v for k, v in cg.items()},
            "paper_oc_miou": paper[0], "paper_cgnet_miou": paper[1],
            "status": "failed" if outcome.error else "ok", "error": outcome.error,
            "ran": outcome.ran, "skipped": outcome.skipped, "seconds": outcome.seconds}


def _with_width(row: dict, name: str) -> str:
    """``name`` with the OC's width when it is not 1: ``ResNet38 x0.0625``."""
    return name if row["oc_width"] == 1.0 else f"{name} x{row['oc_width']:g}"


def _row_label(row: dict) -> str:
    """The row's OC and its mIoU; a variant that ran another backbone than its name says which."""
    name = DISPLAY.get(row["variant"], row["variant"])
    net = (_with_width(row, name) if row["oc_backbone"] == row["variant"]
           else f"{name} [ran {_with_width(row, row['oc_backbone'])}]")
    return f"{net} ({fmt_pct(row['oc_miou'])})"


def _gain(row: dict) -> str:
    """CGNet minus OC CAM mIoU (best threshold), in points."""
    if row["oc_miou"] is None or row["cgnet_miou"] is None:
        return "-"
    return f"{row['cgnet_miou'] - row['oc_miou']:+.1f}"


def table1_markdown(data: dict) -> str:
    """The supplementary's layout (OC (mIoU) | Ours (mIoU)) with the paper's numbers and the
    fixed-threshold values beside it."""
    t = data["eval"]["threshold"]
    header = ["Backbone of Ordinary Classifier (mIoU)", "Ours (mIoU)", "Ours - OC", "Paper: OC -> Ours",
              f"Fixed t={t:g}: OC -> Ours", "Best t: OC / Ours"]
    rows = []
    for r in data["rows"]:
        paper = (f"{fmt_pct(r['paper_oc_miou'])} -> {fmt_pct(r['paper_cgnet_miou'])}"
                 if r["paper_oc_miou"] is not None else "-")
        best_t = " / ".join(fmt_threshold(x) for x in (r["oc_best_threshold"], r["cgnet_best_threshold"]))
        rows.append([_row_label(r), "failed" if r["status"] == "failed" else fmt_pct(r["cgnet_miou"]), _gain(r), paper,
                     f"{fmt_pct(r['oc_miou_at_threshold'])} -> {fmt_pct(r['cgnet_miou_at_threshold'])}", best_t])
    cgnets = sorted({DISPLAY.get(r["cgnet_backbone"], r["cgnet_backbone"]) for r in data["rows"]})
    lines = [f"Table I (supplementary): CGNet ({', '.join(cgnets)}) trained against ordinary classifiers "
             "with different backbones.", settings_line(data["eval"]), "", markdown_table(header, rows)]
    return "\n".join(lines + footer(data["notes"], data["failures"]))


def table1_chart(data: dict, path: Path) -> Path:
    """Grouped bars per OC backbone: the OC's and its CGNet's CAM mIoU (best threshold); PNG written
    atomically with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6), dpi=100)
    shown = grouped_bars(ax, rows, [("OC CAM", "oc_miou"), ("CGNet CAM (ours)", "cgnet_miou")])
    ax.set_xticks(range(len(rows)), [_with_width(r, DISPLAY.get(r["oc_backbone"], r["oc_backbone"])) for r in rows])
    ax.set_xlabel("backbone of the ordinary classifier")
    ax.set_ylabel("CAM mIoU (%, best t)")
    return save_chart(fig, ax, shown, path)


def run_table1(base: Config, ocs: Mapping[str, Mapping[str, Any]], notes: Sequence[str] = (),
               overwrite: bool = False) -> Report:
    """Train / evaluate every OC variant and its CGNet; write ``<work_dir>/table1/table1.{md,json,png}``
    (the PNG: OC and CGNet CAM mIoU per OC backbone)."""
    variants = table1_variants(base, ocs)
    root = Layout(base).stage_dir("table1")
    setup_logging(root)
    outcomes = run_variants(variants, root, overwrite)
    failures = failure_lines(outcomes)
    data = {"experiment": "table1", "unit": "percent", "eval": eval_settings(outcomes, base),
            "notes": list(notes), "failures": failures,
            "rows": [table1_row(v, o) for v, o in zip(variants, outcomes)]}
    markdown = table1_markdown(data)
    files = write_report(root, "table1", markdown, data) + [table1_chart(data, root / "table1.png")]
    return Report(markdown, data, files, failures)
