"""Every key of a stage's config section reaches its consumer, driven by the config's own key table.

For each field of the section's dataclass in ``caee/core/config.py`` (enumerated here, so a newly
added key fails this test until it gets a row), the table below gives a value that differs from
the default and from the other keys' values, and what the consumer must show for it: an argument
of the method call that uses it (a spy) or a property of the stage's output, never the config
object. One stage run with every key changed at once serves all rows. A key that cannot be
observed this way goes to ``UNOBSERVABLE`` with the reason; keep that list short.

Covered so far: the ``cam`` section (make_cam.py: ``multiscale_cams`` arguments and the files
written), which CAM folder the later stages read for each ``cam.source`` (``train_affinity.cam_dir``
and ``pseudo_labels.cam_dir`` left at their defaults) and the ``pseudo_labels`` section
(make_pseudo_labels.py: the random walk's and the embedding's arguments, the CRF jobs, the files).
The other sections are still to come.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

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

    walks, submitted, models = [], [], []
    real_walk, real_embed = mpl.random_walk_scores, mpl.embed_image

    def embed_spy(model, *args):
        models.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_embed(model, *args)

    def walk_spy(feats, cams, params, stride, pairs):
        walks.append({"params": params, "pairs": (pairs.radius, pairs.psa_border), "cams": cams.clone()})
        return real_walk(feats, cams, params, stride, pairs)

    class Writer:  # what would go to the CRF processes
        def __init__(self, fn, workers):
            pass

        def submit(self, job):
            submitted.append(job)
            image_path, scores, keys, crf, out_path = job
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
    for w, image_id in zip(walks, val):                                                  # cam_dir
        keys, cams = load_cam_npz(work / "cams" / f"{image_id}.npz")
        torch.testing.assert_close(w["cams"].float(), torch.from_numpy(cams).float())
