"""Config variants of one experiment, each run by the step runner in a work_dir of its own.

An experiment (a reproduction driver) has a root folder (``<work_dir>/table1``,
``<work_dir>/masking_depth``) with one sub-folder per variant, which is that variant's ``work_dir``::

    <root>/<variant>/train_classifier, cam_classifier, train_cgnet, cam_cgnet, ...   step outputs
    (each output folder holds its record.json, caee/core/records.py, as in run_pipeline.py)
    <root>/<variant>/eval/<set>_<split>.json  evaluate_cam_dir / evaluate_label_dir result

Skipping, re-running and resuming are the runner's (caee/pipeline/runner.py): a second run skips every
step whose settings and upstream runs still hold, and re-runs exactly the steps a changed key
affects (in this variant and in the variants that read its outputs). A variant that fails is
reported by name and the others go on; the variants that need it are not run.

Every variant derives its paths from its own work_dir (caee/core/layout.py), so a base config that sets
a path key (``cam.out_dir``, ``train_cgnet.oc_weights``, ...) is refused: one folder would be shared
by all variants. A value written with ``{work_dir}`` follows each variant and is accepted.
Tables are measured on ``data.cam_split`` without CRF labels: each variant runs with
``cam.split`` and ``pseudo_labels.split`` empty (= data.cam_split) and ``cam.crf_alphas = []``.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from caee.core import distributed
from caee.core.config import Config, config_from_dict, config_to_dict
from caee.core.errors import CaeeError
from caee.core.io import write_json
from caee.core.layout import Layout
from caee.core.logs import setup_logging
from caee.pipeline.runner import Job, Summary, jobs_of, run_jobs
from caee.stages.table import STAGES

logger = logging.getLogger(__name__)

# path keys that a variant must derive from its own work_dir
PATH_KEYS = ("cam.out_dir", "cam.weights", "train_cgnet.oc_weights", "train_affinity.cam_dir",
             "pseudo_labels.cam_dir", "pseudo_labels.weights", "pseudo_labels.out_dir", "train_deeplab.label_dir",
             "train_deeplab.weights", "eval.dir", "eval.out")
# what every variant runs with: the tables are on data.cam_split and need no CRF labels
VARIANT_SETTINGS = {"cam.split": "", "pseudo_labels.split": "", "cam.crf_alphas": []}


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
    wrong types raise CaeeError naming the key (as in :func:`caee.core.config.load_config`).
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


def shared_paths(cfg: Config) -> list[str]:
    """The path keys ``cfg`` sets to one fixed place (not following ``{work_dir}``)."""
    flat = _flatten(config_to_dict(cfg))
    return [f"{k}={flat[k]!r}" for k in PATH_KEYS if flat[k] and "{work_dir}" not in flat[k]]


@dataclass
class Variant:
    """One configuration of an experiment.

    name: folder name under the experiment root (and the table key); cfg: the complete config,
    ``cfg.work_dir = <root>/<name>``; steps: step names (caee/stages/table.py), in order; after: variants
    whose outputs this one reads (they run first; if they fail this one is not run); meta: table
    columns such as the masking depth.
    """
    name: str
    cfg: Config
    steps: tuple[str, ...]
    after: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.work_dir)

    def jobs(self) -> list[Job]:
        return jobs_of(self.cfg, self.steps, f"variant {self.name}: ")


def make_variant(base: Config, root: Path, name: str, overrides: Mapping[str, Any], steps: Sequence[str],
                 after: Sequence[str] = (), meta: Mapping[str, Any] | None = None) -> Variant:
    """``base`` + :data:`VARIANT_SETTINGS` + ``overrides`` with ``work_dir = root / name``; every
    path follows that work_dir (a base config that fixes a path key is refused)."""
    shared = shared_paths(base)
    if shared:
        raise CaeeError(f"{', '.join(shared)}: a path key set in the config would be shared by every variant of "
                        "the experiment; leave it empty (each variant derives it from its own work_dir) or write "
                        "it with {work_dir}")
    try:
        cfg = with_overrides(base, {**VARIANT_SETTINGS, **overrides, "work_dir": str(Path(root) / name)})
        jobs_of(cfg, steps)  # unknown step names
    except CaeeError as e:
        raise CaeeError(f"variant '{name}': {e}") from None
    return Variant(name, cfg, tuple(steps), tuple(after), dict(meta or {}))


@dataclass
class Outcome:
    """What running a variant did: steps run / skipped, their seconds, the scores by evaluated set
    (``cam_classifier``, ``cam_cgnet``, ``pseudo_labels``: evaluation summaries, mIoU as
    fractions) and, on failure, an error message that names the variant."""
    name: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    error: str | None = None


def evaluate_variant(variant: Variant) -> dict[str, dict]:
    """Score the variant's CAM folders and pseudo labels on data.cam_split; each full result is
    written to ``<variant>/eval/<set>_<split>.json``. Returns ``{set: summary}`` (mIoU fractions)."""
    from caee.data import ensure_dataset, load_split
    from caee.engine.scoring import evaluate_cam_dir, evaluate_label_dir

    cfg, layout = variant.cfg, Layout(variant.cfg)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, cfg.data.cam_split)
    workers = cfg.eval.workers or None
    scores = {}
    for step in variant.steps:
        if step in ("cam_classifier", "cam_cgnet"):
            result = evaluate_cam_dir(layout.cam_dir(step[4:]), index, cfg.eval.thresholds, cfg.eval.threshold,
                                      workers)
        elif step == "pseudo_labels":
            result = evaluate_label_dir(STAGES["make_pseudo_labels"].output(layout), index, workers)
        else:
            continue
        write_json(layout.eval_file(step, cfg.data.cam_split), result)
        scores[step] = result["summary"]
    return scores


def run_variant(variant: Variant, context: Sequence[Job] = (), overwrite: bool = False) -> Outcome:
    """Run the steps of ``variant`` (``context``: the jobs of every variant, where upstream steps
    are looked up) and evaluate it.

    A CaeeError (bad input) ends the variant: it is logged and kept in ``Outcome.error`` with the
    variant's name and step; any other exception propagates with a note naming the variant.
    """
    out = Outcome(variant.name)
    summary = Summary(out.ran, out.skipped, out.seconds)
    jobs = variant.jobs()
    try:
        run_jobs(jobs, context or jobs, overwrite, summary=summary, where=f"variant '{variant.name}'")
        if distributed.is_main():
            out.scores = evaluate_variant(variant)
    except CaeeError as e:
        msg = str(e)
        out.error = msg if msg.startswith(f"variant '{variant.name}'") else f"variant '{variant.name}': {msg}"
        logger.error("%s", out.error)
    return out


def run_variants(variants: Sequence[Variant], log_dir: Path | None = None, overwrite: bool = False) -> list[Outcome]:
    """Run the variants in order (a variant's ``after`` must come before it); returns one Outcome
    each. A variant whose dependency failed is not run."""
    context = [j for v in variants for j in v.jobs()]
    done: dict[str, Outcome] = {}
    for v in variants:
        missing = [a for a in v.after if a not in done]
        failed = [a for a in v.after if a in done and done[a].error]
        if missing or failed:
            why = f"needs variant(s) {missing} that come later" if missing else f"variant(s) {failed} it needs failed"
            done[v.name] = Outcome(v.name, error=f"variant '{v.name}' not run: {why}")
            logger.error("%s", done[v.name].error)
            continue
        done[v.name] = run_variant(v, context, overwrite)
        if log_dir is not None:
            setup_logging(log_dir)  # the stages pointed the log file at their own folders
    return [done[v.name] for v in variants]


def load_experiment_config(path: str | Path, overrides: Sequence[str] = (),
                           caps: Mapping[str, Any] | None = None) -> Config:
    """``path`` + ``caps`` (demo limits) + the command line's ``key=value`` overrides, in that order."""
    from caee.core.config import load_config, parse_overrides

    cfg = load_config(path)
    if caps:
        cfg = with_overrides(cfg, caps)
    return with_overrides(cfg, parse_overrides(list(overrides)))


# the note under a demo's table ({} = the caps as the run used them)
DEMO_NOTE = ("demo: {}; no ImageNet weights anywhere (the synthetic set), so the numbers are not comparable "
             "to the paper's; the direction is.")


def caps_note(caps: Mapping[str, Any], cfg: Config | None = None) -> str:
    """``key=value, ...`` of the demo caps, for the notes under a table; with ``cfg``, the value each
    key has there (a command-line override of a cap shows, e.g. a second seed's work_dir)."""
    def value(key: str) -> Any:
        return functools.reduce(getattr, key.split("."), cfg) if cfg is not None else caps[key]

    return ", ".join(f"{k}={value(k)}" for k in caps)
