"""Data for ViT Lab: every dataset as in-memory tensors behind one ``load(name, split, profile)``.

    from vitlab import data
    ds = data.load("mnist5k", "train")           # ImageDataset: images [N,1,28,28] in [0,1], labels [N]
    ds = data.load("cluttered_scenes", "test", img_size=32)   # digits among clutter, with masks
    ds = data.load("thorax_xrays", "train")      # MultiLabelDataset: chest x-rays, labels [N,5] multi-hot
    ds = data.load("shape_volumes", "train")     # VolumeDataset: volumes [N,1,16,16,16], 6 solids
    x = data.corrupt(ds.images, "blur", severity=3)

Offline: mnist5k, mnist5k_lt, digits8, cluttered_scenes, cells, color_cells, faces, thorax_xrays, shape_volumes.
Online (downloads only when allowed): cifar10, cifar100.
"""
from .cells import NUCLEUS_TYPES, CellsDataset, cell_images, cells, split_masks
from .colors import color_cells, patch_colors
from .corruptions import CORRUPTIONS, corrupt
from .dataset import SPLITS, ImageDataset
from .faces import face_images, faces, faces_verification
from .longtail import long_tail_counts, long_tailed
from .online import data_dir
from .registry import DATASETS, load
from .scenes import cluttered_scenes, patch_mask
from .thorax import FINDINGS, MultiLabelDataset, thorax_xrays
from .volumes import VOLUME_CLASSES, VolumeDataset, shape_volumes, volume_slices

__all__ = [
    "NUCLEUS_TYPES", "CellsDataset", "cell_images", "cells", "split_masks",
    "face_images", "faces", "faces_verification",
    "CORRUPTIONS", "DATASETS", "SPLITS", "ImageDataset", "cluttered_scenes", "color_cells", "corrupt", "data_dir", "load",
    "long_tail_counts", "long_tailed", "patch_colors", "patch_mask",
    "FINDINGS", "MultiLabelDataset", "thorax_xrays", "VOLUME_CLASSES", "VolumeDataset", "shape_volumes",
    "volume_slices",
]
