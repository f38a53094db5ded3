"""The command lines' parsers, kept free of torch so that ``--help`` and argument errors answer at once.

``python -m vitlab.train``, ``python -m vitlab.course`` and ``python -m vitlab.zoo`` build their parsers here. The dataset and model names
are listed here as plain strings (importing the registries would load torch); ``tests/test_cli.py`` keeps them
equal to ``vitlab.data.DATASETS`` and ``vitlab.models.MODELS``.
"""
from __future__ import annotations

import argparse
import os

from .profiles import PROFILES

__all__ = ["DATASET_NAMES", "MODEL_NAMES", "train_parser", "course_parser", "zoo_parser"]

DATASET_NAMES = ("mnist5k", "mnist5k_lt", "digits8", "cluttered_scenes", "cells", "color_cells", "faces",
                 "multichannel_digits", "cifar10", "cifar100")
MODEL_NAMES = ("vit_nano", "vit_tiny", "vit_small", "vit_s16")
OPTIMIZERS = ("adamw", "lion", "sgd")
SCHEDULES = ("cosine", "constant")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vitlab.train", formatter_class=_Formatter,
        description="Train a registry ViT on a dataset with vitlab.train.fit (AdamW/Lion/SGD, warm-up + cosine,\n"
                    "label smoothing). Under torchrun it trains with DDP (gloo on CPU, nccl on GPU).",
        epilog="How long: give at most one of --epochs, --steps, --seconds (default: the profile's epochs).\n"
               "Example: python -m vitlab.train --profile cpu --data mnist5k --model vit_tiny --epochs 20 "
               "--save build/vit.pt")
    ap.add_argument("--model", choices=MODEL_NAMES, default=None, help="registry model (default: the profile's)")
    ap.add_argument("--data", choices=DATASET_NAMES, default="mnist5k", help="dataset for vitlab.data.load")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("VITLAB_PROFILE") or None,
                    help="run profile (default: $VITLAB_PROFILE, else gpu on CUDA, else cpu)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_int, default=None, help="passes over the training split")
    budget.add_argument("--steps", type=_positive_int, default=None, help="exactly this many optimizer steps")
    budget.add_argument("--seconds", type=_positive_float, default=None, help="a wall-clock budget")
    ap.add_argument("--batch-size", type=_positive_int, default=None, help="default: the profile's")
    ap.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate")
    ap.add_argument("--weight-decay", type=_non_negative_float, default=0.05, help="decoupled weight decay")
    ap.add_argument("--warmup", type=_non_negative_float, default=0.1,
                    help="linear warm-up: a fraction of the steps (< 1) or a number of epochs (>= 1)")
    ap.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="after the warm-up")
    ap.add_argument("--label-smoothing", type=_non_negative_float, default=0.1, help="in [0, 1)")
    ap.add_argument("--shift", type=int, default=0, help="random translation of +-SHIFT pixels (augmentation)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    ap.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: the profile's)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the model, the batch order and the augmentation")
    ap.add_argument("--save", default=None,
                    help="write the trained model here (atomically) as a checkpoint vitlab.zoo.load_checkpoint reads")
    ap.add_argument("--history", default=None, help="write the training history here as JSON")
    return ap


def course_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vitlab.course", formatter_class=_Formatter,
                                 description="Run the course's notebooks headless and collect what each verified.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", formatter_class=_Formatter, help="execute notebooks headless and write results.md",
                       description="Execute notebooks in fresh kernels with VITLAB_PROFILE set; write the executed "
                                   "copies and results.md under --out (or the notebooks themselves with --inplace).")
    r.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("VITLAB_PROFILE", "smoke"),
                   help="run profile (default: $VITLAB_PROFILE, else smoke)")
    r.add_argument("--nb", default=None, help="one notebook, e.g. notebooks/0_foundations/vit_from_scratch.ipynb "
                                              "(default: every notebook under notebooks/)")
    r.add_argument("--out", default=None, help="output folder (default: build/ in the repository)")
    r.add_argument("--inplace", action="store_true",
                   help="write the outputs into the notebooks themselves (how the committed outputs are made)")
    r.add_argument("--timeout", type=_positive_int, default=1800, help="seconds one cell may run")
    return ap


def zoo_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vitlab.zoo", formatter_class=_Formatter,
        description="The course's trained models (vitlab.zoo entries, registered by the lesson modules): list them, "
                    "train them headless (a valid cached checkpoint is loaded instead; a stale one is retrained), or "
                    "show one's recipe and scores. NAMES may be glob patterns, e.g. 'ch7_bus_*_s0'.",
        epilog="examples:\n  python -m vitlab.zoo list 'ch7_bus_*'\n"
               "  python -m vitlab.zoo train ch7_bus_vit_s0 ch7_bus_bus_s0 --profile cpu\n"
               "  python -m vitlab.zoo show vit_tiny_mnist5k")
    sub = ap.add_subparsers(dest="cmd", required=True)
    default = os.environ.get("VITLAB_PROFILE") or None
    profile_help = "run profile (default: $VITLAB_PROFILE, else gpu on CUDA, else cpu)"
    ls = sub.add_parser("list", formatter_class=_Formatter, help="entry names, and whether a checkpoint file exists")
    ls.add_argument("pattern", nargs="?", default="*", help="glob pattern over the names")
    ls.add_argument("--profile", choices=sorted(PROFILES), default=default, help=profile_help)
    tr = sub.add_parser("train", formatter_class=_Formatter, help="train (or load) entries in order, printing scores")
    tr.add_argument("names", nargs="+", help="entry names or glob patterns")
    tr.add_argument("--profile", choices=sorted(PROFILES), default=default, help=profile_help)
    tr.add_argument("--retrain", action="store_true", help="train even where a valid checkpoint is cached")
    sh = sub.add_parser("show", formatter_class=_Formatter, help="an entry's recipe and its checkpoint's scores")
    sh.add_argument("names", nargs="+", help="entry names or glob patterns")
    sh.add_argument("--profile", choices=sorted(PROFILES), default=default, help=profile_help)
    return ap
