"""Chapter 2's shared set-up: one base model, one dataset, one way to measure, one entry per method.

    base = base_model(P)                       # the zoo's vit_tiny_scenes (CIFAR-100 vit_small on GPU)
    train, val, test = scenes(P)               # the data the base was trained on: cluttered_scenes 32 px RGB
    fit(model, train, **finetune_kwargs(P), seed=s)   # THE chapter fine-tune: every method's, every control's
    control = dense_control(s, P)              # the base fine-tuned exactly so, dense (zoo-cached, per seed)
    out = method_entry("evit")(base, train, P, seed=s) # each method's own reduced/trained model: a `Reduced`
    row = measure_row("evit", out, test, P)    # accuracy, GFLOPs, throughput, tokens: the same for every method

The experimental standard (DESIGN.md §8): a method that fine-tunes the base gets ``finetune_kwargs(P)`` (the same
optimiser, lr, schedule, augmentation and number of steps for every method) and is compared, seed by seed, with
``dense_control(seed, P)``: the dense base fine-tuned with exactly those arguments. Without that control, the
extra steps alone would be credited to the method. ``seeds(P)`` are the seeds a claim is asserted over
(``vitlab.stats.paired_gap`` gives the margin).

Every lesson ``vitlab/methods/efficient/<method>.py`` defines ``for_compare(base, train, profile) -> Reduced``:
the method applied to (or trained from) the shared base with the profile's small budget, so that
``notebooks/2_efficient/compare.ipynb`` can put all of them in one table and one accuracy-vs-FLOPs plot.
Token reduction is measured on cluttered scenes, where every patch carries signal (on plain MNIST the empty
background makes dropping tokens free).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from vitlab import data as vdata
from vitlab import measure, zoo
from vitlab.checks import check_int
from vitlab.profiles import Profile
from vitlab.profiles import profile as get_profile

__all__ = ["METHODS", "Reduced", "base_name", "base_model", "scenes", "finetune_steps", "finetune_kwargs", "seeds",
           "dense_control", "method_entry", "measure_row", "dense_tokens"]

METHODS = ("evit", "diffrate", "sparsifiner", "sit", "mctf", "stvit", "gtp", "lookupvit", "repavit", "snnetv2",
           "dimap")


@dataclass
class Reduced:
    """What a method hands the comparison.

    model: images [B,C,H,W] -> logits, in eval mode.
    tokens_per_block: tokens (CLS included) each transformer block processes, averaged over images;
      None where the method does not reduce tokens (reparameterisation, pruning, stitching).
    gflops: per-image GFLOPs when ``torch.utils.flop_counter`` cannot see the saving (masked sparse attention,
      unstructured zero weights); None: counted from the model's forward.
    note: one line for the table (the setting: keep rate, r, sparsity, stitch...).
    """
    model: nn.Module
    tokens_per_block: list[float] | None = None
    gflops: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _gpu(P: Profile) -> bool:
    return P.name == "gpu"


def base_name(profile: Profile | str | None = None) -> str:
    """The zoo name of the chapter's base: ``vit_tiny_scenes`` offline, ``vit_small_cifar100`` on GPU (for its
    record: ``zoo.get(base_name(P), P, return_info=True)``)."""
    return "vit_small_cifar100" if _gpu(get_profile(profile)) else "vit_tiny_scenes"


def base_model(profile: Profile | str | None = None) -> nn.Module:
    """The chapter's dense base ViT (eval mode): ``vit_tiny_scenes`` offline, ``vit_small_cifar100`` on GPU."""
    P = get_profile(profile)
    return zoo.get(base_name(P), P)


def scenes(profile: Profile | str | None = None):
    """(train, val, test) exactly as the base model was trained on them: cluttered scenes 32 px RGB (20,000
    training scenes; the profile's ``max_train`` caps them), CIFAR-100 on GPU."""
    P = get_profile(profile)
    recipe = zoo.ZOO[base_name(P)]
    return tuple(vdata.load(recipe.data, s, P, seed=recipe.seed, **recipe.data_kwargs,
                            **(recipe.train_kwargs if s == "train" else {})) for s in ("train", "val", "test"))


def finetune_steps(profile: Profile | str | None = None) -> int:
    """The fine-tuning budget every method gets (optimizer steps of batch 64): smoke 5, cpu 100, gpu 3000."""
    return zoo.SCENES_FINETUNE_STEPS[get_profile(profile).name]


def finetune_kwargs(profile: Profile | str | None = None, *, steps: int | None = None,
                    batch_size: int | None = None, fn: str = "finetune_kwargs") -> dict:
    """The chapter's one fine-tune recipe, as ``vitlab.train.fit`` arguments (add ``seed=``): AdamW lr 1e-4, weight
    decay 0.05, 10 % warm-up then cosine, label smoothing 0.1, ±2 px shifts (±4 on CIFAR), batch 64,
    ``finetune_steps`` steps. The dense controls are trained with exactly these. ``steps`` / ``batch_size``
    override the recipe's (unit tests only; ``fn`` names the caller in their errors)."""
    P = get_profile(profile)
    fit_kwargs = dict(zoo.ZOO[f"{base_name(P)}_ft0"].fit)
    fit_kwargs.pop("seed")
    fit_kwargs["steps"] = finetune_steps(P) if steps is None else check_int(steps, "steps", fn)
    if batch_size is not None:
        fit_kwargs["batch_size"] = check_int(batch_size, "batch_size", fn)
    return fit_kwargs


def seeds(profile: Profile | str | None = None) -> tuple[int, ...]:
    """Seeds a claim is asserted over: one in smoke (the sign of a gap only), three in cpu and gpu."""
    return (0,) if get_profile(profile).name == "smoke" else zoo.CONTROL_SEEDS


def dense_control(seed: int, profile: Profile | str | None = None) -> nn.Module:
    """The equal-step dense control for ``seed``: the base fine-tuned with ``finetune_kwargs(profile)`` and that
    seed (eval mode). Trained once and cached by the zoo (``vit_tiny_scenes_ft<seed>``)."""
    P = get_profile(profile)
    if seed not in zoo.CONTROL_SEEDS:
        raise ValueError(f"dense_control: seed must be one of {zoo.CONTROL_SEEDS}, got {seed!r}")
    return zoo.get(f"{base_name(P)}_ft{seed}", P)


def dense_tokens(model: nn.Module) -> int:
    """Tokens a dense ViT block processes: patches + CLS/register tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def method_entry(name: str) -> Callable[..., Reduced]:
    """``vitlab.methods.efficient.<name>.for_compare``."""
    if name not in METHODS:
        raise ValueError(f"method_entry: unknown method {name!r}; expected one of {METHODS}")
    return importlib.import_module(f"vitlab.methods.efficient.{name}").for_compare


def measure_row(name: str, reduced: Reduced, test, profile: Profile | str | None = None, *,
                latency_batch: int = 64, repeats: int | None = None) -> dict:
    """One row of the chapter's table, measured the same way for every method."""
    if not isinstance(reduced, Reduced):
        raise TypeError(f"measure_row: reduced must be a Reduced, got {type(reduced).__name__}")
    P = get_profile(profile)
    model = reduced.model.eval()
    inputs = test.images[:latency_batch]
    repeats = repeats or (5 if P.name == "smoke" else 20)
    lat = measure.latency(model, inputs, warmup=2, repeats=repeats)
    gflops = reduced.gflops if reduced.gflops is not None else measure.flops(model, inputs[:8]) / 1e9
    tokens = reduced.tokens_per_block
    return {
        "method": name,
        "accuracy": measure.accuracy(model, test),
        "gflops": float(gflops),
        "params": measure.count_params(model),
        "throughput": lat["throughput"],
        "latency_ms": lat["median_ms"],
        "mean_tokens": float(sum(tokens) / len(tokens)) if tokens else None,
        "note": reduced.note,
    }
