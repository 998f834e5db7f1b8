"""The ``caee`` command: subcommands, --help from the config comments, --print-config without torch,
one tiny stage run (ETA lines, keep_epochs, plot_metrics), the monitor's ETA."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from caee.cli import main
from caee.cli import commands
from caee.core.config_docs import field_comments, key_docs
from caee.engine.monitor import Monitor, format_eta

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    """This checkout's caee first, whatever is installed."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _caee(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caee", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- key documentation


def test_key_docs_come_from_the_config_comments():
    docs = {d.key: d for d in key_docs()}
    depth = docs["masking.depth"]
    assert depth.default == 0 and depth.meaning.startswith("0 = erase the image; d >= 1 = mask")
    assert docs["masking.normalization"].choices == ("batch", "per_image")
    # a wrapped comment (continued on the next, further indented comment-only line) is joined
    assert docs["train_deeplab.split"].meaning.endswith("label_dir must hold <id>.png for every image of it")
    # a subclass field without its own comment takes the base class's (TrainConfig.max_steps)
    assert docs["train_affinity.max_steps"].meaning == field_comments()["TrainConfig"]["max_steps"]
    assert docs["train_affinity.max_steps"].meaning.startswith("> 0 stops early")
    # a block comment directly above a field introduces it
    assert docs["data.synthetic.stripe_angles"].meaning.startswith("class angle of the stripes")
    assert docs["weights_dir"].default == "weights"


def test_every_config_key_has_a_meaning():
    # each field of caee/core/config.py carries a comment (its own, a block above it, or its base class's)
    assert [d.key for d in key_docs(None) if not d.meaning] == []


def test_help_lists_only_the_commands_sections():
    keys = {d.key for d in key_docs(("masking",))}
    assert "masking.depth" in keys and "work_dir" in keys
    assert not any(k.startswith(("train_deeplab.", "cam.")) for k in keys)


def test_help_path_lists_masking_depth_without_importing_torch(tmp_path):
    code = ("import sys\nfrom caee.cli import main\n"
            "try:\n    main(['train-cgnet', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, 'NUMPY_HEAVY', 'scipy' in sys.modules)\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("masking.depth = 0"))
    assert "0 = erase the image" in line
    assert "TORCH False NUMPY_HEAVY False" in out.stdout
    # CPU seconds, not wall time (a shared machine's load would decide that): about 0.3 s measured;
    # the help path that imported the stage (and torch) took about 4 s
    assert cpu < 2.0, cpu


def test_print_config_from_another_directory(tmp_path):
    out = _caee("train-cgnet", "--config", str(REPO / "configs/voc/r38.yaml"), "--print-config",
                "masking.depth=3", "weights_dir=/data/imagenet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["masking"]["depth"] == 3
    # {weights_dir} is set once and reaches every net
    for stage in ("train_classifier", "train_cgnet", "train_affinity", "train_deeplab"):
        assert cfg[stage]["net"]["pretrained"] == "/data/imagenet/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_input_exits_2_with_one_message(tmp_path, capsys):
    assert main(["train-cgent", "--help"]) == 2
    assert "did you mean 'train-cgnet'" in capsys.readouterr().err
    assert main(["train-cgnet", "--print-config", "masking.dept=3"]) == 2
    assert "masking.dept" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train-cgnet", "masking.depth=3"])  # neither --config nor --print-config
    assert e.value.code == 2


def test_top_level_help_names_every_command(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert all(c.name in text for c in commands().values())


def test_console_script_entry_point_resolves():
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    entry = re.search(r'^caee = "([\w.]+):(\w+)"$', section, re.M)
    module, attr = entry.groups()
    assert (module, attr) == ("caee.cli", "main")
    from caee.core.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    for c in commands().values():
        assert importlib.util.find_spec(c.module) is not None, c.module
        assert set(c.sections) <= sections, c.name


def test_stage_scripts_are_aliases(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "make_cam.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "usage: caee make-cam" in out.stdout and "cam.scales = [0.5, 1.0, 1.5, 2.0]" in out.stdout


# ---------------------------------------------------------------- a tiny stage through the command line


TINY = ["device=cpu", "data.num_workers=0", "data.synthetic.image_size=32", "data.synthetic.num_classes=2",
        "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.object_radius=[5,7]",
        "data.synthetic.part_size=3", "data.synthetic.min_visible_px=4",
        "train_classifier.net.backbone=tinycnn", "train_classifier.net.width=0.25", "train_classifier.net.pretrained=",
        "train_classifier.batch_size=4", "train_classifier.epochs=2", "train_classifier.crop_size=32",
        "train_classifier.resize_long=[32,32]", "train_classifier.log_every=1", "train_classifier.amp=false",
        "train_classifier.keep_epochs=true"]


def test_tiny_stage_run_logs_eta_keeps_epochs_and_plots(tmp_path, capsys):
    # in this process: a stage run from a fresh interpreter is covered by the torchrun test
    work = tmp_path / "work"
    code = main(["train-classifier", "--config", str(REPO / "configs/demo.yaml"), f"work_dir={work}",
                 f"data.root={tmp_path / 'syn'}", *TINY])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if "images/s ETA" in ln]
    assert len(lines) == 4  # 8 images / batch 4 = 2 steps per epoch, 2 epochs, log_every 1
    assert re.search(r"train_classifier: step 1/4 \(epoch 1/2\) loss \d\.\d{4} lr \d\.\d\de-\d\d "
                     r"[\d.]+ images/s ETA \d:\d\d:\d\d$", lines[0]), lines[0]
    assert "step 4/4 (epoch 2/2)" in lines[-1] and lines[-1].endswith("ETA 0:00:00")
    stage = work / "train_classifier"
    assert sorted(p.name for p in stage.glob("epoch_*.pth")) == ["epoch_001.pth", "epoch_002.pth"]
    assert len((stage / "metrics.jsonl").read_text().splitlines()) == 4

    plot = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(work)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    from PIL import Image

    with Image.open(work / "metrics.png") as img:
        assert img.format == "PNG" and img.width > 500 and img.height > 150


# ---------------------------------------------------------------- the monitor


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_line_counts_only_this_runs_steps(tmp_path):
    clock = _Clock()
    mon = Monitor("train_cgnet", tmp_path, total=300, start=0, epochs=15, clock=clock)
    clock.t = 20.0
    line = mon.line(40, 1, 0.41234, 0.0091, 12.34)
    # 40 steps in 20 s -> 260 left take 130 s
    assert line == "train_cgnet: step 40/300 (epoch 2/15) loss 0.4123 lr 9.10e-03 12.3 images/s ETA 0:02:10"
    resumed = Monitor("train_cgnet", tmp_path, total=300, start=200, epochs=15, clock=clock)
    clock.t = 30.0  # 10 s for 20 steps since the resume -> 80 left take 40 s
    assert resumed.line(220, 14, 0.1, 0.001, 8.0).endswith("ETA 0:00:40")
    assert format_eta(90061) == "1 day, 1:01:01"


def test_keep_epochs_names_the_snapshot_and_is_off_by_default(tmp_path):
    saved = []
    assert Monitor("s", tmp_path, 10, 0, 2).epoch_end(0, saved.append) is None and saved == []
    path = Monitor("s", tmp_path, 10, 0, 2, keep_epochs=True).epoch_end(1, saved.append)
    assert path == tmp_path / "epoch_002.pth" and saved == [path]


def test_plot_metrics_keeps_the_latest_record_of_a_repeated_step(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools/plot_metrics.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 1, "loss": 1.0, "lr": 0.1, "acc": 0.5}, {"step": 2, "loss": 0.9, "lr": 0.1},
            {"step": 2, "loss": 0.8, "lr": 0.1, "loss_cse": 0.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = tool.read_records(path)
    assert [r["loss"] for r in records] == [1.0, 0.8]
    assert tool.panels(records) == {"loss": ["loss", "loss_cse"], "lr": ["lr"], "accuracy": ["acc"]}
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert tool.main([str(path)]) == 2


def test_tensorboard_scalars_or_a_clear_warning(tmp_path, caplog):
    mon = Monitor("train_x", tmp_path, total=4, start=0, epochs=1, tensorboard=True)
    mon.log(1, 0, 0.5, 0.01, 10.0, {"acc": 0.7})
    mon.close()
    if importlib.util.find_spec("tensorboard") is None:
        assert mon.writer is None and "pip install tensorboard" in caplog.text
    else:
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_run_takes_overrides_after_stages(monkeypatch):
    import caee.pipeline.run

    seen = {}
    monkeypatch.setattr(caee.pipeline.run, "run", lambda cfg, stages, nproc, overwrite: seen.update(
        cfg=cfg, stages=stages, overwrite=overwrite) or {})
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--stages", "train_cgnet", "results",
                 "masking.depth=2"]) == 0
    assert seen["stages"] == ["train_cgnet", "results"] and seen["cfg"].masking.depth == 2
    assert seen["overwrite"] is False
    assert main(["run", "--config", str(REPO / "configs/demo.yaml"), "--overwrite"]) == 0 and seen["overwrite"]


def test_overwrite_flag_sets_the_stage_key(monkeypatch):
    import caee.stages.make_cam

    seen = {}
    monkeypatch.setattr(caee.stages.make_cam, "main", lambda cfg: seen.update(cfg=cfg))
    assert main(["make-cam", "--config", str(REPO / "configs/demo.yaml"), "--overwrite"]) == 0
    assert seen["cfg"].cam.overwrite is True
