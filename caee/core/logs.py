"""Logging to the console and ``<out_dir>/log.txt`` (rank 0 only) and metrics to ``metrics.jsonl``."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _is_main() -> bool:
    """Rank 0? A process that never imported torch cannot have joined a process group, so it is
    rank 0 without paying torch's import time (evaluation runs without torch)."""
    if "torch" not in sys.modules:
        return True
    from caee.core import distributed
    return distributed.is_main()


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _is_main() or record.levelno >= logging.WARNING


def setup_logging(out_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Console handler (+ a ``log.txt`` file handler in ``out_dir``) on the ``caee`` logger."""
    logger = logging.getLogger("caee")
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_caee", False):
            logger.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if out_dir is not None and _is_main():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "log.txt"))
    for h in handlers:
        h._caee = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        h.addFilter(_RankZeroFilter())
        logger.addHandler(h)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **record) -> None:
        if not _is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def show_progress() -> bool:
    """Progress bars on the main process of a terminal only: in a log file or CI output the
    bar's redraws would bury the INFO lines (which carry the same numbers and the ETA)."""
    import sys

    return _is_main() and sys.stderr.isatty()
