"""LookupViT (Koner, Jain, Jain, Tresp, Paul; ECCV 2024, arXiv:2407.12753): compress N high-resolution
"lookup" tokens into M ≪ N "compressed" tokens, run the expensive layers on the M tokens only, and let the two
sets talk through one bidirectional cross-attention whose logits are computed once and used both ways.

No official code is public. We follow the paper's description (its abstract and the course
curriculum's summary) and, for every detail it leaves open, lucidrains' ``vit_pytorch.look_vit.LookViT``
(https://github.com/lucidrains/vit-pytorch/blob/main/vit_pytorch/look_vit.py); a test loads the same weights
into both and compares the logits.

    lookup tokens      z_l = PatchEmbed_p(x) + pos              N = (H/p)²  (p = 4 at 32 px: 8×8 = 64)
    compressed tokens  z_c = resize_bilinear(z_l → g×g)         M = g²      (g ∈ {2, 3, 4})

    per block, with A = (q_c(LN z_c) · k_l(LN z_l)ᵀ) / √d      [B, H, M, N], computed ONCE:
      (1) gather   z_c += W_o softmax_N(A)   · v_l(LN z_l)      compressed ← lookup   (M×N)
      (2) refine   z_c += MHSA(LN z_c);  z_c += MLP(LN z_c)     the ViT block, on M tokens only
      (3) scatter  z_l += W_o' softmax_M(Aᵀ) · v_c(LN z_c)      lookup ← compressed, reusing Aᵀ: no q, no k
                   z_l += MLP_l(LN z_l)                         a narrow MLP (lookup_mlp_ratio < mlp_ratio)
    head: logits = W (pool(LN z_c) + mean(LN z_l))

    z_l [N, D] ──LN──► k, v ──┐
                              ▼
    z_c [M, D] ──LN──► q ──► A = q·kᵀ/√d  [M, N], computed once per block
                              │
                              ├─ softmax_N(A)·v_l          ──► z_c += gather ──► MHSA + MLP on M tokens ──► z_c
                              └─ softmax_M(Aᵀ)·v_c(LN z_c) ──► z_l += scatter ──► z_l += MLP_l(LN z_l)  ──► z_l

Cost per block, in multiply-accumulates with width D: the ViT pays (4 + 2r)·N·D² for its linear layers; LookupViT
pays (4 + 2r)·M·D² for the compressed block plus, on the lookup tokens, 3·N·D² (k, v and the scatter's output
projection) and 2·r_l·N·D² for MLP_l, plus 3·M·D² (the gather's q and output projection, the scatter's v).
So the saving grows with N/M and with r/r_l; with N = 64 and r = 2 the lookup stream's fixed 3·N·D² is a large
share, and half the ViT's FLOPs needs g = 2 (0.49× measured; 3×3: 0.60×, 4×4: 0.75×).

Multi-resolution: the same weights run at any g (nothing depends on M), so one model trained with g drawn per
step from {2, 3, 4} trades accuracy for FLOPs at inference (``forward(x, grid=g)``, ``at_grid(model, g)``).

Our reading, and lucidrains' choices the paper does not confirm (each a constructor option):
- ``post_norm``: lucidrains applies a LayerNorm to the lookup stream after the scatter (post-norm); we default
  to the paper's pre-norm residuals and set it for the lucidrains-compatible model.
- ``lookup_in_head``: lucidrains' head sums the pooled compressed and the pooled lookup tokens; we do the same.
  Without it the last block's scatter and MLP_l could not change the logits, so they are skipped.
- ``patch_kernel``/``patch_norm``/``pos_embed``: lucidrains embeds the lookup patches with a 7×7 conv over the
  patch grid, a LayerNorm and fixed 2D sin-cos positions; ``from_vit`` uses the ViT's own linear patch
  embedding and learned positions instead.
- Bilinear resize without anti-aliasing (``F.interpolate``), as lucidrains; the paper says "resize".
- ``from_vit`` is not the paper's recipe (it trains from scratch): the compressed stream is a trained ViT (its
  blocks, CLS token, norm and head), the lookup tokens are its patch embedding, and the new pieces start so that
  the model computes the ViT on the resized tokens (gather's output projection and the lookup head norm at zero).
  At the full grid it is the ViT exactly; at 2×2-4×4 the ViT's blocks, which never saw resized tokens, lose most
  of their accuracy. ``finetune_from_vit`` gives it the chapter's fine-tune, the new layers (``NEW_LAYERS``) at
  ``DEFAULTS['new_lr_scale']`` × the recipe's lr (our choice: they barely move at the base's lr in 100 steps);
  ``for_compare`` is that model at ``DEFAULTS['grid']``. On the chapter's scenes it ends well above chance but
  far below the dense control: the lesson reports how far, over three seeds.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from vitlab.checks import check_heads, check_int as _check_int, check_model as _check_model
from vitlab.models.vit import Block, VisionTransformer

__all__ = ["sincos_2d", "resize_grid", "reverse_probs", "LookupPatchEmbed", "LookupCrossAttention",
           "ReverseCrossAttention", "LookupBlock", "LookupViT", "AtGrid", "at_grid", "from_vit", "fit_multires",
           "LOOKVIT_COMPAT", "DEFAULT_GRID", "GRIDS", "DEFAULTS", "NEW_LAYERS", "finetune_from_vit", "for_compare"]

DEFAULT_GRID = 4  # compressed grid of the comparison's model (4×4 = 16 compressed tokens + CLS, from 64 lookup):
# from the trained base, 3×3 keeps 36 % after the chapter's fine-tune, 4×4 about 56 % (0.80x the FLOPs)
GRIDS = (2, 3, 4)  # multi-resolution training grids on the 8×8 lookup grid
# ``for_compare`` (and the lesson's from-base model): ``from_vit(base, grid)`` fine-tuned with the chapter's recipe
# (recipes.finetune_kwargs: the base's weights at lr 1e-4, finetune_steps(P) steps); the layers from_vit adds
# (gather, scatter, lookup MLPs and norms: NEW_LAYERS) start at zero or random and train at lr × new_lr_scale.
# Our choice, not the paper's (which trains from scratch): at the base's lr the new layers barely move in 100 steps.
DEFAULTS = dict(grid=DEFAULT_GRID, new_lr_scale=10.0)
NEW_LAYERS = ("gather", "scatter", "post_norm", "lookup_norm", "lookup_mlp", "lookup_head_norm")
# constructor settings under which LookupViT computes what vit_pytorch.look_vit.LookViT computes
LOOKVIT_COMPAT = dict(class_token=False, global_pool="avg", lookup_in_head=True, post_norm=True, pos_embed="sincos",
                      patch_norm=True, qkv_bias=False, norm_eps=1e-5, norm_bias=False)


# ------------------------------------------------------------------------------------------------ helpers
def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine positions [h·w, dim], row-major, as [sin x, cos x, sin y, cos y] (lucidrains' layout)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = temperature ** -(torch.arange(dim // 4) / max(dim // 4 - 1, 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


def resize_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, n·n, D] tokens on an n×n grid → [B, grid², D]: bilinear resize of the token map (no anti-aliasing)."""
    B, N, D = tokens.shape
    n = math.isqrt(N)
    if n * n != N:
        raise ValueError(f"resize_grid: tokens must lie on a square grid, got N={N}")
    fmap = tokens.transpose(1, 2).reshape(B, D, n, n)
    return F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def reverse_probs(logits: torch.Tensor) -> torch.Tensor:
    """The scatter's attention from the gather's logits A [B,H,M,N]: softmax over M of Aᵀ → [B,H,N,M]."""
    return logits.transpose(-2, -1).softmax(dim=-1)


# ------------------------------------------------------------------------------------------------ modules
class LookupPatchEmbed(nn.Module):
    """Image → lookup tokens [B, N, D]: each p×p patch flattened (c, p1, p2), then a k×k conv over the patch grid
    (k = 1: the ViT's linear patch embedding; lucidrains uses k = 7), then an optional LayerNorm."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 kernel_size: int = 1, norm_layer=None):
        super().__init__()
        for arg, val in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                         ("embed_dim", embed_dim), ("kernel_size", kernel_size)):
            _check_int(val, arg, "LookupPatchEmbed")
        if img_size % patch_size:
            raise ValueError(f"LookupPatchEmbed: patch_size={patch_size} does not divide img_size={img_size}")
        if kernel_size % 2 == 0:
            raise ValueError(f"LookupPatchEmbed: kernel_size must be odd, got {kernel_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_chans * patch_size ** 2, embed_dim, kernel_size, padding=kernel_size // 2)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, g = self.patch_size, self.grid
        x = x.reshape(B, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, g, g)  # patches as channels
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # [B, N, D]


class LookupCrossAttention(nn.Module):
    """Step (1), compressed ← lookup: q from LN(z_c), k and v from LN(z_l). Returns the output [B,M,D] and the
    logits A = q·kᵀ/√d [B,H,M,N], which the scatter reuses."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, norm_layer=nn.LayerNorm,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, check_heads(dim, num_heads, "LookupCrossAttention")
        self.scale = self.head_dim ** -0.5
        self.norm = norm_layer(dim)  # on the compressed tokens (queries)
        self.norm_context = norm_layer(dim)  # on the lookup tokens (keys, values)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor):
        B, M, D = x.shape
        N = context.shape[1]
        q = self.q(self.norm(x)).reshape(B, M, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,M,d]
        k, v = self.kv(self.norm_context(context)).reshape(B, N, 2, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)  # each [B,H,N,d]
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B,H,M,N]
        out = self.attn_drop(logits.softmax(dim=-1)) @ v  # each compressed token reads the lookup tokens
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, M, D))), logits


class ReverseCrossAttention(nn.Module):
    """Step (3), lookup ← compressed, reusing the gather's logits: softmax over M of Aᵀ, values from LN(z_c).
    Only a value and an output projection: no queries or keys are computed for the N lookup tokens."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, norm_layer=nn.LayerNorm,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, check_heads(dim, num_heads, "ReverseCrossAttention")
        self.norm = norm_layer(dim)  # on the compressed tokens (values)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, compressed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        B, M, D = compressed.shape
        N = logits.shape[-1]
        v = self.v(self.norm(compressed)).reshape(B, M, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,M,d]
        out = self.attn_drop(reverse_probs(logits)) @ v  # [B,H,N,M] @ [B,H,M,d]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class LookupBlock(nn.Module):
    """One LookupViT block: gather (compressed ← lookup), the ViT block on the compressed tokens, scatter
    (lookup ← compressed, reused logits) and the lookup tokens' narrow MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, lookup_mlp_ratio: float = 1.0,
                 qkv_bias: bool = True, post_norm: bool = False, norm_layer=nn.LayerNorm, proj_drop: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        kw = dict(qkv_bias=qkv_bias, norm_layer=norm_layer, attn_drop=attn_drop, proj_drop=proj_drop)
        self.gather = LookupCrossAttention(dim, num_heads, **kw)
        self.block = Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                           norm_layer=norm_layer)  # the expensive part, on M tokens
        self.scatter = ReverseCrossAttention(dim, num_heads, **kw)
        self.post_norm = norm_layer(dim) if post_norm else nn.Identity()  # lucidrains: LN after the scatter
        self.lookup_norm = norm_layer(dim)
        self.lookup_mlp = Mlp(dim, hidden_features=max(1, int(dim * lookup_mlp_ratio)), drop=proj_drop)

    def forward(self, c: torch.Tensor, l: torch.Tensor, update_lookup: bool = True):
        out, logits = self.gather(c, l)  # (1) compressed ← lookup, keep the logits
        c = self.block(c + out)  # (2) MHSA + MLP on the M compressed tokens
        if update_lookup:  # (3) lookup ← compressed with the transposed logits, then the cheap MLP
            l = self.post_norm(l + self.scatter(c, logits))
            l = l + self.lookup_mlp(self.lookup_norm(l))
        return c, l


class LookupViT(nn.Module):
    """LookupViT for classification. ``forward(x, grid=g)`` runs with g×g compressed tokens (default
    ``compressed_grid``); the weights do not depend on g. ``LOOKVIT_COMPAT`` gives the settings under which it
    computes what ``vit_pytorch.look_vit.LookViT`` computes."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 96, depth: int = 6, num_heads: int = 3, mlp_ratio: float = 2.0,
                 lookup_mlp_ratio: float = 0.5, compressed_grid: int = DEFAULT_GRID, class_token: bool = False,
                 global_pool: str = "avg", lookup_in_head: bool = True, post_norm: bool = False,
                 pos_embed: str = "learned", patch_kernel: int = 1, patch_norm: bool = False, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, norm_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0):
        super().__init__()
        for arg, val in (("num_classes", num_classes), ("depth", depth), ("num_heads", num_heads),
                         ("embed_dim", embed_dim)):
            _check_int(val, arg, "LookupViT")
        if embed_dim % num_heads:
            raise ValueError(f"LookupViT: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        if global_pool not in ("avg", "token"):
            raise ValueError(f"LookupViT: global_pool must be 'avg' or 'token', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("LookupViT: global_pool='token' needs class_token=True")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"LookupViT: pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        for arg, val in (("mlp_ratio", mlp_ratio), ("lookup_mlp_ratio", lookup_mlp_ratio)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise ValueError(f"LookupViT: {arg} must be a positive number, got {val!r}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps, bias=norm_bias)
        self.num_classes, self.embed_dim, self.global_pool = num_classes, embed_dim, global_pool
        self.lookup_in_head = lookup_in_head
        self.patch_embed = LookupPatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_kernel,
                                            norm_layer if patch_norm else None)
        self.lookup_grid = self.patch_embed.grid
        self.compressed_grid = self._check_grid(compressed_grid, "LookupViT")
        N = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.num_prefix_tokens = int(class_token)
        if pos_embed == "learned":  # lookup positions (resized with the tokens), and the CLS token's own
            self.pos_embed = nn.Parameter(torch.randn(1, N, embed_dim) * 0.02)
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        else:
            self.register_buffer("pos_embed", sincos_2d(self.lookup_grid, self.lookup_grid, embed_dim)[None],
                                 persistent=False)
            self.cls_pos = None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            LookupBlock(embed_dim, num_heads, mlp_ratio, lookup_mlp_ratio, qkv_bias=qkv_bias, post_norm=post_norm,
                        norm_layer=norm_layer, proj_drop=drop_rate, attn_drop=attn_drop_rate) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.lookup_head_norm = norm_layer(embed_dim) if lookup_in_head else None
        self.head = nn.Linear(embed_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_grid(self, grid, fn: str) -> int:
        _check_int(grid, "grid", fn)
        if grid > self.lookup_grid:
            raise ValueError(f"{fn}: grid must be at most the lookup grid {self.lookup_grid}, got {grid}")
        return grid

    def tokens_per_block(self, grid: int | None = None) -> int:
        """Tokens the expensive ViT block processes: grid² compressed tokens (+ CLS)."""
        grid = self.compressed_grid if grid is None else self._check_grid(grid, "tokens_per_block")
        return grid * grid + self.num_prefix_tokens

    def embed(self, x: torch.Tensor, grid: int | None = None):
        """Image → (compressed [B, prefix + g², D], lookup [B, N, D]); positions included."""
        if x.ndim != 4 or x.shape[1:] != (self.patch_embed.in_chans, self.patch_embed.img_size,
                                          self.patch_embed.img_size):
            raise ValueError(f"LookupViT: x must be [B, {self.patch_embed.in_chans}, {self.patch_embed.img_size}, "
                             f"{self.patch_embed.img_size}], got {tuple(x.shape)}")
        grid = self.compressed_grid if grid is None else self._check_grid(grid, "LookupViT.forward")
        lookup = self.patch_embed(x) + self.pos_embed
        compressed = resize_grid(lookup, grid)
        if self.cls_token is not None:
            cls = self.cls_token if self.cls_pos is None else self.cls_token + self.cls_pos
            compressed = torch.cat([cls.expand(x.shape[0], -1, -1), compressed], dim=1)
        return self.pos_drop(compressed), self.pos_drop(lookup)

    def forward_features(self, x: torch.Tensor, grid: int | None = None):
        c, l = self.embed(x, grid)
        for i, blk in enumerate(self.blocks):
            # without the lookup tokens in the head, the last block's scatter could not change the logits
            c, l = blk(c, l, update_lookup=self.lookup_in_head or i < len(self.blocks) - 1)
        return self.norm(c), (self.lookup_head_norm(l) if self.lookup_in_head else None)

    def forward_head(self, c: torch.Tensor, l: torch.Tensor | None = None) -> torch.Tensor:
        feat = c[:, 0] if self.global_pool == "token" else c[:, self.num_prefix_tokens:].mean(dim=1)
        if l is not None:
            feat = feat + l.mean(dim=1)
        return self.head(feat)

    def forward(self, x: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        return self.forward_head(*self.forward_features(x, grid))

    def extra_repr(self) -> str:
        return (f"lookup={self.lookup_grid}x{self.lookup_grid}, compressed={self.compressed_grid}x"
                f"{self.compressed_grid}, prefix={self.num_prefix_tokens}, depth={len(self.blocks)}")


class AtGrid(nn.Module):
    """``model`` run at a fixed compressed grid (shares its weights): for code that calls ``model(x)``."""

    def __init__(self, model: LookupViT, grid: int):
        super().__init__()
        if not isinstance(model, LookupViT):
            raise TypeError(f"AtGrid: model must be a LookupViT, got {type(model).__name__}")
        self.model, self.grid = model, model._check_grid(grid, "AtGrid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, grid=self.grid)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


def at_grid(model: LookupViT, grid: int) -> AtGrid:
    """``model`` at g×g compressed tokens, as a module whose forward takes only images."""
    return AtGrid(model, grid)


# ------------------------------------------------------------------------------------------------ from a ViT
@torch.no_grad()
def from_vit(vit: VisionTransformer, compressed_grid: int = DEFAULT_GRID, lookup_mlp_ratio: float = 0.5) -> LookupViT:
    """A LookupViT whose compressed stream is ``vit`` (copied; ``vit`` is not changed).

    Lookup tokens: the ViT's patch embedding and learned positions at its own patch size. Compressed tokens:
    their bilinear resize plus the ViT's CLS token. Each block's MHSA + MLP and the final norm and head are the
    ViT's. New: the gather, the scatter and the lookup MLPs; the gather's output projection and the lookup
    head norm start at zero, so at initialisation the model is the ViT applied to the resized tokens.
    """
    _check_model(vit, "from_vit")
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"from_vit: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
    if vit.cls_token is None or vit.num_reg_tokens or vit.global_pool != "token":
        raise ValueError("from_vit: the ViT must have one CLS token, no registers and global_pool='token'")
    pe, blk0 = vit.patch_embed, vit.blocks[0]
    model = LookupViT(img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.in_chans,
                      num_classes=vit.num_classes, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                      num_heads=blk0.attn.num_heads, mlp_ratio=blk0.mlp.fc1.out_features / vit.embed_dim,
                      lookup_mlp_ratio=lookup_mlp_ratio, compressed_grid=compressed_grid, class_token=True,
                      global_pool="token", lookup_in_head=True, qkv_bias=blk0.attn.qkv.bias is not None,
                      norm_eps=vit.norm.eps).to(vit.pos_embed.device)
    D = vit.embed_dim
    model.patch_embed.proj.weight.copy_(pe.proj.weight.reshape(D, -1, 1, 1))  # (c, p1, p2) order in both
    model.patch_embed.proj.bias.copy_(pe.proj.bias)
    model.pos_embed.copy_(vit.pos_embed[:, 1:])
    model.cls_token.copy_(vit.cls_token)
    model.cls_pos.copy_(vit.pos_embed[:, :1])
    for mine, theirs in zip(model.blocks, vit.blocks):
        mine.block.load_state_dict(theirs.state_dict())
        nn.init.zeros_(mine.gather.proj.weight)
    model.norm.load_state_dict(vit.norm.state_dict())
    model.head.load_state_dict(vit.head.state_dict())
    nn.init.zeros_(model.lookup_head_norm.weight)
    nn.init.zeros_(model.lookup_head_norm.bias)
    return model.eval()


# ------------------------------------------------------------------------------------------------ training
def fit_multires(model: nn.Module, train, val=None, *, grids=GRIDS, steps: int, profile=None, batch_size: int = 64,
                 lr: float = 1e-3, seed: int = 0, progress: bool = True, desc: str = "lookupvit") -> dict:
    """Train ``model`` for ``steps`` optimizer steps of ``batch_size`` with ``vitlab.train.fit``, drawing the
    compressed grid of every step uniformly from ``grids`` (multi-resolution training; one grid: plain).
    ``grids=None`` trains any images → logits model the same way (same data, schedule and steps: the control).

    When ``steps · batch_size`` fits in ``train``, a seeded subset of that size is one epoch: exactly ``steps``
    steps. Otherwise whole epochs, the nearest count (``history['step']`` says how many ran).
    """
    from vitlab import seed_everything
    from vitlab.train import fit

    _check_model(model, "fit_multires")
    if grids is not None:
        if not isinstance(model, LookupViT):
            raise TypeError(f"fit_multires: grids need a LookupViT model, got {type(model).__name__}")
        if isinstance(grids, int) and not isinstance(grids, bool):
            grids = (grids,)
        if not isinstance(grids, (tuple, list)) or not grids:
            raise TypeError(f"fit_multires: grids must be a non-empty tuple of ints (or None), got {grids!r}")
        grids = tuple(model._check_grid(g, "fit_multires") for g in grids)
    _check_int(steps, "steps", "fit_multires")
    _check_int(batch_size, "batch_size", "fit_multires")
    images, labels = (train.images, train.labels) if hasattr(train, "images") else train
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    if steps * batch_size <= len(images):
        idx = torch.randperm(len(images), generator=gen)[:steps * batch_size]
        data, epochs = (images[idx], labels[idx]), 1
    else:
        data, epochs = (images, labels), max(1, round(steps / max(1, len(images) // batch_size)))
    choice = torch.Generator().manual_seed(seed + 1)

    def step_fn(net, x, y):
        g = grids[int(torch.randint(len(grids), (1,), generator=choice))]
        logits = net(x, grid=g)
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1), logits

    return fit(model, data, val, profile=profile, epochs=epochs, batch_size=batch_size, lr=lr,
               step_fn=None if grids is None else step_fn, warmup=0.1, shift=2, seed=seed, progress=progress, desc=desc)


def _new_layer(name: str) -> bool:
    return any(part in NEW_LAYERS for part in name.split("."))


def finetune_from_vit(model: LookupViT, train, *, grid: int | None = None, new_lr_scale: float | None = None,
                      profile=None, seed: int = 0, progress: bool = False, **fit_kwargs) -> dict:
    """Fine-tune a ``from_vit`` model at ``grid`` compressed tokens with ``vitlab.train.fit(model, train,
    **fit_kwargs, seed=seed)`` (pass ``**recipes.finetune_kwargs(P)``): the base's weights at fit's ``lr``, the
    layers ``from_vit`` adds (``NEW_LAYERS``) at ``lr × new_lr_scale``; timm's AdamW groups otherwise (no weight
    decay on norms, biases, positions and tokens). Defaults from ``DEFAULTS``."""
    from vitlab.train import adamw_lr_scaled, fit

    if not isinstance(model, LookupViT):
        raise TypeError(f"finetune_from_vit: model must be a LookupViT, got {type(model).__name__}")
    grid = model._check_grid(DEFAULTS["grid"] if grid is None else grid, "finetune_from_vit")
    scale = DEFAULTS["new_lr_scale"] if new_lr_scale is None else new_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"finetune_from_vit: new_lr_scale must be a positive number, got {scale!r}")
    optimizer = adamw_lr_scaled(lambda net: [p for n, p in net.named_parameters() if _new_layer(n)], scale)

    def step_fn(net, x, y):
        logits = net(x, grid=grid)
        return F.cross_entropy(logits.float(), y, label_smoothing=fit_kwargs.get("label_smoothing", 0.1)), logits

    hist = fit(model, train, profile=profile, seed=seed, progress=progress, step_fn=step_fn, optimizer=optimizer,
               desc="lookupvit", **fit_kwargs)
    model.eval()
    return hist


def for_compare(base, train, profile, *, seed: int = 0):
    """LookupViT built from the base ViT with ``from_vit`` (``DEFAULTS['grid']``: 3×3 compressed tokens + CLS over
    the 8×8 lookup grid) and fine-tuned with the chapter's recipe (``recipes.finetune_kwargs(profile)``, ``seed``)
    at that grid; the new layers at ``DEFAULTS['new_lr_scale']`` × the recipe's lr (``finetune_from_vit``).

    Honest caveat: the base's blocks never learned to read resized tokens, so with the comparison's budget this
    model stays far below the base (the lesson shows how far); the paper trains LookupViT from scratch.
    """
    from vitlab import seed_everything
    from vitlab.methods.efficient.recipes import Reduced, finetune_kwargs

    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    seed_everything(seed)
    kw = finetune_kwargs(profile)
    g = DEFAULTS["grid"]
    model = from_vit(base, g)
    finetune_from_vit(model, train, grid=g, profile=profile, seed=seed, **kw)
    m = model.tokens_per_block()
    n = model.lookup_grid
    return Reduced(model=model.eval(), tokens_per_block=[float(m)] * len(model.blocks), gflops=None,
                   note=f"LookupViT from_vit(base): {g}x{g}+CLS compressed tokens over {n}x{n} lookup tokens, "
                        f"{kw['steps']} steps at that grid (new layers at {DEFAULTS['new_lr_scale']:g}x lr); "
                        f"the base's blocks cannot read resized tokens, so expect a large accuracy drop",
                   extra=dict(grid=g, lookup_tokens=model.patch_embed.num_patches))
