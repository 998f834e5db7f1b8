"""Issue 16's problems 1-8, one test (or more) each: settings-checked resume, finite checkpoints,
seeded AffinityNet, ranges (see also test_bad_inputs.py), data values, messages instead of
tracebacks, leftovers and concurrency, file modes."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from caee.core import config_rules, records
from conftest import run_stage
from caee.core.config import Config, TrainConfig, config_to_dict, load_config
from caee.engine.trainer import StepContext, TrainTask, fit, load_checkpoint, save_checkpoint
from caee.core.errors import CaeeError
from caee.core.io import StageLock, atomic_write, load_cam_npz, load_image, save_cam_npz, write_text
from caee.stages import train_classifier
from conftest import mini_config
from test_engine import NoisyDataset, TinyTask, cfg as tiny_cfg


def _write(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(mini_config(tmp_path, **overrides))))
    return path


# ---------------------------------------------------------------- 1. resume checks the settings


def test_finished_run_with_other_lr_refuses_and_keeps_everything(tmp_path, capsys):
    config = _write(tmp_path, **{"train_classifier.max_steps": 2})
    assert run_stage(train_classifier.main, None, ["--config", str(config)]) == 0
    folder = tmp_path / "work" / "train_classifier"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "log.txt"}
    capsys.readouterr()
    assert run_stage(train_classifier.main, None, ["--config", str(config), "train_classifier.lr=0.0001"]) == 2
    err = capsys.readouterr().err
    assert "train_classifier.lr: 0.01 -> 0.0001" in err and "train_classifier.overwrite=true" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "log.txt"} == before
    # the same settings: returns the finished weights; overwrite=true starts over with the new lr
    assert run_stage(train_classifier.main, None, ["--config", str(config)]) == 0
    new = ["--config", str(config), "train_classifier.lr=0.0001", "train_classifier.overwrite=true"]
    assert run_stage(train_classifier.main, None, new) == 0
    record = records.read(folder)
    assert record["settings"]["train_classifier.lr"] == 0.0001 and record["complete"] == ["all"]


def test_a_stage_run_alone_after_its_input_was_redone_refuses(tmp_path, capsys):
    """Stage by stage (no `caee run` markers): after the OC is retrained with another lr, the
    finished CGNet, and then the CAMs of a retrained CGNet, are refused, naming the input; each
    stage's overwrite redoes it on the new input."""
    from caee.stages import make_cam, train_cgnet

    config = _write(tmp_path, **{"train_classifier.max_steps": 1, "train_cgnet.max_steps": 1})
    run = lambda main, *extra: run_stage(main, None, ["--config", str(config), *extra])  # noqa: E731
    assert run(train_classifier.main) == 0 and run(train_cgnet.main) == 0 and run(make_cam.main) == 0
    cgnet = tmp_path / "work" / "train_cgnet" / "model.pth"
    recorded = records.read(cgnet.parent)["settings"]
    oc = records.read(tmp_path / "work" / "train_classifier")
    assert recorded["input.oc"] == oc["run"]
    assert run(train_classifier.main, "train_classifier.lr=0.02", "train_classifier.overwrite=true") == 0
    before = cgnet.read_bytes()
    capsys.readouterr()
    assert run(train_cgnet.main) == 2
    err = capsys.readouterr().err
    assert f"input.oc: '{oc['run']}' -> '" in err and "train_cgnet.overwrite=true" in err
    assert cgnet.read_bytes() == before
    assert run(train_cgnet.main, "train_cgnet.overwrite=true") == 0
    assert run(make_cam.main) == 2 and "cam_cgnet was made with other settings (input.weights: " in capsys.readouterr().err
    assert run(make_cam.main, "cam.overwrite=true") == 0


def test_changed_optimizer_on_a_stale_last_pth_is_a_message(tmp_path):
    """The trainer's record refuses a last.pth of another optimiser before fit loads it; only
    max_steps may change on a resume (the same trajectory, stopped elsewhere)."""
    from caee.stages.common import open_output

    ds = NoisyDataset()
    first = open_output(tmp_path, "train_cgnet", {"train_cgnet.optimizer": "sgd", "train_cgnet.max_steps": 3}, False)
    fit(TinyTask(), ds, tiny_cfg(max_steps=3), tmp_path, torch.device("cpu"), stage="train_cgnet")
    with pytest.raises(CaeeError, match=r"train_cgnet.optimizer: 'sgd' -> 'adam'.*train_cgnet.overwrite=true"):
        open_output(tmp_path, "train_cgnet", {"train_cgnet.optimizer": "adam", "train_cgnet.max_steps": 3}, False,
                    "*.pth")
    longer = open_output(tmp_path, "train_cgnet", {"train_cgnet.optimizer": "sgd", "train_cgnet.max_steps": 6},
                         False, "*.pth")
    assert longer["run"] != first["run"] and (tmp_path / "last.pth").is_file()  # continued, not removed


# ---------------------------------------------------------------- 2. finite checkpoints only


class Exploding(TinyTask):
    """A finite loss whose gradient overflows at step ``at``: the weights become inf, the loss was finite."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def train_step(self, model, batch, ctx: StepContext):
        loss, m = super().train_step(model, batch, ctx)
        if ctx.step == self.at:
            # an overflowing gradient (as bf16 / huge lr produce): the loss is finite, the update is not
            model.fc8.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return loss, m


def test_inf_weights_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(CaeeError, match="weights became non-finite at step 2"):
        fit(Exploding(at=2), NoisyDataset(), tiny_cfg(head_lr_mult=100.0, checkpoint_every=1), tmp_path,
            torch.device("cpu"))
    ck = load_checkpoint(tmp_path / "last.pth")  # refuses a non-finite file
    assert ck["step"] == 2
    assert not (tmp_path / "model.pth").exists()


def test_nonfinite_checkpoint_is_neither_written_nor_resumed(tmp_path):
    with pytest.raises(CaeeError, match="not finite"):
        save_checkpoint(tmp_path / "x.pth", {"model": {"w": torch.tensor([1.0, float("inf")])}})
    assert not (tmp_path / "x.pth").exists()
    torch.save({"model": {"w": torch.tensor([float("nan")])}, "optimizer": {}, "step": 1, "rng": {}},
               tmp_path / "last.pth")
    with pytest.raises(CaeeError, match="non-finite"):
        load_checkpoint(tmp_path / "last.pth")


def test_huge_lr_through_the_cli_exits_2_without_poisoned_files(tmp_path, capsys):
    config = _write(tmp_path, **{"train_classifier.max_steps": 4, "train_classifier.checkpoint_every": 1})
    rc = run_stage(train_classifier.main, None, ["--config", str(config), "train_classifier.lr=1e30"])
    assert rc == 2
    folder = tmp_path / "work" / "train_classifier"
    assert not (folder / "model.pth").exists()
    if (folder / "last.pth").exists():
        load_checkpoint(folder / "last.pth")  # finite


def test_nonfinite_weights_are_refused_where_any_network_is_loaded(tmp_path):
    """A NaN weight would give NaN CAMs or all-background argmaxes without an error of its own."""
    from caee.core.config import NetConfig
    from caee.models.classifier import build_classifier, load_classifier

    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    state = build_classifier(net, 3).state_dict()
    state["fc8.weight"][0, 0] = float("nan")
    torch.save({"model": state, "arch": "classifier", "net": {**vars(net), "added_later": 1}}, tmp_path / "m.pth")
    with pytest.raises(CaeeError, match=r"m.pth: 1 tensor\(s\) hold NaN or inf \(first: fc8.weight\)"):
        load_classifier(tmp_path / "m.pth", net, 3)
    state["fc8.weight"][0, 0] = 0.0  # finite: loads, the unknown 'net' key of another version ignored
    torch.save({"model": state, "arch": "classifier", "net": {**vars(net), "added_later": 1}}, tmp_path / "m.pth")
    assert load_classifier(tmp_path / "m.pth", net, 3) is not None
    torch.save({"model": state, "arch": "classifier", "net": "tinycnn"}, tmp_path / "m.pth")
    with pytest.raises(CaeeError, match=r"m.pth: the recorded network \('net'\) is not a mapping"):
        load_classifier(tmp_path / "m.pth", net, 3)


def test_overwrite_also_removes_the_oracle_record_and_epoch_snapshots(tmp_path):
    """A trainer's folder started over keeps only its log: the oracle's best epoch and the epoch
    snapshots belong to the run being replaced (caee.stages.common.open_output)."""
    from caee.stages.common import open_output

    records.write(tmp_path, records.new("train_cgnet", {"train_cgnet.lr": 0.1}))
    for name in ("oracle_best.pth", "epoch_001.pth", "epoch_002.pth", "last.pth", "log.txt"):
        (tmp_path / name).write_bytes(b"old run")
    with pytest.raises(CaeeError, match=r"train_cgnet.lr: 0.1 -> 0.2.*train_cgnet.overwrite=true"):
        open_output(tmp_path, "train_cgnet", {"train_cgnet.lr": 0.2}, False, "*.pth")
    assert (tmp_path / "oracle_best.pth").is_file()  # a refusal removes nothing
    record = open_output(tmp_path, "train_cgnet", {"train_cgnet.lr": 0.2}, True, "*.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "record.json"]
    assert record["settings"] == {"train_cgnet.lr": 0.2} and record["complete"] == []


def test_a_foreign_oracle_record_is_a_message(tmp_path):
    from caee.stages.train_cgnet import OracleSelector

    torch.save({"weights": {}}, tmp_path / "oracle_best.pth")
    with pytest.raises(CaeeError, match=r"oracle_best.pth: not an oracle record .*delete it"):
        OracleSelector(tmp_path, None, torch.device("cpu")).best()


# ---------------------------------------------------------------- 3. AffinityNet is seeded


def test_affinitynet_initialisation_is_seeded(tmp_path):
    from caee.stages.setup import start_stage
    from caee.stages.train_affinity import build_model

    cfg = mini_config(tmp_path)
    weights = []
    for _ in range(2):
        torch.manual_seed(1234 + len(weights))  # whatever ran before in the process
        start_stage(cfg, "train_affinity", seed=cfg.train_affinity.seed)
        weights.append(build_model(cfg.train_affinity).state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


@pytest.mark.parametrize("stage", ["train_classifier", "train_cgnet", "train_affinity"])
def test_trainers_seed_their_stage_with_their_own_seed(tmp_path, stage, monkeypatch):
    from caee.stages import common
    from caee.stages.common import start_trainer

    monkeypatch.setattr(common, "_input_id", lambda path, key: "an upstream run")  # no upstream stage run here
    torch.manual_seed(123)
    start_trainer(mini_config(tmp_path, **{f"{stage}.seed": 7}), stage)
    assert torch.initial_seed() == 7


# ---------------------------------------------------------------- 4. ranges (catalogue in test_bad_inputs.py)


def test_every_numeric_config_key_has_a_range_rule():
    missing = [k for k, _ in config_rules.numeric_fields(Config()) if config_rules.rule_for(k) is None]
    assert not missing


def test_defaults_and_shipped_configs_are_in_range():
    config_rules.check(Config())
    for path in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"):
        load_config(path, ["device=cpu"])


# ---------------------------------------------------------------- 5. data values


@pytest.mark.parametrize("cams,keys", [([np.nan], [0]), ([-0.1], [0]), ([1.01], [0]), ([0.5], [5])])
def test_bad_cam_values_are_refused(tmp_path, cams, keys):
    save_cam_npz(tmp_path / "a.npz", np.array(keys), np.full((1, 4, 4), cams[0], np.float32))
    with pytest.raises(CaeeError, match="a.npz"):
        load_cam_npz(tmp_path / "a.npz", num_classes=3)


def test_16bit_palette_cmyk_la_and_bilevel_images_are_converted(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.array_equal(load_image(tmp_path / "g16.png")[..., 0], (grey16 >> 8).astype(np.uint8))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0, 0].tolist() == [10, 200, 30]
    Image.new("LA", (4, 4), (90, 10)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[0, 0].tolist() == [90, 90, 90]
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png")[0, 0].tolist() == [255, 255, 255]
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").shape == (4, 4, 3)


def test_split_ids_are_used_verbatim(tmp_path):
    from caee.data.splits import read_split_file

    (tmp_path / "s.txt").write_text("train_00007.v2\n/JPEGImages/2007_1.jpg /SegmentationClassAug/2007_1.png\n")
    assert read_split_file(tmp_path / "s.txt") == ["train_00007.v2", "2007_1"]
    for bad in ("a b\n", "x\\y\n", "..\n"):
        (tmp_path / "s.txt").write_text(bad)
        with pytest.raises(CaeeError, match="s.txt line 1"):
            read_split_file(tmp_path / "s.txt")


def test_wrong_size_training_mask_is_refused(tmp_path, fake_voc):
    from caee.core.config import DataConfig
    from caee.data import SegmentationDataset, load_split

    index = load_split(DataConfig(dataset="voc", root=str(fake_voc)), "train")
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in index.ids:
        Image.fromarray(np.zeros((5, 7), np.uint8), mode="L").save(labels / f"{i}.png")
    with pytest.raises(CaeeError, match="label map is 7x5"):
        SegmentationDataset(index, labels)[0]


def test_affinity_label_steps_refuse_cam_keys_outside_the_classes(tmp_path):
    """A key >= 255 would wrap to background in the uint8 cell table; any key >= C is a wrong label."""
    from caee.stages.label_cache import ensure_cell_tables, ensure_crf_labels
    from caee.core.config import CrfConfig, DataConfig
    from caee.data import load_split
    from caee.core.layout import crf_dir
    from conftest import write_fake_voc

    root = write_fake_voc(tmp_path / "VOC2012")
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    cams = tmp_path / "cams"
    for i, image_id in enumerate(index.ids):
        h, w = load_image(index.image_path(i)).shape[:2]
        save_cam_npz(cams / f"{image_id}.npz", np.array([20 if i == 1 else 0]), np.full((1, h, w), 0.5, np.float32))
    bad = f"{index.ids[1]}.npz: CAM class keys must lie in 0..19, got \\[20\\]"
    with pytest.raises(CaeeError, match=bad):
        ensure_cell_tables(index, cams, 4, 24, 8, CrfConfig(workers=1))
    with pytest.raises(CaeeError, match=bad):
        ensure_crf_labels(index, cams, {4.0: crf_dir(cams, 4)}, CrfConfig(workers=1))


# ---------------------------------------------------------------- 6. messages instead of tracebacks


def test_device_is_checked_against_the_machine():
    with pytest.raises(CaeeError, match="'device'"):
        load_config(None, ["device=tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(CaeeError, match="no CUDA GPU"):
            load_config(None, ["device=cuda"])


def test_non_utf8_split_and_yaml(tmp_path):
    from caee.data.splits import read_split_file

    (tmp_path / "s.txt").write_bytes(b"\xff\xfe\x00a\n")
    with pytest.raises(CaeeError, match="not UTF-8"):
        read_split_file(tmp_path / "s.txt")
    (tmp_path / "c.yaml").write_bytes(b"work_dir: \xe9\n")
    with pytest.raises(CaeeError, match="not UTF-8"):
        load_config(tmp_path / "c.yaml")


# ---------------------------------------------------------------- 7. leftovers and concurrency


def test_second_run_on_a_locked_stage_folder_refuses(tmp_path, capsys):
    config = _write(tmp_path, **{"train_classifier.max_steps": 1})
    folder = tmp_path / "work" / "train_classifier"
    with StageLock(folder):  # another live run
        capsys.readouterr()
        assert run_stage(train_classifier.main, None, ["--config", str(config)]) == 2
        assert "in use by a running stage" in capsys.readouterr().err
    assert not (folder / "model.pth").exists()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    import subprocess
    import sys

    code = (f"import os; from caee.core.io import StageLock; StageLock({str(tmp_path)!r}).acquire(); os._exit(9)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    assert "pid" in (tmp_path / ".lock").read_text()
    StageLock(tmp_path).acquire().release()


def test_stale_temp_files_are_removed_at_stage_start(tmp_path):
    from caee.stages.setup import start_stage

    cfg = mini_config(tmp_path)
    folder = tmp_path / "work" / "train_classifier"
    folder.mkdir(parents=True)
    (folder / ".last.pth.abc123.tmp").write_bytes(b"x" * 100)
    start_stage(cfg, "train_classifier")
    assert not list(folder.glob(".*.tmp"))


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    ds = NoisyDataset()
    fit(TinyTask(), ds, tiny_cfg(max_steps=5, checkpoint_every=2), tmp_path, torch.device("cpu"))
    # a kill after step 5's metrics line but with last.pth at step 4: the line of step 5 is trained again
    ck = torch.load(tmp_path / "last.pth", weights_only=True)
    ck["step"] = 4
    fit_cfg = tiny_cfg(max_steps=7, checkpoint_every=2)
    torch.save(ck, tmp_path / "last.pth")
    fit(TinyTask(), ds, fit_cfg, tmp_path, torch.device("cpu"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


# ---------------------------------------------------------------- 8. file modes follow the umask


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_write(tmp_path / "b.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_inference_folder_refuses_outputs_made_with_other_settings(tmp_path):
    from caee.stages.common import open_output

    first = open_output(tmp_path, "make_cam", {"cam.scales": [1.0]}, False, "*.npz")  # empty: starts
    (tmp_path / "a.npz").write_bytes(b"")
    assert open_output(tmp_path, "make_cam", {"cam.scales": [1.0]}, False, "*.npz")["run"] == first["run"]  # resumes
    with pytest.raises(CaeeError, match=r"cam.scales: \[1.0\] -> \[0.5\].*cam.overwrite=true"):
        open_output(tmp_path, "make_cam", {"cam.scales": [0.5]}, False, "*.npz")
    second = open_output(tmp_path, "make_cam", {"cam.scales": [0.5]}, True, "*.npz")
    assert second["run"] != first["run"] and not (tmp_path / "a.npz").exists()
    assert records.read(tmp_path)["settings"] == {"cam.scales": [0.5]}
    (tmp_path / "a.npz").write_bytes(b"")
    (tmp_path / "record.json").unlink()  # outputs of unknown settings
    with pytest.raises(CaeeError, match="holds outputs without a record"):
        open_output(tmp_path, "make_cam", {"cam.scales": [0.5]}, False, "*.npz")



# ---------------------------------------------------------------- 9. never silently wrong, round 2 (issue 26)


def test_split_lists_strip_a_bom_and_accept_crlf(tmp_path):
    from caee.data.splits import read_split_file

    (tmp_path / "s.txt").write_bytes("\ufefftrain_00000\r\n/JPEGImages/x_1.jpg /Seg/x_1.png\r\n\r\n".encode())
    assert read_split_file(tmp_path / "s.txt") == ["train_00000", "x_1"]


@pytest.mark.parametrize("text,match", [
    ("a\n/JPEGImages/../JPEGImages/a.jpg\n", "line 2: .* has a '..' component"),
    ("a\n/JPEGImages/b.jpg ../SegmentationClassAug/b.png\n", "line 2: .* has a '..' component"),
    ("a\nb\n# c\na\n", "line 4: image 'a' is already listed on line 1"),
    ("a\n/JPEGImages/a.jpg\n", "line 2: image 'a' is already listed on line 1"),
    ("a\n/JPEGImages/.jpg\n", "line 2: .* names no image"),
    ("a\n/JPEGImages/ /SegmentationClassAug/a.png\n", "line 2: .* names no image"),
], ids=["dotdot_image", "dotdot_mask", "duplicate", "duplicate_psa", "blank_name", "blank_path"])
def test_split_lists_refuse_dotdot_duplicates_and_blank_names(tmp_path, text, match):
    from caee.data.splits import read_split_file

    (tmp_path / "s.txt").write_text(text)
    with pytest.raises(CaeeError, match=f"s.txt {match}"):
        read_split_file(tmp_path / "s.txt")


def test_masks_deriving_image_labels_are_size_checked(fake_voc):
    """The label cache is built from the masks: a mask of another size than its image is refused
    (its classes may belong to another image), and nothing is cached."""
    from caee.core.config import DataConfig
    from caee.core.io import save_label_png
    from caee.data import load_split

    bad = fake_voc / "SegmentationClassAug" / "2007_000002.png"
    save_label_png(bad, np.full((9, 11), 3, np.uint8))
    with pytest.raises(CaeeError, match=f"{bad}: mask is 11x9 but its image .*2007_000002.jpg is"):
        load_split(DataConfig(dataset="voc", root=str(fake_voc)), "train")
    assert not (fake_voc / "cls_labels.npz").exists()


@pytest.mark.parametrize("items,ok", [
    ({"crop_size": 0, "resize_long": [48, 80], "batch_size": 2}, False),
    ({"crop_size": 0, "resize_long": [48, 80], "batch_size": 1}, True),
    ({"crop_size": 0, "resize_long": [0, 0], "batch_size": 4}, True),   # images of one size (test_deeplab)
    ({"crop_size": 0, "resize_long": [64, 64], "batch_size": 4}, True),
    ({"crop_size": 32, "resize_long": [80, 48], "batch_size": 4}, False),
    ({"crop_size": 32, "resize_long": [0, 48], "batch_size": 4}, False),
    ({"crop_size": 32, "resize_long": [48], "batch_size": 4}, False),
])
def test_training_sizes_must_be_reachable(items, ok):
    overrides = [f"train_deeplab.{k}={v}" for k, v in items.items()]
    if ok:
        load_config(None, overrides)
        return
    key = "crop_size" if items["crop_size"] == 0 else "resize_long"
    with pytest.raises(CaeeError, match=f"'train_deeplab.{key}'"):
        load_config(None, overrides)


def test_keys_a_stage_does_not_read_are_refused_away_from_their_defaults(tmp_path):
    """A key the section inherits but its stage never reads is an error when set, not ignored."""
    from caee.core.config_rules import NOT_READ

    assert set(NOT_READ) == {"train_affinity.net.dropout", "train_deeplab.net.dropout", "irn.net.dropout",
                             "irn.resize_long", "irn.color_jitter"}
    load_config(None, ["irn.net.dropout=0.0", "irn.resize_long=[0,0]", "train_affinity.net.dropout=0.5"])  # defaults
    load_config(None, ["train_affinity.net.dropout=0.0", "train_deeplab.net.dropout=0.0"])  # "no dropout" too
    with pytest.raises(CaeeError) as e:
        load_config(None, ["irn.resize_long=[320,640]"])
    assert str(e.value) == ("config key 'irn.resize_long' = [320, 640] is not read: IRN rescales by irn.scale_range "
                            "(official: no long-side resize). Leave it at [0, 0] (its default)")
    with pytest.raises(CaeeError) as e:
        load_config(None, ["train_deeplab.net.dropout=0.1"])
    assert str(e.value) == ("config key 'train_deeplab.net.dropout' = 0.1 is not read: DeepLab's dropout is "
                            "train_deeplab.head_dropout (the backbone has none). Leave it at 0.5 or 0.0 (its default, "
                            "or none)")
    # a YAML net block, or one dotted key of it, keeps the section's other defaults (IRN: dropout 0.0)
    path = tmp_path / "irn.yaml"
    path.write_text("irn:\n  net: {backbone: tinycnn, width: 0.5}\n")
    assert load_config(path).irn.net.dropout == 0.0
    cfg = load_config(None, ["irn.net.width=0.5", "train_cgnet.net.width=0.25"])
    assert (cfg.irn.net.backbone, cfg.irn.net.dropout, cfg.train_cgnet.net.dropout) == ("resnet50", 0.0, 0.0)


def test_yaml_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_cgnet:\n  lr: 0.1\n  \"lr\": 0.2\n")
    with pytest.raises(CaeeError, match=r"c.yaml: .*key 'lr' is given twice \(lines 2 and 3\)"):
        load_config(path)
    from caee.core.config import _safe_load

    # keys merged in with '<<' may be overridden, as YAML intends
    assert _safe_load("d: &d {lr: 0.1, epochs: 2}\nx:\n  <<: *d\n  lr: 0.2\n")["x"] == {"lr": 0.2, "epochs": 2}


@pytest.mark.parametrize("err,says", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded"),
                                      (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_a_write_fault_keeps_the_file_it_was_replacing(tmp_path, monkeypatch, err, says):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old weights")

    def full(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CaeeError, match=f"cannot write {target}: {says}"):
        save_checkpoint(target, {"w": torch.ones(3)})
    assert target.read_bytes() == b"old weights" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    from caee.core.io import claim_folder

    (tmp_path / "runs").write_text("x")
    with pytest.raises(CaeeError, match=f"{tmp_path / 'runs'} is a file, not a folder"):
        write_text(tmp_path / "runs" / "a" / "b.txt", "y")
    with pytest.raises(CaeeError, match=f"{tmp_path / 'runs'} is a file, not a folder"):
        claim_folder(tmp_path / "runs")
    with pytest.raises(CaeeError, match=f"cannot write {tmp_path}: it is a folder"):
        write_text(tmp_path, "y")
    assert (tmp_path / "runs").read_text() == "x"


def test_not_found_only_for_paths_that_do_not_exist(tmp_path):
    from caee.core.errors import not_found

    assert not_found(tmp_path / "nope") == f"not found: {tmp_path / 'nope'}"
    assert not_found(tmp_path) == f"{tmp_path} is a folder, not a file"
    with pytest.raises(CaeeError, match="is a folder, not a file"):
        load_config(tmp_path)


def test_labels_cache_of_a_read_only_root_goes_to_the_user_cache(fake_voc, monkeypatch, tmp_path):
    """A write fault (here EROFS from the real writer, not a stub) under data.root is not an error:
    the labels are cached under ~/.cache/caee instead."""
    from caee.core.config import DataConfig
    from caee.data import load_split

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(fake_voc):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    index = load_split(DataConfig(dataset="voc", root=str(fake_voc)), "train")
    assert not (fake_voc / "cls_labels.npz").exists() and not list(fake_voc.glob(".cls_labels*"))
    assert len(list((tmp_path / "home" / ".cache" / "caee").glob("cls_labels_*.npz"))) == 1
    assert index.labels.sum() > 0


@pytest.mark.parametrize("stage,section,radius_key,crop_key", [
    ("train_affinity", "train_affinity", "train_affinity.radius", "train_affinity.crop_size"),
    ("train_irn", "irn", "irn.train_radius", "irn.crop_size")])
def test_a_crop_too_small_for_any_pair_names_the_keys(stage, section, radius_key, crop_key):
    """A feature grid smaller than the pair radius has no pairs to learn from: the training task
    stops with the keys to change, once per grid size (the pairs of a size are computed once)."""
    import importlib

    module = importlib.import_module(f"caee.stages.{stage}")
    task_cls = module.AffinityTask if stage == "train_affinity" else module.IrnTask
    cfg = load_config(None, [f"{radius_key}=5"])
    task = task_cls(None, getattr(cfg, section), ["a"])
    with pytest.raises(CaeeError) as e:
        task.pairs(3, 3, torch.device("cpu"))
    assert str(e.value) == f"a 3x3 grid has no pixel pairs within {radius_key}=5; raise {crop_key}"
    first = task.pairs(8, 9, torch.device("cpu"))
    assert first[0].numel() > 0 and task.pairs(8, 9, torch.device("cpu"))[0] is first[0]  # cached
