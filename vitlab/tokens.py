"""Token bookkeeping shared by the token-reduction methods (chapter 2): keep, gather, merge, size.

    scores [B,N] ─top_k→ idx [B,K] ─gather_tokens→ x_kept [B,K,C]
    metric [B,N,C] ─bipartite_soft_matching(r)→ dst [B,N] ─merge_tokens(x, size)→ x [B,N-r,C], size [B,N-r]
    size [B,N] ─proportional_bias→ log(size) added to every query's attention logits

Sizes count how many original patches a token stands for. A merged token is the size-weighted mean of its
sources, and proportional attention (``+ log size`` on the logits) makes it attract as much attention as its
sources did together (ToMe, Bolya et al. 2023). Every method keeps the CLS token (index 0) untouched and first.
The merge itself is ``vitlab.kernels.token_merge.merge`` (Triton on CUDA, the PyTorch reference elsewhere).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels.token_merge import merge as _merge

__all__ = ["gather_tokens", "keep_top_k", "merge_tokens", "bipartite_soft_matching", "proportional_bias",
           "ones_size"]


def _check_tokens(x, fn: str, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a token tensor [B, N, C], got {shape}")


def ones_size(x: Tensor) -> Tensor:
    """Every token stands for one patch: sizes [B, N] of ones, in fp32."""
    _check_tokens(x, "ones_size")
    return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, ...] indexed per image by idx [B, K] -> [B, K, ...] (works for sizes [B, N] too)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"gather_tokens: x must be [B, N, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[0] != x.shape[0] or idx.dtype not in (
            torch.int64, torch.int32):
        raise ValueError(f"gather_tokens: idx must be an integer tensor [B={x.shape[0]}, K], got "
                         f"{getattr(idx, 'shape', type(idx).__name__)} {getattr(idx, 'dtype', '')}")
    # checked where it is cheap: on CUDA the check would cost a sync per call, and a bad index asserts there anyway
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[1]):
        raise ValueError(f"gather_tokens: idx must hold token indices in 0..{x.shape[1] - 1}, got "
                         f"{int(idx.min())}..{int(idx.max())}")
    idx = idx.long()
    return torch.gather(x, 1, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(*idx.shape, *x.shape[2:]))


def keep_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k highest scores per image, highest first (``torch.topk(sorted=True)``)."""
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        raise ValueError(f"keep_top_k: scores must be [B, N], got {getattr(scores, 'shape', type(scores).__name__)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"keep_top_k: k must be an int in 1..{scores.shape[1]}, got {k!r}")
    return scores.topk(k, dim=1, largest=True, sorted=True).indices


def merge_tokens(x: Tensor, size: Tensor | None, dst_index: Tensor, num_dst: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens sent to each destination; returns (x [B,num_dst,C], size [B,num_dst])."""
    _check_tokens(x, "merge_tokens")
    return _merge(x, size, dst_index, num_dst)


def bipartite_soft_matching(metric: Tensor, r: int, *, class_token: bool = True) -> tuple[Tensor, int]:
    """ToMe's matching: merge the r most similar (even → odd) token pairs.

    Tokens alternate between set A (even positions) and set B (odd). Each A token finds its most cosine-similar
    B token; the r A tokens with the highest such similarity are merged into their match. The CLS token
    (position 0, in A) is never merged. Returns ``(dst_index [B, N], N - r)`` for :func:`merge_tokens`: the
    output keeps the unmerged A tokens in their original order, then every B token in its original order, so
    the CLS token stays first. r is capped at the number of mergeable A tokens.
    """
    _check_tokens(metric, "bipartite_soft_matching", "metric")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"bipartite_soft_matching: r must be a non-negative int, got {r!r}")
    B, N, _ = metric.shape
    a_pos = torch.arange(0, N, 2, device=metric.device)
    b_pos = torch.arange(1, N, 2, device=metric.device)
    r = min(r, len(a_pos) - int(class_token))
    dst = torch.empty(B, N, dtype=torch.long, device=metric.device)
    n_a_kept = len(a_pos) - max(r, 0)
    if r <= 0:
        return torch.arange(N, device=metric.device).expand(B, N).contiguous(), N
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # [B, Na, Nb]
        if class_token:
            sim[:, 0] = -torch.inf
        best_sim, best_b = sim.max(dim=-1)  # [B, Na]
        order = best_sim.argsort(dim=-1, descending=True)
        merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    rows = torch.arange(B, device=metric.device)[:, None]
    dst[rows, a_pos[kept_a]] = torch.arange(n_a_kept, device=metric.device).expand(B, -1)
    dst[:, b_pos] = n_a_kept + torch.arange(len(b_pos), device=metric.device)
    dst[rows, a_pos[merged_a]] = n_a_kept + best_b.gather(1, merged_a)
    return dst, N - r


def proportional_bias(size: Tensor) -> Tensor:
    """log(size) as an additive attention bias [B, 1, 1, N]: a token of size s counts as s keys."""
    if not isinstance(size, Tensor) or size.ndim != 2:
        raise ValueError(f"proportional_bias: size must be [B, N], got {getattr(size, 'shape', type(size).__name__)}")
    return size.clamp_min(1e-6).log()[:, None, None, :]
