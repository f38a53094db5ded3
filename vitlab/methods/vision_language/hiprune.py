"""HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models (J. Liu et al.
2025, arXiv:2508.00553; official code: Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``: the selection), ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py``
(the CLIP tower returns every layer's attention), ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (the same selection on a
general grid width)); our own code, on a trained ``vitlab.vlm.TinyVLM``.

A VLM hands its LM every patch token of the image; HiPrune keeps a budget of N' of them, chosen from the attention
*inside the vision encoder*, with no training. With a_l[j] the attention token j receives in layer l (the softmax
averaged over heads and over query rows, prefix columns dropped):

    anchors    A = top-round(N' alpha / 5) tokens of a_obj           (the "object layer", a middle one)
    buffers    B = {j - 1, j + 1, j - w, j + w : j in A}            (w = grid width; official: clamped indices)
    registers  R = top-(N' - |A u B|) tokens of a_deep outside A u B (the layer whose output the LM reads)
    kept       sorted(A u B u R): exactly N' tokens, in raster order

    vlm = zoo.get(U.entry_name("p4", 0), "cpu")                 # a trained TinyVLM (LLaVA-UHD lesson), 64 tokens
    pruned = PrunedVLM(vlm, "hiprune", num_keep=7)               # the LM now reads 7 visual tokens
    feats, scores = attention_scores(vlm.vision_encoder, images)  # [B, 64, D], [B, depth, 64]
    idx = hiprune_select(scores[:, 1], scores[:, -1], 7, grid=(8, 8))   # [B, 7], sorted

Our reading, and every deviation from the official code, named:
- **Attention received.** The official ``all_image_attentions[l].mean(dim=1).mean(dim=1)[:, 1:]``: heads, then query
  rows (CLS row included), then the CLS column dropped. ``attention_scores`` computes the same from each block's
  ``colsum`` side output (``vitlab.models.vit.Attention``: column sums, / N), which on CUDA with kernels comes from
  the Triton attention kernel without an N x N matrix. Our encoders have no CLS token, so nothing is dropped
  (``num_prefix_tokens`` columns are, in general). The Qwen2.5-VL port *sums* over query rows instead (so its "- 1"
  below no longer excludes chosen tokens); we follow the LLaVA code.
- **Budget.** The official ``int(HIPRUNE_RETENTION / B)`` splits a total over the B crops of an image; here
  ``num_keep`` is per image. ``round`` is Python's (half to even), as in the official.
- **Anchors too many for the budget.** When |A u B| > N' the official crashes in ``topk(k < 0)``; we raise a
  ValueError naming ``alpha``. When round(N' alpha / 5) = 0 (N' < 25 at the paper's alpha = 0.1) there are no
  anchors and HiPrune *is* the deep-layer top-k: at the paper's budgets (64-192 of 576) this never happens; at
  ours (7 and 21 of 64) it does, which the lesson shows and works around only by naming another alpha.
- **Registers exclude the chosen tokens** by -inf (the official subtracts 1 from attention in [0, 1]: the same
  selection for every attention input, and still right for scores that are not probabilities).
- **Buffers.** ``wrap=True`` (default) is the official 1-D index arithmetic on a grid of width w: j +- 1 runs across
  row ends (the last token of a row buffers the first of the next), and j +- w outside the grid is clamped, so an
  anchor in the first row adds token 0 and one in the last row token N - 1; duplicates are removed. The official
  LLaVA code hard-codes w = 24 and N = 576; ``grid`` generalises it (the Qwen port's ``width``). ``wrap=False`` keeps
  only true 4-neighbours inside the grid.
- **Layers.** ``object_layer`` is 1-indexed like ``HIPRUNE_OBJECT_LAYER`` (9 of CLIP-L's 24). For a ViT of another
  depth ``object_layer_for`` maps it proportionally, floor(9 * depth / 24 + 1/2): 2 of our 4. ``deep_layer`` is a
  Python index like ``mm_vision_select_layer``: the official reads the attention of the layer whose output LLaVA
  hands the LLM (-2); a TinyVLM hands its LM the last block's output, so ours is -1 (as in the Qwen port).
- **Where the mask acts.** The official projects all tokens and then drops the unkept ones; the projector works per
  token, so ``PrunedVLM`` gathers the kept tokens first and projects only those (the same tokens, less work).
- **Positions in the LM.** The LLaVA port re-indexes the kept tokens 0..k-1 and moves the text up behind them
  (harmless under LLaMA's RoPE, which sees relative positions); the Qwen2.5-VL port keeps every token's original
  ``position_ids``. TinyLM has learned *absolute* positions trained on one layout (64 visual tokens, then the
  text), so ``positions="kept"`` (default) follows the Qwen port: each kept token keeps its slot's position and
  the text stays at 64, 65, ... (``KeptPositionLM``); ``positions="contiguous"`` is the LLaVA port (the lesson
  shows what it does to an absolute-position LM).

The lesson (``notebooks/7_vision_language/hiprune.ipynb``) trains nothing: it prunes the three seeds of the
LLaVA-UHD lesson's arm (a), ``U.entry_name("p4", s)`` (course ViT, patch 4 at 32 px: 64 visual tokens, no CLS,
TinyVLM answering colour and size questions). Baselines at the same budget: ``random`` (seeded), ``uniform`` (a
lattice), ``deep_topk`` (top-k by the deep layer's attention: the "CLS attention" pruning of FasterVLM-style methods
needs a CLS token; ours has none, and the attention every token receives in the last layer is the stand-in).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_choice, check_int, check_model, check_ndim, check_number
from vitlab.models.vit import VisionTransformer
from vitlab.tokens import gather_tokens
from vitlab.vlm import CaptionScenes, KVCache, TinyLM, TinyVLM, answer_accuracy

__all__ = ["METHODS", "POSITIONS", "OFFICIAL_ALPHA", "OFFICIAL_OBJECT_LAYER", "OFFICIAL_DEPTH", "OFFICIAL_DEEP_LAYER",
           "DEEP_LAYER", "VARIANT", "BUDGETS", "RETENTIONS", "vlm_entry", "object_layer_for", "anchor_count",
           "attention_scores", "buffer_candidates", "hiprune_select", "topk_select", "random_select", "uniform_select",
           "select", "KeptPositionLM", "add_positions", "PrunedVLM", "encode_scenes", "kept_accuracy",
           "object_coverage", "dispersion", "LMPrefill"]

METHODS = ("hiprune", "deep_topk", "uniform", "random")
POSITIONS = ("kept", "contiguous")
OFFICIAL_ALPHA = 0.1  # HIPRUNE_ALPHA in bench_llava.sh, bench_llava_next.sh, bench_qwen.sh
OFFICIAL_OBJECT_LAYER, OFFICIAL_DEPTH = 9, 24  # HIPRUNE_OBJECT_LAYER (1-indexed) of CLIP ViT-L/14's 24 layers
OFFICIAL_DEEP_LAYER = -2  # LLaVA-1.5's mm_vision_select_layer
DEEP_LAYER = -1  # a TinyVLM's LM reads the last block's output

# The lesson: the LLaVA-UHD lesson's arm (a), 3 seeds; budgets of its 64 tokens
VARIANT = "p4"
BUDGETS = (4, 7, 11, 16, 21, 32, 48, 64)
RETENTIONS = {"33 %": 21, "11 %": 7}  # the paper's 192 / 576 and 64 / 576, on 64 tokens


def vlm_entry(seed: int) -> str:
    """The zoo entry of the VLM the lesson prunes: the LLaVA-UHD lesson's ``p4`` fine-tune of ``seed``."""
    from vitlab.methods.vision_language import llava_uhd_v3 as U

    return U.entry_name(VARIANT, seed)


def object_layer_for(depth: int, official_layer: int = OFFICIAL_OBJECT_LAYER,
                     official_depth: int = OFFICIAL_DEPTH) -> int:
    """The 1-indexed object layer of a ViT with ``depth`` blocks: ``official_layer`` of ``official_depth`` scaled
    proportionally and rounded half up, floor(layer * depth / official_depth + 1/2), at least 1 (9 of 24 -> 2 of 4)."""
    fn = "object_layer_for"
    depth = check_int(depth, "depth", fn)
    official_depth = check_int(official_depth, "official_depth", fn)
    official_layer = check_int(official_layer, "official_layer", fn, high=official_depth)
    return max(1, min(depth, math.floor(official_layer * depth / official_depth + 0.5)))


def anchor_count(num_keep: int, alpha: float = OFFICIAL_ALPHA) -> int:
    """round(num_keep * alpha / 5): the official ``shallow_token_num`` (Python's round, half to even)."""
    num_keep = check_int(num_keep, "num_keep", "anchor_count")
    alpha = check_number(alpha, "alpha", "anchor_count", low=0)
    return round(num_keep * alpha / 5)


# ------------------------------------------------------------------------------------------ attention capture
def _check_vit(vit, fn: str) -> VisionTransformer:
    check_model(vit, fn)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{fn}: vit must be a vitlab VisionTransformer, got {type(vit).__name__}")
    if getattr(vit, "merge_after", ()):
        raise ValueError(f"{fn}: vit merges tokens between blocks (merge_after={vit.merge_after}); the layers' "
                         f"attentions would live on different grids")
    return vit


@torch.no_grad()
def attention_scores(vit: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``vit``: its output tokens [B, N, D] (``forward_features`` without the prefix tokens: what a
    TinyVLM's projector reads) and, per block, the attention each patch token receives [B, depth, N] (softmax
    averaged over heads and over all query rows; prefix columns dropped: the official score)."""
    fn = "attention_scores"
    vit = _check_vit(vit, fn)
    check_ndim(images, 4, "images", fn)
    prefix = vit.num_prefix_tokens
    x = vit.embed(images)
    scores = []
    for blk in vit.blocks:
        x, side = blk(x, side=("colsum",))
        received = side["colsum"].float().mean(dim=1) / x.shape[1]  # mean over heads, then over query rows
        scores.append(received[:, prefix:])
    return vit.norm(x)[:, prefix:], torch.stack(scores, dim=1)


# ------------------------------------------------------------------------------------------ selection
def _grid(grid, num_tokens: int, fn: str) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"{fn}: grid must be (h, w) ints, got {grid!r}")
    h, w = check_int(grid[0], "grid[0] (h)", fn), check_int(grid[1], "grid[1] (w)", fn)
    if h * w != num_tokens:
        raise ValueError(f"{fn}: grid {h}x{w} holds {h * w} tokens, but the scores have {num_tokens}")
    return h, w


def _check_scores(scores, name: str, fn: str) -> torch.Tensor:
    check_ndim(scores, 2, name, fn)
    if not scores.is_floating_point():
        raise TypeError(f"{fn}: {name} must be floating point, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"{fn}: {name} holds nan")
    return scores


def buffer_candidates(anchors: torch.Tensor, grid, wrap: bool = True) -> torch.Tensor:
    """Anchors [B, k] of an h x w grid and their buffers: [B, 5k] = (j, j - 1, j + 1, j - w, j + w) per anchor.
    ``wrap=True``: the official arithmetic, clamped to [0, N - 1] (+-1 crosses row ends); ``wrap=False``: a
    neighbour outside the grid or in another row is replaced by the anchor itself (so it adds nothing)."""
    fn = "buffer_candidates"
    check_ndim(anchors, 2, "anchors", fn)
    if anchors.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: anchors must hold token indices (int64), got {anchors.dtype}")
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"{fn}: grid must be (h, w) ints, got {grid!r}")
    h, w = check_int(grid[0], "grid[0] (h)", fn), check_int(grid[1], "grid[1] (w)", fn)
    n = h * w
    a = anchors.long()
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= n):
        raise ValueError(f"{fn}: anchors must lie in 0..{n - 1} for grid {h}x{w}, got {int(a.min())}..{int(a.max())}")
    cand = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=1)
    if wrap:
        return cand.clamp(0, n - 1)
    row, col = a // w, a % w
    valid = torch.cat([torch.ones_like(a, dtype=torch.bool), col > 0, col < w - 1, row > 0, row < h - 1], dim=1)
    return torch.where(valid, cand, a.repeat(1, 5))


@torch.no_grad()
def hiprune_select(object_scores: torch.Tensor, deep_scores: torch.Tensor, num_keep: int, grid, *,
                   alpha: float = OFFICIAL_ALPHA, wrap: bool = True, return_kinds: bool = False):
    """HiPrune's kept tokens: indices [B, num_keep], sorted (raster order). ``object_scores`` / ``deep_scores``
    [B, N]: the attention each token receives in the object layer and in the deep layer; ``grid`` (h, w) with
    h * w = N. ``return_kinds``: also a [B, N] int8 map, 0 dropped, 1 anchor, 2 buffer, 3 register."""
    fn = "hiprune_select"
    _check_scores(object_scores, "object_scores", fn)
    _check_scores(deep_scores, "deep_scores", fn)
    if object_scores.shape != deep_scores.shape:
        raise ValueError(f"{fn}: object_scores {tuple(object_scores.shape)} and deep_scores "
                         f"{tuple(deep_scores.shape)} must have one shape [B, N]")
    B, N = deep_scores.shape
    grid = _grid(grid, N, fn)
    num_keep = check_int(num_keep, "num_keep", fn, high=N)
    k = anchor_count(num_keep, alpha)
    if k > N:
        raise ValueError(f"{fn}: alpha={alpha} asks for {k} anchors among {N} tokens")
    anchors = object_scores.topk(k, dim=1).indices  # [B, k]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=deep_scores.device)
    chosen.scatter_(1, buffer_candidates(anchors, grid, wrap), True)  # anchors and buffers, de-duplicated
    n_chosen = chosen.sum(dim=1)
    if int(n_chosen.max()) > num_keep:
        raise ValueError(f"{fn}: alpha={alpha} gives {k} anchors whose anchors and buffers ({int(n_chosen.max())} "
                         f"tokens) exceed num_keep={num_keep}; lower alpha")
    # registers: the (num_keep - |A u B|) highest deep scores outside A u B
    deep = deep_scores.float().masked_fill(chosen, -math.inf)
    order = deep.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    registers = (rank < (num_keep - n_chosen)[:, None]) & ~chosen
    keep = chosen | registers
    idx = keep.nonzero()[:, 1].view(B, num_keep)  # nonzero walks each row in order: sorted
    if not return_kinds:
        return idx
    kinds = torch.zeros(B, N, dtype=torch.int8, device=idx.device)
    kinds[registers] = 3
    kinds[chosen] = 2
    kinds.scatter_(1, anchors, 1)
    return idx, kinds


def topk_select(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """The ``num_keep`` highest scores per row [B, N] -> indices [B, num_keep], sorted (raster order)."""
    _check_scores(scores, "scores", "topk_select")
    num_keep = check_int(num_keep, "num_keep", "topk_select", high=scores.shape[1])
    return scores.topk(num_keep, dim=1).indices.sort(dim=1).values


def random_select(batch: int, num_tokens: int, num_keep: int, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """``num_keep`` of ``num_tokens`` drawn uniformly without replacement, independently per image: [batch,
    num_keep], sorted. ``generator`` makes the draw reproducible."""
    fn = "random_select"
    batch, num_tokens = check_int(batch, "batch", fn), check_int(num_tokens, "num_tokens", fn)
    num_keep = check_int(num_keep, "num_keep", fn, high=num_tokens)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
    return torch.rand(batch, num_tokens, generator=generator).topk(num_keep, dim=1).indices.sort(dim=1).values


def uniform_select(grid, num_keep: int) -> torch.Tensor:
    """A fixed lattice of ``num_keep`` tokens [num_keep], sorted: the cell centres of a gh x gw lattice over the
    h x w grid (gh = ceil(sqrt(num_keep)), gw = ceil(num_keep / gh)), thinned evenly in raster order to num_keep.
    num_keep = 16 on 8 x 8 is every other row and column; num_keep = h * w is every token."""
    fn = "uniform_select"
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"{fn}: grid must be (h, w) ints, got {grid!r}")
    h, w = check_int(grid[0], "grid[0] (h)", fn), check_int(grid[1], "grid[1] (w)", fn)
    num_keep = check_int(num_keep, "num_keep", fn, high=h * w)
    gh = min(h, math.ceil(math.sqrt(num_keep)))
    gw = min(w, math.ceil(num_keep / gh))
    gh = math.ceil(num_keep / gw)  # a grid narrower than the lattice: more lattice rows
    rows = ((torch.arange(gh) + 0.5) * h / gh).long()
    cols = ((torch.arange(gw) + 0.5) * w / gw).long()
    lattice = (rows[:, None] * w + cols[None, :]).flatten()
    pick = torch.linspace(0, len(lattice) - 1, num_keep).round().long()
    return lattice[pick].sort().values


def select(method: str, scores: torch.Tensor, num_keep: int, grid, *, object_layer: int | None = None,
           deep_layer: int = DEEP_LAYER, alpha: float = OFFICIAL_ALPHA, wrap: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Kept indices [B, num_keep] (sorted) by ``method`` from per-layer scores [B, depth, N] (``attention_scores``):
    "hiprune" (object layer 1-indexed, default ``object_layer_for(depth)``; ``deep_layer`` a Python index),
    "deep_topk" (top-k of the deep layer), "uniform" (a lattice), "random" (``generator``)."""
    fn = "select"
    check_choice(method, METHODS, "method", fn)
    check_ndim(scores, 3, "scores", fn)
    B, depth, N = scores.shape
    deep_layer = check_int(deep_layer, "deep_layer", fn, low=-depth, high=depth - 1)
    if method == "hiprune":
        ol = object_layer_for(depth) if object_layer is None else check_int(object_layer, "object_layer", fn,
                                                                            high=depth)
        return hiprune_select(scores[:, ol - 1], scores[:, deep_layer], num_keep, grid, alpha=alpha, wrap=wrap)
    if method == "deep_topk":
        return topk_select(scores[:, deep_layer], num_keep)
    if method == "uniform":
        return uniform_select(_grid(grid, N, fn), num_keep).to(scores.device).expand(B, -1)
    return random_select(B, N, num_keep, generator).to(scores.device)


# ------------------------------------------------------------------------------------------ the pruned VLM
class KeptPositionLM(TinyLM):
    """A trained ``TinyLM`` (its modules shared, not copied) that reads pruned visual tokens at the positions they
    had before pruning. The visual tokens arrive with their position embeddings added (``add_positions``: kept
    token j gets row j of ``pos_emb``); the text keeps its trained positions N, N + 1, ... after the N visual
    slots, also while generating (the cache remembers how many visual tokens it holds). The Qwen2.5-VL port of
    HiPrune likewise keeps the kept tokens' original ``position_ids``; re-indexing them 0..k-1 (the LLaVA port,
    harmless under RoPE's relative positions) moves every text token of an LM with learned absolute positions to a
    place it never saw in training."""

    def __init__(self, lm: TinyLM, num_visual: int):
        nn.Module.__init__(self)  # no weights of its own
        fn = "KeptPositionLM"
        if not isinstance(lm, TinyLM):
            raise TypeError(f"{fn}: lm must be a vitlab.vlm.TinyLM, got {type(lm).__name__}")
        self.num_visual = check_int(num_visual, "num_visual", fn, high=lm.max_len - 1)
        self.vocab_size, self.dim, self.max_len = lm.vocab_size, lm.dim, lm.max_len
        self.tok_emb, self.pos_emb, self.blocks, self.norm, self.head = lm.tok_emb, lm.pos_emb, lm.blocks, lm.norm, \
            lm.head

    def forward(self, input_ids: torch.Tensor | None = None, *, prefix_embeds: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        fn = "KeptPositionLM"
        start = len(kv_cache) if kv_cache is not None else 0
        parts = []
        if prefix_embeds is not None:  # position embeddings already added (add_positions)
            self.check_prefix(prefix_embeds)
            if start:
                raise ValueError(f"{fn}: prefix_embeds must come first (nothing cached), got them after {start} "
                                 f"cached tokens")
            parts.append(prefix_embeds)
            if kv_cache is not None:
                kv_cache.visual_tokens = prefix_embeds.shape[1]
            text_at = self.num_visual
        else:
            seen = getattr(kv_cache, "visual_tokens", None)
            if seen is None:
                raise ValueError(f"{fn}: text comes after the visual tokens: give prefix_embeds, or a kv_cache "
                                 f"filled with them")
            text_at = self.num_visual + start - seen
        if input_ids is not None:
            text = self.embed_ids(input_ids)
            if text_at + text.shape[1] > self.max_len:
                raise ValueError(f"{fn}: text at positions {text_at}.. of {text.shape[1]} tokens exceeds "
                                 f"max_len={self.max_len}")
            parts.append(text + self.pos_emb[:, text_at:text_at + text.shape[1]])
        if not parts:
            raise ValueError(f"{fn}: give input_ids, prefix_embeds or both")
        return self.decode(torch.cat(parts, dim=1), kv_cache)

    def extra_repr(self) -> str:
        return f"text at positions {self.num_visual}+, visual tokens at their own"


def add_positions(lm: TinyLM, visual: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Kept visual tokens [B, k, D] plus the position embeddings of the slots they came from (idx [B, k]): what
    ``KeptPositionLM`` reads."""
    return visual + lm.pos_emb[0][idx.to(lm.pos_emb.device)]


def _check_vlm(vlm, fn: str) -> TinyVLM:
    if not isinstance(vlm, TinyVLM):
        raise TypeError(f"{fn}: vlm must be a vitlab.vlm.TinyVLM, got {type(vlm).__name__}")
    _check_vit(vlm.vision_encoder, fn)
    if vlm.use_cls:
        raise ValueError(f"{fn}: vlm.use_cls must be False (HiPrune selects among the patch tokens)")
    return vlm


class PrunedVLM(TinyVLM):
    """A trained TinyVLM whose LM reads only ``num_keep`` of the visual tokens, chosen by ``method`` (``select``)
    from the encoder's own attention in the same forward. Shares (does not copy) ``vlm``'s modules: training-free.
    With ``num_keep`` = all tokens it is the unpruned VLM (every method keeps every token, in order). ``positions``:
    "kept" (default) the LM reads each kept token at its original position and the text where it was trained
    (``KeptPositionLM``); "contiguous" re-indexes the kept tokens 0..k-1 and moves the text up (the LLaVA port).
    ``seed`` seeds the "random" method's generator."""

    def __init__(self, vlm: TinyVLM, method: str = "hiprune", num_keep: int = 7, *, object_layer: int | None = None,
                 deep_layer: int = DEEP_LAYER, alpha: float = OFFICIAL_ALPHA, wrap: bool = True,
                 positions: str = "kept", seed: int = 0):
        fn = "PrunedVLM"
        _check_vlm(vlm, fn)
        vit = vlm.vision_encoder
        n = vit.patch_embed.num_patches
        check_choice(positions, POSITIONS, "positions", fn)
        lm = KeptPositionLM(vlm.lm, n) if positions == "kept" else vlm.lm
        super().__init__(vit, vlm.projector, lm, pad_id=vlm.pad_id, eos_id=vlm.eos_id)
        self.positions = positions
        depth = len(vit.blocks)
        self.method = check_choice(method, METHODS, "method", fn)
        self.num_keep = check_int(num_keep, "num_keep", fn, high=n)
        self.object_layer = object_layer_for(depth) if object_layer is None else check_int(
            object_layer, "object_layer", fn, high=depth)
        self.deep_layer = check_int(deep_layer, "deep_layer", fn, low=-depth, high=depth - 1)
        self.alpha = check_number(alpha, "alpha", fn, low=0)
        self.wrap = bool(wrap)
        self.generator = torch.Generator().manual_seed(check_int(seed, "seed", fn, low=0))

    def select_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's tokens [B, N, D], kept indices [B, num_keep]) from one encoder forward."""
        feats, scores = attention_scores(self.vision_encoder, images)
        idx = select(self.method, scores, self.num_keep, self.vision_encoder.grid_size,
                     object_layer=self.object_layer, deep_layer=self.deep_layer, alpha=self.alpha,
                     wrap=self.wrap, generator=self.generator)
        return feats, idx

    def visual_prefix(self, images: torch.Tensor) -> torch.Tensor:
        feats, idx = self.select_tokens(images)
        visual = self.projector(gather_tokens(feats, idx))  # the projector is per token: gather first
        return add_positions(self.lm, visual, idx) if self.positions == "kept" else visual

    def extra_repr(self) -> str:
        extra = f", alpha={self.alpha}, object_layer={self.object_layer}, deep_layer={self.deep_layer}" \
            if self.method == "hiprune" else ""
        return f"method={self.method}, num_keep={self.num_keep}{extra}, positions={self.positions}"


# ------------------------------------------------------------------------------------------ measuring many budgets
@torch.no_grad()
def encode_scenes(vlm, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Once per VLM: every image's projected visual tokens [S, N, lm.dim] and per-layer scores [S, depth, N], so
    that many budgets and methods cost only the LM (``kept_accuracy``)."""
    fn = "encode_scenes"
    vlm = _check_vlm(vlm, fn)
    check_ndim(images, 4, "images", fn)
    batch_size = check_int(batch_size, "batch_size", fn)
    was = vlm.training
    vlm.eval()
    device = next(vlm.parameters()).device
    tokens, scores = [], []
    for i in range(0, len(images), batch_size):
        feats, s = attention_scores(vlm.vision_encoder, images[i:i + batch_size].to(device))
        tokens.append(vlm.projector(feats).cpu())
        scores.append(s.cpu())
    vlm.train(was)
    return torch.cat(tokens), torch.cat(scores)


class _GivenTokens(nn.Module):
    """A stand-in vision encoder for ``kept_accuracy``: its "images" are visual tokens [B, 1, k, D] already."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


@torch.no_grad()
def kept_accuracy(vlm, data, tokens: torch.Tensor, idx: torch.Tensor, *, kinds=None, per_kind: bool = False,
                  positions: str = "kept"):
    """Greedy answer accuracy of ``vlm``'s LM on ``data``'s questions when scene s shows it only the visual tokens
    ``tokens[s, idx[s]]`` (``encode_scenes``' tokens; idx [S, k]; ``positions`` as in ``PrunedVLM``):
    ``vitlab.vlm.answer_accuracy`` itself, through a TinyVLM whose encoder hands over the kept tokens and whose
    projector is the identity. The same answers as ``PrunedVLM`` with those indices, without re-running the ViT."""
    fn = "kept_accuracy"
    vlm = _check_vlm(vlm, fn)
    if not isinstance(data, CaptionScenes):
        raise TypeError(f"{fn}: data must be CaptionScenes, got {type(data).__name__}")
    check_ndim(tokens, 3, "tokens", fn)
    if tokens.shape[0] != len(data) or tokens.shape[-1] != vlm.lm.dim:
        raise ValueError(f"{fn}: tokens must be [{len(data)} scenes, N, {vlm.lm.dim}], got {tuple(tokens.shape)}")
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.shape[0] != len(data):
        raise ValueError(f"{fn}: idx must be [{len(data)} scenes, k], got {getattr(idx, 'shape', type(idx).__name__)}")
    check_choice(positions, POSITIONS, "positions", fn)
    prefix = gather_tokens(tokens, idx.to(tokens.device))
    lm = vlm.lm
    if positions == "kept":
        lm = KeptPositionLM(vlm.lm, tokens.shape[1])
        prefix = add_positions(lm, prefix, idx)
    reader = TinyVLM(_GivenTokens(), nn.Identity(), lm, pad_id=vlm.pad_id, eos_id=vlm.eos_id)
    scenes = dataclasses.replace(data, images=prefix[:, None])
    return answer_accuracy(reader, scenes, kinds=kinds, per_kind=per_kind)


def object_coverage(masks: torch.Tensor, idx: torch.Tensor, patch_size: int) -> dict:
    """Where kept tokens fall, from the scenes' object masks [S, H, W] (0 background, k object k) and kept indices
    [S, k] of the (H/p) x (W/p) patch grid: ``on_object``, the share of kept tokens whose patch holds an object pixel;
    ``base_rate``, the share of all tokens that do (what random keeping gets on average); ``objects_hit``, the share
    of the scenes' objects that at least one kept token touches."""
    fn = "object_coverage"
    check_ndim(masks, 3, "masks", fn)
    p = check_int(patch_size, "patch_size", fn)
    S, H, W = masks.shape
    if H % p or W % p:
        raise ValueError(f"{fn}: patch_size={p} must divide the masks' {H}x{W}")
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.shape[0] != S:
        raise ValueError(f"{fn}: idx must be [{S} scenes, k], got {getattr(idx, 'shape', type(idx).__name__)}")
    ids = masks.long()
    n_obj = int(ids.max()) if ids.numel() else 0
    onehot = F.one_hot(ids, n_obj + 1)[..., 1:].permute(0, 3, 1, 2).float()  # [S, K, H, W]
    touch = F.max_pool2d(onehot, p).flatten(2).transpose(1, 2) > 0  # [S, N, K]: patch n touches object k
    kept = gather_tokens(touch, idx.long())  # [S, k, K]
    exists = onehot.flatten(2).amax(dim=2) > 0  # [S, K]
    hit = kept.any(dim=1) & exists
    return {"on_object": float(kept.any(dim=2).float().mean()), "base_rate": float(touch.any(dim=2).float().mean()),
            "objects_hit": float(hit.sum() / exists.sum().clamp(min=1))}


def dispersion(idx: torch.Tensor, grid) -> float:
    """The paper's dispersion of high-attention tokens: the mean Euclidean distance (in patches) between the kept
    tokens' grid cells, over the pairs of each image, averaged over images. idx [B, k] (k >= 2) on an h x w grid.
    Object-centric selections are compact (small), "global" ones spread out (random keeping gives the baseline)."""
    fn = "dispersion"
    if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.shape[1] < 2:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"{fn}: idx must be [B, k >= 2] token indices, got {shape}")
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise TypeError(f"{fn}: grid must be (h, w) ints, got {grid!r}")
    h, w = check_int(grid[0], "grid[0] (h)", fn), check_int(grid[1], "grid[1] (w)", fn)
    if int(idx.min()) < 0 or int(idx.max()) >= h * w:
        raise ValueError(f"{fn}: idx must lie in 0..{h * w - 1} for grid {h}x{w}")
    pos = torch.stack([idx // w, idx % w], dim=-1).float()  # [B, k, 2]
    d = torch.cdist(pos, pos)  # [B, k, k]
    k = idx.shape[1]
    return float(d.sum(dim=(1, 2)).div(k * (k - 1)).mean())


class LMPrefill(nn.Module):
    """The LM's prefill over [visual tokens; prompt] -> next-token logits [B, V]: what pruning makes cheaper, for
    ``vitlab.measure.macs`` / ``latency`` with inputs (visual tokens [B, k, D], prompt ids [B, T])."""

    def __init__(self, lm):
        super().__init__()
        if not isinstance(lm, TinyLM):
            raise TypeError(f"LMPrefill: lm must be a vitlab.vlm.TinyLM, got {type(lm).__name__}")
        self.lm = lm

    def forward(self, visual: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(prompt_ids, prefix_embeds=visual)[:, -1]
