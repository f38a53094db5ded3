"""Image corruptions at five severities (in the spirit of ImageNet-C), for robustness lessons.

``corrupt(images, kind, severity)`` takes float images [N,C,H,W] in [0,1] and returns a new tensor of the
same shape and dtype, clamped to [0,1], identical for the same seed. The input is never modified.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CORRUPTIONS", "corrupt"]

CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "occlusion", "patch_shuffle")

# one row per kind, severities 1..5
_NOISE_SIGMA = (0.04, 0.08, 0.12, 0.18, 0.26)
_BLUR_SIGMA = (0.5, 1.0, 1.5, 2.0, 3.0)  # pixels
_CONTRAST_KEEP = (0.75, 0.5, 0.35, 0.2, 0.1)  # fraction of the deviation from the mean that survives
_OCCLUDED_AREA = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of the image under the square
_SHUFFLED_PATCHES = (0.2, 0.4, 0.6, 0.8, 1.0)  # fraction of patches that swap places
_OCCLUSION_FILL = 0.5  # gray: black would be invisible on MNIST's black background


def _gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    return x + _NOISE_SIGMA[s] * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    from torchvision.transforms.v2.functional import gaussian_blur

    sigma = _BLUR_SIGMA[s]
    # ~3 sigma each side, but reflect padding needs the half-width below the image side
    half = min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1)
    return gaussian_blur(x, kernel_size=[2 * half + 1] * 2, sigma=[sigma, sigma])


def _contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [N,1,1,1]
    return mean + _CONTRAST_KEEP[s] * (x - mean)


def _occlusion(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    side = max(1, round(math.sqrt(_OCCLUDED_AREA[s]) * min(h, w)))
    big = max(1, round(math.sqrt(_OCCLUDED_AREA[-1]) * min(h, w)))
    # the centre is drawn where the severity-5 square fits, the same for every severity with this seed,
    # so squares are nested and the damage grows monotonically with severity
    u = torch.rand(n, 2, generator=g, device=x.device)
    cy = big / 2 + u[:, 0] * (h - big)
    cx = big / 2 + u[:, 1] * (w - big)
    y0 = (cy - side / 2).round().long().clamp(0, h - side)  # [N]
    x0 = (cx - side / 2).round().long().clamp(0, w - side)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows >= y0[:, None]) & (rows < (y0 + side)[:, None])  # [N,H]
    in_x = (cols >= x0[:, None]) & (cols < (x0 + side)[:, None])  # [N,W]
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # [N,1,H,W]
    return torch.where(box, torch.full_like(x, _OCCLUSION_FILL), x)


def _patch_shuffle(x: Tensor, s: int, g: torch.Generator, p: int) -> Tensor:
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"corrupt: patch_size={p} must divide the image size {h}x{w}")
    gh, gw = h // p, w // p
    L = gh * gw
    k = max(2, round(_SHUFFLED_PATCHES[s] * L)) if L > 1 else L
    patches = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, L, c * p * p)
    # choose k positions per image, then hand their contents around by a random permutation
    pos = torch.rand(n, L, generator=g, device=x.device).argsort(dim=1)[:, :k]  # [N,k]
    mix = torch.rand(n, k, generator=g, device=x.device).argsort(dim=1)  # [N,k]
    src = torch.arange(L, device=x.device).expand(n, L).clone()
    src.scatter_(1, pos, torch.gather(pos, 1, mix))  # position pos[i] now reads from pos[mix[i]]
    out = torch.gather(patches, 1, src[:, :, None].expand(-1, -1, c * p * p))
    return out.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def corrupt(images: Tensor, kind: str, severity: int, *, seed: int = 0, patch_size: int = 4) -> Tensor:
    """``images`` [N,C,H,W] in [0,1] corrupted by ``kind`` (one of CORRUPTIONS) at ``severity`` 1..5.

    gaussian_noise: additive noise, sigma 0.04..0.26.   blur: Gaussian blur, sigma 0.5..3 px.
    contrast: blend towards the per-image mean.         occlusion: a gray square over 10..50 % of the area.
    patch_shuffle: 20..100 % of the ``patch_size`` patches trade places (5 = every patch shuffled).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError(f"corrupt: images must be a 4-D float tensor [N,C,H,W], got "
                        f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                        f"{tuple(getattr(images, 'shape', ()))}")
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"corrupt: images must be finite pixel values in [0, 1], got values in "
                         f"{images.min().item():g}..{images.max().item():g}")
    if kind not in CORRUPTIONS:
        raise ValueError(f"corrupt: unknown kind {kind!r}; valid: {list(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"corrupt: severity must be an int in 1..5, got {severity!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"corrupt: patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(seed, int):
        raise TypeError(f"corrupt: seed must be an int, got {seed!r}")
    g = torch.Generator(device=images.device).manual_seed(seed)
    s = severity - 1
    with torch.no_grad():
        if kind == "patch_shuffle":
            out = _patch_shuffle(images, s, g, patch_size)
        else:
            out = {"gaussian_noise": _gaussian_noise, "blur": _blur, "contrast": _contrast,
                   "occlusion": _occlusion}[kind](images, s, g)
        return out.clamp(0, 1).to(images.dtype)
