"""End-to-end numbers from an independent computation: an mIoU written out by hand for prediction
folders built from the ground truth, the pipeline's results table against eval_miou.py run on its
own, and CAMs computed by two torchrun ranks against a single process (every image written once)."""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caee.core.config import config_from_dict, save_config
from caee.core.io import load_cam_npz, save_cam_npz, save_label_png
from caee.stages import eval_miou
from conftest import FAKE_VOC, fake_voc_mask, mini_config

REPO = Path(__file__).resolve().parents[1]
VAL = [i for i, v in FAKE_VOC.items() if "val" in v[2]]   # 2008_000004 (class 7), 2008_000005 (3, 20)


def _gt(image_id: str) -> np.ndarray:
    shape, objects, _, _ = FAKE_VOC[image_id]
    return fake_voc_mask(shape, objects)


def _hand_miou(gts: list[np.ndarray], preds: list[np.ndarray], n: int = 21) -> float:
    """mIoU by counting: per class, |gt & pred| / |gt | pred| over the pixels whose gt is not 255;
    the mean over the classes that occur in the ground truth or the prediction."""
    inter, union = np.zeros(n), np.zeros(n)
    for gt, pred in zip(gts, preds):
        valid = gt != 255
        for c in range(n):
            g, p = (gt == c) & valid, (pred == c) & valid
            inter[c] += (g & p).sum()
            union[c] += (g | p).sum()
    present = union > 0
    return float((inter[present] / union[present]).mean())


def _cams_from_gt(root: Path) -> tuple[Path, dict]:
    """CAMs equal to 0.9 on each class's ground-truth pixels, with two known mistakes:
    2008_000004: a 0.5 block on background (wrong only for thresholds below 0.5);
    2008_000005: class 20 at 0.7 on a background block (wrong below 0.7)."""
    out = root / "gt_cams"
    cams_by_id = {}
    for image_id in VAL:
        gt = _gt(image_id)
        keys = sorted({o[0] for o in FAKE_VOC[image_id][1]})
        cams = np.stack([(gt == k) * 0.9 for k in keys]).astype(np.float32)
        if image_id == "2008_000004":
            cams[0, 0:4, 0:6] = 0.5
        else:
            cams[1, 0:2, 30:40] = 0.7
        save_cam_npz(out / f"{image_id}.npz", np.array(keys) - 1, cams)
        cams_by_id[image_id] = (np.array(keys), cams)
    return out, cams_by_id


def _eval_cfg(fake_voc, tmp_path, **evals):
    return config_from_dict({"work_dir": str(tmp_path / "work"), "device": "cpu",
                             "data": {"dataset": "voc", "root": str(fake_voc), "cam_split": "val"},
                             "eval": {"workers": 1, **evals}})


def test_cam_folder_from_ground_truth_gives_the_hand_computed_miou(fake_voc, tmp_path):
    cam_dir, cams = _cams_from_gt(tmp_path)
    thresholds = [0.3, 0.6, 0.8]
    result = eval_miou.main(_eval_cfg(fake_voc, tmp_path, dir=str(cam_dir), kind="cam", thresholds=thresholds,
                                      threshold=0.6))
    gts = [_gt(i) for i in VAL]
    expected = {}
    for t in thresholds:
        preds = []
        for image_id in VAL:
            keys, c = cams[image_id]
            preds.append(np.where(c.max(0) > t, keys[c.argmax(0)], 0))
        expected[t] = _hand_miou(gts, preds)
    assert expected[0.3] < expected[0.6] < expected[0.8] == 1.0
    summary = result["summary"]
    assert summary["miou_at_threshold"] == pytest.approx(expected[0.6], abs=1e-12)
    assert summary["miou"] == pytest.approx(max(expected.values()), abs=1e-12)
    assert summary["best_threshold"] == 0.8
    sweep = {round(r["threshold"], 6): r["miou"] for r in result["sweep"]}
    for t in thresholds:
        assert sweep[t] == pytest.approx(expected[t], abs=1e-12)


def test_label_folder_with_known_mistakes_gives_the_hand_computed_miou(fake_voc, tmp_path):
    preds = []
    for image_id in VAL:
        pred = _gt(image_id).copy()
        pred[pred == 255] = 0          # a prediction has no ignore label
        pred[0:5, 0:7] = 7             # a false class-7 block (and, in 2008_000005, over part of class 3)
        save_label_png(tmp_path / "labels" / f"{image_id}.png", pred)
        preds.append(pred)
    result = eval_miou.main(_eval_cfg(fake_voc, tmp_path, dir=str(tmp_path / "labels"), kind="label"))
    expected = _hand_miou([_gt(i) for i in VAL], preds)
    assert 0.5 < expected < 1.0
    assert result["summary"]["miou"] == pytest.approx(expected, abs=1e-12)


_WRITE_HOOK = '''
import os
import caee.core.io as _io

_save = _io.save_cam_npz


def _recording_save(path, *args, **kwargs):
    _save(path, *args, **kwargs)
    fd = os.open(os.environ["CAEE_TEST_WRITE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{os.getpid()} {os.fspath(path)}\\n".encode())
    os.close(fd)


_io.save_cam_npz = _recording_save
'''


def test_torchrun_cams_equal_a_single_process_and_each_is_written_once(tmp_path, monkeypatch):
    """Two ranks share the CAM split: each image's CAM is written exactly once (a start-up hook in
    the rank processes records every save_cam_npz) and equals the CAM of a single-process run; the
    pipeline's results table then equals eval_miou.py run separately on the same folder."""
    from caee.pipeline import run as pipeline
    from caee.stages import make_cam

    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 2})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_WRITE_HOOK)
    log = tmp_path / "writes.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CAEE_TEST_WRITE_LOG", str(log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pipeline.run(cfg, only=["train_classifier"])                   # in this process: quicker
    pipeline.run(cfg, only=["cam_classifier"], nproc=2)

    ids = (Path(cfg.data.root) / "ImageSets" / "Segmentation" / f"{cfg.data.cam_split}.txt").read_text().split()
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    cam_writes = collections.Counter(Path(p).stem for _, p in writes if Path(p).parent.name == "cam_classifier")
    assert sorted(cam_writes) == sorted(ids) and set(cam_writes.values()) == {1}
    assert len({pid for pid, p in writes if Path(p).parent.name == "cam_classifier"}) == 2   # both ranks worked

    work = Path(cfg.work_dir)
    from caee.pipeline.runner import jobs_of
    (single_cfg,) = jobs_of(cfg, ["cam_classifier"])[0].calls   # the step's own view of the config
    single_cfg.cam.out_dir = str(tmp_path / "single")
    make_cam.main(single_cfg)
    for image_id in ids:
        k1, c1 = load_cam_npz(work / "cam_classifier" / f"{image_id}.npz")
        k2, c2 = load_cam_npz(tmp_path / "single" / f"{image_id}.npz")
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_allclose(c1, c2, atol=2e-3)   # float16 files

    result = pipeline.run(cfg, only=["results"])
    row = next(r for r in result["rows"] if r["output"] == "OC CAM")
    cfg_path = save_config(cfg, tmp_path / "cfg")
    out_json = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "eval_miou.py"), "--config", str(cfg_path),
                           f"eval.dir={work / 'cam_classifier'}", "eval.kind=cam", f"eval.out={out_json}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    separate = json.loads(out_json.read_text())["summary"]
    assert row["miou"] == separate["miou"] and row["miou_at_threshold"] == separate["miou_at_threshold"]
    assert row["best_threshold"] == separate["best_threshold"] and row["num_images"] == len(ids)
    table = (work / "results.md").read_text()
    assert f"| {100 * separate['miou']:.1f} |" in table
