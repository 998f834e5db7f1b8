"""AffinityNet's training data against PSA's train_aff.py pipeline, written here from its description:

the la and ha CRF posteriors (channel 0 background, then the image's classes) are stacked with the
image, cropped into a zero container at a random box (a larger side is cut at a random offset, a
smaller one placed at a random offset), flipped together, average-pooled by 8; per cell the argmax
of la and of ha, label = la's, la background -> 255, ha background -> 0, largest pooled score of
both below 1e-5 -> 255; pairs: from cells in rows 0..h-r, columns r-1..w-r (r = radius), to
cell + offset for the 34 offsets (0, 1..4), (1..4, -4..4) with dy^2 + dx^2 < 25; bg-pos = equal
and 0, fg-pos = equal, not 0, both < 255; neg = different, both < 255.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caee.method.affinity import pair_indices, pair_label_targets
from caee.stages.label_cache import CellLabelDataset, ensure_cell_tables
from caee.method.affinity_labels import cell_label_table, cell_table_from_cams, cells_from_table
from caee.core.config import AffinityTrainConfig, CrfConfig, DataConfig, load_config
from caee.data import load_split
from caee.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AffinityAugment, CropBox, random_crop_box
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, save_cam_npz, save_label_png
from caee.core.layout import cell_label_dir

RADIUS = 5


# ---------------------------------------------------------------- PSA's procedure


def psa_crop(arr: np.ndarray, box: CropBox, crop: int) -> np.ndarray:
    """(H, W, C) -> (crop, crop, C) float32, zeros outside the box (PSA's container)."""
    out = np.zeros((crop, crop, arr.shape[-1]), np.float32)
    out[box.cont_top:box.cont_top + box.height, box.cont_left:box.cont_left + box.width] = \
        arr[box.img_top:box.img_top + box.height, box.img_left:box.img_left + box.width]
    return out


def psa_cell_labels(la: np.ndarray, ha: np.ndarray, box: CropBox, flip: bool, crop: int, stride: int = 8) -> np.ndarray:
    """PSA's label map of a crop, labels = channel indices (0 = background)."""
    stack = np.concatenate([la, ha], axis=0).transpose(1, 2, 0)
    stack = psa_crop(stack, box, crop)
    if flip:
        stack = np.fliplr(stack)
    n = crop // stride
    pooled = stack.reshape(n, stride, n, stride, -1).mean(axis=(1, 3))
    no_score = pooled.max(-1) < 1e-5
    la_p, ha_p = np.split(pooled, 2, axis=-1)
    la_arg, ha_arg = la_p.argmax(-1), ha_p.argmax(-1)
    label = la_arg.astype(np.uint8)
    label[la_arg == 0] = 255
    label[ha_arg == 0] = 0
    label[no_score] = 255
    return label


def psa_pair_masks(label: np.ndarray, radius: int = RADIUS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_offsets * n_from,) bool masks, offset-major."""
    r0 = radius - 1
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-r0, radius) if dy * dy + dx * dx < radius ** 2]
    h, w = label.shape
    src = label[:h - r0, r0:w - r0].reshape(-1)
    dst = np.stack([label[dy:dy + h - r0, r0 + dx:r0 + dx + w - 2 * r0].reshape(-1) for dy, dx in offsets])
    valid = (src < 255) & (dst < 255)
    same = src == dst
    return ((same & (src == 0)).reshape(-1), (same & (src != 0) & valid).reshape(-1), (~same & valid).reshape(-1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(0, keepdims=True))
    return (p / p.sum(0, keepdims=True)).astype(np.float32)


def _la_ha(rng, n_labels: int, h: int, w: int, patch: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Random la / ha posteriors over n_labels (channel 0 = background): patches of ``patch``
    pixels (not aligned with the cells) with their own logits, plus per-pixel noise, so that cells
    mix labels; la favours the background, ha the classes (as low / high alphas do)."""
    coarse = rng.normal(0, 2.0, (n_labels, h // patch + 1, w // patch + 1))
    logits = np.kron(coarse, np.ones((1, patch, patch)))[:, :h, :w]
    bias = np.zeros((n_labels, 1, 1))
    bias[0] = 1.0
    return (_softmax(logits + bias + rng.normal(0, 1.0, logits.shape)),
            _softmax(logits - bias + rng.normal(0, 1.0, logits.shape)))


def _ours(la, ha, lut, box, flip, crop, stride=8):
    table = cell_label_table(la, ha, stride, lut)
    return cells_from_table(table, box, flip, crop, stride)


# ---------------------------------------------------------------- cell labels and pair targets


@pytest.mark.parametrize("size", [(70, 95), (100, 63), (41, 41), (96, 120)])
def test_pair_targets_equal_psa_pipeline_for_random_crops(size):
    rng = np.random.default_rng(sum(size))
    h, w = size
    crop, stride = 80, 8
    lut = np.array([0, 4, 9])  # background and classes 4 and 9 (0-based 3 and 8)
    la, ha = _la_ha(rng, 3, h, w)
    table = cell_label_table(la, ha, stride, lut)
    assert table.shape == (h + stride - 1, w + stride - 1)
    gen = torch.Generator().manual_seed(0)
    from_idx, to_idx = pair_indices(crop // stride, crop // stride, RADIUS, psa_border=True)
    differs_from_top_left = 0
    counts = np.zeros(3, int)
    for k in range(12):
        box = random_crop_box(h, w, crop, gen)
        flip = bool(k % 2)
        expected = psa_cell_labels(la, ha, box, flip, crop, stride)
        ours = cells_from_table(table, box, flip, crop, stride)
        # the same cells, labels mapped from channel index to class id
        np.testing.assert_array_equal(ours, np.where(expected == 255, 255, lut[np.minimum(expected, 2)]))
        bg, fg, neg = pair_label_targets(torch.from_numpy(ours)[None], from_idx, to_idx)
        e_bg, e_fg, e_neg = psa_pair_masks(expected)
        np.testing.assert_array_equal(bg[0].numpy(), e_bg)
        np.testing.assert_array_equal(fg[0].numpy(), e_fg)
        np.testing.assert_array_equal(neg[0].numpy(), e_neg)
        counts += [int(e_bg.sum()), int(e_fg.sum()), int(e_neg.sum())]
        # the earlier rule (argmax per pixel, top-left pixel per cell) gives other labels here
        la_px, ha_px = lut[la.argmax(0)], lut[ha.argmax(0)]
        merged = np.where(la_px == 0, 255, la_px)
        merged[ha_px == 0] = 0
        top_left = psa_crop(merged[..., None].astype(np.float32), box, crop)[..., 0]
        top_left[:box.cont_top] = 255
        top_left[box.cont_top + box.height:] = 255
        top_left[:, :box.cont_left] = 255
        top_left[:, box.cont_left + box.width:] = 255
        top_left = top_left[::stride, ::stride]
        differs_from_top_left += int(((np.fliplr(top_left) if flip else top_left) != ours).sum())
    assert (counts > 0).all()  # every kind of pair was compared
    assert differs_from_top_left > 0


def test_padding_cells_partial_cells_and_no_score_rule():
    """An image smaller than the crop: cells of padding only are 255; cells half on the image take
    the argmax of the image part; a (nonsensical) all-zero posterior has no score either."""
    rng = np.random.default_rng(3)
    h, w, crop, stride = 20, 27, 48, 8
    la, ha = _la_ha(rng, 2, h, w, patch=4)
    la[:, :4, :4] = 0
    ha[:, :4, :4] = 0  # one corner scores nothing at all
    box = CropBox(cont_top=13, cont_left=5, img_top=0, img_left=0, height=h, width=w)
    for flip in (False, True):
        expected = psa_cell_labels(la, ha, box, flip, crop, stride)
        ours = _ours(la, ha, np.array([0, 1]), box, flip, crop, stride)
        np.testing.assert_array_equal(ours, expected)
    ours = _ours(la, ha, np.array([0, 1]), box, False, crop, stride)
    assert (ours[0] == 255).all() and (ours[:, 5] == 255).all()  # rows 0..7 and columns 40..47: padding only
    assert ours[1, 0] == 255  # the cell holding the zero corner (rows 13..16, columns 5..7 of the image part)
    assert (ours[1:5, :4] != 255).any()


def test_table_is_exact_at_every_offset():
    """Every window of the table equals PSA's pooled rule on the window cut from the posteriors."""
    rng = np.random.default_rng(7)
    h, w, s = 13, 17, 4
    la, ha = _la_ha(rng, 4, h, w, patch=3)
    table = cell_label_table(la, ha, s)
    pad = ((0, 0), (s - 1, s - 1), (s - 1, s - 1))
    la_p, ha_p = np.pad(la, pad), np.pad(ha, pad)
    for a in range(h + s - 1):
        for b in range(w + s - 1):
            lw, hw = la_p[:, a:a + s, b:b + s].mean((1, 2)), ha_p[:, a:a + s, b:b + s].mean((1, 2))
            label = 255 if lw.argmax() == 0 else lw.argmax()
            label = 0 if hw.argmax() == 0 else label
            assert table[a, b] == label, (a, b)


def test_cell_table_from_cams_uses_both_crf_posteriors():
    pytest.importorskip("pydensecrf")
    from caee.method.affinity_labels import cam_crf_scores
    from caee.method.crf import dense_crf
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    cams = rng.random((2, 24, 30)).astype(np.float32)
    keys = np.array([2, 5])
    params = CrfConfig()
    table = cell_table_from_cams(image, keys, cams, 4, 24, 8, params)
    la = dense_crf(image, cam_crf_scores(cams, 4), params)
    ha = dense_crf(image, cam_crf_scores(cams, 24), params)
    np.testing.assert_array_equal(table, cell_label_table(la, ha, 8, np.array([0, 3, 6])))
    assert set(np.unique(table)) <= {0, 3, 6, 255}
    # no classes: background everywhere
    assert (cell_table_from_cams(image, np.zeros(0, int), np.zeros((0, 24, 30), np.float32), 4, 24, 8) == 0).all()


# ---------------------------------------------------------------- the training data pipeline


def _root(tmp_path, h, w):
    """One image whose pixel values encode their position, in a VOC layout."""
    from PIL import Image
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([ys * 5 % 256, xs * 3 % 256, (ys + 7 * xs) % 256], -1).astype(np.uint8)
    Image.fromarray(image).save(root / "JPEGImages" / "a.png")
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 5:25] = 4
    mask[18:, 30:] = 9
    save_label_png(root / "SegmentationClassAug" / "a.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n")
    return root, image


def test_training_pipeline_has_psa_crop_geometry(tmp_path):
    """No rescale, zero (black) padding, one box for the image and the scores, flipped together."""
    h, w, crop, stride = 37, 61, 48, 8   # rows: smaller than the crop; columns: larger
    root, image = _root(tmp_path, h, w)
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    rng = np.random.default_rng(1)
    la, ha = _la_ha(rng, 3, h, w)
    lut = np.array([0, 4, 9])
    save_label_png(tmp_path / "cells" / "a.png", cell_label_table(la, ha, stride, lut))
    ds = CellLabelDataset(index, tmp_path / "cells", AffinityAugment(crop, hflip=True, color_jitter=[0, 0, 0, 0]), stride)
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        item = ds[0]
        *box_list, flip = item["crop_box"].tolist()
        box = CropBox(*box_list)
        seen.add((box.cont_top, box.img_left, flip))
        # PSA's box: rows placed at a random offset (image 0), columns cut at a random offset (container 0)
        assert (box.height, box.width, box.img_top, box.cont_left) == (h, crop, 0, 0)
        assert 0 <= box.cont_top <= crop - h and 0 <= box.img_left <= w - crop
        raw = psa_crop(image.astype(np.float32), box, crop)  # black padding on the raw pixels
        raw = np.fliplr(raw) if flip else raw
        expected_image = ((raw / 255.0 - mean) / std).transpose(2, 0, 1)
        assert item["image"].shape == (3, crop, crop)
        np.testing.assert_allclose(item["image"].numpy(), expected_image, atol=1e-5)
        expected = psa_cell_labels(la, ha, box, bool(flip), crop, stride)
        np.testing.assert_array_equal(item["aff_label"].numpy(),
                                      np.where(expected == 255, 255, lut[np.minimum(expected, 2)]))
    assert len({s[2] for s in seen}) == 2 and len({s[0] for s in seen}) > 3 and len({s[1] for s in seen}) > 3


def test_crop_box_distribution_matches_psa():
    gen = torch.Generator().manual_seed(0)
    boxes = [random_crop_box(30, 50, 40, gen) for _ in range(400)]
    assert {b.cont_top for b in boxes} == set(range(11)) and {b.img_top for b in boxes} == {0}
    assert {b.img_left for b in boxes} == set(range(11)) and {b.cont_left for b in boxes} == {0}
    assert random_crop_box(40, 40, 40, gen) == CropBox(0, 0, 0, 0, 40, 40)


def test_table_of_wrong_size_is_refused(tmp_path):
    root, _ = _root(tmp_path, 20, 30)
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    save_label_png(tmp_path / "cells" / "a.png", np.zeros((20, 30), np.uint8))
    ds = CellLabelDataset(index, tmp_path / "cells", AffinityAugment(16), 8)
    with pytest.raises(CaeeError, match="cell label table is 30x20, expected 37x27"):
        ds[0]


def test_ensure_cell_tables_computes_missing_ones_and_keeps_existing(tmp_path):
    pytest.importorskip("pydensecrf")
    root, image = _root(tmp_path, 24, 40)
    index = load_split(DataConfig(dataset="voc", root=str(root)), "train")
    cam_dir = tmp_path / "work" / "cam_cgnet"
    cams = np.zeros((2, 24, 40), np.float32)
    cams[0, 5:15, 5:25] = 1.0
    cams[1, 18:, 30:] = 0.3
    save_cam_npz(cam_dir / "a.npz", np.array([3, 8]), cams)
    out = ensure_cell_tables(index, cam_dir, 4, 24, 8, CrfConfig(workers=1))
    assert out == cell_label_dir(cam_dir, 4, 24, 8) == tmp_path / "work" / "cam_cgnet_cells_4_24_s8"
    expected = cell_table_from_cams(image, np.array([3, 8]), cams, 4, 24, 8, CrfConfig())
    np.testing.assert_array_equal(load_label_png(out / "a.png"), expected)
    assert {0, 4} <= set(np.unique(expected))
    save_label_png(out / "a.png", np.full((31, 47), 9, np.uint8))
    ensure_cell_tables(index, cam_dir, 4, 24, 8, CrfConfig(workers=1))
    assert (load_label_png(out / "a.png") == 9).all()
    # tables made with other CRF settings are refused, naming the key; overwrite recomputes them
    with pytest.raises(CaeeError, match=r"crf.min_prob: 1e-05 -> 0.001.*train_affinity.overwrite=true"):
        ensure_cell_tables(index, cam_dir, 4, 24, 8, CrfConfig(workers=1, min_prob=1e-3))
    assert (load_label_png(out / "a.png") == 9).all()
    ensure_cell_tables(index, cam_dir, 4, 24, 8, CrfConfig(workers=1, min_prob=1e-3), overwrite=True)
    redone = cell_table_from_cams(image, np.array([3, 8]), cams, 4, 24, 8, CrfConfig(min_prob=1e-3))
    np.testing.assert_array_equal(load_label_png(out / "a.png"), redone)


# ---------------------------------------------------------------- configured defaults


def test_official_affinity_and_random_walk_defaults():
    tc = AffinityTrainConfig()
    assert tc.resize_long == [0, 0] and tc.label_rule == "psa" and tc.crop_size == 448 and tc.psa_border
    for path in ("configs/voc/r38.yaml", "configs/coco/r38.yaml"):
        cfg = load_config(path)
        assert cfg.train_affinity.resize_long == [0, 0] and cfg.train_affinity.label_rule == "psa"
        assert cfg.pseudo_labels.psa_border and cfg.train_affinity.psa_border
        # PSA's train_cls.py / train_aff.py: lr 0.1, SGD momentum = the weight decay (5e-4)
        assert (cfg.train_classifier.lr, cfg.train_classifier.momentum, cfg.train_classifier.weight_decay) == (0.1, 5e-4, 5e-4)
        assert (cfg.train_affinity.lr, cfg.train_affinity.momentum) == (0.1, 5e-4)
        assert (cfg.train_affinity.la_alpha, cfg.train_affinity.ha_alpha, cfg.pseudo_labels.alpha) == (4, 24, 16)
