import math

import pytest
import torch

from caee.method.affinity import (affinity_loss, confident_labels, downsample_labels, pair_indices,
                           pair_label_targets, pair_offsets)
from caee.core.errors import CaeeError
from references import pairwise_affinity


def test_offsets_radius5_count_order_and_shape():
    offs = pair_offsets(5)
    assert len(offs) == 34
    assert len(set(offs)) == 34
    assert offs[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    # dy = 1 and dy = 2 keep all nine dx (1 + 16 < 25, 4 + 16 < 25); dy = 3 keeps |dx| <= 3; dy = 4 |dx| <= 2
    assert offs[4:13] == [(1, dx) for dx in range(-4, 5)]
    assert offs[13:22] == [(2, dx) for dx in range(-4, 5)]
    assert offs[22:29] == [(3, dx) for dx in range(-3, 4)]
    assert offs[29:] == [(4, dx) for dx in range(-2, 3)]
    # half neighbourhood: every offset points forward in raster order, none is its own mirror
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offs)
    assert not {(-dy, -dx) for dy, dx in offs} & set(offs)


def test_offsets_small_radius():
    assert pair_offsets(1) == []
    assert pair_indices(4, 4, radius=1)[0].numel() == 0
    assert pair_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    with pytest.raises(CaeeError):
        pair_offsets(0)


def _brute_pairs(h, w, radius, psa_border):
    froms, tos = [], []
    for dy, dx in pair_offsets(radius):
        for y in range(h):
            for x in range(w):
                if psa_border:
                    ok = y <= h - radius and radius - 1 <= x <= w - radius
                else:
                    ok = 0 <= y + dy < h and 0 <= x + dx < w
                if ok:
                    froms.append(y * w + x)
                    tos.append((y + dy) * w + x + dx)
    return froms, tos


@pytest.mark.parametrize("h,w", [(6, 11), (9, 7), (5, 13), (12, 12), (3, 4), (1, 1)])
@pytest.mark.parametrize("radius", [5, 3])
@pytest.mark.parametrize("psa_border", [True, False])
def test_pair_indices_match_brute_force(h, w, radius, psa_border):
    f, t = pair_indices(h, w, radius, psa_border)
    bf, bt = _brute_pairs(h, w, radius, psa_border)
    assert f.dtype == torch.long and t.dtype == torch.long
    assert f.tolist() == bf
    assert t.tolist() == bt
    if f.numel():
        assert int(t.max()) < h * w and int(f.min()) >= 0


def test_pair_indices_psa_count_and_uniqueness():
    h, w = 10, 14
    f, t = pair_indices(h, w)
    assert f.numel() == 34 * (h - 4) * (w - 8)
    full_f, full_t = pair_indices(h, w, psa_border=False)
    keys = set(zip(full_f.tolist(), full_t.tolist()))
    assert len(keys) == full_f.numel()
    assert set(zip(f.tolist(), t.tolist())) <= keys  # PSA's set is a subset of all in-grid pairs
    # pixel (0, 0) is in the left border: no pair starts there under PSA's rule
    assert 0 not in set(f.tolist())


def test_confident_labels_hand_map():
    la = torch.tensor([[0, 0, 3, 3],
                       [0, 5, 3, 255],
                       [5, 5, 0, 3],
                       [255, 5, 5, 0]], dtype=torch.uint8)
    ha = torch.tensor([[0, 3, 3, 0],
                       [0, 5, 0, 3],
                       [5, 0, 0, 255],
                       [0, 5, 5, 3]], dtype=torch.uint8)
    expected = torch.tensor([[0, 255, 3, 0],      # la bg & ha bg -> 0; la bg & ha fg -> 255; ha bg wins over la fg
                             [0, 5, 0, 255],      # la 255 -> 255 even though ha says 3
                             [5, 0, 0, 255],      # ha 255 -> 255 even though la says 3
                             [255, 5, 5, 255]],   # la 255 beats ha bg; la bg & ha fg -> 255
                            dtype=torch.uint8)
    la_before, ha_before = la.clone(), ha.clone()
    out = confident_labels(la, ha)
    assert out.dtype == torch.uint8
    assert torch.equal(out, expected)
    assert torch.equal(la, la_before) and torch.equal(ha, ha_before)  # inputs untouched
    with pytest.raises(CaeeError):
        confident_labels(la, ha[:3])


def test_downsample_labels_takes_cell_top_left():
    lab = torch.arange(17 * 10, dtype=torch.long).view(17, 10)
    ds = downsample_labels(lab, 8)
    assert ds.shape == (3, 2)  # ceil(17/8), ceil(10/8)
    assert ds.tolist() == [[0, 8], [80, 88], [160, 168]]
    batch = torch.stack([lab, lab + 1]).to(torch.uint8)
    assert downsample_labels(batch, 4).shape == (2, 5, 3)
    assert downsample_labels(batch, 4).dtype == torch.uint8


def test_pair_label_targets_hand_made():
    lab = torch.tensor([[[0, 0, 2],
                         [2, 255, 3]]])
    # flat: 0:0 1:0 2:2 3:2 4:255 5:3
    f = torch.tensor([0, 0, 2, 2, 1, 5, 3, 4])
    t = torch.tensor([1, 2, 3, 5, 4, 5, 0, 4])
    bg, fg, neg = pair_label_targets(lab, f, t)
    assert bg.shape == fg.shape == neg.shape == (1, 8)
    assert bg[0].tolist() == [True, False, False, False, False, False, False, False]
    assert fg[0].tolist() == [False, False, True, False, False, True, False, False]
    assert neg[0].tolist() == [False, True, False, True, False, False, True, False]
    # a batch of two: the second image swaps classes
    lab2 = torch.cat([lab, torch.where(lab == 0, 2, torch.where(lab == 2, 0, lab))])
    bg2, fg2, neg2 = pair_label_targets(lab2, f, t)
    assert bg2[1].tolist() == [False, False, True, False, False, False, False, False]
    assert fg2[1].tolist() == [True, False, False, False, False, True, False, False]
    assert torch.equal(neg2[1], neg[0])


def test_pairwise_affinity_against_loop():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    f, t = pair_indices(4, 6, radius=3, psa_border=False)
    aff = pairwise_affinity(feats, f, t)
    assert aff.shape == (2, f.numel())
    flat = feats.detach().flatten(2)
    for b in range(2):
        for p in range(f.numel()):
            expected = math.exp(-float((flat[b, :, f[p]] - flat[b, :, t[p]]).abs().mean()))
            assert aff[b, p].item() == pytest.approx(expected, rel=1e-12)
    aff.sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_affinity_loss_three_pairs_by_hand():
    aff = torch.tensor([[0.8, 0.6, 0.3]], dtype=torch.float64)
    bg = torch.tensor([[True, False, False]])
    fg = torch.tensor([[False, True, False]])
    neg = torch.tensor([[False, False, True]])
    loss, terms = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    l_bg = -math.log(0.8 + eps) / (1 + eps)       # 0.2231...
    l_fg = -math.log(0.6 + eps) / (1 + eps)       # 0.5108...
    l_neg = -math.log(1 + eps - 0.3) / (1 + eps)  # 0.3566...
    assert terms["bg"].item() == pytest.approx(l_bg, rel=1e-12)
    assert terms["fg"].item() == pytest.approx(l_fg, rel=1e-12)
    assert terms["neg"].item() == pytest.approx(l_neg, rel=1e-12)
    assert loss.item() == pytest.approx(l_bg / 4 + l_fg / 4 + l_neg / 2, rel=1e-12)
    assert loss.item() == pytest.approx(0.361812, abs=1e-6)


def test_affinity_loss_counts_over_batch_and_empty_terms():
    aff = torch.tensor([[0.5, 0.9], [0.7, 0.1]], dtype=torch.float64, requires_grad=True)
    bg = torch.tensor([[True, False], [True, False]])
    fg = torch.zeros(2, 2, dtype=torch.bool)
    neg = torch.tensor([[False, True], [False, True]])
    loss, terms = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    l_bg = (-math.log(0.5 + eps) - math.log(0.7 + eps)) / (2 + eps)
    l_neg = (-math.log(1 + eps - 0.9) - math.log(1 + eps - 0.1)) / (2 + eps)
    assert terms["bg"].item() == pytest.approx(l_bg, rel=1e-12)
    assert terms["fg"].item() == 0.0
    assert terms["neg"].item() == pytest.approx(l_neg, rel=1e-12)
    assert loss.item() == pytest.approx(l_bg / 4 + l_neg / 2, rel=1e-12)
    loss.backward()
    # d/da of -log(a+eps)/(2+eps)/4 at a = 0.5
    assert aff.grad[0, 0].item() == pytest.approx(-1 / (0.5 + eps) / (2 + eps) / 4, rel=1e-10)
    # d/da of -log(1+eps-a)/(2+eps)/2 at a = 0.9
    assert aff.grad[0, 1].item() == pytest.approx(1 / (1 + eps - 0.9) / (2 + eps) / 2, rel=1e-10)


def test_affinity_loss_finite_at_extremes():
    aff = torch.tensor([[0.0, 1.0]])
    loss, _ = affinity_loss(aff, torch.tensor([[True, False]]), torch.zeros(1, 2, dtype=torch.bool),
                            torch.tensor([[False, True]]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("psa_border", [True, False])
@pytest.mark.parametrize("h, w, radius", [(7, 9, 5), (12, 12, 5), (9, 14, 3), (4, 4, 5)])
def test_offset_affinity_equals_the_gathered_pairs(h, w, radius, psa_border):
    from caee.method.affinity import offset_affinity
    feats = torch.randn(2, 6, h, w, requires_grad=True)
    from_idx, to_idx = pair_indices(h, w, radius, psa_border)
    ref = pairwise_affinity(feats, from_idx, to_idx)
    fast = offset_affinity(feats, radius, psa_border)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=1e-7)
    if ref.numel() == 0:  # grid too small for any pair
        return
    g_ref, = torch.autograd.grad(ref.sum(), feats)
    g_fast, = torch.autograd.grad(fast.sum(), feats)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)
