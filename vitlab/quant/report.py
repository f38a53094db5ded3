"""What a quantised model costs: model size in bits, average weight bits and bit operations (BOPs).

    size  = sum over quantised weights of numel * w_bits  +  32 * every other parameter
    avg   = sum(numel_l * w_bits_l) / sum(numel_l)        over the quantised layers' weights
    BOPs  = sum over layers of MACs_l * w_bits_l * a_bits_l    (per image)

A quantiser that is disabled counts as 32 bits (float). MACs of a linear = tokens * in * out; of the
patch-embedding conv = output positions * out_channels * in_channels * k^2 (measured with forward hooks on
``images``, so the token count is the real one); the two attention matmuls (q k^T, P v) are listed with
their MACs at 32 x 32 bits, or at softmax bits x 32 for P v when the softmax is quantised (v stays float
here). Scales and zero points are not counted (a few floats per channel).

    rows = quant_report(qmodel, images[:8])   # one dict per layer; pandas.DataFrame(rows) for a table
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import QuantAttention, QuantConv2d, QuantLinear, _check_qmodel, _images, quant_layers

__all__ = ["model_size_bits", "average_weight_bits", "bops", "quant_report"]


def _w_bits(layer) -> int:
    return layer.w_quant.bits if layer.w_quant.enabled else 32


def _a_bits(layer) -> int:
    return layer.a_quant.bits if layer.a_quant.enabled else 32


def model_size_bits(qmodel: nn.Module) -> int:
    """Bits to store the model: quantised weights at their bits, every other parameter at 32."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"model_size_bits: qmodel must be an nn.Module, got {type(qmodel).__name__}")
    qweights = {id(m.weight): _w_bits(m) for m in qmodel.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    return sum(p.numel() * qweights.get(id(p), 32) for p in qmodel.parameters())


def average_weight_bits(qmodel: nn.Module) -> float:
    """Parameter-weighted mean bit-width of the quantised layers' weights (what bit budgets constrain)."""
    layers = quant_layers(qmodel).values()
    total = sum(m.weight.numel() for m in layers)
    return sum(m.weight.numel() * _w_bits(m) for m in layers) / total


@torch.no_grad()
def _macs(qmodel: nn.Module, images: torch.Tensor) -> dict:
    """MACs per image of every quantised layer and attention matmul, from one forward with hooks."""
    out, hooks = {}, []

    def on_layer(name):
        def hook(m, inp, y):
            if isinstance(m, nn.Conv2d):
                k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                out[name] = y.numel() * k
            else:
                out[name] = y.numel() * m.in_features
        return hook

    def on_attn(name):
        def hook(m, inp, y):
            B, N, C = inp[0].shape
            out[name + ".qk"] = out[name + ".pv"] = B * N * N * C  # every head: N x N x head_dim
        return hook

    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            hooks.append(m.register_forward_hook(on_layer(name)))
        elif isinstance(m, QuantAttention):
            hooks.append(m.register_forward_hook(on_attn(name)))
    was_training = qmodel.training
    qmodel.eval()
    try:
        qmodel(images.to(next(qmodel.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    return {k: v // images.shape[0] for k, v in out.items()}


def quant_report(qmodel: nn.Module, images) -> list[dict]:
    """One row per quantised layer and attention matmul, in forward order:
    {name, kind, params, w_bits, a_bits, macs, bops} (per image)."""
    _check_qmodel(qmodel, "quant_report")
    images = _images(images, "quant_report")
    macs = _macs(qmodel, images)
    modules = dict(qmodel.named_modules())
    rows = []
    for name, n_macs in macs.items():
        if name.endswith((".qk", ".pv")):
            attn = modules[name.rsplit(".", 1)[0]]
            sq = attn.softmax_quant
            a = sq.bits if name.endswith(".pv") and sq is not None and sq.enabled else 32
            rows.append({"name": name, "kind": "matmul", "params": 0, "w_bits": 32, "a_bits": a,
                         "macs": n_macs, "bops": n_macs * 32 * a})
        else:
            m = modules[name]
            w, a = _w_bits(m), _a_bits(m)
            rows.append({"name": name, "kind": "conv" if isinstance(m, nn.Conv2d) else "linear",
                         "params": sum(p.numel() for p in m.parameters(recurse=False)), "w_bits": w,
                         "a_bits": a, "macs": n_macs, "bops": n_macs * w * a})
    return rows


def bops(qmodel: nn.Module, images, *, matmuls: bool = True) -> int:
    """Bit operations per image: sum of MACs * w_bits * a_bits over the quantised layers (and, with
    ``matmuls``, the attention matmuls; for a matmul w_bits is the bits of its second operand)."""
    if not isinstance(matmuls, bool):
        raise TypeError(f"bops: matmuls must be a bool, got {matmuls!r}")
    return sum(r["bops"] for r in quant_report(qmodel, images) if matmuls or r["kind"] != "matmul")
