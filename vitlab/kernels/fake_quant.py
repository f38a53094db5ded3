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

import numpy as np
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


# How the kernel finds each element's parameters (the LAYOUT constexpr). The host path builds no tensors and
# never syncs: Python numbers go in as scalar arguments, tensors as they are (the kernel converts on load).
TENSOR, FLAT, ROWS = 0, 1, 2  # per tensor; per channel, channel = (i // inner) % P per element; per channel,
#   one row of `inner` elements per program row (channel = row % P once per program: no per-element division)
ROWS_MIN_INNER = 256  # rows shorter than this waste most of a program: those take FLAT


@triton.jit
def _fake_quant_kernel(
    X, Y, Keep,  # X, Y, Keep: flat [n] (x viewed as [outer, P, inner] per channel)
    Scale, Zp, Eta, s_val, zp_val, eta_val,  # each parameter: a tensor [P] (any real dtype) or a scalar
    n, inner, P, qmax,
    MODE: tl.constexpr, LAYOUT: tl.constexpr, S_T: tl.constexpr, Z_T: tl.constexpr, E_T: tl.constexpr,
    STORE_KEEP: tl.constexpr, BIG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    if LAYOUT == 2:  # ROWS: grid (cdiv(inner, BLOCK), rows); this program's row has one channel
        row = tl.program_id(1)
        col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if BIG:
            offs = row.to(tl.int64) * inner + col
        else:
            offs = row * inner + col
        mask = col < inner
        ch = row % P
    else:
        pid = tl.program_id(0)
        if BIG:  # int64 offsets only when n needs them (int64 division is slow on GPU)
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if LAYOUT == 1:
            ch = (offs // inner) % P  # in [0, P) for every lane, masked or not: no mask needed
        else:
            ch = 0
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if S_T:
        s = tl.load(Scale + ch).to(ACC)
    else:
        s = s_val * tl.full([], 1.0, ACC)  # a scalar argument (fp32, rounded by the launcher)
    # the correctly rounded fp32 reciprocal, as torch's fake_quantize multiplies by (bit-exact uniform mode)
    inv = tl.math.div_rn(tl.full([], 1.0, ACC), s)
    if MODE == 0:  # uniform
        if Z_T:
            z = tl.load(Zp + ch).to(ACC)
        else:
            z = zp_val * tl.full([], 1.0, ACC)
        qf = _rint(x * inv) + z
        q = tl.minimum(tl.maximum(qf, 0.0), qmax)
        y = (q - z) * s
    elif MODE == 1:  # log2
        t = x * inv
        pos = t > 0
        qf = tl.where(pos, _rint(-tl.log2(tl.where(pos, t, 1.0))), qmax + 1.0)
        y = tl.where(qf > qmax, 0.0, s * tl.exp2(-tl.maximum(qf, 0.0)))
    else:  # shift_log2
        if E_T:
            eta = tl.load(Eta + ch).to(ACC)
        else:
            eta = eta_val * tl.full([], 1.0, ACC)
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
def _param(name, v, P, *, integer=False, positive=False, low=None, high=None):
    """A parameter as given: a Python number (per tensor) stays a float; a tensor is checked and viewed as
    [P] in its own dtype and device (the kernel converts on load: no copies, no host-device syncs)."""
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
        v = v.detach().reshape(P)
        if not v.is_cuda:  # checking a GPU tensor's values would sync: the caller calibrated it
            bad = (v <= 0) if positive else ((v < low) | (v > high)) if low is not None else None
            if bad is not None and bool(bad.any()):
                raise ValueError(_range_msg(name, v.tolist() if P > 1 else v.item(), positive, low, high))
        return v
    v = float(v)
    if integer and v != int(v):
        raise TypeError(f"fake_quant: {name} must be an integer, got {v!r}")
    if (positive and not v > 0) or (low is not None and not low <= v <= high):
        raise ValueError(_range_msg(name, int(v) if integer else v, positive, low, high))
    return v


def _range_msg(name, v, positive, low, high):
    return f"fake_quant: {name} must {'be > 0' if positive else f'lie in [{low}, {high}]'}, got {v!r}"


def _prepare(x, scale, zero_point, bits, axis, mode, eta):
    """Validate; return (P, inner, qmax, scale, zp, eta): floats per tensor, else tensors [P] on x's device."""
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
    s = _param("scale", scale, P, positive=True)
    if mode == "uniform":
        if zero_point is None:
            raise ValueError("fake_quant: mode 'uniform' needs a zero_point (an int in [0, 2**bits - 1])")
        zp = _param("zero_point", zero_point, P, integer=True, low=0, high=qmax)
    else:
        if zero_point is not None and not (isinstance(zero_point, numbers.Real) and zero_point == 0):
            raise ValueError(f"fake_quant: zero_point is not used by mode {mode!r}; pass None (got {zero_point!r})")
        zp = 0.0
    if mode == "shift_log2":
        if eta is None:
            raise ValueError("fake_quant: mode 'shift_log2' needs eta (the shift, > 0)")
        e = _param("eta", eta, P, positive=True)
    else:
        if eta is not None:
            raise ValueError(f"fake_quant: eta is only used by mode 'shift_log2' (mode is {mode!r})")
        e = 0.0
    for name, t in (("scale", s), ("zero_point", zp), ("eta", e)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"fake_quant: {name} is on {t.device}, x on {x.device}; put them on one device")
    return P, inner, qmax, s, zp, e


# ----------------------------------------------------------------------------------------------------
# launcher and autograd
# ----------------------------------------------------------------------------------------------------
def fake_quant_fwd(x, params, mode, per_channel, store_keep):
    """Launch the kernel on contiguous x. Returns (x_hat, keep uint8 or None)."""
    P, inner, qmax, s, zp, e = params
    x = x.contiguous()  # elementwise: a copy costs what the kernel costs, so accept any layout
    # Triton's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): there, write
    # fp32 and let torch round, so bf16 results stay bit-exact with torch's fake_quantize.
    bf16_fix = interpreting() and x.dtype == torch.bfloat16
    y = torch.empty_like(x, dtype=torch.float32 if bf16_fix else x.dtype)
    keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if store_keep else None
    n = x.numel()
    if n == 0:
        return (y.to(torch.bfloat16) if bf16_fix else y), keep
    rows = n // inner
    if not per_channel:
        layout = TENSOR
    else:
        layout = ROWS if inner >= ROWS_MIN_INNER and rows <= 65535 else FLAT
    block = 65536 if interpreting() else 2048
    if layout == ROWS:
        block = min(block, triton.next_power_of_2(inner))
        grid = (triton.cdiv(inner, block), rows)
    else:
        grid = (triton.cdiv(n, block),)
    ptr = lambda t: t if isinstance(t, torch.Tensor) else x  # noqa: E731  (an unused pointer slot)
    val = lambda t: 0.0 if isinstance(t, torch.Tensor) else float(np.float32(t))  # noqa: E731  (fp32, as torch)
    _fake_quant_kernel[grid](
        x, y, keep if store_keep else y, ptr(s), ptr(zp), ptr(e), val(s), val(zp), val(e), n, inner, P,
        float(qmax), MODE=MODES.index(mode), LAYOUT=layout, S_T=isinstance(s, torch.Tensor),
        Z_T=isinstance(zp, torch.Tensor), E_T=isinstance(e, torch.Tensor), STORE_KEEP=store_keep,
        BIG=n + block >= 2 ** 31, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=block,
        num_warps=8,
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
    P, inner, qmax, s, zp, e = _prepare(x, scale, zero_point, bits, axis, mode, eta)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis % x.ndim] = P
    s, zp, e = (torch.as_tensor(t, device=x.device).to(torch.float32).reshape(-1).expand(P).to(acc).reshape(shape)
                for t in (s, zp, e))
    inv = (1.0 / s.float()).to(acc)  # the fp32 reciprocal, as torch's fake_quantize (bit-exact uniform mode)
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
