"""Hyena N-D: attention-free token mixing by implicit long 2-D convolutions (I. Zimerman, L. Wolf,
"Multi-Dimensional Hyena for Spatial Inductive Bias", AISTATS 2024; official code: Itamarzimm/HyenaND,
``pytorch-image-models/timm/models/layers/hyena2d.py``: ``HyenaOperator2d``, ``HyenaFilter2d``,
``ExponentialModulation``, ``PositionalEmbedding``, ``Sin``, ``fftconv2d``).

Hyena replaces attention by gating and long convolutions whose filters are *implicit*: a small MLP of position
features produces a filter as large as the input, so the parameter count does not grow with it. The 2-D operator
(order 2), on an L x L token grid u:

    x0, x1, v = split(DW3x3(in_proj(u)))                   in_proj: C -> 3C, a short depthwise conv, three parts
    h[i, j, c] = hx[i, c] * hy[j, c]                       a separable implicit filter (default "product" mode):
        hx = MLP_x(z_i) * exp(-t_i |delta_c|)                MLP of (t, cos, sin) position features with sine
        hy = MLP_y(z_j) * exp(-t_j |delta_c|)                activations (one shared frequency), times a decay
    v  = conv2d_causal(v * x1, h) / (2L) + bias * (v * x1)   FFT convolution, zero-padded to 2L x 2L, top-left
    y  = out_proj(v * x0)                                    anchored; the 1/(2L) is as the official code has it

so a token mixes with every token above and to its left, with weights that decay with distance. The cost is
O(L^2 log L) (FFT) against attention's O(L^4) on an L x L grid. Causal in 2-D means one direction; the official
"seq" mode flips the grid before the convolution in alternate blocks, so the direction alternates with depth.

Deviations, named: vitlab's pre-norm blocks and MLPs; ``flip`` per operator (the model alternates it in "seq"
mode) instead of a mode string; the product ("hyena2d_filter=False") filter only; no dropout. The position
features keep the official ``lr_pos_emb`` as a trainable parameter without its separate learning rate.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_ndim
from vitlab.models.vit import VisionTransformer

from . import recipes

__all__ = ["fftconv2d", "causal_conv2d", "ImplicitFilter2d", "HyenaOperator2d", "hyena_vit", "MIXERS", "CONFIG"]

MIXERS = ("hyena", "hybrid", "attention")


def fftconv2d(u: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal 2-D convolution of u [B, C, L, L] with k [C, L, L] by FFT (zero-padded to 2L), scaled by 1/(2L)
    as in the official code, plus ``bias`` [C] times u."""
    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft2(k.float(), s=(n, n)) / n
    u_f = torch.fft.rfft2(u.float(), s=(n, n))
    y = torch.fft.irfft2(u_f * k_f, s=(n, n))[..., :L, :L]
    return (y + u * bias[:, None, None]).to(u.dtype)


def causal_conv2d(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The same causal convolution computed directly (the oracle for ``fftconv2d`` without its 1/(2L) and bias):
    y[b, c, i, j] = sum_{p <= i, q <= j} k[c, p, q] u[b, c, i - p, j - q]."""
    B, C, L, _ = u.shape
    padded = F.pad(u, (L - 1, 0, L - 1, 0))
    return F.conv2d(padded, k.flip(-1, -2)[:, None], groups=C)


class Sin(nn.Module):
    """sin(freq * x) with a learnable frequency per feature (official ``Sin``)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class ImplicitFilter2d(nn.Module):
    """h[i, j, c] = hx[i, c] hy[j, c]: two MLPs of position features (t, cos, sin), each times an exponential
    decay in t with fixed rates spread over the channels (fast decay: local filters; slow: global)."""

    def __init__(self, channels: int, grid: int, order: int = 16, emb_dim: int = 3, num_inner: int = 2,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        if emb_dim % 2 == 0 or emb_dim < 3:
            raise ValueError(f"ImplicitFilter2d: emb_dim must be odd and >= 3 (time, cos, sin), got {emb_dim}")
        self.grid = grid
        t = torch.linspace(0, 1, grid)[:, None]  # [L, 1]
        bands = (emb_dim - 1) // 2
        w = 2 * math.pi * torch.arange(grid, dtype=torch.float32)[:, None] / grid
        f = torch.linspace(1e-4, bands - 1, bands)[None]
        self.z = nn.Parameter(torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1))  # [L, emb_dim]
        self.register_buffer("t", t, persistent=False)
        act = Sin(order)  # one module, so one frequency vector, shared by every layer of both MLPs (as official)

        def mlp():
            layers = [nn.Linear(emb_dim, order), act]
            for _ in range(num_inner):
                layers += [nn.Linear(order, order), act]
            return nn.Sequential(*layers, nn.Linear(order, channels, bias=False))

        self.mlp_x, self.mlp_y = mlp(), mlp()
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels)[None], persistent=False)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self) -> torch.Tensor:
        """The filter [C, L, L]."""
        decay = torch.exp(-self.t * self.deltas.abs())  # [L, C]
        hx = self.mlp_x(self.z) * decay
        hy = self.mlp_y(self.z) * decay
        return torch.einsum("ic,jc->cij", hx, hy)


class HyenaOperator2d(nn.Module):
    """Order-2 Hyena on tokens [B, L*L, C] (raster order): gate, implicit long 2-D conv, gate."""

    def __init__(self, dim: int, grid: int, filter_order: int = 16, flip: bool = False):
        super().__init__()
        check_int(dim, "dim", "HyenaOperator2d", low=1)
        check_int(grid, "grid", "HyenaOperator2d", low=1)
        self.dim, self.grid, self.flip = dim, grid, flip
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.short_filter = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim)
        self.filter = ImplicitFilter2d(dim, grid, order=filter_order)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_bias=None, side=()) -> torch.Tensor:
        check_ndim(x, 3, "x", "HyenaOperator2d")
        B, N, C = x.shape
        if N != self.grid ** 2:
            raise ValueError(f"HyenaOperator2d: {N} tokens; expected a square grid of {self.grid}^2 (no CLS token)")
        u = self.in_proj(x).transpose(1, 2).reshape(B, 3 * C, self.grid, self.grid)
        x0, x1, v = self.short_filter(u).split(C, dim=1)
        v = v * x1
        if self.flip:  # anti-causal: the other direction
            v = v.flip(-1, -2)
        v = fftconv2d(v, self.filter(), self.filter.bias)
        if self.flip:
            v = v.flip(-1, -2)
        y = (v * x0).flatten(2).transpose(1, 2)
        return self.out_proj(y)


def hyena_vit(img_size: int = 28, in_chans: int = 1, num_classes: int = 10, patch_size: int = 4, embed_dim: int = 64,
              depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, mixer: str = "hyena",
              filter_order: int = 16) -> VisionTransformer:
    """vitlab's ViT with no CLS token (the tokens must form a square grid) and mean pooling, whose blocks mix tokens
    by Hyena-2D ("hyena": every block, directions alternating as the official "seq" mode), Hyena in the first half
    and attention after ("hybrid", the official ``hyena2dattn``), or attention ("attention": the same layout
    without Hyena, the control that separates the mixer from the pooling)."""
    check_choice(mixer, MIXERS, "mixer", "hyena_vit")
    if img_size % patch_size:
        raise ValueError(f"hyena_vit: patch_size={patch_size} does not divide img_size={img_size}")
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            global_pool="avg", class_token=False, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=mlp_ratio)
    grid = img_size // patch_size
    for i, blk in enumerate(vit.blocks):
        if mixer == "hyena" or (mixer == "hybrid" and i < depth // 2):
            blk.attn = HyenaOperator2d(embed_dim, grid, filter_order, flip=(i % 2 == 0))
    return vit


# The lesson: the chapter's ViT shape (4 x 64, patch 4: a 7 x 7 grid) with each mixer.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0, filter_order=16)
for _mixer in MIXERS:
    recipes.register(f"hyena_{_mixer}", hyena_vit, mixer=_mixer, **CONFIG)
