"""L2ViT: linear global attention + local window attention (C. Zheng et al., "The Linear Attention Resurrection in
Vision Transformer", arXiv 2501.16182; official code: ChuanyangZheng/L2ViT, ``classification/models/l2vit.py``:
``LinearAttention``, ``LCM``, ``CPE``, ``LGABlock``, ``LWABlock``, ``L2ViT``).

Softmax attention costs O(N^2 d). L2ViT alternates two cheaper blocks:

- **LWA** (local window attention): softmax attention inside 7 x 7 windows, wrapped by two conditional position
  encodings (CPE: a depthwise 3 x 3 convolution added to the tokens);
- **LGA** (linear global attention): ReLU-kernel linear attention, computed "kv first" in O(N d^2),

      out_i = tau_h * phi(q_i) (sum_j phi(k_j)^T v_j) / max(phi(q_i) . sum_j phi(k_j), 100),   phi = ReLU,

  with a learnable temperature tau_h per head (init d_h^-1/2) and the denominator clamped at 100 ("makes training
  stable", the official comment). Linear attention spreads its weights (high entropy: no softmax sharpening), so
  a **local concentration module** (LCM: depthwise 7 x 7 -> GELU -> BN -> depthwise 7 x 7) is added after it to
  re-focus on neighbourhoods.

The linear attention runs through ``vitlab.kernels.linear_attention`` (Triton on CUDA, PyTorch elsewhere; its
``eps`` is the clamp). ``attention_map`` gives the equivalent "qk first" N x N map of a block for visualising
its entropy (the official repo's commented qk-first variant uses a different clamp and scale: not equivalent).

The lesson's tiny model (deviations, named): a 2-stage hierarchy for 28 px digits (a 2-conv stem to 14 x 14, a
stride-2 conv to 7 x 7) instead of 4 stages at 224 px; global-average-pooled head; ``attn`` selects the LGA
blocks' attention for the ablations: "linear" + LCM (L2ViT), "linear" without LCM, or global "softmax".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_heads, check_images, check_int
from vitlab.kernels.linear_attention import linear_attention
from vitlab.models.vit import init_linear_

from . import recipes

__all__ = ["LinearAttention", "WindowAttention", "LCM", "CPE", "LGABlock", "LWABlock", "L2ViT", "CONFIG",
           "VARIANTS", "map_entropy"]

CLAMP = 100.0  # the official denominator clamp


class CPE(nn.Module):
    """Conditional position encoding: x + DW3x3(x) on the token grid."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        feat = x.transpose(1, 2).reshape(B, C, *size)
        return x + self.proj(feat).flatten(2).transpose(1, 2)


class LinearAttention(nn.Module):
    """ReLU linear attention, kv first, with a per-head temperature and the clamped denominator."""

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True):
        super().__init__()
        head_dim = check_heads(dim, num_heads, "LinearAttention")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1) * head_dim ** -0.5)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each [B, H, N, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        out = linear_attention(q, k, v, eps=CLAMP) * self.temperature  # relu inside; [B, H, N, d]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The qk-first map this attention applies to v: A = tau relu(q) relu(k)^T / max(relu(q) . sum relu(k), 100),
        so that out = A v exactly. [B, H, N, N]"""
        q, k, _ = self.qkv_heads(x)
        q, k = F.relu(q), F.relu(k)
        denom = (q @ k.sum(dim=2, keepdim=True).transpose(-2, -1)).clamp(min=CLAMP)  # [B, H, N, 1]
        return self.temperature * (q @ k.transpose(-2, -1)) / denom


class SoftmaxAttention(nn.Module):
    """Global softmax attention (the ablation that replaces linear attention in the LGA blocks)."""

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, num_heads, "SoftmaxAttention")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        return LinearAttention.qkv_heads(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv_heads(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


class WindowAttention(nn.Module):
    """Softmax attention inside non-overlapping windows of tokens [B_windows, w*w, C]."""

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True):
        super().__init__()
        self.inner = SoftmaxAttention(dim, num_heads, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class LCM(nn.Module):
    """Local concentration module: DW7x7 -> GELU -> BN -> DW7x7 on the token grid."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *size)
        return self.conv2(self.bn(self.act(self.conv1(x)))).flatten(2).transpose(1, 2)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class LGABlock(nn.Module):
    """CPE -> x + Attn(LN x) -> (x + LCM(LN x)) -> x + MLP(LN x); Attn is linear (L2ViT) or softmax (ablation)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn: str = "linear", lcm: bool = True):
        super().__init__()
        self.cpe = CPE(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (LinearAttention if attn == "linear" else SoftmaxAttention)(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim) if lcm else None
        self.lcm = LCM(dim) if lcm else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.cpe(x, size)
        x = x + self.attn(self.norm1(x))
        if self.lcm is not None:
            x = x + self.lcm(self.norm3(x), size)
        return x + self.mlp(self.norm2(x))


class LWABlock(nn.Module):
    """CPE -> shortcut + WindowAttn(LN x) -> CPE -> x + MLP(LN x), windows of window_size^2 tokens (zero-padded)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, window_size: int = 7):
        super().__init__()
        self.window_size = window_size
        self.cpe = nn.ModuleList([CPE(dim), CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        H, W = size
        B, N, C = x.shape
        w = self.window_size
        shortcut = self.cpe[0](x, size)
        x = self.norm1(shortcut).reshape(B, H, W, C)
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        windows = x.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        out = self.attn(windows).reshape(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, Hp, Wp, C)[:, :H, :W].reshape(B, N, C)
        x = self.cpe[1](shortcut + out, size)
        return x + self.mlp(self.norm2(x))


VARIANTS = {"l2vit": dict(attn="linear", lcm=True), "linear": dict(attn="linear", lcm=False),
            "softmax": dict(attn="softmax", lcm=False)}


class L2ViT(nn.Module):
    """Conv stem (/2) -> stage 1 -> stride-2 conv -> stage 2 -> GAP -> LN -> head. Blocks alternate LWA (even
    index) and LGA (odd index), as the official ``mix_local_enhanced_vit``."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, dims=(24, 72), depths=(2, 2),
                 num_heads=(1, 2), mlp_ratio: float = 2.0, window_size: int = 7, variant: str = "l2vit"):
        super().__init__()
        check_choice(variant, VARIANTS, "variant", "L2ViT")
        check_int(img_size, "img_size", "L2ViT", low=8)
        if img_size % 4:
            raise ValueError(f"L2ViT: img_size={img_size} must be divisible by 4 (stem /2, then a stride-2 stage)")
        if not (len(dims) == len(depths) == len(num_heads) == 2):
            raise ValueError(f"L2ViT: dims, depths and num_heads must each have 2 entries (2 stages), got "
                             f"{dims}, {depths}, {num_heads}")
        self.img_size, self.in_chans, self.variant = img_size, in_chans, variant
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0] // 2, 3, 1, 1), nn.BatchNorm2d(dims[0] // 2), nn.ReLU(),
                                  nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]))
        self.down = nn.Conv2d(dims[0], dims[1], 2, 2)
        self.down_norm = nn.LayerNorm(dims[1])
        self.stages = nn.ModuleList()
        for dim, depth, heads in zip(dims, depths, num_heads):
            self.stages.append(nn.ModuleList([
                LWABlock(dim, heads, mlp_ratio, window_size) if i % 2 == 0 else
                LGABlock(dim, heads, mlp_ratio, **VARIANTS[variant]) for i in range(depth)]))
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], num_classes)
        init_linear_(self)

    def forward_tokens(self, x: torch.Tensor, stop_at: tuple[int, int] | None = None):
        """Tokens through the stages; with ``stop_at=(stage, block)`` returns (tokens entering that block, size)."""
        check_images(x, self.in_chans, self.img_size, "L2ViT")
        x = self.stem(x)  # [B, C0, H/2, W/2]
        for s, blocks in enumerate(self.stages):
            if s == 1:
                x = self.down(x)
            size = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
            if s == 1:
                x = self.down_norm(x)
            for b, blk in enumerate(blocks):
                if stop_at == (s, b):
                    return x, tuple(size)
                x = blk(x, tuple(size))
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *size)
        return x.flatten(2).transpose(1, 2), tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward_tokens(x)
        return self.head(self.norm(tokens.mean(dim=1)))


def map_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of attention rows after normalising each to sum 1: [..., N, N] -> scalar. A uniform
    row over N tokens has entropy log N; a one-hot row 0."""
    p = attn.clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-12).log()).sum(-1).mean()


# ~0.12 M parameters (the control ViT: 0.14 M); per training step about 1.6x the control's on one CPU thread (the
# depthwise 7x7 convolutions of the LCM on 14 x 14 tokens are most of the difference)
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, dims=(24, 72), depths=(2, 2), num_heads=(1, 2),
              mlp_ratio=2.0, window_size=7)
for _name, _variant in (("l2vit", "l2vit"), ("l2vit_nolcm", "linear"), ("l2vit_softmax", "softmax")):
    recipes.register(_name, L2ViT, variant=_variant, **CONFIG)
