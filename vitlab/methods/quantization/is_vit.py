"""I&S-ViT: an Inclusive & Stable method for post-training quantisation of ViTs (Zhong, Hu, Lin, Chen & Ji,
arXiv:2311.10126, TPAMI 2025), written from the paper and from reading its official code (zysxmu/IaS-ViT:
``quant/quantizer.py``, ``quant/quant_model.py``, ``quant/block_recon.py``, ``test_quant.py``). No code is taken
from it; the quantisers are vitlab.quant's (``FakeQuantizer`` over ``vitlab.kernels.fake_quant``).

Two parts.

1. **SULQ, the shift-uniform-log2 quantiser** for post-softmax values x in [0, 1]. A plain log2 quantiser
   (levels 2^-k, k = 0..2^b-1) spends its levels on [2^-(2^b-1), 1] and flushes everything smaller to 0, while
   softmax maps are mostly tiny values. SULQ shifts first, quantises uniformly in the log domain, then shifts
   back (b bits, qmax = 2^b - 1, step s, shift eta > 0; vitlab's ``shift_log2`` mode):

       q     = clamp(rint(-log2(x + eta) / s), 0, qmax)
       x_hat = 2^(-s q) - eta

   0 maps to about 0 (2^(-s q) ~ eta) and the bottom level sits at the data's minimum, so the whole domain is
   covered ("inclusive"). eta and s are searched by MSE on calibration probabilities (``sulq_search``).

2. **SOS, the three-stage smooth optimisation** for post-LayerNorm activations (the inputs of ``qkv`` and
   ``fc1``, whose channels differ in range by orders of magnitude):

   stage 1  activations quantised *channel-wise* (post-LN) and per tensor elsewhere, SULQ on the softmax,
            weights in float; block-wise reconstruction: per block, Adam on the linears' weights and biases,
            minimising ||block_q(x_fp) - block_fp(x_fp)||^2 on calibration tokens (``block_reconstruct``).
   stage 2  RepQ-ViT's reparameterisation (``reparam_post_ln``): channel c's step s_c and zero point z_c are
            folded into the LayerNorm affine and the next linear so that one per-tensor quantiser (s, z) does
            the same job. With s = mean(s_c), z = round(mean(z_c)), r_c = s_c / s and b_c = s (z - z_c):

                gamma_c <- gamma_c / r_c,   beta_c <- beta_c / r_c - b_c          (LayerNorm out y_c -> y_c/r_c - b_c)
                W[:, c] <- W[:, c] r_c,     bias <- bias + W_new b                (the linear undoes it)

            In float this is exactly the same function; quantised, rint(y'_c/s) + z = rint(y_c/s_c) + z_c, so
            the per-tensor quantiser reproduces the channel-wise one code for code (integer z makes it exact).
   stage 3  weights quantised too (per output channel, fitted to the reparameterised weights), and block-wise
            reconstruction again, now from the *quantised* model's block inputs to the float block outputs.

   The loss landscape argument of the paper: channel-wise activation quantisation with float weights is
   smooth, so stage 1 finds a good region; stage 2 changes granularity without changing the function; stage 3
   only has to absorb the weight quantisation error.

Usage:

    qmodel, info = is_vit_quantize(model, calib_images, w_bits=4, a_bits=4, iters=50, lr=3e-4)
    info["stage1"][i]["loss_before"], info["stage1"][i]["loss_after"]     # block MSE per stage and block
    s, eta, mse = sulq_search(probs, bits=4)                             # SULQ on its own
    rq = repq_style_quantize(model, calib_images, 4, 4)                  # channel-wise post-LN + reparam only
    base = stage0(model, calib_images, 4, 4)                             # calibrate once, then base=base in both

Our reading (official code against the paper, and what we chose):

- The official ``LogSqrt2Quantizer`` (the SULQ) takes log2(x + eta), puts a uniform grid on [min, max] of it
  (2^b steps, clamped to 2^b + 1 indices) and then rounds the *exponent* again to an integer: its outputs are
  2^k - eta for integers k between round(log2(min x + eta)) and round(log2(max x + eta)) (bit-shift friendly).
  That is vitlab's ``shift_log2`` mode with s = 1, up to the double rounding (first to the log grid, then to the
  integer), which moves the decision boundaries by at most half a grid step, provided the exponent range fits in
  the codes (-log2(min x + eta) <= 2^b - 1, so the official grid step is <= 1 and no integer is skipped; e.g. any
  candidate eta at 4 bits, eta >= 0.01 at 3 bits) and eta < sqrt(2) - 1 (top level 2^0 - eta in both). With a
  wider range the official grid skips exponents, which s = 1 cannot express (a fractional s comes close). vitlab's mode
  also allows a fractional step s, which the official code does not use; ``sulq_search`` searches eta in the
  official candidates (vitlab.quant.ETAS) and s in vitlab.quant's grid (s = r * s0, s0 reaching min x), and adds
  the official integer-exponent grid s = 1 for each eta (``integer_exponent=True``); the least MSE wins.
- Activation quantisers are fitted to float inputs (``vitlab.quant.calibrate_model``; "mse" is vitlab's
  clipping search); the official code initialises each quantiser on the first quantised forward (percentile
  search), so later quantisers see already-quantised inputs. Weight quantisers are fitted after stage 2.
- The official mean zero point is fractional; vitlab's kernel wants integers, so we round it, which is what
  makes stage 2 exact under quantisation as well as in float.
- The official code quantises the inputs of both attention matmuls (q, k and v too); vitlab.quant quantises the
  softmax output only. Patch embedding and head stay at 8 bits (vitlab.quant's ``edge_bits``), and we
  reconstruct the blocks only (the official code also tunes the first and last layers).
- Reconstruction: Adam with a cosine schedule as the official (lr 4e-5, 1000 iterations, batch 64 of 1024
  images); at course scale a few tens of iterations with a larger lr (the notebook's CFG). The loss is the mean
  squared error (the official sums over the token axis; Adam is insensitive to that constant).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

__all__ = ["ETAS", "POST_LN", "sulq_levels", "sulq_search", "post_softmax_values", "set_softmax", "use_sulq",
           "reparam_post_ln", "reparam_model", "block_reconstruct", "block_io", "stage0", "repq_style_quantize",
           "is_vit_quantize"]

from vitlab.quant.calibrate import ETAS  # I&S-ViT's candidate shifts (0.001 ... 1.0)

POST_LN = ("qkv", "fc1")  # the linears whose input is a LayerNorm output


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _bits(v, name: str, fn: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 2 <= v <= 8:
        raise ValueError(f"{fn}: {name} must be an int in [2, 8], got {v!r}")
    return int(v)


def _positive(v, name: str, fn: str, *, integer: bool = False, allow_zero: bool = False) -> float:
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(v, bool) and isinstance(v, kind) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        what = "int" if integer else "number"
        raise ValueError(f"{fn}: {name} must be a {'non-negative' if allow_zero else 'positive'} {what}, got {v!r}")
    return int(v) if integer else float(v)


def _tensor(x, name: str, fn: str, *, min_ndim: int = 1) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim or x.numel() == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty tensor with >= {min_ndim} dims, got {tuple(x.shape)}")
    return x


def _images(images, fn: str) -> torch.Tensor:
    if hasattr(images, "images"):
        images = images.images
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] == 0:
        raise TypeError(f"{fn}: images must be a non-empty image batch [B, C, H, W] (or a dataset with .images), "
                        f"got {type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    return images


def _vit(model, name: str, fn: str):
    from vitlab.models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{fn}: {name} must be a vitlab VisionTransformer (it needs .embed and .blocks), "
                        f"got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------------------------------
# 1. SULQ
# ----------------------------------------------------------------------------------------------------
def sulq_levels(bits: int, scale: float, eta: float) -> torch.Tensor:
    """The 2**bits SULQ levels 2^(-scale * q) - eta, q = 0..2**bits - 1, ascending (float32, computed with the
    same operations as vitlab.kernels.fake_quant, so every level round-trips exactly)."""
    fn = "sulq_levels"
    bits = _bits(bits, "bits", fn)
    scale, eta = _positive(scale, "scale", fn), _positive(eta, "eta", fn)
    q = torch.arange(2 ** bits, dtype=torch.float32)
    s, e = torch.tensor(scale, dtype=torch.float32), torch.tensor(eta, dtype=torch.float32)
    return (torch.exp2(-s * q) - e).flip(0)


def sulq_search(x: torch.Tensor, bits: int, *, etas=ETAS, grid=None, integer_exponent: bool = True,
                max_values: int = 2 ** 14, seed: int = 0):
    """MSE search of SULQ's (scale, eta) on sample values ``x`` (post-softmax probabilities, in [0, 1]).

    Candidates: vitlab.quant.calibrate.shift_log2_params' grid (eta in ``etas``; s = r * s0, r in ``grid``,
    default 0.5, 0.6, ..., 1.5; s0 = -log2(min x + eta) / qmax so that the bottom level reaches the smallest
    value) and, with
    ``integer_exponent``, the official code's grid s = 1 (levels 2^-k - eta) for every eta. ``x`` is reduced to
    a random sample of ``max_values`` values (its minimum and maximum always kept). Returns
    (scale, eta, mse) as floats, the MSE measured on that sample.
    """
    from vitlab.kernels.fake_quant import fake_quant_ref
    from vitlab.quant.calibrate import shift_log2_params

    fn = "sulq_search"
    x = _tensor(x, "x", fn)
    bits = _bits(bits, "bits", fn)
    max_values = _positive(max_values, "max_values", fn, integer=True)
    if not isinstance(integer_exponent, bool):
        raise TypeError(f"{fn}: integer_exponent must be a bool, got {integer_exponent!r}")
    v = x.detach().float().reshape(-1)
    if not bool(torch.isfinite(v).all()) or float(v.min()) < 0 or float(v.max()) > 1 + 1e-6:
        raise ValueError(f"{fn}: x must hold finite values in [0, 1] (probabilities), got range "
                         f"[{float(v.min()):.3g}, {float(v.max()):.3g}]")
    if v.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(v.numel(), generator=g)[:max_values - 2]
        v = torch.cat([v[idx.to(v.device)], v.min().reshape(1), v.max().reshape(1)])
    grid = torch.linspace(0.5, 1.5, 11) if grid is None else grid  # steps r * s0 (vitlab.quant's range, coarser)
    s, _, e = shift_log2_params(v, bits, etas=etas, grid=grid)

    def mse(scale, eta):
        return float((fake_quant_ref(v, scale, None, bits, mode="shift_log2", eta=eta) - v).pow(2).mean())

    best = (float(s), float(e), mse(s, e))
    if integer_exponent:
        for eta in (float(t) for t in torch.as_tensor(etas, dtype=torch.float64).flatten()):
            err = mse(1.0, eta)
            if err < best[2]:
                best = (1.0, eta, err)
    return best


@torch.no_grad()
def post_softmax_values(model: nn.Module, images, *, batch_size: int = 64) -> list[torch.Tensor]:
    """Per block, the float model's attention probabilities on ``images``: a list of [B, H, N, N] tensors."""
    fn = "post_softmax_values"
    model = _vit(model, "model", fn)
    images = _images(images, fn)
    was = model.training
    model.eval()
    try:
        outs = [model.forward_with_attention(images[i:i + batch_size], side=("probs",))[1]
                for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was)
    return [torch.cat([o[b]["probs"] for o in outs]) for b in range(len(outs[0]))]


def use_sulq(qmodel: nn.Module, model: nn.Module, images, *, bits: int | None = None, **search_kw) -> list[dict]:
    """``set_softmax(qmodel, model, images, "sulq")``: SULQ post-softmax quantisers fitted by ``sulq_search``.
    Returns per block {"scale", "eta", "mse"}."""
    return set_softmax(qmodel, model, images, "sulq", bits=bits, **search_kw)


# ----------------------------------------------------------------------------------------------------
# 2. stage 2: fold channel-wise activation quantisation into LayerNorm + linear
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def reparam_post_ln(norm: nn.LayerNorm, linear: nn.Module, *, weight_method: str | None = "mse"):
    """RepQ-ViT's reparameterisation of one (LayerNorm, next QuantLinear) pair, in place.

    ``linear.a_quant`` must be a calibrated per-channel uniform quantiser (steps s_c, zero points z_c). Sets
    s = mean(s_c), z = round(mean(z_c)), r = s_c / s, b = s (z - z_c); divides the LayerNorm affine by r and
    subtracts b; multiplies the linear's input columns by r and adds W_new b to its bias; replaces ``a_quant``
    by a per-tensor quantiser (s, z). The float function is unchanged, and so are the activation codes. The
    weight quantiser is refitted to the new weight with ``weight_method`` (None: cleared; calibrate it later).
    Returns (s, z) as 0-d tensors.
    """
    from vitlab.quant import FakeQuantizer, QuantLinear

    fn = "reparam_post_ln"
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.weight is None or norm.bias is None:
        raise TypeError(f"{fn}: norm must be an nn.LayerNorm with weight and bias, got {norm!r}")
    if not isinstance(linear, QuantLinear):
        raise TypeError(f"{fn}: linear must be a vitlab.quant QuantLinear, got {type(linear).__name__}")
    aq = linear.a_quant
    if aq.mode != "uniform" or aq.axis is None or not aq.calibrated:
        raise ValueError(f"{fn}: linear.a_quant must be a calibrated per-channel uniform quantiser, got {aq}")
    C = norm.weight.numel()
    if aq.scale.numel() != C or linear.in_features != C:
        raise ValueError(f"{fn}: norm has {C} channels, linear has {linear.in_features} inputs and a_quant "
                         f"{aq.scale.numel()} channels; they must agree")
    if weight_method not in (None, "minmax", "percentile", "mse"):
        raise ValueError(f"{fn}: weight_method must be None, 'minmax', 'percentile' or 'mse', got {weight_method!r}")
    qmax = 2 ** aq.bits - 1
    s_c = aq.scale.double()
    z_c = aq.zero_point.double()
    s = s_c.mean()
    z = z_c.mean().round().clamp(0, qmax)
    r = s_c / s
    b = s * (z - z_c)  # = min_c / r - min, with min_c = -z_c s_c and min = -z s
    dt = norm.weight.dtype
    norm.weight.copy_((norm.weight.double() / r).to(dt))
    norm.bias.copy_((norm.bias.double() / r - b).to(dt))
    w = linear.weight.double() * r  # scale input column c by r_c
    linear.weight.copy_(w.to(linear.weight.dtype))
    shift = w @ b
    if linear.bias is None:
        linear.bias = nn.Parameter(shift.to(linear.weight.dtype))
    else:
        linear.bias.copy_((linear.bias.double() + shift).to(linear.bias.dtype))
    new = FakeQuantizer(aq.bits, mode="uniform", axis=None, method=aq.method).to(aq.scale.device)
    new.set_params(s.float(), z.to(torch.int32))
    new.enabled = aq.enabled
    linear.a_quant = new
    if weight_method is None:
        linear.w_quant.clear_params()
    else:
        linear.calibrate_weight(weight_method)
    return s.float(), z.to(torch.int32)


def reparam_model(qmodel: nn.Module, *, weight_method: str | None = "mse") -> list[dict]:
    """``reparam_post_ln`` on every block's (norm1, attn.qkv) and (norm2, mlp.fc1). Returns per pair
    {"block", "layer", "scale", "zero_point", "ratio_range"} (ratio_range: min and max of s_c / s)."""
    from vitlab.quant import QuantLinear

    fn = "reparam_model"
    blocks = getattr(qmodel, "blocks", None)
    if not isinstance(qmodel, nn.Module) or blocks is None or not all(
            isinstance(getattr(getattr(b, "attn", None), "qkv", None), QuantLinear) for b in blocks):
        raise TypeError(f"{fn}: qmodel must be a quantised ViT (vitlab.quant.quantize_model) with .blocks")
    out = []
    for i, blk in enumerate(blocks):
        for norm, lin, name in ((blk.norm1, blk.attn.qkv, "qkv"), (blk.norm2, blk.mlp.fc1, "fc1")):
            ratio = lin.a_quant.scale / lin.a_quant.scale.mean() if lin.a_quant.calibrated else torch.ones(1)
            s, z = reparam_post_ln(norm, lin, weight_method=weight_method)
            out.append({"block": i, "layer": name, "scale": float(s), "zero_point": int(z),
                        "ratio_range": (float(ratio.min()), float(ratio.max()))})
    return out


# ----------------------------------------------------------------------------------------------------
# stages 1 and 3: block-wise reconstruction
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def block_io(model: nn.Module, images) -> list[torch.Tensor]:
    """Token tensors [B, N, D] at every block boundary of a ViT (quantised or not): [x_0, x_1, ..., x_L], x_0
    the embedded input, x_{i+1} = blocks[i](x_i). Runs in eval mode."""
    fn = "block_io"
    images = _images(images, fn)
    if not isinstance(model, nn.Module) or not hasattr(model, "embed") or not hasattr(model, "blocks"):
        raise TypeError(f"{fn}: model must be a ViT with .embed and .blocks, got {type(model).__name__}")
    was = model.training
    model.eval()
    try:
        xs = [model.embed(images)]
        for blk in model.blocks:
            xs.append(blk(xs[-1]))
    finally:
        model.train(was)
    return xs


def block_reconstruct(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, iters: int = 1000,
                      lr: float = 4e-5, batch_size: int = 32, seed: int = 0) -> dict:
    """Tune the weights and biases of every nn.Linear in ``block`` (LayerNorms and quantiser parameters frozen)
    so that block(inputs) approaches targets: Adam, cosine schedule to 0, ``iters`` steps on random mini-batches
    of ``batch_size`` (the official I&S-ViT recipe). Quantisers in the block stay as they are (enabled ones
    act, with straight-through gradients). Returns {"loss_before", "loss_after", "losses"} (MSE over all
    inputs before / after, and per step). The block is left in eval mode with its parameters' requires_grad
    flags restored."""
    fn = "block_reconstruct"
    if not isinstance(block, nn.Module):
        raise TypeError(f"{fn}: block must be an nn.Module, got {type(block).__name__}")
    inputs, targets = _tensor(inputs, "inputs", fn, min_ndim=2), _tensor(targets, "targets", fn, min_ndim=2)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{fn}: inputs and targets must have the same batch size, got {inputs.shape[0]} and "
                         f"{targets.shape[0]}")
    iters = _positive(iters, "iters", fn, integer=True, allow_zero=True)
    lr = _positive(lr, "lr", fn)
    batch_size = _positive(batch_size, "batch_size", fn, integer=True)
    train = [p for m in block.modules() if isinstance(m, nn.Linear) for p in (m.weight, m.bias) if p is not None]
    if not train:
        raise ValueError(f"{fn}: block has no nn.Linear to tune")
    flags = {p: p.requires_grad for p in block.parameters()}
    was = block.training
    block.eval()  # no dropout here; eval keeps the course's blocks deterministic

    def full_loss():
        with torch.no_grad():
            return float(torch.stack([(block(inputs[i:i + 256]) - targets[i:i + 256]).pow(2).sum()
                                      for i in range(0, inputs.shape[0], 256)]).sum() / targets.numel())

    before = full_loss()
    losses = []
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in train:
            p.requires_grad_(True)
        if iters:
            opt = torch.optim.Adam(train, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
            g = torch.Generator().manual_seed(seed)
            n = inputs.shape[0]
            for _ in range(iters):
                idx = torch.randperm(n, generator=g)[:batch_size].to(inputs.device)
                with torch.enable_grad():
                    loss = (block(inputs[idx]) - targets[idx]).pow(2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        block.train(was)
    return {"loss_before": before, "loss_after": full_loss(), "losses": losses}


# ----------------------------------------------------------------------------------------------------
# drivers
# ----------------------------------------------------------------------------------------------------
def stage0(model: nn.Module, calib_images, w_bits: int = 4, a_bits: int = 4, *, act_method: str = "mse",
           weight_method: str = "mse", **quant_kw) -> nn.Module:
    """The common starting point of ``repq_style_quantize`` and ``is_vit_quantize``: a quantised copy with
    channel-wise inputs for ``qkv`` / ``fc1`` (POST_LN), per-tensor inputs elsewhere, weights per output channel,
    no softmax quantiser yet, calibrated on ``calib_images``. Pass it as ``base=`` to both to calibrate once."""
    fn = "stage0"
    model = _vit(model, "model", fn)
    calib = _images(calib_images, fn)
    w_bits, a_bits = _bits(w_bits, "w_bits", fn), _bits(a_bits, "a_bits", fn)
    return _build(model, calib, w_bits, a_bits, act_method, weight_method, fn, **quant_kw)


def _from_base(base, model, calib, w_bits, a_bits, act_method, weight_method, fn, **quant_kw):
    """A fresh stage-0 model, or a deep copy of ``base`` after checking it is one for these bits."""
    import copy

    from vitlab.quant import QuantAttention

    if base is None:
        return _build(model, calib, w_bits, a_bits, act_method, weight_method, fn, **quant_kw)
    blocks = getattr(base, "blocks", None)
    ok = isinstance(base, nn.Module) and blocks is not None and len(blocks) == len(model.blocks) and all(
        isinstance(b.attn, QuantAttention) and b.attn.qkv.a_quant.axis is not None and b.attn.qkv.a_quant.calibrated
        and b.attn.qkv.a_bits == a_bits and b.attn.qkv.w_bits == w_bits for b in blocks)
    if not ok:
        raise ValueError(f"{fn}: base must be stage0(model, calib, {w_bits}, {a_bits}) (calibrated, channel-wise "
                         f"post-LN inputs, not yet reparameterised)")
    return copy.deepcopy(base)


def _build(model, calib, w_bits, a_bits, act_method, weight_method, fn, **quant_kw):
    from vitlab.quant import calibrate_model, quantize_model

    if act_method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"{fn}: act_method must be 'minmax', 'percentile' or 'mse', got {act_method!r}")
    if weight_method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"{fn}: weight_method must be 'minmax', 'percentile' or 'mse', got {weight_method!r}")
    for k in ("softmax_mode", "act_per_channel"):
        if k in quant_kw:
            raise ValueError(f"{fn}: {k} is set by the method; do not pass it")
    # no softmax quantiser yet: set_softmax adds the one the method asks for, fitted to the float probabilities
    q = quantize_model(model, w_bits, a_bits, softmax_mode=None, act_per_channel=POST_LN, **quant_kw)
    calibrate_model(q, calib, method=act_method, weight_method=weight_method)
    return q


def set_softmax(qmodel: nn.Module, model: nn.Module, images, kind: str = "sulq", *, bits: int | None = None,
                **search_kw) -> list[dict]:
    """Give every attention of ``qmodel`` a post-softmax quantiser fitted to the float ``model``'s probabilities
    on ``images``: kind "sulq" (``sulq_search``), "log2" (vitlab.quant.log2_params: levels max * 2^-k) or
    "uniform" (min-max). bits: default each attention's qkv input bits. Returns per block the parameters
    and the MSE on the calibration probabilities."""
    from vitlab.kernels.fake_quant import fake_quant_ref
    from vitlab.quant import FakeQuantizer, QuantAttention
    from vitlab.quant.calibrate import log2_params, minmax_params

    fn = "set_softmax"
    if kind not in ("sulq", "log2", "uniform"):
        raise ValueError(f"{fn}: kind must be 'sulq', 'log2' or 'uniform', got {kind!r}")
    attns = [m for m in qmodel.modules() if isinstance(m, QuantAttention)] if isinstance(qmodel, nn.Module) else []
    if not attns:
        raise ValueError(f"{fn}: qmodel has no QuantAttention; build it with vitlab.quant.quantize_model")
    if bits is not None:
        bits = _bits(bits, "bits", fn)
    probs = post_softmax_values(model, images)
    if len(probs) != len(attns):
        raise ValueError(f"{fn}: model has {len(probs)} blocks, qmodel has {len(attns)} attentions")
    out = []
    for attn, p in zip(attns, probs):
        b = bits if bits is not None else attn.qkv.a_quant.bits
        if kind == "sulq":
            s, e, err = sulq_search(p, b, **search_kw)
            sq = FakeQuantizer(b, mode="shift_log2")
            sq.set_params(s, eta=e)
            out.append({"scale": s, "eta": e, "mse": err})
        else:
            sq = FakeQuantizer(b, mode=kind)
            sq.set_params(*(log2_params(p, b) if kind == "log2" else minmax_params(p, b)))
            zp = sq.zero_point if kind == "uniform" else None
            err = float((fake_quant_ref(p, sq.scale, zp, b, mode=kind) - p).pow(2).mean())
            out.append({"scale": float(sq.scale), "mse": err})
        attn.softmax_quant = sq.to(attn.qkv.weight.device)
    return out


def repq_style_quantize(model: nn.Module, calib_images, w_bits: int = 4, a_bits: int = 4, *,
                        softmax: str = "log2", act_method: str = "mse", weight_method: str = "mse", base=None,
                        **quant_kw):
    """RepQ-ViT-style PTQ without reconstruction: post-LN inputs calibrated channel-wise, then reparameterised
    to per-tensor (``reparam_model``); weights per output channel fitted after; the softmax quantised with
    ``softmax`` ("log2" as RepQ-ViT's log quantiser, "uniform", or "sulq"). ``base``: a ``stage0`` model to copy
    instead of calibrating again. Returns the quantised copy."""
    fn = "repq_style_quantize"
    model = _vit(model, "model", fn)
    calib = _images(calib_images, fn)
    w_bits, a_bits = _bits(w_bits, "w_bits", fn), _bits(a_bits, "a_bits", fn)
    if softmax not in ("log2", "uniform", "sulq"):
        raise ValueError(f"{fn}: softmax must be 'log2', 'uniform' or 'sulq', got {softmax!r}")
    q = _from_base(base, model, calib, w_bits, a_bits, act_method, weight_method, fn, **quant_kw)
    set_softmax(q, model, calib, softmax)
    reparam_model(q, weight_method=weight_method)
    return q


def is_vit_quantize(model: nn.Module, calib_images, w_bits: int = 4, a_bits: int = 4, *, iters: int = 1000,
                    lr: float = 4e-5, batch_size: int = 32, act_method: str = "mse", weight_method: str = "mse",
                    seed: int = 0, base=None, **quant_kw):
    """I&S-ViT: SULQ on the softmax and the three-stage smooth optimisation. Returns (qmodel, info).

    Stage 0 builds the quantised copy (vitlab.quant.quantize_model; post-LN inputs per channel) and calibrates it
    on ``calib_images`` (activations with ``act_method``); the softmax quantisers become SULQ (``use_sulq``).
    Stage 1: weights off, activations on; ``block_reconstruct`` each block from float inputs to float outputs.
    Stage 2: ``reparam_model`` (post-LN quantisers become per tensor). Stage 3: weights refitted
    (``weight_method``) and on; ``block_reconstruct`` each block from the quantised model's inputs to the float
    outputs, block by block in order. ``iters`` / ``lr`` / ``batch_size`` per block and stage (iters=0: no
    reconstruction). info: {"sulq": per block, "stage1"/"stage3": per block losses, "reparam": per pair}.
    ``base``: a ``stage0`` model to copy instead of calibrating again. ``quant_kw`` go to quantize_model
    (e.g. edge_bits).
    """
    from vitlab.quant import set_quant_state

    fn = "is_vit_quantize"
    model = _vit(model, "model", fn)
    calib = _images(calib_images, fn)
    w_bits, a_bits = _bits(w_bits, "w_bits", fn), _bits(a_bits, "a_bits", fn)
    iters = _positive(iters, "iters", fn, integer=True, allow_zero=True)
    lr = _positive(lr, "lr", fn)
    batch_size = _positive(batch_size, "batch_size", fn, integer=True)
    if weight_method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"{fn}: weight_method must be 'minmax', 'percentile' or 'mse', got {weight_method!r}")
    dev = next(model.parameters()).device
    calib = calib.to(dev)
    # the weights are refitted after stage 2, so a fresh build fits them cheaply (min-max) for now
    q = _from_base(base, model, calib, w_bits, a_bits, act_method, "minmax" if base is None else weight_method, fn,
                   **quant_kw)
    info = {"sulq": use_sulq(q, model, calib)}
    fp_x = block_io(model, calib)  # float inputs / outputs of every block

    # stage 1: quantised activations (channel-wise post-LN, SULQ softmax), float weights
    set_quant_state(q, weights=False, acts=True)
    info["stage1"] = [block_reconstruct(blk, fp_x[i], fp_x[i + 1], iters=iters, lr=lr, batch_size=batch_size,
                                        seed=seed + i) for i, blk in enumerate(q.blocks)]
    # stage 2: channel-wise -> layer-wise, the same function
    info["reparam"] = reparam_model(q, weight_method=None)
    # stage 3: weights quantised (fitted to the reparameterised weights) and reconstruction again
    for layer in _quant_layers(q):
        layer.calibrate_weight(weight_method)
    set_quant_state(q, weights=True, acts=True)
    was = q.training
    q.eval()
    with torch.no_grad():
        x = q.embed(calib)
    info["stage3"] = []
    for i, blk in enumerate(q.blocks):
        info["stage3"].append(block_reconstruct(blk, x, fp_x[i + 1], iters=iters, lr=lr, batch_size=batch_size,
                                                seed=seed + 100 + i))
        with torch.no_grad():
            x = blk(x)
    q.train(was)
    return q, info


def _quant_layers(q):
    from vitlab.quant import quant_layers

    return quant_layers(q).values()
