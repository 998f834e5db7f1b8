"""The table of stages: every stage's one name, config sections, inputs, output and usage; the pipeline's steps.

A stage is a module ``caee/stages/<name>.py`` with ``main(cfg)``, its config section(s) and one row of
:data:`STAGES`. Everything else reads this table: the ``caee`` subcommands (``caee <name>``, dashes or
underscores) and their ``--overwrite``, the settings and input ids a stage records
(:func:`caee.stages.common.stage_settings`), the pipeline's steps and their order (:data:`STEPS`),
the records the pipeline checks and the timings of the results table. It imports no stage module
(and so no torch): ``caee <command> --help`` answers at once.

A pipeline step is one stage run for one purpose of the experiment: the OC's CAMs and the CGNet's
CAMs are two steps of ``make_cam``; the w = 0 control is ``train_cgnet`` in ``<work_dir>/control``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from caee.core.config import Config
from caee.core.layout import Layout

Inputs = Callable[[Layout], dict[str, tuple[str, Path]]]


def _none(layout: Layout) -> dict[str, tuple[str, Path]]:
    return {}


def _all(cfg: Config) -> str:
    return "all"


@dataclass(frozen=True)
class Stage:
    """name: the stage's one name (module, subcommand, record); sections: the config sections whose
    keys determine its output (recorded); section: its own section (its ``overwrite``, which
    --overwrite sets, and a trainer's ``seed`` and recipe);
    output: the folder holding its outputs and their record; inputs: the upstream outputs it reads,
    ``{name: (config key, path)}``; part: what one run finishes (a split, or "all"); not_recorded:
    keys of ``sections`` that choose which files are made, not what is in them; reads: further
    sections it reads (listed by --help); speed: "train" (training images/s) or "inference"."""
    name: str
    sections: tuple[str, ...]
    section: str
    output: Callable[[Layout], Path] | None
    inputs: Inputs
    doc: str
    part: Callable[[Config], str] = _all
    not_recorded: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    speed: str = "train"

    @property
    def module(self) -> str:
        return f"caee.stages.{self.name}"

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")


_DATA_SPLITS = ("data.train_split", "data.cam_split", "data.val_split")

IRN_TRAIN_DOC = """\
Train IRN's class-boundary network on relation labels from a CAM folder (pseudo_labels.method: irn).

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet (or irn.cam_dir: any
        CAM folder); irn.net.pretrained (torchvision ImageNet ResNet50) or irn.init.
Output: <work_dir>/train_irn/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json};
        relation labels cached in <cam_dir>_irlabels_<fg>_<bg>/ (with their record).

    caee train-irn --config configs/voc/r38_irn.yaml data.root=/data/VOC2012
"""
IRN_LABELS_DOC = """\
Pseudo labels by IRN's semantic walk of the CAMs along the trained boundary map.

Input:  data.root (images of irn.split, default data.cam_split); the CAMs (irn.cam_dir, default
        <work_dir>/cam_cgnet); the boundary network <work_dir>/train_irn/model.pth (or irn.weights).
Output: <out_dir>/<id>.png palette label maps and <out_dir>/record.json (out_dir = irn.out_dir,
        default <work_dir>/pseudo_labels_irn).

    caee make-irn-labels --config configs/voc/r38_irn.yaml data.root=/data/VOC2012
"""

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("train_classifier", ("data", "train_classifier"), "train_classifier",
          lambda lo: lo.stage_dir("train_classifier"), _none, """\
Stage 1: train the ordinary classifier (OC) on image-level labels.

Input:  data.root (images + image-level labels of data.train_split); train_classifier.net.pretrained
        (ImageNet weights: MXNet .params or .pth) or train_classifier.init (a PSA/caee checkpoint).
Output: <work_dir>/train_classifier/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-classifier --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-classifier --config configs/voc/r38.yaml
""", reads=("logging",)),
    Stage("train_cgnet", ("data", "masking", "train_cgnet"), "train_cgnet",
          lambda lo: lo.stage_dir("train_cgnet"), lambda lo: {"oc": ("train_cgnet.oc_weights", lo.oc_weights())},
          """\
Stage 2: train the CGNet with class-specific adversarial erasing against the frozen OC.

Input:  data.root; the OC from <work_dir>/train_classifier/model.pth or train_cgnet.oc_weights
        (our model.pth or PSA's res38_cls.pth / OC-CSE's od_cam.pth); train_cgnet.net.pretrained.
Output: <work_dir>/train_cgnet/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-cgnet --config configs/voc/r38.yaml data.root=/data/VOC2012
    caee train-cgnet --config configs/demo.yaml masking.depth=3   # feature-level masking
""", reads=("logging",)),
    Stage("make_cam", ("data", "cam"), "cam", lambda lo: lo.cam_dir(),
          lambda lo: {"weights": ("cam.weights", lo.cam_weights())}, """\
Stage 3: multi-scale + flip CAMs of the CGNet (cam.source=cgnet) or the OC (cam.source=classifier).

Input:  data.root (images + image-level labels of cam.split, default data.cam_split);
        cam.weights (default <work_dir>/train_<cam.source>/model.pth, or a PSA-format .pth).
Output: <out_dir>/<id>.npz   keys (K,) int64 0-based classes of the image, cams (K, H, W) float16 in [0, 1]
        <out_dir>/{config.yaml, log.txt, record.json}       (out_dir = cam.out_dir, default <work_dir>/cam_<cam.source>)
        <out_dir>_crf_<alpha>/<id>.png               dense-CRF labels for each alpha in cam.crf_alphas
        <out_dir>_pictures/<id>.png                  image | GT | CAMs of the first cam.pictures images
Existing files are skipped unless cam.overwrite=true; record.json says which splits are complete.

    caee make-cam --config configs/voc/r38.yaml 'cam.crf_alphas=[4,24]'
    torchrun --nproc_per_node 4 -m caee make-cam --config configs/voc/r38.yaml cam.source=classifier
""",
          part=lambda c: c.cam.split or c.data.cam_split,
          not_recorded=("cam.crf_alphas", "cam.split", "cam.out_dir", *_DATA_SPLITS), reads=("crf",),
          speed="inference"),
    Stage("train_affinity", ("data", "train_affinity", "crf"), "train_affinity",
          lambda lo: lo.stage_dir("train_affinity"),
          lambda lo: {"cams": ("train_affinity.cam_dir", lo.affinity_cam_dir())}, """\
Stage 4: train AffinityNet (PSA) on pair labels from the CAMs' low/high-alpha CRF labels.

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet/<id>.npz (or
        train_affinity.cam_dir) and their CRF labels <cam_dir>_crf_<la_alpha>/ and
        <cam_dir>_crf_<ha_alpha>/ (computed from the CAMs and cached there when absent);
        train_affinity.net.pretrained (ImageNet weights) or train_affinity.init (our AffinityNet
        model.pth, PSA's res38_aff.pth, or a classifier model.pth / res38_cls.pth whose backbone
        alone is used).
Output: <work_dir>/train_affinity/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, record.json}

    caee train-affinity --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-affinity --config configs/voc/r38.yaml
""",
          reads=("logging",)),
    Stage("make_pseudo_labels", ("data", "pseudo_labels", "crf"), "pseudo_labels", lambda lo: lo.pseudo_labels(),
          lambda lo: {"cams": ("pseudo_labels.cam_dir", lo.pseudo_label_cam_dir()),
                      "affinitynet": ("pseudo_labels.weights", lo.affinity_weights())},
          """\
Stage 5: pseudo labels by random walk of the CAMs with AffinityNet's affinities (PSA).

Input:  data.root (images of pseudo_labels.split, default data.cam_split); the CAMs
        <work_dir>/cam_cgnet/<id>.npz (or pseudo_labels.cam_dir: any CAM folder, OC or CGNet);
        the AffinityNet <work_dir>/train_affinity/model.pth (or pseudo_labels.weights, e.g. PSA's
        res38_aff.pth, whose architecture is then train_affinity.net).
Output: <out_dir>/<id>.png palette label maps (default <work_dir>/pseudo_labels) and
        <out_dir>/record.json; log and config in <work_dir>/make_pseudo_labels/.
        Existing PNGs are kept unless pseudo_labels.overwrite=true.

    caee make-pseudo-labels --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee make-pseudo-labels --config configs/voc/r38.yaml
""", part=lambda c: c.pseudo_labels.split or c.data.cam_split,
          not_recorded=("pseudo_labels.split", "pseudo_labels.out_dir", *_DATA_SPLITS), reads=("train_affinity",),
          speed="inference"),
    Stage("train_irn", ("data", "irn"), "irn", lambda lo: lo.stage_dir("train_irn"),
          lambda lo: {"cams": ("irn.cam_dir", lo.irn_cam_dir())}, IRN_TRAIN_DOC,
          not_recorded=tuple(f"irn.{k}" for k in ("weights", "out_dir", "split", "beta", "exp_times", "radius",
                                                   "sem_seg_bg_thres", "cam_grid")), reads=("logging",)),
    Stage("make_irn_labels", ("data", "irn"), "irn", lambda lo: lo.irn_pseudo_labels(),
          lambda lo: {"cams": ("irn.cam_dir", lo.irn_cam_dir()), "irn": ("irn.weights", lo.irn_weights())},
          IRN_LABELS_DOC, part=lambda c: c.irn.split or c.data.cam_split,
          not_recorded=("irn.split", "irn.out_dir", *_DATA_SPLITS), speed="inference"),
    Stage("train_deeplab", ("data", "train_deeplab", "crf"), "train_deeplab", lambda lo: lo.stage_dir("train_deeplab"),
          lambda lo: {"labels": ("train_deeplab.label_dir", lo.deeplab_labels())}, """\
Stage 6: train DeepLab (LargeFOV / ASPP) on the pseudo labels, then segment and evaluate.

Input:  data.root (images of train_deeplab.split, "" = pseudo_labels.split or data.cam_split;
        images and ground truth of train_deeplab.eval_split, "" = data.val_split);
        train_deeplab.label_dir ("" = <work_dir>/pseudo_labels, or pseudo_labels.out_dir): one
        <id>.png label map per training image (0 = background, 1..C, 255 = ignore), checked first;
        train_deeplab.net.pretrained (ImageNet weights) or train_deeplab.init (a checkpoint).
Output: <work_dir>/train_deeplab/
          model.pth, last.pth, config.yaml, log.txt, metrics.jsonl, label_histogram.json
          pred_<split>/<id>.png          predictions (VOC palette)
          pred_<split>_crf/<id>.png      with train_deeplab.test_crf=true
          results_<split>.json           mIoU / per-class IoU; scales, flip, CRF, init, label source

    caee train-deeplab --config configs/voc/r38.yaml
    torchrun --nproc_per_node 4 -m caee train-deeplab --config configs/voc/r38.yaml
    # re-evaluate a trained model.pth with other test settings (no training):
    caee train-deeplab --config configs/voc/r38.yaml train_deeplab.eval_only=true \\\\
        'train_deeplab.test_scales=[0.5,0.75,1,1.25,1.5]' train_deeplab.test_flip=true train_deeplab.test_crf=true
""",
          reads=("logging",)),
    Stage("eval_miou", ("data", "eval"), "eval", None, _none, """\
Evaluate CAMs (background-threshold sweep) or label maps (CRF labels, pseudo labels, predictions).

Input:  eval.dir (default: the CAMs of cam.source, <work_dir>/cam_<cam.source>) holding <id>.npz CAMs
        or <id>.png label maps (eval.kind=auto tells them apart); ground truth data.eval_mask_dir of
        eval.split (default data.cam_split).
Output: the report on the console and in <work_dir>/eval/log.txt; the same as JSON in eval.out
        (default <work_dir>/eval/<folder name>_<split>.json) with a "summary" entry.
CAMs: every threshold of eval.thresholds in one pass; the best (an oracle) and the mIoU at the fixed
eval.threshold are both reported.

    caee eval-miou --config configs/voc/r38.yaml eval.split=train
    caee eval-miou --config configs/voc/r38.yaml eval.dir=work_dirs/voc/cam_cgnet_crf_4
""", reads=("cam",)),
]}

RUN_DOC = """\
The whole pipeline from one config, each finished stage skipped, then the results table.

Stages: OC, CGNet (+ a w = 0 control), CAMs, CRF, AffinityNet, pseudo labels, DeepLab, results.

Input:  one experiment config (configs/demo.yaml runs on the built-in synthetic set on a CPU).
Output: every stage's folder under work_dir, each output folder's record.json,
        <work_dir>/results.md, results.json (the numbers), timings.json (wall times), fig3_cams.png,
        fig4_segmentation.png.

    caee run --config configs/demo.yaml
    caee run --config configs/voc/r38.yaml --nproc 4 data.root=/data/VOC2012
    caee run --config configs/demo.yaml --stages train_cgnet cam_cgnet results

A finished stage is skipped while its settings and the stages it reads are unchanged; a changed
key re-runs exactly the stages it affects (their old outputs are removed first); an interrupted
stage resumes when the same command is run again. --overwrite starts the selected stages over.
"""


def stage(name: str) -> Stage:
    """The row of ``name`` (``make-cam`` or ``make_cam``); KeyError when there is none."""
    return STAGES[name.replace("-", "_")]


# ---------------------------------------------------------------- the pipeline's steps


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


def _cam_split(cfg: Config) -> str:
    return cfg.cam.split or cfg.data.cam_split


def _cam_call(cfg: Config, layout: Layout, source: str, split: str, alphas: Sequence[float]) -> Config:
    """make_cam's config for ``source``'s CAMs on ``split``, with the folders of ``layout``."""
    return replace(cfg, cam={"source": source, "split": split, "crf_alphas": list(alphas),
                             "out_dir": str(layout.cam_dir(source)), "weights": str(layout.cam_weights(source))})


def _cgnet_cams(cfg: Config, plan: Sequence[str]) -> list[Config]:
    """data.train_split first when AffinityNet or IRN follows and learns from these CAMs, then the CAM split."""
    needs_train = ("train_affinity" in plan and not cfg.train_affinity.cam_dir) or \
        ("train_irn" in plan and not cfg.irn.cam_dir)
    splits = dict.fromkeys(([cfg.data.train_split] if needs_train else []) + [_cam_split(cfg)])
    return [_cam_call(cfg, Layout(cfg), "cgnet", s, cfg.cam.crf_alphas) for s in splits]


def _control_cams(cfg: Config, plan: Sequence[str]) -> list[Config]:
    control = control_config(cfg)
    return [_cam_call(control, Layout(control, derived_only=True), "cgnet", _cam_split(cfg), [])]


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
         lambda c, p: [_cam_call(c, Layout(c), "classifier", _cam_split(c), [])]),
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
