"""DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination (X. Gong, T. Ming, X. Wang,
Z. Wei; EMNLP 2024, arXiv:2410.04514; official code: coder-gx/DAMRO, the modified
``transformers-4.43.0/src/transformers/models/llava/modeling_llava.py`` (forward hooks on ``q_proj`` / ``k_proj`` of
the vision layer ``vision_feature_layer``, the outlier selection when ``damro_topk`` is set) and
``sample_method/sample.py`` (the contrastive step inside ``_sample``).

The paper's observation: the CLS token of a LVLM's vision encoder puts much of its attention on a few *outlier*
tokens, high-norm tokens in the background ("Vision Transformers need registers"), and the LM decoder's attention to
the image follows them. DAMRO is training-free: it asks the LM what it would say from those outlier tokens alone, and
subtracts that at every decoding step.

    at the feature layer:  q, k = q_proj(h), k_proj(h)          full width C, one "head" (not per head)
                           A = softmax(q kᵀ / √C),  a = A[CLS, patches],  O = top-k(a)     (outlier tokens)
    two branches:          l_full = LM([proj(all patches); text]),  l_out = LM([proj(patches O); text])
    each step:             l' = (1 + α) l_full − α l_out,   l'_v = −∞ where l_full,v < log β + max_v l_full,v

α = 0.5 for POPE, 1.5 for CHAIR; β = 0.1; k = 4 in the README's examples. Each branch keeps its own KV cache.

    feats, outliers, idx, a = damro_features(vlm, images, topk=4)     # a TinyVLM whose encoder has a CLS token
    damro_generate(vlm, images, prompt_ids, topk=4, alpha=0.5, beta=0.1)  # tokens [B, <= max_new_tokens]
    contrastive_logits(l_full, l_out, alpha=0.5, beta=0.1)            # one step of the contrast with the cutoff

The lesson's measurements (``encoder_scan``, ``patch_coverage``, ``first_token_logits``, ``answer_probs``,
``pope_metrics``, ``probe_run``) run on the three ViT/8 VLMs the FastVLM lesson trained (``VLM_ENTRIES``); nothing
here is trained.

Our reading, and every deviation from the official code, named:
- **The outlier selection** (``cls_attention`` + ``outlier_indices`` + ``gather_tokens``) follows the official lines:
  full-width q and k of the hooked layer (the projections' raw outputs, bias included, no per-head split), scores
  q kᵀ · C^-1/2 with C the feature width, a softmax over all tokens (CLS included), the CLS row over the patches
  (``attn[:, 0, 1:]``), ``torch.topk`` (sorted, largest first) and a gather of the features the LM would have read, in
  that order (highest attention first, not in raster order). We compute only the CLS row of the softmax (row 0 depends
  on q_0 alone: the same numbers, O(N) instead of O(N^2)); the tests compare with the official full-matrix lines.
- **Which layer.** LLaVA-1.5 reads the penultimate CLIP layer's output (``vision_feature_layer = -2``) and DAMRO hooks
  that same layer's ``q_proj`` / ``k_proj``. ``TinyVLM`` reads the encoder's last block (after its final LayerNorm),
  so the default ``layer=-1`` hooks the last block: again the layer whose output the LM reads. Our ViT has one fused
  ``qkv`` linear (timm layout); the hook reads its output and splits q = the first C columns, k = the next C (exactly
  what separate ``q_proj`` / ``k_proj`` give: the tests check it against the block's weights).
- **The contrastive step** (``contrastive_logits``) is the official one, the cutoff computed as the official
  ``torch.log(torch.tensor(beta)) + max`` (in the logits' dtype). The official POPE run samples (``do_sample=True``, and
  its ``_sample`` skips the logits warpers: a draw from softmax(l')); ``damro_generate`` samples the same way with
  ``greedy=False`` and takes the argmax by default (the brief's greedy comparison). ``answer_probs(mode="sample")``
  gives the exact probability of each first token under that sampling, so the lesson reports both protocols without
  sampling noise.
- **The outlier branch** is ``TinyVLM``'s own LM reading [proj(k outlier tokens); prompt] into a second ``KVCache``;
  positions start at 0 as in the official branch (its text then sits at positions k.., not N..). LLaMA's rotary
  positions keep relative offsets; TinyLM's learned absolute positions never saw text there, one more way in which the
  outlier branch is a weak model.
- **POPE metrics** (``pope_metrics``) count as ``evaluation/eval_pope/eval_pope.py`` does (a "no" question answered
  with anything but "no" is a yes-answer and a false positive), but match whole words instead of substrings (the
  official ``'no' in answer`` also fires on "nothing"), and set precision to 0 where no answer is "yes" (the official
  script would divide by zero; scikit-learn's ``zero_division=0``). With probabilities instead of 0/1 decisions they
  are the expected counts under sampling.
- **The models**: a 6 x 64 course ViT/8 at 128 px (256 patches + CLS) trained from scratch inside a 2 x 64 TinyVLM on
  colour / count / exist questions (the FastVLM lesson's ``ch7_fastvlm_vit_s{0,1,2}``), not CLIP ViT-L/14 with Vicuna
  7B. Its CLS token was never read by anything (TinyVLM drops it and there is no classifier), so its query at the last
  block is whatever the patch queries' weights make of it: unlike CLIP's CLS, it was never trained to summarise.

Measured (cpu profile, 1,000 test scenes, the three VLMs; the lesson notebook): no high-norm tokens (the largest patch
norm at the feature layer 1.2-1.5x the image median, none over 2x); the CLS top-4 touch an object 82 +- 11 % of the
time against 12 % for random patches (DAMRO's background premise does not hold); the VLMs hardly use the image for
presence (AUC 0.52, greedy POPE accuracy 51.5 %), so DAMRO (k 4, alpha 0.5) moves POPE accuracy by -0.1 +- 0.2 points
(a null effect, as a random-token contrast) and colour-question accuracy by -1.0 +- 0.7.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_cls_vit, check_int, check_ndim, check_number

__all__ = ["TOPK", "ALPHA_POPE", "ALPHA_CHAIR", "BETA", "LAYER", "TOPKS", "ALPHAS", "VLM_ENTRIES", "MODES",
           "CaptureQK", "cls_attention", "outlier_indices", "gather_tokens", "contrastive_logits", "damro_features",
           "damro_generate", "encoder_scan", "patch_coverage", "random_indices", "first_token_logits", "answer_probs",
           "pope_metrics", "probe_run"]

TOPK = 4  # the README's examples (POPE, CHAIR)
ALPHA_POPE, ALPHA_CHAIR, BETA = 0.5, 1.5, 0.1
LAYER = -1  # the block whose output TinyVLM reads (LLaVA: -2, the layer whose output it reads)
TOPKS = (1, 4, 16)  # the lesson's k sweep
ALPHAS = (0.5, 1.0, 1.5)  # the lesson's alpha sweep (alpha = 0 is greedy decoding)
MODES = ("greedy", "sample")


def _vlm_entries() -> tuple[str, ...]:
    from . import fastvlm

    return tuple(fastvlm.entry_name("vit", s) for s in fastvlm.SEEDS)


VLM_ENTRIES = _vlm_entries()  # the FastVLM lesson's ViT/8 VLMs, seeds 0, 1, 2


# ---------------------------------------------------------------------------------------------- outlier selection
def _check_vlm(vlm, fn: str):
    from vitlab.vlm import TinyVLM

    if not isinstance(vlm, TinyVLM):
        raise TypeError(f"{fn}: vlm must be a vitlab.vlm.TinyVLM, got {type(vlm).__name__}")
    check_cls_vit(vlm.vision_encoder, fn)
    if vlm.use_cls:
        raise ValueError(f"{fn}: vlm.use_cls must be False (the LM reads the patch tokens only, as LLaVA's 'default' "
                         f"strategy; the outlier indices count patches)")
    return vlm


def _block(vit, layer, fn: str) -> nn.Module:
    depth = len(vit.blocks)
    layer = check_int(layer, "layer", fn, low=-depth, high=depth - 1)
    return vit.blocks[layer]


class CaptureQK:
    """``with CaptureQK(vit, layer) as cap: vit.forward_features(x)`` -> ``cap.q``, ``cap.k`` [B, 1 + N, C]: the
    full-width query and key projections of block ``layer`` (the official hooks on ``q_proj`` / ``k_proj``; here the
    first and second C columns of the fused ``qkv`` linear's output)."""

    def __init__(self, vit, layer: int = LAYER):
        check_cls_vit(vit, "CaptureQK")
        self.attn = _block(vit, layer, "CaptureQK").attn
        self.q = self.k = None
        self._handle = None

    def _hook(self, module, inputs, output):
        c = output.shape[-1] // 3
        self.q, self.k = output[..., :c], output[..., c:2 * c]

    def __enter__(self) -> "CaptureQK":
        self._handle = self.attn.qkv.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The CLS row of softmax(q kᵀ / √C) over the patches: [B, N] from q, k [B, 1 + N, C] (CLS first). The softmax
    runs over every key (CLS included, as the official code), then the CLS column is dropped: rows need not sum to 1."""
    fn = "cls_attention"
    check_ndim(q, 3, "q", fn), check_ndim(k, 3, "k", fn)
    if q.shape != k.shape or q.shape[1] < 2:
        raise ValueError(f"{fn}: q and k must both be [B, 1 + N, C] with N >= 1, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    c = q.shape[-1]
    scores = (q[:, :1] @ k.transpose(-2, -1)) * c ** -0.5  # [B, 1, 1 + N]: only the CLS query's row
    return F.softmax(scores, dim=-1)[:, 0, 1:]


def outlier_indices(cls_attn: torch.Tensor, topk: int = TOPK) -> torch.Tensor:
    """Indices [B, topk] of the patches the CLS attends to most, highest first (``torch.topk``, sorted)."""
    check_ndim(cls_attn, 2, "cls_attn", "outlier_indices")
    topk = check_int(topk, "topk", "outlier_indices", high=cls_attn.shape[1])
    return torch.topk(cls_attn, topk, dim=1, largest=True).indices


def gather_tokens(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """features [B, N, C] at indices idx [B, k] -> [B, k, C], in the order of idx."""
    fn = "gather_tokens"
    check_ndim(features, 3, "features", fn), check_ndim(idx, 2, "idx", fn)
    if idx.shape[0] != features.shape[0] or idx.dtype != torch.long:
        raise ValueError(f"{fn}: idx must be int64 [B={features.shape[0]}, k], got {tuple(idx.shape)} {idx.dtype}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= features.shape[1]):
        raise ValueError(f"{fn}: idx must lie in 0..{features.shape[1] - 1}, got {int(idx.min())}..{int(idx.max())}")
    return torch.gather(features, 1, idx[..., None].expand(-1, -1, features.shape[-1]))


def contrastive_logits(logits_full: torch.Tensor, logits_outlier: torch.Tensor, alpha: float = ALPHA_POPE,
                       beta: float = BETA) -> torch.Tensor:
    """One DAMRO step: (1 + alpha) l_full - alpha l_outlier, with -inf wherever l_full < log(beta) + max l_full (the
    adaptive plausibility cutoff: only tokens within a factor beta of the full branch's most likely one survive).
    ``alpha = 0`` keeps l_full on the surviving tokens (its argmax is greedy decoding's)."""
    fn = "contrastive_logits"
    if not torch.is_tensor(logits_full) or not torch.is_tensor(logits_outlier) or logits_full.ndim < 1 \
            or logits_full.shape != logits_outlier.shape:
        shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in (logits_full, logits_outlier)]
        raise ValueError(f"{fn}: logits_full and logits_outlier must be tensors of one shape [..., V], got {shapes}")
    alpha = check_number(alpha, "alpha", fn, low=0)
    beta = check_number(beta, "beta", fn, low=0, high=1, low_open=True)
    cutoff = torch.log(torch.tensor(beta, dtype=logits_full.dtype)).to(logits_full.device) \
        + logits_full.max(dim=-1, keepdim=True).values
    diffs = (1 + alpha) * logits_full - alpha * logits_outlier
    return diffs.masked_fill(logits_full < cutoff, -float("inf"))


@torch.no_grad()
def damro_features(vlm, images: torch.Tensor, topk: int = TOPK, *, layer: int = LAYER, idx: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One encoder pass: (features [B, N, Dv] the LM reads, outliers [B, topk, Dv], their indices [B, topk], the CLS
    attention [B, N] at block ``layer``). ``idx`` replaces the CLS top-k (a control: random or chosen tokens)."""
    fn = "damro_features"
    _check_vlm(vlm, fn)
    with CaptureQK(vlm.vision_encoder, layer) as cap:
        feats = vlm.encode_images(images)
    a = cls_attention(cap.q, cap.k)
    if idx is None:
        idx = outlier_indices(a, topk)
    return feats, gather_tokens(feats, idx), idx, a


@torch.no_grad()
def damro_generate(vlm, images: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int = 4, *,
                   topk: int = TOPK, alpha: float = ALPHA_POPE, beta: float = BETA, layer: int = LAYER,
                   greedy: bool = True, generator: torch.Generator | None = None, idx: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] decoded with DAMRO: the full branch (every patch) and the outlier branch (the
    CLS top-``topk`` patches, or ``idx``) each prefill their own KV cache, then each step takes the argmax (or, with
    ``greedy=False``, a sample as the official ``_sample``) of ``contrastive_logits`` and feeds it to both branches.
    <eos> and <pad> as ``TinyVLM.generate``; with ``alpha=0`` and greedy it returns what ``TinyVLM.generate`` does."""
    from vitlab.vlm import KVCache

    fn = "damro_generate"
    _check_vlm(vlm, fn)
    vlm.check_prompt(images, prompt_ids)
    check_int(max_new_tokens, "max_new_tokens", fn)
    check_number(alpha, "alpha", fn, low=0)
    check_number(beta, "beta", fn, low=0, high=1, low_open=True)
    feats, outliers, _, _ = damro_features(vlm, images, topk, layer=layer, idx=idx)
    caches = KVCache(), KVCache()
    lm = vlm.lm
    l_full = lm(prompt_ids, prefix_embeds=vlm.projector(feats), kv_cache=caches[0])[:, -1]
    l_out = lm(prompt_ids, prefix_embeds=vlm.projector(outliers), kv_cache=caches[1])[:, -1]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    out = []
    for t in range(max_new_tokens):
        logits = contrastive_logits(l_full, l_out, alpha, beta)
        if greedy:
            nxt = logits.argmax(-1)
        else:  # the official "direct sample": softmax of the contrast, no warpers
            nxt = torch.multinomial(logits.float().softmax(-1), 1, generator=generator)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, vlm.pad_id), nxt)
        out.append(nxt)
        done |= nxt == vlm.eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        l_full = lm(nxt[:, None], kv_cache=caches[0])[:, -1]
        l_out = lm(nxt[:, None], kv_cache=caches[1])[:, -1]
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def encoder_scan(vlm, images: torch.Tensor, *, layer: int = LAYER, batch_size: int = 50, progress: bool = False
                 ) -> dict:
    """One encoder pass over ``images`` in batches: "features" [S, N, Dv] (what the LM reads), "cls_attn" [S, N] (the
    CLS row at block ``layer``), "norms" [S, L, N] (each block's output norm per patch token: the residual stream,
    before the final LayerNorm, where "ViTs need registers" finds its artifacts) and "cls_norms" [S, L]."""
    from tqdm.auto import tqdm

    fn = "encoder_scan"
    _check_vlm(vlm, fn)
    check_ndim(images, 4, "images", fn)
    batch_size = check_int(batch_size, "batch_size", fn)
    vit = vlm.vision_encoder
    dev = next(vlm.parameters()).device
    outs = {"features": [], "cls_attn": [], "norms": [], "cls_norms": []}
    for i in tqdm(range(0, len(images), batch_size), desc="encoder", disable=not progress):
        x = images[i:i + batch_size].to(dev)
        per_block = []
        hooks = [b.register_forward_hook(lambda m, inp, o: per_block.append(o.norm(dim=-1))) for b in vit.blocks]
        try:
            feats, _, _, a = damro_features(vlm, x, 1, layer=layer)
        finally:
            for h in hooks:
                h.remove()
        norms = torch.stack(per_block, dim=1)  # [B, L, 1 + N]
        for key, val in (("features", feats), ("cls_attn", a), ("norms", norms[..., 1:]), ("cls_norms", norms[..., 0])):
            outs[key].append(val.float().cpu())
    return {key: torch.cat(v) for key, v in outs.items()}


def patch_coverage(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Object masks [S, H, W] (0 background) -> [S, N]: the fraction of each patch's pixels on an object (raster order,
    as the ViT's tokens)."""
    fn = "patch_coverage"
    check_ndim(masks, 3, "masks", fn)
    p = check_int(patch_size, "patch_size", fn)
    s, h, w = masks.shape
    if h % p or w % p:
        raise ValueError(f"{fn}: patch_size={p} must divide the masks' {h} x {w}")
    on = (masks > 0).float().reshape(s, h // p, p, w // p, p)
    return on.mean(dim=(2, 4)).reshape(s, -1)


def random_indices(n_images: int, n_tokens: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """[n_images, k] distinct random patch indices per image (seeded): the control for the CLS top-k."""
    fn = "random_indices"
    n_images, n_tokens = check_int(n_images, "n_images", fn), check_int(n_tokens, "n_tokens", fn)
    k = check_int(k, "k", fn, high=n_tokens)
    g = torch.Generator().manual_seed(check_int(seed, "seed", fn, low=0))
    return torch.rand(n_images, n_tokens, generator=g).argsort(dim=1)[:, :k]


@torch.no_grad()
def first_token_logits(vlm, features: torch.Tensor, scene_idx: torch.Tensor, prompt_ids: torch.Tensor,
                       index_sets: Mapping[str, torch.Tensor] | None = None, *, batch_size: int = 100) -> dict:
    """The next-token logits after each prompt, for every branch, from precomputed ``features`` [S, N, Dv]
    (``encoder_scan``): row j reads scene ``scene_idx[j]`` and prompt ``prompt_ids[j]`` (one length, no <pad>).
    Returns {"full": [M, V], name: [M, V] for each index set [S, k] (the branch that sees only those patches)}. The
    answer of a one-word question is decided here: DAMRO and greedy differ only through these."""
    fn = "first_token_logits"
    from vitlab.vlm import TinyVLM

    if not isinstance(vlm, TinyVLM):
        raise TypeError(f"{fn}: vlm must be a vitlab.vlm.TinyVLM, got {type(vlm).__name__}")
    check_ndim(features, 3, "features", fn), check_ndim(prompt_ids, 2, "prompt_ids", fn)
    if not torch.is_tensor(scene_idx) or scene_idx.shape != (len(prompt_ids),) or scene_idx.dtype != torch.long:
        raise ValueError(f"{fn}: scene_idx must be int64 [M={len(prompt_ids)}], got "
                         f"{tuple(scene_idx.shape) if torch.is_tensor(scene_idx) else type(scene_idx).__name__}")
    if len(scene_idx) and (scene_idx.min() < 0 or scene_idx.max() >= len(features)):
        raise ValueError(f"{fn}: scene_idx must lie in 0..{len(features) - 1}")
    if prompt_ids.dtype != torch.long or (prompt_ids == vlm.pad_id).any():
        raise ValueError(f"{fn}: prompt_ids must be int64 token ids of one length, without <pad>")
    index_sets = dict(index_sets or {})
    for name, idx in index_sets.items():
        if name == "full" or not torch.is_tensor(idx) or idx.ndim != 2 or len(idx) != len(features):
            raise ValueError(f"{fn}: index_sets[{name!r}] must be a [S={len(features)}, k] index tensor (not named "
                             f"'full')")
    batch_size = check_int(batch_size, "batch_size", fn)
    dev = next(vlm.parameters()).device
    out = {name: [] for name in ["full", *index_sets]}
    for i in range(0, len(prompt_ids), batch_size):
        sc, ids = scene_idx[i:i + batch_size], prompt_ids[i:i + batch_size].to(dev)
        f = features[sc].to(dev)
        out["full"].append(vlm.lm(ids, prefix_embeds=vlm.projector(f))[:, -1].float().cpu())
        for name, idx in index_sets.items():
            sub = gather_tokens(f, idx[sc].to(dev))
            out[name].append(vlm.lm(ids, prefix_embeds=vlm.projector(sub))[:, -1].float().cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def answer_probs(logits_full: torch.Tensor, logits_outlier: torch.Tensor | None = None, *, alpha: float | None = None,
                 beta: float = BETA, mode: str = "greedy") -> torch.Tensor:
    """[M, V] probabilities of each first answer token: regular decoding (``alpha=None``: argmax or softmax of
    l_full) or DAMRO (``contrastive_logits`` with ``alpha``, ``beta``). ``mode`` "greedy" gives one-hot rows (the
    argmax), "sample" the softmax the official sampler draws from."""
    fn = "answer_probs"
    check_choice(mode, MODES, "mode", fn)
    check_ndim(logits_full, 2, "logits_full", fn)
    if alpha is None:
        logits = logits_full
    else:
        if logits_outlier is None:
            raise ValueError(f"{fn}: alpha={alpha} needs logits_outlier (DAMRO contrasts the two branches)")
        logits = contrastive_logits(logits_full, logits_outlier, alpha, beta)
    if mode == "sample":
        return logits.float().softmax(-1)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()


def pope_metrics(p_yes, p_no, truth) -> dict:
    """POPE's figures as ``eval_pope.py`` counts them, from per-question probabilities (or 0/1 decisions) that the
    answer is "yes" (``p_yes``) and "no" (``p_no``), and ``truth`` (True where the object is there). A question whose
    answer is neither counts as a miss: a false negative if the object is there, else a false positive (a yes-answer).
    Returns tp, fp, tn, fn (expected counts), accuracy, precision (0 if no yes-answers), recall, f1, yes_ratio."""
    fn = "pope_metrics"
    y, n, t = (torch.as_tensor(v) for v in (p_yes, p_no, truth))
    if y.ndim != 1 or y.shape != n.shape or y.shape != t.shape or not len(y):
        raise ValueError(f"{fn}: p_yes, p_no and truth must be 1-D of one non-zero length, got {tuple(y.shape)}, "
                         f"{tuple(n.shape)}, {tuple(t.shape)}")
    if t.dtype != torch.bool:
        raise TypeError(f"{fn}: truth must be bool (True: the object is there), got {t.dtype}")
    y, n = y.double(), n.double()
    if ((y < 0) | (n < 0) | (y + n > 1 + 1e-6)).any():
        raise ValueError(f"{fn}: p_yes and p_no must be probabilities (>= 0, p_yes + p_no <= 1)")
    tp, fn_ = float(y[t].sum()), float((1 - y[t]).sum())
    tn, fp = float(n[~t].sum()), float((1 - n[~t]).sum())
    total = len(t)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn_) if tp + fn_ > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn_, "accuracy": (tp + tn) / total, "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / total}


def probe_run(vlm, data, *, topks: Sequence[int] = TOPKS, layer: int = LAYER, question_kinds: Sequence[str] = ("colour",),
              batch_size: int = 100, seed: int = 0, progress: bool = False) -> dict:
    """Everything the lesson measures on one VLM and a ``caption_scenes`` set, in one encoder pass: ``encoder_scan``'s
    tensors plus "outlier_idx" {k: [S, k]} and "random_idx" {k: [S, k]} (seeded), and for the POPE probes
    ("probes") and the questions of ``question_kinds`` ("questions") the first-token logits of the full branch and of
    each index set ("top<k>", "rand<k>"), with "scene", "answer" (token ids), "kind" and "question" per row."""
    from vitlab.vlm import WordTokenizer

    fn = "probe_run"
    _check_vlm(vlm, fn)
    if isinstance(topks, (str, bytes)) or not isinstance(topks, Sequence) or not topks:
        raise TypeError(f"{fn}: topks must be a non-empty sequence of ints, got {topks!r}")
    n_tok = vlm.vision_encoder.patch_embed.num_patches
    topks = [check_int(k, "topks[i]", fn, high=n_tok) for k in topks]
    if isinstance(question_kinds, str):
        raise TypeError(f"{fn}: question_kinds must be a sequence of question kinds, got {question_kinds!r}")
    res = encoder_scan(vlm, data.images, layer=layer, batch_size=batch_size, progress=progress)
    S, N = res["cls_attn"].shape
    res["outlier_idx"] = {k: outlier_indices(res["cls_attn"], k) for k in topks}
    res["random_idx"] = {k: random_indices(S, N, k, seed=seed) for k in topks}
    sets = {**{f"top{k}": v for k, v in res["outlier_idx"].items()},
            **{f"rand{k}": v for k, v in res["random_idx"].items()}}
    tok = WordTokenizer()
    for key, items in (("probes", data.items(source="probes")),
                       ("questions", data.items(tuple(question_kinds)) if question_kinds else [])):
        if not items:
            res[key] = None
            continue
        rows = {"scene": torch.tensor([i for i, _ in items]), "answer": torch.tensor([tok.stoi[q.answer] for _, q in items]),
                "kind": [q.kind for _, q in items], "question": [q.question for _, q in items]}
        by_len = {}
        for j, (_, q) in enumerate(items):
            by_len.setdefault(len(tok.encode(q.question)), []).append(j)
        logits = {}
        for length, js in by_len.items():  # one prompt length per batch (no <pad> inside a prompt)
            js_t = torch.tensor(js)
            ids = torch.tensor([tok.encode(items[j][1].question) for j in js])
            part = first_token_logits(vlm, res["features"], rows["scene"][js_t], ids, sets, batch_size=batch_size)
            for name, val in part.items():
                logits.setdefault(name, torch.empty(len(items), val.shape[1]))[js_t] = val
        res[key] = {**rows, "logits": logits}
    return res
