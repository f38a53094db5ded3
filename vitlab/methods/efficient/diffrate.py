"""DiffRate: Differentiable Compression Rate for Efficient Vision Transformers (Chen et al., ICCV 2023,
arXiv:2305.17997). Official code: https://github.com/OpenGVLab/DiffRate (``DiffRate/ddp.py``,
``DiffRate/patch/deit.py``, ``DiffRate/merge.py``, ``DiffRate/utils.py``, ``engine.py``, ``main.py``).

Token pruning and merging need a compression rate per layer, usually picked by hand. DiffRate *learns* it by
gradient descent on a frozen, off-the-shelf ViT: only two small vectors of logits per block are trained.

    block i ≥ 1 (block 0 is never compressed):
    x ─Attn(+log size, policy)─► x' ─sort by CLS attention (mean over heads)─► [CLS | important ... unimportant]
         ┌──────────── K_m ────────────┬── K_p − K_m ──┬──── N − K_p ────┐
         │ kept                        │ merged into   │ pruned          │
         │                             │ most similar  │ (dropped)       │
         └─────────────────────────────┴──── kept ─────┘                 │
    ─► MLP on the K_m kept (merged) tokens ─► next block

Differentiable discrete proxy (DDP), one for pruning and one for merging in every block:

    candidates  k ∈ {N, N−g, N−2g, ..., }  (patch tokens kept),   π = softmax(α),  α initialised to 0
    kept count  K = ceil_STE(Σ_k k·π_k) + 1                          (+1: the CLS token; ceil's gradient is 1)
    token mask  m_t = Σ_{k+1 > t} π_k  (t = 0 is CLS: m_0 = 1)          probability that token t survives
                mask_t = 1[t < K] in the forward pass, ∂mask_t/∂π = ∂m_t/∂π in the backward (straight through)

Search (training mode) keeps all N tokens and *masks* the compressed ones in the next blocks' attention:

    softmax_with_policy(a)_ij = (exp(a_ij − max_j a_ij)·P_ij + ε/N) / (Σ_j exp(a_ij − max_j a_ij)·P_ij + ε)
    P_ij = mask_j, except P_ii = 1 (a token always sees itself)

so the loss sees what dropping the tail would do, and its gradient reaches α through the mask. Merged tokens
(the ones between K_m and K_p) go into their most cosine-similar kept token (CLS excluded as a target) by a
plain mean, and their size, scaled by that similarity, is added to the target's size; log(size) is added to
the attention logits (proportional attention). FLOPs are differentiable in the kept counts:

    per block  4·N·C² + 2·N²·C   (qkv, proj, QKᵀ, AV on the N tokens the block receives)
             + 2·N'·C·H          (MLP, hidden H, on N' = min_STE(N, K_p, K_m) tokens; ∂N'/∂K_p = ∂N'/∂K_m = 1)
    loss = CE + λ·(FLOPs/FLOPs_dense − target)²        AdamW on the α's only, lr 0.01 → 0.001 (cosine)

At inference the learnt kept counts are fixed integers: the tail is truncated and the merge really shrinks
the sequence, so the FLOPs fall for real (``measure.flops`` sees them).

    model = DiffRateViT(base)                        # wraps the frozen base: base is never modified
    history = search(model, train, target=0.6, steps=150)
    model.eval(); model.schedule()                   # {'prune': [65, 61, ...], 'merge': [65, 45, ...]}

The search is the whole method here: the backbone stays frozen (as in the official search) and is not fine-tuned
afterwards, so the lesson's control is the base itself (the backbone saw no training step on either side). The
rates' own optimiser settings are the paper's and live in ``DEFAULTS`` (AdamW, lr 0.01 -> 0.001 cosine, no weight
decay; candidate spacing g = 4; 60 % FLOPs target); the number of search steps per profile is ``search_steps``.

Where we differ from the official code (small scale, one rule for search and deployment):
- The search runs ``search_steps(profile)`` steps of batch 64 on 1,000 training images (the paper: 3 ImageNet
  epochs), so the logits move less far than in the paper.
- FLOPs enter the loss as a fraction of the dense model's, not in GFLOPs: the course's base has 0.03 GMACs,
  so (GFLOPs − target)² would be ~0. ``flops_weight`` λ is the weight on that fraction (see ``search``).
- Merged sizes are ``size·similarity``; as in the official code, the search clamps each source's at 1 before it
  is added (``DiffRateViT(clamp_search_sizes=True)``, the default) and the deployed model does not.
- In the search, masked tokens are sorted behind the live ones explicitly (the official code relies on their
  near-zero attention putting them there).
- ``UniformMerge`` is the ToMe-style baseline for the lesson (ToMe's bipartite matching on the tokens, not the
  keys, with size-weighted merges and proportional attention, the same r in every block).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_int as _check_int, check_model as _check_model
from vitlab.tokens import bipartite_soft_matching, gather_tokens, merge_tokens, proportional_bias

if TYPE_CHECKING:  # a type only: recipes imports this module
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["DEFAULTS", "ste_ceil", "ste_min", "softmax_with_policy", "DDP", "merge_tail", "DiffRateViT", "vit_macs",
           "search", "search_steps", "UniformMerge", "uniform_merge_schedule", "for_compare"]

# The method's own settings (the lesson and ``for_compare`` read these): the paper's search optimiser for the rates
# (AdamW, lr 0.01 -> 0.001 cosine, no weight decay), candidate spacing g = 4, the FLOPs target and the penalty weight
# λ on (FLOPs/FLOPs_dense − target)², the batch and the number of training images the search draws from, and the
# search length per profile. The backbone is frozen: no fine-tune recipe applies.
DEFAULTS = dict(target=0.6, granularity=4, flops_weight=100.0, lr=0.01, min_lr=0.001, batch_size=64, num_images=1000,
                steps={"smoke": 10, "cpu": 60, "gpu": 1000})


# ------------------------------------------------------------------------------------------------ STE ops
class _STECeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g  # straight through: d ceil(x)/dx := 1


class _STEMin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n, prune, merge):
        return torch.minimum(torch.minimum(n, prune), merge)

    @staticmethod
    def backward(ctx, g):
        return None, g, g  # both kept counts get the gradient, whichever is the min; the incoming N none


def ste_ceil(x: Tensor) -> Tensor:
    """ceil(x) forward, identity backward."""
    if not isinstance(x, Tensor):
        raise TypeError(f"ste_ceil: x must be a Tensor, got {type(x).__name__}")
    return _STECeil.apply(x)


def ste_min(n, prune, merge) -> Tensor:
    """min(n, prune, merge) forward; backward passes the gradient to ``prune`` and ``merge`` (both, always)
    and none to ``n`` (the official STE_Min)."""
    ts = [v if isinstance(v, Tensor) else torch.tensor(float(v)) for v in (n, prune, merge)]
    dev = next((t.device for t in ts if t.requires_grad), ts[0].device)
    return _STEMin.apply(*(t.to(dev, torch.float32) for t in ts))


# ------------------------------------------------------------------------------------------------ attention
def softmax_with_policy(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """Softmax over keys that only counts the keys the policy keeps (the diagonal always kept).

    logits [B, H, N, N], policy [B, N] (1 keep, 0 drop; may carry a straight-through gradient).
    """
    if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"softmax_with_policy: logits must be [B, H, N, N], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    B, _, N, _ = logits.shape
    if not isinstance(policy, Tensor) or tuple(policy.shape) != (B, N):
        raise ValueError(f"softmax_with_policy: policy must be [B={B}, N={N}], got "
                         f"{getattr(policy, 'shape', type(policy).__name__)}")
    eye = torch.eye(N, dtype=torch.float32, device=logits.device)
    p = policy.float()[:, None, None, :]
    p = p + (1.0 - p) * eye  # a token always attends to itself
    a = logits.float()
    e = (a - a.amax(dim=-1, keepdim=True)).exp() * p
    return ((e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


def _policy_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, policy: Tensor) -> tuple[Tensor, Tensor]:
    """``vitlab.models.Attention`` with the policy softmax: (out [B,N,C], probs [B,H,N,N])."""
    q, k, v = attn.qkv_heads(x)  # Attention's own steps, with the policy softmax in between
    probs = softmax_with_policy(attn.logits(q, k, bias), policy)
    return attn.merge_heads(attn.attn_drop(probs) @ v), probs


# ------------------------------------------------------------------------------------------------ DDP
class DDP(nn.Module):
    """Differentiable discrete proxy for one compression rate.

    ``logits`` α over the candidates k = num_patches, num_patches − g, ... (patch tokens kept); the CLS token
    is always kept on top. ``kept_count()`` is the differentiable kept count (CLS included), ``kept`` its
    integer value (or the one fixed by ``fix``), ``token_mask`` the straight-through 0/1 mask.
    """

    def __init__(self, num_patches: int, granularity: int = 4):
        super().__init__()
        _check_int(num_patches, "num_patches", "DDP")
        _check_int(granularity, "granularity", "DDP")
        self.num_patches, self.granularity = num_patches, granularity
        self.register_buffer("candidates", torch.arange(num_patches, 0, -granularity, dtype=torch.float32))
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))
        self.fixed: int | None = None

    def probs(self) -> Tensor:
        return self.logits.softmax(dim=-1)

    def kept_count(self) -> Tensor:
        """K = ceil_STE(Σ k·π_k) + 1: a float tensor holding an integer, with a gradient to α."""
        return ste_ceil(self.candidates @ self.probs()) + 1

    @property
    def kept(self) -> int:
        """The integer kept count (CLS included) the deployed model uses."""
        if self.fixed is not None:
            return self.fixed
        with torch.no_grad():
            return int(self.kept_count().item())

    def fix(self, kept: int | None) -> "DDP":
        """Deploy a hand-set kept count (CLS included; None: back to the learnt one)."""
        if kept is not None:
            _check_int(kept, "kept", "DDP.fix", low=1)
            if kept > self.num_patches + 1:
                raise ValueError(f"DDP.fix: kept must be <= num_patches + 1 = {self.num_patches + 1}, got {kept}")
        self.fixed = kept
        return self

    def token_prob(self) -> Tensor:
        """m [num_patches + 1]: m_t = Σ over candidates k with k + 1 > t of π_k (m_0 = 1 for CLS)."""
        t = torch.arange(self.num_patches + 1, device=self.logits.device, dtype=torch.float32)
        survives = (t[None, :] < self.candidates[:, None] + 1).float()  # [M, N+1]
        return self.probs() @ survives

    def token_mask(self, kept: int, upto: int | None = None) -> Tensor:
        """Straight-through mask [num_patches + 1]: 0 at positions kept..upto−1 (to the end if None) and 1
        elsewhere in the forward pass; the gradient of m (``token_prob``) in the backward pass."""
        m = self.token_prob()
        hard = torch.ones_like(m)
        hard[kept:upto] = 0.0
        return hard - m.detach() + m

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}, granularity={self.granularity}, candidates={len(self.candidates)}"


# ------------------------------------------------------------------------------------------------ merge
def merge_tail(x: Tensor, size: Tensor, keep: int, *, keep_sources: bool = False, return_index: bool = False,
               clamp_sizes: bool = False):
    """Merge tokens keep..N−1 of x [B,N,C] into their most cosine-similar token among 1..keep−1 (never CLS).

    The destination becomes the plain mean of itself and its sources (``merge_tokens`` with unit weights); its
    size gains each source's size times that source's similarity. ``keep_sources`` (search mode) leaves the
    merged sources in place after the kept tokens (the caller masks them); ``clamp_sizes`` floors each source's
    scaled size at 1 before it is added (the official search does, its deployment does not). Returns (x, size), and the
    destination of every input token [B, N] if ``return_index``.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"merge_tail: x must be [B, N, C], got {getattr(x, 'shape', type(x).__name__)}")
    B, N, _ = x.shape
    if not isinstance(size, Tensor) or tuple(size.shape) != (B, N):
        raise ValueError(f"merge_tail: size must be [B={B}, N={N}], got {getattr(size, 'shape', type(size).__name__)}")
    _check_int(keep, "keep", "merge_tail", low=2)
    if keep >= N:
        idx = torch.arange(N, device=x.device).expand(B, N)
        return (x, size, idx) if return_index else (x, size)
    with torch.no_grad():
        m = F.normalize(x.detach().float(), dim=-1)
        sim = m[:, keep:] @ m[:, :keep].transpose(1, 2)  # [B, N-keep, keep]
        sim[..., 0] = -math.inf  # CLS is no target
        best, dst = sim.max(dim=-1)
        index = torch.cat([torch.arange(keep, device=x.device).expand(B, keep), dst], dim=1)  # [B, N]
    merged, _ = merge_tokens(x, None, index, keep)  # plain mean of each kept token and its sources
    src_size = size[:, keep:] * best.to(size.dtype)
    if clamp_sizes:
        src_size = src_size.clamp_min(1.0)
    new_size = size.new_zeros(B, keep).scatter_add(1, index, torch.cat([size[:, :keep], src_size], dim=1))
    if keep_sources:
        return torch.cat([merged, x[:, keep:]], dim=1), torch.cat([new_size, src_size], dim=1)
    return (merged, new_size, index) if return_index else (merged, new_size)


# ------------------------------------------------------------------------------------------------ FLOPs
def vit_macs(vit: nn.Module, n_attn, n_mlp) -> Tensor:
    """Multiply-accumulates of one image: patch embedding + per block 4·N·C² + 2·N²·C (attention on the N it
    receives) + 2·N'·C·H (MLP on N') + head. ``n_attn``/``n_mlp`` per block, ints or tensors (differentiable)."""
    C = vit.embed_dim
    H = vit.blocks[0].mlp.fc1.out_features
    pe = vit.patch_embed
    total = torch.tensor(float(pe.num_patches * C * pe.patch_size ** 2 * pe.in_chans + C * vit.num_classes))
    for n, n2 in zip(n_attn, n_mlp):
        total = total + 4 * n * C * C + 2 * n * n * C + 2 * n2 * C * H
    return total


# ------------------------------------------------------------------------------------------------ the model
class DiffRateViT(nn.Module):
    """A frozen ``VisionTransformer`` with a prune DDP and a merge DDP in every block but the first.

    ``train()`` mode is the search (masks, differentiable FLOPs in ``relative_flops()``); ``eval()`` deploys the
    integer schedule (truncate, merge). The wrapped ViT is used as is: never modified, never switched to train
    mode; ``search`` differentiates only the DDP logits. ``clamp_search_sizes``: the search floors merged sources'
    sizes at 1, as the official code does (its deployment does not).
    """

    def __init__(self, vit: nn.Module, granularity: int = 4, clamp_search_sizes: bool = True):
        super().__init__()
        _check_model(vit, "DiffRateViT")
        if not all(hasattr(vit, a) for a in ("blocks", "embed", "forward_head", "patch_embed")):
            raise TypeError(f"DiffRateViT: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "global_pool", "token") != "token":
            raise ValueError("DiffRateViT: vit must have exactly one CLS token and global_pool='token' (got "
                             f"num_prefix_tokens={vit.num_prefix_tokens}, global_pool={vit.global_pool!r})")
        _check_int(granularity, "granularity", "DiffRateViT")
        P = vit.patch_embed.num_patches
        if granularity >= P:
            raise ValueError(f"DiffRateViT: granularity must be < num_patches={P}, got {granularity}")
        if not isinstance(clamp_search_sizes, bool):
            raise TypeError(f"DiffRateViT: clamp_search_sizes must be a bool, got {clamp_search_sizes!r}")
        self.vit = vit
        self.clamp_search_sizes = clamp_search_sizes
        self.num_tokens = P + 1
        self.prune = nn.ModuleList([DDP(P, granularity) for _ in range(len(vit.blocks) - 1)])
        self.merge = nn.ModuleList([DDP(P, granularity) for _ in range(len(vit.blocks) - 1)])
        self.kept_log: list[tuple[Tensor, Tensor]] = []
        self.train(False)

    def train(self, mode: bool = True) -> "DiffRateViT":
        """Switch search/deploy without touching the wrapped ViT's own mode."""
        self.training = bool(mode)
        for m in (self.prune, self.merge):
            m.train(mode)
        return self

    def arch_parameters(self) -> list[nn.Parameter]:
        """The only trained parameters: every DDP's logits."""
        return [d.logits for d in (*self.prune, *self.merge)]

    # ---------------------------------------------------------------- schedule and FLOPs
    def schedule(self) -> dict[str, list[int]]:
        """Deployed kept counts (CLS included) per block: prune, merge, and the tokens each block's attention
        (``attn``) and MLP (``mlp``) process."""
        n, out = self.num_tokens, {"prune": [self.num_tokens], "merge": [self.num_tokens],
                                   "attn": [self.num_tokens], "mlp": [self.num_tokens]}
        for p, m in zip(self.prune, self.merge):
            out["attn"].append(n)
            n = min(n, p.kept, m.kept)
            out["prune"].append(p.kept)
            out["merge"].append(m.kept)
            out["mlp"].append(n)
        return out

    def fix(self, prune: list[int] | None, merge: list[int] | None) -> "DiffRateViT":
        """Deploy hand-set kept counts for blocks 1.. (CLS included); None: the learnt ones again."""
        for name, ks, ddps in (("prune", prune, self.prune), ("merge", merge, self.merge)):
            if ks is None:
                for d in ddps:
                    d.fix(None)
                continue
            if not isinstance(ks, (list, tuple)) or len(ks) != len(ddps):
                raise ValueError(f"DiffRateViT.fix: {name} must list {len(ddps)} kept counts (blocks 1..), got {ks!r}")
            for d, k in zip(ddps, ks):
                d.fix(k)
        return self

    def relative_flops(self) -> Tensor:
        """FLOPs / dense FLOPs. Search mode: differentiable, from the last forward's kept counts (min_STE
        chains them); deploy mode: the integer schedule."""
        N = self.num_tokens
        dense = vit_macs(self.vit, [N] * len(self.vit.blocks), [N] * len(self.vit.blocks))
        if not self.training:
            s = self.schedule()
            return vit_macs(self.vit, s["attn"], s["mlp"]) / dense
        if not self.kept_log:
            raise RuntimeError("DiffRateViT.relative_flops: run a forward pass in train() mode first")
        n = torch.tensor(float(N))
        n_attn, n_mlp = [n], [n]
        for kp, km in self.kept_log:
            n_attn.append(n)
            n = ste_min(n, kp, km)
            n_mlp.append(n)
        return vit_macs(self.vit, n_attn, n_mlp).to(n.device) / dense.to(n.device)

    def tokens_per_block(self) -> list[int]:
        """Tokens (CLS included) each block receives in the deployed model."""
        return self.schedule()["attn"]

    # ---------------------------------------------------------------- forward
    @staticmethod
    def _sort(x: Tensor, score: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
        """CLS first, then the patch tokens by ``score`` [B, N-1], highest first."""
        order = score.argsort(dim=1, descending=True) + 1
        idx = torch.cat([order.new_zeros(order.shape[0], 1), order], dim=1)
        return tuple(gather_tokens(t, idx) for t in (x, *others))

    def _search_block(self, i: int, x: Tensor, size: Tensor, mask: Tensor):
        blk, B = self.vit.blocks[i], x.shape[0]
        a, probs = _policy_attention(blk.attn, blk.norm1(x), proportional_bias(size), mask)
        x = x + blk.drop_path1(blk.ls1(a))
        score = probs[:, :, 0, 1:].mean(dim=1) + mask[:, 1:].detach()  # masked tokens go last, whatever
        x, size, mask = self._sort(x, score, size, mask)
        last = int(mask[0].detach().sum().round().item())
        prune, merge = self.prune[i - 1], self.merge[i - 1]
        kp = prune.kept_count()
        if int(kp.item()) < last:
            mask = mask * prune.token_mask(int(kp.item()), last).expand(B, -1)
        mid = min(last, int(kp.item()))
        km = merge.kept_count()
        if int(km.item()) < mid:
            k = int(km.item())
            xm, sm = merge_tail(x[:, :mid], size[:, :mid], k, keep_sources=True, clamp_sizes=self.clamp_search_sizes)
            x, size = torch.cat([xm, x[:, mid:]], dim=1), torch.cat([sm, size[:, mid:]], dim=1)
            mask = mask * merge.token_mask(k, mid).expand(B, -1)
        self.kept_log.append((kp, km))
        return blk.forward_mlp(x), size, mask

    def _deploy_block(self, i: int, x: Tensor, size: Tensor, fate: tuple[Tensor, Tensor] | None = None):
        blk = self.vit.blocks[i]
        x, sides = blk.forward_attn(x, attn_bias=proportional_bias(size), side=("cls",))
        n = x.shape[1]
        x, size, pos = self._sort(x, sides["cls"][:, :, 1:].mean(dim=1), size,
                                  torch.arange(n, device=x.device).expand(x.shape[0], -1))
        kp, km = self.prune[i - 1].kept, self.merge[i - 1].kept
        x, size = x[:, :kp], size[:, :kp]
        index = None
        if km < x.shape[1]:
            x, size, index = merge_tail(x, size, km, return_index=True)
        if fate is not None:  # where[b, p]: the token patch p now lives in (-1: pruned); status 2 own, 1 merged, 0 pruned
            where, status = fate
            slot = torch.empty_like(pos).scatter_(1, pos, torch.arange(n, device=x.device).expand_as(pos).contiguous())
            slot = slot.gather(1, where.clamp_min(0))  # position after sorting
            pruned = (where < 0) | (slot >= kp)
            merged = ~pruned & (slot >= km) if index is not None else torch.zeros_like(pruned)
            if index is not None:
                slot = index.gather(1, slot.clamp(max=index.shape[1] - 1))
            where = torch.where(pruned, -1, slot)
            status = torch.where(pruned, 0, torch.where(merged, torch.minimum(status, torch.ones_like(status)),
                                                        status))
            fate = (where, status)
        return blk.forward_mlp(x), size, fate

    @torch.no_grad()
    def fate(self, images: Tensor) -> Tensor:
        """What the deployed model does with each patch, [B, num_patches]: 2 = still its own token at the end
        (possibly holding merged ones), 1 = merged into another token, 0 = pruned."""
        x = self.vit.blocks[0](self.vit.embed(images))
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        where = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).contiguous()
        fate = (where, torch.full_like(where, 2))
        for i in range(1, len(self.vit.blocks)):
            x, size, fate = self._deploy_block(i, x, size, fate)
        return fate[1][:, 1:]

    def forward(self, images: Tensor) -> Tensor:
        x = self.vit.embed(images)
        x = self.vit.blocks[0](x)  # block 0 is never compressed
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        if self.training:
            self.kept_log = []
            mask = torch.ones_like(size)
            for i in range(1, len(self.vit.blocks)):
                x, size, mask = self._search_block(i, x, size, mask)
        else:
            for i in range(1, len(self.vit.blocks)):
                x, size, _ = self._deploy_block(i, x, size)
        return self.vit.forward_head(self.vit.norm(x))

    def extra_repr(self) -> str:
        s = self.schedule()
        return f"prune={s['prune']}, merge={s['merge']}"


# ------------------------------------------------------------------------------------------------ search
def search_steps(profile=None) -> int:
    """Search steps (batch 64) per profile: ``DEFAULTS["steps"]`` (smoke 10, cpu 60, gpu 1000)."""
    from vitlab.profiles import profile as get_profile

    return DEFAULTS["steps"][get_profile(profile).name]


def search(model: DiffRateViT, data, *, target: float = DEFAULTS["target"], steps: int = 150,
           batch_size: int = DEFAULTS["batch_size"], num_images: int | None = DEFAULTS["num_images"],
           lr: float = DEFAULTS["lr"], min_lr: float = DEFAULTS["min_lr"],
           flops_weight: float = DEFAULTS["flops_weight"], seed: int = 0, progress: bool = False) -> dict:
    """Learn the compression rates: AdamW (no weight decay) on the DDP logits only, cosine lr ``lr`` → ``min_lr``,
    loss = CE + flops_weight·(FLOPs/FLOPs_dense − target)², on the first ``num_images`` of ``data`` (batches drawn
    from a generator seeded by ``seed``). The ViT gets no gradient (``torch.autograd.grad`` on the logits only).
    Returns a history: step, ce, flops (relative), loss, and the deployed schedule after each step. Leaves the
    model in eval mode.
    """
    if not isinstance(model, DiffRateViT):
        raise TypeError(f"search: model must be a DiffRateViT, got {type(model).__name__}")
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"search: data must be a dataset with .images and .labels tensors, got {type(data).__name__}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"search: target must be a FLOPs fraction in (0, 1], got {target!r}")
    _check_int(steps, "steps", "search")
    _check_int(batch_size, "batch_size", "search")
    _check_int(seed, "seed", "search", low=0)
    if num_images is not None:
        _check_int(num_images, "num_images", "search")
        images, labels = images[:num_images], labels[:num_images]
    for name, v in (("lr", lr), ("min_lr", min_lr), ("flops_weight", flops_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
            raise ValueError(f"search: {name} must be a non-negative number, got {v!r}")
    from tqdm.auto import tqdm

    params = model.arch_parameters()
    dev = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    hist = {"step": [], "ce": [], "flops": [], "loss": [], "prune": [], "merge": []}
    order, pos = torch.randperm(len(images), generator=gen), 0
    model.train()
    try:
        for step in tqdm(range(steps), disable=not progress, desc="DiffRate search"):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(images), generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            for g in opt.param_groups:  # cosine from lr to min_lr
                g["lr"] = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
            logits = model(images[idx].to(dev))
            ce = F.cross_entropy(logits, labels[idx].to(dev))
            rel = model.relative_flops()
            loss = ce + flops_weight * (rel - target) ** 2
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else g
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                s = {k: [d.kept for d in ddps] for k, ddps in (("prune", model.prune), ("merge", model.merge))}
            hist["step"].append(step + 1)
            hist["ce"].append(ce.item())
            hist["flops"].append(rel.item())
            hist["loss"].append(loss.item())
            hist["prune"].append(s["prune"])
            hist["merge"].append(s["merge"])
    finally:
        model.eval()
    return hist


# ------------------------------------------------------------------------------------------------ baseline
class UniformMerge(nn.Module):
    """The ToMe-style baseline: in every block, after attention, merge r_i token pairs by bipartite soft
    matching (``vitlab.tokens``), size-weighted, with proportional attention. Wraps ``vit`` without copying it."""

    def __init__(self, vit: nn.Module, r: list[int]):
        super().__init__()
        _check_model(vit, "UniformMerge")
        if not isinstance(r, (list, tuple)) or len(r) != len(vit.blocks):
            raise ValueError(f"UniformMerge: r must list one int per block ({len(vit.blocks)}), got {r!r}")
        for v in r:
            _check_int(v, "r", "UniformMerge", low=0)
        self.vit, self.r = vit, list(r)

    def train(self, mode: bool = True) -> "UniformMerge":
        self.training = bool(mode)
        return self

    def tokens(self) -> tuple[list[int], list[int]]:
        """Tokens each block's attention and MLP process (CLS included)."""
        n, attn, mlp = self.vit.patch_embed.num_patches + 1, [], []
        for r in self.r:
            attn.append(n)
            n -= min(r, (n + 1) // 2 - 1)  # bipartite_soft_matching caps r at the mergeable A tokens
            mlp.append(n)
        return attn, mlp

    def relative_flops(self) -> float:
        N = self.vit.patch_embed.num_patches + 1
        L = len(self.vit.blocks)
        return float(vit_macs(self.vit, *self.tokens()) / vit_macs(self.vit, [N] * L, [N] * L))

    def forward(self, images: Tensor) -> Tensor:
        x = self.vit.embed(images)
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        for blk, r in zip(self.vit.blocks, self.r):
            x = blk.forward_attn(x, attn_bias=proportional_bias(size))
            dst, n = bipartite_soft_matching(x, r)
            x, size = merge_tokens(x, size, dst, n)
            x = blk.forward_mlp(x)
        return self.vit.forward_head(self.vit.norm(x))


def uniform_merge_schedule(vit: nn.Module, target: float) -> list[int]:
    """Per-block r for ``UniformMerge`` whose FLOPs fraction is closest to ``target``: the same merge rate ρ in
    every block, spread over integers (r_i = round((i+1)ρ) − round(iρ))."""
    _check_model(vit, "uniform_merge_schedule")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"uniform_merge_schedule: target must be a FLOPs fraction in (0, 1], got {target!r}")
    L, N = len(vit.blocks), vit.patch_embed.num_patches + 1
    best, best_err = [0] * L, math.inf
    for step in range(0, 100 * N // 2):
        rho = step / 100
        r = [round((i + 1) * rho) - round(i * rho) for i in range(L)]
        err = abs(UniformMerge(vit, r).relative_flops() - target)
        if err < best_err - 1e-12:
            best, best_err = r, err
    return best


# ------------------------------------------------------------------------------------------------ comparison
def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """DiffRate at its default setting (``DEFAULTS``) on the chapter's base: a search of ``search_steps(profile)``
    steps (batch 64 from 1,000 training images in an order set by ``seed``, the paper's lr 0.01 -> 0.001) at a 60 %
    FLOPs target, then the deployed (truncating, merging) model. The ViT's weights are not trained: compare with
    the base itself."""
    from vitlab.methods.efficient.recipes import Reduced
    from vitlab.profiles import profile as get_profile

    P = get_profile(profile)
    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    steps = search_steps(P)
    model = DiffRateViT(base, granularity=DEFAULTS["granularity"])
    model.to(next(base.parameters()).device)
    search(model, train, target=DEFAULTS["target"], steps=steps, batch_size=DEFAULTS["batch_size"],
           num_images=DEFAULTS["num_images"], lr=DEFAULTS["lr"], min_lr=DEFAULTS["min_lr"],
           flops_weight=DEFAULTS["flops_weight"], seed=seed)
    s = model.schedule()
    return Reduced(model.eval(), tokens_per_block=[float(n) for n in s["attn"]], gflops=None,
                   note=f"searched {DEFAULTS['target']:.0%} FLOPs ({steps} search steps, frozen ViT): "
                        f"prune {s['prune'][1:]} merge {s['merge'][1:]}",
                   extra={"relative_flops": float(model.relative_flops()), "schedule": s, "search_steps": steps})
