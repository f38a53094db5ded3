"""RePaViT: structural reparameterisation of the FFN layers (Xu et al., ICML 2025, arXiv:2505.21847).

Official code: https://github.com/Ackesnal/RePaViT (``repavit.py``: ``Mlp`` with ``channel_idle``, ``Mlp.reparam``,
``RePaMlp``, ``Block.reparam``). Written here from the paper and that code.

The FFN is most of a ViT's latency. RePaViT trains an FFN whose hidden channels are mostly *idle* (no
activation), so at test time the idle part is linear and collapses, with the residual, into one C×C matrix:

    train   y = x + W2 · BN2( [ GELU(h_act) | h_idle ] ),   h = W1 · BN1(x) + b1     (H hidden channels;
            the first a = ⌈H·(1 − idle_ratio)⌉ get the GELU, the other H − a stay linear: idle_ratio 0.75)

    test    fold BN1 into W1, b1 and BN2 into W2, b2 (eval-mode BN is an affine map per channel), split
            W1 = [W1ₐ; W1ᵢ], W2 = [W2ₐ | W2ᵢ], and
            y = (I + W2ᵢ W1ᵢ) x + (W2ᵢ b1ᵢ + b2)  +  W2ₐ · GELU(W1ₐ x + b1ₐ)
                └────── one C×C linear ──────┘     └── a C→a→C FFN, a = H/4 ──┘

            x ──BN1──fc1──┬─GELU (a ch.)─┬─BN2──fc2──(+x)        x ──┬── Linear C→C (I folded in) ──┐
                          └── idle (H−a) ┘                ⇒          └── C→a ─GELU─ a→C ────────────(+)→ y

Exact: the deployed model computes the trained one's eval output (up to float rounding). Cost per token of the
FFN: 2CH → C² + 2Ca multiply-adds (mlp_ratio 4, idle 0.75: 8C² → 3C²; the course base, mlp_ratio 2: 4C² → 2C²).
LayerNorm before the FFN becomes BatchNorm (foldable); attention is untouched.

    model = to_repa(base, idle_ratio=0.75)            # a copy; FFNs → RePaMlp initialised from the base's FFNs
    match_base_(model, base, train.images[:512])      # BNs fitted to the LayerNorm and to the idle GELUs
    fit(model, train, **finetune_kwargs(P), seed=0)   # the chapter's fine-tune (the dense control's recipe)
    recalibrate_bn(model, train.images[:512])         # BN running statistics re-estimated on clean images
    fast = reparameterize(model)                      # a copy with RePaLinearMlp: same outputs, fewer FLOPs
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_number, check_int as _check_int, check_model as _check_model

if TYPE_CHECKING:
    from vitlab.methods.efficient.recipes import Reduced
from vitlab.models.vit import Block

__all__ = ["DEFAULTS", "RePaMlp", "RePaLinearMlp", "RePaBlock", "active_channels", "idle_ratios", "to_repa", "match_base_",
           "reparameterize", "recalibrate_bn", "ffn_params", "calibration_images", "for_compare"]

HEURISTICS = ("static", "linear")
# The lesson's setting (``for_compare`` reads the same): the paper's idle ratio, and how many training images (a fixed
# draw) fit the BNs to the base (``match_base_``) and re-estimate their statistics after training. RePaViT adds no
# parameter with its own lr: the fine-tune is the chapter's (``recipes.finetune_kwargs``, lr 1e-4), the dense
# control's recipe. (The paper trains from scratch, so it sets no fine-tune lr to follow.)
DEFAULTS = dict(idle_ratio=0.75, calib=512)



def active_channels(hidden: int, idle_ratio: float) -> int:
    """a = ⌈H·(1 − idle_ratio)⌉ hidden channels get the activation (the official rule)."""
    return math.ceil(round(hidden * (1.0 - idle_ratio), 6))  # round: 192·0.25 must not become 48.0000001 → 49


def _bn_tokens(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the channels of tokens [B, N, C] (statistics over batch and tokens)."""
    return bn(x.transpose(1, 2)).transpose(1, 2)


@torch.no_grad()
def _fold_bn(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale·x + shift per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


# ------------------------------------------------------------------------------------------------ modules
class RePaMlp(nn.Module):
    """The trainable RePa FFN, residual inside: x + fc2(BN2(partial_act(fc1(BN1(x)))))."""

    def __init__(self, dim: int, hidden: int, idle_ratio: float = 0.75, act_layer=nn.GELU):
        super().__init__()
        _check_int(dim, "dim", "RePaMlp")
        _check_int(hidden, "hidden", "RePaMlp")
        self.idle_ratio = check_number(idle_ratio, "idle_ratio", "RePaMlp", low=0, high=1)
        self.act_channels = active_channels(hidden, self.idle_ratio)
        self.norm1 = nn.BatchNorm1d(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.norm2 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(_bn_tokens(self.norm1, x))
        a = self.act_channels
        if a == h.shape[-1]:
            h = self.act(h)
        elif a > 0:  # GELU on the first a channels, the rest idle (the official torch.where on a mask)
            h = torch.cat([self.act(h[..., :a]), h[..., a:]], dim=-1)
        return x + self.fc2(_bn_tokens(self.norm2, h))

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1 [H,C], b1 [H], W2 [C,H], b2 [C]) with the eval-mode BNs folded in, in float64."""
        s1, t1 = (v.double() for v in _fold_bn(self.norm1))
        s2, t2 = (v.double() for v in _fold_bn(self.norm2))
        W1, b1 = self.fc1.weight.double(), self.fc1.bias.double()
        W2, b2 = self.fc2.weight.double(), self.fc2.bias.double()
        return W1 * s1[None, :], W1 @ t1 + b1, W2 * s2[None, :], W2 @ t2 + b2

    def extra_repr(self) -> str:
        return f"idle_ratio={self.idle_ratio}, act_channels={self.act_channels}"


class RePaLinearMlp(nn.Module):
    """The deployed RePa FFN, residual folded in: y = linear(x) + fc_out(GELU(fc_act(x))).

    ``linear``: C→C with bias (I + W2ᵢW1ᵢ, W2ᵢb1ᵢ + b2); ``fc_act``: C→a with bias; ``fc_out``: a→C, no bias.
    With a = 0 only ``linear`` exists (the whole FFN and the shortcut are one matrix).
    """

    def __init__(self, dim: int, act_channels: int, act_layer=nn.GELU):
        super().__init__()
        _check_int(dim, "dim", "RePaLinearMlp")
        _check_int(act_channels, "act_channels", "RePaLinearMlp", low=0)
        self.act_channels = act_channels
        self.linear = nn.Linear(dim, dim)
        if act_channels:
            self.fc_act, self.act, self.fc_out = nn.Linear(dim, act_channels), act_layer(), nn.Linear(
                act_channels, dim, bias=False)

    @classmethod
    @torch.no_grad()
    def from_repa(cls, mlp: RePaMlp) -> "RePaLinearMlp":
        W1, b1, W2, b2 = mlp.folded()
        a, dim = mlp.act_channels, W1.shape[1]
        out = cls(dim, a, type(mlp.act)).to(mlp.fc1.weight.device)
        dtype = mlp.fc1.weight.dtype
        eye = torch.eye(dim, dtype=torch.float64, device=W1.device)
        out.linear.weight.copy_((eye + W2[:, a:] @ W1[a:]).to(dtype))  # the idle path and the shortcut
        out.linear.bias.copy_((W2[:, a:] @ b1[a:] + b2).to(dtype))
        if a:
            out.fc_act.weight.copy_(W1[:a].to(dtype))
            out.fc_act.bias.copy_(b1[:a].to(dtype))
            out.fc_out.weight.copy_(W2[:, :a].to(dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.fc_out(self.act(self.fc_act(x))) if self.act_channels else y

    def extra_repr(self) -> str:
        return f"act_channels={self.act_channels}"


class RePaBlock(Block):
    """A vitlab ``Block`` whose FFN half is ``self.mlp(x)`` with the residual inside (RePaMlp/RePaLinearMlp);
    ``norm2`` is gone (the FFN normalises with its own BN1)."""

    def forward_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    @classmethod
    def from_block(cls, blk: Block, idle_ratio: float, from_ffn: bool = True) -> "RePaBlock":
        """A RePaBlock that takes ``blk``'s attention half (its modules, not copies) and a new RePaMlp of the
        same widths: initialised from ``blk.mlp`` (fc1, fc2; BN1's affine from the LayerNorm's) if ``from_ffn``."""
        dim, hidden = blk.mlp.fc1.in_features, blk.mlp.fc1.out_features
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.use_kernels = False
        for name in ("norm1", "attn", "ls1", "drop_path1", "ls2", "drop_path2"):
            setattr(new, name, getattr(blk, name))
        new.norm2 = nn.Identity()
        new.mlp = RePaMlp(dim, hidden, idle_ratio, type(blk.mlp.act)).to(blk.mlp.fc1.weight.device)
        if from_ffn:
            with torch.no_grad():
                for src, dst in ((blk.mlp.fc1, new.mlp.fc1), (blk.mlp.fc2, new.mlp.fc2)):
                    dst.weight.copy_(src.weight)
                    dst.bias.copy_(src.bias)
                if isinstance(blk.norm2, nn.LayerNorm) and blk.norm2.elementwise_affine:
                    new.mlp.norm1.weight.copy_(blk.norm2.weight)
                    new.mlp.norm1.bias.copy_(blk.norm2.bias)
        return new


# ------------------------------------------------------------------------------------------------ model surgery
def idle_ratios(depth: int, idle_ratio: float = 0.75, heuristic: str = "static") -> list[float]:
    """Per-block idle ratios: ``static`` (the same everywhere) or the official ``linear`` heuristic
    (rising from 2r − 1 to 1 over the first depth − 1 blocks, 0 in the last)."""
    _check_int(depth, "depth", "idle_ratios")
    r = check_number(idle_ratio, "idle_ratio", "idle_ratios", low=0, high=1)
    if heuristic not in HEURISTICS:
        raise ValueError(f"idle_ratios: heuristic must be one of {HEURISTICS}, got {heuristic!r}")
    if heuristic == "static" or depth == 1:
        return [r] * depth
    return [min(1.0, max(0.0, (2 * r - 1) + (2 - 2 * r) / (depth - 1) * (i + 1))) for i in range(depth - 1)] + [0.0]


def to_repa(vit: nn.Module, idle_ratio: float = 0.75, *, heuristic: str = "static", from_ffn: bool = True,
            inplace: bool = False) -> nn.Module:
    """A RePa-ViT of ``vit``'s widths: every block's FFN half → ``RePaMlp`` (BN, partial GELU, residual inside).

    from_ffn: initialise fc1/fc2 from the ViT's FFN weights (else keep the fresh init, for training from scratch).
    Returns a copy unless ``inplace``. The BN statistics start at (0, 1): call ``recalibrate_bn`` or train.
    """
    _check_model(vit, "to_repa")
    if not isinstance(getattr(vit, "blocks", None), nn.Sequential) or not all(
            isinstance(b, Block) for b in vit.blocks):
        raise TypeError(f"to_repa: vit must be a vitlab VisionTransformer (blocks of Block), got {type(vit).__name__}")
    if any(isinstance(b, RePaBlock) for b in vit.blocks):
        raise ValueError("to_repa: vit already has RePa blocks")
    ratios = idle_ratios(len(vit.blocks), idle_ratio, heuristic)
    out = vit if inplace else copy.deepcopy(vit)
    out.blocks = nn.Sequential(*[RePaBlock.from_block(b, r, from_ffn) for b, r in zip(out.blocks, ratios)])
    return out


@torch.no_grad()
def reparameterize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every ``RePaMlp`` → ``RePaLinearMlp`` (BNs folded, idle path + shortcut as one C×C matrix).

    Uses the BN running statistics, so the result equals ``model`` in eval mode. Returns an eval-mode copy
    unless ``inplace``.
    """
    _check_model(model, "reparameterize")
    if not isinstance(inplace, bool):
        raise TypeError(f"reparameterize: inplace must be a bool, got {type(inplace).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, RePaBlock) and isinstance(m.mlp, RePaMlp)]
    if not blocks:
        raise ValueError("reparameterize: model has no trainable RePa FFN (RePaMlp); build it with to_repa()")
    out = model if inplace else copy.deepcopy(model)
    for blk in (m for m in out.modules() if isinstance(m, RePaBlock) and isinstance(m.mlp, RePaMlp)):
        blk.mlp = RePaLinearMlp.from_repa(blk.mlp)
    return out.eval()


def _line_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column least squares y ≈ k·x + d over the rows; returns (k, d, mean x, var x)."""
    mx, my = x.mean(0), y.mean(0)
    vx = x.var(0, unbiased=False).clamp_min(1e-12)
    k = ((x - mx) * (y - my)).mean(0) / vx
    return k, my - k * mx, mx, vx


@torch.no_grad()
def _set_bn_affine(bn: nn.BatchNorm1d, k, d, mean, var, idx=slice(None)) -> None:
    """Running statistics (mean, var) and an affine such that eval-mode BN computes k·x + d on channels ``idx``."""
    bn.running_mean[idx] = mean.to(bn.running_mean.dtype)
    bn.running_var[idx] = var.to(bn.running_var.dtype)
    bn.weight[idx] = (k * torch.sqrt(var + bn.eps)).to(bn.weight.dtype)
    bn.bias[idx] = (d + k * mean).to(bn.bias.dtype)


@torch.no_grad()
def match_base_(model: nn.Module, base: nn.Module, images: torch.Tensor, *, batch_size: int = 128) -> nn.Module:
    """Fit each RePa FFN's BatchNorms so that, in eval mode, it approximates the base FFN it was built from
    (``to_repa(base)``), from the base's own activations on ``images``:

    BN₁ ≈ the LayerNorm it replaces: per channel, the least-squares line LN(x)_c ≈ k_c·x_c + d_c over the tokens
    that enter the FFN. BN₂ on the idle channels ≈ the GELU they lost: the least-squares line GELU(h_j) ≈ α_j·h_j + β_j
    over their pre-activations; on the active channels BN₂ is the identity. (Our initialisation for converting a
    trained ViT; the paper trains RePa-ViTs from scratch.) In place; returns ``model`` in eval mode.
    """
    _check_model(model, "match_base_")
    _check_model(base, "match_base_")
    repa = [b for b in getattr(model, "blocks", []) if isinstance(b, RePaBlock) and isinstance(b.mlp, RePaMlp)]
    if not repa or len(repa) != len(getattr(base, "blocks", [])):
        raise ValueError("match_base_: model must be to_repa(base) (one trainable RePa block per base block)")
    if not torch.is_tensor(images) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"match_base_: images must be a non-empty batch [N, C, H, W], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    xs, hs = [[] for _ in repa], [[] for _ in repa]
    hooks = []
    for i, b in enumerate(base.blocks):
        hooks.append(b.norm2.register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0].flatten(0, -2))))
        hooks.append(b.mlp.fc1.register_forward_hook(lambda m, a, o, i=i: hs[i].append(o.flatten(0, -2))))
    try:
        was = base.training
        base.eval()
        device = next(base.parameters()).device
        for j in range(0, len(images), batch_size):
            base(images[j:j + batch_size].to(device))
        base.train(was)
    finally:
        for h in hooks:
            h.remove()
    for i, (blk, bblk) in enumerate(zip(repa, base.blocks)):
        mlp = blk.mlp
        x = torch.cat(xs[i]).double()
        ln = bblk.norm2
        y = F.layer_norm(x, x.shape[-1:], ln.weight.double(), ln.bias.double(), ln.eps)
        _set_bn_affine(mlp.norm1, *_line_fit(x, y))
        h, a = torch.cat(hs[i]).double(), mlp.act_channels
        if a:  # active channels: BN₂ is the identity on GELU(h)
            z = F.gelu(h[:, :a])
            mean, var = z.mean(0), z.var(0, unbiased=False)
            _set_bn_affine(mlp.norm2, torch.ones_like(mean), torch.zeros_like(mean), mean, var, slice(0, a))
        if a < h.shape[1]:  # idle channels: BN₂ is the best line through the GELU they no longer have
            k, d, mean, var = _line_fit(h[:, a:], F.gelu(h[:, a:]))
            _set_bn_affine(mlp.norm2, k, d, mean, var, slice(a, None))
    return model.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) from ``images``;
    the model's weights do not change. In place; returns ``model`` in its previous mode."""
    _check_model(model, "recalibrate_bn")
    if not torch.is_tensor(images) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"recalibrate_bn: images must be a non-empty batch [N, C, H, W], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    _check_int(batch_size, "batch_size", "recalibrate_bn")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("recalibrate_bn: model has no BatchNorm layers")
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size].to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.train(was_training)


def ffn_params(dim: int, hidden: int, idle_ratio: float, *, deployed: bool = True) -> int:
    """Parameters of one RePa FFN. Deployed: C² + C (the C×C linear) + a·C + a (C→a) + a·C (a→C, no bias);
    training: BN1 2C + fc1 CH + H + BN2 2H + fc2 HC + C. a = ⌈H·(1 − idle_ratio)⌉."""
    _check_int(dim, "dim", "ffn_params")
    _check_int(hidden, "hidden", "ffn_params")
    a = active_channels(hidden, check_number(idle_ratio, "idle_ratio", "ffn_params", low=0, high=1))
    if deployed:
        return dim * dim + dim + (2 * a * dim + a if a else 0)
    return 2 * dim + dim * hidden + hidden + 2 * hidden + hidden * dim + dim


# ------------------------------------------------------------------------------------------------ comparison
def calibration_images(train, n: int = DEFAULTS["calib"]) -> torch.Tensor:
    """A fixed draw (generator seed 0) of ``n`` training images for ``match_base_`` and ``recalibrate_bn``."""
    images = train.images if hasattr(train, "images") else train[0]
    _check_int(n, "n", "calibration_images")
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]]


def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """RePaViT at the lesson's setting (``DEFAULTS``: idle ratio 0.75) built from the chapter's base: attention and
    embeddings copied, each RePa FFN initialised from the base FFN (fc1, fc2; BNs fitted to the LayerNorm and to the
    lost GELU by ``match_base_`` on 512 training images), the chapter's fine-tune ``fit(model, train,
    **recipes.finetune_kwargs(profile), seed=seed)`` (so ``recipes.dense_control(seed, profile)`` is its equal-step
    control), BN statistics recalibrated, then reparameterised. ``extra["train_graph"]`` is the model before
    reparameterisation (same eval outputs)."""
    from vitlab.methods.efficient.recipes import Reduced, finetune_kwargs, finetune_steps
    from vitlab.train import fit

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    steps = finetune_steps(profile)
    calib = calibration_images(train)
    model = match_base_(to_repa(base, DEFAULTS["idle_ratio"]), base, calib)
    hist = fit(model, train, None, profile=profile, **finetune_kwargs(profile), seed=seed, progress=False,
               desc="RePaViT")
    recalibrate_bn(model, calib)
    fast = reparameterize(model)
    a, h = model.blocks[0].mlp.act_channels, model.blocks[0].mlp.fc1.out_features
    return Reduced(fast, None, None, f"idle {DEFAULTS['idle_ratio']} ({a} of {h} hidden channels active), converted "
                                     f"from the base (BNs fitted), {steps} fine-tune steps (chapter recipe), "
                                     f"reparameterised", extra={"train_graph": model.eval(), "history": hist})
