"""Where every artifact of an experiment lives: the one place that turns a config into paths.

Each path key of the config (``cam.out_dir``, ``cam.weights``, ``train_cgnet.oc_weights``,
``train_affinity.cam_dir``, ``pseudo_labels.cam_dir`` / ``weights`` / ``out_dir``,
``train_deeplab.label_dir`` / ``weights``, ``eval.dir`` / ``out``) is honoured here; when it is
empty the path follows ``work_dir``::

    <work_dir>/train_classifier/{model.pth, last.pth, log.txt, metrics.jsonl, config.yaml}
    <work_dir>/train_cgnet/...                       the CGNet (same files)
    <work_dir>/cam_<source>/<id>.npz                 cam.out_dir for cam.source
    <work_dir>/cam_<source>_crf_<alpha>/<id>.png     dense-CRF labels of those CAMs
    <work_dir>/cam_<source>_pictures/<id>.png
    <work_dir>/train_affinity/...                    the AffinityNet
    <work_dir>/pseudo_labels/<id>.png                pseudo_labels.out_dir (+ its log and config)
    <work_dir>/train_deeplab/{model.pth, pred_<split>/, pred_<split>_crf/, results_<split>.json}
    <work_dir>/eval/<folder>_<split>.json            eval_miou.py
    <work_dir>/pipeline/<step>/config.yaml           a step's config when run under torchrun
    <work_dir>/control/...                           the w = 0 control run: a work_dir of its own
    <work_dir>/results.{md,json}, fig3_cams.png, fig4_segmentation.png

``cam.out_dir`` and ``cam.weights`` belong to ``cam.source`` (default the CGNet): they are the
CGNet CAMs that AffinityNet, the pseudo labels and the results table read. The CAMs of the other
source stay in ``<work_dir>/cam_<source>``.
"""
from __future__ import annotations

from pathlib import Path

from caee.core.config import Config

STEP_CONFIGS = "pipeline"
CONTROL = "control"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"


def crf_dir(cam_dir: str | Path, alpha: float) -> Path:
    """The dense-CRF outputs of the CAMs in ``cam_dir`` at background alpha ``alpha``:
    ``.../cam_cgnet`` -> ``.../cam_cgnet_crf_4`` (alpha 4)."""
    cam_dir = Path(cam_dir)
    return cam_dir.parent / f"{cam_dir.name}_crf_{alpha:g}"


def cell_label_dir(cam_dir: str | Path, la_alpha: float, ha_alpha: float, stride: int) -> Path:
    """AffinityNet's cell label tables (PSA's pooled la / ha CRF labels, caee.method.affinity_labels) of
    the CAMs in ``cam_dir``: ``.../cam_cgnet`` -> ``.../cam_cgnet_cells_4_24_s8``."""
    cam_dir = Path(cam_dir)
    return cam_dir.parent / f"{cam_dir.name}_cells_{la_alpha:g}_{ha_alpha:g}_s{stride}"


def ir_label_dir(cam_dir: str | Path, fg: float, bg: float) -> Path:
    """IRN's relation labels of the CAMs in ``cam_dir`` at thresholds ``fg`` / ``bg``:
    ``.../cam_cgnet`` -> ``.../cam_cgnet_irlabels_0.3_0.05``."""
    cam_dir = Path(cam_dir)
    return cam_dir.parent / f"{cam_dir.name}_irlabels_{fg:g}_{bg:g}"


def pictures_dir(cam_dir: str | Path) -> Path:
    """``.../cam_cgnet`` -> ``.../cam_cgnet_pictures`` (image | GT | CAM pictures)."""
    cam_dir = Path(cam_dir)
    return cam_dir.parent / f"{cam_dir.name}_pictures"


def split_name(split: str) -> str:
    """A split's name in file names: ``val`` -> ``val``, ``lists/my_val.txt`` -> ``my_val``."""
    return Path(split).stem if split.endswith(".txt") else split


def predictions_name(split: str, crf: bool = False) -> str:
    """DeepLab's prediction folder of ``split`` inside its stage folder: ``pred_val`` (``pred_val_crf``)."""
    return f"pred_{split_name(split)}{'_crf' if crf else ''}"


def results_name(split: str) -> str:
    """DeepLab's result file of ``split`` inside its stage folder: ``results_val.json``."""
    return f"results_{split_name(split)}.json"


class Layout:
    """The paths of the experiment described by ``cfg`` (nothing is created or checked).

    derived_only: ignore the config's path keys and derive every path from ``work_dir`` (a run
    that lives inside another one, such as the control run, must not share the outer run's
    explicit folders)."""

    def __init__(self, cfg: Config, derived_only: bool = False):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.derived_only = derived_only

    def _or(self, value: str, default: Path) -> Path:
        return Path(value) if value and not self.derived_only else default

    # ------------------------------------------------------------ stage folders and checkpoints

    def stage_dir(self, stage: str) -> Path:
        """``<work_dir>/<stage>``: a trainer's folder (log, config, checkpoints)."""
        return self.work / stage

    def model(self, stage: str) -> Path:
        """The final weights of a trainer: ``<work_dir>/<stage>/model.pth``."""
        return self.stage_dir(stage) / "model.pth"

    def last(self, stage: str) -> Path:
        """A trainer's resume checkpoint: ``<work_dir>/<stage>/last.pth``."""
        return self.stage_dir(stage) / "last.pth"

    # ------------------------------------------------------------ CAMs

    def cam_dir(self, source: str | None = None) -> Path:
        """The CAMs of ``source`` (default cam.source): cam.out_dir for cam.source, else
        ``<work_dir>/cam_<source>``."""
        source = source or self.cfg.cam.source
        default = self.work / f"cam_{source}"
        return self._or(self.cfg.cam.out_dir, default) if source == self.cfg.cam.source else default

    def cam_weights(self, source: str | None = None) -> Path:
        """The network make_cam reads for ``source``: cam.weights for cam.source, else the trainer's model."""
        source = source or self.cfg.cam.source
        default = self.model(f"train_{source}")
        return self._or(self.cfg.cam.weights, default) if source == self.cfg.cam.source else default

    def crf_dir(self, alpha: float, source: str = "cgnet") -> Path:
        """The CRF labels of ``source``'s CAMs at background alpha ``alpha``."""
        return crf_dir(self.cam_dir(source), alpha)

    # ------------------------------------------------------------ inputs of the later stages

    def oc_weights(self) -> Path:
        """The frozen OC of the CGNet: train_cgnet.oc_weights, else the classifier's model.pth."""
        return self._or(self.cfg.train_cgnet.oc_weights, self.model("train_classifier"))

    def affinity_cam_dir(self) -> Path:
        """CAMs AffinityNet learns from: train_affinity.cam_dir, else the CGNet CAMs."""
        return self._or(self.cfg.train_affinity.cam_dir, self.cam_dir("cgnet"))

    def pseudo_label_cam_dir(self) -> Path:
        """CAMs the random walk propagates: pseudo_labels.cam_dir, else the CGNet CAMs."""
        return self._or(self.cfg.pseudo_labels.cam_dir, self.cam_dir("cgnet"))

    def affinity_weights(self) -> Path:
        """The AffinityNet of the random walk: pseudo_labels.weights, else train_affinity's model.pth."""
        return self._or(self.cfg.pseudo_labels.weights, self.model("train_affinity"))

    def pseudo_labels(self) -> Path:
        """The pseudo labels (and the stage's log / config): pseudo_labels.out_dir or <work_dir>/pseudo_labels."""
        return self._or(self.cfg.pseudo_labels.out_dir, self.work / "pseudo_labels")

    def deeplab_labels(self) -> Path:
        """What DeepLab trains on: train_deeplab.label_dir, else the labels of pseudo_labels.method."""
        made = self.irn_pseudo_labels() if self.cfg.pseudo_labels.method == "irn" else self.pseudo_labels()
        return self._or(self.cfg.train_deeplab.label_dir, made)

    # ------------------------------------------------------------ IRN (pseudo_labels.method: irn)

    def irn_cam_dir(self) -> Path:
        """CAMs IRN learns from and walks: irn.cam_dir, else the CGNet CAMs."""
        return self._or(self.cfg.irn.cam_dir, self.cam_dir("cgnet"))

    def irn_weights(self) -> Path:
        """IRN's boundary network for the walk: irn.weights, else train_irn's model.pth."""
        return self._or(self.cfg.irn.weights, self.model("train_irn"))

    def irn_pseudo_labels(self) -> Path:
        """IRN's pseudo labels: irn.out_dir or <work_dir>/pseudo_labels_irn."""
        return self._or(self.cfg.irn.out_dir, self.work / "pseudo_labels_irn")

    def deeplab_weights(self) -> Path:
        """The DeepLab that eval_only segments: train_deeplab.weights, else its model.pth."""
        return self._or(self.cfg.train_deeplab.weights, self.model("train_deeplab"))

    # ------------------------------------------------------------ predictions and evaluation

    def deeplab_eval_split(self) -> str:
        return self.cfg.train_deeplab.eval_split or self.cfg.data.val_split

    def predictions(self, split: str | None = None, crf: bool = False) -> Path:
        """DeepLab's label PNGs of ``split`` (default its eval split), with or without the CRF."""
        return self.stage_dir("train_deeplab") / predictions_name(split or self.deeplab_eval_split(), crf)

    def deeplab_results(self, split: str | None = None) -> Path:
        """``<work_dir>/train_deeplab/results_<split>.json``."""
        return self.stage_dir("train_deeplab") / results_name(split or self.deeplab_eval_split())

    def eval_split(self) -> str:
        return self.cfg.eval.split or self.cfg.data.cam_split

    def eval_dir(self) -> Path:
        """The folder eval_miou.py scores: eval.dir, else the CAMs of cam.source."""
        return self._or(self.cfg.eval.dir, self.cam_dir())

    def eval_out(self, folder: Path | None = None, split: str | None = None) -> Path:
        """eval.out, else ``<work_dir>/eval/<folder name>_<split>.json`` (folder default :meth:`eval_dir`)."""
        if self.cfg.eval.out:
            return Path(self.cfg.eval.out)
        return self.eval_file((folder or self.eval_dir()).name, split or self.eval_split())

    def eval_file(self, name: str, split: str) -> Path:
        """``<work_dir>/eval/<name>_<split>.json``."""
        return self.work / "eval" / f"{name}_{Path(split).stem}.json"

    # ------------------------------------------------------------ the pipeline's own files

    def step_configs(self) -> Path:
        """The configs of the pipeline's steps run under torchrun."""
        return self.work / STEP_CONFIGS

    def control_work_dir(self) -> Path:
        """The w = 0 control run's own work_dir."""
        return self.work / CONTROL

    def results_md(self) -> Path:
        return self.work / RESULTS_MD

    def results_json(self) -> Path:
        return self.work / RESULTS_JSON

    def timings_json(self) -> Path:
        """Each stage's wall time and images/s (results.json keeps only seed-determined numbers)."""
        return self.work / "timings.json"

    def figure(self, name: str) -> Path:
        """``fig3_cams`` -> ``<work_dir>/fig3_cams.png``."""
        return self.work / f"{name}.png"

    def experiment_root(self, experiment: str) -> Path:
        """``<work_dir>/<experiment>``: a reproduction driver's variants and tables."""
        return self.work / experiment
