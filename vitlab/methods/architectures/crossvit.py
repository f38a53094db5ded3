"""CrossViT: two ViT branches at two patch sizes that talk only through their CLS tokens (Chen, Fan, Panda;
ICCV 2021).

Paper: C.-F. Chen, Q. Fan, R. Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification", ICCV 2021, arXiv:2103.14899. Official code: https://github.com/IBM/CrossViT
(``models/crossvit.py``: ``CrossAttention``, ``CrossAttentionBlock``, ``MultiScaleBlock``, ``VisionTransformer``);
timm's ``timm/models/crossvit.py`` (``CrossVit``) is the maintained port, equal to the official code on the same
weights. Written from the paper and that code; no line of it is copied.

The mechanism. Branch s (small patches: many tokens, narrow) and branch l (large patches: few tokens, wide), each
with its own CLS token and position embedding. A multi-scale block runs each branch's own transformer blocks, then
fuses. For each branch b with the other branch o:

    c'   = f_b(x_b[CLS])                          f = LayerNorm + GELU + Linear(D_b -> D_o): into o's width
    z    = [c' ; x_o[patches]]                    the projected CLS in front of o's patch tokens
    c''  = c' + Wo softmax(q kᵀ / √d) v           ONE query: q = Wq LN(z)[0], k = Wk LN(z), v = Wv LN(z)
    x_b  ← [g_b(c'') ; x_b[patches]]              g = LayerNorm + GELU + Linear(D_o -> D_b): back, REPLACES the CLS

The fusion attention has one query, so it costs O(N_o) per image, not O(N_o²) as an all-to-all exchange of
tokens would; the CLS carries what one branch learned into the other, and back. At the end each branch's CLS
goes through its LayerNorm and its own linear head; the logits are the mean of the heads.

State-dict keys equal timm's ``CrossVit`` (``patch_embed.i.proj``, ``pos_embed_i``, ``cls_token_i``,
``blocks.k.blocks.i.j.*``, ``blocks.k.projs.i.{0,2}``, ``blocks.k.fusion.i.j.{norm1,attn.wq,wk,wv,proj}``,
``blocks.k.revert_projs.i.{0,2}``, ``norm.i``, ``head.i``), so a timm state dict loads here as it is. The IBM
code names the embeddings ``pos_embed.i`` / ``cls_token.i`` (a ParameterList): ``from_official_keys`` maps them.

Deviations from the official code (none changes a forward on the same weights):
- a fusion depth of 0 is refused: the official code then builds ONE fusion block anyway (not in a Sequential,
  "backward capability"); here the fusion depth counts the blocks it builds (>= 1).
- any number of branches >= 2 (timm hard-codes the embeddings' names for two; the names are the same here).
- no multi-conv patch embedding (the dagger variants), no dropout / stochastic depth arguments (0 in the lesson).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_heads, check_images, check_int
from vitlab.models.vit import Attention, Block, LayerNorm, PatchEmbed, init_linear_

__all__ = ["CrossAttention", "CrossAttentionBlock", "MultiScaleBlock", "CrossViT", "AllToAllFusion",
           "from_official_keys", "TINY", "BRANCH_TOKENS"]

# The lesson's CrossViT-tiny on 28-px digits: a patch-4 branch (49 tokens, width 32) and a patch-7 branch (16
# tokens, width 64), two multi-scale blocks of (1 small block, 1 large block, 1 fusion block): 0.15 M parameters,
# 1.09x the plain-ViT control's (``recipes.check_matched``), and ~0.6x its time per training step at one thread.
TINY = dict(patch_size=(4, 7), embed_dim=(32, 64), depth=((1, 1, 1), (1, 1, 1)), num_heads=(2, 4),
            mlp_ratio=(2.0, 2.0, 1.0))
BRANCH_TOKENS = (49, 16)


class CrossAttention(nn.Module):
    """One-query attention: the first token of ``x`` [B, N, D] reads all N tokens (itself included).

    ``wq`` / ``wk`` / ``wv`` / ``proj`` as in the official code; output [B, 1, D]."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, check_heads(dim, num_heads, "CrossAttention")
        self.scale = self.head_dim ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, Dh]

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The query's attention over the N tokens, [B, H, 1, N] (rows sum to 1)."""
        q, k = self.heads(self.wq(x[:, :1])), self.heads(self.wk(x))
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(f"CrossAttention: x must be [B, N, {self.num_heads * self.head_dim}], got "
                             f"{tuple(x.shape)}")
        q, k, v = self.heads(self.wq(x[:, :1])), self.heads(self.wk(x)), self.heads(self.wv(x))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, Dh]: one row, O(N)
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))


class CrossAttentionBlock(nn.Module):
    """c'' = c' + CrossAttention(LN([c'; patches])): the residual is the (projected) CLS; no MLP."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.attn(self.norm1(x))  # [B, 1, D]


def _proj(d_in: int, d_out: int) -> nn.Sequential:
    """LayerNorm + GELU + Linear: how a CLS token moves between the branches' widths."""
    return nn.Sequential(LayerNorm(d_in), nn.GELU(), nn.Linear(d_in, d_out))


class MultiScaleBlock(nn.Module):
    """Each branch's own transformer blocks, then the CLS exchange: branch i's CLS visits branch i+1 (mod n)."""

    def __init__(self, dims: Sequence[int], depth: Sequence[int], num_heads: Sequence[int],
                 mlp_ratio: Sequence[float], qkv_bias: bool = True):
        super().__init__()
        n = len(dims)
        if len(depth) != n + 1:
            raise ValueError(f"MultiScaleBlock: depth must give one block count per branch and a fusion depth "
                             f"({n + 1} numbers), got {tuple(depth)}")
        for i, d in enumerate(depth[:-1]):
            check_int(d, f"depth[{i}]", "MultiScaleBlock", low=0)
        check_int(depth[-1], "depth[-1] (the fusion depth)", "MultiScaleBlock", low=1)
        self.num_branches = n
        self.blocks = nn.ModuleList([
            nn.Sequential(*[Block(dims[b], num_heads[b], mlp_ratio[b], qkv_bias=qkv_bias) for _ in range(depth[b])])
            for b in range(n)])
        self.projs = nn.ModuleList([_proj(dims[b], dims[(b + 1) % n]) for b in range(n)])
        self.fusion = nn.ModuleList([
            nn.Sequential(*[CrossAttentionBlock(dims[(b + 1) % n], num_heads[(b + 1) % n], qkv_bias=qkv_bias)
                            for _ in range(depth[-1])])
            for b in range(n)])
        self.revert_projs = nn.ModuleList([_proj(dims[(b + 1) % n], dims[b]) for b in range(n)])

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fuse([blocks(x) for blocks, x in zip(self.blocks, xs)])

    def fuse(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The CLS exchange alone: each branch's CLS reads the next branch's patch tokens and is replaced."""
        n = self.num_branches
        outs = []
        for b in range(n):
            other = xs[(b + 1) % n]
            cls = self.projs[b](xs[b][:, :1])                           # into the other branch's width
            cls = self.fusion[b](torch.cat([cls, other[:, 1:]], dim=1))  # one query over [CLS; other's patches]
            outs.append(torch.cat([self.revert_projs[b](cls), xs[b][:, 1:]], dim=1))  # back; replaces the CLS
        return outs


class CrossViT(nn.Module):
    """Two (or more) ViT branches with CLS cross-attention fusion; logits = mean of the branch heads.

    ``img_scale[i]`` resizes the input for branch i (bicubic), as the official 240/224 models do. The default
    (None) picks, per branch, the largest multiple of its patch size that fits: 28-px digits with patches 4 and 7
    need no resizing; 32-px CIFAR (the gpu profile) gives the patch-7 branch a 28-px copy (16 tokens). ``depth``: one (blocks per branch..., fusion depth)
    tuple per multi-scale block. ``mlp_ratio`` has one entry per branch (an extra last entry, the official
    fusion's, is accepted and unused: the fusion block has no MLP)."""

    def __init__(self, img_size: int = 28, patch_size: Sequence[int] = (4, 7), in_chans: int = 1,
                 num_classes: int = 10, embed_dim: Sequence[int] = (32, 64),
                 depth: Sequence[Sequence[int]] = ((1, 1, 1), (1, 1, 1)), num_heads: Sequence[int] = (2, 4),
                 mlp_ratio: Sequence[float] = (2.0, 2.0, 1.0), img_scale: Sequence[float] | None = None,
                 qkv_bias: bool = True):
        super().__init__()
        check_int(img_size, "img_size", "CrossViT")
        check_int(in_chans, "in_chans", "CrossViT")
        check_int(num_classes, "num_classes", "CrossViT")
        patch_size, embed_dim, num_heads = tuple(patch_size), tuple(embed_dim), tuple(num_heads)
        n = len(patch_size)
        if n < 2:
            raise ValueError(f"CrossViT: patch_size must give one patch size per branch (>= 2), got {patch_size}")
        if img_scale is None:  # each branch sees the largest multiple of its patch that fits (28 px, patch 7: 28)
            img_scale = tuple((img_size // check_int(p, f"patch_size[{b}]", "CrossViT") * p) / img_size
                              for b, p in enumerate(patch_size))
        img_scale = tuple(img_scale)
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("img_scale", img_scale)):
            if len(val) != n:
                raise ValueError(f"CrossViT: {name} must have one entry per branch ({n}), got {val}")
        if len(mlp_ratio) not in (n, n + 1):
            raise ValueError(f"CrossViT: mlp_ratio must have {n} (or {n + 1}) entries, got {tuple(mlp_ratio)}")
        if not depth:
            raise ValueError("CrossViT: depth must list at least one multi-scale block")
        for b in range(n):
            check_int(patch_size[b], f"patch_size[{b}]", "CrossViT")
            check_int(embed_dim[b], f"embed_dim[{b}]", "CrossViT")
            check_int(num_heads[b], f"num_heads[{b}]", "CrossViT")
            if embed_dim[b] % num_heads[b]:
                raise ValueError(f"CrossViT: num_heads[{b}]={num_heads[b]} does not divide embed_dim[{b}]="
                                 f"{embed_dim[b]}")
        # as the official code: branch i sees the image at int(img_scale[i] * img_size) px
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.img_size_scaled = tuple(int(s * img_size) for s in img_scale)
        for b, (s, p) in enumerate(zip(self.img_size_scaled, patch_size)):
            if s % p:
                raise ValueError(f"CrossViT: patch_size[{b}]={p} does not divide branch {b}'s image size {s} "
                                 f"(img_size={img_size} x img_scale[{b}]={img_scale[b]})")
        self.num_branches, self.embed_dim = n, embed_dim
        self.patch_embed = nn.ModuleList([PatchEmbed(s, p, in_chans, d)
                                          for s, p, d in zip(self.img_size_scaled, patch_size, embed_dim)])
        for b in range(n):  # timm's names (the official code: ParameterLists pos_embed.i / cls_token.i)
            num_patches = self.patch_embed[b].num_patches
            setattr(self, f"pos_embed_{b}", nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim[b])))
            setattr(self, f"cls_token_{b}", nn.Parameter(torch.zeros(1, 1, embed_dim[b])))
        self.blocks = nn.ModuleList([MultiScaleBlock(embed_dim, d, num_heads, mlp_ratio, qkv_bias=qkv_bias)
                                     for d in depth])
        self.norm = nn.ModuleList([LayerNorm(d) for d in embed_dim])
        self.head = nn.ModuleList([nn.Linear(d, num_classes) for d in embed_dim])
        self._init_weights()

    def _init_weights(self) -> None:
        for b in range(self.num_branches):
            trunc_normal_(getattr(self, f"pos_embed_{b}"), std=0.02)
            trunc_normal_(getattr(self, f"cls_token_{b}"), std=0.02)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"{k}_{b}" for b in range(self.num_branches) for k in ("pos_embed", "cls_token")}

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image -> one token sequence per branch, [B, 1 + N_b, D_b], CLS first, positions added."""
        check_images(x, self.in_chans, self.img_size, "CrossViT")
        xs = []
        for b, pe in enumerate(self.patch_embed):
            s = self.img_size_scaled[b]
            xb = x if s == self.img_size else F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
            xb = pe(xb)
            cls = getattr(self, f"cls_token_{b}").expand(x.shape[0], -1, -1)
            xs.append(torch.cat([cls, xb], dim=1) + getattr(self, f"pos_embed_{b}"))
        return xs

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = self.embed(x)
        for blk in self.blocks:
            xs = blk(xs)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def forward_head(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(t[:, 0]) for head, t in zip(self.head, xs)]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class AllToAllFusion(nn.Module):
    """The alternative CrossViT's fusion avoids: every token of both branches attends to every other one
    (both branches brought to width ``dim``; one self-attention over the N_s + N_l tokens). For the cost
    comparison only: O((N_s + N_l)²) attention against the CLS fusion's O(N)."""

    def __init__(self, dims: Sequence[int], dim: int, num_heads: int):
        super().__init__()
        self.inp = nn.ModuleList([nn.Linear(d, dim) for d in dims])
        self.norm = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.out = nn.ModuleList([nn.Linear(dim, d) for d in dims])

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """``forward(x_s, x_l)``: each branch's tokens [B, N_b, D_b] -> the same, after the exchange."""
        sizes = [t.shape[1] for t in xs]
        z = torch.cat([p(t) for p, t in zip(self.inp, xs)], dim=1)
        z = z + self.attn(self.norm(z))  # [B, N_s + N_l, dim]: every token reads every token
        return [t + o(zi) for t, o, zi in zip(xs, self.out, z.split(sizes, dim=1))]


def from_official_keys(state_dict: dict) -> dict:
    """An IBM/CrossViT state dict with this module's (= timm's) keys: ``pos_embed.i`` -> ``pos_embed_i``,
    ``cls_token.i`` -> ``cls_token_i``; every other key is the same."""
    out = {}
    for k, v in state_dict.items():
        for name in ("pos_embed", "cls_token"):
            if k.startswith(name + "."):
                k = k.replace(name + ".", name + "_", 1)
        out[k] = v
    return out


def _register() -> None:
    from vitlab.methods.architectures import recipes

    recipes.register("crossvit", CrossViT, img_size=28, in_chans=1, num_classes=10, **TINY)


_register()
