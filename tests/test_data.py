import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from caee.core.config import DataConfig, TrainConfig
from caee.data import (COCO_CATEGORY_IDS, COCO_CLASSES, COCO_ID_TO_LABEL, VOC_CLASSES, ClassificationDataset,
                       InferenceDataset, SegmentationDataset, build_train_transform, collate_list,
                       dataset_class_names, ensure_dataset, load_split, normalize_image)
from caee.data import splits as splits_mod
from caee.data.custom import read_labels_csv
from writers import write_labels_csv
from caee.core.errors import CaeeError
from caee.core.io import load_image, load_label_png, save_label_png

REPO = Path(__file__).resolve().parents[1]


def _voc(root, **kw) -> DataConfig:
    return DataConfig(dataset="voc", root=str(root), **kw)


def _multi_hot(classes, c=20):
    v = np.zeros(c, np.float32)
    v[[k - 1 for k in classes]] = 1
    return v


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # worker processes find its functions by module name
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- classes


def test_class_lists():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    assert COCO_CATEGORY_IDS[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert COCO_ID_TO_LABEL[1] == 1 and COCO_ID_TO_LABEL[13] == 12 and COCO_ID_TO_LABEL[90] == 80
    assert COCO_CLASSES[COCO_ID_TO_LABEL[44] - 1] == "bottle" and COCO_CLASSES[COCO_ID_TO_LABEL[67] - 1] == "dining table"
    assert sorted(COCO_ID_TO_LABEL.values()) == list(range(1, 81))
    assert dataset_class_names(DataConfig(dataset="coco")) == COCO_CLASSES
    assert dataset_class_names(DataConfig(dataset="voc")) == VOC_CLASSES


# ---------------------------------------------------------------- load_split on VOC


def test_load_split_voc(fake_voc, fake_voc_labels):
    idx = load_split(_voc(fake_voc), "train")
    assert idx.ids == ["2007_000001", "2007_000002", "2007_000003"]
    assert idx.labels.dtype == np.float32 and idx.labels.shape == (3, 20)
    for i, image_id in enumerate(idx.ids):
        assert np.array_equal(idx.labels[i], _multi_hot(fake_voc_labels[image_id]))
    assert idx.labels[1].sum() == 2 and idx.labels[2].sum() == 0
    assert idx.image_path(0) == fake_voc / "JPEGImages" / "2007_000001.jpg"
    assert idx.mask_path(1) == fake_voc / "SegmentationClassAug" / "2007_000002.png"
    assert idx.eval_mask_path(2) == fake_voc / "SegmentationClass" / "2007_000003.png"
    assert idx.class_names == VOC_CLASSES and idx.num_classes == 20 and len(idx) == 3
    sub = idx.subset([2, 0])
    assert sub.ids == ["2007_000003", "2007_000001"] and np.array_equal(sub.labels[1], idx.labels[0])


def test_train_aug_sbd_only_image(fake_voc, fake_voc_labels):
    idx = load_split(_voc(fake_voc), "train_aug")
    i = idx.ids.index("2009_000006")
    assert np.array_equal(idx.labels[i], _multi_hot([9]))
    assert idx.mask_path(i).is_file() and not idx.eval_mask_path(i).exists()


def test_labels_cache_written_and_used(fake_voc, fake_voc_labels):
    load_split(_voc(fake_voc), "train")
    with np.load(fake_voc / "cls_labels.npz", allow_pickle=False) as z:
        ids, labels = list(z["ids"]), z["labels"]
    assert labels.dtype == np.uint8 and labels.shape == (3, 20)
    assert np.array_equal(labels[ids.index("2007_000002")], _multi_hot([12, 15]).astype(np.uint8))
    load_split(_voc(fake_voc), "val")  # merged into the same file
    with np.load(fake_voc / "cls_labels.npz", allow_pickle=False) as z:
        assert len(z["ids"]) == 5
    # labels now come from the cache: the masks are no longer read
    for d in ("SegmentationClassAug", "SegmentationClass"):
        (fake_voc / d / "2007_000001.png").unlink()
    idx = load_split(_voc(fake_voc), "train")
    assert np.array_equal(idx.labels[0], _multi_hot([1]))


def test_labels_cache_from_other_masks_is_not_reused(fake_voc):
    """Another data.mask_dir under the same root: the cached labels came from other masks, so
    they are derived again (and the cache records the new source)."""
    load_split(_voc(fake_voc), "train")
    other = fake_voc / "OtherMasks"
    other.mkdir()
    for image_id in ("2007_000001", "2007_000002", "2007_000003"):
        width, height = Image.open(fake_voc / "JPEGImages" / f"{image_id}.jpg").size  # masks are image-sized
        save_label_png(other / f"{image_id}.png", np.full((height, width), 5, np.uint8))  # every image: class 5
    idx = load_split(_voc(fake_voc, mask_dir="OtherMasks"), "train")
    assert all(np.array_equal(row, _multi_hot([5])) for row in idx.labels)
    with np.load(fake_voc / "cls_labels.npz", allow_pickle=False) as z:
        assert str(z["source"]) == f"masks:{other.resolve()},{(fake_voc / 'SegmentationClass').resolve()}"
    assert np.array_equal(load_split(_voc(fake_voc), "train").labels[1], _multi_hot([12, 15]))  # and back


def test_labels_cache_falls_back_to_user_cache(fake_voc, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real = splits_mod.save_labels_cache

    def read_only_root(path, ids, labels, source=""):
        if Path(path).parent == fake_voc:
            raise PermissionError("read-only")
        real(path, ids, labels, source)

    monkeypatch.setattr(splits_mod, "save_labels_cache", read_only_root)
    load_split(_voc(fake_voc), "train")
    assert not (fake_voc / "cls_labels.npz").exists()
    cached = list((tmp_path / "home" / ".cache" / "caee").glob("cls_labels_*.npz"))
    assert len(cached) == 1
    (fake_voc / "SegmentationClassAug" / "2007_000002.png").unlink()
    (fake_voc / "SegmentationClass" / "2007_000002.png").unlink()
    assert load_split(_voc(fake_voc), "train").labels[1].sum() == 2  # served from the user cache


def test_psa_style_split_lines(fake_voc):
    (fake_voc / "psa.txt").write_text("/JPEGImages/2008_000004.jpg /SegmentationClassAug/2008_000004.png\n\n"
                                      "# comment\n2008_000005\n")
    idx = load_split(_voc(fake_voc), "psa.txt")
    assert idx.ids == ["2008_000004", "2008_000005"]
    assert np.array_equal(idx.labels[1], _multi_hot([3, 20]))


def test_mask_dir_fallback_to_ground_truth(fake_voc, caplog):
    idx = load_split(_voc(fake_voc, mask_dir="NoSuchDir"), "val")
    assert idx.mask_path(0) == fake_voc / "SegmentationClass" / "2008_000004.png"
    assert "NoSuchDir" in caplog.text


# ---------------------------------------------------------------- bad inputs


def test_missing_image(fake_voc):
    (fake_voc / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(CaeeError, match="2007_000002") as e:
        load_split(_voc(fake_voc), "train")
    assert "1 of 3" in str(e.value) and "train.txt" in str(e.value)


def test_missing_mask(fake_voc):
    (fake_voc / "SegmentationClassAug" / "2008_000005.png").unlink()
    (fake_voc / "SegmentationClass" / "2008_000005.png").unlink()
    with pytest.raises(CaeeError, match=r"mask not found: .*2008_000005\.png"):
        load_split(_voc(fake_voc), "val")


def test_bad_mask_value(fake_voc):
    bad = np.zeros((40, 32), np.uint8)
    bad[3, 3] = 21
    save_label_png(fake_voc / "SegmentationClassAug" / "2008_000004.png", bad)
    with pytest.raises(CaeeError, match=r"2008_000004\.png: label values \[21\] outside 0\.\.20"):
        load_split(_voc(fake_voc), "val")


def test_missing_split_file(fake_voc):
    with pytest.raises(CaeeError, match=r"split list not found: .*ImageSets/Segmentation/nope\.txt"):
        load_split(_voc(fake_voc), "nope")


def test_labels_file_wrong_class_count(fake_voc):
    splits_mod.save_labels_cache(fake_voc / "cls_labels.npz", ["2007_000001"], np.ones((1, 5), np.uint8))
    with pytest.raises(CaeeError, match=r"cls_labels\.npz: image labels have shape \(1, 5\) but the dataset has 20"):
        load_split(_voc(fake_voc), "train")


def test_corrupt_labels_file(fake_voc):
    (fake_voc / "cls_labels.npz").write_bytes(b"not a zip")
    with pytest.raises(CaeeError, match=r"cls_labels\.npz: unreadable"):
        load_split(_voc(fake_voc), "train")


def test_missing_root_and_image_dir(tmp_path, fake_voc):
    with pytest.raises(CaeeError, match="data.root"):
        ensure_dataset(_voc(tmp_path / "nowhere"))
    ensure_dataset(_voc(fake_voc))  # exists: fine
    with pytest.raises(CaeeError, match="data.root"):
        load_split(_voc(tmp_path / "nowhere"), "train")
    with pytest.raises(CaeeError, match="image folder .*Imgs does not exist"):
        load_split(_voc(fake_voc, image_dir="Imgs"), "train")


# ---------------------------------------------------------------- torch datasets


def test_classification_dataset(fake_voc):
    idx = load_split(_voc(fake_voc), "train")
    ds = ClassificationDataset(idx)
    item = ds[1]
    assert set(item) == {"image", "label", "idx"} and item["idx"] == 1
    assert type(item["image"]) is torch.Tensor
    assert torch.allclose(item["image"], normalize_image(load_image(idx.image_path(1))), atol=1e-6)
    assert torch.equal(item["label"], torch.from_numpy(_multi_hot([12, 15])))
    torch.manual_seed(0)
    cfg = TrainConfig(crop_size=24, resize_long=[20, 40])
    batch = next(iter(DataLoader(ClassificationDataset(idx, build_train_transform(cfg)), batch_size=3)))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["label"].shape == (3, 20)
    assert batch["idx"].tolist() == [0, 1, 2]


def test_inference_dataset_keeps_sizes(fake_voc):
    idx = load_split(_voc(fake_voc), "val")
    batch = next(iter(DataLoader(InferenceDataset(idx), batch_size=2, collate_fn=collate_list)))
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["image"].shape == (40, 32, 3) and batch[1]["image"].shape == (30, 44, 3)
    assert batch[0]["image"].dtype == torch.uint8 and batch[1]["id"] == "2008_000005" and batch[1]["idx"] == 1
    assert torch.equal(batch[1]["label"], torch.from_numpy(_multi_hot([3, 20])))


def test_segmentation_dataset_ground_truth(fake_voc):
    idx = load_split(_voc(fake_voc), "train")
    ds = SegmentationDataset(idx, fake_voc / "SegmentationClass")
    item = ds[0]
    gt = torch.from_numpy(load_label_png(fake_voc / "SegmentationClass" / "2007_000001.png")).long()
    assert item["mask"].dtype == torch.long and torch.equal(item["mask"], gt)
    assert item["image"].shape == (3, 40, 48) and item["id"] == "2007_000001"
    assert torch.equal(SegmentationDataset(idx)[0]["mask"], gt)  # None -> the training masks


def test_segmentation_dataset_la_ha_joint(fake_voc, tmp_path):
    idx = load_split(_voc(fake_voc), "train")
    la, ha = tmp_path / "la", tmp_path / "ha"
    for i, image_id in enumerate(idx.ids):
        h, w = load_image(idx.image_path(i)).shape[:2]
        cols = np.tile(np.arange(w, dtype=np.uint8) % 20, (h, 1))
        save_label_png(la / f"{image_id}.png", cols)
        save_label_png(ha / f"{image_id}.png", np.where(cols > 10, 255, cols).astype(np.uint8))
    cfg = TrainConfig(crop_size=32, resize_long=[30, 60])
    ds = SegmentationDataset(idx, {"la": la, "ha": ha}, build_train_transform(cfg))
    for seed in range(4):
        torch.manual_seed(seed)
        item = ds[seed % 3]
        assert set(item) == {"image", "la", "ha", "label", "idx", "id"}
        assert item["la"].shape == item["ha"].shape == (32, 32) and item["la"].dtype == torch.long
        same = (item["la"] <= 10) & (item["la"] != 255)
        assert torch.equal(item["ha"][same], item["la"][same])  # both maps moved together
        assert torch.all(item["ha"][(item["la"] > 10) & (item["la"] != 255)] == 255)


def test_segmentation_dataset_bad_labels(fake_voc, tmp_path):
    idx = load_split(_voc(fake_voc), "val")
    bad = tmp_path / "bad"
    save_label_png(bad / "2008_000004.png", np.full((40, 32), 30, np.uint8))
    save_label_png(bad / "2008_000005.png", np.zeros((10, 10), np.uint8))
    ds = SegmentationDataset(idx, bad)
    with pytest.raises(CaeeError, match=r"2008_000004\.png: label values \[30\]"):
        ds[0]
    with pytest.raises(CaeeError, match=r"2008_000005\.png: label map is 10x10 but its image .* is 44x30"):
        ds[1]
    with pytest.raises(CaeeError, match="does not exist"):
        SegmentationDataset(idx, tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaeeError, match=r"label file not found: .*2008_000004\.png"):
        SegmentationDataset(idx, empty)[0]


# ---------------------------------------------------------------- custom datasets


def _custom_root(tmp_path) -> Path:
    """imgs/{a1.jpg, b2.jpg, c3.png}, a train list (a1, c3) and labels.csv with an extra row."""
    root = tmp_path / "custom"
    (root / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = ["a1", "b2", "c3"]
    for image_id, ext in zip(ids, [".jpg", ".jpg", ".png"]):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "imgs" / f"{image_id}{ext}")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a1\nc3\n")
    write_labels_csv(root / "labels.csv", ["cat", "dog", "car"], ids + ["extra"],
                     np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]]))
    return root


def test_custom_csv_dataset(tmp_path):
    root = _custom_root(tmp_path)
    cfg = DataConfig(dataset="custom", root=str(root), image_dir="imgs", labels_csv="labels.csv")
    assert dataset_class_names(cfg) == ["cat", "dog", "car"]
    ensure_dataset(cfg)
    idx = load_split(cfg, "train")
    assert idx.ids == ["a1", "c3"] and idx.image_path(1).name == "c3.png"
    assert np.array_equal(idx.labels, np.array([[1, 0, 0], [0, 0, 1]], np.float32))
    assert idx.mask_path(0) is None and idx.eval_mask_path(0) is None
    item = ClassificationDataset(idx)[1]
    assert item["image"].shape == (3, 12, 10) and item["label"].tolist() == [0, 0, 1]
    assert not (root / "cls_labels.npz").exists()


def test_custom_csv_errors(tmp_path):
    root = _custom_root(tmp_path)
    cfg = DataConfig(dataset="custom", root=str(root), image_dir="imgs", labels_csv="labels.csv")
    csv = root / "labels.csv"
    names, table = read_labels_csv(csv)
    assert names == ["cat", "dog", "car"] and table["b2"].tolist() == [0, 1, 1]
    csv.write_text("image_id,cat,dog\na1,1,2\n")
    with pytest.raises(CaeeError, match=r"labels\.csv line 2: label entries must be 0 or 1"):
        load_split(cfg, "train")
    csv.write_text("image_id,cat,dog\na1,1,0\n")
    with pytest.raises(CaeeError, match=r"1 images of the split have no row in .*labels\.csv \(first: c3\)"):
        load_split(cfg, "train")
    csv.write_text("id,cat\na1,1\n")
    with pytest.raises(CaeeError, match="header must be image_id"):
        load_split(cfg, "train")
    csv.write_text("image_id,cat\na1,1,0\n")
    with pytest.raises(CaeeError, match="line 2: 3 fields, expected 2"):
        load_split(cfg, "train")
    with pytest.raises(CaeeError, match="data.labels_csv"):
        dataset_class_names(DataConfig(dataset="custom", root=str(root)))


def test_labels_csv_with_wrong_class_count_for_voc(fake_voc):
    write_labels_csv(fake_voc / "labels.csv", ["a", "b"], ["2007_000001"], np.array([[1, 0]]))
    with pytest.raises(CaeeError, match=r"labels\.csv has 2 class columns but dataset 'voc' has 20"):
        load_split(_voc(fake_voc, labels_csv="labels.csv"), "train")


# ---------------------------------------------------------------- tools/prepare_voc.py


def _fake_sbd(tmp_path, voc_root) -> Path:
    """SBD tree: dataset/cls/<id>.mat for the fake VOC images plus one SBD-only image."""
    sbd = tmp_path / "benchmark_RELEASE"
    (sbd / "dataset" / "cls").mkdir(parents=True)
    for image_id, classes in (("2007_000002", [4]), ("2008_000004", [7]), ("2009_000006", [9]),
                              ("2010_000007", [2, 5])):
        h, w = 34, 38
        seg = np.zeros((h, w), np.uint8)
        for k, c in enumerate(classes):
            seg[4 + 10 * k:12 + 10 * k, 5:30] = c
        scipy.io.savemat(sbd / "dataset" / "cls" / f"{image_id}.mat",
                         {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1,), object),
                                    "CategoriesPresent": np.array(classes, np.uint8)}})
        if not (voc_root / "JPEGImages" / f"{image_id}.jpg").exists():
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(voc_root / "JPEGImages" / f"{image_id}.jpg")
    (sbd / "dataset" / "train.txt").write_text("2007_000002\n2009_000006\n")
    (sbd / "dataset" / "val.txt").write_text("2008_000004\n2010_000007\n")
    return sbd


def test_prepare_voc(fake_voc, tmp_path, caplog):
    tool = _tool("prepare_voc")
    # the SBD-only image must come from SBD: start from a VOC tree without the Aug folder
    for p in (fake_voc / "SegmentationClassAug").iterdir():
        p.unlink()
    (fake_voc / "SegmentationClassAug").rmdir()
    (fake_voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    sbd = _fake_sbd(tmp_path, fake_voc)
    out = tmp_path / "prepared"
    with caplog.at_level(logging.WARNING):
        assert tool.main(["--voc", str(fake_voc), "--sbd", str(sbd), "--out", str(out), "--workers", "1",
                          "--labels", "masks"]) == 0
    assert "train_aug has 5 images, expected 10582" in caplog.text
    aug = (out / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    # VOC train {1,2,3} + SBD train {2,6} + SBD val {4,7} - VOC val {4,5}
    assert aug == ["2007_000001", "2007_000002", "2007_000003", "2009_000006", "2010_000007"]
    # VOC's own mask wins over SBD (SBD says class 4 for 2007_000002)
    voc_mask = load_label_png(fake_voc / "SegmentationClass" / "2007_000002.png")
    assert np.array_equal(load_label_png(out / "SegmentationClassAug" / "2007_000002.png"), voc_mask)
    sbd_mask = load_label_png(out / "SegmentationClassAug" / "2010_000007.png")
    assert set(np.unique(sbd_mask).tolist()) == {0, 2, 5}
    assert (out / "JPEGImages").is_symlink() and (out / "ImageSets" / "Segmentation" / "val.txt").is_file()
    idx = load_split(_voc(out), "train_aug")
    assert np.array_equal(idx.labels[idx.ids.index("2010_000007")], _multi_hot([2, 5]))
    assert np.array_equal(idx.labels[idx.ids.index("2007_000002")], _multi_hot([12, 15]))
    with np.load(out / "cls_labels.npz", allow_pickle=False) as z:
        assert sorted(z["ids"].tolist()) == sorted(set(aug) | {"2008_000004", "2008_000005"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # idempotent; the size check can be switched off
        assert tool.main(["--voc", str(fake_voc), "--sbd", str(sbd), "--out", str(out), "--workers", "2",
                          "--expected-count", "0", "--overwrite", "--labels", "masks"]) == 0
    assert "expected" not in caplog.text


def test_prepare_voc_errors(fake_voc, tmp_path, capsys):
    tool = _tool("prepare_voc")
    assert tool.main(["--voc", str(fake_voc), "--sbd", str(tmp_path / "nosbd"), "--workers", "1"]) == 2
    assert "SBD dataset/cls folder" in capsys.readouterr().err
    sbd = _fake_sbd(tmp_path, fake_voc)
    (sbd / "dataset" / "train.txt").write_text("2007_000002\n2011_999999\n")
    assert tool.main(["--voc", str(fake_voc), "--sbd", str(sbd), "--out", str(tmp_path / "o"), "--workers", "1",
                      "--labels", "masks"]) == 2
    assert "2011_999999" in capsys.readouterr().err
    scipy.io.savemat(sbd / "dataset" / "cls" / "2011_999999.mat", {"GTcls": {"Segmentation": np.full((4, 4), 40, np.uint8)}})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(fake_voc / "JPEGImages" / "2011_999999.jpg")
    assert tool.main(["--voc", str(fake_voc), "--sbd", str(sbd), "--out", str(tmp_path / "o"), "--workers", "1",
                      "--labels", "masks"]) == 2
    assert "2011_999999.mat: label values [40]" in capsys.readouterr().err


# ---------------------------------------------------------------- tools/prepare_coco.py


def test_coco_mask_painting():
    tool = _tool("prepare_coco")
    big = np.zeros((6, 8), bool)
    big[:, :6] = True
    small = np.zeros((6, 8), bool)
    small[2:4, 2:4] = True
    crowd = np.zeros((6, 8), bool)
    crowd[:, 5:] = True
    anns = [  # the small cup is listed first but painted last (smaller area)
        {"id": 1, "category_id": 47, "area": 4, "iscrowd": 0, "m": small},
        {"id": 2, "category_id": 67, "area": 36, "iscrowd": 0, "m": big},
        {"id": 3, "category_id": 1, "area": 18, "iscrowd": 1, "m": crowd},
    ]
    mask = tool.paint_semantic_mask(6, 8, anns, lambda a: a["m"])
    cup, table = COCO_ID_TO_LABEL[47], COCO_ID_TO_LABEL[67]
    assert (cup, table) == (42, 61)
    want = np.zeros((6, 8), np.uint8)
    want[:, 6:] = 255          # crowd not covered by an instance
    want[:, :6] = table
    want[2:4, 2:4] = cup
    assert np.array_equal(mask, want)
    with pytest.raises(CaeeError, match="unknown COCO category id 12"):
        tool.paint_semantic_mask(6, 8, [{"id": 9, "category_id": 12, "area": 1, "m": small}], lambda a: a["m"])


def test_prepare_coco_with_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    import json

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2014").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(coco / "train2014" / "COCO_train2014_000000000001.jpg")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(coco / "train2014" / "COCO_train2014_000000000002.jpg")
    data = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 10, "width": 12},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 10, "width": 12}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 16.0,
                         "bbox": [2, 2, 4, 4], "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}],
        "categories": [{"id": 90, "name": "toothbrush"}],
    }
    (coco / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    tool = _tool("prepare_coco")
    out = tmp_path / "out"
    assert tool.main(["--coco", str(coco), "--out", str(out), "--splits", "train", "--workers", "1"]) == 0
    assert (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == ["COCO_train2014_000000000001"]
    mask = load_label_png(out / "SegmentationClass" / "COCO_train2014_000000000001.png")
    assert set(np.unique(mask).tolist()) == {0, 80}
    idx = load_split(DataConfig(dataset="coco", root=str(out), mask_dir="SegmentationClass"), "train")
    assert idx.labels[0, 79] == 1 and idx.labels.sum() == 1
