"""Supplementary Fig. II: image-level (d_m = 0) against feature-level (d_m >= 1) masking, one OC for all depths."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from caee.core.config import Config
from caee.core.errors import CaeeError
from caee.core.layout import Layout
from caee.core.logs import setup_logging
from caee.reports.common import (DEMO_WORK_DIR, Report, cam_scores, eval_settings, failure_lines, fmt_pct,
                                 fmt_threshold, footer, grouped_bars, markdown_table, pct, save_chart, settings_line,
                                 write_report)
from caee.pipeline.variants import Outcome, Variant, make_variant, run_variants


DEPTH_OC_STAGES = ("train_classifier", "cam_classifier")
DEPTH_STAGES = ("train_cgnet", "cam_cgnet")
FULL_STAGES = ("train_affinity", "pseudo_labels")
# demo (tools/masking_depth_sweep.py --demo, always with pseudo labels): configs/demo.yaml on 1,500 + 300
# synthetic images (demo.yaml: 2,000 + 400) and depths 0, 2, 3, 4 of its TinyCNN OC, so that the OC and
# four CGNets, each with its AffinityNet and random walk, fit 15 minutes on 2 CPU cores. Depth 1 (the
# first convolution's map, at the image's resolution) is left out: on 1,000 images it measured as
# image-level masking does (CAM 68.0 vs 68.1, pseudo labels 71.1 vs 71.2, docs/DEMO.md). Every
# other setting (epochs, networks, PSA's label rule and pair set) is demo.yaml's.
DEPTH_DEMO_CAPS = {"work_dir": DEMO_WORK_DIR, "data.root": "data/synthetic_1500", "data.synthetic.num_train": 1500,
                   "data.synthetic.num_val": 300}
DEPTH_DEMO_DEPTHS = (0, 2, 3, 4)


def backbone_depths(backbone: str) -> tuple[int, ...]:
    """Masking depths of an OC backbone (0 = the image): ResNet38 0..7, VGG16 0..5, TinyCNN 0..4."""
    from caee.models import BACKBONES

    if backbone not in BACKBONES:
        raise CaeeError(f"unknown OC backbone {backbone!r} (train_classifier.net.backbone)")
    return tuple(BACKBONES[backbone].depths)


def check_depths(depths: Sequence[int] | None, backbone: str) -> list[int]:
    """``depths`` (default: all of ``backbone``), unique, each checked to be a depth of the OC."""
    valid = backbone_depths(backbone)
    if depths is None:
        return list(valid)
    bad = [d for d in depths if d not in valid]
    if bad:
        raise CaeeError(f"masking depth(s) {bad} are not depths of the {backbone} OC; valid: "
                        f"{', '.join(map(str, valid))}")
    return list(dict.fromkeys(depths))


def depth_variants(base: Config, depths: Sequence[int], full: bool = False) -> list[Variant]:
    """Variant ``oc`` (one OC for all) and ``depth_<d>`` per depth: a CGNet with ``masking.depth=d``
    against that OC, its CAMs, and with ``full`` AffinityNet + pseudo labels from those CAMs."""
    root = Layout(base).stage_dir("masking_depth")
    oc = make_variant(base, root, "oc", {}, DEPTH_OC_STAGES, meta={"depth": None})
    oc_weights = str(Layout(oc.cfg).model("train_classifier"))
    stages = DEPTH_STAGES + (FULL_STAGES if full else ())
    return [oc] + [make_variant(base, root, f"depth_{d}", {"masking.depth": d, "train_cgnet.oc_weights": oc_weights},
                                stages, after=("oc",), meta={"depth": d}) for d in depths]


def depth_row(variant: Variant, outcome: Outcome) -> dict:
    """One JSON row: depth, masking level, CAM mIoU (percent, best and fixed), pseudo-label mIoU."""
    source = "cam_classifier" if variant.name == "oc" else "cam_cgnet"
    cam = cam_scores(outcome.scores.get(source))
    pl = outcome.scores.get("pseudo_labels")
    d = variant.meta.get("depth")
    return {"variant": variant.name, "depth": d,
            "level": None if d is None else ("image" if d == 0 else "feature"),
            **{f"cam_{k}": v for k, v in cam.items()}, "pseudo_label_miou": pct(pl["miou"]) if pl else None,
            "status": "failed" if outcome.error else "ok", "error": outcome.error,
            "ran": outcome.ran, "skipped": outcome.skipped, "seconds": outcome.seconds}


def depth_markdown(data: dict) -> str:
    """One row per depth (and the OC for reference): CAM mIoU best / fixed, best t, pseudo labels."""
    t = data["eval"]["threshold"]
    header = ["Masking depth d_m", "Masking", "CAM mIoU (best t)", f"CAM mIoU (t={t:g})", "Best t"]
    header += ["Pseudo-label mIoU"] if data["full"] else []
    rows = []
    for r in [data["oc"], *data["rows"]]:
        first = "OC (no erasing)" if r["depth"] is None else str(r["depth"])
        cells = [first, r["level"] or "-", "failed" if r["status"] == "failed" else fmt_pct(r["cam_miou"]),
                 fmt_pct(r["cam_miou_at_threshold"]), fmt_threshold(r["cam_best_threshold"])]
        rows.append(cells + ([fmt_pct(r["pseudo_label_miou"])] if data["full"] else []))
    lines = [f"Masking depth d_m (supplementary Fig. II): CGNet ({data['cgnet_backbone']}) vs one "
             f"{data['oc_backbone']} OC; d_m = 0 erases the image, d_m >= 1 the OC's feature map at that depth.",
             settings_line(data["eval"]) + (" Pseudo labels: AffinityNet + random walk, no CRF, same split."
                                             if data["full"] else ""), "", markdown_table(header, rows)]
    return "\n".join(lines + footer(data["notes"], data["failures"]))


def depth_chart(data: dict, path: Path) -> Path:
    """Bar chart of mIoU per masking depth (CAM best-threshold mIoU; with pseudo labels when run),
    the OC's CAM mIoU as a dashed line; PNG written atomically with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    series = [("CAM mIoU (best t)", "cam_miou")]
    series += [("pseudo-label mIoU", "pseudo_label_miou")] if data["full"] else []
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6), dpi=100)
    shown = grouped_bars(ax, rows, series)
    if data["oc"]["cam_miou"] is not None:
        ax.axhline(data["oc"]["cam_miou"], color="gray", linestyle="--", linewidth=1, label="OC CAM mIoU")
        shown.append(data["oc"]["cam_miou"])
    ax.set_xticks(range(len(rows)), [str(r["depth"]) for r in rows])
    ax.set_xlabel("masking depth d_m (0 = image-level)")
    ax.set_ylabel("mIoU (%)")
    return save_chart(fig, ax, shown, path)


def run_depth_sweep(base: Config, depths: Sequence[int] | None = None, full: bool = False,
                    notes: Sequence[str] = (), overwrite: bool = False) -> Report:
    """Train one OC, a CGNet per masking depth (default: every depth of the OC backbone), evaluate;
    write ``<work_dir>/masking_depth/masking_depth.{md,json,png}``."""
    depths = check_depths(depths, base.train_classifier.net.backbone)
    variants = depth_variants(base, depths, full)
    root = Layout(base).stage_dir("masking_depth")
    setup_logging(root)
    outcomes = run_variants(variants, root, overwrite)
    failures = failure_lines(outcomes)
    data = {"experiment": "masking_depth", "unit": "percent", "full": full, "eval": eval_settings(outcomes, base),
            "oc_backbone": base.train_classifier.net.backbone, "cgnet_backbone": base.train_cgnet.net.backbone,
            "notes": list(notes), "failures": failures, "oc": depth_row(variants[0], outcomes[0]),
            "rows": [depth_row(v, o) for v, o in zip(variants[1:], outcomes[1:])]}
    markdown = depth_markdown(data)
    files = write_report(root, "masking_depth", markdown, data) + [depth_chart(data, root / "masking_depth.png")]
    return Report(markdown, data, files, failures)
