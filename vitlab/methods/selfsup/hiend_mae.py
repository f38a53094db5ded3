"""Hi-End-MAE: a masked autoencoder whose decoder is driven by the encoder's hidden layers.

Tang et al., "Hi-End-MAE: Hierarchical encoder-driven masked autoencoders are stronger vision learners for medical
image segmentation", Medical Image Analysis 2025 (arXiv:2502.08347). Official code: FengheTan9/Hi-End-MAE,
``hi_end_mae.py`` (``HiEndMAE.forward``) and ``networks/vit.py`` (``MAEViTEncoder`` returning every block's output,
``MAEViTDecoder``, ``CrossAttentionBlock``); downstream ``downstream/models/UNETR/unetr.py``. We follow them step
by step; the code is ours and builds on ``vitlab.mae`` (masking, patchify, sin-cos positions, loss, ``to_vit``).

In plain MAE the decoder sees only the encoder's last layer. Here each decoder layer after the first few
cross-attends to the visible tokens of another encoder layer, deep to shallow, so reconstruction uses (and so
trains) the features of several depths: the ones a U-shaped segmentation head later reads.

    image [B,C,H,W] ─PatchEmbed→ [B,N,D] + sin-cos pos ─random_masking→ visible [B,K,D]    K = int(N(1 − ratio))
        ─(CLS) ⊕ visible → block 0 … block L−1, keeping every output: hidden[l] [B,1+K,D] (raw, before the norm)
        ─LayerNorm → latent [B,1+K,D]
    decoder (width Dd):
        x = decoder_embed(latent) ⊕ mask tokens, unshuffled to patch order, + decoder pos   [B,1+N,Dd]
        x = decoder_blocks(x)                              ``decoder_depth`` self-attention blocks
        for j, l in enumerate(taps):                       taps deep → shallow, e.g. (9, 6, 3) of 12
            ctx = decoder_tap_embed[j](hidden[l])          [B,1+K,Dd]: CLS + visible tokens of encoder block l
            x = x + SelfAttn(LN x);  x = x + CrossAttn(LN x, ctx);  x = x + MLP(LN x)
        pred = decoder_pred(decoder_norm(x))[:, 1:]        [B,N,p·p·C]
    loss = MSE on the removed patches only (``MaskedAutoencoder.forward_loss``) against per-patch normalised
           targets, LayerNorm(p·p·C, eps 1e-6, no affine) as the official ``patch_norm``

Taps: ``hidden[l]`` is the output of encoder block l (0-based), the official ``hidden_states_out[l]``. The official
ViT-B (12 blocks) has 3 cross blocks fed by hidden[9], hidden[6], hidden[3]; ``default_taps(depth, n)`` spaces n
taps the same way for any depth (``default_taps(12, 3) == (9, 6, 3)``, ``default_taps(6, 2) == (4, 2)``).

Transfer: ``SegmentationViT`` wraps the exported encoder (``to_vit()`` of a ``MaskedAutoencoder`` or of a
``HiEndMAE``: the encoder keys are the same) in a UNETR-lite head that reads the same kind of taps (the official
downstream UNETR reads hidden[3], hidden[6], hidden[9] and the normed output of a 12-block ViT); ``miou`` scores it.

Names, for loading official weights (lesson equivalence check): official ``encoder_to_decoder[i]`` (i over tap
indices 3, 6, 9, then the final output) ↔ ``decoder_tap_embed[n_taps − 1 − i]`` and, for the last,
``decoder_embed``; ``decoder.blocks`` ↔ ``decoder_blocks``; ``decoder.cross_attention_blocks`` ↔
``decoder_cross_blocks`` (sub-names ``norm0``, ``self_attn.qkv/proj``, ``norm1``, ``cross_attn.q/kv/proj``,
``norm2``, ``mlp.fc1/fc2`` as the official); ``decoder.norm/head`` ↔ ``decoder_norm/pred``; encoder as ``vitlab.mae``.

Deviations, named:
- 2-D images, not 3-D volumes. Nothing in the encoder-driven decoder depends on the dimension: a 3-D subclass swaps
  ``patch_embed`` (a Conv3d), the two position buffers (``vitlab.mae.sincos_pos_embed_3d``), ``_check``, ``target``
  and ``reconstruct`` (``patchify3d``/``unpatchify3d``).
- The decoder runs in patch order (unshuffled by ``ids_restore``, as vitlab's MAE), the official one in the shuffled
  order (visible, then masked). Attention is permutation-equivariant and every token carries its own position,
  so pred and loss are the same up to float rounding; the masks are the same draw (``torch.rand(B, N)``, argsort).
- ``taps`` and the number of cross blocks are arguments (the official code hard-codes 3, 6, 9 of 12).
- ``init="mae"`` zeroes every Linear bias; the official ``encoder_to_decoder`` keeps PyTorch's default bias init.
- ``reconstruct`` maps ``pred`` back to pixels with the target's own statistics (biased variance); the official
  ``return_image`` uses the unbiased one.
- ``SegmentationViT`` is UNETR reduced to one step: each tap goes to full resolution by a per-patch Linear
  (a transposed conv with kernel = stride = p) instead of UNETR's progressive deconv/conv stages, the maps are summed
  (not concatenated) with a 3×3 conv of the image (UNETR's ``encoder1`` skip), then conv 3×3, GELU, conv 1×1.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from vitlab.checks import check_images, check_int, check_number
from vitlab.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from vitlab.metrics import miou  # noqa: F401 (re-exported: the lesson scores its segmentations with it)
from vitlab.models import CrossAttention, VisionTransformer
from vitlab.models.vit import Attention, LayerNorm

__all__ = ["default_taps", "CrossAttentionBlock", "HiEndMAE", "SegmentationViT", "miou"]


def default_taps(depth: int, n: int) -> tuple[int, ...]:
    """``n`` encoder block indices, deep → shallow, spaced as the official 12-block model's (9, 6, 3):
    k·depth // (n + 1) for k = n … 1. Needs n < depth (distinct, none the last block)."""
    depth = check_int(depth, "depth", "default_taps")
    n = check_int(n, "n", "default_taps", low=0, high=depth - 1)
    return tuple(k * depth // (n + 1) for k in range(n, 0, -1))


def _check_taps(taps, depth: int, fn: str) -> tuple[int, ...]:
    """An int n (``default_taps(depth, n)``) or a sequence of block indices in [0, depth)."""
    if isinstance(taps, numbers.Integral) and not isinstance(taps, bool):
        return default_taps(depth, check_int(taps, "taps", fn, low=0, high=depth - 1))
    if isinstance(taps, (str, bytes)) or not isinstance(taps, Sequence):
        raise TypeError(f"{fn}: taps must be an int (how many, spaced as the paper) or a sequence of encoder block "
                        f"indices, got {type(taps).__name__} ({taps!r})")
    return tuple(check_int(t, f"taps[{i}]", fn, low=0, high=depth - 1) for i, t in enumerate(taps))


class CrossAttentionBlock(nn.Module):
    """The official decoder block (``self_attn=True``): x + SelfAttn(LN0 x), x + CrossAttn(LN1 x, ctx),
    x + MLP(LN2 x). ``ctx`` [B, M, Dd] enters un-normalised, as in the official code (it is a projection of an
    encoder state). Built from vitlab's ``Attention`` and ``CrossAttention`` and timm's ``Mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm0 = LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm1 = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x))


class HiEndMAE(MaskedAutoencoder):
    """MAE with an encoder-driven hierarchical decoder. ``forward(images, mask_ratio=0.75) -> (loss, pred, mask)``
    as ``MaskedAutoencoder``.

    ``decoder_depth``: self-attention blocks on the last encoder output (official: 2); ``taps``: the encoder blocks
    whose outputs the following cross blocks read, in order (an int n: ``default_taps(depth, n)``; official (9, 6, 3)
    of 12; ``()``: none, then this is MAE with the official target). ``norm_pix_loss`` (default True, as the official
    code always normalises) uses LayerNorm statistics (biased variance), not ``MaskedAutoencoder``'s.
    The encoder (keys, ``forward_features``, ``encoder_state``, ``to_vit``) is ``MaskedAutoencoder``'s."""

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64,
                 depth: int = 4, num_heads: int = 4, decoder_dim: int = 32, decoder_depth: int = 2,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0, taps=3, norm_pix_loss: bool = True,
                 init: str = "mae"):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_dim, decoder_depth,
                         decoder_heads, mlp_ratio, norm_pix_loss, init)
        self.taps = _check_taps(taps, depth, "HiEndMAE")
        self.decoder_tap_embed = nn.ModuleList([nn.Linear(embed_dim, decoder_dim) for _ in self.taps])
        self.decoder_cross_blocks = nn.ModuleList([CrossAttentionBlock(decoder_dim, decoder_heads, mlp_ratio)
                                                   for _ in self.taps])
        self.init_weights(init)  # again, now that the new layers exist

    # -- encoder: every block's output is kept
    def forward_encoder_states(self, images: torch.Tensor, mask_ratio: float = 0.75, *,
                               generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """→ (latent [B,1+K,D] (normed), hidden: list of ``depth`` raw block outputs [B,1+K,D], mask [B,N],
        ids_restore [B,N]). The same masking draw as ``MaskedAutoencoder.forward_encoder``."""
        self._check(images)
        check_number(mask_ratio, "mask_ratio", "HiEndMAE", low=0, high=1, high_open=True)
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, generator=generator, noise=noise)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden, mask, ids_restore

    # -- decoder: self-attention on the last layer, then cross-attention to the tapped layers, deep to shallow
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """latent [B,1+K,D], ids_restore [B,N], hidden (``depth`` tensors [B,1+K,D]) → pred [B,N,p·p·C]."""
        if not isinstance(hidden, Sequence) or len(hidden) != len(self.blocks):
            n = len(hidden) if isinstance(hidden, Sequence) else type(hidden).__name__
            raise ValueError(f"HiEndMAE.forward_decoder: hidden must hold the {len(self.blocks)} encoder block "
                             f"outputs, got {n}")
        x = self.decoder_embed(latent)
        B, T, Dd = x.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, ids_restore.shape[1] + 1 - T, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        for blk, embed, layer in zip(self.decoder_cross_blocks, self.decoder_tap_embed, self.taps):
            x = blk(x, embed(hidden[layer]))  # queries: all N + 1 tokens; keys/values: CLS + visible of block `layer`
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The patches, each LayerNorm-ed (mean 0, biased variance 1, eps 1e-6) if ``norm_pix_loss``."""
        t = patchify(images, self.patch_size)
        return F.layer_norm(t, t.shape[-1:], eps=1e-6) if self.norm_pix_loss else t

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
        latent, hidden, mask, ids_restore = self.forward_encoder_states(images, mask_ratio, generator=generator,
                                                                        noise=noise)
        pred = self.forward_decoder(latent, ids_restore, hidden)
        return self.forward_loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visible patches from ``images``, removed ones from ``pred`` (un-normalised with each patch's own mean and
        biased std when ``norm_pix_loss``)."""
        self._check(images)
        t = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            pred = pred * (t.var(dim=-1, unbiased=False, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        m = mask[..., None].to(pred.dtype)
        return unpatchify(t * (1 - m) + pred * m, self.patch_size, self.grid_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", taps={self.taps}"


# ------------------------------------------------------------------------------------------------ transfer
class SegmentationViT(nn.Module):
    """UNETR-lite: a pre-trained ViT encoder and a light dense head → per-pixel logits [B, K, H, W].

    ``encoder``: a ``VisionTransformer`` (e.g. ``mae.to_vit()``) or a ``MaskedAutoencoder``/``HiEndMAE`` (its
    ``to_vit()`` is taken). ``taps``: encoder blocks read besides the normed output (default: ``default_taps(depth,
    min(3, depth − 1))``, shallow first, i.e. (3, 6, 9) of 12 as UNETR). Each read map, prefix tokens dropped, goes
    per patch through a Linear to p·p·``width`` and ``unpatchify`` to [B, width, H, W]; the maps and a 3×3 conv of
    the image are summed, then conv 3×3 → GELU → conv 1×1 to ``num_classes``. The whole ViT is fine-tuned."""

    def __init__(self, encoder: nn.Module, num_classes: int, taps=None, width: int = 32):
        super().__init__()
        fn = "SegmentationViT"
        if isinstance(encoder, MaskedAutoencoder):
            encoder = encoder.to_vit(num_classes=0)
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"{fn}: encoder must be a vitlab VisionTransformer or a MaskedAutoencoder, got "
                            f"{type(encoder).__name__}")
        self.num_classes = check_int(num_classes, "num_classes", fn, low=2)
        self.width = check_int(width, "width", fn)
        depth = len(encoder.blocks)
        self.taps = (tuple(sorted(default_taps(depth, min(3, depth - 1)))) if taps is None
                     else _check_taps(taps, depth, fn))
        self.vit = encoder
        pe = encoder.patch_embed
        self.patch_size, self.in_chans, self.img_size = pe.patch_size, pe.in_chans, pe.img_size
        dim, p = encoder.embed_dim, pe.patch_size
        self.up = nn.ModuleList([nn.Linear(dim, p * p * width) for _ in range(len(self.taps) + 1)])  # + the output
        self.skip = nn.Conv2d(pe.in_chans, width, 3, padding=1)
        self.fuse = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, self.num_classes, 1)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped block outputs (raw) and the normed output, patch tokens only: each [B, N, D]."""
        check_images(images, self.in_chans, self.img_size, "SegmentationViT", "images")
        vit, prefix = self.vit, self.vit.num_prefix_tokens
        x = vit.embed(images)
        hidden = []
        for blk in vit.blocks:
            x = blk(x)
            hidden.append(x)
        return [hidden[t][:, prefix:] for t in self.taps] + [vit.norm(x)[:, prefix:]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = [unpatchify(up(f), self.patch_size, self.vit.grid_size) for up, f in zip(self.up, self.features(images))]
        x = torch.stack(maps).sum(0) + self.skip(images)
        return self.out(F.gelu(self.fuse(x)))


# ------------------------------------------------------------------------ the lesson's recipe (zoo entries)
# notebooks/5_selfsup/hiend_mae.ipynb and the chapter's compare read these. Both pre-trainings see the same 20,000
# unlabelled cluttered scenes (32 px, 3 channels, patch 4: 64 patches) with the same encoder, mask ratio, steps and
# lr; they differ only in the decoder: Hi-End-MAE's ("hiend": 1 self-attention block, then 2 cross-attention blocks
# reading encoder blocks 4 and 2) against MAE's decoder of the same depth ("plain": 3 self-attention blocks, taps=()).
# Zoo entries mae_scenes_<decoder>, then seg_scenes_<decoder or scratch>_s<seed>. Then each
# encoder, and a fresh one, is fine-tuned as a SegmentationViT on the digit masks of only LABELLED scenes.
ENCODER = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0)
DECODERS = {"hiend": dict(decoder_dim=64, decoder_depth=1, decoder_heads=4, taps=2),  # taps (4, 2)
            "plain": dict(decoder_dim=64, decoder_depth=3, decoder_heads=4, taps=())}
MASK_RATIO = 0.75
PRETRAIN = dict(batch_size=128, lr=1.5e-3, weight_decay=0.05, warmup=0.1)
PRETRAIN_STEPS = {"cpu": 2000, "gpu": 20000}
PRETRAIN_SCENES = 20000
SEGMENT = dict(batch_size=32, lr=1e-3, weight_decay=0.05, warmup=0.1, targets="masks")
SEGMENT_STEPS = {"cpu": 1000, "gpu": 10000}
LABELLED = 200  # scenes whose masks the fine-tunes see (the few-label regime the paper's transfer is about)
SEG_WIDTH = 32
SEEDS = (0, 1, 2)
DATA = ("cluttered_scenes", dict(img_size=32, in_chans=3))
SEG_CLASSES = ("background", "digit")


def hiend_model(num_classes: int = 0, **kwargs) -> HiEndMAE:
    """The model registry's builder of a pre-training (a dataset's ``num_classes`` does not apply to it)."""
    return HiEndMAE(**kwargs)


def segmentation_model(num_classes: int = 0, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                       embed_dim: int = 64, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0,
                       width: int = SEG_WIDTH, taps=None) -> SegmentationViT:
    """The registry's builder of the fine-tuned model: a fresh ViT in a ``SegmentationViT`` with one logit per
    ``SEG_CLASSES`` (a scene dataset's ``num_classes`` counts the digit labels, which a mask does not use)."""
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    return SegmentationViT(vit, num_classes=len(SEG_CLASSES), taps=taps, width=width)


@torch.no_grad()
def segmentation_metrics(model: SegmentationViT, data, batch_size: int = 250) -> dict:
    """mIoU (``vitlab.metrics.miou`` over background and digit) and the digit class's IoU on ``data``'s masks."""
    images, masks = getattr(data, "images", None), getattr(data, "masks", None)
    if not isinstance(masks, torch.Tensor) or not isinstance(images, torch.Tensor):
        raise TypeError(f"segmentation_metrics: data must be a dataset with images and masks (cluttered_scenes), "
                        f"got {type(data).__name__}")
    was_training = model.training
    model.eval()
    pred = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    target = masks.long()
    inter, union = ((pred == 1) & (target == 1)).sum().item(), ((pred == 1) | (target == 1)).sum().item()
    return {"miou": miou(pred, target, len(SEG_CLASSES)), "digit_iou": inter / max(union, 1)}


def segmentation_objective(eval_every: int = 100):
    """Fine-tuning on masks as a ``vitlab.zoo`` objective (registered as ``"segment"``, with ``targets="masks"``):
    per-pixel cross-entropy; every ``eval_every`` steps the val mIoU is logged (the plateau check), and the
    checkpoint stores val/test mIoU, test digit IoU and that curve."""
    from vitlab import data as vdata
    from vitlab import zoo

    check_int(eval_every, "eval_every", "segmentation_objective")
    source, kwargs = DATA
    state = {"step": 0, "curve": []}

    def step_fn(net, images, masks):
        if state["step"] % eval_every == 0:
            if "val" not in state:
                state["val"] = vdata.load(source, "val", **kwargs)
            state["curve"].append((state["step"], segmentation_metrics(net, state["val"])["miou"]))
        state["step"] += 1
        return F.cross_entropy(net(images).float(), masks), None

    def metrics(model, train, val, test):
        v, t = segmentation_metrics(model, val), segmentation_metrics(model, test)
        curve = state["curve"] + [(state["step"], v["miou"])]
        return {"val_miou": v["miou"], "test_miou": t["miou"], "test_digit_iou": t["digit_iou"],
                "val_curve_step": [s for s, _ in curve], "val_curve_miou": [m for _, m in curve]}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def entry_names() -> list[str]:
    """Every zoo entry of the lesson: the two pre-trainings, then the fine-tunes of each and from scratch per seed."""
    return [f"mae_scenes_{d}" for d in DECODERS] + [f"seg_scenes_{v}_s{s}" for v in (*DECODERS, "scratch")
                                                     for s in SEEDS]


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if "seg_vit_scenes" in MODELS:  # re-imported
        return
    zoo.register_objective("segment", segmentation_objective)
    source, kwargs = DATA
    register_model("seg_vit_scenes", segmentation_model, **ENCODER)
    seg = lambda seed, init=None: zoo.Recipe(  # noqa: E731
        model="seg_vit_scenes", data=source, data_kwargs=dict(kwargs), seed=seed, data_seed=0, fit=dict(SEGMENT),
        per_profile={p: dict(steps=s, max_train=LABELLED) for p, s in SEGMENT_STEPS.items()},
        shares={"smoke": "cpu"}, objective="segment", init=init)
    for decoder, dec_kwargs in DECODERS.items():
        model = f"mae_scenes_{decoder}"
        register_model(model, hiend_model, **ENCODER, **dec_kwargs)
        zoo.register(model, zoo.Recipe(
            model=model, data=source, data_kwargs=dict(kwargs), train_kwargs=dict(n=PRETRAIN_SCENES),
            fit=dict(PRETRAIN), per_profile={p: dict(steps=s) for p, s in PRETRAIN_STEPS.items()},
            shares={"smoke": "cpu"}, objective="mae", objective_kwargs=dict(mask_ratio=MASK_RATIO)))
        for seed in SEEDS:
            zoo.register(f"seg_scenes_{decoder}_s{seed}", seg(seed, init=model))
    for seed in SEEDS:
        zoo.register(f"seg_scenes_scratch_s{seed}", seg(seed))


_register()
