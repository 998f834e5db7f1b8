"""The one exception type for bad input, and how a command reports it: one message, no traceback, exit code 2."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable


class CaeeError(Exception):
    """Bad input (config key, file, checkpoint, label values) with an actionable message."""


def not_found(path: str | os.PathLike) -> str:
    """``not found: <path>``, or what is there instead when ``path`` exists but is no regular file
    (a folder, a socket): for messages about a file that a stage needs to read."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if path.exists():
        return f"{path} is not a regular file"
    return f"not found: {path}"


# errno of a write that failed because of the machine, not the program: what the user can do about it
_WRITE_FAULTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another work_dir",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another work_dir",
    errno.EFBIG: "the file is too large for its file system; choose another work_dir",
    errno.EACCES: "permission denied; choose a writable work_dir",
    errno.EPERM: "permission denied; choose a writable work_dir",
    errno.EROFS: "read-only file system; choose a writable work_dir",
    errno.EISDIR: "a folder is in the way; remove it or choose another path",
    errno.ENOTDIR: "a file is in the way of a folder; remove it or choose another path",
}


def write_fault(path: str | os.PathLike | None, e: OSError) -> CaeeError | None:
    """The one-line CaeeError for a failed write of ``path`` (None: the file the error names), or
    None when ``e`` is not a known fault of the disk, the permissions or something in the way."""
    reason = _WRITE_FAULTS.get(e.errno)
    if reason is None:
        return None
    return CaeeError(f"cannot write {path if path is not None else e.filename}: {reason}")


def guarded(call: Callable[[], object]) -> int:
    """Run ``call``; bad input exits 2 with one clear message, Ctrl-C 130, success 0."""
    try:
        call()
    except CaeeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write fault outside caee.core.io's writers (which raise CaeeError themselves)
        fault = write_fault(None, e)
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0
