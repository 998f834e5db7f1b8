"""What the reproduction tables share: the report, percent formatting, markdown tables, evaluation notes."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from caee.core.config import Config
from caee.core.io import atomic_write, write_json, write_text
from caee.pipeline.variants import Outcome


# the demos' own work_dir: configs/demo.yaml's work_dirs/demo belongs to the pipeline demo, which may
# be cleaned or re-run while a reproduction demo runs
DEMO_WORK_DIR = "work_dirs/reproduce_demo"


@dataclass
class Report:
    """A finished experiment: the markdown table, the JSON data (mIoU in percent), the files
    written and the failure messages (each naming its variant)."""
    markdown: str
    data: dict
    files: list[Path]
    failures: list[str]


def pct(x: float | None) -> float | None:
    """A fraction as a percentage rounded to 0.0001 (None stays None): precise enough that a table's
    0.1 rounding is the fraction's own (0.680512 -> 68.0512 -> "68.1"; at 0.01 it was 68.05 -> "68.0")."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100.0 * x, 4)


def fmt_pct(x: float | None) -> str:
    """A percentage for a table cell: ``56.0%``, or ``-`` when missing."""
    return "-" if x is None else f"{x:.1f}%"


def fmt_threshold(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (``|`` inside cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def cam_scores(summary: dict | None) -> dict[str, float | None]:
    """mIoU (best of the sweep), mIoU at the fixed threshold (both percent) and the best threshold."""
    s = summary or {}
    return {"miou": pct(s.get("miou")), "miou_at_threshold": pct(s.get("miou_at_threshold")),
            "best_threshold": s.get("best_threshold")}


def eval_settings(outcomes: Sequence[Outcome], cfg: Config) -> dict:
    """Split, image count and thresholds of the evaluation (from the first evaluated set)."""
    s = next((sc for o in outcomes for sc in o.scores.values()), {})
    ts = cfg.eval.thresholds
    return {"split": cfg.data.cam_split, "num_images": s.get("num_images"), "threshold": cfg.eval.threshold,
            "thresholds": [min(ts), max(ts), len(ts)] if ts else [], "crf": False,
            "cam_scales": list(cfg.cam.scales), "cam_flip": cfg.cam.flip}


def settings_line(ev: dict) -> str:
    lo, hi, n = ev["thresholds"] or (ev["threshold"], ev["threshold"], 1)
    return (f"CAM mIoU on split '{ev['split']}' ({ev['num_images']} images), CRF off, scales {ev['cam_scales']}"
            f"{' + flip' if ev['cam_flip'] else ''}; 'best' = best background threshold of a {n}-value sweep "
            f"{lo:g}..{hi:g} (an oracle, as the paper reports), 'fixed' = threshold {ev['threshold']:g} "
            "fixed in advance.")


def write_report(out_dir: Path, stem: str, markdown: str, data: dict) -> list[Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<stem>.json``; returns their paths."""
    md, js = Path(out_dir) / f"{stem}.md", Path(out_dir) / f"{stem}.json"
    write_text(md, markdown + "\n")
    write_json(js, data)
    return [md, js]


def failure_lines(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.error for o in outcomes if o.error]


def footer(notes: Sequence[str], failures: Sequence[str]) -> list[str]:
    lines = [""] + [f"Note: {n}" for n in notes]
    if failures:
        lines += ["", "Failures:"] + [f"- {f}" for f in failures]
    return lines


def run_guarded(run: Callable[[], Report]) -> tuple[int, Report | None, float]:
    """Run a driver under the command-line error guard: (exit code, report, wall seconds); exit
    code 2 for bad input (the guard reported it), 1 when a variant failed, else 0."""
    from caee.core.errors import guarded

    t0 = time.perf_counter()
    done: list[Report] = []
    rc = guarded(lambda: done.append(run()))
    if rc or not done:
        return rc or 2, None, time.perf_counter() - t0
    return (1 if done[0].failures else 0), done[0], time.perf_counter() - t0


def print_report(rc: int, report: Report | None, seconds: float) -> int:
    """A reproduction driver's report: print the table, its files and the failures; returns the exit code."""
    if report is None:
        return rc
    print(report.markdown)
    print(f"\nfiles: {', '.join(map(str, report.files))}; wall time {seconds:.0f} s")
    for failure in report.failures:
        print(f"error: {failure}", file=sys.stderr)
    return rc


def grouped_bars(ax, rows: Sequence[dict], series: Sequence[tuple[str, str]]) -> list[float]:
    """One group of bars per row, one bar per ``(legend label, row key)`` of ``series``, each
    labelled with its value (a missing value draws no bar); returns the values drawn."""
    width = 0.8 / len(series)
    shown = []
    for k, (label, key) in enumerate(series):
        vals = [math.nan if r[key] is None else r[key] for r in rows]
        xs = [x + (k - (len(series) - 1) / 2) * width for x in range(len(rows))]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in vals], fontsize=7)
        shown += [v for v in vals if not math.isnan(v)]
    return shown


def save_chart(fig, ax, shown: Sequence[float], path: Path) -> Path:
    """A driver's bar chart, finished and written atomically: the y axis zoomed to the values
    ``shown`` (mIoU %; rows differ by points), the legend, then ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    ax.set_ylim(max(0.0, 10 * math.floor(min(shown, default=10) / 10 - 1)), 100)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
