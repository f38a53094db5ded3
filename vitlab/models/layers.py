"""Attention variants that several lessons share: cross-attention and (Swin-style) window attention."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_heads

__all__ = ["CrossAttention", "window_partition", "window_reverse", "WindowAttention"]


class CrossAttention(nn.Module):
    """Queries from ``x`` [B,Nq,D], keys and values from ``context`` [B,Nk,Dc] (Nq ≠ Nk allowed).

    Used where one token set reads another: CrossViT's CLS exchange (Nq = 1), STViT's semantic tokens,
    LookupViT's compressed tokens, a VLM projector.
    """

    def __init__(self, dim: int, num_heads: int = 8, context_dim: int | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        head_dim = check_heads(dim, num_heads, "CrossAttention")
        context_dim = context_dim or dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_probs: bool = False):
        if x.ndim != 3 or context.ndim != 3 or x.shape[0] != context.shape[0]:
            raise ValueError(f"CrossAttention: x and context must be [B, N, D] with the same B, got "
                             f"{tuple(x.shape)} and {tuple(context.shape)}")
        B, Nq, D = x.shape
        Nk = context.shape[1]
        q = self.q(x).reshape(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,Nq,Dh]
        k, v = self.kv(context).reshape(B, Nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if return_probs:
            probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B,H,Nq,Nk]
            out = F.dropout(probs, self.attn_drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, D)))
        return (out, probs) if return_probs else out


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] → [B·(H/ws)·(W/ws), ws·ws, C]: non-overlapping windows, each a token sequence."""
    B, H, W, C = x.shape
    if H % window_size or W % window_size:
        raise ValueError(f"window_partition: window_size={window_size} does not divide the {H}x{W} grid")
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B·nW, ws·ws, C] → [B, H, W, C]."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


class WindowAttention(nn.Module):
    """Self-attention inside ws×ws windows with a learned relative-position bias (Swin, Liu et al. 2021).

    Parameter names follow timm's ``swin_transformer.WindowAttention`` (``qkv``, ``proj``,
    ``relative_position_bias_table``), so the same weights load into both.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        head_dim = check_heads(dim, num_heads, "WindowAttention")
        self.num_heads, self.window_size = num_heads, window_size
        self.head_dim = head_dim
        self.scale = self.head_dim ** -0.5
        # one bias per head for each of the (2ws-1)² possible relative offsets
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", self._relative_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    @staticmethod
    def _relative_index(ws: int) -> torch.Tensor:
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # [2, ws²]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # [ws², ws², 2] in [0, 2ws-2]
        return rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # [ws², ws²]

    def relative_bias(self) -> torch.Tensor:
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, n, n]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B·nW, ws², C]; mask [nW, ws², ws²] of 0/-inf (shifted windows) or None."""
        Bw, N, C = x.shape
        if N != self.window_size ** 2:
            raise ValueError(f"WindowAttention: expected {self.window_size ** 2} tokens per window, got {N}")
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias().to(q.dtype)
        if mask is not None:
            nW = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(q.dtype)).repeat(Bw // nW, 1, 1, 1)  # [Bw, H, n, n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(Bw, N, C)))
