"""Checkpoint loading: file formats, torchvision / PSA / MXNet key layouts and the error messages."""
import functools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from caee.core.config import NetConfig
from caee.core.errors import CaeeError
from caee.models import ResNet38, ResNet101, build_backbone
from caee.weights.checkpoints import (caee_to_psa, guess_architecture, load_imagenet_weights, load_into,
                                      load_model_weights, load_state_dict_file, psa_to_caee)
from writers import write_mxnet_params
from conftest import randomise_bn


class StandIn(nn.Module):
    """A tiny composition shaped like our classifier: ``backbone`` + top-level ``fc8``."""

    def __init__(self, num_classes: int = 20):
        super().__init__()
        self.backbone = ResNet38(width=0.125)
        self.fc8 = nn.Conv2d(512, num_classes, 1, bias=False)

    def forward(self, x):
        return self.fc8(self.backbone(x))


def _no_nbt(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _torchvision_state(name: str) -> dict:
    """The state dict of ``torchvision.models.<name>(weights=None)`` (random values), keys in order.

    VGG16's 120 M classifier parameters are dropped by every loader unread, so they are stored
    as zero-stride expanded scalars: true keys and shapes, a few bytes on disk.
    """
    torch.manual_seed(1)
    if name == "resnet101":
        net = randomise_bn(torchvision.models.resnet101(weights=None), seed=2)
        return {k: v.clone() for k, v in net.state_dict().items()}
    assert name == "vgg16"
    with torch.device("meta"):
        net = torchvision.models.vgg16(weights=None)
    net.features.to_empty(device="cpu")
    for m in net.features.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return {k: (v.clone() if k.startswith("features.") else torch.zeros(()).expand(v.shape))
            for k, v in net.state_dict().items()}


def _vgg16_reference() -> nn.Sequential:
    """torchvision's ``vgg16().features`` holding the weights of ``_torchvision_state("vgg16")``."""
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features.to_empty(device="cpu")
    state = _torchvision_state("vgg16")
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                              if k.startswith("features.")})
    return features.eval()


# ---------------------------------------------------------------- reading files


def test_load_state_dict_file_layouts(tmp_path):
    sd = {"a.weight": torch.arange(3.0), "b.bias": torch.ones(2)}
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"model": sd, "optimizer": {"state": {}}, "step": 7, "class_names": ["x"]}, tmp_path / "last.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "sd.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    for name in ("plain", "last", "sd", "ddp"):
        got = load_state_dict_file(tmp_path / f"{name}.pth")
        assert list(got) == ["a.weight", "b.bias"], name
        torch.testing.assert_close(got["a.weight"], torch.arange(3.0))


def test_load_state_dict_file_errors(tmp_path):
    with pytest.raises(CaeeError, match=r"not found: .*nope\.pth.*train_cgnet\.oc_weights"):
        load_state_dict_file(tmp_path / "nope.pth", config_key="train_cgnet.oc_weights")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CaeeError, match=r"junk\.pth.*unreadable"):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save({"a": 1, "b": "text"}, tmp_path / "notensors.pth")
    with pytest.raises(CaeeError, match="not a state dict of tensors"):
        load_state_dict_file(tmp_path / "notensors.pth")


def test_guess_architecture():
    assert guess_architecture(_torchvision_state("resnet101")) == "torchvision ResNet-101"
    assert guess_architecture(_torchvision_state("vgg16")) == "torchvision VGG16"
    psa = set(ResNet38(width=0.125).state_dict())
    assert "PSA ResNet38 classifier" in guess_architecture(psa | {"fc8.weight"})
    assert "PSA ResNet38 AffinityNet" in guess_architecture(psa | {"f8_3.weight", "f9.weight"})
    assert guess_architecture({"backbone." + k for k in psa} | {"fc8.weight"}).startswith(
        "a caee classifier (PSA ResNet38 backbone")


# ---------------------------------------------------------------- torchvision ImageNet files


def test_torchvision_resnet101_loads_and_matches(tmp_path):
    state = _torchvision_state("resnet101")
    assert "fc.weight" in state
    torch.save(_no_nbt(state), tmp_path / "resnet101-test.pth")  # old files lack num_batches_tracked
    ours = ResNet101()
    load_imagenet_weights(ours, tmp_path / "resnet101-test.pth")
    ours.eval()
    with torch.device("meta"):  # skip the random init: every value is overwritten
        ref = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    ref.to_empty(device="cpu").load_state_dict(state)
    ref.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        stem = ref.relu(ref.bn1(ref.conv1(x)))
        torch.testing.assert_close(ours.stage(1, x), stem, rtol=0, atol=0)
        r = ref.maxpool(stem)
        for d, layer in zip((2, 3, 4, 5), (ref.layer1, ref.layer2, ref.layer3, ref.layer4)):
            r = layer(r)
        torch.testing.assert_close(ours(x), r, rtol=0, atol=0)
        assert r.shape == (1, 2048, 4, 4)


def test_torchvision_vgg16_loads_and_matches(tmp_path):
    state = _torchvision_state("vgg16")
    torch.save(state, tmp_path / "vgg16-test.pth")
    ours = build_backbone(NetConfig(backbone="vgg16", pretrained=str(tmp_path / "vgg16-test.pth"))).eval()
    assert state["classifier.0.weight"].shape == (4096, 25088)
    ref = _vgg16_reference()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = ours.forward_features(x, keep=(1, 2, 3, 5))
        torch.testing.assert_close(feats[1], ref[:5](x), rtol=0, atol=0)
        torch.testing.assert_close(feats[3], ref[:17](x), rtol=0, atol=0)
        # dense reference for the stride-8 tail: conv4_x without pool4, conv5_x dilated by 2
        y = ref[17:23](feats[3])
        for i in (24, 26, 28):
            conv = ref[i]
            y = F.relu(F.conv2d(y, conv.weight, conv.bias, padding=2, dilation=2))
        torch.testing.assert_close(feats[5], y)
        assert y.shape == (1, 512, 8, 8)


# ---------------------------------------------------------------- ResNet38 ImageNet weights


def _mxnet_name(psa_key: str) -> str:
    """PSA key -> MXNet name (the inverse of the documented mapping), for building test files."""
    bn_suffix = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    if psa_key == "conv1a.weight":
        return "conv1a_weight"
    block, layer, param = psa_key.split(".") if psa_key.count(".") == 2 else (None, *psa_key.split("."))
    if block is None:  # bn7.*
        return f"bn7_{bn_suffix[param]}"
    m = re.fullmatch(r"b(\d)(?:_(\d+))?", block)
    unit = "a" if m[2] is None else f"b{m[2]}"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"res{m[1]}{unit}_{branch}_weight"
    return f"bn{m[1]}{unit}_{branch}_{bn_suffix[param]}"


def test_resnet38_imagenet_pth_and_params(tmp_path):
    torch.manual_seed(3)
    src = randomise_bn(ResNet38(width=0.125), seed=4)
    state = _no_nbt(src.state_dict())
    torch.save(state, tmp_path / "res38_imagenet.pth")
    write_mxnet_params(tmp_path / "resnet_38d.params",
                       {_mxnet_name(k): v.numpy() for k, v in state.items()}
                       | {"linear1000_weight": torch.zeros(1000, 512).numpy()})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = src.eval()(x)
    for name in ("res38_imagenet.pth", "resnet_38d.params"):
        net = build_backbone(NetConfig(backbone="resnet38", width=0.125, pretrained=str(tmp_path / name)))
        for k, v in state.items():
            torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0, msg=f"{name}: {k}")
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), expected, rtol=0, atol=0)


def test_resnet38_imagenet_width_mismatch(tmp_path):
    torch.save(_no_nbt(ResNet38(width=0.125).state_dict()), tmp_path / "w0125.pth")
    with pytest.raises(CaeeError) as e:
        load_imagenet_weights(ResNet38(width=0.25), tmp_path / "w0125.pth")
    msg = str(e.value)
    assert "ResNet38" in msg and "shape mismatch" in msg and "net.width" in msg
    assert "conv1a.weight: checkpoint [8, 3, 3, 3] vs model [16, 3, 3, 3]" in msg


def test_missing_pretrained_file_names_config_key(tmp_path):
    with pytest.raises(CaeeError, match=r"not found: .*absent\.params.*'net\.pretrained'"):
        build_backbone(NetConfig(backbone="resnet38", width=0.125, pretrained=str(tmp_path / "absent.params")))


def test_vgg16_file_into_resnet38_names_both(tmp_path):
    torch.save(_torchvision_state("vgg16"), tmp_path / "vgg16.pth")
    with pytest.raises(CaeeError) as e:
        load_imagenet_weights(ResNet38(width=0.125), tmp_path / "vgg16.pth")
    assert "ResNet38" in str(e.value) and "torchvision VGG16" in str(e.value)
    with pytest.raises(CaeeError) as e:
        load_model_weights(StandIn(), tmp_path / "vgg16.pth", arch="classifier/resnet38")
    msg = str(e.value)
    assert "classifier/resnet38" in msg and "looks like torchvision VGG16" in msg
    # both sides are counted in full: all our (non-num_batches_tracked) keys, all 32 VGG16 keys
    n_own = len(_no_nbt(StandIn().state_dict()))
    assert f"{n_own} keys of classifier/resnet38 missing" in msg
    assert "32 checkpoint keys classifier/resnet38 does not have" in msg  # 13 convs + 3 fc, w + b
    assert "... and" in msg  # long lists are cut


# ---------------------------------------------------------------- PSA checkpoints and our own


def test_psa_layout_round_trip():
    ours = {"backbone.conv1a.weight": 1, "backbone.b2.bn_branch2a.running_mean": 2, "fc8.weight": 3,
            "f8_3.weight": 4, "f9.weight": 5}
    psa = caee_to_psa(ours)
    assert psa == {"conv1a.weight": 1, "b2.bn_branch2a.running_mean": 2, "fc8.weight": 3,
                   "f8_3.weight": 4, "f9.weight": 5}
    assert psa_to_caee(psa) == ours
    assert psa_to_caee(ours) == ours  # already ours: unchanged
    assert psa_to_caee({"fc8.weight": 0, "x.w": 1}, head_keys=("x",)) == {"backbone.fc8.weight": 0, "x.w": 1}


def test_psa_classifier_checkpoint_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(5)
    src = randomise_bn(StandIn(), seed=6).eval()
    psa_state = _no_nbt(caee_to_psa(src.state_dict()))
    assert "conv1a.weight" in psa_state and "fc8.weight" in psa_state
    assert not any(k.startswith("backbone.") or k.endswith("num_batches_tracked") for k in psa_state)
    torch.save(psa_state, tmp_path / "res38_cls.pth")
    torch.manual_seed(7)
    dst = StandIn()
    load_model_weights(dst, tmp_path / "res38_cls.pth", arch="classifier/resnet38")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src(x), rtol=0, atol=0)


def test_our_model_pth_loads(tmp_path):
    torch.manual_seed(8)
    src = randomise_bn(StandIn(), seed=9)
    torch.save({"model": src.state_dict(), "arch": "classifier", "class_names": ["a"] * 20},
               tmp_path / "model.pth")
    dst = StandIn()
    load_model_weights(dst, tmp_path / "model.pth", arch="classifier/resnet38")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)


def test_num_classes_mismatch_names_the_shape(tmp_path):
    torch.save({"model": StandIn(num_classes=21).state_dict()}, tmp_path / "model.pth")
    with pytest.raises(CaeeError) as e:
        load_model_weights(StandIn(num_classes=20), tmp_path / "model.pth", arch="classifier/resnet38")
    msg = str(e.value)
    assert "fc8.weight: checkpoint [21, 512, 1, 1] vs model [20, 512, 1, 1]" in msg
    assert "number of classes differs (checkpoint 21, model 20)" in msg
    assert "1 shape mismatch(es)" in msg and "missing" not in msg


def test_load_into_non_strict_reports_and_ignore():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    full = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    part = {"0.weight": full["0.weight"], "extra.weight": torch.zeros(1)}
    report = load_into(net, part, strict=False, arch="toy", source="mem")
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert (net[0].weight == 3).all()
    with pytest.raises(CaeeError, match="(?s)5 keys of toy missing.*1 checkpoint keys toy does not have"):
        load_into(net, part, arch="toy", source="mem")
    load_into(net, part, arch="toy", source="mem", ignore=("0.bias", "1.", "extra."))
    bad = dict(full, **{"0.weight": torch.zeros(3, 1, 1, 1)})
    with pytest.raises(CaeeError, match=r"0\.weight: checkpoint \[3, 1, 1, 1\] vs model \[2, 1, 1, 1\]"):
        load_into(net, bad, strict=False, arch="toy", source="mem")


def test_init_weights_from_a_classifier_loads_only_the_backbone(tmp_path):
    from caee.core.config import NetConfig
    from caee.models.classifier import CamClassifier
    from caee.models.deeplab import build_deeplab
    from caee.models.tinycnn import TinyCNN
    from caee.weights.checkpoints import init_weights_from

    torch.manual_seed(0)
    cls = CamClassifier(TinyCNN(0.5), 3, 0.0)
    torch.save({"model": cls.state_dict(), "arch": "classifier"}, tmp_path / "cls.pth")
    seg = build_deeplab(NetConfig(backbone="tinycnn", width=0.5), 4, "largefov")
    head_before = {k: v.clone() for k, v in seg.head.state_dict().items()}
    assert init_weights_from(seg, tmp_path / "cls.pth", arch="deeplab/tinycnn") == "backbone"
    for k, v in cls.backbone.state_dict().items():
        assert torch.equal(seg.backbone.state_dict()[k], v), k
    assert all(torch.equal(seg.head.state_dict()[k], v) for k, v in head_before.items())
    torch.save({"model": seg.state_dict()}, tmp_path / "seg.pth")    # a DeepLab file loads whole
    fresh = build_deeplab(NetConfig(backbone="tinycnn", width=0.5), 4, "largefov")
    assert init_weights_from(fresh, tmp_path / "seg.pth", arch="deeplab/tinycnn") == "model"
    wrong = build_deeplab(NetConfig(backbone="tinycnn", width=1.0), 4, "largefov")
    with pytest.raises(CaeeError, match="backbone"):
        init_weights_from(wrong, tmp_path / "cls.pth", arch="deeplab/tinycnn")
