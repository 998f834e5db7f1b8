"""Backbones: depth tables, feature shapes, parameter counts, feature edits, freezing, registry."""
import functools

import pytest
import torch
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models import BACKBONES, Backbone, ResNet38, ResNet50, ResNet101, TinyCNN, VGG16, build_backbone

# the documented depth tables: depth -> (channels, stride)
TABLES = {
    "resnet38": {0: (3, 1), 1: (64, 1), 2: (128, 2), 3: (256, 4), 4: (512, 8), 5: (1024, 8),
                 6: (2048, 8), 7: (4096, 8)},
    "resnet50": {0: (3, 1), 1: (64, 4), 2: (256, 4), 3: (512, 8), 4: (1024, 16), 5: (2048, 16)},
    "resnet101": {0: (3, 1), 1: (64, 2), 2: (256, 4), 3: (512, 8), 4: (1024, 8), 5: (2048, 8)},
    "vgg16": {0: (3, 1), 1: (64, 2), 2: (128, 4), 3: (256, 8), 4: (512, 8), 5: (512, 8)},
    "tinycnn": {0: (3, 1), 1: (16, 1), 2: (32, 2), 3: (48, 2), 4: (64, 4)},
}


def _meta(cls, **kw) -> Backbone:
    with torch.device("meta"):
        return cls(**kw)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(TABLES))
def test_depth_tables_and_shapes_full_size_on_meta(name):
    """Full-size networks run on the meta device: shapes only, no memory or compute."""
    net = _meta(BACKBONES[name]).eval()
    table = TABLES[name]
    assert net.depths == tuple(table)
    assert net.channels == {d: c for d, (c, _) in table.items()}
    assert net.strides == {d: s for d, (_, s) in table.items()}
    assert net.out_channels == table[net.last_depth][0]
    x = torch.zeros(2, 3, 64, 96, device="meta")
    feats = net.forward_features(x, keep=net.depths)
    for d, (c, s) in table.items():
        assert tuple(feats[d].shape) == (2, c, 64 // s, 96 // s), (name, d)
    assert tuple(net(x).shape) == (2, net.out_channels, 64 // net.strides[net.last_depth],
                                   96 // net.strides[net.last_depth])


@pytest.mark.parametrize("name,kw", [("resnet38", {"width": 0.125}), ("tinycnn", {"width": 0.5}),
                                     ("vgg16", {}), ("resnet101", {})])
def test_shapes_computed_on_cpu(name, kw):
    torch.manual_seed(0)
    net = BACKBONES[name](**kw).eval() if kw else _shared(name)
    w = kw.get("width", 1.0)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        feats = net.forward_features(x, keep=net.depths)
    for d, (c, s) in TABLES[name].items():
        expected_c = c if d == 0 else max(1, round(c * w))
        assert net.channels[d] == expected_c
        assert tuple(feats[d].shape) == (1, expected_c, 32 // s, 48 // s), (name, d)
        assert torch.isfinite(feats[d]).all()


def test_parameter_counts():
    # ResNet38 (PSA, no classifier): 105,070,912
    assert _n_params(_meta(ResNet38)) == 105_070_912
    # torchvision ResNet101 has 44,549,160 parameters, of which fc holds 2048 * 1000 + 1000
    assert _n_params(_meta(ResNet101)) == 44_549_160 - 2_049_000
    # VGG16's features: 13 convs, 14,714,688 parameters (dilation adds none)
    assert _n_params(_meta(VGG16)) == 14_714_688
    # TinyCNN by hand: 3x3 convs without bias + BN (2 per channel)
    tiny = 9 * (3 * 16 + 16 * 32 + 32 * 48 + 48 * 64) + 2 * (16 + 32 + 48 + 64)
    assert _n_params(TinyCNN()) == tiny == 46_832


def test_resnet38_keeps_psa_key_names():
    keys = set(_meta(ResNet38).state_dict())
    for k in ("conv1a.weight", "b2.bn_branch2a.weight", "b2.conv_branch2a.weight", "b2.conv_branch1.weight",
              "b4_1.conv_branch2b1.weight", "b6.conv_branch2b2.weight", "bn7.running_var"):
        assert k in keys, k


def test_torchvision_key_names():
    r101 = set(_meta(ResNet101).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.22.bn3.weight",
            "layer4.2.conv3.weight"} <= r101
    assert not any(k.startswith(("fc.", "avgpool")) for k in r101)
    vgg = set(_meta(VGG16).state_dict())
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert vgg == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}


def test_vgg16_conv5_dilated_pools_removed():
    net = _meta(VGG16)
    for i in (24, 26, 28):
        assert net.features[i].dilation == (2, 2) and net.features[i].padding == (2, 2)
    for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21):
        assert net.features[i].dilation == (1, 1)
    assert isinstance(net.features[23], nn.Identity) and isinstance(net.features[30], nn.Identity)
    assert [type(net.features[i]) for i in (4, 9, 16)] == [nn.MaxPool2d] * 3


def test_resnet101_last_two_stages_dilated():
    net = _meta(ResNet101)
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[1].conv2.dilation == (4, 4)
    assert net.layer2[0].conv2.stride == (2, 2)


def _receptive_support(net, size: int, i: int, j: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """With positive weights and BN acting as identity nothing is clipped by ReLU, so the input
    gradient of output pixel (i, j) is non-zero exactly on its receptive field: its (first, last)
    row, (first, last) column and pixel count."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.1)
    x = torch.ones(1, 3, size, size, requires_grad=True)
    net(x)[0, 0, i, j].backward()
    support = x.grad[0].abs().sum(0) > 0
    rows = support.any(1).nonzero().flatten()
    cols = support.any(0).nonzero().flatten()
    return (rows.min().item(), rows.max().item()), (cols.min().item(), cols.max().item()), support.sum().item()


def test_tinycnn_receptive_field_is_13():
    """Output pixel (i, j) sees rows / cols 4i-6..4i+6."""
    net = TinyCNN().eval()
    assert net(torch.ones(1, 3, 64, 64)).shape[-2:] == (16, 16)
    i, j = 7, 5
    rows, cols, count = _receptive_support(net, 64, i, j)
    assert rows == (4 * i - 6, 4 * i + 6) and cols == (4 * j - 6, 4 * j + 6)
    assert count == 13 * 13 == net.receptive_field ** 2


def test_tinycnn_output_stride_8():
    """net.output_stride=8 strides the third stage too: the same weights (shapes), a H/8 feature map
    and a 17 px receptive field (rows/cols 8i-8..8i+8)."""
    net = build_backbone(NetConfig(backbone="tinycnn", width=0.5, output_stride=8)).eval()
    assert net.strides == {0: 1, 1: 1, 2: 2, 3: 4, 4: 8} and net.receptive_field == 17
    assert {k: v.shape for k, v in net.state_dict().items()} == \
        {k: v.shape for k, v in build_backbone(NetConfig(backbone="tinycnn", width=0.5)).state_dict().items()}
    assert net(torch.ones(1, 3, 64, 64)).shape[-2:] == (8, 8)
    i, j = 3, 4
    rows, cols, count = _receptive_support(net, 64, i, j)
    assert rows == (8 * i - 8, 8 * i + 8) and cols == (8 * j - 8, 8 * j + 8)
    assert count == 17 * 17


def test_output_stride_option_is_checked():
    assert build_backbone(NetConfig(backbone="tinycnn", output_stride=4)).strides[4] == 4
    with torch.device("meta"):  # a backbone's own stride is accepted, 0 means it
        assert build_backbone(NetConfig(backbone="resnet38", width=0.125, output_stride=8)).strides[7] == 8
    with pytest.raises(CaeeError, match=r"net\.output_stride.*tinycnn.*4, 8"):
        build_backbone(NetConfig(backbone="tinycnn", output_stride=16))
    with pytest.raises(CaeeError, match=r"net\.output_stride.*resnet38.*output stride 8 only"):
        build_backbone(NetConfig(backbone="resnet38", width=0.125, output_stride=4))


def _small(name):
    torch.manual_seed(0)
    return {"resnet38": lambda: ResNet38(width=0.125), "resnet50": ResNet50, "resnet101": ResNet101,
            "vgg16": VGG16, "tinycnn": TinyCNN}[name]().eval()


@functools.lru_cache(maxsize=None)
def _shared(name):
    """One eval-mode instance per backbone for the tests that never modify it."""
    return _small(name)


@pytest.mark.parametrize("name", list(TABLES))
def test_edit_equals_manual_stages(name):
    net = _shared(name)
    size = 16 if name in ("resnet101", "vgg16") else 32 + 32 * (name == "resnet50")  # the big ones: 2 x 2 output is enough
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = net.forward_features(x, keep=net.depths)  # stages 1..d of the manual runs
        plain = feats[net.last_depth]
        for d in net.depths:
            got = net(x, edit=lambda depth, f, d=d: f * 0.5 if depth == d else f)
            y = feats[d] * 0.5
            for k in range(d + 1, net.last_depth + 1):
                y = net.stage(k, y)
            torch.testing.assert_close(got, y, rtol=0, atol=0)
            assert not torch.allclose(got, plain), (name, d)


def _frozen(net):
    return {n for n, p in net.named_parameters() if not p.requires_grad}


def test_freeze_resnet38():
    net = ResNet38(width=0.125)
    net.freeze()
    frozen = _frozen(net)
    assert {"conv1a.weight", "b2.conv_branch2a.weight", "b2_2.conv_branch2b1.weight"} <= frozen
    assert {"b2.bn_branch2a.weight", "b5.bn_branch2a.bias", "bn7.weight"} <= frozen
    assert "b3.conv_branch2a.weight" not in frozen and "b7.conv_branch2b2.weight" not in frozen
    trainable = {n for n, _ in net.named_parameters()} - frozen
    assert all(".conv_" in n for n in trainable) and all(not n.startswith(("conv1a", "b2")) for n in trainable)


def test_freeze_of_random_weights_freezes_nothing_and_batchnorm_trains():
    net = ResNet38(width=0.125)
    net.freeze(trained=False)
    assert _frozen(net) == set()
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, bns[0].running_mean)   # the statistics are learnt
    assert ResNet38.freeze_bn is True                       # the class (and other instances) unchanged
    net.freeze(trained=True)                                # no lasting effect: trained weights freeze again
    net.train()
    assert not any(m.training for m in bns) and "conv1a.weight" in _frozen(net)


def test_freeze_resnet101():
    net = ResNet101()
    net.freeze()
    frozen = _frozen(net)
    assert {"conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.bn1.weight", "layer4.2.bn3.bias",
            "layer1.0.downsample.1.weight"} <= frozen
    trainable = {n for n, _ in net.named_parameters()} - frozen
    assert "layer1.0.conv1.weight" in trainable and "layer1.0.downsample.0.weight" in trainable
    # everything trainable is a conv weight outside the stem
    assert all(p.dim() == 4 for n, p in net.named_parameters() if n in trainable)


def test_freeze_vgg16_and_tinycnn():
    vgg = _meta(VGG16)
    vgg.freeze()
    assert _frozen(vgg) == {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    tiny = TinyCNN()
    tiny.freeze()
    assert _frozen(tiny) == set()


@pytest.mark.parametrize("name,bn_eval", [("resnet38", True), ("resnet101", True), ("tinycnn", False)])
def test_batchnorm_mode_after_train(name, bn_eval):
    net = _meta(ResNet101) if name == "resnet101" else _small(name)
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training != bn_eval for m in bns)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.training for m in convs)
    if name == "resnet38":  # running statistics are not updated by a training-mode forward
        before = bns[0].running_mean.clone()
        net(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(bns[0].running_mean, before)


def test_registry_builds_every_backbone():
    assert set(BACKBONES) == {"resnet38", "resnet50", "resnet101", "vgg16", "tinycnn"}
    tiny = build_backbone(NetConfig(backbone="tinycnn", width=0.5))
    assert isinstance(tiny, TinyCNN) and tiny.out_channels == 32
    r38 = build_backbone(NetConfig(backbone="resnet38", width=0.125))
    assert isinstance(r38, ResNet38) and r38.out_channels == 512
    with torch.device("meta"):
        assert isinstance(build_backbone(NetConfig(backbone="vgg16")), VGG16)
        assert isinstance(build_backbone(NetConfig(backbone="resnet101")), ResNet101)


@pytest.mark.parametrize("name", ["resnet101", "resnet50"])
def test_registry_rejects_width_for_torchvision_resnets(name):
    with pytest.raises(CaeeError, match=r"net\.width.*no width multiplier"):
        build_backbone(NetConfig(backbone=name, width=0.5))


def test_the_demo_s_vgg16_oc_starts_from_the_measured_weights():
    """The Table I demo's numbers (docs/DEMO.md) hold for these starting weights: a change to how
    VGG16 is built or initialised moves them (seed 0, configs/demo_vgg16_oc.yaml's network)."""
    from caee.models.classifier import build_classifier

    torch.manual_seed(0)
    net = NetConfig(backbone="vgg16", width=0.125, pretrained="", dropout=0.0, output_stride=8)
    model = build_classifier(net, 5)
    assert sum(p.sum().item() for p in model.parameters()) == pytest.approx(-41.2283, abs=1e-3)


def test_vgg16_width_scales_every_layer_and_keeps_the_layout():
    narrow = build_backbone(NetConfig(backbone="vgg16", width=0.125))
    assert narrow.channels == {0: 3, 1: 8, 2: 16, 3: 32, 4: 64, 5: 64} and narrow.out_channels == 64
    # the same torchvision names, pools and dilations as at width 1: only the channel counts differ
    wide = _meta(VGG16)
    assert set(narrow.state_dict()) == set(wide.state_dict())
    for a, b in zip(narrow.features, wide.features):
        assert type(a) is type(b)
        if isinstance(a, nn.Conv2d):
            assert (a.dilation, a.padding, a.stride) == (b.dilation, b.padding, b.stride)
            assert a.out_channels * 8 == b.out_channels
    assert narrow(torch.zeros(1, 3, 32, 48)).shape == (1, 64, 4, 6)


def test_registry_rejects_unknown_name_and_bad_width():
    with pytest.raises(CaeeError, match="unknown backbone 'resnet18'.*resnet38"):
        build_backbone(NetConfig(backbone="resnet18"))  # type: ignore[arg-type]
    with pytest.raises(CaeeError, match="net.width"):
        build_backbone(NetConfig(backbone="tinycnn", width=0.0))
