"""GGeM: Group Generalized Mean pooling for ViTs (Ko et al., NAVER, arXiv 2212.04114).

A ViT's image vector is its CLS token or the mean of its patch tokens (GAP). Generalized mean (GeM) pooling
interpolates between the mean (p = 1) and the max (p -> inf) with one learnable exponent p:

    f_d = ( (1/N) sum_i max(x_id, eps)^p )^(1/p)

GGeM splits the D channels into G contiguous groups, the heads' channels (G = num_heads, D/G = head_dim), and
learns one p_g per group: channels a head writes share an exponent, and different heads may pool differently.
G = 1 is GeM; p_g = 1 is the mean of the clamped tokens.

No official code was found (see CURRICULUM.md #4). Paper-level choices, named here:
- inputs are the final (post-LayerNorm) patch tokens, CLS excluded, clamped at ``eps`` as GeM does (ViT
  activations can be negative; the clamp drops the negative part, as cirtorch/mmpretrain's GeM do);
- p_g initialised at 3 (GeM's usual start) and learned with the head.

The lesson probes a frozen course ViT (chapter 1's plain ViT, 4 heads, so G = 4): it caches the final tokens
once (``token_features``), then trains a linear head on each pooling (``train_probe``) over several seeds and
compares them, plus retrieval mAP@R of the pooled vectors (``map_at_r``).

``GGeMViT`` is the same pooling trained end to end: the chapter's plain ViT whose head reads GGeM over its final
patch tokens (one exponent per head's channels) instead of the CLS token, registered as ``ggem_vit`` for the
chapter comparison (same recipe, seeds and data as every chapter-1 architecture).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_model, check_ndim, check_number
from vitlab.models import VisionTransformer
from vitlab.seed import seed_everything

from . import recipes

__all__ = ["GGeM", "GGeMViT", "PoolingProbe", "POOLINGS", "token_features", "train_probe", "probe_accuracy", "map_at_r",
           "DEFAULTS"]

POOLINGS = ("cls", "gap", "gem", "ggem")
# the probe recipe: the same for every pooling (only the pooling differs)
DEFAULTS = dict(steps=600, batch_size=256, lr=1e-2, weight_decay=1e-4, p_init=3.0, eps=1e-6)


class GGeM(nn.Module):
    """Group GeM over tokens: [B, N, D] -> [B, D], one learnable exponent per group of D / groups channels."""

    def __init__(self, dim: int, groups: int = 1, p_init: float = 3.0, eps: float = 1e-6):
        super().__init__()
        dim = check_int(dim, "dim", "GGeM", low=1)
        groups = check_int(groups, "groups", "GGeM", low=1)
        if dim % groups:
            raise ValueError(f"GGeM: groups={groups} must divide dim={dim} (one group per head: groups=num_heads)")
        check_number(p_init, "p_init", "GGeM", low=0, low_open=True)
        check_number(eps, "eps", "GGeM", low=0, low_open=True)
        self.dim, self.groups, self.eps = dim, groups, eps
        self.p = nn.Parameter(torch.full((groups,), float(p_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_ndim(x, 3, "x", "GGeM")
        if x.shape[-1] != self.dim:
            raise ValueError(f"GGeM: x has {x.shape[-1]} channels; expected dim={self.dim}")
        B, N, D = x.shape
        p = self.p.repeat_interleave(D // self.groups)  # [D]: each channel its group's exponent
        return x.clamp(min=self.eps).pow(p).mean(dim=1).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, eps={self.eps}"


class GGeMViT(VisionTransformer):
    """A ViT whose image vector is GGeM over its final patch tokens (after the last LayerNorm), one exponent per
    head's channels (groups = num_heads); the CLS token stays in the sequence, as in the paper's ViTs, but the head
    does not read it. Takes VisionTransformer's arguments (global_pool is GGeM's), plus ``p_init`` and ``eps``."""

    def __init__(self, *, num_heads: int = 4, embed_dim: int = 64, p_init: float = 3.0, eps: float = 1e-6,
                 **kwargs):
        if "global_pool" in kwargs:
            raise ValueError("GGeMViT: global_pool is GGeM; do not pass global_pool")
        super().__init__(num_heads=num_heads, embed_dim=embed_dim, **kwargs)
        self.ggem = GGeM(embed_dim, num_heads, p_init, eps)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.ggem(x[:, self.num_prefix_tokens:])


class PoolingProbe(nn.Module):
    """A linear probe on frozen tokens [B, 1 + N, D] (CLS first): pooling -> Linear(D, classes)."""

    def __init__(self, pooling: str, dim: int, num_classes: int, groups: int = 1, p_init: float = 3.0,
                 eps: float = 1e-6):
        super().__init__()
        self.pooling = check_choice(pooling, POOLINGS, "pooling", "PoolingProbe")
        g = {"gem": 1, "ggem": groups}.get(pooling)
        self.gem = GGeM(dim, g, p_init, eps) if g else None
        self.head = nn.Linear(dim, check_int(num_classes, "num_classes", "PoolingProbe", low=2))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled image vector [B, D]."""
        check_ndim(tokens, 3, "tokens", "PoolingProbe")
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        return patches.mean(dim=1) if self.pooling == "gap" else self.gem(patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


@torch.no_grad()
def token_features(vit: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen ViT's final tokens [B, 1 + N, D] (after its last LayerNorm, CLS first), computed once."""
    check_model(vit, "token_features")
    check_ndim(images, 4, "images", "token_features")
    if not hasattr(vit, "forward_features"):
        raise TypeError("token_features: vit must have forward_features (a vitlab VisionTransformer)")
    was = vit.training
    vit.eval()
    out = torch.cat([vit.forward_features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    vit.train(was)
    return out


def train_probe(tokens: torch.Tensor, labels: torch.Tensor, pooling: str, *, num_classes: int, groups: int = 1,
                seed: int = 0, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                weight_decay: float | None = None) -> PoolingProbe:
    """Train a ``PoolingProbe`` on cached tokens with AdamW + cosine (``DEFAULTS`` unless given). ``seed`` sets the
    head's initialisation and the batch order; every pooling gets the same steps, batches and lr."""
    check_ndim(tokens, 3, "tokens", "train_probe")
    if len(labels) != len(tokens):
        raise ValueError(f"train_probe: labels has {len(labels)} entries; expected one per image ({len(tokens)})")
    cfg = {**DEFAULTS, **{k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr,
                                                    weight_decay=weight_decay).items() if v is not None}}
    check_int(cfg["steps"], "steps", "train_probe", low=1)
    seed_everything(seed)
    probe = PoolingProbe(pooling, tokens.shape[-1], num_classes, groups, cfg["p_init"], cfg["eps"])
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["steps"])
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg["steps"]):
        idx = torch.randint(0, len(tokens), (cfg["batch_size"],), generator=g)
        loss = F.cross_entropy(probe(tokens[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if probe.gem is not None:  # keep p in GeM's range: p -> 0 makes x^p flat, p < 0 inverts the ranking
            with torch.no_grad():
                probe.gem.p.clamp_(min=1.0)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: PoolingProbe, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    return (probe(tokens).argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def map_at_r(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean average precision at R (Musgrave et al., "A metric learning reality check"): every item queries
    all others by cosine similarity; R = the number of other items of its class;
    AP@R = (1/R) sum_{i <= R} precision@i * [item i is of the query's class]."""
    check_ndim(embeddings, 2, "embeddings", "map_at_r")
    if len(labels) != len(embeddings):
        raise ValueError(f"map_at_r: labels has {len(labels)} entries; expected {len(embeddings)}")
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))  # a query never retrieves itself
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    r = same.sum(1)
    R = int(r.max())
    order = sim.topk(R, dim=1).indices  # [Q, R]
    hits = same.gather(1, order).float()  # [Q, R]
    ranks = torch.arange(1, R + 1, dtype=torch.float32)
    precision = hits.cumsum(1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (precision * hits * within).sum(1) / r.clamp(min=1)
    return ap[r > 0].mean().item()


recipes.register("ggem_vit", GGeMViT, img_size=28, in_chans=1, num_classes=10, **recipes.BASELINE)
