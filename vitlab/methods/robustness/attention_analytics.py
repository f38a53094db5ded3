"""How Does Attention Work in Vision Transformers? A Visual Analytics Attempt (Li, Wang, Dai, Wang, Yeh, Zheng, Zhang,
Ma; PacificVis 2023 / TVCG 29(6), arXiv:2303.13731), written from the paper (no official code was released).

Three questions about a trained ViT's heads, each answered by a measurement:

    which heads matter?   importance by pruning: switch one head off (a gate ξ = 0 on its output) and measure the
                          drop in accuracy; and the Taylor score |∂L/∂ξ| at ξ = 1 (Michel et al., 2019), one backward
    how far do they look? the attention a patch gives to the patch at offset (Δr, Δc), averaged over patches and
                          images (a (2g − 1)² profile per head), and the mean attention distance in pixels per layer
    what patterns?        every query's attention map re-centred on the query, (2g − 1)² pixels, encoded by a small
                          autoencoder and clustered (k-means) into a few prototype patterns

    with gated_heads(vit, gates):                      # gates [depth, heads]; ones: the model unchanged
        logits = vit(x)
    drop = ablation_importance(vit, images, labels)    # [depth, heads] accuracy drop per switched-off head
    taylor = taylor_importance(vit, images, labels)    # [depth, heads]
    profile = offset_profile(probs, grid)              # [heads, 2g-1, 2g-1] from one block's [B, H, N, N] softmax
    dist = attention_distance(probs, grid, patch)      # [heads] mean distance in pixels

Our reading of the paper (no code; these are our choices):
- A head's gate multiplies its output before the heads are merged (before ``proj``), as in Michel et al.
- The Taylor score is accumulated as |∂L/∂ξ| per batch of ``batch_size`` images and averaged (Michel et al.'s
  code does the same, batch by batch), L the mean cross-entropy.
- The offset profile and the distance read patch-to-patch attention (the CLS token's row and column are left out);
  the distance renormalises each query's attention over the patches.
- The autoencoder is small (two conv layers each way, an 8-number code) and trained for a few hundred steps; the
  paper's is bigger and trained on ImageNet heads.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_batch, check_int
from vitlab.measure import accuracy
from vitlab.models import VisionTransformer

__all__ = ["gated_heads", "ablation_importance", "taylor_importance", "offset_profile", "attention_distance",
           "recentred_maps", "PatternAutoencoder", "fit_patterns", "attention_probs", "measure", "unpack",
           "MEASURE_KEY"]


def _check_vit(model, fn: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{fn}: model must be a course VisionTransformer, got {type(model).__name__}")
    return model


def _gate_shape(model: VisionTransformer) -> tuple[int, int]:
    return len(model.blocks), model.blocks[0].attn.num_heads


@contextmanager
def gated_heads(model: VisionTransformer, gates: Tensor):
    """Within the block, every head h of block l has its output multiplied by ``gates[l, h]`` before the heads are
    merged (``attn.proj``'s input). ``gates`` [depth, heads] may require grad (the Taylor score)."""
    _check_vit(model, "gated_heads")
    shape = _gate_shape(model)
    if not isinstance(gates, Tensor) or tuple(gates.shape) != shape:
        raise ValueError(f"gated_heads: gates must be a tensor [depth, heads] = {list(shape)}, got "
                         f"{tuple(gates.shape) if isinstance(gates, Tensor) else type(gates).__name__}")
    handles = []
    for layer, blk in enumerate(model.blocks):
        heads = blk.attn.num_heads

        def gate(module, args, layer=layer, heads=heads):
            (x,) = args  # [B, N, H * Dh], the heads side by side
            B, N, C = x.shape
            return ((x.view(B, N, heads, C // heads) * gates[layer].to(x.dtype).view(1, 1, heads, 1)).view(B, N, C),)

        handles.append(blk.attn.proj.register_forward_pre_hook(gate))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ablation_importance(model: VisionTransformer, images: Tensor, labels: Tensor, batch_size: int = 500) -> Tensor:
    """[depth, heads]: the clean accuracy minus the accuracy with that one head switched off (gate 0)."""
    _check_vit(model, "ablation_importance")
    check_batch(images, labels, "ablation_importance")
    model.eval()
    base = accuracy(model, (images, labels), batch_size=batch_size)
    depth, heads = _gate_shape(model)
    drop = torch.zeros(depth, heads)
    for layer in range(depth):
        for h in range(heads):
            gates = torch.ones(depth, heads)
            gates[layer, h] = 0
            with gated_heads(model, gates):
                drop[layer, h] = base - accuracy(model, (images, labels), batch_size=batch_size)
    return drop


def taylor_importance(model: VisionTransformer, images: Tensor, labels: Tensor, batch_size: int = 50) -> Tensor:
    """[depth, heads]: |∂L/∂ξ| at ξ = 1, L the mean cross-entropy of a batch, averaged over batches of
    ``batch_size`` (Michel et al.'s head importance). One backward per batch; the parameters get no gradient."""
    _check_vit(model, "taylor_importance")
    check_batch(images, labels, "taylor_importance")
    check_int(batch_size, "batch_size", "taylor_importance", low=1)
    model.eval()
    gates = torch.ones(_gate_shape(model), requires_grad=True)
    total, n = torch.zeros(_gate_shape(model)), 0
    with gated_heads(model, gates):
        for i in range(0, len(images), batch_size):
            loss = F.cross_entropy(model(images[i:i + batch_size]), labels[i:i + batch_size])
            (g,) = torch.autograd.grad(loss, gates)
            total += g.abs()
            n += 1
    return total / n


@torch.no_grad()
def attention_probs(model: VisionTransformer, images: Tensor) -> list[Tensor]:
    """Per block, the softmax [B, H, N, N] (CLS first) on ``images``."""
    _check_vit(model, "attention_probs")
    model.eval()
    _, sides = model(images, side=("probs",))
    return [s["probs"].float() for s in sides]


def _check_probs(probs, grid, fn: str, prefix: int) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    if not isinstance(probs, Tensor) or probs.ndim != 4 or probs.shape[-1] != probs.shape[-2] or \
            probs.shape[-1] != grid[0] * grid[1] + prefix:
        raise ValueError(f"{fn}: probs must be one block's softmax [B, H, N, N] with N = {prefix} + grid "
                         f"{grid[0]}x{grid[1]}, got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__}")
    return grid


def _positions(grid: tuple[int, int]) -> Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)  # [L, 2]


def recentred_maps(probs: Tensor, grid, prefix: int = 1) -> Tensor:
    """[B, H, L, 2gh − 1, 2gw − 1]: each patch query's attention over the patches, placed so that the query sits in
    the centre (offset (0, 0)); offsets that fall outside the image are 0."""
    gh, gw = _check_probs(probs, grid, "recentred_maps", prefix)
    p = probs[..., prefix:, prefix:]  # [B, H, L, L] patch-to-patch
    B, H, L, _ = p.shape
    pos = _positions((gh, gw))
    off = pos[None, :, :] - pos[:, None, :] + torch.tensor([gh - 1, gw - 1])  # [Lq, Lk, 2] offset key − query
    index = (off[..., 0] * (2 * gw - 1) + off[..., 1])  # [Lq, Lk] cell of the re-centred map
    out = torch.zeros(B, H, L, (2 * gh - 1) * (2 * gw - 1), dtype=p.dtype)
    out.scatter_(-1, index.expand(B, H, L, L), p)
    return out.view(B, H, L, 2 * gh - 1, 2 * gw - 1)


def offset_profile(probs: Tensor, grid, prefix: int = 1) -> Tensor:
    """[H, 2gh − 1, 2gw − 1]: the mean attention a patch gives to the patch at each offset (Δr, Δc), over the images
    and over the queries for which that offset lies inside the image. Identity attention gives 1 at the centre
    and 0 elsewhere; attention uniform over the L patches gives 1/L everywhere."""
    maps = recentred_maps(probs, grid, prefix)  # [B, H, L, R, C]
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    ones = torch.ones(1, 1, gh * gw + prefix, gh * gw + prefix)
    valid = recentred_maps(ones, grid, prefix)[0, 0]  # [L, R, C]: 1 where the offset exists for that query
    return maps.sum(dim=(0, 2)) / (valid.sum(0) * maps.shape[0])


def attention_distance(probs: Tensor, grid, patch_size: int, prefix: int = 1) -> Tensor:
    """[H]: the mean distance in pixels between a patch query and the patches it attends to, each query's attention
    renormalised over the patches (the ViT paper's "mean attention distance")."""
    gh, gw = _check_probs(probs, grid, "attention_distance", prefix)
    check_int(patch_size, "patch_size", "attention_distance", low=1)
    p = probs[..., prefix:, prefix:].float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    pos = _positions((gh, gw)).float() * patch_size
    dist = torch.cdist(pos, pos)  # [L, L]
    return (p * dist).sum(-1).mean(dim=(0, 2))


class PatternAutoencoder(nn.Module):
    """A small conv autoencoder of re-centred attention maps [B, 1, S, S] (S = 2g − 1) to a ``code`` vector."""

    def __init__(self, size: int = 13, code: int = 8, width: int = 16):
        super().__init__()
        check_int(size, "size", "PatternAutoencoder", low=3)
        check_int(code, "code", "PatternAutoencoder", low=1)
        self.size = size
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
                                     nn.Linear(width * ((size + 1) // 2) ** 2, code))
        self.decoder = nn.Sequential(nn.Linear(code, width * size * size), nn.GELU(),
                                     nn.Unflatten(1, (width, size, size)), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction [B, 1, S, S], code [B, code])."""
        if maps.ndim != 4 or maps.shape[1:] != (1, self.size, self.size):
            raise ValueError(f"PatternAutoencoder: maps must be [B, 1, {self.size}, {self.size}], got "
                             f"{tuple(maps.shape)}")
        code = self.encoder(maps)
        return self.decoder(code), code


def fit_patterns(maps: Tensor, *, clusters: int = 6, steps: int = 400, code: int = 8, seed: int = 0,
                 batch_size: int = 256) -> dict:
    """Train a ``PatternAutoencoder`` on ``maps`` [M, S, S] (each scaled to max 1), cluster the codes with k-means.
    Returns {"model", "codes" [M, code], "labels" [M], "prototypes" [clusters, S, S] (the mean map per cluster),
    "losses" (per step)}."""
    from sklearn.cluster import KMeans

    if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"fit_patterns: maps must be a tensor [M, S, S], got "
                         f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    check_int(clusters, "clusters", "fit_patterns", low=2, high=len(maps))
    check_int(steps, "steps", "fit_patterns", low=1)
    x = (maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None])[:, None].float()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = PatternAutoencoder(maps.shape[-1], code)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        rec, _ = ae(x[idx])
        loss = F.mse_loss(rec, x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        codes = torch.cat([ae(x[i:i + 1024])[1] for i in range(0, len(x), 1024)])
    labels = torch.from_numpy(KMeans(clusters, n_init=10, random_state=seed).fit_predict(codes.numpy())).long()
    prototypes = torch.stack([x[labels == c, 0].mean(0) for c in range(clusters)])
    return {"model": ae.eval(), "codes": codes, "labels": labels, "prototypes": prototypes, "losses": losses}


MEASURE_KEY = "attnanalytics-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes


def measure(model: VisionTransformer, profile=None) -> dict:
    """What the lesson reads off one trained ViT of chapter 1 (on its digit test set): per head (block l, head h)
    ``drop_l<l>_h<h>`` (``ablation_importance``), ``taylor_l<l>_h<h>`` (``taylor_importance``) and
    ``dist_l<l>_h<h>`` (``attention_distance`` in pixels, on the first 200 test digits). Cached per checkpoint by
    the notebook through ``zoo.measured(name, MEASURE_KEY, measure)``."""
    from vitlab.methods.architectures import recipes as R

    _check_vit(model, "measure")
    _, _, test = R.data("digits", profile)
    drop = ablation_importance(model, test.images, test.labels)
    taylor = taylor_importance(model, test.images, test.labels)
    dist = torch.stack([attention_distance(p, model.patch_embed.grid_size, model.patch_embed.patch_size,
                                           model.num_prefix_tokens)
                        for p in attention_probs(model, test.images[:200])])
    out = {}
    for name, t in (("drop", drop), ("taylor", taylor), ("dist", dist)):
        out.update({f"{name}_l{l}_h{h}": t[l, h].item() for l in range(t.shape[0]) for h in range(t.shape[1])})
    return out


def unpack(values: dict, name: str) -> Tensor:
    """``measure``'s flat ``<name>_l<l>_h<h>`` numbers back as a tensor [depth, heads]."""
    keys = [k for k in values if k.startswith(f"{name}_l")]
    if not keys:
        raise ValueError(f"unpack: no {name!r} numbers in values (keys like '{name}_l0_h0'); got {sorted(values)[:4]}")
    depth = 1 + max(int(k.split("_l")[1].split("_")[0]) for k in keys)
    heads = 1 + max(int(k.rsplit("_h", 1)[1]) for k in keys)
    return torch.tensor([[values[f"{name}_l{l}_h{h}"] for h in range(heads)] for l in range(depth)])
