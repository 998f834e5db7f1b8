"""Equivalence with the official OC-CSE / PSA procedures: multi-scale CAMs, the dense-CRF unary,
the oracle epoch score, and image-level labels from VOC's XML annotations.

Each reference below is written from the description of the official code (OC-CSE's
``VOC12ClsDatasetMSF`` + ``model_WSSS.infer_msf`` + ``evaluation.validation``, PSA's
``crf_inference`` and ``make_cls_labels``) and run on small generated data with seeded random weights.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caee.method.cam import multiscale_cam
from caee.core.config import NetConfig
from caee.models.classifier import build_classifier
from conftest import randomise_bn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OFFICIAL_SCALES = (0.5, 1.0, 1.5, 2.0)


def textured_image(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3): stripes of several periods and angles plus pixel noise, so that a 0.5x resize
    aliases (flat colours would make every resize method agree)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            angle, period = rng.uniform(0, np.pi), rng.uniform(2.2, 9.0)
            image[..., c] += np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 6))
    image = 128 + 35 * image + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def official_msf_cams(model, image: np.ndarray, label: np.ndarray, scales=OFFICIAL_SCALES) -> dict[int, np.ndarray]:
    """OC-CSE's MSF CAMs of one image, pass by pass.

    Each scale: the PIL image resized with bicubic to (round(W*s), round(H*s)), then normalised
    per channel ((x/255 - mean) / std), CHW; its mirror is a second pass. Each pass: the class maps
    bilinearly upsampled to the image size, ReLU, times the label vector, un-mirrored; all passes
    summed; every class divided by its own max + 1e-5; the dict keeps the labelled classes.
    """
    pil = Image.fromarray(image)
    width, height = pil.size
    passes = []
    for s in scales:
        arr = np.asarray(pil.resize((round(width * s), round(height * s)), resample=Image.Resampling.BICUBIC))
        norm = np.empty(arr.shape, np.float32)
        for c in range(3):
            norm[..., c] = (arr[..., c] / 255.0 - MEAN[c]) / STD[c]
        chw = norm.transpose(2, 0, 1)
        passes += [chw, np.flip(chw, -1).copy()]
    total = 0
    with torch.no_grad():
        for i, x in enumerate(passes):
            _, maps = model(torch.from_numpy(np.ascontiguousarray(x))[None])
            cam = F.relu(F.interpolate(maps, (height, width), mode="bilinear", align_corners=False))[0].numpy()
            cam = cam * label.reshape(-1, 1, 1)
            total = total + (np.flip(cam, -1) if i % 2 == 1 else cam)
    norm_cam = total / (np.max(total, (1, 2), keepdims=True) + 1e-5)
    return {c: norm_cam[c] for c in range(len(label)) if label[c] > 1e-5}


def _random_net(backbone: str, width: float, num_classes: int, seed: int):
    torch.manual_seed(seed)
    net = build_classifier(NetConfig(backbone=backbone, width=width, pretrained="", dropout=0.0), num_classes)
    return randomise_bn(net, seed).eval()


# ---------------------------------------------------------------- item 1: MSF CAM input resize


@pytest.mark.parametrize("backbone,width,size", [("tinycnn", 0.5, (37, 45)), ("resnet38", 0.0625, (29, 35))])
def test_msf_cams_equal_the_official_procedure(backbone, width, size):
    net = _random_net(backbone, width, 4, seed=3)
    image = textured_image(*size, seed=5)   # odd sizes: round(18.5) = 18, round(22.5) = 22 (half to even)
    label = np.array([0, 1, 0, 1], np.float32)
    want = official_msf_cams(net, image, label)
    got = multiscale_cam(net, image, [1, 3], OFFICIAL_SCALES, True, "cpu", amp=False)
    assert got.shape == (2, *size)
    np.testing.assert_allclose(got, np.stack([want[1], want[3]]), rtol=0, atol=1e-4)
    # the other input resize gives other CAMs on a textured image, so the comparison has teeth
    bilinear = multiscale_cam(net, image, [1, 3], OFFICIAL_SCALES, True, "cpu", amp=False, resize="bilinear")
    assert np.abs(bilinear - got).max() > 1e-2


def test_cam_resize_option_is_checked():
    from caee.core.errors import CaeeError

    net = _random_net("tinycnn", 0.25, 2, seed=0)
    with pytest.raises(CaeeError, match="cam.resize"):
        multiscale_cam(net, textured_image(8, 8, 0), [0], [1.0], True, "cpu", resize="bicubic")


# ---------------------------------------------------------------- item 2: dense CRF unary


def psa_crf_inference(img: np.ndarray, probs: np.ndarray, t: int = 10) -> np.ndarray:
    """PSA's crf_inference: unary from pydensecrf's unary_from_softmax (default clip), a Gaussian
    kernel (sxy 3, compat 3) then a bilateral one (sxy 80, srgb 13, compat 10) on a copy of the
    uint8 image, t mean-field iterations; returns (L, H, W)."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    h, w = img.shape[:2]
    n = probs.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    return np.array(d.inference(t)).reshape((n, h, w))


def _random_cams(k: int, h: int, w: int, seed: int) -> np.ndarray:
    """(k, h, w) float32 in [0, 1): smooth blobs with exact zeros (where the unary clip matters)
    and a confident peak per class, normalised as the official CAMs are."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (k, 1, h // 4 + 1, w // 4 + 1)).astype(np.float32)
    cams = F.interpolate(torch.from_numpy(coarse), (h, w), mode="bilinear", align_corners=False)[:, 0].relu().numpy()
    return cams / (cams.max(axis=(1, 2), keepdims=True) + 1e-5)


@pytest.mark.parametrize("alpha", [4, 24, 32])
def test_crf_labels_and_posteriors_equal_psa_crf_inference(alpha):
    from caee.core.config import CrfConfig
    from caee.method.crf import crf_cam_labels, dense_crf

    pytest.importorskip("pydensecrf.densecrf")
    image = textured_image(26, 31, seed=alpha)
    keys = np.array([2, 7])
    cams = _random_cams(2, 26, 31, seed=alpha)
    # PSA's _crf_with_alpha: background (1 - max CAM)^alpha, then the CAMs of the image's classes
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), alpha)
    scores = np.concatenate([bg, cams], axis=0)
    want = psa_crf_inference(image, scores)
    got = dense_crf(image, scores, CrfConfig())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    labels = crf_cam_labels(image, keys, cams, alpha)
    np.testing.assert_array_equal(labels, np.array([0, 3, 8], np.uint8)[np.argmax(want, axis=0)])
    # the former floor (1e-8) makes confident pixels' unary stiffer: other posteriors
    stiff = dense_crf(image, scores, CrfConfig(min_prob=1e-8))
    assert np.abs(stiff - want).max() > 1e-3


def test_crf_min_prob_reaches_every_crf_user():
    """One settings type from the config to the CRF: the DeepLab test CRF gets cfg.crf itself
    (make_cam and AffinityNet pass cfg.crf straight to caee.method.crf; tests/test_stage_wiring.py records
    every pydensecrf call of those paths)."""
    from caee.core.config import load_config
    from caee.stages.train_deeplab import settings_from_config

    cfg = load_config(None, ["crf.min_prob=0.001", "train_deeplab.test_crf=true"])
    pytest.importorskip("pydensecrf.densecrf")
    assert settings_from_config(cfg).crf.min_prob == 0.001
    assert load_config(None, []).crf.min_prob == 1e-5


# ---------------------------------------------------------------- item 8: the oracle epoch score


def official_oracle_miou(model, images, gts, labels, num_classes: int) -> float:
    """OC-CSE's per-epoch validation: MSF CAMs, thresholds t = 0.10 + i/100 for i in 0..29, label =
    argmax([t, CAMs]), IoU = TP / (T + P - TP + 1e-10) over gt < 255, mean over all classes + 1;
    the best threshold's mIoU."""
    cams = [official_msf_cams(model, im, lab) for im, lab in zip(images, labels)]
    best = 0.0
    for i in range(30):
        t = i / 100.0 + 0.1
        tp, p, g = (np.zeros(num_classes + 1) for _ in range(3))
        for cam_dict, gt in zip(cams, gts):
            tensor = np.zeros((num_classes + 1, *gt.shape), np.float32)
            for key, cam in cam_dict.items():
                tensor[key + 1] = cam
            tensor[0] = t
            pred = np.argmax(tensor, axis=0)
            valid = gt < 255
            for c in range(num_classes + 1):
                p[c] += np.sum((pred == c) & valid)
                g[c] += np.sum((gt == c) & valid)
                tp[c] += np.sum((gt == c) & (pred == gt) & valid)
        miou = float(np.mean(tp / (g + p - tp + 1e-10)))
        best = max(best, miou)
    return best


def test_oracle_scores_official_msf_cams_over_official_thresholds(tmp_path):
    from caee.data import ensure_dataset, load_split
    from caee.core.io import load_image, load_label_png
    from caee.method.epoch_selection import THRESHOLDS, train_cam_miou
    from caee.stages.train_cgnet import OracleSelector
    from conftest import mini_config

    assert THRESHOLDS[0] == 0.10 and THRESHOLDS[-1] == 0.39 and len(THRESHOLDS) == 30
    cfg = mini_config(tmp_path)
    ensure_dataset(cfg.data)
    index = load_split(cfg.data, "train").subset(range(6))
    gts = [load_label_png(index.eval_mask_path(i)) for i in range(len(index))]
    present = set(np.unique(np.concatenate([g.ravel() for g in gts])).tolist()) - {255}
    assert present == {0, 1, 2, 3}   # every class in the ground truth: both means run over the same classes
    net = _random_net("tinycnn", 0.5, 3, seed=11)
    want = official_oracle_miou(net, [load_image(index.image_path(i)) for i in range(len(index))], gts,
                                list(index.labels), 3)
    got = train_cam_miou(net, OracleSelector(tmp_path, index, None).samples(), 3, torch.device("cpu"))
    assert got == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- item 10: image labels from VOC's XML

VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
# id: [(class name, difficult, truncated, part names)]; masks as in conftest's fake VOC + _fake_sbd
FAKE_XML = {
    "2007_000001": [("aeroplane", 0, 0, []), ("person", 1, 0, ["head"])],       # difficult person: not in the mask
    "2007_000002": [("dog", 0, 1, []), ("person", 0, 0, ["head", "hand"])],     # = mask {12, 15}
    "2007_000003": [("chair", 0, 1, [])],                                       # mask: background only
    "2008_000004": [("car", 0, 0, [])],                                         # = mask {7}
    "2008_000005": [("bird", 0, 0, []), ("tvmonitor", 0, 0, []), ("pottedplant", 1, 1, [])],
    "2009_000006": [("chair", 0, 0, [])],                                       # = SBD mask {9}
    "2010_000007": [("bicycle", 0, 0, []), ("bottle", 1, 0, [])],               # = SBD mask {2, 5}
}


def _write_xml(path, objects):
    parts = ["<annotation><folder>VOC2012</folder><filename>x.jpg</filename><source><database>The VOC2007 "
             "Database</database></source><size><width>40</width><height>30</height><depth>3</depth></size>"]
    for name, difficult, truncated, part_names in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
                     "<ymax>9</ymax></bndbox>")
        parts += [f"<part><name>{p}</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>4</xmax><ymax>4</ymax></bndbox>"
                  "</part>" for p in part_names]
        parts.append("</object>")
    path.write_text("".join(parts) + "</annotation>\n")


def official_xml_label(path) -> np.ndarray:
    """PSA's load_image_label_from_xml: every element named 'name' in the document (minidom), its
    first child's text looked up in the class list; (20,) float32 multi-hot."""
    from xml.dom import minidom

    label = np.zeros(20, np.float32)
    for el in minidom.parse(str(path)).getElementsByTagName("name"):
        if el.firstChild.data in VOC_NAMES:
            label[VOC_NAMES.index(el.firstChild.data)] = 1.0
    return label


@pytest.fixture
def voc_with_xml(fake_voc, tmp_path):
    from test_data import _fake_sbd

    for p in (fake_voc / "SegmentationClassAug").iterdir():   # masks of SBD images come from SBD
        p.unlink()
    (fake_voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    (fake_voc / "Annotations").mkdir()
    for image_id, objects in FAKE_XML.items():
        _write_xml(fake_voc / "Annotations" / f"{image_id}.xml", objects)
    return fake_voc, _fake_sbd(tmp_path, fake_voc)


def test_xml_labels_equal_the_official_reader(voc_with_xml):
    from test_data import _tool

    tool = _tool("prepare_voc")
    voc, _ = voc_with_xml
    for image_id in FAKE_XML:
        path = voc / "Annotations" / f"{image_id}.xml"
        np.testing.assert_array_equal(tool.labels_from_xml(path), official_xml_label(path))
    assert tool.labels_from_xml(voc / "Annotations" / "2007_000001.xml").nonzero()[0].tolist() == [0, 14]


def test_prepare_voc_takes_labels_from_xml_and_counts_the_differences(voc_with_xml, tmp_path, caplog):
    import logging

    from caee.core.config import DataConfig
    from caee.data import load_split
    from test_data import _tool

    tool = _tool("prepare_voc")
    voc, sbd = voc_with_xml
    out = tmp_path / "prepared"
    with caplog.at_level(logging.INFO):
        differ = tool.prepare(voc, sbd, out, 1, 0, False)
    # train_aug = VOC train {1, 2, 3} + SBD {6, 7}; XML adds a difficult person to 1 and a truncated chair to 3
    assert differ == {"train_aug": 2, "train": 2, "val": 1}
    assert "train_aug: 2 of 5 images have other labels in the XML annotations than in the masks" in caplog.text
    for split in ("train_aug", "val"):
        index = load_split(DataConfig(dataset="voc", root=str(out)), split)
        want = np.stack([official_xml_label(voc / "Annotations" / f"{i}.xml") for i in index.ids])
        np.testing.assert_array_equal(index.labels, want)
    # --labels masks: the classes of the masks, no count
    masks_out = tmp_path / "from_masks"
    assert tool.prepare(voc, sbd, masks_out, 1, 0, False, labels="masks") == {}
    index = load_split(DataConfig(dataset="voc", root=str(masks_out)), "train")
    assert index.labels[index.ids.index("2007_000003")].sum() == 0
    assert index.labels[index.ids.index("2007_000001")].nonzero()[0].tolist() == [0]


def test_prepare_voc_xml_errors(voc_with_xml, tmp_path, capsys):
    from test_data import _tool

    tool = _tool("prepare_voc")
    voc, sbd = voc_with_xml
    (voc / "Annotations" / "2010_000007.xml").unlink()
    assert tool.main(["--voc", str(voc), "--sbd", str(sbd), "--out", str(tmp_path / "o"), "--workers", "1",
                      "--expected-count", "0"]) == 2
    assert "1 images have no" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (voc / "Annotations" / "2010_000007.xml").write_text("<annotation><object><name>dog</name>")
    assert tool.main(["--voc", str(voc), "--sbd", str(sbd), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
    assert "2010_000007.xml: unreadable VOC annotation" in capsys.readouterr().err
    for p in (voc / "Annotations").iterdir():
        p.unlink()
    (voc / "Annotations").rmdir()
    assert tool.main(["--voc", str(voc), "--sbd", str(sbd), "--out", str(tmp_path / "p"), "--workers", "1"]) == 2
    assert "VOC Annotations folder (or use --labels masks)" in capsys.readouterr().err
