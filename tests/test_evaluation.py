"""mIoU of CAM folders (one-pass threshold sweep) and label folders, with missing-file handling."""
import json

import numpy as np
import pytest
from PIL import Image

from caee.core.config import EvalConfig, load_config
from caee.data import SplitIndex
from caee.core.errors import CaeeError
from caee.engine.scoring import detect_kind, evaluate_cam_dir, evaluate_dir, evaluate_label_dir, format_report
from caee.core.io import save_cam_npz, save_label_png
from caee.core.metrics import cam_to_label, confusion_matrix, iou_from_confusion
from caee.stages import eval_miou


def _index(tmp_path, ids, class_names=("a", "b")):
    return SplitIndex(ids=list(ids), labels=np.zeros((len(ids), len(class_names)), np.float32),
                      class_names=list(class_names), image_paths=[tmp_path / f"{i}.png" for i in ids],
                      eval_mask_dir=tmp_path / "gt", split="train")


@pytest.fixture
def hand_made(tmp_path):
    """Two images, two classes; the expected numbers are worked out in the test below."""
    save_label_png(tmp_path / "gt/i1.png", np.array([[0, 1, 1], [0, 2, 255]], np.uint8))
    save_label_png(tmp_path / "gt/i2.png", np.array([[2, 0]], np.uint8))
    save_cam_npz(tmp_path / "cams/i1.npz", np.array([0, 1]),
                 np.array([[[0.1, 0.8, 0.4], [0.2, 0.1, 0.9]],
                           [[0.0, 0.1, 0.5], [0.3, 0.6, 0.2]]], np.float32))
    save_cam_npz(tmp_path / "cams/i2.npz", np.array([1]), np.array([[[0.5, 0.3]]], np.float32))
    return tmp_path, _index(tmp_path, ["i1", "i2"])


def test_cam_dir_hand_computed(hand_made):
    tmp_path, index = hand_made
    res = evaluate_cam_dir(tmp_path / "cams", index, thresholds=[0.35, 0.7], threshold=0.7, workers=1)
    s = res["summary"]
    # t = 0.35: conf rows (gt) bg [3,0,0], a [0,1,1], b [0,0,2] -> IoU 1, 1/2, 2/3
    assert s["best_threshold"] == 0.35 and s["miou"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert res["best"]["confusion"] == [[3, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert res["best"]["precision"][2] == pytest.approx(2 / 3) and res["best"]["recall"][2] == 1.0
    # t = 0.7: bg [3,0,0], a [1,1,0], b [2,0,0] -> IoU 3/6, 1/2, 0
    assert s["threshold"] == 0.7 and s["miou_at_threshold"] == pytest.approx(1 / 3)
    assert res["fixed"]["confusion"] == [[3, 0, 0], [1, 1, 0], [2, 0, 0]]
    assert [r["threshold"] for r in res["sweep"]] == [0.35, 0.7]
    assert s["num_images"] == s["num_evaluated"] == 2 and s["num_missing"] == 0
    assert res["classes"] == ["background", "a", "b"]


def test_fixed_threshold_is_added_to_the_sweep(hand_made):
    tmp_path, index = hand_made
    res = evaluate_cam_dir(tmp_path / "cams", index, thresholds=[0.35], threshold=0.7, workers=1)
    assert res["summary"]["thresholds"] == [0.35, 0.7]
    assert res["summary"]["miou_at_threshold"] == pytest.approx(1 / 3)


def test_one_pass_sweep_equals_per_threshold(tmp_path):
    rng = np.random.default_rng(0)
    c, ids = 4, [f"im{i}" for i in range(7)]
    data = {}
    for i in ids:
        h, w = rng.integers(5, 12, size=2)
        keys = np.sort(rng.choice(c, size=int(rng.integers(0, 3)), replace=False))
        cams = rng.random((len(keys), h, w)).astype(np.float16)
        gt = rng.choice([0, 1, 2, 3, 4, 255], size=(h, w)).astype(np.uint8)
        save_cam_npz(tmp_path / f"cams/{i}.npz", keys, cams)
        save_label_png(tmp_path / f"gt/{i}.png", gt)
        data[i] = (gt, keys, cams)
    thresholds = [round(0.05 * k, 2) for k in range(1, 20)]
    index = _index(tmp_path, ids, ["a", "b", "c", "d"])
    res = evaluate_cam_dir(tmp_path / "cams", index, thresholds, threshold=0.25, workers=1)
    for entry, t in zip(res["sweep"], thresholds):
        conf = sum(confusion_matrix(gt, cam_to_label(k, cm, t), c) for gt, k, cm in data.values())
        assert entry["threshold"] == t
        assert entry["miou"] == pytest.approx(iou_from_confusion(conf)["miou"], abs=1e-12)
    fixed = sum(confusion_matrix(gt, cam_to_label(k, cm, 0.25), c) for gt, k, cm in data.values())
    assert res["fixed"]["confusion"] == fixed.tolist()
    # a pool of workers gives the same result
    assert evaluate_cam_dir(tmp_path / "cams", index, thresholds, 0.25, workers=3)["sweep"] == res["sweep"]


def test_label_dir_hand_computed_and_unsure_pixels(tmp_path):
    save_label_png(tmp_path / "gt/i1.png", np.array([[0, 1, 1], [0, 2, 255]], np.uint8))
    save_label_png(tmp_path / "gt/i2.png", np.array([[2, 0]], np.uint8))
    save_label_png(tmp_path / "pred/i1.png", np.array([[0, 1, 255], [1, 2, 2]], np.uint8))
    save_label_png(tmp_path / "pred/i2.png", np.array([[2, 2]], np.uint8))
    index = _index(tmp_path, ["i1", "i2"])
    res = evaluate_label_dir(tmp_path / "pred", index, workers=2)
    # 255 in the prediction drops pixel (0,2); conf: bg [1,1,1], a [0,1,0], b [0,0,2]
    assert res["result"]["confusion"] == [[1, 1, 1], [0, 1, 0], [0, 0, 2]]
    assert res["summary"]["miou"] == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3)
    assert res["summary"]["ignored_prediction"] == pytest.approx(1 / 7)
    assert detect_kind(tmp_path / "pred") == "label" and detect_kind(tmp_path / "gt") == "label"
    assert "unsure" in format_report(res)


def test_missing_and_truncated_predictions(hand_made):
    tmp_path, index = hand_made
    data = (tmp_path / "cams/i1.npz").read_bytes()
    (tmp_path / "cams/i1.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaeeError, match="i1"):
        evaluate_cam_dir(tmp_path / "cams", index, [0.35], 0.35, workers=1)
    (tmp_path / "cams/i1.npz").unlink()
    save_cam_npz(tmp_path / "cams/i1.npz", np.array([0]), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(CaeeError, match=r"i1.*2x2.*3x2"):
        evaluate_cam_dir(tmp_path / "cams", index, [0.35], 0.35, workers=1)
    (tmp_path / "cams/i1.npz").write_bytes(data[:100])
    (tmp_path / "cams/i2.npz").unlink()
    with pytest.raises(CaeeError, match="i2"):
        evaluate_cam_dir(tmp_path / "cams", _index(tmp_path, ["i2"]), [0.35], 0.35, workers=1)
    # allow_missing: both left out and counted, also through a worker pool
    save_label_png(tmp_path / "gt/i3.png", np.array([[1, 0]], np.uint8))
    save_cam_npz(tmp_path / "cams/i3.npz", np.array([0]), np.array([[[0.9, 0.1]]], np.float32))
    index3 = _index(tmp_path, ["i1", "i2", "i3"])
    res = evaluate_cam_dir(tmp_path / "cams", index3, [0.35], 0.35, workers=2, allow_missing=True)
    assert res["summary"]["num_missing"] == 2 and res["summary"]["num_evaluated"] == 1
    assert res["skipped"] == {"unreadable": ["i1"], "missing": ["i2"]}
    assert res["best"]["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert "skipped 2 images" in format_report(res)


def test_missing_ground_truth_and_folder(hand_made):
    tmp_path, index = hand_made
    (tmp_path / "gt/i2.png").unlink()
    with pytest.raises(CaeeError, match="ground truth of image i2"):
        evaluate_cam_dir(tmp_path / "cams", index, [0.35], 0.35, workers=1)
    with pytest.raises(CaeeError, match="does not exist"):
        evaluate_cam_dir(tmp_path / "nowhere", index, [0.35], 0.35, workers=1)


def test_evaluate_dir_auto_and_json_has_no_nan(hand_made):
    tmp_path, index = hand_made
    res = evaluate_dir(tmp_path / "cams", index, EvalConfig(thresholds=[0.35, 0.7], threshold=0.7, workers=1))
    assert res["summary"]["kind"] == "cam"
    text = json.dumps(res, allow_nan=False)  # fails on NaN
    assert "NaN" not in text
    report = format_report(res)
    assert "best t=0.35" in report and "fixed t=0.7" in report and "72.2" in report and "33.3" in report


# ---------------------------------------------------------------- the stage


def test_eval_miou_stage(tmp_path):
    """eval_miou.main on a VOC-layout folder: default output path, header info from the folder's record."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    gts = {"x1": np.array([[0, 3, 3, 255]], np.uint8), "x2": np.array([[15, 15, 0, 0]], np.uint8)}
    for i, gt in gts.items():
        Image.fromarray(np.zeros((1, 4, 3), np.uint8)).save(root / f"JPEGImages/{i}.png")
        save_label_png(root / f"SegmentationClass/{i}.png", gt)
    (root / "ImageSets/Segmentation/train.txt").write_text("x1\nx2\n")
    cams = tmp_path / "work/cam_cgnet"
    save_cam_npz(cams / "x1.npz", np.array([2]), np.array([[[0.35, 0.9, 0.4, 0.9]]], np.float32))
    save_cam_npz(cams / "x2.npz", np.array([14]), np.array([[[0.8, 0.6, 0.2, 0.0]]], np.float32))
    from caee.core import records
    records.write(cams, records.new("make_cam", {"cam.scales": [0.5, 1.0], "cam.flip": True, "cam.source": "cgnet"}))
    cfg = load_config(None, [f"work_dir={tmp_path / 'work'}", "device=cpu", "data.dataset=voc",
                             f"data.root={root}", "data.mask_dir=SegmentationClass", "eval.workers=1",
                             "eval.thresholds=[0.3, 0.5]", "eval.threshold=0.5"])
    res = eval_miou.main(cfg)
    out = tmp_path / "work/eval/cam_cgnet_train.json"
    saved = json.loads(out.read_text())
    assert saved["summary"] == res["summary"]
    # t = 0.3: bg 2/3 and class 3 (bird) 2/3 (one bg pixel taken for a bird), class 15 (person) 2/2;
    # t = 0.5: bg 3/4, bird 1/2, person 1
    assert saved["summary"]["best_threshold"] == 0.3
    assert saved["summary"]["miou"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert saved["summary"]["split"] == "train" and saved["summary"]["num_images"] == 2
    assert saved["info"]["scales"] == [0.5, 1.0] and saved["info"]["done"] is False
    report = format_report(saved)
    assert "scales [0.5, 1.0], flip on, CAMs of the cgnet; CRF off" in report and "does not say it is complete" in report
    assert saved["summary"]["miou_at_threshold"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert saved["best"]["iou"][1] is None  # classes absent from GT and prediction: NaN -> null
