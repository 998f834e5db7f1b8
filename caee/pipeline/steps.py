"""The stage registry: every step an experiment can run, the stage configs it calls, what it reads and writes.

A step is one stage (a module of ``caee/stages``) run for one purpose of an experiment; the
pipeline and both reproduction drivers draw their steps from :data:`STEPS`:

    train_classifier   the ordinary classifier (OC)
    train_cgnet        the CGNet with class-specific erasing against the frozen OC
    train_control      the same CGNet WITHOUT the erasing loss (w = 0), in <work_dir>/control
    cam_classifier     OC CAMs
    cam_cgnet          CGNet CAMs (+ CRF labels of cam.crf_alphas); first on data.train_split when
                       train_affinity follows and reads them
    cam_control        control CAMs
    train_affinity     AffinityNet from the CGNet CAMs' CRF labels
    pseudo_labels      random walk -> pseudo labels
    train_deeplab      DeepLab on the pseudo labels, evaluated on its eval split

Paths come from :class:`caee.core.layout.Layout`; a step's stage config differs from the experiment
config only where the step needs it (the CAM source and split, the control's erasing weight).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from caee.core.config import Config, expand_work_dir
from caee.core.layout import Layout, crf_dir, crf_dirs_of, pictures_dir
from caee.core.provenance import settings_of


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with fields of its sections replaced: ``cam={"source": "classifier"}``."""
    out = dataclasses.replace(cfg)
    for section, fields in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **fields) if isinstance(fields, dict)
                else fields)
    return out


def control_config(cfg: Config) -> Config:
    """The control CGNet: same OC, same recipe, no erasing loss (w = 0), in its own work_dir."""
    return replace(cfg, work_dir=str(Layout(cfg).control_work_dir()), masking={"cse_init": 0.0, "cse_slope": 0.0},
                   train_cgnet={"oc_weights": str(Layout(cfg).oc_weights())})


def _control_layout(cfg: Config) -> Layout:
    return Layout(control_config(cfg), derived_only=True)


def _cam_split(cfg: Config) -> str:
    return cfg.cam.split or cfg.data.cam_split


def _cam_call(cfg: Config, layout: Layout, source: str, split: str, alphas: Sequence[float]) -> Config:
    """make_cam's config for ``source``'s CAMs on ``split``, with the folders of ``layout``."""
    return replace(cfg, cam={"source": source, "split": split, "crf_alphas": list(alphas),
                             "out_dir": str(layout.cam_dir(source)), "weights": str(layout.cam_weights(source))})


def _cgnet_cam_splits(cfg: Config, plan: Sequence[str]) -> list[str]:
    """data.train_split first when AffinityNet follows and learns from these CAMs, then the CAM split."""
    main = _cam_split(cfg)
    needs_train = "train_affinity" in plan and not cfg.train_affinity.cam_dir
    return list(dict.fromkeys(([cfg.data.train_split] if needs_train else []) + [main]))


def _cam_outputs(cam_dir: Path, alphas: Sequence[float]) -> list[Path]:
    return [cam_dir, pictures_dir(cam_dir), *{crf_dir(cam_dir, a) for a in alphas}, *crf_dirs_of(cam_dir)]


@dataclass(frozen=True)
class Step:
    """name: as in markers and ``--stages``; stage: the ``caee.stages`` module (and provenance key);
    calls: the stage configs to run, given the experiment config and the step names of the plan;
    reads / writes: the folders and files it reads and the folders it owns (removed before a redo);
    speed: ``train`` when its images/s are training throughput, else ``inference``."""
    name: str
    stage: str
    calls: Callable[[Config, Sequence[str]], list[Config]]
    reads: Callable[[Config], list[Path]]
    writes: Callable[[Config], list[Path]]
    speed: str = "train"

    def settings(self, calls: Sequence[Config]) -> list[dict]:
        return [settings_of(expand_work_dir(c), self.stage) for c in calls]


def paths_in(settings: dict[str, Any]) -> list[Path]:
    """The values of a step's settings that name paths (``init``, ``pretrained``, ... after {work_dir})."""
    return [Path(v) for v in settings.values() if isinstance(v, str) and "/" in v]


STEPS: dict[str, Step] = {s.name: s for s in [
    Step("train_classifier", "train_classifier", lambda c, p: [c], lambda c: [],
         lambda c: [Layout(c).stage_dir("train_classifier")]),
    Step("train_cgnet", "train_cgnet", lambda c, p: [c], lambda c: [Layout(c).oc_weights()],
         lambda c: [Layout(c).stage_dir("train_cgnet")]),
    Step("train_control", "train_cgnet", lambda c, p: [control_config(c)], lambda c: [Layout(c).oc_weights()],
         lambda c: [_control_layout(c).stage_dir("train_cgnet")]),
    Step("cam_classifier", "make_cam",
         lambda c, p: [_cam_call(c, Layout(c), "classifier", _cam_split(c), [])],
         lambda c: [Layout(c).cam_weights("classifier")],
         lambda c: _cam_outputs(Layout(c).cam_dir("classifier"), []), "inference"),
    Step("cam_cgnet", "make_cam",
         lambda c, p: [_cam_call(c, Layout(c), "cgnet", s, c.cam.crf_alphas) for s in _cgnet_cam_splits(c, p)],
         lambda c: [Layout(c).cam_weights("cgnet")],
         lambda c: _cam_outputs(Layout(c).cam_dir("cgnet"), c.cam.crf_alphas), "inference"),
    Step("cam_control", "make_cam",
         lambda c, p: [_cam_call(control_config(c), _control_layout(c), "cgnet", _cam_split(c), [])],
         lambda c: [_control_layout(c).cam_weights("cgnet")],
         lambda c: _cam_outputs(_control_layout(c).cam_dir("cgnet"), []), "inference"),
    Step("train_affinity", "train_affinity", lambda c, p: [c], lambda c: [Layout(c).affinity_cam_dir()],
         lambda c: [Layout(c).stage_dir("train_affinity")]),
    Step("pseudo_labels", "make_pseudo_labels", lambda c, p: [c],
         lambda c: [Layout(c).pseudo_label_cam_dir(), Layout(c).affinity_weights()],
         lambda c: [Layout(c).pseudo_labels()], "inference"),
    Step("train_deeplab", "train_deeplab", lambda c, p: [c], lambda c: [Layout(c).deeplab_labels()],
         lambda c: [Layout(c).stage_dir("train_deeplab")]),
]}


def images_per_s(step: Step, results: Sequence[Any], seconds: float) -> float | None:
    """The step's throughput from what its stage calls returned: training images/s of a trainer
    (FitResult, or train_deeplab's results dict), CAMs computed per second of make_cam, pseudo
    labels per second of the whole stage. None when unknown (e.g. under torchrun)."""
    if not results or any(r is None for r in results):
        return None
    last = results[-1]
    if step.stage == "make_cam":
        computed, secs = sum(r.computed for r in results), sum(r.seconds for r in results)
        return round(computed / secs, 2) if computed and secs > 0 else None
    if isinstance(last, dict):
        value = last.get("train_images_per_s")
    elif isinstance(last, Path):  # make_pseudo_labels: the label folder with its DONE record
        images = json.loads((last / "DONE").read_text()).get("images") if (last / "DONE").is_file() else None
        value = images / seconds if images and seconds > 0 else None
    else:
        value = getattr(last, "images_per_s", None)
    return None if value is None else round(float(value), 2)

