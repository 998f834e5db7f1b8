"""IRN's two stages (caee/stages/train_irn.py, make_irn_labels.py): every setting reaches the method,
checked against the method functions called by hand (and the dense reference walk of test_irn.py)
on three tiny generated images."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from caee.core.config import CrfConfig, NetConfig, config_from_dict
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.method import irn
from caee.models import build_backbone
from caee.models.irn import IrnEdgeNet
from caee.stages import make_irn_labels, train_irn
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
    assert (out / "DONE").is_file()
