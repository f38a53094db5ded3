"""``load(name, split, profile)``: the one entry point lessons use to get data."""
from __future__ import annotations

import inspect

import torch

from ..profiles import Profile
from ..profiles import profile as get_profile
from .cells import cells
from .colors import color_cells
from .dataset import ImageDataset, check_split, stratified_prefix
from .faces import faces
from .longtail import check_imbalance, long_tailed
from .multichannel import multichannel_digits
from .offline import digits8, mnist5k
from .online import cifar10, cifar100
from .scenes import cluttered_scenes
from .thorax import thorax_xrays
from .volumes import shape_volumes

__all__ = ["DATASETS", "load"]


def _mnist5k_lt(split: str = "train", *, seed: int = 0, imbalance: float = 100) -> ImageDataset:
    """mnist5k whose train split is long-tailed (class 0 the head, head/tail = ``imbalance``).

    val and test stay balanced (``imbalance`` is checked but not applied), so accuracy stays comparable.
    """
    ds = mnist5k(split)
    if split != "train":
        check_imbalance(imbalance)  # the same argument checks for every split
        return ImageDataset(ds.images, ds.labels, name="mnist5k_lt", split=split, classes=ds.classes)
    return long_tailed(ds, imbalance, seed=seed)


def vlm_caption_scenes(split: str = "train", *, seed: int = 0, img_size: int = 32, n: int | None = None) -> ImageDataset:
    """``vitlab.vlm.caption_scenes`` as an ImageDataset for chapter 7's zoo entries: labels = scene index (each lesson's
    objective looks the scene's caption and questions up by it), classes = captions."""
    from ..vlm import caption_scenes  # chapter 7's core, loaded only when asked for

    cs = caption_scenes(split, seed=seed, img_size=img_size, n=n)
    return ImageDataset(cs.images, torch.arange(len(cs)), name="vlm_caption_scenes", split=split,
                        classes=list(cs.captions))


# name -> loader(split, **kwargs); `seed` and `allow_download` are passed only to loaders that take them
DATASETS = {
    "mnist5k": mnist5k,
    "mnist5k_lt": _mnist5k_lt,
    "digits8": digits8,
    "cluttered_scenes": cluttered_scenes,
    "cells": cells,  # CellsDataset: int64 masks = instances * 4 + types (CellVTA)
    "color_cells": color_cells,  # PACE's "Color" set: 2 x 2 coloured cells, class = colour pair
    "faces": faces,  # ViT-FIQA's procedural faces: labels = identity (64 seen), ds.severity per image
    "multichannel_digits": multichannel_digits,
    "thorax_xrays": thorax_xrays,  # MultiLabelDataset: labels [N,5]; cuts max_train itself
    "shape_volumes": shape_volumes,  # VolumeDataset [N,1,D,H,W]
    "vlm_caption_scenes": vlm_caption_scenes,  # chapter 7: labels = scene index into vitlab.vlm.caption_scenes
    "cifar10": cifar10,
    "cifar100": cifar100,
}


def load(name: str, split: str = "train", profile: Profile | str | None = None, *, seed: int = 0,
         allow_download: bool | None = None, **kwargs) -> ImageDataset:
    """Dataset ``name`` (see ``DATASETS``), ``split`` in train/val/test, sized by ``profile``.

    ``profile.max_train`` caps the train split (a stratified, deterministic prefix); val/test are never cut.
    ``seed`` changes generated data (cluttered scenes, long-tailed subsets), never the fixed splits of
    real datasets. ``allow_download`` None follows the profile (only ``gpu`` downloads).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"load: unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    check_split(split, "load")
    if allow_download is not None and not isinstance(allow_download, bool):
        raise TypeError(f"load: allow_download must be True, False or None, got {allow_download!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"load: seed must be an int, got {seed!r}")
    P = get_profile(profile)
    loader = DATASETS[name]
    params = inspect.signature(loader).parameters
    for key in kwargs:
        if key not in params or key in ("split", "seed", "allow_download", "max_train"):
            takes = [p for p in params if p not in ("split", "seed", "allow_download", "max_train")]
            raise TypeError(f"load: dataset {name!r} takes no keyword argument {key!r}; it takes {takes}")
    if "seed" in params:
        kwargs["seed"] = seed
    if "allow_download" in params:
        kwargs["allow_download"] = P.allow_download if allow_download is None else allow_download
    if "max_train" in params:  # the loader cuts the same prefix itself, without making what it drops
        kwargs["max_train"] = P.max_train
    ds = loader(split, **kwargs)
    if split == "train" and P.max_train is not None:
        ds = stratified_prefix(ds, P.max_train)
    return ds
