"""Reproduction drivers (issue 7): run the stages in-process for a list of config variants and
gather CAM / pseudo-label mIoU into tables (supplementary Table I and Fig. II).

An experiment has a root folder (``<work_dir>/table1``, ``<work_dir>/masking_depth``) with one
sub-folder per variant, which is that variant's ``work_dir``::

    <root>/<variant>/train_classifier, cam_classifier, train_cgnet, cam_cgnet, ...   stage outputs
    <root>/<variant>/.done_<stage>          JSON marker, written only after the stage's main returned
    <root>/<variant>/eval/<set>_<split>.json  evaluate_cam_dir / evaluate_label_dir result
    <root>/<experiment>.md, .json (, .png)  the tables (mIoU in percent) and the chart

A second run skips every stage that has a marker (after checking that the settings it recorded
still hold) and re-evaluates; a stage without a marker starts again and resumes its own way
(``last.pth``, existing CAM files). When a stage does run, the later stages of that variant (and of
the variants that need it) are redone from scratch. A variant that fails is reported by name and
the others go on. Evaluation is always on ``data.cam_split``: the best threshold of the
``eval.thresholds`` sweep (an oracle) and the fixed ``eval.threshold`` are both reported.

Make_cam runs with ``cam.crf_alphas = []``: the tables need no CRF labels, and train_affinity makes
the ones it needs itself.
"""
from __future__ import annotations

import sys

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from caee import distributed
from caee.config import Config, config_from_dict, config_to_dict
from caee.errors import CaeeError
from caee.io import atomic_write, write_json, write_text
from caee.logs import setup_logging

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- config variants


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A checked copy of ``cfg`` with ``overrides`` applied.

    overrides: dotted keys (``{"masking.depth": 3}``) and / or nested mappings; unknown keys and
    wrong types raise CaeeError naming the key (as in :func:`caee.config.load_config`).
    """
    data = config_to_dict(cfg)
    for dotted, value in _flatten(overrides).items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return config_from_dict(data)


def section_overrides(path: str | Path, section: str) -> dict[str, Any]:
    """The keys a YAML file itself sets in ``section`` (its ``base:`` not followed), dotted:
    ``configs/voc/r101_oc.yaml``, ``train_classifier`` -> ``{"train_classifier.net.backbone": ...}``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CaeeError(f"cannot read config {path}: {e}") from None
    part = data.get(section) if isinstance(data, dict) else None
    if not isinstance(part, dict):
        raise CaeeError(f"{path} has no '{section}' section to take the variant's settings from")
    return _flatten(part, f"{section}.")


# paths a variant must derive from its own work_dir: a user's explicit value would be shared by all
_DERIVED_PATHS = {
    "cam.out_dir": "", "cam.weights": "", "cam.split": "", "eval.dir": "", "eval.out": "", "eval.split": "",
    "train_cgnet.oc_weights": "", "train_affinity.cam_dir": "", "pseudo_labels.cam_dir": "",
    "pseudo_labels.weights": "", "pseudo_labels.out_dir": "", "pseudo_labels.split": "",
}


@dataclass
class Variant:
    """One configuration of an experiment.

    name: folder name under the experiment root (and the table key); cfg: the complete config,
    ``cfg.work_dir = <root>/<name>``; stages: names from :data:`STAGES`, in order; after: variants
    whose outputs this one reads (they run first; if they fail this one is not run); meta: table
    columns such as the masking depth.
    """
    name: str
    cfg: Config
    stages: tuple[str, ...]
    after: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.work_dir)


def make_variant(base: Config, root: Path, name: str, overrides: Mapping[str, Any], stages: Sequence[str],
                 after: Sequence[str] = (), meta: Mapping[str, Any] | None = None) -> Variant:
    """``base`` + ``overrides`` with ``work_dir = root / name`` and every stage path derived from it."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise CaeeError(f"variant '{name}': unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    try:
        cfg = with_overrides(base, {**_DERIVED_PATHS, **overrides, "work_dir": str(Path(root) / name)})
    except CaeeError as e:
        raise CaeeError(f"variant '{name}': {e}") from None
    return Variant(name, cfg, tuple(stages), tuple(after), dict(meta or {}))


def experiment_root(cfg: Config, experiment: str) -> Path:
    """``<work_dir>/<experiment>``: the folder holding the variants and the tables."""
    return Path(cfg.work_dir) / experiment


# ---------------------------------------------------------------- stages


def _make_cams(variant: Variant, source: str) -> None:
    """make_cam for ``source`` on data.cam_split, and first on data.train_split when AffinityNet
    (trained on train_split) follows; later calls only fill in the CAMs the folder lacks."""
    from caee.stages import make_cam

    data = variant.cfg.data
    splits = [data.cam_split]
    if source == "cgnet" and "train_affinity" in variant.stages and data.train_split != data.cam_split:
        splits.insert(0, data.train_split)
    for split in splits:
        make_cam.main(with_overrides(variant.cfg, {"cam.source": source, "cam.split": split, "cam.crf_alphas": []}))


def _stage_main(module: str) -> Callable[[Variant], object]:
    def run(variant: Variant) -> object:
        import importlib

        return importlib.import_module(f"caee.stages.{module}").main(variant.cfg)
    return run


@dataclass(frozen=True)
class StageSpec:
    """run: the stage on a variant; outputs: its folders in the variant's work_dir (``<name>`` and
    ``<name>_*``), removed before a redo; depends: config sections / keys its outputs depend on."""
    run: Callable[[Variant], object]
    outputs: tuple[str, ...]
    depends: tuple[str, ...]


STAGES: dict[str, StageSpec] = {
    "train_classifier": StageSpec(_stage_main("train_classifier"), ("train_classifier",),
                                  ("data", "train_classifier")),
    "cam_classifier": StageSpec(lambda v: _make_cams(v, "classifier"), ("cam_classifier",),
                                ("data", "train_classifier.net", "cam")),
    "train_cgnet": StageSpec(_stage_main("train_cgnet"), ("train_cgnet",),
                             ("data", "train_classifier.net", "masking", "train_cgnet")),
    "cam_cgnet": StageSpec(lambda v: _make_cams(v, "cgnet"), ("cam_cgnet",), ("data", "train_cgnet.net", "cam")),
    "train_affinity": StageSpec(_stage_main("train_affinity"), ("train_affinity",),
                                ("data", "crf", "train_affinity")),
    "pseudo_labels": StageSpec(_stage_main("make_pseudo_labels"), ("pseudo_labels", "make_pseudo_labels"),
                               ("data", "crf", "train_affinity.net", "pseudo_labels")),
}
# settings of speed, precision on CUDA or logging, not of the recipe: a difference keeps a marker valid
_NOT_RESULTS = ("num_workers", "workers", "log_every", "checkpoint_every", "overwrite", "pictures", "amp",
                "channels_last")
_NOT_RESULTS_KEYS = ("cam.batch_size",)


def marker_path(variant: Variant, stage: str) -> Path:
    return variant.dir / f".done_{stage}"


def stage_fingerprint(cfg: Config, stage: str) -> dict[str, Any]:
    """The dotted config values the outputs of ``stage`` depend on (recorded in its marker)."""
    flat = _flatten(config_to_dict(cfg))
    keys = STAGES[stage].depends
    return {k: v for k, v in flat.items()
            if any(k == d or k.startswith(d + ".") for d in keys)
            and k.rsplit(".", 1)[-1] not in _NOT_RESULTS and k not in _NOT_RESULTS_KEYS}


def _check_marker(variant: Variant, stage: str) -> None:
    """Refuse to reuse a finished stage whose recorded settings differ from the variant's."""
    try:
        recorded = json.loads(marker_path(variant, stage).read_text()).get("config", {})
    except (OSError, ValueError) as e:
        raise CaeeError(f"marker {marker_path(variant, stage)} is unreadable ({e}); delete it to redo the stage")
    now = stage_fingerprint(variant.cfg, stage)
    diffs = [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(recorded))
             if recorded.get(k) != now.get(k)]
    if diffs:
        raise CaeeError(f"stage '{stage}' finished earlier with other settings ({'; '.join(diffs[:5])}"
                        f"{'; ...' if len(diffs) > 5 else ''}); delete {variant.dir} to redo the variant, or "
                        "choose another work_dir")


def _clear_outputs(variant: Variant, stage: str) -> None:
    for name in STAGES[stage].outputs:
        for path in [variant.dir / name, *variant.dir.glob(f"{name}_*")]:
            if path.is_dir():
                shutil.rmtree(path)


def _write_marker(variant: Variant, stage: str, seconds: float) -> None:
    distributed.barrier()
    if distributed.is_main():
        write_json(marker_path(variant, stage), {
            "variant": variant.name, "stage": stage, "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": stage_fingerprint(variant.cfg, stage)})


# ---------------------------------------------------------------- running variants


@dataclass
class Outcome:
    """What running a variant did: stages run / skipped (marker), their seconds, the scores by
    evaluated set (``cam_classifier``, ``cam_cgnet``, ``pseudo_labels``: evaluation summaries,
    mIoU as fractions) and, on failure, an error message that names the variant."""
    name: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    error: str | None = None


def _run_stages(variant: Variant, out: Outcome, fresh: bool) -> None:
    """Run (or skip) the stages in order; ``fresh``: something upstream ran now, so redo all."""
    for stage in variant.stages:
        marker = marker_path(variant, stage)
        if not fresh and marker.is_file():
            _check_marker(variant, stage)
            out.skipped.append(stage)
            logger.info("variant %s: stage %s already done (%s); skipped", variant.name, stage, marker)
            continue
        marker.unlink(missing_ok=True)
        if fresh:
            _clear_outputs(variant, stage)
        logger.info("variant %s: running stage %s", variant.name, stage)
        t0 = time.perf_counter()
        try:
            STAGES[stage].run(variant)
        except CaeeError as e:
            raise CaeeError(f"variant '{variant.name}' failed at stage '{stage}': {e}") from None
        except Exception as e:
            e.add_note(f"while running stage '{stage}' of reproduction variant '{variant.name}' "
                       f"(work_dir {variant.dir})")
            raise
        out.seconds[stage] = round(time.perf_counter() - t0, 1)
        _write_marker(variant, stage, out.seconds[stage])
        out.ran.append(stage)
        fresh = True


def evaluate_variant(variant: Variant) -> dict[str, dict]:
    """Score the variant's CAM folders and pseudo labels on data.cam_split; each full result is
    written to ``<variant>/eval/<set>_<split>.json``. Returns ``{set: summary}`` (mIoU fractions)."""
    from caee.data import ensure_dataset, load_split
    from caee.evaluation import evaluate_cam_dir, evaluate_label_dir

    cfg = variant.cfg
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, cfg.data.cam_split)
    workers = cfg.eval.workers or None
    scores = {}
    for stage in variant.stages:
        folder = variant.dir / stage
        if stage.startswith("cam_"):
            result = evaluate_cam_dir(folder, index, cfg.eval.thresholds, cfg.eval.threshold, workers)
        elif stage == "pseudo_labels":
            result = evaluate_label_dir(folder, index, workers)
        else:
            continue
        write_json(variant.dir / "eval" / f"{stage}_{Path(cfg.data.cam_split).stem}.json", result)
        scores[stage] = result["summary"]
    return scores


def run_variant(variant: Variant, fresh: bool = False) -> Outcome:
    """Run the stages of ``variant`` (skipping finished ones unless ``fresh``) and evaluate it.

    A CaeeError (bad input) ends the variant: it is logged and kept in ``Outcome.error`` with the
    variant's name and stage; any other exception propagates with a note naming the variant.
    """
    out = Outcome(variant.name)
    try:
        _run_stages(variant, out, fresh)
        if distributed.is_main():
            out.scores = evaluate_variant(variant)
    except CaeeError as e:
        msg = str(e)
        out.error = msg if msg.startswith(f"variant '{variant.name}'") else f"variant '{variant.name}': {msg}"
        logger.error("%s", out.error)
    return out


def run_variants(variants: Sequence[Variant], log_dir: Path | None = None) -> list[Outcome]:
    """Run the variants in order (a variant's ``after`` must come before it); returns one Outcome
    each. A variant whose dependency failed is not run; one whose dependency ran now is redone."""
    done: dict[str, Outcome] = {}
    for v in variants:
        missing = [a for a in v.after if a not in done]
        failed = [a for a in v.after if a in done and done[a].error]
        if missing or failed:
            why = f"needs variant(s) {missing} that come later" if missing else f"variant(s) {failed} it needs failed"
            done[v.name] = Outcome(v.name, error=f"variant '{v.name}' not run: {why}")
            logger.error("%s", done[v.name].error)
            continue
        done[v.name] = run_variant(v, fresh=any(done[a].ran for a in v.after))
        if log_dir is not None:
            setup_logging(log_dir)  # the stages pointed the log file at their own folders
    return [done[v.name] for v in variants]


# ---------------------------------------------------------------- tables


@dataclass
class Report:
    """A finished experiment: the markdown table, the JSON data (mIoU in percent), the files
    written and the failure messages (each naming its variant)."""
    markdown: str
    data: dict
    files: list[Path]
    failures: list[str]


def pct(x: float | None) -> float | None:
    """A fraction as a percentage rounded to 0.01 (None stays None)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100.0 * x, 2)


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


def _cam_scores(summary: dict | None) -> dict[str, float | None]:
    """mIoU (best of the sweep), mIoU at the fixed threshold (both percent) and the best threshold."""
    s = summary or {}
    return {"miou": pct(s.get("miou")), "miou_at_threshold": pct(s.get("miou_at_threshold")),
            "best_threshold": s.get("best_threshold")}


def _eval_settings(outcomes: Sequence[Outcome], cfg: Config) -> dict:
    """Split, image count and thresholds of the evaluation (from the first evaluated set)."""
    s = next((sc for o in outcomes for sc in o.scores.values()), {})
    ts = cfg.eval.thresholds
    return {"split": cfg.data.cam_split, "num_images": s.get("num_images"), "threshold": cfg.eval.threshold,
            "thresholds": [min(ts), max(ts), len(ts)] if ts else [], "crf": False,
            "cam_scales": list(cfg.cam.scales), "cam_flip": cfg.cam.flip}


def _settings_line(ev: dict) -> str:
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


def _failure_lines(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.error for o in outcomes if o.error]


def _footer(notes: Sequence[str], failures: Sequence[str]) -> list[str]:
    lines = [""] + [f"Note: {n}" for n in notes]
    if failures:
        lines += ["", "Failures:"] + [f"- {f}" for f in failures]
    return lines


# ---------------------------------------------------------------- Table I: OC backbones


TABLE1_STAGES = ("train_classifier", "cam_classifier", "train_cgnet", "cam_cgnet")
# supplementary Table I, VOC 2012 train CAM mIoU (%): OC -> CGNet (CGNet always ResNet38)
TABLE1_PAPER = {"resnet38": (47.8, 56.0), "resnet101": (46.8, 52.4), "vgg16": (48.9, 52.3)}
DISPLAY = {"resnet38": "ResNet38", "resnet101": "ResNet101", "vgg16": "VGG16", "tinycnn": "TinyCNN"}
# the demo OCs: the paper's three backbones from scratch (the synthetic set has no ImageNet weights)
TABLE1_DEMO_OCS = {name: {"train_classifier.net.backbone": name, "train_classifier.net.width": 1.0,
                          "train_classifier.net.pretrained": ""} for name in ("resnet38", "resnet101", "vgg16")}
# the demos' own work_dir: configs/demo.yaml's work_dirs/demo belongs to the pipeline demo, which may
# be cleaned or re-run while a reproduction demo runs
DEMO_WORK_DIR = "work_dirs/reproduce_demo"
# demo caps: full-size ResNet38 / ResNet101 take 2-4 s per 96 x 96 training image and ResNet38 ~3 s per
# CAM on 2 busy CPU cores (measured); no DataLoader worker, so the stages keep both cores for compute
TABLE1_DEMO_CAPS = {
    "work_dir": DEMO_WORK_DIR, "data.root": "data/synthetic_table1_demo", "data.num_workers": 0,
    "data.synthetic.num_train": 32, "data.synthetic.num_val": 8,
    "train_classifier.batch_size": 8, "train_classifier.epochs": 1,
    "train_cgnet.batch_size": 8, "train_cgnet.epochs": 1,
    "cam.scales": [1.0], "cam.flip": False,
}


def table1_variants(base: Config, ocs: Mapping[str, Mapping[str, Any]]) -> list[Variant]:
    """One variant per OC: ``{name: overrides}`` (e.g. ``{"resnet101": {"train_classifier.net.backbone":
    "resnet101", ...}}``); each trains its OC and a CGNet (``base``'s train_cgnet) against it."""
    root = experiment_root(base, "table1")
    return [make_variant(base, root, name, ov, TABLE1_STAGES, meta={"oc": name}) for name, ov in ocs.items()]


def table1_row(variant: Variant, outcome: Outcome) -> dict:
    """One JSON row: backbones, OC / CGNet CAM mIoU (percent, best and fixed), paper numbers, status."""
    oc, cg = _cam_scores(outcome.scores.get("cam_classifier")), _cam_scores(outcome.scores.get("cam_cgnet"))
    paper = TABLE1_PAPER.get(variant.name, (None, None))
    return {"variant": variant.name, "oc_backbone": variant.cfg.train_classifier.net.backbone,
            "cgnet_backbone": variant.cfg.train_cgnet.net.backbone,
            **{f"oc_{k}": v for k, v in oc.items()}, **{f"cgnet_{k}": v for k, v in cg.items()},
            "paper_oc_miou": paper[0], "paper_cgnet_miou": paper[1],
            "status": "failed" if outcome.error else "ok", "error": outcome.error,
            "ran": outcome.ran, "skipped": outcome.skipped, "seconds": outcome.seconds}


def _row_label(row: dict) -> str:
    name = DISPLAY.get(row["variant"], row["variant"])
    ran = "" if row["oc_backbone"] == row["variant"] else f" [ran {row['oc_backbone']}]"
    return f"{name}{ran} ({fmt_pct(row['oc_miou'])})"


def table1_markdown(data: dict) -> str:
    """The supplementary's layout (OC (mIoU) | Ours (mIoU)) with the paper's numbers and the
    fixed-threshold values beside it."""
    t = data["eval"]["threshold"]
    header = ["Backbone of Ordinary Classifier (mIoU)", "Ours (mIoU)", "Paper: OC -> Ours",
              f"Fixed t={t:g}: OC -> Ours", "Best t: OC / Ours"]
    rows = []
    for r in data["rows"]:
        paper = (f"{fmt_pct(r['paper_oc_miou'])} -> {fmt_pct(r['paper_cgnet_miou'])}"
                 if r["paper_oc_miou"] is not None else "-")
        best_t = " / ".join(fmt_threshold(x) for x in (r["oc_best_threshold"], r["cgnet_best_threshold"]))
        rows.append([_row_label(r), "failed" if r["status"] == "failed" else fmt_pct(r["cgnet_miou"]), paper,
                     f"{fmt_pct(r['oc_miou_at_threshold'])} -> {fmt_pct(r['cgnet_miou_at_threshold'])}", best_t])
    cgnets = sorted({DISPLAY.get(r["cgnet_backbone"], r["cgnet_backbone"]) for r in data["rows"]})
    lines = [f"Table I (supplementary): CGNet ({', '.join(cgnets)}) trained against ordinary classifiers "
             "with different backbones.", _settings_line(data["eval"]), "", markdown_table(header, rows)]
    return "\n".join(lines + _footer(data["notes"], data["failures"]))


def run_table1(base: Config, ocs: Mapping[str, Mapping[str, Any]], notes: Sequence[str] = ()) -> Report:
    """Train / evaluate every OC variant and its CGNet; write ``<work_dir>/table1/table1.{md,json}``."""
    variants = table1_variants(base, ocs)
    root = experiment_root(base, "table1")
    setup_logging(root)
    outcomes = run_variants(variants, root)
    failures = _failure_lines(outcomes)
    data = {"experiment": "table1", "unit": "percent", "eval": _eval_settings(outcomes, base),
            "notes": list(notes), "failures": failures,
            "rows": [table1_row(v, o) for v, o in zip(variants, outcomes)]}
    markdown = table1_markdown(data)
    return Report(markdown, data, write_report(root, "table1", markdown, data), failures)


# ---------------------------------------------------------------- Fig. II: masking depth


DEPTH_OC_STAGES = ("train_classifier", "cam_classifier")
DEPTH_STAGES = ("train_cgnet", "cam_cgnet")
FULL_STAGES = ("train_affinity", "pseudo_labels")
# demo caps: 6 TinyCNN trainings instead of 2 (demo.yaml: 2,000 images, OC 6 epochs, CGNet 5 epochs);
# with --full, demo.yaml's TinyCNN AffinityNet
DEPTH_DEMO_CAPS = {
    "work_dir": DEMO_WORK_DIR, "data.root": "data/synthetic_depth_demo", "data.synthetic.num_train": 1000, "data.synthetic.num_val": 100,
    "train_cgnet.epochs": 3,
}


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
    root = experiment_root(base, "masking_depth")
    oc = make_variant(base, root, "oc", {}, DEPTH_OC_STAGES, meta={"depth": None})
    oc_weights = str(oc.dir / "train_classifier" / "model.pth")
    stages = DEPTH_STAGES + (FULL_STAGES if full else ())
    return [oc] + [make_variant(base, root, f"depth_{d}", {"masking.depth": d, "train_cgnet.oc_weights": oc_weights},
                                stages, after=("oc",), meta={"depth": d}) for d in depths]


def depth_row(variant: Variant, outcome: Outcome) -> dict:
    """One JSON row: depth, masking level, CAM mIoU (percent, best and fixed), pseudo-label mIoU."""
    source = "cam_classifier" if variant.name == "oc" else "cam_cgnet"
    cam = _cam_scores(outcome.scores.get(source))
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
             _settings_line(data["eval"]) + (" Pseudo labels: AffinityNet + random walk, no CRF, same split."
                                             if data["full"] else ""), "", markdown_table(header, rows)]
    return "\n".join(lines + _footer(data["notes"], data["failures"]))


def depth_chart(data: dict, path: Path) -> Path:
    """Bar chart of mIoU per masking depth (CAM best-threshold mIoU; with pseudo labels when run),
    the OC's CAM mIoU as a dashed line; PNG written atomically with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    xs = list(range(len(rows)))
    series = [("CAM mIoU (best t)", "cam_miou")]
    series += [("pseudo-label mIoU", "pseudo_label_miou")] if data["full"] else []
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6), dpi=100)
    for k, (label, key) in enumerate(series):
        vals = [math.nan if r[key] is None else r[key] for r in rows]
        bars = ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], vals, width, label=label)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in vals], fontsize=7)
    if data["oc"]["cam_miou"] is not None:
        ax.axhline(data["oc"]["cam_miou"], color="gray", linestyle="--", linewidth=1, label="OC CAM mIoU")
    ax.set_xticks(xs, [str(r["depth"]) for r in rows])
    ax.set_xlabel("masking depth d_m (0 = image-level)")
    ax.set_ylabel("mIoU (%)")
    shown = [v for r in [data["oc"], *rows] for v in (r["cam_miou"], r.get("pseudo_label_miou")) if v is not None]
    ax.set_ylim(max(0.0, 10 * math.floor(min(shown, default=10) / 10 - 1)), 100)  # zoomed: depths differ by points
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def run_depth_sweep(base: Config, depths: Sequence[int] | None = None, full: bool = False,
                    notes: Sequence[str] = ()) -> Report:
    """Train one OC, a CGNet per masking depth (default: every depth of the OC backbone), evaluate;
    write ``<work_dir>/masking_depth/masking_depth.{md,json,png}``."""
    depths = check_depths(depths, base.train_classifier.net.backbone)
    variants = depth_variants(base, depths, full)
    root = experiment_root(base, "masking_depth")
    setup_logging(root)
    outcomes = run_variants(variants, root)
    failures = _failure_lines(outcomes)
    data = {"experiment": "masking_depth", "unit": "percent", "full": full, "eval": _eval_settings(outcomes, base),
            "oc_backbone": base.train_classifier.net.backbone, "cgnet_backbone": base.train_cgnet.net.backbone,
            "notes": list(notes), "failures": failures, "oc": depth_row(variants[0], outcomes[0]),
            "rows": [depth_row(v, o) for v, o in zip(variants[1:], outcomes[1:])]}
    markdown = depth_markdown(data)
    files = write_report(root, "masking_depth", markdown, data) + [depth_chart(data, root / "masking_depth.png")]
    return Report(markdown, data, files, failures)


# ---------------------------------------------------------------- command-line helpers


def caps_note(caps: Mapping[str, Any]) -> str:
    """``key=value, ...`` of the demo caps, for the printed notes."""
    return ", ".join(f"{k}={v}" for k, v in caps.items())


def load_experiment_config(path: str | Path, overrides: Sequence[str] = (),
                           caps: Mapping[str, Any] | None = None) -> Config:
    """``path`` + ``caps`` (demo limits) + the command line's ``key=value`` overrides, in that order."""
    from caee.config import load_config, parse_overrides

    cfg = load_config(path)
    if caps:
        cfg = with_overrides(cfg, caps)
    return with_overrides(cfg, parse_overrides(list(overrides)))


__all__ = ["Variant", "Outcome", "Report", "StageSpec", "STAGES", "with_overrides", "section_overrides",
           "make_variant", "run_variant", "run_variants", "evaluate_variant", "markdown_table",
           "table1_variants", "run_table1", "depth_variants", "run_depth_sweep", "check_depths",
           "backbone_depths", "load_experiment_config", "TABLE1_PAPER", "TABLE1_DEMO_OCS", "TABLE1_DEMO_CAPS",
           "DEPTH_DEMO_CAPS"]


def run_driver(run: Callable[[], "Report"]) -> int:
    """Run a driver under the CLI error guard, then print its report and wall time; the exit code."""
    from caee.cli import guarded

    t0 = time.perf_counter()
    done: list[Report] = []
    rc = guarded(lambda: done.append(run()))
    return rc or print_report(done[0], time.perf_counter() - t0)


def print_report(report: "Report", seconds: float) -> int:
    """Print a driver's table, its files and failures; exit code 1 when a variant failed."""
    print(report.markdown)
    print(f"\nfiles: {', '.join(map(str, report.files))}; wall time {seconds:.0f} s")
    for failure in report.failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
