"""Masked autoencoding, the shared core of chapter 5 (self-supervised and generative lessons).

He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(arXiv:2111.06377). Official code: https://github.com/facebookresearch/mae, ``models_mae.py``
(``MaskedAutoencoderViT``: ``patchify``, ``random_masking``, ``forward_encoder/decoder/loss``) and
``util/pos_embed.py`` (``get_2d_sincos_pos_embed``). We follow both step by step; the code is ours.

    image [B,C,H,W] ─PatchEmbed→ [B,N,D] + pos (fixed sin-cos)
        ─random_masking→ visible [B, N_keep, D]        N_keep = int(N·(1 − mask_ratio)), the rest dropped
        ─(CLS + pos₀) ⊕ visible → L × Block → LayerNorm  the encoder sees 1 + N_keep tokens, never a mask token
        ─Linear → decoder width; append N − N_keep mask tokens; unshuffle (ids_restore); + decoder pos
        ─a few Blocks → LayerNorm → Linear → pred [B, N, p·p·C], CLS dropped
    loss = Σ_n mask_n · mean_k (pred_nk − target_nk)² / Σ_n mask_n       only the removed patches count
    target = patchify(image), or per patch (t − mean) / √(var + 1e-6) with ``norm_pix_loss`` (unbiased var)

Masking (per sample): noise ~ U[0,1) [B, N]; ids_shuffle = argsort(noise) (small noise = kept);
ids_restore = argsort(ids_shuffle); keep ids_shuffle[:, :N_keep]; mask = 1 on removed patches, in the
original patch order. With ``generator=None`` the noise is ``torch.rand(B, N, device=x.device)``: the same
draw from the global RNG as the official code, so a seeded run masks the same patches.

Layouts (all as the official code):
- ``patchify``: a patch's p·p·C values in (row, column, channel) order, patches row-major
  (einsum ``'nchpwq->nhwpqc'``). ``patchify3d`` extends it to [B,C,D,H,W] volumes: patches (d,h,w) row-major,
  values in (depth, row, column, channel) order, the token order of a ``Conv3d(kernel=stride=p)`` + flatten.
- ``sincos_pos_embed_2d``: the first half of the channels encodes the column w, the second the row h
  (MAE builds ``meshgrid(grid_w, grid_h)`` and calls its first plane ``emb_h``); each half is
  [sin(pos·ω), cos(pos·ω)] with ω_i = 1 / 10000^(i / (dim/4)), i < dim/4. The CLS row, when asked, is zeros.
- ``sincos_pos_embed_3d``: three equal parts for d, h, w (slowest axis first), each [sin, cos], ω_i =
  1 / 10000^(i / (dim/6)): Hi-End-MAE's ``build_3d_sincos_position_embedding`` (FengheTan9/Hi-End-MAE,
  ``hi_end_mae.py``) with its (h, w, d) read as our (d, h, w). Note the 2-D layout puts the fastest axis
  first, the 3-D one the slowest: each follows its reference.

Deviations, named:
- Images may be square only in ``MaskedAutoencoder`` (vitlab's ``PatchEmbed``); the functions take H ≠ W.
- ``forward_loss`` divides by max(Σ mask, 1): with ``mask_ratio=0`` the official code returns 0/0 = NaN, we 0.
- ``init="mae"`` (default) is the official init (xavier-uniform Linears and patch projection, CLS and mask token
  N(0, 0.02)); ``init="vit"`` uses vitlab's ``init_linear_`` (trunc-normal 0.02) as ``VisionTransformer`` does.
- ``forward`` takes ``noise=`` (a [B, N] tensor) or ``generator=`` besides the global RNG, so tests and the
  equivalence checks of the lessons can fix the mask.
- ``len_keep = int(N·(1 − mask_ratio))`` truncates as the official code does (float error included:
  N = 10 at 0.9 keeps 0 patches, the encoder then sees the CLS token only).

Fine-tuning and probing: ``MaskedAutoencoder.encoder_state()`` holds the encoder under
``vitlab.models.VisionTransformer``'s key names and ``to_vit()`` builds that ViT with the same weights (see
its docstring for the keys that differ).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from vitlab.checks import check_choice, check_images, check_int, check_number
from vitlab.models.vit import Block, LayerNorm, PatchEmbed, VisionTransformer, init_linear_

__all__ = ["patchify", "unpatchify", "patchify3d", "unpatchify3d", "sincos_1d", "sincos_pos_embed_2d",
           "sincos_pos_embed_3d", "random_masking", "masked_mse", "check_widths", "MaskedAutoencoder", "mae_model",
           "reconstruction_loss", "mae_objective"]


# ------------------------------------------------------------------------------------------------ patches
def _check_patch(p, fn: str) -> int:
    return check_int(p, "p", fn)


def _check_grid(grid, n: int, ndim: int, name: str, fn: str) -> tuple[int, ...]:
    """The token grid: given, or the square (cube) root of the token count n."""
    if grid is None:
        side = round(n ** (1.0 / ndim))
        if side ** ndim != n:
            raise ValueError(f"{fn}: x has {n} tokens, not a perfect {'square' if ndim == 2 else 'cube'}; "
                             f"give {name}=({', '.join('?' * ndim)})")
        return (side,) * ndim
    if not isinstance(grid, (tuple, list)) or len(grid) != ndim \
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid):
        raise ValueError(f"{fn}: {name} must be a tuple of {ndim} positive ints, got {grid!r}")
    if math.prod(grid) != n:
        raise ValueError(f"{fn}: {name}={tuple(grid)} has {math.prod(grid)} cells but x has {n} tokens")
    return tuple(int(g) for g in grid)


def _check_tokens(x, p: int, ndim: int, fn: str) -> int:
    """Channels C of x [B, N, p^ndim · C]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be patch tokens [B, N, p^{ndim}*C], got {shape}")
    if x.shape[-1] % p ** ndim:
        raise ValueError(f"{fn}: x's last dim {x.shape[-1]} is not a multiple of p^{ndim} = {p ** ndim} (p={p})")
    return x.shape[-1] // p ** ndim


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C]: patches row-major, each patch's values in (row, col, channel)
    order, as MAE's ``patchify`` (einsum 'nchpwq->nhwpqc')."""
    p = _check_patch(p, "patchify")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"patchify: images must be an image batch [B, C, H, W], got {shape}")
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"patchify: p={p} does not divide the image size {H}x{W}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of ``patchify``: [B, N, p·p·C] → [B, C, h·p, w·p]; ``grid=(h, w)`` (default: square)."""
    p = _check_patch(p, "unpatchify")
    C = _check_tokens(x, p, 2, "unpatchify")
    h, w = _check_grid(grid, x.shape[1], 2, "grid", "unpatchify")
    x = x.reshape(x.shape[0], h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)


def patchify3d(volumes: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, D, H, W] → [B, (D/p)(H/p)(W/p), p³·C]: cubes (d, h, w) row-major, each cube's values in
    (depth, row, col, channel) order (MAE's 2-D layout with one more axis)."""
    p = _check_patch(p, "patchify3d")
    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        shape = tuple(volumes.shape) if isinstance(volumes, torch.Tensor) else type(volumes).__name__
        raise ValueError(f"patchify3d: volumes must be a volume batch [B, C, D, H, W], got {shape}")
    B, C, D, H, W = volumes.shape
    if D % p or H % p or W % p:
        raise ValueError(f"patchify3d: p={p} does not divide the volume size {D}x{H}x{W}")
    d, h, w = D // p, H // p, W // p
    x = volumes.reshape(B, C, d, p, h, p, w, p)
    return torch.einsum("ncdihjwk->ndhwijkc", x).reshape(B, d * h * w, p ** 3 * C)


def unpatchify3d(x: torch.Tensor, p: int, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Inverse of ``patchify3d``: [B, N, p³·C] → [B, C, d·p, h·p, w·p]; ``grid=(d, h, w)`` (default: a cube)."""
    p = _check_patch(p, "unpatchify3d")
    C = _check_tokens(x, p, 3, "unpatchify3d")
    d, h, w = _check_grid(grid, x.shape[1], 3, "grid", "unpatchify3d")
    x = x.reshape(x.shape[0], d, h, w, p, p, p, C)
    return torch.einsum("ndhwijkc->ncdihjwk", x).reshape(x.shape[0], C, d * p, h * p, w * p)


# ------------------------------------------------------------------------------------ sin-cos positions
def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: positions [M] → [M, dim] = [sin(pos·ω), cos(pos·ω)],
    ω_i = 1 / 10000^(i / (dim/2)), i < dim/2 (float64 inside, as the official NumPy code; float32 out)."""
    dim = check_int(dim, "dim", "sincos_1d")
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"sincos_1d: pos must be a tensor of positions, got {type(pos).__name__}")
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [grid_h·grid_w (+1), dim], tokens row-major, as MAE's
    ``get_2d_sincos_pos_embed``: channels [:dim/2] encode the column w, [dim/2:] the row h; an all-zero
    first row for the CLS token if ``cls_token``. ``dim`` must be a multiple of 4.

    timm's ``build_sincos2d_pos_embed((h, w), dim)`` has the same values in another channel order
    ([sin h, sin w, cos h, cos w] quarters instead of our [sin w, cos w, sin h, cos h]); tested."""
    fn = "sincos_pos_embed_2d"
    grid_h, grid_w, dim = check_int(grid_h, "grid_h", fn), check_int(grid_w, "grid_w", fn), check_int(dim, "dim", fn)
    if dim % 4:
        raise ValueError(f"{fn}: dim must be a multiple of 4 (two axes × sin, cos), got {dim}")
    h, w = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # each [grid_h, grid_w]
    emb = torch.cat([sincos_1d(w, dim // 2), sincos_1d(h, dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb


def sincos_pos_embed_3d(d: int, h: int, w: int, dim: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 3-D sin-cos positions [d·h·w (+1), dim], tokens row-major over (d, h, w) (``patchify3d``'s order):
    three equal parts for d, h, w, each [sin, cos] with ω_i = 1 / 10000^(i / (dim/6)) (Hi-End-MAE's layout).
    ``dim`` must be divisible by 6."""
    fn = "sincos_pos_embed_3d"
    d, h, w, dim = (check_int(d, "d", fn), check_int(h, "h", fn), check_int(w, "w", fn),
                    check_int(dim, "dim", fn))
    if dim % 6:
        raise ValueError(f"{fn}: dim must be divisible by 6 (three axes × sin, cos), got {dim}")
    gd, gh, gw = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(g, dim // 3) for g in (gd, gh, gw)], dim=1)
    return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb


# ------------------------------------------------------------------------------------------------ masking
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the MSE of each patch [B, N] (``pred``, ``target`` [B, N, K]), averaged over the removed patches
    (``mask`` == 1) only, divided by max(Σ mask, 1) (the official code divides by Σ mask: 0/0 at mask ratio 0)."""
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def check_widths(embed_dim: int, num_heads: int, decoder_dim: int, decoder_heads: int, fn: str) -> None:
    """An MAE's encoder and decoder widths: each divisible by its heads and by 4 (2-D sin-cos positions)."""
    for dim_name, dim, heads_name, heads in (("embed_dim", embed_dim, "num_heads", num_heads),
                                             ("decoder_dim", decoder_dim, "decoder_heads", decoder_heads)):
        if dim % heads:
            raise ValueError(f"{fn}: {heads_name}={heads} does not divide {dim_name}={dim}")
        if dim % 4:
            raise ValueError(f"{fn}: {dim_name} must be a multiple of 4 (2-D sin-cos positions), got {dim}")


def _check_mask_ratio(mask_ratio, fn: str) -> float:
    return check_number(mask_ratio, "mask_ratio", fn, low=0, high=1, high_open=True)


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None):
    """MAE's per-sample random masking. x [B, N, D] → (x_kept [B, len_keep, D], mask [B, N] with 1 = removed,
    ids_restore [B, N]) with len_keep = int(N·(1 − mask_ratio)).

    The kept tokens are those with the smallest noise, in increasing noise order; ``ids_restore`` puts a
    sequence in that shuffled order (kept first, then removed) back in the original order. ``noise`` [B, N]
    fixes the draw; otherwise ``torch.rand(B, N)`` from ``generator`` (or the global RNG, as the official code).
    """
    fn = "random_masking"
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a token batch [B, N, D], got {shape}")
    mask_ratio = _check_mask_ratio(mask_ratio, fn)
    B, N, D = x.shape
    if noise is not None and generator is not None:
        raise ValueError(f"{fn}: give noise or generator, not both")
    if noise is None:
        noise = torch.rand(B, N, device=x.device, generator=generator)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, N):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{fn}: noise must be a tensor [B, N] = [{B}, {N}], got {shape}")
    len_keep = int(N * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return x_kept, mask, ids_restore


# -------------------------------------------------------------------------------------------------- model
class MaskedAutoencoder(nn.Module):
    """MAE with vitlab's ``PatchEmbed`` and ``Block`` (LayerNorm eps 1e-6, as the official ViT-B/L/H configs).

    ``forward(images, mask_ratio=0.75) -> (loss, pred [B, N, p·p·C], mask [B, N])``.
    The encoder's parameter names are ``VisionTransformer``'s (``patch_embed``, ``cls_token``, ``pos_embed``,
    ``blocks``, ``norm``); the decoder's are the official ones (``decoder_embed``, ``mask_token``,
    ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``). Both position tables are
    fixed sin-cos buffers [1, 1 + N, width] with a zero CLS row.
    """

    num_prefix_tokens = 1  # the CLS token (for vitlab.probe.features)

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64,
                 depth: int = 4, num_heads: int = 4, decoder_dim: int = 32, decoder_depth: int = 2,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0, norm_pix_loss: bool = False, init: str = "mae"):
        super().__init__()
        fn = "MaskedAutoencoder"
        for name, val in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                          ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                          ("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                          ("decoder_heads", decoder_heads)):
            check_int(val, name, fn)
        if img_size % patch_size:
            raise ValueError(f"{fn}: patch_size={patch_size} does not divide img_size={img_size}; "
                             f"choose a divisor of {img_size}")
        check_widths(embed_dim, num_heads, decoder_dim, decoder_heads, fn)
        mlp_ratio = check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
        if not isinstance(norm_pix_loss, bool):
            raise TypeError(f"{fn}: norm_pix_loss must be a bool, got {norm_pix_loss!r}")
        check_choice(init, ("mae", "vit"), "init", fn)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.num_heads, self.mlp_ratio = embed_dim, num_heads, mlp_ratio
        self.norm_pix_loss = norm_pix_loss

        # encoder: VisionTransformer's names, fixed positions
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        g = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(*g, embed_dim, cls_token=True)[None])
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # decoder: light, on all N positions
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(*g, decoder_dim, cls_token=True)[None])
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        self.init_weights(init)

    def init_weights(self, init: str = "mae") -> None:
        """``"mae"``: the official init (xavier-uniform Linears, patch projection as a Linear, tokens N(0, 0.02));
        ``"vit"``: vitlab's ``init_linear_`` (trunc-normal 0.02, as ``VisionTransformer``)."""
        check_choice(init, ("mae", "vit"), "init", "MaskedAutoencoder.init_weights")
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if init == "vit":
            init_linear_(self)
            return
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        return check_images(images, self.in_chans, self.img_size, "MaskedAutoencoder", "images")

    # -- encoder
    def forward_encoder(self, images: torch.Tensor, mask_ratio: float = 0.75, *,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """→ (latent [B, 1 + len_keep, D] (CLS first), mask [B, N], ids_restore [B, N])."""
        self._check(images)
        _check_mask_ratio(mask_ratio, "MaskedAutoencoder")
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, generator=generator, noise=noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder on all patches, unmasked and in order: [B, 1 + N, D] (what a probe reads)."""
        self._check(images)
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # -- decoder
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + len_keep, D] → pred [B, N, p·p·C] (the CLS position dropped)."""
        x = self.decoder_embed(latent)
        B, T, Dd = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] + 1 - T, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: kept, then removed
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    # -- loss
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What ``pred`` regresses: the patches, each normalised (mean 0, unbiased var 1) if ``norm_pix_loss``."""
        t = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches (mask == 1) only."""
        return masked_mse(pred, self.target(images), mask)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, generator=generator, noise=noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """An image to look at: the visible patches from ``images``, the removed ones from ``pred`` (mapped back
        to pixels with each patch's own mean and std when ``norm_pix_loss``)."""
        self._check(images)
        t = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        m = mask[..., None].to(pred.dtype)
        return unpatchify(t * (1 - m) + pred * m, self.patch_size, self.grid_size)

    # -- to a classifier
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors under ``VisionTransformer``'s key names (detached clones): ``patch_embed.*``,
        ``cls_token``, ``pos_embed`` (the fixed sin-cos table, zero CLS row), ``blocks.*``, ``norm.*``."""
        enc = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(enc)}

    def to_vit(self, num_classes: int = 0, global_pool: str = "token", **vit_kwargs) -> VisionTransformer:
        """A ``vitlab.models.VisionTransformer`` with this encoder's weights, for fine-tuning or probing
        (``load_into`` says which keys differ). ``vit_kwargs`` (e.g. ``drop_path_rate``) go to the ViT."""
        vit = VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                                num_classes=num_classes, global_pool=global_pool, embed_dim=self.embed_dim,
                                depth=len(self.blocks), num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                **vit_kwargs)
        vit.to(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.load_into(vit)
        return vit

    def load_into(self, vit: VisionTransformer) -> VisionTransformer:
        """Load this encoder's weights into ``vit`` (a ``VisionTransformer`` of the same width, depth and patches)
        and return it. Loaded with ``strict=False``; the keys that differ, and nothing else (checked):
        - missing in the encoder: ``head.weight``/``head.bias`` (when the ViT has classes), initialised as the
          official fine-tune does (weight trunc-normal std 2e-5, bias 0);
        - a ViT with ``global_pool="avg"``: ``fc_norm.*`` missing (fresh LayerNorm) and the encoder's ``norm.*``
          dropped (the ViT has no ``norm`` then), as MAE's ``main_finetune.py`` with ``--global_pool``.
        ``pos_embed`` becomes the ViT's learnable parameter, initialised with the sin-cos table, as in the
        official fine-tune. The zoo calls this to start a fine-tune from a cached pre-training. A dense model
        built on a ViT (``hiend_mae.SegmentationViT``, which holds it as ``.vit``) gets the encoder in its ViT."""
        model, vit = vit, getattr(vit, "vit", vit)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"MaskedAutoencoder.load_into: vit must be a vitlab VisionTransformer, got "
                            f"{type(vit).__name__}")
        state = self.encoder_state()
        if isinstance(vit.norm, nn.Identity):  # the average-pooling ViT normalises after pooling (fc_norm)
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        try:
            res = vit.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ: another width, depth or patch grid
            raise ValueError(f"MaskedAutoencoder.load_into: the ViT does not match this encoder ({self.extra_repr()})"
                             f": {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
        allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        if res.unexpected_keys or not set(res.missing_keys) <= allowed:
            raise RuntimeError(f"MaskedAutoencoder.load_into: keys do not match: missing {res.missing_keys}, "
                               f"unexpected {res.unexpected_keys}")
        if isinstance(vit.head, nn.Linear):
            trunc_normal_(vit.head.weight, std=2e-5)
            nn.init.zeros_(vit.head.bias)
        return model

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, tokens={self.num_patches}+1, "
                f"dim={self.embed_dim}, depth={len(self.blocks)}, decoder={self.decoder_embed.out_features}"
                f"x{len(self.decoder_blocks)}, norm_pix_loss={self.norm_pix_loss}")


# ------------------------------------------------------------------------------------------ pre-training
def mae_model(num_classes: int = 0, **kwargs) -> MaskedAutoencoder:
    """The model registry's builder for a ``MaskedAutoencoder`` (``register_model(name, mae_model, ...)``): a
    dataset sets ``num_classes`` for every registered model, and pre-training has no use for it."""
    return MaskedAutoencoder(**kwargs)


@torch.no_grad()
def reconstruction_loss(model: MaskedAutoencoder, data, mask_ratio: float = 0.75, *, seed: int = 0,
                        batch_size: int = 256) -> float:
    """MAE's loss (MSE on the removed patches) over ``data``'s images, each masked by a generator seeded with
    ``seed``: the same patches removed every call, so two models (or two checkpoints) are scored alike."""
    if not isinstance(model, MaskedAutoencoder):
        raise TypeError(f"reconstruction_loss: model must be a MaskedAutoencoder, got {type(model).__name__}")
    images = getattr(data, "images", data)
    if not torch.is_tensor(images) or images.ndim != 4 or len(images) == 0:
        raise ValueError("reconstruction_loss: data must be a dataset with images [N,C,H,W] or such a tensor, N > 0")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        total += model(x, mask_ratio, generator=gen)[0].item() * len(x)
    model.train(was_training)
    return total / len(images)


def mae_objective(mask_ratio: float = 0.75, crop_scale=(0.2, 1.0)):
    """MAE pre-training as a ``vitlab.zoo`` objective (registered as ``"mae"``): each step crops every image at
    its own random scale in ``crop_scale`` (``vitlab.augment.random_resized_crop``), masks ``mask_ratio`` of its
    patches and regresses them; the checkpoint stores the reconstruction loss on val and test (fixed masks)."""
    from vitlab import zoo
    from vitlab.augment import random_resized_crop

    _check_mask_ratio(mask_ratio, "mae_objective")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"mae_objective: crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}")

    def step_fn(net, images, labels):
        images = random_resized_crop(images, (lo, hi)) if (lo, hi) != (1, 1) else images
        return net(images, mask_ratio)[0], None

    def metrics(model, train, val, test):
        return {"val_loss": reconstruction_loss(model, val, mask_ratio),
                "test_loss": reconstruction_loss(model, test, mask_ratio)}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def _register_objective() -> None:
    from vitlab import zoo

    zoo.register_objective("mae", mae_objective)


_register_objective()
