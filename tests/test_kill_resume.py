"""kill -9 at a random point of every trainer and inference stage, then a re-run, gives the same
final files as an uninterrupted run (CPU, the miniature pipeline of tests/conftest.py).

The kill is the ``CAEE_KILL_AT_WRITE=N`` fault point of caee.core.io.atomic_write: the child process
dies with os._exit (no clean-up, like SIGKILL) when its N-th write is complete but not renamed,
leaving the temp file and the folder lock behind, as a real kill at that moment would. The child
is forked from this process (tests/forks.py), so it computes with the same single thread."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_stage
from caee.core.config import config_to_dict
import forks
from conftest import mini_config

# (stage module, the range of the atomic write at which it is killed)
STAGES = [
    ("train_classifier", (2, 5)),
    ("train_cgnet", (2, 5)),
    ("make_cam", (6, 14)),
    ("train_affinity", (2, 5)),
    ("make_pseudo_labels", (3, 12)),
    ("train_deeplab", (3, 5)),
    ("eval_miou", (2, 2)),
]


def _config(tmp_path: Path, work: str, data_root: Path) -> Path:
    overrides = {"work_dir": str(tmp_path / work), "data.root": str(data_root), "cam.crf_alphas": [4, 24],
                 "pseudo_labels.steps": 8, **SMALL}
    for t in ("train_classifier", "train_cgnet", "train_affinity", "train_deeplab"):
        overrides.update({f"{t}.max_steps": 3, f"{t}.epochs": 2, f"{t}.checkpoint_every": 1})
    cfg = mini_config(tmp_path, **overrides)
    path = tmp_path / f"{work}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


SMALL = {"data.synthetic.num_train": 16, "data.synthetic.num_val": 4}  # 2 steps per epoch


def _main(stage: str):
    import importlib

    return importlib.import_module(f"caee.stages.{stage}").main


def _outputs(work: Path) -> dict[str, object]:
    """The final files: tensors of model.pth, arrays of CAMs, label PNGs, result JSONs (timings removed)."""
    from PIL import Image

    out: dict[str, object] = {}
    for p in sorted(work.rglob("*")):
        rel = str(p.relative_to(work))
        if p.name == "model.pth":
            ck = torch.load(p, weights_only=True)
            out.update({f"{rel}:{k}": v.numpy() for k, v in ck["model"].items()})
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out.update({f"{rel}:{k}": z[k] for k in z.files})
        elif p.suffix == ".png" and "pictures" not in rel:
            out[rel] = np.asarray(Image.open(p))
        elif p.suffix == ".json" and p.parent.name == "eval":
            out[rel] = json.loads(p.read_text().replace(str(work), "<work>"))  # paths name the run
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread_everywhere():
    """The killed children and the in-process runs compute with the same single thread (a stage
    sets its thread count from the process's start-up count): otherwise their floating-point sums
    may be ordered differently."""
    from caee.stages import setup

    saved = setup._START_THREADS
    setup._START_THREADS = 1
    yield
    setup._START_THREADS = saved


@pytest.fixture(scope="module")
def straight(tmp_path_factory, _one_thread_everywhere) -> tuple[Path, Path]:
    """An uninterrupted miniature pipeline."""
    base = tmp_path_factory.mktemp("kill")
    from caee.data import ensure_dataset

    ensure_dataset(mini_config(base, **SMALL).data)
    config = _config(base, "straight", base / "synthetic")
    for stage, _ in STAGES:
        assert run_stage(_main(stage), None, ["--config", str(config)]) == 0, stage
    return base, base / "straight"


def test_kill_at_a_random_write_then_rerun_equals_uninterrupted(straight):
    base, straight_dir = straight
    config = _config(base, "killed", base / "synthetic")
    rng = random.Random(16)
    for stage, (lo, hi) in STAGES:
        at = rng.randint(lo, hi)
        code = forks.run(run_stage, _main(stage), None, ["--config", str(config)], env={"CAEE_KILL_AT_WRITE": str(at)})
        assert code == 137, f"{stage} was not killed at write {at} (exit code {code})"
        assert run_stage(_main(stage), None, ["--config", str(config)]) == 0, stage
    killed = _outputs(base / "killed")
    expected = _outputs(straight_dir)
    assert killed.keys() == expected.keys()
    for k, v in expected.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(killed[k], v), k
        else:
            assert killed[k] == v, k
    assert not list((base / "killed").rglob(".*.tmp"))  # the killed writes' temp files were removed
