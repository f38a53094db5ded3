"""Chapter 5's comparison: every self-supervised method of the chapter on one dataset and one budget.

The setting (``notebooks/5_selfsup/compare.ipynb`` reads it): the mnist5k digits at 16 px (``DATA``), patch 2 (an
8 × 8 grid), width 64, and one optimiser budget for every pre-training (``BUDGET``: HieraTok's lesson recipe, whose
checkpoints this comparison reuses). Each method pre-trains with its own objective, 3 seeds:

    mae         MAE, MAE's natural-image recipe (mask 75 %, crops 20-100 %): the plain baseline
    mae_medical MAE with mae_thorax's medical recipe (mask 90 %, crops 50-100 %)
    hiend       Hi-End-MAE (decoder: 1 self-attention block, then cross-attention to encoder blocks 2 and 1)
    uni4eye     Uni4Eye's dual-branch MAE on images (image + Sobel gradient map; no volumes here)
    vitvq       ViT-VQGAN's tokenizer (factorized l2-normalised codes, 512 of them)
    hieratok    HieraTok's multi-scale tokenizer (the lesson's entries, reused)

Then, per method and seed: a linear probe on the frozen encoder (``representation``: the mean of the encoder's
final tokens, before any bottleneck), a fine-tune of the encoder as a ViT on ``LABELLED`` labelled digits (the MAE
family, whose encoder is a ViT), against the same ViT from scratch; reconstruction error; codebook usage (VQ).
The MAE family regresses raw pixels here (``norm_pix_loss=False``), so their masked-patch errors compare.
"""
from __future__ import annotations

import torch

from vitlab import zoo
from vitlab.mae import MaskedAutoencoder, mae_model
from vitlab.methods.selfsup import hieratok as H
from vitlab.methods.selfsup.hiend_mae import hiend_model
from vitlab.methods.selfsup.uni4eye import Uni4EyeMAE
from vitlab.methods.selfsup.vit_vqgan import ViTVQGAN, vqgan_model
from vitlab.models import VisionTransformer
from vitlab.models.registry import MODELS, register_model

__all__ = ["DATA", "BUDGET", "STEPS", "SEEDS", "METHODS", "FINETUNE", "LABELLED", "pretrained_name",
           "finetuned_name", "representation", "image_losses", "measure", "MEASURE_KEY"]

DATA = H.DATA  # mnist5k at 16 px
BUDGET = dict(H.TRAIN)  # batch 64, lr 1e-3, weight decay 1e-4, warm-up 5 %, grad clip 1
STEPS = dict(H.STEPS)
SEEDS = H.SEEDS
ENCODER = dict(img_size=16, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4)
MAE_DECODER = dict(decoder_dim=64, decoder_depth=2, decoder_heads=4, norm_pix_loss=False)
METHODS = {  # name -> (model, its kwargs, objective, objective kwargs)
    "mae": ("ch5_mae", dict(**ENCODER, **MAE_DECODER), "mae", dict(mask_ratio=0.75, crop_scale=[0.2, 1.0])),
    "mae_medical": ("ch5_mae", dict(**ENCODER, **MAE_DECODER), "mae", dict(mask_ratio=0.9, crop_scale=[0.5, 1.0])),
    "hiend": ("ch5_hiend", dict(**ENCODER, decoder_dim=64, decoder_depth=1, decoder_heads=4, taps=2,
                                norm_pix_loss=False), "mae", dict(mask_ratio=0.75, crop_scale=[0.2, 1.0])),
    "uni4eye": ("ch5_uni4eye", dict(**ENCODER, decoder_dim=64, decoder_depth=2, decoder_heads=4), "uni4eye",
                dict(modalities=["2d"])),
    "vitvq": ("ch5_vitvq", dict(img_size=16, patch_size=2, in_chans=1, dim=64, depth=2, heads=4, num_codes=512,
                                code_dim=8, factorized=True, l2_normalized=True), "vqgan", {}),
    "hieratok": (None, None, None, None),  # hieratok_multiscale_digits_s<seed>, trained by its lesson
}
FINETUNE = dict(batch_size=64, lr=1e-3, weight_decay=0.05, warmup=0.1, shift=1)
# 1,000 steps left the scratch ViT at 65 % test accuracy on 500 labels, still rising when the cosine schedule ended
# (stop 27): the control must plateau before the fine-tunes compare against it
FINETUNE_STEPS = {"cpu": 3000, "gpu": 10000}
LAYER_DECAY = 0.75
LABELLED = 500  # labelled training digits for the fine-tunes (50 a class)
VIT = dict(**ENCODER, mlp_ratio=4.0, global_pool="avg")


def pretrained_name(method: str, seed: int) -> str:
    """The zoo entry of ``method``'s pre-training with ``seed``."""
    if method not in METHODS:
        raise ValueError(f"pretrained_name: method must be one of {list(METHODS)}, got {method!r}")
    return f"hieratok_multiscale_digits_s{seed}" if method == "hieratok" else f"ch5_{method}_s{seed}"


def finetuned_name(start: str, seed: int) -> str:
    """The zoo entry of the ViT fine-tuned from ``start`` (a MAE-family method, or "scratch") with ``seed``."""
    if start not in (*FINETUNED, "scratch"):
        raise ValueError(f"finetuned_name: start must be one of {[*FINETUNED, 'scratch']}, got {start!r}")
    return f"ch5_vit_{start}_s{seed}"


FINETUNED = ("mae", "mae_medical", "hiend", "uni4eye")  # encoders that are ViTs: fine-tuned as such


def uni4eye_images_model(num_classes: int = 0, **kwargs) -> Uni4EyeMAE:
    """Uni4Eye for images only (the volume path exists, sized as the image, and is never trained here)."""
    return Uni4EyeMAE(vol_size=kwargs["img_size"], **kwargs)


@torch.no_grad()
def representation(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """What a probe reads: the mean of the encoder's final tokens [N, D] (prefix tokens dropped), before any
    bottleneck (a VQ lookup, HieraTok's Gaussian latent)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"representation: images must be a tensor [N, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        if isinstance(model, (MaskedAutoencoder, Uni4EyeMAE)):
            t = model.forward_features(x)[:, 1:]
        elif isinstance(model, ViTVQGAN):
            t = model.encode_features(x)
        elif isinstance(model, H.HieraTok):
            t = model.encode_tokens(model.embed(x))
        else:
            raise TypeError(f"representation: no encoder known for {type(model).__name__}")
        out.append(t.mean(dim=1).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def image_losses(model, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Reconstruction MSE in pixels: {"masked": on the removed 75 % of patches (fixed masks, seed 0), MAE family} or
    {"full": of the whole image from its latent, tokenizers}."""
    was_training = model.training
    model.eval()
    total, n = 0.0, len(images)
    g = torch.Generator().manual_seed(0)
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size]
        if isinstance(model, Uni4EyeMAE):
            total += model(x, 0.75, generator=g)[1]["image"].item() * len(x)
        elif isinstance(model, MaskedAutoencoder):
            total += model(x, 0.75, generator=g)[0].item() * len(x)
        elif isinstance(model, ViTVQGAN):
            total += (model(x)[0] - x).pow(2).mean().item() * len(x)
        elif isinstance(model, H.HieraTok):
            total += (model.decode(model.encode(x)) - x).pow(2).mean().item() * len(x)
        else:
            raise TypeError(f"image_losses: no reconstruction known for {type(model).__name__}")
    model.train(was_training)
    kind = "masked" if isinstance(model, (MaskedAutoencoder, Uni4EyeMAE)) else "full"
    return {kind: total / n}


MEASURE_KEY = "ch5compare-v1"  # zoo.measured's cache key for ``measure``: change it when ``measure`` changes


def measure(model, profile=None) -> dict:
    """Everything the comparison reads off one pre-trained model, on ``profile``'s digits: ``probe`` (linear-probe
    test accuracy on ``representation``, all training digits), its reconstruction (``image_losses``) and, for a VQ
    tokenizer, ``used`` and ``perplexity`` of its codes on the test digits. Cached per checkpoint by the notebook
    through ``zoo.measured(name, MEASURE_KEY, measure)``."""
    from vitlab import data as vdata
    from vitlab.methods.selfsup.vit_vqgan import tokenizer_metrics
    from vitlab.probe import linear_probe

    source, kwargs = DATA
    train, test = (vdata.load(source, split, profile, **kwargs) for split in ("train", "test"))
    out = {"probe": linear_probe(representation(model, train.images), train.labels,
                                 representation(model, test.images), test.labels, epochs=200, lr=0.05,
                                 seed=0)["acc"],
           **image_losses(model, test.images)}
    if isinstance(model, ViTVQGAN):
        t = tokenizer_metrics(model, test)
        out.update(used=t["used"], perplexity=t["perplexity"])
    return out


def _register() -> None:
    if "ch5_mae" in MODELS:  # re-imported
        return
    builders = {"ch5_mae": mae_model, "ch5_hiend": hiend_model, "ch5_uni4eye": uni4eye_images_model,
                "ch5_vitvq": vqgan_model}
    for method, (model, kwargs, _, _) in METHODS.items():
        if model is not None and model not in MODELS:
            register_model(model, builders[model], **kwargs)
    register_model("ch5_vit", VisionTransformer, **VIT)
    source, kwargs = DATA
    for method, (model, _, objective, objective_kwargs) in METHODS.items():
        if model is None:
            continue
        for seed in SEEDS:
            zoo.register(pretrained_name(method, seed), zoo.Recipe(
                model=model, data=source, data_kwargs=dict(kwargs), fit=dict(BUDGET), seed=seed, data_seed=0,
                objective=objective, objective_kwargs=dict(objective_kwargs),
                per_profile={p: dict(steps=s) for p, s in STEPS.items()}, shares={"smoke": "cpu"}))
    steps = {p: dict(steps=s, max_train=LABELLED) for p, s in FINETUNE_STEPS.items()}
    for seed in SEEDS:
        for start in (*FINETUNED, "scratch"):
            zoo.register(finetuned_name(start, seed), zoo.Recipe(
                model="ch5_vit", data=source, data_kwargs=dict(kwargs), seed=seed, data_seed=0,
                fit=dict(FINETUNE, **({} if start == "scratch" else {"layer_decay": LAYER_DECAY})),
                per_profile=steps, shares={"smoke": "cpu"},
                init=None if start == "scratch" else pretrained_name(start, seed)))


_register()
