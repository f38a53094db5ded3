"""HieraTok: a multi-scale ViT tokenizer with scale-causal attention.

Chen, Huang, Zou, Zhu, Ji, Liu, Chen, Chen, Shen, "HieraTok: Multi-Scale Visual Tokenizer Improves Image
Reconstruction and Generation", arXiv:2509.23736 (2025). No code was released and only the abstract could be read:
its two designs are built as it states them, (1) multi-scale downsampling of the encoder's token map into one
coarse → fine sequence and (2) scale-causal attention, "the progressive flow of information from low-resolution
global semantic features to high-resolution structural details"; every other detail is a choice named below.

    x [B,C,H,W] ─PatchEmbed→ [B,N,D], N = g², g = H/p ─(map_depth full-attention Blocks, + sin-cos pos)→ token map
      ─multiscale_tokens: average-pool the map to every s in scales (s divides g, the last s is g), concatenate
        coarse → fine → [B,T,D], T = Σ s²; + positions (region centres) + a learned embedding per scale
      ─depth Blocks, scale-causal (a token of scale s sees every token of scale ≤ s) → LayerNorm
      ─bottleneck → z [B,T,c]    "kl": Linear → (μ, log σ²), z = μ + σ·ε (train) or μ (eval),
                                       reg = ½·mean(μ² + σ² − 1 − log σ²)
                                 "vq": Linear → c, vitlab.vq.VectorQuantizer (cosine lookup), reg = its loss
      ─Linear c → D, + positions + decoder scale embedding ─dec_depth scale-causal Blocks → LayerNorm
      ─the finest scale's N tokens → Linear → p²·C values each → unpatchify → recon [B,C,H,W]
    loss = MSE(recon, x) + reg_weight·reg;   forward(x) → (recon, {"rec", "reg", "loss"})

The control: ``HieraTok(..., single_scale=True)`` is the same network with one scale (the g×g map, full attention:
a plain ViT autoencoder) plus E = T − N learned latent tokens, prepended on both sides and passed through the same
bottleneck, so ``token_count`` (the latent sequence a generator would model) and the latent's floats equal the
multi-scale model's. Extra tokens because Σ s² over halving scales is never a square: no square grid has T tokens.

Choices, named (the abstract leaves them open):
- Downsampling is average pooling of the token map made by ``map_depth`` full-attention Blocks (default 0: the patch
  embedding's map); the scale-causal Blocks follow it.
- The decoder is scale-causal too, and the image is read from the finest scale's decoder tokens.
- Bottleneck: the paper's generation results (gFID, a generator's convergence speed, "smoother latent space") are
  those of continuous latent-diffusion tokenizers, so ``"kl"`` is the default; ``"vq"`` is offered. The KL is a
  mean over elements (not a sum), so ``reg_weight`` does not depend on T.
- Loss: pixel MSE only; the paper's rFID-level tokenizers train with perceptual and GAN terms, left out here.
- Positions: MAE's fixed 2-D sin-cos (``vitlab.mae`` layout) at each token's region centre in finest-grid units,
  so all scales share one frame; the learned scale embedding tells the scales apart.
- The mask is passed to vitlab's ``Block`` as an additive bias (0 / −inf): ``Attention`` adds ``attn_bias`` to the
  logits on its side-output and Triton paths, where a boolean mask would be misread.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_choice, check_heads, check_images, check_int, check_number
from vitlab.mae import sincos_1d, unpatchify
from vitlab.models.vit import Block, LayerNorm, PatchEmbed, init_linear_
from vitlab.vq import VectorQuantizer

__all__ = ["scale_causal_mask", "scale_causal_bias", "default_scales", "multiscale_pos_embed", "multiscale_tokens",
           "HieraTok"]


def _check_counts(token_counts, fn: str) -> tuple[int, ...]:
    if isinstance(token_counts, torch.Tensor):
        token_counts = token_counts.tolist()
    if not isinstance(token_counts, (tuple, list)) or not token_counts:
        raise TypeError(f"{fn}: token_counts must be a non-empty sequence of ints (tokens per scale, coarse first), "
                        f"got {token_counts!r}")
    return tuple(check_int(c, f"token_counts[{i}]", fn) for i, c in enumerate(token_counts))


def scale_causal_mask(token_counts) -> torch.Tensor:
    """Bool [T, T], T = Σ token_counts, scales listed coarse first: entry [i, j] is True (query i may attend to key
    j) when scale(j) ≤ scale(i). Block lower-triangular: full attention inside a scale, coarse → fine across."""
    counts = _check_counts(token_counts, "scale_causal_mask")
    scale = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # [T] scale of each token
    return scale[None, :] <= scale[:, None]


def scale_causal_bias(token_counts, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``scale_causal_mask`` as an additive attention bias [T, T]: 0 where allowed, −inf where not."""
    allowed = scale_causal_mask(token_counts)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed.to(device), float("-inf"))


def default_scales(grid: int) -> tuple[int, ...]:
    """g, g/2, g/4, … while even, and 1, coarse first: 8 → (1, 2, 4, 8); 7 → (1, 7); 6 → (1, 3, 6)."""
    s = [check_int(grid, "grid", "default_scales")]
    while s[-1] % 2 == 0:
        s.append(s[-1] // 2)
    return tuple(sorted(set(s) | {1}))


def _check_scales(scales, grid: int | None, fn: str) -> tuple[int, ...]:
    """Strictly increasing ints, each dividing ``grid`` (default: the last scale), the last equal to it."""
    if not isinstance(scales, (tuple, list)) or not scales:
        raise TypeError(f"{fn}: scales must be a non-empty tuple of ints (grid sides, coarse first), got {scales!r}")
    scales = tuple(check_int(s, f"scales[{i}]", fn) for i, s in enumerate(scales))
    grid = scales[-1] if grid is None else grid
    if any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"{fn}: scales must be strictly increasing (coarse first), got {scales}")
    if scales[-1] != grid or any(grid % s for s in scales):
        raise ValueError(f"{fn}: scales={scales} must divide the token grid {grid} and end with it "
                         f"(e.g. {default_scales(grid)})")
    return scales


def multiscale_pos_embed(scales, dim: int) -> torch.Tensor:
    """Fixed sin-cos positions [Σ s², dim] for the scales (coarse first, row-major within a scale), each token at
    its region's centre in finest-grid units: (i + ½)·g/s − ½. The finest block equals
    ``vitlab.mae.sincos_pos_embed_2d(g, g, dim)``; channels [:dim/2] encode the column, [dim/2:] the row."""
    fn = "multiscale_pos_embed"
    scales = _check_scales(scales, None, fn)
    dim = check_int(dim, "dim", fn)
    if dim % 4:
        raise ValueError(f"{fn}: dim must be a multiple of 4 (two axes × sin, cos), got {dim}")
    g, out = scales[-1], []
    for s in scales:
        c = (torch.arange(s, dtype=torch.float64) + 0.5) * (g / s) - 0.5  # region centres
        h, w = torch.meshgrid(c, c, indexing="ij")
        out.append(torch.cat([sincos_1d(w, dim // 2), sincos_1d(h, dim // 2)], dim=1))
    return torch.cat(out)


def multiscale_tokens(token_map: torch.Tensor, scales, pos: torch.Tensor | None = None,
                      scale_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Token map [B, g², D] (row-major g×g grid, g = scales[-1]) → [B, Σ s², D]: the map average-pooled to each
    s×s grid, concatenated coarse → fine; ``pos`` [Σ s², D] is added, and ``scale_embed`` [len(scales), D] row k
    to every token of scale k."""
    fn = "multiscale_tokens"
    if not isinstance(token_map, torch.Tensor) or token_map.ndim != 3:
        shape = tuple(token_map.shape) if isinstance(token_map, torch.Tensor) else type(token_map).__name__
        raise ValueError(f"{fn}: token_map must be a tensor [B, g*g, D], got {shape}")
    B, N, D = token_map.shape
    g = round(N ** 0.5)
    if g * g != N:
        raise ValueError(f"{fn}: token_map has {N} tokens, not a square grid")
    scales = _check_scales(scales, g, fn)
    counts = [s * s for s in scales]
    for name, t, rows in (("pos", pos, sum(counts)), ("scale_embed", scale_embed, len(scales))):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (rows, D)):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a tensor [{rows}, {D}], got {shape}")
    grid = token_map.transpose(1, 2).reshape(B, D, g, g)  # [B, D, g, g]
    out = torch.cat([F.avg_pool2d(grid, g // s).flatten(2).transpose(1, 2) for s in scales], dim=1)  # [B, T, D]
    if pos is not None:
        out = out + pos.to(out.dtype)
    if scale_embed is not None:
        out = out + torch.repeat_interleave(scale_embed, torch.tensor(counts, device=scale_embed.device), dim=0)
    return out


class HieraTok(nn.Module):
    """Multi-scale ViT autoencoder (see the module docstring). ``forward(x) -> (recon, {"rec", "reg", "loss"})``;
    ``encode(x) -> z [B, token_count, latent_dim]`` (μ or the quantised vectors), ``decode(z) -> image``,
    ``codes(x) -> indices [B, token_count]`` ("vq" only).

    scales: grid sides coarse first, each dividing g = img_size / patch_size, ending with g (default
      ``default_scales(g)``). single_scale: the equal-token control (one g×g scale, full attention, plus
      ``num_extra`` learned latent tokens so that ``token_count`` equals the multi-scale model's Σ s²).
    reg_weight: weight of the KL (default 1e-4) or of the VQ loss (default 1).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 1, dim: int = 64, depth: int = 2,
                 num_heads: int = 4, scales=None, *, dec_depth: int | None = None, map_depth: int = 0,
                 mlp_ratio: float = 4.0, latent_dim: int = 16, bottleneck: str = "kl",
                 reg_weight: float | None = None, num_codes: int = 256, single_scale: bool = False):
        super().__init__()
        fn = "HieraTok"
        for name, val in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                          ("depth", depth), ("latent_dim", latent_dim), ("num_codes", num_codes)):
            check_int(val, name, fn)
        check_int(map_depth, "map_depth", fn, low=0)
        dec_depth = depth if dec_depth is None else check_int(dec_depth, "dec_depth", fn)
        check_heads(dim, num_heads, fn)
        if dim % 4:
            raise ValueError(f"{fn}: dim must be a multiple of 4 (2-D sin-cos positions), got {dim}")
        if img_size % patch_size:
            raise ValueError(f"{fn}: patch_size={patch_size} does not divide img_size={img_size}")
        mlp_ratio = check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True)
        self.bottleneck = check_choice(bottleneck, ("kl", "vq"), "bottleneck", fn)
        default_w = 1e-4 if bottleneck == "kl" else 1.0
        self.reg_weight = check_number(default_w if reg_weight is None else reg_weight, "reg_weight", fn, low=0)
        if not isinstance(single_scale, bool):
            raise TypeError(f"{fn}: single_scale must be a bool, got {single_scale!r}")
        g = img_size // patch_size
        ms_scales = _check_scales(default_scales(g) if scales is None else scales, g, fn)

        self.img_size, self.patch_size, self.in_chans, self.dim = img_size, patch_size, in_chans, dim
        self.grid, self.single_scale, self.latent_dim = g, single_scale, latent_dim
        self.scales = (g,) if single_scale else ms_scales
        self.token_counts = tuple(s * s for s in self.scales)  # per scale, coarse first
        self.token_count = sum(s * s for s in ms_scales)  # the latent sequence length, equal in both variants
        self.num_extra = self.token_count - g * g if single_scale else 0
        self.num_patches = g * g

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.register_buffer("pos_embed", multiscale_pos_embed(self.scales, dim), persistent=False)  # [ΣS², D]
        self.map_blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(map_depth))
        self.scale_embed = nn.Parameter(torch.zeros(len(self.scales), dim))
        self.extra_tokens = nn.Parameter(torch.zeros(1, self.num_extra, dim)) if self.num_extra else None
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        # scale-causal bias; None (full attention) with one scale
        self.register_buffer("attn_bias", scale_causal_bias(self.token_counts) if len(self.scales) > 1 else None,
                             persistent=False)

        # bottleneck
        if bottleneck == "kl":
            self.to_latent = nn.Linear(dim, 2 * latent_dim)  # μ and log σ²
            self.quantizer = None
        else:
            self.to_latent = nn.Linear(dim, latent_dim)
            self.quantizer = VectorQuantizer(num_codes, latent_dim, l2_normalized=True)
        self.from_latent = nn.Linear(latent_dim, dim)

        # decoder
        self.dec_scale_embed = nn.Parameter(torch.zeros(len(self.scales), dim))
        self.dec_extra_pos = nn.Parameter(torch.zeros(1, self.num_extra, dim)) if self.num_extra else None
        self.dec_blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(dec_depth))
        self.dec_norm = LayerNorm(dim)
        self.dec_pred = nn.Linear(dim, patch_size ** 2 * in_chans)
        for p in (self.scale_embed, self.extra_tokens, self.dec_scale_embed, self.dec_extra_pos):
            if p is not None:
                trunc_normal_(p, std=0.02)
        init_linear_(self)

    # ---------------------------------------------------------------------------------------------- encoder
    def _check(self, x) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size, "HieraTok")
        if not x.dtype.is_floating_point:
            raise TypeError(f"HieraTok: x must be floating point, got {x.dtype}")
        return x

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.attn_bias is None else self.attn_bias.to(x.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image → the multi-scale sequence [B, token_count, D] that enters the scale-causal Blocks."""
        t = self.patch_embed(self._check(x))  # [B, N, D]
        if len(self.map_blocks):
            t = t + self.pos_embed[-self.num_patches:]
            for blk in self.map_blocks:  # full attention over the patch map
                t = blk(t)
        t = multiscale_tokens(t, self.scales, self.pos_embed, self.scale_embed)  # [B, Σ s², D]
        if self.extra_tokens is not None:
            t = torch.cat([self.extra_tokens.expand(len(t), -1, -1), t], dim=1)
        return t

    def encode_tokens(self, seq: torch.Tensor) -> torch.Tensor:
        """The scale-causal encoder Blocks and LayerNorm on a sequence [B, token_count, D]."""
        if not isinstance(seq, torch.Tensor) or seq.ndim != 3 or tuple(seq.shape[1:]) != (self.token_count, self.dim):
            shape = tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
            raise ValueError(f"HieraTok.encode_tokens: seq must be [B, {self.token_count}, {self.dim}], got {shape}")
        for blk in self.blocks:
            seq = blk(seq, attn_bias=self._bias(seq))
        return self.norm(seq)

    def _latent(self, x: torch.Tensor, sample: bool):
        """→ (z [B, T, c], reg scalar, indices [B, T] or None)."""
        h = self.to_latent(self.encode_tokens(self.embed(x)))
        if self.quantizer is not None:
            z, indices, reg = self.quantizer(h)
            return z, reg, indices
        mu, logvar = h.chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)  # as latent-diffusion's DiagonalGaussianDistribution
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu
        reg = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return z, reg, None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent [B, token_count, latent_dim]: μ ("kl") or the quantised vectors ("vq")."""
        return self._latent(x, sample=False)[0]

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices [B, token_count] ("vq" only); for ``vitlab.vq.codebook_usage``."""
        if self.quantizer is None:
            raise ValueError("HieraTok.codes: needs bottleneck='vq', this model has bottleneck='kl'")
        return self._latent(x, sample=False)[2]

    # ---------------------------------------------------------------------------------------------- decoder
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, token_count, latent_dim] → image [B, C, H, W] (read from the finest scale's tokens)."""
        if not isinstance(z, torch.Tensor) or z.ndim != 3 or tuple(z.shape[1:]) != (self.token_count, self.latent_dim):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"HieraTok.decode: z must be [B, {self.token_count}, {self.latent_dim}], got {shape}")
        h = self.from_latent(z)
        e = self.num_extra
        scale = torch.repeat_interleave(self.dec_scale_embed, torch.tensor(self.token_counts, device=h.device), dim=0)
        grid_part = h[:, e:] + self.pos_embed.to(h.dtype) + scale
        h = grid_part if not e else torch.cat([h[:, :e] + self.dec_extra_pos, grid_part], dim=1)
        for blk in self.dec_blocks:
            h = blk(h, attn_bias=self._bias(h))
        h = self.dec_norm(h)[:, -self.num_patches:]  # the finest scale, row-major
        return unpatchify(self.dec_pred(h), self.patch_size, (self.grid, self.grid))

    def forward(self, x: torch.Tensor):
        z, reg, _ = self._latent(x, sample=self.training)
        recon = self.decode(z)
        rec = F.mse_loss(recon, x)
        return recon, {"rec": rec, "reg": reg, "loss": rec + self.reg_weight * reg}

    def extra_repr(self) -> str:
        kind = f"single_scale (+{self.num_extra} latent tokens)" if self.single_scale else f"scales={self.scales}"
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, {kind}, token_count={self.token_count}, "
                f"latent={self.bottleneck}:{self.latent_dim}")


# ------------------------------------------------------------------------ the lesson's recipe (zoo entries)
# notebooks/5_selfsup/hieratok.ipynb and the chapter's compare read these. mnist5k digits shrunk to 16 px, patch 2:
# an 8 x 8 token map pooled to 1, 2, 4 and 8 -> 85 latent tokens. Zoo entries hieratok_<variant>_digits_s<seed>:
# "multiscale" is the paper's tokenizer, "single" the equal-token control (the 8 x 8 map + 21 learned tokens).
TOKENIZER = dict(img_size=16, patch_size=2, in_chans=1, dim=64, depth=2, num_heads=4, latent_dim=2)
VARIANTS = {"multiscale": dict(single_scale=False), "single": dict(single_scale=True)}
TRAIN = dict(batch_size=64, lr=1e-3, weight_decay=1e-4, warmup=0.05, grad_clip=1.0)
STEPS = {"cpu": 3000, "gpu": 30000}
SEEDS = (0, 1, 2)
DATA = ("mnist5k", dict(img_size=16))


def hieratok_model(num_classes: int = 0, **kwargs) -> HieraTok:
    """The model registry's builder (a dataset sets ``num_classes`` for every model; a tokenizer ignores it)."""
    return HieraTok(**kwargs)


@torch.no_grad()
def tokenizer_metrics(model: HieraTok, data, batch_size: int = 500) -> dict:
    """Reconstruction of ``data``'s images (a dataset or a tensor) from the deterministic latent: pixel MSE over
    all of them and the mean per-image PSNR (pixels in [0, 1], so PSNR = −10·log10 MSE_image)."""
    images = getattr(data, "images", data)
    check_images(images, model.in_chans, model.img_size, "tokenizer_metrics", "data")
    was_training = model.training
    model.eval()
    per_image = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        per_image.append((model.decode(model.encode(x)) - x).pow(2).flatten(1).mean(1))
    model.train(was_training)
    per_image = torch.cat(per_image)
    return {"mse": per_image.mean().item(), "psnr": (-10 * per_image.clamp(min=1e-10).log10()).mean().item()}


def tokenizer_objective():
    """Training as a ``vitlab.zoo`` objective (registered as ``"hieratok"``): the model's own loss (MSE + weighted
    KL) per step; the checkpoint stores val/test reconstruction MSE and test PSNR."""
    from vitlab import zoo

    def step_fn(net, images, labels):
        return net(images)[1]["loss"], None

    def metrics(model, train, val, test):
        t = tokenizer_metrics(model, test)
        return {"val_mse": tokenizer_metrics(model, val)["mse"], "test_mse": t["mse"], "test_psnr": t["psnr"]}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def entry_names() -> list[str]:
    """Every zoo entry of the lesson, per variant and seed."""
    return [f"hieratok_{v}_digits_s{s}" for v in VARIANTS for s in SEEDS]


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if "hieratok_multiscale_digits" in MODELS:  # re-imported
        return
    zoo.register_objective("hieratok", tokenizer_objective)
    source, kwargs = DATA
    for variant, flags in VARIANTS.items():
        model = f"hieratok_{variant}_digits"
        register_model(model, hieratok_model, **TOKENIZER, **flags)
        for seed in SEEDS:
            zoo.register(f"{model}_s{seed}", zoo.Recipe(
                model=model, data=source, data_kwargs=dict(kwargs), fit=dict(TRAIN), seed=seed, data_seed=0,
                objective="hieratok", per_profile={p: dict(steps=s) for p, s in STEPS.items()},
                shares={"smoke": "cpu"}))


_register()
