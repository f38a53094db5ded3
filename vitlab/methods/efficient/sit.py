"""SiT: Self-slimmed Vision Transformer (Zong et al., ECCV 2022, arXiv:2111.12624).

Official code: https://github.com/Sense-X/SiT (``models/lvvit.py``: ``TokenSlimmingModule``, ``ReverseTSM``,
``LVViT``; ``losses.py``: ``DistillationLoss``). Written here from the paper and that code.

A ViT whose patch tokens are *softly* slimmed after the last block of every stage, and a distillation that
teaches the slimmed student to keep the dense teacher's features:

    stage blocks (1, 2, 2, 1), keep 0.5:   64 ─blk─ TSM → 32 ─blk─blk─ TSM → 16 ─blk─blk─ TSM → 8 ─blk─ head
                                           (patch tokens; the CLS token is never slimmed)

Token Slimming Module (TSM), N patch tokens x [N, C] → N′ new tokens:

    W  = Lin_{C/2→N′}( GELU( Lin_{C→C/2}( LN(x) ) ) )      [N, N′]  one row of scores per *input* token
    A  = softmax_over_N( W · s )                            s a learnable scalar, initialised to 1
    x′ = Aᵀ x                                               [N′, C]  every column of A sums to 1:
                                                                     each new token is a convex combination
                                                                     of the old ones (nothing is cut off)

Hard dropping (EViT/DynamicViT style) instead keeps the N′ tokens with the highest score and throws the rest
away; ``slimming="hard"`` does that here (score: the CLS token's attention, averaged over heads), at the same
places and ratios, as the paper's baseline.

Feature Recalibration Distillation (FRD). The student starts as a copy of the dense teacher. After every block
i its patch tokens (N_i of them) go through a Reverse TSM back to the teacher's N tokens and are matched by MSE
with the teacher's tokens after block i:

    RTSM_i(t) = u + MLP_C(LN(u)),   u = MLP_tokens(LN(t))   MLP_tokens: N_i → 4N → N over the token axis,
                                                            MLP_C: C → 4C → C over channels
    L = CE(y, ŷ_s) + λ_tok · mean_i MSE(RTSM_i(t_i^s), t_i^T) + λ_logit · τ² · KL(p_T^τ ‖ p_s^τ)
        λ_tok = λ_logit = 2, τ = 1 (the official ``main.py``);  RTSM_i = identity before the first slimming.

The RTSMs exist only for training; ``deploy()`` drops them, and the deployed model costs the slimmed blocks
plus the (small) TSMs.

    student = slim(base, **{k: DEFAULTS[k] for k in ("stages", "keep", "tsm_init_std")})   # around a copy of base
    finetune(student, base, train, profile=P, seed=s)        # FRD (CE + 2 token MSE + 2 KL), the chapter's fine-tune
    student.deploy().eval()                                  # logits = student(images)

The fine-tune is the chapter's (``recipes.finetune_kwargs``: AdamW lr 1e-4, cosine, label smoothing 0.1, ±2 px
shifts, batch 64, ``finetune_steps`` steps), so the dense control ``recipes.dense_control`` is equal-step: only the
loss (FRD's step_fn) and the new modules' lr differ. Small-scale choices (``DEFAULTS``, see the notebook): stages
(1, 2, 2, 1) over the course's 6-block base, so the blocks see 65/33/33/17/17/9 tokens (≈ 55 % fewer FLOPs); a
hundred fine-tuning steps instead of 125 epochs, so the new TSMs/RTSMs learn at 30 × the backbone's learning rate, the
training-only RTSMs are narrower (hidden ratio 1 instead of 4) and the TSMs start from a wider init (std 0.3 instead of 0.02): with the official init every new token starts as the mean
token, and that symmetry takes long to break.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_number, check_int as _check_int, check_model as _check_model

if TYPE_CHECKING:
    from vitlab.methods.efficient.recipes import Reduced

__all__ = ["TokenSlimming", "HardDrop", "ReverseTSM", "SiT", "slim", "default_stages", "teacher_tokens",
           "frd_loss", "finetune", "for_compare", "DEFAULTS", "DEFAULT_STAGES", "DEFAULT_NEW_LR_SCALE",
           "DEFAULT_TSM_INIT_STD"]

SLIMMING = ("soft", "hard")
# The lesson's and the comparison's setting. The backbone's lr, steps, batch, schedule and augmentation are the
# chapter's (recipes.finetune_kwargs); only the new modules get their own lr scale.
DEFAULTS = dict(
    stages=(1, 2, 2, 1),  # over the course's 6-block base: 65/33/33/17/17/9 tokens, ≈ 55 % fewer FLOPs
    keep=0.5,  # the official rule: int(N · keep^s) patch tokens in stage s
    # the new TSMs/RTSMs learn at 30 × the backbone's lr (3e-3 with the chapter's 1e-4): they start from scratch, the
    # ViT does not (at 100 steps, seed 0: 0.73 test accuracy at 30 ×, 0.64 at 10 ×)
    new_lr_scale=30.0,
    # the RTSMs' hidden widths (token MLP N_i → ratio·N → N, channel MLP C → ratio·C → C): the official 4 makes the
    # training-only RTSMs cost as much as the ViT itself; 1 keeps FRD affordable at one CPU thread (they are dropped
    # at deployment either way)
    rtsm_ratio=1.0,
    # Symmetry-breaking init for short fine-tunes (the official std is 0.02): with 0.02 the first TSM makes all new
    # tokens ≈ the mean token; identical tokens stay identical through the (permutation-equivariant) blocks, so the
    # later TSMs cannot tell them apart and the student starts as CLS + one pooled token, repeated. std 0.3 gives every
    # output slot its own, clearly different soft assignment from the first step.
    tsm_init_std=0.3,
)
DEFAULT_STAGES = DEFAULTS["stages"]
DEFAULT_NEW_LR_SCALE = DEFAULTS["new_lr_scale"]
DEFAULT_TSM_INIT_STD = DEFAULTS["tsm_init_std"]



def _check_tokens(x, n: int | None, fn: str) -> None:
    if not torch.is_tensor(x) or x.ndim != 3:
        raise ValueError(f"{fn}: x must be patch tokens [B, N, C], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if n is not None and x.shape[1] != n:
        raise ValueError(f"{fn}: x has {x.shape[1]} tokens, expected {n}")


# ------------------------------------------------------------------------------------------------ modules
class TokenSlimming(nn.Module):
    """TSM: N tokens → ``num_out`` tokens, each a softmax-weighted (convex) combination of the inputs.

    ``weights(x)`` gives A [B, N, N′] (columns sum to 1); ``forward(x)`` gives Aᵀx [B, N′, C]. The weight net is
    LN → Linear(C, C·hidden_ratio) → GELU → Linear(·, N′), as the official ``TokenSlimmingModule``.
    """

    def __init__(self, dim: int, num_out: int, hidden_ratio: float = 0.5):
        super().__init__()
        _check_int(dim, "dim", "TokenSlimming")
        _check_int(num_out, "num_out", "TokenSlimming")
        check_number(hidden_ratio, "hidden_ratio", "TokenSlimming", low=0, low_open=True)
        self.num_out = num_out
        hidden = max(1, int(dim * hidden_ratio))
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))  # s: sharpens (s > 1) or flattens the softmax

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, None, "TokenSlimming")
        return F.softmax(self.weight(x) * self.scale, dim=1)  # [B, N, N′], softmax over the *input* tokens

    def forward(self, x: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        return self.weights(x).transpose(1, 2) @ x  # [B, N′, N] @ [B, N, C] -> [B, N′, C]

    def extra_repr(self) -> str:
        return f"num_out={self.num_out}"


class HardDrop(nn.Module):
    """The hard baseline: keep the ``num_out`` tokens with the highest ``score`` [B, N], drop the others."""

    def __init__(self, num_out: int):
        super().__init__()
        self.num_out = _check_int(num_out, "num_out", "HardDrop")

    def forward(self, x: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        _check_tokens(x, None, "HardDrop")
        if score is None or score.shape != x.shape[:2]:
            raise ValueError(f"HardDrop: score must be [B, N] = {tuple(x.shape[:2])}, got "
                             f"{None if score is None else tuple(score.shape)}")
        idx = score.topk(self.num_out, dim=1).indices  # [B, N′]
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

    def extra_repr(self) -> str:
        return f"num_out={self.num_out}"


class _TokenMlp(nn.Module):
    """Linear → GELU → Linear (the official RTSM's ``Mlp``)."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReverseTSM(nn.Module):
    """RTSM: ``num_in`` tokens → ``num_out`` tokens (training only, for FRD).

    u = MLP over the token axis (num_in → ratio·num_out → num_out) of LN(t); out = u + MLP_C(LN(u)).
    """

    def __init__(self, dim: int, num_in: int, num_out: int, ratio: float = 4.0):
        super().__init__()
        for name, v in (("dim", dim), ("num_in", num_in), ("num_out", num_out)):
            _check_int(v, name, "ReverseTSM")
        check_number(ratio, "ratio", "ReverseTSM", low=0, low_open=True)
        self.num_in, self.num_out = num_in, num_out
        self.norm1 = nn.LayerNorm(dim)
        self.mlp1 = _TokenMlp(num_in, int(num_out * ratio), num_out)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp2 = _TokenMlp(dim, int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.num_in, "ReverseTSM")
        u = self.mlp1(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # [B, num_out, C]
        return u + self.mlp2(self.norm2(u))

    def extra_repr(self) -> str:
        return f"num_in={self.num_in}, num_out={self.num_out}"


# ------------------------------------------------------------------------------------------------ the model
def default_stages(depth: int) -> tuple[int, ...]:
    """Four stages over ``depth`` blocks in proportions 1:2:2:1 (6 blocks → (1, 2, 2, 1); 12 → (2, 4, 4, 2)).

    Fewer than 4 blocks: one block per stage."""
    _check_int(depth, "depth", "default_stages")
    if depth < 4:
        return (1,) * depth
    edge = max(1, round(depth / 6))
    mid = depth - 2 * edge
    return (edge, mid - mid // 2, mid // 2, edge)


class SiT(nn.Module):
    """A ViT (``vit``, used in place: its weights are the student's) with token slimming between stages.

    stages: blocks per stage (sum = depth); a slimmer runs after the last block of every stage but the last.
    keep: each slimming keeps ``int(N·keep^s)`` patch tokens in stage s (the official rule).
    seed: the new TSM/RTSM weights' initialisation (truncated normal, std 0.02, as the official code).
    tsm_init_std: the TSMs' init std instead (``DEFAULT_TSM_INIT_STD`` = 0.3 breaks the new tokens' symmetry).
    slimming: "soft" (TSM) or "hard" (top-k by the CLS attention of the block just run).
    ``forward(images)`` → logits; ``forward(images, return_tokens=True)`` → (logits, per-block patch tokens after
    the RTSMs, i.e. at the teacher's N tokens) for FRD.
    """

    def __init__(self, vit: nn.Module, stages=None, keep: float = 0.5, slimming: str = "soft",
                 rtsm_ratio: float = 4.0, seed: int = 0, tsm_init_std: float = 0.02):
        super().__init__()
        _check_model(vit, "SiT")
        if not all(hasattr(vit, a) for a in ("embed", "blocks", "norm", "forward_head", "patch_embed")):
            raise TypeError(f"SiT: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
        depth = len(vit.blocks)
        stages = default_stages(depth) if stages is None else stages
        if not isinstance(stages, (tuple, list)) or not stages or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stages):
            raise TypeError(f"SiT: stages must be a non-empty sequence of positive ints, got {stages!r}")
        if sum(stages) != depth:
            raise ValueError(f"SiT: stages {tuple(stages)} sum to {sum(stages)}, expected the depth {depth}")
        keep = check_number(keep, "keep", "SiT", low=0, low_open=True, high=1.0)
        if slimming not in SLIMMING:
            raise ValueError(f"SiT: slimming must be one of {SLIMMING}, got {slimming!r}")
        n = vit.patch_embed.num_patches
        kept = [int(n * keep ** s) for s in range(len(stages))]
        if kept[-1] < 1:
            raise ValueError(f"SiT: keep={keep} over {len(stages)} stages leaves {kept[-1]} of {n} patch tokens")
        self.vit, self.stages, self.keep, self.slimming = vit, tuple(stages), keep, slimming
        self.prefix = vit.num_prefix_tokens
        self.slim_after = tuple(sum(stages[:s + 1]) - 1 for s in range(len(stages) - 1))  # block indices
        self.patches = [kept[s] for s, b in enumerate(stages) for _ in range(b)]  # patches *into* each block
        out = self.patches[1:] + self.patches[-1:]  # patches after each block (after its slimmer)
        dim = vit.embed_dim
        make = (lambda k: TokenSlimming(dim, k)) if slimming == "soft" else HardDrop
        self.slimmers = nn.ModuleList([make(kept[s + 1]) for s in range(len(stages) - 1)])
        # RTSM after block i once some tokens are gone (identity before: the student's tokens are the teacher's)
        self.rtsm = nn.ModuleList([ReverseTSM(dim, k, n, rtsm_ratio) if k < n else nn.Identity() for k in out])
        init_std = check_number(tsm_init_std, "tsm_init_std", "SiT", low=0, low_open=True)
        self._init_new(_check_int(seed, "seed", "SiT", low=0), init_std)

    @torch.no_grad()
    def _init_new(self, seed: int, tsm_std: float) -> None:
        """The official init for the new modules (truncated normal, std 0.02; zero biases), from ``seed``;
        ``tsm_std`` replaces the std for the TSMs' two linear layers."""
        g = torch.Generator().manual_seed(seed)
        for std, mods in ((tsm_std, self.slimmers.modules()), (0.02, self.rtsm.modules())):
            for m in mods:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(nn.init.trunc_normal_(torch.empty(m.weight.shape), std=std, a=-2.0, b=2.0,
                                                         generator=g))
                    nn.init.zeros_(m.bias)

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens (prefix included) every block processes."""
        return [p + self.prefix for p in self.patches]

    def deploy(self) -> "SiT":
        """Drop the training-only RTSMs (in place); returns self."""
        self.rtsm = None
        return self

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        if return_tokens and self.rtsm is None:
            raise ValueError("SiT: return_tokens=True needs the RTSMs, which deploy() removed")
        logits, tokens, _ = self._run(images, return_tokens, False)
        return (logits, tokens) if return_tokens else logits

    @torch.no_grad()
    def slim_weights(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Soft slimming only: each TSM's A [B, N_s, N_s+1] on ``images``; their product A₁A₂⋯ [B, N, N_last]
        says how much of every original patch each final token holds (columns still sum to 1)."""
        if self.slimming != "soft":
            raise ValueError(f"SiT.slim_weights: needs slimming='soft', got {self.slimming!r}")
        return self._run(images, False, True)[2]

    def _run(self, images: torch.Tensor, return_tokens: bool, keep_weights: bool):
        vit, P = self.vit, self.prefix
        x = vit.embed(images)
        tokens, weights = [], []
        for i, blk in enumerate(vit.blocks):
            score = None
            if i in self.slim_after and self.slimming == "hard":
                x, sides = blk(x, side=("cls",))
                score = sides["cls"].mean(1)[:, P:]  # [B, N]: CLS attention to each patch, mean over heads
            else:
                x = blk(x)
            if i in self.slim_after:
                slimmer = self.slimmers[self.slim_after.index(i)]
                if keep_weights:
                    weights.append(slimmer.weights(x[:, P:]))
                x = torch.cat([x[:, :P], slimmer(x[:, P:], score)], dim=1)  # the CLS token is left alone
            if return_tokens:
                tokens.append(self.rtsm[i](x[:, P:]))
        return vit.forward_head(vit.norm(x)), tokens, weights

    def extra_repr(self) -> str:
        return f"stages={self.stages}, keep={self.keep}, slimming={self.slimming!r}, tokens={self.tokens_per_block}"


def slim(base: nn.Module, stages=None, keep: float = 0.5, slimming: str = "soft", **kw) -> SiT:
    """A SiT student initialised from the dense ``base`` (a deep copy; ``base`` is not touched)."""
    _check_model(base, "slim")
    return SiT(copy.deepcopy(base), stages, keep, slimming, **kw)


# ------------------------------------------------------------------------------------------------ FRD
@torch.no_grad()
def teacher_tokens(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The dense teacher's logits and its patch tokens after every block (before the final norm)."""
    _check_model(teacher, "teacher_tokens")
    x = teacher.embed(images)
    tokens = []
    for blk in teacher.blocks:
        x = blk(x)
        tokens.append(x[:, teacher.num_prefix_tokens:])
    return teacher.forward_head(teacher.norm(x)), tokens


def frd_loss(student_logits: torch.Tensor, student_tokens, teacher_logits: torch.Tensor, teacher_tokens,
             labels: torch.Tensor, *, lambda_token: float = 2.0, lambda_logits: float = 2.0, tau: float = 1.0,
             label_smoothing: float = 0.1) -> dict:
    """SiT's loss: CE + λ_tok · mean_i MSE(student_i, teacher_i) + λ_logit · τ² · KL(teacher ‖ student).

    The KL is over the batch (``batchmean``) between temperature-τ softmaxes; the MSE is over all elements of each
    layer's [B, N, C] tokens. Returns {"loss", "ce", "token", "logits"} (the last three already weighted).
    """
    if not isinstance(student_tokens, (list, tuple)) or not isinstance(teacher_tokens, (list, tuple)):
        raise TypeError("frd_loss: student_tokens and teacher_tokens must be lists of [B, N, C] tensors")
    if len(student_tokens) != len(teacher_tokens) or not student_tokens:
        raise ValueError(f"frd_loss: need one student tensor per teacher layer, got {len(student_tokens)} and "
                         f"{len(teacher_tokens)}")
    for i, (s, t) in enumerate(zip(student_tokens, teacher_tokens)):
        if s.shape != t.shape:
            raise ValueError(f"frd_loss: layer {i}: student tokens {tuple(s.shape)} != teacher tokens "
                             f"{tuple(t.shape)} (pass the student's tokens through its RTSMs)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"frd_loss: student logits {tuple(student_logits.shape)} != teacher logits "
                         f"{tuple(teacher_logits.shape)}")
    for name, v in (("lambda_token", lambda_token), ("lambda_logits", lambda_logits)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"frd_loss: {name} must be a number >= 0, got {v!r}")
    check_number(tau, "tau", "frd_loss", low=0, low_open=True)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    token = lambda_token * sum(F.mse_loss(s, t) for s, t in zip(student_tokens, teacher_tokens)) / len(student_tokens)
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="batchmean", log_target=True) * (tau * tau) * lambda_logits
    return {"loss": ce + token + kl, "ce": ce, "token": token, "logits": kl}


def _optimizer(new_lr_scale: float):
    """AdamW with timm's decay rule for the ViT's weights and ``new_lr_scale`` × lr for the new TSM/RTSM."""
    def make(model: SiT, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        groups = {"decay": [], "no_decay": [], "new": []}
        skip = model.vit.no_weight_decay()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if not name.startswith("vit."):
                groups["new"].append(p)
            elif p.ndim <= 1 or name[4:] in skip:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        return torch.optim.AdamW([{"params": groups["decay"], "weight_decay": weight_decay},
                                  {"params": groups["no_decay"], "weight_decay": 0.0},
                                  {"params": groups["new"], "weight_decay": weight_decay, "lr": lr * new_lr_scale}],
                                 lr=lr)
    return make


def finetune(student: SiT, teacher: nn.Module | None, train, *, distill: bool = True,
             new_lr_scale: float = DEFAULTS["new_lr_scale"], seed: int = 0, profile=None, steps: int | None = None,
             progress: bool = False, desc: str = "SiT", **loss_kw) -> dict:
    """The chapter's fine-tune (``recipes.finetune_kwargs(profile)``, ``seed``) of ``student`` with FRD (``distill``)
    or plain label-smoothed CE. ``teacher`` (the dense base, eval, frozen) is needed for FRD. The backbone learns at
    the chapter's lr, the new TSMs/RTSMs at ``new_lr_scale`` × it (our deviation for short budgets: the official
    recipe fine-tunes 125 epochs with one lr). ``steps`` overrides the chapter's step count (tests, ablations).
    Returns fit's history, plus ``parts``: the per-step FRD terms (empty for CE). Leaves ``student`` in eval mode."""
    from vitlab.methods.efficient import recipes
    from vitlab.train import fit

    if not isinstance(student, SiT):
        raise TypeError(f"finetune: student must be a SiT, got {type(student).__name__}")
    kw = recipes.finetune_kwargs(profile)
    if steps is not None:
        kw["steps"] = _check_int(steps, "steps", "finetune")
    if distill:
        _check_model(teacher, "finetune")
        if student.rtsm is None:
            raise ValueError("finetune: distill=True needs the student's RTSMs (do not deploy() before training)")
        teacher.eval()
    loss_kw.setdefault("label_smoothing", kw["label_smoothing"])
    parts: list[dict] = []
    moved: dict = {}

    def step_fn(net, x, y):
        t = teacher
        if next(teacher.parameters()).device != x.device:  # e.g. a CPU base, a CUDA student
            t = moved.setdefault("teacher", copy.deepcopy(teacher).to(x.device).eval())
        t_logits, t_tokens = teacher_tokens(t, x)
        s_logits, s_tokens = net(x, return_tokens=True)
        out = frd_loss(s_logits, s_tokens, t_logits, t_tokens, y, **loss_kw)
        parts.append({k: v.item() for k, v in out.items()})
        return out["loss"], s_logits

    hist = fit(student, train, None, profile=profile, **kw, seed=seed,
               optimizer=_optimizer(check_number(new_lr_scale, "new_lr_scale", "finetune", low=0, low_open=True)),
               progress=progress, desc=desc, step_fn=step_fn if distill else None)
    hist["parts"] = parts
    return hist


# ------------------------------------------------------------------------------------------------ comparison
def for_compare(base: nn.Module, train, profile, *, seed: int = 0) -> "Reduced":
    """SiT at its default setting (``DEFAULTS``) on the chapter's base: 4 stages (1:2:2:1), keep 0.5, soft TSMs, a
    student initialised from ``base`` (TSMs at the symmetry-breaking init, std 0.3, drawn from ``seed``) and
    fine-tuned with FRD by the chapter's recipe (``recipes.finetune_kwargs``, ``seed``; the new modules at
    ``new_lr_scale`` × the lr, RTSM hidden ratio ``rtsm_ratio``), RTSMs dropped. The lesson's main model is exactly this, for each seed."""
    from vitlab.methods.efficient.recipes import Reduced, finetune_steps

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    steps = finetune_steps(profile)
    depth = len(base.blocks)
    stages = DEFAULTS["stages"] if depth == sum(DEFAULTS["stages"]) else None
    student = slim(base, stages, DEFAULTS["keep"], tsm_init_std=DEFAULTS["tsm_init_std"],
                   rtsm_ratio=DEFAULTS["rtsm_ratio"], seed=seed)
    hist = finetune(student, base, train, profile=profile, seed=seed)
    student.deploy().eval()
    n = base.patch_embed.num_patches
    kept = sorted(set(student.patches), reverse=True)
    return Reduced(student, [float(t) for t in student.tokens_per_block], None,
                   f"stages {student.stages}, keep {student.keep}: {'/'.join(map(str, kept))} of {n} patches "
                   f"(soft TSM, init std {DEFAULTS['tsm_init_std']}), FRD fine-tune {steps} steps",
                   extra={"history": hist})
