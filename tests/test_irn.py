"""IRN's class-boundary route (caee/method/irn.py, caee/models/irn.py) against procedures written
here from the description of IRN's official code (jiwoon-ahn/irn: step/cam_to_ir_label.py,
misc/imutils.py crf_inference_label, misc/indexing.py PathIndex / edge_to_affinity /
propagate_to_edge, net/resnet50_irn.py, step/train_irn.py, step/make_sem_seg_labels.py), on small
generated data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caee.core.config import CrfConfig
from caee.core.errors import CaeeError
from caee.method import irn
from caee.method.affinity import pair_indices, pair_label_targets

IRN_CRF = CrfConfig(bilateral_sxy=50, bilateral_srgb=5)  # crf_inference_label: 3/3 Gaussian, 50/5/10 bilateral, 10 its


# ---------------------------------------------------------------- references from the description


def ref_crf_inference_label(img, labels, n_labels, gt_prob=0.7, sxy=50, srgb=5, t=10):
    """crf_inference_label: a label unary (zero_unsure False), Gaussian 3/3, bilateral sxy/srgb/10."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.ascontiguousarray(img.copy()), compat=10)
    return np.argmax(np.array(d.inference(t)).reshape(n_labels, h, w), axis=0)


def ref_ir_label(img, keys, cams, fg_thres, bg_thres, **crf):
    """cam_to_ir_label: background channel at a constant first, argmax, CRF, keys; merge."""
    lut = np.concatenate([[0], keys + 1])
    maps = []
    for thres in (fg_thres, bg_thres):
        padded = np.concatenate([np.full((1,) + cams.shape[1:], thres, cams.dtype), cams])
        maps.append(lut[ref_crf_inference_label(img, np.argmax(padded, 0), lut.size, **crf)])
    fg, bg = maps
    conf = fg.copy()
    conf[fg == 0] = 255
    conf[bg + fg == 0] = 0
    return conf.astype(np.uint8)


def ref_search_paths(radius):
    """PathIndex's directions and their paths, grouped by path length (shortest group first);
    in each path the destination comes first."""
    dirs = [(0, x) for x in range(1, radius)]
    dirs += [(y, x) for y in range(1, radius) for x in range(1 - radius, radius) if x * x + y * y < radius ** 2]
    groups: dict[int, list] = {}
    for dy, dx in dirs:
        cells = []
        for y in range(min(0, dy), max(0, dy) + 1):
            for x in range(min(0, dx), max(0, dx) + 1):
                if (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1:
                    cells.append((y, x))
        cells.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
        groups.setdefault(len(cells), []).append(cells)
    return [groups[k] for k in sorted(groups)]


def ref_path_indices(radius, size):
    """PathIndex.get_path_indices: per group (n_paths, length, n_src) flat indices; src; dst."""
    h, w = size
    full = np.arange(h * w).reshape(h, w)
    rf = radius - 1
    ch, cw = h - rf, w - 2 * rf
    groups = []
    for paths in ref_search_paths(radius):
        groups.append(np.array([[full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in p] for p in paths]))
    src = full[:ch, rf:rf + cw].reshape(-1)
    dst = np.concatenate([g[:, 0] for g in groups])
    return groups, src, dst


def ref_edge_to_affinity(edge, groups):
    """edge_to_affinity: (B, h, w) -> (B, n_dirs, n_src): 1 - max of the edge along each path."""
    flat = edge.reshape(edge.shape[0], -1)
    out = []
    for g in groups:
        ind = torch.from_numpy(g)
        dist = flat[:, ind.reshape(-1)].reshape(flat.shape[0], *ind.shape)
        out.append(1 - dist.max(dim=2).values)
    return torch.cat(out, dim=1)


def ref_propagate_to_edge(x, edge, radius=5, beta=10, exp_times=8):
    """propagate_to_edge: pad the edge with 1 (left, right, bottom), dense affinities with a unit
    diagonal, crop to the image, ^beta, column-normalise, square exp_times times, (x * (1-edge)) @ T."""
    h, w = x.shape[-2:]
    hp, wp = h + radius, w + 2 * radius
    groups, src, dst = ref_path_indices(radius, (hp, wp))
    edge_p = F.pad(edge.double()[None], (radius, radius, 0, radius), value=1.0)
    aff = ref_edge_to_affinity(edge_p, groups)[0]
    n = hp * wp
    dense = torch.zeros(n, n, dtype=torch.float64)
    s = torch.from_numpy(np.broadcast_to(src, dst.shape).reshape(-1))
    d = torch.from_numpy(dst.reshape(-1))
    dense[s, d] += aff.reshape(-1)
    dense[d, s] += aff.reshape(-1)
    dense += torch.eye(n, dtype=torch.float64)
    dense = dense.view(hp, wp, hp, wp)[:-radius, radius:-radius, :-radius, radius:-radius].reshape(h * w, h * w)
    t = dense.pow(beta)
    t = t / t.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        t = t @ t
    xx = x.double().view(-1, h, w) * (1 - edge.double())
    return (xx.view(-1, h * w) @ t).view(-1, h, w)


def ref_sem_seg(rw, keys, size, bg_thres):
    """make_sem_seg_labels: x4 bilinear, crop, / max, background channel at bg_thres, argmax, keys."""
    up = F.interpolate(rw[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0, :size[0], :size[1]]
    up = up / up.max()
    up = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres)
    return np.concatenate([[0], keys + 1])[up.argmax(0).numpy()].astype(np.uint8)


def _pair_dict(src, dst, aff):
    return {(int(a), int(b)): float(v) for a, b, v in zip(src, dst, aff)}


# ---------------------------------------------------------------- generated data


def _blob_cams(h, w, centres, seed=0):
    """(K, H, W) smooth CAMs with their maximum at 1 (IRN normalises each by its max)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cams = []
    for cy, cx, r in centres:
        c = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.02 * rng.random((h, w))
        cams.append(c / c.max())
    return np.stack(cams).astype(np.float32)


def _image_for(cams, seed=0):
    """An RGB image whose colours follow the CAM blobs, so the bilateral kernel has edges to use."""
    rng = np.random.default_rng(seed)
    img = np.full(cams.shape[1:] + (3,), 90.0)
    for k, c in enumerate(cams):
        img[c > 0.35] = [200 - 60 * k, 40 + 80 * k, 120]
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- 1. relation labels


def test_label_unary_is_pydensecrf_unary_from_labels():
    from pydensecrf.utils import unary_from_labels

    labels = np.random.default_rng(0).integers(0, 4, (5, 7))
    probs = irn.label_unary_probs(labels, 4, 0.7)
    assert probs.sum(0) == pytest.approx(np.ones((5, 7)), abs=1e-6)
    ref = unary_from_labels(labels, 4, gt_prob=0.7, zero_unsure=False).reshape(4, 5, 7)
    np.testing.assert_allclose(-np.log(probs), ref, rtol=1e-6)


def test_hard_labels_background_wins_ties_and_low_scores():
    cams = np.array([[[0.3, 0.31, 0.1]], [[0.2, 0.05, 0.29]]], np.float32)  # (2, 1, 3)
    assert irn.hard_labels(cams, 0.3).tolist() == [[0, 1, 0]]
    assert irn.hard_labels(cams, 0.05).tolist() == [[1, 1, 2]]


def test_combine_confident_by_hand():
    fg = np.array([[0, 0, 3, 3, 0]], np.uint8)
    bg = np.array([[0, 3, 3, 0, 5]], np.uint8)
    assert irn.combine_confident(fg, bg).tolist() == [[0, 255, 3, 3, 255]]


@pytest.mark.parametrize("fg_thres,bg_thres", [(0.30, 0.05), (0.55, 0.2)])
def test_ir_labels_equal_irn_cam_to_ir_label(fg_thres, bg_thres):
    cams = _blob_cams(40, 52, [(14, 15, 6), (26, 36, 8)])
    img = _image_for(cams)
    keys = np.array([2, 6])
    got = irn.ir_labels(img, keys, cams, fg_thres, bg_thres, IRN_CRF, 0.7)
    ref = ref_ir_label(img, keys, cams, fg_thres, bg_thres)
    np.testing.assert_array_equal(got, ref)
    assert {0, 3, 7, 255} <= set(np.unique(got).tolist())  # every outcome occurs: the test is not vacuous


def test_ir_labels_follow_the_crf_settings():
    cams = _blob_cams(40, 52, [(14, 15, 6), (26, 36, 8)])
    img = _image_for(cams)
    keys = np.array([0, 1])
    ref = ref_ir_label(img, keys, cams, 0.3, 0.05, gt_prob=0.55, sxy=20, srgb=9, t=4)
    params = CrfConfig(iterations=4, bilateral_sxy=20, bilateral_srgb=9)
    np.testing.assert_array_equal(irn.ir_labels(img, keys, cams, 0.3, 0.05, params, 0.55), ref)


def test_ir_labels_without_keys_are_background():
    out = irn.ir_labels(np.zeros((4, 5, 3), np.uint8), np.zeros(0, np.int64), np.zeros((0, 4, 5)), 0.3, 0.05, IRN_CRF)
    assert out.shape == (4, 5) and not out.any()


def test_reduce_labels_is_pil_nearest_quarter():
    from PIL import Image

    lab = np.random.default_rng(1).integers(0, 6, (32, 48)).astype(np.uint8)
    pil = np.asarray(Image.fromarray(lab).resize((12, 8), Image.NEAREST))  # pil_rescale(label, 0.25, 0)
    np.testing.assert_array_equal(irn.reduce_labels(torch.from_numpy(lab), 4).numpy(), pil)


# ---------------------------------------------------------------- 2. paths and affinities


def test_path_cells_match_path_index():
    for paths in ref_search_paths(10):
        for p in paths:
            assert sorted(irn.path_cells(*p[0])) == sorted(p)
    assert sorted(irn.path_cells(1, -1)) == [(0, -1), (0, 0), (1, -1), (1, 0)]
    assert irn.path_cells(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # (2, 3): (2x - 3y)^2 < 13 keeps 8 of the 12 cells of the box
    assert irn.path_cells(2, 3) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3)]


@pytest.mark.parametrize("radius,size", [(10, (12, 21)), (5, (9, 13))])
def test_training_affinities_equal_edge_to_affinity(radius, size):
    """train_irn's PathIndex(radius 10, crop/4): the pairs of pair_indices(psa_border=True)."""
    edge = torch.rand(2, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    groups, src, dst = ref_path_indices(radius, size)
    ref = ref_edge_to_affinity(edge, groups)
    f, t = pair_indices(*size, radius, psa_border=True)
    got = irn.boundary_affinity(edge, radius, psa_border=True)
    assert got.shape == (2, f.numel()) and f.numel() == dst.size
    for b in range(2):
        want = _pair_dict(np.broadcast_to(src, dst.shape).reshape(-1), dst.reshape(-1), ref[b].reshape(-1))
        assert _pair_dict(f, t, got[b]) == pytest.approx(want, abs=0)


def test_affinity_is_one_minus_path_max_by_hand():
    edge = torch.zeros(1, 3, 4)
    edge[0, 1, 1] = 0.8   # on the straight path (0,0) -> (2,2) and on (0,1) -> (2,1)
    edge[0, 0, 2] = 0.3
    f, t = pair_indices(3, 4, 3, psa_border=False)
    aff = _pair_dict(f, t, irn.boundary_affinity(edge, 3)[0])
    assert aff[(0, 10)] == pytest.approx(0.2)        # (0,0) -> (2,2) passes (1,1)
    assert aff[(1, 9)] == pytest.approx(0.2)         # (0,1) -> (2,1)
    assert aff[(0, 2)] == pytest.approx(0.7)         # (0,0) -> (0,2) ends on 0.3
    assert aff[(3, 7)] == pytest.approx(1.0)         # (0,3) -> (1,3)


# ---------------------------------------------------------------- 3. the loss


def _ref_loss(edge_logits, labels, radius):
    """train_irn: sigmoid, to_affinity, GetAffinityLabelFromIndices (labels < 21 valid), the terms."""
    groups, src, dst = ref_path_indices(radius, tuple(edge_logits.shape[-2:]))
    aff = ref_edge_to_affinity(torch.sigmoid(edge_logits), groups)
    flat = labels.reshape(labels.shape[0], -1)
    a = flat[:, torch.from_numpy(src)][:, None]
    b = flat[:, torch.from_numpy(dst)]
    valid = (a < 21) & (b < 21)
    pos = (a == b) & valid
    bg = (pos & (a == 0)).double()
    fg = (pos & (a > 0)).double()
    neg = ((a != b) & valid).double()
    pos_l, neg_l = -torch.log(aff + 1e-5), -torch.log(1 + 1e-5 - aff)
    bg_l = (bg * pos_l).sum() / (bg.sum() + 1e-5)
    fg_l = (fg * pos_l).sum() / (fg.sum() + 1e-5)
    neg_v = (neg * neg_l).sum() / (neg.sum() + 1e-5)
    return ((bg_l / 2 + fg_l / 2) + neg_v) / 2


def test_boundary_loss_and_gradient_equal_train_irn():
    g = torch.Generator().manual_seed(3)
    size, radius = (12, 21), 10
    labels = torch.randint(0, 4, (2, *size), generator=g)
    labels[:, :, :5] = 0
    labels[0, 3:6, 8:12] = 255
    logits = torch.randn(2, *size, generator=g, dtype=torch.float64, requires_grad=True)
    ref = _ref_loss(logits, labels, radius)
    (g_ref,) = torch.autograd.grad(ref, logits)
    f, t = pair_indices(*size, radius, psa_border=True)
    aff = irn.boundary_affinity(torch.sigmoid(logits), radius, psa_border=True)
    loss, terms = irn.boundary_loss(aff, *pair_label_targets(labels, f, t))
    (g_got,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(((terms["bg"] + terms["fg"]) / 4 + terms["neg"] / 2).item(), rel=1e-12)


def test_boundary_loss_terms_by_hand():
    aff = torch.tensor([[0.5, 0.25, 0.9, 0.1]])
    bg = torch.tensor([[True, False, False, False]])
    fg = torch.tensor([[False, True, False, False]])
    neg = torch.tensor([[False, False, True, True]])
    loss, terms = irn.boundary_loss(aff, bg, fg, neg)
    l_bg = -np.log(0.5 + 1e-5) / (1 + 1e-5)
    l_fg = -np.log(0.25 + 1e-5) / (1 + 1e-5)
    l_neg = (-np.log(0.1 + 1e-5) - np.log(0.9 + 1e-5)) / (2 + 1e-5)
    assert float(terms["neg"]) == pytest.approx(l_neg, rel=1e-5)
    assert float(loss) == pytest.approx(((l_bg + l_fg) / 2 + l_neg) / 2, rel=1e-5)


# ---------------------------------------------------------------- 4. the walk and the labels


@pytest.mark.parametrize("beta,exp_times,radius", [(10, 8, 5), (3, 3, 5), (10, 4, 3)])
def test_semantic_walk_equals_dense_propagate_to_edge(beta, exp_times, radius):
    g = torch.Generator().manual_seed(beta + exp_times)
    h, w = 9, 11
    edge = torch.rand(h, w, generator=g) ** 3
    edge[:, 5] = 0.97                               # a wall: the two sides must stay apart
    cams = torch.rand(2, h, w, generator=g)
    got = irn.semantic_walk(cams, edge, beta, exp_times, radius)
    ref = ref_propagate_to_edge(cams, edge, radius, beta, exp_times)
    torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=1e-6)


def test_semantic_walk_settings_matter():
    g = torch.Generator().manual_seed(5)
    edge, cams = torch.rand(8, 10, generator=g) ** 2, torch.rand(1, 8, 10, generator=g)
    base = irn.semantic_walk(cams, edge, 10, 3, 5)
    for other in (irn.semantic_walk(cams, edge, 4, 3, 5), irn.semantic_walk(cams, edge, 10, 2, 5),
                  irn.semantic_walk(cams, edge, 10, 3, 3)):
        assert (other - base).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(33, 42), (36, 40)])
def test_sem_seg_labels_equal_make_sem_seg_labels(size):
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    rw = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1)) ** 2
    keys = np.array([4, 0, 9])
    got = irn.sem_seg_labels(rw, keys, size, 0.25)
    np.testing.assert_array_equal(got, ref_sem_seg(rw, keys, size, 0.25))
    assert len(np.unique(got)) == 4
    assert not np.array_equal(irn.sem_seg_labels(rw, keys, size, 0.4), got)


def test_sem_seg_labels_degenerate_inputs():
    assert not irn.sem_seg_labels(torch.zeros(0, 3, 3), np.zeros(0), (10, 12)).any()
    assert not irn.sem_seg_labels(torch.zeros(1, 3, 3), np.array([2]), (10, 12)).any()


def test_cams_to_grid_is_the_in_image_cell_mean():
    cams = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(2, 6, 7)
    grid = irn.cams_to_grid(cams, 4)
    assert grid.shape == (2, 2, 2)
    assert float(grid[0, 0, 0]) == pytest.approx(float(cams[0, :4, :4].mean()))
    assert float(grid[1, 1, 1]) == pytest.approx(float(cams[1, 4:, 4:].mean()))  # 2 x 3 pixels, no padding
    # a map linear inside each cell: the cell mean is the value at the cell centre (s*i + (s-1)/2)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing="ij")
    ramp = (0.1 * yy + 0.03 * xx)[None]
    centres = (0.1 * (4 * torch.arange(2.0) + 1.5)[:, None] + 0.03 * (4 * torch.arange(3.0) + 1.5))[None]
    torch.testing.assert_close(irn.cams_to_grid(ramp, 4), centres)


def test_walk_rejects_mismatched_grid():
    with pytest.raises(CaeeError, match="cams_to_grid"):
        irn.semantic_walk(torch.rand(1, 4, 5), torch.rand(5, 4))


# ---------------------------------------------------------------- the boundary network


class _IrnShapedBackbone:
    """A small backbone with IRN's ResNet50 strides (4, 4, 8, 16, 16) and few channels."""

    @staticmethod
    def build():
        from torch import nn

        from caee.models.backbone import Backbone

        class Small(Backbone):
            depths = (0, 1, 2, 3, 4, 5)

            def __init__(self):
                super().__init__()
                spec = [(3, 4, 4), (4, 6, 1), (6, 8, 2), (8, 8, 2), (8, 10, 1)]
                self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in spec)
                self.bn = nn.BatchNorm2d(10)
                self.channels = {0: 3, 1: 4, 2: 6, 3: 8, 4: 8, 5: 10}
                self.strides = {0: 1, 1: 4, 2: 4, 3: 8, 4: 16, 5: 16}
                self.out_channels = 10

            def stage(self, depth, x):
                x = torch.relu(self.convs[depth - 1](x))
                return self.bn(x) if depth == 5 else x

        return Small()


def _ref_edge_branch(model, x):
    """net/resnet50_irn.py's edge branch on the same weights: stages detached; fc_edge1/2 conv-GN-ReLU,
    fc_edge3 conv-GN-Upsample(2)-ReLU, fc_edge4/5 conv-GN-Upsample(4)-ReLU, each cut to edge2's size,
    concatenated, fc_edge6."""
    feats, y = [], x
    for d in range(1, 6):
        y = model.backbone.stage(d, y).detach()
        feats.append(y)
    outs = []
    for i, (f, blk) in enumerate(zip(feats, model.edge_blocks)):
        e = blk.norm(blk.conv(f))
        if i >= 2:
            e = torch.nn.Upsample(scale_factor=2 if i == 2 else 4, mode="bilinear", align_corners=False)(e)
        outs.append(torch.relu(e))
    h, w = outs[1].shape[-2:]
    return model.edge_out(torch.cat([o[..., :h, :w] for o in outs], 1))


def _small_edge_net(seed=0):
    from caee.models.irn import IrnEdgeNet

    torch.manual_seed(seed)
    net = IrnEdgeNet(_IrnShapedBackbone.build(), channels=8, groups=4, edge_stride=4)
    for p in net.edge_out.parameters():
        torch.nn.init.normal_(p)
    for blk in net.edge_blocks:  # GroupNorm affines away from (1, 0)
        torch.nn.init.uniform_(blk.norm.weight, 0.5, 1.5)
        torch.nn.init.normal_(blk.norm.bias, std=0.3)
    return net


def test_edge_branch_equals_irn_layers():
    net = _small_edge_net().eval()
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = net(x)
        ref = _ref_edge_branch(net, x)
    assert got.shape == (2, 1, 16, 20)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_only_the_branch_trains_and_the_backbone_stays_in_eval():
    net = _small_edge_net().train()
    assert not net.backbone.training and net.edge_out.training
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.randn(2, 3, 32, 32)).square().mean().backward()
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in net.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())  # BN stats too
    assert all(p.grad is not None for p in net.edge_out.parameters())


def test_edge_map_is_edge_displacement():
    """EdgeDisplacement: pad image and mirror to the crop, cut to ceil(H/4) x ceil(W/4), flip the
    mirror's logits back, sigmoid of their mean."""
    net = _small_edge_net(1).eval()
    img = torch.randn(3, 37, 50, generator=torch.Generator().manual_seed(2))
    got = irn.edge_map(net, img, pad_to=64)
    pair = F.pad(torch.stack([img, img.flip(-1)]), (0, 64 - 50, 0, 64 - 37))
    with torch.no_grad():
        e = net(pair)[:, :, :10, :13]
    ref = torch.sigmoid(e[0] / 2 + e[1].flip(-1) / 2)[0]
    assert got.shape == (10, 13)
    torch.testing.assert_close(got, ref)


def test_edge_net_on_tinycnn_and_resnet50_shapes():
    from caee.models import ResNet50, TinyCNN
    from caee.models.irn import IrnEdgeNet

    tiny = IrnEdgeNet(TinyCNN(width=0.25), channels=8, groups=4, edge_stride=4).eval()
    with torch.no_grad():
        assert tiny(torch.randn(1, 3, 36, 44)).shape == (1, 1, 9, 11)
    with torch.device("meta"):
        big = IrnEdgeNet(ResNet50())
        assert big(torch.zeros(2, 3, 512, 512, device="meta")).shape == (2, 1, 128, 128)
    # IRN's ResNet50: strides [2, 2, 2, 1], no dilation anywhere
    assert big.backbone.layer4[0].conv2.stride == (1, 1) and big.backbone.layer4[0].downsample[0].stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in big.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert [type(b.norm).__name__ for b in big.edge_blocks] == ["GroupNorm"] * 5
    assert [b.norm.num_groups for b in big.edge_blocks] == [4] * 5 and big.edge_out.in_channels == 160


def test_cams_to_grid_of_a_stride8_upsample_is_its_stride4_resize():
    """caee's CAMs at stride 8 upsampled to the image: the cell mean is exactly the coarse map resized
    bilinearly to the stride-4 grid (sample points fall on cell borders)."""
    coarse = torch.rand(1, 2, 3, 5, generator=torch.Generator().manual_seed(4))
    full = F.interpolate(coarse, scale_factor=8, mode="bilinear", align_corners=False)[0]
    half = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(irn.cams_to_grid(full, 4), half)
