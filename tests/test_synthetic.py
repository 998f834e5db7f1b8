import colorsys
import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caee.core.config import DataConfig, SyntheticConfig
from caee.data import dataset_class_names, ensure_dataset, load_split
from caee.data.synthetic import MARKER, generate_synthetic, render_sample
from caee.core.errors import CaeeError
from caee.core.io import load_image, load_label_png

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(num_train=24, num_val=8)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", SMALL, workers=1)


def _objects(root: Path) -> list[dict]:
    with open(root / "objects.csv") as f:
        return list(csv.DictReader(f))


def test_layout(small_root):
    for rel in ("JPEGImages/train_00000.jpg", "JPEGImages/val_00007.jpg", "SegmentationClass/val_00007.png",
                "SegmentationClassAug/train_00023.png", "ImageSets/Segmentation/train.txt", "class_names.txt",
                "cls_labels.npz", "objects.csv", "preview.png", MARKER):
        assert (small_root / rel).exists(), rel
    train = (small_root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert train == [f"train_{i:05d}" for i in range(24)]
    assert load_image(small_root / "JPEGImages/train_00003.jpg").shape == (96, 96, 3)
    assert load_image(small_root / "preview.png").shape == (2 * 2 * 96, 8 * 2 * 96, 3)
    assert not list(small_root.parent.glob(".data.tmp-*"))  # temp folder renamed away


def test_deterministic_bytes(small_root, tmp_path):
    again = generate_synthetic(tmp_path / "again", SMALL, workers=2)
    for rel in ("JPEGImages/train_00005.jpg", "JPEGImages/val_00002.jpg", "SegmentationClass/train_00011.png",
                "cls_labels.npz", "objects.csv", "preview.png", MARKER):
        assert (small_root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate_synthetic(tmp_path / "other", dataclasses.replace(SMALL, seed=1), workers=1)
    assert (small_root / "JPEGImages/train_00005.jpg").read_bytes() != (other / "JPEGImages/train_00005.jpg").read_bytes()
    assert (small_root / "objects.csv").read_bytes() != (other / "objects.csv").read_bytes()


def test_masks_values_and_labels(small_root):
    C = SMALL.num_classes
    idx_train = load_split(DataConfig(dataset="synthetic", root=str(small_root), synthetic=SMALL), "train")
    objs = _objects(small_root)
    for i, image_id in enumerate(idx_train.ids):
        mask = load_label_png(idx_train.mask_path(i))
        assert mask.shape == (96, 96)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(C + 1)) | {255}
        want = np.zeros(C, np.float32)
        want[[v - 1 for v in values if 1 <= v <= C]] = 1
        assert np.array_equal(idx_train.labels[i], want)  # cls_labels.npz == classes in the mask
        # ... == classes of the objects with enough visible pixels
        mine = [o for o in objs if o["image_id"] == image_id]
        assert 1 <= len(mine) <= 3
        big = {int(o["class"]) for o in mine if int(o["visible_px"]) >= SMALL.min_visible_px}
        assert {v for v in values if 1 <= v <= C} == big
        for o in mine:  # each visible object's pixel count matches the mask
            if int(o["visible_px"]) >= SMALL.min_visible_px:
                assert (mask == int(o["class"])).sum() >= int(o["visible_px"])


def test_emblem_colour(small_root):
    C = SMALL.num_classes
    checked = hidden = 0
    for o in _objects(small_root):
        if int(o["part_hidden"]):
            hidden += 1
            assert int(o["part_x0"]) == -1 and int(o["part_visible_px"]) == 0
            continue
        if int(o["part_visible_px"]) < SMALL.part_size ** 2:
            continue  # partly covered by a later object
        x0, y0, p = int(o["part_x0"]), int(o["part_y0"]), SMALL.part_size
        img = load_image(small_root / "JPEGImages" / f"{o['image_id']}.jpg").astype(np.float32)
        patch = img[y0:y0 + p, x0:x0 + p].reshape(-1, 3).mean(0)
        want = 255 * np.array(colorsys.hsv_to_rgb((int(o["class"]) - 1) / C, 1.0, 1.0))
        assert np.abs(patch - want).max() < 12, (o, patch, want)
        # the emblem lies on its object, which is labelled there
        mask = load_label_png(small_root / "SegmentationClass" / f"{o['image_id']}.png")
        assert np.all(mask[y0:y0 + p, x0:x0 + p] == int(o["class"]))
        checked += 1
    assert checked >= 20 and hidden >= 3


def test_body_stripes_follow_class_angle():
    """Class 1 has angle 0: without jitter and noise its stripes are vertical (constant down columns)."""
    cfg = dataclasses.replace(SMALL, num_classes=2, objects_per_image=[1, 1], stripe_jitter_deg=0.0,
                              noise_std=0.0, part_hidden_prob=1.0)
    for seed in range(30):
        image, mask, objs = render_sample(np.random.default_rng(seed), cfg)
        if objs[0]["cls"] != 1:
            continue
        ys, xs = np.nonzero(mask == 1)
        cols = {}
        for y, x in zip(ys, xs):
            cols.setdefault(x, set()).add(tuple(image[y, x]))
        assert all(len(v) == 1 for v in cols.values())  # constant along each column
        lum = np.array([np.mean(next(iter(cols[x]))) for x in sorted(cols)])
        assert lum.max() - lum.min() > 40  # but striped across
        # class 2 (angle 90 deg): constant along rows
        break
    else:
        pytest.fail("no class-1 object drawn")


def test_stripe_fade_weakens_the_stripes_towards_the_outline_only():
    """stripe_fade f: the stripes' relative amplitude is (1 - f * rho) at relative radius rho, so
    with f = 1 the rim is plain and the centre keeps its full stripes; f = 0 is the old image."""
    base = dataclasses.replace(SMALL, objects_per_image=[1, 1], noise_std=0.0, part_hidden_prob=1.0,
                               body_saturation=0.0, object_radius=[20, 20], object_aspect=[1.0, 1.0], wobble=0.0)
    faded = dataclasses.replace(base, stripe_fade=1.0)
    img0, mask0, objs = render_sample(np.random.default_rng(5), base)
    img1, mask1, _ = render_sample(np.random.default_rng(5), faded)
    assert np.array_equal(mask0, mask1)  # the same geometry and random draws
    o = objs[0]
    yy, xx = np.mgrid[:base.image_size, :base.image_size] + 0.5
    rho = np.hypot(xx - o["cx"], yy - o["cy"]) / o["radius"]
    inside = mask0 == o["cls"]

    def spread(img, lo, hi):  # luminance range of the body pixels in a ring of relative radius
        ring = inside & (rho >= lo) & (rho < hi)
        lum = img[ring].astype(float).mean(1)
        return lum.max() - lum.min()

    assert spread(img1, 0.0, 0.25) > 0.75 * spread(img0, 0.0, 0.25)      # centre: nearly full stripes
    assert spread(img1, 0.9, 0.98) < 0.2 * spread(img0, 0.9, 0.98)        # rim: almost plain
    assert spread(img0, 0.9, 0.98) > 0.8 * spread(img0, 0.0, 0.25)        # without fade: uniform stripes
    assert np.array_equal(render_sample(np.random.default_rng(5), dataclasses.replace(base, stripe_fade=0.0))[0], img0)


def test_class_angles_full_pairs_mirror_images_and_mirror_free_does_not():
    """A horizontal flip maps a stripe angle t to 180 - t: with "full" classes c and C - c swap,
    with "mirror_free" every class keeps an angle no other class has."""
    from caee.data.synthetic import class_angle

    def folded(c, mode):  # the angle as a network trained with flips sees it
        t = np.rad2deg(class_angle(c, 5, mode)) % 180
        return round(min(t, 180 - t), 6)

    assert [np.rad2deg(class_angle(c, 5)) for c in range(5)] == pytest.approx([0, 36, 72, 108, 144])
    assert folded(1, "full") == folded(4, "full") and folded(2, "full") == folded(3, "full")
    assert [np.rad2deg(class_angle(c, 5, "mirror_free")) for c in range(5)] == pytest.approx([0, 22.5, 45, 67.5, 90])
    assert len({folded(c, "mirror_free") for c in range(5)}) == 5


def test_marker_without_a_newer_setting_counts_as_its_default(tmp_path):
    import json

    root = tmp_path / "syn"
    cfg = DataConfig(dataset="synthetic", root=str(root), synthetic=dataclasses.replace(SMALL, num_train=2, num_val=1))
    ensure_dataset(cfg)
    marker = json.loads((root / MARKER).read_text())
    del marker["stripe_angles"]  # data made before the setting existed
    (root / MARKER).write_text(json.dumps(marker))
    ensure_dataset(cfg)  # accepted: the old data followed the default
    other = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, stripe_angles="mirror_free"))
    with pytest.raises(CaeeError, match="stripe_angles"):
        ensure_dataset(other)


def test_tint_is_weak_and_part_saturated():
    cfg = dataclasses.replace(SMALL, noise_std=0.0, part_hidden_prob=0.0, objects_per_image=[1, 1])
    image, mask, objs = render_sample(np.random.default_rng(3), cfg)
    o = objs[0]
    body = image[mask == o["cls"]].astype(float) / 255
    sat = (body.max(1) - body.min(1)) / np.maximum(body.max(1), 1e-6)
    part = image[o["part_y0"]:o["part_y0"] + 6, o["part_x0"]:o["part_x0"] + 6].reshape(-1, 3).astype(float) / 255
    part_sat = (part.max(1) - part.min(1)) / part.max(1)
    assert np.median(sat) < 0.25 and np.all(part_sat > 0.95)


def test_ensure_dataset_generates_once_and_checks_settings(tmp_path):
    root = tmp_path / "syn"
    cfg = DataConfig(dataset="synthetic", root=str(root), synthetic=dataclasses.replace(SMALL, num_train=6, num_val=2))
    assert dataset_class_names(cfg) == ["class1", "class2", "class3", "class4", "class5"]
    ensure_dataset(cfg)
    marker_time = (root / MARKER).stat().st_mtime_ns
    ensure_dataset(cfg)  # complete: nothing regenerated
    assert (root / MARKER).stat().st_mtime_ns == marker_time
    assert (root / "class_names.txt").read_text().split() == dataset_class_names(cfg)
    idx = load_split(cfg, "val")
    assert idx.ids == ["val_00000", "val_00001"] and idx.labels.shape == (2, 5)
    other = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, seed=7))
    with pytest.raises(CaeeError, match=r"data.root = .*syn holds synthetic data made with other settings \(seed"):
        ensure_dataset(other)


def test_ensure_dataset_refuses_incomplete_folder(tmp_path):
    root = tmp_path / "syn"
    (root / "JPEGImages").mkdir(parents=True)  # e.g. leftovers without the marker
    cfg = DataConfig(dataset="synthetic", root=str(root), synthetic=dataclasses.replace(SMALL, num_train=2, num_val=1))
    with pytest.raises(CaeeError, match="no complete synthetic dataset"):
        ensure_dataset(cfg)
    (root / "JPEGImages").rmdir()  # an empty folder is fine
    ensure_dataset(cfg)
    assert (root / MARKER).is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    from caee.data import synthetic

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_preview", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "syn", dataclasses.replace(SMALL, num_train=2, num_val=1), workers=1)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_ensure_generates_once(tmp_path):
    """Two processes (like torchrun ranks) call ensure_dataset at once: one generates, both succeed."""
    code = (
        "import sys, dataclasses\n"
        "from caee.core.config import DataConfig, SyntheticConfig\n"
        "from caee.data.splits import ensure_dataset\n"
        "from caee.data import synthetic\n"
        "calls = []\n"
        "real = synthetic.generate_synthetic\n"
        "synthetic.generate_synthetic = lambda *a, **k: (calls.append(1), real(*a, **k))[1]\n"
        "ensure_dataset(DataConfig(dataset='synthetic', root=sys.argv[1], "
        "synthetic=SyntheticConfig(num_train=40, num_val=4)))\n"
        "print('GENERATED' if calls else 'REUSED', 'torch' in sys.modules)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "syn")], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs) == ["GENERATED False", "REUSED False"]  # one generation; torch not needed
    assert len((tmp_path / "syn" / "ImageSets/Segmentation/train.txt").read_text().split()) == 40


def test_bad_synthetic_settings(tmp_path):
    with pytest.raises(CaeeError, match="data.synthetic.object_radius"):
        generate_synthetic(tmp_path / "x", dataclasses.replace(SMALL, object_radius=[20, 10]))
    root = generate_synthetic(tmp_path / "y", dataclasses.replace(SMALL, num_train=1, num_val=1), workers=1)
    with pytest.raises(CaeeError, match="already exists"):
        generate_synthetic(root, SMALL)


def test_png_images_and_ignore_band(tmp_path):
    cfg = dataclasses.replace(SMALL, num_train=6, num_val=1, image_format="png", ignore_band=1, noise_std=0.0)
    root = generate_synthetic(tmp_path / "png", cfg, workers=1)
    idx = load_split(DataConfig(dataset="synthetic", root=str(root), synthetic=cfg), "train")
    assert idx.image_path(0).suffix == ".png" and not list((root / "JPEGImages").glob("*.jpg"))
    image, mask, objs = render_sample(np.random.default_rng([cfg.seed, 0, 0]), cfg)
    assert np.array_equal(load_image(idx.image_path(0)), image)  # lossless
    assert np.array_equal(load_label_png(idx.mask_path(0)), mask)
    # a 255 band on every boundary: no class pixel touches another value (4-neighbours)
    for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
        touch = (a != b) & (a != 255) & (b != 255)
        assert not touch.any()
    assert (mask == 255).sum() > 0 and set(np.unique(mask).tolist()) - {0, 255}
