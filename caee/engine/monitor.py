"""Watching a long training run: INFO lines with the ETA, optional TensorBoard scalars, epoch snapshots.

The engine calls :meth:`Monitor.log` at each ``log_every`` step and :meth:`Monitor.epoch_end` after
each epoch; everything else (rates, the ETA, the TensorBoard writer) lives here. Rank 0 only.
"""
from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"`` (h:mm:ss; days appear as ``"1 day, 2:00:00"``)."""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def eta_seconds(done: int, remaining: int, elapsed: float) -> float:
    """Time left for ``remaining`` steps at the rate of the ``done`` steps that took ``elapsed`` s."""
    return remaining * elapsed / done if done > 0 else float("inf")


class Monitor:
    """One trainer's monitoring.

    name: the stage (the log lines' prefix); total: the step the run stops at; start: the step it
    (re)started from, so a resumed run's ETA counts only the steps this process has timed.
    """

    def __init__(self, name: str, out_dir: Path, total: int, start: int, epochs: int, keep_epochs: bool = False,
                 tensorboard: bool = False, enabled: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.name, self.out_dir, self.total, self.start, self.epochs = name, Path(out_dir), total, start, epochs
        self.keep_epochs, self.enabled, self.clock = keep_epochs, enabled, clock
        self.t0 = clock()
        self.writer = _tensorboard_writer(self.out_dir / "tb") if (tensorboard and enabled) else None

    @classmethod
    def for_fit(cls, out_dir: Path, cfg: Any, full_config: dict | None, total: int, start: int,
                enabled: bool) -> "Monitor":
        """The monitor of :func:`caee.engine.trainer.fit`: ``cfg`` is the trainer's TrainConfig,
        ``full_config`` the experiment's dict (its ``logging`` section switches TensorBoard on)."""
        tensorboard = bool(((full_config or {}).get("logging") or {}).get("tensorboard", False))
        return cls(Path(out_dir).name, out_dir, total, start, cfg.epochs, getattr(cfg, "keep_epochs", False),
                   tensorboard, enabled)

    def line(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> str:
        """``train_cgnet: step 40/300 (epoch 1/15) loss 0.4123 lr 9.10e-03 12.3 images/s ETA 0:03:12``."""
        eta = eta_seconds(step - self.start, self.total - step, self.clock() - self.t0)
        eta_text = format_eta(eta) if eta != float("inf") else "?"
        return (f"{self.name}: step {step}/{self.total} (epoch {epoch + 1}/{self.epochs}) loss {loss:.4f} "
                f"lr {lr:.2e} {images_per_s:.1f} images/s ETA {eta_text}")

    def log(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float,
            metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        logger.info("%s", self.line(step, epoch, loss, lr, images_per_s))
        if self.writer is not None:
            scalars = {"loss": loss, "lr": lr, "images_per_s": images_per_s, **(metrics or {})}
            for key, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{self.name}/{key}", value, step)
            self.writer.flush()

    def epoch_end(self, epoch: int, save: Callable[[Path], None]) -> Path | None:
        """With ``keep_epochs``: ``save(<out_dir>/epoch_<n>.pth)`` (n = 1-based epoch); returns the path."""
        if not (self.keep_epochs and self.enabled):
            return None
        path = self.out_dir / f"epoch_{epoch + 1:03d}.pth"
        save(path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or None (with a warning) when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("logging.tensorboard is true but the tensorboard package is not installed "
                       "(pip install tensorboard); continuing without TensorBoard scalars")
        return None
    return SummaryWriter(log_dir=str(log_dir))
