"""3-D shape volumes: one solid per volume, for lessons that pre-train on 2-D and 3-D together (Uni4Eye) or
reconstruct volumes (Hi-End-MAE).

Six classes (``VOLUME_CLASSES``), each under a random 3-D rotation, position, size and intensity, on a smooth
background with noise:

    ellipsoid  a filled ellipsoid with three random semi-axes
    box        a filled rectangular box
    ring       a torus
    two_blobs  two separate spheres
    shell      a hollow sphere (its wall about 1-1.5 voxels thick at 16^3)
    cylinder   a filled cylinder

Some classes look alike in 2-D: a shell's maximum projection is a disk like an ellipsoid's, a ring seen edge-on
is a bar, a cylinder seen end-on is a disk; the volume tells them apart. ``volume_slices`` gives the matched
2-D images (a central slice, a maximum or a mean projection) as an ``ImageDataset``. ``masks`` bool [N,D,H,W]
marks the object's voxels (segmentation targets).

Deterministic for (split, seed, size); drawn in chunks of 120 volumes (20 of each class, shuffled), each with its
own generator, so the first k volumes do not depend on ``n`` and every 120 are exactly balanced.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dataset import SPLITS, ImageDataset, check_split, row_indices, stratified_rows
from .procedural import one_thread, seeded_generator, uniform

__all__ = ["shape_volumes", "volume_slices", "VolumeDataset", "VOLUME_CLASSES", "VOLUME_SIZES"]

VOLUME_CLASSES = ("ellipsoid", "box", "ring", "two_blobs", "shell", "cylinder")
VOLUME_SIZES = {"train": 2000, "val": 300, "test": 600}
_CHUNK = 120  # a multiple of the 6 classes: each chunk is balanced
_SIZES = (8, 64)
_VOXELS_PER_BATCH = 2**21  # rendering sub-batches (memory only: the numbers are drawn per chunk)


class VolumeDataset(torch.utils.data.Dataset):
    """Volumes float32 [N,C,D,H,W] in [0,1], labels int64 [N], optional masks bool [N,D,H,W].

    The 3-D sibling of ``ImageDataset``: ``images`` holds the volumes (``volumes`` is the same tensor), with
    name, split, classes, num_classes, in_chans, img_size (the side D = H = W), ``subset``, ``class_counts``.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, name: str, split: str, classes, masks: Tensor | None = None):
        if not isinstance(images, Tensor) or images.dim() != 5 or images.dtype != torch.float32:
            raise TypeError(f"VolumeDataset: images must be a float32 tensor [N,C,D,H,W], got "
                            f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        n, _, d, h, w = images.shape
        if not d == h == w:
            raise ValueError(f"VolumeDataset: volumes must be cubes, got D={d}, H={h}, W={w}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise TypeError(f"VolumeDataset: labels must be an int64 tensor [{n}], got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        if masks is not None and (not isinstance(masks, Tensor) or masks.dtype != torch.bool
                                  or masks.shape != (n, d, h, w)):
            raise TypeError(f"VolumeDataset: masks must be a bool tensor [{n},{d},{h},{w}], got "
                            f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
        check_split(split, "VolumeDataset")
        self.images, self.labels, self.masks = images, labels, masks
        self.name, self.split, self.classes = name, split, list(classes)
        self.num_classes = len(self.classes)
        self.in_chans, self.img_size = images.shape[1], d

    @property
    def volumes(self) -> Tensor:
        return self.images

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def subset(self, indices, *, name: str | None = None) -> "VolumeDataset":
        """The rows ``indices`` (a list or 1-D int/bool tensor), masks included."""
        idx = row_indices(indices, len(self), "volumes")
        return VolumeDataset(self.images[idx], self.labels[idx], name=name or self.name, split=self.split,
                             classes=self.classes, masks=None if self.masks is None else self.masks[idx])

    def class_counts(self) -> Tensor:
        """int64 [num_classes]: how many volumes of each class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        masks = ", masks" if self.masks is not None else ""
        s = self.img_size
        return (f"VolumeDataset({self.name!r}, split={self.split!r}, n={len(self)}, {self.in_chans}x{s}x{s}x{s}, "
                f"{self.num_classes} classes{masks})")


# ------------------------------------------------------------------------------------------------ drawing
def _rotations(m: int, g: torch.Generator) -> Tensor:
    """[m,3,3] uniformly random rotations (from normalised Gaussian quaternions)."""
    q = torch.randn(m, 4, generator=g)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(m, 3, 3)


def _draw(labels: Tensor, size: int, g: torch.Generator) -> dict[str, Tensor]:
    """Every random number of a chunk, in a fixed order whatever the classes (shape parameters for all six)."""
    m = labels.shape[0]
    U = functools.partial(uniform, g=g)
    return {
        "labels": labels,
        "rot": _rotations(m, g), "centre": U((m, 3), -0.12, 0.12),
        "scale": U(m, 0.85, 1.15),
        "axes": U((m, 3), 0.3, 0.6),  # ellipsoid semi-axes
        "half": U((m, 3), 0.22, 0.42),  # box half-sides
        "ring_R": U(m, 0.35, 0.5), "ring_r": U(m, 0.12, 0.18),
        "blob_r": U((m, 2), 0.2, 0.3), "blob_d": U(m, 0.32, 0.45),
        "shell_R": U(m, 0.35, 0.55), "shell_t": U(m, 0.14, 0.2),
        "cyl_r": U(m, 0.22, 0.38), "cyl_h": U(m, 0.35, 0.6),
        "bg": U(m, 0.0, 0.15), "bg_var": U(m, 0.03, 0.1), "bg_field": torch.rand(m, 1, 4, 4, 4, generator=g),
        "fg": U(m, 0.45, 0.9), "fg_var": U(m, 0.0, 0.15), "fg_field": torch.rand(m, 1, 4, 4, 4, generator=g),
        "noise": U(m, 0.02, 0.06), "noise_field": torch.randn(m, 1, size, size, size, generator=g),
    }


def _sdf(kind: int, q: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Signed distance (negative inside, normalised units) of class ``kind`` at local points q [m,V,3]."""
    x, y, z = q.unbind(-1)

    def c(key, j=None):
        t = p[key] if j is None else p[key][:, j]
        return t[:, None]

    if kind == 0:  # ellipsoid, first order
        a = p["axes"][:, None, :]
        f = ((q / a) ** 2).sum(-1) - 1
        return f / (2 * (q / a**2).norm(dim=-1)).clamp(min=1 / p["axes"].amin(1, keepdim=True))
    if kind == 1:  # box
        return (q.abs() - p["half"][:, None, :]).amax(-1)
    if kind == 2:  # torus around z
        return torch.sqrt((torch.sqrt(x**2 + y**2) - c("ring_R")) ** 2 + z**2) - c("ring_r")
    if kind == 3:  # two spheres along x
        d = c("blob_d")
        s1 = torch.sqrt((x - d) ** 2 + y**2 + z**2) - c("blob_r", 0)
        s2 = torch.sqrt((x + d) ** 2 + y**2 + z**2) - c("blob_r", 1)
        return torch.minimum(s1, s2)
    if kind == 4:  # hollow sphere
        return (q.norm(dim=-1) - c("shell_R")).abs() - c("shell_t") / 2
    return torch.maximum(torch.sqrt(x**2 + y**2) - c("cyl_r"), z.abs() - c("cyl_h"))  # cylinder around z


def _render(p: dict[str, Tensor], size: int) -> tuple[Tensor, Tensor]:
    """Volumes [m,1,S,S,S] in [0,1] and object masks [m,S,S,S] from drawn parameters ``p``."""
    labels = p["labels"]
    m, S = labels.shape[0], size
    vox = 2.0 / S
    c = (torch.arange(S, dtype=torch.float32) + 0.5) / S * 2 - 1
    pts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(1, -1, 3)  # (z, y, x) order
    # local coordinates: rotate the offset from the centre into the object's frame, undo its scale
    q = torch.einsum("mvi,mij->mvj", pts - p["centre"][:, None, :], p["rot"]) / p["scale"][:, None, None]
    sd = torch.empty(m, S**3)
    for k in range(len(VOLUME_CLASSES)):
        i = (labels == k).nonzero().flatten()
        if i.numel():
            sd[i] = _sdf(k, q[i], {key: t[i] for key, t in p.items()}) * p["scale"][i, None]
    alpha = (0.5 - sd / vox).clamp(0, 1).reshape(m, 1, S, S, S)
    up = lambda t: F.interpolate(t, size=S, mode="trilinear", align_corners=False)  # noqa: E731
    v = lambda key: p[key].reshape(m, 1, 1, 1, 1)  # noqa: E731
    bg = v("bg") + v("bg_var") * (up(p["bg_field"]) * 2 - 1)
    fg = v("fg") * (1 + v("fg_var") * (up(p["fg_field"]) * 2 - 1))
    vol = bg + (fg - bg) * alpha + v("noise") * p["noise_field"]
    return vol.clamp(0, 1).contiguous(), alpha[:, 0] > 0.5


@functools.lru_cache(maxsize=8)
def _volumes(split: str, seed: int, size: int, n: int, keep: int | None) -> tuple[Tensor, Tensor, Tensor]:
    split_id = SPLITS.index(split)
    n_chunks = math.ceil(n / _CHUNK)
    # the classes first (they fix which rows a stratified cap keeps), then only the chunks those rows need
    per_chunk = torch.arange(_CHUNK) % len(VOLUME_CLASSES)
    gens = [seeded_generator(seed, split_id, chunk, 3) for chunk in range(n_chunks)]
    labels = torch.cat([per_chunk[torch.randperm(_CHUNK, generator=g)] for g in gens])[:n]
    rows = stratified_rows(labels, keep)
    chunks = torch.unique(rows // _CHUNK).tolist()
    images, masks = [], []
    with one_thread():
        for chunk in chunks:
            lab = labels[chunk * _CHUNK:(chunk + 1) * _CHUNK]
            full = torch.cat([lab, lab.new_zeros(_CHUNK - len(lab))])  # draw a whole chunk: prefixes agree across n
            p = _draw(full, size, gens[chunk])
            step = max(1, _VOXELS_PER_BATCH // size**3)
            for s in range(0, len(lab), step):
                part = {key: t[s:min(s + step, len(lab))] for key, t in p.items()}
                img, mask = _render(part, size)
                images.append(img)
                masks.append(mask)
    at = torch.searchsorted(torch.tensor(chunks), rows // _CHUNK) * _CHUNK + rows % _CHUNK
    return torch.cat(images)[at].contiguous(), labels[rows], torch.cat(masks)[at].contiguous()


def shape_volumes(split: str = "train", *, seed: int = 0, size: int = 16, n: int | None = None,
                  max_train: int | None = None) -> VolumeDataset:
    """Volumes [N,1,size,size,size] of six solids (``VOLUME_CLASSES``), labels int64 [N], masks [N,D,H,W].

    Deterministic for (split, seed, size); the first k volumes do not depend on ``n``. Default sizes: train 2000 /
    val 300 / test 600; ``size`` in 8..64. ``max_train`` (train split only) returns the stratified prefix
    ``vitlab.data.load`` would cut, without rendering what it drops. Cached: treat the tensors as read-only.
    """
    check_split(split, "shape_volumes")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"shape_volumes: seed must be an int, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not _SIZES[0] <= size <= _SIZES[1]:
        raise ValueError(f"shape_volumes: size must be an int in {_SIZES[0]}..{_SIZES[1]}, got {size!r}")
    if n is None:
        n = VOLUME_SIZES[split]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shape_volumes: n must be a positive int, got {n!r}")
    if max_train is not None and (isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 1):
        raise ValueError(f"shape_volumes: max_train must be a positive int or None, got {max_train!r}")
    images, labels, masks = _volumes(split, seed, size, n, max_train if split == "train" else None)
    return VolumeDataset(images, labels, name="shape_volumes", split=split, classes=VOLUME_CLASSES, masks=masks)


_MODES = ("center", "max", "mean")


def volume_slices(data, *, mode: str = "center", axis: int = 0):
    """Matched 2-D views of volumes along ``axis`` (0: depth, 1: height, 2: width).

    mode "center": the middle slice; "max": the maximum intensity projection; "mean": the mean projection
    (an x-ray-like view). ``data`` a ``VolumeDataset`` -> an ``ImageDataset`` with the same labels (masks: the
    object's pixels in that view); a tensor [N,C,D,H,W] -> a tensor [N,C,H',W'].
    """
    if mode not in _MODES:
        raise ValueError(f"volume_slices: mode must be one of {list(_MODES)}, got {mode!r}")
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"volume_slices: axis must be 0, 1 or 2 (depth, height, width), got {axis!r}")
    ds = data if isinstance(data, VolumeDataset) else None
    vol = ds.images if ds is not None else data
    if not isinstance(vol, Tensor) or vol.dim() != 5:
        raise TypeError(f"volume_slices: data must be a VolumeDataset or a tensor [N,C,D,H,W], got "
                        f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}")
    dim = 2 + axis

    def view(t: Tensor, d: int) -> Tensor:
        if mode == "center":
            return t.select(d, t.shape[d] // 2)
        return t.amax(dim=d) if mode == "max" or t.dtype == torch.bool else t.mean(dim=d)

    images = view(vol, dim).contiguous()
    if ds is None:
        return images
    masks = None if ds.masks is None else view(ds.masks, 1 + axis).contiguous()
    return ImageDataset(images, ds.labels, name=f"{ds.name}_{mode}{axis}", split=ds.split, classes=ds.classes,
                        masks=masks)
