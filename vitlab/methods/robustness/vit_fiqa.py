"""ViT-FIQA: Assessing Face Image Quality using Vision Transformers (A. Atzori, F. Boutros, N. Damer, ICCVW 2025,
arXiv:2508.13957; official code: atzoriandrea/ViT-FIQA-Assessing-Face-Image-Quality-using-Vision-Transformers,
``backbones/vit_qs.py::VisionTransformer``, ``losses.py::CombinedMarginLoss``, ``partial_fc_v2.py::PartialFC_V2``,
``configs/ms1mv2_vit_s_qs.py``). Our own code, read against theirs, at tiny scale on CPU.

The idea. A face-recognition (FR) ViT learns, besides its identity embedding, one extra learnable *quality token*
q, placed before the patch tokens. After the final LayerNorm two heads read the sequence:

    tokens  = LN( Blocks( [q ; patches] + pos ) )                 [B, 1 + N, D]
    emb     = BN(Lin(BN(Lin(flatten(tokens[:, 1:])))))            the patch tokens flattened (N*D), not pooled
    q_hat   = Lin(BN(tokens[:, 0]))                               one scalar, no bias

The FR loss is CosFace on the cosines to learnable class centres, cos_j = <emb/|emb|, W_j/|W_j|>:
logits = s (cos - m 1[j = y]) with s = 64, m = 0.4. The quality token regresses CR-FIQA's *certainty ratio* of
the margin-free cosines, detached:

    CCS   = cos_y                          (closeness to the own class centre)
    NNCCS = max_{j != y} cos_j             (the nearest other centre)
    t     = CCS / (NNCCS + 1 + 1e-9)       L = CE(logits, y) + 10 * SmoothL1_{beta=0.5}(t, q_hat)

A sample that sits close to its own centre and far from the others is "easy" (high t); degraded faces drift
towards the others (low t). At test time no class centres are needed: q_hat alone scores an unseen face.
``mode="crfiqa"`` is the ablation the official code carries: no quality token, q_hat = Lin(BN(emb)), the quality
regressed from the FR embedding as in CR-FIQA.

    vit = ViTFIQA(img_size=32, patch_size=4, in_chans=1, num_classes=64, mode="token")
    emb, q = vit(images, output="fiqa")                   # the official forward: ([B, E], [B, 1])
    loss, parts, cos = fiqa_loss(vit, images, labels)     # CE + 10 SmoothL1, parts: ce / quality / target
    logits, ccs, nnccs = cosface_logits(cos, labels)      # the margin head (CombinedMarginLoss, CosFace)
    curve = edc(scores, quality, ids)                     # error-versus-discard: FNMR at fixed FMR
    model = zoo.get(entry_name("token", seed))            # the trained lesson models (below)

Training masks tokens: every step keeps a random 90 % of the *whole* sequence, the quality token's slot
included (MAE's ``random_masking``, ``vitlab.mae``), runs the blocks and the final LayerNorm on the kept tokens
only, and then puts a learned ``mask_token`` back into each removed slot, so the heads always see 1 + N tokens.
When the quality token itself was dropped, q_hat reads the mask token (the official does exactly this).

Zoo entries (``_register``), 3 seeds each, all on the ``faces`` set (``vitlab.data.faces``: 64 training
identities, 192 training images each (12,288), every image degraded at a known severity), same steps, lr and data:

    ch6_vitfiqa_token_faces_s<seed>     mode="token" (the paper's model)
    ch6_vitfiqa_crfiqa_faces_s<seed>    mode="crfiqa" (quality regressed from the embedding)

trained with the zoo objective ``"vitfiqa"`` (``fiqa_objective``, a classifying objective: the zoo scores the
closed-set identification accuracy on val every epoch, so every entry stores its val curve and ``plateau_gain``)
plus ``test_rho_q_sev`` (Spearman of quality and severity on the seen-identity test split). ``measure`` computes
the lesson's numbers on the verification set of 32 *unseen* identities (``faces_verification``).

Our reading, and every deviation from the official code, named:
- Size: patch 4 on 32 x 32 grayscale (64 tokens + q), width 64, depth 4, 4 heads, MLP ratio 2 (official ViT-S:
  112 px, patch 9, 144 tokens, 512 wide, depth 12, 8 heads, ratio 4), embedding 64 wide (official 512). Ratio 2
  keeps a checkpoint under 2 MB (the flattened 64 x 64 -> 64 feature layer alone is 262 k weights).
- Blocks are the course ``Block`` (timm layout) with the official's choices where they differ from timm's
  defaults: ReLU6 in the MLP, no qkv bias, drop-path 0.1. LayerNorm eps is the course's 1e-6 (official
  ``nn.LayerNorm``: 1e-5). The quality token is our ViT's class-token slot (``cls_token``, position 0, init
  normal std 1e-6 as the official ``_init_weights``); in ``crfiqa`` mode there is none.
- Masking: the official ``forward_features`` calls ``self.random_masking(x)`` *without* its ``mask_ratio``, so it
  always masks 10 % whatever the constructor says; ours uses ``mask_ratio`` (default 0.1: the same). len_keep =
  int(L * 0.9) = 58 of 65 tokens here.
- Class centres live in the model (``class_centers`` [C, E], init normal std 0.01 as ``PartialFC_V2.weight``), not
  in a separate PartialFC module: the zoo's optimiser sees one model. No partial sampling (sample_rate 1, the
  official config's), no distributed gathers, no fp16.
- ``cosface_logits`` returns NNCCS itself; the official ``CombinedMarginLoss`` returns NNCCS + (1 + 1e-9) and the
  PartialFC divides by that. ``cr_target`` adds the 1 + 1e-9: the target is the same number. Only the CosFace
  branch (``margin_list=(1.0, 0.0, 0.4)``, the official config) is implemented; the ArcFace branch and the
  inter-class filtering threshold (0 in the config) are not.
- The intended loss, not the released trainer (which does not run: it imports a missing ``CombinedMarginLossV2``
  and a missing ``backbones.vit_qs_new``, and calls ``CombinedMarginLoss`` with 6 arguments): CE + alpha *
  SmoothL1(beta 0.5) with alpha = 10 (config ``alpha``).
- ``forward(x)`` returns the margin-free cosines to the class centres (so ``vitlab.train.evaluate`` scores closed-set
  identification); ``forward(x, output="fiqa")`` is the official forward, (embedding, quality [B, 1]).
- Training recipe: AdamW lr 1e-3, weight decay 0.05, grad-norm clip 5 (official), batch 128, cosine schedule with
  10 % warm-up (official: polynomial decay after 2 of 20 warm-up epochs), no augmentation (the data carries its own
  nuisances; official: grid-sample / photometric / blur / cutout augmentation).
- Evaluation: pair quality is min(q_a, q_b) and the FNMR threshold is fixed on all impostor pairs before any
  discarding (the usual EDC of the FIQA literature, as CR-FIQA's evaluation); the official repo delegates EDCs to
  external scripts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_choice, check_images, check_int, check_model, check_number
from vitlab.mae import random_masking
from vitlab.models.registry import MODELS, register_model
from vitlab.models.vit import LayerNorm, VisionTransformer, init_linear_

__all__ = ["ViTFIQA", "MODES", "reinsert_masked", "cosface_logits", "cr_target", "fiqa_loss", "fiqa_step",
           "fiqa_objective", "predict", "spearman", "verification_pairs", "fnmr_threshold", "edc", "edc_auc",
           "random_edc", "measure", "MEASURE_KEY", "SCALE", "MARGIN", "ALPHA", "BETA", "MASK_RATIO", "SEEDS",
           "STEPS", "FIT", "DISCARD", "FMR", "model_name", "entry_name"]

MODES = ("token", "crfiqa")
SCALE, MARGIN = 64.0, 0.4  # train_v2.py s=64; config margin_list=(1.0, 0.0, 0.4): CosFace m3 = 0.4
ALPHA, BETA = 10.0, 0.5  # config alpha; PartialFC_V2's SmoothL1Loss(beta=0.5)
MASK_RATIO = 0.1
SEEDS = (0, 1, 2)
DATA_SEED = 0
STEPS = {"cpu": 800, "gpu": 8000}  # gpu: ten times the steps on the same faces (83 epochs)
# 192 faces per identity. With 48 (3,072 images) the 800 steps are 33 epochs: the model memorises its training
# faces (train accuracy 99.9 %, val 80 %), so CCS is high for every training image, degraded or not, and the
# target carries little quality signal (|rho| 0.28 token / 0.37 crfiqa over 3 seeds). Faces are free: 12,288
# images make the same steps 8 epochs, and the target on training images tracks severity (rho -0.54).
N_TRAIN = 192 * 64
FIT = dict(lr=1e-3, weight_decay=0.05, warmup=0.1, batch_size=128, shift=0, grad_clip=5.0, label_smoothing=0.0)
DISCARD = tuple(round(0.02 * i, 2) for i in range(41))  # 0 .. 80 % of the pairs discarded
FMR = 1e-3


# --------------------------------------------------------------------------------------------------- model
def reinsert_masked(x_kept: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Undo ``vitlab.mae.random_masking`` with a learned token: x_kept [B, K, D] (the kept tokens in shuffled
    order), mask_token [1, 1, D], ids_restore [B, L] -> [B, L, D], each kept token back at its slot and
    ``mask_token`` in every removed slot (the official ``forward_features`` after its final norm)."""
    fn = "reinsert_masked"
    if not isinstance(x_kept, Tensor) or x_kept.ndim != 3:
        raise ValueError(f"{fn}: x_kept must be [B, K, D], got "
                         f"{tuple(x_kept.shape) if isinstance(x_kept, Tensor) else type(x_kept).__name__}")
    B, K, D = x_kept.shape
    if not isinstance(ids_restore, Tensor) or ids_restore.ndim != 2 or ids_restore.shape[0] != B \
            or ids_restore.shape[1] < K:
        raise ValueError(f"{fn}: ids_restore must be [B={B}, L >= K={K}], got "
                         f"{tuple(ids_restore.shape) if isinstance(ids_restore, Tensor) else ids_restore!r}")
    if not isinstance(mask_token, Tensor) or mask_token.shape[-1] != D or mask_token.numel() != D:
        raise ValueError(f"{fn}: mask_token must hold D={D} values ([1, 1, D]), got "
                         f"{tuple(mask_token.shape) if isinstance(mask_token, Tensor) else mask_token!r}")
    L = ids_restore.shape[1]
    full = torch.cat([x_kept, mask_token.reshape(1, 1, D).to(x_kept.dtype).expand(B, L - K, D)], dim=1)
    return torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, D))


class ViTFIQA(VisionTransformer):
    """The course ViT with ViT-FIQA's quality token, masking, FR embedding head, quality head and class centres.

    ``mode="token"``: the quality token at position 0 (the class-token slot), q_hat = Lin(BN(token 0));
    ``mode="crfiqa"``: no extra token, q_hat = Lin(BN(embedding)). ``forward(x)`` -> margin-free cosines to the
    class centres [B, C]; ``output="fiqa"`` -> (embedding [B, E], quality [B, 1]); ``output="all"`` -> both plus
    the cosines."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 1, num_classes: int = 64,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0,
                 qkv_bias: bool = False, drop_path_rate: float = 0.1, mode: str = "token",
                 mask_ratio: float = MASK_RATIO, emb_dim: int | None = None, use_kernels: bool = False):
        fn = "ViTFIQA"
        check_choice(mode, MODES, "mode", fn)
        mask_ratio = check_number(mask_ratio, "mask_ratio", fn, low=0, high=1, high_open=True)
        num_classes = check_int(num_classes, "num_classes", fn, low=2)
        emb_dim = embed_dim if emb_dim is None else check_int(emb_dim, "emb_dim", fn)
        token = mode == "token"
        super().__init__(img_size, patch_size, in_chans, num_classes=0, global_pool="token" if token else "avg",
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, class_token=token, drop_path_rate=drop_path_rate)
        self.mode, self.mask_ratio, self.num_classes, self.emb_dim = mode, mask_ratio, num_classes, emb_dim
        for blk in self.blocks:
            blk.mlp.act = nn.ReLU6()  # official Mlp(act_layer=nn.ReLU6)
        self.norm, self.fc_norm = LayerNorm(embed_dim), nn.Identity()  # the final LN over every token, both modes
        n = self.patch_embed.num_patches
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_ratio > 0 else None
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * n, emb_dim, bias=False), nn.BatchNorm1d(emb_dim, eps=2e-5),
            nn.Linear(emb_dim, emb_dim, bias=False), nn.BatchNorm1d(emb_dim, eps=2e-5))
        q_in = embed_dim if token else emb_dim
        self.head_qs = nn.Sequential(nn.BatchNorm1d(q_in, eps=2e-5), nn.Linear(q_in, 1, bias=False))
        self.class_centers = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, emb_dim)))
        init_linear_(self.feature)
        init_linear_(self.head_qs)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        self.set_kernels(use_kernels)

    @property
    def quality_index(self) -> int | None:
        """Where the quality token sits in the sequence (0), or None in ``crfiqa`` mode."""
        return 0 if self.mode == "token" else None

    def forward_features(self, x: Tensor, side: Sequence[str] = ()):
        """Tokens after the final LayerNorm, [B, 1 + N, D] (``crfiqa``: [B, N, D]); in training mode with
        ``mask_ratio`` > 0, a random ``mask_ratio`` of the whole sequence skipped the blocks and reads
        ``mask_token``."""
        x = self.embed(x)
        masked = self.training and self.mask_token is not None
        if masked:
            x, _, ids_restore = random_masking(x, self.mask_ratio)
        sides = []
        if side:
            for blk in self.blocks:
                x, s = blk(x, side=side)
                sides.append(s)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        if masked:
            x = reinsert_masked(x, self.mask_token, ids_restore)
        return (x, sides) if side else x

    def heads(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(embedding [B, E], quality [B, 1]) from the final tokens."""
        B = tokens.shape[0]
        if self.mode == "token":
            emb = self.feature(tokens[:, 1:].reshape(B, -1))
            return emb, self.head_qs(tokens[:, 0])
        emb = self.feature(tokens.reshape(B, -1))
        return emb, self.head_qs(emb)

    def cosines(self, emb: Tensor) -> Tensor:
        """Margin-free cosines to the class centres [B, C], clamped to [-1, 1] (PartialFC_V2)."""
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.class_centers, dim=1)).clamp(-1, 1)

    def forward(self, x: Tensor, side: Sequence[str] = (), output: str = "logits"):
        check_choice(output, ("logits", "fiqa", "all"), "output", "ViTFIQA.forward")
        check_images(x, self.patch_embed.proj.in_channels, self.patch_embed.img_size[0]
                     if isinstance(self.patch_embed.img_size, tuple) else self.patch_embed.img_size,
                     "ViTFIQA.forward")
        if side:
            tokens, sides = self.forward_features(x, side=side)
        else:
            tokens, sides = self.forward_features(x), None
        emb, q = self.heads(tokens)
        if output == "fiqa":
            out = (emb, q)
        else:
            cos = self.cosines(emb)
            out = cos if output == "logits" else (emb, q, cos)
        return (out, sides) if side else out

    def forward_with_attention(self, x: Tensor, side: Sequence[str] = ("cls",)):
        return self.forward(x, side=side or ("cls",))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, mask_ratio={self.mask_ratio}, emb_dim={self.emb_dim}"


# ---------------------------------------------------------------------------------------------------- loss
def _check_cos_labels(cos, labels, fn: str):
    if not isinstance(cos, Tensor) or cos.ndim != 2 or not cos.dtype.is_floating_point:
        raise ValueError(f"{fn}: cos must be a float tensor [B, C], got "
                         f"{tuple(cos.shape) if isinstance(cos, Tensor) else type(cos).__name__}")
    B, C = cos.shape
    if C < 2:
        raise ValueError(f"{fn}: cos needs at least 2 classes (NNCCS is the best *other* class), got C={C}")
    if not isinstance(labels, Tensor) or labels.shape != (B,) or labels.dtype != torch.int64:
        raise ValueError(f"{fn}: labels must be an int64 tensor [{B}], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if B and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"{fn}: labels must be in 0..{C - 1}, got {int(labels.min())}..{int(labels.max())}")


def cosface_logits(cos: Tensor, labels: Tensor, s: float = SCALE, m: float = MARGIN):
    """The CosFace branch of the official ``CombinedMarginLoss``: cos [B, C] (margin-free cosines), labels [B] ->
    (logits = s * (cos - m on the own class) [B, C], CCS = cos[i, y_i] [B, 1], NNCCS = max_{j != y_i} cos[i, j]
    [B, 1]); CCS and NNCCS are detached. The official returns NNCCS + (1 + 1e-9): see ``cr_target``."""
    fn = "cosface_logits"
    _check_cos_labels(cos, labels, fn)
    s = check_number(s, "s", fn, low=0, low_open=True)
    m = check_number(m, "m", fn, low=0)
    rows = torch.arange(cos.shape[0], device=cos.device)
    with torch.no_grad():
        ccs = cos[rows, labels].detach().clone()
        others = cos.detach().clone()
        others[rows, labels] = -torch.inf
        nnccs = others.max(dim=1).values
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return s * (cos - m * onehot), ccs[:, None], nnccs[:, None]


def cr_target(ccs: Tensor, nnccs: Tensor) -> Tensor:
    """CR-FIQA's certainty ratio, the quality target: CCS / (NNCCS + 1 + 1e-9) (the +1 keeps the denominator in
    (0, 2] for cosines). Same shapes in and out."""
    if not isinstance(ccs, Tensor) or not isinstance(nnccs, Tensor) or ccs.shape != nnccs.shape:
        raise ValueError(f"cr_target: ccs and nnccs must be tensors of one shape, got "
                         f"{getattr(ccs, 'shape', type(ccs).__name__)} and {getattr(nnccs, 'shape', type(nnccs).__name__)}")
    return ccs / (nnccs + (1 + 1e-9))


def fiqa_loss(net: nn.Module, images: Tensor, labels: Tensor, *, s: float = SCALE, m: float = MARGIN,
              alpha: float = ALPHA, beta: float = BETA):
    """ViT-FIQA's training loss on one batch: (CE(CosFace logits) + alpha * SmoothL1_beta(t, q_hat), parts, cos)
    with t = ``cr_target`` of the margin-free cosines (detached). ``parts``: detached ``ce``, ``quality`` (the
    SmoothL1), ``target_mean``; ``cos`` [B, C] the margin-free cosines (for training accuracy)."""
    fn = "fiqa_loss"
    check_model(net, fn)
    alpha = check_number(alpha, "alpha", fn, low=0)
    beta = check_number(beta, "beta", fn, low=0, low_open=True)
    emb, q, cos = net(images, output="all")
    logits, ccs, nnccs = cosface_logits(cos.float(), labels, s, m)
    ce = F.cross_entropy(logits, labels)
    t = cr_target(ccs, nnccs)  # [B, 1], detached
    ql = F.smooth_l1_loss(t, q.float(), beta=beta)  # official criterion_qs(relative_distance, qs).mean()
    parts = {"ce": ce.detach(), "quality": ql.detach(), "target_mean": t.mean()}
    return ce + alpha * ql, parts, cos


def fiqa_step(s: float = SCALE, m: float = MARGIN, alpha: float = ALPHA, beta: float = BETA):
    """A ``vitlab.train.fit`` step_fn: ``fiqa_loss`` -> (loss, margin-free cosines as logits)."""
    check_number(s, "s", "fiqa_step", low=0, low_open=True)
    check_number(m, "m", "fiqa_step", low=0)
    check_number(alpha, "alpha", "fiqa_step", low=0)
    check_number(beta, "beta", "fiqa_step", low=0, low_open=True)

    def step_fn(net, images, labels):
        loss, _, cos = fiqa_loss(net, images, labels, s=s, m=m, alpha=alpha, beta=beta)
        return loss, cos
    return step_fn


@torch.no_grad()
def predict(model: ViTFIQA, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(embeddings [N, E], quality [N]) in eval mode (no masking; BatchNorm running statistics), model left in
    the mode it was in."""
    if not isinstance(model, ViTFIQA):
        raise TypeError(f"predict: model must be a ViTFIQA, got {type(model).__name__}")
    batch_size = check_int(batch_size, "batch_size", "predict")
    was = model.training
    model.eval()
    embs, qs = [], []
    for i in range(0, len(images), batch_size):
        e, q = model(images[i:i + batch_size], output="fiqa")
        embs.append(e.float())
        qs.append(q.float().reshape(-1))
    model.train(was)
    return torch.cat(embs), torch.cat(qs)


# ---------------------------------------------------------------------------------------------- evaluation
def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 with ties averaged."""
    x = x.double()
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        cnt = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        r = (sums / cnt)[inv]
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors of equal length (ties get average ranks)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"spearman: a and b must be 1-D tensors of one length >= 2, got "
                         f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float("nan") if den == 0 else float((ra @ rb).item() / den)


def verification_pairs(embeddings: Tensor, identities: Tensor):
    """All unordered pairs (i < j): (cosine score [P], genuine bool [P], index_a [P], index_b [P])."""
    fn = "verification_pairs"
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError(f"{fn}: embeddings must be [N, E], got {getattr(embeddings, 'shape', embeddings)!r}")
    if not isinstance(identities, Tensor) or identities.shape != (embeddings.shape[0],):
        raise ValueError(f"{fn}: identities must be a tensor [{embeddings.shape[0]}], got "
                         f"{getattr(identities, 'shape', identities)!r}")
    e = F.normalize(embeddings.float(), dim=1)
    a, b = torch.triu_indices(len(e), len(e), offset=1)
    return (e[a] * e[b]).sum(1), identities[a] == identities[b], a, b


def fnmr_threshold(impostor_scores: Tensor, fmr: float = FMR) -> float:
    """The score threshold whose false-match rate on ``impostor_scores`` is at most ``fmr``: a pair matches when
    its score is > the threshold."""
    fmr = check_number(fmr, "fmr", "fnmr_threshold", low=0, high=1, low_open=True, high_open=True)
    if not isinstance(impostor_scores, Tensor) or impostor_scores.ndim != 1 or len(impostor_scores) == 0:
        raise ValueError("fnmr_threshold: impostor_scores must be a non-empty 1-D tensor")
    k = int(fmr * len(impostor_scores))  # at most k impostors may score above the threshold
    srt = torch.sort(impostor_scores.double(), descending=True).values
    return float(srt[k]) if k < len(srt) else float(srt[-1])


def edc(scores: Tensor, genuine: Tensor, pair_quality: Tensor, discard: Sequence[float] = DISCARD,
        fmr: float = FMR) -> Tensor:
    """Error-versus-discard: for each fraction in ``discard``, the FNMR of the genuine pairs left after removing
    that fraction of *all* pairs with the lowest ``pair_quality`` (min of the two images' qualities), at the
    threshold fixed on all impostor pairs at ``fmr`` before any discarding. -> float64 [len(discard)]."""
    fn = "edc"
    for name, t in (("scores", scores), ("genuine", genuine), ("pair_quality", pair_quality)):
        if not isinstance(t, Tensor) or t.ndim != 1:
            raise ValueError(f"{fn}: {name} must be a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not (scores.shape == genuine.shape == pair_quality.shape):
        raise ValueError(f"{fn}: scores, genuine and pair_quality must be of one length, got {len(scores)}, "
                         f"{len(genuine)}, {len(pair_quality)}")
    if genuine.dtype != torch.bool or not genuine.any() or genuine.all():
        raise ValueError(f"{fn}: genuine must be a bool tensor with both genuine and impostor pairs")
    fr = [check_number(f, "discard[i]", fn, low=0, high=1, high_open=True) for f in discard]
    if not fr:
        raise ValueError(f"{fn}: discard must not be empty")
    thr = fnmr_threshold(scores[~genuine], fmr)
    order = torch.argsort(pair_quality.double(), stable=True)  # lowest quality first
    miss = (scores <= thr)[order] & genuine[order]
    gen = genuine[order]
    out = []
    P = len(scores)
    for f in fr:
        k = int(round(f * P))
        g = int(gen[k:].sum())
        out.append(float(miss[k:].sum()) / g if g else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def random_edc(scores: Tensor, genuine: Tensor, discard: Sequence[float] = DISCARD, fmr: float = FMR, *,
               repeats: int = 20, seed: int = 0) -> Tensor:
    """The control curve: the EDC when pairs are discarded in random order, averaged over ``repeats`` orders."""
    repeats = check_int(repeats, "repeats", "random_edc")
    g = torch.Generator().manual_seed(check_int(seed, "seed", "random_edc", low=0))
    curves = [edc(scores, genuine, torch.rand(len(scores), generator=g), discard, fmr) for _ in range(repeats)]
    return torch.stack(curves).mean(0)


def edc_auc(curve: Tensor, discard: Sequence[float] = DISCARD) -> float:
    """The area under an EDC (trapezoids over ``discard``): lower is better."""
    x = torch.tensor([float(f) for f in discard], dtype=torch.float64)
    if not isinstance(curve, Tensor) or curve.shape != x.shape:
        raise ValueError(f"edc_auc: curve must have one value per discard fraction ({len(x)}), got "
                         f"{getattr(curve, 'shape', type(curve).__name__)}")
    return float(torch.trapezoid(curve.double(), x))


MEASURE_KEY = "vitfiqa-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes


def measure(model: ViTFIQA, profile=None, seed: int = 0) -> dict:
    """The lesson's numbers for one trained model on the verification set of ``N_UNSEEN`` unseen identities
    (``faces_verification(seed=DATA_SEED)``, 16 images each, all pairs):

    - ``rho_q_sev``: Spearman of predicted quality and true severity (negative = quality falls as faces degrade);
      ``rho_q_sev_seen`` the same on the seen-identity test split;
    - ``fnmr_<p>`` / ``fnmr_random_<p>``: FNMR at FMR = ``FMR`` with p % of the pairs discarded by quality (lowest
      first) / at random (mean of 20 orders, ``seed``), p in 0, 20, 40; ``fnmr_oracle_<p>`` discarding by the true
      severity (the best a quality score could do with this knowledge);
    - ``edc_auc`` / ``edc_auc_random`` / ``edc_auc_oracle``: the areas under those curves over 0..80 % discarded;
    - ``tar``: 1 - FNMR with nothing discarded (TAR at FMR); ``ver_acc``: the best-threshold verification
      accuracy over genuine and an equal number of impostor pairs."""
    from vitlab.data.faces import faces, faces_verification

    if not isinstance(model, ViTFIQA):
        raise TypeError(f"measure: model must be a ViTFIQA, got {type(model).__name__}")
    seed = check_int(seed, "seed", "measure", low=0)
    images, ids, severity, _ = faces_verification(seed=DATA_SEED, img_size=model.patch_embed.img_size[0]
                                                  if isinstance(model.patch_embed.img_size, tuple)
                                                  else model.patch_embed.img_size)
    emb, q = predict(model, images)
    scores, genuine, a, b = verification_pairs(emb, ids)
    pq = torch.minimum(q[a], q[b])
    curve = edc(scores, genuine, pq)
    rnd = random_edc(scores, genuine, seed=seed)
    oracle = edc(scores, genuine, torch.minimum(-severity[a], -severity[b]))
    test = faces("test", seed=DATA_SEED)
    _, q_seen = predict(model, test.images)
    out = {"rho_q_sev": spearman(q, severity), "rho_q_sev_seen": spearman(q_seen, test.severity),
           "edc_auc": edc_auc(curve), "edc_auc_random": edc_auc(rnd), "edc_auc_oracle": edc_auc(oracle),
           "tar": 1 - float(curve[0])}
    for p in (0, 20, 40):
        i = DISCARD.index(p / 100)
        out[f"fnmr_{p}"], out[f"fnmr_random_{p}"], out[f"fnmr_oracle_{p}"] = \
            float(curve[i]), float(rnd[i]), float(oracle[i])
    gen_s = scores[genuine]
    g = torch.Generator().manual_seed(seed)
    imp = scores[~genuine][torch.randperm(int((~genuine).sum()), generator=g)[:len(gen_s)]]
    thr = torch.cat([gen_s, imp]).sort().values
    acc = ((gen_s[None] > thr[:, None]).double().mean(1) + (imp[None] <= thr[:, None]).double().mean(1)) / 2
    out["ver_acc"] = float(acc.max())
    return out


# ----------------------------------------------------------------------------------------------- zoo entries
def fiqa_objective(s: float = SCALE, m: float = MARGIN, alpha: float = ALPHA, beta: float = BETA):
    """The zoo objective ``"vitfiqa"``: ``fiqa_step``'s loss, classifying (closed-set identification on val each
    epoch: the val curve and ``plateau_gain``), plus ``test_rho_q_sev`` (Spearman of quality and severity on the
    seen-identity test split)."""
    from vitlab import zoo

    def metrics(model, train, val, test):
        out = {}
        sev = getattr(test, "severity", None)
        if sev is not None and isinstance(model, ViTFIQA):
            _, q = predict(model, test.images)
            out["test_rho_q_sev"] = spearman(q, sev)
        return out

    return zoo.Objective(step_fn=fiqa_step(s, m, alpha, beta), metrics=metrics, classifies=True)


def model_name(mode: str) -> str:
    """The registry model of a mode: ``ch6_vitfiqa_<mode>``."""
    check_choice(mode, MODES, "mode", "model_name")
    return f"ch6_vitfiqa_{mode}"


def entry_name(mode: str, seed: int) -> str:
    """The zoo entry ``ch6_vitfiqa_<mode>_faces_s<seed>``."""
    model_name(mode)
    if isinstance(seed, bool) or seed not in SEEDS:
        raise ValueError(f"entry_name: seed must be one of {SEEDS}, got {seed!r}")
    return f"ch6_vitfiqa_{mode}_faces_s{seed}"


def _register() -> None:
    from vitlab import zoo

    if model_name("token") in MODELS:  # re-imported
        return
    zoo.register_objective("vitfiqa", fiqa_objective)
    for mode in MODES:
        register_model(model_name(mode), ViTFIQA, img_size=32, patch_size=4, in_chans=1, num_classes=64,
                       embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, qkv_bias=False, drop_path_rate=0.1,
                       mode=mode, mask_ratio=MASK_RATIO)
        for seed in SEEDS:
            zoo.register(entry_name(mode, seed), zoo.Recipe(
                model=model_name(mode), data="faces", data_kwargs=dict(img_size=32), train_kwargs=dict(n=N_TRAIN),
                fit=dict(FIT), seed=seed,
                data_seed=DATA_SEED, per_profile={p: dict(steps=n, max_train=None) for p, n in STEPS.items()},
                shares={"smoke": "cpu"}, objective="vitfiqa",
                objective_kwargs=dict(s=SCALE, m=MARGIN, alpha=ALPHA, beta=BETA)))


_register()
