"""Batch-level mixing on the patch grid, and the soft labels that go with it.

Mixing recipes (MixPro's MaskMix, Patch Mixing, CutMix) paste parts of one image into another and mix the
labels by what was pasted. The pieces they share live here:

    perm = torch.randperm(B)                                  # partner of each image: x[perm]
    cells = cell_mask(B, (4, 4), n_pasted, generator=g)       # [B, 4, 4] bool, exactly n_pasted True per row
    x_mix = paste(x, x[perm], cells)                          # True cells come from the partner
    lam = 1 - cells.flatten(1).float().mean(1)                # [B] the share kept from x (area)
    targets = mix_targets(y, y[perm], lam, num_classes, smoothing=0.1)
    loss = soft_cross_entropy(logits, targets)

A cell is a whole number of ViT patches, so every patch comes from exactly one image.

``random_resized_crop`` is the pre-training crop (MAE's ``RandomResizedCrop``), one crop per image of a batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_targets", "mix_targets", "soft_cross_entropy", "cell_mask", "cells_to_pixels", "paste",
           "random_resized_crop"]


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot rows [B, C] with label smoothing: 1 - s + s/C on the label, s/C elsewhere (timm's convention)."""
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype != torch.long:
        raise TypeError(f"soft_targets: labels must be a 1-D long tensor, got {getattr(labels, 'shape', labels)!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"soft_targets: num_classes must be an int >= 2, got {num_classes!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"soft_targets: smoothing must be in [0, 1), got {smoothing!r}")
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def mix_targets(y_a: Tensor, y_b: Tensor, lam, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """lam·t(y_a) + (1 − lam)·t(y_b) with t = smoothed one-hot; ``lam`` a number or a per-sample tensor [B]."""
    lam = torch.as_tensor(lam, dtype=torch.float32, device=y_a.device)
    if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape[0] != y_a.shape[0]):
        raise ValueError(f"mix_targets: lam must be a number or a tensor [B={y_a.shape[0]}], got {tuple(lam.shape)}")
    if ((lam < 0) | (lam > 1)).any():
        raise ValueError("mix_targets: lam must lie in [0, 1]")
    lam = lam.reshape(-1, 1) if lam.ndim else lam
    return lam * soft_targets(y_a, num_classes, smoothing) + (1 - lam) * soft_targets(y_b, num_classes, smoothing)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of −Σ_c targets·log_softmax(logits) (cross-entropy against soft labels)."""
    if logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         f"must have the same shape")
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def cell_mask(batch: int, grid: tuple[int, int], n_cells, *, generator: torch.Generator | None = None) -> Tensor:
    """[batch, gh, gw] bool: for sample i, exactly ``n_cells[i]`` (or ``n_cells``) random cells are True."""
    gh, gw = grid
    total = gh * gw
    n = torch.as_tensor(n_cells, dtype=torch.long).expand(batch)
    if ((n < 0) | (n > total)).any():
        raise ValueError(f"cell_mask: n_cells must lie in [0, {total}] for a {gh}x{gw} grid, got {n_cells!r}")
    ranks = torch.rand(batch, total, generator=generator).argsort(dim=1).argsort(dim=1)  # a random rank per cell
    return (ranks < n[:, None]).view(batch, gh, gw)


def cells_to_pixels(cells: Tensor, cell_size: int | tuple[int, int]) -> Tensor:
    """[B, gh, gw] cells → [B, 1, gh·ch, gw·cw] pixels (each cell a ch×cw block)."""
    ch, cw = (cell_size, cell_size) if isinstance(cell_size, int) else cell_size
    return cells.repeat_interleave(ch, dim=1).repeat_interleave(cw, dim=2)[:, None]


def paste(x_a: Tensor, x_b: Tensor, cells: Tensor) -> Tensor:
    """x_a with the True cells of ``cells`` [B, gh, gw] taken from x_b; cells tile the image exactly."""
    if x_a.shape != x_b.shape or x_a.ndim != 4:
        raise ValueError(f"paste: x_a and x_b must be images [B,C,H,W] of one shape, got {tuple(x_a.shape)} "
                         f"and {tuple(x_b.shape)}")
    B, _, H, W = x_a.shape
    if cells.ndim != 3 or cells.shape[0] != B or H % cells.shape[1] or W % cells.shape[2]:
        raise ValueError(f"paste: cells must be [B={B}, gh, gw] with gh dividing H={H} and gw dividing W={W}, "
                         f"got {tuple(cells.shape)}")
    mask = cells_to_pixels(cells.to(x_a.device), (H // cells.shape[1], W // cells.shape[2]))
    return torch.where(mask, x_b, x_a)


def random_resized_crop(images: Tensor, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Each image [B,C,H,W] of the batch cropped at its own random area fraction in ``scale`` and aspect ratio in
    ``ratio``, resized back to H×W: MAE's pre-training crop (scale (0.2, 1) on ImageNet; (0.5, 1) in the thorax
    recipe). The boxes are torchvision's ``RandomResizedCrop.get_params`` (drawn from torch's global generator,
    so a seeded ``fit`` crops the same way every run); the resize is one bilinear ``grid_sample`` for the whole
    batch (20x faster than ``resized_crop`` image by image on CPU). It differs from ``resized_crop`` only at the
    crop's edge, where it interpolates with the real neighbouring pixels instead of repeating the edge; a crop is
    never larger than the image, so there is nothing to antialias."""
    from torchvision.transforms import v2

    if not torch.is_tensor(images) or images.ndim != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"random_resized_crop: images must be a float tensor [B,C,H,W], got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    for name, (lo, hi) in (("scale", scale), ("ratio", ratio)):
        if not 0 < lo <= hi:
            raise ValueError(f"random_resized_crop: {name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
    if scale[1] > 1:
        raise ValueError(f"random_resized_crop: scale is a fraction of the image area, at most 1; got {scale}")
    B, _, H, W = images.shape
    boxes = torch.tensor([v2.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for img in images],
                         dtype=images.dtype, device=images.device)  # [B, 4]: top, left, h, w in pixels
    top, left, h, w = boxes.unbind(1)
    # output pixel centre (j + 0.5) / W of the output maps to left + (j + 0.5) * w / W in the input; in
    # grid_sample's [-1, 1] coordinates (align_corners=False) that is an affine map per image
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = w / W, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
