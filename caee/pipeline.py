"""The whole pipeline from one config: every stage in order, skipping finished ones, then a results table.

Stages (each the ``main`` of a stage module, run in this process or under torchrun):

    train_classifier   the ordinary classifier (OC)
    train_cgnet        the CGNet with class-specific erasing against the frozen OC
    train_control      pipeline.control: the same CGNet WITHOUT the erasing loss (w = 0), in <work_dir>/control
    cam_classifier     OC CAMs                     (cam.split)
    cam_cgnet          CGNet CAMs + CRF labels     (cam.split, crf alphas)
    cam_control        control CAMs
    train_affinity     AffinityNet from the CGNet CAMs' CRF labels
    pseudo_labels      random walk -> pseudo labels
    train_deeplab      DeepLab on the pseudo labels, evaluated on data.val_split
    results            results.md / results.json / pictures

A stage counts as finished when ``<work_dir>/pipeline/<stage>.done`` exists; the marker is written
only after the stage returned, so an interrupted pipeline re-runs the interrupted stage, which
itself resumes (trainers from last.pth, inference stages skip finished images).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from caee.config import Config, save_config
from caee.errors import CaeeError
from caee.io import write_json

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    name: str
    script: str                      # top-level script that runs it under torchrun
    configure: Callable[[Config], Config]  # the stage's view of the experiment config


def _replace(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with fields of its sections replaced: ``cam={"source": "classifier"}``."""
    out = dataclasses.replace(cfg)
    for section, fields in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **fields) if isinstance(fields, dict)
                else fields)
    return out


def control_config(cfg: Config) -> Config:
    """The control CGNet: same OC, same recipe, no erasing loss (w = 0), in <work_dir>/control."""
    oc = str(Path(cfg.work_dir) / "train_classifier" / "model.pth")
    return _replace(cfg, work_dir=str(Path(cfg.work_dir) / "control"), masking={"cse_init": 0.0, "cse_slope": 0.0},
                    train_cgnet={"oc_weights": cfg.train_cgnet.oc_weights or oc})


def stages(cfg: Config) -> list[Stage]:
    same = lambda c: c  # noqa: E731
    out = [Stage("train_classifier", "train_classifier.py", same),
           Stage("train_cgnet", "train_cgnet.py", same)]
    if cfg.pipeline.control:
        out.append(Stage("train_control", "train_cgnet.py", control_config))
    out += [Stage("cam_classifier", "make_cam.py", lambda c: _replace(c, cam={"source": "classifier", "crf_alphas": []})),
            Stage("cam_cgnet", "make_cam.py", lambda c: _replace(c, cam={"source": "cgnet"}))]
    if cfg.pipeline.control:
        out.append(Stage("cam_control", "make_cam.py",
                         lambda c: _replace(control_config(c), cam={"source": "cgnet", "crf_alphas": []})))
    out += [Stage("train_affinity", "train_affinity.py", same),
            Stage("pseudo_labels", "make_pseudo_labels.py", same),
            Stage("train_deeplab", "train_deeplab.py", same)]
    return out


def _stage_main(script: str) -> Callable[[Config], object]:
    from caee.stages import make_cam, make_pseudo_labels, train_affinity, train_cgnet, train_classifier, train_deeplab
    return {"train_classifier.py": train_classifier.main, "train_cgnet.py": train_cgnet.main,
            "make_cam.py": make_cam.main, "train_affinity.py": train_affinity.main,
            "make_pseudo_labels.py": make_pseudo_labels.main, "train_deeplab.py": train_deeplab.main}[script]


def _run_torchrun(stage: Stage, cfg: Config, nproc: int, marker_dir: Path) -> None:
    """Run one stage under torchrun with the stage's resolved config written next to the markers."""
    cfg_path = save_config(cfg, marker_dir / stage.name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / stage.script), "--config", str(cfg_path)]
    logger.info("running %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise CaeeError(f"stage {stage.name} failed under torchrun (see its log in {cfg.work_dir}); "
                        f"re-run the pipeline to resume it")


def run(cfg: Config, only: list[str] | None = None, nproc: int = 1) -> dict:
    """Run the stages (all, or those named in ``only``) and write the results table."""
    marker_dir = Path(cfg.work_dir) / "pipeline"
    marker_dir.mkdir(parents=True, exist_ok=True)
    all_stages = stages(cfg)
    names = [s.name for s in all_stages] + ["results"]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise CaeeError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    for stage in all_stages:
        if only and stage.name not in only:
            continue
        marker = marker_dir / f"{stage.name}.done"
        if marker.exists():
            logger.info("pipeline: %s finished earlier (%s), skipped", stage.name, marker)
            continue
        logger.info("pipeline: %s", stage.name)
        t0 = time.perf_counter()
        stage_cfg = stage.configure(cfg)
        if nproc > 1:
            _run_torchrun(stage, stage_cfg, nproc, marker_dir)
        else:
            _stage_main(stage.script)(stage_cfg)
        write_json(marker, {"seconds": round(time.perf_counter() - t0, 1)})
    if only and "results" not in only:
        return {}
    from caee.results import write_results
    return write_results(cfg, marker_dir)


def stage_seconds(marker_dir: Path) -> dict[str, float]:
    """Wall time of each finished stage, from its marker."""
    out = {}
    for p in sorted(marker_dir.glob("*.done")):
        out[p.stem] = json.loads(p.read_text()).get("seconds", 0.0)
    return out

