"""FastVLM: Efficient Vision Encoding for Vision Language Models (P. K. A. Vasu, F. Faghri, C.-L. Li, C. Koc,
N. True, A. Antony, G. Santhanam, J. Gabriel, P. Grasch, O. Tuzel, H. Pouransari; CVPR 2025, arXiv:2412.13303;
official code: apple/ml-fastvlm, ``llava/model/multimodal_encoder/mobileclip/mci.py`` (``fastvithd``, ``FastViT``,
``RepMixer``, ``RepCPE``, ``MobileOneBlock``, ``conv_exp``), ``mobileclip_encoder.py`` (the image embeddings are
``conv_exp``'s map, flattened), ``multimodal_projector/builder.py`` (``mlp2x_gelu``); the same network is
``timm.models.fastvit`` (``fastvit_mci3``), which this module builds on, on CPU.

A VLM's time to first token (TTFT) is the vision encoder's latency plus the LM's prefill over [visual tokens; prompt].
A ViT/p at resolution r emits (r/p)^2 tokens and attends over all of them: both terms grow at least like r^2.
FastViTHD is a hybrid that keeps the high-resolution stages convolutional and emits few tokens:

    image ─stem (/4)→ RepMixer stage (/4) → RepMixer (/8) → RepMixer (/16) → RepCPE + attention (/32)
          → RepCPE + attention (/64) → conv_exp (3x3 depthwise x2 + SE) → map [B, 2 D5, r/64, r/64] → tokens

    RepMixer     x + gamma * (BN(dwconv(x)) - BN(x))  -> one depthwise conv at inference (reparameterised)
    RepCPE       x + dwconv7x7(x)                     -> one depthwise conv at inference
    attention    x + gamma1 * MHSA(LN_c(x)), then x + gamma2 * ConvFFN(x)     (only at 1/32 and 1/64)

The fifth stage (vs FastViT's four) makes the total stride 64, four times fewer tokens than FastViT at any resolution;
the token count is set by the input resolution alone (no pruning): 1024 px -> 16 x 16 = 256 tokens (official
``mobileclip_l.json``), 128 px -> 2 x 2 = 4.

    enc = fastvithd_tiny()                       # timm FastVit, FastViTHD layout, dims 8..128, 128-px scenes
    enc.forward_features(x)                      # [B, 256, 2, 2]: 4 visual tokens of 256 channels
    vit, n = matched_vit(enc)                    # course ViT/8 (256 tokens at 128 px) of about the same parameters
    vlm = fastvlm_model("fastvithd")             # TinyVLM: encoder -> mlp2x_gelu projector -> TinyLM
    fast = reparameterized(vlm)                  # RepMixer / MobileOne / RepCPE branches folded: the deployed model
    fast.ttft(images[:1], prompt_ids)            # ms to the first answer token

Our reading, and every deviation from the official code, named:
- **The network is timm's ``FastVit``** (``FastViTHD`` subclasses it and only adds argument and input checks, the
  stride, the token count and ``reparameterize``): ``fastvithd_config`` gives the official ``fastvithd`` layout
  (5 stages, RepMixer x 3 then attention x 2, RepCPE 7 x 7 before the attention stages, channel LayerNorm eps 1e-5,
  GELU after the large-kernel conv of each downsampling, no scale branch in the stem, ``conv_exp`` = timm's
  ``final_conv`` with ``cls_ratio`` 2). Built with the official sizes it is timm's ``fastvit_mci3`` key for key
  (the tests check every state-dict name and shape on the meta device); the curriculum's check loaded the official
  weights into ``fastvit_mci3`` (``checkpoint_filter_fn`` plus two renames) to max |d| 3e-8. Parameter names are
  timm's, not the official's (``network.N`` there, ``stages.N`` here).
- **The tiny config** (``TINY``): dims 8 / 16 / 32 / 64 / 128 and depths 1 / 1 / 2 / 1 / 1 (official 96..1536 and
  2 / 12 / 24 / 4 / 2). The curriculum suggested dims 16..256 (1.27 M parameters): a training step of its VLM took
  2.9x as long as with dims 8..128 on one CPU thread, and its parameter-matched ViT/8 would be twice as wide, which
  the lesson's CPU budget (six trainings plus two longer ones) could not pay; so every width is halved. MLP ratio 4
  as the official. timm's attention has a fixed head width of 32, so the attention stages' dims must be multiples of 32
  (2 and 4 heads here; 24 and 48 in FastViTHD). At 128 px the attention stages see 4 x 4 and 2 x 2 maps, so the
  7 x 7 RepCPE covers the whole map.
- ``forward_features`` is ``conv_exp``'s map (what ``mobileclip_encoder.py`` hands the projector), checked to be an
  image batch whose sides are multiples of 64; the timm classifier head is not used (``num_classes=0``).
- **The VLM** is the course's ``TinyVLM`` (LLaVA-1.5 layout: ``mlp2x_gelu`` projector, a causal LM reading the visual
  tokens first) with a 2 x 64 ``TinyLM`` instead of Qwen2 0.5B-7B, trained from scratch in one stage on
  ``caption_scenes`` questions (``KINDS``), the encoder included; the paper starts from a MobileCLIP-pretrained
  FastViTHD and trains LLaVA-1.5's two stages (projector, then everything) on 558 K + 665 K samples, up to 15 M.
- **The baseline** is the course ViT/8 (CLS dropped, as LLaVA does) with the depth whose parameter count is closest to
  the hybrid's (``matched_vit``); the paper's baselines are CLIP ViT-L/14 and other pretrained encoders.
- **TTFT** is wall time on CPU (fp32, batch 1, ``TinyVLM.ttft``: median of repeats) with the hybrid
  reparameterised; the paper times the encoder on an M1 MacBook Pro and adds the LLM's prefill.

The lesson's zoo (end of this file): the objective ``"fastvlm_vqa"`` (answer-only cross-entropy on one random question
of ``KINDS`` per scene, a val answer-accuracy curve), the dataset ``"vlm_caption_scenes"`` (``caption_scenes`` as an
ImageDataset, labels = scene index), the models ``ch7_fastvlm_{fastvithd,vit}`` and the entries
``ch7_fastvlm_{fastvithd,vit}_s{0,1,2}`` (``STEPS``, same lr, data and seeds; smoke shares cpu) plus
``ch7_fastvlm_{fastvithd,vit}_long_s0`` (``LONG_STEPS``: the plateau check by a longer run). Measured on one shared
CPU thread (cpu, 500 steps, batch 32, colour / count / exist): test answer accuracy 61.9 % +- 0.7 (FastViTHD) vs
53.7 % +- 2.5 (ViT/8), blind prior 37.8 %; seed 0 at 1,000 steps 61.5 -> 61.5 % and 58.3 -> 57.7 % (plateaued); a
training took ~10 min (FastViTHD) and ~26 min (ViT/8) on a CPU shared with other jobs.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.utils.model import reparameterize_model

from vitlab.checks import check_choice, check_int, check_model, check_number
from vitlab.vlm.train import seeded_entry

__all__ = ["FASTVITHD", "TINY", "STRIDE", "HEAD_DIM", "fastvithd_config", "FastViTHD", "fastvithd", "fastvithd_tiny",
           "token_count", "VIT", "matched_vit", "reparameterized", "ENCODERS", "IMG_SIZE", "TEXT_LEN", "LM",
           "fastvlm_model", "vision_ms", "prefill_ms", "ttft_sweep",
           "KINDS", "SEEDS", "DATA_SEED", "STEPS", "LONG_STEPS", "FIT", "EVAL_EVERY", "VAL_N",
           "measure", "vqa_objective", "model_name", "entry_name"]

STRIDE = 64  # stem /4, then four stride-2 downsamplings
HEAD_DIM = 32  # timm's (and the official) attention head width
# The official fastvithd (mci.py) sizes, and the lesson's tiny one
FASTVITHD = dict(layers=(2, 12, 24, 4, 2), embed_dims=(96, 192, 384, 768, 1536))
TINY = dict(layers=(1, 1, 2, 1, 1), embed_dims=(8, 16, 32, 64, 128))


def _check_stages(layers, embed_dims, fn: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    layers, embed_dims = tuple(layers), tuple(embed_dims)
    if len(layers) != 5 or len(embed_dims) != 5:
        raise ValueError(f"{fn}: layers and embed_dims must have one entry per stage (5: three RepMixer stages, two "
                         f"attention stages), got layers={layers} and embed_dims={embed_dims}")
    for i, (d, w) in enumerate(zip(layers, embed_dims)):
        check_int(d, f"layers[{i}]", fn), check_int(w, f"embed_dims[{i}]", fn)
    for i in range(1, 5):  # a downsampling's large-kernel conv is grouped by its input channels
        if embed_dims[i] % embed_dims[i - 1]:
            raise ValueError(f"{fn}: embed_dims[{i}]={embed_dims[i]} must be a multiple of embed_dims[{i - 1}]="
                             f"{embed_dims[i - 1]} (the downsampling conv has one group per input channel)")
    for i in (3, 4):
        if embed_dims[i] % HEAD_DIM:
            raise ValueError(f"{fn}: embed_dims[{i}]={embed_dims[i]} must be a multiple of {HEAD_DIM} (the attention "
                             f"stages use heads of {HEAD_DIM} channels)")
    return layers, embed_dims


def fastvithd_config(in_chans: int = 3, num_classes: int = 0, *, layers=FASTVITHD["layers"],
                     embed_dims=FASTVITHD["embed_dims"], mlp_ratio: float = 4.0, pos_kernel: int = 7,
                     cls_ratio: float = 2.0, drop_path_rate: float = 0.0, inference_mode: bool = False) -> dict:
    """The keyword arguments of timm's ``FastVit`` for a FastViTHD (defaults: the official sizes, which is timm's
    ``fastvit_mci3``): 5 stages, RepMixer x 3 then attention x 2 with a RepCPE (``pos_kernel`` square) in front,
    channel LayerNorm (eps 1e-5) in the attention blocks, every stage after the first downsampling by 2."""
    fn = "fastvithd_config"
    layers, embed_dims = _check_stages(layers, embed_dims, fn)
    check_int(in_chans, "in_chans", fn), check_int(num_classes, "num_classes", fn, low=0)
    check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
    pos_kernel = check_int(pos_kernel, "pos_kernel", fn)
    if pos_kernel % 2 == 0:
        raise ValueError(f"{fn}: pos_kernel must be odd (same padding), got {pos_kernel}")
    check_number(cls_ratio, "cls_ratio", fn, low=0, low_open=True)
    check_number(drop_path_rate, "drop_path_rate", fn, low=0, high=1, high_open=True)
    cpe = partial(RepConditionalPosEnc, spatial_shape=(pos_kernel, pos_kernel))
    return dict(in_chans=in_chans, num_classes=num_classes, layers=layers, embed_dims=embed_dims,
                mlp_ratios=(mlp_ratio,) * 5, downsamples=(False, True, True, True, True), se_downsamples=(False,) * 5,
                pos_embs=(None, None, None, cpe, cpe), token_mixers=("repmixer",) * 3 + ("attention",) * 2,
                lkc_use_act=True, norm_layer=partial(LayerNorm2d, eps=1e-5), stem_use_scale_branch=False,
                cls_ratio=cls_ratio, drop_path_rate=drop_path_rate, inference_mode=bool(inference_mode))


class FastViTHD(FastVit):
    """timm's ``FastVit`` in the FastViTHD layout (``fastvithd_config``). ``forward_features(x)`` -> ``conv_exp``'s map
    [B, cls_ratio * embed_dims[-1], H / 64, W / 64] (``TinyVLM`` flattens it into H W / 4096 visual tokens).
    ``img_size`` is nominal (the network takes any multiple of 64)."""

    def __init__(self, img_size: int = 1024, in_chans: int = 3, num_classes: int = 0, *,
                 layers=FASTVITHD["layers"], embed_dims=FASTVITHD["embed_dims"], mlp_ratio: float = 4.0,
                 pos_kernel: int = 7, cls_ratio: float = 2.0, drop_path_rate: float = 0.0,
                 inference_mode: bool = False):
        self.img_size = check_int(img_size, "img_size", "FastViTHD")
        if img_size % STRIDE:
            raise ValueError(f"FastViTHD: img_size={img_size} must be a multiple of the total stride {STRIDE}")
        super().__init__(**fastvithd_config(in_chans, num_classes, layers=layers, embed_dims=embed_dims,
                                            mlp_ratio=mlp_ratio, pos_kernel=pos_kernel, cls_ratio=cls_ratio,
                                            drop_path_rate=drop_path_rate, inference_mode=inference_mode))
        self.img_size = img_size

    @property
    def stride(self) -> int:
        return STRIDE

    @property
    def embed_dim(self) -> int:
        """Channels of a visual token (``conv_exp``'s output)."""
        return self.num_features

    def num_tokens(self, img_size: int) -> int:
        """Visual tokens of a square image of side ``img_size`` (a multiple of 64): (img_size / 64)^2."""
        check_int(img_size, "img_size", "FastViTHD.num_tokens")
        if img_size % STRIDE:
            raise ValueError(f"FastViTHD.num_tokens: img_size={img_size} must be a multiple of {STRIDE}")
        return (img_size // STRIDE) ** 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FastViTHD: x must be an image batch [B, {self.in_chans}, H, W], got {shape}")
        if x.shape[-2] % STRIDE or x.shape[-1] % STRIDE:
            raise ValueError(f"FastViTHD: x is {tuple(x.shape[-2:])} pixels; both sides must be multiples of the total "
                             f"stride {STRIDE}")
        return super().forward_features(x)

    def reparameterize(self) -> "FastViTHD":
        """Fold every train-time branch (MobileOne, RepMixer, RepCPE, the large-kernel convs) into one conv, in place
        (timm's ``reparameterize_model``): the same function in eval mode, fewer and cheaper ops. Returns self."""
        reparameterize_model(self, inplace=True)
        return self

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, stride={STRIDE}, tokens={self.num_tokens(self.img_size)}"


def fastvithd(**overrides) -> FastViTHD:
    """The official FastViTHD (1024 px: 16 x 16 = 256 tokens of 3072 channels)."""
    return FastViTHD(**({"img_size": 1024} | overrides))


def fastvithd_tiny(**overrides) -> FastViTHD:
    """The lesson's tiny FastViTHD (``TINY``: dims 8..128, depths 1 / 1 / 2 / 1 / 1; 128 px: 2 x 2 = 4 tokens of 256
    channels)."""
    return FastViTHD(**({"img_size": IMG_SIZE} | TINY | overrides))


def token_count(encoder: str, img_size: int, patch_size: int | None = None) -> int:
    """Visual tokens at ``img_size``: ``encoder`` "fastvithd" -> (img_size / 64)^2; "vit" -> (img_size / patch)^2
    (``patch_size`` default ``VIT["patch_size"]``; the CLS token is dropped, as LLaVA does)."""
    fn = "token_count"
    check_choice(encoder, ENCODERS, "encoder", fn)
    check_int(img_size, "img_size", fn)
    p = STRIDE if encoder == "fastvithd" else check_int(VIT["patch_size"] if patch_size is None else patch_size,
                                                         "patch_size", fn)
    if img_size % p:
        raise ValueError(f"{fn}: img_size={img_size} must be a multiple of {p} for {encoder!r}")
    return (img_size // p) ** 2


# ---------------------------------------------------------------------------------------------- the baseline
VIT = dict(patch_size=8, embed_dim=64, num_heads=2, mlp_ratio=4.0)  # the ViT/8; its depth comes from matched_vit


def matched_vit(encoder: FastViTHD, img_size: int | None = None, *, max_depth: int = 24, **overrides):
    """The baseline: a course ``VisionTransformer`` (``VIT``: patch 8, width 64, 2 heads; ``overrides`` change them) at
    ``img_size`` (default the encoder's) whose depth puts its parameter count closest to ``encoder``'s.
    Returns (vit, {"fastvithd": params, "vit": params})."""
    from vitlab.measure import count_params
    from vitlab.models import VisionTransformer

    fn = "matched_vit"
    if not isinstance(encoder, FastViTHD):
        raise TypeError(f"{fn}: encoder must be a FastViTHD, got {type(encoder).__name__}")
    img_size = check_int(encoder.img_size if img_size is None else img_size, "img_size", fn)
    check_int(max_depth, "max_depth", fn)
    cfg = dict(img_size=img_size, in_chans=encoder.in_chans, num_classes=0, **(VIT | overrides))
    target = count_params(encoder)
    one, two = (count_params(VisionTransformer(**(cfg | {"depth": d}))) for d in (1, 2))
    depth = min(max(1, round((target - (2 * one - two)) / (two - one))), max_depth)  # params are affine in depth
    vit = VisionTransformer(**(cfg | {"depth": depth}))
    return vit, {"fastvithd": target, "vit": count_params(vit)}


def reparameterized(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` (a ``TinyVLM`` or an encoder) with every FastViTHD in it reparameterised:
    the deployed network. ``model`` itself is left as it was (train-time branches, its mode)."""
    check_model(model, "reparameterized")
    out = copy.deepcopy(model).eval()
    if isinstance(out, FastViTHD):
        return out.reparameterize()
    for m in list(out.modules()):
        if isinstance(m, FastViTHD):
            m.reparameterize()
    return out


# ---------------------------------------------------------------------------------------------- the VLM
ENCODERS = ("fastvithd", "vit")
IMG_SIZE = 128  # caption_scenes' largest size: 4 FastViTHD tokens, 256 ViT/8 tokens
TEXT_LEN = 32  # room in the LM for prompt + answer after the visual tokens
LM = dict(dim=64, depth=2, num_heads=2)


def fastvlm_model(encoder: str = "fastvithd", img_size: int = IMG_SIZE, in_chans: int = 3, num_classes: int = 0, *,
                  projector: str = "mlp"):
    """A ``TinyVLM`` with vision encoder ``encoder`` ("fastvithd": ``fastvithd_tiny``; "vit": its ``matched_vit``),
    LLaVA-1.5's ``mlp2x_gelu`` projector (``projector="mlp"``, or "linear") and a 2 x 64 ``TinyLM`` whose length
    fits the ViT/8's tokens at ``img_size`` plus ``TEXT_LEN`` (the same LM for both encoders). ``num_classes`` is
    ignored (the zoo passes its dataset's; a VLM has no classifier)."""
    from vitlab.vlm import TinyLM, TinyVLM, VisionProjector, WordTokenizer

    fn = "fastvlm_model"
    check_choice(encoder, ENCODERS, "encoder", fn)
    img_size = check_int(img_size, "img_size", fn)
    if img_size % STRIDE:
        raise ValueError(f"{fn}: img_size={img_size} must be a multiple of {STRIDE} (FastViTHD's stride)")
    check_choice(projector, ("mlp", "linear"), "projector", fn)
    enc = fastvithd_tiny(img_size=img_size, in_chans=check_int(in_chans, "in_chans", fn))
    if encoder == "vit":
        enc, _ = matched_vit(enc)
    dim = enc.embed_dim
    max_len = token_count("vit", img_size) + TEXT_LEN
    lm = TinyLM(len(WordTokenizer()), max_len=max_len, **LM)
    return TinyVLM(enc, VisionProjector(dim, lm.dim, kind=projector), lm)


class _Vision(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, images):
        return self.vlm.visual_prefix(images)


def vision_ms(model, images: torch.Tensor, *, warmup: int = 2, repeats: int = 10) -> float:
    """Median ms of a ``TinyVLM``'s vision side alone (encoder + projector: ``visual_prefix``) on ``images``; TTFT
    minus this is the LM's prefill."""
    from vitlab.measure import latency
    from vitlab.vlm import TinyVLM

    if not isinstance(model, TinyVLM):
        raise TypeError(f"vision_ms: model must be a TinyVLM, got {type(model).__name__}")
    return latency(_Vision(model).train(model.training), images, warmup=warmup, repeats=repeats)["median_ms"]


class _Prefill(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, prefix, ids):
        from vitlab.vlm import KVCache

        return self.vlm.lm(ids, prefix_embeds=prefix, kv_cache=KVCache())[:, -1]


@torch.no_grad()
def prefill_ms(model, images: torch.Tensor, prompt_ids: torch.Tensor, *, warmup: int = 2, repeats: int = 10) -> float:
    """Median ms of a ``TinyVLM``'s LM prefill alone (into a fresh KV cache) over [its visual tokens of ``images``;
    ``prompt_ids``], the visual tokens computed once beforehand: TTFT's other part."""
    from vitlab.measure import latency
    from vitlab.vlm import TinyVLM

    if not isinstance(model, TinyVLM):
        raise TypeError(f"prefill_ms: model must be a TinyVLM, got {type(model).__name__}")
    model.check_prompt(images, prompt_ids)
    prefix = model.visual_prefix(images)
    return latency(_Prefill(model).train(model.training), (prefix, prompt_ids), warmup=warmup,
                   repeats=repeats)["median_ms"]


@torch.no_grad()
def ttft_sweep(resolutions=(64, 128, 256, 384, 512), *, prompt: str = "what colour is the circle", warmup: int = 2,
               repeats: int = 10, seed: int = 0, progress: bool = True) -> list[dict]:
    """TTFT of fresh (untrained: timing does not depend on the weights) VLMs at each square resolution, batch 1:
    the reparameterised ``fastvithd_tiny`` and the ViT/8 of the depth ``matched_vit`` picks at ``IMG_SIZE`` (the same
    width and depth at every resolution; its position embedding grows with it), each with the same projector and a
    ``TinyLM`` long enough for its tokens. Rows: encoder, img_size, tokens, params (encoder), vision_ms, prefill_ms
    (each timed alone) and ttft_ms (timed as a whole: about their sum)."""
    from tqdm.auto import tqdm

    from vitlab.measure import count_params
    from vitlab.models import VisionTransformer
    from vitlab.vlm import TinyLM, TinyVLM, VisionProjector, WordTokenizer

    fn = "ttft_sweep"
    if isinstance(resolutions, (str, bytes)) or not hasattr(resolutions, "__iter__"):
        raise TypeError(f"{fn}: resolutions must be a sequence of ints, got {type(resolutions).__name__}")
    resolutions = [check_int(r, "resolutions[i]", fn) for r in resolutions]
    if not resolutions or any(r % STRIDE for r in resolutions):
        raise ValueError(f"{fn}: resolutions must be non-empty multiples of {STRIDE}, got {resolutions}")
    check_int(warmup, "warmup", fn, low=0), check_int(repeats, "repeats", fn), check_int(seed, "seed", fn, low=0)
    tok = WordTokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    depth = len(matched_vit(fastvithd_tiny())[0].blocks)
    rows = []
    for r in tqdm(resolutions, desc="ttft sweep", disable=not progress):
        torch.manual_seed(seed)
        hd = fastvithd_tiny(img_size=r)
        vit = VisionTransformer(img_size=r, in_chans=3, num_classes=0, depth=depth, **VIT)
        images = torch.rand(1, 3, r, r, generator=torch.Generator().manual_seed(seed))
        for name, enc in (("fastvithd", hd), ("vit", vit)):
            n_tok = token_count(name, r)
            lm = TinyLM(len(tok), max_len=n_tok + TEXT_LEN, **LM)
            vlm = reparameterized(TinyVLM(enc, VisionProjector(enc.embed_dim, lm.dim), lm))
            rows.append(dict(encoder=name, img_size=r, tokens=n_tok, params=count_params(enc),
                             vision_ms=vision_ms(vlm, images, warmup=warmup, repeats=repeats),
                             prefill_ms=prefill_ms(vlm, images, ids, warmup=warmup, repeats=repeats),
                             ttft_ms=vlm.ttft(images, ids, warmup=warmup, repeats=repeats)))
    return rows


# ----------------------------------------------------------------------------------------------- the lesson's zoo
# TinyVLM on ``vitlab.vlm.caption_scenes`` at 128 px with either encoder (the same projector, LM, steps, lr, data and
# seeds; only the vision encoder differs), trained from scratch on one random question of ``KINDS`` per scene and
# step. The objective "fastvlm_vqa" logs a val answer-accuracy curve (the plateau evidence with the long runs).
KINDS = ("colour", "count", "exist")
SEEDS = (0, 1, 2)
DATA_SEED = 0
STEPS = {"cpu": 500, "gpu": 5000}  # smoke shares cpu's checkpoints (committed)
LONG_STEPS = {"cpu": 1000, "gpu": 10000}  # plateau evidence: seed 0 of each encoder trained twice as long
FIT = dict(lr=1e-3, weight_decay=0.05, warmup=0.1, batch_size=32, grad_clip=1.0, label_smoothing=0.0)
EVAL_EVERY = 100  # val answer accuracy every EVAL_EVERY steps: the plateau curve
VAL_N = 200  # val scenes in the curve


def _check_kinds(kinds, fn: str) -> tuple[str, ...]:
    from vitlab.vlm import QUESTION_KINDS

    if isinstance(kinds, str) or not hasattr(kinds, "__iter__"):
        raise TypeError(f"{fn}: kinds must be a sequence of question kinds, got {type(kinds).__name__}")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"{fn}: kinds is empty; choose from {QUESTION_KINDS}")
    for k in kinds:
        check_choice(k, QUESTION_KINDS, "kinds[i]", fn)
    return kinds


def measure(model, split: str = "test", *, kinds=KINDS, n: int | None = None, img_size: int = IMG_SIZE) -> dict:
    """A trained TinyVLM's greedy exact-match answer accuracy on ``caption_scenes(split, seed=DATA_SEED)`` (the first
    ``n`` scenes): one entry per kind of ``kinds`` and "all" (over every question of those kinds)."""
    from vitlab.vlm import TinyVLM, answer_accuracy, caption_scenes

    if not isinstance(model, TinyVLM):
        raise TypeError(f"measure: model must be a TinyVLM, got {type(model).__name__}")
    kinds = _check_kinds(kinds, "measure")
    data = caption_scenes(split, seed=DATA_SEED, img_size=check_int(img_size, "img_size", "measure"), n=n)
    return answer_accuracy(model, data, kinds=kinds, per_kind=True)


def vqa_objective(data_seed: int = DATA_SEED, seed: int = 0, kinds=KINDS, eval_every: int = EVAL_EVERY,
                  val_n: int = VAL_N):
    """The zoo objective ``"fastvlm_vqa"``: ``vitlab.vlm.qa_objective`` (each step one random question of ``kinds`` per
    scene of the batch, drawn by a generator seeded by ``seed``; answer-only cross-entropy). Every ``eval_every``
    steps it logs val answer accuracy over the first ``val_n`` val scenes (the plateau curve); the checkpoint stores
    ``measure`` on test (``test_<kind>``, ``test_all``), the curve's last point (``val_all``), the first ``val_n``
    train scenes (``train_all``: underfit or overfit?) and the curve."""
    from vitlab.vlm import answer_accuracy, caption_scenes, qa_objective

    fn = "vqa_objective"
    data_seed = check_int(data_seed, "data_seed", fn, low=0)
    kinds = _check_kinds(kinds, fn)
    val_n = check_int(val_n, "val_n", fn)
    val = {}

    def validate(model, img_size):
        if not val:
            val["scenes"] = caption_scenes("val", seed=data_seed, img_size=img_size, n=val_n)
        return answer_accuracy(model, val["scenes"], kinds=kinds)

    def measure_all(model, train, curve):
        img_size = train.images.shape[-1]
        t = measure(model, "test", kinds=kinds, img_size=img_size)
        tr = measure(model, "train", kinds=kinds, n=val_n, img_size=img_size)
        return {**{f"test_{k}": x for k, x in t.items()}, "val_all": curve[-1][1], "train_all": tr["all"],
                "val_curve_step": [c[0] for c in curve], "val_curve_acc": [c[1] for c in curve]}

    return qa_objective(kinds, data_seed=data_seed, seed=check_int(seed, "seed", fn, low=0),
                        eval_every=check_int(eval_every, "eval_every", fn), validate=validate, measure=measure_all)


def model_name(encoder: str) -> str:
    """The registry model of a vision encoder: ``ch7_fastvlm_<encoder>``."""
    check_choice(encoder, ENCODERS, "encoder", "model_name")
    return f"ch7_fastvlm_{encoder}"


def entry_name(encoder: str, seed: int, long: bool = False) -> str:
    """The zoo entry ``ch7_fastvlm_<encoder>_s<seed>`` (``STEPS``), or with ``long=True``
    ``ch7_fastvlm_<encoder>_long_s0`` (``LONG_STEPS``, seed 0 only: the plateau check by a longer run)."""
    model_name(encoder)
    return seeded_entry(f"ch7_fastvlm_{encoder}", seed, SEEDS, long)


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if model_name("fastvithd") in MODELS:  # re-imported
        return
    zoo.register_objective("fastvlm_vqa", vqa_objective)
    for encoder in ENCODERS:
        register_model(model_name(encoder), fastvlm_model, encoder=encoder, img_size=IMG_SIZE, in_chans=3,
                       num_classes=0)
        for long, seeds, steps in ((False, SEEDS, STEPS), (True, SEEDS[:1], LONG_STEPS)):
            for seed in seeds:
                zoo.register(entry_name(encoder, seed, long), zoo.Recipe(
                    model=model_name(encoder), data="vlm_caption_scenes", data_kwargs=dict(img_size=IMG_SIZE),
                    fit=dict(FIT), seed=seed, data_seed=DATA_SEED,
                    per_profile={p: dict(steps=n, max_train=None) for p, n in steps.items()},
                    shares={"smoke": "cpu"}, objective="fastvlm_vqa",
                    objective_kwargs=dict(data_seed=DATA_SEED, seed=seed, kinds=list(KINDS),
                                          eval_every=2 * EVAL_EVERY if long else EVAL_EVERY, val_n=VAL_N)))


_register()
