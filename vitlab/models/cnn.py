"""A small CIFAR-style ResNet: the course's CNN, for lessons that put a convolutional net next to a ViT
(a distillation teacher, a patch-selectivity comparison).

    cnn = small_cnn(train)                                        # ≈0.1 M parameters, about vit_nano's size
    resnet18 = SmallCNN(3, 10, widths=(64, 128, 256, 512), blocks=2, stem_stride=1)   # ResNet-18 for 32 px

3×3 stem, stages of basic blocks (stride 2 at the start of every stage but the first), global average pool,
linear head. With ``stem_stride=1`` and no max-pool it is the CIFAR variant of He et al.'s ResNet.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BasicBlock", "SmallCNN", "small_cnn"]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with BatchNorm, and a 1×1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


def _check_int(value, name: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"SmallCNN: {name} must be an int >= {low}, got {value!r}")
    return value


class SmallCNN(nn.Module):
    """The default (three 1-block stages of widths 24/48/96, a stride-2 stem) has ≈0.1 M parameters."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (24, 48, 96),
                 blocks: int = 1, stem_stride: int = 2):
        super().__init__()
        _check_int(in_chans, "in_chans")
        _check_int(num_classes, "num_classes", low=2)
        _check_int(blocks, "blocks")
        _check_int(stem_stride, "stem_stride")
        if not isinstance(widths, (tuple, list)) or not widths or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(f"SmallCNN: widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def small_cnn(data=None, **overrides) -> SmallCNN:
    """A SmallCNN sized for ``data`` (channels and classes from a vitlab ImageDataset), like ``create_model``."""
    cfg = {}
    if data is not None:
        if not (hasattr(data, "images") and hasattr(data, "num_classes")):
            raise TypeError(f"small_cnn: data must be a vitlab ImageDataset, got {type(data).__name__}")
        cfg = dict(in_chans=data.images.shape[1], num_classes=data.num_classes)
    cfg.update(overrides)
    return SmallCNN(**cfg)
