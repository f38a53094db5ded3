"""The chapter's training recipes behind one call, for ``notebooks/4_training/compare.ipynb``.

Every recipe trains the same registry ViT from the same initial weights (the seed), on the same data, for the
same number of optimizer steps, with the same batch, lr and schedule, and returns the model it would deploy:

    run = train_recipe("mixpro", train, val, model="vit_nano", model_kw=dict(patch_size=7), profile=P,
                       epochs=6, seed=0)
    run.model        # the deployed classifier: EWA collapsed back to the plain ViT, DeiT-LT's two heads averaged
    run.seconds      # wall-clock of the whole recipe (DeiT-LT's teacher included when trained here)
    run.steps        # optimizer steps of the student (the same for every recipe)
    run.cpu_seconds  # CPU time of the recipe (the cost measure that a busy machine does not inflate)

Each recipe's own hyper-parameters come from its module, the place its lesson reads them from too: Lion's lr
factor (``lion.DEFAULTS``), EWA's experts and share rate (``ewa.DEFAULTS``), MixPro's smoothing
(``mixpro.DEFAULTS``), Patch Mixing's ratio and smoothing (``patch_mixing.RECIPE``) and DeiT-LT's loss, DRW and
teacher settings (``deit_lt.RECIPE``). The shared settings (steps, batch, lr, weight decay, data) are the caller's.

| recipe        | what changes against ``baseline`` (AdamW, label-smoothed CE)                         | lesson          |
| ------------- | ------------------------------------------------------------------------------------ | --------------- |
| lion          | the optimizer: Lion at lr × lion_lr_factor (1/3), weight decay scaled so lr·λ stays  | lion            |
| ewa           | every other FFN a 4-expert RUP-MoE with EWA (β = 0.3), collapsed after training      | ewa             |
| mixpro        | MaskMix images with progressive attention labels                                    | mixpro          |
| patch_mixing  | patches of a partner image pasted in, labels mixed by area                           | patch_mixing    |
| deit_lt       | a DIST token taught by a SAM-trained CNN on mixed images, deferred re-weighting      | deit_lt         |

Steps, not seconds, make the budget equal: ``fit(seconds=...)`` would fix the step count from a timing probe,
and the same seed would no longer give the same numbers. Every recipe but DeiT-LT costs what the baseline costs
per step (the mixing and the RUP shuffle are cheap next to the ViT); DeiT-LT also trains and runs its teacher,
and ``seconds`` shows what that costs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.nn as nn

from vitlab.models import create_model
from vitlab.seed import seed_everything
from vitlab.train import fit

__all__ = ["RECIPES", "RecipeRun", "train_recipe"]

RECIPES = ("baseline", "lion", "ewa", "mixpro", "patch_mixing", "deit_lt")


@dataclass
class RecipeRun:
    name: str
    model: nn.Module  # what the recipe deploys, in eval mode
    history: dict  # fit's history of the trained (not collapsed) model
    seconds: float  # wall-clock of the whole recipe
    steps: int = 0  # optimizer steps of the student
    cpu_seconds: float = 0.0  # CPU time of this process for the whole recipe (steadier than wall-clock on a busy
    #                           machine; with one thread it is the compute the recipe cost)
    extra: dict = field(default_factory=dict)  # recipe-specific: the teacher's time, the MoE model, ...


def train_recipe(name: str, train, val=None, *, model: str = "vit_nano", model_kw: dict | None = None,
                 profile=None, epochs: int, batch_size: int = 48, lr: float = 2e-3, weight_decay: float = 0.05,
                 shift: int = 0, seed: int = 0, teacher: nn.Module | None = None, teacher_epochs: int | None = None,
                 teacher_batch: int = 64, progress: bool = False) -> RecipeRun:
    """Train ``model`` (a registry name, ``model_kw`` its overrides) with recipe ``name`` (see ``RECIPES``).

    DeiT-LT only: ``teacher`` (a trained CNN teacher, e.g. ``deit_lt.train_teacher``'s, shared across seeds as in
    the paper) or, without it, a teacher trained here for ``teacher_epochs`` (default ``epochs``) at
    ``teacher_batch`` with ``deit_lt.RECIPE``'s settings; DRW starts after ``RECIPE["drw_at"]`` of the steps.
    """
    if name not in RECIPES:
        raise ValueError(f"train_recipe: unknown recipe {name!r}; expected one of {RECIPES}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"train_recipe: teacher must be an nn.Module or None, got {type(teacher).__name__}")
    model_kw = dict(model_kw or {})
    common = dict(profile=profile, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  shift=shift, seed=seed, progress=progress, desc=f"{name} s{seed}")
    start, cpu_start = time.perf_counter(), time.process_time()
    seed_everything(seed)  # the same initial ViT for every recipe with the same seed
    net = create_model(model, data=train, **model_kw) if name != "deit_lt" else None
    extra: dict = {}

    if name == "baseline":
        history = fit(net, train, val, **common)
        deployed = net
    elif name == "lion":
        from .lion import DEFAULTS as LION, lion_for

        factor = LION["lion_lr_factor"]  # Lion's lr a fraction of AdamW's, its weight decay scaled up: lr·λ kept
        history = fit(net, train, val, optimizer=lion_for, **dict(common, lr=lr * factor,
                                                                  weight_decay=weight_decay / factor))
        deployed = net
    elif name == "ewa":
        from .ewa import DEFAULTS as EWA, collapse, fit_ewa, moeify

        moe = moeify(net, num_experts=EWA["num_experts"])
        history = fit_ewa(moe, train, val, share_rate=EWA["share_rate"], **common)
        deployed = collapse(moe)
        extra["moe_model"] = moe
    elif name == "mixpro":
        from .mixpro import DEFAULTS as MIXPRO, mixpro_step

        step = mixpro_step(train.num_classes, cell_size=net.patch_embed.patch_size, smoothing=MIXPRO["smoothing"])
        history = fit(net, train, val, step_fn=step, **common)
        deployed = net
        extra["s"] = step.history()["s"]
    elif name == "patch_mixing":
        from .patch_mixing import RECIPE as PM, PatchMix, patchmix_step

        mixer = PatchMix(net.patch_embed.patch_size, train.num_classes, max_ratio=PM["max_ratio"],
                         smoothing=PM["smoothing"], seed=seed)
        history = fit(net, train, val, step_fn=patchmix_step(mixer), **common)
        deployed = net
    else:  # deit_lt
        from .deit_lt import RECIPE as LT, DeiTLTStep, class_balanced_weights, distilled_vit, train_teacher

        counts = train.class_counts()
        if teacher is None:
            teacher, _ = train_teacher(train, profile=profile, epochs=teacher_epochs or epochs,
                                       batch_size=teacher_batch, shift=shift, seed=seed, progress=progress)
            extra["teacher_seconds"] = time.perf_counter() - start
        extra["teacher"] = teacher
        seed_everything(seed)
        net = distilled_vit(model, data=train, **model_kw)
        drw_step = int(LT["drw_at"] * epochs * max(1, len(train) // batch_size))
        step = DeiTLTStep(teacher, num_classes=train.num_classes, alpha=LT["alpha"], drw_step=drw_step,
                          class_weights=class_balanced_weights(counts, LT["beta"]), seed=seed)
        history = fit(net, train, val, step_fn=step, **common)
        deployed = net
        extra["drw_step"] = drw_step
    deployed.eval()
    return RecipeRun(name, deployed, history, time.perf_counter() - start, history["step"][-1],
                     time.process_time() - cpu_start, extra)
