"""Adversarial attacks for the robustness lessons, on ``vitlab.data.corrupt``'s conventions (images in [0, 1]).

    adv = pgd(model, images, labels, eps=8 / 255, steps=10)                 # L∞ PGD (Madry et al., 2018)
    mask = patch_mask(images, patch_size=4, seed=0)                         # one random grid patch per image
    adv = pgd(model, images, labels, eps=1.0, steps=20, mask=mask)          # a patch-wise attack (Gu et al., 2022)
    rate = fooling_rate(model, images, adv, labels)

PGD ascends the cross-entropy of the true label by signed gradient steps and, after every step, projects onto
the ε-ball around the clean image, the valid range [0, 1] and, with a ``mask``, onto the masked pixels: outside
the mask the image is never changed. With ε = 1 inside one patch the attacker may paint that patch freely, the
patch-wise attack of "Are Vision Transformers Robust to Patch Perturbations?".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.augment import cell_mask, cells_to_pixels
from vitlab.checks import check_int, check_model, check_number

__all__ = ["pgd", "patch_mask", "fooling_rate"]


def _check_images(images, fn: str, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a float tensor [N, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{fn}: {name} must be pixel values in [0, 1], got values in "
                         f"{images.min().item():g}..{images.max().item():g}")


def _check_labels(labels, n: int, fn: str) -> None:
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"{fn}: labels must be an int tensor [N={n}], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")


def patch_mask(images: Tensor, patch_size: int, *, seed: int = 0, patches: int = 1) -> Tensor:
    """[N, 1, H, W] bool: ``patches`` random cells of the ``patch_size`` grid per image (the same for one seed), the
    pixels a patch-wise perturbation may touch. The grid is the ViT's patch grid, so a masked cell is one token."""
    _check_images(images, "patch_mask")
    check_int(patch_size, "patch_size", "patch_mask", low=1)
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_mask: patch_size={patch_size} must divide the image size {H}x{W}")
    grid = (H // patch_size, W // patch_size)
    check_int(patches, "patches", "patch_mask", low=1, high=grid[0] * grid[1])
    check_int(seed, "seed", "patch_mask", low=0)
    cells = cell_mask(len(images), grid, patches, generator=torch.Generator().manual_seed(seed))
    return cells_to_pixels(cells, patch_size).to(images.device)


def pgd(model: nn.Module, images: Tensor, labels: Tensor, *, eps: float, steps: int, step_size: float | None = None,
        mask: Tensor | None = None, random_start: bool = True, seed: int = 0, batch_size: int = 500,
        return_losses: bool = False, loss_fn=None):
    """Untargeted L∞ PGD: adversarial copies of ``images`` [N, C, H, W] in [0, 1] that raise ``model``'s
    cross-entropy on ``labels``. ``step_size`` defaults to 2.5 ε / steps (Madry et al.); ``random_start`` begins at
    a uniform point of the ε-ball (seeded by ``seed``); ``mask`` [N or 1, 1 or C, H, W] (bool) confines every change
    to its True pixels. The model runs in eval mode and its parameters get no gradient. With ``return_losses`` also
    returns the mean loss before each step and after the last, [steps + 1] (the ascent the attack made).
    ``loss_fn(adversarial, clean, labels) -> the batch's summed loss`` replaces the cross-entropy: what the attack
    ascends when it has no classifier to fool (a feature-space attack on a pre-trained encoder)."""
    fn = "pgd"
    check_model(model, fn)
    _check_images(images, fn)
    _check_labels(labels, len(images), fn)
    check_number(eps, "eps", fn, low=0, low_open=True, high=1)
    check_int(steps, "steps", fn, low=1)
    check_int(batch_size, "batch_size", fn, low=1)
    if step_size is None:
        step_size = 2.5 * eps / steps
    check_number(step_size, "step_size", fn, low=0, low_open=True)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"pgd: loss_fn must be callable (adversarial, clean, labels) -> loss, got {type(loss_fn).__name__}")
    if loss_fn is None:
        def loss_fn(adv, clean, y):
            return F.cross_entropy(model(adv), y, reduction="sum")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 4 or \
                mask.shape[-2:] != images.shape[-2:] or mask.shape[0] not in (1, len(images)) or \
                mask.shape[1] not in (1, images.shape[1]):
            raise ValueError(f"pgd: mask must be a bool tensor [N or 1, 1 or C, H, W] matching images "
                             f"{tuple(images.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else ''}")
        mask = mask.expand(len(images), images.shape[1], *images.shape[-2:])
    g = torch.Generator(device=images.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out, losses = [], torch.zeros(steps + 1)
    try:
        for i in range(0, len(images), batch_size):
            x0, y = images[i:i + batch_size].detach(), labels[i:i + batch_size]
            allowed = None if mask is None else mask[i:i + batch_size].to(x0.dtype)
            delta = torch.zeros_like(x0)
            if random_start:
                delta = (2 * torch.rand(x0.shape, generator=g, device=x0.device, dtype=x0.dtype) - 1) * eps
            for t in range(steps + 1):
                delta = (x0 + (delta if allowed is None else delta * allowed)).clamp(0, 1) - x0  # project
                if t == steps:
                    with torch.no_grad():
                        losses[t] += loss_fn(x0 + delta, x0, y).item()
                    break
                delta.requires_grad_(True)
                loss = loss_fn(x0 + delta, x0, y)
                (grad,) = torch.autograd.grad(loss, delta)
                losses[t] += loss.item()
                delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
            out.append((x0 + delta).detach())
    finally:
        model.train(was_training)
    adv = torch.cat(out)
    return (adv, losses / len(images)) if return_losses else adv


@torch.no_grad()
def fooling_rate(model: nn.Module, images: Tensor, adversarial: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Of the images ``model`` classifies correctly, the fraction whose ``adversarial`` copy it gets wrong."""
    check_model(model, "fooling_rate")
    _check_images(images, "fooling_rate")
    _check_images(adversarial, "fooling_rate", "adversarial")
    if adversarial.shape != images.shape:
        raise ValueError(f"fooling_rate: adversarial must have the images' shape {tuple(images.shape)}, got "
                         f"{tuple(adversarial.shape)}")
    _check_labels(labels, len(images), "fooling_rate")
    was_training = model.training
    model.eval()
    clean, adv = [], []
    for i in range(0, len(images), batch_size):
        clean.append(model(images[i:i + batch_size]).argmax(-1))
        adv.append(model(adversarial[i:i + batch_size]).argmax(-1))
    model.train(was_training)
    right = torch.cat(clean) == labels
    if not right.any():
        raise ValueError("fooling_rate: the model classifies none of the clean images correctly")
    return (torch.cat(adv)[right] != labels[right]).float().mean().item()
