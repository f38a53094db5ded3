"""ViT-VQGAN: a Vision-Transformer image tokenizer with factorized, l2-normalised codes, and its stage-2 code prior.

Yu, Li, Koh, Zhang, Pang, Qin, Ku, Xu, Baldridge, Wu, "Vector-quantized Image Modeling with Improved VQGAN",
ICLR 2022 (arXiv:2110.04627). No official code was released; for details the paper leaves open we looked at
thuanz123/enhancing-transformers (``enhancing/modules/stage1/vitvqgan.py``, ``layers.py``) and
jiasenlu/vit-vqgan-jax. The code is ours. The quantiser is ``vitlab.vq.VectorQuantizer`` (read its docstring).

Stage 1, ``ViTVQGAN`` (p = patch_size, N = (img_size/p)², D = dim, d = code_dim, K = num_codes):

    x [B,C,H,W] ─PatchEmbed→ [B,N,D] + pos (fixed sin-cos) ─ depth × Block ─ LN ─ Linear·tanh·Linear → z [B,N,D]
      ─VectorQuantizer: Linear D→d, l2-normalise, nearest of K unit codes (= max cosine), Linear d→D
        → z_q [B,N,D] (straight-through gradient to u, so to z), idx [B,N], vq_loss = ‖sg(u)−e‖² + β‖u−sg(e)‖²
      ─ + pos ─ depth × Block ─ LN ─ Linear·tanh·Linear → [B,N,p·p·C] ─unpatchify→ x̂ [B,C,H,W]
    loss = l2_weight · mean (x̂ − x)² + l1_weight · mean |x̂ − x| + vq_loss

``factorized=False, l2_normalized=False`` gives the vanilla-VQ baseline: Euclidean lookup in D dims.

Stage 2, ``CodeGPT`` (VIM): a decoder-only Transformer over the N codes in raster order with a start token s,
    [s, i_1, …, i_{N−1}] ─ TinyLM ─→ logits [B,N,K] for [i_1, …, i_N];   loss = cross-entropy.
It *is* ``vitlab.vlm.lm.TinyLM`` (vocabulary K + 1: the K codes and s, which is never predicted), so sampling
reuses its KV cache: each new code costs one query against the codes before it.

Deviations from the paper, named:
- Losses: the paper trains with L2 + logit-Laplace + VGG perceptual + StyleGAN-discriminator losses. At toy scale we
  keep the pixel terms only: no perceptual loss (it needs a pretrained VGG) and no GAN loss (it needs long
  training). ``l1_weight`` stands in for the logit-Laplace term (a normalised l1); its default 0 follows the
  weights of the course notes and thuanz123's config (L2 1.0, logit-Laplace 0.0).
- The encoder and decoder heads are the paper's "two-layer feed-forward network with a tanh in the middle" at the
  output of the transformer blocks, with no activation at the output; its hidden width (not given in the paper) is
  mlp_ratio · dim. The encoder head is followed by the quantiser's own D→d Linear (two Linears in a row, as the
  paper's "linear projection to a low-dimensional lookup space" after the encoder). The decoder's last Linear
  per token + unpatchify equals a ConvTranspose(kernel = stride = p), which thuanz123 uses.
- Init (the paper gives none): blocks trunc-normal 0.02 (timm's ViT); the two heads keep PyTorch's default Linear
  init, so z is O(1) at the start. With 0.02 heads, z is ~0.03 and the factorised lookup vector u = proj_in(z) is
  mostly proj_in's bias, the same for every token: the codebook starts collapsed. Measured once (2,000 mnist5k
  train images padded to 32 px, the lesson's 2×64 model, K = 512, d = 8, batch 64, AdamW 1e-3, 100 steps, seed 0):
  MSE 0.0145 and 10 % of the codes used vs 0.0221 and 4 % with 0.02 heads; the vanilla baseline 0.0258 and 2.7 %.
- The ViT blocks are vitlab's (GELU MLP, as the paper's ViT); thuanz123 puts tanh in every block's MLP instead.
- Sizes: the paper uses 8×8 patches on 256 px, D = 512–1280, d = 32, K = 8192; the lesson uses toy sizes.
- Stage 2 is unconditional here (the paper also trains class-conditioned VIM and probes its features).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_images, check_int, check_number
from vitlab.mae import sincos_pos_embed_2d, unpatchify
from vitlab.models.vit import Block, LayerNorm, PatchEmbed, init_linear_
from vitlab.vlm.lm import KVCache, TinyLM
from vitlab.vq import VectorQuantizer, codebook_usage

__all__ = ["ViTVQGAN", "CodeGPT"]


def _check_indices(idx, num_codes: int, name: str, fn: str, length: int | None = None,
                   max_length: int | None = None) -> torch.Tensor:
    """``idx`` if it is an integer tensor [B, T] of codes in 0..num_codes−1 (T == length, or 1 ≤ T ≤ max_length)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex \
            or idx.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor of code indices, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")
    T = idx.shape[1] if idx.ndim == 2 else None
    if T is None or (length is not None and T != length) or (max_length is not None and not 1 <= T <= max_length):
        want = f"[B, {length}]" if length is not None else f"[B, T] with 1 <= T <= {max_length}"
        raise ValueError(f"{fn}: {name} must be {want}, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_codes):
        raise ValueError(f"{fn}: {name} must lie in 0..{num_codes - 1} (num_codes={num_codes}), got "
                         f"{int(idx.min())}..{int(idx.max())}")
    return idx.long()


def _head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """The paper's output FFN: Linear → tanh → Linear, no activation at the output."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


class ViTVQGAN(nn.Module):
    """``forward(x) -> (recon [B,C,H,W], vq_loss scalar, indices [B,N] int64)``; ``encode``, ``decode_indices``,
    ``loss``. ``code_dim`` is the lookup width when ``factorized`` (ignored otherwise: the lookup is in ``dim``)."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 1, dim: int = 64, depth: int = 2,
                 heads: int = 4, code_dim: int = 8, num_codes: int = 512, factorized: bool = True,
                 l2_normalized: bool = True, beta: float = 0.25, mlp_ratio: float = 4.0):
        super().__init__()
        fn = "ViTVQGAN"
        for name, val in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                          ("dim", dim), ("depth", depth), ("heads", heads), ("code_dim", code_dim)):
            check_int(val, name, fn)
        if img_size % patch_size:
            raise ValueError(f"{fn}: patch_size={patch_size} does not divide img_size={img_size}")
        if dim % heads:
            raise ValueError(f"{fn}: heads={heads} does not divide dim={dim}")
        if dim % 4:
            raise ValueError(f"{fn}: dim must be a multiple of 4 (2-D sin-cos positions), got {dim}")
        hidden = int(dim * check_number(mlp_ratio, "mlp_ratio", fn, low=0, low_open=True))
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        grid = img_size // patch_size
        self.num_patches = grid * grid

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(grid, grid, dim)[None])  # [1, N, D], enc and dec
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.enc_head = _head(dim, hidden, dim)
        self.dec_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.dec_norm = LayerNorm(dim)
        self.dec_head = _head(dim, hidden, patch_size ** 2 * in_chans)
        for part in (self.blocks, self.dec_blocks):
            init_linear_(part)  # timm's ViT init; heads and quantiser keep PyTorch's (see the docstring)
        self.quantizer = VectorQuantizer(num_codes, dim, beta=beta, factorized=factorized,
                                         code_dim=code_dim if factorized else None, l2_normalized=l2_normalized)
        self.num_codes = self.quantizer.num_codes

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B,C,H,W] → encoder output z [B,N,D] (before the quantiser)."""
        x = self.patch_embed(check_images(x, self.in_chans, self.img_size, "ViTVQGAN")) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.enc_head(self.norm(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised tokens [B,N,D] → images [B,C,H,W]."""
        x = z_q + self.pos_embed
        for blk in self.dec_blocks:
            x = blk(x)
        return unpatchify(self.dec_head(self.dec_norm(x)), self.patch_size)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B,C,H,W] → code indices [B,N] int64 (raster order)."""
        return self.quantizer.encode(self.encode_features(x))

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices [B,N] → images [B,C,H,W] (what ``forward`` reconstructs from the same codes)."""
        idx = _check_indices(idx, self.num_codes, "idx", "ViTVQGAN.decode_indices", length=self.num_patches)
        return self.decode(self.quantizer.decode(idx))

    def forward(self, x: torch.Tensor):
        z_q, indices, vq_loss = self.quantizer(self.encode_features(x))
        return self.decode(z_q), vq_loss, indices

    def loss(self, x: torch.Tensor, l2_weight: float = 1.0, l1_weight: float = 0.0):
        """(total, parts): total = l2_weight·MSE + l1_weight·L1 + vq_loss; ``parts`` holds floats for ``l2``,
        ``l1``, ``vq``, ``total`` and the batch's codebook ``perplexity`` and ``used`` fraction (``vitlab.vq``)."""
        l2_weight = check_number(l2_weight, "l2_weight", "ViTVQGAN.loss", low=0)
        l1_weight = check_number(l1_weight, "l1_weight", "ViTVQGAN.loss", low=0)
        recon, vq_loss, indices = self(x)
        l2, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        total = l2_weight * l2 + l1_weight * l1 + vq_loss
        usage = codebook_usage(indices, self.num_codes)
        parts = {"l2": l2.item(), "l1": l1.item(), "vq": vq_loss.item(), "total": total.item(),
                 "perplexity": usage["perplexity"], "used": usage["used"]}
        return total, parts


class CodeGPT(nn.Module):
    """Stage-2 prior over code sequences [B, seq_len]: ``forward(idx) -> logits [B, T, num_codes]`` where
    logits[:, t] predicts idx[:, t] from idx[:, :t] (and the start token); ``loss``; ``sample``.
    ``self.lm`` is a ``vitlab.vlm.lm.TinyLM`` with vocabulary num_codes + 1; token ``num_codes`` is the start."""

    def __init__(self, num_codes: int, seq_len: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.num_codes = check_int(num_codes, "num_codes", "CodeGPT")
        self.seq_len = check_int(seq_len, "seq_len", "CodeGPT")
        self.start = self.num_codes
        self.lm = TinyLM(num_codes + 1, dim=dim, depth=depth, num_heads=heads, max_len=seq_len, mlp_ratio=mlp_ratio)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = _check_indices(idx, self.num_codes, "idx", "CodeGPT.forward", max_length=self.seq_len)
        start = torch.full_like(idx[:, :1], self.start)
        return self.lm(torch.cat([start, idx[:, :-1]], dim=1))[..., :self.num_codes]  # s is never predicted

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Mean next-code cross-entropy (nats) over all positions."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, self.num_codes).float(), idx.reshape(-1).long())

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` code sequences [n, seq_len] int64, one code at a time through the KV cache. ``temperature`` 0 is
        greedy (argmax); ``top_k`` keeps the k most likely codes; ``generator`` must be on the model's device."""
        fn = "CodeGPT.sample"
        n = check_int(n, "n", fn)
        temperature = check_number(temperature, "temperature", fn, low=0)
        top_k = None if top_k is None else check_int(top_k, "top_k", fn, high=self.num_codes)
        device = self.lm.tok_emb.weight.device
        cache, tok, out = KVCache(), torch.full((n, 1), self.start, dtype=torch.long, device=device), []
        for _ in range(self.seq_len):
            logits = self.lm(tok, kv_cache=cache)[:, -1, :self.num_codes].float()  # [n, K]
            if temperature == 0:
                tok = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                tok = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            out.append(tok)
        return torch.cat(out, dim=1)


# ------------------------------------------------------------------------ the lesson's recipe (zoo entries)
# notebooks/5_selfsup/vit_vqgan.ipynb and the chapter's compare read these. Stage 1 on the mnist5k training digits
# (28 px, 7 x 7 = 49 codes per image), zoo entries vqgan_<variant>_digits_s<seed>: "vitvq" is the paper's lookup,
# "vq" the plain one it improves on. Stage 2, code_prior_digits_s0, models the codes of vqgan_vitvq_digits_s0 (the
# recipe `uses` it: a retrained tokenizer retrains the prior).
TOKENIZER = dict(img_size=28, patch_size=4, in_chans=1, dim=64, depth=2, heads=4, num_codes=512, code_dim=8)
VARIANTS = {"vitvq": dict(factorized=True, l2_normalized=True), "vq": dict(factorized=False, l2_normalized=False)}
STAGE1 = dict(batch_size=64, lr=1e-3, weight_decay=1e-4, warmup=0.05, grad_clip=1.0)
STAGE1_STEPS = {"cpu": 2000, "gpu": 20000}
PRIOR = dict(dim=64, depth=2, heads=4)
STAGE2 = dict(batch_size=64, lr=1e-3, weight_decay=0.01, warmup=0.05, grad_clip=1.0)
STAGE2_STEPS = {"cpu": 2000, "gpu": 20000}
SEEDS = (0, 1, 2)
DATA = "mnist5k"


def vqgan_model(num_classes: int = 0, **kwargs) -> ViTVQGAN:
    """The model registry's builder (a dataset sets ``num_classes`` for every model; a tokenizer ignores it)."""
    return ViTVQGAN(**kwargs)


def code_prior_model(num_classes: int = 0, img_size: int | None = None, in_chans: int | None = None,
                     **kwargs) -> CodeGPT:
    """The registry's builder of the stage-2 prior (the dataset's image shape and classes do not apply to it)."""
    return CodeGPT(**kwargs)


@torch.no_grad()
def tokenizer_metrics(model: ViTVQGAN, data, batch_size: int = 500) -> dict:
    """Reconstruction MSE over ``data``'s images and the codebook usage of their codes (``vitlab.vq``)."""
    images = getattr(data, "images", data)
    was_training = model.training
    model.eval()
    sq, idx = 0.0, []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        recon, _, codes = model(x)
        sq += F.mse_loss(recon, x, reduction="sum").item()
        idx.append(codes)
    model.train(was_training)
    usage = codebook_usage(torch.cat(idx), model.num_codes)
    return {"mse": sq / images.numel(), "perplexity": usage["perplexity"], "used": usage["used"]}


def vqgan_objective():
    """Stage 1 as a ``vitlab.zoo`` objective (registered as ``"vqgan"``): L2 + VQ loss per step; the checkpoint
    stores val/test reconstruction MSE and the test codes' perplexity and used fraction."""
    from vitlab import zoo

    def step_fn(net, images, labels):
        return net.loss(images)[0], None

    def metrics(model, train, val, test):
        t = tokenizer_metrics(model, test)
        return {"val_mse": tokenizer_metrics(model, val)["mse"], "test_mse": t["mse"],
                "test_perplexity": t["perplexity"], "test_used": t["used"]}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def code_prior_objective(tokenizer: str):
    """Stage 2 as a ``vitlab.zoo`` objective (registered as ``"code_prior"``): next-code cross-entropy on the
    codes that the zoo's ``tokenizer`` entry (frozen) gives each training image; stores val/test nats per code."""
    from vitlab import zoo

    cache = {}

    def codes(images):
        if "tok" not in cache:  # loaded (or trained) once, on the profile fit runs under
            cache["tok"] = zoo.get(tokenizer, progress=False).to(images.device).eval()
        return cache["tok"].encode(images)

    def step_fn(net, images, labels):
        return net.loss(codes(images)), None

    @torch.no_grad()
    def nats(model, data):
        model.eval()
        out = [model.loss(codes(data.images[i:i + 500])).item() * len(data.images[i:i + 500])
               for i in range(0, len(data), 500)]
        return sum(out) / len(data)

    def metrics(model, train, val, test):
        return {"val_nats": nats(model, val), "test_nats": nats(model, test)}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if "code_prior_digits" in MODELS:  # re-imported
        return
    zoo.register_objective("vqgan", vqgan_objective)
    zoo.register_objective("code_prior", code_prior_objective)
    num_patches = (TOKENIZER["img_size"] // TOKENIZER["patch_size"]) ** 2
    register_model("code_prior_digits", code_prior_model, num_codes=TOKENIZER["num_codes"], seq_len=num_patches,
                   **PRIOR)
    for variant, flags in VARIANTS.items():
        model = f"vqgan_{variant}_digits"
        register_model(model, vqgan_model, **TOKENIZER, **flags)
        for seed in SEEDS:
            zoo.register(f"{model}_s{seed}", zoo.Recipe(
                model=model, data=DATA, fit=dict(STAGE1), seed=seed, data_seed=0, objective="vqgan",
                per_profile={p: dict(steps=s) for p, s in STAGE1_STEPS.items()}, shares={"smoke": "cpu"}))
    zoo.register("code_prior_digits_s0", zoo.Recipe(
        model="code_prior_digits", data=DATA, fit=dict(STAGE2), seed=0, objective="code_prior",
        objective_kwargs=dict(tokenizer="vqgan_vitvq_digits_s0"), uses=("vqgan_vitvq_digits_s0",),
        per_profile={p: dict(steps=s) for p, s in STAGE2_STEPS.items()}, shares={"smoke": "cpu"}))


_register()
