"""T2T-ViT: Tokens-to-Token ViT (Yuan et al., ICCV 2021; arXiv:2101.11986).

Paper: L. Yuan, Y. Chen, T. Wang, W. Yu, Y. Shi, Z. Jiang, F. E. H. Tay, J. Feng, S. Yan, "Tokens-to-Token ViT:
Training Vision Transformers from Scratch on ImageNet", ICCV 2021. Official code:
https://github.com/yitu-opensource/T2T-ViT (``models/t2t_vit.py``: ``T2T_module``, ``T2T_ViT``;
``models/token_transformer.py``: ``Attention``, ``Token_transformer``; ``models/transformer_block.py``: ``Block``,
``get_sinusoid_encoding``). Written from the paper and that code; no line of it is copied.

A plain ViT cuts the image into hard, non-overlapping patches: the local structure inside and across patches is
lost at the first layer. T2T builds the tokens progressively instead, alternating two steps:

    soft split           T_i  = Unfold(k_i, s_i, p_i)(I_i)          overlapping k x k windows, C·k² dims each
    re-structurisation   T'_i = TokenTransformer(T_i)               attention over the tokens, C·k² -> token_dim
                         I_{i+1} = reshape(T'_i, [token_dim, H_i, W_i])   tokens back onto their grid

and after the last soft split a Linear projects C·k² -> embed_dim. Overlapping windows (s < k) let each token
see its neighbours, and every split shrinks the token count (the stride), so the backbone sees few, rich tokens.

The token transformer (official ``Token_transformer``) changes the width inside attention, so its residual
goes through v, and its scale comes from the INPUT width:

    y = v + proj(softmax(q kᵀ · (dim / heads)^-½) v)      q, k, v = LN(x) W_qkv  (in_dim each; no qkv bias)
    out = y + MLP(LN(y))                                  MLP in_dim -> in_dim·mlp_ratio -> in_dim

The backbone is a deep-narrow ViT (pre-norm blocks, no qkv bias, LayerNorm eps 1e-5 as in the official
``Block``) with a CLS token and a FIXED sinusoidal position table (``sinusoid_table``).

Deviations from the official code, for 28-px digits (all configurable, the official layout is
``kernels=((7, 4, 2), (3, 2, 1), (3, 2, 1))`` at 224 px):
- kernels / strides scaled to 28 px: ``Unfold(7, s2, p3)`` -> 14², ``Unfold(3, 2, 1)`` -> 7², ``Unfold(3, 1, 1)``
  -> 7² (the last split keeps the grid), so the backbone sees 7² tokens like the control ViT with patch 4;
- any number of splits (the official module has exactly three) and a token count computed from the unfold
  arithmetic rather than ``(img_size // 16)²``;
- only the ``'transformer'`` token type (the official default for t2t_vit_7 .. 24 is the Performer
  approximation, ``Token_performer``; at 14² tokens exact attention is cheap);
- the sinusoid table is a non-trainable buffer (the official code stores it as a Parameter with
  ``requires_grad=False``: the same numbers, not trained).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from vitlab.checks import check_images, check_int, check_number
from vitlab.models.vit import Block, init_linear_

from . import recipes

__all__ = ["sinusoid_table", "unfold_size", "SoftSplit", "TokenAttention", "TokenTransformer", "T2TModule",
           "T2TViT", "CONFIG", "OFFICIAL_KERNELS"]

OFFICIAL_KERNELS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of the official 224-px module

# The lesson's T2T-ViT for 28-px digits: the curriculum's scaled splits (14² -> 7² -> 7²), a small token_dim,
# and a deep-narrow backbone (6 x 48, 3 heads of 16, against the control's 4 x 64, 4 heads of 16) sized to the
# control's parameters (0.95x) at about 1.3x its time per training step.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, kernels=((7, 2, 3), (3, 2, 1), (3, 1, 1)), token_dim=16,
              embed_dim=48, depth=6, num_heads=3, mlp_ratio=2.0)


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """The fixed position table of the official ``get_sinusoid_encoding``: [1, n_position, dim] with
    angle(p, j) = p / 10000^(2·⌊j/2⌋/dim), sin on even j, cos on odd j."""
    n_position = check_int(n_position, "n_position", "sinusoid_table")
    dim = check_int(dim, "dim", "sinusoid_table")
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the grid an ``nn.Unfold(kernel, stride=stride, padding=padding)`` leaves of a ``size``² map."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_kernels(kernels, fn: str) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(kernels, Sequence) or isinstance(kernels, str) or len(kernels) == 0:
        raise ValueError(f"{fn}: kernels must be a non-empty sequence of (kernel, stride, padding), got {kernels!r}")
    out = []
    for i, kp in enumerate(kernels):
        if not isinstance(kp, Sequence) or len(kp) != 3:
            raise ValueError(f"{fn}: kernels[{i}] must be (kernel, stride, padding), got {kp!r}")
        k, s, p = (check_int(v, f"kernels[{i}]", fn, low=lo) for v, lo in zip(kp, (1, 1, 0)))
        if p >= k:
            raise ValueError(f"{fn}: kernels[{i}] has padding {p} >= kernel {k}; expected padding < kernel")
        out.append((k, s, p))
    return tuple(out)


class SoftSplit(nn.Module):
    """Soft split: overlapping k x k windows of a [B, C, H, W] map, each flattened to one token of C·k² values
    (channel-major, then row, then column: ``nn.Unfold``'s order) -> [B, H'·W', C·k²]."""

    def __init__(self, kernel: int, stride: int, padding: int):
        super().__init__()
        (self.kernel, self.stride, self.padding), = _check_kernels([(kernel, stride, padding)], "SoftSplit")
        self.unfold = nn.Unfold(kernel_size=self.kernel, stride=self.stride, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"SoftSplit: x must be a map [B, C, H, W], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        return self.unfold(x).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


def restructure(tokens: torch.Tensor) -> torch.Tensor:
    """Re-structurisation: tokens [B, N, C] back onto their square grid [B, C, √N, √N] (row-major)."""
    if not torch.is_tensor(tokens) or tokens.ndim != 3:
        raise ValueError(f"restructure: tokens must be [B, N, C], got "
                         f"{tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__}")
    B, N, C = tokens.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"restructure: tokens hold N={N} tokens, expected a square number (a grid)")
    return tokens.transpose(1, 2).reshape(B, C, side, side)


class TokenAttention(nn.Module):
    """The official token transformer's attention: one head, width dim -> in_dim, residual through v.

        y = v + proj(softmax((q · scale) kᵀ) v),   scale = (dim / num_heads)^-½ from the INPUT width dim
    """

    def __init__(self, dim: int, in_dim: int, num_heads: int = 1, qkv_bias: bool = False,
                 qk_scale: float | None = None):
        super().__init__()
        self.dim = check_int(dim, "dim", "TokenAttention")
        self.in_dim = check_int(in_dim, "in_dim", "TokenAttention")
        num_heads = check_int(num_heads, "num_heads", "TokenAttention")
        if num_heads != 1:  # the official v-residual (v.squeeze(1)) only has a meaning for one head
            raise ValueError(f"TokenAttention: num_heads must be 1 (the v-residual needs one head), got {num_heads}")
        self.num_heads = num_heads
        check_number(qk_scale, "qk_scale", "TokenAttention", low=0, low_open=True, optional=True)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=qkv_bias)
        self.proj = nn.Linear(in_dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TokenAttention: x must be [B, N, dim={self.dim}], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, N, in_dim]
        # softmax((q · scale) kᵀ) v, through PyTorch's fused kernel (2x faster than the explicit form at 14² tokens)
        return v + self.proj(F.scaled_dot_product_attention(q, k, v, scale=self.scale))

    def extra_repr(self) -> str:
        return f"dim={self.dim} -> in_dim={self.in_dim}, scale={self.scale:.4g}"


class TokenTransformer(nn.Module):
    """Re-structurisation layer (official ``Token_transformer``): ``y = attn(LN(x))`` (v-residual, width
    dim -> in_dim), then ``y + MLP(LN(y))``."""

    def __init__(self, dim: int, in_dim: int, num_heads: int = 1, mlp_ratio: float = 1.0, qkv_bias: bool = False):
        super().__init__()
        check_number(mlp_ratio, "mlp_ratio", "TokenTransformer", low=0, low_open=True)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=max(1, int(in_dim * mlp_ratio)), out_features=in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Tokens-to-Token: soft split -> token transformer -> re-structurise, repeated, then a final soft split and
    a Linear to ``embed_dim``. ``kernels``: one (kernel, stride, padding) per soft split (the last one feeds the
    projection). One split alone is an overlapping patch embedding (no token transformer)."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, embed_dim: int = 64, token_dim: int = 16,
                 kernels=CONFIG["kernels"]):
        super().__init__()
        fn = "T2TModule"
        self.img_size = check_int(img_size, "img_size", fn)
        self.in_chans = check_int(in_chans, "in_chans", fn)
        check_int(embed_dim, "embed_dim", fn)
        check_int(token_dim, "token_dim", fn)
        self.kernels = _check_kernels(kernels, fn)
        self.soft_splits = nn.ModuleList(SoftSplit(*kp) for kp in self.kernels)
        sizes, chans, dims = [img_size], in_chans, []
        for i, (k, s, p) in enumerate(self.kernels):
            side = unfold_size(sizes[-1], k, s, p)
            if side < 1:
                raise ValueError(f"{fn}: kernels[{i}]={k, s, p} leaves no window on a {sizes[-1]}² map; "
                                 f"use a smaller kernel or more padding")
            sizes.append(side)
            dims.append(chans * k * k)
            chans = token_dim
        self.grid_sizes = tuple(sizes[1:])  # the token grid after each soft split
        self.attentions = nn.ModuleList(TokenTransformer(d, token_dim, num_heads=1, mlp_ratio=1.0)
                                        for d in dims[:-1])
        self.project = nn.Linear(dims[-1], embed_dim)
        self.num_patches = self.grid_sizes[-1] ** 2

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        check_images(x, self.in_chans, self.img_size, "T2TModule")
        stages = []
        for split, attn in zip(self.soft_splits[:-1], self.attentions):
            x = attn(split(x))   # soft split, then re-structurisation by attention
            stages.append(x)
            x = restructure(x)   # back onto the grid for the next (overlapping) split
        x = self.project(self.soft_splits[-1](x))
        return (x, stages) if return_stages else x


class T2TViT(nn.Module):
    """T2T-ViT: the T2T module, a CLS token, a fixed sinusoidal position table and a deep-narrow ViT backbone
    (official ``T2T_ViT``; blocks without qkv bias, LayerNorm eps 1e-5)."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 kernels=CONFIG["kernels"], token_dim: int = 16, embed_dim: int = 48, depth: int = 6,
                 num_heads: int = 3, mlp_ratio: float = 2.0, qkv_bias: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        fn = "T2TViT"
        check_int(num_classes, "num_classes", fn)
        check_int(depth, "depth", fn)
        check_int(num_heads, "num_heads", fn)
        if isinstance(embed_dim, int) and embed_dim % num_heads:
            raise ValueError(f"{fn}: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
        check_number(drop_path_rate, "drop_path_rate", fn, low=0, high=1, high_open=True)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.tokens_to_token = T2TModule(img_size, in_chans, embed_dim, token_dim, kernels)
        n = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(n + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                                            norm_layer=nn.LayerNorm) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.cls_token, std=0.02)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens_to_token(x)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def extra_repr(self) -> str:
        return (f"grids={self.tokens_to_token.grid_sizes}, tokens={self.tokens_to_token.num_patches}+1, "
                f"dim={self.embed_dim}, depth={len(self.blocks)}")


recipes.register("t2t_vit", T2TViT, **CONFIG)
