"""MixPro: MaskMix and Progressive Attention Labeling (Zhao et al., ICLR 2023, arXiv:2304.12043).

Written from the paper and the official code (github.com/fistyee/MixPro: ``utils.MaskMix``,
``main.train_one_epoch``, ``models/vit.py``). Two halves, one in image space and one in label space:

    MaskMix   one ratio r ~ Beta(α, α) per batch; the image is cut into a grid of square cells whose side is a
              multiple of the ViT patch, so every patch comes from exactly one image. Per sample,
              k = ⌈r·K⌉ of the K cells come from x, the rest from a partner x[perm]:
                  M ∈ {0,1}^K (1 = from x),   x̃ = M ⊙ x + (1 − M) ⊙ x[perm],   λ_area = k / K
    PAL       a = the last block's CLS→patch attention, averaged over heads (detached probabilities);
              M_p = M at patch resolution:
                  λ_attn = Σ_p M_p·a_p / Σ_p a_p                            (how much the model looked at x)
                  s = cos(t_area, softmax(z))  ∈ [0, 1]                     (progressive factor)
                  λ = s·λ_attn + (1 − s)·λ_area
                  loss = λ·CE(z, y) + (1 − λ)·CE(z, y[perm])          (hard cross-entropy, as the official code)
              with t_area = λ_area·t(y) + (1 − λ_area)·t(y[perm]) the MaskMix target, t(·) the label-smoothed
              one-hot: the smoothing enters through s only. Early in training the prediction z is near uniform, s is small and the label is the area;
              as the model starts to predict the two mixed classes, s → 1 and the label follows the attention.
    TransMix  (comparison, Chen et al., CVPR 2022) the label is the attention alone: λ = λ_attn.

    step = mixpro_step(num_classes=10, cell_size=8)          # cells of 8 px on a patch-4 ViT
    history = vitlab.train.fit(model, train, val, step_fn=step, label_smoothing=0.1)
    step.history()["s"]                                       # mean s per MaskMix step: rises during training

``baseline_step``, ``timm_mix_step`` (timm's ``Mixup``/CutMix), ``maskmix_step`` (area labels) and
``transmix_step`` (attention labels) build the comparison arms for the same ``fit`` call.

Our reading, where the paper leaves details open (the official code decides):
- The progressive factor is computed from the *non-detached* output, as the official code does, so the loss
  also pushes gradient through s (``detach_s=True`` turns that off). The attention is detached.
- ``a`` is the CLS row over the patch tokens only (CLS→CLS dropped), not renormalised: λ_attn divides by Σa.
- Smoothing, as the official ``main.train_one_epoch``: ``smoothing`` (0.1) smooths the MaskMix target t_area,
  which feeds s and is the loss target of the area-label arm (the official MaskMix-only path trains on it with
  soft-target cross-entropy); the PAL loss itself is a *hard* cross-entropy,
  λ·CE(z, y) + (1 − λ)·CE(z, y[perm]) (``pal_loss``). ``loss_smoothing`` (default 0.0, the official loss) smooths
  that loss too for the "attention" and "pal" labels; ``loss_smoothing=smoothing`` smooths both, as an earlier
  version of this module did.
- With probability 1 − ``maskmix_prob`` the official code uses timm's Mixup/CutMix instead (0.5 in its configs);
  our default is 1 (always MaskMix), so the lesson isolates MixPro; pass ``mixup=`` and ``maskmix_prob=0.5``
  for the paper's recipe.
- "TransMix-style" here keeps MaskMix images and swaps only the label (TransMix itself uses CutMix boxes).
- Random draws come from torch (global RNG or ``generator``); r is drawn by NumPy's Beta seeded from that
  stream, so a torch seed fixes everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_int, check_number
from vitlab.augment import cell_mask, cells_to_pixels, mix_targets, soft_cross_entropy
from vitlab.train import unwrap

__all__ = ["MaskMixBatch", "maskmix", "cls_patch_attention", "attention_lambda", "progressive_factor",
           "pal_lambda", "pal_loss", "MixStep", "baseline_step", "timm_mix_step", "maskmix_step", "transmix_step",
           "mixpro_step", "LABELS", "DEFAULTS"]

LABELS = ("area", "attention", "pal")  # MaskMix, TransMix-style, MixPro
HISTORY_KEYS = ("s", "lam_area", "lam_attn", "lam", "attn_gap")

# The lesson's cpu recipe (notebooks/4_training/mixpro.ipynb), for the chapter's compare to share: a nano ViT with
# 7-px patches (16 tokens) on mnist5k, MaskMix cells of one patch (a 4x4 grid), no other augmentation, AdamW; the
# baseline trained with the same arguments and label smoothing 0.1 is the control.
DEFAULTS = dict(patch=7, cell=7, epochs=9, batch_size=48, lr=2e-3, smoothing=0.1)


# ------------------------------------------------------------------------------------------------ checks



def _check_labels(y: Tensor, batch: int, name: str, fn: str) -> Tensor:
    if not torch.is_tensor(y) or y.ndim != 1 or y.dtype != torch.long or len(y) != batch:
        raise TypeError(f"{fn}: {name} must be a 1-D long tensor of {batch} labels, got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    return y


# ------------------------------------------------------------------------------------------------ MaskMix
@dataclass
class MaskMixBatch:
    """One MaskMix batch. ``keep``/``patch_keep`` are 1 where the pixels come from x, 0 where from x[perm]."""
    images: Tensor      # [B, C, H, W] the mixed images
    y_a: Tensor         # [B] labels of x
    y_b: Tensor         # [B] labels of the partners, y[perm]
    perm: Tensor        # [B] partner index
    keep: Tensor        # [B, gh, gw] bool, cell grid
    patch_keep: Tensor  # [B, N] float 0/1 per ViT patch, row-major like the tokens
    lam_area: Tensor    # [B] kept fraction k / K
    ratio: float        # the batch's r


def maskmix(x: Tensor, y: Tensor, *, patch_size: int, cell_size: int, alpha: float = 1.0, ratio: float | None = None,
            perm: Tensor | None = None, generator: torch.Generator | None = None) -> MaskMixBatch:
    """MaskMix ``x`` [B,C,H,W] with a permutation of itself on a grid of ``cell_size`` cells (see module doc).

    ``ratio`` fixes r (else r ~ Beta(alpha, alpha)); ``perm`` fixes the partners (else a random permutation).
    """
    fn = "maskmix"
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a float image batch [B, C, H, W], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    B, _, H, W = x.shape
    if B < 2:
        raise ValueError(f"{fn}: x must hold at least 2 images to mix, got a batch of {B}")
    _check_labels(y, B, "y", fn)
    check_int(patch_size, "patch_size", fn)
    check_int(cell_size, "cell_size", fn)
    if cell_size % patch_size:
        raise ValueError(f"{fn}: cell_size={cell_size} must be a multiple of patch_size={patch_size}, so that "
                         f"every ViT patch comes from one image")
    if H % cell_size or W % cell_size:
        raise ValueError(f"{fn}: cell_size={cell_size} must divide the image size {H}x{W}")
    alpha = check_number(alpha, "alpha", fn, low=0, low_open=True)
    if ratio is not None:
        ratio = check_number(ratio, "ratio", fn, low=0, high=1)
    if perm is None:
        perm = torch.randperm(B, generator=generator)
    elif not torch.is_tensor(perm) or perm.dtype != torch.long or perm.shape != (B,) \
            or not torch.equal(perm.sort().values.cpu(), torch.arange(B)):
        raise ValueError(f"{fn}: perm must be a permutation of range({B}) (long tensor), got {perm!r}")
    if ratio is None:  # NumPy's Beta, seeded from the torch stream, so one torch seed fixes the whole batch
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        ratio = float(np.random.default_rng(seed).beta(alpha, alpha))

    gh, gw = H // cell_size, W // cell_size
    total = gh * gw
    n_keep = math.ceil(total * ratio - 1e-9)  # the official ⌈r·K⌉; the epsilon absorbs r·K = 7.000000001
    keep = cell_mask(B, (gh, gw), n_keep, generator=generator).to(x.device)
    perm = perm.to(x.device)
    from_x = cells_to_pixels(keep, cell_size)  # [B, 1, H, W]
    images = torch.where(from_x, x, x[perm])
    patch_keep = cells_to_pixels(keep, cell_size // patch_size).flatten(1).float()  # [B, N]
    lam_area = torch.full((B,), n_keep / total, device=x.device)
    return MaskMixBatch(images, y, y[perm], perm, keep, patch_keep, lam_area, ratio)


# ------------------------------------------------------------------------------------------------ PAL
def cls_patch_attention(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, a): a [B, N] = the last block's CLS→patch attention averaged over heads, detached.

    Calls ``model(x, side=("cls",))`` (the CLS row without an N×N matrix) through ``model`` itself, so that a DDP
    wrapper syncs the gradients of this forward; the CLS and register columns are dropped, the rest is not
    renormalised (λ_attn divides by Σa).
    """
    core = unwrap(model)
    if not hasattr(core, "forward_with_attention"):
        raise TypeError(f"cls_patch_attention: model must be a vitlab VisionTransformer (forward_with_attention), "
                        f"got {type(core).__name__}")
    logits, sides = model(x, side=("cls",))
    cls = sides[-1]["cls"]  # [B, heads, prefix + N]
    return logits, cls.detach().float().mean(dim=1)[:, core.num_prefix_tokens:]


def attention_lambda(attn: Tensor, patch_keep: Tensor) -> Tensor:
    """λ_attn [B] = Σ_p M_p·a_p / Σ_p a_p: the share of the (non-negative) attention ``attn`` [B, N] that falls on
    patches from x (``patch_keep`` [B, N], 1 = from x)."""
    if not (torch.is_tensor(attn) and torch.is_tensor(patch_keep)) or attn.ndim != 2 or attn.shape != patch_keep.shape:
        raise ValueError(f"attention_lambda: attn and patch_keep must be tensors [B, N] of one shape, got "
                         f"{tuple(getattr(attn, 'shape', ()))} and {tuple(getattr(patch_keep, 'shape', ()))}")
    if (attn < 0).any():
        raise ValueError("attention_lambda: attn must be non-negative (attention probabilities)")
    attn = attn.float()
    total = attn.sum(dim=1)
    if (total <= 0).any():
        raise ValueError("attention_lambda: every row of attn must have a positive sum")
    return (attn * patch_keep.to(attn)).sum(dim=1) / total


def progressive_factor(targets: Tensor, logits: Tensor) -> Tensor:
    """s [B] = cos(targets, softmax(logits)), clamped to [0, 1] (rounding can step past 1). Gradients flow
    into ``logits``, as in the official code."""
    if not (torch.is_tensor(targets) and torch.is_tensor(logits)) or targets.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"progressive_factor: targets and logits must be tensors [B, C] of one shape, got "
                         f"{tuple(getattr(targets, 'shape', ()))} and {tuple(getattr(logits, 'shape', ()))}")
    return F.cosine_similarity(targets.float(), logits.float().softmax(dim=-1), dim=1).clamp(0.0, 1.0)


def pal_lambda(lam_area: Tensor, lam_attn: Tensor, s: Tensor) -> Tensor:
    """λ = s·λ_attn + (1 − s)·λ_area, per sample."""
    for name, t in (("lam_area", lam_area), ("lam_attn", lam_attn), ("s", s)):
        if not torch.is_tensor(t) or t.ndim != 1:
            raise ValueError(f"pal_lambda: {name} must be a 1-D tensor [B], got {tuple(getattr(t, 'shape', ()))}")
    if not lam_area.shape == lam_attn.shape == s.shape:
        raise ValueError(f"pal_lambda: lam_area, lam_attn and s must have one shape, got {tuple(lam_area.shape)}, "
                         f"{tuple(lam_attn.shape)} and {tuple(s.shape)}")
    return s * lam_attn + (1.0 - s) * lam_area


def pal_loss(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor, smoothing: float = 0.0) -> Tensor:
    """The official PAL loss: mean over the batch of λ·CE(z, y_a) + (1 − λ)·CE(z, y_b), per-sample ``lam`` [B].

    Hard cross-entropy by default (``smoothing=0``), as the official code; gradients flow through ``lam`` (it
    carries s, which is not detached). Equal to the soft cross-entropy against λ·t(y_a) + (1 − λ)·t(y_b).
    """
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise ValueError(f"pal_loss: logits must be a tensor [B, C], got {tuple(getattr(logits, 'shape', ()))}")
    B = logits.shape[0]
    _check_labels(y_a, B, "y_a", "pal_loss")
    _check_labels(y_b, B, "y_b", "pal_loss")
    if not torch.is_tensor(lam) or lam.shape != (B,):
        raise ValueError(f"pal_loss: lam must be a tensor [B={B}], got {tuple(getattr(lam, 'shape', ()))}")
    smoothing = check_number(smoothing, "smoothing", "pal_loss", low=0, high=1, high_open=True)
    z = logits.float()
    ce_a = F.cross_entropy(z, y_a, reduction="none", label_smoothing=smoothing)
    ce_b = F.cross_entropy(z, y_b, reduction="none", label_smoothing=smoothing)
    return (lam * ce_a + (1.0 - lam) * ce_b).mean()


# ------------------------------------------------------------------------------------------------ step_fns
class MixStep:
    """A ``vitlab.train.fit`` step_fn: MaskMix the batch, label it by ``label`` ("area": MaskMix, "attention":
    TransMix-style, "pal": MixPro), soft cross-entropy. Every MaskMix step computes all three λ and s (the
    attention comes with the forward pass), so any arm can be compared; ``history()`` returns their batch means
    per step.

    ``smoothing`` smooths the MaskMix target t_area (the input of s, and the "area" arm's loss target);
    ``loss_smoothing`` smooths the "attention"/"pal" loss, which is the official hard cross-entropy at 0.0.
    """

    def __init__(self, num_classes: int, *, label: str = "pal", cell_size: int, patch_size: int | None = None,
                 alpha: float = 1.0, smoothing: float = 0.1, loss_smoothing: float = 0.0, maskmix_prob: float = 1.0,
                 mixup=None, detach_s: bool = False, generator: torch.Generator | None = None):
        fn = "MixStep"
        check_int(num_classes, "num_classes", fn)
        if num_classes < 2:
            raise ValueError(f"{fn}: num_classes must be >= 2, got {num_classes!r}")
        if label not in LABELS:
            raise ValueError(f"{fn}: label must be one of {LABELS}, got {label!r}")
        check_int(cell_size, "cell_size", fn)
        if patch_size is not None:
            check_int(patch_size, "patch_size", fn)
            if cell_size % patch_size:
                raise ValueError(f"{fn}: cell_size={cell_size} must be a multiple of patch_size={patch_size}")
        self.alpha = check_number(alpha, "alpha", fn, low=0, low_open=True)
        self.smoothing = check_number(smoothing, "smoothing", fn, low=0, high=1, high_open=True)
        self.loss_smoothing = check_number(loss_smoothing, "loss_smoothing", fn, low=0, high=1, high_open=True)
        self.maskmix_prob = check_number(maskmix_prob, "maskmix_prob", fn, low=0, high=1)
        if self.maskmix_prob < 1.0 and not callable(mixup):
            raise ValueError(f"{fn}: maskmix_prob={maskmix_prob} < 1 needs mixup= (e.g. timm.data.Mixup) for the "
                             f"other batches")
        if mixup is not None and not callable(mixup):
            raise TypeError(f"{fn}: mixup must be callable (x, y) -> (x, targets), got {type(mixup).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_classes, self.label, self.cell_size, self.patch_size = num_classes, label, cell_size, patch_size
        self.mixup, self.detach_s, self.generator = mixup, bool(detach_s), generator
        self._log: list[Tensor] = []  # per MaskMix step: batch means of HISTORY_KEYS
        self.last: dict | None = None  # the last MaskMix step's per-sample tensors (for inspection)

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.maskmix_prob < 1.0 and float(torch.rand((), generator=self.generator)) >= self.maskmix_prob:
            images, targets = self.mixup(x, y)
            logits = net(images)
            return soft_cross_entropy(logits, targets), logits
        patch = self.patch_size or unwrap(net).patch_embed.patch_size
        mb = maskmix(x, y, patch_size=patch, cell_size=self.cell_size, alpha=self.alpha, generator=self.generator)
        logits, attn = cls_patch_attention(net, mb.images)
        t_area = mix_targets(mb.y_a, mb.y_b, mb.lam_area, self.num_classes, self.smoothing)
        lam_attn = attention_lambda(attn, mb.patch_keep)
        s = progressive_factor(t_area, logits.detach() if self.detach_s else logits)
        lam_pal = pal_lambda(mb.lam_area, lam_attn, s)
        lam = {"area": mb.lam_area, "attention": lam_attn, "pal": lam_pal}[self.label]
        if self.label == "area":  # the official MaskMix-only path: soft-target CE against the smoothed t_area
            targets, loss = t_area, soft_cross_entropy(logits, t_area)
        else:  # the official PAL loss: hard CE (loss_smoothing=0), λ carrying s's gradient
            targets = mix_targets(mb.y_a, mb.y_b, lam.detach(), self.num_classes, self.loss_smoothing)
            loss = pal_loss(logits, mb.y_a, mb.y_b, lam, self.loss_smoothing)
        self._log.append(torch.stack([s.mean(), mb.lam_area.mean(), lam_attn.mean(), lam.mean(),
                                      (lam_attn - mb.lam_area).abs().mean()]).detach())
        self.last = dict(batch=mb, attn=attn, s=s.detach(), lam_attn=lam_attn, lam=lam.detach(),
                         targets=targets.detach())
        return loss, logits

    def history(self) -> dict[str, list[float]]:
        """Batch means per MaskMix step: s, lam_area, lam_attn, lam (the one used for the label) and
        attn_gap = |lam_attn − lam_area| (how far the attention label moves from the area label)."""
        if not self._log:
            return {k: [] for k in HISTORY_KEYS}
        rows = torch.stack(self._log).cpu().T.tolist()  # one transfer at the end, not one sync per step
        return dict(zip(HISTORY_KEYS, rows))


def baseline_step(smoothing: float = 0.1):
    """step_fn without mixing: label-smoothed cross-entropy (what ``fit`` does without a step_fn)."""
    smoothing = check_number(smoothing, "smoothing", "baseline_step", low=0, high=1, high_open=True)

    def step(net, x, y):
        logits = net(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing), logits
    return step


def timm_mix_step(num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                  switch_prob: float = 0.5, smoothing: float = 0.1):
    """step_fn with timm's ``Mixup`` (DeiT's recipe by default; ``mixup_alpha=0`` gives CutMix alone).

    timm mixes each sample with the batch flipped (x[B-1-i]) and draws from NumPy's global RNG; the batch size
    must be even.
    """
    from timm.data import Mixup

    check_int(num_classes, "num_classes", "timm_mix_step")
    for name, a in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and a >= 0):
            raise ValueError(f"timm_mix_step: {name} must be a number >= 0, got {a!r}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError("timm_mix_step: mixup_alpha and cutmix_alpha are both 0; use baseline_step for no mixing")
    mixer = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=check_number(prob, "prob", "timm_mix_step", low=0, high=1),
                  switch_prob=check_number(switch_prob, "switch_prob", "timm_mix_step", low=0, high=1),
                  label_smoothing=check_number(smoothing, "smoothing", "timm_mix_step", low=0, high=1, high_open=True),
                  num_classes=num_classes)

    def step(net, x, y):
        if len(x) % 2:
            raise ValueError(f"timm_mix_step: timm's Mixup needs an even batch size, got {len(x)}")
        images, targets = mixer(x.clone(), y)  # timm mixes in place; fit's batch may be a view of the dataset
        logits = net(images)
        return soft_cross_entropy(logits, targets), logits
    step.mixer = mixer
    return step


def maskmix_step(num_classes: int, *, cell_size: int, **kw) -> MixStep:
    """MaskMix with area labels (λ = λ_area)."""
    return MixStep(num_classes, label="area", cell_size=cell_size, **kw)


def transmix_step(num_classes: int, *, cell_size: int, **kw) -> MixStep:
    """MaskMix images, TransMix-style attention labels (λ = λ_attn)."""
    return MixStep(num_classes, label="attention", cell_size=cell_size, **kw)


def mixpro_step(num_classes: int, *, cell_size: int, **kw) -> MixStep:
    """MixPro: MaskMix images, PAL labels (λ = s·λ_attn + (1 − s)·λ_area)."""
    return MixStep(num_classes, label="pal", cell_size=cell_size, **kw)
