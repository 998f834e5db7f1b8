"""Reading and writing the artifacts passed between stages.

Every writer is atomic: data goes to a temporary file in the target folder, which is then renamed
over the target, so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from caee.core.errors import CaeeError, write_fault


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; CaeeError naming the file in the way or the folder that cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise CaeeError(f"cannot create the folder {folder}: {blocker} is a file, not a folder; move it away "
                        "or choose another work_dir / path") from None
    except OSError as e:
        fault = write_fault(e.filename or folder, e)
        if fault is None:
            raise
        raise fault from None
    return folder


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on success rename it to ``path``.

    A write fault (disk full, read-only or forbidden folder, a folder named like the file) is a
    CaeeError naming the path; the file it was to replace stays as it was."""
    path = Path(path)
    if path.is_dir():
        raise CaeeError(f"cannot write {path}: it is a folder; remove it or choose another path")
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise (write_fault(path.parent, e) or e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask like open() would
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _fault_point()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fault = write_fault(path, e) if isinstance(e, OSError) else None
        if fault is None:
            raise
        raise fault from None


_WRITES = 0


def _fault_point() -> None:
    """Tests' kill -9 stand-in: with ``CAEE_KILL_AT_WRITE=N`` the process dies at once (no clean-up,
    like SIGKILL) when its N-th atomic write is complete but not yet renamed into place."""
    global _WRITES
    at = os.environ.get("CAEE_KILL_AT_WRITE")
    if at:
        _WRITES += 1
        if _WRITES == int(at):
            os._exit(137)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files left in ``folder`` by atomic writes of a killed run; return how many.

    Call only while holding the folder's :class:`StageLock` (a live writer's temp file looks the same)."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


class StageLock:
    """``<folder>/.lock`` held with ``fcntl.flock`` while a stage writes into ``folder``.

    The kernel releases the lock when its process dies, so a lock left by a killed run is taken
    over; the file also records pid and host to name the holder in the refusal."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "StageLock":
        import fcntl

        make_folder(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise (write_fault(self.path, e) or e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CaeeError(f"{self.path.parent} is in use by a running stage ({holder}); wait for it to finish "
                            "or use another work_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- label PNGs (VOC palette)

def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened); 255 (ignore) is white."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [255, 255, 255]
    return palette


_PALETTE = voc_palette()


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Save an (H, W) label map of class indices (0..C, 255 = ignore) as a palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class indices (palette indices, or a grey image)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise CaeeError(f"{path}: label PNG must be a palette or greyscale image, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise CaeeError(f"label file not found: {path}") from None
    except (OSError, SyntaxError) as e:
        raise CaeeError(f"{path}: unreadable label PNG ({e})") from None


def _to_rgb(img: Image.Image, path) -> np.ndarray:
    """(H, W, 3) uint8 from any 8/16-bit PIL mode; PIL's convert("RGB") clips 16-bit grey to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.array(img)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise CaeeError(f"{path}: {img.mode} image values {grey.min()}..{grey.max()} are not 16-bit; "
                            "convert it to 8-bit RGB")
        grey = (grey.astype(np.uint32) >> 8).astype(np.uint8)  # 16 -> 8 bit: the high byte
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("F",):
        raise CaeeError(f"{path}: floating-point image (mode F) is not supported; convert it to 8-bit RGB")
    if img.mode in ("PA", "P") and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"))  # RGB(A), L(A), P, CMYK, YCbCr, 1: PIL's colour conversion


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8 (16-bit grey scaled down, palette / CMYK / LA / 1 converted)."""
    try:
        with Image.open(path) as img:
            return _to_rgb(img, path)
    except FileNotFoundError:
        raise CaeeError(f"image not found: {path}") from None
    except (OSError, SyntaxError) as e:
        raise CaeeError(f"{path}: unreadable image ({e})") from None


# ---------------------------------------------------------------- CAM files

def save_cam_npz(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray) -> None:
    """Save the CAMs of one image.

    keys: (K,) 0-based foreground class ids present in the image.
    cams: (K, H, W) float16/float32 in [0, 1], at the original image size.
    """
    keys = np.asarray(keys, dtype=np.int64)
    cams = np.asarray(cams)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
    with atomic_write(path) as f:
        np.savez(f, keys=keys, cams=cams)


def load_cam_npz(path: str | os.PathLike, num_classes: int | None = None,
                 dtype: np.dtype | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(keys (K,) int64, cams (K, H, W) float32)`` written by :func:`save_cam_npz`
    (``dtype=None``: the CAMs as stored, float16 / float32).

    Refuses CAMs that are not finite or outside [0, 1], and (with ``num_classes``) keys outside
    ``0..num_classes-1``: such a file would silently become wrong labels downstream."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = z["keys"].astype(np.int64)
            cams = z["cams"] if dtype is None else z["cams"].astype(dtype)
    except FileNotFoundError:
        raise CaeeError(f"CAM file not found: {path}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CaeeError(f"{path}: unreadable or truncated CAM file ({e}); delete it and re-run make_cam.py") from None
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise CaeeError(f"{path}: expected cams (K, H, W) with K = len(keys), got {cams.shape} and {keys.shape}")
    if not np.isfinite(cams).all():
        raise CaeeError(f"{path}: CAM values are not all finite (NaN / inf); delete it and re-run make_cam.py")
    if cams.size and (cams.min() < 0 or cams.max() > 1):
        raise CaeeError(f"{path}: CAM values must lie in [0, 1], got {cams.min():g}..{cams.max():g}; "
                        "delete it and re-run make_cam.py")
    if num_classes is not None and keys.size and (keys.min() < 0 or keys.max() >= num_classes):
        raise CaeeError(f"{path}: CAM class keys must lie in 0..{num_classes - 1}, got {keys.tolist()}; "
                        "delete it and re-run make_cam.py")
    return keys, cams


_HELD: dict[Path, StageLock] = {}  # folders this process has claimed (kept until it exits)


def claim_folder(folder: str | os.PathLike, main: bool = True) -> None:
    """Create ``folder``; on the main process also lock it for this process (a second run on it
    refuses while this one lives; the kernel frees the lock of a killed run) and remove the temp
    files a killed run left there. ``main=False`` (other torchrun ranks): only create it."""
    folder = make_folder(folder)
    if not main:
        return
    key = folder.resolve()
    if key not in _HELD:
        _HELD[key] = StageLock(folder).acquire()
        remove_stale_temps(folder)
