"""DuoFormer: CNN features at several scales as tokens, attention across scales then across the image
(X. Tang et al., "DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention", MIDL 2025;
author's code: xiaoyatang/duoformer_TCGA (read through the fork AliSerwat/duoformer_TCGA): ``models/model.py``
(``MyModel``: backbone features, region index tables), ``models/multi_vision_transformer.py``
(``MultiscaleTransformer``), ``models/multiscale_attn.py``, ``models/scale_attention.py``).

A hybrid ViT usually tokenises only a CNN's last feature map. DuoFormer keeps the pyramid: the image is divided
into regions, one per cell of the coarsest map, and each region gathers its tokens from every scale:

    region r  =  [ channel token ; 1 token of the coarsest map ; 2x2 of the middle map ; 4x4 of the finest map ]
              =  1 + 1 + 4 + 16 = 22 tokens (3 scales), each scale projected to width d, + a scale embedding

1. **Scale attention**: self-attention *inside* each region, across its scales (many short sequences: the
   batch becomes B x regions).
2. **Patch attention**: the first token of every region plus a CLS token, with position embeddings, attend
   across the image; the classifier reads the CLS token.

Deviations, named: 28 px digits are zero-padded to 32 px so that the three maps are 16, 8 and 4 px (4 x 4
regions); a 3-stage tiny CNN stands for the ResNet-50 backbone; the channel token is the mean of the region's
projected tokens plus a learned embedding (a paper-level reading of its channel-fusion token); LayerScale
(init 1e-5) as the official scale-attention blocks; the patch-attention blocks keep their residual and MLP (the
released code drops them and leaves its middle blocks unused, which the curriculum notes as a bug).
``single_scale=True`` is the official ``HybridModel`` analogue: the same CNN, only its coarsest map as tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerScale

from vitlab.checks import check_images, check_int
from vitlab.models.layers import trunc_normal_
from vitlab.models.vit import Block, LayerNorm, init_linear_

from . import recipes

__all__ = ["TinyPyramid", "region_index", "gather_regions", "DuoFormer", "CONFIG"]


class TinyPyramid(nn.Module):
    """Three conv stages, each halving the resolution: 32 px -> maps at 16, 8 and 4 px with ``widths`` channels."""

    def __init__(self, in_chans: int = 1, widths=(16, 32, 64)):
        super().__init__()
        stages, c = [], in_chans
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                        nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            c = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps  # finest first


def region_index(coarse: int, factor: int) -> torch.Tensor:
    """For a map ``factor`` times finer than the coarse grid (coarse x coarse regions), the flat indices of each
    region's factor x factor cells: [coarse^2, factor^2] (the official region index tables)."""
    check_int(coarse, "coarse", "region_index", low=1)
    check_int(factor, "factor", "region_index", low=1)
    fine = coarse * factor
    r, c = torch.meshgrid(torch.arange(coarse), torch.arange(coarse), indexing="ij")
    dr, dc = torch.meshgrid(torch.arange(factor), torch.arange(factor), indexing="ij")
    rows = r.reshape(-1, 1) * factor + dr.reshape(1, -1)
    cols = c.reshape(-1, 1) * factor + dc.reshape(1, -1)
    return rows * fine + cols


def gather_regions(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens [B, fine^2, D], index [R, k] -> [B, R, k, D]."""
    B, N, D = tokens.shape
    return tokens[:, index.reshape(-1)].reshape(B, *index.shape, D)


class DuoFormer(nn.Module):
    """CNN pyramid -> per-region multi-scale tokens -> scale attention -> patch attention -> CLS head."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, widths=(16, 32, 64),
                 embed_dim: int = 64, scale_depth: int = 2, patch_depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 2.0, single_scale: bool = False):
        super().__init__()
        if img_size > 32:
            raise ValueError(f"DuoFormer: img_size={img_size}; this tiny model pads inputs up to 32 px")
        self.img_size, self.in_chans, self.single_scale = img_size, in_chans, single_scale
        self.pad = (32 - img_size) // 2, 32 - img_size - (32 - img_size) // 2
        self.cnn = TinyPyramid(in_chans, widths)
        self.coarse = 4  # 32 px / 8
        # one projection per map that becomes tokens (the single-scale hybrid tokenises only the coarsest)
        self.proj = nn.ModuleList([nn.Linear(w, embed_dim) for w in (widths[-1:] if single_scale else widths)])
        if not single_scale:
            self.register_buffer("idx_fine", region_index(4, 4), persistent=False)  # [16, 16]
            self.register_buffer("idx_mid", region_index(4, 2), persistent=False)  # [16, 4]
            self.scale_embed = nn.Parameter(torch.zeros(1, 1, 22, embed_dim))  # per slot of a region
            self.channel_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
            self.scale_blocks = nn.ModuleList([self._block(embed_dim, num_heads, mlp_ratio, layerscale=True)
                                               for _ in range(scale_depth)])
            trunc_normal_(self.scale_embed, std=0.02)
        depth = patch_depth if not single_scale else scale_depth + patch_depth
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.coarse ** 2, embed_dim))
        self.patch_blocks = nn.ModuleList([self._block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_(self)

    @staticmethod
    def _block(dim, heads, mlp_ratio, layerscale=False):
        blk = Block(dim, heads, mlp_ratio)
        if layerscale:
            blk.ls1, blk.ls2 = LayerScale(dim, 1e-5), LayerScale(dim, 1e-5)
        return blk

    def region_tokens(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """[B, 16 regions, 22, D]: channel token, coarse (1), middle (4), fine (16) tokens of each region."""
        fine, mid, coarse = (p(m.flatten(2).transpose(1, 2)) for p, m in zip(self.proj, maps))
        B, _, D = coarse.shape
        parts = [coarse[:, :, None], gather_regions(mid, self.idx_mid), gather_regions(fine, self.idx_fine)]
        scales = torch.cat(parts, dim=2)  # [B, 16, 21, D]
        channel = scales.mean(dim=2, keepdim=True) + self.channel_token
        return torch.cat([channel, scales], dim=2) + self.scale_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "DuoFormer")
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        maps = self.cnn(x)
        if self.single_scale:
            tokens = self.proj[0](maps[-1].flatten(2).transpose(1, 2))  # [B, 16, D]
        else:
            regions = self.region_tokens(maps)  # [B, R, 22, D]
            B, R, K, D = regions.shape
            z = regions.reshape(B * R, K, D)
            for blk in self.scale_blocks:  # attention inside each region, across its scales
                z = blk(z)
            tokens = z.reshape(B, R, K, D)[:, :, 0]  # each region's first token
        t = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for blk in self.patch_blocks:
            t = blk(t)
        return self.head(self.norm(t)[:, 0])


# The lesson: one scale-attention and three patch-attention blocks at width 56 over a 12/24/48-channel pyramid
# (0.15 M parameters, 1.09x the control ViT); the single-scale hybrid has the same CNN and four ViT blocks on the
# coarsest map (0.15 M). The 16 x 22 region tokens make a DuoFormer step ~2.5x the control's on one CPU thread.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, widths=(12, 24, 48), embed_dim=56, scale_depth=1,
              patch_depth=3, num_heads=4, mlp_ratio=2.0)
recipes.register("duoformer", DuoFormer, single_scale=False, **CONFIG)
recipes.register("duoformer_single_scale", DuoFormer, single_scale=True, **CONFIG)
