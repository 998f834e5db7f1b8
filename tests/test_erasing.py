import math

import torch
import torch.nn.functional as F
import pytest

from caee.method.erasing import cse_loss, cse_weight, erased_logits, erasing_mask, resize_mask, sample_targets
from caee.models.classifier import CamClassifier
from caee.models.resnet38 import ResNet38


def test_targets_are_present_classes_uniformly():
    labels = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(400):
        t = sample_targets(labels, g)
        assert t[1] == 1 and t[2] == -1
        assert labels[0, t[0]] == 1
        counts[t[0]] += 1
    assert 150 < counts[0] < 250 and 150 < counts[2] < 250


def test_targets_reproducible_with_seed():
    labels = (torch.rand(16, 20) > 0.7).float()
    a = sample_targets(labels, torch.Generator().manual_seed(5))
    b = sample_targets(labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mask_batch_vs_per_image_normalisation_by_hand():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 1] = torch.tensor([[2., -1], [1, 0]])   # image 0, target class 1: peak 2
    maps[1, 0] = torch.tensor([[4., 0], [0, 0]])    # image 1, target class 0: peak 4
    maps[0, 0] = 100.0                                # not a target: must not matter
    targets = torch.tensor([1, 0])
    batch = erasing_mask(maps, targets, (2, 2), "batch", eps=0)
    per = erasing_mask(maps, targets, (2, 2), "per_image", eps=0)
    assert torch.allclose(batch[0, 0], torch.tensor([[0.5, 0], [0.25, 0]]))
    assert torch.allclose(batch[1, 0], torch.tensor([[1.0, 0], [0, 0]]))
    assert torch.allclose(per[0, 0], torch.tensor([[1.0, 0], [0.5, 0]]))
    assert torch.allclose(per[1, 0], torch.tensor([[1.0, 0], [0, 0]]))


def test_mask_upsampled_before_relu_and_in_unit_range():
    maps = torch.randn(3, 5, 6, 7)
    mask = erasing_mask(maps, torch.tensor([0, 4, -1]), (48, 56), eps=0)
    assert mask.shape == (3, 1, 48, 56)
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask[2].abs().sum() == 0   # no target -> nothing erased
    # official order: bilinear upsample of the raw map, then ReLU, then / batch max
    up = [F.interpolate(maps[i:i + 1, [t]], size=(48, 56), mode="bilinear", align_corners=False).relu()
          for i, t in [(0, 0), (1, 4)]]
    peak = max(u.max() for u in up)
    assert torch.allclose(mask[0], up[0][0] / peak, atol=1e-6)
    assert torch.allclose(mask[1], up[1][0] / peak, atol=1e-6)


def test_cse_removes_only_the_target():
    labels = torch.tensor([[1., 1, 0], [0, 1, 0]])
    targets = torch.tensor([0, 1])
    logits = torch.tensor([[-3., 3, -3], [-3, -3, -3]])  # what a perfect OC says after erasing
    # targets t - e_k: image 0 keeps class 1 only, image 1 keeps nothing; every one of the 6 logits is
    # on the right side by 3, so the loss is the logistic loss log(1 + e^-3) of each
    assert cse_loss(logits, labels, targets).item() == pytest.approx(math.log1p(math.exp(-3)), rel=1e-6)
    assert labels.tolist() == [[1, 1, 0], [0, 1, 0]]  # input untouched
    wrong = torch.tensor([[3., 3, -3], [-3, 3, -3]])  # OC still sees the erased class
    # two of the six logits (the erased classes) are now wrong by 3: log(1 + e^3) instead
    expected = (4 * math.log1p(math.exp(-3)) + 2 * math.log1p(math.exp(3))) / 6
    assert cse_loss(wrong, labels, targets).item() == pytest.approx(expected, rel=1e-6)
    # an image without a target (-1) keeps all of its classes
    none = cse_loss(torch.tensor([[2., -2, 2]]), torch.tensor([[1., 0, 1]]), torch.tensor([-1]))
    assert none.item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-6)


def test_cse_weight_schedule():
    assert cse_weight(0) == pytest.approx(0.3) and cse_weight(14) == pytest.approx(1.0)


def _tiny_oc():
    torch.manual_seed(0)
    oc = CamClassifier(ResNet38(width=0.0625), num_classes=3, dropout=0.0).eval()
    for p in oc.parameters():
        p.requires_grad_(False)
    return oc


def test_depth0_equals_erasing_the_image():
    oc = _tiny_oc()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 1, 32, 32)
    expected, _ = oc(images * (1 - mask))
    assert torch.allclose(erased_logits(oc, images, mask, 0), expected, atol=1e-6)


@pytest.mark.parametrize("depth", range(1, 8))
def test_feature_masking_multiplies_the_depth_feature(depth):
    oc = _tiny_oc()
    images = torch.randn(1, 3, 32, 32)
    mask = torch.rand(1, 1, 32, 32)
    seen = {}

    def record(d, f):
        seen[d] = f
        return f

    oc(images, edit=record)
    clean = seen[depth]
    captured = {}
    stage = depth + 1 if depth < 7 else None
    if stage is not None:
        # what the next stage receives is exactly clean * (1 - resized mask)
        orig = oc.backbone.stage

        def spy(d, x):
            if d == stage:
                captured["input"] = x
            return orig(d, x)
        oc.backbone.stage = spy
    logits = erased_logits(oc, images, mask, depth)
    keep = resize_mask(1 - mask, tuple(clean.shape[-2:]))
    if stage is not None:
        assert torch.allclose(captured["input"], clean * keep, atol=1e-6)
    else:
        expected = (oc.fc8(clean * keep)).mean(dim=(2, 3))
        assert torch.allclose(logits, expected, atol=1e-6)


def test_gradient_flows_to_cgnet_through_frozen_oc_only():
    oc = _tiny_oc()
    torch.manual_seed(1)
    cgnet = CamClassifier(ResNet38(width=0.0625), num_classes=3, dropout=0.0)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1., 1, 0], [0, 1, 1]])
    _, maps = cgnet(images)
    targets = sample_targets(labels, torch.Generator().manual_seed(0))
    mask = erasing_mask(maps, targets, (32, 32))
    loss = cse_loss(erased_logits(oc, images, mask, 0), labels, targets)
    loss.backward()
    assert all(p.grad is None for p in oc.parameters())
    assert cgnet.fc8.weight.grad is not None and cgnet.fc8.weight.grad.abs().sum() > 0
    assert cgnet.backbone.b4.conv_branch2a.weight.grad.abs().sum() > 0
