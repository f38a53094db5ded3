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

__all__ = ["METHODS", "MIXED", "ptq"]

METHODS = ("minmax", "lrp_qvit", "mptq_vit", "is_vit")
MIXED = ("lrp_qvit", "mptq_vit")  # the methods that allocate bits per layer


def ptq(method: str, model: nn.Module, calib_images, *, bits: int | None = None, average_bits: float | None = None,
        is_iters: int = 50, n_scores: int = 16) -> nn.Module:
    """A fake-quantised copy of ``model`` by ``method``: W``bits``/A``bits``, or, for the methods in ``MIXED``,
    per-layer bits whose parameter-weighted average is ``average_bits``.

    ``is_iters``: I&S-ViT's reconstruction steps per block and stage. ``n_scores``: calibration images for the
    per-layer scores of the mixed allocations (LRP relevance, MPTQ's sensitivity table).
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
        scores = layer_scores(model, calib_images[:n_scores])
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
    from .is_vit import is_vit_quantize

    q, _ = is_vit_quantize(model, calib_images, bits, bits, iters=is_iters)
    return q
