"""A Vision Transformer, built the way timm builds it, with attention you can look inside.

    image [B,C,H,W] ─PatchEmbed→ tokens [B,N,D] ─(+cls, +pos)→ L × Block ─LayerNorm→ pool → head → logits

State-dict keys match ``timm.models.vision_transformer.VisionTransformer`` (LayerNorm eps 1e-6), so a timm
checkpoint of the same config loads here and gives the same logits, and ours loads into timm.

What timm's ViT does not give, and the course needs: ``Attention`` returns, on request, the attention
probabilities, the CLS row, the per-key column sums or the diagonal (the scores token-reduction methods rank
tokens by), without changing the default fast path (``F.scaled_dot_product_attention``). On CUDA, with
``use_kernels=True``, attention, LayerNorm and the FFN's first layer run as Triton kernels (``vitlab.kernels``).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from vitlab.checks import check_heads, check_number

__all__ = ["PatchEmbed", "Attention", "Block", "VisionTransformer", "SIDE_OUTPUTS", "init_linear_"]

SIDE_OUTPUTS = ("probs", "cls", "colsum", "diag")
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _kernels_on(module: nn.Module, x: torch.Tensor) -> bool:
    """Triton path: kernels enabled and x on CUDA (or on CPU under TRITON_INTERPRET=1, for tests)."""
    if not module.use_kernels:
        return False
    from vitlab.kernels._dispatch import use_triton

    return use_triton(x)


def _check_side(side: Sequence[str]) -> tuple[str, ...]:
    side = (side,) if isinstance(side, str) else tuple(side)
    bad = [s for s in side if s not in SIDE_OUTPUTS]
    if bad:
        raise ValueError(f"side: unknown side output(s) {bad}; expected any of {SIDE_OUTPUTS}")
    return side


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p×p patches and project each to D dims (a strided conv)."""

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 64,
                 bias: bool = True):
        super().__init__()
        for arg, val in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                         ("embed_dim", embed_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"PatchEmbed: {arg} must be a positive int, got {val!r}")
        if img_size % patch_size:
            raise ValueError(f"PatchEmbed: patch_size={patch_size} does not divide img_size={img_size}; "
                             f"choose a divisor of {img_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()  # timm has a (usually empty) norm slot here; keep the key layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"PatchEmbed: x must be an image batch [B, C, H, W], got {shape}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"PatchEmbed: x has {c} channels, expected in_chans={self.in_chans}")
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"PatchEmbed: x is {h}x{w}, expected img_size={self.img_size}x{self.img_size}")
        want = self.proj.weight.dtype
        if x.dtype != want and not (x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"PatchEmbed: x has dtype {x.dtype}, expected {want} (the model's dtype): convert with "
                            f"x.to({want}) or the model with .to(dtype), or run under torch.autocast")
        x = self.proj(x)  # [B, D, H/p, W/p]
        return self.norm(x.flatten(2).transpose(1, 2))  # [B, N, D]


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one ``qkv`` linear, then ``proj``).

    ``forward(x, side=("cls",))`` also returns a dict of side outputs, each per head:
      probs  [B,H,N,N]  the softmax matrix
      cls    [B,H,N]    its first row: how much the CLS token attends to each token
      colsum [B,H,N]    its column sums: how much attention each token receives
      diag   [B,H,N]    its diagonal: how much each token attends to itself
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer=LayerNorm):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads, "Attention")
        self.scale = self.head_dim ** -0.5
        self.use_kernels = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    # The three steps every attention variant of the course shares (token pruning scores, quantised softmax,
    # sparse masks): project to heads, score, and merge the heads back.
    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v per head, each [B, H, N, Dh] (q and k through ``q_norm`` / ``k_norm``)."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def logits(self, q: torch.Tensor, k: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled scores (q · scale) kᵀ (+ ``attn_bias``), [B, H, Nq, Nk]: the softmax's input."""
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return logits if attn_bias is None else logits + attn_bias

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, N, Dh] per-head outputs -> [B, N, C] through ``norm``, ``proj`` and ``proj_drop``."""
        B, H, N, Dh = out.shape
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, H * Dh))))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, side: Sequence[str] = ()):
        side = _check_side(side) if side else ()
        q, k, v = self.qkv_heads(x)  # each [B, H, N, Dh]

        if "probs" not in side and _kernels_on(self, x) and not (self.training and self.attn_drop.p):
            from vitlab.kernels.attention import attention

            res = attention(q, k, v, scale=self.scale, bias=attn_bias, return_cls="cls" in side,
                            return_colsum="colsum" in side, return_diag="diag" in side)
            out, sides = res if side else (res, {})
        elif side and set(side) != {"cls"}:
            # the slow path only when asked: materialise the N×N probabilities
            probs = self.logits(q, k, attn_bias).float().softmax(dim=-1).to(q.dtype)
            out = self.attn_drop(probs) @ v
            sides = {"probs": probs, "cls": probs[:, :, 0], "colsum": probs.sum(dim=-2),
                     "diag": probs.diagonal(dim1=-2, dim2=-1)}
            sides = {s: sides[s] for s in side}
        else:
            # scale=self.scale: a lesson that changes it (an attention temperature) changes every path alike
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
            sides = {}
            if side:  # only the CLS row: one query against all keys, O(N) not O(N²)
                cls_logits = self.logits(q[:, :, :1], k, None if attn_bias is None else attn_bias[..., :1, :])
                sides["cls"] = cls_logits.float().softmax(dim=-1).to(q.dtype)[:, :, 0]

        x = self.merge_heads(out)
        return (x, sides) if side else x


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=LayerNorm, act_layer=nn.GELU):
        super().__init__()
        self.use_kernels = False
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                              proj_drop=proj_drop, norm_layer=norm_layer)
        self.ls1 = nn.Identity()  # LayerScale slot, as in timm (no parameters when unused)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if _kernels_on(self, x):
            from vitlab.kernels.layernorm import layer_norm

            return layer_norm(x, norm.weight, norm.bias, eps=norm.eps)
        return norm(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        # the fused kernel reads fc1's weight itself: only for a plain Linear (not, say, a fake-quantised one)
        if type(self.mlp.fc1) is nn.Linear and type(self.mlp.act) is nn.GELU and self.mlp.act.approximate == "none" \
                and _kernels_on(self, x):
            from vitlab.kernels.mlp import linear_gelu

            h = self.mlp.drop1(linear_gelu(x, self.mlp.fc1.weight, self.mlp.fc1.bias))
            return self.mlp.drop2(self.mlp.fc2(self.mlp.norm(h)))
        return self.mlp(x)

    def forward_attn(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, side: Sequence[str] = ()):
        """The first half, x + Attn(LN(x)): token-reduction methods act between the two halves."""
        a = self.attn(self._norm(self.norm1, x), attn_bias=attn_bias, side=side)
        a, sides = a if side else (a, None)
        x = x + self.drop_path1(self.ls1(a))
        return (x, sides) if side else x

    def forward_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The second half, x + MLP(LN(x))."""
        return x + self.drop_path2(self.ls2(self._mlp(self._norm(self.norm2, x))))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, side: Sequence[str] = ()):
        if _kernels_on(self, x):  # "add the attention branch, then LayerNorm" as one kernel: the sum is
            from vitlab.kernels.layernorm import layer_norm  # read once and written once

            a = self.attn(self._norm(self.norm1, x), attn_bias=attn_bias, side=side)
            a, sides = a if side else (a, None)
            h, x = layer_norm(self.drop_path1(self.ls1(a)), self.norm2.weight, self.norm2.bias, eps=self.norm2.eps,
                              residual=x)  # h = LN2(x + branch), x = x + branch
            x = x + self.drop_path2(self.ls2(self._mlp(h)))
            return (x, sides) if side else x
        out = self.forward_attn(x, attn_bias=attn_bias, side=side)
        x, sides = out if side else (out, None)
        x = self.forward_mlp(x)
        return (x, sides) if side else x


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT init for every ``nn.Linear`` inside ``module``: weight trunc-normal(0, std), bias zero.

    Norms keep PyTorch's 1 / 0 and convolutions their default, as in timm. The Linears are visited in
    ``module.modules()`` order, so the random stream (and a seeded model) is the same as a per-module loop's.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) with timm's parameter names.

    ``forward(x)`` gives logits; ``forward_with_attention(x, side=("cls",))`` also gives each block's side
    outputs; ``forward_features`` / ``forward_head`` split the network as timm does.
    """

    def __init__(self, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 global_pool: str = "token", embed_dim: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_norm: bool = False, class_token: bool = True,
                 reg_tokens: int = 0, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, use_kernels: bool = False):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"VisionTransformer: global_pool={global_pool!r}; expected 'token' or 'avg'")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True")
        for arg, val in (("num_classes", num_classes), ("depth", depth), ("num_heads", num_heads),
                         ("reg_tokens", reg_tokens)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0 or (arg in ("depth", "num_heads")
                                                                                 and val == 0):
                raise ValueError(f"VisionTransformer: {arg} must be a {'positive' if arg in ('depth', 'num_heads') else 'non-negative'} int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"VisionTransformer: num_heads={num_heads} does not divide embed_dim={embed_dim}")
        check_number(mlp_ratio, "mlp_ratio", "VisionTransformer", low=0, low_open=True)
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"VisionTransformer: mlp_ratio={mlp_ratio!r} gives an MLP of 0 hidden units at "
                             f"embed_dim={embed_dim}")
        for arg, val in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate),
                         ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            check_number(val, arg, "VisionTransformer", low=0, high=1, high_open=True)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.num_reg_tokens = reg_tokens

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        # timm's default (no_embed_class=False): CLS and register tokens have positions too
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)])
        use_fc_norm = global_pool == "avg"  # timm: the final norm moves after pooling for avg
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.init_weights()
        self.set_kernels(use_kernels)

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        init_linear_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory exempts from weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def set_kernels(self, enabled: bool) -> "VisionTransformer":
        """Use the Triton kernels for attention, LayerNorm and fc1+GELU (on CUDA tensors; on CPU only under
        TRITON_INTERPRET=1, for tests). Elsewhere the PyTorch path runs regardless."""
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = bool(enabled)
        return self

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image → token sequence [B, prefix + N, D] with positions added (before the blocks)."""
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed  # [B, CLS + registers + patches, D]
        return self.norm_pre(self.pos_drop(x))

    def forward_features(self, x: torch.Tensor, side: Sequence[str] = ()):
        x = self.embed(x)
        if not side:
            return self.norm(self.blocks(x))
        sides = []
        for blk in self.blocks:
            x, s = blk(x, side=side)
            sides.append(s)
        return self.norm(x), sides

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, side: Sequence[str] = ()):
        """Logits; with ``side`` (e.g. ``("cls",)``) also, per block, a dict of those attention side outputs.
        Through ``forward`` (not a side door) so that a DDP or torch.compile wrapper sees the call: DDP syncs the
        gradients of what its own forward ran."""
        if side:
            return self.forward_with_attention(x, side)
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor, side: Sequence[str] = ("cls",)):
        """Logits and, per block, a dict of the requested attention side outputs."""
        feats, sides = self.forward_features(x, side=_check_side(side) or ("cls",))
        return self.forward_head(feats), sides

    def extra_repr(self) -> str:
        p = self.patch_embed
        return (f"img_size={p.img_size}, patch_size={p.patch_size}, tokens={p.num_patches}+"
                f"{self.num_prefix_tokens}, dim={self.embed_dim}, depth={len(self.blocks)}")
