"""LLaVA-SP: Enhancing Visual Representation with Visual Spatial Tokens for MLLMs (H. Lou et al. 2025,
arXiv:2507.00505; official code: CnFaker/LLaVA-SP, a LLaVA-1.5 fork: ``llava/model/llava_arch.py``
(``LlavaMetaModel.__init__`` builds the layers, ``LlavaMetaForCausalLM.encode_images`` runs them; the variant is the
hard-coded local ``version = 'pooling'`` there, branches ``conv336_pooling_sfe`` and ``conv336_cropping_sfe_dfi``),
``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.feature_select``: the nested crops, chosen by
the local ``a = '336_pooling'``; the cropping variant needs ``'336_6_tokens'``)); our own code, on the course ViT
and ``vitlab.vlm.TinyVLM``.

The idea: a LLaVA projector maps each ViT patch token to the LM on its own, so the LM gets no token that summarises
a *region*. LLaVA-SP adds six "visual spatial tokens", each a full-kernel convolution over a region of the patch map
F [g, g, Dv], and puts them in front of the usual MLP-projected patch tokens:

    visual tokens = [ head(SFE(F)) (6 tokens) ; mlp(patch tokens) (g*g tokens) ]       (the LM reads both)

**Pooling SFE** ("abstract -> specific"; the code default). Token k = Conv2d(Dv -> d, kernel s_k, no bias) applied to
AdaptiveAvgPool2d(s_k)(F), for s_k = 4, 8, 12, 16, 20 on the 24 x 24 CLIP-L/336 map, and token 6 the same conv on F
itself (s = 24): a kernel as large as its input gives one output, so each token is a learned weighted sum over a
coarse-to-fine summary of the whole image. head = GELU -> Linear(d -> D_lm, no bias). No cross-attention on this
code path (the abstract's DFI is only in the cropping branch).

**Cropping SFE** ("centre -> global"). Six nested centred crops F[10-i : 14+i, 10-i : 14+i], i = 0, 2, ..., 10, of
sides 4, 8, ..., 24; crop k -> Conv2d(Dv -> d, kernel = its side, no bias) -> one token c_k.

**DFI** (detail feature integrator; cropping variant only). conv_CM = Conv2d(Dv -> d, kernel 16, stride 2, no bias)
on the full map gives 5 x 5 = 25 detail tokens; the six crop tokens attend to them, one head:

    Q = Lin(LN(c)),  K = Lin(LN(m)),  V = Lin(LN(m)),  a = softmax(Q K^T / sqrt(d)) V,
    SP tokens = Lin(GELU([c ; a]))      (Lin: 2d -> D_lm, with bias)

    from vitlab import vlm
    from vitlab.methods.vision_language import llava_sp as sp
    vit = VisionTransformer(img_size=48, patch_size=4, num_classes=0, embed_dim=64, depth=4)     # a 12 x 12 grid
    proj = sp.SpatialProjector(64, 64, grid=12, variant="pooling")     # or "cropping" (with DFI) / dfi=False
    model = vlm.TinyVLM(vit, proj, vlm.TinyLM(len(tok), dim=64, max_len=192))   # 6 + 144 visual tokens + text
    sp.nested_crops(12)                     # [(5, 7), (4, 8), (3, 9), (2, 10), (1, 11), (0, 12)]

TinyVLM needs no change: its ``visual_prefix`` is ``projector(encode_images(images))`` and neither it, the answer
loss, generation nor the KV cache assumes one visual token per patch. Only ``TinyLM.max_len`` must hold the 6 extra
tokens (its default 128 is too short for a 12 x 12 grid: 150 visual tokens before any text).

Our reading, and every deviation from the official code, named:
- Scale. The official map is 24 x 24 (CLIP-L/14 at 336 px); the course's is a ``grid`` x ``grid`` ViT patch grid,
  12 x 12 by default in the lesson (48 px, patch 4), exactly half. Every size scales with the grid: crop and pooling
  sides are ``grid * k / 6`` for k = 1..6 (2, 4, ..., 12 on 12; the official 4, 8, ..., 24 on 24), and conv_CM's
  kernel and stride are ``2 grid / 3`` and ``grid / 12`` (8 and 1 on 12, which keeps the official's 5 x 5 = 25
  overlapping windows at the same relative offsets; the curriculum's sketch said kernel 8, stride 2, i.e. 3 x 3
  windows, so pass ``cm_stride=2`` for that). ``grid=24`` gives the official numbers exactly (sides, crop indices,
  conv_CM 16/2), which the tests check against the official code run outside the repo.
- The official crop loop, ``for i in range(0, l // 2, 2)``, only yields six crops at l = 24 (three at l = 12); we
  write the same crops as explicit arithmetic (side s: rows and columns ``(g - s) / 2 : (g + s) / 2``), so they need
  ``g - s`` even: the cropping variant needs ``grid`` a multiple of 12 for its six default sides (or pass ``sides``).
  The pooling variant accepts any grid >= 6: its default sides are ``round(grid * k / 6)``.
- Widths: the official d = 512 is half of CLIP-L's 1024; ours is ``sp_dim``, default ``vit_dim // 2`` (at least 1).
  D_lm is the LM width (official 4096).
- Which features. The official takes both the crops and the patch tokens from CLIP's ``hidden_states[-2]`` (the
  penultimate layer, CLS dropped); here both come from whatever ``TinyVLM.encode_images`` gives (the ViT's
  ``forward_features``: the last block after the final norm, prefix tokens dropped). The projector is handed tokens
  [B, grid*grid, Dv] in row-major order and folds them into the map as the official ``reshape(B, l, l, D)`` does;
  a TinyVLM built with ``use_cls=True`` hands it more tokens than that, which is refused.
- The patch path is ``vitlab.vlm.VisionProjector(vit_dim, lm_dim, "mlp")`` (LLaVA-1.5's ``mlp2x_gelu``, the official
  ``mm_projector``); ``patch_projector="linear"`` is offered for the course's linear baseline.
- The heads follow each official branch: pooling and crop-without-DFI (the official ``conv336`` branch):
  GELU -> Linear(d -> D_lm, bias=False); crop + DFI: GELU -> Linear(2d -> D_lm) *with* bias (as the official).
  ``dfi=True`` with the pooling variant is refused (no such official branch).
- The official's ``nan_to_num`` calls on the crop tokens, the conv_CM tokens and the attention logits (guards for
  its fp16/bf16 7B training) are left out: a NaN here is a bug to see, not to zero.
- Initialisation: PyTorch's defaults for Conv2d, Linear and LayerNorm, as the official leaves them.
- Not here: the LLaVA training recipe (pre-training the projector, then LoRA fine-tuning of the LLM with a frozen
  vision tower); the lesson trains TinyVLM with ``vitlab.vlm.train_vlm``'s recipe (the zoo objective "llava_sp_qa").

The lesson's zoo (end of this file): the dataset ``"vlm_caption_scenes"`` (``vitlab.data``,
labels = scene index), the objectives ``"vlm_patch_attr"`` (the tower's
pretraining: every patch token names the (colour, shape) covering its patch, ``patch_labels``) and ``"llava_sp_qa"``
(answer-only cross-entropy, a val curve per question kind), the entry ``ENCODER_ENTRY`` (one pretrained tower) and
``ch7_llava_sp_{mlp,pooling}_s{0,1,2}`` (``STEPS``: projector + LM trained on the frozen tower, same lr, data and
seeds) plus ``..._long_s0`` (``LONG_STEPS``). Deviations of the lesson from the paper's setup, named: the tower is a
course ViT pretrained by dense patch classification on the training scenes, not CLIP (no CLIP at 48 px in the course;
a VLM trained jointly from scratch stayed at the blind prior in a pilot); the LM is a 2 x 64 TinyLM trained fully
from scratch with the projector, not a pretrained LLM with LoRA; there is no separate projector pre-training stage;
questions are templated (``caption_scenes``), not instruction data.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_model, check_ndim
from vitlab.vlm.projector import VisionProjector
from vitlab.vlm.train import seeded_entry

__all__ = ["NUM_SP_TOKENS", "pool_sides", "crop_sides", "nested_crops", "cross_attend", "PoolingSFE", "CroppingSFE",
           "DFI", "SpatialProjector", "ARMS", "SEEDS", "DATA_SEED", "IMG_SIZE", "VIT", "LM", "STEPS", "LONG_STEPS",
           "FIT", "EVAL_EVERY", "VAL_N", "KINDS", "ENCODER_ENTRY", "ENCODER_STEPS", "ENCODER_FIT",
           "NUM_PATCH_CLASSES", "patch_labels", "PatchAttributeEncoder", "encoder_model", "patch_accuracy",
           "patch_objective", "first_token_macs", "vlm_model", "answer_hits", "qa_accuracy",
           "prior_accuracy", "measure", "qa_objective", "model_name", "entry_name"]

NUM_SP_TOKENS = 6  # the paper's six spatial tokens


def pool_sides(grid: int, num: int = NUM_SP_TOKENS) -> tuple[int, ...]:
    """The pooling variant's sizes ``round(grid * k / num)``, k = 1..num (official: 4, 8, ..., 24 at grid 24)."""
    fn = "pool_sides"
    num = check_int(num, "num", fn)
    grid = check_int(grid, "grid", fn)
    if grid < num:
        raise ValueError(f"{fn}: grid={grid} is too small for {num} distinct pooling sizes (needs grid >= {num})")
    return tuple(int(math.floor(grid * k / num + 0.5)) for k in range(1, num + 1))


def crop_sides(grid: int, num: int = NUM_SP_TOKENS) -> tuple[int, ...]:
    """The cropping variant's sides ``grid * k / num``, k = 1..num, for nested crops centred on the grid (official:
    4, 8, ..., 24 at grid 24). Each ``grid - side`` must be even, so ``grid`` must be a multiple of ``2 num``."""
    fn = "crop_sides"
    num = check_int(num, "num", fn)
    grid = check_int(grid, "grid", fn)
    if grid % (2 * num):
        raise ValueError(f"{fn}: grid={grid} cannot hold {num} nested centred crops of equal steps: it must be a "
                         f"multiple of {2 * num} (12 or 24 for six crops), or pass sides= explicitly")
    step = grid // num
    return tuple(step * k for k in range(1, num + 1))


def _check_sides(sides, grid: int, fn: str, *, centred: bool) -> tuple[int, ...]:
    if not isinstance(sides, (tuple, list)) or not sides:
        raise TypeError(f"{fn}: sides must be a non-empty tuple of ints, got {sides!r}")
    sides = tuple(check_int(s, "sides", fn, high=grid) for s in sides)
    if any(b <= a for a, b in zip(sides, sides[1:])):
        raise ValueError(f"{fn}: sides must be strictly increasing, got {sides}")
    if centred and any((grid - s) % 2 for s in sides):
        raise ValueError(f"{fn}: every side must have the parity of grid={grid} (a crop centred on the grid), "
                         f"got sides={sides}")
    return sides


def nested_crops(grid: int, sides=None) -> list[tuple[int, int]]:
    """(start, stop) of each nested centred crop, the same for rows and columns: side s covers cells
    ``(grid - s) / 2 <= i < (grid + s) / 2``. At grid 24 these are the official ``F[10-i : 14+i]``, i = 0, 2, ..., 10."""
    fn = "nested_crops"
    grid = check_int(grid, "grid", fn)
    sides = crop_sides(grid) if sides is None else _check_sides(sides, grid, fn, centred=True)
    return [((grid - s) // 2, (grid + s) // 2) for s in sides]


def cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-head attention of queries [B, M, d] over keys and values [B, N, d]: softmax(q k^T / sqrt(d)) v, with d the
    key width (the official divides the keys by ``embed_key.shape[-1] ** 0.5``)."""
    fn = "cross_attend"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_ndim(t, 3, name, fn)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q [B, M, d], k and v [B, N, d] expected, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    att = q @ (k.transpose(-1, -2) / k.shape[-1] ** 0.5)
    return att.softmax(-1) @ v


def _check_map(x, vit_dim: int, grid: int, fn: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 4 or tuple(x.shape[1:]) != (vit_dim, grid, grid):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{fn}: fmap must be a feature map [B, vit_dim={vit_dim}, grid={grid}, grid={grid}], "
                         f"got {shape}")
    return x


class PoolingSFE(nn.Module):
    """The pooling variant's spatial feature extractor: fmap [B, Dv, g, g] -> [B, len(sides), d]. Token k is
    Conv2d(Dv -> d, kernel s_k, no bias) on AdaptiveAvgPool2d(s_k)(fmap) (no pooling when s_k = g)."""

    def __init__(self, vit_dim: int, sp_dim: int, grid: int, sides=None):
        super().__init__()
        fn = "PoolingSFE"
        self.vit_dim, self.sp_dim = check_int(vit_dim, "vit_dim", fn), check_int(sp_dim, "sp_dim", fn)
        self.grid = check_int(grid, "grid", fn)
        self.sides = pool_sides(grid) if sides is None else _check_sides(sides, grid, fn, centred=False)
        self.convs = nn.ModuleList(nn.Conv2d(vit_dim, sp_dim, s, bias=False) for s in self.sides)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        _check_map(fmap, self.vit_dim, self.grid, "PoolingSFE")
        out = []
        for s, conv in zip(self.sides, self.convs):
            x = fmap if s == self.grid else F.adaptive_avg_pool2d(fmap, s)
            out.append(conv(x).flatten(1))  # [B, d, 1, 1] -> [B, d]
        return torch.stack(out, dim=1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, sides={self.sides}"


class CroppingSFE(nn.Module):
    """The cropping variant's spatial feature extractor: fmap [B, Dv, g, g] -> [B, len(sides), d]. Token k is
    Conv2d(Dv -> d, kernel s_k, no bias) on the centred crop of side s_k (``nested_crops``)."""

    def __init__(self, vit_dim: int, sp_dim: int, grid: int, sides=None):
        super().__init__()
        fn = "CroppingSFE"
        self.vit_dim, self.sp_dim = check_int(vit_dim, "vit_dim", fn), check_int(sp_dim, "sp_dim", fn)
        self.grid = check_int(grid, "grid", fn)
        self.sides = crop_sides(grid) if sides is None else _check_sides(sides, grid, fn, centred=True)
        self.crops = nested_crops(grid, self.sides)
        self.convs = nn.ModuleList(nn.Conv2d(vit_dim, sp_dim, s, bias=False) for s in self.sides)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        _check_map(fmap, self.vit_dim, self.grid, "CroppingSFE")
        return torch.stack([conv(fmap[:, :, a:b, a:b]).flatten(1) for (a, b), conv in zip(self.crops, self.convs)],
                           dim=1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, sides={self.sides}"


class DFI(nn.Module):
    """Detail feature integrator: crop tokens c [B, M, d] attend (one head) to conv_CM(fmap)'s detail tokens;
    returns [c ; attention output] [B, M, 2d]."""

    def __init__(self, vit_dim: int, sp_dim: int, grid: int, cm_kernel: int | None = None,
                 cm_stride: int | None = None):
        super().__init__()
        fn = "DFI"
        self.vit_dim, self.sp_dim = check_int(vit_dim, "vit_dim", fn), check_int(sp_dim, "sp_dim", fn)
        self.grid = check_int(grid, "grid", fn)
        cm_kernel = max(1, round(2 * grid / 3)) if cm_kernel is None else cm_kernel
        cm_stride = max(1, grid // 12) if cm_stride is None else cm_stride
        self.cm_kernel = check_int(cm_kernel, "cm_kernel", fn, high=grid)
        self.cm_stride = check_int(cm_stride, "cm_stride", fn)
        self.conv_cm = nn.Conv2d(vit_dim, sp_dim, self.cm_kernel, stride=self.cm_stride, bias=False)
        self.q = nn.Sequential(nn.LayerNorm(sp_dim), nn.Linear(sp_dim, sp_dim))
        self.k = nn.Sequential(nn.LayerNorm(sp_dim), nn.Linear(sp_dim, sp_dim))
        self.v = nn.Sequential(nn.LayerNorm(sp_dim), nn.Linear(sp_dim, sp_dim))

    @property
    def num_detail_tokens(self) -> int:
        return ((self.grid - self.cm_kernel) // self.cm_stride + 1) ** 2

    def forward(self, c: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
        _check_map(fmap, self.vit_dim, self.grid, "DFI")
        if not torch.is_tensor(c) or c.ndim != 3 or c.shape[0] != fmap.shape[0] or c.shape[-1] != self.sp_dim:
            shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise ValueError(f"DFI: c must be crop tokens [B={fmap.shape[0]}, M, sp_dim={self.sp_dim}], got {shape}")
        m = self.conv_cm(fmap).flatten(2).transpose(1, 2)  # [B, d, h, w] -> [B, h*w, d], as the official reshape
        return torch.cat([c, cross_attend(self.q(c), self.k(m), self.v(m))], dim=-1)

    def extra_repr(self) -> str:
        return f"conv_CM kernel={self.cm_kernel}, stride={self.cm_stride} -> {self.num_detail_tokens} detail tokens"


class SpatialProjector(nn.Module):
    """A TinyVLM projector: patch tokens [B, grid*grid, vit_dim] -> [B, S + grid*grid, lm_dim], the S spatial tokens
    (6 by default) first, then the MLP-projected patch tokens.

    variant: "pooling" (the official default) or "cropping"; dfi: cross-attention to conv_CM tokens (cropping only;
    default True for cropping, as the official cropping branch). sides: the pooling sizes or crop sides (default
    scaled from the official 4..24 on 24, see the module notes). sp_dim: the convolutions' width (default
    vit_dim // 2, official 1024 -> 512). cm_kernel, cm_stride: conv_CM's (default 2 grid / 3 and grid / 12).
    """

    def __init__(self, vit_dim: int, lm_dim: int, grid: int, variant: str = "pooling", *, dfi: bool | None = None,
                 sides=None, sp_dim: int | None = None, cm_kernel: int | None = None, cm_stride: int | None = None,
                 patch_projector: str = "mlp"):
        super().__init__()
        fn = "SpatialProjector"
        self.vit_dim = check_int(vit_dim, "vit_dim", fn)
        self.lm_dim = check_int(lm_dim, "lm_dim", fn)
        self.grid = check_int(grid, "grid", fn)
        self.variant = check_choice(variant, ("pooling", "cropping"), "variant", fn)
        if dfi is None:
            dfi = variant == "cropping"
        if not isinstance(dfi, bool):
            raise TypeError(f"{fn}: dfi must be a bool or None, got {type(dfi).__name__} ({dfi!r})")
        if dfi and variant == "pooling":
            raise ValueError(f"{fn}: dfi=True needs variant='cropping' (the official pooling branch has no DFI)")
        self.sp_dim = check_int(max(1, vit_dim // 2) if sp_dim is None else sp_dim, "sp_dim", fn)
        if variant == "pooling":
            if sides is None and grid < NUM_SP_TOKENS:
                raise ValueError(f"{fn}: grid={grid} is too small for {NUM_SP_TOKENS} pooling sizes (needs grid >= "
                                 f"{NUM_SP_TOKENS}), or pass sides=")
            self.sfe = PoolingSFE(vit_dim, self.sp_dim, grid, sides)
        else:
            if sides is None and grid % (2 * NUM_SP_TOKENS):
                raise ValueError(f"{fn}: grid={grid} cannot hold {NUM_SP_TOKENS} nested centred crops of equal "
                                 f"steps: it must be a multiple of {2 * NUM_SP_TOKENS} (e.g. 12 or 24), or pass sides=")
            self.sfe = CroppingSFE(vit_dim, self.sp_dim, grid, sides)
        self.dfi = DFI(vit_dim, self.sp_dim, grid, cm_kernel, cm_stride) if dfi else None
        self.head = nn.Sequential(nn.GELU(), nn.Linear(2 * self.sp_dim, lm_dim) if dfi
                                  else nn.Linear(self.sp_dim, lm_dim, bias=False))
        self.patch_proj = VisionProjector(vit_dim, lm_dim, patch_projector)

    @property
    def num_sp_tokens(self) -> int:
        return len(self.sfe.sides)

    def _check_tokens(self, x) -> torch.Tensor:
        want = (self.grid * self.grid, self.vit_dim)
        if not torch.is_tensor(x) or x.ndim != 3 or tuple(x.shape[1:]) != want:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"SpatialProjector: x must be patch tokens [B, grid*grid={want[0]}, vit_dim={want[1]}] "
                             f"(no CLS: build TinyVLM with use_cls=False), got {shape}")
        return x

    def fmap(self, x: torch.Tensor) -> torch.Tensor:
        """Row-major tokens [B, g*g, Dv] -> the map [B, Dv, g, g] (official: reshape(B, l, l, D).permute(0, 3, 1, 2))."""
        self._check_tokens(x)
        return x.transpose(1, 2).reshape(x.shape[0], self.vit_dim, self.grid, self.grid)

    def spatial_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial tokens alone: [B, S, lm_dim]."""
        fmap = self.fmap(x)
        c = self.sfe(fmap)
        if self.dfi is not None:
            c = self.dfi(c, fmap)
        return self.head(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.spatial_tokens(x), self.patch_proj(x)], dim=1)

    def extra_repr(self) -> str:
        return (f"{self.variant}{' + DFI' if self.dfi is not None else ''}: grid={self.grid}, "
                f"{self.num_sp_tokens} spatial tokens, {self.vit_dim} -> {self.sp_dim} -> {self.lm_dim}")


# ----------------------------------------------------------------------------------------------- the lesson's zoo
# TinyVLMs on ``vitlab.vlm.caption_scenes`` at 48 px, answering where a named shape is ("where is the circle" ->
# left / right / top / bottom / centre: ``KINDS``, the paper's spatial question at its simplest). Every arm has the same
# vision encoder (a course ViT, patch 4: a 12 x 12 grid, ``VIT``), the same TinyLM (``LM``; max_len 192 holds 6 + 144
# visual tokens and the text) and the same MLP patch projector; the arms differ only in the spatial tokens: "mlp" (the
# control: LLaVA-1.5's projector alone), "pooling" (+ the six pooling tokens, the official default), "cropping" (+ the
# six crop tokens with DFI).
#
# As in LLaVA, the vision tower is pretrained and frozen; only the projector and the LM train on the questions. The
# course has no CLIP at 48 px, and a VLM trained jointly from scratch stayed at the blind prior (measured: 800 steps,
# batch 32, both arms: every kind at the answer-frequency baseline), so the tower is pretrained here by dense
# supervision on the same training scenes: each patch token classifies the (colour, shape) of the object covering
# most of its patch, or background (``patch_labels``; the objective "vlm_patch_attr"; entry ``ENCODER_ENTRY``). It
# knows what is where, patch by patch; whether the LM can use that, and whether six spatial tokens help it, is the
# experiment. Same steps, lr, data (the same 4,000 scenes, ``DATA_SEED``), encoder and seeds (projector and LM
# weights, batch order, question draws) for every arm. The objective "llava_sp_qa" (none existed in the zoo) logs a val
# curve of answer accuracy.
#
# Why only position questions. Pilots with this 2 x 64 TinyLM (seed 0, the same recipe): trained on all seven kinds,
# position stayed at the blind baseline (~20 %) in some runs and reached 45 % in others at 2,400 steps, and a 4,800-step
# run learned counting instead; a dim-128 LM did no better at 1,000 steps; trained on position + relation, relation never
# left its baseline ("nothing" is the frequent answer) and position reached ~45-50 % at 1,500 steps; trained on position
# alone, both arms passed 85 % by 750 steps and levelled off near 91 %. A tiny LM learns one skill at a time here,
# so a per-kind comparison on the mixed task measured which skill a run happened to learn first, not the projector.
ARMS = ("mlp", "pooling")
SEEDS = (0, 1, 2)
DATA_SEED = 0
IMG_SIZE = 48
VIT = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
LM = dict(dim=64, depth=2, num_heads=2, max_len=192)
ENCODER_ENTRY = "ch7_llava_sp_encoder"
ENCODER_STEPS = {"cpu": 1000, "gpu": 10000}
ENCODER_FIT = dict(lr=2e-3, weight_decay=0.05, warmup=0.1, batch_size=32, grad_clip=1.0, label_smoothing=0.0)
STEPS = {"cpu": 1500, "gpu": 15000}  # smoke shares cpu's checkpoints (committed)
LONG_STEPS = {"cpu": 3000, "gpu": 30000}  # plateau evidence: seed 0 of each arm trained twice as long
FIT = dict(lr=3e-3, weight_decay=0.05, warmup=0.1, batch_size=32, grad_clip=1.0, label_smoothing=0.0,
           trainable=("projector.", "lm."))  # the vision tower stays frozen (LLaVA's recipe)
EVAL_EVERY = 100  # val answer accuracy every EVAL_EVERY steps: the plateau curve
VAL_N = 200  # val scenes in the curve
KINDS = ("position",)  # the questions trained and measured: "where is the <shape>"
NUM_PATCH_CLASSES = 17  # background + 4 colours x 4 shapes


def patch_labels(data, patch_size: int = VIT["patch_size"]) -> torch.Tensor:
    """[N, g, g] int64 per-patch targets of ``data`` (``CaptionScenes``): 0 for background, else
    ``1 + 4 * colour + shape`` (indices into ``vlm.COLOURS`` / ``vlm.SHAPES``) of the class covering most pixels of
    the patch (background included; ties go to the lower class)."""
    from vitlab.vlm import COLOURS, SHAPES, CaptionScenes

    fn = "patch_labels"
    if not isinstance(data, CaptionScenes):
        raise TypeError(f"{fn}: data must be CaptionScenes (vitlab.vlm.caption_scenes), got {type(data).__name__}")
    patch_size = check_int(patch_size, "patch_size", fn)
    if data.masks.shape[-1] % patch_size:
        raise ValueError(f"{fn}: patch_size={patch_size} does not divide the image size {data.masks.shape[-1]}")
    table = torch.zeros(len(data), 4, dtype=torch.long)  # mask value k -> class of object k - 1
    for i, objs in enumerate(data.objects):
        for k, o in enumerate(objs):
            table[i, k + 1] = 1 + len(SHAPES) * COLOURS.index(o.colour) + SHAPES.index(o.shape)
    cls = table.gather(1, data.masks.long().flatten(1)).view(data.masks.shape)
    onehot = F.one_hot(cls, NUM_PATCH_CLASSES).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch_size).argmax(1)


class PatchAttributeEncoder(nn.Module):
    """The pretraining model: a course ViT (``num_classes=0``) whose every patch token a linear head classifies into
    ``NUM_PATCH_CLASSES``: forward(images) -> logits [B, N, classes]. ``load_into(vlm)`` hands its ViT to a TinyVLM
    (how ``vitlab.zoo`` starts an entry from a pretraining)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        check_model(vit, "PatchAttributeEncoder")
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, NUM_PATCH_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(images)[:, self.vit.num_prefix_tokens:])

    def load_into(self, model: nn.Module) -> None:
        enc = getattr(model, "vision_encoder", None)
        if not isinstance(enc, nn.Module):
            raise TypeError(f"PatchAttributeEncoder.load_into: model must be a TinyVLM, got {type(model).__name__}")
        enc.load_state_dict(self.vit.state_dict(), strict=True)


def encoder_model(img_size: int = IMG_SIZE, in_chans: int = 3, num_classes: int = 0, *, vit: dict | None = None):
    """``PatchAttributeEncoder`` around the lesson's course ViT (``VIT`` with overrides ``vit``). ``num_classes`` is
    ignored (the zoo passes the dataset's)."""
    from vitlab.models import VisionTransformer

    fn = "encoder_model"
    if vit is not None and not isinstance(vit, dict):
        raise TypeError(f"{fn}: vit must be a dict of overrides or None, got {type(vit).__name__}")
    return PatchAttributeEncoder(VisionTransformer(img_size=check_int(img_size, "img_size", fn),
                                                   in_chans=check_int(in_chans, "in_chans", fn), num_classes=0,
                                                   **(VIT | (vit or {}))))


@torch.no_grad()
def patch_accuracy(model, data, batch_size: int = 256) -> dict:
    """A ``PatchAttributeEncoder``'s per-patch accuracy on ``data`` (``CaptionScenes``): "patch" over all patches,
    "object" over the patches whose target is an object (background is 95 % of the patches)."""
    fn = "patch_accuracy"
    if not isinstance(model, PatchAttributeEncoder):
        raise TypeError(f"{fn}: model must be a PatchAttributeEncoder, got {type(model).__name__}")
    batch_size = check_int(batch_size, "batch_size", fn)
    y = patch_labels(data, model.vit.patch_embed.patch_size).flatten(1)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    pred = torch.cat([model(data.images[i:i + batch_size].to(device)).argmax(-1).cpu()
                      for i in range(0, len(data), batch_size)])
    model.train(was)
    obj = y > 0
    return {"patch": float((pred == y).float().mean()), "object": float((pred[obj] == y[obj]).float().mean())}


def patch_objective(data_seed: int = DATA_SEED, eval_every: int = EVAL_EVERY, val_n: int = VAL_N):
    """The zoo objective ``"vlm_patch_attr"``: cross-entropy of every patch token's class (``patch_labels``; the
    dataset's labels are scene indices into ``caption_scenes("train", seed=data_seed)``). Every ``eval_every`` steps
    it logs ``patch_accuracy`` on the first ``val_n`` val scenes; the checkpoint stores it on val and test."""
    from vitlab import zoo
    from vitlab.vlm import caption_scenes

    fn = "patch_objective"
    data_seed = check_int(data_seed, "data_seed", fn, low=0)
    eval_every = check_int(eval_every, "eval_every", fn)
    val_n = check_int(val_n, "val_n", fn)
    state = {"step": 0, "curve": []}

    def val_point(net, size):
        if "val" not in state:
            state["val"] = caption_scenes("val", seed=data_seed, img_size=size, n=val_n)
        state["curve"].append((state["step"], patch_accuracy(net, state["val"])["object"]))

    def step_fn(net, images, idx):
        if "y" not in state:
            cs = caption_scenes("train", seed=data_seed, img_size=images.shape[-1])
            state["y"] = patch_labels(cs, _unwrap(net).vit.patch_embed.patch_size)
        if state["step"] % eval_every == 0:
            val_point(_unwrap(net), images.shape[-1])
        state["step"] += 1
        logits = net(images)
        return F.cross_entropy(logits.flatten(0, 1).float(), state["y"][idx.cpu()].flatten().to(images.device)), None

    def metrics(model, train, val, test):
        size = train.images.shape[-1]
        val_point(model, size)
        v, t = (patch_accuracy(model, caption_scenes(split, seed=data_seed, img_size=size))
                for split in ("val", "test"))
        return {"val_patch_acc": v["patch"], "val_object_acc": v["object"], "test_patch_acc": t["patch"],
                "test_object_acc": t["object"], "val_curve_step": [c[0] for c in state["curve"]],
                "val_curve_object": [c[1] for c in state["curve"]]}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def vlm_model(projector: str = "pooling", img_size: int = IMG_SIZE, in_chans: int = 3, num_classes: int = 0, *,
              vit: dict | None = None, lm: dict | None = None):
    """The lesson's TinyVLM: a course ViT (``VIT``, no classifier) -> ``projector`` -> TinyLM (``LM``) over the
    ``WordTokenizer``'s vocabulary. projector: "mlp" (``VisionProjector``, the control), "pooling" or "cropping"
    (``SpatialProjector`` of that variant; cropping with DFI, as the official cropping branch). ``vit`` / ``lm``
    override entries of ``VIT`` / ``LM``. ``num_classes`` is ignored (the zoo passes the dataset's; a VLM answers in
    words)."""
    from vitlab.models import VisionTransformer
    from vitlab.vlm import TinyLM, TinyVLM, WordTokenizer

    fn = "vlm_model"
    check_choice(projector, ("mlp", "pooling", "cropping"), "projector", fn)
    img_size = check_int(img_size, "img_size", fn)
    in_chans = check_int(in_chans, "in_chans", fn)
    for name, d in (("vit", vit), ("lm", lm)):
        if d is not None and not isinstance(d, dict):
            raise TypeError(f"{fn}: {name} must be a dict of overrides or None, got {type(d).__name__}")
    vcfg, lcfg = VIT | (vit or {}), LM | (lm or {})
    encoder = VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=0, **vcfg)
    grid = encoder.patch_embed.grid_size[0]
    dv, dl = vcfg["embed_dim"], lcfg["dim"]
    proj = VisionProjector(dv, dl, "mlp") if projector == "mlp" else SpatialProjector(dv, dl, grid, projector)
    lm_ = TinyLM(len(WordTokenizer()), **lcfg)
    need = (grid * grid + (0 if projector == "mlp" else NUM_SP_TOKENS)) + 16  # visual tokens + the longest QA text
    if lm_.max_len < need:
        raise ValueError(f"{fn}: lm max_len={lm_.max_len} cannot hold {need - 16} visual tokens and a question "
                         f"(needs >= {need})")
    return TinyVLM(encoder, proj, lm_)


def _check_qa_args(model, data, batch_size, fn: str) -> int:
    from vitlab.vlm import CaptionScenes, TinyVLM

    if not isinstance(model, TinyVLM):
        raise TypeError(f"{fn}: model must be a TinyVLM, got {type(model).__name__}")
    if not isinstance(data, CaptionScenes):
        raise TypeError(f"{fn}: data must be CaptionScenes (vitlab.vlm.caption_scenes), got {type(data).__name__}")
    return check_int(batch_size, "batch_size", fn)


@torch.no_grad()
def answer_hits(model, data, *, kinds=None, batch_size: int = 256) -> torch.Tensor:
    """Whether a TinyVLM answers each question of ``data.items(kinds)`` (``CaptionScenes``) right: a bool tensor [Q]
    in that order. Teacher-forced: a question counts as right when the answer word and then <eos> are each the
    argmax, which is exactly when greedy decoding (``vlm.answer_accuracy``) returns the answer; each scene is encoded
    once for all its questions."""
    from vitlab.vlm import WordTokenizer, answer_loss, qa_tensors

    batch_size = _check_qa_args(model, data, batch_size, "answer_hits")
    scene, text, labels = qa_tensors(data, WordTokenizer(), kinds)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    prefix = torch.cat([model.visual_prefix(data.images[i:i + batch_size].to(device))
                        for i in range(0, len(data), batch_size)])
    hits = []
    for i in range(0, len(scene), batch_size):
        sl = slice(i, i + batch_size)
        logits = model.lm(text[sl].to(device), prefix_embeds=prefix[scene[sl].to(device)])
        hits.append(answer_loss(logits, labels[sl].to(device), return_correct=True)[1].cpu())
    model.train(was)
    return torch.cat(hits)


def qa_accuracy(model, data, *, kinds=None, by: str = "kind", batch_size: int = 256) -> dict:
    """Exact-match answer accuracy (``answer_hits``) of a TinyVLM on the questions of ``data`` (``CaptionScenes``),
    only ``kinds`` if given, grouped ``by`` question "kind", by the true "answer" or by the number of "objects" in
    the scene: {group: acc, ..., "all": every question asked}."""
    _check_qa_args(model, data, batch_size, "qa_accuracy")
    check_choice(by, ("kind", "answer", "objects"), "by", "qa_accuracy")
    hits = answer_hits(model, data, kinds=kinds, batch_size=batch_size).float()
    items = data.items(kinds)
    groups = [len(data.objects[i]) if by == "objects" else getattr(q, by) for i, q in items]
    out = {}
    for group in dict.fromkeys(groups):
        out[group] = float(hits[[g == group for g in groups]].mean())
    out["all"] = float(hits.mean())
    return out


def prior_accuracy(train, test, *, kinds=None) -> dict:
    """What a blind model scores: each test question answered with the answer most frequent for that exact question
    in ``train`` (``CaptionScenes``), per kind as ``qa_accuracy`` (a question never seen in train counts wrong)."""
    from collections import Counter

    from vitlab.vlm import CaptionScenes

    for name, d in (("train", train), ("test", test)):
        if not isinstance(d, CaptionScenes):
            raise TypeError(f"prior_accuracy: {name} must be CaptionScenes, got {type(d).__name__}")
    counts: dict[str, Counter] = {}
    for _, q in train.items(kinds):
        counts.setdefault(q.question, Counter())[q.answer] += 1
    best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    items = test.items(kinds)
    hits = [best.get(q.question) == q.answer for _, q in items]
    out = {}
    for kind in dict.fromkeys(q.kind for _, q in items):
        h = [hit for (_, q), hit in zip(items, hits) if q.kind == kind]
        out[kind] = sum(h) / len(h)
    out["all"] = sum(hits) / len(hits)
    return out


def measure(model, split: str = "test", *, kinds=KINDS, n: int | None = None, img_size: int = IMG_SIZE) -> dict:
    """A TinyVLM's answer accuracy on the ``kinds`` questions (default ``KINDS``; None: all seven) of
    ``caption_scenes(split, seed=DATA_SEED, img_size=img_size)``, per kind and "all" (``qa_accuracy``)."""
    from vitlab.vlm import caption_scenes

    check_choice(split, ("train", "val", "test"), "split", "measure")
    return qa_accuracy(model, caption_scenes(split, seed=DATA_SEED, img_size=img_size, n=n), kinds=kinds)


def qa_objective(data_seed: int = DATA_SEED, seed: int = 0, eval_every: int = EVAL_EVERY, val_n: int = VAL_N,
                 eval_n: int | None = None, kinds=KINDS):
    """Objective ``"llava_sp_qa"``: ``vitlab.vlm.qa_objective`` (LLaVA's answer-only cross-entropy on one random
    question of ``kinds`` per scene of the batch, drawn by a generator seeded from ``seed``, as ``vlm.train_vlm``
    does). When the vision tower is frozen (``FIT["trainable"]``), its features of the training scenes are computed
    once and the step runs the projector and the LM on them: the same logits as ``TinyVLM.forward``, without encoding
    each image again at every step (the tower has no dropout, so train and eval mode agree). Every ``eval_every``
    steps it logs ``qa_accuracy`` on the first ``val_n`` val scenes (the plateau curve); the checkpoint stores
    ``measure`` on test (``test_*``) and on val (``val_*``, the first ``eval_n`` scenes of each if given, else all)
    and that curve (``val_curve_*``), all on the ``kinds`` questions."""
    from vitlab.vlm import QUESTION_KINDS, caption_scenes, qa_objective as vlm_qa_objective
    from vitlab.vlm.data import _check_kinds

    fn = "qa_objective"
    data_seed = check_int(data_seed, "data_seed", fn, low=0)
    val_n = check_int(val_n, "val_n", fn)
    eval_n = None if eval_n is None else check_int(eval_n, "eval_n", fn)
    kinds = _check_kinds(kinds, QUESTION_KINDS, fn)
    state = {}

    def validate(model, size):
        if "val" not in state:
            state["val"] = caption_scenes("val", seed=data_seed, img_size=size, n=val_n)
        return qa_accuracy(model, state["val"], kinds=kinds)

    def logits(net, images, text, labels, idx):
        m = _unwrap(net)
        if "feats" not in state and not any(p.requires_grad for p in m.vision_encoder.parameters()):
            state["feats"] = _encode_all(m, caption_scenes("train", seed=data_seed, img_size=images.shape[-1]).images,
                                         images.device)  # a frozen tower: encode each training scene once
        if "feats" in state:  # the same logits as net(images, text), the tower's part computed once per scene
            feats = state["feats"][idx.cpu().to(images.device)].to(images.dtype)
            return m.lm(text, prefix_embeds=m.projector(feats))
        return net(images, text)

    def measure_all(model, train, curve):
        size = train.images.shape[-1]
        v, t = (measure(model, split, kinds=kinds, n=eval_n, img_size=size) for split in ("val", "test"))
        out = {**{f"test_{k}": x for k, x in t.items()}, **{f"val_{k}": x for k, x in v.items()},
               "val_curve_step": [c[0] for c in curve]}
        for k in curve[-1][1]:
            out[f"val_curve_{k}"] = [c[1][k] for c in curve]
        return out

    return vlm_qa_objective(kinds, data_seed=data_seed, seed=check_int(seed, "seed", fn, low=0),
                            eval_every=check_int(eval_every, "eval_every", fn), validate=validate,
                            measure=measure_all, logits=logits)


@torch.no_grad()
def _encode_all(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """``model.encode_images`` of every image, in batches (the frozen tower's features, cached for training)."""
    return torch.cat([model.encode_images(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


def first_token_macs(model, images: torch.Tensor, prompt_ids: torch.Tensor) -> int:
    """MACs per sample from image to first answer token (``vitlab.measure.macs`` of the path ``TinyVLM.ttft`` times:
    vision encoding, projector, LM prefill over [visual tokens; prompt])."""
    from vitlab.measure import macs
    from vitlab.vlm import TinyVLM
    from vitlab.vlm.model import _FirstToken

    if not isinstance(model, TinyVLM):
        raise TypeError(f"first_token_macs: model must be a TinyVLM, got {type(model).__name__}")
    model.check_prompt(images, prompt_ids)
    return macs(_FirstToken(model), (images, prompt_ids))


def _unwrap(net):
    from vitlab.train import unwrap

    return unwrap(net)


def model_name(arm: str) -> str:
    """The registry model of an arm: ``ch7_llava_sp_<arm>`` ("mlp": the control; "pooling", "cropping")."""
    check_choice(arm, ("mlp", "pooling", "cropping"), "arm", "model_name")
    return f"ch7_llava_sp_{arm}"


def entry_name(arm: str, seed: int, long: bool = False) -> str:
    """The zoo entry ``ch7_llava_sp_<arm>_s<seed>`` (``STEPS``), or with ``long=True`` ``ch7_llava_sp_<arm>_long_s0``
    (``LONG_STEPS``, seed 0 only: the plateau check by a longer run)."""
    check_choice(arm, ARMS, "arm", "entry_name")
    return seeded_entry(f"ch7_llava_sp_{arm}", seed, SEEDS, long)


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if model_name("mlp") in MODELS:  # re-imported
        return
    zoo.register_objective("llava_sp_qa", qa_objective)
    zoo.register_objective("vlm_patch_attr", patch_objective)
    register_model(ENCODER_ENTRY, encoder_model, img_size=IMG_SIZE, in_chans=3, num_classes=0)
    for arm in ("mlp", "pooling", "cropping"):
        register_model(model_name(arm), vlm_model, projector=arm, img_size=IMG_SIZE, in_chans=3, num_classes=0)
    zoo.register(ENCODER_ENTRY, zoo.Recipe(
        model=ENCODER_ENTRY, data="vlm_caption_scenes", data_kwargs=dict(img_size=IMG_SIZE), fit=dict(ENCODER_FIT),
        seed=0, data_seed=DATA_SEED, per_profile={p: dict(steps=k, max_train=None) for p, k in ENCODER_STEPS.items()},
        shares={"smoke": "cpu"}, objective="vlm_patch_attr",
        objective_kwargs=dict(data_seed=DATA_SEED, eval_every=EVAL_EVERY, val_n=VAL_N)))
    for arm in ARMS:
        runs = [(entry_name(arm, s), s, STEPS, EVAL_EVERY) for s in SEEDS]
        runs.append((entry_name(arm, 0, long=True), 0, LONG_STEPS, 2 * EVAL_EVERY))
        for name, seed, steps, every in runs:
            zoo.register(name, zoo.Recipe(
                model=model_name(arm), data="vlm_caption_scenes", data_kwargs=dict(img_size=IMG_SIZE),
                fit=dict(FIT), seed=seed, data_seed=DATA_SEED, init=ENCODER_ENTRY,
                per_profile={p: dict(steps=k, max_train=None) for p, k in steps.items()},
                shares={"smoke": "cpu"}, objective="llava_sp_qa",
                objective_kwargs=dict(data_seed=DATA_SEED, seed=seed, eval_every=every, val_n=VAL_N,
                                      kinds=list(KINDS))))


_register()
