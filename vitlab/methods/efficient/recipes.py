"""Chapter 2's shared set-up: one base model, one dataset, one way to measure, one entry per method.

    base = base_model(P)                       # the zoo's vit_tiny_scenes (CIFAR-100 vit_small on GPU)
    train, val, test = scenes(P)               # cluttered_scenes at 32 px, RGB (CIFAR-100 on GPU)
    out = method_entry("evit")(base, train, P) # each method's own reduced/trained model: a `Reduced`
    row = measure_row("evit", out, test, P)    # accuracy, GFLOPs, throughput, tokens: the same for every method

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
from vitlab.profiles import Profile
from vitlab.profiles import profile as get_profile

__all__ = ["METHODS", "Reduced", "base_model", "scenes", "finetune_steps", "method_entry", "measure_row",
           "dense_tokens"]

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


def base_model(profile: Profile | str | None = None) -> nn.Module:
    """The chapter's dense base ViT (eval mode): ``vit_tiny_scenes`` offline, ``vit_small_cifar100`` on GPU."""
    P = get_profile(profile)
    return zoo.get("vit_small_cifar100" if _gpu(P) else "vit_tiny_scenes", P)


def scenes(profile: Profile | str | None = None):
    """(train, val, test) the base model was trained on: cluttered scenes 32 px RGB, CIFAR-100 on GPU."""
    P = get_profile(profile)
    if _gpu(P):
        return tuple(vdata.load("cifar100", s, P) for s in ("train", "val", "test"))
    return tuple(vdata.load("cluttered_scenes", s, P, img_size=32, in_chans=3) for s in ("train", "val", "test"))


def finetune_steps(profile: Profile | str | None = None) -> int:
    """The fine-tuning budget every method gets in the comparison (optimizer steps, batch 64)."""
    return {"smoke": 5, "cpu": 300}.get(get_profile(profile).name, 3000)


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
