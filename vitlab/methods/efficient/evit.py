"""EViT: keep the tokens the CLS token attends to, fuse the rest into one (Liang et al., ICLR 2022).

Paper: Y. Liang, C. Ge, Z. Tong, Y. Song, J. Wang, P. Xie, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", ICLR 2022, arXiv:2202.07800. Official code:
https://github.com/youweiliang/evit (``evit.py``: ``Attention.forward`` / ``Block.forward``; ``helpers.py``:
``adjust_keep_rate``). Written from the paper and that code; no line of it is copied.

In a reducing block, after attention and its residual and before the FFN, with the CLS row of the attention
A^h[0, :] of every head h over the N tokens (CLS first):

    a_i   = (1/H) Σ_h A^h[0, i]                 i = 1..N-1 (image tokens; an earlier fused token included)
    k     = ceil(keep_rate · (N - 1))
    K     = topk(a, k)  (sorted: highest attention first, NOT spatial order)
    fused = Σ_{j ∉ K} a_j · x_j                 raw attention weights, not renormalised
    x     ← [x_cls ; x_K ; fused]               N → k + 2 tokens, then the FFN

        tokens after attention                      into the FFN
    [cls|t1 t2 t3 t4 t5 t6 t7 t8]   ──a_i──▶   [cls|t5 t2 t7 t1|Σ a_j t_j]     keep 0.5: 8 → 4 + 1 fused
          ▲ a = mean_h A[0, 1:]                        top-4 by a        j ∈ {3,4,6,8}

Training: the keep rate follows a cosine from 1 down to the base rate (``keep_rate_schedule``), updated every
step; at inference every reducing block uses the base rate. No new parameters: the same ViT weights, fine-tuned
with reduction on. keep_rate = 1 (or no reducing block) is exactly the base ViT.

Our choices at course scale (6 blocks, 65 tokens): reduce at blocks 1 and 3 with keep 0.6 by default (see
``for_compare``), the analogue of DeiT-S's blocks 3, 6, 9 (0-based) of 12 with keep 0.7 — a 6-block model has room for
two reductions, and two at 0.6 remove as much compute (≈ 37 % of the FLOPs) as three at 0.7 do in DeiT-S.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_cls_vit, check_number, check_int as _check_int, check_model as _check_model
from vitlab.tokens import gather_tokens, keep_top_k

if TYPE_CHECKING:  # a type only: recipes imports this module
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["keep_count", "cls_attention_scores", "reorganize", "keep_rate_schedule", "EViT", "finetune",
           "for_compare", "DEFAULTS", "DEFAULT_KEEP_RATE", "DEFAULT_REDUCE_AT"]

# The lesson's and for_compare's one setting. EViT adds no parameters, so it has no lr of its own: every fine-tune
# uses the chapter's recipe (``recipes.finetune_kwargs``), the dense control's arguments.
DEFAULTS = dict(keep_rate=0.6, reduce_at=(1, 3), fuse=True, shrink_start=0.0, shrink_end=0.5)
DEFAULT_KEEP_RATE = DEFAULTS["keep_rate"]
DEFAULT_REDUCE_AT = DEFAULTS["reduce_at"]


# ------------------------------------------------------------------------------------------------ checks

# ------------------------------------------------------------------------------------------------ the mechanism
def keep_count(num_image_tokens: int, keep_rate: float) -> int:
    """k = ceil(keep_rate · (N - 1)): how many image tokens a reducing block keeps (at least 1)."""
    _check_int(num_image_tokens, "num_image_tokens", "keep_count")
    keep_rate = check_number(keep_rate, "keep_rate", "keep_count", low=0, low_open=True, high=1)
    # round first so that e.g. 0.7 * 10 = 7.000000000000001 is 7, not 8
    return max(1, math.ceil(round(keep_rate * num_image_tokens, 9)))


def cls_attention_scores(cls_row: torch.Tensor) -> torch.Tensor:
    """a = mean over heads of the CLS row, image tokens only: cls_row [B, H, N] -> [B, N-1]."""
    if not isinstance(cls_row, torch.Tensor) or cls_row.ndim != 3 or cls_row.shape[-1] < 2:
        raise ValueError(f"cls_attention_scores: cls_row must be the CLS attention row [B, H, N >= 2], got "
                         f"{tuple(cls_row.shape) if isinstance(cls_row, torch.Tensor) else type(cls_row).__name__}")
    return cls_row[:, :, 1:].float().mean(dim=1)


def reorganize(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, *, fuse: bool = True):
    """EViT's token reorganisation: x [B, N, C] (CLS first), scores a [B, N-1] -> (x', idx).

    x' = [x_cls ; x_K ; Σ_{j∉K} a_j x_j] (the fused token only when ``fuse``), K = topk(a, k) highest first;
    idx [B, k] are the kept image tokens' positions among x[:, 1:]. When k = N - 1 nothing changes (x, None).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"reorganize: x must be tokens [B, N >= 2, C] with CLS first, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, N, C = x.shape
    if not isinstance(scores, torch.Tensor) or scores.shape != (B, N - 1):
        raise ValueError(f"reorganize: scores must be [B={B}, N-1={N - 1}] (one per image token), got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if not isinstance(fuse, bool):
        raise TypeError(f"reorganize: fuse must be a bool, got {type(fuse).__name__}")
    k = keep_count(N - 1, keep_rate)
    if k == N - 1:
        return x, None
    idx = keep_top_k(scores, k)  # [B, k], highest attention first
    tokens = x[:, 1:]
    parts = [x[:, :1], gather_tokens(tokens, idx)]
    if fuse:
        dropped = torch.ones_like(scores).scatter_(1, idx, 0.0)  # 1 for j ∉ K
        w = (scores * dropped).to(x.dtype)  # the raw CLS attention, not renormalised
        parts.append(torch.einsum("bn,bnc->bc", w, tokens)[:, None])
    return torch.cat(parts, dim=1), idx


def keep_rate_schedule(step: int, total_steps: int, base_keep_rate: float, *, start: int = 0,
                       max_keep_rate: float = 1.0) -> float:
    """The training schedule (official ``adjust_keep_rate``, per step): ``max_keep_rate`` until ``start``, then a
    half cosine down to ``base_keep_rate`` at ``total_steps``, then ``base_keep_rate``:

        r(t) = r_base + (r_max - r_base) · (1 + cos(π (t - start) / (total - start))) / 2
    """
    _check_int(step, "step", "keep_rate_schedule", low=0)
    _check_int(total_steps, "total_steps", "keep_rate_schedule")
    _check_int(start, "start", "keep_rate_schedule", low=0)
    base = check_number(base_keep_rate, "base_keep_rate", "keep_rate_schedule", low=0, low_open=True, high=1)
    top = check_number(max_keep_rate, "max_keep_rate", "keep_rate_schedule", low=0, low_open=True, high=1)
    if start >= total_steps:
        raise ValueError(f"keep_rate_schedule: start must be < total_steps={total_steps}, got {start}")
    if step < start:
        return top
    if step >= total_steps:
        return base
    return base + (top - base) * (1 + math.cos(math.pi * (step - start) / (total_steps - start))) / 2


# ------------------------------------------------------------------------------------------------ the model
class EViT(nn.Module):
    """A ViT whose blocks ``reduce_at`` reorganise tokens between attention and FFN (shares ``vit``'s modules).

    ``forward(images, keep_rate=None)``: logits; ``keep_rate`` overrides the default rate of every reducing
    block (the training schedule passes it). After each forward, ``last_tokens`` holds the tokens (CLS
    included) each block's attention saw, and ``last_kept`` the original patch indices [B, k] of the image tokens
    that left the last reducing block as themselves (-1 marks a fused token).
    """

    def __init__(self, vit: nn.Module, keep_rate: float = DEFAULT_KEEP_RATE, reduce_at=DEFAULT_REDUCE_AT,
                 fuse: bool = True):
        super().__init__()
        check_cls_vit(vit, "EViT")
        depth = len(vit.blocks)
        if isinstance(reduce_at, int) and not isinstance(reduce_at, bool):
            reduce_at = (reduce_at,)
        if not isinstance(reduce_at, (tuple, list, range)):
            raise TypeError(f"EViT: reduce_at must be a sequence of block indices, got {reduce_at!r}")
        for i in reduce_at:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
                raise ValueError(f"EViT: reduce_at must hold block indices in [0, {depth}), got {i!r} in {reduce_at!r}")
        if len(set(reduce_at)) != len(reduce_at):
            raise ValueError(f"EViT: reduce_at has repeated indices: {reduce_at!r}")
        if not isinstance(fuse, bool):
            raise TypeError(f"EViT: fuse must be a bool, got {type(fuse).__name__}")
        self.vit = vit
        self.keep_rate = check_number(keep_rate, "keep_rate", "EViT", low=0, low_open=True, high=1)
        self.reduce_at = tuple(sorted(reduce_at))
        self.fuse = fuse
        self.last_tokens: list[int] = []
        self.last_kept: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, keep_rate: float | None = None) -> torch.Tensor:
        rate = self.keep_rate if keep_rate is None else check_number(keep_rate, "keep_rate", "EViT.forward", low=0,
                                                                     low_open=True, high=1)
        x = self.vit.embed(images)
        B = x.shape[0]
        pos = torch.arange(x.shape[1] - 1, device=x.device).expand(B, -1)  # original patch of each image token
        tokens = []
        for i, blk in enumerate(self.vit.blocks):
            tokens.append(x.shape[1])
            if i in self.reduce_at and rate < 1:
                x, side = blk.forward_attn(x, side=("cls",))
                x, idx = reorganize(x, cls_attention_scores(side["cls"]), rate, fuse=self.fuse)
                if idx is not None:
                    pos = gather_tokens(pos, idx)
                    if self.fuse:
                        pos = torch.cat([pos, pos.new_full((B, 1), -1)], dim=1)
                x = blk.forward_mlp(x)
            else:
                x = blk(x)
        self.last_tokens = tokens
        self.last_kept = pos.detach()
        return self.vit.forward_head(self.vit.norm(x))

    @torch.no_grad()
    def kept_mask(self, images: torch.Tensor, keep_rate: float | None = None) -> torch.Tensor:
        """bool [B, num_patches]: the patches still tokens of their own after the last reduction."""
        self(images, keep_rate)
        kept = self.last_kept
        n = self.vit.patch_embed.num_patches
        mask = torch.zeros(kept.shape[0], n + 1, dtype=torch.bool, device=kept.device)
        mask.scatter_(1, torch.where(kept < 0, n, kept), True)  # fused tokens land in the spare column n
        return mask[:, :n]

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, reduce_at={self.reduce_at}, fuse={self.fuse}"


# ------------------------------------------------------------------------------------------------ training
def finetune(model: EViT, train, *, profile=None, seed: int = 0, shrink_start: float = DEFAULTS["shrink_start"],
             shrink_end: float = DEFAULTS["shrink_end"], steps: int | None = None, batch_size: int | None = None,
             progress: bool = False, val=None) -> dict:
    """Fine-tune ``model`` (in place) with THE chapter recipe, ``vitlab.train.fit(..., **finetune_kwargs(profile),
    seed=seed)`` (AdamW lr 1e-4, warm-up and cosine, label smoothing 0.1, ±2 px shifts, batch 64,
    ``finetune_steps(profile)`` steps: the dense control's arguments exactly), with a ``step_fn`` whose keep rate
    follows ``keep_rate_schedule`` from 1 at ``shrink_start·steps`` to ``model.keep_rate`` at ``shrink_end·steps``.
    ``steps`` / ``batch_size`` override the recipe's for unit tests only. Returns fit's history plus
    ``keep_rate`` (per step)."""
    from vitlab.methods.efficient import recipes
    from vitlab.train import fit

    if not isinstance(model, EViT):
        raise TypeError(f"finetune: model must be an EViT, got {type(model).__name__}")
    kwargs = recipes.finetune_kwargs(profile, steps=steps, batch_size=batch_size, fn="finetune")
    if not (0.0 <= shrink_start < shrink_end <= 1.0):
        raise ValueError(f"finetune: need 0 <= shrink_start < shrink_end <= 1, got {shrink_start!r}, {shrink_end!r}")
    n = kwargs["steps"]
    start, end = int(shrink_start * n), max(int(shrink_start * n) + 1, round(shrink_end * n))
    smoothing = kwargs.get("label_smoothing", 0.0)
    rates: list[float] = []

    def step_fn(net, x, y):
        r = keep_rate_schedule(len(rates), end, model.keep_rate, start=start)
        rates.append(r)
        logits = net(x, keep_rate=r)
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing), logits

    history = fit(model, train, val, profile=profile, **kwargs, step_fn=step_fn, seed=seed, progress=progress,
                  desc="EViT fine-tune")
    history["keep_rate"] = rates
    return history


def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """EViT at its default setting (``DEFAULTS``: keep 0.6 at blocks 1 and 3, fused token), fine-tuned from a copy
    of ``base`` with ``finetune`` (the chapter recipe and ``seed``: one ``finetune_steps(profile)`` fine-tune, the
    same arguments as ``recipes.dense_control(seed, profile)``). The lesson's main models are exactly these;
    ``extra["history"]`` is the fine-tune's history (with the per-step ``keep_rate``)."""
    from vitlab.methods.efficient.recipes import Reduced

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    model = EViT(copy.deepcopy(base), DEFAULTS["keep_rate"], DEFAULTS["reduce_at"], fuse=DEFAULTS["fuse"])
    history = finetune(model, train, profile=profile, seed=seed)
    model.eval()
    with torch.no_grad():
        model(train.images[:2] if hasattr(train, "images") else train[0][:2])
    return Reduced(model, tokens_per_block=[float(t) for t in model.last_tokens], gflops=None,
                   note=f"keep {DEFAULTS['keep_rate']} at blocks {list(DEFAULTS['reduce_at'])}, fused token, "
                        f"seed {seed}",
                   extra={"history": history})
