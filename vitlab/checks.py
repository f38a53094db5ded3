"""Argument checks shared by the method modules: each raises naming the function, the argument and the value."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["check_int", "check_model", "check_cls_vit"]


def check_int(value, name: str, fn: str, *, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return value


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
