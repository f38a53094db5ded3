"""Token Contrast for Weakly-Supervised Semantic Segmentation, ToCo (L. Ru, H. Zheng, Y. Zhan, B. Du; CVPR 2023,
arXiv:2303.01267; official code: rulixiang/ToCo, ``model/model_seg_neg.py`` (``network``, ``CTCHead``),
``model/losses.py`` (``get_masked_ptc_loss``, ``CTCLoss_neg``), ``utils/camutils.py`` (``multi_scale_cam2``,
``cam_to_label``, ``cam_to_roi_mask2``, ``label_to_aff_mask``, ``crop_from_roi_neg``),
``scripts/dist_train_voc_seg_neg.py``); our own code, on CPU and on the course ViT.

The task: segment objects with image-level labels only. A class activation map (CAM) says where a classifier sees
each class; thresholded, it becomes a pseudo mask. The paper's diagnosis: in a ViT the final patch tokens become
nearly uniform ("over-smoothing"), so the final CAM lights up everything or nothing, while intermediate blocks still
keep tokens apart. Two remedies:

**The network** (``ToCoNet``). A 1 x 1 convolution (a Linear over tokens, no bias) on the final patch tokens gives
the CAM, and a second one on the patch tokens of block ``aux_layer`` (-3, before the final LayerNorm) the auxiliary
CAM. Each branch is trained to classify: the token features are max-pooled channel by channel, then classified,

    logits = W max_n F_n,   aux_logits = W_aux max_n F_aux,n,   L_cls = MLSM(logits, y) + MLSM(aux_logits, y)

with MLSM the multi-label soft-margin loss and y multi-hot (``multi_hot`` builds it from the course's single labels).

**PTC** (patch token contrast). The aux CAM (multi-scale + flip, ReLU, min-max normalised per image and class,
bilinearly resized to the token grid) gives each token a pseudo label: its class where the CAM exceeds 0.7,
background where it is at most 0.25, "ignore" in between. Tokens with equal labels should align, others not:

    A_ij = [l_i == l_j]   (ignored tokens' rows and columns and the diagonal excluded)
    S_ij = |cos(F_i, F_j)|  on the final (normed) patch tokens
    L_ptc = 0.5 (1 - sum_{A=1} S / (#{A=1} + 1)) + 0.5 sum_{A=0} S / (#{A=0} + 1)   (sums over the whole batch)

**CTC** (class token contrast). Local crops are cut where the aux CAM is uncertain or background: roi = 0 where the
CAM is <= 0.25, 2 where it is >= 0.7, 1 in between; crop centres are drawn where roi <= 1 (anywhere when fewer than
``num_crops`` such centres exist); a crop whose sum(roi) / area <= 0.2 is a *negative* (mostly confident
background), every other crop a positive. Two global views go through an EMA teacher projection head (a DINO-style
head on the CLS token; the backbone is shared, its output detached), the global and local views through the
student head, and with p_v = exp(t . s_v / tau) for teacher view t (two of them) and student view v:

    L_ctc = mean_b 1/(2 (#pos + 1e-4)) sum_t [ sum_{v pos} -log(p_v / (p_v + sum_{u neg} p_u + 1e-4))
                                                 - log(1 / (1 + sum_{u neg} p_u + 1e-4)) ]

The last term is the official code's: it sits in the ``else`` clause of a ``for ... else`` loop over the positives,
and since the loop has no ``break`` it always runs, once per image and teacher view. We keep it (``ctc_loss``); it
pushes every negative crop away from the global views even when an image has no local positive.

    net = ToCoNet(vit, num_classes=10)                                  # vit: a course VisionTransformer
    step = toco_step(w_ptc=0.2, w_ctc=0.5, crop_size=16)               # fit-compatible: (loss, logits)
    fit(net, train, step_fn=step, steps=..., optimizer=adamw_lr_scaled(lambda m: m.head_parameters(), 10))
    cam, aux_cam = multi_scale_cam(net, images, scales=(1.0, 0.5, 1.5))   # [B, C, H, W], in [0, 1)
    measure_toco(net, test.images, test.masks, test.labels)             # CAM mIoU, token cosine, pseudo-label acc.
    baseline = toco_step(w_aux=0.0, w_ptc=0.0, w_ctc=0.0)               # the single-stage CAM baseline

Our reading, and every deviation from the official code, named:
- Backbone: the course ViT (one CLS token, no registers), any depth, from a course checkpoint or scratch; the
  official starts from an ImageNet ViT-B / DeiT-B. Its ``pos_embed`` trains (the official freezes it). Inputs of any
  size are embedded as the official backbone does (the patch grid's position embeddings resized bicubically,
  ``vit_features``), so multi-scale CAMs and small local crops run through the same ViT; at the ViT's own size
  the embeddings are used as they are (no resize), so the tokens equal ``vit.embed`` + blocks exactly.
- The final tokens go through ``vit.norm`` (the official backbone's final LayerNorm); the aux tokens are block
  ``aux_layer``'s output before it. As in the official, an ``aux_layer`` that names the last block gives the normed
  final tokens. (For a ViT built with ``global_pool="avg"``, ``vit.norm`` is the identity: no final norm.)
- The CAM heads are ``nn.Linear(D, C, bias=False)`` on tokens (the official 1 x 1 ``Conv2d``: the same numbers and
  the same default initialisation). Class scores are ``W max_n F_n`` as in the official (``adaptive_max_pool2d`` on
  the features, then the 1 x 1 conv), not the max of the CAM. There is no background class in the heads: the
  course datasets' classes are all foreground, so C = ``num_classes`` (the official has num_classes - 1 for VOC's
  21 with background). Label maps follow the official: 0 background, k + 1 for class k, ``IGNORE`` (255) ignored.
- No segmentation decoder (LargeFOV), no PAR refinement, no dense-CRF energy loss and no seg loss: the lesson
  measures the CAMs themselves, which is what PTC and CTC act on (the official adds the seg loss after 2,000
  iterations of warm-up; nothing here depends on it). Hence also no ``img_box``: our images are never padded, so
  every pixel is valid (the official marks pixels outside the un-padded box as ignored).
- ``cam_to_label`` switches on the official's ``ignore_mid`` by being given ``high_thre`` and ``low_thre`` (the
  official applies it only together with ``img_box``). The thresholds keep the official's comparisons: label: class
  if > bkg, then ignore if <= high, background if <= low; roi: 0 if <= low, 2 if >= high (so a CAM of exactly 0.7 is
  "ignore" for PTC but "confident" for the crops).
- ``multi_scale_cam`` follows ``multi_scale_cam2``: scale 1.0 always runs first, every other listed scale is added
  (so ``scales=(0.5,)`` means 1.0 + 0.5), each upsampled bilinearly, flips merged by an element-wise **max** (the
  official; ``flip="mean"`` averages instead, ``flip=None`` skips the flipped pass), ReLU, summed over scales, then
  min-max normalised per image and class with the official 1e-5. ``cam_from_logits`` is the same for one scale.
- The projection head is the official ``CTCHead`` shape (Linear-GELU-...-Linear to a bottleneck, L2-normalised,
  then a weight-normalised Linear with its gain fixed at 1), smaller by default (hidden 256, bottleneck 64, out 256;
  official 2048, 256, 1024). The frozen-gain weight norm is written as a Linear whose rows are normalised on the fly
  (the same function as ``nn.utils.weight_norm`` with ``weight_g`` = 1 frozen; the state dict holds one ``weight``
  instead of ``weight_g`` / ``weight_v``). The teacher starts as a copy, never gets gradients, and moves by
  t <- m t + (1 - m) s with the official constant m = 0.9 before each step's projection (``update_teacher``).
- Global views: view 1 is the input batch itself (as in the official data pipeline, where ``crops[0]`` is the same
  tensor as ``inputs``), and its CLS token is taken from the main forward instead of running the encoder twice more
  on it (the official runs it once for the teacher, detached, and once for the student): the same values and
  gradients without dropout. View 2 is ``random_resized_crop`` (square crops of 40-100 % of the area, bilinear,
  random horizontal flip); the official's RandomResizedCrop also varies the aspect ratio and adds colour jitter,
  grayscale, blur and solarisation, and its local crops come from a colour-jittered copy: no photometric
  augmentation here (our scenes are synthetic and small).
- Local crops: the official rules (``crop_from_roi``), at a configurable size (official 96 px on 448-px images with
  8 crops; here e.g. 16 px on 48-px images) and negative ratio (official 0.2), sampled with ``torch.randperm`` on an
  optional generator (official: the global RNG). The crops keep their own size and run through the ViT with resized
  position embeddings, as the official does. Where the image cannot hold ``num_crops`` crop positions at all we
  raise (the official would fail with an index error).
- ``ctc_loss`` takes [views, B, K] tensors (the official reshapes the crop-major concatenation to that) and computes
  -log(p / (p + N + 1e-4)) in log space (``logsumexp``): the official's numbers to float rounding, but finite where
  exp(t . s / tau) overflows float32 (t . s / tau > 88). Positives are every view flagged 1, the two global views
  included, so each teacher view is also contrasted with the student's copy of the same view (DINO skips that pair;
  the official does not).
- Loss weights are the official's (cls 1, aux cls 1, ``W_PTC`` 0.2, ``W_CTC`` 0.5, ``TEMP`` 0.5), each switchable
  (weight 0 skips the term's computation); the official's 10x learning rate for the heads is available through
  ``head_parameters`` with ``vitlab.train.adamw_lr_scaled``, the poly schedule is the lesson's choice.
- Targets: the course scenes are single-label, so ``multi_hot`` turns class indices into one-hot rows for the
  multi-label soft-margin loss (multi-hot [B, C] targets are taken as they are). As in the official, the CAMs that
  make the pseudo labels and crops are computed inside the training step with the model in training mode.
- Measures (not in the official training code): ``mean_pairwise_cosine`` (the over-smoothing figure: mean cos over
  token pairs i != j), ``cam_miou`` (one confusion matrix over the data, as the official ``evaluate.scores``;
  foreground / background or per class) and ``pseudo_label_accuracy`` (on the non-ignored positions, with the
  coverage).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_choice, check_cls_vit, check_int, check_ndim, check_number
from vitlab.metrics import miou
from vitlab.models.vit import init_linear_
from vitlab.train import unwrap

__all__ = ["AUX_LAYER", "BKG_THRE", "HIGH_THRE", "LOW_THRE", "IGNORE", "W_PTC", "W_CTC", "TEMP", "MOMENTUM",
           "NUM_CROPS", "NEG_RATIO", "CAM_SCALES", "multi_hot", "vit_features", "ProjectionHead", "ToCoOutput",
           "ToCoNet", "minmax_cam", "cam_from_logits", "multi_scale_cam", "cam_to_label", "token_pseudo_labels",
           "cam_to_roi", "label_to_aff_mask", "ptc_loss", "random_resized_crop", "crop_from_roi", "ctc_loss",
           "toco_losses", "toco_step", "mean_pairwise_cosine", "label_map", "cam_miou", "pseudo_label_accuracy",
           "measure_toco"]

AUX_LAYER = -3  # official --aux_layer: the aux CAM reads the third-last block
BKG_THRE = 0.5  # official --bkg_thre: the final CAM's background threshold
HIGH_THRE = 0.7  # official --high_thre: confident foreground above it
LOW_THRE = 0.25  # official --low_thre: confident background at or below it
IGNORE = 255  # official --ignore_index
W_PTC = 0.2  # official --w_ptc
W_CTC = 0.5  # official --w_ctc
TEMP = 0.5  # official --temp (CTC)
MOMENTUM = 0.9  # official --momentum (EMA teacher head)
NUM_CROPS = 8  # official ncrops = 10: 2 global views + 8 local crops
NEG_RATIO = 0.2  # official crop_from_roi_neg: a crop with sum(roi) / area <= 0.2 is a negative
CAM_SCALES = (1.0, 0.5, 1.5)  # official --cam_scales


# ------------------------------------------------------------------------------------------------ inputs
def multi_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Class indices [B] -> float multi-hot [B, C]; a multi-hot [B, C] (0/1) passes through as float."""
    fn = "multi_hot"
    C = check_int(num_classes, "num_classes", fn, low=1)
    if not isinstance(labels, Tensor) or labels.ndim not in (1, 2):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{fn}: labels must be class indices [B] or multi-hot [B, C], got {got}")
    if labels.ndim == 2:
        if labels.shape[1] != C or not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"{fn}: multi-hot labels must be 0/1 with {C} columns (num_classes), got shape "
                             f"{tuple(labels.shape)}")
        return labels.float()
    if labels.is_floating_point() or (len(labels) and (labels.min() < 0 or labels.max() >= C)):
        raise ValueError(f"{fn}: labels must be integer class indices in 0..{C - 1} (num_classes={C}), got "
                         f"{labels.dtype} {labels.tolist() if labels.numel() <= 8 else '...'}")
    return F.one_hot(labels.long(), C).float()


def _resolve_layer(aux_layer: int, depth: int, fn: str) -> int:
    check_int(aux_layer, "aux_layer", fn, low=-depth, high=depth - 1)
    return aux_layer % depth


def vit_features(vit, x: Tensor, aux_layer: int = AUX_LAYER) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """Run a course ViT on images of any size (H, W >= the patch size; the grid is H // p x W // p, as the strided
    patch convolution gives). Returns ``(cls [B, D], tokens [B, N, D], aux_tokens [B, N, D], (h, w))``: the CLS
    token and the patch tokens after the final norm, and block ``aux_layer``'s patch tokens (before any norm; the
    normed final ones when it is the last block)."""
    fn = "vit_features"
    check_cls_vit(vit, fn)
    layer = _resolve_layer(aux_layer, len(vit.blocks), fn)
    pe = vit.patch_embed
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{fn}: x must be an image batch [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[1] != pe.in_chans or min(x.shape[-2:]) < pe.patch_size:
        raise ValueError(f"{fn}: x is {tuple(x.shape[1:])}; expected in_chans={pe.in_chans} channels and a size of "
                         f"at least patch_size={pe.patch_size}")
    h, w = x.shape[-2] // pe.patch_size, x.shape[-1] // pe.patch_size
    t = pe.norm(pe.proj(x).flatten(2).transpose(1, 2))  # [B, h*w, D]
    pos_cls, pos = vit.pos_embed[:, :1], vit.pos_embed[:, 1:]
    if (h, w) != tuple(vit.grid_size):  # the official backbone's rule: resize the grid of position embeddings
        gh, gw = vit.grid_size
        pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    z = torch.cat([vit.cls_token.expand(len(x), -1, -1), t], dim=1) + torch.cat([pos_cls, pos], dim=1)
    z = vit.norm_pre(vit.pos_drop(z))
    aux = None
    for i, blk in enumerate(vit.blocks):
        z = blk(z)
        if i == layer:
            aux = z
    z = vit.norm(z)
    if layer == len(vit.blocks) - 1:
        aux = z
    return z[:, 0], z[:, 1:], aux[:, 1:], (h, w)


# ------------------------------------------------------------------------------------------------ network
class _RowNormLinear(nn.Module):
    """y = x W^T with each row of W scaled to unit norm: ``weight_norm`` with its gain frozen at 1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class ProjectionHead(nn.Module):
    """The DINO-style CTC head: MLP (``num_layers`` Linears with GELU between) to ``bottleneck_dim``, L2-normalise,
    then a row-normalised Linear to ``out_dim``. [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 256, bottleneck_dim: int = 64,
                 num_layers: int = 3):
        super().__init__()
        fn = "ProjectionHead"
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("num_layers", num_layers)):
            check_int(v, name, fn, low=1)
        if num_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        init_linear_(self.mlp)  # trunc-normal(0.02), zero bias, as the official; the last layer keeps its default
        self.last_layer = _RowNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class ToCoOutput(NamedTuple):
    """What ``ToCoNet.forward`` returns. ``teacher`` [2, B, K] and ``student`` [V, B, K] only when global views are
    given (V = 2 + the number of local crops), else None."""
    logits: Tensor  # [B, C] from the final tokens
    aux_logits: Tensor  # [B, C] from block aux_layer's tokens
    cam: Tensor  # [B, C, h, w] raw final CAM (token logits)
    aux_cam: Tensor  # [B, C, h, w] raw aux CAM
    tokens: Tensor  # [B, N, D] final (normed) patch tokens: what PTC acts on
    aux_tokens: Tensor  # [B, N, D]
    cls: Tensor  # [B, D] final CLS token
    grid: tuple  # (h, w)
    teacher: Tensor | None
    student: Tensor | None


class ToCoNet(nn.Module):
    """ToCo's network around a course ViT: CAM heads on the final and the ``aux_layer`` tokens (max-pooled class
    scores), and the CTC projection head with its EMA teacher. ``num_classes`` defaults to the ViT's (its own
    ``head`` is left unused)."""

    def __init__(self, vit, num_classes: int | None = None, *, aux_layer: int = AUX_LAYER, momentum: float = MOMENTUM,
                 proj_out_dim: int = 256, proj_hidden_dim: int = 256, proj_bottleneck_dim: int = 64,
                 proj_layers: int = 3):
        super().__init__()
        fn = "ToCoNet"
        check_cls_vit(vit, fn)
        self.aux_layer = _resolve_layer(aux_layer, len(vit.blocks), fn) - len(vit.blocks)  # kept negative
        self.num_classes = check_int(vit.num_classes if num_classes is None else num_classes, "num_classes", fn)
        self.momentum = check_number(momentum, "momentum", fn, low=0, high=1)
        self.vit = vit
        D = vit.embed_dim
        self.classifier = nn.Linear(D, self.num_classes, bias=False)
        self.aux_classifier = nn.Linear(D, self.num_classes, bias=False)
        self.proj_head = ProjectionHead(D, proj_out_dim, proj_hidden_dim, proj_bottleneck_dim, proj_layers)
        self.proj_head_t = copy.deepcopy(self.proj_head).requires_grad_(False)

    def start_from(self, vit) -> None:
        """Load a trained course ViT's weights (all of them, strictly) into the backbone; the CAM and projection
        heads stay as initialised. The zoo calls this for an entry that fine-tunes ToCo from a ViT entry."""
        check_cls_vit(vit, "ToCoNet.start_from")
        self.vit.load_state_dict(vit.state_dict(), strict=True)

    def head_parameters(self) -> list[nn.Parameter]:
        """The CAM heads and the student projection head: the parameters the official trains at 10x the lr."""
        return [*self.classifier.parameters(), *self.aux_classifier.parameters(), *self.proj_head.parameters()]

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None) -> None:
        """EMA step of the teacher head: t <- m t + (1 - m) s (m = ``self.momentum`` unless given)."""
        m = self.momentum if momentum is None else check_number(momentum, "momentum", "update_teacher", low=0,
                                                                 high=1)
        for t, s in zip(self.proj_head_t.parameters(), self.proj_head.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    def features(self, x: Tensor):
        """``vit_features(self.vit, x, self.aux_layer)``."""
        return vit_features(self.vit, x, self.aux_layer)

    def _cams(self, tokens: Tensor, aux_tokens: Tensor, grid) -> tuple[Tensor, Tensor]:
        B, (h, w) = len(tokens), grid
        cam = self.classifier(tokens).transpose(1, 2).reshape(B, self.num_classes, h, w)
        aux = self.aux_classifier(aux_tokens).transpose(1, 2).reshape(B, self.num_classes, h, w)
        return cam, aux

    def cam_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The raw CAMs (token logits) ``(cam, aux_cam)``, each [B, C, h, w], for images of any size."""
        _, tokens, aux_tokens, grid = self.features(x)
        return self._cams(tokens, aux_tokens, grid)

    def forward(self, x: Tensor, global_view: Tensor | None = None, local_views: Tensor | None = None) -> ToCoOutput:
        """Class scores, CAMs and tokens of ``x``; with ``global_view`` (a second view of the same images, any size)
        also the CTC projections: the teacher's of (x, global_view) from detached CLS tokens, the student's of
        (x, global_view, *local_views) (``local_views`` [n, B, C, s, s], crop-major as ``crop_from_roi`` gives)."""
        cls, tokens, aux_tokens, grid = self.features(x)
        cam, aux_cam = self._cams(tokens, aux_tokens, grid)
        logits = self.classifier(tokens.max(dim=1).values)  # max-pool the features, then classify (official)
        aux_logits = self.aux_classifier(aux_tokens.max(dim=1).values)
        teacher = student = None
        if global_view is not None:
            B = len(x)
            if not isinstance(global_view, Tensor) or global_view.ndim != 4 or len(global_view) != B:
                raise ValueError(f"ToCoNet: global_view must be an image batch [{B}, C, H, W] like x, got "
                                 f"{tuple(global_view.shape) if isinstance(global_view, Tensor) else global_view!r}")
            cls_g = torch.cat([cls, self.features(global_view)[0]])  # [2B, D]
            views = [cls_g]
            if local_views is not None:
                if not isinstance(local_views, Tensor) or local_views.ndim != 5 or local_views.shape[1] != B:
                    raise ValueError(f"ToCoNet: local_views must be crops [n, {B}, C, s, s], got "
                                     f"{tuple(local_views.shape) if isinstance(local_views, Tensor) else local_views!r}")
                views.append(self.features(local_views.flatten(0, 1))[0])  # [n*B, D], crop-major
            teacher = self.proj_head_t(cls_g.detach()).reshape(2, B, -1)
            student = self.proj_head(torch.cat(views)).reshape(-1, B, teacher.shape[-1])
        elif local_views is not None:
            raise ValueError("ToCoNet: local_views need global_view (CTC contrasts them with the global views)")
        return ToCoOutput(logits, aux_logits, cam, aux_cam, tokens, aux_tokens, cls, grid, teacher, student)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, aux_layer={self.aux_layer}, momentum={self.momentum}"


# ------------------------------------------------------------------------------------------------ CAMs
def minmax_cam(cam: Tensor) -> Tensor:
    """Per image and class: (cam - min) / (max(cam - min) + 1e-5), the official normalisation. [B, C, H, W]."""
    check_ndim(cam, 4, "cam", "minmax_cam")
    cam = cam - cam.amin(dim=(2, 3), keepdim=True)
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-5)


def cam_from_logits(cam_logits: Tensor, size: Sequence[int] | None = None) -> Tensor:
    """A single-scale CAM: token logits [B, C, h, w] -> bilinear to ``size`` (H, W) -> ReLU -> ``minmax_cam``."""
    check_ndim(cam_logits, 4, "cam_logits", "cam_from_logits")
    if size is not None:
        cam_logits = F.interpolate(cam_logits, size=tuple(size), mode="bilinear", align_corners=False)
    return minmax_cam(F.relu(cam_logits))


def _check_thre(value, name: str, fn: str) -> float:
    return check_number(value, name, fn, low=0, high=1)


def _check_cam_targets(cam: Tensor, targets: Tensor, fn: str) -> Tensor:
    check_ndim(cam, 4, "cam", fn)
    if not isinstance(targets, Tensor) or targets.ndim not in (1, 2) or len(targets) != len(cam):
        raise ValueError(f"{fn}: targets must be class indices [B] or multi-hot [B, C] = {tuple(cam.shape[:2])} "
                         f"(cam's batch and classes), got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    return multi_hot(targets, cam.shape[1]).to(device=cam.device, dtype=cam.dtype)


@torch.no_grad()
def multi_scale_cam(net: ToCoNet, images: Tensor, scales: Sequence[float] = CAM_SCALES,
                    flip: str | None = "max") -> tuple[Tensor, Tensor]:
    """``(cam, aux_cam)`` [B, C, H, W] in [0, 1): the official ``multi_scale_cam2``. Scale 1.0 always, plus every
    other scale in ``scales``; each pass's token logits upsampled to H x W, merged with the flipped image's by
    ``flip`` ("max" official, "mean", or None: no flipped pass), ReLU, summed over scales, min-max normalised."""
    fn = "multi_scale_cam"
    model = unwrap(net)
    if not isinstance(model, ToCoNet):
        raise TypeError(f"{fn}: net must be a ToCoNet, got {type(model).__name__}")
    check_ndim(images, 4, "images", fn)
    check_choice(flip, ("max", "mean", None), "flip", fn)
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise TypeError(f"{fn}: scales must be a non-empty sequence of positive numbers, got {scales!r}")
    B, _, H, W = images.shape
    p = model.vit.patch_embed.patch_size
    passes = [1.0] + [check_number(s, "scales", fn, low=0, low_open=True) for s in scales if s != 1.0]
    cams, auxs = [], []
    for s in passes:
        size = (int(s * H), int(s * W))
        if min(size) < p:
            raise ValueError(f"{fn}: scales: scale {s} makes {H}x{W} images {size[0]}x{size[1]}, smaller than the "
                             f"patch size {p}")
        x = images if s == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip is not None:
            x = torch.cat([x, x.flip(-1)])
        cam, aux = (F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False) for c in model.cam_logits(x))
        if flip is not None:
            merge = torch.maximum if flip == "max" else (lambda a, b: (a + b) / 2)
            cam, aux = merge(cam[:B], cam[B:].flip(-1)), merge(aux[:B], aux[B:].flip(-1))
        cams.append(F.relu(cam))
        auxs.append(F.relu(aux))
    return minmax_cam(torch.stack(cams).sum(0)), minmax_cam(torch.stack(auxs).sum(0))


def cam_to_label(cam: Tensor, targets: Tensor, bkg_thre: float = BKG_THRE, high_thre: float | None = None,
                 low_thre: float | None = None, ignore_index: int = IGNORE) -> Tensor:
    """Label map [B, H, W] (int64) from a normalised CAM [B, C, H, W], the official ``cam_to_label``: among the
    image's classes (``targets``: indices [B] or multi-hot [B, C]) the top one, k + 1, where its CAM is > ``bkg_thre``,
    else 0 (background). With ``high_thre`` and ``low_thre`` (both or neither) the pseudo-label mode: then
    ``ignore_index`` where the top CAM is <= high, 0 where it is <= low."""
    fn = "cam_to_label"
    targets = _check_cam_targets(cam, targets, fn)
    bkg_thre = _check_thre(bkg_thre, "bkg_thre", fn)
    if (high_thre is None) != (low_thre is None):
        raise ValueError(f"{fn}: give both high_thre and low_thre or neither, got high_thre={high_thre!r}, "
                         f"low_thre={low_thre!r}")
    check_int(ignore_index, "ignore_index", fn, low=cam.shape[1] + 1)
    value, label = (cam * targets[:, :, None, None]).max(dim=1)
    label = label + 1
    label[value <= bkg_thre] = 0
    if high_thre is not None:
        high_thre, low_thre = _check_thre(high_thre, "high_thre", fn), _check_thre(low_thre, "low_thre", fn)
        if low_thre > high_thre:
            raise ValueError(f"{fn}: low_thre={low_thre} must not exceed high_thre={high_thre}")
        label[value <= high_thre] = ignore_index
        label[value <= low_thre] = 0
    return label


def token_pseudo_labels(aux_cam: Tensor, targets: Tensor, grid: Sequence[int], *, bkg_thre: float = BKG_THRE,
                        high_thre: float = HIGH_THRE, low_thre: float = LOW_THRE,
                        ignore_index: int = IGNORE) -> Tensor:
    """PTC's per-token labels [B, h, w]: the normalised aux CAM resized bilinearly to the token ``grid`` (h, w), then
    ``cam_to_label`` in pseudo-label mode (class > high, background <= low, ignore between)."""
    check_ndim(aux_cam, 4, "aux_cam", "token_pseudo_labels")
    small = F.interpolate(aux_cam, size=tuple(grid), mode="bilinear", align_corners=False)
    return cam_to_label(small, targets, bkg_thre, high_thre, low_thre, ignore_index)


def cam_to_roi(cam: Tensor, targets: Tensor, high_thre: float = HIGH_THRE, low_thre: float = LOW_THRE) -> Tensor:
    """The official ``cam_to_roi_mask2``: int64 [B, H, W], 0 where the top CAM of the image's classes is <= low
    (confident background), 2 where it is >= high (confident foreground), 1 in between (uncertain)."""
    fn = "cam_to_roi"
    targets = _check_cam_targets(cam, targets, fn)
    high_thre, low_thre = _check_thre(high_thre, "high_thre", fn), _check_thre(low_thre, "low_thre", fn)
    if low_thre > high_thre:
        raise ValueError(f"{fn}: low_thre={low_thre} must not exceed high_thre={high_thre}")
    value = (cam * targets[:, :, None, None]).amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.long)
    roi[value <= low_thre] = 0
    roi[value >= high_thre] = 2
    return roi


# ------------------------------------------------------------------------------------------------ PTC
def label_to_aff_mask(labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Affinity targets [B, N, N] (int64) from token labels [B, h, w] or [B, N]: 1 where the labels agree, 0 where
    they differ, ``ignore_index`` on the rows and columns of ignored tokens and on the diagonal."""
    fn = "label_to_aff_mask"
    if not isinstance(labels, Tensor) or labels.ndim not in (2, 3) or labels.is_floating_point():
        raise ValueError(f"{fn}: labels must be integer token labels [B, h, w] or [B, N], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    lab = labels.flatten(1)
    aff = (lab[:, :, None] == lab[:, None, :]).long()
    ign = lab == ignore_index
    aff[ign[:, :, None] | ign[:, None, :]] = ignore_index
    aff.diagonal(dim1=1, dim2=2).fill_(ignore_index)
    return aff


def ptc_loss(tokens: Tensor, aff_mask: Tensor) -> Tensor:
    """The official ``get_masked_ptc_loss`` on tokens [B, N, D]: S = |cos| between tokens,
    0.5 (1 - sum S[A=1] / (#(A=1) + 1)) + 0.5 sum S[A=0] / (#(A=0) + 1), counted over the whole batch."""
    fn = "ptc_loss"
    check_ndim(tokens, 3, "tokens", fn)
    B, N, _ = tokens.shape
    if not isinstance(aff_mask, Tensor) or aff_mask.shape != (B, N, N):
        raise ValueError(f"{fn}: aff_mask must be [B, N, N] = {(B, N, N)} for tokens {tuple(tokens.shape)}, got "
                         f"{tuple(aff_mask.shape) if isinstance(aff_mask, Tensor) else type(aff_mask).__name__}")
    f = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    sim = (f @ f.transpose(1, 2)).abs()
    pos, neg = aff_mask == 1, aff_mask == 0
    return 0.5 * (1 - (sim * pos).sum() / (pos.sum() + 1)) + 0.5 * (sim * neg).sum() / (neg.sum() + 1)


# ------------------------------------------------------------------------------------------------ CTC
def random_resized_crop(images: Tensor, scale: Sequence[float] = (0.4, 1.0), flip: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """The second global view: per image a square crop of ``scale`` (a range) of the area at a uniform position,
    resized bilinearly back to H x W, flipped horizontally with probability 1/2 when ``flip``."""
    fn = "random_resized_crop"
    check_ndim(images, 4, "images", fn)
    if not isinstance(scale, Sequence) or len(scale) != 2:
        raise ValueError(f"{fn}: scale must be a (low, high) pair in (0, 1], got {scale!r}")
    lo = check_number(scale[0], "scale[0]", fn, low=0, high=1, low_open=True)
    hi = check_number(scale[1], "scale[1]", fn, low=lo, high=1)
    B, _, H, W = images.shape
    out = torch.empty_like(images)
    draws = torch.rand(B, 4, generator=generator).tolist()
    for i, (a, u, v, f) in enumerate(draws):
        side = math.sqrt(lo + (hi - lo) * a)
        h, w = max(1, round(side * H)), max(1, round(side * W))
        top, left = int(u * (H - h + 1)), int(v * (W - w + 1))
        crop = images[i:i + 1, :, top:top + h, left:left + w]
        crop = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
        out[i] = crop[0].flip(-1) if flip and f < 0.5 else crop[0]
    return out


def crop_from_roi(images: Tensor, roi: Tensor, num_crops: int = NUM_CROPS, crop_size: int = 16,
                  neg_ratio: float = NEG_RATIO, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The official ``crop_from_roi_neg``: per image, ``num_crops`` crops of ``crop_size`` px whose centres are drawn
    (``randperm``) among the positions where roi <= 1 and the whole crop fits, or among all positions where it fits
    when fewer than ``num_crops`` qualify. Returns ``(crops [num_crops, B, C, s, s], flags [B, 2 + num_crops])``:
    flags 1 (positive) for the two global views and every crop with sum(roi over the crop) / s^2 > ``neg_ratio``,
    0 (negative) otherwise."""
    fn = "crop_from_roi"
    check_ndim(images, 4, "images", fn)
    B, C, H, W = images.shape
    if not isinstance(roi, Tensor) or roi.shape != (B, H, W) or roi.is_floating_point():
        raise ValueError(f"{fn}: roi must be an integer map [B, H, W] = {(B, H, W)} (cam_to_roi), got "
                         f"{tuple(roi.shape) if isinstance(roi, Tensor) else type(roi).__name__}")
    n = check_int(num_crops, "num_crops", fn, low=1)
    s = check_int(crop_size, "crop_size", fn, low=1, high=min(H, W))
    neg_ratio = check_number(neg_ratio, "neg_ratio", fn, low=0, high=2)
    m = s // 2
    inner = roi[:, m:H - m, m:W - m]  # index (r, c) here = crop top-left (r, c) = crop centre (r + m, c + m)
    if inner.shape[1] * inner.shape[2] < n:
        raise ValueError(f"{fn}: crop_size={s} leaves {inner.shape[1] * inner.shape[2]} crop positions in a {H}x{W} "
                         f"image, fewer than num_crops={n}")
    crops = images.new_empty(n, B, C, s, s)
    flags = torch.ones(B, n + 2, device=images.device)
    for b in range(B):
        where = (inner[b] <= 1).nonzero()
        if len(where) < n:
            where = (inner[b] >= 0).nonzero()  # official: too few uncertain / background centres: anywhere
        pick = where[torch.randperm(len(where), generator=generator)[:n].to(where.device)]
        for k, (r, c) in enumerate(pick.tolist()):
            crops[k, b] = images[b, :, r:r + s, c:c + s]
            if roi[b, r:r + s, c:c + s].sum().item() / (s * s) <= neg_ratio:
                flags[b, k + 2] = 0
    return crops, flags


def ctc_loss(student: Tensor, teacher: Tensor, flags: Tensor, temp: float = TEMP) -> Tensor:
    """The official ``CTCLoss_neg``. ``student`` [V, B, K] (2 global views, then the local crops), ``teacher``
    [2, B, K], ``flags`` [B, V] (1 positive, 0 negative; ``crop_from_roi``). With p = exp(t . s / temp), per image
    and teacher view: sum over positives of -log(p / (p + sum_neg p + 1e-4)) plus the always-added
    -log(1 / (1 + sum_neg p + 1e-4)); summed over the two teacher views, divided by 2 (#positives + 1e-4), averaged
    over the images. Computed in log space (see the module notes)."""
    fn = "ctc_loss"
    check_ndim(student, 3, "student", fn)
    check_ndim(teacher, 3, "teacher", fn)
    V, B, K = student.shape
    if teacher.shape != (2, B, K):
        raise ValueError(f"{fn}: teacher must be [2, B, K] = {(2, B, K)} for student {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if not isinstance(flags, Tensor) or flags.shape != (B, V):
        raise ValueError(f"{fn}: flags must be [B, V] = {(B, V)} for student {tuple(student.shape)}, got "
                         f"{tuple(flags.shape) if isinstance(flags, Tensor) else type(flags).__name__}")
    temp = check_number(temp, "temp", fn, low=0, low_open=True)
    z = torch.einsum("tbk,vbk->btv", teacher.float(), student.float()) / temp  # [B, 2, V] log p
    neg, pos = (flags == 0)[:, None, :], (flags != 0)[:, None, :]
    log_neg = torch.where(neg, z, torch.full_like(z, -math.inf)).logsumexp(-1, keepdim=True)  # log sum_neg p
    log_eps = torch.full_like(log_neg, math.log(1e-4))
    denom = torch.stack(torch.broadcast_tensors(z, log_neg, log_eps)).logsumexp(0)  # log(p + N + 1e-4)
    per_pos = torch.where(pos, denom - z, torch.zeros_like(z)).sum(-1)  # [B, 2]
    extra = torch.stack([torch.zeros_like(log_neg), log_neg, log_eps]).logsumexp(0)[..., 0]  # log(1 + N + 1e-4)
    n_pos = (flags != 0).sum(-1).float()
    return ((per_pos + extra).sum(-1) / 2 / (n_pos + 1e-4)).mean()


# ------------------------------------------------------------------------------------------------ training
def toco_losses(net, images: Tensor, labels: Tensor, *, w_aux: float = 1.0, w_ptc: float = W_PTC,
                w_ctc: float = W_CTC, cam_scales: Sequence[float] = CAM_SCALES, bkg_thre: float = BKG_THRE,
                high_thre: float = HIGH_THRE, low_thre: float = LOW_THRE, num_crops: int = NUM_CROPS,
                crop_size: int = 16, neg_ratio: float = NEG_RATIO, temp: float = TEMP,
                generator: torch.Generator | None = None) -> dict:
    """One ToCo training forward: a dict with ``loss`` (cls + w_aux cls_aux + w_ptc ptc + w_ctc ctc), its parts
    (``cls``, ``cls_aux``, ``ptc``, ``ctc``; a switched-off term is a zero and is not computed), ``logits`` and, when
    PTC or CTC is on, the ``aux_cam`` [B, C, H, W] and the token ``pseudo`` labels / crop ``flags`` they used. The EMA
    teacher moves first when CTC is on. ``labels``: class indices [B] or multi-hot [B, C]."""
    fn = "toco_losses"
    model = unwrap(net)
    if not isinstance(model, ToCoNet):
        raise TypeError(f"{fn}: net must be a ToCoNet, got {type(model).__name__}")
    check_ndim(images, 4, "images", fn)
    w_aux, w_ptc, w_ctc = (check_number(v, k, fn, low=0) for k, v in
                           (("w_aux", w_aux), ("w_ptc", w_ptc), ("w_ctc", w_ctc)))
    targets = multi_hot(labels, model.num_classes).to(images.device)
    if len(targets) != len(images):
        raise ValueError(f"{fn}: labels has {len(targets)} rows for {len(images)} images")
    out_extra = {}
    global_view = local_views = flags = aux_cam = None
    if w_ptc or w_ctc:
        _, aux_cam = multi_scale_cam(model, images, cam_scales)
        out_extra["aux_cam"] = aux_cam
    if w_ctc:
        roi = cam_to_roi(aux_cam, targets, high_thre, low_thre)
        local_views, flags = crop_from_roi(images, roi, num_crops, crop_size, neg_ratio, generator)
        global_view = random_resized_crop(images, generator=generator)
        model.update_teacher()  # official: before the teacher's projection of this step
        out_extra["flags"] = flags
    out = net(images, global_view, local_views)
    zero = out.logits.new_zeros(())
    parts = {"cls": F.multilabel_soft_margin_loss(out.logits.float(), targets),
             "cls_aux": F.multilabel_soft_margin_loss(out.aux_logits.float(), targets) if w_aux else zero,
             "ptc": zero, "ctc": zero}
    if w_ptc:
        pseudo = token_pseudo_labels(aux_cam, targets, out.grid, bkg_thre=bkg_thre, high_thre=high_thre,
                                     low_thre=low_thre)
        parts["ptc"] = ptc_loss(out.tokens, label_to_aff_mask(pseudo))
        out_extra["pseudo"] = pseudo
    if w_ctc:
        parts["ctc"] = ctc_loss(out.student, out.teacher, flags, temp)
    loss = parts["cls"] + w_aux * parts["cls_aux"] + w_ptc * parts["ptc"] + w_ctc * parts["ctc"]
    return {"loss": loss, **parts, "logits": out.logits, **out_extra}


def toco_step(w_aux: float = 1.0, w_ptc: float = W_PTC, w_ctc: float = W_CTC, **kwargs):
    """A ``vitlab.train.fit`` step_fn ``(net, images, labels) -> (loss, logits)`` running ``toco_losses`` with these
    weights and ``kwargs`` (cam_scales, crop_size, num_crops, temp, thresholds, generator). The last step's loss
    parts, as floats, are kept in ``step.last``. ``toco_step(w_aux=0, w_ptc=0, w_ctc=0)`` is the single-stage CAM
    baseline (the final CAM's classification loss only), trained by the same steps."""
    weights = {k: check_number(v, k, "toco_step", low=0) for k, v in
               (("w_aux", w_aux), ("w_ptc", w_ptc), ("w_ctc", w_ctc))}
    allowed = {"cam_scales", "bkg_thre", "high_thre", "low_thre", "num_crops", "crop_size", "neg_ratio", "temp",
               "generator"}
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise TypeError(f"toco_step: unknown argument(s) {bad}; expected any of {sorted(allowed)}")

    def step(net, images, labels):
        res = toco_losses(net, images, labels, **weights, **kwargs)
        step.last = {k: float(res[k].detach()) for k in ("loss", "cls", "cls_aux", "ptc", "ctc")}
        return res["loss"], res["logits"]

    step.last = {}
    return step


# ------------------------------------------------------------------------------------------------ measures
def mean_pairwise_cosine(tokens: Tensor) -> Tensor:
    """The over-smoothing measure: per image the mean cosine similarity over token pairs i != j, averaged over the
    images. tokens [B, N, D] (N >= 2) -> a scalar. 1 for identical tokens, 0 for mutually orthogonal ones."""
    fn = "mean_pairwise_cosine"
    check_ndim(tokens, 3, "tokens", fn)
    N = tokens.shape[1]
    if N < 2:
        raise ValueError(f"{fn}: tokens must hold at least 2 tokens per image, got {tuple(tokens.shape)}")
    f = F.normalize(tokens.float(), dim=-1)
    sim = f @ f.transpose(1, 2)
    off = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)
    return (off / (N * (N - 1))).mean()


def label_map(masks: Tensor, labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Ground-truth label maps [B, H, W] (int64; 0 background, k + 1 class k): from bool object masks [B, H, W] and
    class indices [B] (the course's single-label scenes), or an integer label map passed through as int64."""
    fn = "label_map"
    if not isinstance(masks, Tensor) or masks.ndim != 3:
        raise ValueError(f"{fn}: masks must be [B, H, W], got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if masks.dtype != torch.bool:
        if masks.is_floating_point():
            raise TypeError(f"{fn}: masks must be bool object masks or an integer label map, got {masks.dtype}")
        return masks.long()
    if not isinstance(labels, Tensor) or labels.shape != masks.shape[:1] or labels.is_floating_point():
        raise ValueError(f"{fn}: bool masks need class indices labels [B] = [{len(masks)}], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    return masks.long() * (labels.long().to(masks.device)[:, None, None] + 1)


def _label_miou(pred: Tensor, gt: Tensor, num_classes: int, per_class: bool, ignore_index: int) -> float:
    keep = gt != ignore_index
    pred, gt = pred[keep].long(), gt[keep].to(pred.device).long()
    if not per_class:
        return miou((pred > 0).long(), (gt > 0).long(), 2)
    return miou(pred, gt, num_classes + 1)


def cam_miou(cam: Tensor, masks: Tensor, labels: Tensor, *, bkg_thre: float = BKG_THRE, per_class: bool = False,
             ignore_index: int = IGNORE) -> float:
    """mIoU of ``cam_to_label(cam, labels, bkg_thre)`` against the ground truth, from one confusion matrix over all
    pixels given. ``cam`` [B, C, H, W] normalised (``multi_scale_cam`` / ``cam_from_logits``); ``masks`` bool [B, H, W]
    with ``labels`` [B] (the image's class), or an integer label map [B, H, W] with ``labels`` indices or multi-hot.
    ``per_class=False``: two classes, background and foreground (any class); ``True``: background and each class
    (the official VOC figure). Pixels labelled ``ignore_index`` in the ground truth are left out."""
    fn = "cam_miou"
    check_ndim(cam, 4, "cam", fn)
    if not isinstance(per_class, bool):
        raise TypeError(f"{fn}: per_class must be a bool, got {per_class!r}")
    gt = label_map(masks, labels, ignore_index)
    if gt.shape != (cam.shape[0], *cam.shape[2:]):
        raise ValueError(f"{fn}: masks {tuple(masks.shape)} must match the CAM's batch and size "
                         f"{(cam.shape[0], *cam.shape[2:])}: upsample the CAM first (cam_from_logits(size=...))")
    pred = cam_to_label(cam, labels, bkg_thre, ignore_index=ignore_index)
    return _label_miou(pred, gt, cam.shape[1], per_class, ignore_index)


def cam_auc(cam: Tensor, masks: Tensor, labels: Tensor) -> float:
    """Threshold-free: the probability that a random object pixel's CAM value (for the image's own class) exceeds a
    random background pixel's (pixel ROC AUC, ties counted half), over all pixels given. 0.5 is a CAM that does not
    know where the object is, 1 one that ranks every object pixel first. ``cam`` [B, C, H, W], ``masks`` bool
    [B, H, W], ``labels`` class indices [B]. (Not in the paper: its mIoU depends on one background threshold, and
    on small objects a CAM that lights nothing scores well, which this measure does not reward.)"""
    fn = "cam_auc"
    check_ndim(cam, 4, "cam", fn)
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.shape != (cam.shape[0], *cam.shape[2:]):
        raise ValueError(f"{fn}: masks must be bool [B, H, W] = {(cam.shape[0], *cam.shape[2:])}, got "
                         f"{(tuple(masks.shape), masks.dtype) if isinstance(masks, Tensor) else type(masks).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != (cam.shape[0],) or labels.is_floating_point():
        raise ValueError(f"{fn}: labels must be class indices [{cam.shape[0]}], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    own = cam[torch.arange(len(cam)), labels.long().to(cam.device)].flatten().double().cpu()
    fg = masks.flatten().cpu()
    n_fg, n_bg = int(fg.sum()), int((~fg).sum())
    if n_fg == 0 or n_bg == 0:
        raise ValueError(f"{fn}: masks must hold both object and background pixels")
    ranks = _average_ranks(own)
    return float((ranks[fg].sum() - n_fg * (n_fg + 1) / 2) / (n_fg * n_bg))


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` with ties given their average rank (the Mann-Whitney U statistic needs them)."""
    order = x.argsort()
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2  # the mean of ranks end - count + 1 .. end
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def _resize_labels(labels: Tensor, size: tuple[int, int], num_values: int) -> Tensor:
    """Majority vote of integer labels in 0..num_values-1 over each cell of a coarser grid (adaptive pooling)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    votes = F.one_hot(labels, num_values).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(votes, size).argmax(1)


def pseudo_label_accuracy(pseudo: Tensor, gt: Tensor, ignore_index: int = IGNORE) -> dict:
    """How good pseudo labels are: ``acc``, the fraction of positions with a pseudo label (not ``ignore_index``) and
    a ground truth that agree, and ``coverage``, the fraction with a pseudo label. ``pseudo`` [B, h, w], ``gt``
    [B, H, W] (``label_map``); a finer ``gt`` is reduced to the pseudo grid by a majority vote per cell (a token's
    ground truth is its patch's majority label)."""
    fn = "pseudo_label_accuracy"
    for name, t in (("pseudo", pseudo), ("gt", gt)):
        if not isinstance(t, Tensor) or t.ndim != 3 or t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be an integer label map [B, H, W], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if len(pseudo) != len(gt):
        raise ValueError(f"{fn}: pseudo has {len(pseudo)} maps, gt {len(gt)}")
    gt = gt.to(pseudo.device).long()
    if tuple(gt.shape[-2:]) != tuple(pseudo.shape[-2:]):
        top = int(gt[gt != ignore_index].max()) + 1 if (gt != ignore_index).any() else 1
        g = gt.clone()
        g[gt == ignore_index] = top  # ignored pixels vote for a class of their own
        gt = _resize_labels(g, tuple(pseudo.shape[-2:]), top + 1)
        gt[gt == top] = ignore_index
    has = pseudo != ignore_index
    both = has & (gt != ignore_index)
    acc = (pseudo[both] == gt[both]).float().mean().item() if both.any() else float("nan")
    return {"acc": acc, "coverage": has.float().mean().item()}


@torch.no_grad()
def measure_toco(net, images: Tensor, masks: Tensor, labels: Tensor, *, scales: Sequence[float] = (1.0,),
                 flip: str | None = "max", bkg_thre: float = BKG_THRE, high_thre: float = HIGH_THRE,
                 low_thre: float = LOW_THRE, batch_size: int = 64) -> dict:
    """What the lesson reads off a trained ``ToCoNet`` on held-out images with masks (eval mode, restored after):
    ``acc`` (argmax of the class scores = label, single-label data), ``cam_miou`` / ``aux_cam_miou`` (foreground /
    background, ``bkg_thre``) and ``cam_miou_class`` (per class) of the ``multi_scale_cam`` CAMs, ``cam_auc`` /
    ``aux_cam_auc`` (threshold-free; bool masks and class indices only), ``token_cos`` / ``aux_token_cos``
    (``mean_pairwise_cosine`` of the final / aux patch tokens), and ``pseudo_acc`` / ``pseudo_coverage`` of PTC's
    token pseudo labels (from the aux CAM) against each patch's majority label."""
    fn = "measure_toco"
    model = unwrap(net)
    if not isinstance(model, ToCoNet):
        raise TypeError(f"{fn}: net must be a ToCoNet, got {type(model).__name__}")
    check_ndim(images, 4, "images", fn)
    batch_size = check_int(batch_size, "batch_size", fn, low=1)
    gt_all = label_map(masks, labels)
    if len(gt_all) != len(images) or len(labels) != len(images) or gt_all.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"{fn}: masks {tuple(gt_all.shape)} and labels ({len(labels)}) must match images "
                         f"{tuple(images.shape)} in number and size")
    was_training = model.training
    model.eval()
    preds, aux_preds, pseudos = [], [], []  # label maps, not CAMs: a test set of CAMs would not fit comfortably
    own, aux_own = [], []  # the own class's CAM only (single-label data), for the threshold-free cam_auc
    cos = aux_cos = hits = 0.0
    try:
        for i in range(0, len(images), batch_size):
            x, y = images[i:i + batch_size], labels[i:i + batch_size]
            targets = multi_hot(y, model.num_classes).to(x.device)
            out = model(x)
            cam, aux = multi_scale_cam(model, x, scales, flip)
            preds.append(cam_to_label(cam, targets, bkg_thre).cpu())
            if y.ndim == 1:
                own.append(cam[torch.arange(len(x)), y.long().to(x.device)].cpu())
                aux_own.append(aux[torch.arange(len(x)), y.long().to(x.device)].cpu())
            aux_preds.append(cam_to_label(aux, targets, bkg_thre).cpu())
            pseudos.append(token_pseudo_labels(aux, targets, out.grid, bkg_thre=bkg_thre, high_thre=high_thre,
                                               low_thre=low_thre).cpu())
            cos += mean_pairwise_cosine(out.tokens).item() * len(x)
            aux_cos += mean_pairwise_cosine(out.aux_tokens).item() * len(x)
            if y.ndim == 1:
                hits += (out.logits.argmax(-1).cpu() == y.cpu()).sum().item()
    finally:
        model.train(was_training)
    pred, aux_pred, gt, n, C = torch.cat(preds), torch.cat(aux_preds), gt_all.cpu(), len(images), model.num_classes
    pl = pseudo_label_accuracy(torch.cat(pseudos), gt)
    aucs = {}
    if labels.ndim == 1 and masks.dtype == torch.bool:
        idx = torch.zeros(n, dtype=torch.long)  # the own-class maps stacked as a one-class CAM
        aucs = {"cam_auc": cam_auc(torch.cat(own)[:, None], masks.cpu(), idx),
                "aux_cam_auc": cam_auc(torch.cat(aux_own)[:, None], masks.cpu(), idx)}
    return {"acc": hits / n if labels.ndim == 1 else float("nan"),
            "cam_miou": _label_miou(pred, gt, C, False, IGNORE),
            "aux_cam_miou": _label_miou(aux_pred, gt, C, False, IGNORE),
            "cam_miou_class": _label_miou(pred, gt, C, True, IGNORE),
            "token_cos": cos / n, "aux_token_cos": aux_cos / n,
            "pseudo_acc": pl["acc"], "pseudo_coverage": pl["coverage"], **aucs}


# ------------------------------------------------------------------------------------------------ the lesson
# ToCo fine-tuned from the scenes ViT (``scenes_vit``: chapter 1's plain ViT, 93 % on cluttered scenes, 8 x 8 tokens)
# against the single-stage CAM baseline: the same ToCoNet, steps, lr, data and seeds, with the aux CAM, PTC and CTC
# switched off. Training CAMs at scale 1.0 with the flip (the official adds 0.5 and 1.5: on 32-px images the 0.5 pass
# is a 4 x 4 grid), 16-px local crops, the official 10x lr on the new heads.
VARIANTS = {"toco": dict(w_aux=1.0, w_ptc=W_PTC, w_ctc=W_CTC), "cam": dict(w_aux=0.0, w_ptc=0.0, w_ctc=0.0)}
SEEDS = (0, 1, 2)
LESSON_TRAIN = dict(lr=1e-4, weight_decay=0.01, warmup=0.1, label_smoothing=0.0, shift=0, batch_size=32,
                    head_lr_scale=10.0)
STEPS = {"cpu": 1200, "gpu": 20000}
STEP_KWARGS = dict(cam_scales=[1.0], crop_size=16)  # a list: the checkpoint config round-trips it as it is


def toco_vit(**vit_config) -> ToCoNet:
    """The registry builder: a ToCoNet around a fresh course ViT of this config (the zoo then loads the trained
    ViT through ``start_from``)."""
    from vitlab.models import VisionTransformer

    return ToCoNet(VisionTransformer(**vit_config))


def toco_objective(w_aux: float, w_ptc: float, w_ctc: float, cam_scales=(1.0,), crop_size: int = 16):
    """The zoo objective ``"toco"``: ``toco_step`` with these weights; the stored metrics are ``measure_toco`` on the
    test scenes (CAM mIoU and AUC, token cosine, pseudo labels, accuracy)."""
    from vitlab import zoo

    def metrics(model, train, val, test):
        return measure_toco(model, test.images, test.masks, test.labels)

    return zoo.Objective(step_fn=toco_step(w_aux, w_ptc, w_ctc, cam_scales=tuple(cam_scales), crop_size=crop_size),
                         metrics=metrics)


LENGTHS = {"full": 1.0, "half": 0.5, "double": 2.0}  # the plateau check: seed 0 also at half and twice the steps


def entry_name(variant: str, seed: int, steps: str = "full") -> str:
    """The zoo entry ``ch6_toco_<variant>_scenes_s<seed>``; ``steps="half"`` / ``"double"``: the same recipe trained
    for half / twice the steps (seed 0 only), which says whether the full runs have plateaued."""
    check_choice(variant, tuple(VARIANTS), "variant", "entry_name")
    check_choice(steps, tuple(LENGTHS), "steps", "entry_name")
    if isinstance(seed, bool) or seed not in SEEDS or (steps != "full" and seed != 0):
        raise ValueError(f"entry_name: seed must be one of {SEEDS} (0 for steps={steps!r}), got {seed!r}")
    return f"ch6_toco_{variant}_scenes_s{seed}" + ("" if steps == "full" else f"_{steps}")


def _register() -> None:
    from vitlab import zoo
    from vitlab.methods.robustness import scenes_vit as S
    from vitlab.models.registry import MODELS, register_model

    if "ch6_toco_scenes" in MODELS:  # re-imported
        return
    zoo.register_objective("toco", toco_objective)
    register_model("ch6_toco_scenes", toco_vit, **S.CONFIG)
    source, kwargs = S.DATA
    for variant, weights in VARIANTS.items():
        for seed in SEEDS:
            for steps in LENGTHS if seed == 0 else ("full",):
                n = {p: int(s * LENGTHS[steps]) for p, s in STEPS.items()}
                zoo.register(entry_name(variant, seed, steps), zoo.Recipe(
                    model="ch6_toco_scenes", data=source, data_kwargs=dict(kwargs), fit=dict(LESSON_TRAIN),
                    seed=seed, data_seed=S.R.DATA_SEED, per_profile={p: dict(steps=k) for p, k in n.items()},
                    shares={"smoke": "cpu"}, init=S.vit_name(seed), objective="toco",
                    objective_kwargs=dict(weights, **STEP_KWARGS)))


_register()
