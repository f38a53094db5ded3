"""Lion: EvoLved Sign Momentum (Chen et al., NeurIPS 2023, arXiv:2302.06675), written from the paper's update rule.

Per parameter θ with gradient g and momentum m (the only state), at learning rate η and weight decay λ:

    θ ← θ · (1 − η·λ)                    decoupled weight decay, applied first (as in AdamW)
    u = sign(β1·m + (1 − β1)·g)          every coordinate moves by exactly η: no per-coordinate scaling
    θ ← θ − η·u
    m ← β2·m + (1 − β2)·g                the momentum is updated *after* the step, with a slower β2

    opt = lion_for(model, lr=3e-4, weight_decay=0.5)      # timm's no-decay groups
    vitlab.train.fit(model, train, val, optimizer=lion_for, lr=3e-4, weight_decay=0.5)

Because ‖sign(·)‖ is large (RMS exactly 1), Lion wants a smaller lr than AdamW and, to keep the effective
decay η·λ, a proportionally larger λ. ``state_numel`` counts optimizer-state floats: Lion keeps one buffer
per parameter, AdamW two.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from vitlab.checks import check_number

__all__ = ["Lion", "lion_step", "lion_for", "state_numel", "DEFAULTS"]

# The lesson's cpu recipe (notebooks/4_training/lion.ipynb), for the chapter's compare to share: a nano ViT with
# 7-px patches (16 tokens) on mnist5k, no augmentation; AdamW (the equal-step control) at adamw_lr and adamw_wd;
# Lion at adamw_lr * lion_lr_factor with the weight decay scaled up so that lr * weight_decay stays AdamW's.
DEFAULTS = dict(model_kw=dict(patch_size=7), epochs=9, batch_size=48, adamw_lr=2e-3, adamw_wd=0.05,
                lion_lr_factor=1 / 3)



def _check_betas(betas, fn: str) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"{fn}: betas[{i}] must be a number in [0, 1), got {b!r}")
    return float(betas[0]), float(betas[1])


@torch.no_grad()
def lion_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr: float, beta1: float,
              beta2: float, weight_decay: float) -> None:
    """One Lion update of one tensor, in place (``param`` and ``exp_avg`` change)."""
    param.mul_(1.0 - lr * weight_decay)  # decoupled decay first: it shrinks the weights the sign step starts from
    update = (exp_avg * beta1 + grad * (1.0 - beta1)).sign_()  # interpolate *then* take the sign
    param.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)  # the long-memory momentum, updated after the step


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay. Defaults follow the paper: betas=(0.9, 0.99); one state tensor
    (``exp_avg``) per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        lr = check_number(lr, "lr", "Lion", low=0)
        weight_decay = check_number(weight_decay, "weight_decay", "Lion", low=0)
        betas = _check_betas(betas, "Lion")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lion_step(p, p.grad, state["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                          weight_decay=group["weight_decay"])
        return loss


def lion_for(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, *,
             betas: tuple[float, float] = (0.9, 0.99)) -> Lion:
    """Lion over ``model`` with timm's parameter groups: no decay on biases, norms (every ≤1-D tensor) and the
    names in ``model.no_weight_decay()`` (pos_embed, cls_token). The ``optimizer=`` callable of
    ``vitlab.train.fit``."""
    try:
        from timm.optim import param_groups_weight_decay
    except ImportError:  # timm < 1.0.12 keeps it in the (later deprecated) optim_factory module
        from timm.optim.optim_factory import param_groups_weight_decay

    if not isinstance(model, nn.Module):
        raise TypeError(f"lion_for: model must be an nn.Module, got {type(model).__name__}")
    lr = check_number(lr, "lr", "lion_for", low=0)
    weight_decay = check_number(weight_decay, "weight_decay", "lion_for", low=0)
    skip = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    return Lion(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Floats of per-parameter optimizer state: the state tensors shaped like their parameter (moments,
    momentum). Scalar bookkeeping such as AdamW's ``step`` counter is not counted."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"state_numel: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    total = 0
    for p, state in optimizer.state.items():
        for key, v in state.items():
            if key != "step" and torch.is_tensor(v) and v.shape == p.shape:
                total += v.numel()
    return total
