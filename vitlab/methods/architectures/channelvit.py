"""ChannelViT: one token per (channel, patch), for images whose channels carry different information
(Y. Bao, S. Sivanandan, T. Karaletsos, "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words",
ICLR 2024; official code: insitro/ChannelViT, ``channelvit/backbone/channel_vit.py``: ``PatchEmbedPerChannel``,
``ChannelVisionTransformer``; ``hcs_channel_vit.py``: the hierarchical channel sampling).

A ViT sums all channels of a patch into one token: it cannot tell which channel said what, and an input with a
channel missing is a different input. ChannelViT cuts every channel into patches separately:

    token(c, i) = W x_c[patch i] + e_c + pos_i        W shared by all channels, e_c a learned channel embedding,
                                                        pos_i the patch's position, shared by all channels
    sequence    = [CLS; token(c, i) for each channel c present, for each patch i]     (C N + 1 tokens)

so any subset of channels is a valid input (with its channel ids). **Hierarchical channel sampling** (HCS) trains
for that: per batch, draw m ~ U{1..C}, then m channels without replacement, and train on those only.

Deviations, named: vitlab's blocks; channel embeddings as ``nn.Embedding`` (the HCS file's layout); the sampled
channels are kept in increasing order (the order of tokens does not matter to attention, only their embeddings);
sampling uses torch's global generator, so ``fit``'s seed makes it reproducible. ``HCSViT`` is the paper's
"ViT + HCS" baseline: a plain ViT that sees the dropped channels as zeros.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlab.checks import check_int, check_ndim
from vitlab.models.layers import trunc_normal_
from vitlab.models.vit import Block, LayerNorm, VisionTransformer, init_linear_

from . import recipes

__all__ = ["sample_channels", "PatchEmbedPerChannel", "ChannelViT", "HCSViT", "subset_logits", "CONFIG"]


def sample_channels(num_channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hierarchical channel sampling: m ~ U{1..C}, then m of the C channels without replacement (sorted)."""
    check_int(num_channels, "num_channels", "sample_channels", low=1)
    m = int(torch.randint(1, num_channels + 1, (1,), generator=generator))
    return torch.randperm(num_channels, generator=generator)[:m].sort().values


class PatchEmbedPerChannel(nn.Module):
    """x [B, Cin, H, W] with channel ids [Cin] -> tokens [B, Cin * N, D], channel-major (all patches of the first
    channel, then the next), each with its channel's embedding added."""

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 4, embed_dim: int = 64):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"PatchEmbedPerChannel: patch_size={patch_size} does not divide img_size={img_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2  # per channel
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=(1, patch_size, patch_size), stride=(1, patch_size, patch_size))
        self.channel_embed = nn.Embedding(in_chans, embed_dim)
        trunc_normal_(self.channel_embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.unsqueeze(1))  # [B, D, Cin, H/p, W/p]
        x = x + self.channel_embed(channels).T[None, :, :, None, None]
        return x.flatten(2).transpose(1, 2)  # [B, Cin * N, D]


class ChannelViT(nn.Module):
    """ChannelViT for images with ``in_chans`` channels; ``hcs=True`` samples channels per batch in training.
    ``forward(x, channels=None)``: x holds the channels listed in ``channels`` (ids in 0..in_chans-1, in x's
    order); None means all of them, in order."""

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 4, num_classes: int = 10,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, hcs: bool = True):
        super().__init__()
        check_int(in_chans, "in_chans", "ChannelViT", low=1)
        if embed_dim % num_heads:
            raise ValueError(f"ChannelViT: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        self.in_chans, self.hcs = in_chans, hcs
        self.patch_embed = PatchEmbedPerChannel(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))  # CLS + N
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        check_ndim(x, 4, "x", "ChannelViT")
        if channels is None:
            if x.shape[1] != self.in_chans:
                raise ValueError(f"ChannelViT: x has {x.shape[1]} channels; pass their ids as channels=... (all "
                                 f"{self.in_chans} are assumed only when x has all of them)")
            channels = torch.arange(self.in_chans, device=x.device)
        channels = torch.as_tensor(channels, device=x.device, dtype=torch.long)
        if channels.ndim != 1 or len(channels) != x.shape[1] or len(channels) == 0:
            raise ValueError(f"ChannelViT: channels must list one id per channel of x ({x.shape[1]}), got "
                             f"{channels.tolist()}")
        if channels.min() < 0 or channels.max() >= self.in_chans or len(set(channels.tolist())) != len(channels):
            raise ValueError(f"ChannelViT: channels must be distinct ids in [0, {self.in_chans}), got "
                             f"{channels.tolist()}")
        if self.training and self.hcs:
            keep = sample_channels(len(channels)).to(x.device)
            x, channels = x[:, keep], channels[keep]
        tokens = self.patch_embed(x, channels)  # [B, C N, D]
        pos = torch.cat([self.pos_embed[:, :1], self.pos_embed[:, 1:].repeat(1, len(channels), 1)], dim=1)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class HCSViT(VisionTransformer):
    """The paper's ViT + HCS baseline: a plain ViT whose input channels outside a sampled subset are zeroed in
    training (a ViT cannot take fewer channels, so "missing" means zero)."""

    def forward(self, x: torch.Tensor, side=()):
        if self.training:
            keep = sample_channels(x.shape[1]).to(x.device)
            mask = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
            mask[keep] = 1
            x = x * mask[None, :, None, None]
        return super().forward(x, side=side)


@torch.no_grad()
def subset_logits(model: nn.Module, images: torch.Tensor, subset, batch_size: int = 500) -> torch.Tensor:
    """Logits with only the channels in ``subset`` available: ChannelViT gets those channels and their ids; any
    other model gets the full input with the missing channels set to zero."""
    subset = torch.as_tensor(sorted(subset), dtype=torch.long)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        if isinstance(model, ChannelViT):
            out.append(model(x[:, subset], channels=subset))
        else:
            mask = torch.zeros(x.shape[1], dtype=x.dtype)
            mask[subset] = 1
            out.append(model(x * mask[None, :, None, None]))
    return torch.cat(out)


# The lesson: 4-channel digits, patch 7 (16 patches per channel: 65 tokens with all channels), the chapter's ViT
# width and depth. The plain ViT control on the same data is recipes.BASELINE with 4 input channels (patch 4).
CONFIG = dict(img_size=28, in_chans=4, num_classes=10, patch_size=7, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0)
recipes.register("channelvit", ChannelViT, dataset="channels", hcs=True, **CONFIG)
recipes.register("channelvit_nohcs", ChannelViT, dataset="channels", hcs=False, **CONFIG)
recipes.register("vit4ch", VisionTransformer, dataset="channels", img_size=28, in_chans=4, num_classes=10,
                 **recipes.BASELINE)
recipes.register("vit4ch_hcs", HCSViT, dataset="channels", img_size=28, in_chans=4, num_classes=10,
                 **recipes.BASELINE)
# The chapter comparison's row: ChannelViT on the chapter's one-channel digits at the plain ViT's shape (patch 4).
# One channel gives one token per patch, so it is the plain ViT plus a learned channel embedding (HCS has nothing to
# drop): the row checks that the design costs nothing where it cannot help; its gain is on 4 channels (the lesson).
recipes.register("channelvit_1ch", ChannelViT, img_size=28, in_chans=1, num_classes=10, hcs=False,
                 **recipes.BASELINE)
