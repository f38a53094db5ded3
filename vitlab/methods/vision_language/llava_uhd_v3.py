"""LLaVA-UHD v3: Progressive Visual Compression for Efficient Native-Resolution Encoding in MLLMs (S. Sun et al.
2025, arXiv:2511.21150; official code: thunlp/LLaVA-UHD, main branch: ``llava/model/multimodal_encoder/
modeling_moonvit.py`` (``WTC``, ``MoonVitEncoderLayer``, ``MoonVitEncoder``), the ViT-UHD encoder on SigLIP2 in
``VLMEvalKit/llava/model/multimodal_encoder/modeling_swin_siglip2_zyc.py`` (``PatchMergingLayer`` with
``avg_pooling`` / ``m_pooling``, ``Siglip2VisionEmbeddingsCNN``), the projector ``llava/model/multimodal_projector/
merger.py::Qwen2vlPatchMerger``); our own code, on the course ViT and ``vitlab.vlm.TinyVLM``.

Progressive visual compression (PVC) turns a pretrained ViT into one that sees *finer* patches but hands the LM
*fewer* tokens, with two pieces:

**Windowed token compression (WTC).** After the MLP + residual of chosen blocks, the h x w token grid is cut into
2 x 2 windows and each window becomes one token, so the grid halves (h/2 x w/2) and every later block is 4x
cheaper. ``avg_pooling`` averages the window. ``m_pooling`` learns where to look, per channel:

    for a window x_1..x_4 (in raster order) with mean m:   a_k = MLP([x_k ; m])        (2D -> D -> D, GELU)
    w_k = softmax_k(a_k)   (over the 4 positions, separately for every channel)      y = sum_k w_k * x_k

**Refined patch embedding (RPE).** The pretrained patch size is scaled down (the paper: 14 -> 10) for finer tokens.
We resize the trained kernel with FlexiViT's pseudo-inverse (PI) resize: with B the linear map that resizes a
patch from the old to the new size (bicubic), the new kernel is w' = pinv(B)^T w, the least-squares solution of
<B x, w'> = <x, w>. When B upsamples it is exact for every patch; when it downsamples (RPE) it is exact on the
patches B can represent and least-squares elsewhere. ``refine_patch_embed`` is timm's ``resample_patch_embed``;
``pi_resize_matrix`` / ``pi_resize`` spell the same computation out (the tests check they agree).

    vit = UHDViT(img_size=32, patch_size=2, in_chans=3, num_classes=0, embed_dim=64, depth=4,
                 class_token=False, global_pool="avg", merge_after=(1, 2))       # 256 -> 256 -> 64 -> 16 tokens
    vit.token_counts()                          # [256, 256, 64, 16]: tokens entering each block
    fine = refine_vit(trained_p4_vit, 2, merge_after=(1, 2))   # RPE: PI-resized kernel, resized positions

Our reading, and every deviation from the official code, named:
- **RPE is paper-level.** The official code takes a configurable conv patch size (``Siglip2VisionEmbeddingsCNN``
  with ``changed_patch_size``) but holds no weight conversion for it; PI-resize (FlexiViT) is our choice for
  "scale the patch size of a pretrained ViT", not the authors' code.
- **Positions.** The course ViT (like SigLIP2, the base of ViT-UHD) adds a learned absolute position embedding once,
  before the blocks; after a WTC the merged tokens carry it on, and nothing is re-embedded. (MoonViT instead
  recomputes its 2-D RoPE for the halved grid: ``Rope2DPosEmb.get_freqs_cis(..., down_scale_rate)``, whose
  table caches the first call's, so merged tokens get unit-spaced positions on the small grid.) For a new patch
  size the position table is resized to the new grid: ``mode="bucket"`` is the official
  ``Siglip2VisionEmbeddingsCNN`` lookup (each new position takes the old cell its fractional coordinate falls in:
  nearest-lower, a 2 x 2 repeat for patch 4 -> 2), ``mode="bicubic"`` timm's ``resample_abs_pos_embed``.
- **m_pooling heads.** The official splits the MLP output into 16 heads and takes the softmax over the 4 positions
  (``'n s (m d) -> n m s d'``, softmax on ``s``); the softmax is per channel either way, so the head split changes
  nothing (kept as ``num_heads``, which must divide the width; a test checks the result does not depend on it).
- **m_pooling init.** The official MLP has PyTorch's default init; ours zeroes its last layer, so a freshly
  inserted m_pooling *is* avg_pooling (uniform weights) and a pretrained model is not disturbed at insertion
  (``init="default"`` gives PyTorch's init). The official ``zero_init_fc`` is dead code (``res_list`` is never
  filled) and is left out.
- **Batches, not packed sequences.** The official packs variable-size images into one sequence (``cu_seqlens``,
  ``spatial_shapes``) or pads them (``attention_mask``); here a batch shares one grid [B, h*w, D], so there are no
  masks to update. Odd grids: the official ``avg_pooling`` floors (drops the last row/column) and ``m_pooling``
  fails; both raise here (a clear error naming the grid).
- Prefix tokens (CLS, registers) pass through a WTC unchanged; the lesson's encoders have none (SigLIP2 has none).
- The official window attention in the blocks before the first merger (``window_attention``) and the ``avg_attn_res``
  / ``m_pooling_r4`` variants are not implemented; ``PatchMerger2x2`` is the Qwen2-VL 2 x 2 projector the official
  LLaVA-UHD v3 uses after the ViT (LayerNorm, concatenate each window's 4 tokens in raster order, MLP 4D -> 4D -> D_lm;
  the official casts to bf16 first, we keep the input dtype).

The lesson's zoo (end of this file): the objective ``"vlm_qa"`` (``train_vlm``'s step on colour and size questions,
a val answer-accuracy curve), the dataset ``"vlm_caption_scenes"`` (``vitlab.data``, labels = scene index), the
base ``ch7_uhd_base`` (patch 4, ``BASE_STEPS``, from scratch) and the fine-tunes
``ch7_uhd_{p4,rpe_wtc,p8}_s{0,1,2}`` from it (``FT_FIT``, ``STEPS``; smoke shares cpu) plus
``ch7_uhd_rpe_wtc_long_s0`` (``LONG_STEPS``: the plateau check by a longer run). Why 800 fine-tune steps: at 400,
seed 0 of (b) still gained 2.0 points with twice the steps. The lesson's numbers are generated by its notebook.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_model, check_ndim
from vitlab.models.vit import LayerNorm, VisionTransformer
from vitlab.vlm.train import seeded_entry

__all__ = ["MERGING", "POS_MODES", "window_tokens", "avg_pooling", "WTC", "UHDViT", "pi_resize_matrix", "pi_resize",
           "refine_patch_embed", "resize_pos_embed", "refine_vit", "load_refined", "PatchMerger2x2"]

MERGING = ("avg_pooling", "m_pooling")
POS_MODES = ("bucket", "bicubic")


def _grid(grid, fn: str) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"{fn}: grid must be (h, w) ints, got {grid!r}")
    return check_int(grid[0], "grid[0] (h)", fn), check_int(grid[1], "grid[1] (w)", fn)


def _check_tokens(x, grid, fn: str, num_prefix: int = 0) -> tuple[int, int]:
    """x [B, prefix + h*w, D] on an even h x w grid."""
    check_ndim(x, 3, "x", fn)
    h, w = _grid(grid, fn)
    if x.shape[1] != num_prefix + h * w:
        raise ValueError(f"{fn}: x has {x.shape[1]} tokens, but grid {h}x{w} (+{num_prefix} prefix) needs "
                         f"{num_prefix + h * w}")
    if h % 2 or w % 2:
        raise ValueError(f"{fn}: the grid {h}x{w} must have even sides to merge 2x2 windows")
    return h, w


def window_tokens(x: torch.Tensor, grid) -> torch.Tensor:
    """Row-major tokens [B, h*w, D] of an h x w grid -> 2 x 2 windows [B, (h/2)*(w/2), 4, D]: windows in row-major
    order, each window's tokens in raster order (top-left, top-right, bottom-left, bottom-right): the official
    ``rearrange(x, '(h p1) (w p2) c -> (h w) (p1 p2) c', p1=2, p2=2)``."""
    h, w = _check_tokens(x, grid, "window_tokens")
    B, _, D = x.shape
    x = x.reshape(B, h // 2, 2, w // 2, 2, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // 2) * (w // 2), 4, D)


def avg_pooling(x: torch.Tensor, grid) -> torch.Tensor:
    """2 x 2 average of an h x w token grid [B, h*w, D] -> [B, (h/2)*(w/2), D] (the official ``avg_pooling``)."""
    return window_tokens(x, grid).mean(dim=2)


class WTC(nn.Module):
    """Windowed token compression: [B, prefix + h*w, D] on an h x w grid -> [B, prefix + (h/2)*(w/2), D].

    merging: "avg_pooling" (no parameters) or "m_pooling" (a per-channel softmax over each window's 4 tokens, the
    logits an MLP of [token; window mean]). ``init="avg"`` zeroes the MLP's last layer (starts as avg_pooling)."""

    def __init__(self, dim: int, merging: str = "m_pooling", num_heads: int = 16, init: str = "avg"):
        super().__init__()
        fn = "WTC"
        self.dim = check_int(dim, "dim", fn)
        self.merging = check_choice(merging, MERGING, "merging", fn)
        self.num_heads = check_int(num_heads, "num_heads", fn)
        check_choice(init, ("avg", "default"), "init", fn)
        if merging == "m_pooling" and dim % num_heads:
            raise ValueError(f"WTC: num_heads={num_heads} must divide dim={dim}")
        if merging == "m_pooling":  # the official attn_layer: its keys load unchanged
            self.attn_layer = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
            if init == "avg":
                nn.init.zeros_(self.attn_layer[2].weight)
                nn.init.zeros_(self.attn_layer[2].bias)

    def weights(self, windows: torch.Tensor) -> torch.Tensor:
        """m_pooling's weights [..., 4, D] (sum 1 over the 4 positions) for windows [..., 4, D]."""
        if self.merging != "m_pooling":
            raise ValueError("WTC.weights: only merging='m_pooling' has learned weights")
        mean = windows.mean(dim=-2, keepdim=True).expand_as(windows)
        logits = self.attn_layer(torch.cat([windows, mean], dim=-1))
        # the official splits channels into heads, then softmaxes over the positions: per channel all the same
        logits = logits.unflatten(-1, (self.num_heads, self.dim // self.num_heads))
        return logits.softmax(dim=-3).flatten(-2)

    def forward(self, x: torch.Tensor, grid, num_prefix: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """(merged tokens, the new grid (h/2, w/2)); ``num_prefix`` leading tokens pass through."""
        num_prefix = check_int(num_prefix, "num_prefix", "WTC", low=0)
        h, w = _check_tokens(x, grid, "WTC", num_prefix)
        if x.shape[-1] != self.dim:
            raise ValueError(f"WTC: x has width {x.shape[-1]}, expected dim={self.dim}")
        prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
        win = window_tokens(tokens, (h, w))
        merged = win.mean(dim=2) if self.merging == "avg_pooling" else (win * self.weights(win)).sum(dim=2)
        return torch.cat([prefix, merged], dim=1), (h // 2, w // 2)

    def extra_repr(self) -> str:
        return f"{self.merging}, dim={self.dim}" + (f", heads={self.num_heads}" if self.merging == "m_pooling" else "")


class UHDViT(VisionTransformer):
    """The course ViT with a WTC after each block index in ``merge_after`` (0-based): ViT-UHD's progressive
    compression. Every other key is the plain ``VisionTransformer``'s, so its weights load here (``mergers.*`` are
    the new ones). ``forward_features`` gives [B, prefix + final tokens, D] after the final norm."""

    def __init__(self, *args, merge_after: Sequence[int] = (), merging: str = "m_pooling", wtc_heads: int = 16,
                 wtc_init: str = "avg", **kwargs):
        super().__init__(*args, **kwargs)
        fn = "UHDViT"
        if isinstance(merge_after, (str, bytes)) or not isinstance(merge_after, Sequence):
            raise TypeError(f"{fn}: merge_after must be a sequence of block indices, got {merge_after!r}")
        depth = len(self.blocks)
        after = tuple(check_int(i, "merge_after[i]", fn, low=0, high=depth - 1) for i in merge_after)
        if list(after) != sorted(set(after)):
            raise ValueError(f"{fn}: merge_after must be increasing block indices without repeats, got {merge_after!r}")
        h, w = self.grid_size
        if h % 2 ** len(after) or w % 2 ** len(after):
            raise ValueError(f"{fn}: the {h}x{w} patch grid cannot be halved {len(after)} times (merge_after="
                             f"{after}); use a grid divisible by {2 ** len(after)}")
        self.merge_after = after
        self.merging = check_choice(merging, MERGING, "merging", fn)
        self.mergers = nn.ModuleDict({str(i): WTC(self.embed_dim, merging, wtc_heads, wtc_init) for i in after})

    def token_counts(self) -> list[int]:
        """Patch tokens entering each block, then the number handed on (len = depth + 1)."""
        h, w = self.grid_size
        out = []
        for i in range(len(self.blocks)):
            out.append(h * w)
            if i in self.merge_after:
                h, w = h // 2, w // 2
        return out + [h * w]

    @property
    def num_visual_tokens(self) -> int:
        return self.token_counts()[-1]

    def forward_features(self, x: torch.Tensor, side: Sequence[str] = ()):
        if side:
            raise ValueError("UHDViT.forward_features: side outputs are not supported (the grid changes between "
                             "blocks)")
        x = self.embed(x)
        grid = self.grid_size
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.merge_after:
                x, grid = self.mergers[str(i)](x, grid, self.num_prefix_tokens)
        return self.norm(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", merge_after={self.merge_after} ({self.merging}), tokens " \
            + " -> ".join(map(str, dict.fromkeys(self.token_counts())))


# ---------------------------------------------------------------------------------------------- RPE
def _patch(size, name: str, fn: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, Sequence) or len(size) != 2:
        raise TypeError(f"{fn}: {name} must be an int or (h, w), got {size!r}")
    return check_int(size[0], name, fn), check_int(size[1], name, fn)


def pi_resize_matrix(old_size, new_size, interpolation: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """B [new_h*new_w, old_h*old_w]: the linear map that resizes a flattened old_size patch to new_size
    (``F.interpolate`` of each basis patch, align_corners=False)."""
    fn = "pi_resize_matrix"
    (oh, ow), (nh, nw) = _patch(old_size, "old_size", fn), _patch(new_size, "new_size", fn)
    check_choice(interpolation, ("bicubic", "bilinear", "nearest", "area"), "interpolation", fn)
    basis = torch.eye(oh * ow, dtype=torch.float64).reshape(oh * ow, 1, oh, ow)
    kw = dict(align_corners=False, antialias=antialias) if interpolation in ("bicubic", "bilinear") else {}
    out = F.interpolate(basis, size=(nh, nw), mode=interpolation, **kw)
    return out.reshape(oh * ow, nh * nw).T.contiguous()


def pi_resize(weight: torch.Tensor, new_size, interpolation: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """FlexiViT's PI-resize written out: w' = pinv(B)^T w per (out, in) channel pair of a conv kernel
    [C_out, C_in, p, p] (float64 inside). ``refine_patch_embed`` (timm's) computes the same."""
    check_ndim(weight, 4, "weight", "pi_resize")
    B = pi_resize_matrix(tuple(weight.shape[-2:]), new_size, interpolation, antialias)
    nh, nw = _patch(new_size, "new_size", "pi_resize")
    w = weight.double().flatten(2) @ torch.linalg.pinv(B)  # [.., old] @ [old, new] = (pinv(B)^T w)^T
    return w.reshape(*weight.shape[:2], nh, nw).to(weight.dtype)


def refine_patch_embed(weight: torch.Tensor, patch_size, interpolation: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """RPE: a trained patch-embedding kernel [C_out, C_in, p, p] PI-resized to ``patch_size`` (timm's
    ``resample_patch_embed``). Smaller patches: finer tokens from the same filters."""
    from timm.layers import resample_patch_embed

    fn = "refine_patch_embed"
    check_ndim(weight, 4, "weight", fn)
    size = _patch(patch_size, "patch_size", fn)
    check_choice(interpolation, ("bicubic", "bilinear"), "interpolation", fn)
    return resample_patch_embed(weight, list(size), interpolation=interpolation, antialias=bool(antialias))


def resize_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid, num_prefix: int = 0,
                     mode: str = "bucket") -> torch.Tensor:
    """A learned position table [1, prefix + old_h*old_w, D] for a new grid. ``mode="bucket"``: the official
    ``Siglip2VisionEmbeddingsCNN`` rule (new row i takes old row ``bucketize(i / new_h, [1/old_h, ..., ])``, the
    same for columns); ``"bicubic"``: timm's ``resample_abs_pos_embed``. Prefix positions are kept."""
    fn = "resize_pos_embed"
    check_ndim(pos_embed, 3, "pos_embed", fn)
    (oh, ow), (nh, nw) = _grid(old_grid, fn), _grid(new_grid, fn)
    num_prefix = check_int(num_prefix, "num_prefix", fn, low=0)
    check_choice(mode, POS_MODES, "mode", fn)
    if pos_embed.shape[1] != num_prefix + oh * ow:
        raise ValueError(f"{fn}: pos_embed has {pos_embed.shape[1]} positions, expected {num_prefix} + {oh}x{ow}")
    if mode == "bicubic":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos_embed, [nh, nw], [oh, ow], num_prefix_tokens=num_prefix)

    def buckets(n_new: int, n_old: int) -> torch.Tensor:  # the official expressions, float32 as there
        boundaries = torch.arange(1 / n_old, 1.0, 1 / n_old)
        return torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / n_new), boundaries, right=True)

    rows, cols = buckets(nh, oh), buckets(nw, ow)
    idx = (rows[:, None] * ow + cols[None, :]).flatten()
    return torch.cat([pos_embed[:, :num_prefix], pos_embed[:, num_prefix:][:, idx]], dim=1)


def _vit_kwargs(vit: VisionTransformer) -> dict:
    """The constructor arguments of a course ViT, read off the module (what ``refine_vit`` keeps)."""
    blk = vit.blocks[0]
    return dict(img_size=vit.patch_embed.img_size, in_chans=vit.patch_embed.in_chans, num_classes=vit.num_classes,
                global_pool=vit.global_pool, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim,
                qkv_bias=blk.attn.qkv.bias is not None, class_token=vit.cls_token is not None,
                reg_tokens=vit.num_reg_tokens)


def load_refined(target: VisionTransformer, source: VisionTransformer, *, pos_mode: str = "bucket",
                 interpolation: str = "bicubic") -> VisionTransformer:
    """Copy a trained course ViT ``source`` into ``target`` (same width and depth, any patch size, a ``UHDViT`` or
    a plain ViT): the patch kernel PI-resized (RPE), the position table resized (``pos_mode``), every other weight
    copied; a ``UHDViT``'s mergers keep their own (fresh) weights. Returns ``target``."""
    fn = "load_refined"
    for name, m in (("target", target), ("source", source)):
        check_model(m, fn)
        if not isinstance(m, VisionTransformer):
            raise TypeError(f"{fn}: {name} must be a vitlab VisionTransformer, got {type(m).__name__}")
    if _vit_kwargs(target) | {"img_size": 0} != _vit_kwargs(source) | {"img_size": 0}:
        raise ValueError(f"{fn}: target and source differ beyond the patch size: {_vit_kwargs(target)} vs "
                         f"{_vit_kwargs(source)}")
    if target.patch_embed.img_size != source.patch_embed.img_size:
        raise ValueError(f"{fn}: target and source must see the same img_size")
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    p = target.patch_embed.patch_size
    state["patch_embed.proj.weight"] = refine_patch_embed(state["patch_embed.proj.weight"], p, interpolation)
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], source.grid_size, target.grid_size,
                                          source.num_prefix_tokens, pos_mode)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("mergers.") for k in missing):
        raise ValueError(f"{fn}: weights do not fit: missing {missing}, unexpected {unexpected}")
    return target


def refine_vit(vit: VisionTransformer, patch_size: int, *, merge_after: Sequence[int] = (),
               merging: str = "m_pooling", pos_mode: str = "bucket", interpolation: str = "bicubic") -> UHDViT:
    """PVC applied to a trained course ViT: a ``UHDViT`` with patch ``patch_size`` (RPE: PI-resized kernel,
    resized positions) and a WTC after each block of ``merge_after``."""
    check_model(vit, "refine_vit")
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"refine_vit: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
    p = check_int(patch_size, "patch_size", "refine_vit")
    kw = _vit_kwargs(vit)
    if kw["img_size"] % p:
        raise ValueError(f"refine_vit: patch_size={p} does not divide img_size={kw['img_size']}")
    out = UHDViT(patch_size=p, merge_after=merge_after, merging=merging, **kw)
    return load_refined(out, vit, pos_mode=pos_mode, interpolation=interpolation)


class PatchMerger2x2(nn.Module):
    """Qwen2-VL's 2 x 2 projector (the official ``Qwen2vlPatchMerger``): tokens [B, h*w, D] of an h x w grid ->
    LayerNorm -> each 2 x 2 window's 4 tokens concatenated in raster order [B, (h/2)*(w/2), 4D] -> Linear(4D, 4D)
    -> GELU -> Linear(4D, out_dim). Keys ``nl``, ``mlp.0``, ``mlp.2`` as in the official."""

    def __init__(self, dim: int, out_dim: int, grid):
        super().__init__()
        fn = "PatchMerger2x2"
        self.dim, self.out_dim = check_int(dim, "dim", fn), check_int(out_dim, "out_dim", fn)
        self.grid = _grid(grid, fn)
        if self.grid[0] % 2 or self.grid[1] % 2:
            raise ValueError(f"{fn}: the grid {self.grid} must have even sides")
        self.nl = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"PatchMerger2x2: x must be tokens [B, N, {self.dim}], got {shape}")
        return self.mlp(window_tokens(self.nl(x), self.grid).flatten(2))

    def extra_repr(self) -> str:
        return f"{self.dim} x 4 -> {self.out_dim}, grid={self.grid}"


# ----------------------------------------------------------------------------------------------- the lesson's zoo
# A TinyVLM (vitlab.vlm) answers caption_scenes questions (32 px). One base is trained first: the course ViT with
# patch 4 (8 x 8 = 64 visual tokens) + MLP projector + TinyLM, from scratch ("the pretrained ViT"). Every variant
# then starts from that base (``UHDVLM.start_from``) and is fine-tuned with one recipe (``FT_FIT``, ``STEPS``) and
# the same data and seeds:
#   p4       (a) the base's encoder unchanged: 64 tokens, no compression (the equal-step control)
#   rpe_wtc  (b) RPE to patch 2 (PI-resized kernel, bucketed positions: 16 x 16 = 256 tokens) + m_pooling WTC
#            after blocks 0 and 1: 256 -> 64 -> 16 tokens for the LM
#   p8       (c) the base PI-resized to patch 8: a plain ViT at the same 16 tokens (the control at equal tokens)
#   p2       RPE to patch 2 without compression (256 tokens): timed for TTFT only, never trained
VARIANTS = ("p4", "rpe_wtc", "p8")
SPECS = {"p4": dict(patch_size=4, merge_after=()), "rpe_wtc": dict(patch_size=2, merge_after=(0, 1)),
         "p8": dict(patch_size=8, merge_after=()), "p2": dict(patch_size=2, merge_after=())}
LABELS = {"p4": "(a) patch 4, no compression", "rpe_wtc": "(b) RPE patch 2 + WTC", "p8": "(c) plain patch 8",
          "p2": "RPE patch 2, no WTC (timing only)"}
KINDS = ("colour", "size")
SEEDS = (0, 1, 2)
DATA_SEED = 0
VIT = dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, class_token=False, global_pool="avg")
LM = dict(dim=64, depth=2, num_heads=2, max_len=288)  # 288: room for the uncompressed 256 tokens + a question
BASE_STEPS = {"cpu": 2500, "gpu": 25000}
STEPS = {"cpu": 800, "gpu": 8000}  # smoke shares cpu's checkpoints (committed)
LONG_STEPS = {"cpu": 1600, "gpu": 16000}  # plateau evidence: seed 0 of LONG_VARIANTS trained twice as long
LONG_VARIANTS = ("rpe_wtc",)
FIT = dict(lr=1e-3, weight_decay=0.05, warmup=0.1, batch_size=64, grad_clip=1.0, label_smoothing=0.0)  # the base
FT_FIT = dict(FIT, lr=5e-4, batch_size=32)  # every fine-tune (one recipe for all variants and seeds)
EVAL_EVERY = 100  # the base: val answer accuracy every EVAL_EVERY steps (the plateau curve)
FT_EVAL_EVERY = 50  # the fine-tunes (twice that for the longer run)
VAL_CURVE_SCENES = 250


def uhd_encoder(variant: str = "p4", img_size: int = 32, in_chans: int = 3) -> UHDViT:
    """The vision encoder of ``variant`` (``SPECS``) at the lesson's width and depth (``VIT``)."""
    spec = SPECS[check_choice(variant, tuple(SPECS), "variant", "uhd_encoder")]
    return UHDViT(img_size=img_size, in_chans=in_chans, num_classes=0, patch_size=spec["patch_size"],
                  merge_after=spec["merge_after"], merging="m_pooling", **VIT)


def _vlm_parts(encoder):
    from vitlab.vlm import TinyLM, VisionProjector, WordTokenizer

    return encoder, VisionProjector(VIT["embed_dim"], LM["dim"]), TinyLM(len(WordTokenizer()), **LM)


def base_vlm(img_size: int = 32, in_chans: int = 3, num_classes: int = 0):
    """The base: a ``TinyVLM`` on the plain course ViT, patch 4 (``num_classes`` is ignored: the zoo passes the
    dataset's, a VLM has no classifier)."""
    from vitlab.vlm import TinyVLM

    vit = VisionTransformer(img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=0, **VIT)
    return TinyVLM(*_vlm_parts(vit))


def _uhd_vlm_class():
    from vitlab.vlm import TinyVLM

    class UHDVLM(TinyVLM):
        """A TinyVLM whose encoder is a ``UHDViT``; ``start_from(base)`` loads a base TinyVLM through RPE
        (``load_refined``: PI-resized kernel, resized positions, fresh mergers) and copies projector and LM."""

        def start_from(self, base) -> None:
            if not isinstance(base, TinyVLM) or not isinstance(base.vision_encoder, VisionTransformer):
                raise TypeError(f"UHDVLM.start_from: base must be a TinyVLM on a course ViT, got "
                                f"{type(base).__name__}")
            load_refined(self.vision_encoder, base.vision_encoder, pos_mode="bucket")
            self.projector.load_state_dict(base.projector.state_dict())
            self.lm.load_state_dict(base.lm.state_dict())

    UHDVLM.__qualname__ = UHDVLM.__name__
    return UHDVLM


_UHDVLM = None


def uhd_vlm(variant: str = "p4", img_size: int = 32, in_chans: int = 3, num_classes: int = 0):
    """A ``UHDVLM`` (TinyVLM subclass with ``start_from``) on ``uhd_encoder(variant)``."""
    global _UHDVLM
    if _UHDVLM is None:
        _UHDVLM = _uhd_vlm_class()
    return _UHDVLM(*_vlm_parts(uhd_encoder(variant, img_size, in_chans)))


def visual_tokens(model) -> int:
    """Visual tokens a TinyVLM hands its LM per image."""
    from vitlab.vlm import TinyVLM

    if not isinstance(model, TinyVLM):
        raise TypeError(f"visual_tokens: model must be a TinyVLM, got {type(model).__name__}")
    enc = model.vision_encoder
    if isinstance(enc, UHDViT):
        return enc.num_visual_tokens
    return enc.patch_embed.num_patches


def qa_objective(data_seed: int = DATA_SEED, kinds=KINDS, seed: int = 0, eval_every: int = EVAL_EVERY):
    """The zoo objective ``"vlm_qa"``: ``vitlab.vlm.qa_objective`` (``train_vlm``'s step: one random question of
    ``kinds`` per scene of the batch, answer-only cross-entropy; ``seed`` seeds the question draw). Every
    ``eval_every`` steps it logs the greedy answer accuracy on the first ``VAL_CURVE_SCENES`` val scenes (the plateau
    curve); the checkpoint stores test and val accuracy (per kind), the curve, ``plateau_gain`` of the curve and the
    visual token count."""
    from vitlab.vlm import answer_accuracy, caption_scenes, qa_objective as vlm_qa_objective
    from vitlab.zoo import plateau_gain

    fn = "qa_objective"
    data_seed = check_int(data_seed, "data_seed", fn, low=0)
    kinds = tuple(kinds)
    val = {}

    def validate(model, img_size):
        if not val:
            val["scenes"] = caption_scenes("val", seed=data_seed, n=VAL_CURVE_SCENES)
        return answer_accuracy(model, val["scenes"], kinds=kinds)

    def measure(model, train, curve):
        out = {}
        for split in ("val", "test"):
            acc = answer_accuracy(model, caption_scenes(split, seed=data_seed), kinds=kinds, per_kind=True)
            out.update({f"{split}_{k}": v for k, v in acc.items()})
        return {**out, "visual_tokens": visual_tokens(model), "val_curve_step": [c[0] for c in curve],
                "val_curve_acc": [c[1] for c in curve], "plateau_gain": plateau_gain([c[1] for c in curve])}

    return vlm_qa_objective(kinds, data_seed=data_seed, seed=check_int(seed, "seed", fn, low=0),
                            eval_every=check_int(eval_every, "eval_every", fn), validate=validate, measure=measure)


def model_name(variant: str) -> str:
    """The registry model of a variant: ``ch7_uhd_vlm_<variant>``."""
    check_choice(variant, tuple(SPECS), "variant", "model_name")
    return f"ch7_uhd_vlm_{variant}"


BASE_ENTRY = "ch7_uhd_base"


def entry_name(variant: str, seed: int, long: bool = False) -> str:
    """The zoo entry ``ch7_uhd_<variant>_s<seed>`` (``STEPS``), or with ``long=True`` ``ch7_uhd_<variant>_long_s0``
    (``LONG_STEPS``, seed 0 only: the plateau check by a longer run)."""
    check_choice(variant, LONG_VARIANTS if long else VARIANTS, "variant", "entry_name")
    return seeded_entry(f"ch7_uhd_{variant}", seed, SEEDS, long)


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if BASE_ENTRY in zoo.ZOO:  # re-imported
        return
    zoo.register_objective("vlm_qa", qa_objective)
    common = dict(data="vlm_caption_scenes", data_kwargs=dict(img_size=32), data_seed=DATA_SEED,
                  shares={"smoke": "cpu"}, objective="vlm_qa")
    if "ch7_uhd_vlm_base" not in MODELS:
        register_model("ch7_uhd_vlm_base", base_vlm, img_size=32, in_chans=3, num_classes=0)
    for variant in SPECS:
        if model_name(variant) not in MODELS:
            register_model(model_name(variant), uhd_vlm, variant=variant, img_size=32, in_chans=3, num_classes=0)
    zoo.register(BASE_ENTRY, zoo.Recipe(
        model="ch7_uhd_vlm_base", fit=dict(FIT), seed=0,
        per_profile={p: dict(steps=n, max_train=None) for p, n in BASE_STEPS.items()},
        objective_kwargs=dict(data_seed=DATA_SEED, kinds=list(KINDS), seed=0, eval_every=EVAL_EVERY), **common))
    for variant in VARIANTS:
        for seed, long in [(s, False) for s in SEEDS] + [(0, True)] * (variant in LONG_VARIANTS):
            steps = LONG_STEPS if long else STEPS
            zoo.register(entry_name(variant, seed, long), zoo.Recipe(
                model=model_name(variant), fit=dict(FT_FIT), seed=seed, init=BASE_ENTRY,
                per_profile={p: dict(steps=n, max_train=None) for p, n in steps.items()},
                objective_kwargs=dict(data_seed=DATA_SEED, kinds=list(KINDS), seed=seed,
                                      eval_every=FT_EVAL_EVERY * (2 if long else 1)), **common))


_register()
