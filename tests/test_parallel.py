"""caee.core.parallel: the process pool, the two background writers and the worker count of a config key."""
import numpy as np
import pytest

from caee.core import parallel
from caee.method.crf import crf_cam_labels
from caee.core.errors import CaeeError
from caee.core.io import load_label_png, save_label_png
from caee.core.parallel import ProcessWriter, ThreadWriter, run_pool, workers_for


def _crf_job(seed):
    rng = np.random.default_rng(seed)
    img = (rng.random((24, 30, 3)) * 255).astype(np.uint8)
    cams = rng.random((2, 24, 30)).astype(np.float32)
    return crf_cam_labels(img, np.array([0, 5]), cams, alpha=4)


def test_run_pool_matches_inline():
    pytest.importorskip("pydensecrf")
    seeds = list(range(6))
    inline = run_pool(_crf_job, seeds, workers=1)
    pooled = run_pool(_crf_job, seeds, workers=2)
    assert len(pooled) == 6
    for a, b in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)
    # Closures work (fork inherits fn) and order is kept.
    offset = 10
    assert run_pool(lambda x: x * x + offset, range(9), workers=2, chunksize=2) == [x * x + offset for x in range(9)]
    with pytest.raises(CaeeError):
        run_pool(_crf_job, seeds, workers=0)


def test_workers_for_shares_the_cores_among_local_ranks(monkeypatch):
    monkeypatch.setattr(parallel, "available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers_for(3) == 3
    assert workers_for(0) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert workers_for(0) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert workers_for(0) == 1


def _write_square(job):
    path, value = job
    save_label_png(path, np.full((3, 4), value, np.uint8))


@pytest.mark.parametrize("workers", [1, 2])
def test_process_writer_writes_every_job(tmp_path, workers):
    writer = ProcessWriter(_write_square, workers)
    try:
        for v in range(5):
            writer.submit((str(tmp_path / f"{v}.png"), v))
    finally:
        writer.close()
    for v in range(5):
        np.testing.assert_array_equal(load_label_png(tmp_path / f"{v}.png"), np.full((3, 4), v, np.uint8))


def test_process_writer_raises_a_job_error(tmp_path):
    writer = ProcessWriter(_write_square, 2)
    writer.submit((str(tmp_path / "ok.png"), 1))
    writer.submit((str(tmp_path / "bad.png"), 300))  # not a uint8 value: the job fails
    with pytest.raises(Exception):
        writer.close()


def test_thread_writer_keeps_at_most_max_pending(tmp_path):
    writer = ThreadWriter(max_pending=2)
    try:
        for v in range(6):
            writer.submit(_write_square, (str(tmp_path / f"{v}.png"), v))
            assert len(writer.pending) <= 2
    finally:
        writer.close()
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == [str(v) for v in range(6)]
