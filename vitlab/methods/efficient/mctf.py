"""MCTF: Multi-criteria Token Fusion with One-step-ahead Attention (Lee, Choi, Kim; CVPR 2024).

Paper: S. Lee, J. Choi, H. J. Kim, "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024, arXiv:2403.10030. Official code: https://github.com/mlvlab/MCTF (``utils/mctf.py``:
``bipartite_soft_matching``, ``merge_wavg``; ``models/modules/blocks.py``: one-step-ahead; ``models/deit.py`` and
``engine.py``: the two passes and the losses). Written from the paper and that code; no line of it is copied.
Checked against that code outside this repository: the same fused tokens, sizes and merged attention (to 1e-15 in
float64, output order included) and the same logits (to 6e-7) for a random ViT, full method and ablations.

In every merging block, r tokens are fused away (ToMe-style bipartite matching), but the pairs are chosen by three
criteria, not one. Tokens alternate between set A (even positions, CLS = position 0) and set B (odd positions):

    W_sim(a,b)  = ((cos(x_a, x_b) + 1) / 2) ^ (1/τ_sim)            similar tokens are redundant
    W_info(a,b) = (ĩ_a · ĩ_b) ^ (1/τ_info),  ĩ_j = (1/ā_j) / max_k (1/ā_k)
                  ā_j = attention token j receives, averaged over heads and queries (a column mean)
                                                                    little-attended tokens are uninformative
    W_size(a,b) = (s̃_a · s̃_b) ^ (1/τ_size),  s̃_j = (1/s_j) / max_k (1/s_k)
                                                                    big (already fused) tokens resist fusing
    W = W_sim · W_info · W_size,      the CLS row of W = -inf       (τ = 0 turns a criterion off)

Bidirectional matching: r1 = ⌊r/2⌋ A tokens (those whose best W is highest) fuse into their best B token; then
r2 = r - r1 B tokens fuse into their best remaining A token. r ≤ 50 % of the unprotected tokens (and ≥ 10 tokens
stay). The fused token is an attention- and size-weighted mean, and sizes add up:

    x_fused = Σ_j w_j x_j / Σ_j w_j,   w_j = ā_j · s_j,     s_fused = Σ_j s_j,    attention logits + log s (keys)

One-step-ahead attention (where MCTF merges: at the start of the block, with *this* block's attention):

    x ──LN──QKᵀ──softmax──▶ P [N×N] ──ā, W──▶ match ──▶ x' = fuse(x)          [N → N-r]
                             │                             P' = rows(P) fused with w, columns(P) summed
                             └──────────────────────────▶ out = P' · V(LN(x')),  x' + proj(out), then the FFN

    x:  [cls b1 a1 b2 a2 b3 a3]     a1→b2 (A→B), b3→a2 (B→A)     x': [cls a2+b3 a3 | b1 b2+a1]

Training (token-reduction consistency): a second pass of the same network with a random smaller reduction
r_t ∈ [0, r_teacher_max) serves as the teacher:

    L = CE(student) + CE(teacher) + 3 · mean_{i: p_s(y_i) > 0.4} MSE(cls_t.detach(), cls_s)   (final-norm CLS)

Our choices at course scale (6 blocks, 65 tokens): as the official DeiT recipe, block 0 sees every token and blocks
1..5 fuse r = 11 each (65 → 54 → 43 → 32 → 21 → 11 tokens, ≈ 60 % of the dense token count on average), the analogue
of the paper's r = 16 in blocks 1..11 of DeiT's 12 (197 tokens; ``layers=range(depth)`` fuses in every block); τ_sim,
τ_info, τ_size = 1, 20, 40 and the teacher's r_teacher_max = r/2, as the official DeiT-T/S settings
``--mctf_type [16,8,0,1,1,1,20,40,1,1,0]``. Fine-tuning is the chapter's recipe (``recipes.finetune_kwargs``: 100
AdamW steps at lr 1e-4 with label smoothing in the cpu profile), not the official 30 epochs with mixup/cutmix, and
the consistency loss is an option, off by default (``DEFAULTS``: its teacher pass does not fit that budget); the
official size/size_max factor in the weights cancels and is left out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_ndim, check_number, check_int as _check_int, check_model as _check_model
from vitlab.tokens import merge_tokens, proportional_bias

if TYPE_CHECKING:  # a type only: recipes imports this module
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["reduction", "default_r", "merging_layers", "token_schedule", "attention_received", "mctf_scores", "bidirectional_matching",
           "fuse_tokens", "merge_attention", "MCTFViT", "consistency_step", "finetune", "for_compare",
           "DEFAULT_R", "TAUS", "DEFAULTS"]

DEFAULT_R = 11  # default_r(65, 6): the course base's 64 patches + CLS, 6 blocks
TAUS = dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0)  # the official DeiT settings
# The fine-tune's MCTF-specific settings. MCTF adds no parameters, so it has no lr of its own: every fine-tune uses the
# chapter's recipe (``recipes.finetune_kwargs``), the dense control's arguments. The official token-reduction
# consistency loss (threshold 0.4, weight 3) runs a second, teacher pass of the network every step: about 2.5x the
# cost of an MCTF step here (measured on 2 CPU cores), more than the chapter's one-fine-tune budget per model allows,
# so the default leaves it off; ``finetune(..., consistency=True)`` runs it (the gpu-profile lesson compares both).
DEFAULTS = dict(consistency=False, threshold=0.4, weight=3.0)


# ------------------------------------------------------------------------------------------------ checks


# ------------------------------------------------------------------------------------------------ schedule
def reduction(num_tokens: int, r: int, *, num_protected: int = 1, min_tokens: int = 10) -> int:
    """The r a block really removes from ``num_tokens``: at most 50 % of the unprotected tokens, and at least
    ``min_tokens`` must stay (the official ``if t - r < 10: r = t - 10``)."""
    _check_int(num_tokens, "num_tokens", "reduction")
    _check_int(r, "r", "reduction", low=0)
    return max(0, min(r, num_tokens - min_tokens, (num_tokens - num_protected) // 2))


def default_r(num_tokens: int, depth: int, *, keep: float = 0.6, min_tokens: int = 10) -> int:
    """The smallest per-block r whose ``token_schedule`` keeps at most ``keep`` of the dense token count on average
    (≈ the paper's FLOP cut: DeiT's r = 16 in blocks 1..11 keeps ≈ 60 % of 197 tokens; this gives 15 there).
    65 tokens, 6 blocks → 11."""
    _check_int(num_tokens, "num_tokens", "default_r")
    _check_int(depth, "depth", "default_r")
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ValueError(f"default_r: keep must be in (0, 1], got {keep!r}")
    for r in range(num_tokens):
        if sum(token_schedule(num_tokens, depth, r, min_tokens=min_tokens)) <= keep * depth * num_tokens + 1e-9:
            return r
    return num_tokens // 2


def merging_layers(depth: int, layers=None) -> tuple[int, ...]:
    """The blocks that fuse tokens: ``layers``, or by default every block but the first, as the official DeiT
    recipe does (r = 16 in blocks 1..11 of 12: block 0 sees every token)."""
    return tuple(range(1, depth)) if layers is None else tuple(layers)


def token_schedule(num_tokens: int, depth: int, r: int, *, layers=None, min_tokens: int = 10) -> list[int]:
    """Tokens each block's attention output and FFN see (CLS included) when every block in ``layers`` (default:
    ``merging_layers``, all but the first) fuses r tokens at its start (one-step-ahead)."""
    _check_int(depth, "depth", "token_schedule")
    active = merging_layers(depth, layers)
    out, n = [], num_tokens
    for i in range(depth):
        if i in active:
            n -= reduction(n, r, min_tokens=min_tokens)
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------------ criteria
def attention_received(probs_or_colsum: torch.Tensor) -> torch.Tensor:
    """ā [B, N]: the attention each token receives, averaged over heads and queries, from the probabilities
    [B, H, N, N] or from ``Attention``'s ``colsum`` side output [B, H, N] (column sums / N)."""
    t = probs_or_colsum
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        raise ValueError(f"attention_received: expected probs [B,H,N,N] or colsum [B,H,N], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return t.mean(dim=(1, 2)) if t.ndim == 4 else t.mean(dim=1) / t.shape[-1]


@torch.no_grad()
def mctf_scores(x: torch.Tensor, received: torch.Tensor | None, size: torch.Tensor | None, *,
                tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
                num_protected: int = 1) -> torch.Tensor:
    """W [B, N_A, N_B] = W_sim · W_info · W_size between A (even positions) and B (odd), protected A rows = -inf.

    x [B, N, C] tokens (the matching metric); received [B, N] (``attention_received``); size [B, N].
    A τ of 0 (or a missing received/size) turns that criterion off.
    """
    fn = "mctf_scores"
    check_ndim(x, 3, "x", fn)
    tau_sim, tau_info, tau_size = (check_number(t, n, fn, low=0)  # 0 turns that criterion off
                                   for t, n in ((tau_sim, "tau_sim"), (tau_info, "tau_info"), (tau_size, "tau_size")))
    B, N, _ = x.shape
    for name, t in (("received", received), ("size", size)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, N)):
            raise ValueError(f"{fn}: {name} must be [B={B}, N={N}], got {getattr(t, 'shape', type(t).__name__)}")
    m = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    w = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / tau_sim) if tau_sim else x.new_ones(B, a.shape[1], b.shape[1])

    def pair(v, tau):  # (ṽ_a · ṽ_b)^(1/τ) with ṽ = (1/v) / max(1/v)
        v = 1 / v.float()
        v = v / v.amax(dim=1, keepdim=True)
        return (v[:, ::2, None] * v[:, None, 1::2]) ** (1 / tau)

    if tau_info and received is not None:
        w = w * pair(received, tau_info)
    if tau_size and size is not None:
        w = w * pair(size, tau_size)
    w = w.clone()
    w[:, :num_protected] = -math.inf
    return w


@torch.no_grad()
def bidirectional_matching(scores: torch.Tensor, r: int, *, bidirectional: bool = True) -> tuple[torch.Tensor, int]:
    """Where each token goes: (dst_index [B, N], N - r) for ``fuse_tokens`` / ``merge_attention``.

    A→B: the r1 = ⌊r/2⌋ A tokens with the highest best score fuse into their best B token (all r if not
    bidirectional); B→A: the r2 = r - r1 B tokens with the highest best score over the A tokens still standing
    fuse into theirs (scores of the first step; a B token that just received A tokens carries them along).
    Output order as the official code: the remaining A tokens in position order (CLS first), then the remaining
    B tokens (in B→A score order when bidirectional, else in position order).
    """
    check_ndim(scores, 3, "scores", "bidirectional_matching")
    _check_int(r, "r", "bidirectional_matching", low=0)
    B, na, nb = scores.shape
    N, dev = na + nb, scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    if r1 > na - 2 + (r2 == 0) or r2 > nb:  # B→A needs one unprotected A token left standing
        raise ValueError(f"bidirectional_matching: r={r} is too many for {na} A and {nb} B tokens "
                         f"(use reduction() to cap it at 50 % of the unprotected tokens)")
    rows = torch.arange(B, device=dev)[:, None]
    best, best_b = scores.max(dim=-1)  # [B, na]
    order = best.argsort(dim=-1, descending=True)
    src_a, kept_a = order[:, :r1], order[:, r1:].sort(dim=-1).values  # kept_a in position order: CLS first
    n_a = na - r1
    b_slot = torch.empty(B, nb, dtype=torch.long, device=dev)
    if r2:
        s2 = scores.gather(1, kept_a[..., None].expand(-1, -1, nb)).transpose(1, 2)  # [B, nb, n_a]
        best2, best_a2 = s2.max(dim=-1)
        order2 = best2.argsort(dim=-1, descending=True)
        src_b, kept_b = order2[:, :r2], order2[:, r2:]
        b_slot[rows, kept_b] = n_a + torch.arange(nb - r2, device=dev)
        b_slot[rows, src_b] = best_a2.gather(1, src_b)  # a slot among the kept A tokens
    else:
        b_slot[:] = n_a + torch.arange(nb, device=dev)
    dst = torch.empty(B, N, dtype=torch.long, device=dev)
    dst[:, 1::2] = b_slot
    dst[rows, 2 * kept_a] = torch.arange(n_a, device=dev)
    dst[rows, 2 * src_a] = b_slot.gather(1, best_b.gather(1, src_a))  # follow the B token wherever it goes
    return dst, N - r


# ------------------------------------------------------------------------------------------------ fusion
def fuse_tokens(x: torch.Tensor, weight: torch.Tensor, size: torch.Tensor, dst_index: torch.Tensor,
                num_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x' [B, num_out, C] = Σ w_j x_j / Σ w_j per destination, size' [B, num_out] = Σ s_j (weights get no
    gradient, x does). MCTF's w_j = ā_j · s_j; w = s gives ToMe's size-weighted mean."""
    fn = "fuse_tokens"
    check_ndim(x, 3, "x", fn)
    for name, t in (("weight", weight), ("size", size), ("dst_index", dst_index)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{fn}: {name} must be [B, N]={tuple(x.shape[:2])}, got {getattr(t, 'shape', t)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_out, _ = merge_tokens(x, weight.detach().to(acc), dst_index, num_out)
    size_out = size.new_zeros(x.shape[0], num_out).scatter_add_(1, dst_index, size)
    return x_out, size_out


def merge_attention(probs: torch.Tensor, weight: torch.Tensor, dst_index: torch.Tensor, num_out: int
                    ) -> torch.Tensor:
    """P' [B, H, num_out, num_out]: P's columns (keys) of a group summed, its rows (queries) averaged with the
    fusion weights w, so P' rows still sum to 1 and are the fused queries' attention over the fused keys."""
    fn = "merge_attention"
    check_ndim(probs, 4, "probs", fn)
    B, H, N, _ = probs.shape
    for name, t in (("weight", weight), ("dst_index", dst_index)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, N):
            raise ValueError(f"{fn}: {name} must be [B, N]=({B}, {N}), got {getattr(t, 'shape', t)}")
    w = weight.detach().to(probs.dtype)
    cols = probs.new_zeros(B, H, N, num_out).scatter_add_(3, dst_index[:, None, None, :].expand(B, H, N, N), probs)
    rows = cols.new_zeros(B, H, num_out, num_out).scatter_add_(
        2, dst_index[:, None, :, None].expand(B, H, N, num_out), cols * w[:, None, :, None])
    norm = w.new_zeros(B, num_out).scatter_add_(1, dst_index, w)
    return rows / norm[:, None, :, None]


# ------------------------------------------------------------------------------------------------ the model
def _attention_probs(attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(QKᵀ·scale + bias) [B, H, N, N] of a vitlab/timm ``Attention`` (Q and K only: V comes later)."""
    B, N, C = h.shape
    w, b = attn.qkv.weight, attn.qkv.bias
    qk = F.linear(h, w[:2 * C], None if b is None else b[:2 * C]).reshape(B, N, 2, attn.num_heads, -1)
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1).to(h.dtype)


def _apply_attention(attn: nn.Module, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """proj(P · V(h)): the rest of the attention layer, with a given probability matrix."""
    B, N, C = h.shape
    w, b = attn.qkv.weight, attn.qkv.bias
    v = F.linear(h, w[2 * C:], None if b is None else b[2 * C:]).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(attn.norm(out)))


class MCTFViT(nn.Module):
    """A ``VisionTransformer`` whose blocks fuse r tokens each with MCTF (same weights, no new parameters).

    ``forward(images, r=None)``: r overrides the per-block reduction (0: exactly the base ViT). The switches give
    the paper's ablations: τ = 0 drops a criterion (τ_info = τ_size = 0: similarity only, ToMe's criterion),
    ``bidirectional=False`` matches A→B only, ``one_step_ahead=False`` fuses after the FFN with the block's own
    attention (column means from ``Attention``'s ``colsum`` side output), ``prop_attn=False`` drops log-size.
    ``last_tokens``: tokens each block's FFN saw in the latest forward (CLS included); ``last_groups`` [B, N]:
    the final token each input token (CLS, patches) was fused into; ``last_size`` [B, N_final]: the final sizes.
    """

    def __init__(self, vit: nn.Module, r: int = DEFAULT_R, *, tau_sim: float = 1.0, tau_info: float = 20.0,
                 tau_size: float = 40.0, bidirectional: bool = True, one_step_ahead: bool = True,
                 prop_attn: bool = True, layers=None, min_tokens: int = 10):
        super().__init__()
        _check_model(vit, "MCTFViT")
        if not all(hasattr(vit, a) for a in ("embed", "blocks", "norm", "forward_head")):
            raise TypeError(f"MCTFViT: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "global_pool", "token") != "token":
            raise ValueError("MCTFViT: vit must have exactly one CLS token and global_pool='token'")
        self.vit = vit
        self.r = _check_int(r, "r", "MCTFViT", low=0)
        self.tau_sim, self.tau_info, self.tau_size = (check_number(t, n, "MCTFViT", low=0) for t, n in (
            (tau_sim, "tau_sim"), (tau_info, "tau_info"), (tau_size, "tau_size")))
        self.bidirectional, self.one_step_ahead, self.prop_attn = bool(bidirectional), bool(one_step_ahead), \
            bool(prop_attn)
        depth = len(vit.blocks)
        layers = merging_layers(depth, layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in layers):
            raise ValueError(f"MCTFViT: layers must be block indices in 0..{depth - 1}, got {layers!r}")
        self.layers = layers
        self.min_tokens = _check_int(min_tokens, "min_tokens", "MCTFViT")
        self.last_tokens: list[int] = []
        self.last_groups: torch.Tensor | None = None
        self.last_size: torch.Tensor | None = None

    def _merge(self, x, size, received, r):
        scores = mctf_scores(x, received, size, tau_sim=self.tau_sim, tau_info=self.tau_info,
                             tau_size=self.tau_size)
        dst, n_out = bidirectional_matching(scores, r, bidirectional=self.bidirectional)
        weight = received.detach() * size  # the official pooling_type 1 (size / size_max cancels)
        return dst, n_out, weight

    def block(self, blk: nn.Module, x: torch.Tensor, size: torch.Tensor, r: int):
        """One block with MCTF: (x, size) → (x', size', dst_index or None)."""
        bias = proportional_bias(size) if self.prop_attn and bool((size != 1).any()) else None
        if r == 0:
            return blk.forward_mlp(blk.forward_attn(x, attn_bias=bias)), size, None
        if not self.one_step_ahead:  # the block as usual, then fuse with its attention
            x, sides = blk.forward_attn(x, attn_bias=bias, side=("colsum",))
            x = blk.forward_mlp(x)
            dst, n_out, weight = self._merge(x, size, attention_received(sides["colsum"]), r)
            return (*fuse_tokens(x, weight, size, dst, n_out), dst)
        probs = _attention_probs(blk.attn, blk._norm(blk.norm1, x), bias)  # this layer's attention, before V
        dst, n_out, weight = self._merge(x, size, attention_received(probs), r)
        x, size = fuse_tokens(x, weight, size, dst, n_out)
        probs = merge_attention(probs, weight, dst, n_out)
        x = x + blk.drop_path1(blk.ls1(_apply_attention(blk.attn, blk._norm(blk.norm1, x), probs)))
        return blk.forward_mlp(x), size, dst

    def forward_features(self, images: torch.Tensor, r: int | None = None) -> torch.Tensor:
        r = self.r if r is None else _check_int(int(r), "r", "MCTFViT.forward", low=0)
        x = self.vit.embed(images)
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)  # counts, kept in fp32
        tokens, group = [], torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        for i, blk in enumerate(self.vit.blocks):
            active = i in self.layers
            n = x.shape[1]
            x, size, dst = self.block(blk, x, size, reduction(n, r, min_tokens=self.min_tokens) if active else 0)
            group = group if dst is None else dst.gather(1, group)
            tokens.append(x.shape[1] if self.one_step_ahead else n)
        self.last_tokens, self.last_groups, self.last_size = tokens, group, size
        return self.vit.norm(x)

    def forward(self, images: torch.Tensor, r: int | None = None, return_cls: bool = False):
        x = self.forward_features(images, r)
        logits = self.vit.forward_head(x)
        return (logits, x[:, 0]) if return_cls else logits

    def extra_repr(self) -> str:
        return (f"r={self.r}, tau_sim={self.tau_sim}, tau_info={self.tau_info}, tau_size={self.tau_size}, "
                f"bidirectional={self.bidirectional}, one_step_ahead={self.one_step_ahead}, "
                f"prop_attn={self.prop_attn}, layers={self.layers}")


# ------------------------------------------------------------------------------------------------ training
def consistency_step(r_teacher_max: int, *, consistency: bool = True, threshold: float = 0.4, weight: float = 3.0,
                     label_smoothing: float = 0.1, generator: torch.Generator | None = None):
    """A ``vitlab.train.fit`` step_fn: student pass at the model's r, teacher pass at r_t ~ U{0..r_teacher_max-1}
    (same weights), L = CE_s + CE_t + weight · MSE(cls_t.detach(), cls_s) over the samples whose student
    probability of the true class exceeds ``threshold``. ``consistency=False``: the student's CE alone."""
    _check_int(r_teacher_max, "r_teacher_max", "consistency_step")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"consistency_step: threshold must be in [0, 1), got {threshold!r}")

    def step_fn(net, x, y):
        logits, cls_s = net(x, return_cls=True)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not consistency:
            return loss, logits
        r_t = int(torch.randint(0, r_teacher_max, (1,), generator=generator))
        logits_t, cls_t = net(x, r=r_t, return_cls=True)
        loss = loss + F.cross_entropy(logits_t.float(), y, label_smoothing=label_smoothing)
        confident = (logits.detach().float().softmax(-1).gather(1, y[:, None])[:, 0] > threshold).float()
        mse = ((cls_t.detach() - cls_s).float() ** 2).mean(dim=1)
        return loss + weight * (mse * confident).sum() / confident.sum().clamp_min(1), logits

    return step_fn


def finetune(model: MCTFViT, train, *, profile=None, seed: int = 0, consistency: bool = DEFAULTS["consistency"],
             r_teacher_max: int | None = None, steps: int | None = None, batch_size: int | None = None,
             progress: bool = False, val=None) -> dict:
    """Fine-tune ``model`` (in place) with THE chapter recipe, ``vitlab.train.fit(..., **finetune_kwargs(profile),
    seed=seed)`` (AdamW lr 1e-4, warm-up and cosine, label smoothing 0.1, ±2 px shifts, batch 64,
    ``finetune_steps(profile)`` steps: the dense control's arguments exactly), with ``consistency_step`` as the
    step_fn (with ``consistency``: a teacher pass at r below ``r_teacher_max``, default max(1, r // 2), its generator
    seeded by ``seed``; without it, the student's label-smoothed CE alone).
    ``steps`` / ``batch_size`` override the recipe's for unit tests only. Returns fit's history."""
    from vitlab.methods.efficient import recipes
    from vitlab.train import fit

    if not isinstance(model, MCTFViT):
        raise TypeError(f"finetune: model must be an MCTFViT, got {type(model).__name__}")
    kwargs = recipes.finetune_kwargs(profile, steps=steps, batch_size=batch_size, fn="finetune")
    r_teacher_max = max(1, model.r // 2) if r_teacher_max is None else r_teacher_max
    gen = torch.Generator().manual_seed(_check_int(seed, "seed", "finetune", low=0))
    step_fn = consistency_step(r_teacher_max, consistency=consistency, generator=gen,
                               threshold=DEFAULTS["threshold"], weight=DEFAULTS["weight"],
                               label_smoothing=kwargs.get("label_smoothing", 0.0))
    return fit(model, train, val, profile=profile, **kwargs, step_fn=step_fn, seed=seed, progress=progress,
               desc="MCTF fine-tune")


def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """MCTF at its default setting (r = ``default_r``: 11 in blocks 1..5 of the 6-block base, τ = 1/20/40,
    bidirectional, one-step-ahead), fine-tuned from a copy of ``base`` with ``finetune`` (the chapter recipe and
    ``seed``: one ``finetune_steps(profile)`` fine-tune with the same arguments as ``recipes.dense_control(seed,
    profile)``; ``DEFAULTS["consistency"]`` off, so one pass per step). The lesson's main models are exactly these."""
    from vitlab.methods.efficient.recipes import Reduced

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    n, depth = base.patch_embed.num_patches + 1, len(base.blocks)
    r = default_r(n, depth)
    model = MCTFViT(copy.deepcopy(base), r, **TAUS)
    finetune(model, train, profile=profile, seed=seed)
    model.eval()
    return Reduced(model, tokens_per_block=[float(t) for t in token_schedule(n, depth, r)], gflops=None,
                   note=f"r={r} in blocks 1-{depth - 1}, sim+info+size, one-step-ahead"
                        + (", consistency" if DEFAULTS["consistency"] else "") + f", seed {seed}")
