"""GTP-ViT: propagate the least important tokens into their graph neighbours (Xu et al., WACV 2024).

Paper: X. Xu, S. Wang, Y. Chen, Y. Zheng, Z. Wei, J. Liu, "GTP-ViT: Efficient Vision Transformers via Graph-based
Token Propagation", WACV 2024, arXiv:2311.03035. Official code: https://github.com/Ackesnal/GTP-ViT
(``models_v3.py``: ``select``, ``propagate``, ``GraphPropagationBlock``, ``GraphPropagationTransformer``).
Written from the paper and that code; no line of it is copied. Training-free: it runs on a trained ViT as is.

Once per image, from the embedded patches x (CLS excluded), a token graph over the N image tokens:

    spatial  S_ij = 1 if patches i ≠ j are 8-neighbours on the grid
    semantic K_ij = 1 if j is among the k most cosine-similar tokens to i (j ≠ i)
    mixed    A = S OR K,      W = D^-1/2 A D^-1/2,   D = diag(row sums of A)

In every block, after attention and its residual and before the FFN (P tokens per block):

    score_i = max_h A^h_ii · max_h Σ_q A^h_qi        MixedAttnMax: self-attention × attention received
    prop    = the P lowest scores,  kept = the rest (highest first)
    x_kept ← x_kept + α · W[kept, prop] @ x_prop     GraphProp: each dropped token's features flow to its
    s_kept ← s_kept + α · W[kept, prop] @ s_prop     graph neighbours, and so do the token sizes
    W      ← W[kept, kept]                           the graph shrinks with the tokens
    next attention: logits + log s  (proportional attention, a token of size s counts as s keys)

       tokens after attention              graph W                          into the FFN
    [cls| a  b  c  d  e ]   score → prop = {b, e}    a─b─c     [cls| a + α(W_ab b)   c + α(W_cb b + W_ce e)   d + α W_de e ]
                                                     │   │
                                                     d───e

Baselines with the same selection: "none" drops the P tokens, "mean" appends their mean as one token;
selection "random" picks the P tokens at random. The optional attention sparsification of the official code
(θ < 1) is not implemented: its tuned settings mostly help at P ≤ 4 on DeiT-B, and it does not reduce tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from vitlab.checks import check_choice, check_cls_vit, check_number, check_int as _check_int, check_model as _check_model
from vitlab.tokens import gather_tokens, proportional_bias

if TYPE_CHECKING:  # a type only: recipes imports this module
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["spatial_graph", "semantic_graph", "mixed_graph", "normalize_graph", "mixed_attn_max", "select",
           "propagate", "GTP", "for_compare", "SELECTIONS", "PROPAGATIONS", "GRAPHS", "DEFAULTS", "DEFAULT_NUM_PROP"]

SELECTIONS = ("mixed_attn_max", "random")
PROPAGATIONS = ("graph", "mean", "none")
GRAPHS = ("mixed", "spatial", "semantic")
# The lesson's and for_compare's one setting (the official defaults for alpha and the neighbours). Training-free: no
# fine-tune, so no lr; it is compared with the base itself (zero extra steps on both sides). P = 4 of the 64 patches
# per block (≈ 6 %, as the official DeiT-B settings' P ≤ 14 of 196) cuts ≈ 18 % of the FLOPs: on the chapter's trained
# base (95.9 %) every larger P costs more than 1.5 points without training (P = 10, -45 % FLOPs: about -4.6 points).
DEFAULTS = dict(num_prop=4, selection="mixed_attn_max", propagation="graph", graph="mixed", num_neighbours=8,
                alpha=0.1, token_scale=True)
DEFAULT_NUM_PROP = DEFAULTS["num_prop"]




# ------------------------------------------------------------------------------------------------ graphs
def spatial_graph(height: int, width: int) -> torch.Tensor:
    """[N, N] 0/1 adjacency of the 8-neighbour grid (N = height·width, row-major, no self-loops)."""
    _check_int(height, "height", "spatial_graph")
    _check_int(width, "width", "spatial_graph")
    r, c = torch.arange(height * width).div(width, rounding_mode="floor"), torch.arange(height * width) % width
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    return (near & ~torch.eye(height * width, dtype=torch.bool)).float()


def semantic_graph(x: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """[B, N, N] 0/1: row i marks the ``num_neighbours`` tokens most cosine-similar to token i (itself excluded;
    ties at the threshold all count, as in the official ``kthvalue`` rule). Not symmetric. x: [B, N, C]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"semantic_graph: x must be image tokens [B, N, C], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_int(num_neighbours, "num_neighbours", "semantic_graph", low=0)
    n = x.shape[1]
    if num_neighbours >= n:
        raise ValueError(f"semantic_graph: num_neighbours must be < N={n} tokens, got {num_neighbours}")
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = xn @ xn.transpose(1, 2)
    # the (k+1)-th largest similarity (self first): the official kthvalue(N - k), found with a cheaper topk
    threshold = sim.topk(num_neighbours + 1, dim=-1).values[..., -1:]
    adj = (sim >= threshold).float()
    adj.diagonal(dim1=1, dim2=2).zero_()
    return adj


def normalize_graph(adj: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the row sums (degrees) of A [B, N, N]; isolated nodes get zero rows."""
    if not isinstance(adj, torch.Tensor) or adj.ndim != 3 or adj.shape[1] != adj.shape[2]:
        raise ValueError(f"normalize_graph: adj must be [B, N, N], got "
                         f"{tuple(adj.shape) if isinstance(adj, torch.Tensor) else type(adj).__name__}")
    d = adj.sum(-1)
    d = torch.where(d > 0, d.clamp_min(1e-12).rsqrt(), torch.zeros_like(d))
    return d[:, :, None] * adj * d[:, None, :]


def mixed_graph(x: torch.Tensor, grid: tuple[int, int], num_neighbours: int = 8, kind: str = "mixed") -> torch.Tensor:
    """The normalised token graph W [B, N, N] from image tokens x [B, N, C] on a ``grid`` (h, w)."""
    check_choice(kind, GRAPHS, "kind", "mixed_graph")
    h, w = grid
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"mixed_graph: x must be [B, {h * w}, C] for a {h}x{w} grid, got {tuple(x.shape)}")
    spatial = spatial_graph(h, w).to(x.device).expand(x.shape[0], -1, -1)
    if kind == "spatial":
        adj = spatial
    else:
        sem = semantic_graph(x.detach().float(), num_neighbours)
        adj = sem if kind == "semantic" else torch.maximum(sem, spatial)  # OR of two 0/1 graphs
    return normalize_graph(adj).to(x.dtype)


# ------------------------------------------------------------------------------------------------ one block
def mixed_attn_max(diag: torch.Tensor, colsum: torch.Tensor) -> torch.Tensor:
    """MixedAttnMax scores [B, N-1] of the image tokens from the attention side outputs diag, colsum [B, H, N]:
    max over heads of the self-attention times max over heads of the attention received."""
    if not (isinstance(diag, torch.Tensor) and isinstance(colsum, torch.Tensor)) or diag.ndim != 3 \
            or diag.shape != colsum.shape:
        raise ValueError("mixed_attn_max: diag and colsum must be side outputs of the same shape [B, H, N]")
    return diag[:, :, 1:].float().amax(dim=1) * colsum[:, :, 1:].float().amax(dim=1)


def select(scores: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [B, N-P], prop [B, P]): positions among the image tokens, kept highest score first, prop = the P lowest."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(f"select: scores must be [B, N], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    _check_int(num_prop, "num_prop", "select", low=0)
    if num_prop >= scores.shape[1]:
        raise ValueError(f"select: num_prop must be < N={scores.shape[1]} (keep at least one token), got {num_prop}")
    order = scores.argsort(dim=1, descending=True)
    n_kept = scores.shape[1] - num_prop
    return order[:, :n_kept], order[:, n_kept:]


def propagate(x: torch.Tensor, graph: torch.Tensor | None, size: torch.Tensor, kept: torch.Tensor,
              prop: torch.Tensor, mode: str = "graph", alpha: float = 0.1):
    """Remove the tokens ``prop`` from x [B, 1+N, C] (CLS first; kept/prop index the N image tokens).

    graph: x_kept + α W[kept, prop] x_prop (sizes alike), graph restricted to kept × kept;
    mean:  the mean of x_prop appended as one token (size: the sum of their sizes);
    none:  x_prop dropped.
    Returns (x', graph', size') with size [B, 1+N] the tokens' sizes (CLS first).
    """
    check_choice(mode, PROPAGATIONS, "mode", "propagate")
    alpha = check_number(alpha, "alpha", "propagate", low=0)
    cls, img = x[:, :1], x[:, 1:]
    s_cls, s_img = size[:, :1], size[:, 1:]
    x_kept, s_kept = gather_tokens(img, kept), gather_tokens(s_img, kept)
    if mode == "graph":
        if graph is None:
            raise ValueError("propagate: mode='graph' needs the token graph")
        rows = gather_tokens(graph, kept)  # [B, K, N]: the kept tokens' rows
        w_kp = gather_tokens(rows.transpose(1, 2), prop).transpose(1, 2)  # [B, K, P]
        x_kept = x_kept + alpha * (w_kp @ gather_tokens(img, prop))
        s_kept = s_kept + alpha * (w_kp @ gather_tokens(s_img, prop)[..., None].to(w_kp.dtype))[..., 0].to(s_kept.dtype)
        graph = gather_tokens(rows.transpose(1, 2), kept).transpose(1, 2)  # [B, K, K]
    elif mode == "mean":
        x_kept = torch.cat([x_kept, gather_tokens(img, prop).mean(1, keepdim=True)], dim=1)
        s_kept = torch.cat([s_kept, gather_tokens(s_img, prop).sum(1, keepdim=True)], dim=1)
        graph = None
    else:
        graph = None if graph is None else gather_tokens(gather_tokens(graph, kept).transpose(1, 2), kept).transpose(1, 2)
    return torch.cat([cls, x_kept], dim=1), graph, torch.cat([s_cls, s_kept], dim=1)


# ------------------------------------------------------------------------------------------------ the model
class GTP(nn.Module):
    """A trained ViT with graph-based token propagation in every block (shares ``vit``'s modules, no copy).

    num_prop: P, tokens removed per block (an int, or one per block); capped so one image token is left.
    selection: "mixed_attn_max" (the paper's) or "random" (seeded, deterministic per call).
    propagation: "graph" (GTP), "mean" or "none" (drop). graph: "mixed", "spatial" or "semantic".
    token_scale: carry token sizes and add log(size) to the attention logits (proportional attention).
    After a forward, ``last_tokens`` holds the tokens (CLS included) each block's attention saw.
    """

    def __init__(self, vit: nn.Module, num_prop=DEFAULT_NUM_PROP, *, selection: str = "mixed_attn_max",
                 propagation: str = "graph", graph: str = "mixed", num_neighbours: int = 8, alpha: float = 0.1,
                 token_scale: bool = True, seed: int = 0):
        super().__init__()
        check_cls_vit(vit, "GTP")
        depth = len(vit.blocks)
        if isinstance(num_prop, int) and not isinstance(num_prop, bool):
            num_prop = [num_prop] * depth
        if not isinstance(num_prop, (list, tuple)) or len(num_prop) != depth:
            raise ValueError(f"GTP: num_prop must be an int or {depth} ints (one per block), got {num_prop!r}")
        for p in num_prop:
            _check_int(p, "num_prop", "GTP", low=0)
        self.vit = vit
        self.num_prop = list(num_prop)
        self.selection = check_choice(selection, SELECTIONS, "selection", "GTP")
        self.propagation = check_choice(propagation, PROPAGATIONS, "propagation", "GTP")
        self.graph = check_choice(graph, GRAPHS, "graph", "GTP")
        self.num_neighbours = _check_int(num_neighbours, "num_neighbours", "GTP", low=0)
        self.alpha = check_number(alpha, "alpha", "GTP", low=0)
        if not isinstance(token_scale, bool):
            raise TypeError(f"GTP: token_scale must be a bool, got {type(token_scale).__name__}")
        self.token_scale = token_scale
        self.seed = _check_int(seed, "seed", "GTP", low=0)
        self.last_tokens: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        B = x.shape[0]
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        graph = mixed_graph(x[:, 1:], self.vit.grid_size, self.num_neighbours, self.graph) \
            if self.propagation == "graph" and any(self.num_prop) else None
        gen = torch.Generator().manual_seed(self.seed) if self.selection == "random" else None
        scaled, tokens = False, []
        for blk, p in zip(self.vit.blocks, self.num_prop):
            tokens.append(x.shape[1])
            bias = proportional_bias(size).to(x.dtype) if scaled else None
            p = min(p, x.shape[1] - 2)  # keep at least one image token
            if p == 0:
                x = blk(x, attn_bias=bias)
                continue
            if self.selection == "random":
                x = blk.forward_attn(x, attn_bias=bias)
                scores = torch.rand(B, x.shape[1] - 1, generator=gen).to(x.device)
            else:
                x, side = blk.forward_attn(x, attn_bias=bias, side=("diag", "colsum"))
                scores = mixed_attn_max(side["diag"], side["colsum"])
            kept, prop = select(scores, p)
            x, graph, size = propagate(x, graph, size, kept, prop, self.propagation, self.alpha)
            scaled = scaled or (self.token_scale and self.propagation == "graph")
            x = blk.forward_mlp(x)
        self.last_tokens = tokens
        return self.vit.forward_head(self.vit.norm(x))

    def extra_repr(self) -> str:
        return (f"num_prop={self.num_prop}, selection={self.selection!r}, propagation={self.propagation!r}, "
                f"graph={self.graph!r}, num_neighbours={self.num_neighbours}, alpha={self.alpha}, "
                f"token_scale={self.token_scale}")


def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """GTP at its default (``DEFAULTS``: P = 4 per block, MixedAttnMax, GraphProp on the mixed graph, α = 0.1,
    proportional attention) on ``base`` as is: training-free, no copy, ``train`` unused. ``seed`` only matters for
    random selection; the default selection is deterministic, so every seed gives the same model."""
    from vitlab.methods.efficient.recipes import Reduced

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    model = GTP(base, **DEFAULTS, seed=seed).eval()
    n = base.patch_embed.num_patches + 1
    tokens, t = [], n
    for _ in base.blocks:  # the schedule is fixed: P fewer tokens per block (capped at one image token)
        tokens.append(float(t))
        t -= min(DEFAULT_NUM_PROP, t - 2)
    return Reduced(model, tokens_per_block=tokens, gflops=None,
                   note=f"P={DEFAULT_NUM_PROP} per block, MixedAttnMax + GraphProp (mixed graph, "
                        f"α={DEFAULTS['alpha']}), training-free")
