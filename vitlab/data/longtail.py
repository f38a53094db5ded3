"""Long-tailed subsets: class c keeps n_max * imbalance**(-c/(C-1)) images (class 0 is the head)."""
from __future__ import annotations

import math
import numbers

import torch

from .dataset import ImageDataset

__all__ = ["check_imbalance", "long_tail_counts", "long_tailed"]


def check_imbalance(imbalance: float) -> None:
    """Raise unless ``imbalance`` is a real number >= 1."""
    if isinstance(imbalance, bool) or not isinstance(imbalance, numbers.Real):
        raise TypeError(f"long_tailed: imbalance must be a number >= 1, got {imbalance!r}")
    if not imbalance >= 1:  # also rejects NaN
        raise ValueError(f"long_tailed: imbalance must be >= 1 (head/tail ratio), got {imbalance!r}")


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """[n_0, ..., n_{C-1}] with n_c = floor(n_max * imbalance**(-c/(C-1)))."""
    check_imbalance(imbalance)
    if num_classes < 2:
        raise ValueError(f"long_tailed: needs at least 2 classes, got num_classes={num_classes}")
    counts = [math.floor(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(f"long_tailed: imbalance={imbalance!r} is too large for {n_max} images per class "
                         f"(the tail class would be empty); use imbalance <= {n_max}")
    return counts


def long_tailed(ds: ImageDataset, imbalance: float, *, seed: int = 0) -> ImageDataset:
    """A seeded subset of ``ds`` with an exponential class profile; n_max = the smallest class of ``ds``.

    Images keep their order in ``ds``; within each class the kept ones are a random choice.
    """
    if not isinstance(ds, ImageDataset):
        raise TypeError(f"long_tailed: ds must be an ImageDataset, got {type(ds).__name__}")
    have = ds.class_counts()
    counts = long_tail_counts(int(have.min()), ds.num_classes, imbalance)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c, n_c in enumerate(counts):
        members = (ds.labels == c).nonzero().flatten()
        keep.append(members[torch.randperm(members.numel(), generator=g)[:n_c]])
    idx = torch.sort(torch.cat(keep)).values
    return ds.subset(idx, name=f"{ds.name}_lt")
