"""Course-trained checkpoints: ``zoo.get("vit_tiny_mnist5k")`` loads one, or trains it once.

Nothing here downloads weights. What a lesson needs "pretrained", the course trains itself:

    get(name, profile) ── file data/checkpoints/<name>-<profile>.pt valid? ──yes──▶ load (weights_only=True)
                                   │ no (missing, truncated, hash or config mismatch: warn)
                                   ▼
                      take a file lock ─▶ (re-check: another process may have just written it)
                                        ─▶ train the recipe ─▶ write temp file ─▶ fsync ─▶ rename

The rename is atomic, so a reader sees the old file or the new one, never half of one; the lock means two
notebooks started together train once. Each file carries its recipe, a SHA-256 of its weights, its training
curve and its accuracy on train (no augmentation), val and test: a base is trained until more epochs no longer
raise its accuracy (``metrics["plateau_gain"]``, the val-accuracy gain over the last quarter of the epochs, says
how close it came), and train vs test says whether it is underfit.

From the shell (every lesson module imported, so every entry is there; names may be glob patterns):

    python -m vitlab.zoo list 'ch7_bus_*'            # names, and whether a checkpoint file exists
    python -m vitlab.zoo show vit_tiny_mnist5k        # recipe and stored scores; never trains
    python -m vitlab.zoo train 'ch7_bus_*_s0' --profile gpu   # trains what is missing or stale, loads the rest
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m vitlab.zoo`: run the main of the module the lessons register into (the
    import sys               # file run as __main__ is a second copy with its own ZOO); --help answers before torch

    from vitlab.cli import zoo_parser

    zoo_parser().parse_args()
    from vitlab.zoo import main

    sys.exit(main())

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .checkpoint import FORMAT, load_checkpoint, save_checkpoint, state_hash
from .checkpoint import writable as _writable
from .profiles import Profile, profile as get_profile

__all__ = ["Recipe", "ZOO", "register", "get", "available", "Objective", "OBJECTIVES", "register_objective", "path_for",
           "save_checkpoint", "load_checkpoint", "state_hash", "checkpoint_dir", "plateau_gain", "register_all", "main"]



@dataclass(frozen=True)
class Recipe:
    """How to train a zoo entry, per profile: model + dataset + ``fit`` arguments."""
    model: str
    data: str
    data_kwargs: dict = field(default_factory=dict)
    train_kwargs: dict = field(default_factory=dict)  # for the train split only (e.g. n= more generated scenes)
    fit: dict = field(default_factory=dict)  # defaults for every profile
    per_profile: dict = field(default_factory=dict)  # profile name -> overrides of `fit` (and "max_train")
    seed: int = 0
    # profile name -> the profile whose checkpoint it loads: {"smoke": "cpu"} gives CI the real base model
    # (committed once) instead of a smoke-sized one that would make every comparison built on it noise
    shares: dict = field(default_factory=dict)
    # another entry whose weights start the training: a fine-tune of that base (e.g. an equal-step dense control)
    init: str | None = None
    # the seed of generated data when it differs from `seed` (which seeds the weights and the data order): from-
    # scratch runs over several seeds keep one dataset, so their test sets are the same images
    data_seed: int | None = None
    # a training objective other than classification, by name in OBJECTIVES (e.g. "mae"), and its arguments:
    # fit runs the objective's step_fn on the train split, and the objective's metrics replace the accuracies
    objective: str | None = None
    objective_kwargs: dict = field(default_factory=dict)
    # other entries whose weights the objective reads, frozen (a stage-2 prior's tokenizer): their hashes join the
    # checkpoint's config, so retraining one of them retrains this entry too (as `init` does for a fine-tune)
    uses: tuple = ()

    def checkpoint_profile(self, profile_name: str) -> str:
        return self.shares.get(profile_name, profile_name)

    def config(self, profile_name: str) -> dict[str, Any]:
        """Everything that determines the weights: a checkpoint made from another config is not trusted."""
        fit_kwargs = {**self.fit, **self.per_profile.get(profile_name, {})}
        max_train = fit_kwargs.pop("max_train", "profile")
        cfg = {"model": self.model, "data": self.data, "data_kwargs": dict(self.data_kwargs),
               "fit": fit_kwargs, "max_train": max_train, "seed": self.seed, "profile": profile_name}
        if self.train_kwargs:  # only when set, so older checkpoints' configs still match
            cfg["train_kwargs"] = dict(self.train_kwargs)
        if self.data_seed is not None:
            cfg["data_seed"] = self.data_seed
        if self.objective is not None:
            cfg["objective"] = {"name": self.objective, **self.objective_kwargs}
        return cfg


def _config(recipe: Recipe, P: Profile) -> dict[str, Any]:
    """``recipe.config`` plus, for a fine-tune, the starting weights' hash: a retrained base retrains its
    fine-tunes too."""
    cfg = recipe.config(P.name)
    if recipe.init is not None:
        _, info = get(recipe.init, P, return_info=True, progress=False)
        cfg["init"] = {"name": recipe.init, "sha256": info["sha256"]}
    if recipe.uses:
        cfg["uses"] = {name: get(name, P, return_info=True, progress=False)[1]["sha256"] for name in recipe.uses}
    return cfg


ZOO: dict[str, Recipe] = {}


@dataclass(frozen=True)
class Objective:
    """A training objective other than plain classification: ``step_fn(net, images, labels) -> (loss, None)`` for
    ``fit``, and ``metrics(model, train, val, test) -> dict`` of floats stored with the checkpoint. With
    ``classifies``, the model is a classifier trained with another loss (cross-entropy plus a regulariser): its
    ``step_fn`` returns (loss, logits), ``fit`` scores it on val every epoch, and the entry records the
    classification metrics (train / val / test accuracy, ``plateau_gain``) besides the objective's own."""
    step_fn: Any
    metrics: Any
    classifies: bool = False


# name -> factory(**Recipe.objective_kwargs) -> Objective. A module registers its objective where it defines it
# (vitlab.mae registers "mae"), before any recipe that uses it is trained.
OBJECTIVES: dict[str, Any] = {}


def register_objective(name: str, factory) -> None:
    if not callable(factory):
        raise TypeError(f"zoo.register_objective: factory must be callable, got {type(factory).__name__}")
    if name in OBJECTIVES and OBJECTIVES[name] is not factory:
        raise ValueError(f"zoo.register_objective: {name!r} is already registered")
    OBJECTIVES[name] = factory


def _same_weights(base_model: str, model: str) -> bool:
    """Whether ``model`` is ``base_model``'s registered config plus arguments of its own (an attention temperature
    that changes the computation, not the weights): a fine-tune may start from it; the strict state-dict load of
    the training then checks the weights really match."""
    from vitlab.models.registry import MODELS

    base, cfg = MODELS.get(base_model), MODELS.get(model)
    return base is not None and cfg is not None and all(k in cfg and cfg[k] == v for k, v in base.items())


def register(name: str, recipe: Recipe) -> None:
    if name in ZOO:
        raise ValueError(f"zoo.register: {name!r} is already registered")
    if not isinstance(recipe.uses, tuple) or any(u not in ZOO for u in recipe.uses):
        raise ValueError(f"zoo.register: {name!r} uses {recipe.uses!r}, which must be a tuple of registered entries")
    if recipe.init is not None and recipe.init not in ZOO:
        raise ValueError(f"zoo.register: {name!r} starts from {recipe.init!r}, which must be a registered entry")
    if recipe.init is not None and ZOO[recipe.init].model != recipe.model \
            and ZOO[recipe.init].objective is None and not _same_weights(ZOO[recipe.init].model, recipe.model):
        raise ValueError(f"zoo.register: {name!r} starts from {recipe.init!r}, which must be a registered "
                         f"{recipe.model!r} entry (or a pre-training, whose encoder it takes, or a model whose "
                         f"registered config {recipe.model!r} extends)")
    ZOO[name] = recipe


# The course's base models. smoke: trained in well under a minute; cpu: a few minutes; gpu: longer.
# smoke shares the cpu checkpoint (committed): lessons built on a base need a trained one in CI too
register("vit_tiny_mnist5k", Recipe(
    model="vit_tiny", data="mnist5k", fit=dict(lr=2e-3, weight_decay=0.05, warmup=0.1, shift=2),
    per_profile={"cpu": dict(epochs=60, batch_size=128), "gpu": dict(epochs=100, batch_size=128)},
    shares={"smoke": "cpu"}))
# Chapter 2's base. On the default 4,000 scenes a ViT stays underfit (58 % on train and test alike after 40
# epochs): it needs more steps than 4,000 scenes give without memorising them. Scenes are free, so it trains
# on 20,000 (new placements and distractors around the same 3,500 training digits).
register("vit_tiny_scenes", Recipe(
    model="vit_tiny", data="cluttered_scenes", data_kwargs=dict(img_size=32, in_chans=3),
    train_kwargs=dict(n=20000), fit=dict(lr=2e-3, weight_decay=0.05, warmup=0.1, shift=2),
    per_profile={"cpu": dict(epochs=30, batch_size=128), "gpu": dict(epochs=100, batch_size=128)},
    shares={"smoke": "cpu"}))
# The small anchor SN-Netv2 stitches to vit_tiny_scenes (chapter 2): 4 blocks x 64 on the default 4,000 scenes
# (plateaued at 60.6 %; the large anchor is far above it, as a small-to-large family should be).
register("vit_nano_scenes", Recipe(
    model="vit_nano", data="cluttered_scenes", data_kwargs=dict(img_size=32, in_chans=3),
    fit=dict(lr=2e-3, weight_decay=0.05, warmup=0.1, shift=2),
    per_profile={"cpu": dict(epochs=40, batch_size=128), "gpu": dict(epochs=100, batch_size=128)},
    shares={"smoke": "cpu"}))
# Chapter 2's equal-step dense controls: the base fine-tuned with the chapter's fine-tune recipe, exactly as a
# method's fine-tune is (same steps, lr, data, seed), one entry per seed. Every "method vs base" claim of chapter 2
# is asserted against these, so that the extra steps alone are never credited to the method.
SCENES_FINETUNE = dict(lr=1e-4, weight_decay=0.05, warmup=0.1, shift=2, label_smoothing=0.1, batch_size=64)
SCENES_FINETUNE_STEPS = {"smoke": 5, "cpu": 100, "gpu": 3000}
CONTROL_SEEDS = (0, 1, 2)
for _seed in CONTROL_SEEDS:
    register(f"vit_tiny_scenes_ft{_seed}", Recipe(
        model="vit_tiny", data="cluttered_scenes", data_kwargs=dict(img_size=32, in_chans=3),
        train_kwargs=dict(n=20000), fit=dict(SCENES_FINETUNE, seed=_seed),
        per_profile={p: dict(steps=s) for p, s in SCENES_FINETUNE_STEPS.items()}, init="vit_tiny_scenes"))
# The GPU chapters' base model (quantisation, efficient inference at scale): CIFAR-100 downloads, so only the
# gpu profile (or a caller that allows downloads) can train it; offline profiles get load()'s clear error.
# SN-Netv2's small anchor on GPU, stitched to vit_small_cifar100 (12 x 192): vit_tiny (6 x 96) on the same data.
register("vit_tiny_cifar100", Recipe(
    model="vit_tiny", data="cifar100", data_kwargs={}, fit=dict(lr=1e-3, weight_decay=0.05, warmup=5, shift=4),
    per_profile={"gpu": dict(epochs=100, batch_size=256)}))
register("vit_small_cifar100", Recipe(
    model="vit_small", data="cifar100", fit=dict(lr=1e-3, weight_decay=0.05, warmup=5, shift=4),
    per_profile={"gpu": dict(epochs=100, batch_size=256)}))
for _seed in CONTROL_SEEDS:  # chapter 2's dense controls on GPU (see vit_tiny_scenes_ft*)
    register(f"vit_small_cifar100_ft{_seed}", Recipe(
        model="vit_small", data="cifar100", fit=dict(SCENES_FINETUNE, shift=4, seed=_seed),
        per_profile={"gpu": dict(steps=SCENES_FINETUNE_STEPS["gpu"])}, init="vit_small_cifar100"))


def checkpoint_dir() -> Path:
    """``data/checkpoints`` in the repository (override with ``$VITLAB_CHECKPOINTS``)."""
    env = os.environ.get("VITLAB_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "checkpoints"


def path_for(name: str, profile: Profile | str | None = None) -> Path:
    """The file ``get(name, profile)`` reads: ``<name>-<profile>.pt``, or the profile whose checkpoint it shares."""
    return checkpoint_dir() / f"{name}-{_recipe(name).checkpoint_profile(get_profile(profile).name)}.pt"


def _recipe(name: str) -> Recipe:
    if not isinstance(name, str):
        raise TypeError(f"zoo.get: name must be a str, got {type(name).__name__}")
    if name not in ZOO:
        raise ValueError(f"zoo.get: unknown checkpoint {name!r}; valid names are {sorted(ZOO)}")
    return ZOO[name]


# ---------------------------------------------------------------------------------------------- get
def _train(name: str, recipe: Recipe, P: Profile, progress: bool) -> dict:
    from . import data as vdata
    from .models import create_model, model_config
    from .seed import seed_everything
    from .train import fit

    cfg = _config(recipe, P)
    data_profile = P if cfg["max_train"] == "profile" else P.replace(max_train=cfg["max_train"])
    data_seed = recipe.seed if recipe.data_seed is None else recipe.data_seed
    train = vdata.load(recipe.data, "train", data_profile, seed=data_seed,
                       **{**recipe.data_kwargs, **recipe.train_kwargs})
    val = vdata.load(recipe.data, "val", data_profile, seed=data_seed, **recipe.data_kwargs)
    test = vdata.load(recipe.data, "test", data_profile, seed=data_seed, **recipe.data_kwargs)
    seed_everything(recipe.seed)
    model = create_model(recipe.model, data=train)
    if recipe.init is not None:
        _start_from(model, get(recipe.init, P, progress=False))
    fit_kwargs = {"seed": recipe.seed, **cfg["fit"]}  # the recipe's fit may carry its own seed (data order, shifts)
    if "layer_decay" in fit_kwargs:  # a fine-tune's layer-wise lr decay (MAE's LLRD) as fit's optimizer factory
        from .probe import layer_decay_optimizer

        fit_kwargs["optimizer"] = layer_decay_optimizer(fit_kwargs.pop("layer_decay"))
    if "head_lr_scale" in fit_kwargs:  # new heads next to pretrained weights: the model's head_parameters() at a
        from .train import adamw_lr_scaled  # multiple of the lr (ToCo's official 10x)

        scale = fit_kwargs.pop("head_lr_scale")
        fit_kwargs["optimizer"] = adamw_lr_scaled(lambda m: m.head_parameters(), scale)
    if "trainable" in fit_kwargs:  # a partial fine-tune (a linear probe, the last blocks): the rest stays frozen
        from .probe import partial_optimizer

        fit_kwargs["optimizer"] = partial_optimizer(fit_kwargs.pop("trainable"))
    if recipe.objective is not None:  # self-supervised: no labels to score, the objective measures itself
        if recipe.objective not in OBJECTIVES:
            raise ValueError(f"zoo: {name!r} needs the objective {recipe.objective!r}, which is not registered "
                             f"(import its module); registered: {sorted(OBJECTIVES)}")
        objective = OBJECTIVES[recipe.objective](**recipe.objective_kwargs)
        history = fit(model, train, val if objective.classifies else None, profile=P, progress=progress,
                      desc=f"zoo {name}", step_fn=objective.step_fn, **fit_kwargs)
        metrics = {**(_classification_metrics(model, train, test, history) if objective.classifies else {}),
                   **objective.metrics(model, train, val, test), "train_seconds": history["seconds"][-1]}
    else:
        history = fit(model, train, val, profile=P, progress=progress, desc=f"zoo {name}", **fit_kwargs)
        metrics = _classification_metrics(model, train, test, history)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "name": name, "config": cfg, "model_config": model_config(recipe.model, data=train),
            "state_dict": state, "sha256": state_hash(state), "metrics": metrics, "history": history}


def _classification_metrics(model, train, test, history: dict) -> dict:
    """Train / val / test accuracy, training time and ``plateau_gain`` (mean AUC instead for multi-label data)."""
    from .train import evaluate

    scored = evaluate(model, test)
    metrics = {"train_acc": evaluate(model, train)["acc"], "val_acc": history["val_acc"][-1],
               "test_acc": scored["acc"], "train_seconds": history["seconds"][-1],
               "plateau_gain": plateau_gain(history["val_acc"])}
    if "val_auc" in history:  # multi-label: mean ROC AUC is the score, and what must plateau
        metrics.update(val_auc=history["val_auc"][-1], test_auc=scored["auc"],
                       plateau_gain=plateau_gain(history["val_auc"]))
    return metrics


def _start_from(model, base) -> None:
    """Load ``base``'s weights into ``model``: all of them (a fine-tune of the same architecture, strict), a
    pre-training model's encoder through its ``load_into(model)`` (MAE: the head stays fresh), or, for a model that
    wraps its base with new heads (ToCo's CAM heads around a ViT), through the model's ``start_from(base)``."""
    if type(base) is not type(model) and hasattr(model, "start_from"):
        model.start_from(base)
    elif type(base) is not type(model) and hasattr(base, "load_into"):
        base.load_into(model)
    else:
        model.load_state_dict(base.state_dict(), strict=True)


def available(name: str, profile: Profile | str | None = None) -> bool:
    """Whether ``get(name, profile)`` would load a checkpoint rather than train one: the file exists and holds the
    current recipe's weights (a fine-tune's base must be trained already: its hash is part of the recipe). For a
    comparison that reads what is there and never starts a long training."""
    path = path_for(name, profile)  # raises for an unknown entry
    if not path.exists():
        return False
    recipe = ZOO[name]
    P = get_profile(recipe.checkpoint_profile(get_profile(profile).name))
    return _valid(path, _config(recipe, P), recipe, warn=False) is not None


def measured(name: str, key: str, fn, profile: Profile | str | None = None) -> dict:
    """``fn(model, profile) -> {str: float}`` for the zoo entry ``name``, computed once per checkpoint and cached
    beside it in ``<name>-<profile>.<key>.json`` with the weights' hash: a retrained checkpoint measures again. For
    numbers that cost more than a notebook's smoke budget (probes over many checkpoints): the cpu run writes them,
    CI reads them. ``profile`` given to ``fn`` is the checkpoint's (smoke shares cpu's): ``fn`` loads its data with
    it, so the cached numbers are the checkpoint profile's whoever computes them. ``key`` names the measurement:
    change it when ``fn`` changes (the cache cannot see code)."""
    import json
    import re
    import tempfile

    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"zoo.measured: key must be a non-empty name of letters, digits, '_' or '-', got {key!r}")
    if not callable(fn):
        raise TypeError(f"zoo.measured: fn must be callable (model -> dict), got {type(fn).__name__}")
    model, info = get(name, profile, progress=False, return_info=True)
    path = Path(info["path"]).with_suffix(f".{key}.json")
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("sha256") == info["sha256"] and isinstance(cached.get("values"), dict):
                return cached["values"]
        except (OSError, ValueError):
            pass  # unreadable: measure again and overwrite
    values = fn(model, get_profile(_recipe(name).checkpoint_profile(get_profile(profile).name)))
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise TypeError(f"zoo.measured: fn must return a dict with str keys, got {type(values).__name__}")
    values = {k: float(v) for k, v in values.items()}
    if _writable(path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"name": name, "key": key, "sha256": info["sha256"], "values": values}, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    return values


def plateau_gain(val_acc: list[float]) -> float:
    """How much val accuracy still rose over the last quarter of the epochs: the best of that quarter minus the
    best before it. Near zero (or negative) means more epochs would not have helped: the model has plateaued."""
    k = max(1, len(val_acc) // 4)
    if len(val_acc) <= k:
        return float("nan")
    return max(val_acc[-k:]) - max(val_acc[:-k])


def _build(payload: dict):
    """The checkpoint's model, built by the registry's builder for its config's model name (a ViT or any
    registered architecture) and loaded strictly (raises if the weights do not fit the architecture)."""
    from .models.registry import builder

    model = builder(payload["config"]["model"])(**payload["model_config"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def _valid(path: Path, cfg: dict, recipe: Recipe, warn: bool = True):
    """(payload, model) of a checkpoint that can be trusted, else None (with a warning saying why)."""
    from .models import model_config

    def reject(why: str):
        if warn:
            warnings.warn(f"zoo: {path.name} {why}; retraining it", stacklevel=4)
        return None

    if not path.exists():
        return None
    if path.is_dir():
        raise ValueError(f"zoo: the checkpoint path {path} is a directory; remove it or set $VITLAB_CHECKPOINTS")
    try:
        payload = load_checkpoint(path)
    except Exception as e:  # truncated, corrupt, foreign: never trusted
        return reject(f"is unreadable ({e})")
    if payload.get("config") != cfg:
        return reject("was trained with another recipe")
    stored = payload.get("model_config", {})
    data_keys = {k: stored[k] for k in ("img_size", "in_chans", "num_classes") if k in stored}
    if stored != model_config(recipe.model, **data_keys):  # the registry's architecture changed since
        return reject(f"holds another architecture than the registry's {recipe.model!r} now")
    try:
        model = _build(payload)
    except Exception as e:  # consistent hash, but the weights do not fit the model
        return reject(f"has weights that do not fit the model ({str(e).splitlines()[0]})")
    return payload, model


def _locked(path: Path, name: str):
    """The file lock around training ``name``; says so when another process holds it and we wait."""
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=2)
    except Timeout:
        warnings.warn(f"zoo: another process is training {name!r} (lock {lock.lock_file}); waiting for it to "
                      f"finish", stacklevel=3)
        lock.acquire()
    return lock


def _release(lock: FileLock) -> None:
    """Release the lock and leave no lock file behind. The file goes while still held: a process already waiting
    on it wakes on the unlinked file and re-checks the checkpoint (valid now, so it loads it); one arriving
    later makes a fresh lock file. At worst (the trainer failed) two processes train at once, and the atomic
    write still leaves one valid file."""
    try:
        Path(lock.lock_file).unlink(missing_ok=True)
    finally:
        lock.release()


def get(name: str, profile: Profile | str | None = None, *, retrain: bool = False, progress: bool = True,
        return_info: bool = False):
    """The trained model ``name`` for the profile (eval mode, on CPU); trains and caches it if needed.

    return_info=True also returns the checkpoint's metadata (config, metrics, history, path).
    """
    recipe = _recipe(name)
    P = get_profile(recipe.checkpoint_profile(get_profile(profile).name))  # the profile that trains the weights
    cfg = _config(recipe, P)
    path = path_for(name, P)
    found = None if retrain else _valid(path, cfg, recipe)
    if found is None and not _writable(path.parent):  # say so before the training, not after it
        warnings.warn(f"zoo: cannot write to {path.parent}; training {name!r} without caching it", stacklevel=2)
        payload = _train(name, recipe, P, progress)
        found = payload, _build(payload)
    elif found is None:
        lock = _locked(path, name)
        try:
            found = None if retrain else _valid(path, cfg, recipe, warn=False)  # another process may have finished
            if found is None:
                payload = _train(name, recipe, P, progress)
                save_checkpoint(path, payload)
                found = payload, _build(payload)
        finally:
            _release(lock)
    payload, model = found
    if return_info:
        info = {k: payload[k] for k in ("name", "config", "model_config", "metrics", "history", "sha256")}
        return model, {**info, "path": str(path)}
    return model


# ---------------------------------------------------------------------------------------------- command line
def register_all() -> list[str]:
    """Import every module under ``vitlab.methods`` (each registers its entries when imported): the whole zoo, as the
    command line sees it. Returns the modules' names."""
    import importlib
    import pkgutil

    import vitlab.methods as methods

    names = [m.name for m in pkgutil.walk_packages(methods.__path__, methods.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    return names


def _scalars(metrics: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv=None) -> int:
    """``python -m vitlab.zoo list | train | show`` (``vitlab.cli.zoo_parser``)."""
    import time
    from fnmatch import fnmatchcase

    from .cli import zoo_parser

    ap = zoo_parser()
    args = ap.parse_args(argv)
    try:
        P = get_profile(args.profile)
    except ValueError as e:  # gpu without CUDA: one line, not a traceback
        ap.error(str(e))
    register_all()
    if args.cmd == "list":
        for name in sorted(n for n in ZOO if fnmatchcase(n, args.pattern)):
            print(f"{name:<48} {'file' if path_for(name, P).exists() else '-'}")
        return 0
    names = []
    for pattern in args.names:
        found = [pattern] if pattern in ZOO else sorted(n for n in ZOO if fnmatchcase(n, pattern))
        if not found:
            ap.error(f"no zoo entry matches {pattern!r} (python -m vitlab.zoo list shows them)")
        names += [n for n in found if n not in names]
    for name in names:
        if args.cmd == "show":  # reads files only: never trains (not even a fine-tune's base, as _config would)
            recipe, path = ZOO[name], path_for(name, P)
            cfg = recipe.config(recipe.checkpoint_profile(P.name))
            links = "".join(f", {k} {v!r}" for k, v in (("init", recipe.init), ("uses", recipe.uses)) if v)
            print(f"{name}: {cfg}{links}")
            stored = load_checkpoint(path) if path.exists() else None
            if stored is None:
                print(f"  not trained for {P.name} (python -m vitlab.zoo train {name} --profile {P.name})")
            else:
                same = {k: v for k, v in stored["config"].items() if k not in ("init", "uses")} == cfg
                print(f"  {path}{'' if same else ' (trained with another recipe: train retrains it)'}: "
                      f"{_scalars(stored['metrics'])}")
            continue
        t0 = time.time()
        _, info = get(name, P, retrain=args.retrain, return_info=True)
        print(f"{name}: {time.time() - t0:.0f} s, {_scalars(info['metrics'])}", flush=True)
    return 0
