"""Argument checks shared by the method modules: each raises naming the function, the argument and the value."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

__all__ = ["check_int", "check_number", "check_choice", "check_ndim", "check_heads", "check_images", "check_model",
           "check_cls_vit"]


def check_int(value, name: str, fn: str, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [``low``, ``high``] (bools refused; numpy/torch integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        want = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{fn}: {name} must be an int {want}, got {value!r}")
    return int(value)


def check_number(value, name: str, fn: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float in [low, high] (ends excluded where ``*_open``); ``None`` passes if optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (hasattr(value, "ndim") and value.ndim):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = " and ".join(b for b in (lo, hi) if b)
    if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
            or (high is not None and (value > high or (high_open and value == high))):
        raise ValueError(f"{fn}: {name} must be a finite number{' ' + want if want else ''}"
                         f"{' (or None)' if optional else ''}, got {value!r}")
    return value


def check_choice(value, choices, name: str, fn: str):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_ndim(t, ndim: int, name: str, fn: str):
    """``t`` if it is a tensor with ``ndim`` dims."""
    import torch

    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be a tensor with {ndim} dims, got {shape}")
    return t


def check_heads(dim, num_heads, fn: str) -> int:
    """The head width ``dim // num_heads``, once both are positive ints and ``num_heads`` divides ``dim``."""
    dim, num_heads = check_int(dim, "dim", fn), check_int(num_heads, "num_heads", fn)
    if dim % num_heads:
        raise ValueError(f"{fn}: num_heads={num_heads} does not divide dim={dim}")
    return dim // num_heads


def check_images(x, in_chans: int, img_size: int, fn: str, name: str = "x"):
    """``x`` if it is an image batch [B, ``in_chans``, ``img_size``, ``img_size``]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be an image batch [B, C, H, W], got {shape}")
    if tuple(x.shape[1:]) != (in_chans, img_size, img_size):
        raise ValueError(f"{fn}: {name} is {tuple(x.shape[1:])}; expected ({in_chans}, {img_size}, {img_size}) "
                         f"(in_chans={in_chans}, img_size={img_size})")
    return x


def check_batch(images, labels, fn: str) -> None:
    """``images`` an image batch [N, C, H, W] and ``labels`` a tensor [N] of as many labels."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{fn}: images must be a tensor [N, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
        raise ValueError(f"{fn}: labels must be a tensor [N={len(images)}], got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")


def check_model(model, fn: str) -> nn.Module:
    """``model`` if it is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    return model


def check_cls_vit(vit, fn: str) -> nn.Module:
    """``vit`` if it is a vitlab ``VisionTransformer`` with one CLS token and no register tokens (what the
    token-reduction methods assume: the CLS token first, every other token an image token)."""
    from vitlab.models import VisionTransformer

    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.num_prefix_tokens != 1:
        raise TypeError(f"{fn}: vit must be a vitlab VisionTransformer with a CLS token and no registers, "
                        f"got {type(vit).__name__}")
    return vit
