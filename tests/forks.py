"""Run a stage in a forked child of the test process: a real separate process (its own pid, file
locks and exit, killable with SIGKILL) that starts in milliseconds, because it inherits the
imported torch, torchvision and caee instead of importing them again (about 5 s per fresh
interpreter on 2 cores).

The child computes with one thread, as caee's own forked pool workers do: OpenMP's thread pool does
not survive a fork, so a child that enters a parallel region its parent has run with more threads
waits forever for threads that no longer exist."""
from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any, Callable


def _child(fn: Callable[..., Any], args: tuple, env: dict[str, str]) -> None:
    import torch

    from caee.stages import setup

    torch.set_num_threads(1)
    setup._START_THREADS = 1  # what a stage sets its thread count from
    os.environ.update(env)
    code = fn(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)  # no atexit of the parent's pytest plugins


def start(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """``fn(*args)`` in a forked child with ``env`` added to its environment; its return value (an
    int) is the exit code, an exception gives 1."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(fn, args, env or {}))
    proc.start()
    return proc


def run(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None, timeout: float = 300) -> int:
    """:func:`start`, wait, and return the child's exit code (a kill by signal N gives -N)."""
    proc = start(fn, *args, env=env)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"{fn.__name__}{args!r} ran longer than {timeout} s")
    return proc.exitcode
