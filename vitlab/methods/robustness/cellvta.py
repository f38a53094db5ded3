"""CellVTA: Enhancing Vision Foundation Models for Accurate Cell Segmentation and Classification (Y. Yang, X. Xu,
Y. Zhou, J. Zheng, 2025, arXiv:2504.00784; official code: JieZheng-ShanghaiTech/CellVTA,
``models/encoders/adapter_modules.py``: ``SpatialPriorModule``, ``Injector``, ``Extractor``, ``InteractionBlock``,
``deform_inputs``; ``models/segmentation/cell_segmentation/cellvit_adapter.py``: ``UNIAdapterEncoder.forward``;
``.../cellvit.py``: the CellViT decoder and ``freeze_encoder``; ``models/ops``: ``MSDeformAttn`` and the pure-torch
``ms_deform_attn_core_pytorch``).

The problem: a pathology foundation ViT sees 16-px patches (8 px here), and a nucleus is about that size. A patch
token therefore mixes a nucleus with its neighbours and background, and a decoder on the tokens alone has to guess
the boundaries. CellVTA keeps the foundation ViT frozen and adds a ViT-Adapter: a small CNN (spatial prior module)
makes a feature pyramid at 4x, 2x and 1x the token grid, and deformable cross-attention moves information both ways:

    c1 (8x grid), c2 (4x), c3 (2x), c4 (1x)  = SPM(image), each projected to the ViT width; c2..c4 + level embeddings
    c = concat(flatten(c2), flatten(c3), flatten(c4))                               the adapter tokens
    for each interaction k (a group of ViT blocks):
        x = x + gamma_k * MSDeformAttn(LN(x) -> LN(c), 3 levels)        Injector (gamma init 0: starts as the ViT)
        x = blocks_k(x)                                                   the frozen foundation blocks
        c = c + MSDeformAttn(LN(c) -> LN(x), 1 level); c = c + ConvFFN(LN(c))        Extractor (+2 at the end)
        out_k = x
    c1 = c1 + ConvT(c2);  c_k = c_k + bilinear_up(out_k);  f_k = BN(c_k)  ->  CellViT decoder (HoVer-Net heads)

MSDeformAttn: each query predicts, per head, level and point, an offset from its reference point (its own position
on the [0,1]^2 image plane) and a softmax weight; the values are sampled bilinearly there (``grid_sample``,
align_corners=False, zero padding) and summed with the weights. The decoder (CellViT) has three upsampling
branches on the pyramid: a binary nucleus map, horizontal/vertical distance maps (HV: each nucleus pixel's offset
from its nucleus's centre of mass, scaled to [-1, 1] per nucleus) and a type map. Post-processing (HoVer-Net):
the HV maps' gradients are large between touching nuclei; markers = foreground minus high-gradient pixels, grown
back over the foreground into instances.

    ds = vitlab.data.cells("train")                                  # 64 px tiles, nuclei radius 3-6 px
    vit = zoo.get(FOUNDATION)                                        # the "foundation": a ViT 4 x 64, patch 8
    net = CellSegmenter(vit, mode="adapter")                         # or "decoder" / "full" (CellViT)
    out = net(ds.images[:8])        # {"binary": [B,2,S,S], "hv": [B,2,S,S], "type": [B,4,S,S]}
    inst = instances_from_maps(out["binary"].softmax(1)[:, 1], out["hv"])  # [B,S,S] instance ids
    scores = segmentation_scores(net, ds)                            # dice, pq, dq, sq, aji, type_acc

Zoo entries (``_register``; smoke shares the cpu checkpoints):
    ch6_cellvta_foundation                    the foundation ViT: supervised on each tile's majority nucleus type
    ch6_cellvta_<mode>_s<seed>                fine-tunes: mode in MODES, seeds 0, 1, 2, equal steps and recipe;
                                              objective "cellvta_seg", ``uses=(FOUNDATION,)``

Modes (``MODES``), as the official ``freeze_encoder`` / ``unfreeze_epoch`` (PanNuke config: epochs 100,
unfreeze_epoch 101, so the ViT stays frozen for the whole CellVTA training):
    decoder   CellViT on the frozen ViT: only the decoder trains (the tokens of each block upsampled by deconvs)
    adapter   CellVTA: ViT frozen, adapter + decoder train
    full      CellViT with everything trained (the ViT too)

Our reading, and every deviation from the official code, named:
- Scale. UNI ViT-L/16 at 256 px (1024 wide, 24 blocks, 4 interactions of 6 blocks, SPM inplanes 64, 6 deformable
  heads, 4 points) becomes the course ViT 4 x 64 with 8-px patches at 64 px, 2 interactions of 2 blocks each
  (``NUM_INTERACTIONS``; the official pairs its 4 interaction outputs with the 4 pyramid levels, so with 2 the levels
  c1, c2 take the first interaction's output and c3, c4 the second's), SPM inplanes 8, 4 deformable heads, 4 points,
  ConvFFN ratio 0.25, 2 extra extractors after the last interaction. Sizes chosen for CPU time: at decoder widths
  16/32/48 and 4 interactions an adapter step took 4.6 s at batch 16.
- Pyramid strides. The official SPM stem ends with a stride-2 conv: c1 is 1/2 of the image = 8x the 16-px token
  grid. With 8-px patches we keep the levels' ratios to the token grid (c1 8x, c2 4x, c3 2x, c4 1x), so the stem
  has no stride-2 conv and c1 is at full resolution; ``deform_inputs`` takes the patch size (the official hard-codes
  /4, /8, /16 for patch 16). Likewise the decoder's last skip (f1) is at image resolution, so ``decoder1_upsampler``
  ends in a 1x1 conv instead of a stride-2 ConvTranspose.
- The official ``InteractionBlock`` runs the ViT blocks on the patch tokens without the CLS token (split before
  the injector, concatenated after); we do the same. The decoder-only and full baselines (CellViT) run the ViT as
  usual, CLS included, and take every block's patch tokens (``extract_layers`` = all 4 blocks).
- The official DWConv splits the adapter tokens by N // 21 (levels 16:4:1); ours splits by the level shapes (the
  same numbers whenever the ratios are 4x, 2x, 1x).
- MSDeformAttn is the official's pure-PyTorch core (``ms_deform_attn_core_pytorch``), never the CUDA op; no padding
  mask; reference points of 4 numbers (boxes) are not supported. Initialisation as the official
  ``_reset_parameters`` (offset bias on a ring of (i+1) pixels per point, zero attention logits).
- ``init_values``: the official CellVTA passes 1e-5 to the encoder but ``InteractionBlock`` gives it to the Injector
  as gamma; we start gamma at 0 (the ViT-Adapter default), so an untrained adapter is exactly the ViT.
- Widths of the CellViT decoder: official (skip 256/128, bottleneck 312 for ViTs under 512 wide) -> ``WIDTHS``
  (8, 8, 16, 24: decoder0, decoder1, decoder2, bottleneck) here. Dropout 0 as the official config (drop_rate 0).
- Heads and loss: binary (2), HV (2), type (4 = background + 3); no tissue head (our tiles have no tissue class).
  Loss weights as the official config (binary 1 + 1, HV mse 2.5 + msge 8, type CE 0.5 + dice 0.2) but binary
  focal-Tversky -> cross-entropy and the type map's multi-class focal Tversky (0.5) left out.
- HV targets: offset from the exact centre of mass (HoVer-Net rounds it and counts columns from 1), each sign scaled
  by its own maximum |offset| within the nucleus, as HoVer-Net. The msge loss uses 5 x 5 Sobel kernels as HoVer-Net.
- Post-processing: HoVer-Net's marker rule with small-scale constants (Sobel 5 instead of 21, threshold 0.4,
  minimum object 3 px instead of 10, no morphological opening), and "watershed-lite": markers grow by breadth-first
  dilation within the foreground (each pass, unlabelled foreground pixels next to a marker take the largest
  adjacent label) instead of a watershed on the distance map (no skimage here). scipy.ndimage labels components.
- Metrics: binary Dice and PQ (= DQ x SQ, a predicted/true pair matches at IoU > 0.5, per image then averaged over
  images, as CellViT's bPQ); AJI per image, averaged. Images with no nuclei in both count 1.
- Training: the course's ``fit`` (AdamW, cosine, warm-up), batch 8, 250 steps (cpu), lr 1e-3 for every mode,
  instead of AdamW (0.85, 0.95), lr 3e-4, exponential decay 0.85, 100 epochs, heavy augmentation.
- The foundation: not UNI (DINOv2 on 100k WSIs) but the course ViT trained on our cells to classify each tile's
  majority nucleus type.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_choice, check_int, check_number
from vitlab.models.registry import MODELS, register_model
from vitlab.models.vit import VisionTransformer

__all__ = ["ms_deform_attn_core", "MSDeformAttn", "reference_points", "deform_inputs", "ConvFFN", "Injector",
           "Extractor", "InteractionBlock", "SpatialPriorModule", "AdapterEncoder", "CellViTDecoder",
           "CellSegmenter", "cellvta_model", "hv_targets", "hv_gradient", "instances_from_maps", "dice_score",
           "panoptic_quality", "aggregated_jaccard", "segmentation_loss", "segmentation_scores",
           "segmentation_objective", "MODES", "SEEDS", "FOUNDATION", "FOUNDATION_CONFIG", "FINETUNE",
           "FINETUNE_STEPS", "entry_name", "measure", "MEASURE_KEY"]

MODES = ("decoder", "adapter", "full")
SEEDS = (0, 1, 2)
NUM_TYPES = 4  # background + lymphocyte, epithelial, stromal
LOSS_WEIGHTS = dict(binary_ce=1.0, binary_dice=1.0, hv_mse=2.5, hv_msge=8.0, type_ce=0.5, type_dice=0.2)
DEFORM_HEADS, N_POINTS, CFFN_RATIO, SPM_INPLANES = 4, 4, 0.25, 8
WIDTHS = (8, 8, 16, 24)  # decoder0, decoder1, decoder2, bottleneck
NUM_INTERACTIONS = 2
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------- deformable attention
def ms_deform_attn_core(value: Tensor, shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention, the official pure-torch core. value [N, S, M, D] (S = sum of H_l W_l, M
    heads), shapes [(H_l, W_l)] (list or int tensor [L, 2]), locations [N, Lq, M, L, P, 2] as (x, y) in [0, 1]
    (outside: zeros), weights [N, Lq, M, L, P]. Returns [N, Lq, M * D]: per query and head, the weighted sum of the
    values bilinearly sampled at the locations (``grid_sample``, align_corners=False)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    shapes = [(int(h), int(w)) for h, w in shapes]
    if sum(h * w for h, w in shapes) != S or len(shapes) != L:
        raise ValueError(f"ms_deform_attn_core: shapes {shapes} do not fit value ({S} tokens) and {L} levels")
    grids = 2 * locations - 1
    sampled = []
    for lvl, (part, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = part.flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention of queries [N, Lq, C] over a flattened multi-level map [N, S, C]: per head, level and
    point an offset (in pixels of that level, from the query's reference point) and a softmax weight over levels x
    points. Parameter names and initialisation as the official ``models/ops/modules/ms_deform_attn.py``."""

    def __init__(self, d_model: int = 64, n_levels: int = 1, n_heads: int = 4, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        fn = "MSDeformAttn"
        d_model, n_levels = check_int(d_model, "d_model", fn), check_int(n_levels, "n_levels", fn)
        n_heads, n_points = check_int(n_heads, "n_heads", fn), check_int(n_points, "n_points", fn)
        ratio = check_number(ratio, "ratio", fn, low=0, low_open=True)
        if d_model % n_heads or int(d_model * ratio) % n_heads:
            raise ValueError(f"{fn}: n_heads={n_heads} must divide d_model={d_model} (and d_model * ratio)")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.ratio = ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, int(d_model * ratio))
        self.output_proj = nn.Linear(int(d_model * ratio), d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, ref: Tensor, feat: Tensor, shapes: Tensor, start_index: Tensor | None = None
                ) -> Tensor:
        """query [N, Lq, C], ref [N or 1, Lq, L, 2] (x, y in [0, 1]), feat [N, S, C], shapes int [L, 2];
        ``start_index`` (the official argument) is implied by ``shapes`` and unused. Returns [N, Lq, C]."""
        N, Lq, _ = query.shape
        S = feat.shape[1]
        if ref.ndim != 4 or ref.shape[-1] != 2 or ref.shape[1] != Lq:
            raise ValueError(f"MSDeformAttn: ref must be [N, {Lq}, levels, 2] (x, y), got {tuple(ref.shape)}")
        if shapes.shape != (self.n_levels, 2) or int((shapes[:, 0] * shapes[:, 1]).sum()) != S:
            raise ValueError(f"MSDeformAttn: shapes {shapes.tolist()} must list {self.n_levels} levels whose sizes sum "
                             f"to the {S} feature tokens")
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(feat).view(N, S, M, -1)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(offsets.dtype)  # (W, H): offsets in pixels
        locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(value, shapes.tolist(), locations, weights))


def reference_points(shapes, device=None) -> Tensor:
    """[1, sum H_l W_l, 1, 2]: the (x, y) centre of every cell of every level, in [0, 1] (official
    ``get_reference_points``)."""
    refs = []
    for h, w in shapes:
        h, w = int(h), int(w)
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                                torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    return torch.cat(refs, 0)[None, :, None]


def deform_inputs(x: Tensor, patch_size: int):
    """(injector inputs, extractor inputs), each [reference points, level shapes, level start index]: the injector's
    queries are the ViT tokens (grid S/p) over the adapter levels at 4x, 2x, 1x that grid; the extractor's queries
    are the adapter tokens over the one ViT level. Official ``deform_inputs`` with /4, /8, /16 -> p/4, p/2, p."""
    check_int(patch_size, "patch_size", "deform_inputs", low=4)
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"deform_inputs: x must be an image batch [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    h, w = x.shape[-2:]
    if h % patch_size or w % patch_size or patch_size % 4:
        raise ValueError(f"deform_inputs: patch_size {patch_size} must be a multiple of 4 dividing the image {h}x{w}")
    levels = [(h // (patch_size // 4), w // (patch_size // 4)), (h // (patch_size // 2), w // (patch_size // 2)),
              (h // patch_size, w // patch_size)]
    dev = x.device

    def start(shapes: Tensor) -> Tensor:
        return torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))

    s1 = torch.as_tensor(levels, dtype=torch.long, device=dev)
    inputs1 = [reference_points(levels[2:], dev), s1, start(s1)]
    s2 = torch.as_tensor(levels[2:], dtype=torch.long, device=dev)
    inputs2 = [reference_points(levels, dev), s2, start(s2)]
    return inputs1, inputs2


# ------------------------------------------------------------------------------------------- adapter modules
class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv per level (tokens laid back on their grids) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, shapes) -> Tensor:
        x = self.fc1(x)
        B, _, C = x.shape
        parts = []
        for part, (h, w) in zip(x.split([int(h) * int(w) for h, w in shapes], dim=1), shapes):
            grid = part.transpose(1, 2).reshape(B, C, int(h), int(w))
            parts.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return self.fc2(self.act(torch.cat(parts, 1)))


class Injector(nn.Module):
    """ViT tokens query the adapter pyramid: ``x + gamma * MSDeformAttn(LN(x), LN(c))`` (3 levels; gamma init 0)."""

    def __init__(self, dim: int, num_heads: int = DEFORM_HEADS, n_points: int = N_POINTS, n_levels: int = 3,
                 init_values: float = 0.0):
        super().__init__()
        self.query_norm, self.feat_norm = LayerNorm(dim), LayerNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query: Tensor, ref: Tensor, feat: Tensor, shapes: Tensor, start_index=None) -> Tensor:
        return query + self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Adapter tokens query the ViT tokens (1 level): ``c + MSDeformAttn(LN(c), LN(x))``, then
    ``c + ConvFFN(LN(c))`` (on the adapter levels ``c_shapes``)."""

    def __init__(self, dim: int, num_heads: int = DEFORM_HEADS, n_points: int = N_POINTS, with_cffn: bool = True,
                 cffn_ratio: float = CFFN_RATIO):
        super().__init__()
        self.query_norm, self.feat_norm = LayerNorm(dim), LayerNorm(dim)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, max(1, int(dim * cffn_ratio)))
            self.ffn_norm = LayerNorm(dim)

    def forward(self, query: Tensor, ref: Tensor, feat: Tensor, shapes: Tensor, c_shapes) -> Tensor:
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)
        if self.with_cffn:
            query = query + self.ffn(self.ffn_norm(query), c_shapes)
        return query


class InteractionBlock(nn.Module):
    """Injector -> the ViT blocks (patch tokens only; the CLS token waits aside) -> Extractor (+ 2 extra extractors
    when ``extra_extractor``). ``forward(x, c, blocks, inputs1, inputs2) -> (x, c)``; x keeps its CLS token first."""

    def __init__(self, dim: int, num_heads: int = DEFORM_HEADS, n_points: int = N_POINTS, with_cffn: bool = True,
                 cffn_ratio: float = CFFN_RATIO, init_values: float = 0.0, extra_extractor: bool = False):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, 3, init_values)
        self.extractor = Extractor(dim, num_heads, n_points, with_cffn, cffn_ratio)
        self.extra_extractors = nn.Sequential(*[Extractor(dim, num_heads, n_points, with_cffn, cffn_ratio)
                                                for _ in range(2)]) if extra_extractor else None

    def forward(self, x: Tensor, c: Tensor, blocks, inputs1, inputs2, num_prefix_tokens: int = 1):
        prefix, x = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        x = self.injector(x, inputs1[0], c, inputs1[1])
        for blk in blocks:
            x = blk(x)
        c_shapes = inputs1[1].tolist()  # the adapter's levels
        c = self.extractor(c, inputs2[0], x, inputs2[1], c_shapes)
        if self.extra_extractors is not None:
            for ext in self.extra_extractors:
                c = ext(c, inputs2[0], x, inputs2[1], c_shapes)
        return torch.cat([prefix, x], 1), c


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """The CNN beside the ViT: c1 (8x the token grid, ``inplanes``), c2 (4x, 2 inplanes), c3 (2x, 4), c4 (1x, 4),
    each projected to ``embed_dim`` by a 1x1 conv. Returns c1 as a map [B, D, H1, W1] and c2..c4 flattened to tokens
    [B, H_l W_l, D]. The official stem's final stride-2 conv is stride 1 here (8-px patches, see the docstring)."""

    def __init__(self, inplanes: int = SPM_INPLANES, embed_dim: int = 64, in_chans: int = 3):
        super().__init__()
        p = check_int(inplanes, "inplanes", "SpatialPriorModule")
        self.stem = nn.Sequential(*_conv_bn_relu(in_chans, p), *_conv_bn_relu(p, p), *_conv_bn_relu(p, p),
                                  nn.Conv2d(p, p, 3, 1, 1, bias=False))
        self.conv2 = nn.Sequential(*_conv_bn_relu(p, p), *_conv_bn_relu(p, 2 * p, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * p, 2 * p), *_conv_bn_relu(2 * p, 4 * p, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * p, 4 * p), *_conv_bn_relu(4 * p, 4 * p, 2))
        self.fc1 = nn.Conv2d(p, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * p, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * p, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * p, embed_dim, 1)

    def forward(self, x: Tensor):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1, c2, c3, c4 = self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)
        return c1, *(c.flatten(2).transpose(1, 2) for c in (c2, c3, c4))


def _init_adapter(m: nn.Module) -> None:
    """The official ``_init_weights_vit_adapter``."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class AdapterEncoder(nn.Module):
    """The adapter around a (frozen) course ViT (``UNIAdapterEncoder.forward``): SPM -> interactions over groups of
    blocks -> pyramid [f1, f2, f3, f4] at 8x, 4x, 2x, 1x the token grid, each [B, D, h, w] (BatchNorm'd). The ViT
    is not a submodule here (``CellSegmenter`` holds it), so the adapter's parameters are exactly ``adapter.*``."""

    def __init__(self, vit: VisionTransformer, num_interactions: int = 4, inplanes: int = SPM_INPLANES,
                 num_heads: int = DEFORM_HEADS, n_points: int = N_POINTS, cffn_ratio: float = CFFN_RATIO,
                 extra_extractor: bool = True):
        super().__init__()
        fn = "AdapterEncoder"
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"{fn}: vit must be a course VisionTransformer, got {type(vit).__name__}")
        depth = len(vit.blocks)
        n = check_int(num_interactions, "num_interactions", fn, high=depth)
        if depth % n:
            raise ValueError(f"{fn}: num_interactions={n} must divide the ViT depth {depth}")
        self.groups = [list(range(i * depth // n, (i + 1) * depth // n)) for i in range(n)]
        dim, self.patch_size = vit.embed_dim, vit.patch_embed.patch_size
        self.patch_size = self.patch_size[0] if isinstance(self.patch_size, tuple) else int(self.patch_size)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(inplanes, dim, vit.patch_embed.proj.in_channels)
        self.interactions = nn.Sequential(*[
            InteractionBlock(dim, num_heads, n_points, True, cffn_ratio, 0.0, extra_extractor and i == n - 1)
            for i in range(n)])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        self.apply(_init_adapter)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, vit: VisionTransformer, x: Tensor) -> list[Tensor]:
        inputs1, inputs2 = deform_inputs(x, self.patch_size)
        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]
        n2, n3 = c2.shape[1], c3.shape[1]
        c = torch.cat([c2, c3, c4], 1)
        tokens = vit.embed(x)  # [B, prefix + HW, D], positions added
        B, _, D = tokens.shape
        H, W = vit.grid_size
        outs = []
        for layer, idx in zip(self.interactions, self.groups):
            tokens, c = layer(tokens, c, [vit.blocks[i] for i in idx], inputs1, inputs2, vit.num_prefix_tokens)
            outs.append(tokens[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(B, D, H, W))
        c2 = c[:, :n2].transpose(1, 2).reshape(B, D, 4 * H, 4 * W)
        c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(B, D, 2 * H, 2 * W)
        c4 = c[:, n2 + n3:].transpose(1, 2).reshape(B, D, H, W)
        c1 = self.up(c2) + c1
        k = len(outs)
        # the official adds out_k to level k (4 interactions); with fewer, level j takes interaction j * k // 4
        x1, x2, x3, x4 = (outs[j * k // 4] for j in range(4))
        c1 = c1 + F.interpolate(x1, scale_factor=8, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x2, scale_factor=4, mode="bilinear", align_corners=False)
        c3 = c3 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
        c4 = c4 + x4
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]


# ------------------------------------------------------------------------------------------------- decoder
def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """CellViT's Conv2DBlock: conv 3x3 -> BN -> ReLU (dropout 0)."""
    return nn.Sequential(*_conv_bn_relu(cin, cout))


def _deconv_block(cin: int, cout: int) -> nn.Sequential:
    """CellViT's Deconv2DBlock: ConvTranspose 2x2 stride 2 -> conv 3x3 -> BN -> ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2), *_conv_bn_relu(cout, cout))


class CellViTDecoder(nn.Module):
    """CellViT's decoder on a 4-level pyramid: skip decoders ``decoder0`` (the image), ``decoder1..3`` (f1..f3) and
    three branches (binary, HV, type), each bottleneck deconv -> cat/conv/upsample x 3 -> header. ``pyramid``:
    "tokens" (CellViT: f1..f4 are the ViT's 8x8 token maps, upsampled by deconvs in decoder1..3) or "adapter"
    (CellVTA: f1..f4 already at 8x, 4x, 2x, 1x the grid, so decoder1..3 are plain conv blocks)."""

    def __init__(self, dim: int, pyramid: str = "tokens", in_chans: int = 3, widths=WIDTHS,
                 num_types: int = NUM_TYPES):
        super().__init__()
        check_choice(pyramid, ("tokens", "adapter"), "pyramid", "CellViTDecoder")
        d0, d1, d2, b = widths
        self.decoder0 = nn.Sequential(_conv_block(in_chans, d0 // 2), _conv_block(d0 // 2, d0))
        if pyramid == "tokens":
            self.decoder1 = nn.Sequential(_deconv_block(dim, d2), _deconv_block(d2, d1), _deconv_block(d1, d1))
            self.decoder2 = nn.Sequential(_deconv_block(dim, d2), _deconv_block(d2, d2))
            self.decoder3 = nn.Sequential(_deconv_block(dim, b))
        else:
            self.decoder1 = nn.Sequential(_conv_block(dim, d1), _conv_block(d1, d1))
            self.decoder2 = nn.Sequential(_conv_block(dim, d2), _conv_block(d2, d2))
            self.decoder3 = nn.Sequential(_conv_block(dim, b), _conv_block(b, b))
        # official names: nuclei_binary_map_decoder, hv_map_decoder, nuclei_type_maps_decoder
        self.heads = nn.ModuleDict({f"{k}_decoder": self._branch(dim, widths, n) for k, n in
                                    (("binary", 2), ("hv", 2), ("type", num_types))})

    @staticmethod
    def _branch(dim: int, widths, out: int) -> nn.ModuleDict:
        d0, d1, d2, b = widths
        return nn.ModuleDict(dict(
            bottleneck_upsampler=_deconv_block(dim, b),
            decoder3_upsampler=nn.Sequential(_conv_block(2 * b, b), _conv_block(b, b), _conv_block(b, b),
                                             nn.ConvTranspose2d(b, d2, 2, 2)),
            decoder2_upsampler=nn.Sequential(_conv_block(2 * d2, d2), _conv_block(d2, d2),
                                             nn.ConvTranspose2d(d2, d1, 2, 2)),
            decoder1_upsampler=nn.Sequential(_conv_block(2 * d1, d1), _conv_block(d1, d1), nn.Conv2d(d1, d0, 1)),
            decoder0_header=nn.Sequential(_conv_block(2 * d0, d0), _conv_block(d0, d0), nn.Conv2d(d0, out, 1))))

    def forward(self, image: Tensor, pyramid: list[Tensor]) -> dict:
        f1, f2, f3, f4 = pyramid
        s0, s1, s2, s3 = self.decoder0(image), self.decoder1(f1), self.decoder2(f2), self.decoder3(f3)
        out = {}
        for name, br in self.heads.items():
            y = br["bottleneck_upsampler"](f4)
            y = br["decoder3_upsampler"](torch.cat([s3, y], 1))
            y = br["decoder2_upsampler"](torch.cat([s2, y], 1))
            y = br["decoder1_upsampler"](torch.cat([s1, y], 1))
            out[name[:-len("_decoder")]] = br["decoder0_header"](torch.cat([s0, y], 1))
        return out


class CellSegmenter(nn.Module):
    """A course ViT with a CellViT decoder: ``mode`` "decoder" / "full" (CellViT: the decoder reads every block's
    patch tokens) or "adapter" (CellVTA: the adapter's pyramid). ``forward(images) -> {"binary": [B,2,S,S],
    "hv": [B,2,S,S], "type": [B,4,S,S]}``. Parameters: ``vit.*``, ``adapter.*`` (adapter mode), ``decoder.*``;
    which of them train is the recipe's (``FINETUNE_TRAINABLE``)."""

    def __init__(self, vit: VisionTransformer, mode: str = "adapter", num_interactions: int = NUM_INTERACTIONS,
                 widths=WIDTHS):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"CellSegmenter: vit must be a course VisionTransformer, got {type(vit).__name__}")
        self.mode = check_choice(mode, MODES, "mode", "CellSegmenter")
        if len(vit.blocks) < 4 and mode != "adapter":
            raise ValueError(f"CellSegmenter: the CellViT pyramid needs a ViT of >= 4 blocks, got {len(vit.blocks)}")
        self.vit = vit
        self.adapter = AdapterEncoder(vit, num_interactions) if mode == "adapter" else None
        self.decoder = CellViTDecoder(vit.embed_dim, "adapter" if mode == "adapter" else "tokens",
                                      vit.patch_embed.proj.in_channels, widths)
        depth = len(vit.blocks)
        self.extract = [(i + 1) * depth // 4 - 1 for i in range(4)]  # CellViT's extract_layers, evenly spaced

    def pyramid(self, x: Tensor) -> list[Tensor]:
        if self.adapter is not None:
            return self.adapter(self.vit, x)
        t = self.vit.embed(x)
        B, _, D = t.shape
        H, W = self.vit.grid_size
        maps = []
        for i, blk in enumerate(self.vit.blocks):
            t = blk(t)
            if i in self.extract:
                maps.append(t[:, self.vit.num_prefix_tokens:].transpose(1, 2).reshape(B, D, H, W))
        return maps

    def forward(self, x: Tensor) -> dict:
        ps = self.vit.patch_embed.patch_size
        p = ps[0] if isinstance(ps, tuple) else int(ps)
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"CellSegmenter: x must be an image batch [B, C, H, W] with H, W multiples of the patch "
                             f"size {p}, got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return self.decoder(x, self.pyramid(x))


FOUNDATION_CONFIG = dict(img_size=64, patch_size=8, in_chans=3, num_classes=3, embed_dim=64, depth=4, num_heads=4,
                         mlp_ratio=4.0)


def cellvta_model(mode: str = "adapter", pretrained: str | None = None, num_classes: int = 3,
                  **vit_kwargs) -> CellSegmenter:
    """The model registry's builder: a ViT of ``FOUNDATION_CONFIG`` (overridden by ``vit_kwargs``), loaded from the
    zoo entry ``pretrained`` when given (strictly: the foundation's weights), in a ``CellSegmenter`` of ``mode``.
    ``num_classes`` (a dataset's) does not apply: the heads are fixed."""
    cfg = {**FOUNDATION_CONFIG, **vit_kwargs}
    vit = VisionTransformer(**cfg)
    if pretrained is not None:
        from vitlab import zoo

        vit.load_state_dict(zoo.get(pretrained, progress=False).state_dict(), strict=True)
    return CellSegmenter(vit, mode)


# ------------------------------------------------------------------------------- targets, post-processing
def hv_targets(instances: Tensor) -> Tensor:
    """[B, 2, H, W] float: (horizontal, vertical) offset of each nucleus pixel from its nucleus's centre of mass,
    negative and positive parts each divided by their largest magnitude within the nucleus (so in [-1, 1]); 0 on
    background. ``instances`` int [B, H, W] (0 background)."""
    if not isinstance(instances, Tensor) or instances.ndim != 3 or instances.is_floating_point():
        raise ValueError(f"hv_targets: instances must be an integer tensor [B, H, W], got "
                         f"{getattr(instances, 'dtype', type(instances).__name__)} "
                         f"{tuple(getattr(instances, 'shape', ()))}")
    B, H, W = instances.shape
    inst = instances.long()
    K = int(inst.max()) + 1 if inst.numel() else 1
    ids = inst + K * torch.arange(B, device=inst.device).view(B, 1, 1)  # unique over the batch
    flat = ids.flatten()
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=inst.device),
                            torch.arange(W, dtype=torch.float32, device=inst.device), indexing="ij")
    xs, ys = xx.expand(B, H, W).flatten(), yy.expand(B, H, W).flatten()
    n = torch.bincount(flat, minlength=B * K).float().clamp(min=1)
    cx = torch.bincount(flat, xs, minlength=B * K) / n
    cy = torch.bincount(flat, ys, minlength=B * K) / n
    out = []
    for coord, centre in ((xs, cx), (ys, cy)):
        d = coord - centre[flat]
        neg = torch.zeros(B * K, device=inst.device).scatter_reduce(0, flat, (-d).clamp(min=0), "amax")
        pos = torch.zeros(B * K, device=inst.device).scatter_reduce(0, flat, d.clamp(min=0), "amax")
        d = torch.where(d < 0, d / neg[flat].clamp(min=1e-6), d / pos[flat].clamp(min=1e-6))
        out.append(torch.where(inst.flatten() > 0, d, torch.zeros_like(d)).view(B, H, W))
    return torch.stack(out, 1)


def _sobel(size: int = 5, device=None) -> tuple[Tensor, Tensor]:
    """HoVer-Net's ``get_sobel_kernel``: (kernel_h, kernel_v), [size, size]."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    h, v = torch.meshgrid(r, r, indexing="xy")
    kh = h / (h * h + v * v + 1e-15)
    kv = v / (h * h + v * v + 1e-15)
    return kh, kv


def hv_gradient(hv: Tensor, size: int = 5) -> Tensor:
    """[B, 2, H, W]: d(h)/dx and d(v)/dy of an HV map by Sobel kernels (HoVer-Net's ``get_gradient_hv``)."""
    kh, kv = _sobel(size, hv.device)
    h = F.conv2d(hv[:, :1], kh[None, None].to(hv.dtype), padding=size // 2)
    v = F.conv2d(hv[:, 1:], kv[None, None].to(hv.dtype), padding=size // 2)
    return torch.cat([h, v], 1)


def instances_from_maps(prob: Tensor, hv: Tensor, *, threshold: float = 0.5, edge: float = 0.4,
                        min_size: int = 3) -> Tensor:
    """HoVer-Net post-processing, small-scale: foreground = prob > threshold (components under ``min_size`` px
    dropped); edge energy = max of the min-max-normalised Sobel gradients of h and v (ksize 5); markers = foreground
    where energy < ``edge`` (holes filled, components >= ``min_size``), grown back over the foreground by
    breadth-first dilation. prob [B, H, W], hv [B, 2, H, W] -> int64 instance ids [B, H, W]."""
    from scipy import ndimage

    if not isinstance(prob, Tensor) or prob.ndim != 3:
        raise ValueError(f"instances_from_maps: prob must be [B, H, W], got "
                         f"{tuple(prob.shape) if isinstance(prob, Tensor) else type(prob).__name__}")
    if not isinstance(hv, Tensor) or hv.shape != (prob.shape[0], 2, *prob.shape[1:]):
        raise ValueError(f"instances_from_maps: hv must be [B, 2, H, W] matching prob {tuple(prob.shape)}, got "
                         f"{tuple(hv.shape) if isinstance(hv, Tensor) else type(hv).__name__}")
    check_number(threshold, "threshold", "instances_from_maps", low=0, high=1)
    check_number(edge, "edge", "instances_from_maps", low=0, high=1)
    min_size = check_int(min_size, "min_size", "instances_from_maps", low=0)
    hv = hv.detach().float().cpu()
    mins = hv.flatten(2).min(-1).values[..., None, None]
    maxs = hv.flatten(2).max(-1).values[..., None, None]
    hvn = (hv - mins) / (maxs - mins).clamp(min=1e-8)
    grad = hv_gradient(hvn)
    gmin, gmax = grad.flatten(2).min(-1).values[..., None, None], grad.flatten(2).max(-1).values[..., None, None]
    energy = (1 - (grad - gmin) / (gmax - gmin).clamp(min=1e-8)).amax(1)  # [B, H, W]
    fg_all = (prob.detach().float().cpu() > threshold).numpy()
    energy = energy.numpy()
    out = np.zeros(fg_all.shape, dtype=np.int64)
    struct = np.ones((3, 3), dtype=bool)

    def drop_small(lab: np.ndarray) -> np.ndarray:
        if min_size <= 1 or lab.max() == 0:
            return lab
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        lab = lab.copy()
        lab[small[lab]] = 0
        return lab

    for i in range(fg_all.shape[0]):
        fg, _ = ndimage.label(fg_all[i])
        fg = drop_small(fg) > 0
        if not fg.any():
            continue
        e = energy[i] * fg
        marker = fg & ~(e >= edge)
        marker = ndimage.binary_fill_holes(marker)
        markers, _ = ndimage.label(marker)
        markers = drop_small(markers)
        if markers.max() == 0:  # no interior anywhere: the components themselves
            markers, _ = ndimage.label(fg)
        while True:  # watershed-lite: grow markers over the foreground, one pixel ring per pass
            todo = fg & (markers == 0)
            if not todo.any():
                break
            grown = ndimage.grey_dilation(markers, footprint=struct)
            take = todo & (grown > 0)
            if not take.any():  # foreground unreachable from any marker: a component of its own
                extra, _ = ndimage.label(todo)
                markers = np.where(todo & (extra > 0), extra + markers.max(), markers)
                break
            markers = np.where(take, grown, markers)
        _, relabel = np.unique(markers, return_inverse=True)
        out[i] = relabel.reshape(markers.shape)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------- metrics
def dice_score(pred: Tensor, target: Tensor) -> Tensor:
    """Per image binary Dice 2|P n T| / (|P| + |T|) of foreground masks [B, H, W] (1 where both are empty)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"dice_score: pred and target must be masks of one shape [B, H, W], got "
                         f"{getattr(pred, 'shape', type(pred).__name__)} and "
                         f"{getattr(target, 'shape', type(target).__name__)}")
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (p & t).sum(1).float()
    total = (p.sum(1) + t.sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def _pairwise_iou(true: np.ndarray, pred: np.ndarray):
    """(IoU [T, P], intersections [T, P], true sizes [T], pred sizes [P]) of the instances 1..T and 1..P."""
    nt, npred = int(true.max()), int(pred.max())
    joint = np.bincount(true.ravel() * (npred + 1) + pred.ravel(), minlength=(nt + 1) * (npred + 1))
    joint = joint.reshape(nt + 1, npred + 1)
    ts, ps = joint.sum(1), joint.sum(0)
    inter = joint[1:, 1:].astype(np.float64)
    union = ts[1:, None] + ps[None, 1:] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou, inter, ts[1:], ps[1:]


def _relabel(x: np.ndarray) -> np.ndarray:
    _, inv = np.unique(x, return_inverse=True)
    inv = inv.reshape(x.shape)
    return inv if x.min() == 0 else inv + 1


def panoptic_quality(true: Tensor, pred: Tensor) -> dict:
    """Per image PQ = DQ x SQ of instance maps [B, H, W] (0 background; ids need not be consecutive): a true and a
    predicted instance match at IoU > 0.5 (unique); DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches.
    Returns {"pq", "dq", "sq"} as float tensors [B] (1 where both maps are empty; SQ 0 without matches)."""
    if not isinstance(true, Tensor) or not isinstance(pred, Tensor) or true.shape != pred.shape or true.ndim != 3:
        raise ValueError(f"panoptic_quality: true and pred must be instance maps of one shape [B, H, W], got "
                         f"{getattr(true, 'shape', type(true).__name__)} and "
                         f"{getattr(pred, 'shape', type(pred).__name__)}")
    pqs, dqs, sqs = [], [], []
    for t, p in zip(true.long().cpu().numpy(), pred.long().cpu().numpy()):
        t, p = _relabel(t), _relabel(p)
        nt, npred = int(t.max()), int(p.max())
        if nt == 0 and npred == 0:
            pqs.append(1.0), dqs.append(1.0), sqs.append(1.0)
            continue
        iou = _pairwise_iou(t, p)[0] if nt and npred else np.zeros((nt, npred))
        matched = iou > 0.5
        tp = int(matched.sum())
        fp, fn = npred - tp, nt - tp
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou[matched].sum() / tp) if tp else 0.0
        pqs.append(dq * sq), dqs.append(dq), sqs.append(sq)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in (("pq", pqs), ("dq", dqs), ("sq", sqs))}


def aggregated_jaccard(true: Tensor, pred: Tensor) -> Tensor:
    """Per image AJI (Kumar et al. 2017): each true instance takes the predicted one of largest IoU; sum of their
    intersections over the sum of their unions plus the areas of the predicted instances never taken. [B] floats
    (1 where both maps are empty)."""
    if not isinstance(true, Tensor) or not isinstance(pred, Tensor) or true.shape != pred.shape or true.ndim != 3:
        raise ValueError(f"aggregated_jaccard: true and pred must be instance maps of one shape [B, H, W], got "
                         f"{tuple(getattr(true, 'shape', ()))} and {tuple(getattr(pred, 'shape', ()))}")
    out = []
    for t, p in zip(true.long().cpu().numpy(), pred.long().cpu().numpy()):
        t, p = _relabel(t), _relabel(p)
        nt, npred = int(t.max()), int(p.max())
        if nt == 0 and npred == 0:
            out.append(1.0)
            continue
        if nt == 0 or npred == 0:
            out.append(0.0)
            continue
        iou, inter, ts, ps = _pairwise_iou(t, p)
        best = iou.argmax(1)
        has = iou[np.arange(nt), best] > 0
        i_sum = inter[np.arange(nt), best][has].sum()
        u_sum = (ts[has] + ps[best[has]] - inter[np.arange(nt), best][has]).sum() + ts[~has].sum()
        unused = np.ones(npred, dtype=bool)
        unused[best[has]] = False
        u_sum += ps[unused].sum()
        out.append(float(i_sum / u_sum) if u_sum else 0.0)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- loss, scores
def _soft_dice_loss(probs: Tensor, onehot: Tensor) -> Tensor:
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1e-6) / (total + 1e-6)).mean()


def segmentation_loss(out: dict, masks: Tensor) -> Tensor:
    """CellViT's loss on the three heads (weights ``LOSS_WEIGHTS``): binary CE + Dice, HV MSE + MSGE (gradient MSE
    on nucleus pixels), type CE + Dice. ``masks`` int [B, H, W] = instances * TYPE_CODE + types (``cells``)."""
    from vitlab.data.cells import split_masks

    inst, types = split_masks(masks)
    fg = (inst > 0).long()
    w = LOSS_WEIGHTS
    b = out["binary"].float()
    loss = w["binary_ce"] * F.cross_entropy(b, fg)
    loss = loss + w["binary_dice"] * _soft_dice_loss(b.softmax(1), F.one_hot(fg, 2).permute(0, 3, 1, 2).float())
    hv_t = hv_targets(inst)
    hv = out["hv"].float()
    loss = loss + w["hv_mse"] * F.mse_loss(hv, hv_t)
    focus = fg[:, None].float().expand_as(hv)
    gp, gt = hv_gradient(hv), hv_gradient(hv_t)
    loss = loss + w["hv_msge"] * ((gp - gt) ** 2 * focus).sum() / (focus.sum() + 1e-8)
    t = out["type"].float()
    loss = loss + w["type_ce"] * F.cross_entropy(t, types)
    type_onehot = F.one_hot(types, t.shape[1]).permute(0, 3, 1, 2).float()
    loss = loss + w["type_dice"] * _soft_dice_loss(t.softmax(1), type_onehot)
    return loss


@torch.no_grad()
@torch.no_grad()
def segmentation_scores(model: CellSegmenter, data, batch_size: int = 100) -> dict:
    """Mean binary Dice, PQ, DQ, SQ and AJI over ``data``'s tiles (a ``cells`` dataset), and ``type_acc``: the pixel
    accuracy of the predicted type on true nucleus pixels."""
    from vitlab.data.cells import split_masks

    if not isinstance(model, CellSegmenter):
        raise TypeError(f"segmentation_scores: model must be a CellSegmenter, got {type(model).__name__}")
    images, masks = getattr(data, "images", None), getattr(data, "masks", None)
    if not isinstance(images, Tensor) or not isinstance(masks, Tensor) or masks.is_floating_point():
        raise TypeError(f"segmentation_scores: data must be a cells dataset (images and int masks), got "
                        f"{type(data).__name__}")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    dice, pq, dq, sq, aji, correct, total = [], [], [], [], [], 0, 0
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        inst, types = split_masks(masks[i:i + batch_size])
        prob = out["binary"].float().softmax(1)[:, 1].cpu()
        pred = instances_from_maps(prob, out["hv"].float().cpu())
        dice.append(dice_score(prob > 0.5, inst > 0))
        q = panoptic_quality(inst, pred)
        pq.append(q["pq"]), dq.append(q["dq"]), sq.append(q["sq"])
        aji.append(aggregated_jaccard(inst, pred))
        fg = inst > 0
        correct += int((out["type"].argmax(1).cpu()[fg] == types[fg]).sum())
        total += int(fg.sum())
    model.train(was)
    return {"dice": float(torch.cat(dice).mean()), "pq": float(torch.cat(pq).mean()), "dq": float(torch.cat(dq).mean()),
            "sq": float(torch.cat(sq).mean()), "aji": float(torch.cat(aji).mean()),
            "type_acc": correct / max(total, 1)}


def segmentation_objective(eval_every: int = 100, val_n: int = 100):
    """The zoo objective ``"cellvta_seg"`` (with ``targets="masks"``): ``segmentation_loss``; every ``eval_every``
    steps the Dice and PQ of the first ``val_n`` val tiles are logged (the plateau check). The checkpoint stores val
    and test Dice / PQ / AJI and that curve."""
    from vitlab import zoo
    from vitlab.data.cells import cells

    eval_every = check_int(eval_every, "eval_every", "segmentation_objective")
    val_n = check_int(val_n, "val_n", "segmentation_objective")
    state = {"step": 0, "curve": []}

    def step_fn(net, images, masks):
        if state["step"] % eval_every == 0:
            state.setdefault("val", cells("val", n=CELLS_VAL_N, img_size=images.shape[-1]).subset(range(val_n)))
            s = segmentation_scores(net, state["val"])
            state["curve"].append((state["step"], s["dice"], s["pq"]))
        state["step"] += 1
        return segmentation_loss(net(images), masks), None

    def metrics(model, train, val, test):
        v = segmentation_scores(model, cells("val", n=CELLS_VAL_N, img_size=test.img_size).subset(range(val_n)))
        t = segmentation_scores(model, test)
        curve = state["curve"] + [(state["step"], v["dice"], v["pq"])]
        return {**{f"test_{k}": x for k, x in t.items()}, "val_dice": v["dice"], "val_pq": v["pq"],
                "val_curve_step": [c[0] for c in curve], "val_curve_dice": [c[1] for c in curve],
                "val_curve_pq": [c[2] for c in curve]}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


# ----------------------------------------------------------------------------------------------- the zoo
CELLS_VAL_N = 300
FOUNDATION = "ch6_cellvta_foundation"
FOUNDATION_FIT = dict(lr=2e-3, weight_decay=0.05, warmup=0.1, label_smoothing=0.1, batch_size=128, shift=4)
FOUNDATION_EPOCHS = {"cpu": 30, "gpu": 100}
FOUNDATION_TRAIN_N = 4000
FINETUNE = dict(lr=1e-3, weight_decay=0.05, warmup=0.1, batch_size=8, targets="masks", grad_clip=1.0)
FINETUNE_STEPS = {"cpu": 250, "gpu": 5000}
FINETUNE_TRAINABLE = {"decoder": ("decoder.",), "adapter": ("adapter.", "decoder."), "full": None}
DATA = ("cells", dict(img_size=64))


def entry_name(mode: str, seed: int) -> str:
    check_choice(mode, MODES, "mode", "entry_name")
    return f"ch6_cellvta_{mode}_s{check_int(seed, 'seed', 'entry_name', low=0)}"


MEASURE_KEY = "cellvta-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes


def measure(model: CellSegmenter, profile=None, seed: int = 0) -> dict:
    """Dice, PQ, DQ, SQ, AJI and type accuracy of a fine-tune on the ``cells`` test split (data seed ``seed``:
    0 is the split the entries were trained beside). Cached per checkpoint through
    ``zoo.measured(name, MEASURE_KEY, partial(measure, seed=s))``."""
    from vitlab.data.cells import cells

    if not isinstance(model, CellSegmenter):
        raise TypeError(f"measure: model must be a CellSegmenter, got {type(model).__name__}")
    seed = check_int(seed, "seed", "measure", low=0)
    return segmentation_scores(model.eval(), cells("test", seed=seed, img_size=DATA[1]["img_size"]))


def _register() -> None:
    from vitlab import zoo

    if "ch6_cellvta_vit" in MODELS:  # re-imported
        return
    zoo.register_objective("cellvta_seg", partial(segmentation_objective, eval_every=50, val_n=50))
    register_model("ch6_cellvta_vit", VisionTransformer, **FOUNDATION_CONFIG)
    source, kwargs = DATA
    zoo.register(FOUNDATION, zoo.Recipe(
        model="ch6_cellvta_vit", data=source, data_kwargs=dict(kwargs), train_kwargs=dict(n=FOUNDATION_TRAIN_N),
        fit=dict(FOUNDATION_FIT), per_profile={p: dict(epochs=e) for p, e in FOUNDATION_EPOCHS.items()},
        shares={"smoke": "cpu"}))
    for mode in MODES:
        register_model(f"ch6_cellvta_{mode}", cellvta_model, mode=mode, pretrained=FOUNDATION)
        trainable = FINETUNE_TRAINABLE[mode]
        fit = dict(FINETUNE, **({"trainable": trainable} if trainable else {}))
        for seed in SEEDS:
            zoo.register(entry_name(mode, seed), zoo.Recipe(
                model=f"ch6_cellvta_{mode}", data=source, data_kwargs=dict(kwargs), fit=fit, seed=seed, data_seed=0,
                per_profile={p: dict(steps=s) for p, s in FINETUNE_STEPS.items()},
                shares={"smoke": "cpu"}, objective="cellvta_seg", uses=(FOUNDATION,)))


_register()
