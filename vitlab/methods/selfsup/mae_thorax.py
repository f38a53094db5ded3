"""MAE for multi-label thorax disease classification: the medical pre-training recipe, then fine-tuning.

Xiao, Bai, Yuille, Zhou, "Delving into Masked Autoencoders for Multi-Label Thorax Disease Classification",
WACV 2023 (arXiv:2210.12843). Official code: https://github.com/lambert-x/medical_mae (built on MAE):
``main_pretrain_multi_datasets_xray.py`` (``--mask_ratio``, ``--random_resize_range``), ``main_finetune_chestxray.py``
(BCE, mean AUC), ``util/lr_decay.py`` (layer-wise lr decay), ``models_vit.py`` (``global_pool`` + ``fc_norm``).

The mechanism is MAE's (``vitlab.mae``: random masking, encoder on the visible patches, light decoder, MSE on the
removed patches). The paper's point is the *recipe* for x-rays, where the findings are small and the anatomy is
the same in every image:

    pre-train   MAE on unlabelled x-rays, mask 90 % of the patches (natural images: 75 %),
                random-resized crops of 50-100 % of the image (natural images: 20-100 %)
    fine-tune   the encoder as a ViT with global average pooling and fc_norm, BCE over the findings,
                layer-wise lr decay (lr · decay^(depth − layer)), scored by mean ROC AUC over the findings
    control     the same ViT trained from scratch: same data, steps, lr, batch and seeds, no pre-training

What this module fixes, so the lesson, the chapter's compare and the tests read one place:
- ``ENCODER`` / ``DECODER``: the curriculum's tiny MAE (patch 4 on 32 px: 64 patches; 4 × 64 encoder, 2 × 64
  decoder); registered as models ``mae_thorax`` (pre-training) and ``vit_thorax`` (the ViT it becomes).
- ``RECIPES``: the paper's medical recipe and MAE's natural-image recipe, the two pre-trainings compared.
- ``PRETRAIN`` / ``FINETUNE``: optimiser settings; step counts per profile in ``PRETRAIN_STEPS`` /
  ``FINETUNE_STEPS``. One pre-training per recipe (seed 0); fine-tunes and the scratch control over ``SEEDS``.
- ``DATA``: ``thorax_xrays`` at 32 px, each image standardised (``vitlab.data.thorax.standardize_images``): on
  raw pixels a ViT trained from scratch stayed at the prevalences (val AUC 0.51 after 3,000 steps).

Deviations from the official recipe, named: toy sizes (ViT-S/16 at 224 px there); pre-training lr 1.5e-3 at batch
128 for 2,000 steps (the paper: base lr 1.5e-4 · batch / 256 for 800 epochs, far more steps); fine-tuning with
layer decay 0.75 (the paper 0.55 for 12 blocks: over our 4 blocks 0.75 gives a similar first-to-last ratio),
without drop-path or RandAugment (a ±2-pixel shift instead); all 4,000 labelled training images.
"""
from __future__ import annotations

import torch.nn as nn

from vitlab import zoo
from vitlab.checks import check_choice
from vitlab.mae import mae_model
from vitlab.models import VisionTransformer
from vitlab.models.registry import MODELS, register_model
from vitlab.profiles import Profile, profile as get_profile

__all__ = ["ENCODER", "DECODER", "RECIPES", "PRETRAIN", "FINETUNE", "PRETRAIN_STEPS", "FINETUNE_STEPS", "SEEDS",
           "DATA", "data", "pretrained", "finetuned", "scratch", "entry_names"]

ENCODER = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
DECODER = dict(decoder_dim=64, decoder_depth=2, decoder_heads=4)
# name -> (mask ratio, random-resized-crop scale range)
RECIPES = {"medical": dict(mask_ratio=0.9, crop_scale=[0.5, 1.0]),  # the paper's x-ray recipe
           "natural": dict(mask_ratio=0.75, crop_scale=[0.2, 1.0])}  # MAE's ImageNet recipe
PRETRAIN = dict(batch_size=128, lr=1.5e-3, weight_decay=0.05, warmup=0.1)
FINETUNE = dict(batch_size=64, lr=1e-3, weight_decay=0.05, warmup=0.1, label_smoothing=0.0, shift=2)
LAYER_DECAY = 0.75
PRETRAIN_STEPS = {"cpu": 2000, "gpu": 20000}
FINETUNE_STEPS = {"cpu": 2500, "gpu": 10000}
SEEDS = (0, 1, 2)
DATA = ("thorax_xrays", dict(img_size=32, standardize=True))
DATA_SEED = 0  # one set of x-rays for every entry: the seeds vary the weights and the data order, not the patients


def _data_seed(seed: int) -> int | None:
    """``Recipe.data_seed`` for a run with ``seed``: None when the seed already draws the lesson's x-rays."""
    return None if seed == DATA_SEED else DATA_SEED


def _register() -> None:
    if "mae_thorax" in MODELS:  # re-imported: the registries already hold everything below
        return
    register_model("mae_thorax", mae_model, **ENCODER, **DECODER)
    register_model("vit_thorax", VisionTransformer, **ENCODER, num_classes=5, global_pool="avg")
    source, kwargs = DATA
    steps = lambda table: {p: dict(steps=s) for p, s in table.items()}  # noqa: E731
    for recipe, objective in RECIPES.items():
        zoo.register(f"mae_thorax_{recipe}", zoo.Recipe(
            model="mae_thorax", data=source, data_kwargs=dict(kwargs), fit=dict(PRETRAIN),
            per_profile=steps(PRETRAIN_STEPS), shares={"smoke": "cpu"}, objective="mae",
            objective_kwargs=dict(objective)))
        for seed in SEEDS:
            zoo.register(f"vit_thorax_{recipe}_s{seed}", zoo.Recipe(
                model="vit_thorax", data=source, data_kwargs=dict(kwargs), seed=seed,
                data_seed=_data_seed(seed), fit=dict(FINETUNE, layer_decay=LAYER_DECAY),
                per_profile=steps(FINETUNE_STEPS), shares={"smoke": "cpu"}, init=f"mae_thorax_{recipe}"))
    for seed in SEEDS:
        zoo.register(f"vit_thorax_scratch_s{seed}", zoo.Recipe(
            model="vit_thorax", data=source, data_kwargs=dict(kwargs), seed=seed, data_seed=_data_seed(seed),
            fit=dict(FINETUNE), per_profile=steps(FINETUNE_STEPS), shares={"smoke": "cpu"}))


_register()


def entry_names() -> list[str]:
    """Every zoo entry of the lesson: the pre-trainings, then the fine-tunes and the scratch control per seed."""
    names = [f"mae_thorax_{r}" for r in RECIPES]
    names += [f"vit_thorax_{r}_s{s}" for r in (*RECIPES, "scratch") for s in SEEDS]
    return names


def data(profile: Profile | str | None = None):
    """(train, val, test) standardised 32-px thorax x-rays: 4,000 / 500 / 1,000 (the smoke profile caps train)."""
    from vitlab import data as vdata

    P = get_profile(profile)
    source, kwargs = DATA
    return tuple(vdata.load(source, split, P, **kwargs) for split in ("train", "val", "test"))


def pretrained(recipe: str, profile: Profile | str | None = None, *, progress: bool = True):
    """(MaskedAutoencoder, record) pre-trained with ``recipe`` (a key of ``RECIPES``), trained once, cached."""
    check_choice(recipe, tuple(RECIPES), "recipe", "pretrained")
    return zoo.get(f"mae_thorax_{recipe}", profile, progress=progress, return_info=True)


def _check_seed(seed, fn: str) -> None:
    if seed not in SEEDS or isinstance(seed, bool):
        raise ValueError(f"{fn}: seed must be one of {SEEDS}, got {seed!r}")


def finetuned(recipe: str, seed: int, profile: Profile | str | None = None, *,
              progress: bool = True) -> tuple[nn.Module, dict]:
    """(ViT, record) fine-tuned from ``recipe``'s pre-training with ``seed``; the record holds val/test AUC."""
    check_choice(recipe, tuple(RECIPES), "recipe", "finetuned")
    _check_seed(seed, "finetuned")
    return zoo.get(f"vit_thorax_{recipe}_s{seed}", profile, progress=progress, return_info=True)


def scratch(seed: int, profile: Profile | str | None = None, *, progress: bool = True) -> tuple[nn.Module, dict]:
    """(ViT, record) trained from scratch with the fine-tunes' data, steps, lr, batch and ``seed``."""
    _check_seed(seed, "scratch")
    return zoo.get(f"vit_thorax_scratch_s{seed}", profile, progress=progress, return_info=True)
