"""Writers of file formats caee reads, for building test inputs byte by byte from their layout."""
from __future__ import annotations

import csv
import io
import os
import struct

import numpy as np
import torch

from caee.core.io import atomic_write, write_text
from caee.weights.mxnet_params import LIST_MAGIC, TYPE_FLAGS, V1_MAGIC, V2_MAGIC, V3_MAGIC

DENSE_STORAGE = 0
CPU_DEVICE = 1


def _array_bytes(value, version: str, name: str) -> bytes:
    """Serialise one dense array on the CPU context; written straight from the layout above."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, order="C")  # not ascontiguousarray: that turns 0-d into 1-d
    flag = next((f for f, dt in TYPE_FLAGS.items() if dt == arr.dtype.newbyteorder("<")), None)
    if flag is None:
        raise ValueError(f"{name}: dtype {arr.dtype} has no MXNet type flag")
    if arr.ndim == 0 and version != "v3":
        raise ValueError(f"{name}: a 0-d array is the 'none' marker in {version} files; "
                         "write it as shape (1,) or use version='v3'")
    if version == "legacy":
        if max(arr.shape) >= 2 ** 32:
            raise ValueError(f"{name}: dim too large for a legacy uint32 shape")
        head = struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape)
    else:
        shape = struct.pack(f"<i{arr.ndim}q", arr.ndim, *arr.shape)
        head = {"v1": struct.pack("<I", V1_MAGIC) + shape,
                "v2": struct.pack("<Ii", V2_MAGIC, DENSE_STORAGE) + shape,
                "v3": struct.pack("<Ii", V3_MAGIC, DENSE_STORAGE) + shape}[version]
    ctx_and_type = struct.pack("<iii", CPU_DEVICE, 0, flag)
    return head + ctx_and_type + arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _prefixed(name: str) -> str:
    if name.startswith(("arg:", "aux:")):
        return name
    return ("aux:" if name.endswith(("moving_mean", "moving_var")) else "arg:") + name


def write_mxnet_params(path: str | os.PathLike, arrays: dict, version: str = "v2") -> None:
    """Write ``{name: array}`` as an MXNet NDArray-list file (atomically).

    version: "legacy", "v1", "v2" or "v3" (array header layout). Names get ``aux:`` when they end
    in ``moving_mean``/``moving_var``, else ``arg:`` (names already prefixed are kept). 0-d arrays
    need "v3": the older layouts use ndim 0 to mean "no array".
    """
    if version not in ("legacy", "v1", "v2", "v3"):
        raise ValueError(f"version must be 'legacy', 'v1', 'v2' or 'v3', got {version!r}")
    chunks = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    chunks += [_array_bytes(v, version, k) for k, v in arrays.items()]
    chunks.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        raw = _prefixed(name).encode("utf-8")
        chunks.append(struct.pack("<Q", len(raw)) + raw)
    with atomic_write(path) as f:
        for chunk in chunks:
            f.write(chunk)


def write_labels_csv(path: str | os.PathLike, class_names: list[str], ids: list[str], labels: np.ndarray) -> None:
    """Write ``labels`` ((N, C) 0/1) for ``ids`` in the format :func:`read_labels_csv` reads."""
    labels = np.asarray(labels)
    if labels.shape != (len(ids), len(class_names)):
        raise ValueError(f"labels must be (N, C) = ({len(ids)}, {len(class_names)}), got {labels.shape}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", *class_names])
    for image_id, row in zip(ids, labels):
        writer.writerow([image_id, *(int(v > 0) for v in row)])
    write_text(path, buf.getvalue())
