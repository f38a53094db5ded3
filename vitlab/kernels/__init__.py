"""Triton kernels for ViT hot spots, each with a pure-PyTorch reference (see DESIGN.md section 4).

One module per op; the module is the API (``from vitlab.kernels import layernorm``):

    attention.attention(q, k, v, ...)                     flash attention with CLS-row / column-sum outputs
    layernorm.layer_norm(x, weight, bias, eps, residual)  (residual add +) LayerNorm
    mlp.linear_gelu(x, weight, bias)                      linear + bias + exact GELU
    token_merge.merge(x, size, dst_index, num_dst)        ToMe size-weighted merge; token_merge.gather
    fake_quant.fake_quant(x, scale, zero_point, bits)     uniform / log2 / shift-log2 fake quantisation
    linear_attention.linear_attention(q, k, v)            ReLU linear attention, kv-first

Every op runs its Triton kernel on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before the kernel module was imported (tests), and its ``*_ref`` otherwise.

The submodules load lazily on first access, so ``import vitlab.kernels`` imports neither triton nor
the kernels, and nothing here touches a GPU driver.
"""
from __future__ import annotations

import importlib

_MODULES = ("attention", "layernorm", "mlp", "token_merge", "fake_quant", "linear_attention")
# ops whose names differ from their module's, importable from the package directly
_OPS = {"layer_norm": "layernorm", "linear_gelu": "mlp", "merge": "token_merge", "gather": "token_merge"}

__all__ = list(_MODULES) + list(_OPS)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it as a package attribute
    if name in _OPS:
        return getattr(importlib.import_module(f"{__name__}.{_OPS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; available: {__all__}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
