"""DeiT-LT: distillation for ViTs trained from scratch on long-tailed data (Rangwani et al., CVPR 2024,
arXiv:2404.02900), written from the paper and a reading of the official code (github.com/val-iisc/DeiT-LT).

A ViT with two prefix tokens, CLS and DIST, each with its own linear head (DeiT's distilled ViT). The CLS head
learns the (mixed) labels; the DIST head learns the argmax of a small CNN teacher that looks at the *same*
strongly augmented images, which are out of distribution for the teacher:

    x̃, ỹ = mix(x, y)                        CutMix / Mixup on the batch (our `strong_mix`)
    t    = argmax_c T(x̃)_c                   hard label from a frozen, flat (SAM-trained) CNN teacher
    L    = (1 − α)·CE(head(z_cls), ỹ) + α·CE_w(head_dist(z_dist), t),      α = 0.5
    CE_w = Σ_i w_{t_i}·ℓ_i / Σ_i w_{t_i}      (torch's weighted mean), w = 1 before the DRW step, then
    w_c  = (1 − β)/(1 − β^{n_c}),  normalised so Σ_c w_c = C      (effective number of samples, β = 0.9999)

At test time the two heads are averaged (timm's convention); `forward_heads` gives both. The paper's claim:
the DIST head becomes the tail expert and the CLS head the head expert.

    teacher = small_resnet(train)                                       # a few conv layers, BN, residuals
    make_opt, step = sam_training(balanced_softmax_loss(train.class_counts()), rho=0.05)
    fit(teacher, train, optimizer=make_opt, step_fn=step, ...)          # the flat teacher
    student = distilled_vit("vit_nano", data=train)                    # timm VisionTransformerDistilled keys
    step = DeiTLTStep(teacher, num_classes=10, class_weights=class_balanced_weights(train.class_counts()),
                      drw_step=300)                                     # mixing until step 300, then DRW
    fit(student, train, val, step_fn=step, ...)
    report = head_mid_tail_report(student, test, train.class_counts())  # {"cls"|"dist"|"avg": {"head": ...}}

SAM (Foret et al., 2021) for the teacher, per step with gradient g at weights w:
    ε = ρ·g/‖g‖₂ (one norm over all parameters),  g' = ∇L(w + ε),  w ← base_step(w, g')

Our reading (where the paper and the code leave things open or are too big for a laptop):
- Teacher: the paper distils from a ResNet-32 trained with PaCo + SAM (its training code is not in the repo);
  we train a small ResNet with SAM and the balanced-softmax loss (logits + log n_c during training).
- OOD images: the official run applies RandAugment-style transforms and timm's Mixup/CutMix and feeds the
  teacher the same mixed batch (``--student-transform 0``). We use Mixup/CutMix only, with a CutMix that
  pastes whole ViT patches (``vitlab.augment.cell_mask``/``paste``: random cells, not one box) and mixes the
  labels by the pasted area.
- DRW as in ``sh/train_c10_if100.sh`` (``--drw 1100 --no-mixup-drw --weighted-distillation``): before the
  DRW step the distillation CE is unweighted; from it on, the distillation CE is class-weighted, mixing stops
  (the CLS head gets plain CE on the hard labels, without label smoothing: with ``--no-mixup-drw`` the official
  ``main.py`` switches the base criterion to ``torch.nn.CrossEntropyLoss()`` and ``engine.py`` passes the unmixed
  integer targets; our ``drw_smoothing=0.0``) and the teacher sees the unmixed images. The base loss is
  never weighted (``--weighted-baseloss`` is off in that script). We switch at a *step*, not an epoch.
- The official model also returns a cosine similarity of the two tokens and an optional extra loss; neither
  enters the loss of the published recipe, so we leave them out.
- The effective-number weights are normalised over the classes (sum C), as in ``main.py``, and the
  cross-entropy is torch's weighted mean, as in ``losses.py``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_int, check_number
from vitlab.augment import cell_mask, mix_targets, paste, soft_cross_entropy, soft_targets
from vitlab.models import SmallCNN, VisionTransformer
from vitlab.train import unwrap

__all__ = ["RECIPE", "train_teacher", "DistilledVisionTransformer", "distilled_vit", "class_balanced_weights",
           "drw_weights",
           "deit_lt_loss", "strong_mix", "small_resnet", "balanced_softmax_loss", "SAM",
           "sam_training", "DeiTLTStep", "split_classes", "predict_heads", "head_mid_tail_report"]

# The recipe's hyper-parameters in one place: the lesson and ``recipes.train_recipe`` (the chapter's compare) read
# them from here. alpha: distillation weight; beta: effective-number β; drw_at: fraction of the steps after which
# DRW starts (the official CIFAR script: epoch 1,100 of 1,200; our short runs switch half-way); smoothing: timm's
# Mixup label smoothing before DRW; drw_smoothing: none after it (official --no-mixup-drw: plain CE); the teacher:
# a small ResNet (its stem at stride 2 on 28-px digits: the teacher runs on every student step, so its cost counts)
# trained with SAM (rho) around SGD and the balanced-softmax loss.
RECIPE = dict(alpha=0.5, beta=0.9999, drw_at=0.5, smoothing=0.1, drw_smoothing=0.0, rho=0.05,
              teacher_widths=(8, 16, 32), teacher_stem_stride=2, teacher_lr=0.05, teacher_weight_decay=5e-4)


# ------------------------------------------------------------------------------------------------ checks


def _check_counts(counts, fn: str) -> torch.Tensor:
    if isinstance(counts, (list, tuple)):
        counts = torch.tensor(counts)
    if not torch.is_tensor(counts) or counts.ndim != 1 or counts.numel() < 2 or counts.is_floating_point() \
            or counts.is_complex():
        raise TypeError(f"{fn}: counts must be a 1-D sequence/tensor of integer class counts (>= 2 classes), "
                        f"got {counts!r}")
    if (counts < 1).any():
        raise ValueError(f"{fn}: every class needs at least one training image, got counts {counts.tolist()}")
    return counts.long().cpu()


# ------------------------------------------------------------------------------------------------ the model
class DistilledVisionTransformer(VisionTransformer):
    """A ViT with CLS and DIST tokens and two heads; state-dict keys as timm's ``VisionTransformerDistilled``.

    train mode → (cls_logits, dist_logits); eval mode → their mean (as timm with ``distilled_training``);
    ``forward_heads(x)`` → both, in any mode. Only ``global_pool="token"`` and no register tokens.
    """

    def __init__(self, **kwargs):
        if kwargs.get("global_pool", "token") != "token" or not kwargs.get("class_token", True):
            raise ValueError("DistilledVisionTransformer: the heads read the CLS and DIST tokens; "
                             f"global_pool must be 'token' with class_token=True, got {kwargs}")
        if kwargs.get("reg_tokens", 0):
            raise ValueError(f"DistilledVisionTransformer: reg_tokens must be 0, got {kwargs['reg_tokens']!r}")
        super().__init__(**kwargs)
        D, C = self.embed_dim, self.num_classes
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, D))
        self.head_dist = nn.Linear(D, C) if C else nn.Identity()
        trunc_normal_(self.dist_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        if C:
            trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)
        self.distilled_training = True  # timm's flag (default False there): train mode returns both heads

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def set_distilled_training(self, enable: bool = True) -> "DistilledVisionTransformer":
        if not isinstance(enable, bool):
            raise TypeError(f"set_distilled_training: enable must be a bool, got {enable!r}")
        self.distilled_training = enable
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.norm_pre(self.pos_drop(x + self.pos_embed))  # [B, CLS + DIST + patches, D]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] + x[:, 1]) / 2

    def _heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.head_drop(feats[:, 0])), self.head_dist(self.head_drop(feats[:, 1]))

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS logits, DIST logits) in train and eval mode alike (for the per-head report)."""
        return self._heads(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if pre_logits:
            return self.head_drop(self.pool(x))
        cls_logits, dist_logits = self._heads(x)
        if self.training and self.distilled_training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def distilled_vit(name: str, data=None, **overrides) -> DistilledVisionTransformer:
    """A registry configuration (``vitlab.models.create_model``'s names) built as a distilled ViT."""
    from vitlab.models.registry import model_config

    cfg = model_config(name, data, **overrides)
    if "use_kernels" not in cfg:
        from vitlab.profiles import profile

        cfg["use_kernels"] = profile().kernels
    return DistilledVisionTransformer(**cfg)


# ------------------------------------------------------------------------------------------------ the loss
def class_balanced_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """Effective-number weights w_c = (1 − β)/(1 − β^{n_c}), scaled so that Σ_c w_c = C (float32 [C]).

    β → 0 gives equal weights; β → 1 gives weights ∝ 1/n_c (inverse frequency).
    """
    counts = _check_counts(counts, "class_balanced_weights")
    beta = check_number(beta, "beta", "class_balanced_weights", low=0.0, high=1.0, high_open=True)
    n = counts.double()
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))  # float64: β^n near 1
    return (w / w.sum() * len(n)).float()


def drw_weights(step: int, drw_step: int | None, class_weights: torch.Tensor) -> torch.Tensor | None:
    """Deferred re-weighting: None (plain CE) before step ``drw_step``, ``class_weights`` from it on."""
    check_int(step, "step", "drw_weights", low=0)
    if drw_step is not None:
        check_int(drw_step, "drw_step", "drw_weights", low=0)
    if not torch.is_tensor(class_weights) or class_weights.ndim != 1:
        raise TypeError(f"drw_weights: class_weights must be a 1-D tensor, got {class_weights!r}")
    return class_weights if drw_step is not None and step >= drw_step else None


def deit_lt_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor,
                 teacher_logits: torch.Tensor, *, alpha: float = 0.5, class_weights: torch.Tensor | None = None,
                 return_parts: bool = False):
    """(1 − α)·CE(cls, targets) + α·CE_w(dist, argmax teacher): hard distillation, optionally class-weighted.

    targets: hard labels [B] (long) or soft/mixed labels [B, C]. class_weights [C] or None weights only the
    distillation term (a weighted mean, as ``F.cross_entropy(weight=)``). With ``return_parts`` also returns
    the two unscaled terms {"cls": ..., "dist": ...}.
    """
    fn = "deit_lt_loss"
    for name, t in (("cls_logits", cls_logits), ("dist_logits", dist_logits), ("teacher_logits", teacher_logits)):
        if not torch.is_tensor(t) or t.ndim != 2:
            raise ValueError(f"{fn}: {name} must be logits [B, C], got {getattr(t, 'shape', type(t).__name__)}")
    if not (cls_logits.shape == dist_logits.shape == teacher_logits.shape):
        raise ValueError(f"{fn}: cls_logits {tuple(cls_logits.shape)}, dist_logits {tuple(dist_logits.shape)} "
                         f"and teacher_logits {tuple(teacher_logits.shape)} must have one shape [B, C]")
    B, C = cls_logits.shape
    if not torch.is_tensor(targets) or not (targets.shape == (B,) and targets.dtype == torch.long
                                            or targets.shape == (B, C) and targets.is_floating_point()):
        raise ValueError(f"{fn}: targets must be labels [B={B}] (long) or soft labels [B={B}, C={C}], got "
                         f"{getattr(targets, 'dtype', '')} {tuple(getattr(targets, 'shape', ()))}")
    alpha = check_number(alpha, "alpha", fn, low=0.0, high=1.0)
    if class_weights is not None and (not torch.is_tensor(class_weights) or class_weights.shape != (C,)):
        raise ValueError(f"{fn}: class_weights must be None or a tensor [C={C}], got "
                         f"{tuple(getattr(class_weights, 'shape', ())) or type(class_weights).__name__}")
    if targets.ndim == 1:
        base = F.cross_entropy(cls_logits.float(), targets)
    else:
        base = soft_cross_entropy(cls_logits, targets.float())
    teacher_labels = teacher_logits.detach().argmax(dim=1)  # hard distillation: no gradient to the teacher
    weight = None if class_weights is None else class_weights.to(dist_logits.device, torch.float32)
    dist = F.cross_entropy(dist_logits.float(), teacher_labels, weight=weight)
    loss = (1 - alpha) * base + alpha * dist
    return (loss, {"cls": base, "dist": dist}) if return_parts else loss


# ------------------------------------------------------------------------------------------------ OOD images
def strong_mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: tuple[int, int], *,
               mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
               smoothing: float = 0.1, generator: torch.Generator | None = None):
    """Mixup or (patch-aligned) CutMix of a batch with a shuffled copy of itself → (x_mix, soft targets [B, C]).

    With probability ``switch_prob`` CutMix: λ ~ Beta(cutmix_alpha), round((1 − λ)·cells) random cells of
    ``grid`` come from the partner and each image's label weight is its kept area. Otherwise Mixup:
    λ ~ Beta(mixup_alpha), x_mix = λ·x + (1 − λ)·x_partner. One draw per batch (timm's batch mode).
    """
    fn = "strong_mix"
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"{fn}: x must be images [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.is_tensor(y) or y.dtype != torch.long or y.shape != (x.shape[0],):
        raise ValueError(f"{fn}: y must be long labels [B={x.shape[0]}], got {getattr(y, 'shape', y)!r}")
    check_int(num_classes, "num_classes", fn, low=2)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"{fn}: grid must be (gh, gw) positive ints, got {grid!r}")
    mixup_alpha = check_number(mixup_alpha, "mixup_alpha", fn, low=0.0, low_open=True, high_open=True)
    cutmix_alpha = check_number(cutmix_alpha, "cutmix_alpha", fn, low=0.0, low_open=True, high_open=True)
    switch_prob = check_number(switch_prob, "switch_prob", fn, low=0.0, high=1.0)
    B = x.shape[0]
    perm = torch.randperm(B, generator=generator).to(x.device)
    u = torch.rand((), generator=generator).item()
    if u < switch_prob:  # CutMix on whole patches
        lam = torch.distributions.Beta(cutmix_alpha, cutmix_alpha).sample().item() if generator is None else \
            _beta(cutmix_alpha, generator)
        n_cells = round((1 - lam) * grid[0] * grid[1])
        cells = cell_mask(B, tuple(grid), n_cells, generator=generator)
        x_mix = paste(x, x[perm], cells)
        lam_t = 1 - cells.flatten(1).float().mean(1).to(x.device)
    else:
        lam = torch.distributions.Beta(mixup_alpha, mixup_alpha).sample().item() if generator is None else \
            _beta(mixup_alpha, generator)
        x_mix = lam * x + (1 - lam) * x[perm]
        lam_t = torch.full((B,), lam, device=x.device)
    return x_mix, mix_targets(y, y[perm], lam_t, num_classes, smoothing=smoothing)


def _beta(a: float, generator: torch.Generator) -> float:
    # Beta(a, a) from two seeded Gamma draws (torch's Beta sampler takes no generator)
    g1 = torch._standard_gamma(torch.tensor([a], dtype=torch.float64), generator=generator).item()
    g2 = torch._standard_gamma(torch.tensor([a], dtype=torch.float64), generator=generator).item()
    return g1 / (g1 + g2) if g1 + g2 > 0 else 0.5


# ------------------------------------------------------------------------------------------------ the teacher
def small_resnet(data=None, *, in_chans: int = 1, num_classes: int = 10, widths=(16, 32, 64),
                 stem_stride: int = 1) -> SmallCNN:
    """The teacher: the course's ``SmallCNN`` as a CIFAR-style ResNet in miniature (3×3 stem at stride 1, one
    basic block per stage); ``widths=(16, 32, 64)`` is ResNet-8. ``stem_stride=2`` halves the resolution at the
    stem (4× cheaper on 28-px digits). Shaped for ``data`` (a vitlab ImageDataset), else for in_chans/num_classes."""
    if data is not None:
        if not all(hasattr(data, a) for a in ("in_chans", "num_classes")):
            raise TypeError(f"small_resnet: data must be a vitlab ImageDataset, got {type(data).__name__}")
        in_chans, num_classes = data.in_chans, data.num_classes
    return SmallCNN(in_chans, num_classes, tuple(widths) if isinstance(widths, (tuple, list)) else widths,
                    blocks=1, stem_stride=stem_stride)


def balanced_softmax_loss(counts) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Balanced softmax (Ren et al., 2020): CE(logits + log n_c, y) while training; the raw logits then
    estimate the class-balanced posterior. Returns ``loss_fn(logits, y)``."""
    log_prior = _check_counts(counts, "balanced_softmax_loss").double().log().float()

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != len(log_prior):
            raise ValueError(f"balanced_softmax_loss: logits must be [B, {len(log_prior)}], got "
                             f"{tuple(logits.shape)}")
        return F.cross_entropy(logits.float() + log_prior.to(logits.device), y)

    return loss_fn


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimizer (which shares its param groups, so an lr
    scheduler on SAM drives the base).

    Before ``step(closure)`` the parameters' ``.grad`` must hold the gradient at w (the usual backward).
    ``closure()`` only recomputes the batch's loss (no backward, no zero_grad): SAM moves to w + ε, zeroes the
    gradients, backpropagates the closure's loss, moves back to w and lets the base optimizer step with the
    gradient taken at w + ε.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"SAM: base must be a torch.optim.Optimizer, got {type(base).__name__}")
        rho = check_number(rho, "rho", "SAM", low=0.0, low_open=True, high_open=True)
        self.base = base
        super().__init__(base.param_groups, dict(rho=rho))  # the same group dicts: one lr for both
        self.rho = rho
        self._closure = None

    def set_closure(self, closure) -> None:
        """The loss at the current batch, for the next ``step()`` called without a closure (``vitlab.train.fit``)."""
        self._closure = closure

    @torch.no_grad()
    def first_step(self) -> None:
        """w ← w + ρ·g/‖g‖ (one 2-norm over every parameter with a gradient)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([  # at least fp32, and fp64 stays fp64
            torch.linalg.vector_norm(gr.to(torch.promote_types(gr.dtype, torch.float32))).double() for gr in grads]))
        scale = self.rho / (norm + 1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = (p.grad * scale.to(p.grad.device)).to(p.dtype)
                self.state[p]["e_w"] = e
                p.add_(e)

    @torch.no_grad()
    def second_step(self) -> None:
        """w ← w − ε (back to the start), then the base optimizer's step with the gradient taken at w + ε."""
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    p.sub_(self.state[p].pop("e_w"))
        self.base.step()

    def step(self, closure=None):
        closure = closure if closure is not None else self._closure
        if closure is None:
            raise ValueError("SAM.step: needs a closure (or set_closure) that recomputes the loss")
        self._closure = None
        self.first_step()
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        self.second_step()
        return loss


def sam_training(loss_fn: Callable, *, rho: float = 0.05, base="sgd"):
    """(optimizer, step_fn) for ``vitlab.train.fit``: SAM around ``base`` (a name or a callable, as fit's
    ``optimizer=``) and a step that hands SAM the batch's loss for its second pass.

    fit's gradient clipping acts on the first gradient only, which does not change ε (ε is g scaled to norm ρ).
    The second pass runs outside fit's autocast and also updates BatchNorm's running statistics.
    """
    if not callable(loss_fn):
        raise TypeError(f"sam_training: loss_fn must be callable (logits, labels) -> loss, "
                        f"got {type(loss_fn).__name__}")
    rho = check_number(rho, "rho", "sam_training", low=0.0, low_open=True, high_open=True)
    holder: dict = {}

    def make_optimizer(model, lr, weight_decay):
        from vitlab.train import make_optimizer as base_optimizer

        holder["opt"] = SAM(base_optimizer(model, base, lr, weight_decay), rho=rho)
        return holder["opt"]

    def step_fn(net, x, y):
        logits = net(x)
        holder["opt"].set_closure(lambda: loss_fn(net(x), y))
        return loss_fn(logits, y), logits

    return make_optimizer, step_fn


def train_teacher(train, *, profile=None, epochs: int, batch_size: int, seed: int = 0,
                  widths: tuple[int, ...] = RECIPE["teacher_widths"],
                  stem_stride: int = RECIPE["teacher_stem_stride"], lr: float = RECIPE["teacher_lr"],
                  weight_decay: float = RECIPE["teacher_weight_decay"], rho: float = RECIPE["rho"], shift: int = 0,
                  progress: bool = False) -> tuple[nn.Module, dict]:
    """The recipe's teacher: ``small_resnet(widths, stem_stride)`` trained with SAM around SGD on the
    balanced-softmax loss of ``train``'s class counts (fp32, not compiled: SAM's second pass runs outside
    autocast). → (teacher, history)."""
    from vitlab.seed import seed_everything
    from vitlab.train import fit

    seed_everything(seed)
    teacher = small_resnet(train, widths=tuple(widths), stem_stride=stem_stride)
    make_sam, sam_step = sam_training(balanced_softmax_loss(train.class_counts()), rho=rho, base="sgd")
    history = fit(teacher, train, profile=profile, epochs=epochs, batch_size=batch_size, optimizer=make_sam,
                  step_fn=sam_step, lr=lr, weight_decay=weight_decay, shift=shift, amp=False, compile=False,
                  seed=seed, progress=progress, desc=f"SAM teacher s{seed}")
    return teacher.eval(), history


# ------------------------------------------------------------------------------------------------ training step
class DeiTLTStep:
    """A ``step_fn`` for ``vitlab.train.fit`` that trains a ``DistilledVisionTransformer``.

    Before ``drw_step``: (if ``mix``) Mixup/CutMix the batch, the teacher labels the same mixed images, CLS
    learns the mixed labels, DIST the teacher's argmax (unweighted). From ``drw_step`` on: no mixing (unless
    ``mix_after_drw``), CLS learns the hard labels, DIST the teacher's argmax weighted by ``class_weights``.
    ``mix_prob`` is the chance a batch is mixed at all (timm's Mixup ``prob``; 1 in the official recipe).
    ``mix=False, drw_step=None`` is plain DeiT hard distillation. Label smoothing: ``smoothing`` goes into the
    mixed (and, before DRW, the unmixed) targets, as timm's Mixup does; from ``drw_step`` on, an unmixed batch
    gets the hard labels smoothed by ``drw_smoothing`` (0 = plain CE on the hard labels, the official
    ``--no-mixup-drw`` behaviour). ``class_weights=torch.ones(C)`` with a ``drw_step`` keeps the schedule (mixing
    stops at the step) but never re-weights: the "without DRW" control. The teacher is frozen here (eval mode, no
    gradients). Counts its calls in ``.step``; ``.log`` keeps, per step, whether the weights were on and the two
    loss terms.
    """

    def __init__(self, teacher: nn.Module, *, num_classes: int, alpha: float = RECIPE["alpha"],
                 class_weights: torch.Tensor | None = None, drw_step: int | None = None, mix: bool = True,
                 mix_after_drw: bool = False, mix_prob: float = 1.0, grid: tuple[int, int] | None = None,
                 mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, smoothing: float = RECIPE["smoothing"],
                 drw_smoothing: float = RECIPE["drw_smoothing"], seed: int = 0):
        fn = "DeiTLTStep"
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"{fn}: teacher must be an nn.Module, got {type(teacher).__name__}")
        self.num_classes = check_int(num_classes, "num_classes", fn, low=2)
        self.alpha = check_number(alpha, "alpha", fn, low=0.0, high=1.0)
        if drw_step is not None:
            check_int(drw_step, "drw_step", fn, low=0)
            if class_weights is None:
                raise ValueError(f"{fn}: drw_step={drw_step} needs class_weights (see class_balanced_weights)")
        if class_weights is not None and (not torch.is_tensor(class_weights) or class_weights.shape != (num_classes,)):
            raise ValueError(f"{fn}: class_weights must be a tensor [num_classes={num_classes}], got "
                             f"{tuple(getattr(class_weights, 'shape', ())) or type(class_weights).__name__}")
        for name, v in (("mix", mix), ("mix_after_drw", mix_after_drw)):
            if not isinstance(v, bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.class_weights, self.drw_step = class_weights, drw_step
        self.mix, self.mix_after_drw, self.grid = mix, mix_after_drw, grid
        self.mix_prob = check_number(mix_prob, "mix_prob", fn, low=0.0, high=1.0)
        self.mix_kw = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                           smoothing=check_number(smoothing, "smoothing", fn, low=0.0, high=1.0, high_open=True))
        self.drw_smoothing = check_number(drw_smoothing, "drw_smoothing", fn, low=0.0, high=1.0, high_open=True)
        self.generator = torch.Generator().manual_seed(check_int(seed, "seed", fn, low=0))
        self.step = 0
        self.log: list[dict] = []

    def weights_now(self) -> torch.Tensor | None:
        """The distillation CE's class weights at the current step (None: unweighted)."""
        if self.class_weights is None:
            return None
        return drw_weights(self.step, self.drw_step, self.class_weights)

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        weights = self.weights_now()
        in_drw = self.drw_step is not None and self.step >= self.drw_step
        mixing = self.mix and (not in_drw or self.mix_after_drw)
        if mixing and torch.rand((), generator=self.generator).item() < self.mix_prob:
            grid = self.grid or _grid_of(net)
            x, targets = strong_mix(x, y, self.num_classes, grid, generator=self.generator, **self.mix_kw)
        elif in_drw and self.drw_smoothing == 0.0:
            targets = y  # hard labels, plain CE (the official --no-mixup-drw stage)
        else:
            targets = soft_targets(y, self.num_classes, self.drw_smoothing if in_drw else self.mix_kw["smoothing"])
        self.teacher.to(x.device).eval()
        with torch.no_grad():
            teacher_logits = self.teacher(x)  # the same (mixed) images the student sees
        out = net(x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError("DeiTLTStep: the model must return (cls_logits, dist_logits) in train mode; "
                            "use a DistilledVisionTransformer")
        cls_logits, dist_logits = out
        loss, parts = deit_lt_loss(cls_logits, dist_logits, targets, teacher_logits, alpha=self.alpha,
                                   class_weights=weights, return_parts=True)
        self.log.append({"step": self.step, "weighted": weights is not None, "cls": parts["cls"].item(),
                         "dist": parts["dist"].item()})
        self.step += 1
        return loss, (cls_logits.detach() + dist_logits.detach()) / 2


def _grid_of(net: nn.Module) -> tuple[int, int]:
    grid = getattr(unwrap(net), "grid_size", None)  # through torch.compile / DDP wrappers
    if grid is None:
        raise ValueError("DeiTLTStep: pass grid=(gh, gw) for a model without .grid_size")
    return tuple(grid)


# ------------------------------------------------------------------------------------------------ head / mid / tail
def split_classes(counts, *, many: int | None = None, few: int | None = None) -> dict[str, torch.Tensor]:
    """Class indices by training count: {"head", "mid", "tail"} (many / medium / few shot).

    With ``many`` and ``few``: head = n_c > many, tail = n_c < few, mid = the rest (ImageNet-LT uses 100 and
    20). Without: the classes ranked by count, the top 30 % head, the bottom 30 % tail (rounded), which for 10
    classes is the official CIFAR-10-LT split 3 / 4 / 3.
    """
    counts = _check_counts(counts, "split_classes")
    if (many is None) != (few is None):
        raise ValueError(f"split_classes: give both many and few or neither, got many={many!r}, few={few!r}")
    if many is not None:
        check_int(many, "many", "split_classes", low=0)
        check_int(few, "few", "split_classes", low=0)
        if few > many:
            raise ValueError(f"split_classes: few={few} must be <= many={many}")
        head = (counts > many).nonzero().flatten()
        tail = (counts < few).nonzero().flatten()
        mid = ((counts <= many) & (counts >= few)).nonzero().flatten()
        return {"head": head, "mid": mid, "tail": tail}
    C = len(counts)
    order = torch.sort(counts, descending=True, stable=True).indices
    k = max(1, round(0.3 * C))
    return {"head": order[:k].sort().values, "mid": order[k:C - k].sort().values, "tail": order[C - k:].sort().values}


@torch.no_grad()
def predict_heads(model: DistilledVisionTransformer, data, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Logits of the CLS head, the DIST head and their average over ``data``: {"cls", "dist", "avg"} [N, C]."""
    if not isinstance(model, DistilledVisionTransformer):
        raise TypeError(f"predict_heads: model must be a DistilledVisionTransformer, got {type(model).__name__}")
    images = data.images if hasattr(data, "images") else data[0] if isinstance(data, (tuple, list)) else None
    if not torch.is_tensor(images) or images.ndim != 4:
        raise TypeError("predict_heads: data must be a vitlab ImageDataset or an (images, labels) pair")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    cls, dist = [], []
    for i in range(0, len(images), batch_size):
        c, d = model.forward_heads(images[i:i + batch_size].to(device))
        cls.append(c.float().cpu())
        dist.append(d.float().cpu())
    model.train(was)
    cls, dist = torch.cat(cls), torch.cat(dist)
    return {"cls": cls, "dist": dist, "avg": (cls + dist) / 2}


def head_mid_tail_report(model: nn.Module, data, train_counts, *, many: int | None = None,
                         few: int | None = None) -> dict[str, dict[str, float]]:
    """Accuracy overall and on head / mid / tail classes (mean of per-class accuracies in each group).

    A ``DistilledVisionTransformer`` gives rows "cls", "dist" and "avg"; any other classifier one row "cls".
    """
    groups = split_classes(train_counts, many=many, few=few)
    labels = data.labels if hasattr(data, "labels") else data[1] if isinstance(data, (tuple, list)) else None
    if not torch.is_tensor(labels) or labels.ndim != 1:
        raise TypeError("head_mid_tail_report: data must be a vitlab ImageDataset or an (images, labels) pair")
    if isinstance(model, DistilledVisionTransformer):
        logits = predict_heads(model, data)
    else:
        from vitlab.measure import predict

        logits = {"cls": predict(model, data)}
    C = len(train_counts)
    out = {}
    for name, lg in logits.items():
        if lg.shape[1] != C:
            raise ValueError(f"head_mid_tail_report: the model has {lg.shape[1]} classes, train_counts {C}")
        hit = (lg.argmax(-1) == labels.cpu()).double()
        per_class = torch.bincount(labels.cpu(), weights=hit, minlength=C) / torch.bincount(labels.cpu(), minlength=C)
        row = {"all": hit.mean().item()}
        row.update({g: per_class[idx].mean().item() if len(idx) else float("nan") for g, idx in groups.items()})
        out[name] = row
    return out
