"""Chapter 1's shared set-up: small data where inductive bias shows, one from-scratch recipe for every
architecture, a plain ViT of matched parameters as the control, and a cache of every trained model.

    train, val, test = data("digits", P)          # mnist5k: 2,000 training digits, 28 px, 1 channel
    register("t2t_vit", T2TViT, **config)         # model "ch1_t2t_vit" + one zoo entry per seed
    model, info = trained("t2t_vit", seed, P)     # trained from scratch with train_kwargs(P), cached
    control, _ = trained("vit", seed, P)          # the plain ViT: same data, steps, lr, schedule and seed
    row = measure_row("t2t_vit", model, test)     # accuracy, parameters, GFLOPs, throughput

The experimental standard (DESIGN.md §8): every architecture of the chapter is trained by exactly
``train_kwargs(P)`` (same optimiser, lr, schedule, augmentation, batch and number of steps) on exactly the data
of ``data(dataset, P)``, with the same seeds (``seeds(P)``). A claim "X beats a plain ViT" is asserted, seed by
seed, against ``trained("vit", seed, P)``, a ViT of about the same number of parameters (``check_matched``), with
``vitlab.stats.paired_gap``'s margin. The step count is where the plain ViT's test accuracy has plateaued
(``info["metrics"]["plateau_gain"]``), so that a gap is the architecture's, not an unfinished schedule's.

Training from scratch to the plateau costs minutes per model, so every model is trained once and cached by
``vitlab.zoo`` (its checkpoints are committed for the cpu profile; the smoke profile loads those, so CI checks
the real claims). A lesson shows the stored training curve (``info["history"]``) and the recipe's code; with
``retrain=True`` it trains again, and the same seed on the same machine gives the same weights.

On GPU (the gpu profile) the same architectures train on CIFAR-100 (downloaded through torchvision) with
``train_kwargs("gpu")``: bf16 autocast and torch.compile from the profile, and a longer schedule.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from vitlab import data as vdata
from vitlab import measure, zoo
from vitlab.checks import check_choice, check_model
from vitlab.models import VisionTransformer
from vitlab.models.registry import MODELS, register_model
from vitlab.profiles import Profile
from vitlab.profiles import profile as get_profile
from vitlab.stats import plateau_text  # noqa: F401 (re-exported: the chapter's lessons call recipes.plateau_text)
from vitlab.viz import plot_training  # noqa: F401

__all__ = ["DATASETS", "SEEDS", "TRAIN", "STEPS", "register", "registered", "data", "train_kwargs", "seeds",
           "trained", "model_name", "entry_name", "check_matched", "measure_row", "BASELINE", "plot_training",
           "plateau_text", "MODULES", "import_all", "make_train_step", "train_step_ms", "STEP_MS_CPU",
           "equal_time_steps", "trained_equal_time"]

# Every chapter-1 module: importing one registers its architectures (``register``); ``import_all`` imports them all
# (for the comparison and for lessons that look across the chapter).
MODULES = ("t2t_vit", "crossvit", "volo", "dhvt", "dualtoken_vit", "cas_vit", "duoformer", "channelvit", "l2vit",
           "gmm_attention", "hyena_nd", "vit_resnas", "as_vit", "shift_equivariant", "patch_scaling", "ggem_pooling")

# name -> (vitlab.data name, its keyword arguments, training images in the cpu profile). Small on purpose:
# the chapter's claims are about inductive bias, which shows when data are scarce.
DATASETS: dict[str, tuple[str, dict, int | None]] = {
    "digits": ("mnist5k", {}, 2000),
    "digits8": ("digits8", {}, None),  # scikit-learn's 8x8 digits, all 1,257 training images (patch-size sweeps)
    "channels": ("multichannel_digits", {}, 2000),  # the same 2,000 digits as 4 partly redundant channels
}
GPU_DATASET = ("cifar100", {})  # every chapter-1 dataset becomes CIFAR-100 in the gpu profile
DATA_SEED = 0  # generated datasets use one seed for every model and training seed: the same test images

# THE chapter's from-scratch recipe (vitlab.train.fit arguments; add seed=). AdamW with 10 % warm-up then cosine,
# label smoothing 0.1, +-2 px shifts, batch 64. STEPS: where the plain ViT's test accuracy has plateaued. Measured
# on 2,000 digits (seed 0): 1,500 steps 93.8 % test and still rising at the end; 3,000 steps (96 epochs)
# 97.0 %, flat over the last quarter (train 99.1 %).
TRAIN = dict(lr=2e-3, weight_decay=0.05, warmup=0.1, label_smoothing=0.1, shift=2, batch_size=64)
STEPS = {"cpu": 3000, "gpu": 30000}
GPU_TRAIN = dict(TRAIN, lr=1e-3, shift=4, batch_size=256)
SEEDS = (0, 1, 2)

# Equal wall-clock, the comparison's second reading: every architecture gets the plain ViT's training time
# (STEPS["cpu"] of its steps) in steps of its own, STEPS * STEP_MS["vit"] / STEP_MS[method], rounded to 50, so
# cheap architectures train longer and costly ones shorter. STEP_MS_CPU: one training step of the recipe (batch 64,
# one CPU thread), timed round-robin by `benchmarks/ch1_step_times.py` (benchmarks/results/ch1_step_ms_cpu.json).
# Fixed numbers, not a timer inside training: the same seed gives the same weights on every machine.
STEP_MS_CPU = {"vit": 98.6, "t2t_vit": 154.8, "crossvit": 63.2, "volo": 98.3, "dhvt": 166.7, "dualtoken_vit": 61.6,
               "cas_vit": 70.9, "duoformer": 244.2, "shift_equivariant": 110.9, "l2vit": 183.9, "gmm_vit": 107.7,
               "hyena_hyena": 182.7, "hyena_hybrid": 134.5, "vit_resnas": 133.4,
               # timed later, round-robin with the plain ViT and scaled to its time above (--add)
               "ggem_vit": 103.2, "channelvit_1ch": 99.5, "vit_patch2": 556.0}

# The control every architecture is compared with: a plain ViT (vit_nano's 4 x 64, patch 4), ~0.14 M parameters
# on digits. Each lesson's architecture is sized to about as many parameters (check_matched).
BASELINE = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)

_REGISTERED: dict[str, str] = {}  # method -> dataset


def equal_time_steps(method: str) -> int:
    """The steps ``method`` trains for in the plain ViT's cpu training time (``STEP_MS_CPU``), rounded to 50."""
    if method not in STEP_MS_CPU:
        raise ValueError(f"equal_time_steps: no measured step time for {method!r}; measured: {sorted(STEP_MS_CPU)} "
                         f"(benchmarks/ch1_step_times.py)")
    return int(round(STEPS["cpu"] * STEP_MS_CPU["vit"] / STEP_MS_CPU[method] / 50) * 50)


def model_name(method: str) -> str:
    """The model-registry name of a chapter-1 architecture: ``ch1_<method>``."""
    return f"ch1_{method}"


def entry_name(method: str, seed: int, profile: Profile | str | None = None, *, equal_time: bool = False) -> str:
    """The zoo entry of ``method`` trained with ``seed``: ``ch1_<method>_<dataset>_s<seed>`` (cifar100 on GPU), or
    with ``equal_time`` its equal-wall-clock twin ``ch1_<method>_<dataset>_eqtime_s<seed>`` (cpu only)."""
    P = get_profile(profile)
    dataset = "cifar100" if P.name == "gpu" else registered(method)
    return f"{model_name(method)}_{dataset}{'_eqtime' if equal_time else ''}_s{seed}"


def _check_seed(seed, fn: str) -> None:
    if isinstance(seed, bool) or seed not in SEEDS:
        raise ValueError(f"{fn}: seed must be one of {SEEDS}, got {seed!r}")


def register(method: str, builder: Callable[..., nn.Module], *, dataset: str = "digits", **config: Any) -> None:
    """Register ``builder(**config)`` as model ``ch1_<method>`` and one zoo entry per seed in ``SEEDS``, trained
    from scratch on ``dataset`` with the chapter's recipe. ``builder`` must take ``img_size``, ``in_chans`` and
    ``num_classes`` (the data set them) and return a module mapping images [B, C, H, W] to logits. Registering
    the same method twice is a no-op when nothing changed (a module re-imported), else an error."""
    if not isinstance(method, str) or not method.isidentifier():
        raise ValueError(f"register: method must be an identifier-like name, got {method!r}")
    check_choice(dataset, DATASETS, "dataset", "register")
    if not callable(builder):
        raise TypeError(f"register: builder must be callable, got {type(builder).__name__}")
    name = model_name(method)
    if method in _REGISTERED:
        if _REGISTERED[method] != dataset or MODELS[name] != config:
            raise ValueError(f"register: {method!r} is already registered with another dataset or config")
        return
    register_model(name, builder, **config)
    _REGISTERED[method] = dataset
    source, kwargs, n_train = DATASETS[dataset]
    for seed in SEEDS:
        zoo.register(f"{name}_{dataset}_s{seed}", zoo.Recipe(
            model=name, data=source, data_kwargs=dict(kwargs), fit=dict(TRAIN), seed=seed, data_seed=DATA_SEED,
            per_profile={"cpu": dict(steps=STEPS["cpu"], max_train=n_train)}, shares={"smoke": "cpu"}))
        if method in STEP_MS_CPU and equal_time_steps(method) != STEPS["cpu"]:
            zoo.register(f"{name}_{dataset}_eqtime_s{seed}", zoo.Recipe(  # = entry_name(..., equal_time=True)
                model=name, data=source, data_kwargs=dict(kwargs), fit=dict(TRAIN), seed=seed, data_seed=DATA_SEED,
                per_profile={"cpu": dict(steps=equal_time_steps(method), max_train=n_train)},
                shares={"smoke": "cpu"}))
        zoo.register(f"{name}_cifar100_s{seed}", zoo.Recipe(
            model=name, data=GPU_DATASET[0], data_kwargs=dict(GPU_DATASET[1]), fit=dict(GPU_TRAIN), seed=seed,
            per_profile={"gpu": dict(steps=STEPS["gpu"])}))


def import_all() -> list[str]:
    """Import every chapter-1 module that exists (so every architecture is registered); returns their names."""
    import importlib
    import importlib.util

    found = []
    for name in MODULES:
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            importlib.import_module(f"{__package__}.{name}")
            found.append(name)
    return found


def registered(method: str) -> str:
    """The dataset ``method`` is registered on (raises a clear error for an unknown method)."""
    if method not in _REGISTERED:
        raise ValueError(f"unknown chapter-1 method {method!r}; registered: {sorted(_REGISTERED)} (import its "
                         f"module from vitlab.methods.architectures first)")
    return _REGISTERED[method]


register("vit", VisionTransformer, img_size=28, in_chans=1, num_classes=10, **BASELINE)


def data(dataset: str = "digits", profile: Profile | str | None = None):
    """(train, val, test) exactly as every chapter-1 model on ``dataset`` is trained and tested on them
    (CIFAR-100 in the gpu profile)."""
    P = get_profile(profile)
    check_choice(dataset, DATASETS, "dataset", "data")
    if P.name == "gpu":
        source, kwargs = GPU_DATASET
        return tuple(vdata.load(source, s, P, **kwargs) for s in ("train", "val", "test"))
    source, kwargs, n_train = DATASETS[dataset]
    P = P.replace(max_train=n_train)
    return tuple(vdata.load(source, s, P, seed=DATA_SEED, **kwargs) for s in ("train", "val", "test"))


def train_kwargs(profile: Profile | str | None = None) -> dict:
    """THE chapter's from-scratch recipe as ``vitlab.train.fit`` arguments (add ``seed=``)."""
    P = get_profile(profile)
    if P.name == "gpu":
        return {**GPU_TRAIN, "steps": STEPS["gpu"]}
    return {**TRAIN, "steps": STEPS["cpu"]}


def seeds(profile: Profile | str | None = None) -> tuple[int, ...]:
    """The seeds every claim is asserted over. Trained models are cached, so smoke checks all three too."""
    get_profile(profile)
    return SEEDS


def trained(method: str, seed: int, profile: Profile | str | None = None, *, retrain: bool = False,
            progress: bool = True) -> tuple[nn.Module, dict]:
    """(model in eval mode, its record) of ``method`` trained from scratch with ``seed``: trained once by the
    chapter's recipe and cached by the zoo. The record holds the training curve (``history``), the metrics
    (train / val / test accuracy, ``plateau_gain``, ``train_seconds``) and the exact config."""
    _check_seed(seed, "trained")
    return zoo.get(entry_name(method, seed, profile), profile, retrain=retrain, progress=progress,
                   return_info=True)


def trained_equal_time(method: str, seed: int, profile: Profile | str | None = None, *, retrain: bool = False,
                       progress: bool = True) -> tuple[nn.Module, dict]:
    """Like ``trained``, but for ``equal_time_steps(method)`` steps: the plain ViT's wall-clock on one CPU thread.
    Where that rounds to ``STEPS`` (the plain ViT itself, or an architecture as fast as it) it is ``trained``'s
    model. cpu and smoke profiles only: on a GPU the step times, so the budgets, are the GPU's to measure."""
    P = get_profile(profile)
    if P.name == "gpu":
        raise ValueError("trained_equal_time: the step budgets are measured on CPU (STEP_MS_CPU); on a GPU, time "
                         "the steps there (benchmarks/ch1_step_times.py) and train with fit(..., steps=...)")
    _check_seed(seed, "trained_equal_time")
    if equal_time_steps(method) == STEPS["cpu"]:
        return trained(method, seed, P, retrain=retrain, progress=progress)
    return zoo.get(entry_name(method, seed, P, equal_time=True), P, retrain=retrain, progress=progress, return_info=True)


def check_matched(model: nn.Module, control: nn.Module, *, tolerance: float = 0.3) -> float:
    """The parameter ratio model / control; raises when it is off by more than ``tolerance`` (a comparison
    "at equal parameters" must be one)."""
    check_model(model, "check_matched")
    check_model(control, "check_matched")
    ratio = measure.count_params(model) / measure.count_params(control)
    if not 1 - tolerance <= ratio <= 1 + tolerance:
        raise ValueError(f"check_matched: the model has {ratio:.2f}x the control's parameters; expected within "
                         f"{tolerance:.0%} of it")
    return ratio


def measure_row(name: str, model: nn.Module, test, *, latency_batch: int = 64, repeats: int = 10) -> dict:
    """One row of the chapter's table, measured the same way for every architecture: test accuracy,
    parameters, GFLOPs per image (``torch.utils.flop_counter``) and eval throughput at ``latency_batch``."""
    check_model(model, "measure_row")
    model = model.eval()
    inputs = test.images[:latency_batch]
    lat = measure.latency(model, inputs, warmup=2, repeats=repeats)
    return {"method": name, "accuracy": measure.accuracy(model, test), "params": measure.count_params(model),
            "gflops": measure.flops(model, inputs[:8]) / 1e9, "throughput": lat["throughput"],
            "latency_ms": lat["median_ms"]}


def make_train_step(model: nn.Module, images, labels):
    """A closure running one training step of the chapter's recipe on ``model`` (in place): forward on ``images``,
    label-smoothed cross-entropy against ``labels``, backward, AdamW at the recipe's lr and weight decay. What
    ``train_step_ms`` and ``benchmarks/ch1_step_times.py`` time."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])

    def step() -> None:
        loss = F.cross_entropy(model(images), labels, label_smoothing=TRAIN["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_step_ms(model: nn.Module, train, *, batch_size: int = 64, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time (ms) of one training step of the chapter's recipe (``make_train_step``) on a batch of
    ``train``, measured on a copy: the trained weights are untouched. The cost axis of a comparison at equal steps
    (a model's training time is its step time x the steps)."""
    import copy
    import time

    import torch

    check_model(model, "train_step_ms")
    step = make_train_step(copy.deepcopy(model), train.images[:batch_size], train.labels[:batch_size])
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(torch.tensor(times).median())
