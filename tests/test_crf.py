import builtins

import numpy as np
import pytest

from caee.method import crf as crf_mod
from caee.core.config import CrfConfig
from caee.method.crf import crf_cam_labels, crf_labels_from_scores, dense_crf
from caee.core.errors import CaeeError

H = W = 40
EDGE = 20


def _red_blue():
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :EDGE] = (220, 30, 30)
    img[:, EDGE:] = (30, 30, 220)
    return img


def _ramp(cross):
    """(2, H, W) [bg, fg] scores: fg rises slowly along x, crossing 0.5 at column ``cross``."""
    fg = np.clip(0.5 + (np.arange(W) - cross + 0.5) / 40.0, 0.01, 0.99)
    fg = np.broadcast_to(fg, (H, W)).astype(np.float32)
    return np.stack([1 - fg, fg])


def test_params_defaults():
    p = CrfConfig()
    assert (p.iterations, p.gaussian_sxy, p.gaussian_compat) == (10, 3, 3)
    assert (p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat) == (80, 13, 10)


@pytest.mark.parametrize("cross", [15, 17, 23, 25])
def test_crf_snaps_boundary_to_colour_edge(cross):
    probs = _ramp(cross)
    before = probs.argmax(0)
    assert (before[:, :cross] == 0).all() and (before[:, cross:] == 1).all()
    q = dense_crf(_red_blue(), probs)
    assert q.shape == (2, H, W) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    after = q.argmax(0)
    assert (after[:, :EDGE] == 0).all() and (after[:, EDGE:] == 1).all()


def test_flat_image_has_no_boundary_at_the_edge_column():
    # Control: the same scores on a flat grey image do not produce the column-20 boundary.
    after = dense_crf(np.full((H, W, 3), 128, np.uint8), _ramp(24)).argmax(0)
    assert not ((after[:, :EDGE] == 0).all() and (after[:, EDGE:] == 1).all())


def test_unnormalised_scores_give_same_posterior():
    probs = _ramp(23)
    np.testing.assert_allclose(dense_crf(_red_blue(), probs * 3.7), dense_crf(_red_blue(), probs), atol=1e-5)


def test_crf_cam_labels_values_and_edge():
    rng = np.random.default_rng(0)
    keys = np.array([14, 2])
    cams = np.zeros((2, H, W), np.float32)
    cams[0] = _ramp(23)[1] * (rng.random((H, W)) * 0.2 + 0.8)   # right half: class 14
    cams[1, :8, :8] = 0.02                                        # tiny, loses everywhere
    lab = crf_cam_labels(_red_blue(), keys, cams, alpha=8)
    assert lab.dtype == np.uint8 and lab.shape == (H, W)
    assert set(np.unique(lab).tolist()) <= {0, 15, 3}
    assert (lab[:, EDGE:] == 15).all() and (lab[:, :EDGE] == 0).all()
    assert (crf_cam_labels(_red_blue(), np.zeros(0, np.int64), np.zeros((0, H, W)), 4) == 0).all()


def test_alpha_controls_background_size():
    # bg = (1 - cam)^alpha: a larger alpha shrinks the background.
    img = np.full((H, W, 3), 128, np.uint8)
    cams = np.full((1, H, W), 0.1, np.float32)
    assert (crf_cam_labels(img, [0], cams, alpha=2) == 0).all()       # 0.81 vs 0.1
    assert (crf_cam_labels(img, [0], cams, alpha=32) == 1).all()      # 0.034 vs 0.1


def test_crf_labels_from_scores_label_values():
    probs = _ramp(23)
    lab = crf_labels_from_scores(_red_blue(), probs)
    np.testing.assert_array_equal(lab, dense_crf(_red_blue(), probs).argmax(0))
    lab2 = crf_labels_from_scores(_red_blue(), probs, label_values=[7, 200])
    np.testing.assert_array_equal(lab2, np.where(lab == 0, 7, 200))
    with pytest.raises(CaeeError):
        crf_labels_from_scores(_red_blue(), probs, label_values=[1])


def test_bad_shapes():
    with pytest.raises(CaeeError):
        dense_crf(_red_blue()[:10], _ramp(20))
    with pytest.raises(CaeeError):
        crf_cam_labels(_red_blue(), [1, 2], np.zeros((1, H, W)), 4)


def test_missing_pydensecrf_raises_lazily(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CaeeError, match="pip install pydensecrf2"):
        crf_mod.dense_crf(_red_blue(), _ramp(20))
