"""Procedural "cells": H&E-like tiles with small nuclei of three types, instance and type maps (CellVTA, chapter 6).

Every nucleus is smaller than one 8-px patch of the course ViT (radii 3-6 px at 64 px), so a patch token mixes a
nucleus with its neighbours and the background: the setting in which CellVTA's CNN adapter is meant to help.

    images, instances, types = cell_images(16, img_size=64, seed=0)   # [n,3,S,S] in [0,1], [n,S,S], [n,S,S]
    ds = cells("train")            # a CellsDataset (an ImageDataset): 2,000 tiles (val 300, test 500)
    ds.instances, ds.types         # int64 [N,S,S]: 0 background, 1..K per image / 0 background, 1..3
    ds.labels                      # int64 [N]: the majority nucleus type of the tile (0..2), for pre-training
    ds.masks                       # int64 [N,S,S] = instances * TYPE_CODE + types (what fit(targets="masks") hands
                                   # a step_fn; ``split_masks`` undoes it)

The three types (``NUCLEUS_TYPES``) differ in shape, intensity and texture, roughly as in H&E:
- ``lymphocyte``: small round (radius 3-4), dark, nearly uniform;
- ``epithelial``: larger ellipse (major radius 4.5-6, axis ratio 0.6-0.85), medium, speckled chromatin;
- ``stromal``: spindle (major radius 5-6, minor 2.2-3), lighter with a darker rim.
Nuclei are placed one after another with centre distances at least 0.8 x the sum of their major radii, so they touch
and overlap a little; a later nucleus covers an earlier one (its pixels go to the later instance). Instances left with
fewer than 4 visible pixels are removed from the maps (their paint stays, as debris). The background is a pink
eosin texture (smoothed noise) with a few pale fibres; then Gaussian pixel noise and a per-tile stain jitter.
Deterministic given the seed (a ``torch.Generator``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int
from .dataset import SPLITS, ImageDataset, check_split, row_indices

__all__ = ["NUCLEUS_TYPES", "TYPE_CODE", "CELLS_SIZES", "cell_images", "cells", "CellsDataset", "split_masks"]

NUCLEUS_TYPES = ("lymphocyte", "epithelial", "stromal")  # type ids 1, 2, 3 in the type map (0 = background)
TYPE_CODE = 4  # masks = instances * TYPE_CODE + types
CELLS_SIZES = {"train": 2000, "val": 300, "test": 500}
MIN_PIXELS = 4

# per type: (RGB of the nucleus, major radius range, axis ratio range)
_STAIN = {1: ((0.22, 0.10, 0.42), (3.0, 4.0), (0.85, 1.0)),
          2: ((0.42, 0.26, 0.60), (4.5, 6.0), (0.6, 0.85)),
          3: ((0.55, 0.38, 0.68), (5.0, 6.0), (0.4, 0.55))}


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _smooth_noise(size: int, scale: int, g: torch.Generator) -> Tensor:
    """[size, size] low-frequency noise in about [-1, 1]: a coarse grid upsampled bicubically."""
    q = max(2, size // scale)
    coarse = torch.randn(1, 1, q, q, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].clamp(-2, 2) / 2


def _one_image(size: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    # background: pink eosin with texture and a few pale fibres
    base = torch.tensor([0.93, 0.72, 0.84]) + 0.04 * torch.randn(3, generator=g)
    tex = _smooth_noise(size, 8, g)
    img = base[:, None, None] - 0.08 * tex[None] * torch.tensor([0.3, 1.0, 0.6])[:, None, None]
    for _ in range(int(torch.randint(0, 4, (), generator=g))):
        theta = _uniform(g, 0, math.pi)
        off = _uniform(g, -size / 2, size / 2)
        dist = (xx - size / 2) * math.sin(theta) - (yy - size / 2) * math.cos(theta) - off
        fibre = torch.exp(-dist ** 2 / 2.0)
        img = img + 0.06 * fibre[None] * torch.tensor([0.5, 1.0, 0.6])[:, None, None]
    inst = torch.zeros(size, size, dtype=torch.int64)
    typ = torch.zeros(size, size, dtype=torch.int64)
    placed: list[tuple[float, float, float]] = []
    target = int(torch.randint(6, 15, (), generator=g))
    weights = torch.tensor([0.2, 0.2, 0.2]) + torch.rand(3, generator=g)  # tiles differ in their type mix
    k = 0
    for _ in range(target * 6):  # rejection sampling of centres
        if k == target:
            break
        t = 1 + int(torch.multinomial(weights, 1, generator=g))
        colour, (rlo, rhi), (alo, ahi) = _STAIN[t]
        a = _uniform(g, rlo, rhi)
        b = a * _uniform(g, alo, ahi)
        cy, cx = _uniform(g, 2, size - 2), _uniform(g, 2, size - 2)
        if any(math.hypot(cy - py, cx - px) < 0.8 * (a + pa) for py, px, pa in placed):
            continue
        placed.append((cy, cx, a))
        k += 1
        phi = _uniform(g, 0, math.pi)
        u = (xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)
        v = -(xx - cx) * math.sin(phi) + (yy - cy) * math.cos(phi)
        d = torch.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the boundary
        alpha = torch.sigmoid((1.0 - d) * 2.5 * a)  # anti-aliased edge about one pixel wide
        col = torch.tensor(colour) + 0.03 * torch.randn(3, generator=g)
        shade = torch.ones(size, size)
        if t == 2:  # speckled chromatin
            shade = 1.0 + 0.35 * (torch.rand(size, size, generator=g) - 0.5)
        elif t == 3:  # darker rim, lighter centre
            shade = 1.25 - 0.35 * d.clamp(max=1.0)
        nucleus = (col[:, None, None] * shade[None]).clamp(0, 1)
        img = img * (1 - alpha[None]) + nucleus * alpha[None]
        inside = d < 1.0
        inst[inside] = k
        typ[inside] = t
    # drop instances left with too few visible pixels (covered by later ones or clipped at the border)
    counts = torch.bincount(inst.flatten(), minlength=k + 1)
    keep = counts >= MIN_PIXELS
    keep[0] = True
    relabel = torch.cumsum(keep.long(), 0) - 1  # kept ids become 1..K' in order of placement
    relabel[~keep] = 0
    inst = relabel[inst]
    typ = torch.where(inst > 0, typ, torch.zeros_like(typ))
    img = img * (1 + 0.06 * torch.randn(3, 1, 1, generator=g))  # stain jitter
    img = img + 0.03 * torch.randn(3, size, size, generator=g)  # pixel noise
    return img.clamp(0, 1), inst, typ


def cell_images(n: int, img_size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` tiles: images float32 [n, 3, S, S] in [0, 1], instance map int64 [n, S, S] (0 background, 1..K per
    image), type map int64 [n, S, S] (0 background, 1..3 = ``NUCLEUS_TYPES``). Deterministic given ``seed``."""
    fn = "cell_images"
    n = check_int(n, "n", fn)
    img_size = check_int(img_size, "img_size", fn, low=16)
    seed = check_int(seed, "seed", fn, low=0)
    g = torch.Generator().manual_seed(seed)
    out = [_one_image(img_size, g) for _ in range(n)]
    return (torch.stack([o[0] for o in out]).float(), torch.stack([o[1] for o in out]),
            torch.stack([o[2] for o in out]))


def split_masks(masks: Tensor) -> tuple[Tensor, Tensor]:
    """(instances, types) from ``CellsDataset.masks`` (= instances * TYPE_CODE + types)."""
    if not isinstance(masks, Tensor) or masks.is_floating_point() or masks.ndim < 2:
        raise TypeError(f"split_masks: masks must be an integer tensor [..., H, W], got "
                        f"{getattr(masks, 'dtype', type(masks).__name__)}")
    masks = masks.long()
    return masks // TYPE_CODE, masks % TYPE_CODE


class CellsDataset(ImageDataset):
    """An ImageDataset of cell tiles whose ``masks`` are int64 codes ``instances * TYPE_CODE + types`` (not bool: the
    instance and type maps both travel through ``fit(targets="masks")``); ``instances`` and ``types`` decode them.
    ``labels``: the majority nucleus type (0..2) of each tile."""

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor, *, name: str, split: str, classes: list[str]):
        super().__init__(images, labels, name=name, split=split, classes=classes)
        n, _, h, w = images.shape
        if not isinstance(masks, Tensor) or masks.dtype != torch.int64 or masks.shape != (n, h, w):
            raise TypeError(f"CellsDataset: masks must be an int64 tensor [{n},{h},{w}], got "
                            f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
        self.masks = masks

    @property
    def instances(self) -> Tensor:
        return self.masks // TYPE_CODE

    @property
    def types(self) -> Tensor:
        return self.masks % TYPE_CODE

    def subset(self, indices, *, name: str | None = None) -> "CellsDataset":
        idx = row_indices(indices, len(self))
        return CellsDataset(self.images[idx], self.labels[idx], self.masks[idx], name=name or self.name,
                            split=self.split, classes=self.classes)


_CACHE: dict = {}


def cells(split: str = "train", *, seed: int = 0, img_size: int = 64, n: int | None = None) -> CellsDataset:
    """``cell_images`` as a dataset: train 2,000 / val 300 / test 500 tiles by default, each split its own draw
    (seed ``1000 * seed + split index``). Labels: each tile's majority nucleus type (ties to the lower type)."""
    check_split(split, "cells")
    seed = check_int(seed, "seed", "cells", low=0)
    img_size = check_int(img_size, "img_size", "cells", low=16)
    n = CELLS_SIZES[split] if n is None else check_int(n, "n", "cells")
    key = (split, seed, img_size, n)
    if key not in _CACHE:
        images, inst, typ = cell_images(n, img_size=img_size, seed=1000 * seed + SPLITS.index(split))
        # pixels per type would favour the large types: count instances of each type instead
        counts = torch.zeros(n, len(NUCLEUS_TYPES), dtype=torch.int64)
        for t in range(1, len(NUCLEUS_TYPES) + 1):
            ids = torch.where(typ == t, inst, torch.zeros_like(inst)).flatten(1)
            counts[:, t - 1] = torch.tensor([torch.unique(r[r > 0]).numel() for r in ids], dtype=torch.int64)
        labels = counts.argmax(1)
        _CACHE[key] = (images, labels, inst * TYPE_CODE + typ)
    images, labels, masks = _CACHE[key]
    return CellsDataset(images, labels, masks, name="cells", split=split, classes=list(NUCLEUS_TYPES))
