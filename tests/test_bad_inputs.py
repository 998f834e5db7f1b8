"""A catalogue of bad inputs: each stops the stage's command line with exit code 2, one message
line naming the key or file, no traceback, and no output written."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_stage
from caee.core.config import config_to_dict
from caee.core.io import load_label_png, save_cam_npz, save_label_png
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
    # sizes a run cannot meet: uncropped images of random sizes in one batch, an upside-down resize range
    ("train_classifier.crop_size=0", "train_classifier.crop_size"),
    ("train_classifier.resize_long=[80, 48]", "train_classifier.resize_long"),
    ("train_cgnet.resize_long=[0, 64]", "train_cgnet.resize_long"),
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


def _dotdot_component(root):
    # PSA-style path through '..': it named train_00000 a second time
    _split(root).write_text("train_00000\n/JPEGImages/../JPEGImages/train_00000.jpg\n")


def _duplicate_id(root):
    _split(root).write_text("train_00000\ntrain_00001\ntrain_00000\n")


def _blank_name(root):
    _split(root).write_text("train_00000\n/JPEGImages/.jpg /SegmentationClassAug/.png\n")


def _derived_labels(root):
    """Drop the generator's labels file: image-level labels are then derived from the masks."""
    (root / "cls_labels.npz").unlink()
    return root / "SegmentationClassAug" / f"{_split(root).read_text().split()[0]}.png"  # data.mask_dir


def _mask_of_other_size(root):
    mask = _derived_labels(root)
    save_label_png(mask, np.zeros((17, 23), np.uint8))


def _mask_with_bad_values(root):
    mask = _derived_labels(root)
    save_label_png(mask, np.full(load_label_png(mask).shape, 9, np.uint8))


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
    (_dotdot_component, "train.txt line 2"), (_duplicate_id, "train.txt line 3: image 'train_00000' is already "
                                                             "listed on line 1"),
    (_blank_name, "train.txt line 2"), (_mask_of_other_size, "mask is 23x17 but its image"),
    (_mask_with_bad_values, "label values [9]"),
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
    (folder / "record.json").unlink()  # a last.pth whose settings are unknown


def _changed_lr(folder):
    return ["train_classifier.lr=0.0001"]


def _changed_width(folder):
    return ["train_classifier.net.width=0.25"]


def _changed_optimizer(folder):
    return ["train_classifier.optimizer=sgd"]


CKPT_CASES = [
    (_nan_last, "last.pth"), (_truncated_last, "last.pth"), (_foreign_last, "last.pth"),
    (_unrecorded_last, "without a record"), (_changed_lr, "train_classifier.lr"), (_changed_width, "train_classifier.net.width"),
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
    assert len(CONFIG_CASES) + 2 + len(DATA_CASES) + 1 + len(CAM_CASES) + len(CKPT_CASES) >= 50


# ---------------------------------------------------------------- write faults (issue 26)


def fail_writes(monkeypatch, name: str, err: int, after: int = 0, on_fault=None) -> None:
    """Atomic writes of files called ``name`` fail with ``err`` at their fsync (where a full disk
    shows up) once ``after`` of them have succeeded; ``on_fault()`` runs first (to see the files then)."""
    real, count = os.fsync, [0]

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            count[0] += 1
            if count[0] > after:
                if on_fault:
                    on_fault()
                raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def read_only(monkeypatch, folder: Path, err: int = errno.EROFS) -> None:
    """Every write under ``folder`` (new folders, files opened for writing) fails with ``err``, as on a
    read-only mount: in-process, so it also works as root and on CI without mounting anything."""
    folder = folder.resolve()
    real_mkdir, real_open, real_io_open = os.mkdir, os.open, io.open

    def refused(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder)

    def fault(path):
        return OSError(err, os.strerror(err), str(path))

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise fault(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise fault(path)
        return real_open(path, flags, *args, **kwargs)

    def io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and refused(file):
            raise fault(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)


def files_of(folder: Path) -> dict[str, bytes]:
    """Content of the files under ``folder`` (not log.txt, not the temp file of a write in progress)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "log.txt" and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def test_disk_full_while_writing_a_checkpoint(tmp_path, dataset, monkeypatch, capsys):
    """The 2nd last.pth write finds the disk full: one line naming last.pth; the files stay as they were
    at that moment (last.pth of step 1, no model.pth, no temp file); a re-run resumes and finishes."""
    config = write_config(tmp_path, **{"data.root": str(dataset), "train_classifier.max_steps": 3,
                                       "train_classifier.epochs": 2, "train_classifier.checkpoint_every": 1})
    folder = tmp_path / "work" / "train_classifier"
    at_fault: dict[str, bytes] = {}
    fail_writes(monkeypatch, "last.pth", errno.ENOSPC, after=1, on_fault=lambda: at_fault.update(files_of(folder)))
    rc, err = run_cli(train_classifier.main, config, capsys=capsys)
    assert_refused(rc, err, f"cannot write {folder / 'last.pth'}: no space left on the device")
    assert "last.pth" in at_fault and files_of(folder) == at_fault and not list(folder.glob(".*.tmp"))
    assert torch.load(folder / "last.pth", weights_only=True)["step"] == 1
    assert not (folder / "model.pth").exists()
    monkeypatch.undo()
    assert run_cli(train_classifier.main, config, capsys=capsys)[0] == 0
    assert (folder / "model.pth").is_file() and torch.load(folder / "last.pth", weights_only=True)["step"] == 3


def _cam_folder(tmp_path: Path, exp: Path) -> Path:
    """CAMs (0.5 for class 0) of every image of the CAM split, at the images' sizes."""
    from caee.core.config import load_config
    from caee.data import load_split

    cfg = load_config(exp)
    index = load_split(cfg.data, cfg.data.cam_split)
    cam_dir = tmp_path / "cams"
    for i, image_id in enumerate(index.ids):
        h, w = np.asarray(Image.open(index.image_path(i))).shape[:2]
        save_cam_npz(cam_dir / f"{image_id}.npz", np.array([0]), np.full((1, h, w), 0.5, np.float32))
    return cam_dir


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS], ids=["ENOSPC", "EACCES", "EROFS"])
def test_write_fault_on_an_output_keeps_the_earlier_one(tmp_path, exp, monkeypatch, err, capsys):
    cam_dir, out = _cam_folder(tmp_path, exp), tmp_path / "result.json"
    assert run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", capsys=capsys)[0] == 0
    before = out.read_bytes()
    fail_writes(monkeypatch, "result.json", err)
    rc, err_text = run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", "eval.thresholds=[0.3]",
                           capsys=capsys)
    assert_refused(rc, err_text, f"cannot write {out}")
    assert out.read_bytes() == before and not list(tmp_path.glob(".result.json.*"))


def test_output_path_that_is_a_folder(tmp_path, exp, capsys):
    cam_dir, out = _cam_folder(tmp_path, exp), tmp_path / "result.json"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", capsys=capsys)
    assert_refused(rc, err, f"cannot write {out}: it is a folder")
    assert files_of(out) == {"keep.txt": b"mine"} and not list(tmp_path.glob(".result.json.*"))


def run_pipeline(config: Path, *args: str, capsys) -> tuple[int, str]:
    from caee.cli import main

    capsys.readouterr()
    rc = main(["run", "--config", str(config), *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("entry", ["stage", "caee run"])
def test_work_dir_that_is_a_file(tmp_path, exp, entry, capsys):
    work = tmp_path / "work"
    work.write_text("not a folder")
    if entry == "stage":
        rc, err = run_cli(train_classifier.main, exp, "train_classifier.max_steps=1", capsys=capsys)
    else:
        rc, err = run_pipeline(exp, "--stages", "train_classifier", "train_classifier.max_steps=1", capsys=capsys)
    assert_refused(rc, err, f"{work} is a file, not a folder")
    assert work.read_text() == "not a folder"


def test_read_only_work_dir_under_caee_run(tmp_path, exp, monkeypatch, capsys):
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    rc, err = run_pipeline(exp, "--stages", "train_classifier", f"work_dir={tmp_path / 'ro' / 'w'}",
                           "train_classifier.max_steps=1", capsys=capsys)
    assert_refused(rc, err, "read-only file system; choose a writable work_dir")
    assert str(tmp_path / "ro") in err
    monkeypatch.undo()
    assert not any((tmp_path / "ro").iterdir())


def test_read_only_folder_above_work_dir_under_caee_run(tmp_path, exp, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere (test_read_only_work_dir_under_caee_run covers it in-process)")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        rc, err = run_pipeline(exp, "--stages", "train_classifier", f"work_dir={tmp_path / 'ro' / 'a' / 'w'}",
                               "train_classifier.max_steps=1", capsys=capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert_refused(rc, err, "permission denied; choose a writable work_dir")
    assert not any((tmp_path / "ro").iterdir())


# ---------------------------------------------------------------- config and command line (issue 26)


def test_nproc_below_one(tmp_path, exp, capsys):
    rc, err = run_pipeline(exp, "--nproc", "0", "--stages", "train_classifier", capsys=capsys)
    assert_refused(rc, err, "--nproc must be at least 1")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("text,names", [
    ("train_classifier:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "key 'lr' is given twice (lines 2 and 4)"),
    ("train_classifier:\n  lr: 0.1\ntrain_cgnet:\n  lr: 0.1\ntrain_classifier:\n  epochs: 3\n",
     "key 'train_classifier' is given twice (lines 1 and 5)"),
], ids=["key", "section"])
def test_duplicate_yaml_key(tmp_path, exp, text, names, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text(f"base: {exp.name}\n" + text)
    rc, err = run_cli(train_classifier.main, config, capsys=capsys)
    line = assert_refused(rc, err, names.replace("lines 1 and 5", "lines 2 and 6").replace("2 and 4", "3 and 5"))
    assert str(config) in line
    assert not (tmp_path / "work").exists()


def test_overrides_after_every_flag(tmp_path, exp, monkeypatch, capsys):
    import caee.pipeline.run
    from caee.cli import main

    seen: dict = {}
    monkeypatch.setattr(train_classifier, "main", lambda cfg: seen.update(cfg=cfg))
    assert main(["train-classifier", "--config", str(exp), "--overwrite", "train_classifier.lr=0.5"]) == 0
    assert seen["cfg"].train_classifier.lr == 0.5 and seen["cfg"].train_classifier.overwrite
    assert main(["train-classifier", "train_classifier.lr=0.25", "--config", str(exp), "masking.depth=2"]) == 0
    assert seen["cfg"].train_classifier.lr == 0.25 and seen["cfg"].masking.depth == 2
    monkeypatch.setattr(caee.pipeline.run, "run", lambda cfg, stages, nproc, overwrite: seen.update(
        cfg=cfg, stages=stages, nproc=nproc, overwrite=overwrite) or {})
    assert main(["run", "--config", str(exp), "--overwrite", "masking.depth=3", "--nproc", "2", "crf.iterations=4",
                 "--stages", "train_cgnet", "cam.batch_size=2"]) == 0
    assert seen["cfg"].masking.depth == 3 and seen["cfg"].crf.iterations == 4 and seen["cfg"].cam.batch_size == 2
    assert seen["stages"] == ["train_cgnet"] and seen["nproc"] == 2 and seen["overwrite"]


# ---------------------------------------------------------------- messages (issue 26)


def test_config_path_that_is_a_folder(tmp_path, capsys):
    rc, err = run_cli(train_classifier.main, tmp_path, capsys=capsys)
    line = assert_refused(rc, err, f"{tmp_path} is a folder, not a file")
    assert "not found" not in line


def test_data_root_that_is_a_file(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "synthetic").write_text("x")
    rc, err = run_cli(train_classifier.main, config, capsys=capsys)
    line = assert_refused(rc, err, f"data.root = {tmp_path / 'synthetic'} is a file, not a dataset folder")
    assert "delete the folder" not in line
    assert (tmp_path / "synthetic").read_text() == "x"


def test_cam_of_another_size_is_named_as_the_cam(tmp_path, exp, capsys):
    cam_dir = _cam_folder(tmp_path, exp)
    bad = sorted(cam_dir.iterdir())[1]
    save_cam_npz(bad, np.array([0]), np.full((1, 5, 7), 0.5, np.float32))
    out = tmp_path / "result.json"
    rc, err = run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", capsys=capsys)
    line = assert_refused(rc, err, f"{bad}: CAMs of size 7x5 for image {bad.stem}, but its ground truth is")
    assert "regenerate the CAMs" in line and not out.exists()


def test_split_listing_an_image_twice_is_not_evaluated(tmp_path, exp, capsys):
    """It would count that image twice in the mIoU."""
    from caee.core.config import load_config

    cam_dir = _cam_folder(tmp_path, exp)
    cfg = load_config(exp)
    split = tmp_path / "synthetic" / "ImageSets" / "Segmentation" / f"{cfg.data.cam_split}.txt"
    ids = split.read_text().split()
    split.write_text("\n".join(ids + ids[:1]) + "\n")
    out = tmp_path / "result.json"
    rc, err = run_cli(eval_miou.main, exp, f"eval.dir={cam_dir}", f"eval.out={out}", capsys=capsys)
    assert_refused(rc, err, f"line {len(ids) + 1}: image '{ids[0]}' is already listed on line 1")
    assert not out.exists()
