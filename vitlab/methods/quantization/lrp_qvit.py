"""LRP-QViT: mixed-precision ViT quantisation by layer-wise relevance propagation (Ranjan & Savakis, 2024,
arXiv:2401.11243), written from the paper's description and from the LRP rules of Chefer et al. (CVPR 2021,
hila-chefer/Transformer-Explainability). The paper has no public code.

Three parts.

1. **Relevance** (Chefer's rules). Start from the target class, R_out = onehot(y), and walk the network
   backwards; every rule keeps the total (the *sum rule* Σ_j R_j = Σ_k R_k):

       Linear   z = xW^T (+b)    R_j = x_j^+ Σ_k W_kj^+ R_k / Z_k + x_j^- Σ_k W_kj^- R_k / Z_k,
                                 Z_k = Σ_j x_j^+ W_kj^+ + x_j^- W_kj^-      (z⁺ = αβ with α=1, β=0; no bias)
       LayerNorm, GELU, softmax  R_in = R_out                                   (identity, as Chefer)
       matmul   z = A B          R_A = A ⊙ ((R/Z) B^T),  R_B = B ⊙ (A^T (R/Z)), each halved (both conserve ΣR)
       residual z = a + b        a ⊙ R/Z and b ⊙ R/Z, rescaled to split ΣR in the ratio |Σa⊙R/Z| : |Σb⊙R/Z|
       branch   (x used twice)   R_x = R_1 + R_2

   Attention: proj (linear) → A·V (matmul: half to the probabilities, half to V) → softmax (identity) → Q·K^T
   (matmul: half to Q, half to K) → qkv (linear). The whole ViT then conserves the total: the relevance that
   reaches the token embeddings sums to 1 per image (``vit_relevance(...)["input_total"]``).

2. **Layer contribution score and bit allocation.** The relevance mass of linear layer l is Σ|R| at its input,
   averaged over calibration images; the contribution score is that mass normalised over the layers,
   c_l = m_l / Σ_j m_j. Bits b_l ∈ ``choices`` are then chosen to meet the parameter-weighted average budget
   *exactly*, Σ_l n_l b_l = B Σ_l n_l (n_l: weights of layer l), while spending the bits where relevance is:

       minimise Σ_l c_l · 4^(-b_l)  subject to  Σ_l n_l b_l = B · Σ_l n_l       (exact, by dynamic programming)

   4^(-b) is how quantisation noise power falls with bits, so a layer's relevance weights its noise. For two
   layers of the same size the more relevant one never gets fewer bits (swapping would lower the objective).

3. **Clipped channel-wise quantisation of post-LayerNorm activations.** The inputs of qkv and fc1 (outputs of
   norm1 / norm2) have a few channels with much wider ranges than the rest (RepQ-ViT's observation). Channel-wise
   quantisation gives each channel its own range; LRP-QViT clips each channel's outliers first: the range of
   channel c is [Q_c(1 - q_c), Q_c(q_c)] (quantiles over the calibration tokens) instead of [min_c, max_c], with
   q_c chosen per channel from ``CLIP_GRID`` (q = 1: no clipping) by least squared error on the calibration
   values (or fixed quantile levels, ``clip=(p_lo, p_hi)``). Step s_c = (hi_c - lo_c) / (2^b - 1), integer zero
   point z_c = clamp(-rint(lo_c / s_c), 0, 2^b - 1).

Usage:

    rel = vit_relevance(model, calib.images, calib.labels)            # per-layer masses, conservation check
    scores = layer_scores(model, calib.images, calib.labels)          # {layer name: c_l}, sums to 1
    params = linear_params(model)                                     # {layer name: n_l}
    bits = allocate_bits(scores, params, budget=4.0, choices=(3, 4, 5, 6))
    qmodel = lrp_qvit(model, calib.images, bits)                       # calibrated fake-quantised copy

Our reading (what the paper gives and what we chose). From the paper: LRP from the target class through all
layers; a per-layer contribution score from the relevance; more bits for higher scores under an average-bit
budget; clipped channel-wise quantisation for post-LayerNorm activations on top of a RepQ-ViT-style PTQ
pipeline. Chosen here (the paper's exact formulas were not available to us): the z⁺ rule and the other rules
exactly as in Chefer's code (including the halving at the two attention matmuls and the renormalised residual
split), the score as Σ|R| at each linear layer's input (absolute values, since relevance can be negative),
the 4^(-b)-weighted allocation solved exactly, the bit-width of a layer applied to its weights and its input
activations alike, the choice sets, per-channel quantile clipping chosen by least squared error, min-max
calibration elsewhere, no post-softmax quantiser, and keeping the patch embedding and the classifier head out of
the allocation (at W8/A8). RepQ-ViT's scale reparameterisation (folding the per-channel factors into the
LayerNorm affine and the next weights, so that inference needs only a per-tensor activation quantiser) is not
included: we keep the channel-wise activation quantiser, which has the same activation grid; the folded version
would quantise the rescaled weights instead of the original ones.
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["safe_divide", "lrp_linear", "lrp_matmul", "lrp_residual", "lrp_linear_stack", "vit_relevance",
           "layer_scores", "linear_params", "average_bits", "allocate_bits", "allocate_bits_by_cost",
           "random_scores", "depth_prior_scores",
           "clipped_channel_params", "channel_quant_mse", "post_ln_inputs", "lrp_qvit", "CLIP_GRID", "POST_LN"]


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _tensor(x, name: str, fn: str, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _vit(model, fn: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module (a vitlab/timm VisionTransformer), got "
                        f"{type(model).__name__}")
    for attr in ("blocks", "head", "norm", "embed"):
        if not hasattr(model, attr):
            raise TypeError(f"{fn}: model has no .{attr}; expected a vitlab VisionTransformer")
    if getattr(model, "global_pool", "token") != "token":
        raise ValueError(f"{fn}: model.global_pool is {model.global_pool!r}; this LRP walks the CLS-token ViT")
    return model


# ----------------------------------------------------------------------------------------------------
# 1. LRP rules
# ----------------------------------------------------------------------------------------------------
def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """a / b with |b| kept >= eps (sign kept) and 0 where b == 0 (the stabiliser of Chefer's ``safe_divide``)."""
    den = torch.where(b >= 0, b.clamp(min=eps), b.clamp(max=-eps))
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """z⁺ rule (αβ, α=1, β=0, Chefer's ``Linear.relprop``) for y = x W^T (+ b): relevance on x, same shape as x.

    x [..., in], weight [out, in], relevance [..., out]. Only the positive contributions x_j W_kj > 0 share
    R_k, so Σ_j R_j = Σ_k R_k wherever some contribution to output k is positive (the bias takes no share).
    """
    fn = "lrp_linear"
    x = _tensor(x, "x", fn, min_ndim=1)
    weight = _tensor(weight, "weight", fn, ndim=2)
    relevance = _tensor(relevance, "relevance", fn, min_ndim=1)
    if x.shape[-1] != weight.shape[1] or relevance.shape[-1] != weight.shape[0] or x.shape[:-1] != relevance.shape[:-1]:
        raise ValueError(f"{fn}: shapes do not fit y = x W^T: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"relevance {tuple(relevance.shape)} (expected [..., {weight.shape[1]}], "
                         f"[out, in], [..., {weight.shape[0]}])")
    x, weight, relevance = x.detach(), weight.detach().to(x.dtype), relevance.detach()
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z = F.linear(xp, wp) + F.linear(xn, wn)  # Σ of the positive contributions, >= 0
    s = safe_divide(relevance, z)
    return xp * (s @ wp) + xn * (s @ wn)


def lrp_matmul(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer's rule for a product of two activations z = a @ b (attention's Q·K^T and A·V).

    Returns (R_a, R_b) = (a ⊙ (S b^T), b ⊙ (a^T S)) with S = R / z. *Each* sums to Σ R (up to zero
    denominators), so the caller halves both to conserve the total, as Chefer's attention does.
    """
    fn = "lrp_matmul"
    a = _tensor(a, "a", fn, min_ndim=2)
    b = _tensor(b, "b", fn, min_ndim=2)
    relevance = _tensor(relevance, "relevance", fn, min_ndim=2)
    if a.shape[-1] != b.shape[-2] or relevance.shape[-2:] != (a.shape[-2], b.shape[-1]):
        raise ValueError(f"{fn}: shapes do not fit z = a @ b: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"relevance {tuple(relevance.shape)}")
    a, b, relevance = a.detach(), b.detach(), relevance.detach()
    s = safe_divide(relevance, a @ b)
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def lrp_residual(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer's ``Add.relprop`` for z = a + b (the skip connection), per sample (dim 0).

    r_a = a ⊙ R/z, r_b = b ⊙ R/z, then each is rescaled so the two shares of Σ R are in the ratio
    |Σ r_a| : |Σ r_b|: the total is conserved exactly even where a and b cancel.
    """
    fn = "lrp_residual"
    a = _tensor(a, "a", fn, min_ndim=1)
    b = _tensor(b, "b", fn, min_ndim=1)
    relevance = _tensor(relevance, "relevance", fn, min_ndim=1)
    if not (a.shape == b.shape == relevance.shape):
        raise ValueError(f"{fn}: a, b and relevance must have one shape, got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(relevance.shape)}")
    a, b, relevance = a.detach(), b.detach(), relevance.detach()
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    dims = tuple(range(1, a.ndim))
    sa = ra.sum(dims, keepdim=True) if dims else ra
    sb = rb.sum(dims, keepdim=True) if dims else rb
    total = relevance.sum(dims, keepdim=True) if dims else relevance
    denom = sa.abs() + sb.abs()
    fa, fb = safe_divide(sa.abs(), denom) * total, safe_divide(sb.abs(), denom) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def lrp_linear_stack(layers, x: torch.Tensor, relevance: torch.Tensor | None = None):
    """LRP through a plain stack of ``nn.Linear`` and element-wise activations (GELU/ReLU: identity rule).

    Returns (relevance on x, [Σ relevance at each Linear's input, last layer first]). ``relevance`` defaults to
    the network output itself (R = y), the usual start. The sum-rule test lives here.
    """
    fn = "lrp_linear_stack"
    if isinstance(layers, nn.Module):
        layers = list(layers.children()) if isinstance(layers, nn.Sequential) else [layers]
    layers = list(layers)
    if not layers or not all(isinstance(m, (nn.Linear, nn.GELU, nn.ReLU, nn.Identity)) for m in layers):
        raise TypeError(f"{fn}: layers must be nn.Linear / nn.GELU / nn.ReLU / nn.Identity modules, got "
                        f"{[type(m).__name__ for m in layers]}")
    x = _tensor(x, "x", fn, min_ndim=1)
    inputs = []
    with torch.no_grad():
        h = x
        for m in layers:
            inputs.append(h)
            h = m(h)
        r = h.clone() if relevance is None else _tensor(relevance, "relevance", fn)
        if r.shape != h.shape:
            raise ValueError(f"{fn}: relevance has shape {tuple(r.shape)}, the output has {tuple(h.shape)}")
        totals = []
        for m, inp in zip(reversed(layers), reversed(inputs)):
            if isinstance(m, nn.Linear):
                r = lrp_linear(inp, m.weight.to(inp.dtype), r)
                totals.append(r.sum().item())
    return r, totals


# ----------------------------------------------------------------------------------------------------
# LRP through the course ViT
# ----------------------------------------------------------------------------------------------------
def _linear_names(model) -> list[str]:
    names = []
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    return names


def _block_forward(blk, x):
    """One pre-norm block, keeping what LRP needs (eval mode: dropout and drop-path are identities)."""
    attn, mlp = blk.attn, blk.mlp
    B, N, C = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    h1 = blk.norm1(x)
    qkv = F.linear(h1, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh]
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(B, N, C)
    a = F.linear(attn.norm(o), attn.proj.weight, attn.proj.bias)
    x1 = x + blk.ls1(a)
    h2 = blk.norm2(x1)
    f1 = F.linear(h2, mlp.fc1.weight, mlp.fc1.bias)
    g = mlp.norm(mlp.act(f1))
    f2 = F.linear(g, mlp.fc2.weight, mlp.fc2.bias)
    x2 = x1 + blk.ls2(f2)
    return x2, dict(x=x, h1=h1, q=q, k=k, v=v, probs=probs, o=o, a=a, x1=x1, h2=h2, g=g, f2=f2)


def _block_relprop(blk, c, r):
    """Relevance on a block's input from relevance on its output; also Σ|R| at each linear's input."""
    attn, mlp = blk.attn, blk.mlp
    B, N, C = c["x"].shape
    H, Dh = attn.num_heads, attn.head_dim
    dims = (1, 2)
    # MLP branch: x2 = x1 + fc2(gelu(fc1(norm2(x1))))
    r_x1, r_f2 = lrp_residual(c["x1"], c["f2"], r)
    r_g = lrp_linear(c["g"], mlp.fc2.weight, r_f2)
    r_h2 = lrp_linear(c["h2"], mlp.fc1.weight, r_g)  # GELU: identity rule
    r_x1 = r_x1 + r_h2  # LayerNorm: identity; the two uses of x1 add up
    # attention branch: x1 = x + proj(attn(norm1(x)))
    r_x, r_a = lrp_residual(c["x"], c["a"], r_x1)
    r_o = lrp_linear(c["o"], attn.proj.weight, r_a).reshape(B, N, H, Dh).transpose(1, 2)
    r_p, r_v = lrp_matmul(c["probs"], c["v"], r_o)
    r_p, r_v = r_p / 2, r_v / 2
    r_q, r_kt = lrp_matmul(c["q"], c["k"].transpose(-2, -1), r_p)  # softmax: identity; 1/sqrt(d) changes no share
    r_q, r_k = r_q / 2, r_kt.transpose(-2, -1) / 2
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * C)
    r_h1 = lrp_linear(c["h1"], attn.qkv.weight, r_qkv)
    r_x = r_x + r_h1
    masses = [r_h1.abs().sum(dims), r_o.abs().sum((1, 2, 3)), r_h2.abs().sum(dims), r_g.abs().sum(dims)]
    return r_x, masses


def vit_relevance(model, images: torch.Tensor, target: torch.Tensor | None = None, *,
                  dtype: torch.dtype = torch.float64) -> dict:
    """LRP from the target logit of a (vitlab / timm-layout) CLS-token ViT down to its token embeddings.

    Returns a dict: ``mass`` {linear name: Σ|R| at its input, mean over images}, ``per_image``
    {name: [B] masses}, ``input_total`` [B] (Σ R at the embeddings: 1 per image by the sum rule), ``logits``,
    ``target``. ``target`` None explains the predicted class. Runs in ``dtype`` (float64: the sum rule
    holds to rounding).
    """
    fn = "vit_relevance"
    model = _vit(model, fn)
    images = _tensor(images, "images", fn, ndim=4)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{fn}: dtype must be torch.float32 or torch.float64, got {dtype}")
    names = _linear_names(model)
    p0 = next(model.parameters())
    net = copy.deepcopy(model).to(dtype).eval()  # a float64 copy: the caller's model is left as it is
    with torch.no_grad():
        x = net.embed(images.to(device=p0.device, dtype=dtype))
        caches = []
        for blk in net.blocks:
            x, cache = _block_forward(blk, x)
            caches.append(cache)
        feats = net.norm(x)
        pooled = feats[:, 0]
        logits = F.linear(pooled, net.head.weight, net.head.bias)
        if target is None:
            target = logits.argmax(-1)
        if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32) or \
                tuple(target.shape) != (images.shape[0],):
            got = (target.dtype, tuple(target.shape)) if torch.is_tensor(target) else type(target).__name__
            raise ValueError(f"{fn}: target must be an int tensor of shape ({images.shape[0]},), got {got}")
        if int(target.min()) < 0 or int(target.max()) >= logits.shape[-1]:
            raise ValueError(f"{fn}: target values must lie in [0, {logits.shape[-1]}), got "
                             f"[{int(target.min())}, {int(target.max())}]")
        target = target.to(logits.device).long()
        r = F.one_hot(target, logits.shape[-1]).to(dtype)  # Chefer: one-hot at the target class
        r_pool = lrp_linear(pooled, net.head.weight, r)
        r = torch.zeros_like(feats)
        r[:, 0] = r_pool  # CLS pooling puts all relevance on token 0; final LayerNorm: identity rule
        per_layer = [None] * len(names)
        for i in reversed(range(len(net.blocks))):
            r, masses = _block_relprop(net.blocks[i], caches[i], r)
            per_layer[4 * i: 4 * i + 4] = masses
    per_image = {n: m for n, m in zip(names, per_layer)}
    return dict(mass={n: m.mean().item() for n, m in per_image.items()}, per_image=per_image,
                input_total=r.sum((1, 2)), logits=logits, target=target)


def layer_scores(model, images: torch.Tensor, target: torch.Tensor | None = None, *, batch_size: int = 64,
                 dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """LRP-QViT's layer contribution score: c_l = m_l / Σ_j m_j, m_l = mean over images of Σ|R| at the input
    of linear layer l (qkv, proj, fc1, fc2 of every block). Sums to 1; block order."""
    fn = "layer_scores"
    images = _tensor(images, "images", fn, ndim=4)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    if images.shape[0] == 0:
        raise ValueError(f"{fn}: images is empty; need at least one calibration image")
    total: dict[str, float] = {}
    for s in range(0, images.shape[0], batch_size):
        t = None if target is None else target[s: s + batch_size]
        out = vit_relevance(model, images[s: s + batch_size], t, dtype=dtype)
        for n, m in out["per_image"].items():
            total[n] = total.get(n, 0.0) + m.sum().item()
    z = sum(total.values())
    if not z > 0:
        raise ValueError(f"{fn}: all relevance masses are zero; cannot normalise")
    return {n: v / z for n, v in total.items()}


# ----------------------------------------------------------------------------------------------------
# 2. bit allocation under an average-bit budget
# ----------------------------------------------------------------------------------------------------
def linear_params(model) -> dict[str, int]:
    """Weight count n_l of each allocatable linear layer (qkv, proj, fc1, fc2 of every block), block order."""
    model = _vit(model, "linear_params")
    mods = dict(model.named_modules())
    return {n: mods[n].weight.numel() for n in _linear_names(model)}


def _check_bits_dict(bits, params, fn):
    if not isinstance(bits, dict) or not isinstance(params, dict):
        raise TypeError(f"{fn}: bits and params must be dicts {{layer: int}}, got {type(bits).__name__}, "
                        f"{type(params).__name__}")
    if set(bits) != set(params):
        raise ValueError(f"{fn}: bits and params must name the same layers; only in bits: "
                         f"{sorted(set(bits) - set(params))}, only in params: {sorted(set(params) - set(bits))}")


def average_bits(bits: dict[str, int], params: dict[str, int]) -> float:
    """Parameter-weighted average bit-width Σ n_l b_l / Σ n_l (exact rational arithmetic, returned as float)."""
    _check_bits_dict(bits, params, "average_bits")
    num = sum(int(bits[n]) * int(params[n]) for n in params)
    den = sum(int(params[n]) for n in params)
    return num / den


def _check_same_layers(per_layer, params, name: str, fn: str) -> None:
    """``per_layer`` and ``params`` are dicts over the same non-empty set of layer names."""
    if not isinstance(per_layer, dict) or not isinstance(params, dict):
        raise TypeError(f"{fn}: {name} and params must be dicts keyed by layer name, got "
                        f"{type(per_layer).__name__}, {type(params).__name__}")
    if not per_layer or set(per_layer) != set(params):
        raise ValueError(f"{fn}: {name} and params must name the same (non-empty) set of layers; only in {name}: "
                         f"{sorted(set(per_layer) - set(params))}, only in params: "
                         f"{sorted(set(params) - set(per_layer))}")


def allocate_bits(scores: dict[str, float], params: dict[str, int], budget: float,
                  choices=(4, 6, 8)) -> dict[str, int]:
    """Per-layer bits from ``choices`` whose parameter-weighted average is *exactly* ``budget``, minimising
    Σ_l c_l · 4^(-b_l) (relevance-weighted quantisation noise). Exact dynamic programme over the integer
    bit-budget (parameter counts divided by their gcd). Raises ValueError if the budget cannot be met exactly.
    """
    fn = "allocate_bits"
    _check_same_layers(scores, params, "scores", fn)
    for n, v in scores.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{fn}: scores[{n!r}] must be a finite number >= 0, got {v!r}")
    for n, v in params.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{fn}: params[{n!r}] must be a positive int, got {v!r}")
    choices = _check_choices(choices, budget, fn)
    return _exact_allocation(params, budget, choices, lambda n, b: float(scores[n]) * 4.0 ** (-b), fn)


def _exact_allocation(params, budget, choices, cost, fn):
    """Bits b_l in ``choices`` with Σ n_l b_l = budget · Σ n_l exactly, minimising Σ_l cost(l, b_l) (DP)."""
    names = list(params)
    g = 0
    for n in names:
        g = math.gcd(g, int(params[n]))
    units = [int(params[n]) // g for n in names]
    total_units = sum(units)
    target = budget * total_units  # Σ u_l b_l must equal this integer
    if abs(target - round(target)) > 1e-9:
        raise ValueError(f"{fn}: budget={budget!r} cannot be met exactly: Σ n_l b_l must be an integer multiple "
                         f"of gcd(n_l)={g}; reachable averages are multiples of 1/{total_units}")
    target = int(round(target))
    # DP over layers: best[cost] = (objective, choice list) with cost = Σ u_l b_l so far
    best = {0: (0.0, [])}
    for n, u in zip(names, units):
        nxt = {}
        for used, (obj, picks) in best.items():
            for b in choices:
                c2 = used + u * b
                o2 = obj + cost(n, b)
                # keep the first minimum (ties: the earlier choice list)
                if c2 not in nxt or o2 < nxt[c2][0] - 1e-18:
                    nxt[c2] = (o2, picks + [b])
        best = nxt
    if target not in best:
        raise ValueError(f"{fn}: budget={budget!r} cannot be met exactly with choices={choices} on these "
                         f"layer sizes")
    return dict(zip(names, best[target][1]))


def allocate_bits_by_cost(costs: dict[str, dict[int, float]], params: dict[str, int], budget: float,
                          choices=(4, 6, 8)) -> dict[str, int]:
    """The same exact budget as ``allocate_bits``, minimising Σ_l E_l(b_l) for a measured cost table
    {layer: {bits: error}} instead of relevance-weighted noise. With E_l(b) the logit KL of quantising layer l
    alone at b bits (``mptq_vit.sensitivity_table``) this is the KL-sensitivity control of the LRP lesson:
    an allocation from a direct measurement of each layer's damage rather than from relevance."""
    fn = "allocate_bits_by_cost"
    _check_same_layers(costs, params, "costs", fn)
    choices = _check_choices(choices, budget, fn)
    for n, row in costs.items():
        if not isinstance(row, dict) or any(b not in row for b in choices):
            raise ValueError(f"{fn}: costs[{n!r}] must give an error for every choice {choices}, got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        for b in choices:
            v = row[b]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{fn}: costs[{n!r}][{b}] must be a finite number, got {v!r}")
    for n, v in params.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{fn}: params[{n!r}] must be a positive int, got {v!r}")
    return _exact_allocation(params, budget, choices, lambda n, b: float(costs[n][b]), fn)


def _check_choices(choices, budget, fn):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget):
        raise TypeError(f"{fn}: budget must be a finite number (average bits), got {budget!r}")
    if not isinstance(choices, (tuple, list)) or not choices or any(
            isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 8 for b in choices):
        raise ValueError(f"{fn}: choices must be a non-empty sequence of ints in [2, 8], got {choices!r}")
    choices = sorted(set(int(b) for b in choices))
    if not choices[0] <= budget <= choices[-1]:
        raise ValueError(f"{fn}: budget={budget!r} is outside [{choices[0]}, {choices[-1]}] (the choices' range)")
    return choices


def random_scores(names, generator: torch.Generator | None = None) -> dict[str, float]:
    """Random contribution scores (uniform on the simplex) for the same layers: fed to ``allocate_bits`` they
    give a random allocation with the same budget and the same machinery, the baseline relevance must beat."""
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"random_scores: names must be a non-empty sequence of layer names (str), got {names!r}")
    e = -torch.rand(len(names), generator=generator, dtype=torch.float64).log()  # Exp(1) -> Dirichlet(1)
    e = e / e.sum()
    return dict(zip(names, e.tolist()))


def depth_prior_scores(names) -> dict[str, float]:
    """A prior that measures nothing: score ∝ (L − i) for a layer in block i of L blocks (first block L, last 1),
    normalised to sum to 1. Fed to ``allocate_bits`` it gives early blocks more bits, which is what relevance
    mass tends to do too; the control that tells "relevance knows something" from "early layers matter".
    Names must look like ``blocks.<i>.<...>``."""
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"depth_prior_scores: names must be a non-empty sequence of layer names (str), got {names!r}")
    idx = []
    for n in names:
        parts = n.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"depth_prior_scores: {n!r} is not a block layer name 'blocks.<i>.<layer>'")
        idx.append(int(parts[1]))
    depth = max(idx) + 1
    raw = [float(depth - i) for i in idx]
    z = sum(raw)
    return {n: r / z for n, r in zip(names, raw)}


# ----------------------------------------------------------------------------------------------------
# 3. clipped channel-wise quantisation of post-LayerNorm activations
# ----------------------------------------------------------------------------------------------------
CLIP_GRID = (1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95)  # quantile levels q: range [quantile(1-q), quantile(q)]


def _check_clip(clip, fn):
    if clip is None or clip == "search":
        return clip
    if not isinstance(clip, (tuple, list)) or len(clip) != 2 or not all(
            isinstance(p, numbers.Real) and not isinstance(p, bool) for p in clip) or not 0 <= clip[0] < clip[1] <= 1:
        raise ValueError(f"{fn}: clip must be None, 'search' or a pair (p_lo, p_hi) with 0 <= p_lo < p_hi <= 1, "
                         f"got {clip!r}")
    return (float(clip[0]), float(clip[1]))


def clipped_channel_params(x: torch.Tensor, bits: int, clip="search", grid=CLIP_GRID):
    """Per-channel (last axis) asymmetric uniform parameters from a clipped range.

    x [..., C] calibration activations. ``clip``:
      None            [min_c, max_c]: plain channel-wise min-max (RepQ-ViT's channel-wise start);
      (p_lo, p_hi)    [quantile_c(p_lo), quantile_c(p_hi)]: every channel's outliers clipped at fixed levels;
      "search"        per channel, the level q in ``grid`` (range [quantile_c(1-q), quantile_c(q)]) with the least
                      squared error on x; q = 1 (no clipping) is a candidate, so never worse than min-max on x.
    The range is widened to contain 0; (scale [C] float32, zero_point [C] int32) come from
    ``vitlab.quant.calibrate.range_params``: s_c = (hi_c - lo_c)/(2^b - 1), z_c = clamp(-rint(lo_c / s_c)).
    """
    from vitlab.kernels.fake_quant import fake_quant_ref
    from vitlab.quant.calibrate import range_params

    fn = "clipped_channel_params"
    x = _tensor(x, "x", fn, min_ndim=1)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in [2, 8], got {bits!r}")
    clip = _check_clip(clip, fn)
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if flat.shape[0] == 0:
        raise ValueError(f"{fn}: x has no samples (shape {tuple(x.shape)})")
    if clip is None:
        return range_params(flat.amin(0), flat.amax(0), int(bits))
    if clip != "search":
        lo, hi = torch.quantile(flat, torch.tensor(list(clip), dtype=flat.dtype, device=flat.device), dim=0)
        return range_params(lo, hi, int(bits))
    if not isinstance(grid, (tuple, list)) or not grid or not all(
            isinstance(q, numbers.Real) and not isinstance(q, bool) and 0.5 < q <= 1 for q in grid):
        raise ValueError(f"{fn}: grid must be a non-empty sequence of quantile levels in (0.5, 1], got {grid!r}")
    levels = sorted(set(float(q) for q in grid) | {1.0}, reverse=True)
    qs = torch.tensor([1 - q for q in levels] + levels, dtype=flat.dtype, device=flat.device)
    bounds = torch.quantile(flat, qs, dim=0)  # [2L, C]
    best = None
    for i in range(len(levels)):
        s, z = range_params(bounds[i], bounds[len(levels) + i], int(bits))
        err = (fake_quant_ref(flat, s, z, int(bits), axis=1) - flat).pow(2).mean(0)
        if best is None:
            best = [s, z, err]
        else:
            better = err < best[2]  # strict: ties keep the wider range
            best = [torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.where(better, err, best[2])]
    return best[0], best[1]


def channel_quant_mse(x: torch.Tensor, bits: int, clip="search", calib: torch.Tensor | None = None) -> float:
    """Mean squared error of channel-wise fake quantisation of x [..., C] with parameters from ``calib``
    (default x itself) and the given clipping."""
    from vitlab.kernels.fake_quant import fake_quant

    x = _tensor(x, "x", "channel_quant_mse", min_ndim=1)
    scale, zp = clipped_channel_params(x if calib is None else calib, bits, clip)
    xq = fake_quant(x.float(), scale, zp, int(bits), axis=x.ndim - 1)
    return (xq - x.float()).pow(2).mean().item()


def post_ln_inputs(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The post-LayerNorm activations of a FP ViT: {"blocks.i.attn.qkv": norm1 output, "blocks.i.mlp.fc1":
    norm2 output}, each [B, N, C] (the inputs that clipped channel-wise quantisation is for)."""
    fn = "post_ln_inputs"
    model = _vit(model, fn)
    images = _tensor(images, "images", fn, ndim=4)
    out, hooks = {}, []
    for i, blk in enumerate(model.blocks):
        for norm, name in ((blk.norm1, f"blocks.{i}.attn.qkv"), (blk.norm2, f"blocks.{i}.mlp.fc1")):
            hooks.append(norm.register_forward_hook(lambda m, a, y, name=name: out.__setitem__(name, y.detach())))
    p0 = next(model.parameters())
    try:
        with torch.no_grad():
            model(images.to(device=p0.device, dtype=p0.dtype))
    finally:
        for h in hooks:
            h.remove()
    return out


# ----------------------------------------------------------------------------------------------------
# the whole pipeline
# ----------------------------------------------------------------------------------------------------
POST_LN = ("qkv", "fc1")  # the linears whose input is a LayerNorm output


def lrp_qvit(model, calib_images: torch.Tensor, bits, *, clip="search", method: str = "minmax",
             channel_wise: bool = True, batch_size: int = 64) -> nn.Module:
    """A fake-quantised copy of ``model`` (``vitlab.quant``), calibrated on ``calib_images``.

    bits: an int (every block linear at that W/A bit-width) or {layer: bits} from ``allocate_bits`` (weights
    and input activations of a layer share its bit-width). The patch embedding and the head stay at W8/A8,
    as ``quantize_model``'s default. Weights: per output channel; activations: per tensor with ``method``,
    except the post-LayerNorm inputs of qkv and fc1, which get clipped channel-wise parameters
    (``clipped_channel_params(..., clip)``) when ``channel_wise`` (False: plain per-tensor, for ablations).
    """
    from vitlab.quant.model import calibrate_model, quant_layers, quantize_model

    fn = "lrp_qvit"
    model = _vit(model, fn)
    calib_images = _tensor(calib_images, "calib_images", fn, ndim=4)
    names = _linear_names(model)
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = {n: int(bits) for n in names}
    if not isinstance(bits, dict):
        raise TypeError(f"{fn}: bits must be an int or a dict {{layer: int}}, got {type(bits).__name__}")
    if set(bits) != set(names):
        raise ValueError(f"{fn}: bits must name every block linear; missing {sorted(set(names) - set(bits))}, "
                         f"unknown {sorted(set(bits) - set(names))}")
    for n, b in bits.items():
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 8:
            raise ValueError(f"{fn}: bits[{n!r}] must be an int in [2, 8], got {b!r}")
    if not isinstance(channel_wise, bool):
        raise TypeError(f"{fn}: channel_wise must be a bool, got {channel_wise!r}")
    clip = _check_clip(clip, fn)
    qmodel = quantize_model(model, 8, 8, layer_bits={n: (int(b), int(b)) for n, b in bits.items()},
                            act_per_channel=POST_LN if channel_wise else ())
    calibrate_model(qmodel, calib_images, method=method, batch_size=batch_size)
    if channel_wise:
        layers = quant_layers(qmodel)
        acts = post_ln_inputs(model, calib_images)  # float inputs, as calibrate_model observes them
        for name, x in acts.items():
            layers[name].a_quant.set_params(*clipped_channel_params(x, layers[name].a_bits, clip))
    return qmodel
