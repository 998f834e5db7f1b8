"""MXNet .params reading/writing and the ResNet38 MXNet -> PSA name mapping."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from caee.core.errors import CaeeError
from caee.weights.checkpoints import load_resnet38_imagenet
from caee.weights.mxnet_params import (
    psa_resnet38_keys,
    read_mxnet_params,
    resnet38_mxnet_to_psa,
)
from writers import write_mxnet_params

REPO = Path(__file__).resolve().parents[1]


def _sample_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc_bias": rng.standard_normal(5).astype(np.float64),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "bytes": rng.integers(0, 256, (7,), dtype=np.uint8),
        "ints": rng.integers(-2**31, 2**31, (2, 2, 2), dtype=np.int32),
        "small": rng.integers(-128, 128, (3,), dtype=np.int8),
        "longs": np.array([-(2**62), 0, 2**62 + 12345], dtype=np.int64),
        "one": np.array([3.25], dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "bn_moving_mean": rng.standard_normal(6).astype(np.float32),
        "bn_moving_var": rng.random(6).astype(np.float32),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------- bytes built by hand from the spec

def _list_file(array_blobs: list[bytes], names: list[str]) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(array_blobs)) + b"".join(array_blobs)
    out += struct.pack("<Q", len(names))
    for n in names:
        out += struct.pack("<Q", len(n)) + n.encode()
    return out


def test_hand_built_legacy_file(tmp_path):
    # legacy: uint32 ndim, uint32 dims, int32 dev_type, int32 dev_id, int32 type flag, data
    blob = struct.pack("<I2I", 2, 2, 3) + struct.pack("<iii", 1, 0, 0)
    blob += struct.pack("<6f", 1.0, -2.0, 0.5, 4.0, 8.0, -0.25)
    p = tmp_path / "legacy.params"
    p.write_bytes(_list_file([blob], ["arg:res2a_branch1_weight"]))
    got = read_mxnet_params(p)
    assert list(got) == ["res2a_branch1_weight"]
    assert got["res2a_branch1_weight"].dtype == np.float32
    np.testing.assert_array_equal(got["res2a_branch1_weight"], [[1.0, -2.0, 0.5], [4.0, 8.0, -0.25]])


def test_hand_built_v2_and_v1_files(tmp_path):
    # V2: magic, int32 stype 0, int32 ndim, int64 dims, context, type flag 6 (int64), data
    v2 = struct.pack("<Iii3q", 0xF993FAC9, 0, 3, 1, 2, 1) + struct.pack("<iii", 2, 1, 6)
    v2 += struct.pack("<2q", -7, 2**40)
    # V1: magic, int32 ndim, int64 dims, context, type flag 1 (float64), data
    v1 = struct.pack("<Iiq", 0xF993FAC8, 1, 2) + struct.pack("<iii", 1, 0, 1) + struct.pack("<2d", 0.1, 1e300)
    p = tmp_path / "v2.params"
    p.write_bytes(_list_file([v2, v1], ["aux:bn7_moving_var", "weird"]))
    got = read_mxnet_params(p)
    assert list(got) == ["bn7_moving_var", "weird"]
    assert got["bn7_moving_var"].dtype == np.int64 and got["bn7_moving_var"].shape == (1, 2, 1)
    assert got["bn7_moving_var"].ravel().tolist() == [-7, 2**40]
    assert got["weird"].dtype == np.float64 and got["weird"].tolist() == [0.1, 1e300]


def test_hand_built_v3_scalar_and_bfloat16(tmp_path):
    scalar = struct.pack("<Iii", 0xF993FACA, 0, 0) + struct.pack("<iii", 1, 0, 4) + struct.pack("<i", -9)
    # bfloat16 (flag 12) 0x3FC0 = 1.5, 0xC080 = -4.0
    bf16 = struct.pack("<Iiiq", 0xF993FAC9, 0, 1, 2) + struct.pack("<iii", 1, 0, 12) + struct.pack("<2H", 0x3FC0, 0xC080)
    p = tmp_path / "v3.params"
    p.write_bytes(_list_file([scalar, bf16], ["s", "b"]))
    got = read_mxnet_params(p)
    assert got["s"].shape == () and got["s"].dtype == np.int32 and int(got["s"]) == -9
    assert got["b"].dtype == np.float32 and got["b"].tolist() == [1.5, -4.0]


def test_file_without_names_gets_index_keys(tmp_path):
    blob = struct.pack("<II", 1, 2) + struct.pack("<iii", 1, 0, 3) + bytes([7, 250])
    p = tmp_path / "nonames.params"
    p.write_bytes(_list_file([blob, blob], []))
    got = read_mxnet_params(p)
    assert list(got) == ["0", "1"] and got["1"].tolist() == [7, 250]


# ---------------------------------------------------------------- writer <-> reader

@pytest.mark.parametrize("version", ["legacy", "v1", "v2", "v3"])
def test_round_trip_all_versions(tmp_path, version):
    arrays = _sample_arrays(np.random.default_rng(0))
    if version == "v3":
        arrays["scalar"] = np.array(2.5, dtype=np.float64)
    p = tmp_path / f"{version}.params"
    write_mxnet_params(p, arrays, version=version)
    _assert_same(read_mxnet_params(p), arrays)


@pytest.mark.parametrize("version, magic", [("v1", 0xF993FAC8), ("v2", 0xF993FAC9), ("v3", 0xF993FACA)])
def test_writer_layout_matches_spec(tmp_path, version, magic):
    p = tmp_path / "x.params"
    write_mxnet_params(p, {"w": np.array([1.0, 2.0], np.float32), "bn_moving_mean": np.array([3], np.int8)},
                       version=version)
    data = p.read_bytes()
    assert struct.unpack_from("<QQQ", data, 0) == (0x112, 0, 2)
    assert struct.unpack_from("<I", data, 24)[0] == magic
    shape_at = 28 if version == "v1" else 32
    assert struct.unpack_from("<iq", data, shape_at) == (1, 2)
    assert struct.unpack_from("<iii2f", data, shape_at + 12) == (1, 0, 0, 1.0, 2.0)
    tail = struct.pack("<QQ", 2, 5) + b"arg:w" + struct.pack("<Q", 18) + b"aux:bn_moving_mean"
    assert data.endswith(tail)


def test_writer_legacy_layout_and_zero_d_rules(tmp_path):
    p = tmp_path / "l.params"
    write_mxnet_params(p, {"a": np.array([[5]], np.uint8)}, version="legacy")
    data = p.read_bytes()
    assert data[24:24 + 12 + 12 + 1] == struct.pack("<3I", 2, 1, 1) + struct.pack("<iii", 1, 0, 3) + b"\x05"
    for version in ("legacy", "v1", "v2"):  # ndim 0 means "no array" in these layouts
        with pytest.raises(ValueError, match="0-d"):
            write_mxnet_params(tmp_path / "z.params", {"s": np.float32(1)}, version=version)
    with pytest.raises(ValueError, match="version"):
        write_mxnet_params(tmp_path / "z.params", {}, version="v9")


# ---------------------------------------------------------------- corrupt input

def test_every_truncation_is_caught(tmp_path):
    p = tmp_path / "full.params"
    write_mxnet_params(p, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "bn_moving_var": np.ones(2)})
    data = p.read_bytes()
    cut = tmp_path / "cut.params"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(CaeeError, match="cut.params"):
            read_mxnet_params(cut)


def test_bad_magics_and_flags(tmp_path):
    good = struct.pack("<II", 1, 1) + struct.pack("<iii", 1, 0, 0) + struct.pack("<f", 1.0)
    cases = {
        "list": (struct.pack("<QQQ", 0x113, 0, 0) + struct.pack("<Q", 0), "list magic"),
        "array": (_list_file([struct.pack("<I", 0xDEADBEEF) + good[4:]], ["x"]), "0xDEADBEEF"),
        "flag": (_list_file([struct.pack("<II", 1, 1) + struct.pack("<iii", 1, 0, 99) + b"\0" * 4], ["x"]),
                 "type flag 99"),
        "sparse": (_list_file([struct.pack("<Ii", 0xF993FAC9, 2) + b"\0" * 40], ["x"]), "storage type 2"),
        "none": (_list_file([struct.pack("<I", 0)], ["ghost"]), "ghost"),
        "names": (_list_file([good, good], ["a"]), "1 names for 2 arrays"),
        "dup": (_list_file([good, good], ["arg:a", "aux:a"]), "duplicate"),
        "count": (struct.pack("<QQQ", 0x112, 0, 10**12), "array count"),
    }
    for name, (data, message) in cases.items():
        p = tmp_path / f"{name}.params"
        p.write_bytes(data)
        with pytest.raises(CaeeError, match=message):
            read_mxnet_params(p)
    with pytest.raises(CaeeError, match="not found"):
        read_mxnet_params(tmp_path / "missing.params")


# ---------------------------------------------------------------- ResNet38 names

def test_mapping_rules():
    names = {
        "conv1a_weight": "conv1a.weight",
        "res2a_branch1_weight": "b2.conv_branch1.weight",
        "res2a_branch2a_weight": "b2.conv_branch2a.weight",
        "res2b1_branch2a_weight": "b2_1.conv_branch2a.weight",
        "res2b2_branch2b1_weight": "b2_2.conv_branch2b1.weight",
        "res4b1_branch2b1_weight": "b4_1.conv_branch2b1.weight",
        "res4b5_branch2a_weight": "b4_5.conv_branch2a.weight",
        "res6a_branch2b2_weight": "b6.conv_branch2b2.weight",
        "res7a_branch1_weight": "b7.conv_branch1.weight",
        "bn2a_branch2a_gamma": "b2.bn_branch2a.weight",
        "bn2b1_branch2a_beta": "b2_1.bn_branch2a.bias",
        "aux:bn2a_branch2a_moving_mean": "b2.bn_branch2a.running_mean",
        "aux:bn5b2_branch2b1_moving_var": "b5_2.bn_branch2b1.running_var",
        "arg:bn7a_branch2b2_gamma": "b7.bn_branch2b2.weight",
        "bn7_gamma": "bn7.weight",
        "bn7_beta": "bn7.bias",
        "bn7_moving_mean": "bn7.running_mean",
        "bn7_moving_var": "bn7.running_var",
    }
    arrays = {n: np.full((2,), i, dtype=np.float64 if i % 2 else np.float16) for i, n in enumerate(names)}
    arrays["linear1000_weight"] = np.ones((1000, 4096), np.float32)
    arrays["arg:linear1000_bias"] = np.ones(1000, np.float32)
    out = resnet38_mxnet_to_psa(arrays)
    assert set(out) == set(names.values())
    for i, (n, key) in enumerate(names.items()):
        assert out[key].dtype == torch.float32
        assert out[key].tolist() == [float(i), float(i)], n


@pytest.mark.parametrize("bad", [
    "res2b3_branch2a_weight",    # stage 2 has units a, b1, b2 only
    "res3a_branch2b2_weight",    # branch2b2 only in the bottleneck stages 6, 7
    "res2b1_branch1_weight",     # projection shortcut only in the first unit
    "res8a_branch2a_weight",     # no stage 8
    "res2a_branch2a_bias",       # convs have no bias
    "bn2a_branch1_gamma",        # the shortcut has no BN of its own
    "res2b0_branch2a_weight",
    "bn7_scale",
    "fc8_weight",
])
def test_unrecognised_names_raise(bad):
    with pytest.raises(CaeeError, match=bad):
        resnet38_mxnet_to_psa({"conv1a_weight": np.zeros(1), bad: np.zeros(1)})


def _mxnet_resnet38_names() -> list[str]:
    """The MXNet names of the ImageNet file, spelled out independently of the module under test."""
    names = ["conv1a_weight"]
    units = {2: ["a", "b1", "b2"], 3: ["a", "b1", "b2"], 4: ["a", "b1", "b2", "b3", "b4", "b5"],
             5: ["a", "b1", "b2"], 6: ["a"], 7: ["a"]}
    for s, us in units.items():
        for u in us:
            branches = ["branch2a", "branch2b1"] + (["branch2b2"] if s >= 6 else [])
            for b in branches:
                names.append(f"res{s}{u}_{b}_weight")
                names += [f"bn{s}{u}_{b}_{p}" for p in ("gamma", "beta", "moving_mean", "moving_var")]
            if u == "a":
                names.append(f"res{s}a_branch1_weight")
    names += [f"bn7_{p}" for p in ("gamma", "beta", "moving_mean", "moving_var")]
    return names + ["linear1000_weight", "linear1000_bias"]


def test_full_name_set_maps_onto_psa_keys():
    keys = psa_resnet38_keys()
    assert len(keys) == len(set(keys)) == 191  # 15 basic x 10 + 2 bottleneck x 15 + 6 shortcuts + conv1a + bn7
    out = resnet38_mxnet_to_psa({n: np.zeros(1, np.float32) for n in _mxnet_resnet38_names()})
    assert set(out) == set(keys)
    blocks = {k.split(".")[0] for k in keys} - {"conv1a", "bn7"}
    assert blocks == {"b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", *(f"b4_{i}" for i in range(1, 6)),
                      "b5", "b5_1", "b5_2", "b6", "b7"}


def _fake_imagenet_file(path: Path, version: str = "v2") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {n: rng.standard_normal(3).astype(np.float32) for n in _mxnet_resnet38_names()}
    write_mxnet_params(path, arrays, version=version)
    return arrays


def test_load_imagenet_params_and_pth(tmp_path):
    src = tmp_path / "resnet_38d.params"
    arrays = _fake_imagenet_file(src, version="legacy")
    state = load_resnet38_imagenet(src)
    assert len(state) == 191
    np.testing.assert_array_equal(state["b4_1.conv_branch2a.weight"].numpy(), arrays["res4b1_branch2a_weight"])
    np.testing.assert_array_equal(state["b2.bn_branch2a.running_var"].numpy(), arrays["bn2a_branch2a_moving_var"])

    pth = tmp_path / "psa.pth"  # PSA-keyed, as saved from a model (with num_batches_tracked)
    torch.save({**state, "bn7.num_batches_tracked": torch.tensor(0)}, pth)
    again = load_resnet38_imagenet(pth)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)

    mx_pth = tmp_path / "mx.pth"  # MXNet-keyed tensors saved with torch
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, mx_pth)
    assert torch.equal(load_resnet38_imagenet(mx_pth)["bn7.weight"], state["bn7.weight"])

    torch.save({**state, "fc8.weight": torch.zeros(20, 4096, 1, 1)}, tmp_path / "cls.pth")
    with pytest.raises(CaeeError, match="fc8.weight"):
        load_resnet38_imagenet(tmp_path / "cls.pth")
    del arrays["res5b2_branch2b1_weight"]
    write_mxnet_params(tmp_path / "partial.params", arrays)
    with pytest.raises(CaeeError, match="b5_2.conv_branch2b1.weight"):
        load_resnet38_imagenet(tmp_path / "partial.params")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CaeeError, match="junk.pth"):
        load_resnet38_imagenet(tmp_path / "junk.pth")


# ---------------------------------------------------------------- CLI

def _cli():
    spec = importlib.util.spec_from_file_location("convert_resnet38", REPO / "tools" / "convert_resnet38.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_round_trip(tmp_path, capsys):
    cli = _cli()
    src, dst = tmp_path / "in.params", tmp_path / "out" / "resnet38.pth"
    arrays = _fake_imagenet_file(src, version="v1")
    assert cli.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    stats = 37 * 2 * 3  # 37 BNs (15 x 2 + 2 x 3 + bn7), 2 running stats of 3 values each
    assert "191 tensors" in out and f"{191 * 3 - stats:,} parameters" in out and f"{stats:,} BN" in out
    state = torch.load(dst, weights_only=True)
    assert len(state) == 191
    np.testing.assert_array_equal(state["b6.conv_branch2b2.weight"].numpy(), arrays["res6a_branch2b2_weight"])
    assert all(v.dtype == torch.float32 for v in state.values())

    bad = tmp_path / "bad.params"
    bad.write_bytes(src.read_bytes()[:100])
    assert cli.main([str(bad), str(tmp_path / "never.pth")]) == 2
    captured = capsys.readouterr()
    assert "bad.params" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "never.pth").exists()
