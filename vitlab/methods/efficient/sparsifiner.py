"""Sparsifiner: learned, instance-dependent sparse attention (Wei et al., CVPR 2023, arXiv:2303.13755).

Official code: https://github.com/lim142857/Sparsifiner (``src/models/sparsifiner.py``: ``MaskPredictor``,
``Attention``; ``src/losses.py``; ``experiments-results-analysis/experiments/sparsifiner_default_config.yaml``).
Written from the paper and that code; nothing of theirs is copied.

Each query token attends to only ceil(r·N) keys (r = 0.25): which ones is predicted per image, per head, per
block, by a cheap low-rank *connectivity predictor* fed with the block's own per-head q, k [B, H, N, d]:

    q̃ = q·W_q,  k̃ = k·W_k                  channels d → d/2        (proj_c_q, proj_c_k: Linear)
    k̂ = k̃ᵀ·P_n                             tokens   N → n' = N//6  (proj_n: [N, n'])
    β = softmax(q̃ k̂ · H^-½)                 [B, H, N-1, n']  CLS query dropped; scaled by num_heads^-½ as the code
    Â = β · B                               [B, H, N-1, N]   B = proj_back_nᵀ: n' basis rows over the N keys
    mask = top-ceil(r·N) keys of each row of Â,  CLS row kept dense,  detached (no gradient)
    attn = nan_to_num(softmax(QKᵀ/√d  with −inf outside the mask)) · V

    outside reconstruction training (stage 2 and inference) the predictor is sparsified, as in the code:
        B ← |B| where |B| > 0.02, else 0       (nn.Threshold(0.02, 0) on |B|)
        β ← its top-8 entries per row, the rest 0

        q, k ──► predictor ──► Â [N-1 × N] ──top-k──► mask ┐
        q, k, v ───────────────────────────────────────────┴──► masked softmax(QKᵀ)·V

Training (the official default: 5 epochs, then 45; here ``finetune_steps(profile)`` steps in all, split by
``DEFAULTS["predictor_share"]``: 70 % train the predictors, 30 % fine-tune the backbone by the chapter's recipe, so
the backbone sees 30 % of the steps of the equal-step dense control ``recipes.dense_control``):
    stage 1  attention reconstruction: only the predictors learn; attention stays dense;
             loss = 0.01 · mean over blocks of MSE_sum(Â, teacher attention rows 1..N-1)   (teacher: the frozen base)
    stage 2  masked-attention fine-tuning: the backbone learns, the predictors are frozen;
             loss = CE + 0.5·KL(student ‖ teacher logits) + 0.5·MSE(last-layer patch tokens)

MHSA cost per block (FLOPs = 2 per multiply-accumulate, D = H·d; ``mhsa_flops``):
    dense     QKᵀ + AV = 2 · 2·N²·D
    sparse    QKᵀ + AV = 2 · 2·((N-1)·k + N)·D,  k = ceil(r·N)          (the CLS row stays dense)
    predictor 2 · [2·N·H·d·c  +  H·c·N·n'  +  H·(N-1)·c·n'  +  H·(N-1)·t·N],  c = d//2, t = min(8, n')
The flop counter sees the dense masked product we run on CPU, not this saving; and a dense masked attention is
not faster in wall-clock: only a sparse kernel (``sparse_attention``: gather the k kept keys per query,
O(N·k·d)) turns the saving into time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from tqdm.auto import tqdm

from vitlab.checks import check_heads, check_number, check_int as _check_int, check_model as _check_model
from vitlab.train import lr_lambda

if TYPE_CHECKING:  # a type only: recipes imports this module
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["KEEP_RATE", "REDUCE_N", "REDUCE_C", "BASIS_THRESHOLD", "COEF_TOPK", "MASKS", "attention_budget",
           "connectivity_mask", "masked_attention", "sparse_attention", "window_mask", "random_mask",
           "ConnectivityPredictor", "SparseAttention", "sparsify", "sparse_layers", "set_stage", "last_masks",
           "recon_loss", "distill_loss", "train_predictor", "finetune", "stage_steps", "attention_recall",
           "mhsa_flops", "model_gflops", "for_compare", "DEFAULTS"]

KEEP_RATE = 0.25  # ATTN_KEEP_RATE
REDUCE_N = 6  # REDUCE_N_FACTOR
REDUCE_C = 2  # REDUCE_C_FACTOR
BASIS_THRESHOLD = 2e-2  # BASIS_THRESHOLD
COEF_TOPK = 8  # BASIS_COEF.TOPK
RECON_WEIGHT, KL_WEIGHT, TOKEN_WEIGHT = 0.01, 0.5, 0.5  # LOSS.ATTN_RECON / CLS_DISTILL / TOKEN_DISTILL weights
MASKS = ("predicted", "window", "random", "oracle", "dense")
# The lesson's and the comparison's setting. Stage 2 (the backbone) is the chapter's fine-tune
# (recipes.finetune_kwargs: AdamW lr 1e-4, cosine, label smoothing 0.1, ±2 px shifts, batch 64); stage 1 trains only
# the new predictors, at their own lr (a few dozen steps instead of 5 ImageNet epochs: a larger lr than the paper's).
DEFAULTS = dict(
    keep_rate=KEEP_RATE,
    predictor_lr=1e-2,  # stage 1: the predictors' AdamW lr (10 % warm-up, cosine, no augmentation)
    # of finetune_steps(profile): stage 1 gets this share, stage 2 the rest. Predictor steps are cheap (no teacher
    # forward, no backbone gradient) and at this budget the masks matter most: seed 2 of the cpu profile ends at 0.939
    # with 70 + 30 steps, 0.935 with 50 + 50 (the paper's 5 + 45 epochs give the backbone far more)
    predictor_share=0.7,
)


# ------------------------------------------------------------------------------------------------ checks

def _check_qkv(fn: str, **tensors) -> None:
    shape = None
    for name, t in tensors.items():
        if not torch.is_tensor(t) or t.ndim != 4:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a tensor [B, H, N, d], got {got}")
        shape = shape or t.shape
        if t.shape != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} like the others")


def attention_budget(num_tokens: int, keep_rate: float = KEEP_RATE) -> int:
    """Keys each (non-CLS) query keeps: ceil(keep_rate · num_tokens), as the code's ``attn_budget``."""
    _check_int(num_tokens, "num_tokens", "attention_budget")
    keep_rate = check_number(keep_rate, "keep_rate", "attention_budget", low=0, low_open=True, high=1)
    return math.ceil(keep_rate * num_tokens)


# ------------------------------------------------------------------------------------------------ masks
def connectivity_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Boolean mask [B, H, N, N] from connectivity scores [B, H, N-1, N] of the non-CLS queries: each of their rows
    keeps its ``budget`` highest-scoring keys; the CLS query's row (row 0) is kept whole. Detached."""
    if not torch.is_tensor(scores) or scores.ndim != 4 or scores.shape[-2] != scores.shape[-1] - 1:
        got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"connectivity_mask: scores must be a tensor [B, H, N-1, N], got {got}")
    B, H, _, N = scores.shape
    _check_int(budget, "budget", "connectivity_mask")
    if budget > N:
        raise ValueError(f"connectivity_mask: budget={budget} exceeds the {N} keys")
    scores = scores.detach()
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, scores.topk(budget, dim=-1, sorted=False).indices, True)
    cls_row = torch.ones(B, H, 1, N, dtype=torch.bool, device=scores.device)
    return torch.cat([cls_row, keep], dim=2)


def window_mask(grid: tuple[int, int], budget: int, prefix: int = 1) -> torch.Tensor:
    """The fixed local baseline [N, N]: each patch query keeps the CLS key(s) and its ``budget - prefix`` nearest
    patches on the grid (Euclidean distance, itself first, ties by index); the prefix rows stay dense."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"window_mask: grid must be (rows, cols) of positive ints, got {grid!r}")
    _check_int(prefix, "prefix", "window_mask", low=0)
    gh, gw = grid
    n = prefix + gh * gw
    _check_int(budget, "budget", "window_mask", low=prefix + 1)
    if budget > n:
        raise ValueError(f"window_mask: budget={budget} exceeds the {n} keys")
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()  # [P, 2]
    dist = torch.cdist(pos, pos) + torch.arange(gh * gw) * 1e-4  # tie-break by index
    near = dist.topk(budget - prefix, dim=-1, largest=False).indices + prefix  # [P, budget - prefix]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:prefix] = True
    mask[prefix:, :prefix] = True
    mask[prefix:].scatter_(-1, near, True)
    return mask


def random_mask(num_tokens: int, budget: int, num_heads: int = 1, *, seed: int = 0) -> torch.Tensor:
    """The fixed random baseline [num_heads, N, N]: each non-CLS query keeps ``budget`` keys drawn at random (one
    draw per head, fixed for all images); the CLS row stays dense."""
    _check_int(num_tokens, "num_tokens", "random_mask", low=2)
    _check_int(budget, "budget", "random_mask")
    _check_int(num_heads, "num_heads", "random_mask")
    _check_int(seed, "seed", "random_mask", low=0)
    if budget > num_tokens:
        raise ValueError(f"random_mask: budget={budget} exceeds the {num_tokens} keys")
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, num_heads, num_tokens - 1, num_tokens, generator=g)
    return connectivity_mask(scores, budget)[0]


# ------------------------------------------------------------------------------------------------ attention
def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scale) v with the logits outside ``mask`` (bool, broadcast to [B, H, N, N]) set to −inf; a row
    with no key left gives zeros (nan_to_num), as in the code. Returns (out [B, H, N, d], probs [B, H, N, N])."""
    _check_qkv("masked_attention", q=q, k=k, v=v)
    logits = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        logits = logits + attn_bias
    if mask is not None:
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise TypeError(f"masked_attention: mask must be a bool tensor, got "
                            f"{mask.dtype if torch.is_tensor(mask) else type(mask).__name__}")
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(logits.float().softmax(dim=-1)).to(q.dtype)
    return probs @ v, probs


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The same result as ``masked_attention`` at O(N·k·d): the CLS query attends to all keys, every other query
    only to the ``k`` keys in ``index`` [B, H, N-1, k] (gathered, never an N×N matrix). A reference sparse kernel."""
    _check_qkv("sparse_attention", q=q, k=k, v=v)
    B, H, N, d = q.shape
    if not torch.is_tensor(index) or index.shape[:3] != (B, H, N - 1) or index.ndim != 4:
        got = tuple(index.shape) if torch.is_tensor(index) else type(index).__name__
        raise ValueError(f"sparse_attention: index must be [B, H, N-1, k] = [{B}, {H}, {N - 1}, k], got {got}")
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)  # [B, H, 1, d]
    kk = index.shape[-1]
    idx = index.reshape(B, H, (N - 1) * kk, 1).expand(-1, -1, -1, d)
    k_sel = k.gather(2, idx).reshape(B, H, N - 1, kk, d)  # the kept keys of every query
    v_sel = v.gather(2, idx).reshape(B, H, N - 1, kk, d)
    logits = torch.einsum("bhnd,bhnkd->bhnk", q[:, :, 1:] * scale, k_sel)
    rest = torch.einsum("bhnk,bhnkd->bhnd", logits.softmax(dim=-1), v_sel)
    return torch.cat([cls, rest], dim=2)


# ------------------------------------------------------------------------------------------------ modules
class ConnectivityPredictor(nn.Module):
    """The low-rank connectivity predictor of one block (the code's ``MaskPredictor``).

    forward(q, k) [B, H, N, d] → Â [B, H, N-1, N]; ``sparse`` zeroes |B| ≤ basis_threshold (keeping |B|, as the
    code's nn.Threshold on |B| does) and keeps β's top ``coef_topk`` entries per row.
    """

    def __init__(self, head_dim: int, num_heads: int, num_tokens: int, reduce_n: int = REDUCE_N,
                 reduce_c: int = REDUCE_C, basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK):
        super().__init__()
        for name, val in (("head_dim", head_dim), ("num_heads", num_heads), ("num_tokens", num_tokens),
                          ("reduce_n", reduce_n), ("reduce_c", reduce_c), ("coef_topk", coef_topk)):
            _check_int(val, name, "ConnectivityPredictor")
        if head_dim // reduce_c < 1 or num_tokens // reduce_n < 1:
            raise ValueError(f"ConnectivityPredictor: reduce_c={reduce_c} / reduce_n={reduce_n} leave no channel / "
                             f"token of head_dim={head_dim} / num_tokens={num_tokens}")
        if not (isinstance(basis_threshold, (int, float)) and basis_threshold >= 0):
            raise ValueError(f"ConnectivityPredictor: basis_threshold must be a number >= 0, got {basis_threshold!r}")
        self.num_heads, self.num_tokens = num_heads, num_tokens
        self.reduced_c, self.reduced_n = head_dim // reduce_c, num_tokens // reduce_n
        self.scale = num_heads ** -0.5  # sic: the official code scales by num_heads, not the head width
        self.basis_threshold, self.coef_topk = float(basis_threshold), coef_topk
        self.proj_c_q = nn.Linear(head_dim, self.reduced_c)
        self.proj_c_k = nn.Linear(head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n), std=0.02))
        self.proj_back_n = nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n), std=0.02))

    def basis(self, sparse: bool = True) -> torch.Tensor:
        """B [n', N]: the rows Â is built from; sparse: |B| where |B| > basis_threshold, else 0."""
        b = self.proj_back_n.t()
        return b.abs() * (b.abs() > self.basis_threshold) if sparse else b

    def coefficients(self, q: torch.Tensor, k: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        """β [B, H, N-1, n'] = softmax(q̃ k̂ · num_heads^-½) for the non-CLS queries; sparse: its top-t entries."""
        q, k = self.proj_c_q(q[:, :, 1:]), self.proj_c_k(k)  # [B, H, N-1, c], [B, H, N, c]
        k_hat = k.transpose(-2, -1) @ self.proj_n  # [B, H, c, n']: N tokens → n'
        coef = ((q @ k_hat) * self.scale).softmax(dim=-1)  # [B, H, N-1, n']
        if sparse:
            top = coef.topk(min(self.coef_topk, self.reduced_n), dim=-1, sorted=False)
            coef = torch.zeros_like(coef).scatter(-1, top.indices, top.values)
        return coef

    def forward(self, q: torch.Tensor, k: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        _check_qkv("ConnectivityPredictor", q=q, k=k)
        if q.shape[1] != self.num_heads or q.shape[2] != self.num_tokens:
            raise ValueError(f"ConnectivityPredictor: q has {q.shape[1]} heads and {q.shape[2]} tokens, expected "
                             f"{self.num_heads} and {self.num_tokens}")
        return self.coefficients(q, k, sparse) @ self.basis(sparse)  # Â [B, H, N-1, N]

    def extra_repr(self) -> str:
        return (f"tokens {self.num_tokens}->{self.reduced_n}, channels ->{self.reduced_c}, "
                f"basis_threshold={self.basis_threshold}, coef_topk={self.coef_topk}")


class SparseAttention(nn.Module):
    """A ViT ``Attention`` (its qkv and proj, taken over, not copied) whose queries each attend to ``budget`` keys.

    mask_mode: "predicted" (Sparsifiner: top-k of the predictor's Â, per image and head), "window" / "random"
    (fixed masks given as ``fixed_mask``), "oracle" (top-k of the exact logits q·kᵀ: what the predictor tries to
    match; it needs the full QKᵀ, so it saves nothing: a diagnostic), "dense" (no mask). ``recon=True`` in training = stage 1: dense attention,
    the raw (un-sparsified) predictor, whose Â is kept in ``last_approx`` for the reconstruction loss.
    Every forward keeps the mask it used in ``last_mask`` ([B, H, N, N] bool, or None when dense).
    """

    def __init__(self, attn: nn.Module, num_tokens: int, *, keep_rate: float = KEEP_RATE, mask_mode: str = "predicted",
                 fixed_mask: torch.Tensor | None = None, reduce_n: int = REDUCE_N, reduce_c: int = REDUCE_C,
                 basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK):
        super().__init__()
        if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim", "scale")):
            raise TypeError(f"SparseAttention: attn must be a vitlab/timm Attention (qkv, proj, num_heads), "
                            f"got {type(attn).__name__}")
        if mask_mode not in MASKS:
            raise ValueError(f"SparseAttention: mask_mode must be one of {MASKS}, got {mask_mode!r}")
        if mask_mode in ("window", "random") and fixed_mask is None:
            raise ValueError(f"SparseAttention: mask_mode={mask_mode!r} needs a fixed_mask")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.num_tokens = num_tokens
        self.keep_rate = check_number(keep_rate, "keep_rate", "SparseAttention", low=0, low_open=True, high=1)
        self.budget = attention_budget(num_tokens, keep_rate)
        self.mask_mode, self.recon = mask_mode, False
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name, nn.Identity()))
        self.predictor = ConnectivityPredictor(self.head_dim, self.num_heads, num_tokens, reduce_n, reduce_c,
                                               basis_threshold, coef_topk) if mask_mode == "predicted" else None
        self.register_buffer("fixed_mask", fixed_mask, persistent=False)
        self.last_mask: torch.Tensor | None = None
        self.last_approx: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None  # stage 1: this block's own dense attention (no gradient)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, side=()):
        B, N, C = x.shape
        if N != self.num_tokens:
            raise ValueError(f"SparseAttention: x has {N} tokens, the predictor was built for {self.num_tokens}")
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, N, d]
        recon = self.training and self.recon
        mask, self.last_approx = None, None
        self.last_probs = None
        if self.mask_mode == "predicted":
            if recon:  # stage 1 only needs Â (with its gradient) and, for the loss, this block's dense attention
                self.last_approx = self.predictor(q, k, sparse=False)  # Â [B, H, N-1, N]
                with torch.no_grad():
                    self.last_probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            else:  # the mask carries no gradient, so the (frozen) predictor needs none either
                with torch.no_grad():
                    self.last_approx = self.predictor(q, k, sparse=True)
                mask = connectivity_mask(self.last_approx, self.budget)
        elif self.mask_mode == "oracle":
            mask = connectivity_mask((q @ k.transpose(-2, -1))[:, :, 1:], self.budget)
        elif self.mask_mode in ("window", "random"):
            mask = self.fixed_mask.to(x.device).expand(B, self.num_heads, N, N)
        self.last_mask = mask
        if recon:  # stage 1: the model's attention stays dense
            mask = None
        if side:  # the explicit rule, when the probabilities are asked for
            out, probs = masked_attention(q, k, v, mask, self.scale, attn_bias)
            sides = {"probs": probs, "cls": probs[:, :, 0], "colsum": probs.sum(dim=-2),
                     "diag": probs.diagonal(dim1=-2, dim2=-1)}
        else:  # the same numbers through SDPA (every row keeps >= 1 key, so no row is all −inf)
            # the mask as an additive -inf bias: the same numbers as a boolean mask, but CPU SDPA runs its fused
            # kernel on a float bias and falls back to the slower explicit path on a boolean one
            bias = attn_bias if mask is None else \
                torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            if mask is not None and attn_bias is not None:
                bias = bias + attn_bias
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, C))))
        if side:
            side = (side,) if isinstance(side, str) else tuple(side)
            return x, {s: sides[s] for s in side}
        return x

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, tokens={self.num_tokens}, keep {self.budget} keys ({self.mask_mode})"


def sparse_layers(model: nn.Module) -> list[SparseAttention]:
    """The model's ``SparseAttention`` modules, block by block."""
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def sparsify(base: nn.Module, *, keep_rate: float = KEEP_RATE, mask: str = "predicted", reduce_n: int = REDUCE_N,
             reduce_c: int = REDUCE_C, basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK,
             seed: int = 0) -> nn.Module:
    """A copy of the ViT ``base`` whose every block attends through a ``SparseAttention`` (``base`` untouched).

    mask: "predicted" (Sparsifiner; the predictors start untrained: run ``train_predictor``), "window" (each patch
    keeps the CLS key and its nearest patches), "random" (a fixed random draw per block and head), "oracle" (top-k
    of the exact attention logits, a diagnostic upper bound) or "dense".
    Every mode keeps ceil(keep_rate · N) keys per non-CLS query. ``seed`` fixes the predictors' initialisation and
    the random masks. The state dict is the base model's plus ``blocks.i.attn.predictor.*``.
    """
    _check_model(base, "sparsify")
    if not (hasattr(base, "blocks") and hasattr(base, "patch_embed")):
        raise TypeError(f"sparsify: base must be a VisionTransformer (blocks, patch_embed), got {type(base).__name__}")
    if mask not in MASKS:
        raise ValueError(f"sparsify: mask must be one of {MASKS}, got {mask!r}")
    check_number(keep_rate, "keep_rate", "sparsify", low=0, low_open=True, high=1)
    _check_int(seed, "seed", "sparsify", low=0)
    prefix = getattr(base, "num_prefix_tokens", 1)
    if prefix != 1:
        raise ValueError(f"sparsify: the mask keeps row 0 (CLS) dense: base must have exactly one prefix token, "
                         f"got {prefix}")
    n = base.patch_embed.num_patches + prefix
    budget = attention_budget(n, keep_rate)
    model = copy.deepcopy(base)
    device = next(base.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, blk in enumerate(model.blocks):
            fixed = None
            if mask == "window":
                fixed = window_mask(base.patch_embed.grid_size, budget, prefix)
            elif mask == "random":
                fixed = random_mask(n, budget, blk.attn.num_heads, seed=seed * 1000 + i)
            blk.attn = SparseAttention(blk.attn, n, keep_rate=keep_rate, mask_mode=mask, fixed_mask=fixed,
                                       reduce_n=reduce_n, reduce_c=reduce_c, basis_threshold=basis_threshold,
                                       coef_topk=coef_topk).to(device)
    return model.eval()


def set_stage(model: nn.Module, stage: str) -> nn.Module:
    """"recon" (stage 1: dense attention, raw predictor) or "sparse" (stage 2 and inference) on every block."""
    if stage not in ("recon", "sparse"):
        raise ValueError(f"set_stage: stage must be 'recon' or 'sparse', got {stage!r}")
    layers = sparse_layers(_check_model(model, "set_stage"))
    if not layers:
        raise ValueError("set_stage: model has no SparseAttention; build it with sparsify(base)")
    for m in layers:
        m.recon = stage == "recon"
    return model


@torch.no_grad()
def last_masks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The masks [B, H, N, N] (bool) every block uses on ``images`` (one eval forward)."""
    layers = sparse_layers(_check_model(model, "last_masks"))
    was = model.training
    model.eval()
    model(images)
    model.train(was)
    return [m.last_mask for m in layers]


# ------------------------------------------------------------------------------------------------ losses
def recon_loss(approx: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
    """Stage 1: mean over blocks of MSE(Â, teacher attention without its CLS row), reduction 'sum' (the code's)."""
    if len(approx) != len(teacher_probs) or not approx:
        raise ValueError(f"recon_loss: need one teacher attention per block, got {len(approx)} approximations and "
                         f"{len(teacher_probs)} attentions")
    return sum(F.mse_loss(a, t[:, :, 1:], reduction="sum") for a, t in zip(approx, teacher_probs)) / len(approx)


def distill_loss(logits, tokens, labels, t_logits, t_tokens, *, label_smoothing: float = 0.1) -> torch.Tensor:
    """Stage 2: CE + 0.5·KL(teacher ‖ student logits, batchmean) + 0.5·MSE(final patch tokens), the code's weights."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)
    return ce + KL_WEIGHT * kl + TOKEN_WEIGHT * F.mse_loss(tokens, t_tokens)


# ------------------------------------------------------------------------------------------------ training
def _adamw(named, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in named if p.ndim >= 2 and n not in ("pos_embed", "cls_token", "reg_token")]
    ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for _, p in named if id(p) not in ids], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _run(params: list, named, loss_of, train, steps: int, lr: float, batch_size: int, seed: int,
         progress: bool, desc: str) -> list[float]:
    """AdamW (decay 0.05) with 10 % warm-up and a cosine, gradient clipping at 1, ``steps`` batches of a seeded
    shuffle (no augmentation): the loop both stages share."""
    images, labels = (train.images, train.labels) if hasattr(train, "images") else train
    device = params[0].device
    opt = _adamw(named, lr, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 10)))
    g = torch.Generator().manual_seed(seed)
    perm, pos, losses = torch.randperm(len(images), generator=g), 0, []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if pos + batch_size > len(images):
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = loss_of(images[idx].to(device), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _check_train(model, teacher, train, steps, batch_size, fn):
    _check_model(model, fn)
    _check_model(teacher, fn)
    if not (hasattr(train, "images") or (isinstance(train, (tuple, list)) and len(train) == 2)):
        raise TypeError(f"{fn}: train must be an ImageDataset or (images, labels), got {type(train).__name__}")
    _check_int(steps, "steps", fn)
    _check_int(batch_size, "batch_size", fn)
    if not sparse_layers(model):
        raise ValueError(f"{fn}: model has no SparseAttention; build it with sparsify(base)")


def train_predictor(model: nn.Module, teacher: nn.Module, train, *, steps: int, lr: float = DEFAULTS["predictor_lr"],
                    batch_size: int = 64, seed: int = 0, progress: bool = False) -> list[float]:
    """Stage 1, attention reconstruction: only the predictors learn (AdamW), the attention stays dense, the loss is
    0.01 · ``recon_loss`` against the frozen ``teacher``'s attention. Returns the loss per step; model left in eval."""
    _check_train(model, teacher, train, steps, batch_size, "train_predictor")
    layers = [m for m in sparse_layers(model) if m.predictor is not None]
    if not layers:
        raise ValueError("train_predictor: model has no predictor (mask='predicted')")
    named = [(n, p) for i, m in enumerate(layers) for n, p in m.predictor.named_parameters()]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    teacher.eval()

    # Stage 1 starts from a copy of the teacher with the attention dense: while the backbone still equals the
    # teacher's, the model's own attention IS the teacher's, so one forward gives both (half the cost).
    t_state, m_state = teacher.state_dict(), model.state_dict()
    own = all(k in m_state and torch.equal(m_state[k], v) for k, v in t_state.items())

    def loss_of(x, y):
        if own:
            model(x)
            return RECON_WEIGHT * recon_loss([m.last_approx for m in layers], [m.last_probs for m in layers])
        with torch.no_grad():
            _, sides = teacher.forward_with_attention(x, side=("probs",))
        model(x)
        return RECON_WEIGHT * recon_loss([m.last_approx for m in layers], [s["probs"] for s in sides])

    set_stage(model, "recon").train()
    try:
        return _run([p for _, p in named], named, loss_of, train, steps, lr, batch_size, seed, progress, "stage 1")
    finally:
        set_stage(model, "sparse").eval()
        for p, f in flags.items():
            p.requires_grad_(f)


def stage_steps(profile=None) -> tuple[int, int]:
    """(stage-1, stage-2) steps: ``finetune_steps(profile)`` split by ``DEFAULTS["predictor_share"]`` (cpu: 70 + 30);
    their sum is the dense control's step count."""
    from vitlab.methods.efficient.recipes import finetune_steps

    total = finetune_steps(profile)
    first = min(total - 1, max(1, round(total * DEFAULTS["predictor_share"])))
    return first, total - first


def finetune(model: nn.Module, teacher: nn.Module, train, *, profile=None, seed: int = 0, steps: int | None = None,
             progress: bool = False) -> dict:
    """Stage 2, masked-attention fine-tuning by the chapter's recipe: ``fit(model, train,
    **recipes.finetune_kwargs(profile), seed=seed)`` with ``steps`` (default: stage 2's share, ``stage_steps``) and a
    step_fn computing ``distill_loss`` from the dense ``teacher``. The backbone learns, the predictors are frozen.
    The same recipe serves the window and random baselines. Returns fit's history with ``losses`` (per step);
    model left in eval."""
    from vitlab.methods.efficient import recipes
    from vitlab.train import fit

    kw = recipes.finetune_kwargs(profile)
    kw["steps"] = stage_steps(profile)[1] if steps is None else steps
    _check_train(model, teacher, train, kw["steps"], kw["batch_size"], "finetune")
    flags = {p: p.requires_grad for p in model.parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(".predictor." not in n)
    teacher.eval()
    losses: list[float] = []
    smoothing = kw["label_smoothing"]

    def step_fn(net, x, y):
        with torch.no_grad():
            t_feats = teacher.forward_features(x)
            t_logits = teacher.forward_head(t_feats)
        feats = net.forward_features(x)
        logits = net.forward_head(feats)
        loss = distill_loss(logits, feats[:, 1:], y, t_logits, t_feats[:, 1:], label_smoothing=smoothing)
        losses.append(loss.item())
        return loss, logits

    set_stage(model, "sparse").train()
    try:
        hist = fit(model, train, None, profile=profile, **kw, seed=seed, step_fn=step_fn, progress=progress,
                   desc="stage 2")
    finally:
        model.eval()
        for p, f in flags.items():
            p.requires_grad_(f)
    hist["losses"] = losses
    return hist


@torch.no_grad()
def attention_recall(model: nn.Module, teacher: nn.Module, images: torch.Tensor) -> list[float]:
    """Per block, the share of the dense ``teacher``'s attention (non-CLS query rows, averaged) that falls on the
    keys the model's masks keep: 1.0 means the mask loses nothing of the attention it replaces."""
    _check_model(teacher, "attention_recall")
    masks = last_masks(model, images)
    _, sides = teacher.forward_with_attention(images, side=("probs",))
    return [(s["probs"][:, :, 1:] * m[:, :, 1:]).sum(-1).mean().item() for s, m in zip(sides, masks)]


# ------------------------------------------------------------------------------------------------ cost
def mhsa_flops(num_tokens: int, dim: int, num_heads: int, *, keep_rate: float | None = None,
               predictor: bool = True, reduce_n: int = REDUCE_N, reduce_c: int = REDUCE_C,
               coef_topk: int = COEF_TOPK) -> dict:
    """Analytic FLOPs (2 per multiply-accumulate) of one block's attention products, per image.

    keep_rate None: dense, attention = 2·2·N²·D. Otherwise each non-CLS query keeps k = ceil(keep_rate·N) keys and
    the CLS row stays dense: attention = 2·2·((N-1)·k + N)·D; with ``predictor`` its cost is added:
    2·[2·N·H·d·c (q̃, k̃) + H·c·N·n' (k̂) + H·(N-1)·c·n' (β) + H·(N-1)·t·N (Â = β·B)], c = d//reduce_c,
    n' = N//reduce_n, t = min(coef_topk, n'). Softmax, top-k and masking are not counted (as the flop counter).
    Returns {attention, predictor, total}.
    """
    _check_int(num_tokens, "num_tokens", "mhsa_flops")
    check_heads(dim, num_heads, "mhsa_flops")
    N, D, H = num_tokens, dim, num_heads
    if keep_rate is None:
        return {"attention": 4 * N * N * D, "predictor": 0, "total": 4 * N * N * D}
    k = attention_budget(N, keep_rate)
    attention = 4 * ((N - 1) * k + N) * D
    pred = 0
    if predictor:
        d = D // H
        c, n_red = d // reduce_c, N // reduce_n
        t = min(coef_topk, n_red)
        pred = 2 * (2 * N * H * d * c + H * c * N * n_red + H * (N - 1) * c * n_red + H * (N - 1) * t * N)
    return {"attention": attention, "predictor": pred, "total": attention + pred}


def model_gflops(base: nn.Module, images: torch.Tensor, *, keep_rate: float | None = KEEP_RATE,
                 predictor: bool = True) -> float:
    """Per-image GFLOPs of ``base`` with every block's attention products replaced by ``mhsa_flops``: the flop
    counter's count of the dense model, minus its dense QKᵀ and AV, plus the sparse ones (and the predictor)."""
    from vitlab import measure

    _check_model(base, "model_gflops")
    n = base.patch_embed.num_patches + base.num_prefix_tokens
    dense = measure.flops(base, images)
    blocks = [(b.attn.num_heads, b.attn.head_dim * b.attn.num_heads) for b in base.blocks]
    delta = sum(mhsa_flops(n, D, H, keep_rate=keep_rate, predictor=predictor)["total"]
                - mhsa_flops(n, D, H)["total"] for H, D in blocks)
    return (dense + delta) / 1e9


# ------------------------------------------------------------------------------------------------ comparison
def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """Sparsifiner at its default setting (``DEFAULTS``: keep 25 % of the keys per query) from a copy of ``base``:
    ``stage_steps(profile)`` split the chapter's ``finetune_steps(profile)``: stage 1 trains the predictors (their
    own lr), stage 2 fine-tunes the backbone with masked attention by the chapter's recipe, both from ``seed``.
    GFLOPs: analytic (the flop counter cannot see masked-attention savings)."""
    from vitlab.methods.efficient.recipes import Reduced

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    first, second = stage_steps(profile)
    model = sparsify(base, keep_rate=DEFAULTS["keep_rate"], seed=seed)
    recon = train_predictor(model, base, train, steps=first, lr=DEFAULTS["predictor_lr"], seed=seed)
    hist = finetune(model, base, train, profile=profile, seed=seed)
    images = train.images[:2] if hasattr(train, "images") else train[0][:2]
    gflops = model_gflops(base, images.to(next(base.parameters()).device), keep_rate=DEFAULTS["keep_rate"])
    return Reduced(model.eval(), tokens_per_block=None, gflops=gflops,
                   note=f"keep {DEFAULTS['keep_rate']:.0%} of keys per query (predicted top-k), {first} predictor + "
                        f"{second} fine-tune steps, analytic MHSA FLOPs",
                   extra={"recon_losses": recon, "finetune": hist})
