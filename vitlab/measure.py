"""Measurements every lesson reports the same way: accuracy, parameters, FLOPs, latency, token cost.

    accuracy(model, data)            top-1 fraction in [0, 1]
    predict(model, data)             logits [N, classes]
    per_class_accuracy(model, data)  [num_classes] (NaN for a class with no images)
    count_params(model)              number of parameters
    flops(model, inputs)             FLOPs of one forward, per sample (torch.utils.flop_counter)
    macs(model, inputs)              multiply-accumulates = flops / 2
    latency(model, inputs)           median and IQR in ms over repeats after a warm-up, and samples/s
    token_cost(tokens, n_dense)      cost of a token-reduction schedule relative to the dense model
    summary(model, data, inputs)     one flat dict, a row of a results table

``data`` is a dataset with ``.images`` [N, ...] and ``.labels`` [N] tensors (``vitlab.data.ImageDataset``)
or an ``(images, labels)`` tuple. The model runs in eval mode under ``no_grad`` and gets its previous
mode (and device, when ``device=`` moved it) back afterwards.

FLOPs are counted by ``FlopCounterMode``: matrix products and convolutions (2 FLOPs per
multiply-accumulate), attention included; element-wise ops, softmax and LayerNorm are not counted,
as in the papers' tables.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "accuracy", "predict", "per_class_accuracy", "count_params", "flops", "macs", "latency",
    "token_cost", "summary",
]


# ----------------------------------------------------------------------------- argument checks

def _check_model(model, fn: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_positive_int(value, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _images_labels(data, fn: str) -> tuple[Tensor, Tensor]:
    """(images [N, ...], labels int [N]) from a dataset with .images/.labels or an (images, labels) pair."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        images, labels = data.images, data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
    else:
        raise TypeError(f"{fn}: data must have .images and .labels tensors (an ImageDataset) or be an "
                        f"(images, labels) tuple, got {type(data).__name__}")
    if not isinstance(images, Tensor) or images.dim() < 2:
        raise TypeError(f"{fn}: images must be a tensor [N, ...], got {type(images).__name__} "
                        f"{tuple(getattr(images, 'shape', ()))}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise TypeError(f"{fn}: labels must be an integer tensor [N], got {type(labels).__name__} "
                        f"{getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{fn}: images and labels disagree on N: {images.shape[0]} != {labels.shape[0]}")
    if images.shape[0] == 0:
        raise ValueError(f"{fn}: data is empty (N=0)")
    return images, labels


def _as_inputs(inputs, fn: str) -> tuple[Tensor, ...]:
    """A forward's positional inputs as a tuple of tensors; the first one's dim 0 is the batch."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(f"{fn}: inputs must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(inputs).__name__}")
    if inputs[0].dim() == 0 or inputs[0].shape[0] == 0:
        raise ValueError(f"{fn}: inputs[0] must have a non-empty batch dim, got shape {tuple(inputs[0].shape)}")
    return tuple(inputs)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- context helpers

@contextlib.contextmanager
def _evaluating(model: nn.Module, device) -> Iterator[torch.device]:
    """Eval mode (and ``device`` if given) for the block; the previous mode and device come back after."""
    was_training = model.training
    old = _model_device(model)
    dev = old if device is None else torch.device(device)
    if dev != old:
        model.to(dev)
    model.eval()
    try:
        yield dev
    finally:
        model.train(was_training)
        if dev != old:
            model.to(old)


def _logits(out, fn: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}: the model must return a logits tensor [B, classes], got {type(out).__name__}")
    if out.dim() != 2:
        raise ValueError(f"{fn}: the model must return logits [B, classes], got shape {tuple(out.shape)}")
    return out


# ----------------------------------------------------------------------------- accuracy

@torch.no_grad()
def predict(model: nn.Module, data, *, batch_size: int = 256, device=None) -> Tensor:
    """Logits [N, classes] (fp32, on CPU) over ``data`` (a dataset, an (images, labels) pair or images)."""
    _check_model(model, "predict")
    _check_positive_int(batch_size, "batch_size", "predict")
    images = data if isinstance(data, Tensor) else _images_labels(data, "predict")[0]
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"predict: images must be a non-empty tensor [N, ...], got {tuple(images.shape)}")
    out = []
    with _evaluating(model, device) as dev:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(dev, non_blocking=True)
            out.append(_logits(model(x), "predict").float().cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, data, *, batch_size: int = 256, device=None) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    _check_model(model, "accuracy")
    _, labels = _images_labels(data, "accuracy")
    pred = predict(model, data, batch_size=batch_size, device=device).argmax(-1)
    return (pred == labels.cpu()).double().mean().item()


def per_class_accuracy(model: nn.Module, data, *, num_classes: int | None = None, batch_size: int = 256,
                       device=None) -> Tensor:
    """Accuracy of each class, float64 [num_classes]; NaN where a class has no images.

    ``num_classes`` defaults to ``data.num_classes`` when the dataset has it, else to the logits' width.
    """
    _check_model(model, "per_class_accuracy")
    _, labels = _images_labels(data, "per_class_accuracy")
    logits = predict(model, data, batch_size=batch_size, device=device)
    if num_classes is None:
        num_classes = getattr(data, "num_classes", None) or logits.shape[1]
    _check_positive_int(num_classes, "num_classes", "per_class_accuracy")
    labels = labels.cpu().long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"per_class_accuracy: labels must lie in [0, {num_classes}), got "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    hit = (logits.argmax(-1) == labels).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hit, minlength=num_classes)
    return correct / total  # 0/0 -> NaN for empty classes, on purpose


# ----------------------------------------------------------------------------- size and compute

def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once); ``trainable_only``: requires_grad ones."""
    _check_model(model, "count_params")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def flops(model: nn.Module, inputs: Tensor | tuple, *, per_sample: bool = True) -> int:
    """FLOPs of one eval forward on ``inputs`` (2 per multiply-accumulate), divided by the batch size
    when ``per_sample``. GFLOPs = flops(...) / 1e9; MACs = flops(...) // 2 (see ``macs``).

    Attention runs on SDPA's math backend while counting so that its two matrix products are seen on
    every device (the fused CPU kernel is invisible to the counter); the numbers do not change.
    """
    _check_model(model, "flops")
    inputs = _as_inputs(inputs, "flops")
    with _evaluating(model, None) as dev:
        inputs = tuple(t.to(dev) for t in inputs)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs)
    total = counter.get_total_flops()
    return total // inputs[0].shape[0] if per_sample else total


def macs(model: nn.Module, inputs: Tensor | tuple, *, per_sample: bool = True) -> int:
    """Multiply-accumulates (what many papers call FLOPs): ``flops(...) // 2``."""
    return flops(model, inputs, per_sample=per_sample) // 2


# ----------------------------------------------------------------------------- speed

@torch.no_grad()
def latency(model: nn.Module, inputs: Tensor | tuple, *, warmup: int = 5, repeats: int = 20,
            device=None) -> dict:
    """Wall time of one eval forward on ``inputs``: ``warmup`` untimed runs, then ``repeats`` timed ones.

    Returns {median_ms, iqr_ms, throughput (samples/s from the median), batch_size, repeats, device}.
    CUDA: each run timed with CUDA events, synchronised; CPU: ``time.perf_counter``. For mixed
    precision call it inside ``torch.autocast(...)``; ``device`` moves the model there for the timing.
    """
    _check_model(model, "latency")
    _check_positive_int(warmup, "warmup", "latency", minimum=0)
    _check_positive_int(repeats, "repeats", "latency")
    inputs = _as_inputs(inputs, "latency")
    times_ms = []
    with _evaluating(model, device) as dev:
        inputs = tuple(t.to(dev) for t in inputs)
        cuda = dev.type == "cuda"
        with torch.cuda.device(dev) if cuda else contextlib.nullcontext():  # events on the model's GPU
            for _ in range(warmup):
                model(*inputs)
            if cuda:
                torch.cuda.synchronize()
            for _ in range(repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(*inputs)
                    end.record()
                    end.synchronize()
                    times_ms.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    model(*inputs)
                    times_ms.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times_ms, dtype=torch.float64)
    median = t.quantile(0.5).item()
    iqr = (t.quantile(0.75) - t.quantile(0.25)).item()
    batch = inputs[0].shape[0]
    return {
        "median_ms": median,
        "iqr_ms": iqr,
        "throughput": batch / (median / 1e3) if median > 0 else math.inf,
        "batch_size": batch,
        "repeats": repeats,
        "device": str(dev),
    }


# ----------------------------------------------------------------------------- token reduction

def token_cost(tokens_per_block: Sequence[int], n_dense: int, *, dim: int | None = None,
               mlp_ratio: float = 4.0) -> dict:
    """What a token-reduction schedule costs relative to the dense model (all blocks at ``n_dense``).

    Per block with n tokens and width d, in multiply-accumulates:
        linear layers (qkv, proj, MLP)  n * (4 + 2 * mlp_ratio) * d^2     -> grows like n
        attention (QK^T and AV)         2 * n^2 * d                       -> grows like n^2
    Returns {mean_tokens, linear: sum(n)/(L n_dense), attention: sum(n^2)/(L n_dense^2)} and, when
    ``dim`` is given, ``total``: the blocks' whole cost ratio from the two formulas above
    (patch embedding and head excluded).
    """
    if isinstance(tokens_per_block, Tensor):
        tokens_per_block = tokens_per_block.tolist()
    if isinstance(tokens_per_block, (str, bytes)) or not isinstance(tokens_per_block, Sequence):
        raise TypeError(f"token_cost: tokens_per_block must be a list of ints, got "
                        f"{type(tokens_per_block).__name__}")
    if not tokens_per_block:
        raise ValueError("token_cost: tokens_per_block must hold at least one block, got []")
    n_dense = _check_positive_int(n_dense, "n_dense", "token_cost")
    for n in tokens_per_block:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"token_cost: tokens_per_block must hold ints >= 1, got {n!r} in "
                             f"{list(tokens_per_block)}")
    if dim is not None:
        _check_positive_int(dim, "dim", "token_cost")
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        raise ValueError(f"token_cost: mlp_ratio must be a positive number, got {mlp_ratio!r}")
    L = len(tokens_per_block)
    out = {
        "mean_tokens": sum(tokens_per_block) / L,
        "linear": sum(tokens_per_block) / (L * n_dense),
        "attention": sum(n * n for n in tokens_per_block) / (L * n_dense ** 2),
    }
    if dim is not None:
        def block(n):
            return n * (4 + 2 * mlp_ratio) * dim ** 2 + 2 * n * n * dim
        out["total"] = sum(block(n) for n in tokens_per_block) / (L * block(n_dense))
    return out


# ----------------------------------------------------------------------------- one row

def summary(model: nn.Module, data, inputs: Tensor | tuple, *, batch_size: int = 256, device=None,
            warmup: int = 5, repeats: int = 20) -> dict:
    """One results row: {accuracy, params, gflops (per sample), latency_ms, latency_iqr_ms, throughput}.

    ``inputs`` is the batch latency is timed on (its size sets what throughput means); FLOPs are per sample.
    """
    _check_model(model, "summary")
    lat = latency(model, inputs, warmup=warmup, repeats=repeats, device=device)
    return {
        "accuracy": accuracy(model, data, batch_size=batch_size, device=device),
        "params": count_params(model),
        "gflops": flops(model, inputs) / 1e9,
        "latency_ms": lat["median_ms"],
        "latency_iqr_ms": lat["iqr_ms"],
        "throughput": lat["throughput"],
    }
