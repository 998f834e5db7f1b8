"""The table of stages (:data:`STAGES`: one row per stage, whose module ``caee/stages/<name>.py`` has
``main(cfg)`` and its usage as docstring) and the pipeline's steps (:data:`STEPS`: one stage run for
one purpose, e.g. the OC's and the CGNet's CAMs are two steps of ``make_cam``). The ``caee``
subcommands, the settings and input ids a stage records, the pipeline's order and the results
table all read them. It imports no stage module (and no torch): ``caee <command> --help`` is fast.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from caee.core.config import Config, replace
from caee.core.layout import Layout

PathOf = Callable[[Layout], Path]


def _all(cfg: Config) -> str:
    return "all"


@dataclass(frozen=True)
class Stage:
    """name: the stage's one name (module, subcommand, record); sections: the config sections whose
    keys determine its output (recorded), its own first (its ``overwrite``, which --overwrite sets,
    and a trainer's ``seed``); output: the folder holding its outputs and their record; inputs: the
    upstream outputs it reads, ``{name: (config key, default path)}`` (the key's value wins when set);
    part: what one run finishes (a split, or "all"); not_recorded: keys of ``sections`` that choose
    which files are made, not what is in them; reads: further sections it reads (listed by --help);
    speed: "train" (training images/s) or "inference"; generates: the ``pseudo_labels.method`` whose
    labels it writes (DeepLab's default labels, a row of the results table)."""
    name: str
    sections: tuple[str, ...]
    output: PathOf | None
    inputs: Mapping[str, tuple[str, PathOf]] = field(default_factory=dict)
    part: Callable[[Config], str] = _all
    not_recorded: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    speed: str = "train"
    generates: str = ""

    @property
    def section(self) -> str:
        return self.sections[0]

    @property
    def module(self) -> str:
        return f"caee.stages.{self.name}"

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def input_paths(self, layout: Layout) -> dict[str, tuple[str, Path]]:
        """``{name: (config key, path)}`` of the upstream outputs it reads."""
        return {name: (key, layout.at(key, default(layout))) for name, (key, default) in self.inputs.items()}

    def input(self, cfg: Config, name: str) -> Path:
        return self.input_paths(Layout(cfg))[name][1]


def module_doc(module: str) -> str:
    """A module's docstring (a stage's usage), read without importing it (and torch)."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded.__doc__ or ""
    origin = importlib.util.find_spec(module).origin
    return ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""


def _labels(lo: Layout) -> Path:
    """The pseudo labels of ``pseudo_labels.method``: the output of the stage that generates them."""
    return next(s for s in STAGES.values() if s.generates == lo.cfg.pseudo_labels.method).output(lo)


_DATA_SPLITS = ("data.train_split", "data.cam_split", "data.val_split")


def _cgnet_cam_dir(lo: Layout) -> Path:
    return lo.cam_dir("cgnet")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("train_classifier", ("train_classifier", "data"), lambda lo: lo.stage_dir("train_classifier"),
          reads=("logging",)),
    Stage("train_cgnet", ("train_cgnet", "data", "masking"), lambda lo: lo.stage_dir("train_cgnet"),
          {"oc": ("train_cgnet.oc_weights", lambda lo: lo.model("train_classifier"))}, reads=("logging",)),
    Stage("make_cam", ("cam", "data"), lambda lo: lo.cam_dir(), {"weights": ("cam.weights", lambda lo: lo.cam_weights())},
          part=lambda c: c.cam.split or c.data.cam_split,
          not_recorded=("cam.crf_alphas", "cam.split", "cam.out_dir", *_DATA_SPLITS), reads=("crf",),
          speed="inference"),
    Stage("train_affinity", ("train_affinity", "data", "crf"), lambda lo: lo.stage_dir("train_affinity"),
          {"cams": ("train_affinity.cam_dir", _cgnet_cam_dir)}, reads=("logging",)),
    Stage("make_pseudo_labels", ("pseudo_labels", "data", "crf"),
          lambda lo: lo.at("pseudo_labels.out_dir", lo.work / "pseudo_labels"),
          {"cams": ("pseudo_labels.cam_dir", _cgnet_cam_dir),
           "affinitynet": ("pseudo_labels.weights", lambda lo: lo.model("train_affinity"))},
          part=lambda c: c.pseudo_labels.split or c.data.cam_split,
          not_recorded=("pseudo_labels.split", "pseudo_labels.out_dir", *_DATA_SPLITS), reads=("train_affinity",),
          speed="inference", generates="affinitynet"),
    Stage("train_irn", ("irn", "data"), lambda lo: lo.stage_dir("train_irn"),
          {"cams": ("irn.cam_dir", _cgnet_cam_dir)},
          not_recorded=tuple(f"irn.{k}" for k in ("weights", "out_dir", "split", "beta", "exp_times", "radius",
                                                   "sem_seg_bg_thres", "cam_grid")), reads=("logging",)),
    Stage("make_irn_labels", ("irn", "data"), lambda lo: lo.at("irn.out_dir", lo.work / "pseudo_labels_irn"),
          {"cams": ("irn.cam_dir", _cgnet_cam_dir), "irn": ("irn.weights", lambda lo: lo.model("train_irn"))},
          part=lambda c: c.irn.split or c.data.cam_split,
          not_recorded=("irn.split", "irn.out_dir", *_DATA_SPLITS), speed="inference", generates="irn"),
    Stage("train_deeplab", ("train_deeplab", "data", "crf"), lambda lo: lo.stage_dir("train_deeplab"),
          {"labels": ("train_deeplab.label_dir", _labels)}, reads=("logging",)),
    Stage("eval_miou", ("eval", "data"), None, reads=("cam",)),
]}


def stage(name: str) -> Stage:
    """The row of ``name`` (``make-cam`` or ``make_cam``); KeyError when there is none."""
    return STAGES[name.replace("-", "_")]


# ---------------------------------------------------------------- the pipeline's steps


def control_config(cfg: Config) -> Config:
    """The control CGNet: same OC, same recipe, no erasing loss (w = 0), in its own work_dir."""
    return replace(cfg, work_dir=str(Layout(cfg).control_work_dir()), masking={"cse_init": 0.0, "cse_slope": 0.0},
                   train_cgnet={"oc_weights": str(STAGES["train_cgnet"].input(cfg, "oc"))})


def _cam_call(cfg: Config, layout: Layout, source: str, split: str, alphas: Sequence[float]) -> Config:
    """make_cam's config for ``source``'s CAMs on ``split``, with the folders of ``layout``."""
    return replace(cfg, cam={"source": source, "split": split, "crf_alphas": list(alphas),
                             "out_dir": str(layout.cam_dir(source)), "weights": str(layout.cam_weights(source))})


def _cgnet_cams(cfg: Config, plan: Sequence[str]) -> list[Config]:
    """data.train_split first when a trainer of the plan learns from these CAMs, then the CAM split."""
    learners = [STAGES[STEPS[n].stage] for n in plan if STAGES[STEPS[n].stage].speed == "train"]
    needs_train = any(p == Layout(cfg).cam_dir("cgnet") for s in learners for _, p in s.input_paths(Layout(cfg)).values())
    splits = dict.fromkeys(([cfg.data.train_split] if needs_train else []) + [STAGES["make_cam"].part(cfg)])
    return [_cam_call(cfg, Layout(cfg), "cgnet", s, cfg.cam.crf_alphas) for s in splits]


def _control_cams(cfg: Config, plan: Sequence[str]) -> list[Config]:
    control = control_config(cfg)
    return [_cam_call(control, Layout(control, derived_only=True), "cgnet", STAGES["make_cam"].part(cfg), [])]


@dataclass(frozen=True)
class Step:
    """name: as in ``--stages`` and the timings; stage: the row it runs; calls: the stage configs to
    run, given the experiment config and the step names of the plan; control: a step of the w = 0
    control (run when ``pipeline.control``)."""
    name: str
    stage: str
    calls: Callable[[Config, Sequence[str]], list[Config]] = lambda c, p: [c]
    control: bool = False
    generator: str = ""     # the pseudo-label generator it belongs to (pseudo_labels.method)


STEPS: dict[str, Step] = {s.name: s for s in [
    Step("train_classifier", "train_classifier"),
    Step("train_cgnet", "train_cgnet"),
    Step("train_control", "train_cgnet", lambda c, p: [control_config(c)], control=True),
    Step("cam_classifier", "make_cam",
         lambda c, p: [_cam_call(c, Layout(c), "classifier", STAGES["make_cam"].part(c), [])]),
    Step("cam_cgnet", "make_cam", _cgnet_cams),
    Step("cam_control", "make_cam", _control_cams, control=True),
    Step("train_affinity", "train_affinity", generator="affinitynet"),
    Step("pseudo_labels", "make_pseudo_labels", generator="affinitynet"),
    Step("train_irn", "train_irn", generator="irn"),
    Step("irn_labels", "make_irn_labels", generator="irn"),
    Step("train_deeplab", "train_deeplab"),
]}


def plan(cfg: Config) -> list[str]:
    """The pipeline's step names, in order: the control steps when ``pipeline.control``; the steps of
    ``pseudo_labels.method`` (and of the other generator too with ``pseudo_labels.compare``)."""
    pl = cfg.pseudo_labels
    return [s.name for s in STEPS.values() if (cfg.pipeline.control or not s.control)
            and (not s.generator or s.generator == pl.method or pl.compare)]
