"""Small helpers shared by the kernel modules: where to run, and argument checks.

Every op in ``vitlab.kernels`` dispatches the same way:

    CUDA tensors                          -> the Triton kernel
    CPU tensors and TRITON_INTERPRET=1    -> the Triton kernel, run by Triton's interpreter (tests)
    anything else                         -> the pure-PyTorch reference

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (at import of the kernel module), so we read
it once, here, at import: the kernel modules import this module just before defining their kernels.
Nothing here touches the GPU driver.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with Linux CUDA wheels of torch; elsewhere (macOS) the references still work.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "FLOAT_DTYPES", "interpreting", "use_triton", "check_tensor", "check_same_device",
    "pick_configs",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET and HAS_TRITON


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` should run its Triton kernel.

    All on CUDA, or all on CPU while interpreting. Mixed devices give False (the caller's checks
    then report the mismatch clearly). ``None`` entries are ignored.
    """
    ts = [t for t in tensors if t is not None]
    if not HAS_TRITON or not ts:
        return False
    if all(t.is_cuda for t in ts):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in ts)


def pick_configs(configs: list) -> list:
    """Autotune configs: all of them on GPU, only the first under the interpreter.

    The interpreter cannot benchmark (no active driver), so multi-config autotune fails there; put the
    interpreter-friendly config (big tiles: its cost is per executed statement, not per element) first.
    """
    return list(configs[:1]) if interpreting() else list(configs)


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, contiguous: bool = False,
                 op: str = "") -> torch.Tensor:
    """Check one argument; raise a TypeError/ValueError that names it. Returns ``t``.

    ``ndim``: exact number of dims; ``dtypes``: allowed dtypes (iterable); ``contiguous``: require
    a contiguous tensor. ``op`` prefixes the message (e.g. "attention").
    """
    pre = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{pre}{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{pre}{name} must have {ndim} dims, got shape {tuple(t.shape)} ({t.ndim} dims)")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        allowed = [_dtype_name(d) for d in dtypes]
        raise TypeError(f"{pre}{name} has dtype {_dtype_name(t.dtype)}; expected one of {allowed}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{pre}{name} must be contiguous (got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first")
    return t


def check_same_device(op: str = "", **tensors) -> torch.device:
    """All given tensors (None skipped) on one device; returns it. Message names each argument's device."""
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        pre = f"{op}: " if op else ""
        where = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"{pre}all tensors must be on the same device; got {where}")
    return next(iter(devices)) if devices else torch.device("cpu")
