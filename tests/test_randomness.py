"""Randomness that is fresh where it must be and replayed where it must be.

Resume tests elsewhere prove that two runs replay identically; a run that draws the same crop, flip,
jitter or erasing target at every step would pass them. Here:

* within one epoch, every step (and every image of a batch) gets its own crop, flip, colour jitter,
  long-side resize and erasing target; across epochs the same image gets a new augmentation and
  the sample order changes;
* a draw depends only on (seed, epoch, index) or (seed, step): asked again, after anything else has
  used the global RNG, it is the same, and a run stopped and resumed from ``last.pth`` sees exactly
  the images, order and targets of an uninterrupted run.

Every image here is the same coordinate-coded picture (red = 5 x row, green = 5 x column), so any
difference between two samples is the augmentation's doing, and a crop's offset can be read back
from its top-left pixel.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from caee.core.config import Config, NetConfig, TrainConfig
from caee.data.transforms import AffinityAugment, build_train_transform, denormalize
from caee.engine.trainer import EpochSampler, SeededSamples, StepContext, fit
from caee.models import build_backbone
from caee.models.classifier import CamClassifier
from caee.stages import train_cgnet

H, W = 40, 48


def _base() -> torch.Tensor:
    y = torch.arange(H).view(H, 1).expand(H, W)
    x = torch.arange(W).view(1, W).expand(H, W)
    return torch.stack([5 * y, 5 * x, torch.full((H, W), 128)]).to(torch.uint8)  # (3, H, W)


class Copies(Dataset):
    """``n`` copies of the coded picture through ``transform``, as ClassificationDataset serves a file."""

    def __init__(self, transform, n: int = 8, label=(1.0, 1.0, 1.0)):
        self.transform, self.n, self.label = transform, n, torch.tensor(label)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        out = self.transform({"image": tv_tensors.Image(_base())})
        return {"image": out["image"].as_subclass(torch.Tensor), "label": self.label, "idx": i}


def _pixels(item: dict) -> torch.Tensor:
    return denormalize(item["image"]).long()  # (h, w, 3) back in 0..255


def _crop_offset(item):
    p = _pixels(item)[0, 0]
    return round(float(p[0]) / 5), round(float(p[1]) / 5)


def _flipped(item):
    return bool(_pixels(item)[0, 0, 1] > 100)  # green of the top-left pixel: column 47 when mirrored


def _digest(item):
    return hashlib.sha1(_pixels(item).numpy().tobytes()).hexdigest()


def _size(item):
    return tuple(item["image"].shape[-2:])


OFF = dict(crop_size=0, resize_long=[0, 0], hflip=False, color_jitter=[0.0, 0.0, 0.0, 0.0])
# component: (train settings that switch on only it, what was drawn, fewest distinct draws of 8)
COMPONENTS = {
    "crop": ({**OFF, "crop_size": 16}, _crop_offset, 5),
    "flip": ({**OFF, "hflip": True}, _flipped, 2),
    "jitter": ({**OFF, "color_jitter": [0.3, 0.3, 0.3, 0.1]}, _digest, 8),
    "resize": ({**OFF, "resize_long": [24, 72]}, _size, 4),
}


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_train_augmentation_is_fresh_per_step_and_epoch_and_replays_exactly(component):
    settings, drawn, fewest = COMPONENTS[component]
    samples = SeededSamples(Copies(build_train_transform(TrainConfig(**settings))), seed=3)
    if component == "crop":
        assert _crop_offset(samples[(0, 0)]) != (0, 0) or _crop_offset(samples[(0, 1)]) != (0, 0)
    within = [drawn(samples[(0, i)]) for i in range(8)]          # the images of one epoch
    across = [drawn(samples[(e, 5)]) for e in range(8)]          # one image over eight epochs
    assert len(set(within)) >= fewest, f"{component} within an epoch: {within}"
    assert len(set(across)) >= fewest, f"{component} across epochs: {across}"
    other_seed = SeededSamples(samples.dataset, seed=4)
    assert [drawn(other_seed[(0, i)]) for i in range(8)] != within
    # asked again after the global RNG moved on: the same draw, and the global RNG is left alone
    first = samples[(2, 5)]["image"]
    torch.manual_seed(123)
    torch.rand(17)
    state = torch.get_rng_state()
    assert torch.equal(samples[(2, 5)]["image"], first)
    assert torch.equal(torch.get_rng_state(), state)


class AffinityDraws(Dataset):
    """What :class:`AffinityAugment` draws for the coded picture (as CellLabelDataset calls it)."""

    def __init__(self, augment: AffinityAugment, n: int = 8):
        self.augment, self.n = augment, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        box, flip = self.augment.draw(H, W)
        return box.as_list(), flip, self.augment.image(_base(), box, flip)


def test_affinity_crop_flip_and_jitter_are_fresh_and_replay():
    samples = SeededSamples(AffinityDraws(AffinityAugment(24, True, [0.3, 0.3, 0.3, 0.1])), seed=5)
    for draws in ([samples[(0, i)] for i in range(8)], [samples[(e, 2)] for e in range(8)]):
        boxes = {tuple(b) for b, _, _ in draws}
        flips = {f for _, f, _ in draws}
        images = {hashlib.sha1(im.numpy().tobytes()).hexdigest() for _, _, im in draws}
        assert len(boxes) >= 5 and flips == {True, False} and len(images) == 8, (boxes, flips)
    box, flip, image = samples[(3, 1)]
    torch.manual_seed(7)
    again = samples[(3, 1)]
    assert again[0] == box and again[1] == flip and torch.equal(again[2], image)


def test_sample_order_changes_every_epoch_and_replays():
    orders = [list(EpochSampler(12, 4, seed=2, epoch=e)) for e in range(4)]
    assert all(sorted(i for _, i in o) == list(range(12)) for o in orders)
    assert len({tuple(i for _, i in o) for o in orders}) == 4
    assert list(EpochSampler(12, 4, seed=2, epoch=1)) == orders[1]
    # resuming at batch 2 of epoch 1 continues the same order
    assert list(EpochSampler(12, 4, seed=2, epoch=1, start_batch=2)) == orders[1][8:]


# ---------------------------------------------------------------- the real CGNet task in the engine


class RecordingCGNet(train_cgnet.CGNetTask):
    """The real CGNet step; records each step's sample indices, augmented images and erasing targets."""

    def __init__(self, records: list, *args):
        super().__init__(*args)
        self.records = records

    def train_step(self, model, batch, ctx: StepContext):
        self.records.append({"step": ctx.step, "epoch": ctx.epoch, "idx": batch["idx"].tolist(),
                             "image": batch["image"].clone()})
        return super().train_step(model, batch, ctx)


def _cgnet_task(records: list):
    net = NetConfig(backbone="tinycnn", width=0.25, dropout=0.0)
    cfg = Config()
    torch.manual_seed(0)
    oc = train_cgnet.freeze_module(CamClassifier(build_backbone(net), 3, 0.0))
    cgnet = CamClassifier(build_backbone(net), 3, 0.0)
    return RecordingCGNet(records, cgnet, oc, cfg, ["a", "b", "c"])


@pytest.fixture(scope="module")
def cgnet_runs(tmp_path_factory):
    """Two runs of the real CGNet task on 12 copies of the coded picture (batch 4: 3 steps per
    epoch, 2 epochs, every augmentation on): one uninterrupted, one stopped after step 2 and resumed
    from its ``last.pth``. Returns their records, each with the erasing targets of its step."""
    targets: list = []
    real_cse = train_cgnet.cse_loss

    def spy(oc_logits, labels, t):
        targets.append(t.tolist())
        return real_cse(oc_logits, labels, t)

    tmp_path = tmp_path_factory.mktemp("cgnet_runs")
    tc = TrainConfig(batch_size=4, epochs=2, lr=0.01, crop_size=24, resize_long=[32, 56], hflip=True,
                     color_jitter=[0.3, 0.3, 0.3, 0.1], seed=9, checkpoint_every=1000, log_every=1000)
    data = Copies(build_train_transform(tc), n=12)
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_cgnet, "cse_loss", spy)
        for name, stops in (("whole", [0]), ("resumed", [2, 0])):
            runs[name] = _run(name, stops, tc, data, targets, tmp_path)
    return runs


def _run(name: str, stops: list[int], tc: TrainConfig, data: Dataset, targets: list, tmp_path) -> list[dict]:
    """Train to each ``max_steps`` of ``stops`` in turn (0 = the end) in one folder; the records."""
    records: list = []
    targets.clear()
    for max_steps in stops:  # a fresh task each time, as a new process would build it
        tc.max_steps = max_steps
        fit(_cgnet_task(records), data, tc, tmp_path / name, torch.device("cpu"))
    for rec, t in zip(records, targets, strict=True):
        rec["targets"] = t
    return records


def test_cgnet_run_draws_new_targets_crops_and_order_per_step_and_epoch(cgnet_runs):
    recs = cgnet_runs["whole"]
    assert [r["step"] for r in recs] == list(range(6)) and [r["epoch"] for r in recs] == [0, 0, 0, 1, 1, 1]
    # within an epoch: each step's targets and images are new (all images are the same picture)
    for epoch in (0, 1):
        steps = [r for r in recs if r["epoch"] == epoch]
        assert len({tuple(r["targets"]) for r in steps}) == 3, [r["targets"] for r in steps]
        images = [im for r in steps for im in r["image"]]
        assert all(not torch.equal(a, b) for k, a in enumerate(images) for b in images[k + 1:])
    # across epochs: another order, and the same image augmented anew
    order = [[i for r in recs if r["epoch"] == e for i in r["idx"]] for e in (0, 1)]
    assert sorted(order[0]) == sorted(order[1]) == list(range(12)) and order[0] != order[1]
    by_epoch = [{i: im for r in recs if r["epoch"] == e for i, im in zip(r["idx"], r["image"])} for e in (0, 1)]
    assert all(not torch.equal(by_epoch[0][i], by_epoch[1][i]) for i in range(12))
    assert [r["targets"] for r in recs[:3]] != [r["targets"] for r in recs[3:]]


def test_cgnet_run_resumed_from_last_pth_draws_exactly_what_an_uninterrupted_run_draws(cgnet_runs):
    whole, resumed = cgnet_runs["whole"], cgnet_runs["resumed"]
    assert [r["step"] for r in resumed] == list(range(6))  # steps 0, 1, then 2..5 after the resume
    for a, b in zip(whole, resumed):
        assert (a["step"], a["idx"], a["targets"]) == (b["step"], b["idx"], b["targets"])
        assert torch.equal(a["image"], b["image"]), a["step"]
