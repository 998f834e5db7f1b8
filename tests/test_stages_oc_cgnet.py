"""Stages 1 and 2 end to end on tiny data: the OC learns, the CGNet trains at every masking depth
against every OC backbone, VOC configs start on a VOC-layout folder, bad input fails clearly."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caee.core.config import config_to_dict, load_config
from caee.data import ClassificationDataset, load_split
from caee.engine.trainer import StepContext
from caee.core.errors import CaeeError
from caee.models import build_backbone
from caee.models.classifier import CamClassifier, load_classifier
from caee.stages import train_cgnet, train_classifier
from conftest import mini_config

REPO = Path(__file__).resolve().parents[1]


def _dataset_loss(model, cfg):
    index = load_split(cfg.data, cfg.data.train_split)
    ds = ClassificationDataset(index)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.stack([torch.as_tensor(ds[i]["label"]) for i in range(len(ds))])
    with torch.no_grad():
        return F.multilabel_soft_margin_loss(model.eval()(x)[0], y).item()


def test_oc_training_lowers_the_loss_and_exports_its_architecture(tmp_path):
    cfg = mini_config(tmp_path, **{"train_classifier.epochs": 8})
    out = train_classifier.main(cfg)
    model = load_classifier(out.model_path, cfg.train_classifier.net, 3)
    untrained = CamClassifier(build_backbone(cfg.train_classifier.net), 3)
    assert _dataset_loss(model, cfg) < 0.85 * _dataset_loss(untrained, cfg)
    meta = torch.load(out.model_path, weights_only=True)
    assert meta["arch"] == "classifier" and meta["net"]["backbone"] == "tinycnn" and meta["num_classes"] == 3
    stage = Path(cfg.work_dir) / "train_classifier"
    assert (stage / "config.yaml").exists() and (stage / "log.txt").exists()
    assert (stage / "metrics.jsonl").read_text().count("\n") == out.steps


def test_cgnet_stage_trains_against_the_saved_oc_with_feature_masking(tmp_path):
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 2, "train_cgnet.max_steps": 3, "train_cgnet.epochs": 2,
                                   "masking.depth": 3})
    train_classifier.main(cfg)
    out = train_cgnet.main(cfg)
    meta = torch.load(out.model_path, weights_only=True)
    assert meta["masking"]["depth"] == 3 and out.steps == 3
    line = (Path(cfg.work_dir) / "train_cgnet" / "metrics.jsonl").read_text().splitlines()[0]
    assert all(k in line for k in ("loss_cls", "loss_cse", "oc_erased_acc", '"w": 0.3'))


def test_cgnet_without_oc_and_with_a_bad_depth_fail_clearly(tmp_path):
    cfg = mini_config(tmp_path)
    with pytest.raises(CaeeError, match="input not found: .*train_classifier/model.pth \\(config key train_cgnet.oc_weights\\)"):
        train_cgnet.main(cfg)
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1, "masking.depth": 9})
    train_classifier.main(cfg)
    with pytest.raises(CaeeError, match="masking.depth=9 .* valid depths: 0, 1, 2, 3, 4"):
        train_cgnet.main(cfg)


@pytest.mark.parametrize("oc_backbone", ["resnet38", "resnet101", "vgg16"])
def test_cgnet_steps_at_every_depth_for_every_oc_backbone(oc_backbone, tmp_path):
    cfg = mini_config(tmp_path)
    width = 0.0625 if oc_backbone == "resnet38" else 1.0
    torch.manual_seed(0)
    oc = CamClassifier(build_backbone(dataclasses.replace(cfg.train_classifier.net, backbone=oc_backbone, width=width)), 3)
    oc = train_cgnet.freeze_module(oc)
    cgnet = CamClassifier(build_backbone(dataclasses.replace(cfg.train_cgnet.net, backbone="resnet38", width=0.0625)), 3, 0.0)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1., 0, 1], [0, 1, 0]])
    for depth in oc.backbone.depths:
        cfg.masking.depth = depth
        task = train_cgnet.CGNetTask(cgnet, oc, cfg, ["a", "b", "c"])
        cgnet.zero_grad()
        ctx = StepContext(torch.device("cpu"), epoch=2, step=depth, total_steps=10, seed=0, channels_last=False)
        loss, metrics = task.train_step(cgnet.train(), {"image": images, "label": labels}, ctx)
        loss.backward()
        assert torch.isfinite(loss) and metrics["w"] == pytest.approx(0.4)
        assert cgnet.fc8.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in oc.parameters())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_voc_configs_start_on_a_voc_layout_folder(fake_voc, tmp_path):
    cfg = load_config(REPO / "configs" / "voc" / "r38.yaml", [
        f"data.root={fake_voc}", f"work_dir={tmp_path / 'r38'}", "device=cpu", "data.num_workers=0",
        "train_classifier.net.pretrained=", "train_classifier.net.width=0.0625", "train_classifier.batch_size=2",
        "train_classifier.max_steps=1", "train_classifier.crop_size=32", "train_classifier.resize_long=[32, 48]",
        # one step of PSA's lr 0.1 (no momentum) on random weights can overflow the tiny OC
        "train_classifier.lr=0.01",
        "train_cgnet.net.pretrained=", "train_cgnet.net.width=0.0625", "train_cgnet.batch_size=2",
        "train_cgnet.max_steps=1", "train_cgnet.crop_size=32", "train_cgnet.resize_long=[32, 48]"])
    assert train_classifier.main(cfg).steps == 1
    assert train_cgnet.main(cfg).steps == 1
    # the ResNet101 / VGG16 OC configs change nothing but the OC's network (and work_dir), so the run
    # above starts them too; their OCs against the CGNet: test_cgnet_steps_at_every_depth_for_every_oc_backbone
    base = _flat(config_to_dict(load_config(REPO / "configs" / "voc" / "r38.yaml", [])))
    for name, backbone, weights in (("r101_oc", "resnet101", "resnet101-63fe2227.pth"),
                                    ("vgg16_oc", "vgg16", "vgg16-397923af.pth")):
        other = _flat(config_to_dict(load_config(REPO / "configs" / "voc" / f"{name}.yaml", [])))
        changed = {k: other.get(k) for k in set(base) | set(other) if base.get(k) != other.get(k)}
        assert changed == {"work_dir": f"work_dirs/voc_{name}", "train_classifier.net.backbone": backbone,
                           "train_classifier.net.pretrained": "{weights_dir}/" + weights}, name


def test_missing_imagenet_weights_name_the_file_and_key(fake_voc, tmp_path):
    cfg = load_config(REPO / "configs" / "voc" / "r38.yaml", [f"data.root={fake_voc}", f"work_dir={tmp_path}",
                                                              "device=cpu", "train_classifier.net.width=0.0625"])
    with pytest.raises(CaeeError, match="ilsvrc-cls_rna-a1_cls1000_ep-0001.params"):
        train_classifier.main(cfg)
    assert not (tmp_path / "train_classifier" / "model.pth").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1})
    path = train_classifier.main(cfg).model_path
    wrong = dataclasses.replace(cfg.train_classifier.net, backbone="resnet38", width=0.0625)
    state = torch.load(path, weights_only=True)
    torch.save(state["model"], tmp_path / "plain.pth")   # no recorded architecture: must not load silently
    with pytest.raises(CaeeError, match="TinyCNN"):
        load_classifier(tmp_path / "plain.pth", wrong, 3)


def test_oracle_selection_keeps_the_best_epoch(tmp_path, monkeypatch):
    scores = iter([0.4, 0.7, 0.5])   # epoch 2 is the best
    monkeypatch.setattr(train_cgnet, "train_cam_miou", lambda model, samples, num_classes, device: next(scores))
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1, "train_cgnet.epochs": 3,
                                   "train_cgnet.select_by_oracle": True})
    train_classifier.main(cfg)
    out = train_cgnet.main(cfg)
    saved = torch.load(out.model_path, weights_only=True)
    best = torch.load(Path(cfg.work_dir) / "train_cgnet" / "oracle_best.pth", weights_only=True)
    assert saved["oracle_epoch"] == 1 and saved["oracle_miou"] == 0.7
    assert all(torch.equal(saved["model"][k], best["model"][k]) for k in best["model"])
    last = torch.load(Path(cfg.work_dir) / "train_cgnet" / "last.pth", weights_only=True)["model"]
    assert not all(torch.equal(saved["model"][k], last[k]) for k in last)   # not simply the last epoch


def test_oracle_miou_is_measured_on_ground_truth(tmp_path):
    """The oracle's score equals the best-threshold mIoU that the CAM and evaluation stages give for
    the same model's CAMs of the train split made with the oracle's (official) settings."""
    from caee.engine.scoring import evaluate_cam_dir
    from caee.method.epoch_selection import FLIP, RESIZE, SCALES, THRESHOLDS, train_cam_miou
    from caee.stages import make_cam
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1, "cam.source": "classifier", "cam.split": "train",
                                   "data.synthetic.num_train": 4, "train_classifier.batch_size": 4,
                                   "cam.scales": list(SCALES), "cam.flip": FLIP, "cam.resize": RESIZE,
                                   "cam.dtype": "float32", "cam.amp": False})
    model = load_classifier(train_classifier.main(cfg).model_path, cfg.train_classifier.net, 3)
    index = load_split(cfg.data, "train")
    from caee.stages.train_cgnet import OracleSelector
    miou = train_cam_miou(model, OracleSelector(tmp_path, index, None).samples(), 3, torch.device("cpu"))
    make_cam.main(cfg)
    summary = evaluate_cam_dir(Path(cfg.work_dir) / "cam_classifier", index, THRESHOLDS, THRESHOLDS[0], 1)["summary"]
    assert summary["num_evaluated"] == len(index) == 4
    assert miou == pytest.approx(summary["miou"], abs=1e-6)
    assert 0.0 < miou < 1.0
