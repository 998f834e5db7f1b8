"""Every key of a stage's config section reaches its consumer, driven by the config's own key table.

For each field of the section's dataclass in ``caee/core/config.py`` (enumerated here, so a newly
added key fails this test until it gets a row), the table below gives a value that differs from
the default and from the other keys' values, and what the consumer must show for it: an argument
of the method call that uses it (a spy) or a property of the stage's output, never the config
object. One stage run with every key changed at once serves all rows. A key that cannot be
observed this way goes to ``UNOBSERVABLE`` with the reason; keep that list short.

Covered: the ``cam`` section (make_cam.py: ``multiscale_cams`` arguments and the files written),
which CAM folder the later stages read for each ``cam.source``, the ``pseudo_labels`` section
(make_pseudo_labels.py: the random walk's and the embedding's arguments, the CRF jobs, the files),
the ``crf`` section (pydensecrf's recorded calls in that run), the five trainer sections
(train_classifier, train_cgnet, train_affinity, train_deeplab, irn: one real run each, ``fit`` and
the stage's own consumers spied) with ``masking`` in the CGNet's run, ``eval`` (the scoring's
arguments and result), ``data`` (the index ``load_split`` makes, the trainers' splits and
workers) and ``data.synthetic`` (the drawing and the generated folder). Not observable: the CUDA
only keys (amp, channels_last) and the keys a network does not read (``NOT_READ``); IRN's walk keys
are compared with the method by hand in tests/test_irn_stages.py (``IRN_ELSEWHERE``).
tools/mutation_check.py makes a "stage ignores <key>" mutation from each row.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from caee.core import config_rules
from caee.core.config import CamConfig, NetConfig, load_config
from caee.core.io import load_cam_npz, load_label_png, save_cam_npz, save_label_png
from caee.core.layout import Layout
from caee.models.classifier import build_classifier
from caee.stages import make_cam, table
from conftest import FAKE_VOC

VAL = [i for i, v in FAKE_VOC.items() if "val" in v[2]]          # cam.split=val: 2 images
TRAIN = [i for i, v in FAKE_VOC.items() if "train" in v[2]]      # the default cam split


def _save_classifier(path: Path, seed: int) -> dict:
    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    torch.manual_seed(seed)
    model = build_classifier(net, 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    torch.save({"model": state, "arch": "classifier", "net": dataclasses.asdict(net), "num_classes": 20}, path)
    return state


# key: (value, check(run) -> None); the values differ from the defaults and from each other
CAM_KEYS = {
    "source": ("classifier", lambda r: r.assert_model(r.classifier_state)),
    "weights": None,                 # run "weights" below: with source and out_dir at their defaults
    "out_dir": None,
    "split": ("val", lambda r: r.assert_images(VAL)),
    "scales": ([0.75, 1.25], lambda r: r.assert_arg("scales", [0.75, 1.25])),
    "flip": (False, lambda r: r.assert_arg("flip", False)),
    "resize": ("bilinear", lambda r: r.assert_arg("resize", "bilinear")),
    "batch_size": (2, lambda r: r.assert_batches([2])),
    "dtype": ("float32", lambda r: r.assert_dtype(np.float32)),
    "crf_alphas": ([5.0], lambda r: r.assert_files(r.out.parent / f"{r.out.name}_crf_5", ".png", len(VAL))),
    "overwrite": (True, lambda r: r.assert_recomputed(VAL[0])),
    "amp": (False, lambda r: r.assert_arg("amp", False)),
    "pictures": (1, lambda r: r.assert_files(r.out.parent / f"{r.out.name}_pictures", ".png", 1)),
}
UNOBSERVABLE: dict[str, str] = {}


def test_every_cam_key_has_a_row():
    keys = {f.name for f in dataclasses.fields(CamConfig)}
    assert set(CAM_KEYS) | set(UNOBSERVABLE) == keys, "a cam key without a wiring row: add one to CAM_KEYS"
    defaults = CamConfig()
    for key, row in CAM_KEYS.items():
        if row is not None:
            assert row[0] != getattr(defaults, key), key
    # distinct, so that a swap shows (a bool has a single non-default value)
    values = [repr(row[0]) for row in CAM_KEYS.values() if row is not None and not isinstance(row[0], bool)]
    assert len(values) == len(set(values))


class CamRun:
    """One make_cam run with a spy on ``multiscale_cams``; the checks the rows call."""

    def __init__(self, tmp_path: Path, fake_voc: Path, overrides: dict, monkeypatch, stale: str | None = None):
        self.calls: list[dict] = []
        real = make_cam.multiscale_cams

        def spy(model, images, keys, scales, flip, device, amp, resize):
            self.calls.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                               "n": len(images), "sizes": [tuple(im.shape[:2]) for im in images],
                               "scales": list(scales), "flip": flip, "amp": amp, "resize": resize})
            return real(model, images, keys, scales, flip, device, amp, resize)

        monkeypatch.setattr(make_cam, "multiscale_cams", spy)
        work = tmp_path / "work"
        self.cgnet_state = _save_classifier(work / "train_cgnet" / "model.pth", 0)
        self.classifier_state = _save_classifier(work / "train_classifier" / "model.pth", 1)
        self.other_state = _save_classifier(tmp_path / "elsewhere" / "net.pth", 2)
        items = {"work_dir": work, "device": "cpu", "data.dataset": "voc", "data.root": fake_voc,
                 "data.num_workers": 0, "crf.workers": 1, "cam.scales": [1.0], **overrides}
        cfg = load_config(None, [f"{k}={v}" for k, v in items.items()])
        self.out = Layout(cfg).cam_dir()
        if stale:  # an earlier CAM file that only cam.overwrite replaces
            save_cam_npz(self.out / f"{stale}.npz", np.zeros(1, np.int64), np.full((1, 40, 32), 0.5, np.float16))
        self.result = make_cam.main(cfg)

    def arg(self, name):
        values = {repr(c[name]) for c in self.calls}
        assert len(values) == 1, f"{name} varies between calls: {values}"
        return self.calls[0][name]

    def assert_arg(self, name, value):
        assert self.calls and self.arg(name) == value, name

    def assert_model(self, state):
        for call in self.calls:
            for k, v in state.items():
                assert torch.equal(call["model"][k], v), k

    def assert_images(self, ids):
        assert sorted(p.stem for p in self.out.glob("*.npz")) == sorted(ids)
        assert sum(c["n"] for c in self.calls) == len(ids)

    def assert_batches(self, sizes):
        assert [c["n"] for c in self.calls] == sizes

    def assert_dtype(self, dtype):
        for p in self.out.glob("*.npz"):
            with np.load(p, allow_pickle=False) as f:
                assert f["cams"].dtype == dtype, p

    def assert_files(self, folder: Path, ext: str, n: int):
        assert len(list(folder.glob(f"*{ext}"))) == n, folder

    def assert_recomputed(self, image_id):
        keys, cams = load_cam_npz(self.out / f"{image_id}.npz", 20)
        assert keys.tolist() == [6] and not np.all(cams == 0.5)   # 2008_000004 holds class 7 (0-based 6)


@pytest.fixture
def every_key_changed(tmp_path, fake_voc, monkeypatch):
    values = {f"cam.{k}": row[0] for k, row in CAM_KEYS.items() if row is not None}
    return CamRun(tmp_path, fake_voc, values, monkeypatch, stale=VAL[0])


def test_every_cam_key_reaches_make_cam_s_consumer(every_key_changed):
    run = every_key_changed
    assert run.out == Path(run.result.out_dir) and run.out.name == "cam_classifier"
    for key, row in CAM_KEYS.items():
        if row is not None:
            row[1](run)


def test_cam_weights_and_out_dir_reach_make_cam(tmp_path, fake_voc, monkeypatch):
    out = tmp_path / "my_cams"
    run = CamRun(tmp_path, fake_voc, {"cam.weights": tmp_path / "elsewhere" / "net.pth", "cam.out_dir": out},
                 monkeypatch)
    assert run.out == out and Path(run.result.out_dir) == out
    run.assert_images(TRAIN)
    run.assert_model(run.other_state)


@pytest.mark.parametrize("source", ["cgnet", "classifier"])
def test_later_stages_read_the_cgnet_cams_whatever_cam_source(source, tmp_path):
    """With their own cam_dir keys empty, AffinityNet and the random walk read the CGNet's CAMs
    (their rows in caee/stages/table.py): the folder make_cam writes when cam.source is the CGNet (cam.out_dir
    followed), ``<work_dir>/cam_cgnet`` when make_cam ran for the classifier."""
    for out_dir in ("", str(tmp_path / "custom")):
        cfg = load_config(None, [f"work_dir={tmp_path}", f"cam.source={source}", f"cam.out_dir={out_dir}"])
        written = Layout(cfg).cam_dir()
        assert written == (Path(out_dir) if out_dir else tmp_path / f"cam_{source}")
        cgnet_cams = written if source == "cgnet" else tmp_path / "cam_cgnet"
        assert table.stage("train_affinity").input(cfg, "cams") == cgnet_cams
        assert table.stage("make_pseudo_labels").input(cfg, "cams") == cgnet_cams


# ---------------------------------------------------------------- pseudo_labels (make_pseudo_labels.py)

# key: value; the walk settings differ from the defaults and from each other (beta 2.5, radius 4)
PSEUDO_KEYS = {"cam_dir": "<setup>", "weights": "<setup>", "out_dir": "<tmp>/labels", "split": "val",
               "beta": 2.5, "steps": 7, "alpha": 3.5, "radius": 4, "psa_border": True, "crf": True,
               "overwrite": True,
               # read by the pipeline's plan, not by the stage: tests/test_irn_stages.py checks which steps they run
               "method": "<pipeline>", "compare": "<pipeline>"}


# the crf section, observed in the pseudo-label run above: pydensecrf's calls (recorded) and the
# number of CRF processes; every value differs from the default and from the others
CRF_VALUES = {"iterations": 3, "gaussian_sxy": 2, "gaussian_compat": 5, "bilateral_sxy": 70, "bilateral_srgb": 11,
              "bilateral_compat": 7, "min_prob": 0.3, "workers": 4}


def _recording_crf(monkeypatch) -> list:
    from test_stage_wiring import _RecordingCRF

    dcrf = pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.setattr(_RecordingCRF, "calls", [])
    monkeypatch.setattr(dcrf, "DenseCRF2D", _RecordingCRF)
    return _RecordingCRF.calls


def test_every_crf_key_has_a_row():
    from caee.core.config import CrfConfig

    assert set(CRF_VALUES) == {f.name for f in dataclasses.fields(CrfConfig)}
    assert all(v != getattr(CrfConfig(), k) for k, v in CRF_VALUES.items())
    assert len({repr(v) for v in CRF_VALUES.values()}) == len(CRF_VALUES)


def test_every_pseudo_labels_key_reaches_the_walk_or_the_files(tmp_path, monkeypatch):
    from caee.core.config import PseudoLabelConfig, config_from_dict
    from caee.stages import make_pseudo_labels as mpl
    from test_stage_wiring import SIZES, _walk_setup

    assert set(PSEUDO_KEYS) == {f.name for f in dataclasses.fields(PseudoLabelConfig)}, \
        "a pseudo_labels key without a wiring row: add one to PSEUDO_KEYS"
    cfg, net, root, work = _walk_setup(tmp_path)
    val = ["q", "r"]
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in val))
    out = tmp_path / "labels"
    values = {k: v for k, v in PSEUDO_KEYS.items() if v not in ("<setup>", "<pipeline>")}
    values["out_dir"] = str(out)
    cfg["pseudo_labels"].update(values)
    save_label_png(out / "q.png", np.full(SIZES["q"], 9, np.uint8))  # stale: only overwrite replaces it

    walks, submitted, models, writers = [], [], [], []
    cfg["crf"] = dict(CRF_VALUES)
    crf_calls = _recording_crf(monkeypatch)
    real_walk, real_embed = mpl.random_walk_scores, mpl.embed_image

    def embed_spy(model, *args):
        models.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_embed(model, *args)

    def walk_spy(feats, cams, params, stride, pairs):
        walks.append({"params": params, "pairs": (pairs.radius, pairs.psa_border), "cams": cams.clone()})
        return real_walk(feats, cams, params, stride, pairs)

    class Writer:  # what would go to the CRF processes: run here, pydensecrf recorded (crf section)
        def __init__(self, fn, workers):
            self.fn = fn
            writers.append(workers)

        def submit(self, job):
            submitted.append(job)
            image_path, scores, keys, crf, out_path = job
            self.fn(job)
            save_label_png(out_path, np.zeros(scores.shape[1:], np.uint8))

        def close(self):
            pass

    monkeypatch.setattr(mpl, "random_walk_scores", walk_spy)
    monkeypatch.setattr(mpl, "embed_image", embed_spy)
    monkeypatch.setattr(mpl, "ProcessWriter", Writer)
    assert mpl.main(config_from_dict(cfg)) == out                                        # out_dir
    assert sorted(p.stem for p in out.glob("*.png")) == val and len(walks) == len(models) == 2  # split
    for w in walks:
        p = w["params"]
        assert (p.alpha, p.beta, p.steps, p.radius, p.psa_border) == (3.5, 2.5, 7, 4, True)  # walk keys
        assert w["pairs"] == (4, True)
    assert [Path(job[4]).stem for job in submitted] == val                               # crf
    assert load_label_png(out / "q.png").max() == 0                                     # overwrite
    for state in models:                                                                 # weights
        for k, v in net.state_dict().items():
            assert torch.equal(state[k], v), k
    assert writers == [CRF_VALUES["workers"]]                                            # crf.workers
    assert len(crf_calls) == len(val)
    for rec in crf_calls:                                                                # the crf section
        assert rec["gaussian"] == {"sxy": CRF_VALUES["gaussian_sxy"], "compat": CRF_VALUES["gaussian_compat"]}
        assert rec["bilateral"] == {"sxy": CRF_VALUES["bilateral_sxy"], "srgb": CRF_VALUES["bilateral_srgb"],
                                    "compat": CRF_VALUES["bilateral_compat"]}
        assert rec["iterations"] == CRF_VALUES["iterations"]
        # min_prob floors every probability before normalising: the unary's largest possible value
        floor, n = CRF_VALUES["min_prob"], rec["size"][2]
        assert rec["unary"].max() <= -np.log(floor / (1 + (n - 1) * floor)) + 1e-4
    for w, image_id in zip(walks, val):                                                  # cam_dir
        keys, cams = load_cam_npz(work / "cams" / f"{image_id}.npz")
        torch.testing.assert_close(w["cams"].float(), torch.from_numpy(cams).float())


# ---------------------------------------------------------------- the trainers (engine keys and each stage's own)
#
# One real run of each trainer stage (train_classifier, train_cgnet, train_affinity, train_deeplab,
# train_irn) on 8 tiny VOC-layout images, 4 steps, with every key of its section changed. A spy on
# the stage's ``fit`` records what the engine receives (the task's model at the start, the dataset,
# every batch); the engine's own outputs (metrics.jsonl, last.pth's optimiser groups, the checkpoint
# writes) show the rest. Keys that exclude each other (adam has no momentum, one-cycle no poly
# power, ImageNet weights are replaced by ``init``) are split between two variants, each run by some
# of the five trainers: a key is covered when at least one trainer's run checks it.

import json  # noqa: E402

from PIL import Image  # noqa: E402

from caee.core.config import (AffinityTrainConfig, ClassifierTrainConfig, CGNetTrainConfig,  # noqa: E402
                              DeeplabTrainConfig, IrnConfig, MaskingConfig, TrainConfig, config_from_dict)
from caee.engine import trainer  # noqa: E402

N_TRAIN = 8
TRAIN_IDS = [f"2007_{i:06d}" for i in range(1, N_TRAIN + 1)]
SUBSET = TRAIN_IDS[:6]                 # train_deeplab.split
EVAL_IDS = ["2008_000001", "2008_000002"]
CLASSES = {image_id: [1 + i % 3, 5 + i % 2] if i % 2 else [1 + i % 3] for i, image_id in enumerate(TRAIN_IDS + EVAL_IDS)}


def _voc_folder(root: Path) -> Path:
    """8 train + 2 eval images (30x34) with rectangles of their classes, masks, CAMs and labels."""
    rng = np.random.default_rng(5)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation", "cams", "labels"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, classes in CLASSES.items():
        h, w = 30, 34
        image = rng.integers(40, 90, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for j, c in enumerate(classes):
            y0, x0 = 3 + 12 * j, 4 + 6 * j
            mask[y0:y0 + 12, x0:x0 + 20] = c
            image[y0:y0 + 12, x0:x0 + 20] = (12 * c, 250 - 12 * c, (40 * c) % 256)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        save_label_png(root / "labels" / f"{image_id}.png", mask)
        cams = np.stack([(mask == c).astype(np.float32) * 0.8 + 0.1 * rng.random((h, w), np.float32) for c in classes])
        save_cam_npz(root / "cams" / f"{image_id}.npz", np.array(classes, np.int64) - 1, cams)
    for name, ids in (("train", TRAIN_IDS), ("val", EVAL_IDS), ("sub", SUBSET), ("eval2", EVAL_IDS[::-1])):
        (root / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _tiny_weights(root: Path) -> dict[str, Path]:
    """A TinyCNN (width 0.25) ImageNet-format file (a backbone state dict) and a classifier model.pth
    (``init`` / the CGNet's OC)."""
    from caee.models import build_backbone

    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    torch.manual_seed(21)
    backbone = build_backbone(net)
    torch.save(backbone.state_dict(), root / "imagenet.pth")
    _save_classifier(root / "init.pth", 22)
    _save_classifier(root / "oc.pth", 23)
    return {"imagenet": root / "imagenet.pth", "init": root / "init.pth", "oc": root / "oc.pth"}


# the TrainConfig keys (every trainer's section): value; distinct from every trainer's defaults and each other
ENGINE_VALUES = {"batch_size": 3, "epochs": 5, "max_steps": 4, "lr": 0.03, "weight_decay": 0.002,
                 "head_lr_mult": 7.0, "bias_lr_mult": 2.5, "crop_size": 24, "resize_long": [20, 28], "hflip": False,
                 "color_jitter": [0.1, 0.2, 0.3, 0.05], "seed": 11, "checkpoint_every": 1, "log_every": 2,
                 "keep_epochs": True, "overwrite": True}
VARIANTS = {  # keys that exclude each other
    "adam": {"optimizer": "adam", "schedule": "onecycle", "net.pretrained": "<imagenet>"},
    # optimizer: sgd, every trainer's default
    "sgd": {"momentum": 0.6, "poly_power": 1.5, "step_in_backward": True, "init": "<init>"},
}
NET_VALUES = {"net.backbone": "tinycnn", "net.width": 0.25, "net.dropout": 0.3, "net.output_stride": 8}
# TrainConfig keys no CPU run can observe
ENGINE_UNOBSERVABLE = {"amp": "bf16 autocast is CUDA only (a CPU run ignores it)",
                       "channels_last": "CUDA only (a CPU run ignores it)"}


def _poly(step, total, lr, power):
    return lr * (1 - step / total) ** power


def _onecycle(step, total, lr):
    t = step / total
    if t < 0.3:
        return lr * (0.04 + 0.96 * t / 0.3)
    return lr * 0.5 * (1 + np.cos(np.pi * (t - 0.3) / 0.7))


class TrainerRun:
    """One trainer stage run with spies on its ``fit`` (and the engine's checkpoint writes)."""

    def __init__(self, monkeypatch, module, cfg: dict, section: str):
        self.batches: list[dict] = []
        self.saves: list[tuple[str, int | None]] = []
        self.in_backward: list[bool] = []
        real_fit, real_save, real_sib = module.fit, trainer.save_checkpoint, trainer.step_in_backward

        def fit_spy(task, dataset, tc, out_dir, device, full_config=None, num_workers=0, stage=""):
            self.task, self.dataset, self.num_workers, self.out_dir = task, dataset, num_workers, Path(out_dir)
            self.initial = {k: v.clone() for k, v in task.model.state_dict().items()}
            inner = task.train_step

            def step_spy(model, batch, ctx):
                self.batches.append({"n": len(batch["image"]), "hw": tuple(batch["image"].shape[-2:]),
                                     "idx": [int(i) for i in batch["idx"]], "step": ctx.step, "epoch": ctx.epoch})
                return inner(model, batch, ctx)

            task.train_step = step_spy
            return real_fit(task, dataset, tc, out_dir, device, full_config, num_workers, stage)

        def save_spy(path, obj):
            self.saves.append((Path(path).name, obj.get("step")))
            return real_save(path, obj)

        monkeypatch.setattr(module, "fit", fit_spy)
        monkeypatch.setattr(trainer, "save_checkpoint", save_spy)
        monkeypatch.setattr(trainer, "step_in_backward", lambda opt: (self.in_backward.append(True), real_sib(opt))[1])
        self.section = section
        self.values = cfg[section]
        stale = Path(cfg["work_dir"]) / module.__name__.rsplit(".", 1)[1] / "metrics.jsonl"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text(json.dumps({"step": 0, "stale": True}) + "\n")  # only overwrite removes it
        self.result = module.main(config_from_dict(cfg))
        self.metrics = [json.loads(line) for line in (self.out_dir / "metrics.jsonl").read_text().splitlines()]
        last = torch.load(self.out_dir / "last.pth", weights_only=False)
        self.groups = {g["name"]: g for g in last["optimizer"]["param_groups"]}
        self.last_step = last["step"]

    # ---- what the rows check
    def model(self) -> torch.nn.Module:
        return self.task.model

    def augment(self) -> dict:
        """The dataset's augmentation: every transform object reachable from it, by class name."""
        found: dict[str, list] = {}
        seen: set[int] = set()

        def walk(obj, depth=0):
            if id(obj) in seen or depth > 4:
                return
            seen.add(id(obj))
            found.setdefault(type(obj).__name__, []).append(obj)
            children = list(getattr(obj, "transforms", [])) if hasattr(obj, "transforms") else []
            children += [v for v in vars(obj).values() if hasattr(v, "__dict__") and not isinstance(v, (type, Path))] \
                if hasattr(obj, "__dict__") else []
            for c in children:
                walk(c, depth + 1)

        walk(self.dataset)
        return found

    def total(self) -> int:
        return self.values["epochs"] * (len(self.dataset) // self.values["batch_size"])


def _lr_at(run: TrainerRun, step: int) -> float:
    v = run.values
    if v.get("schedule") == "onecycle":
        return _onecycle(step, run.total(), v["lr"])
    return _poly(step, run.total(), v["lr"], v["poly_power"])


def _expected_lrs(run: TrainerRun) -> list[float]:
    return [_lr_at(run, r["step"] - 1) for r in run.metrics]   # the lr logged at a step is the one it trained with


def _group_lrs_ok(run: TrainerRun) -> bool:
    """The optimiser's own lr of every group at the last step: base lr x schedule x the group's multiplier."""
    last = _lr_at(run, len(run.batches) - 1)
    return all(g["lr"] == pytest.approx(last * g["lr_mult"], rel=1e-9) for g in run.groups.values())


def _check_pretrained(run, path):
    state = torch.load(path, weights_only=True)
    backbone = run.model().backbone.state_dict()
    start = {k[len("backbone."):]: v for k, v in run.initial.items() if k.startswith("backbone.")}
    assert start and all(torch.equal(start[k], state[k]) for k in backbone), "ImageNet weights not loaded"


def _check_init(run, path):
    state = torch.load(path, weights_only=True)["model"]
    shared = [k for k in state if k.startswith("backbone.") and k in run.initial and run.initial[k].shape == state[k].shape]
    assert shared and all(torch.equal(run.initial[k], state[k]) for k in shared), "init weights not loaded"


def _dropouts(model) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]


ENGINE_CHECKS = {
    "batch_size": lambda r, v: all(b["n"] == v for b in r.batches),
    "epochs": lambda r, v: [x["lr"] for x in r.metrics] == pytest.approx(_expected_lrs(r), rel=1e-9),
    "max_steps": lambda r, v: len(r.batches) == v and r.last_step == v,
    "lr": lambda r, v: [x["lr"] for x in r.metrics] == pytest.approx(_expected_lrs(r), rel=1e-9) and _group_lrs_ok(r),
    "schedule": lambda r, v: [x["lr"] for x in r.metrics] == pytest.approx(_expected_lrs(r), rel=1e-9),
    "poly_power": lambda r, v: [x["lr"] for x in r.metrics] == pytest.approx(_expected_lrs(r), rel=1e-9),
    "optimizer": lambda r, v: all(("betas" in g) == (v == "adam") for g in r.groups.values()),
    "momentum": lambda r, v: all(g["momentum"] == v for g in r.groups.values()),
    "weight_decay": lambda r, v: {g["weight_decay"] for n, g in r.groups.items() if n.endswith("w")} == {v},
    "head_lr_mult": lambda r, v: r.groups["hw"]["lr_mult"] == v,
    "bias_lr_mult": lambda r, v: ("b" in r.groups or "hb" in r.groups)
    and ("hb" not in r.groups or r.groups["hb"]["lr_mult"] == pytest.approx(r.values["head_lr_mult"] * v))
    and ("b" not in r.groups or r.groups["b"]["lr_mult"] == v),
    "crop_size": lambda r, v: all(b["hw"] == (v, v) for b in r.batches),
    "resize_long": lambda r, v: [(t.low, t.high) for t in r.augment().get("RandomLongSideResize", [])] == [tuple(v)],
    "hflip": lambda r, v: not r.augment().get("RandomHorizontalFlip") and
    all(not getattr(a, "hflip", False) for a in r.augment().get("AffinityAugment", [])),
    "color_jitter": lambda r, v: [x for j in r.augment()["ColorJitter"] for x in (
        j.brightness[1] - 1, j.contrast[1] - 1, j.saturation[1] - 1, j.hue[1])] == pytest.approx(v),
    "seed": lambda r, v: [i for b in r.batches if b["epoch"] == 0 for i in b["idx"]] == [i for _, i in list(
        trainer.EpochSampler(len(r.dataset), r.values["batch_size"], v, 0))],
    "checkpoint_every": lambda r, v: [s for n, s in r.saves if n == "last.pth"] == list(range(1, len(r.batches) + 1)),
    "log_every": lambda r, v: [x["step"] for x in r.metrics] == [s for s in range(1, len(r.batches) + 1)
                                                                 if s % v == 0 or s == len(r.batches)],
    "keep_epochs": lambda r, v: (r.out_dir / "epoch_001.pth").is_file(),
    "overwrite": lambda r, v: not any(x.get("stale") for x in r.metrics),
    "step_in_backward": lambda r, v: r.in_backward == [True],
    "net.pretrained": lambda r, v: _check_pretrained(r, v) is None,
    "init": lambda r, v: _check_init(r, v) is None,
    "net.backbone": lambda r, v: type(r.model().backbone).__name__ == "TinyCNN",
    "net.width": lambda r, v: r.model().backbone.channels[1] == 4,   # 16 x 0.25
    "net.dropout": lambda r, v: _dropouts(r.model()) == [v],
    "net.output_stride": lambda r, v: max(r.model().backbone.strides.values()) == v,
}


class StageSpies:
    """Records the arguments of the functions a stage module calls (``name -> [args, ...]``)."""

    def __init__(self, monkeypatch, module, names):
        self.calls: dict[str, list] = {n: [] for n in names}
        for name in names:
            real = getattr(module, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                self.calls[_name].append((args, kwargs))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)


def _metrics_w(run):
    return {x["epoch"]: x["w"] for x in run.metrics}


# each trainer: (stage module, variant, its own keys: value or a check, the stage functions spied)
# a row: value -> check(run, spies, value) -> bool
def _rows_cgnet(paths):
    return {
        "oc_weights": (str(paths["oc"]), lambda r, sp, v: all(torch.equal(r.task.oc.state_dict()[k], t) for k, t in
                                                               torch.load(v, weights_only=True)["model"].items())),
        "select_by_oracle": (True, lambda r, sp, v: (r.out_dir / "oracle_best.pth").is_file()),
    }


MASKING_ROWS = {  # masking section, observed in the CGNet run
    "depth": (2, lambda r, sp, v: {c[0][3] for c in sp.calls["erased_logits"]} == {v}),
    "normalization": ("per_image", lambda r, sp, v: {c[0][3] for c in sp.calls["erasing_mask"]} == {v}),
    "cse_init": (0.45, lambda r, sp, v: _metrics_w(r)[0] == pytest.approx(v)),
    "cse_slope": (0.15, lambda r, sp, v: _metrics_w(r)[1] == pytest.approx(0.45 + v)),
}


def _rows_affinity(paths):
    return {
        "label_rule": ("top_left", lambda r, sp, v: len(sp.calls["ensure_crf_labels"]) == 1
                       and not sp.calls["ensure_cell_tables"]),
        "cam_dir": (str(paths["cams"]), lambda r, sp, v: Path(sp.calls["ensure_crf_labels"][0][0][1]) == Path(v)),
        "la_alpha": (3.0, lambda r, sp, v: v in sp.calls["ensure_crf_labels"][0][0][2]),
        "ha_alpha": (20.0, lambda r, sp, v: v in sp.calls["ensure_crf_labels"][0][0][2]),
        "radius": (3, lambda r, sp, v: {c[0][1] for c in sp.calls["offset_affinity"]} == {v}),
        "psa_border": (False, lambda r, sp, v: {c[0][2] for c in sp.calls["offset_affinity"]} == {v}),
        "head_channels": ([8, 12, 16], lambda r, sp, v: [r.model().f8_3.out_channels, r.model().f8_4.out_channels,
                                                          r.model().f8_5.out_channels] == v),
        "embed_stride": (2, lambda r, sp, v: r.model().embed_stride == v),
    }


def _rows_deeplab(paths):
    def build(sp, i):
        return sp.calls["build_deeplab"][0][0][i]

    def settings(sp):
        return sp.calls["segment_split"][0][0][3]

    return {
        "head": ("aspp", lambda r, sp, v: build(sp, 2) == v and type(r.model().head).__name__ == "ASPP"),
        "head_channels": (12, lambda r, sp, v: build(sp, 3) == v),
        "head_dilations": ([2, 3], lambda r, sp, v: build(sp, 4) == v and
                           [c.dilation[0] for c in r.model().head.modules() if isinstance(c, torch.nn.Conv2d)] == v),
        "head_dropout": (0.2, lambda r, sp, v: build(sp, 5) == v),
        "label_dir": (str(paths["labels"]), lambda r, sp, v: Path(sp.calls["check_label_dir"][0][0][1]) == Path(v)),
        "split": ("sub", lambda r, sp, v: len(r.dataset) == len(SUBSET) and
                  sp.calls["check_label_dir"][0][0][0].ids == SUBSET),
        "eval_split": ("eval2", lambda r, sp, v: sp.calls["segment_split"][0][0][1].ids == EVAL_IDS[::-1]),
        "test_scales": ([0.75], lambda r, sp, v: settings(sp).scales == v),
        "test_flip": (True, lambda r, sp, v: settings(sp).flip is True),
        "test_crf": (True, lambda r, sp, v: settings(sp).crf is not None),
        "eval_only": None,   # test_deeplab_eval_only_and_weights_reach_the_evaluation below
        "weights": None,
    }


def _rows_irn(paths):
    return {
        "scale_range": ([0.7, 1.2], lambda r, sp, v: [(t.low, t.high) for t in r.augment()["RandomRescale"]] == [tuple(v)]),
        "cam_dir": (str(paths["cams"]), lambda r, sp, v: Path(sp.calls["ensure_ir_labels"][0][0][1]) == Path(v)),
        "conf_fg_thres": (0.4, lambda r, sp, v: {c[0][3] for c in sp.calls["ir_labels"]} == {v}),
        "conf_bg_thres": (0.1, lambda r, sp, v: {c[0][4] for c in sp.calls["ir_labels"]} == {v}),
        "crf_gt_prob": (0.6, lambda r, sp, v: len(sp.calls["ir_labels"]) == N_TRAIN
                        and {c[0][6] for c in sp.calls["ir_labels"]} == {v}),
        "train_radius": (3, lambda r, sp, v: {c[0][1] for c in sp.calls["boundary_affinity"]} == {v}),
        "edge_stride": (2, lambda r, sp, v: r.model().edge_stride == v and
                        {c[0][1] for c in sp.calls["reduce_labels"]} == {v}),
        "edge_channels": (8, lambda r, sp, v: {m.num_channels for m in r.model().modules()
                                               if isinstance(m, torch.nn.GroupNorm)} == {v}),
        "edge_groups": (2, lambda r, sp, v: {m.num_groups for m in r.model().modules()
                                             if isinstance(m, torch.nn.GroupNorm)} == {v}),
    }


# irn keys read by make_irn_labels or by the relation labels' CRF: tests/test_irn_stages.py varies each
# (values distinct from IRN's defaults) and compares the stage's output with the method called by hand
IRN_ELSEWHERE = {k: "tests/test_irn_stages.py::test_make_irn_labels_equal_the_walk_by_hand_and_every_setting_matters"
                 for k in ("weights", "out_dir", "split", "beta", "exp_times", "radius", "sem_seg_bg_thres", "cam_grid")}
IRN_ELSEWHERE["crf"] = "tests/test_irn_stages.py::test_train_irn_writes_relation_labels_of_the_configured_settings_and_trains"

TRAINERS = {
    "train_classifier": ("train_classifier", "sgd", lambda p: {}, ()),
    "train_cgnet": ("train_cgnet", "sgd", _rows_cgnet, ("erasing_mask", "erased_logits")),
    "train_affinity": ("train_affinity", "adam", _rows_affinity,
                       ("ensure_crf_labels", "ensure_cell_tables", "offset_affinity")),
    "train_deeplab": ("train_deeplab", "sgd", _rows_deeplab, ("build_deeplab", "check_label_dir")),
    "irn": ("train_irn", "sgd", _rows_irn, ("ensure_ir_labels", "ir_labels", "boundary_affinity", "reduce_labels")),
}
# keys a trainer does not read at all (so nothing can observe them)
# (the config refuses them away from their defaults: caee/core/config_rules.py NOT_READ)
NOT_READ: dict[str, dict[str, str]] = {"train_cgnet": {"amp": "CUDA only (bf16 autocast)"}}
for _key, _why in config_rules.NOT_READ.items():
    _section, _rest = _key.split(".", 1)
    NOT_READ.setdefault(_section, {})[_rest] = _why
SECTION_CLASSES = {"train_classifier": ClassifierTrainConfig, "train_cgnet": CGNetTrainConfig,
                   "train_affinity": AffinityTrainConfig, "train_deeplab": DeeplabTrainConfig, "irn": IrnConfig}


def _flat_fields(cls, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory()) if f.default_factory is not dataclasses.MISSING else False:
            if f.name == "net":
                out += [f"net.{g.name}" for g in dataclasses.fields(NetConfig)]
                continue
            if f.name == "crf":  # irn.crf: a CRF section of its own (tests/test_irn_stages.py)
                out.append("crf")
                continue
        out.append(prefix + f.name)
    return out


def _section_values(section, paths) -> tuple[dict, dict]:
    """(the section's changed values as a nested dict, {dotted key: row value}) of one trainer."""
    module, variant, rows, _ = TRAINERS[section]
    flat = {**ENGINE_VALUES, **{k: v for k, v in VARIANTS[variant].items()}, **NET_VALUES,
            **{k: row[0] for k, row in rows(paths).items() if row is not None}}
    flat = {k: (str(paths[v[1:-1]]) if isinstance(v, str) and v.startswith("<") else v) for k, v in flat.items()}
    flat = {k: v for k, v in flat.items() if k not in NOT_READ.get(section, {})}
    nested: dict = {}
    for k, v in flat.items():
        *parents, leaf = k.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return nested, flat


@pytest.mark.parametrize("section", sorted(TRAINERS))
def test_every_trainer_key_has_a_row(section):
    module, variant, rows, _ = TRAINERS[section]
    paths = {k: Path("/x") for k in ("imagenet", "init", "oc", "cams", "labels")}
    rows_here = rows(paths)
    covered = set(ENGINE_VALUES) | set(VARIANTS["adam"]) | set(VARIANTS["sgd"]) | set(NET_VALUES) | set(rows_here)
    covered |= set(ENGINE_UNOBSERVABLE) | set(NOT_READ.get(section, {}))
    if section == "irn":
        covered |= set(IRN_ELSEWHERE)
    keys = set(_flat_fields(SECTION_CLASSES[section]))
    assert covered >= keys and not (set(rows_here) - keys), f"{section}: keys without a wiring row: {keys - covered}"
    defaults = config_from_dict({}).__getattribute__(section)
    _, flat = _section_values(section, paths)
    for key, value in flat.items():
        default = defaults
        for part in key.split("."):
            default = getattr(default, part)
        assert value != default, f"{section}.{key} is set to its default"
    for key in ENGINE_VALUES:
        assert key in ENGINE_CHECKS


@pytest.fixture(scope="module")
def trainer_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_inputs")
    voc = _voc_folder(root / "voc")
    return {**_tiny_weights(root), "cams": voc / "cams", "labels": voc / "labels", "voc": voc}


@pytest.mark.parametrize("section", sorted(TRAINERS))
def test_every_trainer_key_reaches_the_engine_and_the_stage_s_consumers(section, trainer_inputs, tmp_path, monkeypatch):
    import importlib

    pytest.importorskip("pydensecrf")
    module_name, variant, rows, spied = TRAINERS[section]
    module = importlib.import_module(f"caee.stages.{module_name}")
    nested, flat = _section_values(section, trainer_inputs)
    cfg = {"work_dir": str(tmp_path / "work"), "device": "cpu",
           # data.cam_split: the CGNet's oracle scores the CAM split at each epoch's end (its 2 images);
           # data.train_split: the classifier trains on 6 of the 8 images
           "data": {"dataset": "voc", "root": str(trainer_inputs["voc"]), "num_workers": 0, "cam_split": "val",
                    **({"train_split": "sub"} if section == "train_classifier" else {})},
           "crf": {"workers": 1, "iterations": 2}, "eval": {"workers": 1}, section: nested}
    if section == "train_cgnet":
        cfg["masking"] = {k: row[0] for k, row in MASKING_ROWS.items()}
    if section == "irn":
        nested.setdefault("crf", {})["workers"] = 1   # the relation labels in this process (the spy sees them)
        import shutil

        shutil.rmtree(trainer_inputs["voc"] / "cams_irlabels_0.4_0.1", ignore_errors=True)
    names = list(spied) + (["segment_split"] if section == "train_deeplab" else [])
    spies = StageSpies(monkeypatch, module, [n for n in names if n != "segment_split"])
    if section == "train_deeplab":
        seg = StageSpies(monkeypatch, module.segment, ["segment_split"])
        spies.calls.update(seg.calls)
    run = TrainerRun(monkeypatch, module, cfg, section)
    failed = []
    for key, value in flat.items():
        if key in ENGINE_CHECKS:
            ok = ENGINE_CHECKS[key](run, value)
        else:
            ok = rows(trainer_inputs)[key][1](run, spies, value)
        if not ok:
            failed.append(key)
    if section == "train_cgnet":
        failed += [f"masking.{k}" for k, row in MASKING_ROWS.items() if not row[1](run, spies, row[0])]
        failed += [] if run.task.oracle.index.ids == EVAL_IDS else ["data.cam_split"]
    if section == "train_classifier" and run.dataset.index.ids != SUBSET:
        failed.append("data.train_split")
    failed += [] if run.num_workers == 0 else ["data.num_workers"]   # 0: not the default 2
    assert not failed, f"{section}: these keys did not reach their consumer: {failed}"


def test_every_masking_key_has_a_row():
    assert set(MASKING_ROWS) == {f.name for f in dataclasses.fields(MaskingConfig)}
    assert all(row[0] != getattr(MaskingConfig(), k) for k, row in MASKING_ROWS.items())


# ---------------------------------------------------------------- eval (eval_miou.py)

# a folder holding CAMs and one stray PNG (only an explicit eval.kind scores it), the val split
# without one CAM (only allow_missing scores it)
EVAL_KEYS = {
    "dir": ("<tmp>/to_score", lambda r: r.args[0] == r.tmp / "to_score"),
    "kind": ("cam", lambda r: r.called == "cam"),
    "split": ("val", lambda r: r.args[1].ids == VAL),
    "out": ("<tmp>/scores.json", lambda r: (r.tmp / "scores.json").is_file()),
    "thresholds": ([0.2, 0.4], lambda r: r.args[2] == [0.2, 0.4] and
                   sorted(r.result["summary"]["thresholds"]) == [0.2, 0.3, 0.4]),
    "threshold": (0.3, lambda r: r.args[3] == 0.3 and r.result["summary"]["threshold"] == 0.3),
    "allow_missing": (True, lambda r: r.args[5] is True and r.result["summary"]["num_evaluated"] == len(VAL) - 1),
    "workers": (1, lambda r: r.args[4] == 1),
}


def test_every_eval_key_reaches_the_scoring(tmp_path, fake_voc, monkeypatch):
    from caee.core.config import EvalConfig
    from caee.engine import scoring
    from caee.stages import eval_miou

    assert set(EVAL_KEYS) == {f.name for f in dataclasses.fields(EvalConfig)}, "an eval key without a row"
    assert all(row[0] != getattr(EvalConfig(), k) for k, row in EVAL_KEYS.items())
    folder = tmp_path / "to_score"
    for image_id in VAL[:-1]:
        h, w = FAKE_VOC[image_id][0]
        save_cam_npz(folder / f"{image_id}.npz", np.array([2], np.int64), np.full((1, h, w), 0.35, np.float32))
    save_label_png(folder / "stray.png", np.zeros((4, 4), np.uint8))

    class Run:
        tmp = tmp_path

    real = {"cam": scoring.evaluate_cam_dir, "label": scoring.evaluate_label_dir}

    def spy(kind):
        def f(*args):
            Run.args, Run.called = list(args), kind
            return real[kind](*args)
        return f

    monkeypatch.setattr(scoring, "evaluate_cam_dir", spy("cam"))
    monkeypatch.setattr(scoring, "evaluate_label_dir", spy("label"))
    values = {k: (str(row[0]).replace("<tmp>", str(tmp_path)) if isinstance(row[0], str) else row[0])
              for k, row in EVAL_KEYS.items()}
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "device=cpu", "data.dataset=voc", f"data.root={fake_voc}",
                             *[f"eval.{k}={v}" for k, v in values.items()]])
    Run.result = eval_miou.main(cfg)
    failed = [k for k, row in EVAL_KEYS.items() if not row[1](Run)]
    assert not failed, f"these eval keys did not reach the scoring: {failed}"


def test_deeplab_eval_only_and_weights_reach_the_evaluation(trainer_inputs, tmp_path, monkeypatch):
    """train_deeplab.eval_only with train_deeplab.weights: no training, the evaluation of
    data.val_split (train_deeplab.eval_split empty) with the network of those weights."""
    from caee.models.deeplab import build_deeplab
    from caee.stages import train_deeplab

    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    torch.manual_seed(31)
    model = build_deeplab(net, 21, "largefov", 8, [2], 0.1)
    weights = tmp_path / "deeplab.pth"
    torch.save({"model": model.state_dict(), "arch": "deeplab", "net": dataclasses.asdict(net), "head": "largefov",
                "head_channels": 8, "head_dilations": [2], "head_dropout": 0.1, "num_classes": 20}, weights)
    seen = []
    real = train_deeplab.segment.segment_split
    monkeypatch.setattr(train_deeplab.segment, "segment_split",
                        lambda m, index, *a: (seen.append(({k: v.clone() for k, v in m.state_dict().items()}, index)),
                                              real(m, index, *a))[1])
    monkeypatch.setattr(train_deeplab, "fit", lambda *a, **k: pytest.fail("eval_only trained"))
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "device=cpu", "data.dataset=voc",
                             f"data.root={trainer_inputs['voc']}", "data.num_workers=0", "data.val_split=eval2",
                             "eval.workers=1", "train_deeplab.eval_only=true", f"train_deeplab.weights={weights}",
                             "train_deeplab.net.backbone=tinycnn", "train_deeplab.net.width=0.25",
                             "train_deeplab.head_channels=8", "train_deeplab.head_dilations=[2]"])
    train_deeplab.main(cfg)
    (state, index), = seen
    assert index.ids == EVAL_IDS[::-1]                                   # data.val_split
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())   # eval_only + weights


# ---------------------------------------------------------------- data (caee/data/splits.py, custom.py)

DATA_KEYS = {  # observed in the index load_split makes (the consumer of every dataset key)
    "dataset": ("custom", lambda ix, root: ix.class_names == ["cat", "dog", "car"]),
    "root": ("<root>", lambda ix, root: ix.root == root and ix.image_path(0).is_relative_to(root)),
    "image_dir": ("imgs", lambda ix, root: ix.image_path(0).parent == root / "imgs"),
    "mask_dir": ("masks", lambda ix, root: ix.mask_dir == root / "masks"),
    "eval_mask_dir": ("gt", lambda ix, root: ix.eval_mask_dir == root / "gt"),
    "labels_csv": ("labels.csv", lambda ix, root: ix.labels.tolist() == [[1, 0, 1], [0, 1, 0]]),
}
# observed in the runs above: train_split and cam_split (the trainers), val_split (DeepLab's
# evaluation), num_workers (fit's argument); synthetic: test_every_synthetic_key_changes_the_images
DATA_ELSEWHERE = {"train_split", "cam_split", "val_split", "num_workers", "synthetic"}


def test_every_data_key_reaches_the_index(tmp_path):
    from caee.core.config import DataConfig
    from caee.data import load_split

    assert set(DATA_KEYS) | DATA_ELSEWHERE == {f.name for f in dataclasses.fields(DataConfig)}
    root = tmp_path / "custom"
    for d in ("imgs", "masks", "gt", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for i in ("a", "b"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "imgs" / f"{i}.png")
        save_label_png(root / "masks" / f"{i}.png", np.zeros((6, 8), np.uint8))
        save_label_png(root / "gt" / f"{i}.png", np.zeros((6, 8), np.uint8))
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (root / "labels.csv").write_text("image_id,cat,dog,car\na,1,0,1\nb,0,1,0\n")
    values = {k: str(root) if row[0] == "<root>" else row[0] for k, row in DATA_KEYS.items()}
    cfg = load_config(None, [f"data.{k}={v}" for k, v in values.items()])
    index = load_split(cfg.data, "train")
    failed = [k for k, row in DATA_KEYS.items() if not row[1](index, root)]
    assert not failed, f"these data keys did not reach the index: {failed}"


# ---------------------------------------------------------------- data.synthetic (caee/data/synthetic.py)

SYNTHETIC_DRAW = {  # the drawing of one image: image or mask differs from the default's for the same stream
    "image_size": 40, "num_classes": 3, "objects_per_image": [3, 3], "object_radius": [8, 10], "part_size": 4,
    "part_hidden_prob": 1.0, "body_saturation": 0.6, "stripe_period": 3.0, "stripe_amplitude": 0.8,
    "stripe_jitter_deg": 30.0, "stripe_fade": 0.9, "stripe_angles": "mirror_free", "object_aspect": [0.4, 0.5],
    "wobble": 0.3, "noise_std": 0.1, "min_visible_px": 900, "ignore_band": 2,
}
SYNTHETIC_FILES = {"num_train": 2, "num_val": 1, "image_format": "png", "seed": 3}  # the generated folder


def test_every_synthetic_key_changes_the_images(tmp_path):
    from caee.core.config import SyntheticConfig
    from caee.data import synthetic

    assert set(SYNTHETIC_DRAW) | set(SYNTHETIC_FILES) == {f.name for f in dataclasses.fields(SyntheticConfig)}
    base = SyntheticConfig(image_size=48)
    assert all(v != getattr(base, k) for k, v in {**SYNTHETIC_DRAW, **SYNTHETIC_FILES}.items())

    def draw(cfg, stream):
        image, mask, _ = synthetic.render_sample(np.random.default_rng(stream), cfg)
        return image, mask

    same = []
    for key, value in SYNTHETIC_DRAW.items():
        changed = dataclasses.replace(base, **{key: value})
        if all(a.shape == b.shape and np.array_equal(a, b) for s in (0, 1, 2)
               for a, b in zip(draw(base, s), draw(changed, s))):
            same.append(key)
    assert not same, f"these synthetic keys do not change the drawing: {same}"
    # part_size is read twice (where the emblem goes, how large it is painted): every emblem shown whole
    _, _, objects = synthetic.render_sample(np.random.default_rng(0), dataclasses.replace(
        base, part_size=SYNTHETIC_DRAW["part_size"], part_hidden_prob=0.0))
    assert max(o["part_visible_px"] for o in objects) == SYNTHETIC_DRAW["part_size"] ** 2

    cfg = dataclasses.replace(base, image_size=16, object_radius=[3, 5], part_size=2, min_visible_px=4,
                              **SYNTHETIC_FILES)
    root = synthetic.generate_synthetic(tmp_path / "syn", cfg, workers=1)
    split = lambda s: (root / "ImageSets/Segmentation" / f"{s}.txt").read_text().split()  # noqa: E731
    assert len(split("train")) == 2 and len(split("val")) == 1                    # num_train, num_val
    files = sorted(p.name for p in (root / "JPEGImages").iterdir())
    assert files == ["train_00000.png", "train_00001.png", "val_00000.png"]      # image_format
    image, _, _ = synthetic.render_sample(synthetic._sample_rng(3, "train", 1), cfg)   # seed
    np.testing.assert_array_equal(np.asarray(Image.open(root / "JPEGImages" / "train_00001.png")), image)


def test_affinity_psa_rule_augments_with_the_section_s_crop_flip_and_jitter(trainer_inputs, monkeypatch):
    """label_rule psa (the default; the run above uses top_left): PSA's augmentation of the cell
    tables gets the section's crop_size, hflip and color_jitter."""
    pytest.importorskip("pydensecrf")
    from caee.data import load_split
    from caee.stages import train_affinity

    seen = []
    real = train_affinity.AffinityAugment
    monkeypatch.setattr(train_affinity, "AffinityAugment", lambda *a: (seen.append(a), real(*a))[1])
    cfg = config_from_dict({"data": {"dataset": "voc", "root": str(trainer_inputs["voc"])}, "crf": {"workers": 1},
                            "train_affinity": {k: ENGINE_VALUES[k] for k in ("crop_size", "hflip", "color_jitter")}})
    train_affinity.build_dataset(cfg, load_split(cfg.data, "val"), trainer_inputs["cams"], 4)
    assert seen == [(ENGINE_VALUES["crop_size"], ENGINE_VALUES["hflip"], ENGINE_VALUES["color_jitter"])]


@pytest.mark.parametrize("section", ["train_classifier", "train_cgnet", "train_affinity", "train_deeplab"])
def test_trainers_freeze_the_backbone_only_when_it_starts_from_trained_weights(section, trainer_inputs, tmp_path,
                                                                              monkeypatch):
    """``net.pretrained`` or ``init`` set: the backbone's ImageNet freezing applies; neither (random
    weights): nothing is frozen and BatchNorm trains (``Backbone.freeze(trained=False)``)."""
    import importlib

    from caee.models.backbone import Backbone

    pytest.importorskip("pydensecrf")
    module = importlib.import_module(f"caee.stages.{TRAINERS[section][0]}")
    seen: list[bool] = []
    real_freeze = Backbone.freeze
    monkeypatch.setattr(Backbone, "freeze", lambda self, trained=True: (seen.append(trained), real_freeze(self, trained))[1])

    class Stop(Exception):
        pass

    monkeypatch.setattr(module, "fit", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    nested, _ = _section_values(section, trainer_inputs)
    starts = {"random": ({"pretrained": ""}, "", False), "imagenet": ({"pretrained": str(trainer_inputs["imagenet"])}, "", True),
              "init": ({"pretrained": ""}, str(trainer_inputs["init"]), True)}
    for name, (net, init, trained) in starts.items():
        section_cfg = {**nested, "net": {**nested["net"], **net}, "init": init, "max_steps": 1}
        cfg = {"work_dir": str(tmp_path / name), "device": "cpu",
               "data": {"dataset": "voc", "root": str(trainer_inputs["voc"]), "num_workers": 0, "cam_split": "val"},
               "crf": {"workers": 1, "iterations": 2}, "eval": {"workers": 1}, section: section_cfg}
        seen.clear()
        with pytest.raises(Stop):
            module.main(config_from_dict(cfg))
        assert seen[-1:] == [trained], (section, name, seen)
