"""IRN's two stages (caee/stages/train_irn.py, make_irn_labels.py): every setting reaches the method,
checked against the method functions called by hand (and the dense reference walk of test_irn.py)
on three tiny generated images."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caee.core.config import CrfConfig, NetConfig, config_from_dict
from caee.core import records
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.method import irn
from caee.models import build_backbone
from caee.models.irn import IrnEdgeNet
from caee.stages import make_irn_labels, train_irn
from caee.stages.table import stage
from test_irn import ref_propagate_to_edge, ref_sem_seg

SIZES = {"2007_000001": (40, 52), "2007_000002": (36, 36), "2007_000003": (45, 38)}
KEYS = {"2007_000001": [3, 11], "2007_000002": [0], "2007_000003": [5, 6]}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NET = {"backbone": "tinycnn", "width": 0.25, "pretrained": "", "dropout": 0.0}
# distinct from IRN's defaults and from each other, so a dropped or swapped setting shows
LABEL_SETTINGS = {"conf_fg_thres": 0.45, "conf_bg_thres": 0.12, "crf_gt_prob": 0.6,
                  "crf": {"bilateral_sxy": 30, "bilateral_srgb": 9, "iterations": 4, "workers": 1}}
WALK = {"beta": 4.0, "exp_times": 3, "radius": 3, "sem_seg_bg_thres": 0.55}


def _setup(tmp_path):
    rng = np.random.default_rng(3)
    root, work = tmp_path / "voc", tmp_path / "work"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for image_id, (h, w) in SIZES.items():
        k = len(KEYS[image_id])
        coarse = torch.from_numpy(rng.random((1, k, 4, 4))).float()
        cams = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] ** 4
        cams = cams / cams.amax(dim=(1, 2), keepdim=True)
        blocks = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)  # edges unrelated to the CAMs
        image = np.kron(blocks, np.ones((6, 6, 1), np.uint8))[:h, :w]
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", np.zeros((h, w), np.uint8))
        save_cam_npz(work / "cams" / f"{image_id}.npz", np.array(KEYS[image_id], np.int64), cams.numpy())
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in SIZES))
    cfg = {"work_dir": str(work), "device": "cpu", "data": {"dataset": "voc", "root": str(root), "num_workers": 0},
           "irn": {"cam_dir": str(work / "cams"), "net": dict(NET), "edge_channels": 8, "edge_groups": 4,
                   "crop_size": 32, "batch_size": 2, "epochs": 1, "max_steps": 2, "train_radius": 3,
                   "amp": False, "log_every": 1, **LABEL_SETTINGS, **WALK}}
    return cfg, root, work


def _load(root, work, image_id):
    image = np.asarray(Image.open(root / "JPEGImages" / f"{image_id}.png").convert("RGB"))
    with np.load(work / "cams" / f"{image_id}.npz", allow_pickle=False) as z:
        return image, z["keys"], z["cams"].astype(np.float32)


def test_train_irn_writes_relation_labels_of_the_configured_settings_and_trains(tmp_path):
    cfg, root, work = _setup(tmp_path)
    train_irn.main(config_from_dict(cfg))
    label_dir = work / "cams_irlabels_0.45_0.12"
    crf = CrfConfig(bilateral_sxy=30, bilateral_srgb=9, iterations=4)
    seen, differs = set(), set()
    for image_id in SIZES:
        image, keys, cams = _load(root, work, image_id)
        want = irn.ir_labels(image, keys, cams, 0.45, 0.12, crf, 0.6)
        got = load_label_png(label_dir / f"{image_id}.png")
        np.testing.assert_array_equal(got, want)
        seen |= set(np.unique(got).tolist())
        # the labels depend on each setting here (else the check above could not see it)
        for key, args in (("fg", (0.3, 0.12, crf, 0.6)), ("bg", (0.45, 0.05, crf, 0.6)),
                          ("crf", (0.45, 0.12, CrfConfig(), 0.6)), ("gt_prob", (0.45, 0.12, crf, 0.9))):
            if (irn.ir_labels(image, keys, cams, *args) != want).any():
                differs.add(key)
    assert differs == {"fg", "bg", "crf", "gt_prob"}
    assert 0 in seen and 255 in seen and len(seen) >= 4
    state = torch.load(work / "train_irn" / "model.pth", weights_only=True)
    assert state["arch"] == "irn" and state["edge_channels"] == 8 and state["train_radius"] == 3
    fresh = IrnEdgeNet(build_backbone(NetConfig(**NET)), 8, 4, 4)
    moved = [k for k, v in fresh.state_dict().items() if not k.startswith("backbone.")
             and not torch.equal(v, state["model"][k])]
    assert moved  # two steps changed the boundary layers


def _save_random_irn(work):
    net_cfg = NetConfig(**NET)
    torch.manual_seed(0)
    net = IrnEdgeNet(build_backbone(net_cfg), 8, 4, 4)
    with torch.no_grad():
        torch.nn.init.normal_(net.edge_out.weight, std=2.0)
    path = work / "irn.pth"
    torch.save({"model": net.state_dict(), "arch": "irn", "net": dataclasses.asdict(net_cfg), "edge_channels": 8,
                "edge_groups": 4, "edge_stride": 4}, path)
    return net.eval(), path


def _hand_labels(net, image, keys, cams, beta, exp_times, radius, sem_seg_bg_thres, pad=48):
    x = (torch.from_numpy(image.copy()).double() / 255 - torch.tensor(MEAN).double()) / torch.tensor(STD).double()
    edge = irn.edge_map(net, x.permute(2, 0, 1).float(), pad_to=pad)
    grid = F.avg_pool2d(torch.from_numpy(cams)[None], 4, 4, ceil_mode=True)[0]
    rw = ref_propagate_to_edge(grid, edge, radius, beta, exp_times).float()
    return ref_sem_seg(rw, keys, image.shape[:2], sem_seg_bg_thres)


def test_make_irn_labels_equal_the_walk_by_hand_and_every_setting_matters(tmp_path):
    cfg, root, work = _setup(tmp_path)
    net, weights = _save_random_irn(work)
    cfg["irn"].update(weights=str(weights), crop_size=48)
    out = make_irn_labels.main(config_from_dict(cfg))
    differs = set()
    for image_id in SIZES:
        image, keys, cams = _load(root, work, image_id)
        want = _hand_labels(net, image, keys, cams, **WALK)
        np.testing.assert_array_equal(load_label_png(out / f"{image_id}.png"), want)
        for key, other in (("beta", 10.0), ("exp_times", 6), ("radius", 5), ("sem_seg_bg_thres", 0.25)):
            if (_hand_labels(net, image, keys, cams, **{**WALK, key: other}) != want).any():
                differs.add(key)
        if (_hand_labels(net, image, keys, cams, **WALK, pad=64) != want).any():
            differs.add("crop_size")
    assert differs == {"beta", "exp_times", "radius", "sem_seg_bg_thres", "crop_size"}
    assert records.read(out)["complete"] == ["train"]


def test_irn_step_uses_the_training_radius_grid_and_loss(tmp_path):
    """IrnTask.train_step = the loss over pair_indices(train_radius, IRN's pair set) of the labels
    sampled at the cell centres of the edge_stride grid, written out by hand."""
    from caee.core.config import IrnConfig
    from caee.engine.trainer import StepContext
    from caee.method.affinity import pair_indices, pair_label_targets

    ic = IrnConfig(net=NetConfig(**NET), edge_channels=8, edge_groups=4, train_radius=4, crop_size=32)
    torch.manual_seed(1)
    model = train_irn.build_model(ic).train()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.randint(0, 3, (2, 32, 32), generator=g)
    mask[0, :, 20:] = 255
    ctx = StepContext(torch.device("cpu"), epoch=0, step=0, total_steps=1, seed=0, channels_last=False)
    loss, metrics = train_irn.IrnTask(model, ic, ["a", "b"]).train_step(model, {"image": images, "mask": mask}, ctx)
    labels = mask[:, 2::4, 2::4]
    f, t = pair_indices(8, 8, 4, psa_border=True)
    with torch.no_grad():
        edge = torch.sigmoid(model(images)[:, 0])
    want, _ = irn.boundary_loss(irn.boundary_affinity(edge, 4, psa_border=True), *pair_label_targets(labels, f, t))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert metrics["n_bg"] + metrics["n_fg"] + metrics["n_neg"] > 0


def test_irn_defaults_are_irn_run_sample_settings():
    from caee.core.config import Config

    ic = Config().irn
    assert (ic.conf_fg_thres, ic.conf_bg_thres, ic.crop_size, ic.batch_size, ic.epochs) == (0.30, 0.05, 512, 32, 3)
    assert (ic.lr, ic.weight_decay, ic.beta, ic.exp_times, ic.radius, ic.sem_seg_bg_thres) == (0.1, 1e-4, 10, 8, 5, 0.25)
    assert (ic.train_radius, ic.edge_stride, ic.edge_channels, ic.edge_groups, ic.crf_gt_prob) == (10, 4, 32, 4, 0.7)
    assert (ic.momentum, ic.head_lr_mult, ic.bias_lr_mult, ic.poly_power, ic.scale_range) == (1e-4, 1.0, 1.0, 0.9, [0.5, 1.5])
    assert (ic.crf.gaussian_sxy, ic.crf.gaussian_compat, ic.crf.bilateral_sxy, ic.crf.bilateral_srgb,
            ic.crf.bilateral_compat, ic.crf.iterations) == (3, 3, 50, 5, 10, 10)
    assert ic.net.backbone == "resnet50" and ic.color_jitter == [0, 0, 0, 0] and ic.hflip


@pytest.mark.parametrize("item,match", [("irn.conf_bg_thres=0.4", "conf_bg_thres"), ("irn.edge_channels=30", "divisible"),
                                        ("irn.scale_range=[1.5,0.5]", "scale_range"), ("irn.train_radius=1", "train_radius"),
                                        ("irn.sem_seg_bg_thres=1.5", "sem_seg_bg_thres"), ("irn.crf_gt_prob=1", "crf_gt_prob")])
def test_irn_config_rules(item, match):
    from caee.core.config import load_config
    from caee.core.errors import CaeeError

    with pytest.raises(CaeeError, match=match):
        load_config(None, [item])


def test_irn_augmentation_rescales_by_the_factor_and_pads_the_crop():
    from torchvision import tv_tensors

    from caee.core.config import IrnConfig

    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 3, (40, 52), dtype=torch.uint8))
    tf = train_irn.build_irn_transform(IrnConfig(scale_range=[0.5, 0.5], crop_size=32, hflip=False))
    out_image, out_mask = tf(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert int((out_mask != 255).sum()) == 20 * 26                     # the 0.5x image, padded with 255
    assert int((out_image.abs().sum(0) == 0).sum()) == 32 * 32 - 20 * 26  # and with 0 (the mean colour)


def test_irn_backbone_from_a_classifier_checkpoint(tmp_path):
    """irn.init = a classifier's model.pth: its backbone is loaded (and frozen), the branch stays fresh."""
    from caee.core.config import IrnConfig
    from conftest import save_random_cgnet

    clf = save_random_cgnet(tmp_path, num_classes=20)
    ic = IrnConfig(net=NetConfig(**NET), edge_channels=8, edge_groups=4, init=str(tmp_path / "train_cgnet" / "model.pth"))
    model = train_irn.build_model(ic)
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert not any(p.requires_grad for p in model.backbone.parameters())


# ---------------------------------------------------------------- IRN in the pipeline (pseudo_labels.method)

_IRN_MINI = {"pseudo_labels.method": "irn", "pipeline.control": False, "cam.crf_alphas": [],
             "irn.net.backbone": "tinycnn", "irn.net.width": 0.5, "irn.net.pretrained": "", "irn.edge_channels": 8,
             "irn.edge_groups": 4, "irn.crop_size": 64, "irn.batch_size": 8, "irn.epochs": 1, "irn.max_steps": 2,
             "irn.train_radius": 3, "irn.radius": 3, "irn.exp_times": 3, "irn.amp": False, "irn.log_every": 1,
             "irn.crf.workers": 1, "train_classifier.max_steps": 2, "train_cgnet.max_steps": 2,
             "train_deeplab.max_steps": 2}


def test_voc_irn_config_selects_irn_and_changes_nothing_else(tmp_path):
    """configs/voc/r38_irn.yaml: the pipeline runs IRN's two stages instead of AffinityNet's, DeepLab reads
    IRN's labels, and every other setting is the paper's (configs/voc/r38.yaml)."""
    from caee.core.config import config_to_dict, load_config
    from caee.stages.table import plan
    from test_stages_oc_cgnet import REPO, _flat

    cfg = load_config(REPO / "configs/voc/r38_irn.yaml", [f"work_dir={tmp_path}"])
    assert plan(cfg)[-3:] == ["train_irn", "irn_labels", "train_deeplab"] and "train_affinity" not in plan(cfg)
    assert stage("train_deeplab").input(cfg, "labels") == tmp_path / "pseudo_labels_irn"
    both = load_config(REPO / "configs/voc/r38_irn.yaml", [f"work_dir={tmp_path}", "pseudo_labels.compare=true"])
    assert {"train_affinity", "pseudo_labels", "train_irn", "irn_labels"} <= set(plan(both))
    base = _flat(config_to_dict(load_config(REPO / "configs/voc/r38.yaml", [f"work_dir={tmp_path}"])))
    other = _flat(config_to_dict(cfg))
    assert {k for k in base if base[k] != other[k]} == {"pseudo_labels.method", "irn.net.pretrained"}
    assert cfg.irn.conf_fg_thres == 0.30 and cfg.irn.exp_times == 8 and cfg.irn.sem_seg_bg_thres == 0.25


def test_miniature_pipeline_runs_end_to_end_with_irn_settings_checked_and_resumable(copied_pipeline):
    """caee run with pseudo_labels.method=irn on a copy of conftest.py's finished miniature pipeline:
    IRN's stages run between the CGNet CAMs and DeepLab (the steps before them are reused), a second
    run skips every step, a changed walk key re-runs exactly the IRN labels and DeepLab, and the
    results table has the IRN row."""
    from caee.pipeline import run as pipeline
    from caee.pipeline.runner import jobs_of, run_jobs

    irn_keys = {k: v for k, v in _IRN_MINI.items() if k.startswith("irn.") or k == "pseudo_labels.method"}
    cfg = copied_pipeline.config(**irn_keys)
    names = [j.step.name for j in jobs_of(cfg, pipeline.plan(cfg))]
    assert names == ["train_classifier", "train_cgnet", "cam_classifier", "cam_cgnet", "train_irn", "irn_labels",
                     "train_deeplab"]
    jobs = jobs_of(cfg, names)
    assert run_jobs(jobs, context=jobs).ran == ["train_irn", "irn_labels", "train_deeplab"]
    result = pipeline.run(cfg, only=["results"])
    work = copied_pipeline.work
    rows = {r["output"]: r for r in result["rows"]}
    assert "pseudo labels (IRN)" in rows and "pseudo labels" not in rows and "DeepLab prediction" in rows
    labels = records.read(work / "pseudo_labels_irn")
    assert labels["complete"] == ["train"] and labels["settings"]["input.irn"] == records.read(work / "train_irn")["run"]
    assert records.read(work / "train_deeplab")["settings"]["input.labels"] == labels["run"]
    assert run_jobs(jobs_of(cfg, names)).ran == []
    changed = copied_pipeline.config(**{**irn_keys, "irn.beta": 4.0})
    assert run_jobs(jobs_of(changed, names)).ran == ["irn_labels", "train_deeplab"]
