"""How good are self-supervised features? A linear probe on frozen features, and a fine-tune.

    feats = features(encoder, train, pool="cls")          frozen, eval mode, no grad: [N, D]
    res = linear_probe(feats, train.labels, test_feats, test.labels)   → res["acc"], res["head"]
    history = finetune(mae.to_vit(num_classes=10), train, val, layer_decay=0.75, epochs=...)

The protocol is MAE's (He et al. 2022; facebookresearch/mae ``main_linprobe.py``, ``main_finetune.py``,
``util/lr_decay.py``):
- linear probe: the frozen encoder's CLS token (or the mean of its patch tokens) → BatchNorm without affine
  parameters → Linear. A BatchNorm without affine at eval is a standardisation with fixed statistics; we
  standardise with the train features' mean and std (eps 1e-6), computed once, which is what its running
  statistics converge to (a deviation: no momentum, exact statistics). MAE trains the Linear with LARS for 90
  epochs; we train it as a logistic regression (full- or mini-batch AdamW, cross-entropy), seeded: the same
  seed gives the same head. Weight init normal std 0.01, bias 0, as MAE's probe.
- fine-tune: ``vitlab.train.fit`` with, optionally, layer-wise lr decay: a parameter in block i gets
  lr · layer_decay^(L + 1 − (i + 1)) with L blocks; the patch embedding, CLS and position tables count as
  layer 0, everything after the blocks (norm, head) as layer L + 1 (scale 1). No weight decay on biases, norms
  and the tables in ``model.no_weight_decay()``, as MAE's ``param_groups_lrd``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_model, check_number

__all__ = ["features", "Standardize", "linear_probe", "dense_probe", "param_groups_lrd", "layer_decay_optimizer", "partial_optimizer",
           "finetune"]


def _images(data, fn: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        images = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images = data[0]
    elif hasattr(data, "images"):
        images = data.images
    else:
        raise TypeError(f"{fn}: data must be an image tensor [N, C, H, W], an (images, labels) tuple or a vitlab "
                        f"ImageDataset, got {type(data).__name__}")
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5) or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{fn}: data must hold images [N, C, H, W] (or volumes [N, C, D, H, W] for a model that "
                         f"takes them) with N > 0, got {shape}")
    return images


@torch.no_grad()
def features(model: nn.Module, data, pool: str = "cls", batch_size: int = 256) -> torch.Tensor:
    """Frozen features [N, D] of ``data`` (images [N,C,H,W], an (images, labels) tuple or an ImageDataset; volumes
    [N,C,D,H,W] for a model whose forward_features takes them, e.g. Uni4Eye's).

    ``model`` needs ``forward_features(images) -> tokens [B, T, D]`` with ``model.num_prefix_tokens`` prefix
    tokens first (vitlab's ``VisionTransformer``, ``MaskedAutoencoder``). pool: ``"cls"`` the first token,
    ``"avg"`` the mean of the tokens after the prefix. The tokens are read after the model's final ``norm``
    (an avg-pool ViT has no such norm; its ``fc_norm`` is not applied). Runs in eval mode without gradients and
    returns the model to the mode it was in; features come back on the CPU, float32.
    """
    fn = "features"
    check_model(model, fn)
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(f"{fn}: model must have forward_features(images) -> tokens [B, T, D] (a vitlab "
                        f"VisionTransformer or MaskedAutoencoder), got {type(model).__name__}")
    check_choice(pool, ("cls", "avg"), "pool", fn)
    batch_size = check_int(batch_size, "batch_size", fn)
    images = _images(data, fn)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if pool == "cls" and prefix < 1:
        raise ValueError(f"{fn}: pool='cls' needs a model with a CLS token; this one has no prefix tokens: "
                         f"use pool='avg'")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(images), batch_size):
            tokens = model.forward_features(images[i:i + batch_size].to(device=device, dtype=dtype))
            if isinstance(tokens, tuple):
                tokens = tokens[0]
            f = tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(dim=1)
            out.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


class Standardize(nn.Module):
    """(x − mean) / std with fixed buffers: MAE's BatchNorm1d(affine=False) in eval mode."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _feats_labels(feats, labels, name: str, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or len(feats) == 0:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{fn}: {name}_feats must be a tensor [N, D] with N > 0, got {shape}")
    if not feats.dtype.is_floating_point or not torch.isfinite(feats).all():
        raise ValueError(f"{fn}: {name}_feats must be finite floating-point values")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or tuple(labels.shape) != (len(feats),):
        raise ValueError(f"{fn}: {name}_labels must be integer class indices [{len(feats)}], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if int(labels.min()) < 0:
        raise ValueError(f"{fn}: {name}_labels must be >= 0, got {int(labels.min())}")
    return feats.detach().float().cpu(), labels.long().cpu()


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int | None = None, epochs: int = 100, lr: float = 0.01,
                 weight_decay: float = 0.0, batch_size: int | None = None, seed: int = 0) -> dict:
    """Logistic regression on standardised frozen features (train mean/std); deterministic given ``seed``.

    ``batch_size=None``: full batch (one step an epoch); otherwise shuffled mini-batches (seeded). Runs on the CPU.
    Returns dict(acc=test accuracy, train_acc=..., head=nn.Sequential(Standardize, Linear) mapping raw features
    to logits, loss=final training loss).
    """
    fn = "linear_probe"
    xtr, ytr = _feats_labels(train_feats, train_labels, "train", fn)
    xte, yte = _feats_labels(test_feats, test_labels, "test", fn)
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"{fn}: test_feats has {xte.shape[1]} dims, train_feats {xtr.shape[1]}")
    top = int(max(ytr.max(), yte.max())) + 1
    num_classes = top if num_classes is None else check_int(num_classes, "num_classes", fn, low=2)
    if top > num_classes:
        raise ValueError(f"{fn}: labels reach {top - 1} but num_classes={num_classes}")
    num_classes = max(num_classes, 2)
    epochs = check_int(epochs, "epochs", fn)
    lr = check_number(lr, "lr", fn, low=0, low_open=True)
    weight_decay = check_number(weight_decay, "weight_decay", fn, low=0)
    seed = check_int(seed, "seed", fn, low=0)
    n = len(xtr)
    batch_size = n if batch_size is None else min(check_int(batch_size, "batch_size", fn), n)

    gen = torch.Generator().manual_seed(seed)
    mean, std = xtr.mean(0), (xtr.var(0, unbiased=False) + 1e-6).sqrt()
    linear = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():  # MAE: trunc_normal_(std=0.01) with bounds ±2, i.e. a plain normal; from our generator
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
        linear.bias.zero_()
    head = nn.Sequential(Standardize(mean, std), linear)
    opt = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    xs = head[0](xtr)
    loss = torch.tensor(math.nan)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if batch_size < n else torch.arange(n)
        for i in range(0, n - batch_size + 1, batch_size):  # full batches only
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(linear(xs[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        train_acc = (head(xtr).argmax(1) == ytr).float().mean().item()
        acc = (head(xte).argmax(1) == yte).float().mean().item()
    return {"acc": acc, "train_acc": train_acc, "head": head, "loss": float(loss.detach())}


def dense_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                test_labels: torch.Tensor, num_classes: int, **probe_kwargs) -> dict:
    """``linear_probe`` on per-patch features [M, D] and labels [M] (a segmentation probe on frozen dense
    features), scored by mIoU over all test patches as well: {"miou", "acc", "train_acc"}."""
    from .metrics import miou

    res = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes=num_classes, **probe_kwargs)
    with torch.no_grad():
        pred = res["head"](test_feats.float()).argmax(dim=1)
    return {"miou": miou(pred, test_labels.long(), num_classes), "acc": res["acc"], "train_acc": res["train_acc"]}


# --------------------------------------------------------------------------------------------- fine-tune
def _layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit``: tables and the patch embedding 0, block i → i + 1, the rest num_layers."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
    """MAE's ``param_groups_lrd`` for a vitlab ViT (``blocks`` a sequence): one group per (layer, decay or not),
    each with ``lr_scale`` = layer_decay^(num_layers − layer_id), num_layers = len(blocks) + 1, and
    ``weight_decay`` 0 for 1-D parameters and ``model.no_weight_decay()``. Frozen parameters are left out."""
    fn = "param_groups_lrd"
    check_model(model, fn)
    if not hasattr(model, "blocks"):
        raise TypeError(f"{fn}: model must have a `blocks` sequence (a vitlab VisionTransformer), got "
                        f"{type(model).__name__}")
    weight_decay = check_number(weight_decay, "weight_decay", fn, low=0)
    layer_decay = check_number(layer_decay, "layer_decay", fn, low=0, high=1, low_open=True)
    num_layers = len(model.blocks) + 1
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in skip
        lid = _layer_id(name, num_layers)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "weight_decay": 0.0 if no_decay else
                                                weight_decay, "lr_scale": layer_decay ** (num_layers - lid)})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def layer_decay_optimizer(layer_decay: float):
    """An ``optimizer=`` factory for ``vitlab.train.fit``: AdamW over ``param_groups_lrd``, each group at
    lr · lr_scale (fit's schedule then multiplies every group's lr by the same factor)."""
    check_number(layer_decay, "layer_decay", "layer_decay_optimizer", low=0, high=1, low_open=True)

    def make(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        groups = param_groups_lrd(model, weight_decay, layer_decay)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
            del g["names"]
        return torch.optim.AdamW(groups, lr=lr)
    return make


def partial_optimizer(trainable) -> callable:
    """An ``optimizer=`` factory for ``vitlab.train.fit`` that trains only the parameters whose names start with one
    of ``trainable`` (e.g. ``("head.",)``: a linear probe of the whole network; ``("blocks.2.", "blocks.3.", "norm.",
    "head.")``: the last two blocks). The others are frozen (``requires_grad=False``, so they get no gradient and
    do not count in gradient clipping); timm's AdamW groups over the rest (no decay on biases and norms)."""
    if isinstance(trainable, str) or not isinstance(trainable, (tuple, list)) or not trainable or \
            not all(isinstance(p, str) and p for p in trainable):
        raise ValueError(f"partial_optimizer: trainable must be a non-empty list of parameter-name prefixes, got "
                         f"{trainable!r}")
    prefixes = tuple(trainable)

    def make(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        from vitlab.train import make_optimizer

        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise ValueError(f"partial_optimizer: no parameter of the model starts with {unmatched}; "
                             f"its parameters start with {sorted({n.split('.')[0] + '.' for n in names})}")
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(prefixes))
        return make_optimizer(model, "adamw", lr, weight_decay)
    return make


def finetune(model: nn.Module, train, val=None, *, layer_decay: float | None = None, **fit_kwargs) -> dict:
    """``vitlab.train.fit(model, train, val, **fit_kwargs)``, with MAE's layer-wise lr decay when ``layer_decay``
    is given (then ``optimizer`` must not be). Returns fit's history."""
    from vitlab.train import fit

    check_model(model, "finetune")
    if layer_decay is not None:
        if "optimizer" in fit_kwargs:
            raise ValueError("finetune: give layer_decay or optimizer, not both")
        fit_kwargs["optimizer"] = layer_decay_optimizer(layer_decay)
    return fit(model, train, val, **fit_kwargs)
