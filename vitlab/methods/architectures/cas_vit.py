"""CAS-ViT: Convolutional Additive Self-attention Vision Transformers (Zhang et al., 2024; arXiv 2408.03703).

Official code: `Tianfang-Zhang/CAS-ViT <https://github.com/Tianfang-Zhang/CAS-ViT>`_,
``classification/model/rcvit.py``: ``SpatialOperation``, ``ChannelOperation``, ``AdditiveTokenMixer`` (the
*convolutional additive token mixer*, CATM), ``LocalIntegration``, ``Mlp``, ``AdditiveBlock``, ``Stage``,
``Embedding``, ``stem`` and ``RCViT``. Our classes keep those names and the official attribute names and module order, so an
official ``RCViT(..., distillation=False)`` state dict has exactly our keys (pinned in the tests; only the
BatchNorm step counters ``num_batches_tracked`` are 1-element here and 0-dim there, see ``BatchNorm2d``).

**The mechanism.** Self-attention's similarity ``softmax(QK^T)`` is N x N. CAS-ViT replaces it by an *additive*
similarity ``Phi(Q) + Phi(K)`` of two gated context maps, each computed with convolutions (linear in the number of
tokens N = H x W, no N x N matrix anywhere)::

    q, k, v = Conv1x1(x).chunk(3)                                      # no bias (attn_bias=False)
    S(z) = z * sigmoid(Conv1x1_{C->1}(ReLU(BN(DWConv3x3(z)))))          # spatial gate, one map per image
    C(z) = z * sigmoid(Conv1x1_{C->C}(GAP(z)))                          # channel gate, one value per channel
    Phi(z) = C(S(z))                                                    # spatial first, then channel
    CATM(x) = DWConv3x3_proj( DWConv3x3(Phi_q(q) + Phi_k(k)) * v )      # Phi_q and Phi_k have separate weights

Every block (``AdditiveBlock``) adds three residual branches on a [B, C, H, W] map, all normalised by BatchNorm::

    x = x + LocalIntegration(x)        # Conv1x1 -> BN -> DWConv3x3 -> GELU -> Conv1x1 (no pre-norm)
    x = x + CATM(BN(x))
    x = x + Mlp(BN(x))                 # Conv1x1 (ratio 4) -> GELU -> Conv1x1

``RCViT`` = a stride-4 convolutional stem (two Conv3x3 stride 2, each + BN + ReLU), stages of blocks separated by
``Embedding`` (Conv3x3 stride 2 + BN), then BN, global average pooling and a linear head. Linear layers are
initialised with a truncated normal (std 0.02) and zero bias; convolutions keep PyTorch's default init, as in the
official ``cls_init_weights``.

**Deviations from the official code (named).**

- No distillation head: the official ``RCViT`` defaults to ``distillation=True`` (a second linear head trained
  against a RegNet teacher, averaged with the first at eval). We train from scratch without a teacher, so there is
  one head, as the official ``distillation=False``.
- ``in_chans``: the official stem is hard-wired to 3 input channels; ours takes ``in_chans`` (1 for digits).
- Sizes: the lesson's tiny model (``TINY``) has 3 stages (28 px digits -> 7x7 -> 4x4 -> 2x2 maps) instead of 4, so
  the last stage does not run on a single pixel; the stem keeps its stride 4 (its 7x7 map matches the plain ViT's
  7x7 patch grid at patch 4).
- No drop path / dropout (the official defaults are 0 too, except drop_path in the paper's recipe), and no
  ``fork_feat`` detection/segmentation outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from vitlab.checks import check_images, check_int
from vitlab.methods.architectures import recipes
from vitlab.models.vit import init_linear_

__all__ = ["SpatialOperation", "ChannelOperation", "AdditiveTokenMixer", "LocalIntegration", "Mlp", "AdditiveBlock",
           "Embedding", "stem", "stage", "RCViT", "TINY"]


def _check_map(x: torch.Tensor, dim: int, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a feature map [B, {dim}, H, W], got {shape}")


class SpatialOperation(nn.Module):
    """S(z) = z * sigmoid(Conv1x1_{C->1}(ReLU(BN(DWConv3x3(z))))): one gate per position, shared by all channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_int(dim, "dim", "SpatialOperation")
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, groups=dim),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, 1, 1, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "SpatialOperation")
        return x * self.block(x)


class ChannelOperation(nn.Module):
    """C(z) = z * sigmoid(Conv1x1_{C->C}(GAP(z))): one gate per channel, shared by all positions."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_int(dim, "dim", "ChannelOperation")
        self.block = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(dim, dim, 1, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "ChannelOperation")
        return x * self.block(x)


class AdditiveTokenMixer(nn.Module):
    """CATM: ``proj(dwc(Phi_q(q) + Phi_k(k)) * v)`` with ``Phi = C o S`` (``oper_q``/``oper_k``). Linear in H x W."""

    def __init__(self, dim: int, attn_bias: bool = False):
        super().__init__()
        self.dim = check_int(dim, "dim", "AdditiveTokenMixer")
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, 1, 0, bias=attn_bias)
        self.oper_q = nn.Sequential(SpatialOperation(dim), ChannelOperation(dim))
        self.oper_k = nn.Sequential(SpatialOperation(dim), ChannelOperation(dim))
        self.dwc = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "AdditiveTokenMixer")
        q, k, v = self.qkv(x).chunk(3, dim=1)
        return self.proj(self.dwc(self.oper_q(q) + self.oper_k(k)) * v)


class LocalIntegration(nn.Module):
    """Conv1x1 -> BN -> DWConv3x3 -> GELU -> Conv1x1 (the official block builds it with BN and GELU)."""

    def __init__(self, dim: int, ratio: float = 1.0):
        super().__init__()
        self.dim = check_int(dim, "dim", "LocalIntegration")
        mid = round(ratio * dim)
        if mid < 1:
            raise ValueError(f"LocalIntegration: ratio must give at least one channel, got ratio={ratio!r}")
        self.network = nn.Sequential(
            nn.Conv2d(dim, mid, 1, 1, 0),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 3, 1, 1, groups=mid),
            nn.GELU(),
            nn.Conv2d(mid, dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "LocalIntegration")
        return self.network(x)


class Mlp(nn.Module):
    """The channel MLP as two 1x1 convolutions on the map (Conv1x1 -> GELU -> Conv1x1)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(check_int(dim, "dim", "Mlp"), check_int(hidden, "hidden", "Mlp"), 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdditiveBlock(nn.Module):
    """x += LocalIntegration(x); x += CATM(BN x); x += Mlp(BN x)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, attn_bias: bool = False):
        super().__init__()
        self.dim = check_int(dim, "dim", "AdditiveBlock")
        if not mlp_ratio > 0:
            raise ValueError(f"AdditiveBlock: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.local_perception = LocalIntegration(dim, ratio=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = AdditiveTokenMixer(dim, attn_bias=attn_bias)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.dim, "AdditiveBlock")
        x = x + self.local_perception(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Embedding(nn.Module):
    """Downsampling between stages: Conv3x3 stride 2 (padding 1) + BN."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2, padding: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def stem(in_chans: int, out_chans: int) -> nn.Sequential:
    """The stride-4 stem: (Conv3x3 stride 2 -> BN -> ReLU) twice, to out_chans // 2 then out_chans channels."""
    check_int(in_chans, "in_chans", "stem")
    check_int(out_chans, "out_chans", "stem", low=2)
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans // 2, 3, 2, 1), nn.BatchNorm2d(out_chans // 2), nn.ReLU(),
        nn.Conv2d(out_chans // 2, out_chans, 3, 2, 1), nn.BatchNorm2d(out_chans), nn.ReLU())


def stage(dim: int, depth: int, mlp_ratio: float = 4.0, attn_bias: bool = False) -> nn.Sequential:
    """``depth`` AdditiveBlocks of width ``dim`` (the official ``Stage``)."""
    check_int(depth, "depth", "stage")
    return nn.Sequential(*[AdditiveBlock(dim, mlp_ratio, attn_bias) for _ in range(depth)])


def _out_side(side: int) -> int:  # Conv3x3, stride 2, padding 1
    return (side - 1) // 2 + 1


class RCViT(nn.Module):
    """CAS-ViT's classifier: stem (stride 4), stages of ``AdditiveBlock`` with ``Embedding`` (stride 2) between
    them, BN, global average pool, linear head. ``embed_dims`` and ``depths`` give one entry per stage."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 embed_dims: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 1, 2), mlp_ratio: float = 4.0,
                 attn_bias: bool = False):
        super().__init__()
        self.img_size = check_int(img_size, "img_size", "RCViT", low=4)
        self.in_chans = check_int(in_chans, "in_chans", "RCViT")
        self.num_classes = check_int(num_classes, "num_classes", "RCViT")
        embed_dims, depths = list(embed_dims), list(depths)
        if not embed_dims or len(embed_dims) != len(depths):
            raise ValueError(f"RCViT: embed_dims and depths need one entry per stage, got {embed_dims} and {depths}")
        for d in embed_dims:
            check_int(d, "embed_dims", "RCViT", low=2)
        side = _out_side(_out_side(img_size))
        for _ in embed_dims[1:]:
            if side < 2:
                raise ValueError(f"RCViT: img_size={img_size} is too small for {len(embed_dims)} stages (the map "
                                 f"would fall below 2x2 before the last stage)")
            side = _out_side(side)
        self.embed_dims, self.depths = embed_dims, depths
        self.patch_embed = stem(in_chans, embed_dims[0])
        network: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            network.append(stage(dim, depth, mlp_ratio, attn_bias))
            if i < len(embed_dims) - 1:
                network.append(Embedding(dim, embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        init_linear_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "RCViT")
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).flatten(2).mean(-1))


# The lesson's tiny model: 3 stages on 28 px digits (7x7 -> 4x4 -> 2x2 maps), about the plain ViT's parameters.
TINY = dict(img_size=28, in_chans=1, num_classes=10, embed_dims=[24, 48, 64], depths=[1, 1, 1], mlp_ratio=4.0)

recipes.register("cas_vit", RCViT, **TINY)
