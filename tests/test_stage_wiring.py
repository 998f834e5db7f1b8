"""Config values reach the method: each stage's output is compared with a computation written out
here from the config, with non-default, pairwise distinct settings, so that a stage that drops,
swaps or ignores a setting fails (issue 17: the loss weight w, the mask normalisation and depth,
the random-walk settings, every CRF setting, the sharding of inference)."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caee import distributed
from caee.config import NetConfig, config_from_dict
from caee.engine import StepContext
from caee.io import load_label_png, save_cam_npz, save_label_png
from caee.models import build_backbone
from caee.models.affinitynet import AffinityNet
from caee.models.classifier import CamClassifier
from caee.stages import make_pseudo_labels as mpl
from caee.stages import train_cgnet, train_classifier
from conftest import mini_config

# ---------------------------------------------------------------- CGNet loss: L = L_cls + w * L_cse


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss written out: mean over classes and images of the logistic loss."""
    p = torch.sigmoid(logits.double())
    t = target.double()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _hand_mask(maps: torch.Tensor, targets: list[int], size, per_image: bool) -> torch.Tensor:
    """Upsample the target map (bilinear), ReLU, divide by the batch or per-image maximum + 1e-5."""
    out = []
    for i, k in enumerate(targets):
        up = F.interpolate(maps[i:i + 1, k:k + 1].double(), size=size, mode="bilinear", align_corners=False)
        out.append(up.clamp(min=0))
    out = torch.cat(out)
    peak = out.amax(dim=(1, 2, 3), keepdim=True) if per_image else out.amax()
    return out / (peak + 1e-5)


def _cgnet_pair(seed: int = 0):
    cfg = mini_config(Path("/nonexistent"))
    torch.manual_seed(seed)
    oc = train_cgnet.freeze_module(CamClassifier(build_backbone(cfg.train_classifier.net), 3))
    cgnet = CamClassifier(build_backbone(cfg.train_cgnet.net), 3, 0.0)
    with torch.no_grad():  # distinct peaks per image so that batch and per-image normalisation differ
        cgnet.fc8.weight.mul_(torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1))
    return cfg, oc, cgnet


@pytest.mark.parametrize("normalization,depth", [("per_image", 0), ("batch", 2), ("per_image", 3)])
def test_cgnet_loss_is_cls_plus_w_times_cse_with_the_configured_mask(normalization, depth):
    cfg, oc, cgnet = _cgnet_pair()
    cfg.masking.normalization, cfg.masking.depth = normalization, depth
    cfg.masking.cse_init, cfg.masking.cse_slope = 0.7, 0.2
    task = train_cgnet.CGNetTask(cgnet, oc, cfg, ["a", "b", "c"])
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([[0., 1, 0], [1, 0, 0]])     # one class each: the drawn targets are known
    ctx = StepContext(torch.device("cpu"), epoch=3, step=0, total_steps=10, seed=0, channels_last=False)
    cgnet.eval()  # BN statistics fixed so the hand forward below sees the same maps
    loss, metrics = task.train_step(cgnet, {"image": images, "label": labels}, ctx)

    w = 0.7 + 0.2 * 3
    with torch.no_grad():
        logits, maps = cgnet(images)
        loss_cls = _bce(logits, labels)
        mask = _hand_mask(maps, [1, 0], (32, 32), normalization == "per_image")
        keep = (1 - mask).float()

        def edit(d, feat):
            if d != depth:
                return feat
            k = keep if feat.shape[-2:] == keep.shape[-2:] else F.adaptive_avg_pool2d(keep, feat.shape[-2:])
            return feat * k

        oc_logits, _ = oc(images, edit=edit)
        loss_cse = _bce(oc_logits, torch.zeros(2, 3))   # the only class of each image is erased
    assert metrics["w"] == pytest.approx(w)
    assert metrics["loss_cls"] == pytest.approx(float(loss_cls), rel=1e-5)
    assert metrics["loss_cse"] == pytest.approx(float(loss_cse), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(loss_cls + w * loss_cse), rel=1e-5)
    # the two normalisations give different masks here, so the check above tells them apart
    other = _hand_mask(maps, [1, 0], (32, 32), normalization != "per_image")
    assert (other - mask).abs().max() > 0.1


def test_cgnet_stage_logs_the_weighted_loss_of_the_configured_schedule(tmp_path):
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 1, "train_cgnet.epochs": 2,
                                   "train_cgnet.max_steps": 12, "masking.cse_init": 0.9, "masking.cse_slope": 0.4})
    train_classifier.main(cfg)
    train_cgnet.main(cfg)
    recs = [json.loads(l) for l in (Path(cfg.work_dir) / "train_cgnet" / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in recs} == {0, 1}
    for r in recs:
        w = 0.9 + 0.4 * r["epoch"]
        assert r["w"] == pytest.approx(w)
        assert r["loss"] == pytest.approx(r["loss_cls"] + w * r["loss_cse"], rel=1e-5)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_is_disjoint_complete_and_balanced(n, world):
    items = [f"id{i}" for i in range(n)]
    shares = [distributed.shard(items, r, world) for r in range(world)]
    flat = [x for s in shares for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == n       # complete, nothing twice
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1                          # balanced
    for s in shares:                                             # each share keeps the input order
        assert s == sorted(s, key=items.index)


def test_shard_without_a_group_is_everything():
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
