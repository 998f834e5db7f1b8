"""Several nodes: two torchrun launchers on localhost, one process each, joined by a c10d
rendezvous (as the README's multi-node command), gloo on the CPU. Both processes are local rank 0
of their "node"; only global rank 0 may write the job's outputs."""
import collections
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caee.core import records
import torch

from caee.core import distributed
from caee.core.config import save_config
from caee.core.io import load_cam_npz
from caee.data.splits import ensure_dataset
from conftest import mini_config

REPO = Path(__file__).resolve().parents[1]

# One process per node: trains the OC, keeps its own replica, then makes its share of the CAMs.
# Every file an atomic write finishes (os.replace) is recorded with the writer's ranks.
_WORKER = r'''
import os, sys
from pathlib import Path

out = Path(sys.argv[2])
env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE")}
_replace = os.replace


def _recording_replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    with open(out / f"writes_{env['RANK']}.txt", "a") as f:
        f.write(f"{env['RANK']} {env['LOCAL_RANK']} {env['GROUP_RANK']} {os.fspath(dst)}\n")


os.replace = _recording_replace
import torch
torch.set_num_threads(1)
from caee.core.config import load_config
from caee.stages import make_cam, train_classifier

replica = {}
_fit = train_classifier.fit


def _keeping_fit(task, *args, **kwargs):
    replica["model"] = task.model
    torch.save({k: v.clone() for k, v in task.model.state_dict().items()}, out / f"init_{env['RANK']}.pt")
    return _fit(task, *args, **kwargs)


train_classifier.fit = _keeping_fit
cfg = load_config(sys.argv[1], [])
train_classifier.main(cfg)
torch.save(replica["model"].state_dict(), out / f"replica_{env['RANK']}.pt")
make_cam.main(load_config(sys.argv[1], []))
(out / f"env_{env['RANK']}.txt").write_text(" ".join(f"{k}={v}" for k, v in env.items()))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_is_main_is_global_rank_zero_not_the_node_local_rank(monkeypatch):
    """On the second node LOCAL_RANK is 0 too: it must not count as the main process."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    for global_rank, main in ((1, False), (0, True)):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda r=global_rank: r)
        assert distributed.rank() == global_rank and distributed.is_main() is main
        assert distributed.shard(list(range(5))) == list(range(5))[global_rank::2]


def test_two_nodes_on_localhost_train_equal_replicas_and_write_every_output_once(tmp_path):
    cfg = mini_config(tmp_path, **{"train_classifier.max_steps": 2, "cam.dtype": "float32",
                                   "cam.flip": False, "cam.source": "classifier",
                                   "data.synthetic.num_train": 16})
    ensure_dataset(cfg.data)                     # generated once here, not raced by the two nodes
    cfg_path = save_config(cfg, tmp_path / "cfg")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "worker.py").write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=caee-test", "--max-restarts=0",
         "--local-addr=127.0.0.1", str(tmp_path / "worker.py"), str(cfg_path), str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    for p in launchers:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in launchers:
                q.kill()
            raise
    assert [p.returncode for p in launchers] == [0, 0], "\n----\n".join(log[-4000:] for log in logs)

    envs = [dict(kv.split("=") for kv in (out / f"env_{r}.txt").read_text().split()) for r in "01"]
    assert [e["WORLD_SIZE"] for e in envs] == ["2", "2"] and [e["LOCAL_RANK"] for e in envs] == ["0", "0"]
    assert sorted(e["GROUP_RANK"] for e in envs) == ["0", "1"]          # two nodes, one process each

    writes = [line.split(" ", 3) for r in "01" if (out / f"writes_{r}.txt").exists()
              for line in (out / f"writes_{r}.txt").read_text().splitlines()]
    work = Path(cfg.work_dir)
    trained = [(rank, Path(p)) for rank, _, _, p in writes if Path(p).parent == work / "train_classifier"]
    assert {p.name for _, p in trained} >= {"model.pth", "last.pth"}
    assert {rank for rank, _ in trained} == {"0"}                       # the job's rank 0 only
    assert sum(p.name == "model.pth" for _, p in trained) == 1
    steps = [json.loads(line)["step"] for line in (work / "train_classifier" / "metrics.jsonl").read_text().splitlines()
             if line.strip() and "step" in json.loads(line)]
    assert sorted(steps) == [1, 2]                                      # each step logged once, not once per node

    a, b = (torch.load(out / f"replica_{r}.pt", weights_only=True) for r in "01")
    saved = torch.load(work / "train_classifier" / "model.pth", weights_only=True)
    saved = saved.get("model", saved)
    init = torch.load(out / "init_0.pt", weights_only=True)
    assert any(not torch.equal(a[k], init[k]) for k in a)               # it did train
    for k in a:
        if "running_" not in k and "num_batches" not in k:               # BN statistics stay per process
            assert torch.equal(a[k], b[k]), k                            # DDP kept the parameters equal
        assert torch.equal(a[k], saved[k]), k                            # and rank 0 wrote its replica

    ids = (Path(cfg.data.root) / "ImageSets" / "Segmentation" / f"{cfg.data.cam_split}.txt").read_text().split()
    cam_writes = [(rank, Path(p).stem) for rank, _, _, p in writes if Path(p).parent.name == "cam_classifier"
                  and p.endswith(".npz")]
    counts = collections.Counter(stem for _, stem in cam_writes)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert {rank for rank, _ in cam_writes} == {"0", "1"}                # both nodes worked
    assert records.read(work / "cam_classifier")["complete"] == [cfg.data.cam_split]  # written once, by global rank 0

    from caee.stages import make_cam
    single = copy.deepcopy(cfg)
    single.cam.out_dir = str(tmp_path / "single")
    make_cam.main(single)
    for image_id in ids:
        k1, c1 = load_cam_npz(work / "cam_classifier" / f"{image_id}.npz")
        k2, c2 = load_cam_npz(tmp_path / "single" / f"{image_id}.npz")
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_allclose(c1, c2, atol=1e-5)
