"""A catalogue of bad inputs: each stops the stage's command line with exit code 2, one message
line naming the key or file, no traceback, and no output written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from caee.cli import run_stage
from caee.core.config import config_to_dict
from caee.core.io import save_cam_npz
from caee.stages import eval_miou, train_classifier
from conftest import mini_config

# ---------------------------------------------------------------- helpers


def write_config(tmp_path: Path, **overrides) -> Path:
    """The miniature experiment (tests/conftest.py) as a YAML file for the command line."""
    cfg = mini_config(tmp_path, **overrides)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def run_cli(main, config: Path, *overrides: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_stage(main, None, ["--config", str(config), *overrides])
    err = capsys.readouterr().err
    return rc, err


def assert_refused(rc: int, err: str, names: str) -> str:
    """Exit 2, no traceback, the error message is one line and names ``names``."""
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").endswith(errors[0]), "the error message spans several lines"
    assert names in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The miniature synthetic data set, generated once for the module."""
    from caee.data import ensure_dataset

    base = tmp_path_factory.mktemp("data")
    ensure_dataset(mini_config(base).data)
    return base / "synthetic"


@pytest.fixture
def exp(tmp_path, dataset) -> Path:
    """A config whose data root is a private copy of the data set (cases may damage it)."""
    shutil.copytree(dataset, tmp_path / "synthetic")
    return write_config(tmp_path)


# ---------------------------------------------------------------- config values

CONFIG_CASES = [
    ("train_classifier.batch_size=0", "train_classifier.batch_size"),
    ("train_classifier.checkpoint_every=0", "train_classifier.checkpoint_every"),
    ("train_classifier.log_every=0", "train_classifier.log_every"),
    ("train_classifier.crop_size=-5", "train_classifier.crop_size"),
    ("train_classifier.lr=-1", "train_classifier.lr"),
    ("train_classifier.lr=.nan", "train_classifier.lr"),
    ("train_classifier.lr=0", "train_classifier.lr"),
    ("data.num_workers=-1", "data.num_workers"),
    ("cam.batch_size=0", "cam.batch_size"),
    ("train_classifier.epochs=0", "train_classifier.epochs"),
    ("train_classifier.epochs=-1", "train_classifier.epochs"),
    ("train_classifier.weight_decay=-1", "train_classifier.weight_decay"),
    ("crf.iterations=-2", "crf.iterations"),
    ("cam.scales=[-1.0]", "cam.scales[0]"),
    ("cam.scales=[1.0, 0]", "cam.scales[1]"),
    ("eval.threshold=1.5", "eval.threshold"),
    ("eval.threshold=0", "eval.threshold"),
    ("eval.thresholds=[0.2, 1.0]", "eval.thresholds[1]"),
    ("train_classifier.momentum=1.5", "train_classifier.momentum"),
    ("train_classifier.net.dropout=1", "train_classifier.net.dropout"),
    ("train_classifier.net.width=0", "train_classifier.net.width"),
    ("train_affinity.radius=0", "train_affinity.radius"),
    ("pseudo_labels.beta=-8", "pseudo_labels.beta"),
    ("pseudo_labels.steps=-1", "pseudo_labels.steps"),
    ("train_affinity.la_alpha=0", "train_affinity.la_alpha"),
    ("train_deeplab.test_scales=[0.0]", "train_deeplab.test_scales[0]"),
    ("masking.depth=-1", "masking.depth"),
    ("data.synthetic.part_hidden_prob=2", "data.synthetic.part_hidden_prob"),
    ("train_classifier.seed=-3", "train_classifier.seed"),
    ("device=tpu", "device"),
    ("train_classifier.lr=abc", "train_classifier.lr"),
    ("train_classifier.max_steps=-2", "train_classifier.max_steps"),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(("device=cuda", "device"))


@pytest.mark.parametrize("override,key", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, override, key, capsys):
    config = write_config(tmp_path)
    rc, err = run_cli(train_classifier.main, config, override, capsys=capsys)
    assert_refused(rc, err, f"'{key}'")
    assert not (tmp_path / "work").exists()


def test_non_utf8_yaml(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"work_dir: caf\xe9\n")
    rc, err = run_cli(train_classifier.main, config, capsys=capsys)
    assert_refused(rc, err, str(config))


def test_yaml_floats_are_numbers(tmp_path):
    """YAML 1.2 floats (no dot) in a file and in an override are floats, not strings."""
    from caee.core.config import load_config

    path = tmp_path / "f.yaml"
    path.write_text("train_classifier:\n  lr: 5e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(path, ["train_cgnet.lr=1e-3"])
    assert cfg.train_classifier.lr == 5e-4 and cfg.train_classifier.weight_decay == 1e-5
    assert cfg.train_cgnet.lr == 1e-3


# ---------------------------------------------------------------- data files


def _split(root: Path) -> Path:
    return root / "ImageSets" / "Segmentation" / "train.txt"


def _first_image(root: Path) -> Path:
    first = _split(root).read_text().split()[0]
    return next((root / "JPEGImages").glob(f"{first}.*"))


def _bad_split_bytes(root):
    _split(root).write_bytes(b"train_00000\n\xff\xfe\n")


def _id_with_space(root):
    _split(root).write_text("train_00000\ntrain 00001\n")


def _id_with_backslash(root):
    _split(root).write_text("train_00000\nsub\\train_00001\n")


def _three_tokens(root):
    _split(root).write_text("train_00000\n/JPEGImages/train_00001.jpg a b\n")


def _id_escaping(root):
    _split(root).write_text("..\n")


def _id_with_dot(root):
    # used verbatim: train_00001.v2 is not train_00001
    _split(root).write_text("train_00000\ntrain_00001.v2\n")


def _empty_split(root):
    _split(root).write_text("# nothing\n")


def _missing_split(root):
    _split(root).unlink()


def _float_image(root):
    path = _first_image(root)
    path.unlink()
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(path.with_suffix(".tif"))
    (root / "JPEGImages" / (path.stem + ".png")).write_bytes(path.with_suffix(".tif").read_bytes())
    path.with_suffix(".tif").unlink()


def _truncated_image(root):
    path = _first_image(root)
    path.write_bytes(path.read_bytes()[:40])


def _missing_image(root):
    _first_image(root).unlink()


DATA_CASES = [
    (_bad_split_bytes, "train.txt"), (_id_with_space, "train.txt"), (_id_with_backslash, "train.txt"), (_three_tokens, "train.txt"),
    (_id_escaping, "train.txt"), (_id_with_dot, "train_00001.v2"), (_empty_split, "train.txt"),
    (_missing_split, "train.txt"), (_float_image, ".png"), (_truncated_image, "train_"),
    (_missing_image, "train_"),
]


@pytest.mark.parametrize("damage,names", DATA_CASES, ids=[c[0].__name__.strip("_") for c in DATA_CASES])
def test_bad_data_file(tmp_path, exp, damage, names, capsys):
    damage(tmp_path / "synthetic")
    rc, err = run_cli(train_classifier.main, exp, capsys=capsys)  # one epoch: every image is read
    assert_refused(rc, err, names)
    work = tmp_path / "work" / "train_classifier"
    assert not (work / "model.pth").exists() and not (work / "last.pth").exists()


def test_read_only_work_dir(tmp_path, exp, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        rc, err = run_cli(train_classifier.main, exp, f"work_dir={tmp_path / 'ro' / 'w'}", capsys=capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert_refused(rc, err, "permission denied")


# ---------------------------------------------------------------- CAM files


def _cam_case(keys, cams):
    def damage(cam_dir: Path, image_id: str, shape: tuple[int, int]):
        c = np.broadcast_to(np.asarray(cams, np.float32)[:, None, None], (len(cams), *shape))
        save_cam_npz(cam_dir / f"{image_id}.npz", np.asarray(keys), c.copy())
    return damage


def _truncated_cam(cam_dir, image_id, shape):
    save_cam_npz(cam_dir / f"{image_id}.npz", np.array([0]), np.zeros((1, *shape), np.float32))
    p = cam_dir / f"{image_id}.npz"
    p.write_bytes(p.read_bytes()[:30])


CAM_CASES = [
    ("nan", _cam_case([0], [np.nan])), ("inf", _cam_case([0], [np.inf])),
    ("negative", _cam_case([0], [-0.5])), ("above_one", _cam_case([0], [1.5])),
    ("key_beyond_classes", _cam_case([3], [0.5])), ("negative_key", _cam_case([-1], [0.5])),
    ("truncated", _truncated_cam),
]


@pytest.mark.parametrize("name,damage", CAM_CASES, ids=[c[0] for c in CAM_CASES])
def test_bad_cam_file(tmp_path, exp, name, damage, capsys):
    from caee.core.config import load_config
    from caee.data import load_split

    cfg = load_config(exp)
    index = load_split(cfg.data, cfg.data.cam_split)
    cam_dir = tmp_path / "cams"
    for i, image_id in enumerate(index.ids):
        h, w = np.asarray(Image.open(index.image_path(i))).shape[:2]
        save_cam_npz(cam_dir / f"{image_id}.npz", np.array([0]), np.full((1, h, w), 0.5, np.float32))
    bad_id = index.ids[1]
    h, w = np.asarray(Image.open(index.image_path(1))).shape[:2]
    damage(cam_dir, bad_id, (h, w))
    out = tmp_path / "result.json"
    rc, err = run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", capsys=capsys)
    assert_refused(rc, err, f"{bad_id}.npz")
    assert not out.exists()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A finished 2-step train_classifier run (its folder is copied by each case)."""
    base = tmp_path_factory.mktemp("trained")
    config = write_config(base, **{"data.root": str(dataset), "train_classifier.max_steps": 2})
    assert run_stage(train_classifier.main, None, ["--config", str(config)]) == 0
    return base / "work" / "train_classifier"


def _nan_last(folder):
    ck = torch.load(folder / "last.pth", weights_only=True)
    next(iter(ck["model"].values())).fill_(float("nan"))
    torch.save(ck, folder / "last.pth")


def _truncated_last(folder):
    (folder / "last.pth").write_bytes((folder / "last.pth").read_bytes()[:100])


def _foreign_last(folder):
    torch.save({"weights": torch.zeros(3)}, folder / "last.pth")


def _unrecorded_last(folder):
    ck = torch.load(folder / "last.pth", weights_only=True)
    del ck["settings"]
    torch.save(ck, folder / "last.pth")


def _changed_lr(folder):
    return ["train_classifier.lr=0.0001"]


def _changed_width(folder):
    return ["train_classifier.net.width=0.25"]


def _changed_optimizer(folder):
    return ["train_classifier.optimizer=sgd"]


CKPT_CASES = [
    (_nan_last, "last.pth"), (_truncated_last, "last.pth"), (_foreign_last, "last.pth"),
    (_unrecorded_last, "last.pth"), (_changed_lr, "train_classifier.lr"), (_changed_width, "train_classifier.net.width"),
    (_changed_optimizer, "train_classifier.optimizer"),
]


@pytest.mark.parametrize("damage,names", CKPT_CASES, ids=[c[0].__name__.strip("_") for c in CKPT_CASES])
def test_bad_checkpoint(tmp_path, dataset, trained, damage, names, capsys):
    folder = tmp_path / "work" / "train_classifier"
    shutil.copytree(trained, folder)
    (folder / "model.pth").unlink()
    overrides = damage(folder) or []
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "log.txt"}
    config = write_config(tmp_path, **{"data.root": str(dataset), "train_classifier.max_steps": 2})
    rc, err = run_cli(train_classifier.main, config, *overrides, capsys=capsys)
    assert_refused(rc, err, names)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "log.txt"}
    assert after == before  # config.yaml, last.pth, metrics untouched; no model.pth


def test_catalogue_size():
    assert len(CONFIG_CASES) + 2 + len(DATA_CASES) + 1 + len(CAM_CASES) + len(CKPT_CASES) >= 40
