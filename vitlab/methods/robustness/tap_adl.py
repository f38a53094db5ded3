"""Robustifying Token Attention for Vision Transformers (Y. Guo, D. Stutz, B. Schiele, ICCV 2023, arXiv:2303.11126;
official code: guoyongcs/TAPADL, ``TAPADL_RVT/tap_robust_models.py``: ``DilationPredictor``, ``DilatedAvgPooling``,
the TAP ``Block``; ``TAPADL_RVT/engine.py``: ``AttentionDiversificationLoss`` and the training loss;
``TAPADL_RVT/main.py``: ``--num-scales 4 --threshold 2 --adloss 1``).

The paper's diagnosis: a ViT's attention over-focuses. Many query tokens attend to the same few key tokens, so a
corruption of those few patches moves every token's output ("token overfocusing"). Two remedies, usable apart:

**TAP** (token-aware average pooling), in every block, before the attention. On the H x W grid of tokens build K
pooled versions, pool_0 = identity and pool_k (k >= 1) = the mean over the 3 x 3 neighbourhood at dilation k (the
token itself and its 8 neighbours k cells away; zero padding, always divided by 9). A small predictor chooses, per
token, how much of each to take:

    w = softmax_K( conv3x3(K->K)( BN( conv3x3(C->K)(x) ) ) )         [B, K, H, W], no conv biases
    x_tap = sum_k w_k * pool_k(x)                                     [B, C, H, W]
    x = x + Attn(LN1(x_tap))            (the residual adds onto the ORIGINAL x)
    x = x + MLP(LN2(x))                 (unchanged)

so a token can widen its receptive field when its own patch is unreliable, and its key / value / query then
summarise a neighbourhood instead of one patch.

**ADL** (attention diversification loss), on every block's attention. M = the head-mean softmax [B, N, N] (row i:
how query i spreads its attention), m = the mean of M over the query rows [B, 1, N] (the "average" attention
vector); entries at or below threshold / N are set to zero in both; then

    ADL = mean over layers, batch and query rows of cos(M_i, m),      loss = CE + weight * ADL

Lowering it makes the tokens attend to different key sets. Near-uniform attention (every entry ~ 1/N < 2/N) is
zeroed entirely: ADL is 0 there, with no gradient; it acts only once attention concentrates on a few keys.

    vit = tap_adl_vit(tap=True, num_scales=4, **recipes.BASELINE, img_size=28, in_chans=1, num_classes=10)
    logits, sides = vit(images, side=("probs",))
    adl = attention_diversification_loss([s["probs"] for s in sides], threshold=2.0, num_prefix_tokens=1)
    history = vitlab.train.fit(vit, train, val, step_fn=adl_step(weight=1.0), **recipes.train_kwargs())
    model, info = zoo.get(entry_name("tap_adl", seed), return_info=True)   # the zoo entries (below)

Zoo entries (``_register``; trained by chapter 1's recipe exactly as ``recipes.register`` trains ``ch1_vit``: the
same 2,000 digits, ``fit=recipes.TRAIN``, ``recipes.STEPS["cpu"]`` steps, data seed, seeds 0, 1, 2; smoke loads the
cpu checkpoint). The control is chapter 1's plain ViT, ``ch1_vit_digits_s<seed>``:

    ch6_tapadl_tap_digits_s<seed>      model "ch6_tapadl_tap" (TAP in every block), plain label-smoothed CE
    ch6_tapadl_adl_digits_s<seed>      model "ch1_vit" (the control's architecture), CE + 1.0 ADL
    ch6_tapadl_tap_adl_digits_s<seed>  model "ch6_tapadl_tap", CE + 1.0 ADL

How a zoo entry trains with CE + ADL: the zoo's only way to give ``fit`` a ``step_fn`` is a registered objective
(``zoo.register_objective``), so this module registers the objective ``"adl"`` (``adl_objective``: ``adl_step``'s
CE + weight ADL). It is a classifying objective (``zoo.Objective(classifies=True)``): the zoo scores it on val every
epoch, so every entry, like the control, stores train / val / test accuracy, its val curve and ``plateau_gain``,
plus ``test_adl``. The "tap" entries take the zoo's plain classification route. With the same seed, the ViT part of a TAP
model starts from the same weights as the control's (the TAP modules are created after it).

Our reading, and every deviation from the official code, named:
- The CLS token. The official RVT has none (global average pooling); TAPADL_FAN adds its CLS token only after the
  TAP blocks, in class-attention blocks. So in both, TAP and ADL see patch tokens only. Our ViT has the CLS token
  first: TAP pools the patch tokens only and passes the prefix (CLS) tokens through unchanged into LN1 and the
  attention, and the predictor sees only the patch grid. ADL (``num_prefix_tokens=1`` in the step) reads the
  patch-to-patch block of the attention (CLS row and column dropped, N = the number of patch tokens in the
  threshold); the rows are not renormalised after dropping the CLS column (the cosine does not care about a row's
  scale; the threshold compares the probabilities themselves).
- The 3 x 3 mean includes the centre token (the official ``nn.Unfold`` window does): on a one-hot grid the dilation-k
  pool puts 1/9 on the token itself and on its 8 neighbours k cells away. Computed here as a depthwise 3 x 3
  convolution with a fixed 1/9 kernel at dilation k (the official unfolds and averages: the same numbers).
- The threshold keeps entries strictly above threshold / N (the official ``>``): entries equal to it are zeroed.
- The mean over layers divides by L; the official divides by L + 1e-6 (a guard for an empty list, relative
  difference 1e-6 / L). An empty list raises here.
- The official squeezes the head mean, which for a batch of one turns [1, N, N] into [N, N] and then averages over
  keys instead of queries; no squeeze here (any batch size).
- The official collects the attention after ``attn_drop`` (dropout); ours is the softmax before it (identical at the
  recipe's attn_drop = 0).
- The official trains the whole forward with AMP off; here the ADL is computed in float32 from the probabilities
  (on the cpu profile nothing runs under autocast, so nothing differs).
- ``DilationPredictor`` returns [B, K, H, W] (the official [B, 1, H, W, K]); its temperature (official argument,
  never set, 1) is left out. Its layers (``proj.0`` conv, ``proj.1`` BN, ``proj.2`` conv) are named as the
  official's, so an official predictor's state dict loads into it.
- ``TAPBlock.forward`` runs ``forward_attn`` then ``forward_mlp``: with ``use_kernels`` its attention and LayerNorms
  still run as kernels, but not the plain Block's fused "residual + LayerNorm".
- Not adopted: RVT's convolutional MLP, its learned attention masks ("plus" models), patch-wise augmentation,
  mixup / CutMix and the ImageNet schedule: the blocks are our ViT's and the training is chapter 1's recipe.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_int, check_number
from vitlab.methods.architectures import recipes as R
from vitlab.models.registry import MODELS, register_model
from vitlab.models.vit import Block, VisionTransformer
from vitlab.train import unwrap

__all__ = ["DilatedAvgPooling", "DilationPredictor", "TokenAwarePooling", "TAPBlock", "tap_adl_vit",
           "attention_diversification_loss", "adl_step", "adl_objective", "VARIANTS", "NUM_SCALES", "THRESHOLD",
           "ADL_WEIGHT", "SEEDS", "model_name", "entry_name", "measure", "MEASURE_KEY"]

NUM_SCALES = 4  # official --num-scales: dilations 0 (identity), 1, 2, 3; on the 7 x 7 digit grid 3 still fits
THRESHOLD = 2.0  # official --threshold: attention above 2 / N (twice the uniform share) counts
ADL_WEIGHT = 1.0  # official --adloss
SEEDS = R.SEEDS
# variant -> (TAP in every block, trained with CE + ADL)
VARIANTS = {"tap": (True, False), "adl": (False, True), "tap_adl": (True, True)}


# ------------------------------------------------------------------------------------------------------ TAP
class DilatedAvgPooling(nn.Module):
    """The mean over a 3 x 3 window with holes: the token and its 8 neighbours ``dilation`` cells away, zero-padded,
    divided by 9. ``dilation=0`` is the identity. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dilation: int):
        super().__init__()
        self.dilation = check_int(dilation, "dilation", "DilatedAvgPooling", low=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.dilation == 0:
            return x
        C = x.shape[1]
        box = x.new_full((C, 1, 3, 3), 1.0 / 9.0)  # one fixed box filter per channel (depthwise)
        return F.conv2d(x, box, padding=self.dilation, dilation=self.dilation, groups=C)

    def extra_repr(self) -> str:
        return f"dilation={self.dilation}"


class DilationPredictor(nn.Module):
    """Per token, softmax weights over the K pooling scales: conv3x3(C->K) -> BN -> conv3x3(K->K) -> softmax over K.
    [B, C, H, W] -> [B, K, H, W] (each token's K weights sum to 1)."""

    def __init__(self, dim: int, num_scales: int):
        super().__init__()
        check_int(dim, "dim", "DilationPredictor", low=1)
        check_int(num_scales, "num_scales", "DilationPredictor", low=1)
        self.proj = nn.Sequential(
            nn.Conv2d(dim, num_scales, 3, padding=1, bias=False),  # [B, K, H, W]
            nn.BatchNorm2d(num_scales),
            nn.Conv2d(num_scales, num_scales, 3, padding=1, bias=False))  # [B, K, H, W] logits

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).softmax(dim=1)


class TokenAwarePooling(nn.Module):
    """TAP on a token grid: ``sum_k w_k(x) * pool_k(x)`` with pool_k the dilation-k mean (k = 0: the token itself)
    and w the ``DilationPredictor``'s weights. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, num_scales: int = NUM_SCALES):
        super().__init__()
        check_int(num_scales, "num_scales", "TokenAwarePooling", low=1)
        self.num_scales = num_scales
        self.token_pools = nn.ModuleList([DilatedAvgPooling(k) for k in range(num_scales)])  # no parameters
        self.dilation_predictor = DilationPredictor(dim, num_scales)

    def weights(self, x: Tensor) -> Tensor:
        """The per-token scale weights [B, K, H, W]: which dilation each token takes (for plots)."""
        return self.dilation_predictor(x)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"TokenAwarePooling: x must be a token grid [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        w = self.weights(x)  # [B, K, H, W]
        pooled = torch.stack([pool(x) for pool in self.token_pools], dim=1)  # [B, K, C, H, W]
        return (pooled * w.unsqueeze(2)).sum(dim=1)  # [B, C, H, W]


def _check_grid(grid, fn: str) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"{fn}: grid must be (H, W), two positive ints, got {grid!r}")
    return check_int(grid[0], "grid[0]", fn, low=1), check_int(grid[1], "grid[1]", fn, low=1)


class TAPBlock(Block):
    """Our ViT ``Block`` with TAP before the attention: x + Attn(LN1(TAP(x))), then x + MLP(LN2(x)). The patch tokens
    (after ``num_prefix_tokens`` CLS / register tokens) form the ``grid`` (H, W) in raster order; the prefix tokens
    are not pooled. Its state dict is a ``Block``'s plus ``tap.dilation_predictor.*``."""

    def __init__(self, dim: int, num_heads: int, *, grid: tuple[int, int], num_prefix_tokens: int = 1,
                 num_scales: int = NUM_SCALES, **block_kwargs):
        super().__init__(dim, num_heads, **block_kwargs)
        self.grid = _check_grid(grid, "TAPBlock")
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", "TAPBlock", low=0)
        self.tap = TokenAwarePooling(dim, num_scales)

    @classmethod
    def from_block(cls, block: Block, *, grid: tuple[int, int], num_prefix_tokens: int = 1,
                   num_scales: int = NUM_SCALES) -> "TAPBlock":
        """A TAPBlock that holds ``block``'s own sub-modules (its weights, dropouts, drop-path rate), plus new TAP."""
        if not isinstance(block, Block):
            raise TypeError(f"TAPBlock.from_block: block must be a vitlab Block, got {type(block).__name__}")
        new = cls(block.norm1.normalized_shape[0], block.attn.num_heads, grid=grid,
                  num_prefix_tokens=num_prefix_tokens, num_scales=num_scales)
        for name, child in block.named_children():
            setattr(new, name, child)
        new.use_kernels = block.use_kernels
        return new

    def pool_tokens(self, x: Tensor) -> Tensor:
        """TAP on the patch tokens of x [B, P + H*W, C]; the P prefix tokens pass through. -> [B, P + H*W, C]."""
        (H, W), P = self.grid, self.num_prefix_tokens
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[1] != P + H * W:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"TAPBlock: x must be tokens [B, {P} + {H}*{W}, C] for grid={self.grid} and "
                             f"num_prefix_tokens={P}, got {got}")
        B, _, C = x.shape
        patches = x[:, P:].transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        pooled = self.tap(patches).flatten(2).transpose(1, 2)  # [B, H*W, C]
        return torch.cat([x[:, :P], pooled], dim=1)

    def forward_attn(self, x: Tensor, attn_bias: Tensor | None = None, side: Sequence[str] = ()):
        a = self.attn(self._norm(self.norm1, self.pool_tokens(x)), attn_bias=attn_bias, side=side)
        a, sides = a if side else (a, None)
        x = x + self.drop_path1(self.ls1(a))  # the residual adds onto the un-pooled tokens
        return (x, sides) if side else x

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, side: Sequence[str] = ()):
        out = self.forward_attn(x, attn_bias=attn_bias, side=side)
        x, sides = out if side else (out, None)
        x = self.forward_mlp(x)
        return (x, sides) if side else x

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens}"


def tap_adl_vit(tap: bool = True, num_scales: int = NUM_SCALES, **vit_kwargs) -> VisionTransformer:
    """``VisionTransformer(**vit_kwargs)`` with every block a ``TAPBlock`` (``tap=True``), or the plain ViT
    (``tap=False``: the ADL-only model). The ViT's weights are created first, exactly as the plain ViT's, so the
    same seed gives the same ViT weights; every timm key is unchanged, TAP adds ``blocks.i.tap.*``."""
    if not isinstance(tap, bool):
        raise TypeError(f"tap_adl_vit: tap must be a bool, got {type(tap).__name__}")
    check_int(num_scales, "num_scales", "tap_adl_vit", low=1)
    vit = VisionTransformer(**vit_kwargs)
    if tap:
        for i, blk in enumerate(vit.blocks):
            vit.blocks[i] = TAPBlock.from_block(blk, grid=vit.grid_size, num_prefix_tokens=vit.num_prefix_tokens,
                                                num_scales=num_scales)
    return vit


# ------------------------------------------------------------------------------------------------------ ADL
def attention_diversification_loss(probs_per_layer: Sequence[Tensor], threshold: float = THRESHOLD, *,
                                   num_prefix_tokens: int = 0) -> Tensor:
    """The ADL: mean over layers, batch and query rows of cos(M_i, m), M the head-mean attention [B, N, N], m its
    mean over query rows, both with entries <= ``threshold`` / N zeroed. ``probs_per_layer``: per block the softmax
    [B, H, N, N] (``VisionTransformer.forward(x, side=("probs",))``); ``num_prefix_tokens`` leading tokens (CLS) are
    dropped from rows and columns first, and N counts the rest. A scalar (float32), differentiable."""
    fn = "attention_diversification_loss"
    threshold = check_number(threshold, "threshold", fn, low=0, low_open=True)
    P = check_int(num_prefix_tokens, "num_prefix_tokens", fn, low=0)
    if isinstance(probs_per_layer, Tensor) or not isinstance(probs_per_layer, (list, tuple)) or not probs_per_layer:
        raise TypeError(f"{fn}: probs_per_layer must be a non-empty list of [B, H, N, N] tensors, got "
                        f"{type(probs_per_layer).__name__}")
    sims = []
    for i, p in enumerate(probs_per_layer):
        if not isinstance(p, Tensor) or p.ndim != 4 or p.shape[-1] != p.shape[-2] or p.shape[-1] <= P:
            raise ValueError(f"{fn}: probs_per_layer[{i}] must be a [B, H, N, N] tensor with N > num_prefix_tokens="
                             f"{P}, got {tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}")
        if p.shape[0] != probs_per_layer[0].shape[0]:
            raise ValueError(f"{fn}: probs_per_layer[{i}] has batch {p.shape[0]}, layer 0 has "
                             f"{probs_per_layer[0].shape[0]}")
        M = p[:, :, P:, P:].float().mean(dim=1)  # [B, N, N] head mean: row i = query i's attention
        cut = threshold / M.shape[-1]
        m = M.mean(dim=1, keepdim=True)  # [B, 1, N] the mean attention vector over the query rows
        M = M * (M > cut)
        m = m * (m > cut)
        sims.append(F.cosine_similarity(m, M, dim=-1).mean())  # [B, N] -> mean over batch and rows
    return torch.stack(sims).mean()


def adl_step(weight: float = ADL_WEIGHT, threshold: float = THRESHOLD,
             label_smoothing: float = R.TRAIN["label_smoothing"]):
    """A ``vitlab.train.fit`` step_fn: label-smoothed cross-entropy + ``weight`` x ADL over every block's attention
    (the CLS token left out, ``attention_diversification_loss``), returning (loss, logits). ``weight=0`` is plain
    cross-entropy on the fast path (no attention matrices)."""
    weight = check_number(weight, "weight", "adl_step", low=0)
    check_number(threshold, "threshold", "adl_step", low=0, low_open=True)
    check_number(label_smoothing, "label_smoothing", "adl_step", low=0, high=1, high_open=True)

    def step_fn(net, images, labels):
        if weight == 0:
            logits = net(images)
            return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits
        logits, sides = net(images, side=("probs",))
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        adl = attention_diversification_loss([s["probs"] for s in sides], threshold,
                                             num_prefix_tokens=unwrap(net).num_prefix_tokens)
        return ce + weight * adl, logits
    return step_fn


@torch.no_grad()
def _mean_adl(model: VisionTransformer, data, threshold: float, batch_size: int = 500) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(data.images), batch_size):
        x = data.images[i:i + batch_size]
        _, sides = model(x, side=("probs",))
        total += attention_diversification_loss([s["probs"] for s in sides], threshold,
                                                num_prefix_tokens=model.num_prefix_tokens).item() * len(x)
    return total / len(data.images)


def adl_objective(weight: float = ADL_WEIGHT, threshold: float = THRESHOLD,
                  label_smoothing: float = R.TRAIN["label_smoothing"]):
    """The zoo objective ``"adl"``: a classifier trained with ``adl_step`` (``classifies``: the zoo scores it on val
    every epoch and stores the accuracies and ``plateau_gain`` as for the control) plus ``test_adl``, the final
    model's ADL on the test images."""
    from vitlab import zoo

    def metrics(model, train, val, test):
        return {"test_adl": _mean_adl(model, test, threshold)}

    return zoo.Objective(step_fn=adl_step(weight, threshold, label_smoothing), metrics=metrics, classifies=True)


MEASURE_KEY = "tapadl-v1"  # zoo.measured's key for ``measure``: change it when ``measure`` changes


def measure(model: VisionTransformer, profile=None) -> dict:
    """What the lesson reads off one trained model, on chapter 1's digit test set: ``clean`` accuracy, ``adl`` (the
    attention diversification loss of its attention, threshold ``THRESHOLD``: how alike the tokens' attention
    vectors are) and ``acc_<kind>_<severity>`` under every ``vitlab.data.corrupt`` kind at severities 1..5. Cached
    per checkpoint by the notebook through ``zoo.measured(name, MEASURE_KEY, measure)``."""
    from vitlab.data import CORRUPTIONS, corrupt
    from vitlab.train import evaluate

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"measure: model must be a course VisionTransformer, got {type(model).__name__}")
    _, _, test = R.data("digits", profile)
    model.eval()
    out = {"clean": evaluate(model, test)["acc"], "adl": _mean_adl(model, test, THRESHOLD)}
    patch = model.patch_embed.patch_size
    for kind in CORRUPTIONS:
        for severity in range(1, 6):
            x = corrupt(test.images, kind, severity, seed=0, patch_size=patch)
            with torch.no_grad():
                pred = torch.cat([model(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])
            out[f"acc_{kind}_{severity}"] = (pred == test.labels).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------- zoo entries
def model_name(variant: str) -> str:
    """The registry model a variant trains: ``ch6_tapadl_tap`` for TAP, chapter 1's ``ch1_vit`` for ADL alone."""
    if variant not in VARIANTS:
        raise ValueError(f"model_name: variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    return "ch6_tapadl_tap" if VARIANTS[variant][0] else R.model_name("vit")


def entry_name(variant: str, seed: int) -> str:
    """The zoo entry ``ch6_tapadl_<variant>_digits_s<seed>`` (the control: ``recipes.entry_name("vit", seed)``)."""
    model_name(variant)
    if isinstance(seed, bool) or seed not in SEEDS:
        raise ValueError(f"entry_name: seed must be one of {SEEDS}, got {seed!r}")
    return f"ch6_tapadl_{variant}_digits_s{seed}"


def _register() -> None:
    from vitlab import zoo

    if "ch6_tapadl_tap" in MODELS:  # re-imported
        return
    zoo.register_objective("adl", adl_objective)
    register_model("ch6_tapadl_tap", tap_adl_vit, tap=True, num_scales=NUM_SCALES, **MODELS[R.model_name("vit")])
    source, kwargs, n_train = R.DATASETS["digits"]
    adl_kwargs = dict(weight=ADL_WEIGHT, threshold=THRESHOLD, label_smoothing=R.TRAIN["label_smoothing"])
    for variant, (_, adl) in VARIANTS.items():
        for seed in SEEDS:
            zoo.register(entry_name(variant, seed), zoo.Recipe(
                model=model_name(variant), data=source, data_kwargs=dict(kwargs), fit=dict(R.TRAIN), seed=seed,
                data_seed=R.DATA_SEED, per_profile={"cpu": dict(steps=R.STEPS["cpu"], max_train=n_train)},
                shares={"smoke": "cpu"}, objective="adl" if adl else None,
                objective_kwargs=dict(adl_kwargs) if adl else {}))


_register()
