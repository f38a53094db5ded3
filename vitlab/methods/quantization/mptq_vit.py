"""MPTQ-ViT: mixed-precision post-training quantisation for ViTs (Y.-S. Tai and A.-Y. Wu, 2024,
arXiv:2401.14895). No official code is public, and the paper's full text was not available to us: this is
written from its abstract, a published summary of its method (which gives the SQ-b equation below) and the
SmoothQuant paper (Xiao et al., ICML 2023). "Our reading" at the end says what is the paper's and what we chose.

Three mechanisms on top of a plain fake-quantised ViT (``vitlab.quant``):

**SQ-b, SmoothQuant with a bias term** (the inputs of the linears fed by a LayerNorm: ``qkv`` and ``fc1``).
With LayerNorm output Y = x̄·γ + β and the next linear Y·Wᵀ + b, per input channel j a shift z_j and a scale s_j:

    Y·Wᵀ + b = ((Y − z)/s)·(W·diag(s))ᵀ + (b + W·z)
             = (x̄·γ' + β')·W'ᵀ + b'      γ' = γ/s,  β' = (β − z)/s,  W' = W·diag(s),  b' = b + W·z

so the float network is unchanged (folded once, offline), while the quantiser now sees (Y − z)/s: every channel
centred (z_j = mid-range of channel j on the calibration set) and scaled as SmoothQuant does,

    s_j = max_t |Y_tj − z_j|^α / max_i |W_ij|^(1−α)           (α: migration strength, 0.5 by default)

z = 0 is plain SmoothQuant (SQ). Centring matters for a per-tensor quantiser when channels are asymmetric: the
per-tensor range is the union of the channel ranges, so a channel living in [−0.2, 4] and one in [−4, 0.2]
force a [−4, 4] grid, and the half each channel does not use is wasted resolution (or clamped, if the range is
clipped). After the shift, each channel spans ±(its half range).

**OPT-m, optimal scaling-factor ratio** for the post-GELU activations (the input of ``fc2``). A two-region
quantiser, b bits = a sign/region bit + (b − 1) magnitude bits:

    x ≥ 0:  x̂ = Δ · clamp(rint(x/Δ), 0, 2^(b−1) − 1)
    x < 0:  x̂ = Δ·2^(−m) · clamp(rint(x·2^m/Δ), −2^(b−1), 0)

The clamps are PTQ4ViT's twin-uniform post-GELU quantiser's (hahnyuan/PTQ4ViT, ``PostGeluPTQSLQuantLinear.
quant_input``: positive codes clamp(·, 0, 2^(b−1) − 1), negative codes clamp(·, −2^(b−1), 0)), so the two regions
share 0 and hold 2^b distinct values in all: the signed b-bit code range [−2^(b−1), 2^(b−1) − 1].

GELU's negative part lives in [−0.17, 0] and is dense; the positive part is long-tailed. Earlier twin-uniform
quantisers fix the ratio of the two region scales by hand; OPT-m searches the power-of-two ratio 2^m (a shift in
hardware) together with Δ, minimising the calibration error of the layer (``search_ratio``).

**Greedy MP**, layer-wise bit-widths under a model-size budget: start every layer at ``max_bits``; repeatedly
lower by one bit the layer whose reduction costs least per weight bit saved,

    l* = argmin_l  [E_l(b_l − 1) − E_l(b_l)] / n_l          (n_l: weights in layer l)

until Σ_l n_l·b_l ≤ budget; then spend what is left of the budget, raising the layers that gain most per bit
that still fit (``fill``), so the budget is met exactly whenever the layer sizes allow it. E comes from
calibration data: a table of single-layer sensitivities (``sensitivity_table``: the KL divergence of the logits
from the float model with only layer l quantised at b bits), or any callable that scores a whole configuration.

Usage::

    smooth, factors = smoothquant_bias(model, calib, alpha=0.5)            # FP-equivalent copy (SQ-b)
    q = mptq_quantize(model, calib, w_bits=4, a_bits=4)                   # SQ-b + OPT-m, calibrated
    table = sensitivity_table(model, calib, bits=range(3, 9))
    mp = greedy_mp(layer_sizes(model), table, budget_for_average(layer_sizes(model), 5.0))
    q_mp = mptq_quantize(model, calib, layer_bits=mp.bits)

Our reading (what the paper fixes and what we chose):
- From the paper: SQ-b's reparameterisation Y·Wᵀ + b = ((Y − μ)/ε)·(εW)ᵀ + b + μWᵀ folded into LayerNorm and the
  linear (qkv, fc1), with SmoothQuant's ε; OPT-m as a data-driven search of the ratio between region-wise scaling
  factors of the post-GELU quantiser instead of a hand-set one; Greedy MP as a greedy layer-wise bit-width
  allocation weighing performance against compressed size.
- Our reading of OPT-m: two regions split at 0, a power-of-two ratio 2^m between their steps (what earlier
  twin-uniform quantisers fix by hand), m and Δ found by grid search. The paper's regions, its search space for
  m and its error metric may differ.
- Chosen here: the shift is the channel mid-range ((max + min)/2, which minimises the channel's half range;
  ``shift="mean"`` gives the channel mean, which is how a secondary summary of the paper reads μ); the
  activation quantiser after SQ/SQ-b is the shared per-tensor uniform one (asymmetric, min-max unless told
  otherwise), so the ablation changes one thing at a time. OPT-m's error is the input MSE weighted per channel
  by ‖W_:,j‖² (the diagonal of the next layer's WᵀW: a cheap proxy for the fc2 output error), over m = 0..8.
  Greedy MP ties a layer's weight and input-activation bits together (one bit-width per linear); the size is
  the linears' weight bits; the cost is a table of single-layer sensitivities (additive, cheap) rather than a
  re-evaluation of every candidate at every step (``greedy_mp`` accepts a callable for that); bits start from
  the top of the allowed range (8 in the cpu/gpu lessons, 6 in smoke).
- Left as the shared ``vitlab.quant`` has them: weights per output channel, the patch embedding and the head at
  8 bits, the attention matmuls and the softmax in float (the paper quantises them too).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_int, check_number, check_model as _check_model
from vitlab.kernels import fake_quant as _fq

__all__ = ["ln_linear_pairs", "linear_inputs", "smoothing_factors", "fold_smoothing", "smoothquant_bias",
           "two_region_fake_quant", "TwoRegionQuantizer", "search_ratio", "quant_error",
           "layer_sizes", "weight_size_bits", "budget_for_average", "MPResult", "greedy_mp",
           "mptq_quantize", "sensitivity_table", "logit_kl"]

SHIFTS = ("midrange", "mean")


# ------------------------------------------------------------------------------------ argument checks
def _check_images(images, fn: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{fn}: images must be a tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{fn}: images must be a non-empty batch [B, C, H, W], got shape {tuple(images.shape)}")
    return images


# ------------------------------------------------------------------------------------ SQ / SQ-b
def ln_linear_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm name, linear name) for every block: (norm1, attn.qkv) and (norm2, mlp.fc1)."""
    _check_model(model, "ln_linear_pairs")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("ln_linear_pairs: model has no .blocks (expected a timm-style VisionTransformer)")
    pairs = []
    for i, blk in enumerate(blocks):
        for norm, lin in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            pairs.append((f"blocks.{i}.{norm}", f"blocks.{i}.{lin}"))
    return pairs


@torch.no_grad()
def linear_inputs(model: nn.Module, images: torch.Tensor, names, *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The inputs of the named modules on ``images``, each flattened to [tokens, channels] (float32, on CPU
    when the model is)."""
    fn = "linear_inputs"
    _check_model(model, fn)
    _check_images(images, fn)
    batch_size = check_int(batch_size, "batch_size", fn, low=1)
    names = [names] if isinstance(names, str) else list(names)
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"{fn}: no module named {missing} in the model")
    got = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, inp, n=n: got[n].append(inp[0].detach().float().reshape(-1, inp[0].shape[-1]))) for n in names]
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        for i in range(0, images.shape[0], batch_size):
            model(images[i:i + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: torch.cat(v) for n, v in got.items()}


def smoothing_factors(x: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, *, bias: bool = True,
                      shift: str = "midrange", eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) for one linear with calibration inputs ``x`` [tokens, C] and ``weight`` [out, C].

    z_j = mid-range (or mean) of channel j when ``bias`` (SQ-b), else 0 (SQ);
    s_j = max|x_j − z_j|^α / max|W_:,j|^(1−α), clamped below at ``eps``.
    """
    fn = "smoothing_factors"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2:
            raise TypeError(f"{fn}: {name} must be a 2-D float tensor, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: x has {x.shape[1]} channels, weight expects {weight.shape[1]} inputs")
    alpha = check_number(alpha, "alpha", fn, low=0.0, high=1.0)
    if shift not in SHIFTS:
        raise ValueError(f"{fn}: shift must be one of {SHIFTS}, got {shift!r}")
    x = x.detach().double()
    if bias:
        z = (x.amax(0) + x.amin(0)) / 2 if shift == "midrange" else x.mean(0)
    else:
        z = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    a = (x - z).abs().amax(0).clamp(min=eps)
    w = weight.detach().double().abs().amax(0).clamp(min=eps)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=eps)
    return s.float(), z.float()


@torch.no_grad()
def fold_smoothing(norm: nn.LayerNorm, linear: nn.Linear, s: torch.Tensor, z: torch.Tensor | None = None) -> None:
    """Fold (x − z)/s into ``norm``'s affine and s, z into ``linear`` in place (the float function is kept):
    γ ← γ/s, β ← (β − z)/s, b ← b + W·z, W ← W·diag(s). Arithmetic in float64."""
    fn = "fold_smoothing"
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
        raise TypeError(f"{fn}: norm must be an nn.LayerNorm with weight and bias, got {type(norm).__name__}")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{fn}: linear must be an nn.Linear, got {type(linear).__name__}")
    C = linear.in_features
    if norm.weight.numel() != C:
        raise ValueError(f"{fn}: norm has {norm.weight.numel()} channels, linear has {C} inputs")
    s = torch.as_tensor(s).detach().double().reshape(-1).to(linear.weight.device)
    z = torch.zeros_like(s) if z is None else torch.as_tensor(z).detach().double().reshape(-1).to(s.device)
    if s.numel() != C or z.numel() != C:
        raise ValueError(f"{fn}: s and z must have {C} elements, got {s.numel()} and {z.numel()}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"{fn}: s must be finite and > 0")
    W = linear.weight.double()
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
    linear.bias.copy_((linear.bias.double() + W @ z).to(linear.bias.dtype))
    linear.weight.copy_((W * s).to(linear.weight.dtype))
    norm.bias.copy_(((norm.bias.double() - z) / s).to(norm.bias.dtype))
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))


def smoothquant_bias(model: nn.Module, images: torch.Tensor, *, alpha: float = 0.5, bias: bool = True,
                     shift: str = "midrange", batch_size: int = 64) -> tuple[nn.Module, dict]:
    """A deep copy of ``model`` with SQ-b (``bias=True``) or SQ (``bias=False``) folded into every
    LayerNorm → qkv / fc1 pair, from the channel statistics of ``images``. Returns (copy, factors) with
    factors[linear name] = {"s": s, "z": z}. The copy computes the same function in floating point."""
    fn = "smoothquant_bias"
    _check_model(model, fn)
    _check_images(images, fn)
    alpha = check_number(alpha, "alpha", fn, low=0.0, high=1.0)
    if not isinstance(bias, bool):
        raise TypeError(f"{fn}: bias must be a bool, got {bias!r}")
    if shift not in SHIFTS:
        raise ValueError(f"{fn}: shift must be one of {SHIFTS}, got {shift!r}")
    pairs = ln_linear_pairs(model)
    xs = linear_inputs(model, images, [lin for _, lin in pairs], batch_size=batch_size)
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    factors = {}
    for norm, lin in pairs:
        s, z = smoothing_factors(xs[lin], mods[lin].weight, alpha, bias=bias, shift=shift)
        fold_smoothing(mods[norm], mods[lin], s, z)
        factors[lin] = {"s": s, "z": z}
    return out, factors


# ------------------------------------------------------------------------------------ OPT-m
def two_region_fake_quant(x: torch.Tensor, scale, m: int, bits: int) -> torch.Tensor:
    """Two-region fake quantisation: step ``scale`` for x ≥ 0 (codes 0 .. 2^(b−1) − 1), ``scale``·2^−m for x < 0
    (codes −2^(b−1) .. 0, as PTQ4ViT's post-GELU quantiser clamps), 0 shared: 2^b values in all. Two calls of
    ``vitlab.kernels.fake_quant`` (Triton on CUDA, straight-through backward)."""
    fn = "two_region_fake_quant"
    bits = check_int(bits, "bits", fn, low=3, high=8)
    m = check_int(m, "m", fn, low=0, high=24)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a float tensor, got {type(x).__name__}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    if not scale > 0:
        raise ValueError(f"{fn}: scale must be > 0, got {float(scale)!r}")
    half = 2 ** (bits - 1)
    pos = _fq.fake_quant(x.clamp(min=0), scale, 0, bits - 1)  # codes 0 .. half − 1
    # b-bit codes with zero point half: x ≤ 0 lands on codes 0 .. half, i.e. −half .. 0 steps (PTQ4ViT's clamp)
    neg = _fq.fake_quant(x.clamp(max=0), scale * 2.0 ** -m, half, bits)
    return pos + neg


class TwoRegionQuantizer(nn.Module):
    """The OPT-m quantiser of post-GELU activations: ``two_region_fake_quant(x, scale, m, bits)`` with
    calibrated buffers ``scale`` and ``m``. ``calibrate(x, weight=)`` runs ``search_ratio``; ``ms`` fixes the
    candidate ratios (a single value = a hand-set ratio).

    It stands in for a QuantLinear's ``a_quant`` (same ``bits`` / ``enabled`` attributes) but is not a
    ``vitlab.quant.FakeQuantizer``: ``set_quant_state`` and ``calibrate_model`` leave it alone (toggle
    ``enabled`` and call ``calibrate`` directly)."""

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = check_int(bits, "bits", "TwoRegionQuantizer", low=3, high=8)
        self.enabled = True
        self.observing = False
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("m", torch.empty(0, dtype=torch.int32))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, weight: torch.Tensor | None = None, ms=range(0, 9), grid=None):
        res = search_ratio(x, self.bits, weight=weight, ms=ms, grid=grid)
        self.scale = torch.tensor(res["scale"], device=self.scale.device)
        self.m = torch.tensor(res["m"], dtype=torch.int32, device=self.m.device)
        self.search = res
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError("TwoRegionQuantizer is enabled but not calibrated: call calibrate(x) first")
        return two_region_fake_quant(x, self.scale, int(self.m), self.bits)

    def extra_repr(self) -> str:
        if not self.calibrated:
            return f"bits={self.bits}, uncalibrated"
        return f"bits={self.bits}, scale={float(self.scale):.4g}, m={int(self.m)} (negative step scale/2^m)"


def _channel_weights(weight, C, fn):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != C:
        raise ValueError(f"{fn}: weight must be the next layer's [out, {C}] matrix, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    g = weight.detach().float().pow(2).sum(0)
    return g / g.mean()


@torch.no_grad()
def search_ratio(x: torch.Tensor, bits: int, *, weight: torch.Tensor | None = None, ms=range(0, 9),
                 grid=None, max_values: int = 2 ** 15) -> dict:
    """OPT-m: the step Δ and ratio exponent m of the two-region quantiser with the least calibration error.

    x: post-GELU samples [..., C]; weight: the next linear's [out, C] (the squared error of channel j is
    weighted by ‖W_:,j‖², normalised to mean 1: the diagonal of WᵀW, a proxy for the output error), else plain
    MSE. For every m in ``ms``, Δ = r·max(x)/(2^(b−1) − 1) for r in ``grid`` (default 1.00, 0.98, .., 0.20).
    At most ``max_values`` values (a fixed random subset of rows) enter the search.
    Returns {"scale", "m", "err", "err_by_m": {m: least error at that m}}.
    """
    fn = "search_ratio"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError(f"{fn}: x must be a non-empty float tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    bits = check_int(bits, "bits", fn, low=3, high=8)
    ms = [ms] if isinstance(ms, numbers.Integral) else list(ms)
    if not ms:
        raise ValueError(f"{fn}: ms must hold at least one ratio exponent")
    for m in ms:
        check_int(m, "each of ms", fn, low=0, high=24)
    grid = torch.linspace(1.0, 0.2, 41) if grid is None else torch.as_tensor(grid, dtype=torch.float32).flatten()
    if grid.numel() == 0 or not bool(((grid > 0) & (grid <= 1)).all()):
        raise ValueError(f"{fn}: grid must be fractions in (0, 1], got {grid.tolist()}")
    max_values = check_int(max_values, "max_values", fn, low=1)
    x = x.detach().float().reshape(-1, x.shape[-1])
    g = _channel_weights(weight, x.shape[1], fn)
    rows = max(1, max_values // x.shape[1])
    if x.shape[0] > rows:  # a fixed subset: the same data give the same answer
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:rows].to(x.device)]
    half = 2 ** (bits - 1)
    d = (float(x.max().clamp(min=1e-8)) / (half - 1) * grid.to(x.device)).reshape(-1, 1, 1)  # [G, 1, 1]
    best = {"scale": None, "m": None, "err": math.inf, "err_by_m": {}}
    for m in ms:
        e = (_two_region_ref(x, d, int(m), half) - x).pow(2)  # [G, rows, C]
        err = (e * g).mean((1, 2)) if g is not None else e.mean((1, 2))
        i = int(err.argmin())
        best["err_by_m"][int(m)] = float(err[i])
        if float(err[i]) < best["err"]:
            best.update(scale=float(d[i]), m=int(m), err=float(err[i]))
    return best


def _two_region_ref(x, d, m, half):
    # the search's inner loop: the grid of two_region_fake_quant in plain torch (d may be a column of steps);
    # half = 2^(b-1): positive codes 0 .. half - 1, negative codes -half .. 0 (PTQ4ViT's clamps)
    dn = d * 2.0 ** -m
    return torch.where(x >= 0, torch.round(x / d).clamp(0, half - 1) * d, torch.round(x / dn).clamp(-half, 0) * dn)


def quant_error(x: torch.Tensor, x_hat: torch.Tensor, lo, hi) -> dict:
    """Split the squared error of a quantised tensor into the part from values clamped outside [lo, hi]
    and the rounding part inside. Returns {"mse", "clamp", "round", "clamped_frac"} (means over all values)."""
    if not isinstance(x, torch.Tensor) or not isinstance(x_hat, torch.Tensor) or x.shape != x_hat.shape:
        raise ValueError("quant_error: x and x_hat must be tensors of the same shape")
    e = (x_hat - x).pow(2)
    out = (x < lo) | (x > hi)
    n = e.numel()
    return {"mse": float(e.mean()), "clamp": float(e[out].sum() / n), "round": float(e[~out].sum() / n),
            "clamped_frac": float(out.float().mean())}


# ------------------------------------------------------------------------------------ Greedy MP
def layer_sizes(model: nn.Module, names=None) -> dict[str, int]:
    """Weights per quantised linear: every ``nn.Linear`` (or QuantLinear) inside ``model.blocks`` by default."""
    _check_model(model, "layer_sizes")
    mods = dict(model.named_modules())
    if names is None:
        names = [n for n, m in mods.items() if n.startswith("blocks.") and hasattr(m, "weight")
                 and isinstance(getattr(m, "weight"), torch.Tensor) and getattr(m, "weight").ndim == 2]
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in mods or not isinstance(getattr(mods[n], "weight", None), torch.Tensor)]
    if bad:
        raise ValueError(f"layer_sizes: {bad} are not layers with a weight in the model")
    return {n: int(mods[n].weight.numel()) for n in names}


def weight_size_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> int:
    """Σ_l n_l · b_l: the weight bits of the layers in ``sizes``."""
    missing = [n for n in sizes if n not in bits]
    if missing:
        raise ValueError(f"weight_size_bits: bits has no entry for {missing}")
    return int(sum(int(n) * int(bits[k]) for k, n in sizes.items()))


def budget_for_average(sizes: Mapping[str, int], avg_bits: float) -> int:
    """The weight-bit budget of an average of ``avg_bits`` bits per weight, rounded down to an int."""
    avg_bits = check_number(avg_bits, "avg_bits", "budget_for_average", low=1.0, high=32.0)
    return int(math.floor(avg_bits * sum(sizes.values()) + 1e-9))


@dataclass
class MPResult:
    """What ``greedy_mp`` chose: bits per layer, the size they give, the budget, the steps taken."""
    bits: dict  # layer -> bit-width
    size_bits: int  # Σ n_l b_l
    budget_bits: int
    n_weights: int  # Σ n_l
    steps: list = field(default_factory=list)  # (layer, new bits, size after), in the order taken

    @property
    def average_bits(self) -> float:
        return self.size_bits / self.n_weights


def _table_delta(table, name, b_from, b_to, fn):
    row = table.get(name)
    if row is None or b_from not in row or b_to not in row:
        raise ValueError(f"{fn}: cost table lacks {name!r} at {b_from} or {b_to} bits")
    return float(row[b_to]) - float(row[b_from])


def greedy_mp(sizes: Mapping[str, int], cost, budget_bits: int, *, max_bits: int = 8, min_bits: int = 3,
              fill: bool = True) -> MPResult:
    """Greedy mixed precision: lower the cheapest layer (cost increase per weight bit saved) one bit at a time
    from ``max_bits`` until Σ n_l·b_l ≤ ``budget_bits``; then (``fill``) raise the layers with the best gain per
    bit that still fit, so no slack a single-bit raise could use is left.

    cost: a table {layer: {bits: error}} (additive single-layer sensitivities) or a callable
    ``cost(bits_dict) -> float`` that scores a whole configuration (re-evaluated for every candidate).
    Ties go to the larger layer, then to the name. Raises ValueError if the budget is below ``min_bits``
    everywhere."""
    fn = "greedy_mp"
    if not isinstance(sizes, Mapping) or not sizes:
        raise TypeError(f"{fn}: sizes must be a non-empty mapping layer -> number of weights, got {sizes!r}")
    for k, n in sizes.items():
        check_int(n, f"sizes[{k!r}]", fn, low=1)
    max_bits = check_int(max_bits, "max_bits", fn, low=2, high=8)
    min_bits = check_int(min_bits, "min_bits", fn, low=2, high=max_bits)
    budget_bits = check_int(budget_bits, "budget_bits", fn, low=0)
    floor = min_bits * sum(sizes.values())
    if budget_bits < floor:
        raise ValueError(f"{fn}: budget_bits={budget_bits} is below the size at min_bits={min_bits} "
                         f"everywhere ({floor} bits); raise the budget or lower min_bits")
    if isinstance(cost, Mapping):
        def delta(bits, name, new):  # cost change of moving `name` to `new` bits
            return _table_delta(cost, name, bits[name], new, fn)
    elif callable(cost):
        cache = {}

        def score(bits):
            key = tuple(sorted(bits.items()))
            if key not in cache:
                cache[key] = float(cost(dict(bits)))
            return cache[key]

        def delta(bits, name, new):
            return score({**bits, name: new}) - score(bits)
    else:
        raise TypeError(f"{fn}: cost must be a table {{layer: {{bits: error}}}} or a callable, "
                        f"got {type(cost).__name__}")
    bits = {k: max_bits for k in sizes}
    size = weight_size_bits(sizes, bits)
    steps = []
    order = {k: i for i, k in enumerate(sizes)}
    while size > budget_bits:
        cands = [k for k in sizes if bits[k] > min_bits]
        best = min(cands, key=lambda k: (delta(bits, k, bits[k] - 1) / sizes[k], -sizes[k], order[k]))
        bits[best] -= 1
        size -= sizes[best]
        steps.append((best, bits[best], size))
    while fill:
        slack = budget_bits - size
        cands = [k for k in sizes if bits[k] < max_bits and sizes[k] <= slack]
        if not cands:
            break
        best = min(cands, key=lambda k: (delta(bits, k, bits[k] + 1) / sizes[k], -sizes[k], order[k]))
        bits[best] += 1
        size += sizes[best]
        steps.append((best, bits[best], size))
    return MPResult(bits=bits, size_bits=size, budget_bits=budget_bits, n_weights=sum(sizes.values()), steps=steps)


# ------------------------------------------------------------------------------------ the whole pipeline
SMOOTH = (None, "sq", "sqb")


def _fc2_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.startswith("blocks.") and n.endswith("mlp.fc2")]


def _bits_pairs(layer_bits, fn):
    if layer_bits is None:
        return None
    if not isinstance(layer_bits, Mapping):
        raise TypeError(f"{fn}: layer_bits must be a dict layer -> bits (or (w_bits, a_bits)), "
                        f"got {type(layer_bits).__name__}")
    out = {}
    for k, v in layer_bits.items():
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            out[k] = (int(v), int(v))
        elif isinstance(v, (tuple, list)) and len(v) == 2:
            out[k] = (v[0], v[1])
        else:
            raise TypeError(f"{fn}: layer_bits[{k!r}] must be an int or a pair (w_bits, a_bits), got {v!r}")
    return out


def mptq_quantize(model: nn.Module, images: torch.Tensor, w_bits: int = 4, a_bits: int = 4, *,
                  smooth: str | None = "sqb", alpha: float = 0.5, shift: str = "midrange", opt_m: bool = True,
                  layer_bits: Mapping | None = None, method: str = "minmax", ms=range(0, 9),
                  keep_observations: bool = False, **quant_kw) -> nn.Module:
    """MPTQ-ViT post-training quantisation of a float ViT, calibrated on ``images``.

    smooth: None (plain), "sq" (SmoothQuant) or "sqb" (SQ-b) folded before quantising; opt_m: replace the
    input quantiser of every fc2 by a ``TwoRegionQuantizer`` with the searched ratio; layer_bits: {layer:
    bits or (w_bits, a_bits)} (e.g. ``greedy_mp(...).bits``); method: calibration of the uniform quantisers
    ("minmax" | "percentile" | "mse"); quant_kw go to ``vitlab.quant.quantize_model``. The returned model
    carries ``mptq_info`` (smoothing factors, fc2 inputs used by OPT-m)."""
    from vitlab.quant import calibrate_model, quant_layers, quantize_model

    fn = "mptq_quantize"
    _check_model(model, fn)
    _check_images(images, fn)
    if smooth not in SMOOTH:
        raise ValueError(f"{fn}: smooth must be one of {SMOOTH}, got {smooth!r}")
    if not isinstance(opt_m, bool):
        raise TypeError(f"{fn}: opt_m must be a bool, got {opt_m!r}")
    pairs = _bits_pairs(layer_bits, fn)
    factors = {}
    fp = model
    if smooth is not None:
        fp, factors = smoothquant_bias(model, images, alpha=alpha, bias=smooth == "sqb", shift=shift)
    q = quantize_model(fp, w_bits, a_bits, layer_bits=pairs, **quant_kw)
    calibrate_model(q, images, method=method, keep_observations=keep_observations)
    fc2_inputs = {}
    if opt_m:
        layers = quant_layers(q)
        names = [n for n in _fc2_names(fp) if n in layers]
        fc2_inputs = linear_inputs(fp, images, names)
        for n in names:
            layer = layers[n]
            if layer.a_bits < 3:
                raise ValueError(f"{fn}: OPT-m needs at least 3 activation bits, {n} has {layer.a_bits}")
            tq = TwoRegionQuantizer(layer.a_bits).to(layer.weight.device)
            layer.a_quant = tq.calibrate(fc2_inputs[n].to(layer.weight.device), weight=layer.weight, ms=ms)
    q.mptq_info = {"factors": factors, "fc2_inputs": fc2_inputs, "smooth": smooth, "opt_m": opt_m}
    return q


@torch.no_grad()
def logit_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(ref) ‖ softmax(logits)), averaged over the batch: how far the quantised model's
    predictions moved from the float model's."""
    if not isinstance(ref_logits, torch.Tensor) or not isinstance(logits, torch.Tensor) or \
            ref_logits.shape != logits.shape:
        raise ValueError("logit_kl: ref_logits and logits must be tensors of the same shape")
    return float(F.kl_div(logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1), log_target=True,
                          reduction="batchmean"))


@torch.no_grad()
def sensitivity_table(model: nn.Module, images: torch.Tensor, bits=range(3, 9), *, layers=None,
                      smooth: str | None = "sqb", alpha: float = 0.5, opt_m: bool = True, method: str = "minmax",
                      ms=range(0, 9), batch_size: int = 64) -> dict[str, dict[int, float]]:
    """E_l(b) for Greedy MP: the logit KL from the float model on ``images`` when only layer l is quantised,
    weight and input at b bits (the rest float), after the same SQ/SQ-b and OPT-m as ``mptq_quantize``.
    layers: default every linear in ``model.blocks``. Costs len(layers)·len(bits) forward passes."""
    from vitlab.quant import quant_layers, set_quant_state

    fn = "sensitivity_table"
    _check_model(model, fn)
    _check_images(images, fn)
    bits = sorted({check_int(b, "each of bits", fn, low=3 if opt_m else 2, high=8) for b in bits})
    if not bits:
        raise ValueError(f"{fn}: bits must hold at least one bit-width")
    q = mptq_quantize(model, images, bits[-1], bits[-1], smooth=smooth, alpha=alpha, opt_m=opt_m, method=method,
                      ms=ms, keep_observations=True)
    qlayers = quant_layers(q)
    layers = list(layer_sizes(model)) if layers is None else list(layers)
    unknown = [n for n in layers if n not in qlayers]
    if unknown:
        raise ValueError(f"{fn}: layers {unknown} are not quantised linears; valid: {list(qlayers)}")
    dev = next(q.parameters()).device
    images = images.to(dev)
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    ref = torch.cat([model(c) for c in chunks])
    set_quant_state(q, weights=False, acts=False)
    for layer in qlayers.values():
        if isinstance(layer.a_quant, TwoRegionQuantizer):
            layer.a_quant.enabled = False
    # a layer in block i changes nothing before block i: cache every block's (float) input once and run from there
    skip = all(hasattr(q, a) for a in ("embed", "blocks", "norm", "forward_head"))
    if skip:
        cache = []
        for c in chunks:
            h, hs = q.embed(c), []
            for blk in q.blocks:
                hs.append(h)
                h = blk(h)
            cache.append(hs)

    def run(name):
        parts = name.split(".")
        if not (skip and parts[0] == "blocks" and parts[1].isdigit()):
            return torch.cat([q(c) for c in chunks])
        i, outs = int(parts[1]), []
        for hs in cache:
            h = hs[i]
            for blk in q.blocks[i:]:
                h = blk(h)
            outs.append(q.forward_head(q.norm(h)))
        return torch.cat(outs)

    fc2_inputs = q.mptq_info["fc2_inputs"]
    table = {}
    for name in layers:
        layer = qlayers[name]
        layer.w_quant.enabled = layer.a_quant.enabled = True
        table[name] = {}
        for b in bits:
            layer.w_quant.bits = b
            layer.calibrate_weight(method)
            if isinstance(layer.a_quant, TwoRegionQuantizer):
                layer.a_quant = TwoRegionQuantizer(b).to(dev).calibrate(fc2_inputs[name].to(dev), weight=layer.weight,
                                                                        ms=ms)
            else:
                layer.a_quant.bits = b
                layer.a_quant.calibrate(method)
            table[name][b] = logit_kl(ref, run(name))
        layer.w_quant.enabled = layer.a_quant.enabled = False
    return table
