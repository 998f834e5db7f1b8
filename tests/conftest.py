"""Shared fixtures.

``fake_voc``: a tiny PASCAL VOC 2012 layout (20 classes) under ``tmp_path / "VOC2012"``::

    id            size (HxW)  classes (1-based)   splits                 masks
    2007_000001   40x48       1                   train, train_aug       SegmentationClass + Aug
    2007_000002   32x40       12, 15              train, train_aug       SegmentationClass + Aug
    2007_000003   36x36       (background only)   train, train_aug       SegmentationClass + Aug
    2008_000004   40x32       7                   val                    SegmentationClass + Aug
    2008_000005   30x44       3, 20               val                    SegmentationClass + Aug
    2009_000006   34x38       9                   train_aug (SBD only)   SegmentationClassAug only

Each object is a filled rectangle with a 1 px 255 (ignore) outline, like VOC's boundaries; the
images are JPEGs whose rectangles are drawn in a colour per class. The same table is available as
the ``fake_voc_labels`` fixture: ``{id: [classes]}``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caee.core.io import save_label_png


@pytest.fixture(autouse=True)
def _one_thread_and_clean_logging():
    """Tests use tiny tensors: one intra-op thread avoids contention on a busy 2-core machine.
    Handlers that a stage's setup_logging added (log.txt in a tmp folder) are removed afterwards."""
    import logging

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log = logging.getLogger("caee")
    before = list(log.handlers)
    yield
    torch.set_num_threads(threads)
    for h in list(log.handlers):
        if h not in before:
            log.removeHandler(h)
            h.close()

FAKE_VOC = {
    # id: ((H, W), [(class, y0, y1, x0, x1)], splits, in SegmentationClass)
    "2007_000001": ((40, 48), [(1, 5, 30, 8, 40)], ("train", "train_aug"), True),
    "2007_000002": ((32, 40), [(15, 2, 20, 2, 18), (12, 14, 30, 20, 38)], ("train", "train_aug"), True),
    "2007_000003": ((36, 36), [], ("train", "train_aug"), True),
    "2008_000004": ((40, 32), [(7, 10, 35, 4, 28)], ("val",), True),
    "2008_000005": ((30, 44), [(3, 3, 12, 3, 15), (20, 15, 28, 20, 42)], ("val",), True),
    "2009_000006": ((34, 38), [(9, 6, 28, 9, 30)], ("train_aug",), False),
}


def fake_voc_mask(shape, objects) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for c, y0, y1, x0, x1 in objects:
        mask[y0:y1, x0:x1] = 255
        mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = c
    return mask


def write_fake_voc(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {}
    for image_id, (shape, objects, splits, in_voc) in FAKE_VOC.items():
        image = rng.integers(60, 120, (*shape, 3), dtype=np.uint8)
        for c, y0, y1, x0, x1 in objects:
            image[y0:y1, x0:x1] = (10 * c, 255 - 10 * c, (37 * c) % 256)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        mask = fake_voc_mask(shape, objects)
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        if in_voc:
            save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        for s in splits:
            lists.setdefault(s, []).append(image_id)
    for s, ids in lists.items():
        (root / "ImageSets/Segmentation" / f"{s}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def fake_voc(tmp_path) -> Path:
    """Root of a tiny VOC 2012 tree (see the module docstring for its content)."""
    return write_fake_voc(tmp_path / "VOC2012")


@pytest.fixture
def fake_voc_labels() -> dict[str, list[int]]:
    """``{image id: sorted 1-based classes}`` of the ``fake_voc`` tree."""
    return {i: sorted({o[0] for o in v[1]}) for i, v in FAKE_VOC.items()}


def mini_config(tmp_path: Path, **overrides):
    """A miniature experiment on a tiny synthetic set (64 x 64, 3 classes, 16 + 4 images) with
    TinyCNN networks and a handful of steps per stage: the whole pipeline runs in seconds."""
    from caee.core.config import load_config

    items = {
        "work_dir": str(tmp_path / "work"), "device": "cpu",
        "data.root": str(tmp_path / "synthetic"), "data.num_workers": 0,
        "data.synthetic.image_size": 64, "data.synthetic.num_classes": 3, "data.synthetic.num_train": 16,
        "data.synthetic.num_val": 4, "data.synthetic.object_radius": [9, 13], "data.synthetic.part_size": 5,
        "data.synthetic.seed": 1,
        "cam.scales": [1.0], "cam.flip": True, "crf.workers": 1, "eval.workers": 1,
    }
    for stage in ("train_classifier", "train_cgnet", "train_affinity", "train_deeplab"):
        items.update({f"{stage}.net.backbone": "tinycnn", f"{stage}.net.width": 0.5, f"{stage}.net.pretrained": "",
                      f"{stage}.batch_size": 8, f"{stage}.epochs": 1, f"{stage}.crop_size": 64,
                      f"{stage}.resize_long": [48, 80], f"{stage}.log_every": 1, f"{stage}.amp": False,
                      f"{stage}.color_jitter": [0, 0, 0, 0],  # colour is class evidence in the synthetic set
                      f"{stage}.optimizer": "adam", f"{stage}.lr": 0.01, f"{stage}.head_lr_mult": 1.0})
        if stage in ("train_classifier", "train_cgnet"):  # AffinityNet and DeepLab have no backbone dropout
            items[f"{stage}.net.dropout"] = 0.0
    items["train_affinity.resize_long"] = [0, 0]  # PSA's AffinityNet crops without rescaling (label_rule psa)
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture
def mini_cfg(tmp_path):
    return mini_config(tmp_path)


def randomise_bn(model, seed: int):
    """Non-trivial running statistics and affines, so a load that skipped BN would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def save_random_cgnet(work: Path, num_classes: int = 20):
    """A seeded random TinyCNN CGNet saved as ``<work>/train_cgnet/model.pth`` (what make_cam reads);
    returns the model in eval mode."""
    import dataclasses

    import torch

    from caee.core.config import NetConfig
    from caee.models.classifier import build_classifier

    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    torch.manual_seed(0)
    model = build_classifier(net, num_classes).eval()
    (work / "train_cgnet").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "arch": "classifier", "net": dataclasses.asdict(net),
                "num_classes": num_classes}, work / "train_cgnet" / "model.pth")
    return model


def run_stage(main, doc=None, argv=None) -> int:
    """``main(cfg)`` of a stage with the config parsed from ``argv`` (``--config FILE key=value ...``),
    under the command line's error guard: the exit code ``caee <stage>`` would give."""
    import argparse

    from caee.core.errors import guarded
    from caee.core.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    return guarded(lambda: main(load_config(args.config, args.overrides)))
# ---------------------------------------------------------------- one finished miniature pipeline

# the runner, layout and results tests all read this one pipeline (built once per session): 2 steps per
# trainer, no control, one CRF alpha, and its CAM and pseudo-label folders set by their path keys
# (to <work_dir>/my_cams and <work_dir>/my_labels, so that a copied work_dir still holds everything);
# DeepLab starts from the CGNet, as the demo does (a path setting naming another step's output)
MINI_PIPELINE = {**{f"{s}.max_steps": 2 for s in ("train_classifier", "train_cgnet", "train_affinity",
                                                    "train_deeplab")},
                 "cam.crf_alphas": [4], "pipeline.control": False, "pipeline.pictures": 0, "pseudo_labels.steps": 4,
                 "train_deeplab.init": "{work_dir}/train_cgnet/model.pth"}


def mini_pipeline_config(work: Path, data: Path, **overrides):
    """The config of the ``mini_pipeline`` fixture for a work_dir (a copy) and the data root."""
    paths = {"work_dir": str(work), "data.root": str(data), "cam.out_dir": str(work / "my_cams"),
             "pseudo_labels.out_dir": str(work / "my_labels")}
    return mini_config(work.parent, **MINI_PIPELINE, **{**paths, **overrides})


class FinishedPipeline:
    """``work`` and ``data``: the folders; ``result``: what the results step returned; ``ran``: the steps run."""

    def __init__(self, work: Path, data: Path, result: dict, ran: list[str]):
        self.work, self.data, self.result, self.ran = work, data, result, ran

    def config(self, **overrides):
        return mini_pipeline_config(self.work, self.data, **overrides)


@pytest.fixture(scope="session")
def mini_pipeline(tmp_path_factory) -> FinishedPipeline:
    """One finished miniature pipeline, shared read-only; a test that changes it copies it first
    (``copied_pipeline``)."""
    import logging

    pytest.importorskip("pydensecrf")
    from caee.pipeline import run as pipeline
    from caee.pipeline.runner import jobs_of, run_jobs

    root = tmp_path_factory.mktemp("mini_pipeline")
    log = logging.getLogger("caee")
    handlers = list(log.handlers)
    cfg = mini_pipeline_config(root / "work", root / "synthetic")
    jobs = jobs_of(cfg, pipeline.plan(cfg))
    summary = run_jobs(jobs, context=jobs)
    result = pipeline.write_results(cfg, jobs)
    for h in list(log.handlers):
        if h not in handlers:
            log.removeHandler(h)
            h.close()
    return FinishedPipeline(root / "work", root / "synthetic", result, list(summary.ran))


@pytest.fixture
def copied_pipeline(mini_pipeline, tmp_path) -> FinishedPipeline:
    """A copy of the finished pipeline's work_dir in this test's folder (the data root is shared)."""
    import shutil

    shutil.copytree(mini_pipeline.work, tmp_path / "work", symlinks=True)
    return FinishedPipeline(tmp_path / "work", mini_pipeline.data, mini_pipeline.result, mini_pipeline.ran)
