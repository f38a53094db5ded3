"""The ViT that chapter 6's dense-feature lessons (DVT, PH-Reg, ToCo) examine: chapter 1's plain ViT, by chapter 1's
recipe, trained to classify ``cluttered_scenes`` (one MNIST digit among distractors on a texture, 32 px RGB, pixel
masks of the digit kept for evaluation). 4-px patches give an 8 × 8 grid of patch tokens, enough for dense maps.

    vit, info = trained(seed)      # zoo entry ch6_vit_scenes_s<seed>, 8,000 steps, cached and committed
"""
from __future__ import annotations

from vitlab import zoo
from vitlab.checks import check_int
from vitlab.methods.architectures import recipes as R
from vitlab.models import VisionTransformer
from vitlab.models.registry import MODELS, register_model

SEEDS = (0, 1, 2)
# scenes are harder than plain digits: at chapter 1's 3,000 steps the test accuracy was still rising (64 %, +3.2
# points over the last quarter), so this ViT trains longer
STEPS = {"cpu": 8000, "gpu": 30000}
DATA = ("cluttered_scenes", dict(img_size=32, in_chans=3))
CONFIG = dict(img_size=32, in_chans=3, num_classes=10, **R.BASELINE)


def vit_name(seed: int) -> str:
    return f"ch6_vit_scenes_s{check_int(seed, 'seed', 'vit_name', low=0)}"


def trained(seed: int, profile=None, progress: bool = False):
    """(ViT in eval mode, its zoo record) for ``seed``."""
    vit, info = zoo.get(vit_name(seed), profile, progress=progress, return_info=True)
    return vit.eval(), info


def _register() -> None:
    if "ch6_vit_scenes" in MODELS:  # re-imported
        return
    register_model("ch6_vit_scenes", VisionTransformer, **CONFIG)
    source, kwargs = DATA
    for seed in SEEDS:
        zoo.register(vit_name(seed), zoo.Recipe(
            model="ch6_vit_scenes", data=source, data_kwargs=dict(kwargs), fit=dict(R.TRAIN), seed=seed,
            data_seed=R.DATA_SEED, per_profile={p: dict(steps=n) for p, n in STEPS.items()},
            shares={"smoke": "cpu"}))


_register()
