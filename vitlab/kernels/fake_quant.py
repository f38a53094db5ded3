"""Fake quantisation (quantise, then dequantise) for the quantisation chapter, with a straight-through
backward. Three quantisers, ``b`` bits (2 <= b <= 8), ``qmax = 2**b - 1``, rint = round half to even:

uniform (asymmetric, unsigned codes; ``axis`` None: per tensor, else per channel along ``axis``)
    q     = clamp(rint(x * (1/s)) + z, 0, qmax)          z: integer zero point in [0, qmax]
    x_hat = (q - z) * s
    Bit-exact with torch.fake_quantize_per_tensor_affine / per_channel_affine (same formula: multiply
    by the fp32 reciprocal of the scale). A symmetric signed grid is z = 2**(b-1).

log2 (for post-softmax values in [0, 1], FQ-ViT style; s = 1 is the scale-free grid 1, 1/2, 1/4, ...)
    q     = rint(-log2(x / s))                           (x <= 0: q = +inf)
    x_hat = s * 2**-max(q, 0)   if q <= qmax,  else 0    (levels s * 2^-k, k = 0..qmax, plus 0)

shift_log2 (I&S-ViT's shift-uniform-log2 quantiser, SULQ, as defined here: shift by eta > 0, then a
uniform grid of step s in the log2 domain, then shift back; zero_point is unused)
    q     = clamp(rint(-log2(x + eta) / s), 0, qmax)      (x + eta <= 0: q = qmax)
    x_hat = 2**(-s * q) - eta
    The shift keeps tiny softmax values off the (unbounded) far end of the log axis, so all 2**b
    levels land where the values are, and 0 maps to about 0 (x_hat = 2**(-s q) - eta with
    2**(-s q) close to eta) instead of being flushed.

Straight-through estimator: dx = dy where the clamp is inactive (q before clamping lies in
[0, qmax], i.e. x is inside the representable range), 0 elsewhere, as torch's fake_quantize. Scale,
zero point and eta get no gradient (calibrated, not learned here).

The log modes call log2 and exp2 (the GPU uses fast approximate versions), so on values within about
1e-7 of a rounding tie the kernel and the reference may pick neighbouring levels; uniform mode has no
transcendental and is bit-exact.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._dispatch import check_tensor, interpreting, use_triton

__all__ = ["fake_quant", "fake_quant_ref", "fake_quant_triton", "FakeQuantFunction", "MODES"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("uniform", "log2", "shift_log2")
_BITS = (2, 8)


# ----------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rint(v):
    """Round half to even without libdevice: floor, then fix exact .5 ties towards the even integer."""
    a = tl.abs(v)
    f = tl.floor(a)
    d = a - f  # exact: a and f are within a factor 2 of each other (or f = 0)
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    r = f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)
    return tl.where(v < 0, -r, r)


@triton.jit
def _fake_quant_kernel(
    X, Y, Keep, Scale, InvScale, Zp, Eta,  # X, Y, Keep: flat [n]; Scale, InvScale, Zp, Eta: [P] (fp32)
    n, inner, P, qmax,
    MODE: tl.constexpr, PER_CHANNEL: tl.constexpr, STORE_KEEP: tl.constexpr, BIG: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if BIG:  # int64 offsets only when n needs them (int64 division is slow on GPU)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if PER_CHANNEL:  # x viewed as [outer, P, inner]
        ch = (offs // inner) % P
    else:
        ch = offs * 0
    s = tl.load(Scale + ch, mask=mask, other=1.0).to(ACC)
    inv = tl.load(InvScale + ch, mask=mask, other=1.0).to(ACC)
    if MODE == 0:  # uniform
        z = tl.load(Zp + ch, mask=mask, other=0.0).to(ACC)
        qf = _rint(x * inv) + z
        q = tl.minimum(tl.maximum(qf, 0.0), qmax)
        y = (q - z) * s
    elif MODE == 1:  # log2
        t = x * inv
        pos = t > 0
        qf = tl.where(pos, _rint(-tl.log2(tl.where(pos, t, 1.0))), qmax + 1.0)
        y = tl.where(qf > qmax, 0.0, s * tl.exp2(-tl.maximum(qf, 0.0)))
    else:  # shift_log2
        eta = tl.load(Eta + ch, mask=mask, other=0.0).to(ACC)
        u = x + eta
        pos = u > 0
        qf = tl.where(pos, _rint(-tl.log2(tl.where(pos, u, 1.0)) * inv), qmax + 1.0)
        q = tl.minimum(tl.maximum(qf, 0.0), qmax)
        y = tl.exp2(-s * q) - eta
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_KEEP:  # straight-through mask: inside the clamp range
        keep = (qf >= 0.0) & (qf <= qmax)
        tl.store(Keep + offs, keep.to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------------------------------
# argument handling (shared by the kernel path and the reference)
# ----------------------------------------------------------------------------------------------------
def _param(name, v, P, device, *, integer=False):
    """A per-tensor (P=1) or per-channel (P) parameter as an fp32 tensor of shape [P] on ``device``."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
        raise TypeError(f"fake_quant: {name} must be a number or a tensor, got {type(v).__name__}")
    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"fake_quant: {name} has dtype {v.dtype}; expected a real dtype")
        if integer and v.is_floating_point():
            raise TypeError(f"fake_quant: {name} must be an integer tensor (int32/int64), got {v.dtype}")
        if v.numel() != P:
            want = "1 (per tensor: axis=None)" if P == 1 else f"{P} (one per channel along axis)"
            raise ValueError(f"fake_quant: {name} has {v.numel()} elements (shape {tuple(v.shape)}); "
                             f"expected {want}")
        return v.detach().reshape(P).to(device=device, dtype=torch.float32)
    if integer and float(v) != int(v):
        raise TypeError(f"fake_quant: {name} must be an integer, got {v!r}")
    return torch.full((P,), float(v), dtype=torch.float32, device=device)


def _prepare(x, scale, zero_point, bits, axis, mode, eta):
    """Validate; return (P, inner, scale [P], inv_scale [P], zp [P], eta [P]) as fp32 tensors."""
    check_tensor("x", x, dtypes=_DTYPES, op="fake_quant")
    if mode not in MODES:
        raise ValueError(f"fake_quant: unknown mode {mode!r}; valid: {list(MODES)}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not _BITS[0] <= bits <= _BITS[1]:
        raise ValueError(f"fake_quant: bits must be an int in [{_BITS[0]}, {_BITS[1]}], got {bits!r}")
    if axis is None:
        P, inner = 1, 1
    else:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
            raise ValueError(f"fake_quant: axis must be None or an int in [{-x.ndim}, {x.ndim}) for x of "
                             f"shape {tuple(x.shape)}, got {axis!r}")
        axis = axis % x.ndim
        P = x.shape[axis]
        inner = 1
        for d in x.shape[axis + 1:]:
            inner *= d
    qmax = 2 ** int(bits) - 1
    s = _param("scale", scale, P, x.device)
    if (not isinstance(scale, torch.Tensor) or not scale.is_cuda) and not bool((s > 0).all()):
        raise ValueError(f"fake_quant: scale must be > 0, got {scale!r}")
    inv = 1.0 / s  # the fp32 reciprocal, as torch's fake_quantize (bit-exact uniform mode)
    if mode == "uniform":
        if zero_point is None:
            raise ValueError("fake_quant: mode 'uniform' needs a zero_point (an int in [0, 2**bits - 1])")
        zp = _param("zero_point", zero_point, P, x.device, integer=True)
        if (not isinstance(zero_point, torch.Tensor) or not zero_point.is_cuda) and \
                not bool(((zp >= 0) & (zp <= qmax)).all()):
            raise ValueError(f"fake_quant: zero_point must lie in [0, {qmax}] for {bits} bits, got {zero_point!r}")
    else:
        if zero_point is not None and not (isinstance(zero_point, numbers.Real) and zero_point == 0):
            raise ValueError(f"fake_quant: zero_point is not used by mode {mode!r}; pass None (got {zero_point!r})")
        zp = torch.zeros(P, dtype=torch.float32, device=x.device)
    if mode == "shift_log2":
        if eta is None:
            raise ValueError("fake_quant: mode 'shift_log2' needs eta (the shift, > 0)")
        e = _param("eta", eta, P, x.device)
        if (not isinstance(eta, torch.Tensor) or not eta.is_cuda) and not bool((e > 0).all()):
            raise ValueError(f"fake_quant: eta must be > 0, got {eta!r}")
    else:
        if eta is not None:
            raise ValueError(f"fake_quant: eta is only used by mode 'shift_log2' (mode is {mode!r})")
        e = torch.zeros(P, dtype=torch.float32, device=x.device)
    return P, inner, qmax, s, inv, zp, e


# ----------------------------------------------------------------------------------------------------
# launcher and autograd
# ----------------------------------------------------------------------------------------------------
def fake_quant_fwd(x, params, mode, per_channel, store_keep):
    """Launch the kernel on contiguous x. Returns (x_hat, keep uint8 or None)."""
    P, inner, qmax, s, inv, zp, e = params
    x = x.contiguous()  # elementwise: a copy costs what the kernel costs, so accept any layout
    # Triton's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): there, write
    # fp32 and let torch round, so bf16 results stay bit-exact with torch's fake_quantize.
    bf16_fix = interpreting() and x.dtype == torch.bfloat16
    y = torch.empty_like(x, dtype=torch.float32 if bf16_fix else x.dtype)
    keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if store_keep else None
    n = x.numel()
    block = 65536 if interpreting() else 2048
    if n > 0:
        _fake_quant_kernel[(triton.cdiv(n, block),)](
            x, y, keep if store_keep else y, s, inv, zp, e, n, inner, P, float(qmax),
            MODE=MODES.index(mode), PER_CHANNEL=per_channel, STORE_KEEP=store_keep, BIG=n + block >= 2 ** 31,
            ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=block, num_warps=8,
        )
    return (y.to(torch.bfloat16) if bf16_fix else y), keep


class FakeQuantFunction(torch.autograd.Function):
    """Forward: the Triton kernel (also writes the STE mask). Backward: dy * mask (one torch op)."""

    @staticmethod
    def forward(ctx, x, params, mode, per_channel, needs_grad):
        y, keep = fake_quant_fwd(x, params, mode, per_channel, store_keep=needs_grad)
        if keep is not None:
            ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return dy * keep, None, None, None, None


def fake_quant_triton(x, scale, zero_point, bits, *, axis=None, mode="uniform", eta=None):
    """The Triton path of :func:`fake_quant` (autograd-aware)."""
    params = _prepare(x, scale, zero_point, bits, axis, mode, eta)
    needs_grad = torch.is_grad_enabled() and x.requires_grad  # no STE mask to write under no_grad
    return FakeQuantFunction.apply(x, params, mode, axis is not None, needs_grad)


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def _rint_ref(v):
    return torch.round(v)  # torch.round rounds half to even


def fake_quant_ref(x, scale, zero_point, bits, *, axis=None, mode="uniform", eta=None):
    """Pure PyTorch fake quantisation with the same definitions and STE; the CPU path and the oracle."""
    P, inner, qmax, s, inv, zp, e = _prepare(x, scale, zero_point, bits, axis, mode, eta)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis % x.ndim] = P
    s, inv, zp, e = (t.to(acc).reshape(shape) for t in (s, inv, zp, e))
    xf = x.to(acc)
    with torch.no_grad():
        if mode == "uniform":
            qf = _rint_ref(xf * inv) + zp
            y = (qf.clamp(0, qmax) - zp) * s
        elif mode == "log2":
            t = xf * inv
            pos = t > 0
            qf = torch.where(pos, _rint_ref(-torch.log2(torch.where(pos, t, 1.0))), qmax + 1.0)
            y = torch.where(qf > qmax, 0.0, s * torch.exp2(-qf.clamp_min(0)))
        else:
            u = xf + e
            pos = u > 0
            qf = torch.where(pos, _rint_ref(-torch.log2(torch.where(pos, u, 1.0)) * inv), qmax + 1.0)
            y = torch.exp2(-s * qf.clamp(0, qmax)) - e
        keep = (qf >= 0) & (qf <= qmax)
    y = y.to(x.dtype)
    if x.requires_grad:  # straight-through: y = x + (y - x).detach(), gradient masked outside the range
        y = y.detach() + (x - x.detach()) * keep
    return y


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def fake_quant(x, scale, zero_point, bits, *, axis=None, mode="uniform", eta=None):
    """Quantise-dequantise ``x`` at ``bits`` bits with a straight-through backward.

    mode "uniform": asymmetric, per tensor (axis None: scale a number or 1-element tensor,
    zero_point an int) or per channel (axis: scale [C] float, zero_point [C] int); bit-exact with
    torch.fake_quantize_per_{tensor,channel}_affine(x, scale, zero_point, [axis,] 0, 2**bits - 1).
    mode "log2": x_hat = scale * 2**-rint(-log2(x / scale)) on 2**bits levels, 0 below (zero_point None).
    mode "shift_log2": x_hat = 2**(-scale * q) - eta, q = clamp(rint(-log2(x + eta) / scale)) (needs eta).
    See the module docstring for the exact definitions. Returns a tensor like x.
    """
    if use_triton(x):
        return fake_quant_triton(x, scale, zero_point, bits, axis=axis, mode=mode, eta=eta)
    return fake_quant_ref(x, scale, zero_point, bits, axis=axis, mode=mode, eta=eta)
