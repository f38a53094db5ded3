"""DualToken-ViT: Position-aware Efficient Vision Transformer with Dual Token Fusion (Chu et al., 2023;
arXiv 2309.12424).

**No official code.** None was found (the curriculum's search: ``find_repos "DualToken"`` returns unrelated
repositories; ``songweii/DualToken`` is a different 2025 tokenizer paper). This module is built from the paper's
text and figure, at the level of detail the abstract and method section give; every choice below marked
*[guess]* is ours, not the paper's code.

**The mechanism.** A light hierarchical model (stem, 3 stages). Every ``DualTokenBlock`` fuses two token streams
on the same [B, C, H, W] map:

- *local tokens* from a convolution-based branch (``LocalBranch``: depthwise 3x3 conv);
- *global tokens* from a self-attention branch (``GlobalBranch``): every position queries a short key/value
  sequence made by **step-wise downsampling** of the map (several stride-2 depthwise convolutions, not one big
  pooling, so less is lost), concatenated along the token axis with the **position-aware global tokens**;

and adds them (element-wise addition is the paper's fusion): ``x = x + Local(BN x) + Global(BN x, g)``, then a
convolutional MLP. The position-aware global tokens ``g`` are a small 2D grid (``global_side`` x ``global_side``
tokens), carried through all the blocks and stages: in every block the grid cell (i, j) is fused (added) with the
downsampled map pooled to the same grid, so a global token keeps the position of its region, and then the tokens
read the whole key/value sequence with attention (residual). Between stages they are linearly projected to the
next width, and their grid stays.

**Paper-level guesses (named).**

- *[guess]* Local branch = DWConv3x3 -> BN -> GELU -> Conv1x1 (the paper says "convolution-based structure").
- *[guess]* Step-wise downsampling = as many steps of (DWConv3x3 stride 2 + BN) as take the map down to at most
  ``kv_side`` x ``kv_side`` (4 here, the grid of the global tokens); maps already that small are not downsampled.
- *[guess]* Position-aware fusion = ``g <- g + AdaptiveAvgPool(downsampled map, global_side)`` (element-wise
  addition), then ``g <- g + Attn(LN g, [downsampled; g])``; keys/values are one shared projection of the
  concatenation ``[downsampled tokens; global tokens]`` for both the image queries and the global-token queries.
- *[guess]* The global tokens start as a learnable grid (truncated normal, std 0.02), enter no classifier (the
  head pools the map), and cross stages through a Linear layer.
- *[guess]* Stem: ``stem_stride`` 2 or 4, i.e. one or two (Conv3x3 stride 2 + BN + GELU); stage transitions:
  Conv3x3 stride 2 + BN.
- BatchNorm on the maps, LayerNorm on the global tokens, multi-head attention through
  ``F.scaled_dot_product_attention``.
- Sizes: the lesson's tiny model (``TINY``) has a stride-4 stem, so its three stages run on 7x7 -> 4x4 -> 2x2
  maps (stage 1 sees the plain ViT's 7x7 patch-4 grid), widths 32 / 48 / 64, one block per stage, a 4x4 grid of
  global tokens (in the 2x2 stage each map cell feeds a 2x2 block of them). A stride-2 stem (14x14 -> 7x7 -> 4x4)
  costs about 1.8x as much per training step on CPU; the paper's models are ImageNet-sized (0.5 / 1.0 GFLOPs).

``global_tokens=False`` drops the position-aware global tokens (keys/values are the downsampled map only): the
ablation the lesson trains as ``dualtoken_vit_noglobal``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_heads, check_images, check_int
from vitlab.methods.architectures import recipes
from vitlab.models.vit import init_linear_

__all__ = ["LocalBranch", "StepwiseDownsample", "GlobalBranch", "DualTokenBlock", "DualTokenViT", "TINY",
           "TINY_NOGLOBAL", "downsample_steps"]


def _check_map(x, dim: int, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a feature map [B, {dim}, H, W], got {shape}")


def downsample_steps(side: int, kv_side: int) -> int:
    """How many stride-2 steps take a ``side`` x ``side`` map to at most ``kv_side`` x ``kv_side``."""
    check_int(side, "side", "downsample_steps")
    check_int(kv_side, "kv_side", "downsample_steps")
    steps = 0
    while side > kv_side:
        side, steps = (side - 1) // 2 + 1, steps + 1
    return steps


class LocalBranch(nn.Module):
    """The convolution branch: DWConv3x3 -> BN -> GELU -> Conv1x1 (local tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_int(dim, "dim", "LocalBranch")
        self.dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "LocalBranch")
        return self.pw(self.act(self.norm(self.dw(x))))


class StepwiseDownsample(nn.Module):
    """``steps`` x (DWConv3x3 stride 2 + BN): the map shrinks by 2 per step (identity when ``steps`` is 0)."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim = check_int(dim, "dim", "StepwiseDownsample")
        self.steps = check_int(steps, "steps", "StepwiseDownsample", low=0)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Conv2d(dim, dim, 3, 2, 1, groups=dim), nn.BatchNorm2d(dim))
                                      for _ in range(steps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "StepwiseDownsample")
        return self.layers(x)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:  # [B, N, C] -> [B, h, N, C/h]
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [B, h, N, d] -> [B, N, h*d]
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


class GlobalBranch(nn.Module):
    """Attention of every position over ``[step-wise downsampled map; position-aware global tokens]``, and the
    update of the global tokens. Returns (the branch's output map, the updated global tokens or None)."""

    def __init__(self, dim: int, num_heads: int, side: int, kv_side: int = 4, global_side: int | None = 4):
        super().__init__()
        check_heads(dim, num_heads, "GlobalBranch")
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.side = check_int(side, "side", "GlobalBranch")
        self.kv_side = check_int(kv_side, "kv_side", "GlobalBranch")
        self.global_side = None if global_side is None else check_int(global_side, "global_side", "GlobalBranch")
        self.down = StepwiseDownsample(dim, downsample_steps(side, kv_side))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if self.global_side is not None:
            self.norm_g = nn.LayerNorm(dim)
            self.q_g = nn.Linear(dim, dim)
            self.proj_g = nn.Linear(dim, dim)

    def kv_tokens(self, x: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the key/value token sequence, the global tokens after the position-aware fusion)."""
        d = self.down(x)  # [B, C, s, s], s <= kv_side
        tokens = d.flatten(2).transpose(1, 2)
        if self.global_side is None:
            return tokens, None
        if g is None or g.ndim != 3 or g.shape[1:] != (self.global_side ** 2, self.dim) or g.shape[0] != x.shape[0]:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else g
            raise ValueError(f"GlobalBranch: g must be global tokens [B, {self.global_side ** 2}, {self.dim}], "
                             f"got {shape}")
        g = g + F.adaptive_avg_pool2d(d, self.global_side).flatten(2).transpose(1, 2)  # cell (i, j) <- region (i, j)
        return torch.cat([tokens, self.norm_g(g)], dim=1), g

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None):
        _check_map(x, self.dim, "GlobalBranch")
        B, C, H, W = x.shape
        ctx, g = self.kv_tokens(x, g)
        k, v = self.kv(ctx).chunk(2, dim=-1)
        k, v = _heads(k, self.num_heads), _heads(v, self.num_heads)
        q = _heads(self.q(x.flatten(2).transpose(1, 2)), self.num_heads)
        out = self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        out = out.transpose(1, 2).reshape(B, C, H, W)
        if g is not None:
            qg = _heads(self.q_g(self.norm_g(g)), self.num_heads)
            g = g + self.proj_g(_merge(F.scaled_dot_product_attention(qg, k, v)))
        return out, g


class DualTokenBlock(nn.Module):
    """x = x + Local(BN x) + Global(BN x, g) (dual token fusion by addition); x = x + Mlp(BN x). Returns (x, g)."""

    def __init__(self, dim: int, num_heads: int, side: int, kv_side: int = 4, global_side: int | None = 4,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.dim = check_int(dim, "dim", "DualTokenBlock")
        if not mlp_ratio > 0:
            raise ValueError(f"DualTokenBlock: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.norm1 = nn.BatchNorm2d(dim)
        self.local = LocalBranch(dim)
        self.glob = GlobalBranch(dim, num_heads, side, kv_side, global_side)
        self.norm2 = nn.BatchNorm2d(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None):
        _check_map(x, self.dim, "DualTokenBlock")
        y = self.norm1(x)
        glob, g = self.glob(y, g)
        x = x + self.local(y) + glob
        return x + self.mlp(self.norm2(x)), g


def _side(side: int) -> int:  # Conv3x3, stride 2, padding 1
    return (side - 1) // 2 + 1


class DualTokenViT(nn.Module):
    """Stem (stride 2 or 4), 3 stages of ``DualTokenBlock`` (stride-2 conv between stages), position-aware global
    tokens carried through every block and stage, BN + global average pool + linear head."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 embed_dims: Sequence[int] = (32, 48, 64), depths: Sequence[int] = (1, 1, 1),
                 num_heads: Sequence[int] = (2, 2, 4), mlp_ratio: float = 2.0, kv_side: int = 4,
                 global_side: int = 4, global_tokens: bool = True, stem_stride: int = 2):
        super().__init__()
        self.img_size = check_int(img_size, "img_size", "DualTokenViT", low=4)
        self.in_chans = check_int(in_chans, "in_chans", "DualTokenViT")
        self.num_classes = check_int(num_classes, "num_classes", "DualTokenViT")
        embed_dims, depths, num_heads = list(embed_dims), list(depths), list(num_heads)
        if not embed_dims or not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError(f"DualTokenViT: embed_dims, depths and num_heads need one entry per stage, got "
                             f"{embed_dims}, {depths}, {num_heads}")
        for d in depths:
            check_int(d, "depths", "DualTokenViT")
        self.global_side = check_int(global_side, "global_side", "DualTokenViT") if global_tokens else None
        self.embed_dims = embed_dims
        if stem_stride not in (2, 4):
            raise ValueError(f"DualTokenViT: stem_stride must be 2 or 4, got {stem_stride!r}")
        layers, c_in, side = [], in_chans, img_size
        for i in range(stem_stride // 2):  # one or two (Conv3x3 stride 2 + BN + GELU)
            c_out = embed_dims[0] if i == stem_stride // 2 - 1 else embed_dims[0] // 2
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in, side = c_out, _side(side)
        self.stem = nn.Sequential(*layers)
        self.sides, stages, downs, g_proj = [], [], [], []
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            if i > 0:
                if side < 2:
                    raise ValueError(f"DualTokenViT: img_size={img_size} is too small for {len(embed_dims)} stages")
                downs.append(nn.Sequential(nn.Conv2d(embed_dims[i - 1], dim, 3, 2, 1), nn.BatchNorm2d(dim)))
                g_proj.append(nn.Linear(embed_dims[i - 1], dim) if global_tokens else nn.Identity())
                side = _side(side)
            self.sides.append(side)
            stages.append(nn.ModuleList([DualTokenBlock(dim, heads, side, kv_side, self.global_side, mlp_ratio)
                                         for _ in range(depth)]))
        self.stages = nn.ModuleList(stages)
        self.downs = nn.ModuleList(downs)
        self.g_proj = nn.ModuleList(g_proj)
        self.global_init = (nn.Parameter(torch.zeros(1, global_side ** 2, embed_dims[0])) if global_tokens else None)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        if self.global_init is not None:
            trunc_normal_(self.global_init, std=0.02)
        init_linear_(self)

    def no_weight_decay(self) -> set[str]:
        return {"global_init"}

    def forward_features(self, x: torch.Tensor, return_global: bool = False):
        check_images(x, self.in_chans, self.img_size, "DualTokenViT")
        x = self.stem(x)
        g = None if self.global_init is None else self.global_init.repeat(x.shape[0], 1, 1)
        trace = []
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.downs[i - 1](x)
                g = None if g is None else self.g_proj[i - 1](g)
            for blk in blocks:
                x, g = blk(x, g)
                trace.append(g)
        x = self.norm(x)
        return (x, trace) if return_global else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).flatten(2).mean(-1))


# The lesson's tiny model: 3 stages on 28 px digits (7x7 -> 4x4 -> 2x2 after a stride-4 stem), a 4x4 grid of global
# tokens, about the plain ViT's parameters; and its ablation without the position-aware global tokens (same
# everything else).
TINY = dict(img_size=28, in_chans=1, num_classes=10, embed_dims=[32, 48, 64], depths=[1, 1, 1], num_heads=[2, 2, 4],
            mlp_ratio=2.0, kv_side=4, global_side=4, global_tokens=True, stem_stride=4)
TINY_NOGLOBAL = dict(TINY, global_tokens=False)

recipes.register("dualtoken_vit", DualTokenViT, **TINY)
recipes.register("dualtoken_vit_noglobal", DualTokenViT, **TINY_NOGLOBAL)
