"""A quantised copy of a ViT: every linear (and the patch-embedding conv) sees fake-quantised weights and
inputs, and attention can quantise its softmax probabilities.

    qmodel = quantize_model(model, w_bits=4, a_bits=4, softmax_mode="log2", act_per_channel=("qkv", "fc1"))
    calibrate_model(qmodel, calib_images, method="mse")       # 32-64 images are enough
    acc = vitlab.measure.accuracy(qmodel, test)

Per quantised layer (QuantLinear, QuantConv2d), with Q_w per output channel and Q_a per tensor by default:

    y = Q_a(x) @ Q_w(W)^T + b          (the bias stays in float, as in RepQ-ViT and I&S-ViT)

QuantAttention computes P = softmax(q k^T / sqrt(d)) explicitly and uses Q_P(P) @ v, with Q_P uniform,
log2 or shift_log2 (``softmax_quant``). Post-LayerNorm inputs (of ``qkv`` and ``fc1``) have a few outlier
channels, which is why ``act_per_channel`` exists.

Names and keys: quantize_model deep-copies the model and swaps modules in place, so parameter names
(``blocks.0.attn.qkv.weight``) stay those of the float model; quantiser buffers add keys under
``<layer>.w_quant`` / ``a_quant`` / ``softmax_quant``. A float state dict loads into the quantised model
(quantisers keep their calibration) and ``float_state_dict(qmodel)`` loads back into the float one.
With every quantiser disabled the quantised model computes exactly what the float model computes.
"""
from __future__ import annotations

import copy
import fnmatch
import numbers
from collections import OrderedDict
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.models.vit import Attention, Block, _check_side
from .quantizer import METHODS, MODES, FakeQuantizer

__all__ = ["QuantLinear", "QuantConv2d", "QuantAttention", "quantize_model", "calibrate_model", "quant_layers",
           "quantizers", "set_quant_state", "float_state_dict"]


class _QuantLayer:
    """What QuantLinear and QuantConv2d share: a weight quantiser and an input quantiser."""

    def _add_quantizers(self, w_bits: int, a_bits: int, w_axis, a_axis) -> None:
        for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):  # name the layer's argument, not the quantiser's
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{type(self).__name__}: {name} must be an int in [2, 8], got {bits!r}")
        self.w_quant = FakeQuantizer(w_bits, axis=w_axis)  # per output channel: rows differ in range
        self.a_quant = FakeQuantizer(a_bits, axis=a_axis)

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits

    @property
    def a_bits(self) -> int:
        return self.a_quant.bits

    def set_bits(self, w_bits: int | None = None, a_bits: int | None = None) -> None:
        """Change bit-widths (None: keep). Changed quantisers need calibrating again."""
        if w_bits is not None:
            self.w_quant.bits = w_bits
        if a_bits is not None:
            self.a_quant.bits = a_bits

    def calibrate_weight(self, method: str = "minmax", **kw) -> None:
        """Fit the weight quantiser to the weight itself (weights need no calibration data)."""
        self.w_quant.calibrate(method, x=self.weight, **kw)


class QuantLinear(nn.Linear, _QuantLayer):
    """nn.Linear with fake-quantised weight (``w_quant``, default per output channel) and input (``a_quant``,
    default per tensor; ``a_axis=-1``: per input channel). Still an nn.Linear: same parameters and keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 8,
                 a_bits: int = 8, w_axis: int | None = 0, a_axis: int | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._add_quantizers(w_bits, a_bits, w_axis, a_axis)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s weight and bias tensors."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kw)
        q.weight, q.bias = linear.weight, linear.bias
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d, _QuantLayer):
    """nn.Conv2d with fake-quantised weight (per output channel) and input (per tensor): the patch embedding."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, w_bits: int = 8, a_bits: int = 8, w_axis: int | None = 0
                  ) -> "QuantConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._add_quantizers(w_bits, a_bits, w_axis, None)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.a_quant(x), self.w_quant(self.weight), self.bias)


class QuantAttention(Attention):
    """vitlab's Attention with QuantLinear ``qkv`` / ``proj`` and a post-softmax quantiser ``softmax_quant``.

    While ``softmax_quant`` is disabled (or absent) it runs Attention's own forward (SDPA), so it equals
    the float module exactly; enabled, it materialises P = softmax(q k^T * scale) and uses Q_P(P) @ v.
    The side outputs (``side=("probs",)`` etc.) are then those of the quantised P.
    """

    @classmethod
    def from_attention(cls, attn: Attention, *, softmax_mode: str | None = None, softmax_bits: int = 8
                       ) -> "QuantAttention":
        if not isinstance(attn, Attention):
            raise TypeError(f"QuantAttention.from_attention: attn must be a vitlab Attention, got "
                            f"{type(attn).__name__}")
        qkv = attn.qkv
        q = cls(qkv.in_features, attn.num_heads, qkv_bias=qkv.bias is not None)
        for name in ("q_norm", "k_norm", "attn_drop", "norm", "proj_drop"):  # the very same submodules
            setattr(q, name, getattr(attn, name))
        q.qkv, q.proj = QuantLinear.from_linear(attn.qkv), QuantLinear.from_linear(attn.proj)
        q.scale, q.use_kernels, q.training = attn.scale, attn.use_kernels, attn.training
        q.softmax_quant = None if softmax_mode is None else FakeQuantizer(softmax_bits, mode=softmax_mode)
        return q

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, side=()):
        sq = self.softmax_quant
        if sq is None or not (sq.enabled or sq.observing):
            return super().forward(x, attn_bias=attn_bias, side=side)
        side = _check_side(side) if side else ()
        q, k, v = self.qkv_heads(x)
        probs = sq(self.logits(q, k, attn_bias).float().softmax(dim=-1)).to(q.dtype)  # fp32: log grids need the range
        x = self.merge_heads(self.attn_drop(probs) @ v)
        if not side:
            return x
        sides = {"probs": probs, "cls": probs[:, :, 0], "colsum": probs.sum(dim=-2),
                 "diag": probs.diagonal(dim1=-2, dim2=-1)}
        return x, {s: sides[s] for s in side}


# ---------------------------------------------------------------------------------------- building
def _check_bits(v, name: str, fn: str = "quantize_model") -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 2 <= v <= 8:
        raise ValueError(f"{fn}: {name} must be an int in [2, 8], got {v!r}")
    return int(v)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A layer matches a pattern equal to its full name, its last part ("qkv"), or an fnmatch glob."""
    return any(p == name or p == name.rsplit(".", 1)[-1] or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, w_bits: int = 8, a_bits: int = 8, *, layer_bits: dict | None = None,
                   softmax_mode: str | None = None, softmax_bits: int | None = None,
                   act_per_channel: Iterable[str] = (), w_per_channel: bool = True, patch_embed: bool = True,
                   head: bool = True, edge_bits: tuple[int, int] | None = (8, 8)) -> nn.Module:
    """A fake-quantised deep copy of ``model`` (the float model is untouched), uncalibrated.

    Every nn.Linear becomes a QuantLinear at (w_bits, a_bits); ``layer_bits`` {name: (w_bits, a_bits)}
    overrides single layers (names as in ``quant_layers``). ``softmax_mode`` (None: no post-softmax
    quantiser) adds one to every Attention at ``softmax_bits`` (default a_bits). ``act_per_channel``:
    layer names or patterns (e.g. ("qkv", "fc1")) whose input is quantised per channel (last axis).
    ``w_per_channel`` False: one weight scale per layer (the naive per-tensor baseline).
    ``patch_embed`` / ``head``: quantise the patch-embedding conv / the classifier too, at ``edge_bits``
    (papers keep the first and last layers at 8 bits; None: the global bits).
    """
    fn = "quantize_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    w_bits, a_bits = _check_bits(w_bits, "w_bits"), _check_bits(a_bits, "a_bits")
    if softmax_mode is not None and softmax_mode not in MODES:
        raise ValueError(f"{fn}: softmax_mode must be None or one of {MODES}, got {softmax_mode!r}")
    softmax_bits = a_bits if softmax_bits is None else _check_bits(softmax_bits, "softmax_bits")
    if isinstance(act_per_channel, str) or not all(isinstance(p, str) for p in act_per_channel):
        raise TypeError(f"{fn}: act_per_channel must be a tuple of layer names or patterns, got {act_per_channel!r}")
    act_per_channel = tuple(act_per_channel)
    for flag, val in (("w_per_channel", w_per_channel), ("patch_embed", patch_embed), ("head", head)):
        if not isinstance(val, bool):
            raise TypeError(f"{fn}: {flag} must be a bool, got {val!r}")
    if edge_bits is not None:
        if not isinstance(edge_bits, (tuple, list)) or len(edge_bits) != 2:
            raise TypeError(f"{fn}: edge_bits must be None or a pair (w_bits, a_bits), got {edge_bits!r}")
        edge_bits = (_check_bits(edge_bits[0], "edge_bits[0]"), _check_bits(edge_bits[1], "edge_bits[1]"))
    if layer_bits is not None and not isinstance(layer_bits, dict):
        raise TypeError(f"{fn}: layer_bits must be a dict name -> (w_bits, a_bits), got {type(layer_bits).__name__}")
    layer_bits = dict(layer_bits or {})  # a copy: validated pairs are written back below

    qmodel = copy.deepcopy(model)
    targets = OrderedDict()  # name -> module to replace, in module order
    for name, m in qmodel.named_modules():
        is_edge = name == "head" or name.startswith("patch_embed")
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and (head or name != "head"):
            targets[name] = m
        elif isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d) and patch_embed and is_edge:
            targets[name] = m
    unknown = sorted(set(layer_bits) - set(targets))
    if unknown:
        raise ValueError(f"{fn}: layer_bits names {unknown} are not quantised layers; valid: {list(targets)}")
    unused = [p for p in act_per_channel if not any(_matches(n, [p]) for n in targets)]
    if unused:
        raise ValueError(f"{fn}: act_per_channel patterns {unused} match no layer; layers: {list(targets)}")

    for name, pair in layer_bits.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{fn}: layer_bits[{name!r}] must be a pair (w_bits, a_bits), got {pair!r}")
        layer_bits[name] = (_check_bits(pair[0], f"layer_bits[{name!r}][0]"),
                            _check_bits(pair[1], f"layer_bits[{name!r}][1]"))

    def bits_of(name):
        if name in layer_bits:
            return layer_bits[name]
        if edge_bits is not None and (name == "head" or name.startswith("patch_embed")):
            return edge_bits
        return w_bits, a_bits

    # attention first (it swaps its own qkv / proj), then the remaining layers
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, Attention) and not isinstance(m, QuantAttention):
            _set(qmodel, name, QuantAttention.from_attention(m, softmax_mode=softmax_mode, softmax_bits=softmax_bits))
    for name, m in targets.items():
        wb, ab = bits_of(name)
        if isinstance(m, nn.Conv2d):
            new = QuantConv2d.from_conv(m, w_bits=wb, a_bits=ab, w_axis=0 if w_per_channel else None)
        else:
            cur = qmodel.get_submodule(name)  # qkv / proj were already swapped inside QuantAttention
            new = QuantLinear.from_linear(cur, w_bits=wb, a_bits=ab, w_axis=0 if w_per_channel else None,
                                          a_axis=-1 if _matches(name, act_per_channel) else None)
        _set(qmodel, name, new)
    for m in qmodel.modules():
        if isinstance(m, Block):
            m.use_kernels = False  # Block's fused fc1+GELU kernel reads fc1.weight directly: it would skip Q
    return qmodel


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


# ---------------------------------------------------------------------------------------- queries
def _check_qmodel(qmodel, fn: str) -> nn.Module:
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"{fn}: qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if not any(isinstance(m, FakeQuantizer) for m in qmodel.modules()):
        raise ValueError(f"{fn}: qmodel has no FakeQuantizer; build it with quantize_model(model)")
    return qmodel


def quant_layers(qmodel: nn.Module) -> "OrderedDict[str, nn.Module]":
    """name -> QuantLinear / QuantConv2d, in module order (patch embed, block 0 qkv, proj, fc1, fc2, ..., head)."""
    _check_qmodel(qmodel, "quant_layers")
    return OrderedDict((n, m) for n, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantConv2d)))


def quantizers(qmodel: nn.Module, kind: str = "all") -> "OrderedDict[str, FakeQuantizer]":
    """name -> FakeQuantizer; kind "all" | "weights" (w_quant) | "acts" (every other one: inputs, softmax)."""
    _check_qmodel(qmodel, "quantizers")
    if kind not in ("all", "weights", "acts"):
        raise ValueError(f"quantizers: kind must be 'all', 'weights' or 'acts', got {kind!r}")
    out = OrderedDict()
    for n, m in qmodel.named_modules():
        if isinstance(m, FakeQuantizer):
            is_w = n.endswith("w_quant")
            if kind == "all" or (kind == "weights") == is_w:
                out[n] = m
    return out


def set_quant_state(qmodel: nn.Module, weights: bool | None = None, acts: bool | None = None) -> nn.Module:
    """Enable / disable the weight and the activation quantisers (None: leave as they are).
    Staged methods quantise activations first and weights later (I&S-ViT's SOS)."""
    for flag, val in (("weights", weights), ("acts", acts)):
        if val is not None and not isinstance(val, bool):
            raise TypeError(f"set_quant_state: {flag} must be True, False or None, got {val!r}")
    for kind, val in (("weights", weights), ("acts", acts)):
        if val is not None:
            for q in quantizers(qmodel, kind).values():
                q.enabled = val
    return qmodel


def float_state_dict(qmodel: nn.Module) -> dict:
    """The state dict without quantiser buffers: loads (strictly) into the float model."""
    skip = tuple(n + "." for n in quantizers(qmodel))
    return {k: v for k, v in qmodel.state_dict().items() if not k.startswith(skip)}


# ---------------------------------------------------------------------------------------- calibration
def _images(images, fn: str) -> torch.Tensor:
    if hasattr(images, "images"):
        images = images.images
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] == 0:
        raise TypeError(f"{fn}: images must be a non-empty tensor [N, ...] or a dataset with .images, got "
                        f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    return images


@torch.no_grad()
def calibrate_model(qmodel: nn.Module, images, method: str = "minmax", *, weight_method: str | None = None,
                    batch_size: int = 64, keep_observations: bool = False, **kw) -> nn.Module:
    """Calibrate every quantiser of ``qmodel``: weights from themselves, activations from ``images``.

    method: "minmax" | "percentile" | "mse" for the uniform activation quantisers (``kw`` go to them,
    e.g. q=0.999); weight_method (default: ``method``) for the weights. Log-domain quantisers use their own
    calibration (log2: max; shift_log2: MSE search of eta and step). The images run through once in eval
    mode with every quantiser observing (so each sees float inputs); quantisers come back enabled.
    """
    fn = "calibrate_model"
    _check_qmodel(qmodel, fn)
    images = _images(images, fn)
    if method not in METHODS["uniform"]:
        raise ValueError(f"{fn}: method must be one of {METHODS['uniform']}, got {method!r}")
    weight_method = method if weight_method is None else weight_method
    if weight_method not in METHODS["uniform"]:
        raise ValueError(f"{fn}: weight_method must be one of {METHODS['uniform']}, got {weight_method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    for layer in quant_layers(qmodel).values():
        layer.calibrate_weight(weight_method)
    acts = quantizers(qmodel, "acts")
    was_training = qmodel.training
    qmodel.eval()
    try:
        for q in acts.values():
            q.reset_observations()
            q.observing = True
        dev = next(qmodel.parameters()).device
        for i in range(0, images.shape[0], batch_size):
            qmodel(images[i:i + batch_size].to(dev))
    finally:
        for q in acts.values():
            q.observing = False
        qmodel.train(was_training)
    for q in acts.values():
        q.calibrate(method if q.mode == "uniform" else None, **(kw if q.mode == "uniform" else {}))
        if not keep_observations:
            q.reset_observations()
    set_quant_state(qmodel, weights=True, acts=True)
    return qmodel
