"""VOLO: outlook attention for fine-level tokens, then self-attention and class attention (Yuan, Hou, Jiang, Feng,
Yan; TPAMI 2022).

Paper: L. Yuan, Q. Hou, Z. Jiang, J. Feng, S. Yan, "VOLO: Vision Outlooker for Visual Recognition", TPAMI 2022,
arXiv:2106.13112. Official code: https://github.com/sail-sg/volo (``models/volo.py``: ``OutlookAttention``,
``Outlooker``, ``Attention``, ``Transformer``, ``ClassAttention``, ``ClassBlock``, ``PatchEmbed``,
``Downsample``, ``VOLO``); timm's ``timm/models/volo.py`` (``VOLO``) is a faithful port of it. Written from the
paper and that code; no line of it is copied.

Outlook attention on a feature map x [B, H, W, C], window K (3), stride s (2 in VOLO), heads h:

    v      = Wv x                                   values, unfolded into K×K neighbourhoods around each of the
                                                    ceil(H/s)·ceil(W/s) window centres: [B, h, L, K², C/h]
    A      = W_A AvgPool_s(x)                       attention weights straight from the (pooled) centre token:
                                                    Linear(C -> h·K⁴) -> [B, h, L, K², K²], no q·k products
    y_win  = softmax(A · (C/h)^-1/2, over last K²) @ v     each of the K² outputs of a window: a mix of its K² values
    y      = Wo Fold(y_win)                         overlapping windows' outputs summed back onto the H×W map

Cost: per window K²·K² weights, so O(L·K⁴·C) — linear in the number of tokens, where self-attention's N×N
scores are quadratic. VOLO stacks Outlookers (outlook attention + MLP) on the fine map (1/8 of ImageNet's 224 px
in the paper), a 2×2 patch-merge downsample, position embeddings, MHSA Transformer blocks on the coarse map, and
class-attention blocks (a CLS token reads the tokens; only the CLS is updated) before the head.

State-dict keys equal timm's ``VOLO`` (``patch_embed.conv.*`` / ``patch_embed.proj``, ``network.0.i.attn.{v,attn,
proj}``, ``network.1.proj`` (downsample), ``network.k.i.attn.{qkv,proj}``, ``pos_embed``, ``cls_token``,
``post_network.i.attn.{kv,q,proj}``, ``norm``, ``head``, ``aux_head``), so timm's weights load as they are.

Deviations from the official code (at the lesson's scale; none changes the forward on the same weights):
- the layout is fixed to VOLO's one: stage 0 Outlookers, one 2× downsample, then MHSA stages (the official
  ``downsamples`` / ``outlook_attention`` flags are always (True, False, ...) in its configs);
- ``patch_size`` may be any even number (timm: 4, 8 or 16): the lesson's 28-px digits use patch 2, a 14×14 map
  for the Outlookers (the stem's stride-2 convs, then a 1×1 projection), 7×7 for the MHSA blocks;
- the token-labelling auxiliary head is off by default (``use_aux_head=False``): it needs a teacher's dense
  labels to train; when on, it is the official inference rule (logits + 0.5 · max over tokens of aux logits);
- one ``mlp_ratio`` for every stage, as timm (the official code takes one per stage; its configs use one value);
- the MHSA blocks are the course's ``vitlab.models.vit.Block`` on [B, N, C] tokens (the official ``Transformer``
  works on [B, H, W, C]; the same function and parameter names);
- no MixToken, no dropout / stochastic depth (0 in the lesson).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from vitlab.checks import check_heads, check_images, check_int, check_ndim, check_number
from vitlab.models.vit import Block, init_linear_

__all__ = ["OutlookAttention", "Outlooker", "ClassAttention", "ClassBlock", "Stem", "Downsample", "VOLO", "TINY",
]

# The lesson's VOLO-tiny on 28-px digits: stem to 14×14 (patch 2, 8 hidden channels), 1 Outlooker (width 24, 1 head,
# K 3, stride 2), downsample to 7×7, 1 MHSA block (width 64, 4 heads), 1 class-attention block, MLP ratio 3 (VOLO's).
# ~0.10 M parameters (0.73× the plain-ViT control) and about the control's time per training step at one thread: on
# 196 tokens one Outlooker costs about two of the control's blocks on 50 tokens, so VOLO-tiny has fewer, wider blocks.
TINY = dict(patch_size=2, stem_hidden_dim=8, layers=(1, 1), embed_dims=(24, 64), num_heads=(1, 4), mlp_ratio=3.0,
            num_post_layers=1)

LayerNorm = nn.LayerNorm  # VOLO's norm layer: eps 1e-5 (unlike the ViT's 1e-6)


class OutlookAttention(nn.Module):
    """Outlook attention on [B, H, W, C] -> [B, H, W, C] (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 1,
                 qkv_bias: bool = False):
        super().__init__()
        head_dim = check_heads(dim, num_heads, "OutlookAttention")
        check_int(kernel_size, "kernel_size", "OutlookAttention")
        check_int(padding, "padding", "OutlookAttention", low=0)
        check_int(stride, "stride", "OutlookAttention")
        self.num_heads, self.kernel_size, self.padding, self.stride = num_heads, kernel_size, padding, stride
        self.scale = head_dim ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)  # K² weights for each of the K² outputs, per head
        self.proj = nn.Linear(dim, dim)

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """The window centres' grid: ceil(H / stride) x ceil(W / stride) (the pooling's ceil mode)."""
        return math.ceil(H / self.stride), math.ceil(W / self.stride)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmaxed outlook weights [B, heads, L, K², K²] (L window centres; rows sum to 1)."""
        B, H, W, C = x.shape
        h, w = self.grid(H, W)
        K2 = self.kernel_size ** 2
        centre = F.avg_pool2d(x.permute(0, 3, 1, 2), self.stride, self.stride, ceil_mode=True)  # [B, C, h, w]
        a = self.attn(centre.permute(0, 2, 3, 1)).reshape(B, h * w, self.num_heads, K2, K2).transpose(1, 2)
        return (a * self.scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_ndim(x, 4, "x", "OutlookAttention")
        B, H, W, C = x.shape
        if C != self.v.in_features:
            raise ValueError(f"OutlookAttention: x must be [B, H, W, {self.v.in_features}], got {tuple(x.shape)}")
        h, w = self.grid(H, W)
        K, K2, nh = self.kernel_size, self.kernel_size ** 2, self.num_heads
        v = F.unfold(self.v(x).permute(0, 3, 1, 2), K, padding=self.padding, stride=self.stride)  # [B, C·K², L]
        if v.shape[-1] != h * w:
            raise ValueError(f"OutlookAttention: kernel_size={K}, padding={self.padding}, stride={self.stride} give "
                             f"{v.shape[-1]} windows on a {H}x{W} map, not ceil(H/s)·ceil(W/s) = {h * w}")
        v = v.reshape(B, nh, C // nh, K2, h * w).permute(0, 1, 4, 3, 2)  # [B, heads, L, K², C/heads]
        y = self.weights(x) @ v                                           # [B, heads, L, K², C/heads]
        y = y.permute(0, 1, 4, 3, 2).reshape(B, C * K2, h * w)
        y = F.fold(y, (H, W), K, padding=self.padding, stride=self.stride)  # overlapping windows summed
        return self.proj(y.permute(0, 2, 3, 1))


class Outlooker(nn.Module):
    """x + OutlookAttention(LN(x)), then x + MLP(LN(x)), on [B, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 2,
                 mlp_ratio: float = 3.0, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassAttention(nn.Module):
    """The CLS token (first of [B, N, C]) reads all N tokens; returns its update [B, 1, C]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, check_heads(dim, num_heads, "ClassAttention")
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, Dh]
        return self.proj(out.transpose(1, 2).reshape(B, 1, C))


class ClassBlock(nn.Module):
    """cls += ClassAttention(LN([cls; tokens])); cls += MLP(LN(cls)); the other tokens pass unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class Stem(nn.Module):
    """VOLO's patch embedding: conv 7×7 stride 2 + two conv 3×3 (each BN + ReLU), then a (p/2)×(p/2) stride-p/2
    projection: an image [B, C, H, W] -> [B, D, H/p, W/p]."""

    def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x))


class Downsample(nn.Module):
    """2×2 patch merging by a stride-2 conv, [B, H, W, C] -> [B, H/2, W/2, C']."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VOLO(nn.Module):
    """Stem -> Outlookers (stage 0) -> downsample 2× -> + positions -> MHSA stages -> class-attention blocks -> head.

    ``layers[i]`` blocks in stage i (stage 0: Outlookers, the others: MHSA) at width ``embed_dims[i]`` with
    ``num_heads[i]`` heads; ``num_post_layers`` class-attention blocks at the last width."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, patch_size: int = 2,
                 stem_hidden_dim: int = 8, layers: Sequence[int] = (1, 2), embed_dims: Sequence[int] = (32, 64),
                 num_heads: Sequence[int] = (1, 4), mlp_ratio: float = 2.0, kernel_size: int = 3,
                 outlook_stride: int = 2, num_post_layers: int = 1, use_aux_head: bool = False,
                 qkv_bias: bool = False):
        super().__init__()
        for name, val in (("img_size", img_size), ("in_chans", in_chans), ("num_classes", num_classes),
                          ("patch_size", patch_size), ("stem_hidden_dim", stem_hidden_dim),
                          ("kernel_size", kernel_size), ("outlook_stride", outlook_stride),
                          ("num_post_layers", num_post_layers)):
            check_int(val, name, "VOLO")
        check_number(mlp_ratio, "mlp_ratio", "VOLO", low=0, low_open=True)
        layers, embed_dims, num_heads = tuple(layers), tuple(embed_dims), tuple(num_heads)
        if len(layers) < 2 or len(embed_dims) != len(layers) or len(num_heads) != len(layers):
            raise ValueError(f"VOLO: layers, embed_dims and num_heads must have one entry per stage (>= 2: "
                             f"Outlookers, then MHSA), got {layers}, {embed_dims}, {num_heads}")
        for i, (n, d, h) in enumerate(zip(layers, embed_dims, num_heads)):
            check_int(n, f"layers[{i}]", "VOLO")
            check_int(d, f"embed_dims[{i}]", "VOLO")
            check_int(h, f"num_heads[{i}]", "VOLO")
            if d % h:
                raise ValueError(f"VOLO: num_heads[{i}]={h} does not divide embed_dims[{i}]={d}")
        if patch_size % 2 or img_size % patch_size or (img_size // patch_size) % 2:
            raise ValueError(f"VOLO: patch_size must be even and img_size / patch_size an even number (the stem "
                             f"has stride 2, the downsample 2), got patch_size={patch_size}, img_size={img_size}")
        if kernel_size % 2 == 0:
            raise ValueError(f"VOLO: kernel_size must be odd (a window centred on its token), got {kernel_size}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.patch_embed = Stem(in_chans, stem_hidden_dim, embed_dims[0], patch_size)
        grid = img_size // patch_size // 2  # the coarse map after the downsample
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[-1]))
        pad = kernel_size // 2
        network = [nn.Sequential(*[Outlooker(embed_dims[0], num_heads[0], kernel_size, pad, outlook_stride,
                                             mlp_ratio, qkv_bias) for _ in range(layers[0])]),
                   Downsample(embed_dims[0], embed_dims[1], 2)]
        for i in range(1, len(layers)):
            if i > 1 and embed_dims[i] != embed_dims[i - 1]:
                raise ValueError(f"VOLO: the MHSA stages share one width (no downsample between them), got "
                                 f"embed_dims={embed_dims}")
            network.append(nn.Sequential(*[Block(embed_dims[i], num_heads[i], mlp_ratio, qkv_bias=qkv_bias,
                                                 norm_layer=LayerNorm) for _ in range(layers[i])]))
        self.network = nn.ModuleList(network)
        dim = embed_dims[-1]
        self.post_network = nn.ModuleList([ClassBlock(dim, num_heads[-1], mlp_ratio, qkv_bias)
                                           for _ in range(num_post_layers)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.aux_head = nn.Linear(dim, num_classes) if use_aux_head else None
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, [B, 1 + N, C] (CLS first)."""
        check_images(x, self.in_chans, self.img_size, "VOLO")
        x = self.patch_embed(x).permute(0, 2, 3, 1)       # [B, H/p, W/p, C0]: the fine map
        x = self.network[1](self.network[0](x))           # Outlookers, then downsample 2×
        x = (x + self.pos_embed).flatten(1, 2)            # positions after the Outlookers; [B, N, C]
        for stage in self.network[2:]:
            x = stage(x)                                  # MHSA blocks
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.post_network:
            x = blk(x)                                    # class attention: only the CLS changes
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x[:, 0])
        if self.aux_head is not None:  # token labelling's inference rule
            out = out + 0.5 * self.aux_head(x[:, 1:]).max(dim=1)[0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _register() -> None:
    from vitlab.methods.architectures import recipes

    recipes.register("volo", VOLO, img_size=28, in_chans=1, num_classes=10, **TINY)


_register()
