"""Multi-channel digits: mnist5k's digits seen through four channels that carry partly redundant information, for
lessons about inputs whose channels are not colours (microscopy stains, satellite bands) and may go missing.

    channel 0  ink     the digit itself
    channel 1  edges   its Sobel gradient magnitude (outlines only)
    channel 2  blur    a Gaussian blur (sigma 1.5) of it, shifted by (2, 2) px (a coarse, misaligned view)
    channel 3  noisy   the digit at 40 % contrast under uniform noise (a low signal-to-noise view)

Each channel alone identifies most digits; together they are more reliable than any one. Same fixed splits as
mnist5k (3,500 / 500 / 1,000), deterministic for (split, seed): only channel 3's noise depends on the seed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .dataset import ImageDataset, check_split
from .offline import mnist5k

__all__ = ["multichannel_digits", "CHANNELS"]

CHANNELS = ("ink", "edges", "blur", "noisy")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    peak = x.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    return x / peak


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


@functools.lru_cache(maxsize=None)
def _channels(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = mnist5k(split)
    ink = base.images  # [N, 1, 28, 28] in [0, 1]
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]
    gx = F.conv2d(ink, sobel_x, padding=1)
    gy = F.conv2d(ink, sobel_x.transpose(-1, -2), padding=1)
    edges = _normalise((gx ** 2 + gy ** 2).sqrt())
    blur = _normalise(torch.roll(F.conv2d(ink, _gaussian_kernel(1.5, 4), padding=4), shifts=(2, 2), dims=(2, 3)))
    g = torch.Generator().manual_seed(1000 * seed + ("train", "val", "test").index(split))
    noisy = (0.4 * ink + 0.6 * torch.rand(ink.shape, generator=g)).clamp(0, 1)
    return torch.cat([ink, edges, blur, noisy], dim=1).contiguous(), base.labels


def multichannel_digits(split: str = "train", *, seed: int = 0) -> ImageDataset:
    """mnist5k digits as 4 channels (``CHANNELS``): images [N, 4, 28, 28] in [0, 1]. Cached: treat as read-only."""
    check_split(split, "multichannel_digits")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"multichannel_digits: seed must be an int, got {seed!r}")
    images, labels = _channels(split, seed)
    return ImageDataset(images, labels, name="multichannel_digits", split=split, classes=mnist5k(split).classes)
