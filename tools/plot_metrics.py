"""Draw the training curves of one stage or of every stage of an experiment from ``metrics.jsonl``.

    python tools/plot_metrics.py work_dirs/demo                      # every stage -> work_dirs/demo/metrics.png
    python tools/plot_metrics.py work_dirs/demo/train_cgnet          # one stage   -> .../train_cgnet/metrics.png
    python tools/plot_metrics.py work_dirs/demo/train_cgnet/metrics.jsonl --out cgnet.png

One row per stage (each folder holding a metrics.jsonl, the control run's included), three panels:
the losses (``loss`` and every ``loss_*`` term), the learning rate, and the accuracies (every key
holding ``acc``), all against the optimisation step. A step recorded twice (a resumed run) is drawn
once, with its latest record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caee.core.errors import guarded
from caee.core.errors import CaeeError

METRICS = "metrics.jsonl"
# rows in pipeline order (the control run's train_cgnet right after the CGNet's)
_STAGE_ORDER = {name: i for i, name in enumerate(("train_classifier", "train_cgnet", "train_affinity", "train_deeplab"))}


def find_metrics(path: Path) -> list[Path]:
    """``path`` itself (a .jsonl), its metrics.jsonl (a stage folder) or every one below it (a work_dir)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CaeeError(f"not found: {path} (give a metrics.jsonl, a stage folder or a work_dir)")
    if (path / METRICS).is_file():
        return [path / METRICS]
    found = sorted(path.rglob(METRICS), key=lambda p: (_STAGE_ORDER.get(p.parent.name, len(_STAGE_ORDER)), str(p)))
    if not found:
        raise CaeeError(f"no {METRICS} under {path}: has a training stage run there?")
    return found


def read_records(path: Path) -> list[dict]:
    """The records of one metrics.jsonl by step (the latest record of a repeated step wins)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise CaeeError(f"{path}:{n}: not a metrics record ({e})") from None
            by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def panels(records: list[dict]) -> dict[str, list[str]]:
    """Which keys go into the loss, lr and accuracy panels."""
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {"loss": [k for k in keys if k == "loss" or k.startswith("loss_")],
            "lr": [k for k in keys if k == "lr"],
            "accuracy": [k for k in keys if "acc" in k]}


def _label(path: Path, root: Path) -> str:
    rel = path.parent.relative_to(root) if path.parent.is_relative_to(root) else Path(path.parent.name)
    return str(rel) if str(rel) != "." else path.parent.name


def plot(files: list[Path], out: Path, root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from caee.core.io import atomic_write

    fig, axes = plt.subplots(len(files), 3, figsize=(13, 3.0 * len(files)), squeeze=False)
    for row, path in zip(axes, files):
        records = read_records(path)
        for ax, (title, keys) in zip(row, panels(records).items()):
            for key in keys:
                pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=key, linewidth=1.2)
            ax.set_title(f"{_label(path, root)}: {title}", fontsize=10)
            ax.set_xlabel("step")
            if keys:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            if title == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a metrics.jsonl, a stage folder or a work_dir")
    p.add_argument("--out", help="PNG to write (default: metrics.png in the given folder / next to the file)")
    args = p.parse_args(argv)

    def call() -> None:
        path = Path(args.path)
        files = find_metrics(path)
        root = path if path.is_dir() else path.parent
        out = Path(args.out) if args.out else root / "metrics.png"
        print(f"{len(files)} stage(s) -> {plot(files, out, root)}")

    return guarded(call)


if __name__ == "__main__":
    sys.exit(main())
