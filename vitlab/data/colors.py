"""The "Color" toy set of PACE (Wang et al., ICML 2024; the official ``generate_data.py``), small.

An image is a 2 × 2 grid of coloured cells, 0–2 of them black; class 0 uses red and yellow, class 1 blue and
green, so the class is readable from any coloured cell. Every patch therefore has a known colour, the "concept"
an explainer should find:

    images, labels, cells = color_grid(64)             # tensors: [n, 3, 32, 32] in [0, 1], [n], [n, 2, 2]
    ds = vitlab.data.load("color_cells", "train")      # an ImageDataset of 2,000 (val 300, test 500)
    truth = patch_colors(ds.images, patch_size=4)      # [n, 64]: each patch's nearest colour (COLOR_NAMES)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int, check_number
from .dataset import SPLITS, ImageDataset, check_split

__all__ = ["COLORS", "COLOR_NAMES", "CLASS_COLORS", "COLOR_SIZES", "color_grid", "color_cells", "patch_colors"]

COLOR_NAMES = ("black", "red", "yellow", "blue", "green")
COLORS = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32)
CLASS_COLORS = ((1, 2), (3, 4))  # class 0: red + yellow, class 1: blue + green (codes into COLOR_NAMES)
COLOR_SIZES = {"train": 2000, "val": 300, "test": 500}


def color_grid(n: int, img_size: int = 32, seed: int = 0, noise: float = 0.1):
    """The official rule: a 2 × 2 grid of cells, 0–2 of them black (uniform), the others coloured alternately with
    the class's two colours in a random order of cells (so both colours are always there). Gaussian noise (std
    ``noise``; the official ``random_noise`` has var 0.01) on the 2 × 2 cells, clipped to [0, 1], then a bilinear
    resize to ``img_size`` (skimage ``resize``'s default order 1: pixels near the cell borders are blends). Classes
    alternate and are then shuffled (the official makes as many of each). Returns images [n, 3, S, S] in [0, 1],
    labels [n], cell codes [n, 2, 2] (indices into COLOR_NAMES)."""
    fn = "color_grid"
    n, img_size = check_int(n, "n", fn), check_int(img_size, "img_size", fn, low=2)
    seed = check_int(seed, "seed", fn, low=0)
    noise = check_number(noise, "noise", fn, low=0.0)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    cells = torch.zeros(n, 4, dtype=torch.long)
    num_black = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        locs = torch.randperm(4, generator=g)[: 4 - int(num_black[i])]
        pair = CLASS_COLORS[int(labels[i])]
        for j, loc in enumerate(locs.tolist()):
            cells[i, loc] = pair[j % 2]
    cells = cells.view(n, 2, 2)
    small = COLORS[cells].permute(0, 3, 1, 2)  # [n, 3, 2, 2]
    small = (small + noise * torch.randn(small.shape, generator=g)).clamp(0, 1)
    images = F.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, labels, cells


def color_cells(split: str = "train", *, seed: int = 0, img_size: int = 32, n: int | None = None) -> ImageDataset:
    """``color_grid`` as a dataset: train 2,000 / val 300 / test 500 images by default, each split its own draw
    (seed ``1000 * seed + split index``), classes ("red+yellow", "blue+green")."""
    check_split(split, "color_cells")
    seed = check_int(seed, "seed", "color_cells", low=0)
    n = COLOR_SIZES[split] if n is None else check_int(n, "n", "color_cells")
    images, labels, _ = color_grid(n, img_size=img_size, seed=1000 * seed + SPLITS.index(split))
    return ImageDataset(images, labels, name="color_cells", split=split, classes=["red+yellow", "blue+green"])


def patch_colors(images: Tensor, patch_size: int) -> Tensor:
    """[n, (S/p)²] row-major like the ViT's tokens: the index (into COLOR_NAMES) of the colour nearest each
    patch's mean RGB. Blended border patches get their dominant colour."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"patch_colors: images must be a tensor [n, 3, S, S], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    p = check_int(patch_size, "patch_size", "patch_colors")
    if images.shape[-1] % p or images.shape[-2] % p:
        raise ValueError(f"patch_colors: patch_size {p} must divide the image size {tuple(images.shape[-2:])}")
    means = images.unfold(2, p, p).unfold(3, p, p).mean((-1, -2)).flatten(2).transpose(1, 2)  # [n, T, 3]
    return torch.cdist(means, COLORS.to(means.dtype)).argmin(-1)
