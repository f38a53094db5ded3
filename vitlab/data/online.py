"""Online datasets (CIFAR-10/100) through torchvision, cached under ``<repo>/data/`` (or ``$VITLAB_DATA``).

A download happens only when the caller or the profile allows it; without permission and without the
files, a request fails at once with a message that says how to allow it and where the files go.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset, check_split, fixed_splits

__all__ = ["cifar10", "cifar100", "data_dir", "ONLINE"]

_SPLIT_SEED = 1234  # fixed: the val split must mean the same images everywhere in the course

# name -> (torchvision class name, folder torchvision extracts to, files it needs, download size)
ONLINE = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))), "170 MB"),
    "cifar100": ("CIFAR100", "cifar-100-python", ("meta", "train", "test"), "170 MB"),
}


def data_dir() -> Path:
    """Where downloads go: ``$VITLAB_DATA``, else ``<repo>/data``."""
    env = os.environ.get("VITLAB_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "data"


def _present(name: str, root: Path) -> bool:
    _, folder, files, _ = ONLINE[name]
    return all((root / folder / f).is_file() for f in files)


@functools.lru_cache(maxsize=2)
def _arrays(name: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
    """uint8 train/test images [N,3,32,32], int64 labels, and the class names (cached: ~180 MB)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, ONLINE[name][0])
    out = []
    for train in (True, False):
        ds = cls(root, train=train, download=download)
        out.append(torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous())
        out.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
    return (*out, list(ds.classes))


def _online(name: str, split: str, allow_download: bool) -> ImageDataset:
    check_split(split, name)
    root = data_dir()
    if not _present(name, root) and not allow_download:
        _, folder, _, size = ONLINE[name]
        raise ValueError(
            f"load: dataset {name!r} needs a download (~{size}) and downloads are off in this profile; "
            f"allow it with load({name!r}, ..., allow_download=True) or VITLAB_PROFILE=gpu. "
            f"Files go to {root / folder} (set $VITLAB_DATA to change the folder)."
        )
    train_x, train_y, test_x, test_y, classes = _arrays(name, str(root), bool(allow_download))
    if split == "test":
        x, y = test_x, test_y
    else:  # torchvision's 50k train images -> 45k train / 5k val, fixed and stratified
        n_val = len(train_y) // 10
        idx = fixed_splits(train_y, {"train": len(train_y) - n_val, "val": n_val}, _SPLIT_SEED)[split]
        x, y = train_x[idx], train_y[idx]
    return ImageDataset(x.float().div_(255), y, name=name, split=split, classes=classes)


def cifar10(split: str = "train", *, allow_download: bool = False) -> ImageDataset:
    """CIFAR-10, 32x32x3, 10 classes: train 45k / val 5k (from torchvision's train) / test 10k."""
    return _online("cifar10", split, allow_download)


def cifar100(split: str = "train", *, allow_download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels), 32x32x3, 100 classes: train 45k / val 5k / test 10k."""
    return _online("cifar100", split, allow_download)
