"""SGD applied inside backward: each parameter is updated the moment its gradient is complete, and
the gradient is freed at once, so a step never holds every gradient in memory together.

The update is SGD's, element for element (weight decay, then the momentum buffer, then
``p -= lr * d``), read from the parameter's group when the hook fires: the engine sets the
step's lr before the forward. The momentum buffer lives in ``optimizer.state[p]`` as
``torch.optim.SGD`` keeps it, so checkpoints and resume are unchanged; ``optimizer.step()`` then
finds no gradient and does nothing. ``tests/test_engine.py`` checks that a run equals one with
the ordinary step.

Valid only when the gradient is final when the hook fires and nothing reads all gradients after
backward: one process (DDP reduces gradients after the hooks), no gradient clipping, no fp16
loss scaling (the engine's autocast is bf16, which needs none).
"""
from __future__ import annotations

import torch

from caee.core.errors import CaeeError


def _update(p: torch.Tensor, group: dict, state: dict) -> None:
    """SGD's single-tensor update of ``p`` from ``p.grad``; then the gradient is dropped."""
    with torch.no_grad():
        d = p.grad
        if group["weight_decay"]:
            d = d.add(p, alpha=group["weight_decay"])
        if group["momentum"]:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(d).detach()
            else:
                buf.mul_(group["momentum"]).add_(d)
            d = buf
        p.add_(d, alpha=-group["lr"])
        p.grad = None


def step_in_backward(optimizer: torch.optim.Optimizer) -> list:
    """Make ``optimizer`` (plain SGD) update each parameter during backward; returns the hook
    handles (``handle.remove()`` restores the ordinary step)."""
    if type(optimizer) is not torch.optim.SGD:
        raise CaeeError(f"step_in_backward needs optimizer: sgd, got {type(optimizer).__name__}")
    handles = []
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("nesterov") or group.get("dampening") or group.get("maximize"):
            raise CaeeError("step_in_backward covers SGD with plain momentum only (no Nesterov, dampening, maximize)")
        for p in group["params"]:
            if p.requires_grad:
                # group and state looked up when the hook fires: load_state_dict (resume) replaces both
                handles.append(p.register_post_accumulate_grad_hook(
                    lambda p, gi=gi: _update(p, optimizer.param_groups[gi], optimizer.state[p])))
    return handles
