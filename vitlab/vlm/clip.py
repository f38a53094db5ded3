"""A tiny CLIP (Radford et al. 2021): an image tower and a text tower trained to agree, pair by pair.

    I = normalize(image_encoder(images) W_i)   T = normalize(text_encoder(ids) W_t)     [B, E] each
    logits = exp(t) · I Tᵀ                      t learnable, init log(1/0.07), exp(t) clamped to [1, 100]
    loss = ½ [CE(logits, arange B) + CE(logitsᵀ, arange B)]     (symmetric InfoNCE: row i's match is column i)

Zero-shot classification embeds one prompt (or an ensemble of prompts, averaged) per class and picks the class
whose text embedding is closest to the image's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from vitlab.checks import check_choice, check_int, check_model, check_ndim
from vitlab.models.vit import Block, LayerNorm
from .lm import init_fan_in_

__all__ = ["TinyCLIP", "TextEncoder", "clip_loss", "zero_shot_classify", "recall_at_k", "LOGIT_SCALE_MAX"]

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned log-scale to [0, log 100]


class TextEncoder(nn.Module):
    """Token + position embeddings, ``depth`` vitlab ``Block``s (bidirectional, or causal as in CLIP), LayerNorm,
    and one vector per text: the last real token's (``pool="eos"``: encode with ``eos=True``) or the mean."""

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, num_heads: int = 2, max_len: int = 32, *,
                 pool: str = "eos", causal: bool = False, pad_id: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        fn = "TextEncoder"
        self.vocab_size = check_int(vocab_size, "vocab_size", fn, low=2)
        self.num_features, self.max_len = check_int(dim, "dim", fn), check_int(max_len, "max_len", fn)
        if dim % check_int(num_heads, "num_heads", fn):
            raise ValueError(f"{fn}: num_heads={num_heads} does not divide dim={dim}")
        self.pool = check_choice(pool, ("eos", "mean"), "pool", fn)
        self.causal, self.pad_id = bool(causal), check_int(pad_id, "pad_id", fn, low=0, high=vocab_size - 1)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(check_int(depth, "depth", fn)))
        self.norm = LayerNorm(dim)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        trunc_normal_(self.pos_emb, std=0.02)
        init_fan_in_(self)  # std 1/sqrt(fan_in), as OpenAI CLIP's text tower (width ** -0.5), not ViT's 0.02

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [B, L], right-padded with ``pad_id`` -> [B, dim]."""
        check_ndim(ids, 2, "ids", "TextEncoder")
        if ids.dtype != torch.long or ids.shape[1] > self.max_len:
            raise ValueError(f"TextEncoder: ids must be int64 [B, <= {self.max_len}], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        real = ids != self.pad_id
        if not real[:, 0].all():
            raise ValueError("TextEncoder: every text needs at least one token, right-padded with <pad>")
        L = ids.shape[1]
        # additive mask [B, 1, L, L]: no query looks at padding (nor, if causal, ahead)
        blocked = ~real[:, None, None, :]
        if self.causal:
            blocked = blocked | torch.ones(L, L, dtype=torch.bool, device=ids.device).triu(1)
        bias = torch.zeros(blocked.shape, device=ids.device).masked_fill(blocked, float("-inf"))
        x = self.tok_emb(ids) + self.pos_emb[:, :L]
        for blk in self.blocks:
            x = blk(x, attn_bias=bias.to(x.dtype))
        x = self.norm(x)
        if self.pool == "mean":
            return (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return x[torch.arange(len(x), device=x.device), real.sum(1) - 1]


def _features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features [B, D]: a ViT's pre-logits (``forward_head(..., pre_logits=True)``), else ``encoder(x)``."""
    if hasattr(encoder, "forward_features") and hasattr(encoder, "forward_head"):
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    return encoder(x)


class TinyCLIP(nn.Module):
    """``forward(images, text_ids)`` -> logits per image [B, B]; ``loss(...)`` the symmetric InfoNCE.

    image_dim / text_dim default to the encoders' ``num_features`` (a vitlab ViT and ``TextEncoder`` have it).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 64, *,
                 image_dim: int | None = None, text_dim: int | None = None):
        super().__init__()
        self.image_encoder = check_model(image_encoder, "TinyCLIP")
        self.text_encoder = check_model(text_encoder, "TinyCLIP")
        dims = []
        for name, enc, dim in (("image_dim", image_encoder, image_dim), ("text_dim", text_encoder, text_dim)):
            dim = getattr(enc, "num_features", None) if dim is None else dim
            if dim is None:
                raise TypeError(f"TinyCLIP: {name} is needed: the encoder {type(enc).__name__} has no num_features")
            dims.append(check_int(dim, name, "TinyCLIP"))
        self.embed_dim = check_int(embed_dim, "embed_dim", "TinyCLIP")
        self.image_proj = nn.Linear(dims[0], embed_dim, bias=False)
        self.text_proj = nn.Linear(dims[1], embed_dim, bias=False)
        init_fan_in_(self.image_proj)  # CLIP: projections at std width ** -0.5
        init_fan_in_(self.text_proj)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to [1, 100] as in CLIP (no gradient past the clamp)."""
        return self.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(_features(self.image_encoder, images)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(ids)), dim=-1)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        img, txt = self.encode_image(images), self.encode_text(text_ids)
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"TinyCLIP: {img.shape[0]} images but {txt.shape[0]} texts; pairs must align")
        return self.scale * img @ txt.T

    def loss(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        return clip_loss(self(images, text_ids))


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a square logit matrix [B, B] whose diagonal holds the matching pairs."""
    check_ndim(logits, 2, "logits", "clip_loss")
    if logits.shape[0] != logits.shape[1]:
        raise ValueError(f"clip_loss: logits must be square [B, B], got {tuple(logits.shape)}")
    target = torch.arange(len(logits), device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _default_tokenizer(tokenizer):
    from .tokenizer import WordTokenizer

    return WordTokenizer() if tokenizer is None else tokenizer


def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def zero_shot_classify(model: TinyCLIP, images: torch.Tensor, class_prompts, tokenizer=None, *,
                       batch_size: int = 256, return_scores: bool = False):
    """Class index [N] for each image: the class whose prompt embedding (an ensemble of prompts: their normalised
    mean) is most similar. class_prompts: one str, or a list of str, per class. ``return_scores``: also the
    cosine similarities [N, classes]."""
    if not isinstance(model, TinyCLIP):
        raise TypeError(f"zero_shot_classify: model must be a TinyCLIP, got {type(model).__name__}")
    if isinstance(class_prompts, str) or not isinstance(class_prompts, (list, tuple)) or len(class_prompts) < 2:
        raise ValueError(f"zero_shot_classify: class_prompts must list at least 2 classes, got {class_prompts!r}")
    groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
    if any(not g or not all(isinstance(p, str) for p in g) for g in groups):
        raise ValueError("zero_shot_classify: class_prompts must hold, per class, a str or a non-empty list of str")
    check_int(batch_size, "batch_size", "zero_shot_classify")
    tok = _default_tokenizer(tokenizer)
    was = model.training
    model.eval()
    device = model.logit_scale.device
    ids, _ = tok.batch_encode([p for g in groups for p in g], eos=True)
    txt = _batched(model.encode_text, ids.to(device), batch_size)
    owner = torch.repeat_interleave(torch.tensor([len(g) for g in groups], device=device))
    classes = F.normalize(torch.zeros(len(groups), txt.shape[1], device=device).index_add_(0, owner, txt), dim=-1)
    scores = _batched(model.encode_image, images.to(device), batch_size) @ classes.T
    model.train(was)
    return (scores.argmax(1), scores) if return_scores else scores.argmax(1)


@torch.no_grad()
def recall_at_k(model: TinyCLIP, images: torch.Tensor, text_ids: torch.Tensor, k: int = 1, *,
                batch_size: int = 256) -> dict:
    """Retrieval recall@k of pairs (images[i], text_ids[i]): {"i2t": ..., "t2i": ...} in [0, 1]. A retrieved text
    identical to the true one (the same caption of two scenes) counts as a hit."""
    if not isinstance(model, TinyCLIP):
        raise TypeError(f"recall_at_k: model must be a TinyCLIP, got {type(model).__name__}")
    check_ndim(text_ids, 2, "text_ids", "recall_at_k")
    if len(images) != len(text_ids):
        raise ValueError(f"recall_at_k: {len(images)} images but {len(text_ids)} texts")
    k = check_int(k, "k", "recall_at_k", high=len(images))
    was = model.training
    model.eval()
    device = model.logit_scale.device
    sim = _batched(model.encode_image, images.to(device), batch_size) @ \
        _batched(model.encode_text, text_ids.to(device), batch_size).T
    model.train(was)
    same = torch.unique(text_ids, dim=0, return_inverse=True)[1].to(device)  # caption id per pair
    i2t = (same[sim.topk(k, dim=1).indices] == same[:, None]).any(1).float().mean().item()
    t2i = (same[sim.T.topk(k, dim=1).indices] == same[:, None]).any(1).float().mean().item()
    return {"i2t": i2t, "t2i": t2i}
