"""ViT-ResNAS: multi-stage ViTs with residual spatial reduction, searched with a weight-sharing supernet
(Y.-L. Liao, S. Karaman, V. Sze, "Searching for Efficient Multi-Stage Vision Transformers", 2021; official code:
yilunliao/vit-search, ``nets/vit_sr_supernet.py``: ``SpatialReductionPatchEmbedding``,
``FlexibleDistillVisionTransformerSR``; ``nets/channel_drop.py``; ``nets/supernet_blocks.py``; ``evo_search.py``).

1. **Residual spatial reduction** between stages, so that later stages see fewer, wider tokens (like a CNN's
   stages). On tokens [CLS; patches] of width C_in on a g x g grid:

       main:      LN(all tokens) -> patches: Conv(k = s+1, stride s, pad s//2) -> + new position embedding
                                    CLS:     Linear(C_in -> C_out)
       residual:  patches: AvgPool(s) of the un-normalised patches; CLS as it is; both zero-padded to C_out
       out = main + residual

   The residual path keeps the reduction close to an identity at initialisation, which is what lets deep
   multi-stage ViTs train (the paper's ablation: residual vs plain reduction).
2. **Weight-sharing search.** One supernet holds the widest blocks; a sub-network keeps the first heads, the first
   MLP units and may skip whole blocks (channel masks). Training samples a sub-network per step; afterwards an
   evolutionary search ranks sub-networks by their accuracy with the shared weights, under a MACs limit.

Deviations, named: no distillation token; a single sampled architecture per step (the official also splits the
batch into sub-batches with different masks, ``example_per_arch``); a two-stage 28 px model (patch 2: 14 x 14
tokens, then 7 x 7) instead of three stages at 224 px; masks multiply activations (the official ``ChannelDrop``
does the same, by sampling); the space samples heads, MLP width and block skips but not the embedding width, and
all widths from the first step (the official warm-up grows the sampled set); the search's MACs are counted
analytically (``subnet_macs``).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_heads, check_images, check_int
from vitlab.models.layers import trunc_normal_
from vitlab.models.vit import init_linear_

from . import recipes

__all__ = ["SpatialReduction", "MaskedBlock", "ResNASViT", "Subnet", "subnet_macs", "evolve", "CONFIG", "PROBES"]


class SpatialReduction(nn.Module):
    """Tokens [B, 1 + g*g, C_in] -> [B, 1 + (g/s)^2, C_out] (the official ``SpatialReductionPatchEmbedding``)."""

    def __init__(self, grid: int, c_in: int, c_out: int, stride: int = 2, residual: bool = True):
        super().__init__()
        check_int(grid, "grid", "SpatialReduction", low=1)
        check_int(stride, "stride", "SpatialReduction", low=1)
        if grid % stride:
            raise ValueError(f"SpatialReduction: stride={stride} must divide the token grid {grid}")
        if c_out < c_in:
            raise ValueError(f"SpatialReduction: c_out={c_out} must be >= c_in={c_in} (the residual is zero-padded)")
        self.grid, self.stride, self.c_in, self.c_out, self.residual = grid, stride, c_in, c_out, residual
        self.norm = nn.LayerNorm(c_in)
        self.reduce = nn.Conv2d(c_in, c_out, kernel_size=stride + 1, stride=stride, padding=stride // 2)
        self.token = nn.Linear(c_in, c_out)
        self.pos_embed = nn.Parameter(torch.zeros(1, (grid // stride) ** 2, c_out))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        g, s = self.grid, self.stride
        if N != 1 + g * g or C != self.c_in:
            raise ValueError(f"SpatialReduction: tokens [{B}, {N}, {C}]; expected [B, 1 + {g}^2, {self.c_in}]")
        h = self.norm(x)
        patches = h[:, 1:].transpose(1, 2).reshape(B, C, g, g)
        main = torch.cat([self.token(h[:, :1]), self.reduce(patches).flatten(2).transpose(1, 2) + self.pos_embed], 1)
        if not self.residual:
            return main
        pooled = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(B, C, g, g), s).flatten(2).transpose(1, 2)
        res = torch.cat([x[:, :1], pooled], dim=1)
        return main + F.pad(res, (0, self.c_out - C))


class MaskedBlock(nn.Module):
    """A pre-norm ViT block whose heads, MLP units and very existence can be masked: the supernet's block.
    ``set_subnet(heads, mlp, keep)`` keeps the first ``heads`` heads and ``mlp`` hidden units (keep=False: skip)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        head_dim = check_heads(dim, num_heads, "MaskedBlock")
        self.dim, self.num_heads, self.head_dim, self.mlp_hidden = dim, num_heads, head_dim, mlp_hidden
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, dim)
        self.set_subnet(num_heads, mlp_hidden, True)

    def set_subnet(self, heads: int, mlp: int, keep: bool = True) -> None:
        if not 1 <= heads <= self.num_heads or not 1 <= mlp <= self.mlp_hidden:
            raise ValueError(f"MaskedBlock.set_subnet: heads must be in [1, {self.num_heads}] and mlp in "
                             f"[1, {self.mlp_hidden}], got heads={heads}, mlp={mlp}")
        self.heads, self.mlp, self.keep = heads, mlp, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep:
            return x
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d]
        head_mask = (torch.arange(self.num_heads, device=x.device) < self.heads).to(out.dtype)
        out = out * head_mask[None, :, None, None]
        x = x + self.proj(out.transpose(1, 2).reshape(B, N, C))
        hidden = F.gelu(self.fc1(self.norm2(x)))
        hidden = hidden * (torch.arange(self.mlp_hidden, device=x.device) < self.mlp).to(hidden.dtype)
        return x + self.fc2(hidden)


def _skipped(blk: MaskedBlock) -> tuple[int, int, bool]:
    """A skipped block's one spelling (its widths do not matter), so equal architectures compare equal."""
    return (blk.num_heads, blk.mlp_hidden, False)


@dataclass(frozen=True)
class Subnet:
    """One sub-network: per block, (heads, MLP units, keep)."""
    blocks: tuple[tuple[int, int, bool], ...]


class ResNASViT(nn.Module):
    """Patch embedding (patch p) -> stage 1 blocks -> SpatialReduction (x2) -> stage 2 blocks -> LN -> CLS head.
    ``depths``/``dims``/``num_heads``/``mlp_ratio`` define the widest network (the supernet); ``residual=False`` is
    the plain-reduction ablation. ``supernet=True`` trains as a weight-sharing supernet: every training forward
    samples a sub-network (``sample_subnet``, from torch's seeded generator), while eval runs the sub-network last
    set (the whole network by default). ``subnet`` fixes one sub-network for good (a stand-alone model of the
    search space: masked, so exactly the smaller network, at the supernet's compute)."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, patch_size: int = 2,
                 dims=(32, 64), depths=(1, 3), num_heads=(1, 2), mlp_ratio: float = 2.0, residual: bool = True,
                 supernet: bool = False, subnet=None):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"ResNASViT: patch_size={patch_size} does not divide img_size={img_size}")
        if not (len(dims) == len(depths) == len(num_heads) == 2):
            raise ValueError(f"ResNASViT: dims, depths and num_heads need 2 entries (2 stages), got {dims}, {depths}, "
                             f"{num_heads}")
        self.img_size, self.in_chans = img_size, in_chans
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, dims[0], patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dims[0]))
        self.stage1 = nn.ModuleList([MaskedBlock(dims[0], num_heads[0], int(dims[0] * mlp_ratio))
                                     for _ in range(depths[0])])
        self.reduction = SpatialReduction(grid, dims[0], dims[1], 2, residual)
        self.stage2 = nn.ModuleList([MaskedBlock(dims[1], num_heads[1], int(dims[1] * mlp_ratio))
                                     for _ in range(depths[1])])
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_(self)
        if supernet and subnet is not None:
            raise ValueError("ResNASViT: give supernet=True or a fixed subnet, not both")
        self.supernet = supernet
        self.set_subnet(None if subnet is None else Subnet(tuple((int(h), int(m), bool(k)) for h, m, k in subnet)))

    @property
    def blocks(self) -> list[MaskedBlock]:
        return [*self.stage1, *self.stage2]

    def largest(self) -> Subnet:
        return Subnet(tuple((b.num_heads, b.mlp_hidden, True) for b in self.blocks))

    def set_subnet(self, subnet: Subnet | None) -> "ResNASViT":
        """Mask the supernet down to ``subnet`` (None: the whole network)."""
        subnet = subnet or self.largest()
        if not isinstance(subnet, Subnet):
            raise TypeError(f"ResNASViT.set_subnet: expected a Subnet or None, got {type(subnet).__name__}")
        if len(subnet.blocks) != len(self.blocks):
            raise ValueError(f"ResNASViT.set_subnet: {len(subnet.blocks)} block settings for {len(self.blocks)} blocks")
        for blk, (heads, mlp, keep) in zip(self.blocks, subnet.blocks):
            blk.set_subnet(heads, mlp, keep)
        self.subnet = subnet
        return self

    def sample_subnet(self, rng: random.Random, widths=(0.5, 1.0), skip_prob: float = 0.2) -> Subnet:
        """A random sub-network: each block keeps a fraction of its heads and MLP units from ``widths``; a block
        after the first of its stage is skipped with ``skip_prob``."""
        out = []
        for i, blk in enumerate(self.blocks):
            first = i == 0 or i == len(self.stage1)
            heads = max(1, round(blk.num_heads * rng.choice(widths)))
            mlp = max(1, round(blk.mlp_hidden * rng.choice(widths)))
            keep = first or rng.random() >= skip_prob
            out.append((heads, mlp, True) if keep else _skipped(blk))
        return Subnet(tuple(out))

    def all_subnets(self, widths=(0.5, 1.0)) -> list[Subnet]:
        """Every sub-network ``sample_subnet`` can draw (small spaces only: the product of the per-block choices)."""
        per_block = []
        for i, blk in enumerate(self.blocks):
            first = i == 0 or i == len(self.stage1)
            kept = sorted({(max(1, round(blk.num_heads * a)), max(1, round(blk.mlp_hidden * b)), True)
                           for a in widths for b in widths})
            per_block.append(kept if first else kept + [_skipped(blk)])
        return [Subnet(blocks) for blocks in itertools.product(*per_block)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "ResNASViT")
        if self.supernet and self.training:  # one sampled sub-network per step; eval keeps the one set
            kept = self.subnet
            self.set_subnet(self.sample_subnet(random.Random(int(torch.randint(2 ** 31 - 1, ())))))
            try:
                return self._forward(x)
            finally:
                self.set_subnet(kept)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        for blk in self.stage1:
            t = blk(t)
        t = self.reduction(t)
        for blk in self.stage2:
            t = blk(t)
        return self.head(self.norm(t)[:, 0])


def subnet_macs(model: ResNASViT, subnet: Subnet) -> int:
    """Multiply-accumulates per image of the blocks ``subnet`` keeps (attention projections, the two attention
    products of the kept heads, MLP), the part the search changes."""
    grid = model.img_size // model.patch_embed.stride[0]
    tokens = [1 + grid * grid] * len(model.stage1) + [1 + (grid // 2) ** 2] * len(model.stage2)
    total = 0
    for blk, n, (heads, mlp, keep) in zip(model.blocks, tokens, subnet.blocks):
        if keep:
            d = blk.dim
            total += n * d * 3 * d + n * d * d  # qkv and proj (masked heads still computed: counted as kept)
            total += 2 * n * n * heads * blk.head_dim  # q k^T and attn v of the kept heads
            total += 2 * n * d * mlp  # fc1 and fc2 over the kept units
    return total


def evolve(fitness, model: ResNASViT, *, max_macs: int, population: int = 8, generations: int = 4,
           mutate_prob: float = 0.3, seed: int = 0) -> list[tuple[float, Subnet]]:
    """Evolutionary search (the official ``evo_search.py`` loop, small): keep the best half, refill with mutations
    and crossovers, only sub-networks within ``max_macs`` and none evaluated before (the official keeps a visited
    set too). ``fitness(subnet) -> float`` (e.g. supernet val accuracy). Returns every (fitness, subnet)
    evaluated, best first."""
    check_int(population, "population", "evolve", low=2)
    rng = random.Random(seed)
    seen: dict[Subnet, float] = {}

    def valid(s):
        return subnet_macs(model, s) <= max_macs

    def sample():
        for _ in range(1000):
            s = model.sample_subnet(rng)
            if valid(s):
                return s
        raise ValueError(f"evolve: no sub-network found within max_macs={max_macs}")

    def score(s):
        if s not in seen:
            seen[s] = float(fitness(s))
        return seen[s]

    pop = []
    for _ in range(1000):  # a first population of distinct sub-networks (fewer if the budget leaves fewer)
        if len(pop) == population:
            break
        s = sample()
        if s not in pop:
            pop.append(s)
    for _ in range(generations):
        pop = sorted(set(pop), key=score, reverse=True)[:max(2, population // 2)]
        children = []
        for _ in range(1000):  # a small space runs out of new sub-networks: stop trying, keep the survivors
            if len(pop) + len(children) >= population:
                break
            a, b = rng.sample(pop, 2)
            child = Subnet(tuple(x if rng.random() < 0.5 else y for x, y in zip(a.blocks, b.blocks)))
            if rng.random() < mutate_prob:
                fresh = model.sample_subnet(rng)
                i = rng.randrange(len(child.blocks))
                child = Subnet(child.blocks[:i] + (fresh.blocks[i],) + child.blocks[i + 1:])
            if valid(child) and child not in seen and child not in children:  # never the same one twice
                children.append(child)
        pop = pop + children
    for s in pop:
        score(s)
    return sorted(((f, s) for s, f in seen.items()), key=lambda fs: fs[0], reverse=True)


# The lesson's tiny supernet: patch 2 (14 x 14 tokens) at width 32, one block; residual reduction to 7 x 7 at width
# 64, three blocks.
CONFIG = dict(img_size=28, in_chans=1, num_classes=10, patch_size=2, dims=(32, 64), depths=(1, 3), num_heads=(1, 2),
              mlp_ratio=2.0)
recipes.register("vit_resnas", ResNASViT, residual=True, **CONFIG)
recipes.register("vit_resnas_plain_sr", ResNASViT, residual=False, **CONFIG)
# The weight-sharing supernet over that space, trained by the same recipe (a sampled sub-network per step).
recipes.register("vit_resnas_supernet", ResNASViT, residual=True, supernet=True, **CONFIG)
# Sub-networks trained stand-alone (one seed each), to check the supernet's ranking against: with the whole network
# (``vit_resnas``) they span the space's cost, from the cheapest stage 2 to a deep narrow one.
PROBES = {
    "small": ((1, 32, True), (1, 64, True), (2, 128, False), (2, 128, False)),
    "mid": ((1, 64, True), (2, 128, True), (1, 64, True), (2, 128, False)),
    "narrow": ((1, 32, True), (1, 64, True), (1, 64, True), (1, 64, True)),
}
for _name, _subnet in PROBES.items():
    recipes.register(f"vit_resnas_{_name}", ResNASViT, residual=True, subnet=_subnet, **CONFIG)
