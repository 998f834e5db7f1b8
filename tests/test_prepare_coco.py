"""tools/prepare_coco.py on a small fake COCO tree. pycocotools is replaced by a stand-in that reads
the same annotation file and decodes each instance as its bounding box, so the masks are known
exactly by hand and the test runs without the package (the real package is exercised by
tests/test_data.py when it is installed)."""
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caee.core.config import DataConfig
from caee.data import load_split
from caee.data.classes import COCO_ID_TO_LABEL
from caee.core.io import load_label_png

REPO = Path(__file__).resolve().parents[1]


class _FakeCOCO:
    """The part of ``pycocotools.coco.COCO`` the tool uses; masks = filled bounding boxes."""

    def __init__(self, path: str):
        data = json.loads(Path(path).read_text())
        self.imgs = {im["id"]: im for im in data["images"]}
        self.anns = {a["id"]: a for a in data["annotations"]}

    def getAnnIds(self, imgIds, iscrowd=None):
        return [i for i, a in sorted(self.anns.items()) if a["image_id"] == imgIds]

    def loadAnns(self, ids):
        return [self.anns[i] for i in ids]

    def annToMask(self, ann):
        im = self.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        mask = np.zeros((im["height"], im["width"]), np.uint8)
        mask[y:y + h, x:x + w] = 1
        return mask


@pytest.fixture
def tool(monkeypatch):
    pkg = types.ModuleType("pycocotools")
    mod = types.ModuleType("pycocotools.coco")
    mod.COCO = _FakeCOCO
    pkg.coco = mod
    monkeypatch.setitem(sys.modules, "pycocotools", pkg)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", mod)
    spec = importlib.util.spec_from_file_location("prepare_coco", REPO / "tools" / "prepare_coco.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "prepare_coco", module)
    spec.loader.exec_module(module)
    return module


def _ann(i, image_id, cat, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "iscrowd": crowd, "bbox": bbox,
            "area": float(bbox[2] * bbox[3])}


def _write_coco(root: Path) -> dict[str, str]:
    """train: 1 = table (67) + cup (47) on it + a crowd of persons (1) at the right; 2 = only a crowd;
    3 = no annotation. val: 4 = toothbrush (90) and dog (18)."""
    names = {}
    splits = {"train": [(1, 12, 16), (2, 10, 10), (3, 8, 9)], "val": [(4, 10, 12)]}
    anns = {"train": [_ann(10, 1, 47, [4, 3, 3, 2]), _ann(11, 1, 67, [1, 1, 10, 8]), _ann(12, 1, 1, [9, 0, 7, 12], 1),
                      _ann(13, 2, 1, [0, 0, 5, 5], 1)],
            "val": [_ann(20, 4, 90, [0, 0, 4, 4]), _ann(21, 4, 18, [6, 5, 6, 5])]}
    (root / "annotations").mkdir(parents=True)
    for split, images in splits.items():
        (root / f"{split}2014").mkdir()
        infos = []
        for image_id, h, w in images:
            name = f"COCO_{split}2014_{image_id:012d}"
            names[image_id] = name
            Image.fromarray(np.full((h, w, 3), 40 * image_id, np.uint8)).save(root / f"{split}2014" / f"{name}.jpg")
            infos.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        cats = [{"id": c, "name": str(c)} for c in (1, 18, 47, 67, 90)]
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": infos, "annotations": anns[split], "categories": cats}))
    return names


def _expected_masks() -> dict[int, np.ndarray]:
    table, cup, dog, brush = (COCO_ID_TO_LABEL[c] for c in (67, 47, 18, 90))
    m1 = np.zeros((12, 16), np.uint8)
    m1[0:12, 9:16] = 255           # crowd first ...
    m1[1:9, 1:11] = table          # ... then the larger instance over it ...
    m1[3:5, 4:7] = cup             # ... then the smaller one on top
    m2 = np.zeros((10, 10), np.uint8)
    m2[0:5, 0:5] = 255
    m4 = np.zeros((10, 12), np.uint8)
    m4[0:4, 0:4] = brush
    m4[5:10, 6:12] = dog
    return {1: m1, 2: m2, 3: np.zeros((8, 9), np.uint8), 4: m4}


def test_prepare_coco_masks_splits_labels_and_links(tool, tmp_path):
    coco, out = tmp_path / "coco", tmp_path / "out"
    names = _write_coco(coco)
    assert tool.main(["--coco", str(coco), "--out", str(out), "--workers", "1"]) == 0
    split_dir = out / "ImageSets" / "Segmentation"
    assert (split_dir / "train.txt").read_text().split() == [names[1]]   # 2 (crowd only) and 3 left out
    assert (split_dir / "val.txt").read_text().split() == [names[4]]
    want = _expected_masks()
    for i in (1, 4):
        np.testing.assert_array_equal(load_label_png(out / "SegmentationClass" / f"{names[i]}.png"), want[i])
        link = out / "JPEGImages" / f"{names[i]}.jpg"
        assert link.is_symlink() and link.resolve() == (coco / ("train2014" if i == 1 else "val2014")
                                                        / f"{names[i]}.jpg").resolve()
    cfg = DataConfig(dataset="coco", root=str(out), mask_dir="SegmentationClass")
    for split, i, classes in (("train", 1, (47, 67)), ("val", 4, (18, 90))):
        idx = load_split(cfg, split)
        assert idx.ids == [names[i]]
        assert np.flatnonzero(idx.labels[0]).tolist() == sorted(COCO_ID_TO_LABEL[c] - 1 for c in classes)


def test_prepare_coco_keep_empty_in_a_pool(tool, tmp_path):
    coco, out = tmp_path / "coco", tmp_path / "out"
    names = _write_coco(coco)
    assert tool.main(["--coco", str(coco), "--out", str(out), "--splits", "train", "--workers", "2",
                      "--keep-empty", "--no-links"]) == 0
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == [names[1], names[2], names[3]]
    want = _expected_masks()
    for i in (1, 2, 3):
        np.testing.assert_array_equal(load_label_png(out / "SegmentationClass" / f"{names[i]}.png"), want[i])
    assert not (out / "JPEGImages").exists()


def test_prepare_coco_missing_annotations_exit_2(tool, tmp_path, capsys):
    (tmp_path / "coco").mkdir()
    assert tool.main(["--coco", str(tmp_path / "coco"), "--out", str(tmp_path / "out"), "--splits", "val"]) == 2
    assert "instances_val2014.json" in capsys.readouterr().err
