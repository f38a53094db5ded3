"""As-ViT's training-free architecture scores (W. Chen, W. Huang, X. Du, X. Song, Z. Wang, D. Zhou, "Auto-scaling
Vision Transformers without Training", ICLR 2022; official code: VITA-Group/AsViT, ``lib/procedures/teg.py``:
``TEG.get_curve_complexity``, ``TEG.get_ntk``; ``lib/procedures/ntk.py``: ``get_ntk_n``).

As-ViT searches ViT architectures without training any of them, ranking candidates by two scores computed at
initialisation:

- **Expressivity: length distortion.** Push a closed curve through the network and measure how long its image
  is. The curve x(theta) = U [cos theta, sin theta] lies in input space (U: two orthonormal directions from the SVD
  of a random (C H W) x 2 matrix, 500 values of theta); the score is sum_theta ||d f(x(theta)) / d theta||, with
  every normalisation layer switched to identity, averaged over re-initialisations. Higher: the network can bend
  its input space more.
- **Trainability: NTK condition number.** On a batch, the per-example gradients g_i of the summed logits with
  respect to the weights give the neural tangent kernel K = G G^T; kappa = lambda_max / lambda_min. Lower:
  gradient descent converges more evenly across examples.

The official code takes d f / d theta with one backward pass per output coordinate; here it is one forward-mode
product per batch of curve points (``torch.func.jvp``), which is exactly J_f(x) dx/dtheta. Deviations, named: f is
the network's logits (the official code reads an intermediate feature output of its own Transformer class); the
re-initialisations are fresh models built with different seeds; any vitlab architecture can be scored, so the
lesson scores the chapter's architectures, all trained by the same recipe, instead of a search space of its own.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitlab.checks import check_int, check_model, check_ndim
from vitlab.stats import kendall_tau  # noqa: F401 - the lesson's ranking measure, re-exported

__all__ = ["curve", "strip_norms", "length_distortion", "ntk_condition", "kendall_tau", "scores", "rank_sums",
           "rank_best"]

_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def curve(shape: tuple[int, int, int], n_points: int = 500, seed: int = 0):
    """(x [n, C, H, W], dx/dtheta [n, C, H, W]): the closed curve U [cos, sin](theta) through input space, theta
    in [0, 2 pi], U two orthonormal directions (the official ``TEG.curve_input``)."""
    check_int(n_points, "n_points", "curve", low=2)
    C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.svd(torch.randn(C * H * W, 2, generator=g), full_matrices=False).U  # [CHW, 2]
    theta = torch.linspace(0, 2 * math.pi, n_points)
    x = (U @ torch.stack([theta.cos(), theta.sin()])).T.reshape(n_points, C, H, W)
    dx = (U @ torch.stack([-theta.sin(), theta.cos()])).T.reshape(n_points, C, H, W)
    return x, dx


def strip_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LayerNorm / BatchNorm / GroupNorm replaced by identity (the official
    ``switch_norm('id')``): the length distortion measures the network's own bending, not the normalisations'."""
    check_model(model, "strip_norms")
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _NORMS):
                setattr(module, child_name, nn.Identity())
    return model


def length_distortion(model: nn.Module, shape: tuple[int, int, int], *, n_points: int = 500, batch_size: int = 100,
                      seed: int = 0) -> float:
    """sum over the curve's points of ||d f(x(theta)) / d theta||_2, norms stripped (higher: more expressive)."""
    net = strip_norms(model).train()  # as the official code; without norms, train mode changes only dropout
    x, dx = curve(shape, n_points, seed)
    total = 0.0
    # forward-mode AD goes through SDPA's math path (the fused CPU kernel has no forward derivative)
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # torch's forward-AD machinery scripts its own decompositions on first use and warns that torch.jit.script
        # is deprecated: a torch-internal notice, nothing this code can change
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        for i in range(0, n_points, batch_size):
            _, tangent = torch.func.jvp(net, (x[i:i + batch_size],), (dx[i:i + batch_size],))
            total += tangent.reshape(len(tangent), -1).norm(dim=1).sum().item()
    return total


def ntk_condition(model: nn.Module, images: torch.Tensor) -> float:
    """lambda_max / lambda_min of the empirical NTK on ``images``: per-example gradients of the summed logits
    with respect to every parameter named "weight" (official ``get_ntk_n``), in train mode (lower: better
    conditioned). Returns inf when the kernel is singular (fewer useful gradient directions than examples)."""
    check_model(model, "ntk_condition")
    check_ndim(images, 4, "images", "ntk_condition")
    model.train()
    weights = [p for name, p in model.named_parameters() if "weight" in name and p.requires_grad]
    logits = model(images)
    rows = []
    for i in range(len(images)):
        grads = torch.autograd.grad(logits[i].sum(), weights, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))
    G = torch.stack(rows).double()
    eig = torch.linalg.eigvalsh(G @ G.T)
    return (eig[-1] / eig[0]).item() if eig[0] > 0 else math.inf


def scores(build: Callable[[], nn.Module], images: torch.Tensor, *, seeds=(0, 1, 2), n_points: int = 500) -> dict:
    """Both scores of an architecture, averaged over fresh initialisations: ``build()`` makes one model, called
    after seeding with each seed. {"length": ..., "ntk": ..., "per_seed": [...]}"""
    from vitlab.seed import seed_everything

    per_seed = []
    for s in seeds:
        seed_everything(s)
        model = build()
        per_seed.append(dict(length=length_distortion(model, tuple(images.shape[1:]), n_points=n_points, seed=s),
                             ntk=ntk_condition(model, images)))
    return {"length": sum(r["length"] for r in per_seed) / len(per_seed),
            "ntk": sum(r["ntk"] for r in per_seed) / len(per_seed), "per_seed": per_seed}


def rank_sums(scores: dict) -> dict:
    """{name: rank by NTK condition (ascending: lower is better) + rank by length distortion (descending)} for
    ``scores`` = {name: {"ntk": ..., "length": ...}}, ranks from 0; tied values share the better rank (the
    official ``TEG._buffer_rank_best`` ranks with ``sorted(...).index(value)``). Lower: a better candidate."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("rank_sums: scores must be a non-empty dict {name: {'ntk': ..., 'length': ...}}")
    for name, s in scores.items():
        if not isinstance(s, dict) or not {"ntk", "length"} <= set(s):
            raise ValueError(f"rank_sums: scores[{name!r}] must hold 'ntk' and 'length', got {s!r}")
    ntk = sorted(s["ntk"] for s in scores.values())
    length = sorted((s["length"] for s in scores.values()), reverse=True)
    return {name: ntk.index(s["ntk"]) + length.index(s["length"]) for name, s in scores.items()}


def rank_best(scores: dict) -> str:
    """The candidate As-ViT's search keeps: the smallest sum of the two ranks (``rank_sums``; ties: the first
    listed, as the official ``np.argmin``)."""
    sums = rank_sums(scores)
    return min(sums, key=sums.get)
