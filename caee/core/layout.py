"""Where the artifacts of an experiment live, when no config key names them: paths follow ``work_dir``::

    <work_dir>/train_<net>/{model.pth, last.pth, log.txt, metrics.jsonl, config.yaml, record.json}
    <work_dir>/cam_<source>/<id>.npz                 cam.out_dir for cam.source
    <work_dir>/cam_<source>_crf_<alpha>/<id>.png     dense-CRF labels of those CAMs
    <work_dir>/pseudo_labels/<id>.png                pseudo labels
    <work_dir>/train_deeplab/{pred_<split>/, pred_<split>_crf/, results_<split>.json}
    <work_dir>/eval/<folder>_<split>.json            eval_miou
    <work_dir>/control/...                           the w = 0 control run: a work_dir of its own
    <work_dir>/results.{md,json}, timings.json, fig3_cams.png, fig4_segmentation.png

A stage's inputs and output are its row of the table of stages (caee/stages/table.py), which names
the config key that overrides each default (:meth:`Layout.at`). ``cam.out_dir`` and ``cam.weights``
belong to ``cam.source``; the CAMs of the other source stay in ``<work_dir>/cam_<source>``.
"""
from __future__ import annotations

from pathlib import Path

from caee.core.config import Config
from caee.core.records import MODEL


def crf_dir(cam_dir: str | Path, alpha: float) -> Path:
    """The CRF labels of the CAMs in ``cam_dir`` at background alpha ``alpha``: ``cam_cgnet`` -> ``cam_cgnet_crf_4``."""
    return Path(cam_dir).parent / f"{Path(cam_dir).name}_crf_{alpha:g}"


def cell_label_dir(cam_dir: str | Path, la_alpha: float, ha_alpha: float, stride: int) -> Path:
    """AffinityNet's cell label tables (caee.method.affinity_labels) of the CAMs in ``cam_dir``:
    ``cam_cgnet`` -> ``cam_cgnet_cells_4_24_s8``."""
    return Path(cam_dir).parent / f"{Path(cam_dir).name}_cells_{la_alpha:g}_{ha_alpha:g}_s{stride}"


def pictures_dir(cam_dir: str | Path) -> Path:
    """``cam_cgnet`` -> ``cam_cgnet_pictures`` (image | GT | CAM pictures)."""
    return Path(cam_dir).parent / f"{Path(cam_dir).name}_pictures"


def predictions_name(split: str, crf: bool = False) -> str:
    """DeepLab's prediction folder of ``split`` (``val`` or ``lists/my_val.txt``): ``pred_val`` (``pred_val_crf``)."""
    return f"pred_{Path(split).stem}{'_crf' if crf else ''}"


def results_name(split: str) -> str:
    """DeepLab's result file of ``split``: ``results_val.json``."""
    return f"results_{Path(split).stem}.json"


class Layout:
    """The paths of the experiment described by ``cfg`` (nothing is created or checked).

    derived_only: ignore the config's path keys and derive every path from ``work_dir`` (a run
    inside another one, such as the control run, must not share the outer run's explicit folders)."""

    def __init__(self, cfg: Config, derived_only: bool = False):
        self.cfg, self.work, self.derived_only = cfg, Path(cfg.work_dir), derived_only

    def at(self, key: str, default: Path) -> Path:
        """The path the config key ``key`` (``"cam.out_dir"``) names, else ``default``."""
        section, name = key.split(".")
        value = getattr(getattr(self.cfg, section), name)
        return Path(value) if value and not self.derived_only else default

    def stage_dir(self, stage: str) -> Path:
        """``<work_dir>/<stage>``: a trainer's folder (log, config, checkpoints); also a driver's variants."""
        return self.work / stage

    def model(self, stage: str) -> Path:  # a trainer's final weights
        return self.stage_dir(stage) / MODEL

    def cam_dir(self, source: str | None = None) -> Path:
        """The CAMs of ``source`` (default cam.source): cam.out_dir for cam.source, else ``<work_dir>/cam_<source>``."""
        source = source or self.cfg.cam.source
        default = self.work / f"cam_{source}"
        return self.at("cam.out_dir", default) if source == self.cfg.cam.source else default

    def cam_weights(self, source: str | None = None) -> Path:
        """The network make_cam reads for ``source``: cam.weights for cam.source, else the trainer's model."""
        source = source or self.cfg.cam.source
        default = self.model(f"train_{source}")
        return self.at("cam.weights", default) if source == self.cfg.cam.source else default

    def deeplab_eval_split(self) -> str:
        return self.cfg.train_deeplab.eval_split or self.cfg.data.val_split

    def predictions(self, split: str | None = None, crf: bool = False) -> Path:
        """DeepLab's label PNGs of ``split`` (default its eval split), with or without the CRF."""
        return self.stage_dir("train_deeplab") / predictions_name(split or self.deeplab_eval_split(), crf)

    def deeplab_results(self, split: str | None = None) -> Path:
        return self.stage_dir("train_deeplab") / results_name(split or self.deeplab_eval_split())

    def eval_split(self) -> str:
        return self.cfg.eval.split or self.cfg.data.cam_split

    def eval_dir(self) -> Path:
        """The folder eval_miou scores: eval.dir, else the CAMs of cam.source."""
        return self.at("eval.dir", self.cam_dir())

    def eval_out(self) -> Path:
        """eval.out, else ``<work_dir>/eval/<folder name>_<split>.json``."""
        return self.at("eval.out", self.eval_file(self.eval_dir().name, self.eval_split()))

    def eval_file(self, name: str, split: str) -> Path:
        return self.work / "eval" / f"{name}_{Path(split).stem}.json"

    def step_configs(self) -> Path:  # the configs of the pipeline's steps run under torchrun
        return self.work / "pipeline"

    def control_work_dir(self) -> Path:  # the w = 0 control run's own work_dir
        return self.work / "control"
