"""Downstream Transfer Attack (DTA: "Adversarial Attacks on Downstream Models with Pre-trained Vision Transformers",
Zheng, Ma et al., 2024, arXiv:2408.01705), written from the paper's abstract: no code was released.

The threat: a company fine-tunes a public pre-trained ViT on its own data and keeps the result private. The attacker
holds only the public model f. DTA crafts each adversarial image on f alone, by L∞ PGD that pushes the tokens of one
intermediate layer l away from the clean image's,

    x_adv = argmax_{‖x' − x‖∞ ≤ ε}  − cos( f_l(x'), f_l(x) )          (mean cosine over the tokens)

with l* chosen by a layer search on a few held-out images, and sends x_adv to the fine-tuned models.

    adv = feature_attack(vit, images, layer=1, eps=0.1, steps=10)      # on the pre-trained model only
    best, drop = layer_search(vit, held_out, eps=0.1, steps=10)        # the layer whose attack moves f most
    asr = attack_success_rate(finetuned, images, adv, labels)          # vitlab.attacks.fooling_rate

Our reading (no code; these are our choices):
- The layer's features are the tokens after block l (CLS included); the loss is the mean over tokens of the
  per-token cosine similarity, summed over the batch (the attack descends it).
- The layer search attacks each layer l of f on held-out images and scores it by the cosine similarity its attack
  leaves at that layer (the loss it minimises): the most vulnerable layer is the one where it ends lowest. It uses f
  alone, as the attacker must.
- The downstream task: scikit-learn's 8-px digits enlarged to 28 px (another domain of the same ten digits);
  three fine-tuning schemes from chapter 1's digit ViT: the whole network, the last two blocks, the head alone
  (a linear probe), each with its own zoo entry per seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab import zoo
from vitlab.attacks import fooling_rate, pgd
from vitlab.checks import check_int, check_number
from vitlab.methods.architectures import recipes as R
from vitlab.models import VisionTransformer

__all__ = ["block_tokens", "feature_attack", "layer_search", "attack_success_rate",
           "noise_attack", "layer_similarity", "SCHEMES", "DOWNSTREAM", "FINETUNE", "FINETUNE_STEPS", "EPS", "STEPS", "SEEDS",
           "finetuned_name", "pretrained_name", "measure", "MEASURE_KEY", "downstream"]

EPS, STEPS = 0.1, 10  # L∞ budget on [0, 1] pixels and PGD steps (a standard MNIST-scale attack)
DOWNSTREAM = ("digits8", {"img_size": 28})  # the fine-tuned models' task: 8-px digits enlarged to 28 px
SCHEMES = {  # fine-tuning scheme -> the parameters it trains (None: all)
    "full": None,
    "last2": ("blocks.2.", "blocks.3.", "norm.", "head."),
    "linear": ("head.",),
}
FINETUNE = dict(R.TRAIN, lr=5e-4)  # chapter 1's recipe at a quarter of its lr, from the trained ViT
FINETUNE_STEPS = {"cpu": 1000}
SEEDS = R.SEEDS
MEASURE_KEY = "dta-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes


def _check_vit(model, fn: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{fn}: model must be a course VisionTransformer, got {type(model).__name__}")
    return model


def _check_layer(model: VisionTransformer, layer, fn: str) -> int:
    return check_int(layer, "layer", fn, low=0, high=len(model.blocks) - 1)


def block_tokens(model: VisionTransformer, images: Tensor, layer: int) -> Tensor:
    """[B, N, D]: the tokens after block ``layer`` (0-based; CLS first), the input of block ``layer + 1``."""
    _check_vit(model, "block_tokens")
    _check_layer(model, layer, "block_tokens")
    x = model.embed(images)
    for blk in model.blocks[:layer + 1]:
        x = blk(x)
    return x


def feature_attack(model: VisionTransformer, images: Tensor, layer: int, *, eps: float = EPS, steps: int = STEPS,
                   seed: int = 0) -> Tensor:
    """DTA's attack at ``layer``: L∞ PGD (``vitlab.attacks.pgd``, random start) that minimises the mean per-token
    cosine similarity between the adversarial and the clean image's tokens after block ``layer``. Needs no labels."""
    _check_vit(model, "feature_attack")
    _check_layer(model, layer, "feature_attack")

    def loss_fn(adv, clean, _):
        with torch.no_grad():
            target = block_tokens(model, clean, layer)
        return -F.cosine_similarity(block_tokens(model, adv, layer), target, dim=-1).mean(dim=1).sum()

    dummy = torch.zeros(len(images), dtype=torch.long, device=images.device)
    return pgd(model, images, dummy, eps=eps, steps=steps, seed=seed, loss_fn=loss_fn)


def noise_attack(images: Tensor, *, eps: float = EPS, seed: int = 0) -> Tensor:
    """The floor: every pixel moved by ±ε at random (seeded), clamped to [0, 1]."""
    check_number(eps, "eps", "noise_attack", low=0, low_open=True, high=1)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, images.shape, generator=g).to(images) * 2 - 1
    return (images + eps * signs).clamp(0, 1)


@torch.no_grad()
def layer_similarity(model: VisionTransformer, images: Tensor, adversarial: Tensor, layer: int) -> float:
    """The mean per-token cosine similarity of clean and adversarial tokens after block ``layer``: what DTA's attack
    at that layer drives down."""
    _check_vit(model, "layer_similarity")
    _check_layer(model, layer, "layer_similarity")
    model.eval()
    return F.cosine_similarity(block_tokens(model, adversarial, layer), block_tokens(model, images, layer),
                               dim=-1).mean().item()


def layer_search(model: VisionTransformer, images: Tensor, *, eps: float = EPS, steps: int = STEPS,
                 seed: int = 0) -> tuple[int, list[float]]:
    """(l*, similarity per layer): attack every layer of the pre-trained ``model`` on ``images`` (held out) and
    measure how far the attack could push that layer's tokens (their cosine similarity to the clean ones); l* is
    the most vulnerable layer, where the similarity ends lowest."""
    _check_vit(model, "layer_search")
    sims = [layer_similarity(model, images, feature_attack(model, images, l, eps=eps, steps=steps, seed=seed), l)
            for l in range(len(model.blocks))]
    return min(range(len(sims)), key=sims.__getitem__), sims


def attack_success_rate(model, images: Tensor, adversarial: Tensor, labels: Tensor) -> float:
    """Of the images ``model`` (a fine-tuned classifier) gets right, the fraction it gets wrong once attacked."""
    return fooling_rate(model, images, adversarial, labels)


def pretrained_name(seed: int) -> str:
    """The pre-trained model the attacker holds: chapter 1's digit ViT."""
    return R.entry_name("vit", seed, "cpu")


def finetuned_name(scheme: str, seed: int) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"finetuned_name: scheme must be one of {tuple(SCHEMES)}, got {scheme!r}")
    return f"ch6_dta_{scheme}_s{seed}"


def downstream(split: str, profile=None):
    """The downstream dataset split (the enlarged 8-px digits)."""
    from vitlab import data as vdata

    source, kwargs = DOWNSTREAM
    return vdata.load(source, split, profile, **kwargs)


def measure(model: VisionTransformer, profile=None, *, seed: int = 0, n_search: int = 100) -> dict:
    """What the lesson reads off one fine-tuned model (seed ``seed``): the attacker's layer search on the first
    ``n_search`` downstream val images (``sim_l<l>``, ``best_layer``), then, on the downstream test images,
    ``clean`` accuracy and the attack success rate of noise (``asr_noise``), of the feature attack at every layer
    (``asr_l<l>``; the last layer is the usual feature attack, ``best_layer``'s is DTA) and of white-box PGD on
    the fine-tuned model itself (``asr_whitebox``, the ceiling), all at ``EPS`` and ``STEPS``."""
    from vitlab.train import evaluate

    _check_vit(model, "measure")
    f = zoo.get(pretrained_name(seed), profile, progress=False)
    val, test = downstream("val", profile), downstream("test", profile)
    best, sims = layer_search(f, val.images[:n_search])
    out = {"best_layer": float(best), **{f"sim_l{l}": s for l, s in enumerate(sims)},
           "clean": evaluate(model, test)["acc"]}
    x, y = test.images, test.labels
    out["asr_noise"] = attack_success_rate(model, x, noise_attack(x), y)
    for l in range(len(f.blocks)):
        out[f"asr_l{l}"] = attack_success_rate(model, x, feature_attack(f, x, l), y)
    out["asr_whitebox"] = attack_success_rate(model, x, pgd(model, x, y, eps=EPS, steps=STEPS), y)
    return out


def _register() -> None:
    if finetuned_name("full", SEEDS[0]) in zoo.ZOO:  # re-imported
        return
    source, kwargs = DOWNSTREAM
    for seed in SEEDS:
        for scheme, trainable in SCHEMES.items():
            fit = dict(FINETUNE, **({} if trainable is None else {"trainable": list(trainable)}))
            zoo.register(finetuned_name(scheme, seed), zoo.Recipe(
                model=R.model_name("vit"), data=source, data_kwargs=dict(kwargs), fit=fit, seed=seed,
                init=pretrained_name(seed), per_profile={"cpu": dict(steps=FINETUNE_STEPS["cpu"])},
                shares={"smoke": "cpu"}))


_register()
