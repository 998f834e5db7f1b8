"""MXNet ``.params`` files (NDArray lists) read with numpy only, and the ResNet38 name mapping.

File layout (all integers little-endian), as written by MXNet's ``NDArray::Save`` for a list:

* ``uint64`` list magic ``0x112``, ``uint64`` reserved (0);
* ``uint64`` number of arrays, then each array (see below);
* ``uint64`` number of names (0 or the number of arrays), each ``uint64`` length + bytes.
  Parameter files store ``arg:<name>`` / ``aux:<name>`` (auxiliary states = BN running stats).

One array, in one of four layouts, told apart by its first ``uint32``:

* legacy (no magic): that ``uint32`` is ``ndim``; ``ndim`` ``uint32`` dims;
* V1 ``0xF993FAC8``: shape as ``int32 ndim`` + ``ndim`` ``int64`` dims;
* V2 ``0xF993FAC9``: ``int32`` storage type (0 = dense), then a V1-style shape;
* V3 ``0xF993FACA`` (numpy-shape semantics): like V2, but ``ndim`` 0 is a scalar and -1 unknown.

then (unless the array is "none", i.e. has no shape: ``ndim`` 0 outside V3) the context
(``int32`` device type, ``int32`` device id), the ``int32`` mshadow type flag and the raw
C-order data.
"""
from __future__ import annotations

import logging
import math
import os
import re
import struct

import numpy as np
import torch

from caee.core.errors import CaeeError

logger = logging.getLogger(__name__)

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
_DENSE_STORAGE = 0
_CPU_DEVICE = 1
# A corrupt or unknown array magic read as a legacy ndim is huge; real tensors have few dims.
_MAX_LEGACY_NDIM = 32

# mshadow type flags -> little-endian numpy dtypes.
TYPE_FLAGS: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
    4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
    8: np.dtype("<i2"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
_BFLOAT16_FLAG = 12  # no numpy dtype: read as the upper half of float32 bit patterns
_STORAGE_NAMES = {1: "row_sparse", 2: "csr"}


# ---------------------------------------------------------------- reading

class _Reader:
    """Bounds-checked little-endian reads from an in-memory file."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str) -> CaeeError:
        return CaeeError(f"{self.path}: not a valid MXNet .params file: {what} (at byte {self.pos}); "
                         "re-download or re-export the file")

    def take(self, n: int, what: str) -> int:
        """Reserve ``n`` bytes; return their offset."""
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated while reading {what} (needs {n} bytes, "
                            f"{len(self.data) - self.pos} left)")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self.data, dtype, count, self.take(dtype.itemsize * count, what)).copy()


def _read_shape64(r: _Reader, what: str, np_semantics: bool = False) -> tuple[int, tuple[int, ...]]:
    """``int32 ndim`` + int64 dims; ndim -1 (unknown) only exists with numpy-shape semantics (V3)."""
    (ndim,) = r.unpack("i", f"{what} ndim")
    if ndim < (-1 if np_semantics else 0) or ndim > _MAX_LEGACY_NDIM:
        raise r.fail(f"{what} has implausible ndim {ndim}")
    dims = r.array("<i8", max(ndim, 0), f"{what} dims")
    return ndim, tuple(int(d) for d in dims)


def _read_one(r: _Reader, index: int) -> np.ndarray | None:
    """One NDArray; None for an uninitialised ("none") array, which carries no data."""
    what = f"array #{index}"
    (magic,) = r.unpack("I", f"{what} magic")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"{what} storage type")
        if stype != _DENSE_STORAGE:
            kind = _STORAGE_NAMES.get(stype, "unknown")
            raise CaeeError(f"{r.path}: {what} has storage type {stype} ({kind}); only dense arrays "
                            "are supported: convert it with MXNet's tostype('default') and save again")
        ndim, shape = _read_shape64(r, f"{what} shape", np_semantics=magic == V3_MAGIC)
        if magic == V3_MAGIC:
            if ndim == -1 or any(d == -1 for d in shape):
                return None
        elif ndim == 0:
            return None
    elif magic == V1_MAGIC:
        ndim, shape = _read_shape64(r, f"{what} shape")
        if ndim == 0:
            return None
    else:
        if magic > _MAX_LEGACY_NDIM:
            raise r.fail(f"{what} starts with 0x{magic:08X}, neither an NDArray magic "
                         f"(V1 0x{V1_MAGIC:08X}, V2 0x{V2_MAGIC:08X}, V3 0x{V3_MAGIC:08X}) "
                         "nor a plausible legacy ndim")
        shape = tuple(int(d) for d in r.array("<u4", magic, f"{what} dims"))
        if magic == 0:
            return None
    if any(d < 0 for d in shape):
        raise r.fail(f"{what} has negative dims {shape}")
    r.unpack("ii", f"{what} context")
    (flag,) = r.unpack("i", f"{what} type flag")
    count = math.prod(shape)
    if flag == _BFLOAT16_FLAG:
        bits = r.array("<u2", count, f"{what} data").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if flag not in TYPE_FLAGS:
        raise r.fail(f"{what} has unknown type flag {flag}")
    return r.array(TYPE_FLAGS[flag], count, f"{what} data").reshape(shape)


def _strip_prefix(name: str) -> str:
    for prefix in ("arg:", "aux:"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def read_mxnet_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray-list file (``.params``) without MXNet.

    Returns ``{name: array}`` in file order with the ``arg:``/``aux:`` prefixes stripped; arrays
    keep their stored dtype and shape (bfloat16 is returned as float32). A file saved without
    names gets the keys ``"0"``, ``"1"``, ...
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CaeeError(f"MXNet params file not found: {path}") from None
    except OSError as e:
        raise CaeeError(f"{path}: cannot read MXNet params file ({e})") from None
    r = _Reader(data, path)
    magic, _reserved = r.unpack("QQ", "list header")
    if magic != LIST_MAGIC:
        raise r.fail(f"list magic is 0x{magic:X}, expected 0x{LIST_MAGIC:X}")
    (n_arrays,) = r.unpack("Q", "array count")
    if n_arrays > (len(data) - r.pos) // 4:  # every array takes at least 4 bytes
        raise r.fail(f"array count {n_arrays} cannot fit in a {len(data)}-byte file")
    arrays = [_read_one(r, i) for i in range(n_arrays)]
    (n_names,) = r.unpack("Q", "name count")
    if n_names not in (0, n_arrays):
        raise r.fail(f"{n_names} names for {n_arrays} arrays")
    names = []
    for i in range(n_names):
        (length,) = r.unpack("Q", f"name #{i} length")
        raw = r.data[r.take(length, f"name #{i}"):r.pos]
        try:
            names.append(_strip_prefix(raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise r.fail(f"name #{i} is not UTF-8") from None
    if r.pos != len(data):
        logger.warning("%s: %d trailing bytes after the NDArray list ignored", path, len(data) - r.pos)
    keys = names if n_names else [str(i) for i in range(n_arrays)]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise CaeeError(f"{path}: duplicate array names {dup[:10]} (after stripping arg:/aux:)")
    empty = [k for k, a in zip(keys, arrays) if a is None]
    if empty:
        raise CaeeError(f"{path}: uninitialised (shape-less) arrays {empty[:10]}; the file holds no "
                        "values for them")
    return dict(zip(keys, arrays))


# ---------------------------------------------------------------- ResNet38 name mapping

# PSA's ResNet38 (model A1): residual units per stage; stages 6 and 7 are bottlenecks.
BLOCKS_PER_STAGE = {2: 3, 3: 3, 4: 6, 5: 3, 6: 1, 7: 1}
_BOTTLENECK_STAGES = (6, 7)
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_var": "running_var"}
_CONV_RE = re.compile(r"res(\d)(a|b[1-9]\d*)_(branch1|branch2a|branch2b1|branch2b2)_weight")
_BN_RE = re.compile(r"bn(\d)(a|b[1-9]\d*)_(branch2a|branch2b1|branch2b2)_"
                    r"(gamma|beta|moving_mean|moving_var)")
_BN7_RE = re.compile(r"bn7_(gamma|beta|moving_mean|moving_var)")
_DROPPED_RE = re.compile(r"linear1000_(weight|bias)")  # the ImageNet classifier


def _block_branches(stage: int) -> list[str]:
    branches = ["branch2a", "branch2b1"]
    if stage in _BOTTLENECK_STAGES:
        branches.append("branch2b2")
    return branches


def psa_resnet38_keys() -> list[str]:
    """All state-dict keys of PSA's ResNet38 backbone (no classifier), in module order."""
    keys = ["conv1a.weight"]
    for stage, n_units in BLOCKS_PER_STAGE.items():
        for unit in range(n_units):
            block = f"b{stage}" if unit == 0 else f"b{stage}_{unit}"
            for branch in _block_branches(stage):
                keys += [f"{block}.bn_{branch}.{p}" for p in _BN_PARAMS.values()]
                keys.append(f"{block}.conv_{branch}.weight")
            if unit == 0:
                keys.append(f"{block}.conv_branch1.weight")
    keys += [f"bn7.{p}" for p in _BN_PARAMS.values()]
    return keys


def _block_name(stage: str, unit: str, branch: str) -> str | None:
    """PSA block name for MXNet unit ``res{stage}{unit}``, or None if it has no such branch."""
    s = int(stage)
    if s not in BLOCKS_PER_STAGE:
        return None
    k = 0 if unit == "a" else int(unit[1:])
    if k >= BLOCKS_PER_STAGE[s]:
        return None
    if branch == "branch1" and k != 0:
        return None
    if branch == "branch2b2" and s not in _BOTTLENECK_STAGES:
        return None
    return f"b{s}" if k == 0 else f"b{s}_{k}"


def _psa_key(name: str) -> str | None:
    """The PSA key of one MXNet name; "" for dropped names, None for unrecognised ones."""
    if name == "conv1a_weight":
        return "conv1a.weight"
    if _DROPPED_RE.fullmatch(name):
        return ""
    if m := _BN7_RE.fullmatch(name):
        return f"bn7.{_BN_PARAMS[m[1]]}"
    if m := _CONV_RE.fullmatch(name):
        block = _block_name(m[1], m[2], m[3])
        return None if block is None else f"{block}.conv_{m[3]}.weight"
    if m := _BN_RE.fullmatch(name):
        block = _block_name(m[1], m[2], m[3])
        return None if block is None else f"{block}.bn_{m[3]}.{_BN_PARAMS[m[4]]}"
    return None


def resnet38_mxnet_to_psa(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename the ResNet38 ImageNet arrays (``res4b1_branch2a_weight``, ...) to PSA's keys.

    ``res{S}a`` -> ``b{S}``, ``res{S}b{k}`` -> ``b{S}_{k}``; conv ``_weight`` -> ``.conv_*.weight``;
    BN gamma/beta/moving_mean/moving_var -> weight/bias/running_mean/running_var; ``bn7_*`` ->
    ``bn7.*``; ``linear1000_*`` is dropped. ``arg:``/``aux:`` prefixes are accepted. Returns float32
    tensors; does not require every key to be present (see :func:`psa_resnet38_keys`).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in arrays.items():
        key = _psa_key(_strip_prefix(name))
        if key is None:
            unknown.append(name)
        elif key:
            if key in out:
                raise CaeeError(f"two MXNet arrays map to the PSA key {key!r} (second: {name!r})")
            out[key] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    if unknown:
        raise CaeeError(f"unrecognised ResNet38 MXNet parameter names {unknown}: expected "
                        "conv1a_weight, res{S}{a|bK}_branch*_weight, bn{S}{a|bK}_branch*_{gamma|beta|"
                        "moving_mean|moving_var}, bn7_* or linear1000_* for PSA's ResNet38")
    return out


# ---------------------------------------------------------------- the ResNet38 ImageNet file


def is_mxnet_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the MXNet list magic (the format is sniffed, not the suffix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CaeeError(f"ResNet38 weights not found: {path}") from None
    except OSError as e:
        raise CaeeError(f"{path}: cannot read ResNet38 weights ({e})") from None
    return head == struct.pack("<Q", LIST_MAGIC)



def resnet38_from_torch(obj: object, path: str) -> dict[str, torch.Tensor]:
    """ResNet38 backbone weights keyed as PSA's from what ``torch.load`` read out of ``path``:
    PSA's keys, or MXNet names saved with torch."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CaeeError(f"{path}: expected a state dict of tensors")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    if obj and all("." not in _strip_prefix(k) for k in obj):  # MXNet names saved with torch
        return resnet38_mxnet_to_psa({k: v.float().numpy() for k, v in obj.items()})
    expected = set(psa_resnet38_keys())
    state = {k: v for k, v in obj.items() if not k.endswith(".num_batches_tracked")}
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CaeeError(f"{path}: keys {unexpected[:10]} are not part of the PSA ResNet38 backbone; "
                        "pass ImageNet backbone weights")
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


__all__ = ["read_mxnet_params", "resnet38_mxnet_to_psa", "psa_resnet38_keys",
           "resnet38_from_torch", "is_mxnet_file", "BLOCKS_PER_STAGE", "TYPE_FLAGS"]
