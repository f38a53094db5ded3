"""ViTamin: Designing Scalable Vision Models in the Vision-Language Era (J. Chen, Q. Yu, X. Shen, A. Yuille,
L.-C. Chen; CVPR 2024, arXiv:2404.02132; official code: Beckschen/ViTamin, ``ViTamin/models/vitamin.py``
(``Stem``, ``Downsample2d``, ``MbConvLNBlock``, ``MbConvStages``, ``StridedConv``, ``GeGluMlp``, ``HybridEmbed``,
``vitamin_*``), ``ViTamin/open_clip/`` (CLIP training); the same model is ``timm/models/vitamin.py``, whose
``vitamin_small_224`` equals the official ``vitamin_small`` key for key and logit for logit); our own code, on CPU.

The paper asks which image tower scales best when trained CLIP-style, and answers with a hybrid: two convolutional
stages (cheap, local, good at high resolution) feed one plain ViT stage (global, scales with data):

    image ─ConvStem→ ─MBConv-LN stage 1→ ─MBConv-LN stage 2→ ─StridedConv→ tokens ─(+pos)→ L × Block(GeGLU)
          ─mean over tokens→ LayerNorm → (head)

    ConvStem      conv 3x3 stride 2 -> LayerNorm2d -> GELU -> conv 3x3
    MBConvLN      y = shortcut(x) + conv1x1(GELU(dwconv3x3_s(GELU(conv1x1_x4(LN2d(x))))))    (pre-norm, no BN)
                  s = 2 in a stage's first block; its shortcut is then avg-pool 3x3 s2 -> conv 1x1
    StridedConv   LN2d -> conv 3x3 stride 2 (to the ViT width): the "patchify" of the ViT stage
    GeGLU MLP     LN(x) -> w2( gelu(w0 x) * w1 x )     (its own LayerNorm, after the block's norm2; ratio 2)
    no CLS token, a learned position embedding, average pooling, then ``fc_norm`` (timm's ``global_pool="avg"``).

The total stride is 16 (stem 2 x stage 2 x stage 2 x strided conv 2), so a 224-px image gives 14 x 14 tokens.

    tower = vitamin_tiny()                                  # 32 px RGB -> 64-d pooled features (num_classes=0)
    clip = TinyCLIP(tower, TextEncoder(len(tok)), embed_dim=64)
    base = matched_vit(tower)                               # course ViT, patch 4, width 64, depth at ~equal MACs
    small = vitamin_small()                                 # the official ViTamin-S config (224 px, 14 x 384)

Our reading, and every deviation from the official code, named:
- Parameter names are timm's (``patch_embed.backbone.stem.conv1.weight``, ``blocks.0.mlp.w0.weight``, ...), so a
  timm or official ViTamin state dict loads here unchanged (the tests check the keys of ``vitamin_small`` against
  timm's ``vitamin_small_224`` and the outputs of the tiny config against timm's classes).
- **Strides.** The official strides are fixed (2 everywhere: total 16). At the course's 32 px that leaves 2 x 2
  tokens for the ViT stage, too few for attention to matter, so ``vitamin_tiny`` sets ``stem_stride=1``: total
  stride 8, a 4 x 4 token grid. (Every stride of 2 is kept where the mechanism lives: the strided depthwise conv
  and pooled shortcut of each stage's first block, and the strided conv into the ViT.) ``ViTamin`` takes
  ``stem_stride`` and ``pool_stride`` (each 1 or 2); both 2 is the official model.
- The tiny config is the curriculum's "stem 16, stages 16/32, 4 x 64 GeGLU ViT", with our choice of 2 blocks per
  conv stage (the official small model has 2 and 4), 2 heads of 32 and GeGLU ratio 2 (official: heads of 64,
  ratio 2). ``in_chans=3``, ``img_size=32``.
- The downsampling shortcut is the official's: a 3 x 3 average pool, stride 2, padding 1, ``count_include_pad=
  False`` (not a 2 x 2 pool), then a 1 x 1 conv only when the width changes. The hidden width of an MBConv block is
  ``make_divisible(out_chs * expand_ratio, 8)`` as in the official (from the *output* width).
- All LayerNorms use eps 1e-6 (the official's, also for the 2-D ones in the conv stages).
- The transformer block is the course ``Block`` (so attention side outputs and the Triton kernels work as in the
  course ViT) with its MLP swapped for ``GeGLUMlp``; the official uses timm's ``Block`` with ``mlp_layer=GeGluMlp``:
  the same computation (norm2, then the GeGLU's own LayerNorm: two norms in a row, as in the official).
- Initialisation: Linears trunc-normal(0, 0.02) and zero bias, the position embedding trunc-normal(0.02) (timm's
  ViT); convolutions normal(0, sqrt(2 / fan_out)) with zero bias (the official ``_init_conv``). Our random stream
  differs from timm's: the tests copy weights, never seeds.
- No drop-path schedule in the conv stages (the official passes none there either), no gradient checkpointing,
  no ``HybridEmbed`` projection (the official uses ``proj=False``: the strided conv already gives the ViT width).
- ``matched_vit`` (not in the paper) gives the lesson its baseline: the course ViT with the same width and heads
  whose depth puts its MACs closest to the ViTamin's (``vitlab.measure.macs``).

The lesson's zoo (end of this file): the objective ``"clip"`` (symmetric InfoNCE, val zero-shot / R@1 curve), the
dataset ``"vlm_caption_scenes"`` of ``vitlab.data`` (labels = scene index), the models
``ch7_vitamin_clip`` / ``ch7_vit_clip`` (``clip_model``) and the entries ``ch7_{vitamin,vit}_clip_s{0,1,2}``
(``STEPS``, same lr, data and seeds; smoke shares cpu) plus ``ch7_{vitamin,vit}_clip_long_s0`` (``LONG_STEPS``: the
plateau check by a longer run). Why 2,000 steps: at 1,000 the ViT was short of its plateau (seed 0: 16-way zero-shot
30.8 % -> 41.6 % at 2,000); from 2,000 to 4,000 both towers move by at most 2 points (the lesson shows the numbers).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, make_divisible, trunc_normal_

from vitlab.checks import check_choice, check_images, check_int, check_number
from vitlab.models.vit import Block, LayerNorm, init_linear_
from vitlab.vlm.train import seeded_entry

__all__ = ["LayerNorm2d", "ConvStem", "Downsample2d", "MBConvLNBlock", "StridedConv", "MBConvStages", "ConvEmbed",
           "geglu", "GeGLUMlp", "GeGLUBlock", "ViTamin", "vitamin_tiny", "vitamin_small", "matched_vit",
           "init_conv_", "TOWERS", "SEEDS", "DATA_SEED", "STEPS", "LONG_STEPS", "FIT", "EVAL_EVERY", "clip_model",
           "zero_shot_prompts", "zero_shot_accuracy", "measure", "clip_objective", "model_name", "entry_name"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (each pixel normalised on its own), eps 1e-6."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(check_int(num_channels, "num_channels", "LayerNorm2d"), eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def init_conv_(module: nn.Module) -> None:
    """The official ``_init_conv`` for every Conv2d in ``module``: weight normal(0, sqrt(2 / fan_out)),
    fan_out = k_h k_w out_channels / groups; bias zero."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvStem(nn.Module):
    """conv 3x3 (stride ``stride``) -> LayerNorm2d -> GELU -> conv 3x3. Official stride: 2."""

    def __init__(self, in_chans: int = 3, out_chs: int = 64, stride: int = 2):
        super().__init__()
        fn = "ConvStem"
        self.in_chans, self.out_chs = check_int(in_chans, "in_chans", fn), check_int(out_chs, "out_chs", fn)
        self.stride = check_choice(stride, (1, 2), "stride", fn)
        self.conv1 = nn.Conv2d(in_chans, out_chs, 3, stride=stride, padding=1)
        self.norm1 = LayerNorm2d(out_chs)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))


class Downsample2d(nn.Module):
    """The downsampling shortcut: avg-pool 3x3 stride 2 padding 1 (padding not counted), then a 1x1 conv when the
    width changes."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        fn = "Downsample2d"
        check_int(in_chs, "in_chs", fn), check_int(out_chs, "out_chs", fn)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False)
        self.expand = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MBConvLNBlock(nn.Module):
    """Pre-norm inverted bottleneck: shortcut(x) + 1x1( GELU( dw3x3_s( GELU( 1x1_expand( LN2d(x) ))))).

    Hidden width ``make_divisible(out_chs * expand_ratio)``; ``stride=2`` puts the stride in the depthwise conv and
    makes the shortcut ``Downsample2d``; otherwise the shortcut is a 1x1 conv when the width changes, else identity.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 4.0,
                 kernel_size: int = 3, drop_path: float = 0.0):
        super().__init__()
        fn = "MBConvLNBlock"
        self.in_chs, self.out_chs = check_int(in_chs, "in_chs", fn), check_int(out_chs, "out_chs", fn)
        self.stride = check_choice(stride, (1, 2), "stride", fn)
        check_number(expand_ratio, "expand_ratio", fn, low=0, low_open=True)
        kernel_size = check_int(kernel_size, "kernel_size", fn)
        if kernel_size % 2 == 0:
            raise ValueError(f"{fn}: kernel_size must be odd (same padding), got {kernel_size}")
        check_number(drop_path, "drop_path", fn, low=0, high=1, high_open=True)
        mid = make_divisible(out_chs * expand_ratio)
        if stride == 2:
            self.shortcut = Downsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.act1 = nn.GELU()
        self.conv2_kxk = nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=mid)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1_1x1(self.pre_norm(x)))
        h = self.conv3_1x1(self.act2(self.conv2_kxk(h)))
        return self.drop_path(h) + self.shortcut(x)


class StridedConv(nn.Module):
    """LayerNorm2d (over the input channels) -> conv 3x3 stride ``stride``: the ViT stage's patchify."""

    def __init__(self, in_chs: int, embed_dim: int, stride: int = 2):
        super().__init__()
        fn = "StridedConv"
        check_int(in_chs, "in_chs", fn), check_int(embed_dim, "embed_dim", fn)
        self.stride = check_choice(stride, (1, 2), "stride", fn)
        self.norm = LayerNorm2d(in_chs)
        self.proj = nn.Conv2d(in_chs, embed_dim, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class MBConvStages(nn.Module):
    """ConvStem -> MBConv-LN stages (each first block strided) -> StridedConv: image -> feature map [B, D, h, w]."""

    def __init__(self, in_chans: int = 3, stem_width: int = 64, widths=(64, 128), depths=(2, 4),
                 embed_dim: int = 384, *, stem_stride: int = 2, pool_stride: int = 2, expand_ratio: float = 4.0):
        super().__init__()
        fn = "MBConvStages"
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"{fn}: widths and depths must have one entry per conv stage, got widths={widths} "
                             f"and depths={depths}")
        for i, (w, d) in enumerate(zip(widths, depths)):
            check_int(w, f"widths[{i}]", fn), check_int(d, f"depths[{i}]", fn)
        self.stem = ConvStem(in_chans, stem_width, stride=stem_stride)
        stages, c_in = [], stem_width
        for w, d in zip(widths, depths):
            stages.append(nn.Sequential(*[MBConvLNBlock(c_in if j == 0 else w, w, stride=2 if j == 0 else 1,
                                                        expand_ratio=expand_ratio) for j in range(d)]))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.pool = StridedConv(c_in, check_int(embed_dim, "embed_dim", fn), stride=pool_stride)
        self.stride = stem_stride * 2 ** len(widths) * pool_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


class ConvEmbed(nn.Module):
    """The hybrid "patch embedding": ``backbone`` (MBConvStages) on the image, its map flattened to tokens
    [B, h w, D] (row-major), no projection (the official ``HybridEmbed(proj=False)``). Checks the input."""

    def __init__(self, backbone: MBConvStages, img_size: int, in_chans: int):
        super().__init__()
        fn = "ConvEmbed"
        self.img_size, self.in_chans = check_int(img_size, "img_size", fn), check_int(in_chans, "in_chans", fn)
        if img_size % backbone.stride:
            raise ValueError(f"{fn}: img_size={img_size} is not divisible by the total stride {backbone.stride} "
                             f"(stem x 2 per conv stage x strided conv); choose a multiple of {backbone.stride}")
        self.backbone = backbone
        self.grid_size = (img_size // backbone.stride,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "ViTamin")
        return self.backbone(x).flatten(2).transpose(1, 2)


def geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GeGLU's gate: gelu(a) * b (exact, erf GELU)."""
    return F.gelu(a) * b


class GeGLUMlp(nn.Module):
    """x -> LayerNorm -> w2( gelu(w0 x) * w1 x ), with dropout after the gate and after w2 (official ``GeGluMlp``)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, bias: bool = True):
        super().__init__()
        fn = "GeGLUMlp"
        check_int(in_features, "in_features", fn), check_int(hidden_features, "hidden_features", fn)
        check_number(drop, "drop", fn, low=0, high=1, high_open=True)
        self.norm = LayerNorm(in_features)
        self.w0 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.drop1 = nn.Dropout(drop)
        self.w2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.drop2(self.w2(self.drop1(geglu(self.w0(x), self.w1(x)))))


class GeGLUBlock(Block):
    """The course pre-norm ``Block`` with a ``GeGLUMlp`` (hidden ``int(dim * mlp_ratio)``) as its MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                         drop_path=drop_path)
        self.mlp = GeGLUMlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:  # no fused fc1+GELU kernel for the gated MLP
        return self.mlp(x)


class ViTamin(nn.Module):
    """ViTamin: ``MBConvStages`` -> tokens (+ learned positions) -> ``depth`` GeGLU blocks -> mean -> fc_norm -> head.

    ``forward_features`` gives the tokens [B, N, D], ``forward_head(..., pre_logits=True)`` the pooled, normed
    features [B, D] (what ``TinyCLIP`` reads); ``num_classes=0`` (default) makes ``forward`` return them too.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 0, stem_width: int = 64,
                 widths=(64, 128), depths=(2, 4), embed_dim: int = 384, depth: int = 14, num_heads: int = 6,
                 mlp_ratio: float = 2.0, *, stem_stride: int = 2, pool_stride: int = 2, qkv_bias: bool = True,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        fn = "ViTamin"
        self.num_classes = check_int(num_classes, "num_classes", fn, low=0)
        depth = check_int(depth, "depth", fn)
        embed_dim = check_int(embed_dim, "embed_dim", fn)
        if embed_dim % check_int(num_heads, "num_heads", fn):
            raise ValueError(f"{fn}: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"{fn}: mlp_ratio={mlp_ratio!r} gives a GeGLU of 0 hidden units at embed_dim={embed_dim}")
        for arg, val in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate),
                         ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            check_number(val, arg, fn, low=0, high=1, high_open=True)
        self.embed_dim = self.num_features = embed_dim
        self.global_pool, self.num_prefix_tokens = "avg", 0
        backbone = MBConvStages(in_chans, stem_width, widths, depths, embed_dim, stem_stride=stem_stride,
                                pool_stride=pool_stride)
        self.patch_embed = ConvEmbed(backbone, img_size, in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            GeGLUBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                       attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.Identity()  # average pooling: the final norm sits after the pool (timm's fc_norm)
        self.fc_norm = LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_(self)
        init_conv_(self.patch_embed)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> tokens [B, N, D] with positions added (before the blocks)."""
        return self.norm_pre(self.pos_drop(self.patch_embed(x) + self.pos_embed))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        g = self.grid_size
        return (f"img_size={self.patch_embed.img_size}, stride={self.patch_embed.backbone.stride}, "
                f"tokens={g[0]}x{g[1]}, dim={self.embed_dim}, depth={len(self.blocks)}")


def vitamin_tiny(**overrides) -> ViTamin:
    """The course's ViTamin-tiny: 32-px RGB, stem 16 (stride 1: total stride 8, 4 x 4 tokens), MBConv stages
    16 / 32 of 2 blocks each, a 4 x 64 GeGLU ViT (2 heads, ratio 2), pooled 64-d features (``num_classes=0``)."""
    cfg = dict(img_size=32, in_chans=3, num_classes=0, stem_width=16, widths=(16, 32), depths=(2, 2), embed_dim=64,
               depth=4, num_heads=2, mlp_ratio=2.0, stem_stride=1, pool_stride=2)
    return ViTamin(**(cfg | overrides))


def vitamin_small(**overrides) -> ViTamin:
    """The official ViTamin-S (``vitamin_small`` / timm ``vitamin_small_224``): 224 px, stem 64, stages 64 / 128
    (2 and 4 blocks), 14 x 384 GeGLU ViT with 6 heads, total stride 16 (14 x 14 tokens)."""
    cfg = dict(img_size=224, in_chans=3, num_classes=0, stem_width=64, widths=(64, 128), depths=(2, 4),
               embed_dim=384, depth=14, num_heads=6, mlp_ratio=2.0, stem_stride=2, pool_stride=2)
    return ViTamin(**(cfg | overrides))


def matched_vit(model: ViTamin, patch_size: int = 4, *, max_depth: int = 24, **overrides):
    """The plain-ViT baseline: a course ``VisionTransformer`` at ``model``'s image size, channels, width and heads
    (patch ``patch_size``, CLS pooling, ``num_classes`` as ``model``'s) whose depth gives MACs closest to
    ``model``'s (``vitlab.measure.macs`` on one image). Returns (vit, {"vitamin": macs, "vit": macs})."""
    from vitlab.measure import macs
    from vitlab.models import VisionTransformer

    if not isinstance(model, ViTamin):
        raise TypeError(f"matched_vit: model must be a ViTamin, got {type(model).__name__}")
    pe = model.patch_embed
    check_int(patch_size, "patch_size", "matched_vit")
    check_int(max_depth, "max_depth", "matched_vit")
    x = torch.zeros(1, pe.in_chans, pe.img_size, pe.img_size)
    target = macs(model, x)
    cfg = dict(img_size=pe.img_size, patch_size=patch_size, in_chans=pe.in_chans, num_classes=model.num_classes,
               embed_dim=model.embed_dim, num_heads=model.blocks[0].attn.num_heads) | overrides
    one = macs(VisionTransformer(**(cfg | {"depth": 1})), x)
    two = macs(VisionTransformer(**(cfg | {"depth": 2})), x)
    per_block, rest = two - one, 2 * one - two  # MACs are affine in depth
    depth = min(max(1, round((target - rest) / per_block)), max_depth)
    vit = VisionTransformer(**(cfg | {"depth": depth}))
    return vit, {"vitamin": target, "vit": rest + depth * per_block}



# ----------------------------------------------------------------------------------------------- the lesson's zoo
# A tiny CLIP on ``vitlab.vlm.caption_scenes`` (32 px) with either image tower, the same text tower (2 x 64
# bidirectional ``TextEncoder``, eos pooling), a 64-d joint space and CLIP's learnable, clamped temperature. Both
# towers train with the same steps, lr, data (the same 4,000 scenes, ``DATA_SEED``) and seeds (weights and batch
# order); only the image tower differs. The objective "clip" (none existed in the zoo) logs a val curve.
TOWERS = ("vitamin", "vit")
SEEDS = (0, 1, 2)
DATA_SEED = 0
STEPS = {"cpu": 2000, "gpu": 20000}  # smoke shares cpu's checkpoints (committed)
LONG_STEPS = {"cpu": 4000, "gpu": 40000}  # plateau evidence: seed 0 of each tower trained twice as long
FIT = dict(lr=1e-3, weight_decay=0.05, warmup=0.1, batch_size=64, grad_clip=1.0, label_smoothing=0.0)
EVAL_EVERY = 100  # val zero-shot and R@1 every EVAL_EVERY steps: the plateau curve


def clip_model(tower: str = "vitamin", img_size: int = 32, in_chans: int = 3, num_classes: int = 0, *,
               embed_dim: int = 64, text_dim: int = 64, text_depth: int = 2, text_heads: int = 2):
    """TinyCLIP with image tower ``tower`` ("vitamin": ``vitamin_tiny``; "vit": its ``matched_vit``, the course
    ViT of ~equal MACs) and a ``TextEncoder`` over the ``WordTokenizer``'s vocabulary. ``num_classes`` is ignored
    (the zoo passes the dataset's; a CLIP has no classifier head)."""
    from vitlab.vlm import TextEncoder, TinyCLIP, WordTokenizer

    check_choice(tower, TOWERS, "tower", "clip_model")
    image = vitamin_tiny(img_size=img_size, in_chans=in_chans)
    if tower == "vit":
        image, _ = matched_vit(image)
    text = TextEncoder(len(WordTokenizer()), dim=text_dim, depth=text_depth, num_heads=text_heads)
    return TinyCLIP(image, text, embed_dim=embed_dim)


def zero_shot_prompts(task: str = "object"):
    """(class names, prompt ensembles) of a zero-shot task on one-object scenes, every prompt a caption the
    generator could write: "object" (16 classes colour x shape; prompts over the 2 sizes x 5 places), "shape" or
    "colour" (4 classes; prompts over the other attributes: 40 each)."""
    from vitlab.vlm.data import _PHRASE, COLOURS, SHAPES, SIZES

    check_choice(task, ("object", "shape", "colour"), "task", "zero_shot_prompts")
    if task == "object":
        names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        return names, [[f"a {z} {c} {s} {ph}" for z in SIZES for ph in _PHRASE.values()]
                       for c in COLOURS for s in SHAPES]
    if task == "shape":
        return list(SHAPES), [[f"a {z} {c} {s} {ph}" for z in SIZES for c in COLOURS for ph in _PHRASE.values()]
                              for s in SHAPES]
    return list(COLOURS), [[f"a {z} {c} {s} {ph}" for z in SIZES for s in SHAPES for ph in _PHRASE.values()]
                           for c in COLOURS]


def zero_shot_accuracy(model, data, task: str = "object", *, ensemble: bool = True) -> float:
    """Zero-shot accuracy of a TinyCLIP on ``data``'s (``CaptionScenes``) one-object scenes for ``task``
    (``zero_shot_prompts``); ``ensemble=False`` uses each class's first prompt alone. Chance: 1 / classes."""
    from vitlab.vlm import CaptionScenes, zero_shot_classify
    from vitlab.vlm.data import COLOURS, SHAPES

    if not isinstance(data, CaptionScenes):
        raise TypeError(f"zero_shot_accuracy: data must be CaptionScenes, got {type(data).__name__}")
    names, prompts = zero_shot_prompts(task)
    one = [i for i, objs in enumerate(data.objects) if len(objs) == 1]
    if not one:
        raise ValueError("zero_shot_accuracy: these scenes hold no one-object scene to classify")
    objs = [data.objects[i][0] for i in one]
    if task == "object":
        y = [COLOURS.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape) for o in objs]
    else:
        y = [SHAPES.index(o.shape) if task == "shape" else COLOURS.index(o.colour) for o in objs]
    pred = zero_shot_classify(model, data.images[one], prompts if ensemble else [p[0] for p in prompts])
    return float((pred.cpu() == torch.tensor(y)).float().mean())


def measure(model, split: str = "test", *, n: int | None = None) -> dict:
    """A TinyCLIP's scores on ``caption_scenes(split, seed=DATA_SEED)``: zero-shot accuracy (``zs_object`` 16-way,
    ``zs_shape`` / ``zs_colour`` 4-way, prompt ensembles; ``zs_object_single``: one prompt per class) on the
    one-object scenes, and retrieval recall ``r1_i2t``, ``r1_t2i``, ``r5_i2t``, ``r5_t2i`` over all scenes."""
    from vitlab.vlm import TinyCLIP, WordTokenizer, caption_scenes, recall_at_k

    if not isinstance(model, TinyCLIP):
        raise TypeError(f"measure: model must be a TinyCLIP, got {type(model).__name__}")
    data = caption_scenes(split, seed=DATA_SEED, n=n)
    out = {f"zs_{t}": zero_shot_accuracy(model, data, t) for t in ("object", "shape", "colour")}
    out["zs_object_single"] = zero_shot_accuracy(model, data, "object", ensemble=False)
    ids, _ = WordTokenizer().batch_encode(list(data.captions), eos=True)
    for k in (1, 5):
        r = recall_at_k(model, data.images, ids, k)
        out[f"r{k}_i2t"], out[f"r{k}_t2i"] = r["i2t"], r["t2i"]
    return out


def clip_objective(data_seed: int = DATA_SEED, eval_every: int = EVAL_EVERY):
    """The zoo objective ``"clip"`` (``vitlab.vlm.contrastive_objective``): symmetric InfoNCE of each image of the
    batch with its caption (the dataset's labels are scene indices into ``caption_scenes("train", seed=data_seed)``).
    Every ``eval_every`` steps it logs val zero-shot (16-way object) accuracy and mean R@1 (the plateau curve); the
    checkpoint stores ``measure`` on test (``test_*``), on val (``val_*``) and that curve."""
    from vitlab.vlm import WordTokenizer, caption_scenes, contrastive_objective, recall_at_k

    data_seed = check_int(data_seed, "data_seed", "clip_objective", low=0)
    eval_every = check_int(eval_every, "eval_every", "clip_objective")
    val = {}

    def train_text(images):
        cs = caption_scenes("train", seed=data_seed, img_size=images.shape[-1])
        return WordTokenizer().batch_encode(list(cs.captions), eos=True)[0]

    def validate(net):
        if not val:
            val["scenes"] = caption_scenes("val", seed=data_seed)
            val["text"] = WordTokenizer().batch_encode(list(val["scenes"].captions), eos=True)[0]
        r1 = recall_at_k(net, val["scenes"].images, val["text"], 1)
        return zero_shot_accuracy(net, val["scenes"], "object"), (r1["i2t"] + r1["t2i"]) / 2

    return contrastive_objective(train_text, validate, measure, eval_every=eval_every, curve=("zs", "r1"))


def model_name(tower: str) -> str:
    """The registry model of an image tower: ``ch7_<tower>_clip``."""
    check_choice(tower, TOWERS, "tower", "model_name")
    return f"ch7_{tower}_clip"


def entry_name(tower: str, seed: int, long: bool = False) -> str:
    """The zoo entry ``ch7_<tower>_clip_s<seed>`` (``STEPS``), or with ``long=True`` ``ch7_<tower>_clip_long_s0``
    (``LONG_STEPS``, seed 0 only: the plateau check by a longer run)."""
    model_name(tower)
    return seeded_entry(f"ch7_{tower}_clip", seed, SEEDS, long)


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if model_name("vitamin") in MODELS:  # re-imported
        return
    zoo.register_objective("clip", clip_objective)
    for tower in TOWERS:
        register_model(model_name(tower), clip_model, tower=tower, img_size=32, in_chans=3, num_classes=0)
        for seed in SEEDS:
            zoo.register(entry_name(tower, seed), zoo.Recipe(
                model=model_name(tower), data="vlm_caption_scenes", data_kwargs=dict(img_size=32), fit=dict(FIT),
                seed=seed, data_seed=DATA_SEED,
                per_profile={p: dict(steps=n, max_train=None) for p, n in STEPS.items()},
                shares={"smoke": "cpu"}, objective="clip",
                objective_kwargs=dict(data_seed=DATA_SEED, eval_every=EVAL_EVERY)))
        zoo.register(entry_name(tower, 0, long=True), zoo.Recipe(
            model=model_name(tower), data="vlm_caption_scenes", data_kwargs=dict(img_size=32), fit=dict(FIT),
            seed=0, data_seed=DATA_SEED,
            per_profile={p: dict(steps=n, max_train=None) for p, n in LONG_STEPS.items()},
            shares={"smoke": "cpu"}, objective="clip",
            objective_kwargs=dict(data_seed=DATA_SEED, eval_every=2 * EVAL_EVERY)))


_register()
