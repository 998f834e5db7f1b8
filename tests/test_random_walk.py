import pytest
import torch
import torch.nn.functional as F

import numpy as np

from caee.method.affinity import pair_indices
from caee.core.errors import CaeeError
from caee.method.pseudo_labels import WalkParams, labels_from_scores, random_walk_scores
from caee.method.random_walk import cam_scores_with_background, dense_random_walk_reference, random_walk, transition_matrix
from references import pairwise_affinity


@pytest.fixture(autouse=True)
def _single_thread():
    """The matrices here are tiny: hundreds of sparse products whose OpenMP start-up dominates,
    and on a busy machine waiting for the threads takes milliseconds per product."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def _random_case(h, w, k, psa_border, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 4, h, w, generator=g, dtype=dtype)
    f, t = pair_indices(h, w, psa_border=psa_border)
    aff = pairwise_affinity(feats, f, t)[0]
    scores = torch.rand(k, h, w, generator=g, dtype=dtype)
    return scores, aff, f, t


def test_transition_matrix_by_hand_1x3():
    f, t = pair_indices(1, 3, radius=2, psa_border=False)
    assert f.tolist() == [0, 1] and t.tolist() == [1, 2]
    T = transition_matrix(torch.tensor([0.5, 0.8], dtype=torch.float64), f, t, 3, beta=2.0)
    a = torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.0, 0.64], [0.0, 0.64, 1.0]], dtype=torch.float64)
    expected = a / torch.tensor([[1.25, 1.89, 1.64]], dtype=torch.float64)  # column sums
    assert T.layout == torch.sparse_csc
    assert torch.allclose(T.to_dense(), expected, atol=1e-15)


@pytest.mark.parametrize("psa_border", [True, False])
@pytest.mark.parametrize("h,w", [(7, 9), (12, 12), (9, 14)])
def test_transition_matrix_columns_sum_to_one(h, w, psa_border):
    _, aff, f, t = _random_case(h, w, 1, psa_border, seed=h * w)
    T = transition_matrix(aff, f, t, h * w).to_dense()
    assert torch.allclose(T.sum(0), torch.ones(h * w, dtype=torch.float64), atol=1e-12)
    assert (T.diagonal() > 0).all()
    # symmetric before normalisation: T * colsum is symmetric
    a = T * (T.diagonal() ** -1)  # diagonal of A^beta is 1, so colsum_j = 1 / T[j, j]
    assert torch.allclose(a, a.t(), atol=1e-12)


def test_transition_matrix_batched_is_block_diagonal():
    h, w = 7, 9
    _, aff1, f, t = _random_case(h, w, 1, True, seed=1)
    _, aff2, _, _ = _random_case(h, w, 1, True, seed=2)
    T = transition_matrix(torch.stack([aff1, aff2]), f, t, h * w).to_dense()
    expected = torch.block_diag(transition_matrix(aff1, f, t, h * w).to_dense(),
                                transition_matrix(aff2, f, t, h * w).to_dense())
    assert torch.allclose(T, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("psa_border", [True, False])
@pytest.mark.parametrize("h,w,k,steps", [(7, 9, 1, 256), (12, 12, 4, 256), (9, 14, 21, 64), (8, 10, 3, 1)])
def test_random_walk_matches_dense_reference(h, w, k, steps, psa_border):
    scores, aff, f, t = _random_case(h, w, k, psa_border, seed=h + w + k)
    ref = dense_random_walk_reference(scores, aff, f, t, beta=8.0, steps=steps)
    out = random_walk(scores, transition_matrix(aff, f, t, h * w, beta=8.0), steps=steps)
    assert out.shape == (k, h, w) and out.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(out.argmax(0), ref.argmax(0))


def test_random_walk_float32_close_to_float64_reference():
    scores, aff, f, t = _random_case(12, 12, 5, True, seed=3)
    ref = dense_random_walk_reference(scores, aff, f, t)
    out = random_walk(scores.float(), transition_matrix(aff.float(), f, t, 144))
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_random_walk_batched_equals_per_image_and_squarings():
    h, w = 7, 9
    s1, a1, f, t = _random_case(h, w, 3, True, seed=10)
    s2, a2, _, _ = _random_case(h, w, 3, True, seed=11)
    T = transition_matrix(torch.stack([a1, a2]), f, t, h * w)
    out = random_walk(torch.stack([s1, s2]), T, steps=32)
    assert out.shape == (2, 3, h, w)
    assert torch.allclose(out[0], dense_random_walk_reference(s1, a1, f, t, steps=32), atol=1e-12)
    assert torch.allclose(out[1], dense_random_walk_reference(s2, a2, f, t, steps=32), atol=1e-12)
    assert torch.allclose(random_walk(torch.stack([s1, s2]), T, steps=32, squarings=2), out, atol=1e-12)


def test_random_walk_accepts_other_layouts_and_keeps_constants():
    scores, aff, f, t = _random_case(7, 9, 2, False, seed=4)
    T = transition_matrix(aff, f, t, 63)
    ref = random_walk(scores, T, steps=16)
    for other in (T.to_dense(), T.to_dense().to_sparse(), T.to_dense().to_sparse_csr()):
        assert torch.allclose(random_walk(scores, other, steps=16), ref, atol=1e-13)
    # columns of T sum to 1, so a constant map is a fixed point of X -> X T
    const = torch.full((1, 7, 9), 0.3, dtype=torch.float64)
    assert torch.allclose(random_walk(const, T, steps=256), const, atol=1e-12)


def test_random_walk_bad_input():
    scores, aff, f, t = _random_case(7, 9, 2, False, seed=5)
    T = transition_matrix(aff, f, t, 63)
    with pytest.raises(CaeeError):
        random_walk(scores[:, :6], T)
    with pytest.raises(CaeeError):
        dense_random_walk_reference(scores, aff, f, t, steps=100)
    with pytest.raises(CaeeError):
        transition_matrix(aff, f, t, 50)


def test_cam_scores_with_background_by_hand():
    cams = torch.tensor([[[0.2, 0.4, 1.0],
                          [0.0, 0.6, 0.5],
                          [0.8, 0.1, 0.3]]], dtype=torch.float64)
    out = cam_scores_with_background(cams, alpha=2.0, stride=2)
    # bg = (1 - c)^2 = [[.64, .36, 0], [1, .16, .25], [.04, .81, .49]]; zero-padded to 4x4, 2x2 means
    expected = torch.tensor([[[0.54, 0.0625], [0.2125, 0.1225]],
                             [[0.3, 0.375], [0.225, 0.075]]], dtype=torch.float64)
    assert out.shape == (2, 2, 2)
    assert torch.allclose(out, expected, atol=1e-12)


def test_cam_scores_background_uses_max_over_classes():
    cams = torch.tensor([[[0.5, 0.0]], [[0.25, 0.75]]], dtype=torch.float64)  # (2, 1, 2)
    out = cam_scores_with_background(cams, alpha=3.0, stride=1)
    assert torch.allclose(out[0], torch.tensor([[0.125, 0.015625]], dtype=torch.float64))
    assert torch.equal(out[1:], cams)
    empty = cam_scores_with_background(torch.zeros(0, 9, 17), alpha=16.0, stride=8)
    assert empty.shape == (1, 2, 3)
    # bottom/right cells are mostly padding: mean of ones over 1x8 and 1x1 real pixels of 64
    assert empty[0, 0, 0].item() == 1.0 and empty[0, 1, 2].item() == pytest.approx(1 / 64)


def test_walk_fills_region_and_stops_at_boundary():
    hh, ww = 48, 64
    h, w = 6, 8
    feats = torch.zeros(3, h, w)
    feats[:, :, 4:] = 1.0  # left and right halves differ: affinity exp(-1) across, 1 within
    cams = torch.zeros(1, hh, ww)
    cams[0, :, :32] = 0.5
    cams[0, 8:16, 8:16] = 0.0  # holes in the object the walk should fill
    cams[0, 32:40, 16:24] = 0.0
    scores = random_walk_scores(feats, cams, WalkParams(alpha=16.0, beta=8.0, steps=256, psa_border=False), 8)
    lab = labels_from_scores(scores.numpy(), np.array([6]))
    assert lab.dtype == np.uint8 and lab.shape == (hh, ww)
    assert (lab[:, :24] == 7).all()
    assert (lab[:, 40:] == 0).all()
    assert set(np.unique(lab).tolist()) <= {0, 7}


def test_walk_labels_match_dense_pipeline():
    g = torch.Generator().manual_seed(7)
    hh, ww = 75, 98  # not multiples of 8: feature grid ceil -> 10 x 13
    h, w = 10, 13
    feats = torch.randn(1, 8, h, w, generator=g, dtype=torch.float64)
    f, t = pair_indices(h, w, 5, psa_border=True)
    aff = pairwise_affinity(feats, f, t)[0]
    cams = torch.rand(3, hh, ww, generator=g, dtype=torch.float64)
    keys = np.array([0, 4, 19])
    scores = random_walk_scores(feats[0], cams, WalkParams(alpha=16.0, beta=8.0, steps=64, psa_border=True), 8)
    lab = labels_from_scores(scores.numpy(), keys)
    rw = dense_random_walk_reference(cam_scores_with_background(cams, 16.0, 8), aff, f, t, beta=8.0, steps=64)
    up = F.interpolate(rw[None], size=(80, 104), mode="bilinear", align_corners=False)[0, :, :hh, :ww]
    expected = torch.tensor([0, 1, 5, 20])[up.argmax(0)].to(torch.uint8).numpy()
    np.testing.assert_array_equal(lab, expected)
    assert set(np.unique(lab).tolist()) <= {0, 1, 5, 20}
    with pytest.raises(CaeeError):
        labels_from_scores(scores.numpy(), keys[:2])


def test_cached_transition_pattern_gives_the_same_matrix():
    """The sparsity pattern is shared by every image of a grid size: building T from a cached one
    gives exactly the matrix built from scratch, for one image and for a batch."""
    from caee.method.random_walk import transition_pattern

    fi, ti = pair_indices(7, 9, 3, False)
    torch.manual_seed(0)
    for aff in (torch.rand(fi.numel()), torch.rand(3, fi.numel())):
        nb = 1 if aff.dim() == 1 else aff.shape[0]
        fresh = transition_matrix(aff, fi, ti, 63, 8.0)
        cached = transition_matrix(aff, fi, ti, 63, 8.0, transition_pattern(fi, ti, 63, nb))
        torch.testing.assert_close(cached.to_dense(), fresh.to_dense(), rtol=0, atol=0)
    with pytest.raises(CaeeError, match="pattern"):
        transition_matrix(torch.rand(2, fi.numel()), fi, ti, 63, 8.0, transition_pattern(fi, ti, 63, 1))
