"""DIMAP: Data-independent Module-Aware Pruning for Hierarchical Vision Transformers (He & Zhou, ICLR 2024,
arXiv:2404.13648). Official repository: https://github.com/he-y/Data-independent-Module-Aware-Pruning (it holds
only a README and links to pruned checkpoints), so this is written from the paper's description.

Magnitude pruning ranks every weight of the network by |w| in one global list. In a hierarchical ViT (Swin) the
weight scales differ from stage to stage and from layer type to layer type, so a global threshold wipes out whole
layers whose weights happen to be small, although they matter as much *locally*. DIMAP

1. groups the weights into **modules**, per block: QKV-M (the attention's qkv projection), PRJ-M (its output
   projection), MLP-M (fc1 and fc2 together); and AUX-M, the auxiliary layers (patch embedding, every patch
   merging, the head), each its own module;
2. scores each weight by the share of its module's "information" it carries among the weights at least as large:
   with the module's weights sorted by magnitude, largest first (|W_1| ≥ |W_2| ≥ ...),

        Imp(W_p) = W_p² / Σ_{i ≤ p} W_i²                       ∈ (0, 1],  Imp(W_1) = 1

   Σ_{i ≤ p} W_i² is the energy (the squared-Frobenius "distortion" scale) of the module if only its p largest
   weights were kept; Imp(W_p) is how much the p-th weight adds to it, relative to the module itself. It needs no
   data (hence "data-independent": no images through the patch merging), it is monotone in |w| within a module
   (the local ranking is the magnitude ranking) and it does not change when a whole module is rescaled;
3. ranks all weights of all modules by Imp in one list and zeroes the lowest fraction (unstructured, one shot),
   then fine-tunes with the mask fixed.

    module i:  |w| sorted ↓ ─▶ w²/cumsum(w²) ─┐
    module j:  |w| sorted ↓ ─▶ w²/cumsum(w²) ─┼─▶ one global ranking ─▶ prune the lowest s % ─▶ masked fine-tune
    module k:  ...                            ─┘

    masks = prune_masks(model, 0.5, "dimap")      # also "global" (magnitude) and "layer" (same % in every layer)
    apply_masks_(model, masks)
    finetune_masked(model, masks, train, P, seed=0)   # the chapter's fine-tune (recipes.finetune_kwargs), mask fixed

Our reading. The summary formula Imp(W_{p_j}) = W_{p_j}² / Σ_{i≤p_j} W_i² is ambiguous about the sort order;
sorted ascending, the smallest weight of each module would get Imp = 1 and the ranking would favour small weights,
so we sort descending (the reading under which Imp is monotone, in (0, 1] and scale-invariant, as the paper's
arguments need). Ties count as "at least as large". Only Linear/Conv weight matrices are pruned (biases, norms,
position and relative-position tables are kept), as in the usual unstructured-pruning protocol. Which layers form
the auxiliary module (one AUX-M per auxiliary layer here) is our choice; the paper's figure shows the patch
embedding, patch merging and head as AUX-M.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn
from vitlab.checks import check_int as _check_int, check_model as _check_model

__all__ = ["DEFAULTS", "MODULE_KINDS", "METHODS", "tiny_swin", "prunable", "module_groups", "dimap_importance",
           "dimap_importance_bruteforce", "prune_masks", "apply_masks_", "sparsity", "module_sparsity",
           "finetune_masked", "for_compare"]

MODULE_KINDS = ("QKV-M", "PRJ-M", "MLP-M", "AUX-M")
METHODS = ("dimap", "global", "layer")
# The lesson's default setting (``for_compare`` reads the same): half of all Linear/Conv weights removed by the global
# DIMAP ranking, then the chapter's fine-tune with the mask fixed. DIMAP adds no trained parameters, so no lr here:
# the masked fine-tune is ``recipes.finetune_kwargs`` (the dense control's recipe).
DEFAULTS = dict(sparsity=0.5, method="dimap")


def tiny_swin(num_classes: int = 10, img_size: int = 32, in_chans: int = 3, *, patch_size: int = 2,
              embed_dim: int = 32, depths=(2, 2), num_heads=(2, 4), window_size: int = 4, mlp_ratio: float = 2.0):
    """A two-stage timm ``SwinTransformer`` for 32 px images: 16×16 tokens of width 32 (windows of 4×4), a patch
    merging, 8×8 tokens of width 64."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                           mlp_ratio=mlp_ratio)


# ------------------------------------------------------------------------------------------------ modules
def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of every nn.Linear / nn.Conv2d weight in ``model`` (what unstructured pruning removes)."""
    _check_model(model, "prunable")
    return {f"{n}.weight" if n else "weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _kind(name: str) -> tuple[str, str]:
    """(module kind, module name) of a prunable weight, from its parameter name (timm Swin and ViT layouts)."""
    m = re.match(r"(.*)\.attn\.qkv\.weight$", name)
    if m:
        return "QKV-M", m.group(1) + ".qkv"
    m = re.match(r"(.*)\.attn\.proj\.weight$", name)
    if m:
        return "PRJ-M", m.group(1) + ".proj"
    m = re.match(r"(.*)\.mlp\.fc[12]\.weight$", name)
    if m:
        return "MLP-M", m.group(1) + ".mlp"
    return "AUX-M", name[:-len(".weight")]


def module_groups(model: nn.Module) -> dict[str, dict]:
    """{module name: {"kind": one of MODULE_KINDS, "params": [weight names]}}, in model order.

    Per block: ``<block>.qkv`` (QKV-M), ``<block>.proj`` (PRJ-M), ``<block>.mlp`` = fc1 + fc2 (MLP-M); every other
    Linear/Conv (patch embedding, patch merging, head) is its own AUX-M module."""
    groups: dict[str, dict] = {}
    for name in prunable(model):
        kind, mod = _kind(name)
        groups.setdefault(mod, {"kind": kind, "params": []})["params"].append(name)
    if not groups:
        raise ValueError("module_groups: model has no nn.Linear / nn.Conv2d weights to prune")
    return groups


# ------------------------------------------------------------------------------------------------ importance
@torch.no_grad()
def dimap_importance(weights) -> list[torch.Tensor]:
    """Imp of every weight of ONE module (a tensor or a list of tensors, e.g. fc1 and fc2), same shapes back:
    Imp(w) = w² / Σ_{v in module, |v| ≥ |w|} v². The largest weight gets 1; zeros get 0."""
    ws = [weights] if torch.is_tensor(weights) else list(weights)
    if not ws or not all(torch.is_tensor(w) for w in ws):
        raise TypeError(f"dimap_importance: weights must be a tensor or a non-empty list of tensors, "
                        f"got {type(weights).__name__}")
    flat = torch.cat([w.detach().reshape(-1).double() for w in ws])
    sq = flat.square()
    order = sq.argsort(descending=True)
    s = sq[order]  # largest first
    cum = s.cumsum(0)
    last_tie = torch.searchsorted(-s, -s, right=True) - 1  # the last index with the same value: ties count
    imp_sorted = torch.where(cum[last_tie] > 0, s / cum[last_tie].clamp_min(1e-300), torch.zeros_like(s))
    imp = torch.empty_like(flat)
    imp[order] = imp_sorted
    out, start = [], 0
    for w in ws:
        out.append(imp[start:start + w.numel()].view_as(w).to(torch.float32))
        start += w.numel()
    return out


def dimap_importance_bruteforce(weights) -> list[torch.Tensor]:
    """The same Imp, straight from the definition with a loop over weights (O(n²): tests only)."""
    ws = [weights] if torch.is_tensor(weights) else list(weights)
    flat = torch.cat([w.detach().reshape(-1).double() for w in ws])
    imp = torch.tensor([float(v * v / flat[flat.abs() >= v.abs()].square().sum()) if v != 0 else 0.0
                        for v in flat], dtype=torch.float64)
    out, start = [], 0
    for w in ws:
        out.append(imp[start:start + w.numel()].view_as(w).float())
        start += w.numel()
    return out


def _scores(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    params = prunable(model)
    if method == "dimap":
        scores = {}
        for g in module_groups(model).values():
            for name, imp in zip(g["params"], dimap_importance([params[n] for n in g["params"]])):
                scores[name] = imp
        return scores
    return {n: p.detach().abs().float() for n, p in params.items()}


@torch.no_grad()
def prune_masks(model: nn.Module, sparsity: float, method: str = "dimap") -> dict[str, torch.Tensor]:
    """{weight name: bool keep-mask} removing a fraction ``sparsity`` of all prunable weights.

    ``dimap``: the lowest Imp over all modules together; ``global``: the smallest |w| over the whole network;
    ``layer``: the smallest |w| within every layer, the same fraction in each."""
    _check_model(model, "prune_masks")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"prune_masks: sparsity must be a number in [0, 1), got {sparsity!r}")
    if method not in METHODS:
        raise ValueError(f"prune_masks: method must be one of {METHODS}, got {method!r}")
    scores = _scores(model, method)
    if method == "layer":
        return {n: _keep_top(s.reshape(-1), round((1 - sparsity) * s.numel())).view_as(s) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = _keep_top(flat, round((1 - sparsity) * flat.numel()))
    masks, start = {}, 0
    for n, s in scores.items():
        masks[n] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.argsort(descending=True, stable=True)[:k]] = True  # exactly k kept; ties broken by position
    return keep


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place; returns ``model``."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params or params[n].shape != m.shape:
            raise ValueError(f"apply_masks_: mask {n!r} {tuple(m.shape)} does not match the model")
        params[n].mul_(m.to(params[n].device, params[n].dtype))
    return model


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of the masked weights that are pruned."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def module_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, tuple[str, float]]:
    """{module name: (kind, fraction of its weights pruned)}."""
    out = {}
    for mod, g in module_groups(model).items():
        ms = [masks[n] for n in g["params"]]
        out[mod] = (g["kind"], 1.0 - sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms))
    return out


# ------------------------------------------------------------------------------------------------ fine-tuning
class _Masked(nn.Module):
    """Parametrisation weight = original · mask: the pruned weights are zero in every forward pass and get no
    gradient, so neither the optimiser's momentum nor its weight decay can move them."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def finetune_masked(model: nn.Module, masks: dict[str, torch.Tensor], train, profile=None, *, seed: int = 0,
                    progress: bool = False, **fit_overrides) -> dict:
    """Fine-tune ``model`` with the pruned weights held at zero: ``vitlab.train.fit`` with the chapter's recipe
    ``recipes.finetune_kwargs(profile)`` (AdamW lr 1e-4, warm-up, cosine, label smoothing, ±2 px shifts, batch 64,
    ``finetune_steps`` steps: exactly the dense control's arguments) and ``seed``. ``fit_overrides`` replace recipe
    entries (e.g. ``steps`` in a unit test; a lesson's claim against the dense control must not use them).

    The masks enter as a parametrisation (weight = original · mask) for the length of the fit, then are folded
    in, so the pruned weights are exactly zero afterwards. Returns fit's history; leaves ``model`` in eval mode."""
    from torch.nn.utils import parametrize

    from vitlab.methods.efficient.recipes import finetune_kwargs
    from vitlab.train import fit

    _check_model(model, "finetune_masked")
    _check_int(seed, "seed", "finetune_masked", low=0)
    if not isinstance(masks, dict) or not masks:
        raise TypeError(f"finetune_masked: masks must be a non-empty dict name -> bool mask, got {type(masks).__name__}")
    apply_masks_(model, masks)  # also checks every mask against the model
    kwargs = {**finetune_kwargs(profile), **fit_overrides}
    mods = []
    for name, m in masks.items():
        mod = model.get_submodule(name[:-len(".weight")] if name.endswith(".weight") else "")
        w = mod.weight
        parametrize.register_parametrization(mod, "weight", _Masked(m.to(w.device, w.dtype)))
        mods.append(mod)
    try:
        hist = fit(model, train, None, profile=profile, seed=seed, progress=progress, desc="masked fine-tune",
                   **kwargs)
    finally:
        for mod in mods:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return hist


# ------------------------------------------------------------------------------------------------ comparison entry
def for_compare(base, train, profile, *, seed: int = 0):
    """DIMAP at the lesson's default (``DEFAULTS``) on the chapter's base ViT: modules qkv / proj / mlp per block and
    AUX (patch embedding, head), 50 % of all Linear/Conv weights removed by the global Imp ranking, then the chapter's
    fine-tune with the mask fixed (``finetune_masked``: ``recipes.finetune_kwargs(profile)``, ``seed``), so that
    ``recipes.dense_control(seed, profile)`` is its equal-step control.

    FLOPs: unstructured zeros are not faster on dense hardware, so we leave ``gflops`` None (the flop counter
    reports the dense model's GFLOPs, which is what it costs to run) and say so in the note; ``extra`` holds the
    GFLOPs one would count if every zero weight were skipped."""
    from vitlab import measure
    from vitlab.methods.efficient.recipes import Reduced, finetune_steps
    from vitlab.profiles import profile as get_profile

    P = get_profile(profile)
    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    model = copy.deepcopy(base)
    masks = prune_masks(model, DEFAULTS["sparsity"], DEFAULTS["method"])
    steps = finetune_steps(P)
    finetune_masked(model, masks, train, P, seed=seed)
    dense = measure.flops(model, train.images[:2]) / 1e9
    params = prunable(model)
    lin = sum(2 * int(m.sum()) * _tokens(model, n) for n, m in masks.items())  # kept MACs of the masked layers
    full = sum(2 * m.numel() * _tokens(model, n) for n, m in masks.items())
    nonzero = dense - (full - lin) / 1e9
    return Reduced(model.eval(), None, None,
                   f"DIMAP {DEFAULTS['sparsity']:.0%} unstructured sparsity, {steps} masked steps (chapter recipe); "
                   f"dense GFLOPs shown (zeros are not faster on dense hardware; {nonzero:.4f} GFLOPs if zeros were "
                   f"skipped)",
                   extra={"sparsity": sparsity(masks), "nonzero_gflops": nonzero, "dense_gflops": dense,
                          "params_nonzero": sum(int((p != 0).sum()) for p in params.values())})


def _tokens(model: nn.Module, name: str) -> int:
    """How many times a layer's weight is applied per image (tokens for a Linear, output pixels for a Conv)."""
    mod = model.get_submodule(name[:-len(".weight")])
    if isinstance(mod, nn.Conv2d):
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", (1, 1))
        return grid[0] * grid[1]
    if name.startswith("head"):
        return 1
    n = getattr(getattr(model, "patch_embed", None), "num_patches", 0) + getattr(model, "num_prefix_tokens", 0)
    return max(n, 1)
