"""Cluttered scenes: one MNIST digit among digit fragments and shapes on a textured background.

On plain MNIST most patches are black, so any method that drops or merges tokens looks free. Here every
patch carries signal: a texture covers the whole image, and 2-4 distractors (squares, circles, bars,
triangles, and crops of other digits' strokes) sit beside the target digit, which fixes the label.
``masks`` marks the target digit's pixels, so lessons can check where attention or kept tokens land.

Everything is drawn in batches on coordinate grids (signed distances for shapes, ``grid_sample`` for
digits), so the 4,000-image train split takes about a second at 32 px (a few at 64 px).

A reference point (2 CPU cores): a 3-layer CNN reaches ~78 % test accuracy after 8 epochs on the default
4,000 training scenes; a 6x96 ViT (patch 4) is slower to start, ~28 % after 20 epochs, still rising. ViTs
want more data here: ``n=`` draws more scenes (new placements of the same training digits) cheaply.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dataset import SPLITS, ImageDataset, check_split, stratified_rows
from .procedural import blobs, coverage, minmax, one_thread, pixel_grid, seeded_generator, shape_sd, uniform
from .offline import DIGIT_CLASSES, mnist5k

__all__ = ["cluttered_scenes", "patch_mask", "SCENE_SIZES"]

SCENE_SIZES = {"train": 4000, "val": 500, "test": 1000}
_CHUNK = 250  # scenes drawn per generator: scene i's content does not depend on n
_DIGIT_SCALE = (0.4, 0.6)  # digit height (ink, ~20 of MNIST's 28 px) as a fraction of img_size
_SHAPE_SIZE = (0.06, 0.12)  # half-size of distractor shapes, fraction of img_size
_FRAGMENT_SCALE = (0.3, 0.45)  # fragments are drawn from digits a bit smaller than the target
_FRAGMENT_HALF_WIN = (3.5, 5.5)  # half-side of the crop, in MNIST pixels (of 28)
_PLACE_TRIES = 8  # distractor centre: the farthest from the target of this many draws
_BG = (0.05, 0.3)  # the texture's darker colour, per channel
_BG_CONTRAST = (0.08, 0.2)  # its lighter colour is this much brighter: visible texture, below the objects
_OBJECT = (0.6, 1.0)  # colours of the digit and distractors, per channel: always brighter than texture
_GRAIN = 0.03  # pixel noise over the whole image


# ---------------------------------------------------------------------------------------------- texture
def _stripes(q: int, size: int, g: torch.Generator) -> Tensor:
    yy, xx = (c / size for c in pixel_grid(size))
    freq, theta, phase = uniform(q, 2.5, 7.0, g), uniform(q, 0, math.pi, g), uniform(q, 0, 2 * math.pi, g)
    proj = xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None]  # [q,H,W]
    return (0.5 + 0.5 * torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None]))[:, None]


def _mottle(q: int, size: int, g: torch.Generator) -> Tensor:
    noise = torch.rand(q, 1, max(4, size // 3), max(4, size // 3), generator=g)
    return minmax(F.interpolate(noise, size=size, mode="bilinear", align_corners=False))


def _checks(q: int, size: int, g: torch.Generator) -> Tensor:
    yy, xx = (c / size for c in pixel_grid(size))
    theta = uniform(q, 0, math.pi / 2, g)[:, None, None]
    fa, fb = uniform(q, 1.5, 4.0, g)[:, None, None], uniform(q, 1.5, 4.0, g)[:, None, None]
    u = xx * theta.cos() + yy * theta.sin()
    v = -xx * theta.sin() + yy * theta.cos()
    wave = torch.sin(2 * math.pi * fa * u) * torch.sin(2 * math.pi * fb * v)
    return (0.5 + 0.5 * torch.tanh(4 * wave))[:, None]  # soft-edged checkerboard


_TEXTURES = (_stripes, blobs, _mottle, _checks)


def _background(m: int, size: int, g: torch.Generator) -> Tensor:
    """[m,3,H,W]: a random texture mixing a dark and a lighter colour (both darker than any object)."""
    kind = torch.randint(len(_TEXTURES), (m,), generator=g)
    t = torch.empty(m, 1, size, size)
    for k, fn in enumerate(_TEXTURES):
        idx = (kind == k).nonzero().flatten()
        if idx.numel():
            t[idx] = fn(idx.numel(), size, g)
    dark = uniform((m, 3, 1, 1), *_BG, g)
    light = dark + uniform((m, 3, 1, 1), *_BG_CONTRAST, g)
    swap = torch.rand(m, 1, 1, 1, generator=g) < 0.5
    c0, c1 = torch.where(swap, light, dark), torch.where(swap, dark, light)
    return c0 + (c1 - c0) * t


# ---------------------------------------------------------------------------------------------- objects
def _place(size: int, margin: Tensor, avoid: tuple[Tensor, Tensor], g: torch.Generator,
           tries: int = _PLACE_TRIES) -> tuple[Tensor, Tensor]:
    """Centres cy, cx [q] kept ``margin`` px from the border: the best of ``tries`` uniform draws by distance
    from ``avoid`` (the target's centre), so distractors crowd the digit less often but still may touch it."""
    q = margin.shape[0]
    span = (size - 2 * margin)[:, None]
    cy = margin[:, None] + torch.rand(q, tries, generator=g) * span  # [q,tries]
    cx = margin[:, None] + torch.rand(q, tries, generator=g) * span
    dist = (cy - avoid[0][:, None]) ** 2 + (cx - avoid[1][:, None]) ** 2
    best = dist.argmax(dim=1, keepdim=True)
    return cy.gather(1, best)[:, 0], cx.gather(1, best)[:, 0]


def _frame(size: int, margin: Tensor, avoid: tuple[Tensor, Tensor], g: torch.Generator):
    """A placed centre, a random rotation, and the rotated coordinates u, v [q,H,W] around the centre."""
    q = margin.shape[0]
    cy, cx = _place(size, margin, avoid, g)
    theta = uniform(q, 0, 2 * math.pi, g)
    yy, xx = pixel_grid(size)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    return dx * c + dy * s, -dx * s + dy * c


def _shape(q: int, size: int, avoid: tuple[Tensor, Tensor], g: torch.Generator) -> Tensor:
    """[q,H,W] alphas of squares, discs/rings, bars and triangles, filled or outlined, stroke ~ a digit's."""
    kind = torch.randint(4, (q,), generator=g)
    extent = uniform(q, *_SHAPE_SIZE, g) * size  # half-size in px
    stroke = uniform(q, 1.5, 3.0, g) * size / 32
    outline = (torch.rand(q, generator=g) < 0.5) & (kind != 2)
    u, v = _frame(size, extent * 1.2, avoid, g)
    r, w = extent[:, None, None], stroke[:, None, None]
    sd = torch.empty(q, size, size)
    for k in range(4):
        i = (kind == k).nonzero().flatten()
        sd[i] = shape_sd(k, u[i], v[i], r[i], w[i])
    sd = torch.where(outline[:, None, None], sd.abs() - w / 2, sd)  # outlines: a ring around the edge
    return coverage(sd)


def _sample_digit(digits: Tensor, size: int, cy: Tensor, cx: Tensor, theta: Tensor, px_per_src: Tensor,
                  src_cy: Tensor, src_cx: Tensor) -> Tensor:
    """[q,H,W]: ``digits`` [q,1,28,28] drawn so that source point (src_cy, src_cx) lands at (cy, cx)."""
    yy, xx = pixel_grid(size)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    k = px_per_src[:, None, None]
    sx = src_cx[:, None, None] + (dx * c + dy * s) / k  # source pixel coordinates
    sy = src_cy[:, None, None] + (-dx * s + dy * c) / k
    grid = torch.stack([sx / 14 - 1, sy / 14 - 1], dim=-1)  # normalised for align_corners=False, 28 px
    return F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _target(digits: Tensor, size: int, g: torch.Generator) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """[q,H,W] alpha of whole digits at 0.4-0.6 of the image, rotated by up to 15 degrees; their centres."""
    q = digits.shape[0]
    k = uniform(q, *_DIGIT_SCALE, g) * size / 20  # output px per source px: MNIST ink spans ~20 of 28
    theta = uniform(q, -math.radians(15), math.radians(15), g)
    # where the rotated, scaled ink lands relative to the centre, so the whole digit stays in the image
    r = torch.arange(28.0) + 0.5 - 14
    oy, ox = (t.flatten() for t in torch.meshgrid(r, r, indexing="ij"))  # [784] source offsets
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    dx = k[:, None] * (ox * c - oy * s)  # [q,784] output offsets
    dy = k[:, None] * (ox * s + oy * c)
    ink = digits[:, 0].flatten(1) > 0
    big = torch.tensor(float(size))
    pad = k + 1  # bilinear sampling spreads ink by one source pixel
    lo_y = torch.where(ink, -dy, -big).amax(1) + pad
    hi_y = size - torch.where(ink, dy, -big).amax(1) - pad
    lo_x = torch.where(ink, -dx, -big).amax(1) + pad
    hi_x = size - torch.where(ink, dx, -big).amax(1) - pad
    cy = lo_y + torch.rand(q, generator=g) * (hi_y - lo_y).clamp(min=0)
    cx = lo_x + torch.rand(q, generator=g) * (hi_x - lo_x).clamp(min=0)
    centre = torch.full((q,), 14.0)
    return _sample_digit(digits, size, cy, cx, theta, k, centre, centre), (cy, cx)


def _fragment(digits: Tensor, size: int, avoid: tuple[Tensor, Tensor], g: torch.Generator) -> Tensor:
    """[q,H,W] alpha of a square crop (7-11 of 28 px) around a random ink pixel of another digit."""
    q = digits.shape[0]
    ink = digits[:, 0].flatten(1) > 0.5  # [q,784]
    pick = (ink * torch.rand(ink.shape, generator=g)).argmax(dim=1)  # a uniformly random ink pixel
    src_cy, src_cx = (pick // 28).float() + 0.5, (pick % 28).float() + 0.5
    half_win = uniform(q, *_FRAGMENT_HALF_WIN, g)  # source px
    px_per_src = uniform(q, *_FRAGMENT_SCALE, g) * size / 20
    theta = uniform(q, -math.pi, math.pi, g)
    cy, cx = _place(size, half_win * px_per_src, avoid, g)
    alpha = _sample_digit(digits, size, cy, cx, theta, px_per_src, src_cy, src_cx)
    # keep only the window: rotated coordinates within half_win source px of the crop centre
    yy, xx = pixel_grid(size)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    reach = (half_win * px_per_src)[:, None, None]
    inside = ((dx * c + dy * s).abs() <= reach) & ((-dx * s + dy * c).abs() <= reach)
    return alpha * inside


# ---------------------------------------------------------------------------------------------- scenes
def _composite(img: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    a = alpha[:, None]  # [m,1,H,W]
    return img * (1 - a) + colour[:, :, None, None] * a


def _render_chunk(digits: Tensor, pool: Tensor, size: int, in_chans: int, g: torch.Generator
                  ) -> tuple[Tensor, Tensor]:
    """digits [m,1,28,28] (targets), pool [P,1,28,28] (fragment sources) -> images [m,C,H,W], masks [m,H,W]."""
    m = digits.shape[0]
    img = _background(m, size, g)
    target, (ty, tx) = _target(digits, size, g)  # placed first so distractors can keep some distance
    n_distract = torch.randint(2, 5, (m,), generator=g)  # 2..4
    for slot in range(4):
        is_fragment = torch.rand(m, generator=g) < 0.5
        alpha = torch.zeros(m, size, size)
        frag = is_fragment.nonzero().flatten()
        shp = (~is_fragment).nonzero().flatten()
        if frag.numel():
            src = pool[torch.randint(pool.shape[0], (frag.numel(),), generator=g)]
            alpha[frag] = _fragment(src, size, (ty[frag], tx[frag]), g)
        if shp.numel():
            alpha[shp] = _shape(shp.numel(), size, (ty[shp], tx[shp]), g)
        alpha = alpha * (slot < n_distract)[:, None, None]
        img = _composite(img, alpha, uniform((m, 3), *_OBJECT, g))
    img = _composite(img, target, uniform((m, 3), *_OBJECT, g))  # drawn last: the digit is never hidden
    if in_chans == 1:
        img = img.mean(dim=1, keepdim=True)
    img = (img + _GRAIN * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return img, target > 0.5


@functools.lru_cache(maxsize=8)
def _scenes(split: str, seed: int, size: int, in_chans: int, n: int, keep: int | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    src = mnist5k(split)  # train scenes use train digits only: no digit instance leaks across splits
    split_id = SPLITS.index(split)
    # which digit each scene shows: a concatenation of seeded permutations of the pool (near-balanced)
    g = seeded_generator(seed, split_id, 10**6)
    n_full = math.ceil(n / _CHUNK) * _CHUNK  # whole chunks, truncated at the end: prefixes agree across n
    which = torch.cat([torch.randperm(len(src), generator=g) for _ in range(math.ceil(n_full / len(src)))])
    labels = src.labels[which[:n]]
    # keep: the stratified prefix ``load`` would cut (labels are known before any pixel): render only its chunks
    rows = stratified_rows(labels, keep)
    chunks = torch.unique(rows // _CHUNK).tolist()
    images, masks = [], []
    with one_thread():
        for chunk in chunks:
            idx = which[chunk * _CHUNK:(chunk + 1) * _CHUNK]
            g = seeded_generator(seed, split_id, chunk)  # each chunk its own generator: any subset renders identically
            img, mask = _render_chunk(src.images[idx], src.images, size, in_chans, g)
            images.append(img)
            masks.append(mask)
    # rows -> positions in the rendered chunks
    at = torch.searchsorted(torch.tensor(chunks), rows // _CHUNK) * _CHUNK + rows % _CHUNK
    return torch.cat(images)[at].contiguous(), labels[rows], torch.cat(masks)[at].contiguous()


def cluttered_scenes(split: str = "train", *, seed: int = 0, img_size: int = 32, in_chans: int = 3,
                     n: int | None = None, max_train: int | None = None) -> ImageDataset:
    """Scenes of one MNIST digit (the label) among 2-4 distractors on a texture; masks = the digit's pixels.

    Deterministic for (split, seed, img_size, in_chans); the first k scenes do not depend on ``n``.
    Default sizes: train 4000 / val 500 / test 1000. Cached: treat the tensors as read-only.
    ``max_train`` (train split only) returns ``stratified_prefix(scenes, max_train)`` without rendering the scenes
    it drops (``vitlab.data.load`` passes the profile's cap).
    """
    check_split(split, "cluttered_scenes")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 32 <= img_size <= 64:
        raise ValueError(f"cluttered_scenes: img_size must be an int in 32..64, got {img_size!r}")
    if type(in_chans) is not int or in_chans not in (1, 3):
        raise ValueError(f"cluttered_scenes: in_chans must be 1 or 3, got {in_chans!r}")
    if n is None:
        n = SCENE_SIZES[split]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cluttered_scenes: n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"cluttered_scenes: seed must be an int, got {seed!r}")
    if max_train is not None and (isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 1):
        raise ValueError(f"cluttered_scenes: max_train must be a positive int or None, got {max_train!r}")
    images, labels, masks = _scenes(split, seed, img_size, in_chans, n, max_train if split == "train" else None)
    return ImageDataset(images, labels, name="cluttered_scenes", split=split, classes=DIGIT_CLASSES,
                        masks=masks)


def patch_mask(masks: Tensor, patch_size: int) -> Tensor:
    """bool [N,(H/p)*(W/p)], row-major like the ViT's tokens: True where a patch holds any target pixel."""
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise TypeError(f"patch_mask: masks must be a tensor [N,H,W], got {type(masks).__name__} "
                        f"{tuple(getattr(masks, 'shape', ()))}")
    n, h, w = masks.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or h % patch_size \
            or w % patch_size:
        raise ValueError(f"patch_mask: patch_size must be a positive int dividing {h}x{w}, got {patch_size!r}")
    p = patch_size
    return masks.bool().reshape(n, h // p, p, w // p, p).any(dim=4).any(dim=2).flatten(1)
