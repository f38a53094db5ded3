"""The chapter's post-training quantisers behind one call, for ``notebooks/3_quantization/compare.ipynb``.

    q = ptq("mptq_vit", model, calib_images, bits=4)              # W4/A4, a fake-quantised copy
    q = ptq("lrp_qvit", model, calib_images, average_bits=5.0)    # mixed precision at a 5-bit average

| method   | uniform bits                                                  | mixed bits (an average-bit budget)          |
| -------- | ------------------------------------------------------------- | ------------------------------------------- |
| minmax   | ``vitlab.quant`` defaults, min-max calibration                | -                                           |
| lrp_qvit | clipped channel-wise post-LayerNorm activations               | bits by LRP relevance, budget met exactly   |
| mptq_vit | SmoothQuant with a bias term, OPT-m post-GELU quantiser       | greedy mixed precision on layer sensitivity |
| is_vit   | SULQ post-softmax quantiser, three-stage smooth optimisation  | -                                           |

Every method keeps the patch embedding and the head at 8 bits and quantises the weights per output channel and
the inputs of every block linear; I&S-ViT also quantises the post-softmax attention (its SULQ is the point), so
it quantises strictly more than the others.
"""
from __future__ import annotations

import torch.nn as nn

import numbers

import torch

__all__ = ["METHODS", "MIXED", "RECIPE", "recipe", "calib_draw", "ptq"]

METHODS = ("minmax", "lrp_qvit", "mptq_vit", "is_vit")
MIXED = ("lrp_qvit", "mptq_vit")  # the methods that allocate bits per layer

# The settings the lessons and the compare notebook share, per profile (one place, so the compare runs each method
# exactly as its lesson does). n_test: the first n test images every accuracy is measured on (None: all);
# n_calib: calibration images per draw; seeds: calibration draws (PTQ has no training seed: the spread of a claim is
# over which images calibrate); n_scores: images for the per-layer scores of the mixed allocations;
# is_iters / is_lr / is_batch_size: I&S-ViT's reconstruction (Adam steps per block and stage).
RECIPE = {
    "smoke": dict(n_test=250, n_calib=32, seeds=1, n_scores=16, is_iters=6, is_lr=3e-4, is_batch_size=32),
    "cpu": dict(n_test=500, n_calib=64, seeds=3, n_scores=32, is_iters=10, is_lr=3e-4, is_batch_size=32),
    "gpu": dict(n_test=None, n_calib=1024, seeds=3, n_scores=64, is_iters=1000, is_lr=4e-5, is_batch_size=64),
}


def recipe(profile) -> dict:
    """The shared settings for a profile (a ``vitlab.profile()`` object or its name)."""
    name = getattr(profile, "name", profile)
    if name not in RECIPE:
        raise ValueError(f"recipe: unknown profile {name!r}; expected one of {tuple(RECIPE)}")
    return dict(RECIPE[name])


def calib_draw(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Calibration draw ``seed``: ``n`` images picked at random (without replacement) from ``images``; different
    seeds give different calibration sets, the same seed the same one."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"calib_draw: images must be a tensor [B, C, H, W], got "
                        f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    for name, v, low in (("n", n, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"calib_draw: {name} must be an int >= {low}, got {v!r}")
    if n > images.shape[0]:
        raise ValueError(f"calib_draw: n={n} is more than the {images.shape[0]} images to draw from")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n]
    return images[idx.to(images.device)]


def ptq(method: str, model: nn.Module, calib_images, *, bits: int | None = None, average_bits: float | None = None,
        is_iters: int = 50, n_scores: int = 16, is_lr: float = 3e-4, is_batch_size: int = 32) -> nn.Module:
    """A fake-quantised copy of ``model`` by ``method``: W``bits``/A``bits``, or, for the methods in ``MIXED``,
    per-layer bits whose parameter-weighted average is ``average_bits``.

    ``is_iters`` / ``is_lr`` / ``is_batch_size``: I&S-ViT's reconstruction (Adam steps per block and stage).
    ``n_scores``: calibration images for the per-layer scores of the mixed allocations (LRP relevance, MPTQ's
    sensitivity table). ``ptq(..., **recipe(P))`` minus ``n_calib``/``seeds`` runs a method as its lesson does.
    """
    if method not in METHODS:
        raise ValueError(f"ptq: unknown method {method!r}; expected one of {METHODS}")
    if (bits is None) == (average_bits is None):
        raise ValueError(f"ptq: give bits (uniform) or average_bits (mixed), not both or neither; got bits={bits!r}, "
                         f"average_bits={average_bits!r}")
    if average_bits is not None and method not in MIXED:
        raise ValueError(f"ptq: {method!r} has no mixed precision; average_bits works for {MIXED}")

    if method == "minmax":
        from vitlab.quant import calibrate_model, quantize_model

        q = quantize_model(model, bits, bits)
        calibrate_model(q, calib_images, method="minmax")
        return q
    if method == "lrp_qvit":
        from .lrp_qvit import allocate_bits, layer_scores, linear_params, lrp_qvit

        if average_bits is None:
            return lrp_qvit(model, calib_images, bits)
        scores = layer_scores(model, calib_images[:n_scores])  # explains the predicted class
        b = int(average_bits)
        choices = tuple(range(max(2, b - 1), min(8, b + 2) + 1))  # the lesson's choices around the budget
        return lrp_qvit(model, calib_images, allocate_bits(scores, linear_params(model), average_bits, choices))
    if method == "mptq_vit":
        from .mptq_vit import budget_for_average, greedy_mp, layer_sizes, mptq_quantize, sensitivity_table

        if average_bits is None:
            return mptq_quantize(model, calib_images, bits, bits)
        sizes = layer_sizes(model)
        lo, hi = max(3, int(average_bits) - 1), min(8, int(average_bits) + 1)  # bits around the budget
        table = sensitivity_table(model, calib_images[:n_scores], bits=range(lo, hi + 1))
        plan = greedy_mp(sizes, table, budget_for_average(sizes, average_bits), max_bits=hi, min_bits=lo)
        return mptq_quantize(model, calib_images, 8, 8, layer_bits=plan.bits)
    from .is_vit import is_vit_quantize, stage0

    base = stage0(model, calib_images, bits, bits)  # the lesson's start: calibrated once, as its RepQ-style row uses
    q, _ = is_vit_quantize(model, calib_images, bits, bits, iters=is_iters, lr=is_lr, batch_size=is_batch_size,
                           base=base)
    return q
