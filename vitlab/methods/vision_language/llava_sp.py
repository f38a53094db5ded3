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
  vision tower); the lesson trains TinyVLM with ``vitlab.vlm.train_vlm``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_ndim
from vitlab.vlm.projector import VisionProjector

__all__ = ["NUM_SP_TOKENS", "pool_sides", "crop_sides", "nested_crops", "cross_attend", "PoolingSFE", "CroppingSFE",
           "DFI", "SpatialProjector"]

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
