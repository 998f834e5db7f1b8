"""The one exception type for bad input: its message is shown to the user without a traceback."""
from __future__ import annotations

import os
from pathlib import Path


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
