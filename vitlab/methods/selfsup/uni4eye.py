"""Uni4Eye: one ViT encoder pre-trained on 2-D images and 3-D volumes by masked image modelling, with a second
decoder branch that reconstructs the image's gradient map.

Cai, He, Lin, Tang, "Uni4Eye: Unified 2D and 3D Self-supervised Pre-training via Masked Image Modeling Transformer
for Ophthalmic Image Classification", MICCAI 2022 (arXiv:2203.04614). The original repository has no public
snapshot; we follow the authors' follow-up ``Davidczy/Uni4Eye_pp``: ``PatchEmbed23D.py`` (the Unified Patch
Embedding), ``models_mymae23D.py`` (``MaskedAutoencoderViT_partial23D``: pos_embed2/pos_embed3, decoder_pred2/3) and
``octa500.py`` (``Octa500Dataset2D_2decoder_v``: the gradient target). The code is ours; MAE's parts come from
``vitlab.mae``.

    x: image [B,C,H,W] or volume [B,C,D,H,W]
      ─UnifiedPatchEmbed→ rank 4: Conv2d(p, stride p) + 2-D sin-cos  → [B, N2, E]   N2 = (H/p)(W/p)
                          rank 5: Conv3d(p, stride p) + 3-D sin-cos  → [B, N3, E]   N3 = (D/p)(H/p)(W/p)
      ─random_masking (vitlab.mae)→ [B, N_keep, E]; CLS ⊕ visible → the SAME L × Block → LayerNorm
      ─two decoders ("dual-branch"), each: Linear → width, mask tokens, unshuffle, + its 2-D or 3-D positions,
       a few Blocks, LayerNorm, the head for this rank (pred2 or pred3)
          image branch    → [B, N, p^k·C]  regresses patchify(x)               (k = 2 or 3)
          gradient branch → [B, N, p^k]    regresses patchify(gradient_target(x)), one channel
    loss = masked_mse(image) + grad_weight · masked_mse(gradient)    each over the removed patches only (MAE's rule)

Gradient target (``Octa500Dataset2D_2decoder_v``): the image made grey (one channel), Sobel derivatives along x and
y with cv2's reflect-101 border, combined as 0.5·|Gx| + 0.5·|Gy| (``cv2.addWeighted``): the mean of the absolute
derivatives, an L1 "magnitude", not sqrt(Gx² + Gy²). ``sobel_2d`` / ``sobel_3d`` / ``gradient_target`` below.

Deviations, named:
- Volumes are [B,C,D,H,W] (vitlab's layout; the official code takes [B,C,H,W,D] with D = H/2) of any size
  ``vol_size`` divisible by the patch; tokens in ``patchify3d``'s (d, h, w) order.
- ``pos_embed3``: the official code never fills it (it stays zero, frozen); we use ``sincos_pos_embed_3d``. When
  the width is not a multiple of 6, the table fills the first 6·⌊E/6⌋ channels and the rest stay zero.
- The official repository has no gradient target for volumes (its 3-D loader returns the volume only). We offer
  2-D Sobel on every depth slice (``volume_grad="slices"``, the default: the official 2-D operator, unchanged)
  or a 3-D Sobel (``"3d"``: the mean of |G| over the three axes).
- Sobel: ``ksize=3`` by default (the official uses cv2's ``ksize=5``; both are offered), in float: no int16 rounding
  or uint8 saturation (cv2's ``CV_16S`` + ``convertScaleAbs`` on [0, 1] images), and (``normalize=True``) divided by
  the kernel's sum of positive weights so that a unit step gives |G| = 1 (the raw 5×5 values reach 48). The grey
  image is the channel mean (cv2 uses luma weights 0.299/0.587/0.114 for RGB).
- Each branch has its own decoder (width, blocks, mask token) and per-rank heads (``pred2``, ``pred3``). The
  Uni4Eye++ code replaces this decoder by a task-conditioned dynamic head, which we do not build.
- Init as ``MaskedAutoencoder(init="mae")``; the 3-D projection is xavier-initialised too (the official code
  leaves it at PyTorch's default). ``forward_loss``'s max(Σ mask, 1) (mask_ratio = 0 gives 0, not NaN) as vitlab.mae.

Fine-tuning: ``to_vit()`` gives a 2-D ``vitlab.models.VisionTransformer`` with the shared encoder (the 2-D branch of
the embedding, its sin-cos positions, CLS, blocks, norm); ``encoder_state()`` holds those under the ViT's key names.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_images, check_int, check_number
from vitlab.mae import (MaskedAutoencoder, check_widths, masked_mse, patchify, patchify3d, random_masking,
                        sincos_pos_embed_2d, sincos_pos_embed_3d)
from vitlab.models.vit import Block, LayerNorm, VisionTransformer

__all__ = ["sobel_2d", "sobel_3d", "gradient_target", "UnifiedPatchEmbed", "Uni4EyeMAE"]

# Sobel as cv2 builds it: a derivative along one axis times a smoothing along every other one.
_SOBEL = {3: ((1.0, 2.0, 1.0), (-1.0, 0.0, 1.0)), 5: ((1.0, 4.0, 6.0, 4.0, 1.0), (-1.0, -2.0, 0.0, 2.0, 1.0))}


# ------------------------------------------------------------------------------------------ gradient maps
def _sobel_kernels(ndim: int, ksize: int, normalize: bool) -> torch.Tensor:
    """[ndim, k, …, k]: kernel a differentiates along axis a (axes in tensor order, e.g. (y, x) or (d, y, x))."""
    smooth, deriv = (torch.tensor(v, dtype=torch.float64) for v in _SOBEL[ksize])
    kernels = []
    for axis in range(ndim):
        k = torch.ones((), dtype=torch.float64)
        for a in range(ndim):  # outer product, one axis at a time
            k = k[..., None] * (deriv if a == axis else smooth)
        kernels.append(k / k.clamp(min=0).sum() if normalize else k)
    return torch.stack(kernels)


def _sobel(x: torch.Tensor, ndim: int, ksize: int, normalize: bool, name: str, fn: str) -> torch.Tensor:
    layout = "[B, C, H, W]" if ndim == 2 else "[B, C, D, H, W]"
    if not isinstance(x, torch.Tensor) or x.ndim != ndim + 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a batch {layout}, got {shape}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    ksize = check_choice(ksize, tuple(_SOBEL), "ksize", fn)
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {normalize!r}")
    r = ksize // 2
    if min(x.shape[2:]) <= r:
        raise ValueError(f"{fn}: {name}'s spatial size {tuple(x.shape[2:])} must exceed ksize // 2 = {r} on every "
                         f"axis (reflect padding)")
    grey = x.mean(dim=1, keepdim=True)  # [B, 1, ...]
    grey = F.pad(grey, [r] * (2 * ndim), mode="reflect")  # cv2's default border, BORDER_REFLECT_101
    w = _sobel_kernels(ndim, ksize, normalize).to(x.dtype).to(x.device)[:, None]  # [ndim, 1, k, …]
    g = (F.conv2d if ndim == 2 else F.conv3d)(grey, w)  # [B, ndim, ...]: one derivative per axis
    return g.abs().mean(dim=1, keepdim=True)  # 0.5·|Gx| + 0.5·|Gy| in 2-D, as cv2.addWeighted(…, 0.5, …, 0.5)


def sobel_2d(images: torch.Tensor, ksize: int = 3, normalize: bool = True) -> torch.Tensor:
    """Gradient map [B, 1, H, W] of images [B, C, H, W]: channel mean, Sobel Gx and Gy (``ksize`` 3 or 5,
    reflect-101 border), 0.5·|Gx| + 0.5·|Gy|. ``normalize`` divides each kernel by its sum of positive weights
    (4 for 3×3, 48 for 5×5), so a step of height s gives |Gx| = s beside it (3×3: on both sides of the edge)."""
    return _sobel(images, 2, ksize, normalize, "images", "sobel_2d")


def sobel_3d(volumes: torch.Tensor, ksize: int = 3, normalize: bool = True) -> torch.Tensor:
    """Gradient map [B, 1, D, H, W] of volumes [B, C, D, H, W]: 3-D Sobel along d, h, w (each a derivative times a
    smoothing over the other two axes), (|Gd| + |Gh| + |Gw|) / 3. ``normalize`` as in ``sobel_2d`` (3×3×3: 16)."""
    return _sobel(volumes, 3, ksize, normalize, "volumes", "sobel_3d")


def gradient_target(x: torch.Tensor, ksize: int = 3, volume_grad: str = "slices", normalize: bool = True):
    """The gradient branch's target: ``sobel_2d`` for images [B,C,H,W]; for volumes [B,C,D,H,W], ``sobel_2d`` on
    every depth slice (``volume_grad="slices"``) or ``sobel_3d`` (``"3d"``). Output has one channel."""
    fn = "gradient_target"
    check_choice(volume_grad, ("slices", "3d"), "volume_grad", fn)
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be an image batch [B, C, H, W] or a volume batch [B, C, D, H, W], got {shape}")
    if x.ndim == 4:
        return sobel_2d(x, ksize, normalize)
    if volume_grad == "3d":
        return sobel_3d(x, ksize, normalize)
    B, C, D, H, W = x.shape
    slices = x.transpose(1, 2).reshape(B * D, C, H, W)  # every depth slice as an image
    return sobel_2d(slices, ksize, normalize).reshape(B, D, 1, H, W).transpose(1, 2)


# ---------------------------------------------------------------------------------- unified patch embedding
def _sincos_3d(d: int, h: int, w: int, dim: int) -> torch.Tensor:
    """``sincos_pos_embed_3d`` [d·h·w, dim] on the first 6·⌊dim/6⌋ channels, zeros on the rest."""
    out = torch.zeros(d * h * w, dim)
    if dim >= 6:
        out[:, :dim - dim % 6] = sincos_pos_embed_3d(d, h, w, dim - dim % 6)
    return out


def _size3(vol_size, fn: str) -> tuple[int, int, int]:
    if isinstance(vol_size, numbers.Integral) and not isinstance(vol_size, bool):
        vol_size = (vol_size,) * 3
    if not isinstance(vol_size, (tuple, list)) or len(vol_size) != 3:
        raise ValueError(f"{fn}: vol_size must be an int or a tuple (D, H, W), got {vol_size!r}")
    return tuple(check_int(v, "vol_size", fn) for v in vol_size)


class UnifiedPatchEmbed(nn.Module):
    """The Unified Patch Embedding: images [B,C,H,W] → ``proj2`` (Conv2d) + ``pos_embed2`` (2-D sin-cos); volumes
    [B,C,D,H,W] → ``proj3`` (Conv3d) + ``pos_embed3`` (3-D sin-cos); both → tokens [B, N, embed_dim] of one width,
    chosen by the input's rank (``PatchEmbed23D`` in Uni4Eye++). The position tables are fixed buffers [1, N, E]
    (no CLS row)."""

    def __init__(self, img_size: int = 28, vol_size=16, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64):
        super().__init__()
        fn = "UnifiedPatchEmbed"
        img_size, patch_size = check_int(img_size, "img_size", fn), check_int(patch_size, "patch_size", fn)
        in_chans, embed_dim = check_int(in_chans, "in_chans", fn), check_int(embed_dim, "embed_dim", fn)
        vol_size = _size3(vol_size, fn)
        if img_size % patch_size or any(v % patch_size for v in vol_size):
            raise ValueError(f"{fn}: patch_size={patch_size} must divide img_size={img_size} and every side of "
                             f"vol_size={vol_size}")
        if embed_dim % 4:
            raise ValueError(f"{fn}: embed_dim must be a multiple of 4 (2-D sin-cos positions), got {embed_dim}")
        self.img_size, self.vol_size, self.patch_size, self.in_chans = img_size, vol_size, patch_size, in_chans
        self.grid2 = (img_size // patch_size,) * 2
        self.grid3 = tuple(v // patch_size for v in vol_size)
        self.num_patches2 = self.grid2[0] * self.grid2[1]
        self.num_patches3 = self.grid3[0] * self.grid3[1] * self.grid3[2]
        self.proj2 = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.proj3 = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed2", sincos_pos_embed_2d(*self.grid2, embed_dim)[None])
        self.register_buffer("pos_embed3", _sincos_3d(*self.grid3, embed_dim)[None])

    def check(self, x, fn: str = "UnifiedPatchEmbed", name: str = "x") -> int:
        """The rank of ``x`` (4 or 5) once it is an image batch [B, in_chans, img_size, img_size] or a volume batch
        [B, in_chans, *vol_size]; a ValueError naming ``name`` otherwise."""
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: {name} must be an image batch [B, C, H, W] or a volume batch [B, C, D, H, W], "
                             f"got {shape}")
        if x.ndim == 4:
            check_images(x, self.in_chans, self.img_size, fn, name)
        elif tuple(x.shape[1:]) != (self.in_chans, *self.vol_size):
            raise ValueError(f"{fn}: {name} is {tuple(x.shape[1:])}; expected ({self.in_chans}, "
                             f"{', '.join(map(str, self.vol_size))}) (in_chans={self.in_chans}, "
                             f"vol_size={self.vol_size})")
        return x.ndim

    def num_patches(self, ndim: int) -> int:
        return self.num_patches2 if ndim == 4 else self.num_patches3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check(x) == 4:
            return self.proj2(x).flatten(2).transpose(1, 2) + self.pos_embed2  # [B, N2, E]
        return self.proj3(x).flatten(2).transpose(1, 2) + self.pos_embed3  # [B, N3, E], (d, h, w) row-major


# ------------------------------------------------------------------------------------------------ decoder
class _Decoder(nn.Module):
    """One branch of the dual decoder: MAE's light decoder with a 2-D and a 3-D position table and head."""

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, grid2, grid3,
                 out2: int, out3: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed2", sincos_pos_embed_2d(*grid2, dim, cls_token=True)[None])
        self.register_buffer("pos_embed3", torch.cat([torch.zeros(1, dim), _sincos_3d(*grid3, dim)])[None])
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(dim)
        self.pred2 = nn.Linear(dim, out2)
        self.pred3 = nn.Linear(dim, out3)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, ndim: int) -> torch.Tensor:
        """latent [B, 1 + N_keep, E] → pred [B, N, out] (CLS dropped), as ``MaskedAutoencoder.forward_decoder``."""
        x = self.embed(latent)
        B, T, Dd = x.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, ids_restore.shape[1] + 1 - T, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + (self.pos_embed2 if ndim == 4 else self.pos_embed3)
        for blk in self.blocks:
            x = blk(x)
        return (self.pred2 if ndim == 4 else self.pred3)(self.norm(x))[:, 1:]


# -------------------------------------------------------------------------------------------------- model
class Uni4EyeMAE(nn.Module):
    """Uni4Eye pre-training: a unified patch embedding, one MAE encoder for images and volumes, two decoders.

    ``forward(x, mask_ratio=0.75) -> (loss, parts, mask)`` with x [B,C,H,W] or [B,C,D,H,W]; ``parts`` holds the
    two loss terms ``"image"``, ``"grad"`` and the predictions ``"pred_image"`` [B, N, p^k·C], ``"pred_grad"``
    [B, N, p^k]; mask [B, N] (1 = removed). One batch is one modality; the official schedule alternates them.
    Encoder names as ``VisionTransformer`` (``cls_token``, ``blocks``, ``norm``) plus ``patch_embed`` (a
    ``UnifiedPatchEmbed``); decoders ``decoder_image`` and ``decoder_grad``.
    """

    num_prefix_tokens = 1  # the CLS token (for vitlab.probe.features)

    def __init__(self, img_size: int = 28, vol_size=16, patch_size: int = 4, in_chans: int = 1,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, decoder_dim: int = 32,
                 decoder_depth: int = 2, decoder_heads: int = 4, mlp_ratio: float = 4.0, grad_weight: float = 1.0,
                 sobel_ksize: int = 3, volume_grad: str = "slices", norm_pix_loss: bool = False):
        super().__init__()
        fn = "Uni4EyeMAE"
        for name, val in (("depth", depth), ("num_heads", num_heads), ("decoder_dim", decoder_dim),
                          ("decoder_depth", decoder_depth), ("decoder_heads", decoder_heads)):
            check_int(val, name, fn)
        self.patch_embed = UnifiedPatchEmbed(img_size, vol_size, patch_size, in_chans, embed_dim)
        check_widths(embed_dim, num_heads, decoder_dim, decoder_heads, fn)
        self.mlp_ratio = check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
        self.grad_weight = check_number(grad_weight, "grad_weight", fn, low=0)
        self.sobel_ksize = check_choice(sobel_ksize, tuple(_SOBEL), "sobel_ksize", fn)
        self.volume_grad = check_choice(volume_grad, ("slices", "3d"), "volume_grad", fn)
        if not isinstance(norm_pix_loss, bool):
            raise TypeError(f"{fn}: norm_pix_loss must be a bool, got {norm_pix_loss!r}")
        self.norm_pix_loss = norm_pix_loss
        self.img_size, self.vol_size = img_size, self.patch_embed.vol_size
        self.patch_size, self.in_chans, self.embed_dim, self.num_heads = patch_size, in_chans, embed_dim, num_heads

        # the shared encoder: one parameter set for both ranks
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # the dual-branch decoder
        pe, p, C = self.patch_embed, patch_size, in_chans
        dec = (embed_dim, decoder_dim, decoder_depth, decoder_heads, mlp_ratio, pe.grid2, pe.grid3)
        self.decoder_image = _Decoder(*dec, p ** 2 * C, p ** 3 * C)
        self.decoder_grad = _Decoder(*dec, p ** 2, p ** 3)  # the gradient map has one channel
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's official init: xavier-uniform Linears and patch projections (as Linears), CLS and mask tokens
        N(0, 0.02)."""
        for proj in (self.patch_embed.proj2, self.patch_embed.proj3):
            nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        for tok in (self.cls_token, self.decoder_image.mask_token, self.decoder_grad.mask_token):
            nn.init.normal_(tok, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def num_patches(self, x: torch.Tensor) -> int:
        """Tokens the encoder would see for ``x`` unmasked (without CLS): N2 for images, N3 for volumes."""
        return self.patch_embed.num_patches(self.patch_embed.check(x, "Uni4EyeMAE"))

    # -- encoder
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # the CLS position is 0 (sin-cos)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float = 0.75, *,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """→ (latent [B, 1 + N_keep, E] (CLS first), mask [B, N], ids_restore [B, N])."""
        self.patch_embed.check(x, "Uni4EyeMAE")
        check_number(mask_ratio, "mask_ratio", "Uni4EyeMAE", low=0, high=1, high_open=True)
        tokens, mask, ids_restore = random_masking(self.patch_embed(x), mask_ratio, generator=generator, noise=noise)
        return self._blocks(tokens), mask, ids_restore

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder on all patches, unmasked and in order: [B, 1 + N, E] (what a probe reads), either rank."""
        self.patch_embed.check(x, "Uni4EyeMAE")
        return self._blocks(self.patch_embed(x))

    # -- targets and loss
    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image patches [B, N, p^k·C], gradient-map patches [B, N, p^k]); each patch normalised (mean 0,
        unbiased var 1) when ``norm_pix_loss``."""
        ndim = self.patch_embed.check(x, "Uni4EyeMAE")
        cut = patchify if ndim == 4 else patchify3d
        grad = gradient_target(x, self.sobel_ksize, self.volume_grad)
        out = []
        for t in (cut(x, self.patch_size), cut(grad, self.patch_size)):
            if self.norm_pix_loss:
                t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            out.append(t)
        return out[0], out[1]

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.75, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, generator=generator, noise=noise)
        pred_image = self.decoder_image(latent, ids_restore, x.ndim)
        pred_grad = self.decoder_grad(latent, ids_restore, x.ndim)
        t_image, t_grad = self.targets(x)
        parts = {"image": masked_mse(pred_image, t_image, mask), "grad": masked_mse(pred_grad, t_grad, mask),
                 "pred_image": pred_image, "pred_grad": pred_grad}
        return parts["image"] + self.grad_weight * parts["grad"], parts, mask

    # -- to a classifier (2-D)
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's 2-D path under ``VisionTransformer``'s key names (detached clones): ``patch_embed.proj.*``
        (from ``proj2``), ``cls_token``, ``pos_embed`` ([1, 1 + N2, E], the 2-D sin-cos table with a zero CLS row),
        ``blocks.*``, ``norm.*``. The 3-D projection and table are not part of a 2-D ViT."""
        pe = self.patch_embed
        state = {"patch_embed.proj.weight": pe.proj2.weight, "patch_embed.proj.bias": pe.proj2.bias,
                 "cls_token": self.cls_token,
                 "pos_embed": torch.cat([torch.zeros_like(pe.pos_embed2[:, :1]), pe.pos_embed2], dim=1)}
        state.update({k: v for k, v in self.state_dict().items() if k.startswith(("blocks.", "norm."))})
        return {k: v.detach().clone() for k, v in state.items()}

    def to_vit(self, num_classes: int = 0, global_pool: str = "token", **vit_kwargs) -> VisionTransformer:
        """A 2-D ``vitlab.models.VisionTransformer`` with this encoder's weights, for fine-tuning or probing, loaded
        by the rules of ``MaskedAutoencoder.load_into`` (head trunc-normal 2e-5; ``fc_norm`` fresh with
        ``global_pool="avg"``; ``pos_embed`` learnable from the sin-cos table)."""
        vit = VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                                num_classes=num_classes, global_pool=global_pool, embed_dim=self.embed_dim,
                                depth=len(self.blocks), num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                **vit_kwargs)
        vit.to(device=self.cls_token.device, dtype=self.cls_token.dtype)
        return self.load_into(vit)

    def load_into(self, vit: VisionTransformer) -> VisionTransformer:
        """Load ``encoder_state()`` into ``vit`` (same width, depth, 2-D patches) with MAE's checks and rules: that
        method reads only ``encoder_state()`` and ``extra_repr()``, so it serves this model unchanged."""
        return MaskedAutoencoder.load_into(self, vit)

    def extra_repr(self) -> str:
        pe = self.patch_embed
        return (f"img_size={self.img_size}, vol_size={self.vol_size}, patch_size={self.patch_size}, "
                f"tokens 2-D={pe.num_patches2}+1 / 3-D={pe.num_patches3}+1, dim={self.embed_dim}, "
                f"depth={len(self.blocks)}, grad_weight={self.grad_weight:g}, volume_grad={self.volume_grad}")


# ------------------------------------------------------------------------ the lesson's recipe (zoo entries)
# notebooks/5_selfsup/uni4eye.ipynb and the chapter's compare read these. The two modalities are two views of the
# same solids, as fundus photographs and OCT volumes are of the same eyes: shape_volumes (16^3, patch 4: 64 tokens)
# and their maximum-intensity projections along depth (16 x 16: 16 tokens), where a shell and an ellipsoid are both
# disks. Zoo entries uni4eye_<variant>_s<seed>: "uni" pre-trains on 2-D and 3-D batches in turn (the paper),
# "2d" on the projections only (its ablation); same model, volumes, steps, lr, batch and seeds.
ENCODER = dict(img_size=16, vol_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4,
               decoder_dim=32, decoder_depth=2, decoder_heads=4)
VARIANTS = {"uni": ("2d", "3d"), "2d": ("2d",)}  # the modality of each batch, in turn
VIEW = dict(mode="max", axis=0)  # the 2-D modality: vitlab.data.volume_slices of the volume batch
MASK_RATIO = 0.75
PRETRAIN = dict(batch_size=64, lr=1.5e-3, weight_decay=0.05, warmup=0.1)
PRETRAIN_STEPS = {"cpu": 3000, "gpu": 30000}
SEEDS = (0, 1, 2)
DATA = ("shape_volumes", dict(size=16))


def uni4eye_model(num_classes: int = 0, img_size: int = 16, **kwargs) -> Uni4EyeMAE:
    """The registry's builder (a dataset's ``num_classes`` does not apply; its ``img_size`` is the volume side)."""
    kwargs.setdefault("vol_size", img_size)
    return Uni4EyeMAE(img_size=ENCODER["img_size"], **kwargs)


@torch.no_grad()
def reconstruction_losses(model: Uni4EyeMAE, volumes: torch.Tensor, mask_ratio: float = MASK_RATIO,
                          batch_size: int = 300) -> dict:
    """Image and gradient-map losses on the removed patches, for the volumes and for their 2-D views (``VIEW``),
    with the masks of a fixed generator (seed 0): {"2d_image", "2d_grad", "3d_image", "3d_grad"}."""
    from vitlab.data import volume_slices

    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        raise ValueError(f"reconstruction_losses: volumes must be a tensor [N, C, D, H, W], got "
                         f"{tuple(volumes.shape) if isinstance(volumes, torch.Tensor) else type(volumes).__name__}")
    was_training = model.training
    model.eval()
    sums = {}
    for kind in ("2d", "3d"):
        g = torch.Generator().manual_seed(0)
        for i in range(0, len(volumes), batch_size):
            v = volumes[i:i + batch_size]
            x = volume_slices(v, **VIEW) if kind == "2d" else v
            _, parts, _ = model(x, mask_ratio, generator=g)
            for term in ("image", "grad"):
                sums[f"{kind}_{term}"] = sums.get(f"{kind}_{term}", 0.0) + parts[term].item() * len(v)
    model.train(was_training)
    return {k: v / len(volumes) for k, v in sums.items()}


def uni4eye_objective(modalities=("2d", "3d"), mask_ratio: float = MASK_RATIO):
    """Pre-training as a ``vitlab.zoo`` objective (registered as ``"uni4eye"``) on a volume dataset: step k trains
    on modality ``modalities[k % len]``, the volume batch itself ("3d") or its 2-D view ("2d", ``VIEW``); the
    checkpoint stores the test losses of both modalities (``reconstruction_losses``)."""
    from vitlab import zoo
    from vitlab.data import volume_slices

    if not isinstance(modalities, (tuple, list)) or not modalities or any(m not in ("2d", "3d") for m in modalities):
        raise ValueError(f"uni4eye_objective: modalities must be a non-empty sequence of '2d' / '3d', got "
                         f"{modalities!r}")
    modalities = tuple(modalities)
    state = {"step": 0}

    def step_fn(net, volumes, labels):
        kind = modalities[state["step"] % len(modalities)]
        state["step"] += 1
        if volumes.ndim == 4:  # a dataset of images (the chapter's compare): "2d" is the image itself
            if kind != "2d":
                raise ValueError("uni4eye_objective: a dataset of images has no '3d' modality")
            return net(volumes, mask_ratio)[0], None
        x = volume_slices(volumes, **VIEW) if kind == "2d" else volumes
        return net(x, mask_ratio)[0], None

    def metrics(model, train, val, test):
        if test.images.ndim == 4:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                model.eval()
                _, parts, _ = model(test.images, mask_ratio, generator=g)
            return {"test_2d_image": parts["image"].item(), "test_2d_grad": parts["grad"].item()}
        return {f"test_{k}": v for k, v in reconstruction_losses(model, test.images, mask_ratio).items()}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def entry_names() -> list[str]:
    """Every zoo entry of the lesson, per variant and seed."""
    return [f"uni4eye_{v}_s{s}" for v in VARIANTS for s in SEEDS]


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if "uni4eye_shapes" in MODELS:  # re-imported
        return
    zoo.register_objective("uni4eye", uni4eye_objective)
    register_model("uni4eye_shapes", uni4eye_model, **{k: v for k, v in ENCODER.items() if k != "img_size"})
    source, kwargs = DATA
    for variant, modalities in VARIANTS.items():
        for seed in SEEDS:
            zoo.register(f"uni4eye_{variant}_s{seed}", zoo.Recipe(
                model="uni4eye_shapes", data=source, data_kwargs=dict(kwargs), fit=dict(PRETRAIN), seed=seed,
                data_seed=0, objective="uni4eye", objective_kwargs=dict(modalities=list(modalities)),
                per_profile={p: dict(steps=s) for p, s in PRETRAIN_STEPS.items()}, shares={"smoke": "cpu"}))


_register()
