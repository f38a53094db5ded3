"""Patch Mixing (Lee, Bargal et al., 2023, arXiv:2306.17848), written from the paper's description.

Paste grid patches of another image into a training image and mix the labels by the pasted area. The paper's
point is what this teaches a CNN: to *ignore* patches that do not belong to the object ("patch selectivity"),
an ability ViTs show without being taught it.

    choose    N₁ = r·N of the N grid cells (P×P pixels each), as a mask M (1 on the chosen cells)
    mix       x̃ = (1 − M) ⊙ x_A + M ⊙ x_B                x_B = the batch in a random order
    label     ỹ = (1 − r)·y_A + r·y_B, then label smoothing: (1 − s)·ỹ + s/C

    mixer = PatchMix(patch_size=4, num_classes=10, max_ratio=0.5, smoothing=0.1, seed=0)
    x_mix, targets, cells = mixer(x, y)                      # cells: the mask M on the grid
    history = fit(model, train, val, profile=P, step_fn=patchmix_step(mixer))
    curves = robustness_curves(model, test, patch_size=4)   # out-of-context, occlusion, patch shuffle

Evaluation (the paper's main test): replace a fraction f of a test image's grid patches by the patches at the
same places of an image of *another class* (``replace_out_of_context``) and keep scoring against the original
label. A patch-selective model ignores the intruders and degrades slowly as f grows. We add ``vitlab.data``'s
gray-square ``occlusion`` and ``patch_shuffle`` at severities 1..5.

Our reading of the paper (no official code was released; the abstract and the project page are what we
checked, so these are our choices):
- r per image: N₁ drawn uniformly from {0, 1, ..., ⌊max_ratio·N⌋} and r = N₁/N exactly, so the soft label
  equals the pasted area. max_ratio = 0.5 by default: the original image always keeps at least half of the
  cells, so y_A stays the majority label (E[r] ≈ max_ratio/2), as in the evaluation, where intruders
  replace at most half of the patches.
- Every image of the batch is mixed (probability 1); the partner batch is one random permutation (an image
  may be paired with itself or with an image of its own class: then ỹ is simply its own label).
- The grid is the ViT's patch grid for both model families, so both see the same intruding patches (a ViT
  token is then never split between two images).
- Out-of-context replacement takes all intruding patches of an image from one donor image of a different
  class, chosen at random from the evaluated set with a fixed seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ...checks import check_int, check_number
from ...augment import cell_mask, mix_targets, paste, soft_cross_entropy
from ...data import corrupt
from ...models.cnn import SmallCNN, small_cnn  # the course's CNN; re-exported for the lesson

__all__ = ["RECIPE", "PatchMix", "patchmix_step", "cutmix_step", "SmallCNN", "small_cnn", "replace_out_of_context",
           "robustness_curves"]

# The recipe's hyper-parameters in one place (the lesson and ``recipes.train_recipe`` read them from here): at most
# half of the cells pasted, labels mixed by area and smoothed by 0.1.
RECIPE = dict(max_ratio=0.5, smoothing=0.1)
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
SEVERITIES = (1, 2, 3, 4, 5)


# ------------------------------------------------------------------------------------------------ checks

def _check_images(images, labels, patch_size: int, fn: str) -> tuple[int, int]:
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise TypeError(f"{fn}: images must be a float tensor [B,C,H,W], got {getattr(images, 'shape', images)!r}")
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype != torch.long or len(labels) != len(images):
        raise TypeError(f"{fn}: labels must be a long tensor [B={len(images)}], got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{fn}: patch_size={patch_size} must divide the image size {H}x{W}")
    return H // patch_size, W // patch_size


# ------------------------------------------------------------------------------------------------ PatchMix
class PatchMix:
    """Batch-level Patch Mixing on a P×P grid: ``x_mix, targets, cells = mixer(x, y)``.

    ``cells`` [B, gh, gw] bool is the mask M on the grid (True: the cell comes from the partner), so
    r = cells.mean() per image; ``targets`` [B, C] are the smoothed mixed labels.
    Draws come from the mixer's own CPU generator, so a seed gives the same masks on any device.
    """

    def __init__(self, patch_size: int, num_classes: int, *, max_ratio: float = 0.5, smoothing: float = 0.1,
                 seed: int = 0):
        self.patch_size = check_int(patch_size, "patch_size", "PatchMix")
        self.num_classes = check_int(num_classes, "num_classes", "PatchMix", low=2)
        self.max_ratio = check_number(max_ratio, "max_ratio", "PatchMix", low=0, high=1)
        self.smoothing = check_number(smoothing, "smoothing", "PatchMix", low=0, high=1, high_open=True)
        check_int(seed, "seed", "PatchMix", low=0)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor, y: Tensor, *, n_cells: Tensor | int | None = None,
                 perm: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mix a batch. ``n_cells`` (N₁ per image) and ``perm`` (the partner order) default to random draws."""
        gh, gw = _check_images(x, y, self.patch_size, "PatchMix")
        B, N = len(x), gh * gw
        if n_cells is None:  # N₁ ~ uniform on {0, ..., ⌊max_ratio·N⌋}
            n_cells = torch.randint(0, math.floor(self.max_ratio * N + 1e-9) + 1, (B,), generator=self.generator)
        if perm is None:
            perm = torch.randperm(B, generator=self.generator)
        elif not torch.is_tensor(perm) or sorted(perm.tolist()) != list(range(B)):
            raise ValueError(f"PatchMix: perm must be a permutation of range({B}), got {perm!r}")
        cells = cell_mask(B, (gh, gw), n_cells, generator=self.generator)  # raises unless 0 <= N₁ <= N
        perm = perm.to(x.device)
        ratio = cells.flatten(1).float().mean(1).to(x.device)  # r = N₁/N, exactly the pasted area
        x_mix = paste(x, x[perm], cells)
        targets = mix_targets(y, y[perm], 1.0 - ratio, self.num_classes, smoothing=self.smoothing)
        return x_mix, targets, cells

    def __repr__(self) -> str:
        return (f"PatchMix(patch_size={self.patch_size}, num_classes={self.num_classes}, "
                f"max_ratio={self.max_ratio}, smoothing={self.smoothing})")


def patchmix_step(mixer: PatchMix):
    """A ``step_fn`` for ``vitlab.train.fit``: mix the batch, then soft cross-entropy on the mixed labels."""
    if not isinstance(mixer, PatchMix):
        raise TypeError(f"patchmix_step: mixer must be a PatchMix, got {type(mixer).__name__}")

    def step(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_mix, targets, _ = mixer(x, y)
        logits = net(x_mix)
        return soft_cross_entropy(logits.float(), targets), logits

    return step


def cutmix_step(num_classes: int, *, alpha: float = 1.0, smoothing: float = 0.1):
    """The control: a ``step_fn`` that trains with timm's CutMix instead (``timm.data.Mixup`` with
    ``cutmix_alpha=alpha``, no Mixup, every batch, one box per batch pasted from the batch in reverse order,
    λ corrected to the pasted area, labels smoothed by ``smoothing``), then soft cross-entropy.

    Same label mixing by area and the same smoothing as ``patchmix_step``; what differs is *what* is pasted:
    one rectangle of random size and place, not grid-aligned cells. The box and λ come from NumPy's global
    generator (timm's), which ``vitlab.train.fit(seed=...)`` seeds. Needs an even batch size (timm's rule).
    """
    from timm.data import Mixup

    num_classes = check_int(num_classes, "num_classes", "cutmix_step", low=2)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"cutmix_step: alpha must be a positive number, got {alpha!r}")
    smoothing = check_number(smoothing, "smoothing", "cutmix_step", low=0, high=1, high_open=True)
    mixer = Mixup(mixup_alpha=0.0, cutmix_alpha=float(alpha), prob=1.0, switch_prob=0.0, mode="batch",
                  correct_lam=True, label_smoothing=smoothing, num_classes=num_classes)

    def step(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_mix, targets = mixer(x.clone(), y)  # timm pastes in place: never into the caller's tensor
        logits = net(x_mix)
        return soft_cross_entropy(logits.float(), targets.float()), logits

    step.mixer = mixer
    return step


# ------------------------------------------------------------------------------------------------ small CNN
# ------------------------------------------------------------------------------------------------ evaluation
def replace_out_of_context(images: Tensor, labels: Tensor, fraction: float, patch_size: int, *, seed: int = 0
                           ) -> tuple[Tensor, Tensor]:
    """Replace round(fraction·N) random grid patches of each image by the same patches of an image of another class.

    Returns (corrupted images, donor index of each image). Donors come from ``images`` itself, uniformly among the
    images of other classes; every image needs at least one. For one seed the donors are the same at every
    fraction and the replaced patches are nested (those at f are among those at f' > f), so a curve over f changes
    one thing at a time.
    """
    gh, gw = _check_images(images, labels, patch_size, "replace_out_of_context")
    fraction = check_number(fraction, "fraction", "replace_out_of_context", low=0, high=1)
    check_int(seed, "seed", "replace_out_of_context", low=0)
    B = len(images)
    lab = labels.cpu()
    order = lab.argsort(stable=True)  # images grouped by class
    counts = torch.bincount(lab)
    starts = counts.cumsum(0) - counts  # where each class's block begins in ``order``
    n_other = B - counts[lab]  # [B] images of another class
    if (n_other == 0).any():
        raise ValueError("replace_out_of_context: every image needs an image of another class in the set")
    g = torch.Generator().manual_seed(seed)
    # the k-th image outside this image's class block, k uniform: skip over the block when k reaches it
    k = (torch.rand(B, generator=g, dtype=torch.float64) * n_other).long().clamp_max(n_other - 1)
    donors = order[k + counts[lab] * (k >= starts[lab])]
    cells = cell_mask(B, (gh, gw), round(fraction * gh * gw), generator=g)
    return paste(images, images[donors.to(images.device)], cells), donors


@torch.no_grad()
def robustness_curves(model: nn.Module, data, patch_size: int, *, fractions=FRACTIONS, severities=SEVERITIES,
                      seed: int = 0, batch_size: int = 256) -> dict:
    """Accuracy of ``model`` on ``data`` under out-of-context patch replacement, occlusion and patch shuffle.

    Returns {"clean": acc, "out_of_context": [acc per fraction], "occlusion": [acc per severity],
    "patch_shuffle": [acc per severity], "fractions": [...], "severities": [...]}.
    """
    from ...measure import accuracy

    if not isinstance(model, nn.Module):
        raise TypeError(f"robustness_curves: model must be an nn.Module, got {type(model).__name__}")
    if not (hasattr(data, "images") and hasattr(data, "labels")):
        raise TypeError(f"robustness_curves: data must be a vitlab ImageDataset, got {type(data).__name__}")
    check_int(patch_size, "patch_size", "robustness_curves")
    fractions = [check_number(f, "fractions", "robustness_curves", low=0, high=1) for f in fractions]
    severities = list(severities)
    x, y = data.images, data.labels
    acc = lambda imgs: accuracy(model, (imgs, y), batch_size=batch_size)  # noqa: E731
    return {
        "clean": acc(x),
        "fractions": fractions,
        "severities": severities,
        "out_of_context": [acc(replace_out_of_context(x, y, f, patch_size, seed=seed)[0]) for f in fractions],
        "occlusion": [acc(corrupt(x, "occlusion", s, seed=seed)) for s in severities],
        "patch_shuffle": [acc(corrupt(x, "patch_shuffle", s, seed=seed, patch_size=patch_size)) for s in severities],
    }
