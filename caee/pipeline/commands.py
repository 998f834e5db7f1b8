"""The ``caee`` subcommands: which stage module each runs, which config sections it reads, its usage.

Kept apart from the stage modules so that ``caee <command> --help`` / ``--print-config`` can list
them without importing a stage (and so torch).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str                    # subcommand, e.g. "train-cgnet"
    module: str                  # module whose main(cfg) runs it
    sections: tuple[str, ...]    # config sections it reads (listed by --help); () = every section
    doc: str                     # usage: inputs, outputs, examples


COMMANDS: tuple[Command, ...] = (
    Command("train-classifier", "caee.stages.train_classifier", ("logging", "data", "train_classifier"), """\
Stage 1: train the ordinary classifier (OC) on image-level labels.

Input:  data.root (images + image-level labels of data.train_split); train_classifier.net.pretrained
        (ImageNet weights: MXNet .params or .pth) or train_classifier.init (a PSA/caee checkpoint).
Output: <work_dir>/train_classifier/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    caee train-classifier --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-classifier --config configs/voc/r38.yaml
"""),
    Command("train-cgnet", "caee.stages.train_cgnet", ("logging", "data", "masking", "train_cgnet"), """\
Stage 2: train the CGNet with class-specific adversarial erasing against the frozen OC.

Input:  data.root; the OC from <work_dir>/train_classifier/model.pth or train_cgnet.oc_weights
        (our model.pth or PSA's res38_cls.pth / OC-CSE's od_cam.pth); train_cgnet.net.pretrained.
Output: <work_dir>/train_cgnet/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    caee train-cgnet --config configs/voc/r38.yaml data.root=/data/VOC2012
    caee train-cgnet --config configs/demo.yaml masking.depth=3   # feature-level masking
"""),
    Command("make-cam", "caee.stages.make_cam", ("data", "cam", "crf"), """\
Stage 3: multi-scale + flip CAMs of the CGNet (cam.source=cgnet) or the OC (cam.source=classifier).

Input:  data.root (images + image-level labels of cam.split, default data.cam_split);
        cam.weights (default <work_dir>/train_<cam.source>/model.pth, or a PSA-format .pth).
Output: <out_dir>/<id>.npz   keys (K,) int64 0-based classes of the image, cams (K, H, W) float16 in [0, 1]
        <out_dir>/{config.yaml, log.txt, DONE}       (out_dir = cam.out_dir, default <work_dir>/cam_<cam.source>)
        <out_dir>_crf_<alpha>/<id>.png               dense-CRF labels for each alpha in cam.crf_alphas
        <out_dir>_pictures/<id>.png                  image | GT | CAMs of the first cam.pictures images
Existing files are skipped unless cam.overwrite=true; DONE is written when every rank has finished.

    caee make-cam --config configs/voc/r38.yaml 'cam.crf_alphas=[4,24]'
    torchrun --nproc_per_node 4 -m caee make-cam --config configs/voc/r38.yaml cam.source=classifier
"""),
    Command("train-affinity", "caee.stages.train_affinity", ("logging", "data", "train_affinity", "crf"), """\
Stage 4: train AffinityNet (PSA) on pair labels from the CAMs' low/high-alpha CRF labels.

Input:  data.root (images of data.train_split); the CAMs <work_dir>/cam_cgnet/<id>.npz (or
        train_affinity.cam_dir) and their CRF labels <cam_dir>_crf_<la_alpha>/ and
        <cam_dir>_crf_<ha_alpha>/ (computed from the CAMs and cached there when absent);
        train_affinity.net.pretrained (ImageNet weights) or train_affinity.init (our AffinityNet
        model.pth, PSA's res38_aff.pth, or a classifier model.pth / res38_cls.pth whose backbone
        alone is used).
Output: <work_dir>/train_affinity/{model.pth, last.pth, config.yaml, log.txt, metrics.jsonl}

    caee train-affinity --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee train-affinity --config configs/voc/r38.yaml
"""),
    Command("make-pseudo-labels", "caee.stages.make_pseudo_labels", ("data", "pseudo_labels", "crf", "train_affinity"),
            """\
Stage 5: pseudo labels by random walk of the CAMs with AffinityNet's affinities (PSA).

Input:  data.root (images of pseudo_labels.split, default data.cam_split); the CAMs
        <work_dir>/cam_cgnet/<id>.npz (or pseudo_labels.cam_dir: any CAM folder, OC or CGNet);
        the AffinityNet <work_dir>/train_affinity/model.pth (or pseudo_labels.weights, e.g. PSA's
        res38_aff.pth, whose architecture is then train_affinity.net).
Output: <out_dir>/<id>.png palette label maps (default <work_dir>/pseudo_labels) and
        <out_dir>/DONE once all are written; log and config in <work_dir>/make_pseudo_labels/.
        Existing PNGs are kept unless pseudo_labels.overwrite=true.

    caee make-pseudo-labels --config configs/voc/r38.yaml data.root=/data/VOC2012
    torchrun --nproc_per_node 4 -m caee make-pseudo-labels --config configs/voc/r38.yaml
"""),
    Command("train-deeplab", "caee.stages.train_deeplab", ("logging", "data", "train_deeplab", "crf"), """\
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
    caee train-deeplab --config configs/voc/r38.yaml train_deeplab.eval_only=true \\
        'train_deeplab.test_scales=[0.5,0.75,1,1.25,1.5]' train_deeplab.test_flip=true train_deeplab.test_crf=true
"""),
    Command("eval-miou", "caee.stages.eval_miou", ("data", "cam", "eval"), """\
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
"""),
    Command("run", "caee.pipeline.run", (), """\
The whole pipeline from one config, each finished stage skipped, then the results table.

Stages: OC, CGNet (+ a w = 0 control), CAMs, CRF, AffinityNet, pseudo labels, DeepLab, results.

Input:  one experiment config (configs/demo.yaml runs on the built-in synthetic set on a CPU).
Output: every stage's folder under work_dir, <work_dir>/pipeline/<stage>.done markers,
        <work_dir>/results.md, results.json (the numbers), timings.json (wall times), fig3_cams.png,
        fig4_segmentation.png.

    caee run --config configs/demo.yaml
    caee run --config configs/voc/r38.yaml --nproc 4 data.root=/data/VOC2012
    caee run --config configs/demo.yaml --stages train_cgnet cam_cgnet results

A finished stage is skipped while its settings and the stages it reads are unchanged; a changed
key re-runs exactly the stages it affects (their old outputs are removed first); an interrupted
stage resumes when the same command is run again. --overwrite starts the selected stages over.
"""),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
