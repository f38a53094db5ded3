"""Gaussian-mixture mask attention (Z. Zhang, C. Li et al., "RetNet viewed through convolution", Pattern
Recognition 2024; official code: CatworldLee/Gaussian-Mixture-Mask-Attention, ``models/gmm.py``:
``Gaussian_Mixture_Mask``, ``Simple_Mask``, ``On_attention_gaussian_mask``; ``models/vit.py``: ``Attention``, ``ViT``).

RetNet's decay mask makes a token attend mostly to its neighbours, like a convolution. The paper transfers that
locality to ViTs with a learnable mask built from the grid distances d_ij between patches:

    D_ij = exp(-d_ij^2 / 2)                                  (fixed, ``distance_mask``)
    M    = sum_k alpha_k D^(1 / (sigma_k^2 + 1e-5))          (per layer, head and kernel k: learnable sigma, alpha)
    attn = softmax(M * (q k^T / sqrt(d)))                     (MULTIPLIED into the scaled logits)

so a far token's logit is pulled towards 0 (not -inf): locality as a distance-dependent temperature. The official
init is sigma ~ N(10, 10), alpha ~ N(0, 2): nearly flat masks at the start. With the mask the official ViT drops
the CLS token and pools the tokens by their mean; ``Simple_Mask`` (ELM, "every location mask") learns a full
N x N multiplicative matrix instead (init 0: uniform attention at the start). Cost: 2 K H parameters a layer.

A second, course-side variant: ``mask="bias"`` uses ``vitlab.kernels.attention``'s in-kernel Gaussian-mixture
*additive* bias, log sum_m w_m exp(-d^2 / 2 sigma_m^2) (a log-domain prior: far tokens get large negative logits),
which the fused Triton kernel computes from token coordinates without an N x N mask in memory. It is NOT the
paper's formulation (the paper multiplies); the lesson compares both.

Deviations from the official code, named: vitlab's blocks and initialisation (timm's) instead of the official
xavier init; qkv with bias (the official has none); ``num_kernels`` 5 as the official default.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int
from vitlab.kernels.attention import GaussianMixtureBias, attention, grid_coords
from vitlab.models.vit import Attention, VisionTransformer

from . import recipes

__all__ = ["distance_mask", "GaussianMixtureMask", "LearnedMask", "MaskedAttention", "gmm_vit", "MASKS", "CONFIG"]

MASKS = ("none", "gmm", "elm", "bias")


def distance_mask(grid: int) -> torch.Tensor:
    """D_ij = exp(-|p_i - p_j|^2 / 2) over a grid x grid patch grid in raster order: [N, N], 1 on the diagonal."""
    check_int(grid, "grid", "distance_mask", low=1)
    c = grid_coords(grid, grid, num_prefix=0)
    return torch.exp(-0.5 * torch.cdist(c, c).pow(2))


class GaussianMixtureMask(nn.Module):
    """M = sum_k alpha_k D^(1/(sigma_k^2 + 1e-5)), one (sigma, alpha) per kernel and head; forward multiplies it
    into the scaled logits [B, H, N, N]."""

    def __init__(self, num_heads: int, num_kernels: int, grid: int):
        super().__init__()
        check_int(num_heads, "num_heads", "GaussianMixtureMask", low=1)
        check_int(num_kernels, "num_kernels", "GaussianMixtureMask", low=1)
        self.sigma = nn.Parameter(torch.randn(num_kernels, num_heads, 1, 1) * 10 + 10)
        self.alpha = nn.Parameter(torch.randn(num_kernels, num_heads, 1, 1) * 2)
        self.register_buffer("D", distance_mask(grid), persistent=False)

    def mask(self) -> torch.Tensor:
        """M [H, N, N]."""
        return (self.alpha * self.D ** (1.0 / (self.sigma ** 2 + 1e-5))).sum(0)

    def forward(self, dots: torch.Tensor) -> torch.Tensor:
        return self.mask() * dots


class LearnedMask(nn.Module):
    """ELM: a learned N x N matrix multiplied into the logits (official ``Simple_Mask``; init 0)."""

    def __init__(self, num_patches: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_patches, num_patches))

    def mask(self) -> torch.Tensor:
        return self.weight

    def forward(self, dots: torch.Tensor) -> torch.Tensor:
        return self.weight * dots


class MaskedAttention(Attention):
    """vitlab's Attention with a locality mask on its logits: ``mask`` in MASKS ("none": plain)."""

    def __init__(self, dim: int, num_heads: int, grid: int, mask: str = "gmm", num_kernels: int = 5,
                 qkv_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.mask_type = check_choice(mask, MASKS, "mask", "MaskedAttention")
        self.grid = grid
        self.mask = None
        if mask == "gmm":
            self.mask = GaussianMixtureMask(num_heads, num_kernels, grid)
        elif mask == "elm":
            self.mask = LearnedMask(grid * grid)
        elif mask == "bias":  # the kernel's additive mixture: sigma > 0 through exp, weights through softmax
            from vitlab.kernels.attention import SUPPORTED_HEAD_DIMS

            if self.head_dim not in SUPPORTED_HEAD_DIMS:
                raise ValueError(f"MaskedAttention: mask='bias' runs through vitlab.kernels.attention, which takes "
                                 f"head dims {list(SUPPORTED_HEAD_DIMS)}; got dim/num_heads = {self.head_dim}")
            m = min(num_kernels, 4)  # the kernel takes at most 4 components
            self.log_sigma = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, m)).repeat(num_heads, 1))
            self.mix_logits = nn.Parameter(torch.zeros(num_heads, m))
            self.register_buffer("coords", grid_coords(grid, grid, num_prefix=0), persistent=False)

    def gmm_bias(self) -> GaussianMixtureBias:
        return GaussianMixtureBias(self.coords, self.coords, self.log_sigma.exp(), self.mix_logits)

    def forward(self, x: torch.Tensor, attn_bias=None, side=()):
        if x.shape[1] != self.grid * self.grid:
            raise ValueError(f"MaskedAttention: {x.shape[1]} tokens; expected grid^2 = {self.grid ** 2} (no CLS)")
        q, k, v = self.qkv_heads(x)
        if self.mask_type == "bias":  # fused on CUDA (vitlab.kernels.attention), the dense reference elsewhere
            out = attention(q, k, v, scale=self.scale, gmm=self.gmm_bias())
        elif self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.mask(self.logits(q, k)).softmax(dim=-1) @ v
        return self.merge_heads(out)

    def locality(self) -> torch.Tensor:
        """The mask as the attention sees it, [H, N, N]: M for "gmm" / "elm", the additive bias for "bias"."""
        if self.mask_type == "bias":
            return self.gmm_bias().dense()[0]
        if self.mask is None:
            raise ValueError("MaskedAttention: mask='none' has no locality mask")
        return self.mask.mask().expand(self.num_heads, -1, -1)


def gmm_vit(img_size: int = 28, in_chans: int = 1, num_classes: int = 10, patch_size: int = 4, embed_dim: int = 64,
            depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, mask: str = "gmm",
            num_kernels: int = 5) -> VisionTransformer:
    """The official GMM-ViT layout on vitlab's ViT: position embedding, NO CLS token, mean-pooled tokens, and a
    ``MaskedAttention`` in every block. ``mask="none"`` is the mean-pooling ViT control (same layout, no mask)."""
    check_choice(mask, MASKS, "mask", "gmm_vit")
    if img_size % patch_size:
        raise ValueError(f"gmm_vit: patch_size={patch_size} does not divide img_size={img_size}")
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            global_pool="avg", class_token=False, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=mlp_ratio)
    grid = img_size // patch_size
    for blk in vit.blocks:
        attn = MaskedAttention(embed_dim, num_heads, grid, mask, num_kernels)
        attn.load_state_dict(blk.attn.state_dict(), strict=False)  # the same qkv / proj initialisation
        blk.attn = attn
    return vit


# The lesson: the chapter's plain ViT shape (4 x 64, 4 heads, patch 4) in the GMM layout (mean pooling, no CLS),
# per mask; "none" separates the effect of the mask from that of dropping the CLS token.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0, num_kernels=5)
for _mask in MASKS:
    recipes.register("gmm_vit" if _mask == "gmm" else f"gmm_vit_{_mask}", gmm_vit, mask=_mask, **CONFIG)
