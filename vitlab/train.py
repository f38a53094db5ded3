"""Training: one ``fit`` for every lesson, and ``python -m vitlab.train`` to train registry models at scale.

    history = fit(model, train, val, profile=P, epochs=20, lr=1e-3)
    viz.training_curves(history)

Data are ``vitlab.data.ImageDataset`` objects (tensors in memory), so an epoch is a loop over index slices with
no DataLoader workers: on a 2-core laptop that is the fastest way, and it is trivially reproducible.
Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with DistributedDataParallel: every rank draws
the same global batch order and keeps its slice, so a 2-process run follows the 1-process loss trajectory.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m vitlab.train --help` and argument errors answer before torch loads
    from vitlab.cli import train_parser

    train_parser().parse_args()

import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import check_model, check_number
from .cli import OPTIMIZERS, SCHEDULES  # one list for fit and its command line
from .profiles import Profile, profile as get_profile
from .seed import seed_everything

__all__ = ["fit", "evaluate", "unwrap", "multilabel_loss", "make_optimizer", "adamw_lr_scaled", "lr_lambda", "random_shift", "is_distributed",
           "main"]


# ----------------------------------------------------------------------------------------------- pieces
def unwrap(net: nn.Module) -> nn.Module:
    """The model inside any torch.compile (``._orig_mod``) and DDP (``.module``) wrappers ``fit`` puts around it: what
    a ``step_fn`` reads attributes from (a patch size, the prefix-token count)."""
    while True:
        inner = getattr(net, "_orig_mod", None)
        inner = getattr(net, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _init_distributed(device: torch.device) -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _images_masks(data, name: str, fn: str = "fit"):
    """(images, masks as int64 class ids [N,H,W]) of a dataset with dense targets (``targets="masks"``)."""
    masks = getattr(data, "masks", None)
    images = getattr(data, "images", None)
    if not torch.is_tensor(masks) or not torch.is_tensor(images) or images.ndim != 4 or masks.ndim != 3 \
            or masks.shape != (images.shape[0], *images.shape[2:]) or len(images) == 0:
        raise ValueError(f"{fn}: targets='masks' needs {name} to be a dataset with images [N,C,H,W] and masks "
                         f"[N,H,W] (e.g. cluttered_scenes), got {type(data).__name__} with masks "
                         f"{None if masks is None else tuple(masks.shape)}")
    if masks.is_floating_point() or masks.is_complex():
        raise TypeError(f"{fn}: {name} masks must be bool or integer class ids, got dtype {masks.dtype}")
    return images, masks.long()


def _images_labels(data, name: str, fn: str = "fit", optional: bool = True, targets: str = "labels"):
    if data is None:
        if not optional:
            raise TypeError(f"{fn}: {name} must be a vitlab ImageDataset or an (images, labels) tuple, got None")
        return None
    if targets == "masks":
        return _images_masks(data, name, fn)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        images, labels = data.images, data.labels
    else:
        raise TypeError(f"{fn}: {name} must be a vitlab ImageDataset or an (images, labels) tuple, "
                        f"got {type(data).__name__}")
    if not (torch.is_tensor(images) and torch.is_tensor(labels)) or images.ndim not in (4, 5) \
            or labels.ndim not in (1, 2) or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{fn}: {name} must hold images [N,C,H,W] (or volumes [N,C,D,H,W]) and labels [N] (class "
                         f"indices) or [N,K] (multi-hot) with N > 0")
    if labels.ndim == 1 and (labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex()):
        raise TypeError(f"{fn}: {name} labels must be integer class indices, got dtype {labels.dtype}")
    if labels.ndim == 2 and not labels.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} multi-label targets [N,K] must be floating point 0/1 (multi-hot), got dtype "
                        f"{labels.dtype}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} images must be floating point in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{fn}: {name} images hold NaN or infinite values")
    return images, labels


def _check_labels(labels: torch.Tensor, model: nn.Module, name: str, fn: str) -> None:
    classes = getattr(model, "num_classes", None)
    if labels.ndim == 2:  # multi-label: one 0/1 target per class
        if isinstance(classes, int) and labels.shape[1] != classes:
            raise ValueError(f"{fn}: {name} multi-label targets have {labels.shape[1]} columns but the model has "
                             f"{classes} outputs")
        if not ((labels >= 0) & (labels <= 1)).all():
            raise ValueError(f"{fn}: {name} multi-label targets must lie in [0, 1] (multi-hot), got values in "
                             f"{float(labels.min()):g}..{float(labels.max()):g}")
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (isinstance(classes, int) and hi >= classes):
        raise ValueError(f"{fn}: {name} labels must be in 0..{(classes or hi + 1) - 1} "
                         f"(the model has {classes} classes), got labels in {lo}..{hi}")


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over samples and classes: the multi-label loss (each class a
    yes/no question, as ``BCEWithLogitsLoss`` in the thorax papers' fine-tunes). ``label_smoothing`` ε moves each
    0/1 target to ε/2 or 1 − ε/2 (a two-class smoothing per finding)."""
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, targets)


def _hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions summed over the batch: argmax = label, or (multi-label) the fraction of classes
    whose sign of the logit matches the 0/1 target, per sample."""
    if y.ndim == 2:
        return ((logits > 0) == (y > 0.5)).float().mean(-1).sum()
    return (logits.argmax(-1) == y).sum()


def make_optimizer(model: nn.Module, name="adamw", lr: float = 1e-3, weight_decay: float = 0.05):
    """timm's optimizer factory: no weight decay on biases, norms, pos_embed and the CLS token.

    ``name`` may also be a callable ``(model, lr, weight_decay) -> torch.optim.Optimizer`` (a lesson's own
    optimizer, e.g. Lion written from the paper).
    """
    from timm.optim import create_optimizer_v2

    if callable(name):
        opt = name(model, lr, weight_decay)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"fit: the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    if name not in OPTIMIZERS:
        raise ValueError(f"fit: unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def adamw_lr_scaled(scaled, scale: float):
    """An ``optimizer=`` factory for :func:`fit`: timm's AdamW groups (no decay on biases, norms, tokens), each
    split in two, the other parameters at the lr and ``scaled(model)``'s at ``scale`` × the lr. For new layers
    (zero- or randomly initialised) trained next to pretrained weights in a short fine-tune."""
    check_number(scale, "scale", "adamw_lr_scaled", low=0, low_open=True)

    def make(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        new = {id(p) for p in scaled(model)}
        groups = []
        for g in make_optimizer(model, "adamw", lr, weight_decay).param_groups:
            for is_new in (False, True):
                params = [p for p in g["params"] if (id(p) in new) == is_new]
                if params:
                    groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params,
                                   "lr": lr * (scale if is_new else 1.0)})
        return torch.optim.AdamW(groups, lr=lr)
    return make


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine"):
    """Multiplier of the base lr at a step: linear warm-up, then cosine to zero (or constant)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def random_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image by its own integer (dy, dx), filling with the border value (no wrap-around)."""
    pad = int(shifts.abs().max()) if len(shifts) else 0
    if pad == 0:
        return images
    B, _, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, pad + dy: pad + dy + H, pad + dx: pad + dx + W]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None, label_smoothing: float = 0.0,
             amp: torch.dtype | None = None) -> dict:
    """Loss and accuracy of ``model`` on ``data`` (model left in the mode it was in). With multi-label targets
    [N,K]: binary cross-entropy, per-class accuracy (logit > 0 against the 0/1 target) and ``auc``, the mean
    over classes of ROC AUC (``vitlab.metrics.mean_auc``; nan when a class has only one label value here)."""
    check_model(model, "evaluate")
    images, labels = _images_labels(data, "data", "evaluate", optional=False)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"evaluate: batch_size must be a positive int, got {batch_size!r}")
    _check_labels(labels, model, "data", "evaluate")
    multilabel = labels.ndim == 2
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, scores = 0.0, 0.0, []
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        logits = logits.float()
        if multilabel:
            loss_sum += multilabel_loss(logits, y, label_smoothing).item() * len(y)
            scores.append(logits.cpu())
        else:
            loss_sum += F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum").item()
        correct += _hits(logits, y).item()
    model.train(was_training)
    out = {"loss": loss_sum / len(images), "acc": correct / len(images)}
    if multilabel:
        from .metrics import mean_auc

        try:
            out["auc"] = mean_auc(torch.cat(scores), labels)[0]
        except ValueError:  # a class with only positives or only negatives in this data: AUC undefined
            out["auc"] = float("nan")
    return out


# ------------------------------------------------------------------------------------------------- fit
def fit(model: nn.Module, train, val=None, *, profile: Profile | str | None = None, epochs: int | None = None,
        seconds: float | None = None, steps: int | None = None, batch_size: int | None = None, optimizer: str = "adamw", lr: float = 1e-3,
        weight_decay: float = 0.05, schedule: str = "cosine", warmup: float = 0.1, label_smoothing: float = 0.1,
        shift: int = 0, grad_clip: float | None = 1.0, amp: bool | None = None, compile: bool | None = None,
        seed: int = 0, device=None, progress: bool = True, loss_fn=None, step_fn=None, targets: str = "labels",
        desc: str = "train") -> dict:
    """Train ``model`` on ``train``; return a history (lists per epoch) for plots.

    epochs / seconds / steps: how long (default: the profile's epochs). ``seconds`` times the first steps and then
      fixes the step count, so the schedule is exact; for bit-reproducible runs give ``epochs`` or ``steps``
      (exactly that many optimizer steps of full batches, reshuffling at each pass over the data).
    warmup: fraction of the steps (< 1) or a number of epochs (>= 1) of linear warm-up before the cosine.
    shift: random translation of ±shift pixels. Default 0 (no augmentation): augmentation is a recipe choice
      the caller states, never a silent default.
    amp / compile: default to the profile (bf16 autocast and torch.compile in the gpu profile).
    loss_fn(logits, labels) replaces label-smoothed cross-entropy (e.g. for distillation).
    step_fn(net, images, labels) -> (loss, logits) replaces the whole forward pass and loss, for recipes that
      change the batch or need more than logits (a mixing augmentation with soft labels, a distillation token
      and its teacher). It runs under autocast on the device batch (after ``shift``); the logits only count
      the training accuracy against ``labels``. A self-supervised step_fn (MAE) returns (loss, None): the
      history's ``train_acc`` is then nan, and ``val`` must be None (there is nothing to classify).
    targets="masks" trains on a dataset's per-pixel masks instead of its labels (segmentation): ``step_fn``
      receives int64 class ids [B,H,W] as ``labels`` and computes the loss; it needs a step_fn, ``val=None`` (the
      objective scores itself) and ``shift=0`` (a shifted image would no longer match its mask).
    Labels [N,K] of 0/1 floats (multi-hot) train a multi-label model: the default loss becomes binary
    cross-entropy (``multilabel_loss``, with ``label_smoothing`` per class), accuracy is per class, and the
    history gains ``val_auc`` (mean ROC AUC over classes).
    """
    P = get_profile(profile)
    check_model(model, "fit")
    if targets not in ("labels", "masks"):
        raise ValueError(f"fit: targets must be 'labels' or 'masks', got {targets!r}")
    if targets == "masks" and (step_fn is None or val is not None or shift):
        raise ValueError("fit: targets='masks' needs a step_fn (the dense loss), val=None and shift=0")
    tr = _images_labels(train, "train", optional=False, targets=targets)
    va = _images_labels(val, "val")
    if targets == "labels":
        _check_labels(tr[1], model, "train", "fit")
    if va is not None:
        _check_labels(va[1], model, "val", "fit")
        if va[1].ndim != tr[1].ndim:
            raise ValueError(f"fit: train and val labels must be of one kind, class indices [N] or multi-hot [N,K]; "
                             f"got {tuple(tr[1].shape[1:]) or 'indices'} and {tuple(va[1].shape[1:]) or 'indices'}")
    multilabel = tr[1].ndim == 2
    lr = check_number(lr, "lr", "fit", low=0, low_open=True)
    weight_decay = check_number(weight_decay, "weight_decay", "fit", low=0)
    warmup = check_number(warmup, "warmup", "fit", low=0)
    grad_clip = check_number(grad_clip, "grad_clip", "fit", low=0, low_open=True, optional=True)
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0):
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"fit: seconds must be a positive number, got {seconds!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise ValueError(f"fit: steps must be a positive int, got {steps!r}")
    if sum(a is not None for a in (epochs, seconds, steps)) > 1:
        raise ValueError(f"fit: give one of epochs, seconds or steps; got epochs={epochs!r}, seconds={seconds!r}, "
                         f"steps={steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"fit: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"fit: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if loss_fn is not None and step_fn is not None:
        raise ValueError("fit: give loss_fn or step_fn, not both (step_fn computes the loss itself)")
    for fn_name, fn in (("loss_fn", loss_fn), ("step_fn", step_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"fit: {fn_name} must be callable, got {type(fn).__name__}")
    if tr[0].ndim == 5 and shift:
        raise ValueError(f"fit: shift={shift!r} shifts images; volumes [N,C,D,H,W] need shift=0")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < min(tr[0].shape[-2:]):
        raise ValueError(f"fit: shift must be an int in 0..{min(tr[0].shape[-2:]) - 1} (pixels, less than the "
                         f"image size), got {shift!r}")
    batch_size = P.batch_size if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")

    device = torch.device(device) if device is not None else torch.device(P.device)
    rank, world = _init_distributed(device)
    if batch_size % world:
        raise ValueError(f"fit: batch_size={batch_size} must be divisible by the {world} processes")
    amp_dtype = P.amp if (amp is None or amp) and device.type == "cuda" else None
    gen = seed_everything(seed)
    model.to(device).train()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile if compile is not None else P.compile:
        net = torch.compile(net)
    opt = make_optimizer(model, optimizer, lr, weight_decay)

    images, labels = tr
    n = len(images)
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: every step sees a full batch
    if seconds is not None:  # time a few steps (then throw them away) to fix the step count
        total_steps = None
    elif steps is not None:
        total_steps = steps
    else:
        total_steps = (epochs or P.epochs) * steps_per_epoch
    if loss_fn is None:
        loss_fn = ((lambda logits, y: multilabel_loss(logits, y, label_smoothing)) if multilabel else
                   (lambda logits, y: F.cross_entropy(logits, y, label_smoothing=label_smoothing)))
    history = {"epoch": [], "step": [], "train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "lr": [],
               "seconds": []}
    if multilabel and va is not None:
        history["val_auc"] = []

    def train_step(idx):
        sl = idx[rank * (len(idx) // world):(rank + 1) * (len(idx) // world)]  # this rank's slice
        shifts = torch.randint(-shift, shift + 1, (len(idx), 2), generator=gen) if shift else None
        x = images[sl]
        if shift:
            x = random_shift(x, shifts[rank * len(sl):(rank + 1) * len(sl)])
        x, y = x.to(device, non_blocking=True), labels[sl].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            if step_fn is None:
                logits = net(x)
                loss = loss_fn(logits.float(), y)
            else:
                loss, logits = step_fn(net, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fit: the loss is not finite ({loss.item()}) at step {step + 1}: lower lr or "
                                     f"check the data and the model")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if logits is None:  # a self-supervised step: no prediction to score
            return loss.detach(), None, 0
        return loss.detach(), _hits(logits.detach(), y), len(y)

    start = time.perf_counter()
    step = 0  # optimizer steps taken (train_step's error message reads it)
    # `seconds`: the first `probe` steps are real steps (each batch seen once, a stateful step_fn called once per
    # batch) taken at lr 0 and timed; their time fixes how many steps fit, and the schedule starts after them.
    probe = min(3, steps_per_epoch) if total_steps is None else 0
    shape = {}

    def plan(total: int) -> None:
        warmup_steps = int(warmup * total) if warmup < 1 else int(warmup * steps_per_epoch)
        shape["f"] = lr_lambda(total, min(warmup_steps, total), schedule)

    if total_steps is not None:
        plan(total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k < probe else shape["f"](k - probe))

    bar = tqdm(total=total_steps, desc=desc, disable=not progress or rank != 0, leave=False)
    epoch = 0
    while total_steps is None or step < total_steps:
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = epoch_steps = 0
        for s in range(steps_per_epoch):
            if total_steps is not None and step >= total_steps:
                break
            if probe and step == 0:
                t0 = time.perf_counter()
            loss, corr, n_batch = train_step(perm[s * batch_size:(s + 1) * batch_size])
            if probe and step + 1 == probe:  # the probe is done: fix the count, then plan the schedule
                step_time = (time.perf_counter() - t0) / probe
                remaining = max(1, int((seconds - (time.perf_counter() - start)) / step_time))
                plan(remaining)
                total_steps = probe + remaining
                bar.total = total_steps
            sched.step()
            loss_sum += loss
            if corr is not None:
                correct += corr
            seen += n_batch  # a batch is shorter than batch_size when the data are
            epoch_steps += 1
            step += 1
            bar.update(1)
        if world > 1:
            for t in (loss_sum, correct):
                dist.all_reduce(t)
        epoch += 1
        history["epoch"].append(epoch)
        history["step"].append(step)
        history["train_loss"].append(loss_sum.item() / world / max(1, epoch_steps))
        history["train_acc"].append(correct.item() / (seen * world) if seen else float("nan"))
        history["lr"].append(opt.param_groups[0]["lr"])
        if va is not None:
            ev = evaluate(model, va, batch_size=max(batch_size, 256), device=device, amp=amp_dtype)
            history["val_loss"].append(ev["loss"])
            history["val_acc"].append(ev["acc"])
            if multilabel:
                history["val_auc"].append(ev["auc"])
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val_acc=f"{ev['acc']:.3f}")
        history["seconds"].append(time.perf_counter() - start)
    bar.close()
    model.eval()
    return history


# ------------------------------------------------------------------------------------------------- CLI
def _check_save_path(path: str | None, ap) -> None:
    """Fail before training, not after it, when --save cannot be written."""
    if path is None:
        return
    from pathlib import Path

    from .checkpoint import writable

    target = Path(path)
    if target.is_dir():
        ap.error(f"--save {path}: is a directory; give a file path such as {target / 'model.pt'}")
    if not writable(target.parent):
        ap.error(f"--save {path}: cannot write to {target.parent}")


def main(argv=None) -> int:
    from .cli import train_parser

    ap = train_parser()
    args = ap.parse_args(argv)
    _check_save_path(args.save, ap)

    from . import data as vdata
    from . import checkpoint
    from .models import create_model, model_config

    try:
        P = get_profile(args.profile)
        train = vdata.load(args.data, "train", P)
        val = vdata.load(args.data, "val", P)
        seed_everything(args.seed)
        name = args.model or P.model
        model = create_model(name, data=train)
        hist = fit(model, train, val, profile=P, epochs=args.epochs, steps=args.steps, seconds=args.seconds,
                   batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                   schedule=args.schedule, label_smoothing=args.label_smoothing, shift=args.shift,
                   optimizer=args.optimizer, device=args.device, seed=args.seed)
    except (ValueError, TypeError) as e:  # a bad combination of valid-looking options: one line, not a traceback
        ap.error(str(e))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        test = evaluate(model, vdata.load(args.data, "test", P))
        print(f"final: train_loss={hist['train_loss'][-1]:.4f} val_acc={hist['val_acc'][-1]:.4f} "
              f"test_acc={test['acc']:.4f} ({hist['seconds'][-1]:.1f} s)")
        if args.save:  # the zoo's file format: load_checkpoint verifies it, VisionTransformer(**model_config) loads it
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            checkpoint.save_checkpoint(args.save, {
                "format": checkpoint.FORMAT, "name": name, "config": {"cli": vars(args), "profile": P.name},
                "model_config": model_config(name, data=train), "state_dict": state,
                "sha256": checkpoint.state_hash(state),
                "metrics": {"val_acc": hist["val_acc"][-1], "test_acc": test["acc"]}, "history": hist})
            print(f"saved {args.save}")
        if args.history:
            import json

            with open(args.history, "w") as f:
                json.dump(hist, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
