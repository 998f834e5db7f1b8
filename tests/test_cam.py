"""Multi-scale + flip CAM inference, CAM pictures and the make_cam stage end to end."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from caee.core import records
from caee.method.cam import multiscale_cam, multiscale_cams
from conftest import run_stage
from caee.core.config import NetConfig, load_config
from caee.method.crf import crf_cam_labels
from caee.core.errors import CaeeError
from caee.engine.scoring import folder_info
from caee.core.io import load_cam_npz, load_label_png, save_cam_npz
from caee.models.classifier import build_classifier
from caee.core.pictures import CAPTION_H, cam_grid, compare_cams, save_picture
from caee.stages import eval_miou, make_cam
from conftest import save_random_cgnet

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class Asymmetric(nn.Module):
    """Stand-in classifier: stride-2 conv plus a left-to-right ramp, so its maps are far from
    mirror-symmetric (a missing un-flip would change the result)."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, stride=2, padding=1)

    def forward(self, x):
        maps = self.conv(x)
        ramp = torch.linspace(-1.0, 2.0, maps.shape[-1]).view(1, 1, 1, -1)
        maps = maps + ramp * torch.tensor([1.0, -0.5, 2.0]).view(1, 3, 1, 1)
        return maps.mean(dim=(2, 3)), maps


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference_cam(net, image, keys, scales, flip):
    """The method with ``resize="bilinear"`` written out one pass at a time, with the normalisation
    done by hand (the official PIL-bicubic input is tested in test_fidelity_cam.py)."""
    h, w = image.shape[:2]
    x = torch.from_numpy(((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())[None]
    total = torch.zeros(1, 3 if not hasattr(net, "fc8") else net.fc8.out_channels, h, w)
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
            for mirrored in ([False, True] if flip else [False]):
                _, maps = net(torch.flip(xs, [3]) if mirrored else xs)
                if mirrored:
                    maps = torch.flip(maps, [3])
                total += F.relu(F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False))
    cams = total[0, list(keys)]
    return (cams / (cams.amax(dim=(1, 2), keepdim=True) + 1e-5)).numpy()


# ---------------------------------------------------------------- multiscale_cam


@pytest.mark.parametrize("flip", [False, True])
def test_matches_direct_computation(flip):
    net = Asymmetric().eval()
    image = _image(37, 45)   # odd sizes: round(18.5) and round(22.5) exercise the scaled-size rule
    scales = [0.5, 1.0, 1.5, 2.0]
    got = multiscale_cam(net, image, [2, 0], scales, flip, "cpu", resize="bilinear")
    want = reference_cam(net, image, [2, 0], scales, flip)
    assert got.shape == (2, 37, 45) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_real_classifier_matches_direct_computation():
    net = build_classifier(NetConfig(backbone="tinycnn", width=0.25, dropout=0.5), 4).eval()
    image = _image(30, 41, seed=1)
    got = multiscale_cam(net, torch.from_numpy(image), np.array([3, 1]), [0.75, 1.0], True, "cpu", resize="bilinear")
    np.testing.assert_allclose(got, reference_cam(net, image, [3, 1], [0.75, 1.0], True), rtol=1e-5, atol=1e-6)


def test_flip_is_undone():
    # With flip TTA the CAM of the mirrored image is the mirror of the CAM; without the un-flip (or
    # without flip TTA, for this asymmetric net) it is not.
    net = Asymmetric().eval()
    image = _image(24, 33, seed=2)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    a = multiscale_cam(net, image, [0, 1, 2], [1.0, 1.5], True, "cpu")
    b = multiscale_cam(net, mirrored, [0, 1, 2], [1.0, 1.5], True, "cpu")
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-5)
    c = multiscale_cam(net, image, [0, 1, 2], [1.0, 1.5], False, "cpu")
    d = multiscale_cam(net, mirrored, [0, 1, 2], [1.0, 1.5], False, "cpu")
    assert np.abs(d - c[:, :, ::-1]).max() > 0.1


def test_normalised_per_class_and_keys_order():
    net = Asymmetric().eval()
    cams = multiscale_cam(net, _image(20, 28), [1, 2, 0], [1.0], True, "cpu")
    assert cams.min() >= 0 and cams.max() < 1
    np.testing.assert_allclose(cams.max(axis=(1, 2)), 1.0, atol=1e-4)
    single = multiscale_cam(net, _image(20, 28), [2], [1.0], True, "cpu")
    np.testing.assert_allclose(single[0], cams[1], atol=1e-6)


def test_batched_images_equal_one_at_a_time():
    net = Asymmetric().eval()
    images = [_image(20, 28, 0), _image(17, 23, 1), _image(20, 28, 2)]
    keys = [[0, 2], [1], []]   # an image without classes shares its group's forward
    batched = multiscale_cams(net, images, keys, [0.5, 1.0, 1.5], True, "cpu")
    for image, k, got in zip(images, keys, batched):
        np.testing.assert_allclose(got, multiscale_cam(net, image, k, [0.5, 1.0, 1.5], True, "cpu"), atol=1e-6)


def test_no_keys_and_bad_inputs():
    net = Asymmetric().eval()
    assert multiscale_cam(net, _image(10, 12), [], [1.0], True, "cpu").shape == (0, 10, 12)
    with pytest.raises(CaeeError, match="class id 5"):
        multiscale_cam(net, _image(10, 12), [5], [1.0], True, "cpu")
    with pytest.raises(CaeeError, match="uint8"):
        multiscale_cam(net, _image(10, 12).astype(np.float32), [0], [1.0], True, "cpu")


def test_npz_round_trip_without_pickle(tmp_path):
    cams = np.random.default_rng(0).random((2, 5, 7)).astype(np.float16)
    save_cam_npz(tmp_path / "a.npz", np.array([4, 1]), cams)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["cams", "keys"]
        assert z["keys"].dtype == np.int64 and z["cams"].dtype == np.float16
    keys, back = load_cam_npz(tmp_path / "a.npz")
    assert keys.tolist() == [4, 1] and back.dtype == np.float32
    np.testing.assert_array_equal(back, cams.astype(np.float32))


# ---------------------------------------------------------------- pictures


def test_cam_grid_layout_and_colours():
    image = _image(16, 20)
    gt = np.zeros((16, 20), np.uint8)
    gt[4:10, 5:12] = 3
    cams = np.zeros((2, 16, 20), np.float32)
    cams[0, 8, 10] = 1.0
    pic = cam_grid(image, gt, [2, 7], cams, [f"c{i}" for i in range(20)])
    assert pic.shape == (CAPTION_H + 16, 4 * 20, 3) and pic.dtype == np.uint8
    np.testing.assert_array_equal(pic[CAPTION_H:, :20], image)
    gt_panel = pic[CAPTION_H:, 20:40]
    assert tuple(gt_panel[5, 6]) == (128, 128, 0) and tuple(gt_panel[0, 0]) == (0, 0, 0)  # VOC colours of 3 and 0
    # jet: 0 -> dark blue, 1 -> dark red, blended half with the image
    cam_panel = pic[CAPTION_H:, 40:60].astype(int)
    assert cam_panel[8, 10, 0] - image[8, 10, 0] // 2 > 55 and cam_panel[0, 0, 2] - image[0, 0, 2] // 2 > 55


def test_compare_cams_rows_fit_into_cells(tmp_path):
    rows = [(_image(16, 20), np.zeros((16, 20), np.uint8), np.ones((1, 16, 20)) * 0.5, np.zeros((2, 16, 20))),
            (_image(8, 20, 1), None, np.zeros((0, 8, 20)), np.ones((1, 8, 20)))]
    pic = compare_cams(rows)
    assert pic.shape == (CAPTION_H + 2 * 16, 4 * 20, 3)
    # the second image (8 px high) is letterboxed: black bands above and below
    assert (pic[CAPTION_H + 16: CAPTION_H + 20] == 0).all()
    save_picture(tmp_path / "c.png", pic)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), pic)


# ---------------------------------------------------------------- the stage end to end

@pytest.fixture
def stage_setup(tmp_path, fake_voc):
    """fake_voc's train split: 2007_000001 (40x48, class 1), 2007_000002 (32x40, classes 12 and 15),
    2007_000003 (36x36, background only), and a random TinyCNN CGNet checkpoint."""
    ids = ["2007_000001", "2007_000002", "2007_000003"]
    model = save_random_cgnet(tmp_path / "work")
    overrides = [f"work_dir={tmp_path / 'work'}", "device=cpu", "data.dataset=voc", f"data.root={fake_voc}",
                 "data.num_workers=0", "cam.scales=[1.0, 0.5]",
                 "cam.batch_size=2", "cam.crf_alphas=[4, 24]", "cam.pictures=2", "crf.workers=1"]
    return tmp_path, ids, model, overrides


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


def test_make_cam_end_to_end(stage_setup):
    tmp_path, ids, model, overrides = stage_setup
    voc = tmp_path / "VOC2012"
    result = make_cam.main(load_config(None, overrides))
    out = tmp_path / "work/cam_cgnet"
    assert result.out_dir == out and result.computed == 3
    assert records.read(out)["complete"] == ["train"] and records.read(out)["stage"] == "make_cam"
    assert (out / "config.yaml").is_file()
    npz = [out / f"{i}.npz" for i in ids]
    crf = [tmp_path / f"work/cam_cgnet_crf_{a}/{i}.png" for a in (4, 24) for i in ids]
    for k, image_id in enumerate(ids):
        keys, cams = load_cam_npz(out / f"{image_id}.npz")
        mask = load_label_png(voc / f"SegmentationClass/{image_id}.png")
        assert keys.tolist() == [[0], [11, 14], []][k] == sorted({int(v) - 1 for v in np.unique(mask) if 0 < v < 255})
        image = np.array(Image.open(voc / f"JPEGImages/{image_id}.jpg"))
        np.testing.assert_allclose(cams, multiscale_cam(model, image, keys, [1.0, 0.5], True, "cpu"), atol=1e-3)
        for alpha in (4, 24):
            labels = load_label_png(tmp_path / f"work/cam_cgnet_crf_{alpha}/{image_id}.png")
            np.testing.assert_array_equal(labels, crf_cam_labels(image, keys, cams, alpha))
    with np.load(npz[0], allow_pickle=False) as z:
        assert z["cams"].dtype == np.float16
    pictures = sorted((tmp_path / "work/cam_cgnet_pictures").iterdir())
    assert [p.stem for p in pictures] == ids[:2]
    assert np.asarray(Image.open(pictures[0])).shape == (CAPTION_H + 40, 3 * 48, 3)  # 1 class
    assert np.asarray(Image.open(pictures[1])).shape == (CAPTION_H + 32, 4 * 40, 3)  # 2 classes

    info = folder_info(tmp_path / "work/cam_cgnet_crf_4")   # what eval_miou prints about the folder
    assert info["done"] and info["crf_alpha"] == 4 and info["crf"]["iterations"] == 10
    assert folder_info(tmp_path / "work/cam_cgnet")["scales"] == [1.0, 0.5]  # the CAMs it came from

    # eval_miou finds the CAMs by default and tells CAM and label folders apart
    res = eval_miou.main(load_config(None, overrides + ["eval.workers=1"]))
    assert res["summary"]["kind"] == "cam" and res["summary"]["num_evaluated"] == 3
    assert (tmp_path / "work/eval/cam_cgnet_train.json").is_file()
    res = eval_miou.main(load_config(None, overrides + ["eval.workers=1", f"eval.dir={crf[0].parent}"]))
    assert res["summary"]["kind"] == "label" and res["info"]["crf_alpha"] == 4

    # tools/compare_cams.py on the stage's output
    (tmp_path / "empty.yaml").write_text("{}\n")
    tool = _load_tool("compare_cams")
    assert tool.main(["--config", str(tmp_path / "empty.yaml"), "--a", str(out), "--b", str(out),
                      "--out", str(tmp_path / "cmp.png"), "--n", "2"] + overrides) == 0
    assert np.asarray(Image.open(tmp_path / "cmp.png")).shape == (CAPTION_H + 2 * 40, 4 * 48, 3)

    # re-run: nothing recomputed
    before = _mtimes(npz + crf + pictures)
    assert make_cam.main(load_config(None, overrides)).computed == 0
    assert _mtimes(npz + crf + pictures) == before and records.read(out)["complete"] == ["train"]

    # a lost CRF file is redone alone
    crf[1].unlink()
    make_cam.main(load_config(None, overrides))
    assert crf[1].is_file() and _mtimes(npz + crf[2:]) == {p: before[p] for p in npz + crf[2:]}

    # overwrite rewrites everything (the CRF now in a pool of 2 processes: same labels)
    labels = [load_label_png(p) for p in crf]
    for p in npz + crf:
        os.utime(p, ns=(10**9, 10**9))
    assert make_cam.main(load_config(None, overrides + ["cam.overwrite=true", "crf.workers=2"])).computed == 3
    assert all(t > 10**9 for t in _mtimes(npz + crf).values())
    assert all(np.array_equal(a, load_label_png(p)) for a, p in zip(labels, crf))


def test_make_cam_refuses_mixed_settings_and_missing_weights(stage_setup, capsys):
    tmp_path, ids, model, overrides = stage_setup
    make_cam.main(load_config(None, overrides + ["cam.crf_alphas=[]", "cam.pictures=0"]))
    with pytest.raises(CaeeError, match=r"cam.scales"):
        make_cam.main(load_config(None, overrides + ["cam.scales=[1.0]"]))
    (tmp_path / "work/train_cgnet/model.pth").unlink()
    (tmp_path / "empty.yaml").write_text("{}\n")
    argv = ["--config", str(tmp_path / "empty.yaml")] + overrides + ["cam.overwrite=true"]
    code = run_stage(make_cam.main, None, argv)
    assert code == 2 and "input not found" in capsys.readouterr().err


def test_crf_folders_refuse_labels_made_with_other_crf_settings(stage_setup):
    """Run stage by stage, a CRF folder records its settings: other CRF
    settings are refused before anything changes; the worker count is free; overwrite starts over."""
    tmp_path, ids, model, overrides = stage_setup
    overrides = overrides + ["cam.pictures=0"]
    make_cam.main(load_config(None, overrides))
    work = tmp_path / "work"
    files = sorted(p for p in work.glob("cam_cgnet*/*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    recorded = records.read(work / "cam_cgnet_crf_24")["settings"]
    assert recorded["crf.alpha"] == 24 and recorded["crf.bilateral_srgb"] == 13 and "crf.workers" not in recorded
    assert recorded["input.cams"] == records.read(work / "cam_cgnet")["run"]  # the CAMs they come from
    cam_record = records.read(work / "cam_cgnet")["settings"]
    assert cam_record["cam.scales"] == [1.0, 0.5] and cam_record["input.weights"].startswith("sha256:")  # hand-made
    with pytest.raises(CaeeError, match=r"cam_cgnet_crf_4 was made with other settings \(crf.bilateral_srgb: 13.0 -> 5.0\)"
                                        r".*cam.overwrite=true"):
        make_cam.main(load_config(None, overrides + ["crf.bilateral_srgb=5"]))
    assert {p: p.read_bytes() for p in files} == before   # no record, config or label touched
    assert make_cam.main(load_config(None, overrides + ["crf.workers=2"])).computed == 0
    # a new alpha is a new folder: accepted next to the existing ones
    make_cam.main(load_config(None, overrides + ["cam.crf_alphas=[4, 24, 8]"]))
    assert len(list((work / "cam_cgnet_crf_8").glob("*.png"))) == 3
    make_cam.main(load_config(None, overrides + ["crf.bilateral_srgb=5", "cam.overwrite=true"]))
    assert records.read(work / "cam_cgnet_crf_4")["settings"]["crf.bilateral_srgb"] == 5
