"""The reproduction drivers (caee/pipeline/variants.py, caee/reports/, tools/reproduce_table1.py, tools/masking_depth_sweep.py)
on the miniature synthetic experiment: tables that parse and agree with the evaluation files, the
chart, records that make a second run skip finished work, and failures that name their variant."""
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from caee.data import load_split
from caee.engine.scoring import evaluate_label_dir
from caee.pipeline import variants as var
from caee.reports import common, masking_depth, table1
from caee.core import records
from caee.core.config import expand_work_dir, save_config
from caee.core.errors import CaeeError
from conftest import mini_config

REPO = Path(__file__).resolve().parents[1]
# 8 + 2 images (one batch): each variant trains, makes and evaluates its CAMs in a fraction of a second
FAST = {"train_classifier.max_steps": 2, "train_cgnet.max_steps": 2, "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 2}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _md_rows(markdown: str) -> list[list[str]]:
    """The cells of every markdown table line (header and separator included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]


def _eval_miou(variant_dir: Path, cam_set: str, key: str = "miou") -> float:
    summary = json.loads((variant_dir / "eval" / f"{cam_set}_train.json").read_text())["summary"]
    return round(100 * summary[key], 4)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("model.pth"))}


def _percent_values(row: dict) -> list[float]:
    return [v for k, v in row.items() if "miou" in k and v is not None]


# ---------------------------------------------------------------- helpers


def test_overrides_sections_and_depths(tmp_path):
    cfg = mini_config(Path("/nonexistent"))
    new = var.with_overrides(cfg, {"masking.depth": 3, "train_cgnet": {"lr": 0.5}})
    assert (new.masking.depth, new.train_cgnet.lr, cfg.masking.depth) == (3, 0.5, 0)
    with pytest.raises(CaeeError, match="masking.dpth.*did you mean 'masking.depth'"):
        var.with_overrides(cfg, {"masking.dpth": 3})
    assert var.section_overrides(REPO / "configs/voc/r101_oc.yaml", "train_classifier") == {
        "train_classifier.net.backbone": "resnet101", "train_classifier.net.pretrained":
        "{weights_dir}/resnet101-63fe2227.pth", "train_classifier.net.dropout": 0.5}
    vgg = var.section_overrides(REPO / "configs/voc/vgg16_oc.yaml", "train_classifier")
    assert vgg["train_classifier.net.backbone"] == "vgg16" and vgg["train_classifier.lr"] == 0.1
    assert masking_depth.check_depths(None, "resnet38") == list(range(8))
    assert masking_depth.check_depths(None, "tinycnn") == [0, 1, 2, 3, 4]
    assert masking_depth.check_depths([2, 0, 2], "vgg16") == [2, 0]
    with pytest.raises(CaeeError, match=r"\[9\] are not depths of the tinycnn OC; valid: 0, 1, 2, 3, 4"):
        masking_depth.check_depths([0, 9], "tinycnn")
    assert common.markdown_table(["a", "b"], [["x|y", "1"]]) == "| a | b |\n| --- | --- |\n| x\\|y | 1 |"
    # a cell rounds the fraction itself, not an earlier rounding of it (68.05 would show "68.0%")
    assert common.fmt_pct(common.pct(0.6805121079251427)) == "68.1%" and common.pct(0.5) == 50.0
    # what a record holds: the recipe of the stage, not speed / logging settings or other stages
    from caee.stages.common import stage_settings

    new = var.with_overrides(mini_config(tmp_path), {"masking.depth": 3, "train_cgnet": {"lr": 0.5}})
    oc = Path(new.work_dir) / "train_classifier" / "model.pth"
    oc.parent.mkdir(parents=True)
    torch.save({"net": {}}, oc)
    fp = stage_settings(expand_work_dir(new), "train_cgnet")
    assert fp["train_cgnet.lr"] == 0.5 and fp["masking.depth"] == 3 and fp["train_cgnet.batch_size"] == 8
    assert not any(k.startswith("train_classifier.") for k in fp)  # the OC is recorded as an upstream output
    assert fp["input.oc"].startswith("sha256:") and "train_cgnet.oc_weights" not in fp  # an OC without a record
    assert not any(k.endswith(("num_workers", "log_every", "checkpoint_every")) for k in fp)


def test_demo_configs_build_valid_variants(tmp_path):
    demo = REPO / "configs" / "demo.yaml"
    cfg = var.load_experiment_config(demo, [], table1.TABLE1_DEMO_CAPS)
    assert cfg.work_dir == "work_dirs/reproduce_demo"  # not the pipeline demo's folder
    cfg = var.load_experiment_config(demo, [f"work_dir={tmp_path}"], table1.TABLE1_DEMO_CAPS)
    variants = table1.table1_variants(cfg, _tool("reproduce_table1").oc_variants("tinycnn", demo=True))
    # three OC families (plain CNN, ResNet, VGG) from their configs, each against demo.yaml's CGNet at
    # the main demo's budget; CAMs without CRF
    nets = [v.cfg.train_classifier.net for v in variants]
    assert [(n.backbone, n.width, n.output_stride, n.pretrained) for n in nets] == [
        ("tinycnn", 0.5, 8, ""), ("resnet38", 0.0625, 8, ""), ("vgg16", 0.125, 8, "")]
    demo_cfg = var.load_experiment_config(demo)
    assert all(v.cfg.train_cgnet == demo_cfg.train_cgnet and v.cfg.data.synthetic == demo_cfg.data.synthetic
               and v.cfg.train_classifier.epochs == demo_cfg.train_classifier.epochs and v.cfg.cam.crf_alphas == []
               for v in variants)
    assert [v.dir for v in variants] == [tmp_path / "table1" / n for n in ("tinycnn", "resnet38", "vgg16")]
    from caee.models import build_backbone

    assert [build_backbone(n).strides[build_backbone(n).last_depth] for n in nets] == [8, 8, 8]
    cfg = var.load_experiment_config(demo, [f"work_dir={tmp_path}", "train_cgnet.epochs=1"],
                                           masking_depth.DEPTH_DEMO_CAPS)
    assert cfg.train_cgnet.epochs == 1 and cfg.train_affinity.net.backbone == "tinycnn"  # overrides after caps
    variants = masking_depth.depth_variants(cfg, masking_depth.check_depths(None, "tinycnn"), full=True)
    assert [v.name for v in variants] == ["oc", "depth_0", "depth_1", "depth_2", "depth_3", "depth_4"]
    assert variants[3].cfg.masking.depth == 2 and variants[3].after == ("oc",)
    assert variants[3].cfg.train_cgnet.oc_weights == str(tmp_path / "masking_depth/oc/train_classifier/model.pth")
    assert variants[3].steps == ("train_cgnet", "cam_cgnet", "train_affinity", "pseudo_labels")
    # demo.yaml's settings on 1,500 + 300 images of their own folder
    assert (cfg.data.synthetic.num_train, cfg.data.synthetic.num_val, cfg.data.root) == (1500, 300, "data/synthetic_1500")
    assert cfg.train_affinity == demo_cfg.train_affinity and cfg.pseudo_labels == demo_cfg.pseudo_labels


def test_depth_sweep_demo_makes_pseudo_labels(monkeypatch):
    """--demo runs Fig. II's measure (pseudo labels per depth) without --full."""
    tool = _tool("masking_depth_sweep")
    seen = {}
    monkeypatch.setattr(tool, "run_depth_sweep", lambda cfg, depths, full, notes, overwrite: seen.update(
        full=full, depths=depths, n=cfg.data.synthetic.num_train, notes=notes) or common.Report("", {}, [], []))
    assert tool.main(["--demo", "work_dir=/elsewhere"]) == 0
    assert seen["full"] is True and seen["depths"] == [0, 2, 3, 4] and seen["n"] == 1500
    # the note under the table gives the caps as the run used them (an override of a cap included)
    assert seen["notes"][0].startswith("demo: work_dir=/elsewhere, data.root=data/synthetic_1500, ")


# ---------------------------------------------------------------- masking-depth sweep


def test_depth_sweep_tables_chart_and_second_run_skips(tmp_path):
    cfg = mini_config(tmp_path, **FAST)
    report = masking_depth.run_depth_sweep(cfg, [0, 2])
    root = tmp_path / "work" / "masking_depth"
    assert report.failures == [] and sorted(p.name for p in report.files) == [
        "masking_depth.json", "masking_depth.md", "masking_depth.png"]
    data = json.loads((root / "masking_depth.json").read_text())
    assert data == json.loads(json.dumps(report.data)) and data["unit"] == "percent"
    assert [r["depth"] for r in data["rows"]] == [0, 2] and [r["level"] for r in data["rows"]] == ["image", "feature"]
    # one OC for all depths; each CGNet trained at its depth against it
    assert not (root / "depth_0" / "train_classifier").exists()
    for d in (0, 2):
        assert torch.load(root / f"depth_{d}/train_cgnet/model.pth", weights_only=True)["masking"]["depth"] == d
        assert records.read(root / f"depth_{d}/train_cgnet")["settings"]["masking.depth"] == d
        # against the one OC: its run id is what each CGNet records as its input
        assert records.read(root / f"depth_{d}/train_cgnet")["settings"]["input.oc"] == \
            records.read(root / "oc/train_classifier")["run"]
    # the numbers are the evaluation files' (fractions -> percent), best of the sweep >= fixed threshold
    assert data["oc"]["cam_miou"] == _eval_miou(root / "oc", "cam_classifier")
    for r in data["rows"]:
        assert r["cam_miou"] == _eval_miou(root / r["variant"], "cam_cgnet")
        assert r["cam_miou_at_threshold"] == _eval_miou(root / r["variant"], "cam_cgnet", "miou_at_threshold")
        assert r["cam_miou"] >= r["cam_miou_at_threshold"] and r["pseudo_label_miou"] is None
    values = [v for r in [data["oc"], *data["rows"]] for v in _percent_values(r)]
    assert len(values) == 6 and all(0 <= v <= 100 for v in values) and max(values) > 1  # percent, not fractions
    rows = _md_rows((root / "masking_depth.md").read_text())
    assert rows[0] == ["Masking depth d_m", "Masking", "CAM mIoU (best t)", "CAM mIoU (t=0.25)", "Best t"]
    assert [r[0] for r in rows[2:]] == ["OC (no erasing)", "0", "2"]
    for cells, r in zip(rows[2:], [data["oc"], *data["rows"]]):
        assert cells[2:5] == [f"{r['cam_miou']:.1f}%", f"{r['cam_miou_at_threshold']:.1f}%",
                              f"{r['cam_best_threshold']:.2f}"]
    with Image.open(root / "masking_depth.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert all(records.read(root / v / s)["complete"] in (["all"], ["train"])
               for v in ("depth_0", "depth_2") for s in ("train_cgnet", "cam_cgnet"))

    before = _mtimes(root)
    recorded = {p: p.read_bytes() for p in root.rglob(records.RECORD)}
    assert len(before) == 3  # the OC and two CGNets
    again = masking_depth.run_depth_sweep(cfg, [0, 2])
    assert _mtimes(root) == before
    assert {p: p.read_bytes() for p in root.rglob(records.RECORD)} == recorded  # nothing re-run or rewritten
    assert all(r["ran"] == [] and r["skipped"] == ["train_cgnet", "cam_cgnet"] for r in again.data["rows"])
    assert again.data["oc"]["skipped"] == ["train_classifier", "cam_classifier"]
    assert [r["cam_miou"] for r in again.data["rows"]] == [r["cam_miou"] for r in data["rows"]]

    # a stage whose output is gone runs again; the CGNets do not read the OC's CAMs, so they stay
    import shutil

    shutil.rmtree(root / "oc" / "cam_classifier")
    third = masking_depth.run_depth_sweep(cfg, [0, 2])
    assert third.data["oc"]["ran"] == ["cam_classifier"]
    assert all(r["ran"] == [] for r in third.data["rows"]) and _mtimes(root) == before
    assert records.read(root / "oc" / "cam_classifier")["complete"] == ["train"]

    # a changed CGNet key re-runs exactly the CGNets and their CAMs, not the OC
    fourth = masking_depth.run_depth_sweep(var.with_overrides(cfg, {"train_cgnet.lr": 0.02}), [0, 2])
    assert fourth.data["oc"]["ran"] == [] and all(r["ran"] == ["train_cgnet", "cam_cgnet"] for r in fourth.data["rows"])
    after = _mtimes(root)
    assert after["oc/train_classifier/model.pth"] == before["oc/train_classifier/model.pth"]
    assert records.read(root / "oc/train_classifier")["run"] == \
        json.loads(recorded[root / "oc/train_classifier" / records.RECORD])["run"]
    for d in (0, 2):  # new runs, the CAMs naming the new CGNet
        cgnet, cams = records.read(root / f"depth_{d}/train_cgnet"), records.read(root / f"depth_{d}/cam_cgnet")
        assert cgnet["run"] != json.loads(recorded[root / f"depth_{d}/train_cgnet" / records.RECORD])["run"]
        assert cams["settings"]["input.weights"] == cgnet["run"]
    assert after["depth_0/train_cgnet/model.pth"] != before["depth_0/train_cgnet/model.pth"]
    # a re-run OC (the CGNets' upstream) re-runs every CGNet
    fifth = masking_depth.run_depth_sweep(var.with_overrides(cfg, {"train_cgnet.lr": 0.02,
                                                                       "train_classifier.lr": 0.02}), [0, 2])
    assert fifth.data["oc"]["ran"] == ["train_classifier", "cam_classifier"]
    assert all(r["ran"] == ["train_cgnet", "cam_cgnet"] for r in fifth.data["rows"])


def test_depth_sweep_with_pseudo_labels(tmp_path):
    pytest.importorskip("pydensecrf")
    cfg = mini_config(tmp_path, **FAST, **{"train_affinity.max_steps": 2, "pseudo_labels.steps": 4})
    report = masking_depth.run_depth_sweep(cfg, [1], full=True)
    assert report.failures == []
    row = report.data["rows"][0]
    root = tmp_path / "work" / "masking_depth" / "depth_1"
    summary = json.loads((root / "eval" / "pseudo_labels_train.json").read_text())["summary"]
    assert summary["kind"] == "label" and row["pseudo_label_miou"] == round(100 * summary["miou"], 4)
    independent = evaluate_label_dir(root / "pseudo_labels", load_split(cfg.data, "train"))["summary"]["miou"]
    assert row["pseudo_label_miou"] == round(100 * independent, 4)
    assert _md_rows(report.markdown)[0][-1] == "Pseudo-label mIoU"
    assert (tmp_path / "work" / "masking_depth" / "masking_depth.png").is_file()


def test_depth_sweep_cli_and_changed_settings_are_refused(tmp_path, capsys):
    path = save_config(mini_config(tmp_path, **FAST), tmp_path)
    tool = _tool("masking_depth_sweep")
    assert tool.main(["--config", str(path), "--depths", "0", "1", "train_cgnet.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | image |" in out and "| 1 | feature |" in out and "masking_depth.png" in out
    data = json.loads((tmp_path / "work" / "masking_depth" / "masking_depth.json").read_text())
    assert [r["depth"] for r in data["rows"]] == [0, 1] and data["failures"] == []
    # a changed training setting does not silently reuse the finished CGNets: they run again with it
    assert tool.main(["--config", str(path), "--depths", "0", "train_cgnet.max_steps=1", "train_cgnet.lr=0.5"]) == 0
    data = json.loads((tmp_path / "work" / "masking_depth" / "masking_depth.json").read_text())
    assert data["oc"]["ran"] == [] and data["rows"][0]["ran"] == ["train_cgnet", "cam_cgnet"]
    record = records.read(tmp_path / "work/masking_depth/depth_0/train_cgnet")
    assert record["settings"]["train_cgnet.lr"] == 0.5 and record["complete"] == ["all"]
    assert tool.main(["--config", str(path), "--depths", "7"]) == 2
    assert "not depths of the tinycnn OC" in capsys.readouterr().err


# ---------------------------------------------------------------- Table I


def test_table1_layout_numbers_and_skip(tmp_path):
    cfg = mini_config(tmp_path, **FAST)
    ocs = {"resnet38": {"train_classifier.net.backbone": "tinycnn"},
           "vgg16": {"train_classifier.net.backbone": "tinycnn", "train_classifier.net.width": 0.25}}
    report = table1.run_table1(cfg, ocs, notes=["test"])
    root = tmp_path / "work" / "table1"
    assert report.failures == []
    data = json.loads((root / "table1.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["resnet38", "vgg16"]
    assert [(r["paper_oc_miou"], r["paper_cgnet_miou"]) for r in data["rows"]] == [(47.8, 56.0), (48.9, 52.3)]
    # each variant trained its own OC (widths differ) and a CGNet against it
    widths = [torch.load(root / v / "train_classifier/model.pth", weights_only=True)["net"]["width"]
              for v in ("resnet38", "vgg16")]
    assert widths == [0.5, 0.25] and (root / "vgg16/train_cgnet/model.pth").is_file()
    for r in data["rows"]:
        assert r["oc_miou"] == _eval_miou(root / r["variant"], "cam_classifier")
        assert r["cgnet_miou"] == _eval_miou(root / r["variant"], "cam_cgnet")
        assert r["oc_miou_at_threshold"] == _eval_miou(root / r["variant"], "cam_classifier", "miou_at_threshold")
        assert len(_percent_values(r)) == 6 and all(0 <= v <= 100 for v in _percent_values(r))
    rows = _md_rows((root / "table1.md").read_text())
    assert rows[0][:3] == ["Backbone of Ordinary Classifier (mIoU)", "Ours (mIoU)", "Ours - OC"]
    r0, r1 = data["rows"]
    assert rows[2][0] == f"ResNet38 [ran tinycnn x0.5] ({r0['oc_miou']:.1f}%)" and rows[2][1] == f"{r0['cgnet_miou']:.1f}%"
    assert rows[3][0].startswith("VGG16 [ran tinycnn x0.25] (")
    assert rows[2][2] == f"{r0['cgnet_miou'] - r0['oc_miou']:+.1f}"  # the gain in points
    assert rows[2][3] == "47.8% -> 56.0%" and rows[3][3] == "48.9% -> 52.3%"
    assert rows[2][4] == f"{r0['oc_miou_at_threshold']:.1f}% -> {r0['cgnet_miou_at_threshold']:.1f}%"
    assert "Note: test" in report.markdown and "(8 images)" in report.markdown
    with Image.open(root / "table1.png") as im:  # the chart: OC and CGNet bars per OC backbone
        assert im.format == "PNG" and im.size[0] > 100
    assert root / "table1.png" in report.files

    before = _mtimes(root)
    assert len(before) == 4
    recorded = {p: p.read_bytes() for p in root.rglob(records.RECORD)}
    again = table1.run_table1(cfg, ocs)
    assert _mtimes(root) == before and all(r["ran"] == [] for r in again.data["rows"])
    assert {p: p.read_bytes() for p in root.rglob(records.RECORD)} == recorded
    assert [r["cgnet_miou"] for r in again.data["rows"]] == [r["cgnet_miou"] for r in data["rows"]]


def test_failing_variant_is_named_and_the_others_go_on(tmp_path):
    cfg = mini_config(tmp_path, **FAST)
    ocs = {"good": {}, "broken": {"train_classifier.net.pretrained": str(tmp_path / "missing.pth")}}
    report = table1.run_table1(cfg, ocs)
    assert len(report.failures) == 1
    assert re.match(r"variant 'broken' failed at stage 'train_classifier': .*missing\.pth", report.failures[0])
    good, broken = report.data["rows"]
    assert good["status"] == "ok" and good["cgnet_miou"] is not None
    assert broken["status"] == "failed" and broken["oc_miou"] is None and broken["error"] == report.failures[0]
    # the failed step's output is not complete (no record, or one listing no finished part)
    broken_record = records.read(tmp_path / "work/table1/broken/train_classifier")
    assert broken_record is None or broken_record["complete"] == []
    assert "| failed |" in report.markdown and "- variant 'broken' failed" in report.markdown
    # in the depth sweep, the CGNets that need a failed OC are not run, each saying why
    bad = mini_config(tmp_path, **FAST, **{"train_classifier.net.pretrained": str(tmp_path / "missing.pth")})
    sweep = masking_depth.run_depth_sweep(bad, [0])
    assert sweep.failures[0].startswith("variant 'oc' failed at stage 'train_classifier'")
    assert sweep.failures[1] == "variant 'depth_0' not run: variant(s) ['oc'] it needs failed"
    assert (tmp_path / "work/masking_depth/masking_depth.png").is_file()


def test_table1_cli_reads_the_voc_oc_configs_and_reports_failures(tmp_path, capsys, monkeypatch):
    """The Table I CLI takes ResNet101 / VGG16 from configs/voc/*_oc.yaml: their ImageNet files are
    absent here, so those two variants fail by name while the config's own OC row completes."""
    path = save_config(mini_config(tmp_path, **FAST), tmp_path)
    monkeypatch.chdir(tmp_path)  # the OC configs' relative weights/ paths must not exist
    assert _tool("reproduce_table1").main(["--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert "error: variant 'resnet101' failed at stage 'train_classifier'" in captured.err
    assert "resnet101-63fe2227.pth" in captured.err and "variant 'vgg16'" in captured.err
    rows = _md_rows(captured.out)
    # the config's own OC is the first row, named by its backbone
    assert [r[0].split(" (")[0] for r in rows[2:]] == ["TinyCNN x0.5", "ResNet101", "VGG16"]
    assert [r[1] for r in rows[3:]] == ["failed", "failed"] and rows[2][1].endswith("%")
    assert os.path.isfile(tmp_path / "work" / "table1" / "table1.json")


def test_table1_refuses_a_config_oc_that_would_replace_a_row(capsys):
    """The config's own OC is the first row; one of the same backbone as an OC file would be lost."""
    tool = _tool("reproduce_table1")
    assert tool.main(["--demo", "train_classifier.net.backbone=resnet38", "train_classifier.net.width=0.0625"]) == 2
    err = capsys.readouterr().err
    assert "train_classifier.net.backbone = resnet38: the config's own OC would be the same row as" in err
    assert "demo_r38_oc.yaml" in err
    with pytest.raises(CaeeError, match="vgg16_oc.yaml"):
        tool.oc_variants("vgg16", demo=False)


def test_a_path_key_shared_by_every_variant_is_refused(tmp_path):
    cfg = mini_config(tmp_path, **FAST, **{"cam.out_dir": str(tmp_path / "cams")})
    with pytest.raises(CaeeError, match=r"cam.out_dir=.*shared by every variant.*\{work_dir\}"):
        table1.table1_variants(cfg, {"a": {}})
    cfg = mini_config(tmp_path, **FAST, **{"cam.out_dir": "{work_dir}/my_cams"})  # follows each variant
    (v,) = table1.table1_variants(cfg, {"a": {}})
    assert v.cfg.cam.out_dir == "{work_dir}/my_cams" and v.cfg.cam.crf_alphas == [] and v.cfg.cam.split == ""
