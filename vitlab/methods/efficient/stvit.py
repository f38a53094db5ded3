"""STViT: a few *semantic tokens* stand in for all image tokens (Chang et al., CVPR 2023).

S. Chang, P. Wang, M. Lin, F. Wang, D. J. Zhang, R. Jin, M. Z. Shou, *Making Vision Transformers Efficient from a
Token Sparsification View*, CVPR 2023, arXiv:2303.08685. Official code (Swin-based STViT-R only):
https://github.com/changsn/STViT-R (``models/layers.py``: ``SemanticAttentionBlock``, ``Block(x, y)``;
``models/multi_scale.py``: ``multi_scale_semantic_token1``; ``models/swin_transformer.py``: ``class Deit``).

Instead of dropping image tokens, STViT *summarises* them: after a few ordinary blocks the H×W grid of image tokens X
is max-pooled to a small h×w grid, and these pooled tokens, the semantic tokens, read the whole image once by
cross-attention (they are the queries; keys and values are themselves and every image token). The remaining blocks
run on the semantic tokens only. STViT-R adds a recovery block in which the image tokens query the semantic tokens,
which gives back a full-resolution token map for dense tasks.

    S⁰ = AdaptiveMaxPool_{h×w}(X)                                    spatial initialisation (9 tokens for 3×3)
    S' = S⁰ + γ₁ ⊙ CrossAttn(LN(S⁰), LN([S⁰ ; X]))                   semantic tokens read all image tokens
    S  = S' + γ₂ ⊙ MLP(LN(S'))                                       γ₁, γ₂: LayerScale (official init 1e-5)
    ... blocks on [CLS ; S] only ...
    X' = X + γ₁ ⊙ CrossAttn(LN(X), LN(S)),  X'' = X' + γ₂ ⊙ MLP(LN(X'))   recovery (STViT-R)

Our six-block ViT (64 patches on an 8×8 grid + CLS), block by block:

    block 0, 1   [CLS ; 64 image tokens] ── ordinary blocks ─────────────────────────────┐ X (8×8)
    block 2      max-pool X 8×8 → 3×3 ─ S⁰ (9) ─┐                                       │
                 queries [CLS ; S⁰] (10) ───────┴─ cross-attn ◀── keys/values [CLS ; S⁰ ; X] (74)
    block 3-5    [CLS ; S] (10 tokens) ── ordinary blocks ── LN ── CLS → head → logits   │
    recovery     X (64) queries S (9) ── cross-attn + MLP ── X'' (8×8) ── per-patch head ─┘→ mask logits

    sem = semantic_vit(base, at=2, pool=3)          # a new classifier; base is not modified
    rec = STViTR(sem)                               # + recovery block and a per-patch head
    logits, mask_logits = rec(images)               # [B, classes], [B, 64]

Our choices at small scale (and where the official code differs):
- One image, one window: the official Swin stage pools every 7×7 window to 3×3 and lets each window's semantic
  tokens read a 10×10 neighbourhood (``unfold``), then a second, global cross-attention block. With a single 8×8
  grid the local window *is* the whole image, so the two become one block: keys/values are all image tokens.
- CLS is kept: it joins the semantic tokens as a query (and a key), the later blocks run on [CLS ; S] and the
  base's CLS head is reused, so a short fine-tune suffices (a mean-pool head over S would need its classifier
  relearnt; a base with ``global_pool="avg"`` gets it for free: ``forward_head`` averages the non-prefix tokens).
- ``shortcut=True`` (default): S⁰ + γ₁·attn, so at γ = 0 the block returns the pooled tokens unchanged, a safe
  start when fine-tuning from a trained base. The official default (``SHORTCUT=False``) drops the S⁰ residual
  (S' = γ₁·attn), which only makes sense when training from scratch for 300 epochs; ``shortcut=False`` gives it.
- The new blocks are initialised from the base block they replace: q from the first third of ``qkv``, k/v from the
  rest, ``proj``, the norms and the MLP copied. The recovery block copies the last base block the same way.
- LayerScale init: the official blocks start at γ = 1e-5 (``SemanticBlock``'s and ``RecoveryBlock``'s default), right
  for blocks trained from scratch. ``semantic_vit`` converts a *trained* base and defaults to γ = 1, so the new block
  starts by computing what the base block computed (for the CLS and pooled queries); with γ = 1e-5 it starts as
  "skip this block" and must relearn it (the lesson compares the two). ``layer_scale_init=1e-5, shortcut=False``
  gives the official start.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from vitlab.checks import check_int as _check_int, check_model as _check_model
from vitlab.models.layers import CrossAttention

if TYPE_CHECKING:
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["semantic_pool", "LayerScale", "SemanticBlock", "RecoveryBlock", "semantic_vit", "STViTR",
           "cross_from_block", "analytic_flops", "step_batches", "finetune", "recovery_features", "train_recovery", "mask_accuracy",
           "for_compare", "DEFAULTS"]

# The lesson's and the comparison's setting: block 3 of the 6-block base becomes a 3x3 semantic-token block that
# reuses the base block (LayerScale 1, S⁰ residual kept); the fine-tune is the chapter's (recipes.finetune_kwargs),
# so the dense control recipes.dense_control is equal-step. On the chapter's 95.9 % base, 100 fine-tuning steps
# (seed 0) bring block 2 to 0.78, block 3 to 0.93, block 4 to 0.95 (the control: 0.96), at 0.47 / 0.61 / 0.75 x the
# FLOPs: block 3 is the middle. The official start is layer_scale_init=1e-5, shortcut=False (the lesson shows it).
DEFAULTS = dict(at=3, pool=3, layer_scale_init=1.0, shortcut=True)

LN = lambda dim: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731  (the base ViT's LayerNorm)


# ------------------------------------------------------------------------------------------------ the pieces
def semantic_pool(tokens: torch.Tensor, grid: tuple[int, int], pool: int = 3) -> torch.Tensor:
    """Spatial initialisation of the semantic tokens: image tokens [B, H·W, D] (row-major on ``grid``) →
    adaptive max-pool to ``pool``×``pool`` → [B, pool², D] (row-major). Bins may overlap (8 → 3: rows 0-2, 2-5, 5-7)."""
    if not torch.is_tensor(tokens) or tokens.ndim != 3:
        raise ValueError(f"semantic_pool: tokens must be [B, N, D], got {tuple(getattr(tokens, 'shape', ()))}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise TypeError(f"semantic_pool: grid must be a (H, W) pair, got {grid!r}")
    H, W = (_check_int(g, "grid", "semantic_pool") for g in grid)
    _check_int(pool, "pool", "semantic_pool")
    B, N, D = tokens.shape
    if N != H * W:
        raise ValueError(f"semantic_pool: tokens hold {N} tokens, expected H*W = {H}*{W} = {H * W}")
    if pool > min(H, W):
        raise ValueError(f"semantic_pool: pool={pool} is larger than the {H}x{W} grid")
    fmap = tokens.transpose(1, 2).reshape(B, D, H, W)
    return F.adaptive_max_pool2d(fmap, pool).flatten(2).transpose(1, 2)  # [B, pool², D]


class LayerScale(nn.Module):
    """x · γ with a learnable per-channel γ (Touvron et al., CaiT), initialised to ``init``."""

    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention block with LayerScale: x + γ₁·Attn(LN(x), LN(context)), then + γ₂·MLP(LN(·)).
    One LayerNorm (``norm1``) for queries and keys, as the official ``Block(x, y)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm1 = LN(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = LN(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init)

    def cross(self, x: torch.Tensor, context: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        a = self.ls1(self.attn(self.norm1(x), self.norm1(context)))
        x = a if residual is None else residual + a
        return x + self.ls2(self.mlp(self.norm2(x)))


class SemanticBlock(_CrossBlock):
    """STViT's semantic-token block: [prefix ; image tokens on ``grid``] [B, p + H·W, D] → [prefix ; S] [B, p + pool², D].

    S⁰ = max-pool of the image tokens; queries [prefix ; S⁰], keys/values [prefix ; S⁰ ; image tokens]
    (``num_prefix`` = CLS/register tokens, which ride along as queries).
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], pool: int = 3, mlp_ratio: float = 4.0,
                 num_prefix: int = 1, layer_scale_init: float = 1e-5, shortcut: bool = True):
        super().__init__(dim, num_heads, mlp_ratio, layer_scale_init)
        self.grid, self.pool = tuple(grid), _check_int(pool, "pool", "SemanticBlock")
        self.num_prefix = _check_int(num_prefix, "num_prefix", "SemanticBlock", low=0)
        if not isinstance(shortcut, bool):
            raise TypeError(f"SemanticBlock: shortcut must be a bool, got {type(shortcut).__name__}")
        self.shortcut = shortcut
        self.last_attn: torch.Tensor | None = None  # [B, H, p + S, p + S + N] when record_attn is set
        self.record_attn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, (H, W) = self.num_prefix, self.grid
        if x.ndim != 3 or x.shape[1] != p + H * W:
            raise ValueError(f"SemanticBlock: x must be [B, {p} + {H}*{W}, D], got {tuple(x.shape)}")
        prefix, image = x[:, :p], x[:, p:]
        queries = torch.cat([prefix, semantic_pool(image, self.grid, self.pool)], dim=1)  # [B, p + S, D]
        context = torch.cat([queries, image], dim=1)                                      # [B, p + S + N, D]
        if self.record_attn:
            _, self.last_attn = self.attn(self.norm1(queries), self.norm1(context), return_probs=True)
        return self.cross(queries, context, queries if self.shortcut else None)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, pool={self.pool}x{self.pool}, num_prefix={self.num_prefix}, shortcut={self.shortcut}"


class RecoveryBlock(_CrossBlock):
    """STViT-R's recovery: image tokens [B, N, D] query the semantic tokens [B, S, D] → [B, N, D] (full resolution)."""

    def forward(self, image: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        return self.cross(image, semantic, image)


@torch.no_grad()
def cross_from_block(cross: _CrossBlock, block: nn.Module) -> _CrossBlock:
    """Copy a base ViT ``Block`` into a cross-attention block: q ← qkv[:D], (k, v) ← qkv[D:], proj, norms, MLP
    (from another cross block: the same tensors, LayerScales left as they are)."""
    D = block.norm1.weight.shape[0]
    if cross.norm1.weight.shape[0] != D or cross.mlp.fc1.weight.shape != block.mlp.fc1.weight.shape:
        raise ValueError(f"cross_from_block: block (dim {D}, mlp {tuple(block.mlp.fc1.weight.shape)}) does not match "
                         f"the cross block (dim {cross.norm1.weight.shape[0]}, mlp {tuple(cross.mlp.fc1.weight.shape)})")
    if isinstance(block, _CrossBlock):  # already split (e.g. a SemanticBlock): copy all but the LayerScales
        state = {k: v for k, v in block.state_dict().items() if not k.startswith(("ls1.", "ls2."))}
        cross.load_state_dict(state, strict=False)
        return cross
    qkv = block.attn.qkv
    cross.attn.q.weight.copy_(qkv.weight[:D])
    cross.attn.kv.weight.copy_(qkv.weight[D:])
    if qkv.bias is not None:
        cross.attn.q.bias.copy_(qkv.bias[:D])
        cross.attn.kv.bias.copy_(qkv.bias[D:])
    for name in ("attn.proj", "norm1", "norm2", "mlp"):
        cross.get_submodule(name).load_state_dict(block.get_submodule(name).state_dict())
    return cross


def _check_vit(model, fn: str) -> nn.Module:
    _check_model(model, fn)
    if not all(hasattr(model, a) for a in ("embed", "blocks", "norm", "forward_head", "patch_embed")):
        raise TypeError(f"{fn}: model must be a vitlab VisionTransformer, got {type(model).__name__}")
    return model


def semantic_vit(base: nn.Module, at: int = 2, pool: int = 3, *, layer_scale_init: float = 1.0,
                 shortcut: bool = True) -> nn.Module:
    """A copy of ``base`` whose block ``at`` is a ``SemanticBlock`` (initialised from that block): blocks before it
    see all tokens, blocks after it see [prefix ; pool² semantic tokens]. ``base`` is not modified.

    ``layer_scale_init``: γ of the new block; 1 reuses the base block as it is, the official code's 1e-5 starts it
    near the identity on the pooled tokens (see the module notes).
    The result is still a ``VisionTransformer`` (its ``forward`` runs ``blocks`` in sequence), so it trains, counts
    FLOPs and measures like the base; ``forward_with_attention`` is not supported on it.
    """
    _check_vit(base, "semantic_vit")
    depth = len(base.blocks)
    _check_int(at, "at", "semantic_vit", low=0)
    if at >= depth:
        raise ValueError(f"semantic_vit: at={at} must index a block of the {depth}-block base (0..{depth - 1})")
    _check_int(pool, "pool", "semantic_vit")
    if isinstance(layer_scale_init, bool) or not isinstance(layer_scale_init, (int, float)) or layer_scale_init < 0:
        raise ValueError(f"semantic_vit: layer_scale_init must be a number >= 0, got {layer_scale_init!r}")
    grid = base.patch_embed.grid_size
    if pool > min(grid):
        raise ValueError(f"semantic_vit: pool={pool} is larger than the base's {grid[0]}x{grid[1]} token grid")
    old = base.blocks[at]
    D = old.norm1.weight.shape[0]
    blk = SemanticBlock(D, old.attn.num_heads, grid, pool, mlp_ratio=old.mlp.fc1.out_features / D,
                        num_prefix=base.num_prefix_tokens, layer_scale_init=layer_scale_init, shortcut=shortcut)
    cross_from_block(blk, old)
    model = copy.deepcopy(base)  # the whole base: ~0.5 M parameters
    model.blocks[at] = blk.to(next(base.parameters()).device)
    model.stvit_at, model.stvit_pool = at, pool
    return model.train(base.training)


class STViTR(nn.Module):
    """STViT-R: a ``semantic_vit`` classifier plus a recovery block and a per-patch head.

    ``forward(images)`` → (class logits [B, classes], mask logits [B, H·W], row-major like ``patch_mask``).
    The recovery block is initialised from the classifier's last block; its image tokens are those that entered
    the semantic block (the official code recovers the tokens the semantic block read, too).
    """

    def __init__(self, sem: nn.Module, layer_scale_init: float = 1e-5):
        super().__init__()
        _check_vit(sem, "STViTR")
        if not isinstance(sem.blocks[getattr(sem, "stvit_at", 0)], SemanticBlock):
            raise TypeError("STViTR: sem must come from semantic_vit(base, ...)")
        self.sem = sem
        last = sem.blocks[-1]
        D = last.norm1.weight.shape[0]
        self.recovery = cross_from_block(RecoveryBlock(D, last.attn.num_heads, last.mlp.fc1.out_features / D,
                                                       layer_scale_init), last)
        self.norm = LN(D)
        self.mask_head = nn.Linear(D, 1)
        nn.init.zeros_(self.mask_head.weight)
        nn.init.zeros_(self.mask_head.bias)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens entering the semantic block [B, N, D], final [prefix ; S] tokens [B, p + S, D])."""
        at, p = self.sem.stvit_at, self.sem.num_prefix_tokens
        x = self.sem.embed(images)
        for blk in self.sem.blocks[:at]:
            x = blk(x)
        image = x[:, p:]
        for blk in self.sem.blocks[at:]:
            x = blk(x)
        return image, x

    def dense(self, image: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """Recovery + per-patch head: mask logits [B, N] from the two token sets of ``tokens``."""
        p = self.sem.num_prefix_tokens
        recovered = self.recovery(image, final[:, p:])  # [B, N, D]: the full grid again
        return self.mask_head(self.norm(recovered)).squeeze(-1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, final = self.tokens(images)
        return self.sem.forward_head(self.sem.norm(final)), self.dense(image, final)


# ------------------------------------------------------------------------------------------------ cost
def _block_macs(n_q: int, n_kv: int, dim: int, mlp_ratio: float) -> float:
    """q, proj, MLP on n_q tokens; k, v on n_kv tokens; QKᵀ and AV over n_q × n_kv pairs."""
    return n_q * (2 + 2 * mlp_ratio) * dim ** 2 + 2 * n_kv * dim ** 2 + 2 * n_q * n_kv * dim


def analytic_flops(model: nn.Module) -> dict:
    """Per-image FLOPs (2 per MAC) of a base ViT or a ``semantic_vit``, from the formula above, and the tokens
    each block's queries are: {"blocks": [..], "tokens": [..], "total": patch embedding + blocks + head}."""
    _check_vit(model, "analytic_flops")
    pe = model.patch_embed
    D, p = model.embed_dim, model.num_prefix_tokens
    n = pe.num_patches + p
    blocks, tokens = [], []
    for blk in model.blocks:
        r = blk.mlp.fc1.out_features / D
        if isinstance(blk, SemanticBlock):
            n_q = p + blk.pool ** 2
            blocks.append(_block_macs(n_q, n_q + n - p, D, r))
            n = n_q
        else:
            blocks.append(_block_macs(n, n, D, r))
        tokens.append(n)
    embed = pe.num_patches * D * pe.in_chans * pe.patch_size ** 2
    head = D * model.num_classes
    return {"blocks": [2 * b for b in blocks], "tokens": tokens, "total": 2 * (embed + sum(blocks) + head)}


# ------------------------------------------------------------------------------------------------ training
def step_batches(train, steps: int, batch_size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of exactly ``steps · batch_size`` examples (seeded permutations of ``train`` laid end to
    end), so that ``fit(..., epochs=1, batch_size=batch_size)`` takes exactly ``steps`` optimizer steps."""
    _check_int(steps, "steps", "step_batches")
    _check_int(batch_size, "batch_size", "step_batches")
    images, labels = train.images, train.labels
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    idx = torch.cat([torch.randperm(len(images), generator=g) for _ in range(math.ceil(need / len(images)))])[:need]
    return images[idx], labels[idx]


def finetune(model: nn.Module, train, *, profile=None, seed: int = 0, steps: int | None = None,
             progress: bool = False) -> dict:
    """The chapter's fine-tune of ``model`` (all parameters): ``fit(model, train, **recipes.finetune_kwargs(profile),
    seed=seed)`` (AdamW lr 1e-4, warm-up + cosine, label smoothing 0.1, ±2 px shifts, batch 64,
    ``finetune_steps(profile)`` steps; ``steps`` overrides the count). In place; returns fit's history, plus
    ``losses``: the training loss of every step."""
    from vitlab.methods.efficient import recipes
    from vitlab.train import fit

    _check_model(model, "finetune")
    kw = recipes.finetune_kwargs(profile)
    if steps is not None:
        kw["steps"] = _check_int(steps, "steps", "finetune")
    losses: list[float] = []
    smoothing = kw["label_smoothing"]

    def loss_fn(logits, y):  # fit's own loss (label-smoothed CE), recorded per step for the lesson's curve
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        losses.append(loss.item())
        return loss

    hist = fit(model, train, None, profile=profile, **kw, seed=seed, progress=progress, desc="stvit", loss_fn=loss_fn)
    hist["losses"] = losses
    return hist


@torch.no_grad()
def recovery_features(rec: STViTR, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen classifier's ``rec.tokens`` for all ``images``, in batches: (image tokens, final tokens)."""
    if not isinstance(rec, STViTR):
        raise TypeError(f"recovery_features: rec must be an STViTR, got {type(rec).__name__}")
    dev = next(rec.parameters()).device
    was = rec.sem.training
    rec.sem.eval()
    feats = [rec.tokens(images[i:i + batch_size].to(dev)) for i in range(0, len(images), batch_size)]
    rec.sem.train(was)
    return tuple(torch.cat(t) for t in zip(*feats))


def train_recovery(rec: STViTR, train, steps: int, *, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
                   features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """Train the recovery block and the per-patch head (the classifier frozen) with BCE on ``patch_mask(train.masks)``.

    The frozen backbone's tokens are computed once for the whole set (or passed as ``features``, from
    ``recovery_features``, to share them between runs), so each step costs only the recovery block.
    Returns the loss per step.
    """
    from vitlab.data import patch_mask
    from vitlab.train import lr_lambda

    if not isinstance(rec, STViTR):
        raise TypeError(f"train_recovery: rec must be an STViTR, got {type(rec).__name__}")
    if getattr(train, "masks", None) is None:
        raise ValueError("train_recovery: train must carry .masks (cluttered_scenes does)")
    _check_int(steps, "steps", "train_recovery")
    targets = patch_mask(train.masks, rec.sem.patch_embed.patch_size).float()
    dev = next(rec.parameters()).device
    image, final = recovery_features(rec, train.images) if features is None else features
    if image.shape[0] != len(targets):
        raise ValueError(f"train_recovery: features hold {image.shape[0]} images, train has {len(targets)}")
    rec.sem.eval().requires_grad_(False)
    params = [p for n, p in rec.named_parameters() if not n.startswith("sem.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 10)))
    g = torch.Generator().manual_seed(seed)
    rec.train()
    rec.sem.eval()  # the frozen classifier stays in eval mode
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(image), (batch_size,), generator=g)
        loss = F.binary_cross_entropy_with_logits(rec.dense(image[idx], final[idx]), targets[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    rec.sem.requires_grad_(True)
    rec.eval()
    return losses


@torch.no_grad()
def mask_accuracy(rec: STViTR, data, *, batch_size: int = 256) -> dict:
    """Per-patch accuracy of the mask head on ``data`` (with .masks), the all-background rate and the digit IoU."""
    from vitlab.data import patch_mask

    if not isinstance(rec, STViTR):
        raise TypeError(f"mask_accuracy: rec must be an STViTR, got {type(rec).__name__}")
    truth = patch_mask(data.masks, rec.sem.patch_embed.patch_size)
    dev = next(rec.parameters()).device
    was = rec.training
    rec.eval()
    pred = torch.cat([rec(data.images[i:i + batch_size].to(dev))[1].cpu() > 0
                      for i in range(0, len(data.images), batch_size)])
    rec.train(was)
    inter, union = (pred & truth).sum().item(), (pred | truth).sum().item()
    return {"accuracy": (pred == truth).float().mean().item(), "background_rate": 1 - truth.float().mean().item(),
            "iou": inter / max(union, 1), "pred": pred, "truth": truth}


# ------------------------------------------------------------------------------------------------ comparison
def for_compare(base, train, profile, *, seed: int = 0) -> Reduced:
    """Chapter 2's entry: block 3 of the base → a 3×3 semantic-token block (``DEFAULTS``: the base block reused,
    LayerScale 1), fine-tuned by the chapter's recipe (``recipes.finetune_kwargs``) with ``seed``. Blocks 4-5 then
    see 10 tokens instead of 65. The lesson's main model is exactly this, for each seed."""
    from vitlab.methods.efficient.recipes import Reduced, finetune_steps
    from vitlab.profiles import profile as get_profile

    _check_vit(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    P = get_profile(profile)
    at = min(DEFAULTS["at"], len(base.blocks) - 1)
    model = semantic_vit(base, at=at, pool=DEFAULTS["pool"], layer_scale_init=DEFAULTS["layer_scale_init"],
                         shortcut=DEFAULTS["shortcut"])
    hist = finetune(model, train, profile=P, seed=seed)
    tokens = analytic_flops(model)["tokens"]
    return Reduced(model.eval(), [float(t) for t in tokens], None,
                   note=f"{DEFAULTS['pool']}x{DEFAULTS['pool']} semantic tokens from block {at}; "
                        f"{finetune_steps(P)} fine-tune steps", extra={"history": hist})
