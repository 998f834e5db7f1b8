"""CPU parallelism shared by the stages: a process pool for independent jobs and two background
writers that let the device compute the next images while files are written.

* :func:`run_pool`: ``[fn(x) for x in items]`` on forked worker processes (CRF, file checks, scoring).
* :class:`ThreadWriter`: one background thread (writing ``.npz`` files while the next forward runs).
* :class:`ProcessWriter`: spawned worker processes (CPU-heavy work such as the CRF next to CUDA).
* :func:`workers_for`: the process count of a ``workers`` config key (0 = this machine's cores
  shared by the ranks running on it).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import os
import sys
from typing import Any, Callable, Iterable

from caee.core.errors import CaeeError

_POOL_FN: Callable | None = None


def _worker_init(fn: Callable) -> None:
    global _POOL_FN
    _POOL_FN = fn
    # Each worker is one of many processes: intra-op threads would oversubscribe the cores.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _worker_call(item: Any) -> Any:
    return _POOL_FN(item)


def available_cpus() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def workers_for(configured: int) -> int:
    """``configured`` when > 0, else (0) this machine's cores shared among the ranks running on it
    (torchrun's ``LOCAL_WORLD_SIZE``)."""
    if configured > 0:
        return configured
    return max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def run_pool(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None,
             chunksize: int | None = None) -> list:
    """``[fn(x) for x in items]`` on a process pool, results in input order.

    workers: None = all available cores; 1 (or a single item) runs inline in this process.
    On Linux the pool forks, so ``fn`` may be a closure or lambda (it is inherited, not pickled);
    items and results are pickled. Workers run torch single-threaded. Do not fork from a process
    holding CUDA state if ``fn`` needs CUDA: this pool is meant for CPU jobs (CRF, file loading).
    """
    items = list(items)
    n = available_cpus() if workers is None else int(workers)
    if n < 1:
        raise CaeeError(f"workers must be >= 1 (or None for all cores), got {workers}")
    n = min(n, len(items))
    if n <= 1:
        return [fn(x) for x in items]
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") and "fork" in methods else None)
    if chunksize is None:
        chunksize = max(1, len(items) // (n * 4))
    with ctx.Pool(n, initializer=_worker_init, initargs=(fn,)) as pool:
        return list(pool.imap(_worker_call, items, chunksize=chunksize))


class ThreadWriter:
    """Writes files on a background thread so the next forward does not wait for the disk."""

    def __init__(self, max_pending: int = 16):
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pending: list[concurrent.futures.Future] = []
        self.max_pending = max_pending

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown()


class ProcessWriter:
    """Runs ``fn(job)`` for finished work in worker processes while the device computes the next
    images (spawned workers: safe next to CUDA; ``fn`` and the jobs must pickle). ``workers <= 1``:
    inline."""

    def __init__(self, fn: Callable[[Any], Any], workers: int):
        self.fn = fn
        self.workers = workers
        self.pool = None
        self.pending: list[concurrent.futures.Future] = []
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(self, job) -> None:
        if self.pool is None:
            self.fn(job)
            return
        self.pending.append(self.pool.submit(self.fn, job))
        if len(self.pending) >= 2 * self.workers:  # bound the jobs held in memory
            self.pending.pop(0).result()

    def close(self) -> None:
        if self.pool is None:
            return
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(cancel_futures=True)
