"""Drawing primitives the procedural datasets share (scenes, x-rays, volumes, the VLM's scenes and videos).

Every generator draws in chunks, each from its own ``seeded_generator(seed, split, chunk)``, on one thread
(``one_thread``), with batched ops on pixel grids: shapes are signed distances turned into anti-aliased
coverage, textures are smooth noise.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["one_thread", "seeded_generator", "uniform", "pixel_grid", "minmax", "blobs", "coverage", "shape_sd"]


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread: these ops are small, and on a busy machine (parallel notebooks) two
    spinning OpenMP threads made generation ~50x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded_generator(*keys: int) -> torch.Generator:
    # SeedSequence mixes (seed, split, chunk) into independent streams
    state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def uniform(shape, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in pixels: yy, xx [H,W]."""
    r = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(r, r, indexing="ij")


def minmax(t: Tensor) -> Tensor:
    lo = t.amin(dim=(1, 2, 3), keepdim=True)
    hi = t.amax(dim=(1, 2, 3), keepdim=True)
    return (t - lo) / (hi - lo + 1e-6)


def blobs(q: int, size: int, g: torch.Generator) -> Tensor:
    # two octaves of smooth noise with a random mix: coarse blobs to fine mottling
    coarse = F.interpolate(torch.rand(q, 1, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(q, 1, 8, 8, generator=g), size=size, mode="bicubic", align_corners=False)
    w = torch.rand(q, 1, 1, 1, generator=g)
    return minmax(w * coarse + (1 - w) * fine)


def coverage(sd: Tensor) -> Tensor:
    """Alpha from a signed distance in pixels (negative inside), anti-aliased over one pixel."""
    return (0.5 - sd).clamp(0, 1)


def shape_sd(kind: int, u: Tensor, v: Tensor, r: Tensor, w: Tensor) -> Tensor:
    """Signed distance in px (negative inside) of a square, disc, bar or triangle of half-size r."""
    if kind == 0:
        return torch.maximum(u.abs(), v.abs()) - r
    if kind == 1:
        return torch.sqrt(u**2 + v**2) - r
    if kind == 2:  # a stroke-thick bar, like a digit's "1"
        return torch.maximum(u.abs() - 1.6 * r, v.abs() - w / 2)
    # equilateral triangle: inside all three half-planes at the inradius r/2 of circumradius r
    angles = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
    return torch.stack([u * math.cos(a) + v * math.sin(a) for a in angles]).amax(0) - r / 2
