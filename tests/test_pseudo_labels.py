"""make_pseudo_labels: random-walk scores against references and hand-predictable limits, the stage's files."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caee.method.affinity import pair_indices
from caee.core.config import NetConfig, config_from_dict
from caee.core.config import CrfConfig
from caee.core import records
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.models import ResNet38
from caee.models.affinitynet import AffinityNet
from caee.method.random_walk import cam_scores_with_background, dense_random_walk_reference
from caee.stages import make_pseudo_labels as mpl
from caee.method.pseudo_labels import PairCache, WalkParams, embed_image, labels_from_scores, random_walk_scores
from references import pairwise_affinity

WIDTH = 0.125


def _degrees(h: int, w: int, radius: int, region: np.ndarray) -> np.ndarray:
    """Number of cells of the same region within the radius (self included), by plain loops."""
    deg = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for yy in range(h):
                for xx in range(w):
                    if (yy - y) ** 2 + (xx - x) ** 2 < radius ** 2 and region[yy, xx] == region[y, x]:
                        deg[y, x] += 1
    return deg


# ---------------------------------------------------------------- the walk


@pytest.mark.parametrize("psa_border", [False, True])
def test_scores_and_labels_match_the_dense_reference(psa_border):
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(6, 5, 7, generator=g, dtype=torch.float64) * 2
    cams = torch.rand(2, 37, 50, generator=g, dtype=torch.float64)  # 37x50 -> a 5x7 grid (ceil)
    params = WalkParams(alpha=4, beta=8, steps=16, radius=5, psa_border=psa_border)
    out = random_walk_scores(feats, cams, params, stride=8)
    assert out.shape == (3, 37, 50)
    f, t = pair_indices(5, 7, 5, psa_border)
    aff = pairwise_affinity(feats.unsqueeze(0), f, t)[0]
    ref = dense_random_walk_reference(cam_scores_with_background(cams, 4, 8), aff, f, t, beta=8, steps=16)
    up = F.interpolate(ref.unsqueeze(0), size=(40, 56), mode="bilinear", align_corners=False)[0, :, :37, :50]
    torch.testing.assert_close(out.double(), up, rtol=1e-5, atol=1e-6)
    keys = np.array([3, 11])
    labels = labels_from_scores(out.numpy(), keys)
    expected = np.array([0, 4, 12], np.uint8)[up.argmax(0).numpy()]
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) <= {0, 4, 12}


def test_two_regions_converge_to_their_degree_weighted_means():
    """Left half of the grid: one feature value, right half: another far away, so no affinity crosses.
    The class CAM covers only the top 5 of 8 cell rows of the left half; after many steps every
    cell of a region holds the region's degree-weighted mean, so the class spreads over the whole
    left half (rows 5..7 included) up to a boundary column predictable from those means."""
    h, w, radius = 8, 8, 5
    region = np.zeros((h, w), int)
    region[:, 4:] = 1
    feats = torch.from_numpy(region * 10.0).float().unsqueeze(0)  # affinity across = exp(-10)^8 ~ 0
    cams = torch.zeros(1, 64, 64)
    cams[0, :40, :32] = 1.0
    params = WalkParams(alpha=16, beta=8, steps=256, radius=radius)
    scores = random_walk_scores(feats, cams, params, stride=8)
    labels = labels_from_scores(scores.numpy(), np.array([6]))

    cells = cam_scores_with_background(cams, 16, 8).numpy()  # (2, 8, 8): bg, class
    deg = _degrees(h, w, radius, region)
    limit = np.zeros_like(cells)
    for r in (0, 1):
        m = region == r
        limit[:, m] = (cells[:, m] * deg[m]).sum(axis=1, keepdims=True) / deg[m].sum()
    torch.testing.assert_close(F.interpolate(torch.from_numpy(limit).unsqueeze(0), size=(64, 64), mode="bilinear",
                                             align_corners=False)[0], scores, rtol=1e-4, atol=1e-4)
    assert limit[1, 0, 0] > limit[0, 0, 0]     # left half: class beats background on average
    assert limit[1, 0, 7] == 0                 # right half: no class evidence at all
    expected = labels_from_scores(F.interpolate(torch.from_numpy(limit).unsqueeze(0), size=(64, 64),
                                                mode="bilinear", align_corners=False)[0].numpy(), np.array([6]))
    np.testing.assert_array_equal(labels, expected)
    assert (labels[:, :28] == 7).all() and (labels[40:, :28] == 7).all()  # propagated below the CAM
    assert (labels[:, 36:] == 0).all()


def test_beta_zero_makes_the_walk_uniform_in_the_neighbourhood():
    """beta = 0: every pair within the radius weighs 1 whatever the features, so the walk converges
    to one degree-weighted mean over the whole (connected) grid: one label for the whole image."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 6, 6, generator=g)
    cams = torch.zeros(2, 48, 48)
    cams[0, :, :30] = 0.9   # class a on the left 30 columns
    cams[1, :, 30:40] = 1.0  # class b on 10 columns
    scores = random_walk_scores(feats, cams, WalkParams(alpha=16, beta=0, steps=256, radius=5), stride=8)
    spread = scores.amax(dim=(1, 2)) - scores.amin(dim=(1, 2))
    assert float(spread.max()) < 1e-4
    labels = labels_from_scores(scores.numpy(), np.array([0, 4]))
    assert (labels == 1).all()


def test_crf_path_uses_the_normalised_scores():
    pytest.importorskip("pydensecrf")
    scores = np.zeros((2, 24, 24), np.float32)
    scores[0] = 0.3
    scores[1, :, :12] = 0.9
    image = np.full((24, 24, 3), 100, np.uint8)
    image[:, :12] = (220, 30, 30)
    labels = labels_from_scores(scores, np.array([2]), image, CrfConfig())
    assert set(np.unique(labels)) <= {0, 3}
    assert (labels[:, :10] == 3).all() and (labels[:, 14:] == 0).all()


def test_embed_image_pads_to_the_stride():
    torch.manual_seed(0)
    net = AffinityNet(ResNet38(width=WIDTH)).eval()
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    feats = embed_image(net, image, 8, torch.device("cpu"))
    assert feats.shape == (448, 5, 7) and feats.dtype == torch.float32


def test_pair_cache_reuses_and_bounds():
    cache = PairCache(5, False, max_entries=2)
    a = cache.get(6, 6, torch.device("cpu"))
    again = cache.get(6, 6, torch.device("cpu"))
    assert again[0] is a[0] and again[2] is a[2]
    assert a[2].n == 36 and a[2].ccol[-1] == 2 * a[0].numel() + 36
    cache.get(7, 7, torch.device("cpu"))
    cache.get(8, 8, torch.device("cpu"))
    assert len(cache._store) == 2 and cache.get(6, 6, torch.device("cpu"))[0] is not a[0]


# ---------------------------------------------------------------- the stage


def _setup(tmp_path):
    """Three tiny images with CAMs, one without classes, and an AffinityNet whose f9 is zero
    (so every embedding is 0 and every affinity is 1: the walk averages over the whole image)."""
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    work = tmp_path / "work"
    cam_dir = work / "cam_oc"
    specs = {  # id: (size, keys, cam builder)
        "a": ((40, 56), [4], lambda c: c[0].__setitem__((slice(None), slice(0, 44)), 1.0)),      # 79 %: class 4
        "b": ((48, 48), [2, 9], lambda c: (c[0].__setitem__((slice(None), slice(0, 8)), 1.0),
                                          c[1].__setitem__((slice(None), slice(8, 48)), 0.8))),  # class 9
        "c": ((33, 45), [7], lambda c: c[0].__setitem__((slice(0, 5), slice(0, 5)), 1.0)),       # mostly bg
        "d": ((24, 32), [], lambda c: None),                                                     # no class
    }
    for image_id, ((h, w), keys, build) in specs.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.png")
        mask = np.zeros((h, w), np.uint8)
        for j, k in enumerate(keys):
            mask[j, j] = k + 1
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        cams = np.zeros((len(keys), h, w), np.float32)
        build(cams)
        save_cam_npz(cam_dir / f"{image_id}.npz", np.array(keys, np.int64), cams.astype(np.float16))
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\nc\nd\n")
    torch.manual_seed(0)
    net = AffinityNet(ResNet38(width=WIDTH))
    with torch.no_grad():
        net.f9.weight.zero_()
    weights = work / "train_affinity" / "model.pth"
    weights.parent.mkdir(parents=True)
    torch.save({"model": net.state_dict(), "arch": "affinitynet",
                "net": dataclasses.asdict(NetConfig(width=WIDTH)), "radius": 5}, weights)
    cfg = {"work_dir": str(work), "device": "cpu", "data": {"dataset": "voc", "root": str(root)},
           "pseudo_labels": {"cam_dir": str(cam_dir), "steps": 64}}
    return cfg, work, {k: v[0] for k, v in specs.items()}


def test_stage_writes_hand_predictable_labels_and_skips_existing(tmp_path):
    cfg, work, sizes = _setup(tmp_path)
    out = mpl.main(config_from_dict(cfg))
    assert out == work / "pseudo_labels"
    expected = {"a": 5, "b": 10, "c": 0, "d": 0}
    for image_id, value in expected.items():
        lab = load_label_png(out / f"{image_id}.png")
        assert lab.shape == sizes[image_id]
        assert (lab == value).all(), (image_id, np.unique(lab))
    done = records.read(out)
    assert done["complete"] == ["train"] and done["settings"]["pseudo_labels.steps"] == 64
    assert done["settings"]["pseudo_labels.crf"] is False

    # skip existing: a changed file survives a re-run, overwrite=true restores it
    save_label_png(out / "a.png", np.full(sizes["a"], 3, np.uint8))
    mpl.main(config_from_dict(cfg))
    assert (load_label_png(out / "a.png") == 3).all()
    assert records.read(out)["complete"] == ["train"]
    cfg["pseudo_labels"]["overwrite"] = True
    mpl.main(config_from_dict(cfg))
    assert (load_label_png(out / "a.png") == 5).all()


def test_stage_with_crf_and_sharding(tmp_path, monkeypatch):
    pytest.importorskip("pydensecrf")
    cfg, work, sizes = _setup(tmp_path)
    cfg["pseudo_labels"].update(crf=True, out_dir=str(tmp_path / "pl_crf"))
    cfg["crf"] = {"workers": 1}
    # pretend to be rank 1 of 2: only images b and d are this rank's; the record is rank 0's
    monkeypatch.setattr(mpl.distributed, "shard", lambda items: items[1::2])
    monkeypatch.setattr(mpl.distributed, "is_main", lambda: False)
    mpl.main(config_from_dict(cfg))
    written = sorted(p.stem for p in (tmp_path / "pl_crf").glob("*.png"))
    assert written == ["b", "d"] and not (tmp_path / "pl_crf" / "record.json").exists()
    assert (load_label_png(tmp_path / "pl_crf" / "b.png") == 10).all()


def test_stage_errors_name_the_missing_input(tmp_path):
    cfg, work, _ = _setup(tmp_path)
    cfg["pseudo_labels"]["weights"] = str(tmp_path / "nope.pth")
    with pytest.raises(CaeeError, match="AffinityNet weights not found"):
        mpl.main(config_from_dict(cfg))
    cfg["pseudo_labels"]["weights"] = ""
    cfg["pseudo_labels"]["cam_dir"] = str(tmp_path / "no_cams")
    with pytest.raises(CaeeError, match="CAM folder .* does not exist"):
        mpl.main(config_from_dict(cfg))
