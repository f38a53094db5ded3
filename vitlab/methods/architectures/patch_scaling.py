"""Scaling laws in patchification (F. Wang, Y. Yu, G. Wei, W. Shao, Y. Zhou, A. Yuille, C. Xie, "Scaling Laws in
Patchification: An Image Is Worth 50,176 Tokens And More", arXiv 2502.03738; official code:
wangf3014/Patch_Scaling, Mamba "Adventurer" models only: the paper's ViT runs are not in the repository).

The claim: at a fixed image resolution, shrinking the patch size p (so (H/p)^2 tokens) keeps lowering the test
loss, down to p = 1 (one token per pixel), following a power law in the number of tokens; the compute of
attention grows with the square of the tokens.

The only knob is the patch size of an otherwise fixed ViT (``Conv2d(k=s=p)``), so this module is small: the
sweep's configurations registered with the chapter's recipe (one zoo entry per patch size and seed, scikit-
learn's 8x8 digits so that p = 1 is 64 tokens), and the fit of test error against tokens.
"""
from __future__ import annotations

import math

import torch

from vitlab.models import VisionTransformer

from . import recipes

__all__ = ["PATCHES", "CONFIG", "method_name", "tokens", "fit_power_law", "attention_flops"]

PATCHES = (8, 4, 2, 1)  # 1, 4, 16, 64 tokens on 8x8 images
# the chapter's plain ViT shape (4 x 64, 4 heads); only the patch size changes
CONFIG = dict(img_size=8, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


def method_name(patch_size: int) -> str:
    if patch_size not in PATCHES:
        raise ValueError(f"method_name: patch_size must be one of {PATCHES}, got {patch_size!r}")
    return f"patch_scaling_p{patch_size}"


def tokens(patch_size: int, img_size: int = 8) -> int:
    """Patch tokens of an img_size^2 image at ``patch_size`` (CLS not counted)."""
    if img_size % patch_size:
        raise ValueError(f"tokens: patch_size={patch_size} does not divide img_size={img_size}")
    return (img_size // patch_size) ** 2


def fit_power_law(n_tokens, errors) -> tuple[float, float]:
    """Least-squares fit of log(error) = log(a) - alpha log(N): returns (a, alpha), error ~ a N^-alpha."""
    n = torch.as_tensor(n_tokens, dtype=torch.float64)
    e = torch.as_tensor(errors, dtype=torch.float64)
    if n.ndim != 1 or n.shape != e.shape or len(n) < 2:
        raise ValueError(f"fit_power_law: n_tokens and errors must be 1-D of the same length >= 2, got "
                         f"{tuple(n.shape)} and {tuple(e.shape)}")
    if (n <= 0).any() or (e <= 0).any():
        raise ValueError("fit_power_law: n_tokens and errors must be positive (a power law lives in log space)")
    X = torch.stack([torch.ones_like(n), n.log()], dim=1)
    coef = torch.linalg.lstsq(X, e.log()[:, None]).solution[:, 0]
    return math.exp(coef[0].item()), -coef[1].item()


def attention_flops(n_tokens: int, dim: int = 64, depth: int = 4) -> int:
    """FLOPs of the attention products (q k^T and attn v) per image: 2 x 2 N^2 d per block (+1 for the CLS)."""
    n = n_tokens + 1
    return depth * 4 * n * n * dim


for _p in PATCHES:
    recipes.register(method_name(_p), VisionTransformer, dataset="digits8", patch_size=_p, **CONFIG)

# The chapter comparison's row: the plain ViT on the chapter's 28 x 28 digits at patch 2 (196 tokens, 4x the plain
# ViT's 49): the paper's direction, smaller patches, at the chapter's recipe.
recipes.register("vit_patch2", VisionTransformer, img_size=28, in_chans=1, num_classes=10,
                 **dict(recipes.BASELINE, patch_size=2))
