"""The chapter's training recipes behind one call, for ``notebooks/4_training/compare.ipynb``.

Every recipe trains the same registry ViT from the same initial weights (the seed), on the same data, for the
same number of optimizer steps, with the same batch, lr and schedule, and returns the model it would deploy:

    run = train_recipe("mixpro", train, val, model="vit_nano", model_kw=dict(patch_size=7), profile=P,
                       epochs=6, seed=0)
    run.model        # the deployed classifier: EWA collapsed back to the plain ViT, DeiT-LT's two heads averaged
    run.seconds      # wall-clock of the whole recipe, DeiT-LT's teacher included

| recipe        | what changes against ``baseline`` (AdamW, label-smoothed CE)                         | lesson          |
| ------------- | ------------------------------------------------------------------------------------ | --------------- |
| lion          | the optimizer: Lion at the same lr·λ (lr and λ as AdamW's: the Lion lesson's best)  | lion            |
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

# DeiT-LT's teacher: a small ResNet, SAM around SGD, balanced softmax (the lesson's settings)
TEACHER = dict(lr=0.05, weight_decay=5e-4, rho=0.05)


@dataclass
class RecipeRun:
    name: str
    model: nn.Module  # what the recipe deploys, in eval mode
    history: dict  # fit's history of the trained (not collapsed) model
    seconds: float  # wall-clock of the whole recipe
    extra: dict = field(default_factory=dict)  # recipe-specific: the teacher's time, the MoE model, ...


def train_recipe(name: str, train, val=None, *, model: str = "vit_nano", model_kw: dict | None = None,
                 profile=None, epochs: int, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05,
                 shift: int = 0, seed: int = 0, teacher_epochs: int | None = None,
                 teacher_widths: tuple[int, ...] = (8, 16, 32), drw_at: float = 0.5, progress: bool = False
                 ) -> RecipeRun:
    """Train ``model`` (a registry name, ``model_kw`` its overrides) with recipe ``name`` (see ``RECIPES``).

    DeiT-LT only: ``teacher_epochs`` (default ``epochs``) and ``teacher_widths`` size its CNN teacher; ``drw_at``
    is the fraction of the steps after which it re-weights its distillation loss.
    """
    if name not in RECIPES:
        raise ValueError(f"train_recipe: unknown recipe {name!r}; expected one of {RECIPES}")
    if not 0.0 <= drw_at <= 1.0:
        raise ValueError(f"train_recipe: drw_at must be a fraction in [0, 1], got {drw_at!r}")
    model_kw = dict(model_kw or {})
    common = dict(profile=profile, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  shift=shift, seed=seed, progress=progress, desc=f"{name} s{seed}")
    start = time.perf_counter()
    seed_everything(seed)  # the same initial ViT for every recipe with the same seed
    net = create_model(model, data=train, **model_kw) if name != "deit_lt" else None
    extra: dict = {}

    if name == "baseline":
        history = fit(net, train, val, **common)
        deployed = net
    elif name == "lion":
        from .lion import lion_for

        history = fit(net, train, val, optimizer=lion_for, **common)
        deployed = net
    elif name == "ewa":
        from .ewa import collapse, fit_ewa, moeify

        moe = moeify(net, num_experts=4)
        history = fit_ewa(moe, train, val, share_rate=0.3, **common)
        deployed = collapse(moe)
        extra["moe_model"] = moe
    elif name == "mixpro":
        from .mixpro import mixpro_step

        step = mixpro_step(train.num_classes, cell_size=net.patch_embed.patch_size)
        history = fit(net, train, val, step_fn=step, **common)
        deployed = net
        extra["s"] = step.history()["s"]
    elif name == "patch_mixing":
        from .patch_mixing import PatchMix, patchmix_step

        mixer = PatchMix(net.patch_embed.patch_size, train.num_classes, seed=seed)
        history = fit(net, train, val, step_fn=patchmix_step(mixer), **common)
        deployed = net
    else:  # deit_lt
        from .deit_lt import (DeiTLTStep, balanced_softmax_loss, class_balanced_weights, distilled_vit, sam_training,
                              small_resnet)

        counts = train.class_counts()
        seed_everything(seed)
        teacher = small_resnet(train, widths=tuple(teacher_widths))
        make_sam, sam_step = sam_training(balanced_softmax_loss(counts), rho=TEACHER["rho"], base="sgd")
        fit(teacher, train, profile=profile, epochs=teacher_epochs or epochs, batch_size=batch_size,
            optimizer=make_sam, step_fn=sam_step, lr=TEACHER["lr"], weight_decay=TEACHER["weight_decay"],
            shift=shift, amp=False, compile=False, seed=seed, progress=progress, desc=f"teacher s{seed}")
        extra["teacher_seconds"] = time.perf_counter() - start
        extra["teacher"] = teacher
        seed_everything(seed)
        net = distilled_vit(model, data=train, **model_kw)
        drw_step = int(drw_at * epochs * max(1, len(train) // batch_size))
        step = DeiTLTStep(teacher, num_classes=train.num_classes, class_weights=class_balanced_weights(counts),
                          drw_step=drw_step, seed=seed)
        history = fit(net, train, val, step_fn=step, **common)
        deployed = net
    deployed.eval()
    return RecipeRun(name, deployed, history, time.perf_counter() - start, extra)
