"""`ImageDataset`: images and labels as in-memory tensors, plus the split helpers every loader shares."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "SPLITS", "check_split", "stratified_order", "stratified_rows", "stratified_prefix", "fixed_splits"]

SPLITS = ("train", "val", "test")


def check_split(split: str, caller: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{caller}: unknown split {split!r}; valid: {list(SPLITS)}")


def row_indices(indices, n: int, rows: str = "images") -> Tensor:
    """``subset``'s rows as int64 [k]: a list or 1-D int tensor (negative counts from the end), or a bool mask of
    shape (n,); a clear error for anything else or an index out of range (``rows`` names them in it)."""
    idx = torch.as_tensor(indices)
    if idx.numel() == 0:
        idx = idx.long().reshape(0)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"subset: a bool mask must have shape ({n},), got {tuple(idx.shape)}")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"subset: indices must be 1-D integers or a bool mask, got {idx.dtype} {tuple(idx.shape)}")
    idx = idx.long()
    if len(idx) and not (-n <= int(idx.min()) and int(idx.max()) < n):
        raise ValueError(f"subset: indices must be in 0..{n - 1} (this dataset has {n} {rows}), "
                         f"got values from {int(idx.min())} to {int(idx.max())}")
    return idx


class ImageDataset(Dataset):
    """Images float32 [N,C,H,W] in [0,1] (not normalised), labels int64 [N], optional masks bool [N,H,W].

    Everything lives in memory: training loops slice ``ds.images`` / ``ds.labels`` directly.
    Treat the tensors as read-only: loaders cache them, so an in-place edit leaks into later loads.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, name: str, split: str, classes: list[str],
                 masks: Tensor | None = None):
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.float32:
            raise TypeError(f"ImageDataset: images must be a float32 tensor [N,C,H,W], got "
                            f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                            f"{tuple(getattr(images, 'shape', ()))}")
        n, _, h, w = images.shape
        if h != w:
            raise ValueError(f"ImageDataset: images must be square, got H={h}, W={w}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise TypeError(f"ImageDataset: labels must be an int64 tensor [{n}], got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} "
                            f"{tuple(getattr(labels, 'shape', ()))}")
        if masks is not None and (masks.dtype != torch.bool or masks.shape != (n, h, w)):
            raise TypeError(f"ImageDataset: masks must be a bool tensor [{n},{h},{w}], got "
                            f"{masks.dtype} {tuple(masks.shape)}")
        check_split(split, "ImageDataset")
        self.images, self.labels, self.masks = images, labels, masks
        self.name, self.split, self.classes = name, split, list(classes)
        self.num_classes = len(self.classes)
        self.in_chans, self.img_size = images.shape[1], h

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def subset(self, indices, *, name: str | None = None) -> "ImageDataset":
        """The rows ``indices`` (a list or 1-D int/bool tensor), masks included."""
        idx = row_indices(indices, len(self))
        return ImageDataset(self.images[idx], self.labels[idx], name=name or self.name, split=self.split,
                            classes=self.classes, masks=None if self.masks is None else self.masks[idx])

    def class_counts(self) -> Tensor:
        """int64 [num_classes]: how many images of each class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        masks = ", masks" if self.masks is not None else ""
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"{self.in_chans}x{self.img_size}x{self.img_size}, {self.num_classes} classes{masks})")


def stratified_order(labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A permutation of range(N) whose every prefix holds each class in proportion (within one image).

    Each image gets the key (rank within its class + u) / class count and we sort by it: u = 0.5
    keeps the original order inside a class (deterministic), a random u shuffles classes at equal keys.
    With a generator the order inside each class is shuffled first.
    """
    n = labels.shape[0]
    perm = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    lab = labels[perm]
    # rank of each image inside its class, in `perm` order
    order = torch.sort(lab, stable=True).indices  # groups classes, keeps perm order inside
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = (torch.arange(n) - starts[lab[order]]).double()
    u = torch.rand(n, generator=generator, dtype=torch.float64) if generator is not None else 0.5
    key = (rank + u) / counts[lab].double()
    return perm[torch.sort(key, stable=True).indices]


def stratified_rows(labels: Tensor, keep: int | None = None) -> Tensor:
    """The rows a stratified cap of ``keep`` images keeps, in their original order: the first ``keep`` of
    ``stratified_order(labels)``, sorted; every row when ``keep`` is None or at least N. Generators call it with
    the labels alone, before drawing any pixel, to render only the rows they return."""
    n = labels.shape[0]
    if keep is None or keep >= n:
        return torch.arange(n)
    return torch.sort(stratified_order(labels)[:keep]).values


def stratified_prefix(ds: ImageDataset, k: int) -> ImageDataset:
    """The first ``k`` images in stratified order, kept in their original order (``k >= len``: ``ds``)."""
    if k >= len(ds):
        return ds
    return ds.subset(stratified_rows(ds.labels, k))


def fixed_splits(labels: Tensor, sizes: dict[str, int], seed: int) -> dict[str, Tensor]:
    """Disjoint, stratified index sets {split: int64 [n]} from a seeded order (train, then val, then test)."""
    if sum(sizes.values()) > labels.shape[0]:
        raise ValueError(f"fixed_splits: sizes {sizes} exceed the {labels.shape[0]} images")
    order = stratified_order(labels, torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = order[start:start + n]
        start += n
    return out
