"""Chapter 6's comparison: the chapter's models on one robustness table, and its dense-feature methods on one ViT.

Two shared settings, because the chapter's methods act on two kinds of model (``notebooks/6_robustness/compare.ipynb``
reads both):

**Classifiers on chapter 1's digits** (2,000 training digits, 28 px, patch-4 grid; chapter 1's recipe, 3 seeds each,
every checkpoint committed by its lesson):

    vit       chapter 1's plain ViT: the control of every from-scratch row
    cnn       the SmallCNN of ``patch_robustness`` (about the ViT's parameters), same recipe
    tap       ViT + token-aware average pooling (``tap_adl``)
    adl       ViT trained with the attention diversification loss (``tap_adl``)
    tap_adl   both (``tap_adl``)
    t1        the ViT fine-tuned 1,000 more steps at attention temperature 1 (``patch_robustness``'s control)
    t3        the same fine-tune at temperature 3 (``patch_robustness``'s hottest)

each measured the same way by ``measure``: clean test accuracy; accuracy under every ``vitlab.data.corrupt`` kind at
severities 1-5 (seed 0, the 4-px grid: ``tap_adl``'s protocol); L∞ PGD (``PGD``, ``vitlab.attacks.pgd``) on the first
``N_ATTACK`` test digits; the fooling rate of the patch-wise attack (``patch_robustness.measure_attack``: PGD with
ε = 1 inside one grid patch); parameters. Throughput is timed live (``throughput``), round-robin over the models.

**Dense features of the scenes ViT** (``scenes_vit``, 3 seeds): raw patch tokens, PH-Reg's student with registers
and its no-register control, PH-Reg's shift-averaged teacher, DVT's denoised features and its control block, read
from those lessons' caches (``ph_reg.MEASURE_KEY``, ``dvt.MEASURE_KEY``) by ``dense_rows``: a linear segmentation
probe's mIoU and the position-only variance share, both from the same probe protocol (their raw rows agree).

    meas = zoo.measured(classifier_entry("tap", 0), MEASURE_KEY, measure, "cpu")
    corruption_means(meas)            # {kind: mean accuracy over severities 1-5, "all": mean over the kinds}
    mce(meas, vit_meas)               # mean corruption error relative to the plain ViT (1 = as robust)
    throughput({"vit": vit, ...})     # images/s at batch 256, median over interleaved rounds
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from vitlab.attacks import pgd
from vitlab.checks import check_batch, check_choice, check_int, check_model, check_number
from vitlab.data import CORRUPTIONS, corrupt
from vitlab.measure import accuracy, count_params, latency
from vitlab.methods.architectures import recipes as R
from vitlab.methods.robustness import patch_robustness as PR
from vitlab.methods.robustness import tap_adl as T

__all__ = ["SEEDS", "SEVERITIES", "PGD", "N_ATTACK", "THROUGHPUT_BATCH", "MEASURE_KEY", "CLASSIFIERS", "CONTROL",
           "classifier_entry", "corruption_accuracies", "pgd_accuracy", "measure", "corruption_means", "severity_curve",
           "mce", "throughput", "DENSE_ROWS", "dense_rows"]

SEEDS = R.SEEDS
SEVERITIES = (1, 2, 3, 4, 5)
PATCH = PR.PATCH  # the ViT's 4-px grid: patch_shuffle swaps these cells for every model
# ε = 0.05 (≈ 13/255) leaves the plain ViT near 50 % and the CNN near 75 % after 10 steps on seed 0: a point where
# the models differ (ε = 0.1 takes all of them to 6-7 %, ε = 0.02 leaves all above 88 %)
PGD = dict(eps=0.05, steps=10)
N_ATTACK = 500
THROUGHPUT_BATCH = 256
MEASURE_KEY = "ch6cmp-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes

CLASSIFIERS = {  # key -> the table's label
    "vit": "ViT (plain, control)",
    "cnn": "CNN",
    "tap": "ViT + TAP",
    "adl": "ViT + ADL",
    "tap_adl": "ViT + TAP + ADL",
    "t1": "ViT, +1k steps at T=1 (control)",
    "t3": f"ViT, +1k steps at T={PR.TEMPERATURES[-1]:g}",
}
# each row's control: the same steps, lr, data and seeds, so a paired gap is the method's effect
CONTROL = {"cnn": "vit", "tap": "vit", "adl": "vit", "tap_adl": "vit", "t1": "vit", "t3": "t1"}


def classifier_entry(key: str, seed: int) -> str:
    """The zoo entry of classifier ``key`` (one of ``CLASSIFIERS``) trained with ``seed`` (cpu checkpoints)."""
    check_choice(key, tuple(CLASSIFIERS), "key", "classifier_entry")
    if isinstance(seed, bool) or seed not in SEEDS:
        raise ValueError(f"classifier_entry: seed must be one of {SEEDS}, got {seed!r}")
    if key == "vit":
        return PR.vit_name(seed)
    if key == "cnn":
        return PR.cnn_name(seed)
    if key in ("t1", "t3"):
        return PR.temperature_name(PR.TEMPERATURES[0] if key == "t1" else PR.TEMPERATURES[-1], seed)
    return T.entry_name(key, seed)


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def corruption_accuracies(model: nn.Module, images: Tensor, labels: Tensor, *, kinds=CORRUPTIONS,
                          severities=SEVERITIES, patch_size: int = PATCH, seed: int = 0,
                          batch_size: int = 500) -> dict:
    """``{"acc_<kind>_<severity>": accuracy}`` of ``model`` on ``vitlab.data.corrupt(images, kind, severity, seed=seed,
    patch_size=patch_size)`` for every kind and severity (eval mode, restored after): the same corrupted images for
    every model."""
    fn = "corruption_accuracies"
    check_model(model, fn)
    check_batch(images, labels, fn)
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"{fn}: kinds must be a non-empty sequence of {CORRUPTIONS}, got {kinds!r}")
    for kind in kinds:
        check_choice(kind, CORRUPTIONS, "kinds", fn)
    if isinstance(severities, (str, int)) or not severities:
        raise ValueError(f"{fn}: severities must be a non-empty sequence of ints in 1..5, got {severities!r}")
    for s in severities:
        check_int(s, "severities", fn, low=1, high=5)
    check_int(batch_size, "batch_size", fn, low=1)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for kind in kinds:
            for s in severities:
                x = corrupt(images, kind, s, seed=seed, patch_size=patch_size)
                out[f"acc_{kind}_{s}"] = (_predict(model, x, batch_size) == labels).float().mean().item()
    finally:
        model.train(was_training)
    return out


def pgd_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, eps: float = PGD["eps"],
                 steps: int = PGD["steps"], seed: int = 0) -> float:
    """Accuracy of ``model`` on L∞ PGD adversarial copies of ``images`` (``vitlab.attacks.pgd``: ``steps`` signed
    steps of 2.5 ε / steps from a random start, seeded)."""
    check_model(model, "pgd_accuracy")
    check_number(eps, "eps", "pgd_accuracy", low=0, low_open=True, high=1)
    adv = pgd(model, images, labels, eps=eps, steps=steps, seed=seed)
    return accuracy(model, (adv, labels), batch_size=500)


def measure(model: nn.Module, profile=None) -> dict:
    """Everything the robustness table reads off one digit classifier (``profile``'s digits, chapter 1's test set):
    ``clean``; ``acc_<kind>_<severity>`` (``corruption_accuracies``); ``pgd`` (``pgd_accuracy`` on the first
    ``N_ATTACK`` test digits); ``fooled`` and ``clean_attacked`` (``patch_robustness.measure_attack``'s patch attack);
    ``params``. Cached per checkpoint through ``zoo.measured(entry, MEASURE_KEY, measure)``."""
    check_model(model, "measure")
    _, _, test = R.data("digits", profile)
    x, y = test.images, test.labels
    model.eval()
    attack = PR.measure_attack(model, profile, N_ATTACK)
    return {"clean": accuracy(model, (x, y), batch_size=500),
            **corruption_accuracies(model, x, y),
            "pgd": pgd_accuracy(model, x[:N_ATTACK], y[:N_ATTACK]),
            "fooled": attack["fooled"], "clean_attacked": attack["clean_attacked"],
            "params": float(count_params(model))}


def _check_meas(values, fn: str, name: str = "values") -> dict:
    if not isinstance(values, dict) or not any(k.startswith("acc_") for k in values):
        raise ValueError(f"{fn}: {name} must be a dict from ``measure`` (with acc_<kind>_<severity> keys), got "
                         f"{type(values).__name__}")
    return values


def corruption_means(values: dict, kinds=CORRUPTIONS) -> dict:
    """``{kind: mean accuracy over severities 1-5, "all": mean over kinds}`` from ``measure``'s dict."""
    _check_meas(values, "corruption_means")
    out = {}
    for kind in kinds:
        keys = [f"acc_{kind}_{s}" for s in SEVERITIES]
        missing = [k for k in keys if k not in values]
        if missing:
            raise ValueError(f"corruption_means: values lacks {missing}")
        out[kind] = sum(values[k] for k in keys) / len(keys)
    out["all"] = sum(out[k] for k in kinds) / len(kinds)
    return out


def severity_curve(values: dict, kinds=CORRUPTIONS) -> list[float]:
    """Accuracy at severity 0 (clean) to 5, each averaged over ``kinds``: how the model degrades."""
    _check_meas(values, "severity_curve")
    if "clean" not in values:
        raise ValueError("severity_curve: values lacks 'clean'")
    return [values["clean"]] + [sum(values[f"acc_{k}_{s}"] for k in kinds) / len(kinds) for s in SEVERITIES]


def mce(values: dict, reference: dict, kinds=CORRUPTIONS) -> float:
    """Mean corruption error relative to ``reference`` (ImageNet-C's mCE, with the plain ViT where Hendrycks and
    Dietterich use AlexNet): the mean over kinds of sum_s (1 - acc) / sum_s (1 - acc_reference). Below 1: fewer
    errors than the reference under corruption."""
    _check_meas(values, "mce")
    _check_meas(reference, "mce", "reference")
    ratios = []
    for kind in kinds:
        err = sum(1 - values[f"acc_{kind}_{s}"] for s in SEVERITIES)
        ref = sum(1 - reference[f"acc_{kind}_{s}"] for s in SEVERITIES)
        if ref <= 0:
            raise ValueError(f"mce: the reference makes no error under {kind!r}; it cannot normalise")
        ratios.append(err / ref)
    return sum(ratios) / len(ratios)


def throughput(models: dict, images: Tensor, *, rounds: int = 5, repeats: int = 3, warmup: int = 2) -> dict:
    """``{name: images/s}`` of each model's eval forward on ``images`` (one batch), on this machine: ``rounds`` rounds,
    each timing every model in turn (``vitlab.measure.latency``, ``repeats`` runs, median), so a load that comes and
    goes hits all models alike; the median over rounds."""
    fn = "throughput"
    if not isinstance(models, dict) or not models:
        raise TypeError(f"{fn}: models must be a non-empty dict name -> model, got {type(models).__name__}")
    for name, m in models.items():
        check_model(m, fn)
    if not isinstance(images, Tensor) or images.ndim != 4 or not len(images):
        raise ValueError(f"{fn}: images must be a non-empty batch [N, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    check_int(rounds, "rounds", fn, low=1)
    check_int(repeats, "repeats", fn, low=1)
    check_int(warmup, "warmup", fn, low=0)
    times = {name: [] for name in models}
    for r in range(rounds):
        for name, m in models.items():
            times[name].append(latency(m, images, warmup=warmup if r == 0 else 0, repeats=repeats)["median_ms"])
    return {name: len(images) / (sorted(t)[len(t) // 2] / 1e3) for name, t in times.items()}


# The dense table: row -> (which lesson's cache, the metric prefix there, where its smoothness lives or None)
DENSE_ROWS = {
    "raw ViT features": ("dvt", "raw", "vit"),
    "PH-Reg teacher (shift-averaged)": ("phreg", "teacher", "teacher"),
    "PH-Reg student (4 registers)": ("phreg", "student", "student"),
    "PH-Reg control (no registers)": ("phreg", "control", "control"),
    "DVT denoised (stage 2)": ("dvt", "stage2", None),
    "DVT control block": ("dvt", "control", None),
}


def dense_rows(phreg: dict, dvt: dict) -> dict:
    """``{row: {"miou", "position_share", "smooth_score" (or None)}}`` for one scenes ViT, from its PH-Reg cache
    (``ph_reg.MEASURE_KEY``) and its DVT cache (``dvt.MEASURE_KEY``): the two lessons' metric names mapped onto one
    table (DVT's ``<what>/share`` is PH-Reg's ``<model>/position_share``: both ``dvt.position_variance_share``)."""
    for name, d, probe in (("phreg", phreg, "vit/miou"), ("dvt", dvt, "raw/miou")):
        if not isinstance(d, dict) or probe not in d:
            raise ValueError(f"dense_rows: {name} must be that lesson's cached dict (with {probe!r}), got "
                             f"{sorted(d)[:5] if isinstance(d, dict) else type(d).__name__}")
    out = {}
    for row, (lesson, prefix, smooth) in DENSE_ROWS.items():
        d = phreg if lesson == "phreg" else dvt
        share = d[f"{prefix}/position_share"] if lesson == "phreg" else d[f"{prefix}/share"]
        out[row] = {"miou": d[f"{prefix}/miou"], "position_share": share,
                    "smooth_score": phreg[f"{smooth}/smooth_score"] if smooth else None}
    return out
