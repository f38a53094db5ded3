"""Are Vision Transformers Robust to Patch Perturbations? (Gu, Tresp, Qin, ECCV 2022, arXiv:2111.10659), written
from the paper (no official code was released).

A ViT reads an image as a set of patches, so perturb whole patches and compare with a CNN of the same size and
accuracy (both trained by chapter 1's recipe on the same digits):

    natural      k grid patches corrupted (noise, blur, contrast)    →  accuracy drop (paper: the CNN drops more)
    adversarial  PGD inside one grid patch, ε = 1 (paint it freely)  →  fooling rate (paper: the ViT is fooled more)
    attention    the CLS token's attention on the perturbed patch    →  (paper: it rises under attack, not naturally)
    temperature  softmax(q kᵀ / (√d · T)) in every block, T > 1      →  flatter attention, a lower fooling rate

    x_nat = corrupt_patches(images, "gaussian_noise", 5, patch_mask(images, 4, patches=8))
    adv = vitlab.attacks.pgd(model, images, labels, eps=1.0, steps=20, mask=patch_mask(images, 4))
    mass = cls_attention_on(vit, adv, mask)          # [depth]: share of CLS attention on the masked tokens
    vit_t = temperature_vit(temperature=2.0, ...)    # = the ViT with every block's attention scale divided by T

Our reading of the paper (its text is what we checked; these are our choices where it is silent or too big for
a CPU):
- The grid is the ViT's patch grid (4 px, 7 × 7 on 28-px digits) for both models, so a perturbed patch is one ViT
  token; which patches is random per image with a fixed seed, the same for the ViT and the CNN.
- Natural corruption: ``vitlab.data.corrupt``'s kinds at severity 5 pasted into k patches (the paper uses
  ImageNet-C's on one patch of a 224-px image; one 4-px patch of a digit is too little to move either model,
  so we sweep k).
- Attack: untargeted L∞ PGD, 20 steps, ε = 1 inside one patch (the attacker sets its pixels freely within
  [0, 1]), a random start; the fooling rate counts the images each model classified correctly.
- Temperature: every block's softmax, applied to the trained ViT and fine-tuned briefly (``TEMPERATURE_STEPS``);
  a T = 1 fine-tune with the same steps, lr and seeds is its control.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from vitlab import zoo
from vitlab.attacks import fooling_rate, patch_mask, pgd
from vitlab.checks import check_choice, check_int, check_model, check_number
from vitlab.data import corrupt
from vitlab.measure import accuracy
from vitlab.methods.architectures import recipes as R
from vitlab.models import SmallCNN, VisionTransformer
from vitlab.models.registry import MODELS, register_model

__all__ = ["temperature_vit", "set_temperature", "corrupt_patches", "cls_attention_on", "measure", "measure_natural",
           "measure_attack", "measure_posthoc", "MEASURE_KEY", "ATTACK_KEY", "POSTHOC_KEY",
           "NATURAL", "PATCHES", "ATTACK", "TEMPERATURES", "TEMPERATURE_STEPS", "FINETUNE", "SEEDS", "cnn_name",
           "vit_name", "temperature_name", "cnn_model", "patch_mask", "pgd", "fooling_rate"]

PATCH = R.BASELINE["patch_size"]  # the ViT's patch: the grid every perturbation is aligned with
NATURAL = ("gaussian_noise", "blur", "contrast")  # vitlab.data.corrupt kinds, at severity 5
PATCHES = (1, 4, 8, 16)  # corrupted grid patches per image (of 49)
ATTACK = dict(eps=1.0, steps=20)  # PGD inside one patch
TEMPERATURES = (1.0, 1.5, 2.0, 3.0)  # 1.0: the control fine-tune
FINETUNE = dict(R.TRAIN, lr=5e-4)  # chapter 1's recipe at a quarter of its lr, from the trained ViT
TEMPERATURE_STEPS = {"cpu": 1000}
SEEDS = R.SEEDS
# zoo.measured's keys for ``measure`` (the ViT, the CNN), ``measure_attack`` (the temperature fine-tunes) and
# ``measure_posthoc`` (the ViT): change one when its function changes (the cache cannot see code)
MEASURE_KEY, ATTACK_KEY, POSTHOC_KEY = "patchrob-v1", "patchrob-attack-v1", "patchrob-posthoc-v1"


def set_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Every attention block of ``model`` (a course ViT) computes softmax(q kᵀ / (√d · T)): its scale becomes
    d^-½ / T. T > 1 flattens the attention, T = 1 is the model unchanged. In place; returns ``model``."""
    check_model(model, "set_temperature")
    check_number(temperature, "temperature", "set_temperature", low=0, low_open=True)
    blocks = [m for m in model.modules() if hasattr(m, "head_dim") and hasattr(m, "scale") and hasattr(m, "qkv")]
    if not blocks:
        raise ValueError("set_temperature: model has no attention blocks (a course ViT's Attention)")
    for attn in blocks:
        attn.scale = attn.head_dim ** -0.5 / temperature
    return model


def temperature_vit(temperature: float = 1.0, **vit_kwargs) -> VisionTransformer:
    """A ``VisionTransformer(**vit_kwargs)`` whose attention runs at ``temperature`` (``set_temperature``); its
    weights are a plain ViT's, so a trained ViT's state dict loads into it."""
    return set_temperature(VisionTransformer(**vit_kwargs), temperature)


def cnn_model(img_size: int = 28, in_chans: int = 1, num_classes: int = 10, **kwargs) -> SmallCNN:
    """The course's SmallCNN (≈0.17 M parameters on digits, the ViT's ≈0.14 M) with the registry's arguments."""
    return SmallCNN(in_chans, num_classes, **kwargs)


def corrupt_patches(images: Tensor, kind: str, severity: int, mask: Tensor, *, seed: int = 0) -> Tensor:
    """``images`` with ``vitlab.data.corrupt(images, kind, severity)`` inside ``mask`` [N or 1, 1, H, W] (bool) and
    the clean pixels elsewhere: a natural corruption of chosen patches."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 4 or \
            not isinstance(images, Tensor) or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"corrupt_patches: mask must be a bool tensor [N, 1, H, W] matching the images, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else ''}")
    return torch.where(mask, corrupt(images, kind, severity, seed=seed, patch_size=PATCH), images)


@torch.no_grad()
def cls_attention_on(model: VisionTransformer, images: Tensor, mask: Tensor, batch_size: int = 500) -> Tensor:
    """[depth]: per block, the share of the CLS token's attention (mean over heads and images) that lands on the
    patch tokens inside ``mask`` [N, 1, H, W] (bool, grid-aligned). Uniform attention over 49 patches would
    give 1/49 per patch."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"cls_attention_on: model must be a course VisionTransformer, got {type(model).__name__}")
    p = model.patch_embed.patch_size
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (len(images), 1,
                                                                                   *images.shape[-2:]):
        raise ValueError(f"cls_attention_on: mask must be a bool tensor [N, 1, H, W] = "
                         f"{(len(images), 1, *images.shape[-2:])}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    tokens = mask[:, 0, ::p, ::p].flatten(1).float()  # [N, L]: a grid-aligned cell is one token
    was_training = model.training
    model.eval()
    total = None
    for i in range(0, len(images), batch_size):
        _, sides = model(images[i:i + batch_size], side=("cls",))
        on = torch.stack([(s["cls"][:, :, model.num_prefix_tokens:].float().mean(1) * tokens[i:i + batch_size])
                          .sum(1).sum(0) for s in sides])  # [depth]
        total = on if total is None else total + on
    model.train(was_training)
    return total / len(images)


def measure_natural(model: nn.Module, profile=None) -> dict:
    """``clean`` test accuracy on chapter 1's digits and ``drop_<kind>_<k>``: clean minus corrupted accuracy with
    k random grid patches per image corrupted by ``kind`` at severity 5 (the same patches for every model)."""
    check_model(model, "measure_natural")
    _, _, test = R.data("digits", profile)
    x, y = test.images, test.labels
    model.eval()
    out = {"clean": accuracy(model, (x, y), batch_size=500)}
    for kind in NATURAL:
        for k in PATCHES:
            xc = corrupt_patches(x, kind, 5, patch_mask(x, PATCH, seed=1, patches=k))
            out[f"drop_{kind}_{k}"] = out["clean"] - accuracy(model, (xc, y), batch_size=500)
    return out


def measure_attack(model: nn.Module, profile=None, n_attack: int = 500) -> dict:
    """On the first ``n_attack`` test digits, one random grid patch each: ``fooled``, the fooling rate of PGD inside
    that patch (``ATTACK``), ``clean_attacked`` the clean accuracy there and, for a ViT, ``attn_clean`` /
    ``attn_natural`` / ``attn_adversarial``: the CLS attention share on that patch (mean over blocks) on the clean
    image, with the patch corrupted by noise (severity 5) and attacked."""
    check_model(model, "measure_attack")
    check_int(n_attack, "n_attack", "measure_attack", low=1)
    _, _, test = R.data("digits", profile)
    x, y = test.images[:n_attack], test.labels[:n_attack]
    model.eval()
    one = patch_mask(x, PATCH, seed=2)
    adv = pgd(model, x, y, **ATTACK, mask=one, seed=0)
    out = {"clean_attacked": accuracy(model, (x, y), batch_size=500), "fooled": fooling_rate(model, x, adv, y)}
    if isinstance(model, VisionTransformer):
        out["attn_clean"] = cls_attention_on(model, x, one).mean().item()
        out["attn_natural"] = cls_attention_on(model, corrupt_patches(x, "gaussian_noise", 5, one), one).mean().item()
        out["attn_adversarial"] = cls_attention_on(model, adv, one).mean().item()
    return out


def measure(model: nn.Module, profile=None, n_attack: int = 500) -> dict:
    """``measure_natural`` and ``measure_attack`` in one dict: what the lesson reads off the ViT and the CNN. Cached
    per checkpoint by the notebook through ``zoo.measured(name, MEASURE_KEY, measure)``."""
    return {**measure_natural(model, profile), **measure_attack(model, profile, n_attack)}


def measure_posthoc(model: VisionTransformer, profile=None, n_attack: int = 500) -> dict:
    """The temperature without training: for each T > 1 of ``TEMPERATURES``, a copy of the trained ViT at T,
    ``clean_t<T>`` (test accuracy) and ``fooled_t<T>`` (``measure_attack``'s fooling rate)."""
    import copy

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"measure_posthoc: model must be a course VisionTransformer, got {type(model).__name__}")
    _, _, test = R.data("digits", profile)
    out = {}
    for t in TEMPERATURES[1:]:
        hot = set_temperature(copy.deepcopy(model), t).eval()
        out[f"clean_t{t}"] = accuracy(hot, (test.images, test.labels), batch_size=500)
        out[f"fooled_t{t}"] = measure_attack(hot, profile, n_attack)["fooled"]
    return out


def cnn_name(seed: int) -> str:
    return f"ch6_cnn_digits_s{seed}"


def vit_name(seed: int) -> str:
    """The ViT: chapter 1's plain ViT on the same digits (trained and committed by chapter 1)."""
    return R.entry_name("vit", seed, "cpu")


def temperature_name(temperature: float, seed: int) -> str:
    check_choice(temperature, TEMPERATURES, "temperature", "temperature_name")
    return f"ch6_vit_t{str(temperature).replace('.', 'p')}_digits_s{seed}"


def _register() -> None:
    if "ch6_cnn" in MODELS:  # re-imported
        return
    register_model("ch6_cnn", cnn_model)
    vit_config = dict(MODELS[R.model_name("vit")])
    source, kwargs, n_train = R.DATASETS["digits"]
    for t in TEMPERATURES:
        register_model(f"ch6_vit_t{str(t).replace('.', 'p')}", temperature_vit, temperature=t, **vit_config)
    for seed in SEEDS:
        zoo.register(cnn_name(seed), zoo.Recipe(
            model="ch6_cnn", data=source, data_kwargs=dict(kwargs), fit=dict(R.TRAIN), seed=seed,
            data_seed=R.DATA_SEED, per_profile={"cpu": dict(steps=R.STEPS["cpu"], max_train=n_train)},
            shares={"smoke": "cpu"}))
        for t in TEMPERATURES:
            zoo.register(temperature_name(t, seed), zoo.Recipe(
                model=f"ch6_vit_t{str(t).replace('.', 'p')}", data=source, data_kwargs=dict(kwargs),
                fit=dict(FINETUNE), seed=seed, data_seed=R.DATA_SEED, init=vit_name(seed),
                per_profile={"cpu": dict(steps=TEMPERATURE_STEPS["cpu"], max_train=n_train)},
                shares={"smoke": "cpu"}))


_register()
