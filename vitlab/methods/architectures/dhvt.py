"""DHVT: Dynamic Hybrid Vision Transformer (Lu et al., NeurIPS 2022; arXiv:2210.05958).

Paper: Z. Lu, H. Xie, C. Liu, Y. Zhang, "Bridging the Gap Between Vision Transformers and Convolutional Neural
Networks on Small Datasets", NeurIPS 2022. Official code: https://github.com/ArieSeirack/DHVT
(``vision_transformer.py``: ``Affine``, ``ConvPatchEmbed`` (= SOPE), ``DAFF``, ``HI_Attention``, ``DHVT_Block``,
``VisionTransformer(apply_dhvt=True)``). Written from the paper and that code; no line of it is copied.

A ViT trained from scratch on a small dataset lacks the CNN's locality and its channel interplay. DHVT puts
both back with three changes to a plain ViT, and drops the absolute position embedding:

- **SOPE** (sequential overlapping patch embedding): ``Affine -> conv3x3 s2 + BN -> GELU -> conv3x3 s2 + BN ->
  Affine`` (patch 4: two stride-2 convs, widths D/2 and D). Overlapping convs give the tokens local, position-
  aware content, so no position embedding is added. ``Affine(x) = x · α + β`` per channel (α = 1, β = 0 at init).
- **DAFF** (dynamic aggregation feed-forward) replaces the MLP. The patch tokens go back onto their grid:

      h = GELU(BN(conv1x1(x)));   h = h + GELU(BN(DWconv3x3(h)));   y = BN(conv1x1(h))
      CLS' = CLS ⊙ W_e GELU(W_c · mean_grid(y))        (squeeze-excitation, reduction 4, NO sigmoid)

  The CLS token bypasses the convs: it is only rescaled, channel by channel, by weights from the pooled output.
- **HI-MHSA** (head-interacting attention): the input (after LayerNorm) is split into h channel groups, each
  group averaged over all N tokens (CLS included) and projected ``Linear(D/h -> D)`` into one "head token";
  each head token is normalised in chunks of D/h channels (``LayerNorm(D/h)``), passed through GELU and given
  a learned head position. The h head tokens are appended, ordinary MHSA runs over N + h tokens, and after the
  output projection the head tokens' mean is added to the CLS token and they are dropped.

Deviations from the official code:
- ``in_chans`` is a parameter (the official SOPE hard-codes 3 input channels); the digits have one;
- ``BatchNorm2d`` in SOPE where the official code has ``SyncBatchNorm`` (the same on one process);
- patch sizes 2^n generally (the official code has 2, 4 and 16: widths D/2^(n-1) .. D/2, D, GELU between the
  convs; patch 2 keeps its trailing GELU); the image side must be divisible by the patch size;
- no distillation token / pre-logits (unused in the official DHVT runs).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from vitlab.checks import check_heads, check_images, check_int, check_number
from vitlab.models.vit import init_linear_

from . import recipes

__all__ = ["Affine", "SOPE", "DAFF", "HIAttention", "DHVTBlock", "DHVT", "CONFIG"]

# The lesson's DHVT-tiny for 28-px digits: the control's depth, width, heads and MLP ratio (4 x 64, 4 heads,
# ratio 2), with DHVT's three changes; the extra parameters are the conv stem, the SE and the head-token layers.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0)


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


class Affine(nn.Module):
    """Per-channel ``x · α + β`` on a [B, C, H, W] map (official ``Affine``; α = 1, β = 0 at init)."""

    def __init__(self, dim: int):
        super().__init__()
        check_int(dim, "dim", "Affine")
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha + self.beta


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout))


class SOPE(nn.Module):
    """Sequential overlapping patch embedding (official ``ConvPatchEmbed``): pre-affine, log2(patch) stride-2
    conv3x3+BN layers with GELU between them, post-affine; tokens [B, (H/p)·(W/p), D], no position embedding."""

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64):
        super().__init__()
        fn = "SOPE"
        self.img_size = check_int(img_size, "img_size", fn)
        self.patch_size = check_int(patch_size, "patch_size", fn, low=2)
        self.in_chans = check_int(in_chans, "in_chans", fn)
        check_int(embed_dim, "embed_dim", fn)
        n = patch_size.bit_length() - 1
        if 2 ** n != patch_size:
            raise ValueError(f"{fn}: patch_size must be a power of 2 (one stride-2 conv each), got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"{fn}: patch_size={patch_size} does not divide img_size={img_size}")
        widths = [embed_dim // 2 ** (n - 1 - i) for i in range(n)]  # patch 4: D/2, D; patch 16: D/8 .. D
        if widths[0] < 1:
            raise ValueError(f"{fn}: embed_dim={embed_dim} is too small for patch_size={patch_size} "
                             f"(the first conv would have {embed_dim}/{2 ** (n - 1)} channels)")
        layers, cin = [], in_chans
        for i, w in enumerate(widths):
            layers.append(_conv_bn(cin, w))
            if i < n - 1 or n == 1:  # GELU between convs; the official patch-2 stem ends with one
                layers.append(nn.GELU())
            cin = w
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "SOPE")
        x = self.post_affine(self.proj(self.pre_affine(x)))
        return x.flatten(2).transpose(1, 2)


class DAFF(nn.Module):
    """Dynamic aggregation feed-forward (official ``DAFF``): conv FFN on the patch grid, SE-rescaled CLS.
    Input and output [B, 1 + H·W, C] (CLS first, a square grid after it)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, kernel_size: int = 3):
        super().__init__()
        fn = "DAFF"
        check_int(in_features, "in_features", fn, low=4)
        hidden_features = in_features if hidden_features is None else check_int(hidden_features, "hidden_features", fn)
        check_int(kernel_size, "kernel_size", fn)
        if kernel_size % 2 == 0:
            raise ValueError(f"{fn}: kernel_size must be odd (same-size depthwise conv), got {kernel_size}")
        self.conv1 = nn.Conv2d(in_features, hidden_features, 1)
        self.conv2 = nn.Conv2d(hidden_features, hidden_features, kernel_size, padding=kernel_size // 2,
                               groups=hidden_features)
        self.conv3 = nn.Conv2d(hidden_features, in_features, 1)
        self.act = nn.GELU()
        self.bn1 = nn.BatchNorm2d(hidden_features)
        self.bn2 = nn.BatchNorm2d(hidden_features)
        self.bn3 = nn.BatchNorm2d(in_features)
        self.compress = nn.Linear(in_features, in_features // 4)  # SE, reduction 4 as in the official code
        self.excitation = nn.Linear(in_features // 4, in_features)

    def se_weight(self, y: torch.Tensor) -> torch.Tensor:
        """The CLS token's channel weights from the conv output y [B, C, H, W]: W_e GELU(W_c mean(y)), [B, 1, C]."""
        return self.excitation(self.act(self.compress(y.mean(dim=(2, 3)))))[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.conv1.in_channels:
            raise ValueError(f"DAFF: x must be [B, 1 + H*W, {self.conv1.in_channels}], got {_shape(x)}")
        B, N, C = x.shape
        side = math.isqrt(N - 1)
        if side * side != N - 1:
            raise ValueError(f"DAFF: x has N={N} tokens; expected a CLS token and a square grid (1 + H*W)")
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(B, C, side, side)
        h = self.act(self.bn1(self.conv1(grid)))
        h = h + self.act(self.bn2(self.conv2(h)))  # depthwise conv with a residual around it
        y = self.bn3(self.conv3(h))
        return torch.cat([cls * self.se_weight(y), y.flatten(2).transpose(1, 2)], dim=1)


class HIAttention(nn.Module):
    """Head-interacting MHSA (official ``HI_Attention``): h head tokens from channel-group means join the tokens;
    after attention their mean is added to the CLS token and they are dropped."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True):
        super().__init__()
        fn = "HIAttention"
        head_dim = check_heads(dim, num_heads, fn)
        self.dim, self.num_heads, self.head_dim = dim, int(num_heads), head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.ht_proj = nn.Linear(self.head_dim, dim)
        self.ht_norm = nn.LayerNorm(self.head_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_heads, dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> the h head tokens [B, h, D]: group g's channels averaged over the N tokens, projected
        D/h -> D, normalised per chunk of D/h channels, GELU, plus the head positions."""
        B, N, D = x.shape
        h = self.num_heads
        g = x.reshape(B, N, h, self.head_dim).mean(dim=1)  # [B, h, D/h]
        t = self.ht_proj(g).reshape(B, h, h, self.head_dim)  # each head token as h chunks of D/h
        return self.act(self.ht_norm(t)).flatten(2) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"HIAttention: x must be [B, N, dim={self.dim}], got {_shape(x)}")
        B, N, D = x.shape
        x = torch.cat([x, self.head_tokens(x)], dim=1)  # [B, N + h, D]
        q, k, v = self.qkv(x).reshape(B, N + self.num_heads, 3, self.num_heads, self.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N + self.num_heads, D))
        cls, patches, heads = out.split([1, N - 1, self.num_heads], dim=1)
        return torch.cat([cls + heads.mean(dim=1, keepdim=True), patches], dim=1)


class DHVTBlock(nn.Module):
    """Pre-norm block (official ``DHVT_Block``): x + HI-MHSA(LN(x)), then x + DAFF(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        check_number(mlp_ratio, "mlp_ratio", "DHVTBlock", low=0, low_open=True)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HIAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DAFF(dim, max(1, int(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DHVT(nn.Module):
    """DHVT (official ``VisionTransformer(apply_dhvt=True)``): SOPE, CLS token (no position embedding),
    DHVT blocks, LayerNorm, a linear head on the CLS token."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, patch_size: int = 4,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        fn = "DHVT"
        check_int(num_classes, "num_classes", fn)
        check_int(depth, "depth", fn)
        check_number(drop_path_rate, "drop_path_rate", fn, low=0, high=1, high_open=True)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_embed = SOPE(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[DHVTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i])
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.cls_token, std=0.02)
        init_linear_(self)  # the official init (timm's): Linear trunc-normal 0.02; norms, convs default

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def extra_repr(self) -> str:
        return f"tokens={self.patch_embed.num_patches}+1, dim={self.embed_dim}, depth={len(self.blocks)}"


recipes.register("dhvt", DHVT, **CONFIG)
