"""Where the gradients of the real training tasks go, and what one real optimiser step does.

1. Which parameters each loss term reaches: the classifier loss, the CGNet's classification and
   erasing terms (the erasing term reaches the CGNet only through its mask and never the frozen OC),
   the three terms of PSA's affinity loss, DeepLab's cross-entropy. A detached tensor in any of
   these paths leaves every loss value as it was; only the gradients show it.
2. Each parameter's effective learning rate and weight decay after one step of the engine's own
   optimiser (``fit``), compared with PSA's multipliers written out here: backbone weights 1x with
   decay, backbone biases 2x without, new layers 10x with decay, their biases 20x without
   (docs/METHOD.md §1, §6, §7); frozen parameters do not move. The head parameters and the frozen
   ones are named here from the architecture, not taken from the code under test. TinyCNN's
   BatchNorm trains (PSA's ResNet38 keeps it frozen); its 1-D affines count as biases.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from caee.core.config import (AffinityTrainConfig, CGNetTrainConfig, ClassifierTrainConfig, Config,
                              DeeplabTrainConfig, NetConfig)
from caee.engine.trainer import StepContext, fit
from caee.models import build_backbone
from caee.models.affinitynet import AffinityNet
from caee.models.classifier import CamClassifier
from caee.models.deeplab import build_deeplab
from caee.stages.train_affinity import AffinityTask
from caee.stages.train_cgnet import CGNetTask, freeze_module
from caee.stages.train_classifier import ClassifierTask
from caee.stages.train_deeplab import DeeplabTask

R38 = NetConfig(backbone="resnet38", width=0.0625, dropout=0.0)
TINY = NetConfig(backbone="tinycnn", width=0.5, dropout=0.0)
CPU = torch.device("cpu")
# PSA's multipliers of the base lr, and whether weight decay applies (docs/METHOD.md §1)
OFFICIAL = {"backbone weight": (1.0, True), "backbone bias": (2.0, False),
            "head weight": (10.0, True), "head bias": (20.0, False)}
HEADS = {"classifier": ("fc8.",), "cgnet": ("fc8.",), "affinity": ("f8_3.", "f8_4.", "f8_5.", "f9."),
         "deeplab": ("head.",)}
R38_FROZEN = ("backbone.conv1a.", "backbone.b2.", "backbone.b2_1.", "backbone.b2_2.")  # PSA's frozen blocks


def _ctx(step: int = 0, epoch: int = 0) -> StepContext:
    return StepContext(CPU, epoch=epoch, step=step, total_steps=100, seed=0, channels_last=False)


def _batch_norm_params(model: nn.Module) -> set[str]:
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for pn, _ in m.named_parameters(recurse=False)}


def _grads(loss: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor | None]:
    """{name: d loss / d p} over every parameter of ``model`` that requires grad (None: not reached)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs)}


def _unreached(grads: dict[str, torch.Tensor | None]) -> list[str]:
    return [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]


def _labels() -> torch.Tensor:
    # two or three classes per image: the erasing target is a real choice
    return torch.tensor([[1., 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 1]])


def _classifier(net: NetConfig, seed: int, head_bias: bool = False) -> CamClassifier:
    torch.manual_seed(seed)
    model = CamClassifier(build_backbone(net), 3, net.dropout)
    if head_bias:  # PSA's fc8 has no bias; a biased one shows the head-bias group (20x, no decay)
        model.fc8 = nn.Conv2d(model.fc8.in_channels, 3, 1, bias=True)
        nn.init.uniform_(model.fc8.bias, 0.5, 1.0)
    model.backbone.freeze()
    return model


# ---------------------------------------------------------------- 1. which parameters each term reaches


def test_classifier_loss_reaches_every_trainable_parameter_and_no_frozen_one():
    model = _classifier(R38, 0)
    task = ClassifierTask(model, R38, ["a", "b", "c"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss, _ = task.train_step(model, {"image": images, "label": _labels()}, _ctx())
    grads = _grads(loss, model)
    assert _unreached(grads) == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(R38_FROZEN)} | _batch_norm_params(model)


def _cgnet_setup(depth: int):
    cfg = Config()
    cfg.masking.depth = depth
    cfg.masking.cse_init, cfg.masking.cse_slope = 0.5, 0.25
    torch.manual_seed(5)
    oc = freeze_module(CamClassifier(build_backbone(TINY), 3, 0.0))
    cgnet = _classifier(TINY, 6)
    return CGNetTask(cgnet, oc, cfg, ["a", "b", "c"]), cgnet, oc


@pytest.mark.parametrize("depth", [0, 3])
def test_cgnet_erasing_term_trains_the_cgnet_through_its_mask_and_never_the_oc(depth):
    task, cgnet, oc = _cgnet_setup(depth)
    oc_before = {k: v.clone() for k, v in oc.state_dict().items()}
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "label": _labels()}
    epoch = 2
    w = 0.5 + 0.25 * epoch
    loss, metrics = task.train_step(cgnet, batch, _ctx(step=7, epoch=epoch))
    assert metrics["w"] == pytest.approx(w) and metrics["loss_cse"] > 0
    g_total = _grads(loss, cgnet)
    *_, loss_cls = task.classify(cgnet, batch, _ctx(step=7, epoch=epoch))  # the same forward (no dropout)
    g_cls = _grads(loss_cls, cgnet)
    assert float(loss.detach()) == pytest.approx(metrics["loss_cls"] + w * metrics["loss_cse"], rel=1e-6)
    # the erasing term's own gradient: (total - classification) / w; it reaches every CGNet layer,
    # which only the (not detached) mask connects to the OC's loss
    g_cse = {n: (g_total[n] - g_cls[n]) / w for n in g_total}
    scale = max(float(g.abs().max()) for g in g_cse.values())
    weak = [n for n, g in g_cse.items() if not float(g.abs().max()) > 1e-4 * scale]
    assert scale > 1e-6 and weak == [], f"the erasing loss does not reach {weak}"
    # ... and never the OC: no parameter of it asks for a gradient, none received one, and its
    # weights and BatchNorm statistics are those it had (eval mode)
    loss.backward()
    assert [n for n, p in oc.named_parameters() if p.requires_grad or p.grad is not None] == []
    assert not oc.training
    for k, v in oc.state_dict().items():
        assert torch.equal(v, oc_before[k]), k


def test_cgnet_without_erasing_weight_is_the_classifier_gradient():
    task, cgnet, _ = _cgnet_setup(0)
    task.masking.cse_init, task.masking.cse_slope = 0.0, 0.0
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "label": _labels()}
    loss, metrics = task.train_step(cgnet, batch, _ctx())
    *_, loss_cls = task.classify(cgnet, batch, _ctx())
    assert "loss_cse" not in metrics
    for n, g in _grads(loss, cgnet).items():
        torch.testing.assert_close(g, _grads(loss_cls, cgnet)[n], rtol=0, atol=0)


def _affinity_setup():
    tc = AffinityTrainConfig(net=R38, radius=3, psa_border=False)
    torch.manual_seed(8)
    model = AffinityNet(build_backbone(R38))
    model.backbone.freeze()
    g = torch.Generator().manual_seed(9)
    labels = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)[torch.randint(0, 4, (2, 6, 6), generator=g)]
    return AffinityTask(model, tc, ["a", "b", "c"]), model, {"image": torch.randn(2, 3, 48, 48, generator=g),
                                                           "aff_label": labels}


def test_each_affinity_loss_term_reaches_the_head_and_every_trained_backbone_block():
    task, model, batch = _affinity_setup()
    task.train_step(model, batch, _ctx())
    from caee.method.affinity import affinity_loss, offset_affinity, pair_label_targets

    feats = model(batch["image"])
    f, t = task.pairs(6, 6, CPU)
    bg, fg, neg = pair_label_targets(batch["aff_label"], f, t)
    assert int(bg.sum()) > 0 and int(fg.sum()) > 0 and int(neg.sum()) > 0
    _, terms = affinity_loss(offset_affinity(feats, 3, False), bg, fg, neg)
    for name in ("bg", "fg", "neg"):
        grads = _grads(terms[name], model)
        assert _unreached(grads) == [], name
        assert any(n.startswith("backbone.b7.") for n in grads) and any(n.startswith("f9.") for n in grads)
    loss, _ = task.train_step(model, batch, _ctx())
    assert _unreached(_grads(loss, model)) == []


def test_deeplab_loss_reaches_head_weights_biases_and_the_backbone():
    torch.manual_seed(3)
    model = build_deeplab(TINY, 4, "largefov", 16, None, 0.0)
    model.backbone.freeze()
    g = torch.Generator().manual_seed(4)
    mask = torch.randint(0, 4, (2, 32, 32), generator=g)
    mask[:, :4] = 255
    loss, _ = DeeplabTask(model, {}).train_step(model, {"image": torch.randn(2, 3, 32, 32, generator=g),
                                                        "mask": mask}, _ctx())
    grads = _grads(loss, model)
    assert _unreached(grads) == []
    assert {"head.fc6.bias", "head.fc8.bias", "backbone.stage1.conv.weight"} <= set(grads)


# ---------------------------------------------------------------- 2. one real optimiser step


def _dataset(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _role(name: str, kind: str, p: torch.Tensor) -> str:
    part = "head" if name.startswith(HEADS[kind]) else "backbone"
    return f"{part} {'bias' if name.endswith('.bias') or p.ndim == 1 else 'weight'}"


def _real_task(kind: str):
    """(task, one batch, stage config) of the real trainer ``kind`` on a miniature network whose
    new layers have biases wherever the recipe has them (a biased fc8 for the classifier)."""
    g = torch.Generator().manual_seed(11)
    cls_batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "label": _labels()}
    if kind == "classifier":
        model = _classifier(R38, 0, head_bias=True)
        return ClassifierTask(model, R38, ["a", "b", "c"]), cls_batch, ClassifierTrainConfig(net=R38)
    if kind == "cgnet":
        task, cgnet, _ = _cgnet_setup(2)
        cgnet.fc8 = nn.Conv2d(cgnet.fc8.in_channels, 3, 1, bias=True)
        nn.init.uniform_(cgnet.fc8.bias, 0.5, 1.0)
        return task, cls_batch, CGNetTrainConfig(net=TINY)
    if kind == "affinity":
        task, _, batch = _affinity_setup()
        return task, batch, dataclasses.replace(task.cfg)
    torch.manual_seed(3)
    model = build_deeplab(TINY, 4, "largefov", 16, None, 0.0)
    model.backbone.freeze()
    with torch.no_grad():  # DeepLab's head biases start at 0, where no decay would show
        for m in model.head.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(0.5, 1.0)
    mask = torch.randint(0, 4, (4, 32, 32), generator=g)
    return DeeplabTask(model, {}), {"image": cls_batch["image"], "mask": mask}, DeeplabTrainConfig(net=TINY)


@pytest.mark.parametrize("kind", ["classifier", "cgnet", "affinity", "deeplab"])
def test_one_engine_step_gives_each_group_psa_lr_and_decay(kind, tmp_path):
    task, batch, tc = _real_task(kind)
    # the stage's own multipliers (dataclass defaults); a decay large enough to show in one step
    tc = dataclasses.replace(tc, batch_size=len(batch["image"]), epochs=1, max_steps=0, weight_decay=0.05,
                             optimizer="sgd", checkpoint_every=1000, log_every=1000)
    model = task.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(task, _dataset(batch), tc, tmp_path, CPU)
    seen = set()
    r38 = kind in ("classifier", "affinity")  # ResNet38: PSA's frozen blocks and BatchNorm; TinyCNN: none
    for n, p in model.named_parameters():
        if r38 and (n.startswith(R38_FROZEN) or n in _batch_norm_params(model)):
            assert p.grad is None and torch.equal(p.detach(), before[n]), f"frozen {n} moved"
            continue
        role = _role(n, kind, p)
        mult, decays = OFFICIAL[role]
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), n
        # SGD's first step (momentum buffer = the gradient): p -= lr * (g + wd * p)
        lr, wd = tc.lr * mult, (tc.weight_decay if decays else 0.0)
        expected = before[n] - lr * (p.grad + wd * before[n])
        # the effective lr and decay, least squares over the tensor, for the failure message
        a = torch.stack([p.grad.reshape(-1), before[n].reshape(-1)], 1).double()
        sol = torch.linalg.lstsq(a, (before[n] - p.detach()).reshape(-1, 1).double()).solution.reshape(-1)
        msg = (f"{kind}: {n} ({role}) moved with lr {float(sol[0]):.4g}, decay {float(sol[1] / sol[0]):.3g}; "
               f"expected lr {lr:.4g} ({mult:g}x), decay {wd:g}")
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=msg)
        seen.add(role)
    wanted = {"classifier": {"backbone weight", "head weight", "head bias"},
              "cgnet": set(OFFICIAL), "affinity": {"backbone weight", "head weight"},
              "deeplab": set(OFFICIAL)}[kind]
    assert seen == wanted
