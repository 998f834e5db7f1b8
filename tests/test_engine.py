"""The shared training engine: schedule, parameter groups, resume equivalence, NaN stop, DDP."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caee.core.config import TrainConfig
from caee.engine.trainer import EpochSampler, StepContext, TrainTask, fit, lr_factor, parameter_groups
from caee.core.errors import CaeeError


class NoisyDataset(torch.utils.data.Dataset):
    """Fixed inputs + augmentation noise from the global RNG (what the engine must seed per sample)."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (torch.rand(n, 4, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i] + 0.1 * torch.randn(3, 8, 8), "label": self.y[i]}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)    # consumes the global RNG during training
        self.fc8 = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):
        return self.fc8(self.drop(F.relu(self.conv(x)))).mean(dim=(2, 3))


class TinyTask(TrainTask):
    def __init__(self, nan_at=None):
        torch.manual_seed(1)
        self.model = TinyNet()
        self.nan_at = nan_at

    def head_modules(self):
        return [self.model.fc8]

    def train_step(self, model, batch, ctx: StepContext):
        loss = F.multilabel_soft_margin_loss(model(ctx.to_device(batch["image"])), ctx.to_device(batch["label"]))
        if self.nan_at is not None and ctx.step == self.nan_at:
            loss = loss * float("nan")
        return loss, {}


def cfg(**kw):
    base = dict(batch_size=4, epochs=3, lr=0.05, checkpoint_every=1000, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_poly_schedule_values():
    c = cfg(poly_power=0.9)
    assert lr_factor(0, 100, c) == 1.0
    assert lr_factor(50, 100, c) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, c) == 0.0


def test_parameter_groups_follow_psa():
    task = TinyTask()
    task.model.conv.weight.requires_grad_(False)
    groups = {g["name"]: g for g in parameter_groups(task.model, task.head_modules(), cfg(head_lr_mult=10, bias_lr_mult=2))}
    assert set(groups) == {"b", "hw"}           # frozen conv weight left out; fc8 has no bias
    assert groups["b"]["lr_mult"] == 2 and groups["b"]["weight_decay"] == 0
    assert groups["hw"]["lr_mult"] == 10 and groups["hw"]["weight_decay"] == 5e-4


def test_sampler_covers_each_epoch_once_and_skips_on_resume():
    full = list(EpochSampler(10, 4, seed=3, epoch=1))
    assert len(full) == 8 and len({i for _, i in full}) == 8
    assert list(EpochSampler(10, 4, seed=3, epoch=1, start_batch=1)) == full[4:]
    assert full != list(EpochSampler(10, 4, seed=3, epoch=2))


def test_resume_equals_uninterrupted(tmp_path):
    ds = NoisyDataset()
    fit(TinyTask(), ds, cfg(max_steps=12), tmp_path / "straight", torch.device("cpu"))
    straight = torch.load(tmp_path / "straight" / "model.pth", weights_only=True)["model"]
    # stop mid-epoch (step 7 of 6 per epoch), then resume in the same folder
    fit(TinyTask(), ds, cfg(max_steps=7), tmp_path / "resumed", torch.device("cpu"))
    fresh = TinyTask()  # a different process would start from a new init: the checkpoint must win
    fit(fresh, ds, cfg(max_steps=12), tmp_path / "resumed", torch.device("cpu"))
    resumed = torch.load(tmp_path / "resumed" / "model.pth", weights_only=True)["model"]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    ck = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert ck["step"] == 12


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_step_in_backward_gives_the_same_weights_and_resumes(tmp_path):
    """SGD applied inside backward (momentum, weight decay on weights only, 10x head and 2x bias
    lr, poly schedule) ends on exactly the weights of the ordinary step, also after a resume; the
    saved optimiser state holds the same momentum buffers."""
    ds = NoisyDataset()
    c = dict(max_steps=12, momentum=0.9, weight_decay=1e-2)
    plain_task, inside_task = TinyTask(), TinyTask()
    fit(plain_task, ds, cfg(**c), tmp_path / "plain", torch.device("cpu"))
    fit(inside_task, ds, cfg(**c, step_in_backward=True), tmp_path / "inside", torch.device("cpu"))
    # the option reached the engine: every gradient was applied and freed inside backward
    assert all(p.grad is not None for p in plain_task.model.parameters())
    assert all(p.grad is None for p in inside_task.model.parameters())
    fit(TinyTask(), ds, cfg(**{**c, "max_steps": 5}, step_in_backward=True), tmp_path / "resumed", torch.device("cpu"))
    fit(TinyTask(), ds, cfg(**c, step_in_backward=True), tmp_path / "resumed", torch.device("cpu"))
    plain = _weights(tmp_path / "plain" / "model.pth")
    assert not torch.equal(plain["fc8.weight"], TinyTask().model.state_dict()["fc8.weight"])  # it trained
    for run in ("inside", "resumed"):
        got = _weights(tmp_path / run / "model.pth")
        assert all(torch.equal(plain[k], got[k]) for k in plain), run
    a = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)["optimizer"]["state"]
    b = torch.load(tmp_path / "inside" / "last.pth", weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def test_step_in_backward_equals_sgd_step_and_frees_each_gradient():
    """Per parameter group (lr, weight decay): exactly the parameters and momentum of SGD's own step."""
    from caee.engine.sgd_in_backward import step_in_backward

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net in nets:
        w, b = [p for n, p in net.named_parameters() if n.endswith("weight")], [p for n, p in net.named_parameters()
                                                                               if n.endswith("bias")]
        opts.append(torch.optim.SGD([{"params": w, "weight_decay": 5e-4}, {"params": b, "lr": 0.2, "weight_decay": 0}],
                                    lr=0.1, momentum=0.9, foreach=False))
    step_in_backward(opts[1])
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for net, opt in zip(nets, opts):
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q) and q.grad is None
    states = [opt.state_dict()["state"] for opt in opts]
    assert sorted(states[0]) == sorted(states[1])
    for k in states[0]:
        assert torch.equal(states[0][k]["momentum_buffer"], states[1][k]["momentum_buffer"])


def test_step_in_backward_is_refused_where_it_would_be_wrong(tmp_path, monkeypatch):
    from caee.engine import trainer as engine
    from caee.core.config import load_config

    with pytest.raises(CaeeError, match=r"'train_cgnet.step_in_backward' needs train_cgnet.optimizer=sgd, got adam"):
        load_config(None, ["train_cgnet.step_in_backward=true", "train_cgnet.optimizer=adam"])
    monkeypatch.setattr(engine.distributed, "world_size", lambda: 2)
    with pytest.raises(CaeeError, match=r"step_in_backward needs one process .* this run has 2"):
        fit(TinyTask(), NoisyDataset(), cfg(step_in_backward=True), tmp_path, torch.device("cpu"))
    assert not list(tmp_path.iterdir())


def test_training_lowers_loss(tmp_path):
    ds = NoisyDataset()
    task = TinyTask()
    before = F.multilabel_soft_margin_loss(task.model.eval()(ds.x), ds.y).item()
    fit(task, ds, cfg(epochs=20, lr=0.5, momentum=0.9), tmp_path, torch.device("cpu"))
    after = F.multilabel_soft_margin_loss(task.model.eval()(ds.x), ds.y).item()
    assert after < 0.7 * before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ds = NoisyDataset()
    with pytest.raises(CaeeError, match="loss became nan at step 8"):
        fit(TinyTask(nan_at=8), ds, cfg(checkpoint_every=5), tmp_path, torch.device("cpu"))
    ck = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ck["step"] == 6  # epoch end before the NaN; nothing written after it
    assert not (tmp_path / "model.pth").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from caee.core import distributed
    distributed.init_distributed(torch.device("cpu"))
    task = TinyTask()
    fit(task, NoisyDataset(), cfg(max_steps=5), out, torch.device("cpu"))
    torch.save(task.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_keep_replicas_equal(tmp_path):
    # forked ranks: each inherits the imported modules instead of a 5 s fresh import (tests/forks.py)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = TinyTask().model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["fc8.weight"], init["fc8.weight"])  # it did train


def test_stage_threads_count_from_the_start_not_from_the_previous_stage(tmp_path, monkeypatch):
    """run_pipeline runs every stage in one process: a trainer with a DataLoader worker lowers
    the thread count, and the worker-less stage after it must get the cores back."""
    from caee.core.config import Config
    from caee.stages import setup

    monkeypatch.setattr(setup, "available_cpus", lambda: 4)
    monkeypatch.setattr(setup, "_START_THREADS", 4)
    before = torch.get_num_threads()
    try:
        cfg = Config(work_dir=str(tmp_path), device="cpu")
        cfg.data.num_workers = 3
        setup.start_stage(cfg, "trainer")
        assert torch.get_num_threads() == 1
        setup.start_stage(cfg, "walk", loader_workers=0)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
