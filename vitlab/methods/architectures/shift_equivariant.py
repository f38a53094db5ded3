"""Shift-equivariant ViT by adaptive polyphase anchoring (P. Ding, D. Soselia, T. Armstrong, J. Su, F. Huang,
"Reviving Shift Equivariance in Vision Transformers", arXiv 2306.07470, 2023; official code:
willding123/Shift-Equivariant-Vision-Transformers, ``models/poly_utils.py``: ``PolyOrder``, ``PolyPatch``,
``PosConv``).

A ViT is not shift-invariant even though attention is permutation-equivariant: the stride-p patch grid is fixed to
the image (a 1-pixel shift changes every patch), and the absolute position embedding is tied to grid cells. The
fix, for circular shifts:

1. **Polyphase anchoring.** Split the image into its p x p polyphase components x[:, :, i::p, j::p], take the
   one with the largest L2 norm (argmax; the first index on ties), and circularly shift the image so that this
   component sits at (0, 0). Two circular shifts of one image choose the same component, so after anchoring they
   differ by a shift of whole patches: their patch tokens are the same tokens, circularly moved on the grid.
2. **Shift-equivariant position.** No absolute position embedding; a position-encoding generator (PEG, CPVT): a
   depthwise 3 x 3 convolution with circular padding over the token grid, added to the tokens. It moves with them.
3. The CLS token (no position) attends to all tokens: a circular move of the tokens leaves it, and the logits,
   unchanged.

So the logits are invariant to circular shifts, exactly up to float summation order, and predictions agree on
every image except where anchoring meets a tie (two components of equal norm: a symmetric image).

Deviations from the official code, named: the anchoring is ``torch.roll`` (the official pads circularly and
resamples with a nearest-neighbour ``grid_sample``, then crops: the same integer shift; its hand-written backward is
the inverse shift, which is what autograd gives ``roll``); the PEG is applied once, to the patch tokens before the
first block (the official ``PosConv`` replaces timm's ``pos_embed`` the same way); the blocks are vitlab's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlab.checks import check_images, check_int, check_model, check_ndim
from vitlab.models.vit import Block, LayerNorm, init_linear_

from . import recipes

__all__ = ["polyphase_norms", "poly_anchor", "PolyPatchEmbed", "PEG", "PolyViT", "circular_shift",
           "shift_consistency", "CONFIG"]


def polyphase_norms(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """L2 norm of each of the p*p polyphase components x[:, :, i::p, j::p], index i*p + j. [B, C, H, W] -> [B, p*p]"""
    check_ndim(x, 4, "x", "polyphase_norms")
    p = check_int(patch_size, "patch_size", "polyphase_norms", low=1)
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"polyphase_norms: patch_size={p} must divide the image size {H}x{W}")
    comps = x.reshape(B, C, H // p, p, W // p, p).permute(0, 3, 5, 1, 2, 4)  # [B, i, j, C, H/p, W/p]
    return comps.reshape(B, p * p, -1).norm(dim=-1)


def poly_anchor(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x circularly shifted so that its largest-norm polyphase component starts at (0, 0), that component's
    index i*p + j per image). argmax keeps the first index on ties."""
    p = patch_size
    idx = polyphase_norms(x, p).argmax(dim=1)  # [B]
    rows, cols = (idx // p).tolist(), (idx % p).tolist()
    out = torch.stack([torch.roll(img, shifts=(-r, -c), dims=(1, 2)) for img, r, c in zip(x, rows, cols)])
    return out, idx


class PolyPatchEmbed(nn.Module):
    """Anchor, then a stride-p patch projection: [B, C, H, W] -> tokens [B, (H/p)(W/p), D]."""

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64):
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                            ("embed_dim", embed_dim)):
            check_int(value, name, "PolyPatchEmbed", low=1)
        if img_size % patch_size:
            raise ValueError(f"PolyPatchEmbed: patch_size={patch_size} does not divide img_size={img_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "PolyPatchEmbed")
        x, _ = poly_anchor(x, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)


class PEG(nn.Module):
    """Position from content (CPVT's PEG), shift-equivariant: tokens + depthwise 3x3 circular conv on the grid."""

    def __init__(self, dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = grid_size
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, padding_mode="circular")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] patch tokens
        B, N, D = x.shape
        grid = x.transpose(1, 2).reshape(B, D, *self.grid_size)
        return x + self.proj(grid).flatten(2).transpose(1, 2)


class PolyViT(nn.Module):
    """A ViT whose logits are invariant to circular shifts: PolyPatchEmbed + PEG + CLS (no position) + blocks."""

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        check_int(depth, "depth", "PolyViT", low=1)
        check_int(num_classes, "num_classes", "PolyViT", low=1)
        if embed_dim % num_heads:
            raise ValueError(f"PolyViT: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        self.patch_embed = PolyPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos = PEG(embed_dim, self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos(self.patch_embed(x))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def circular_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image rolled by its own (dy, dx): images [B, C, H, W], shifts [B, 2] ints."""
    check_ndim(images, 4, "images", "circular_shift")
    if shifts.shape != (len(images), 2):
        raise ValueError(f"circular_shift: shifts must be [B, 2] = [{len(images)}, 2], got {tuple(shifts.shape)}")
    return torch.stack([torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2))
                        for img, (dy, dx) in zip(images, shifts)])


@torch.no_grad()
def shift_consistency(model: nn.Module, images: torch.Tensor, *, max_shift: int = 4, num_shifts: int = 8,
                      seed: int = 0, batch_size: int = 500) -> dict:
    """How often the prediction on a randomly circularly-shifted image (|dy|, |dx| <= max_shift) equals the
    prediction on the image itself, over ``num_shifts`` shifts per image. Returns {"consistency": fraction,
    "pred": clean predictions [B], "shifted_pred": [num_shifts, B], "shifts": [num_shifts, B, 2]}."""
    check_model(model, "shift_consistency")
    check_int(max_shift, "max_shift", "shift_consistency", low=1)
    check_int(num_shifts, "num_shifts", "shift_consistency", low=1)
    model.eval()
    g = torch.Generator().manual_seed(seed)

    def predict(x):
        return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])

    pred = predict(images)
    shifts = torch.randint(-max_shift, max_shift + 1, (num_shifts, len(images), 2), generator=g)
    shifted = torch.stack([predict(circular_shift(images, s)) for s in shifts])
    return {"consistency": (shifted == pred[None]).float().mean().item(), "pred": pred, "shifted_pred": shifted,
            "shifts": shifts}


# The lesson's tiny config: the chapter's plain ViT (4 x 64, 4 heads, patch 4), with anchoring and a PEG in place
# of the absolute position embedding (parameters within 1 % of the control).
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0)
recipes.register("shift_equivariant", PolyViT, **CONFIG)
