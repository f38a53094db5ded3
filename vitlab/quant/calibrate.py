"""Calibration: quantiser parameters from a tensor of sample values. Pure functions, no state.

Uniform (``b`` bits, ``qmax = 2**b - 1``): a clipping range [lo, hi] that always contains 0 (so 0 is
exactly representable: zero padding, ReLU/GELU zeros and dropped tokens stay 0) gives

    scale = (hi - lo) / qmax            zero_point = clamp(-rint(lo / scale), 0, qmax)   (asymmetric)
    scale = max(|lo|, |hi|) / (2**(b-1) - 1),   zero_point = 2**(b-1)                   (symmetric)

as torch's MinMaxObserver with quant range [0, qmax] (bit-exact for the asymmetric case). The methods
differ only in how they choose [lo, hi]:

    minmax_params      [min(x, 0), max(x, 0)]
    percentile_params  the (1 - q) and q quantiles (outliers clipped)
    mse_params         [lo, hi] clipped to [-r a, r a], a = max(|lo|, |hi|), for r in ``grid``: the r
                       minimising mean |x - fq(x)|^p

Log-domain quantisers (post-softmax values, see vitlab.kernels.fake_quant for the exact grids):

    log2_params        scale = max(x): levels max * 2^-k, k = 0..qmax, and 0
    shift_log2_params  SULQ: grid search of eta (I&S-ViT's candidates) and of the log-domain step s

Every function takes ``axis`` (None: one parameter set for the tensor; an int: one per channel along
that axis, the others pooled) and returns ``(scale, zero_point)`` (shift_log2: ``(scale, None, eta)``)
as float32 / int32 tensors of shape [] (per tensor) or [C] (per channel)::

    s, z = mse_params(w, 4, axis=0)          # per output channel of a Linear weight [out, in]
    w_hat = fake_quant(w, s, z, 4, axis=0)
"""
from __future__ import annotations

import numbers

import torch

from vitlab.kernels.fake_quant import fake_quant, fake_quant_ref

__all__ = ["range_params", "minmax_params", "percentile_params", "mse_params", "log2_params",
           "shift_log2_params", "ETAS", "channels_first"]

# I&S-ViT's candidate shifts for SULQ (zysxmu/IaS-ViT, LogSqrt2Quantizer.init_quantization_scale)
ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
_EPS = torch.finfo(torch.float32).eps  # smallest scale, as torch's observers


# ------------------------------------------------------------------------------------ argument checks
def _check_x(x, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x is empty (shape {tuple(x.shape)}); expected sample values")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: x holds NaN or inf values; expected finite sample values")
    return x


def _check_bits(bits, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in [2, 8], got {bits!r}")
    return int(bits)


def _check_axis(axis, x: torch.Tensor, fn: str):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: axis must be None or an int in [{-x.ndim}, {x.ndim}) for x of shape "
                         f"{tuple(x.shape)}, got {axis!r}")
    return int(axis) % x.ndim


def _check_grid(grid, name: str, fn: str, *, upper: float | None = None) -> torch.Tensor:
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: {name} must be a sequence of numbers, got {grid!r}") from None
    if g.numel() == 0 or not bool((g > 0).all()) or (upper is not None and not bool((g <= upper).all())):
        bound = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ValueError(f"{fn}: {name} must be a non-empty sequence of numbers in {bound}, got {grid!r}")
    return g


def channels_first(x: torch.Tensor, axis) -> torch.Tensor:
    """x as a float32 matrix [C, n]: one row per channel along ``axis`` (C = 1 for axis None)."""
    x = x.detach().float()
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _out(t: torch.Tensor, axis) -> torch.Tensor:
    return t.reshape(()) if axis is None else t  # per tensor: a 0-d tensor


# ------------------------------------------------------------------------------------ uniform
def range_params(lo, hi, bits: int, symmetric: bool = False):
    """(scale, zero_point) of the uniform grid covering [lo, hi] (tensors of equal shape, or numbers).

    The range is widened to contain 0 first. The building block of every uniform method below, and of
    methods that choose their own clipping range (clipped channel-wise ranges, SmoothQuant shifts).
    """
    fn = "range_params"
    bits = _check_bits(bits, fn)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{fn}: symmetric must be a bool, got {symmetric!r}")
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"{fn}: lo and hi must have the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if not bool((lo <= hi).all()):
        raise ValueError(f"{fn}: lo must be <= hi everywhere, got lo={lo} hi={hi}")
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (torch.maximum(-lo, hi) / float(half - 1)).clamp(min=_EPS)
        return scale, torch.full_like(scale, half, dtype=torch.int32)
    # the same operations, in the same order, as torch's observers: bit-exact with them
    scale = ((hi - lo) / float(qmax)).clamp(min=_EPS)
    zero_point = (-torch.round(lo / scale)).clamp(0, qmax).to(torch.int32)
    return scale, zero_point


def minmax_params(x: torch.Tensor, bits: int, axis=None, symmetric: bool = False):
    """Uniform parameters covering all of x (per channel when ``axis`` is given)."""
    fn = "minmax_params"
    _check_x(x, fn)
    bits, axis = _check_bits(bits, fn), _check_axis(axis, x, fn)
    m = channels_first(x, axis)
    s, z = range_params(m.amin(1), m.amax(1), bits, symmetric)
    return _out(s, axis), _out(z, axis)


def percentile_params(x: torch.Tensor, bits: int, axis=None, q: float = 0.9999, symmetric: bool = False):
    """Uniform parameters covering the [1 - q, q] quantiles of x: the rare outliers are clipped."""
    fn = "percentile_params"
    _check_x(x, fn)
    bits, axis = _check_bits(bits, fn), _check_axis(axis, x, fn)
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.5 < q <= 1.0:
        raise ValueError(f"{fn}: q must be a number in (0.5, 1], got {q!r}")
    m = channels_first(x, axis)
    k = torch.tensor([1.0 - q, q], dtype=torch.float32)
    lo, hi = torch.quantile(m, k.to(m.device), dim=1)  # torch.quantile caps at 2**24 elements: observers subsample
    s, z = range_params(lo, hi, bits, symmetric)
    return _out(s, axis), _out(z, axis)


def _qdq(x, scale, zero_point, bits, axis, mode="uniform", eta=None):
    # The searches try many candidates: the kernel on CUDA; elsewhere the PyTorch reference, even under
    # TRITON_INTERPRET=1 (the interpreter is ~15x slower; uniform mode is bit-exact between the two).
    f = fake_quant if x.is_cuda else fake_quant_ref
    return f(x, scale, zero_point, bits, axis=axis, mode=mode, eta=eta)


def _lp(m: torch.Tensor, m_hat: torch.Tensor, p: float) -> torch.Tensor:
    return (m - m_hat).abs().pow(p).mean(1)  # one error per channel (row)


def mse_params(x: torch.Tensor, bits: int, axis=None, grid=None, symmetric: bool = False, p: float = 2.0):
    """Uniform parameters of the clipping range [max(lo, -r a), min(hi, r a)], a = max(|lo|, |hi|), r in
    ``grid``, with the least mean |x - fq(x)|^p, chosen per channel when ``axis`` is given.

    Clipping at +-r a (rather than scaling both ends, r lo and r hi, as RepQ-ViT's search does) lets a
    one-sided outlier be clipped without also cutting the other side. ``grid`` defaults to r = 1.00, 0.98,
    ..., 0.02. r = 1 (min-max) is always tried, so the error is never above min-max's. Cost: one fake
    quantisation of x per candidate (FakeQuantizer observes a bounded sample for this reason).
    """
    fn = "mse_params"
    _check_x(x, fn)
    bits, axis = _check_bits(bits, fn), _check_axis(axis, x, fn)
    grid = torch.linspace(1.0, 0.02, 50) if grid is None else _check_grid(grid, "grid", fn, upper=1.0)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or p <= 0:
        raise ValueError(f"{fn}: p must be a positive number, got {p!r}")
    m = channels_first(x, axis)  # [C, n]: channel axis 0 from here on
    # the uniform grid always holds 0, so widen first: clipping an all-positive channel at r·a must not cross lo
    lo, hi = m.amin(1).clamp(max=0.0), m.amax(1).clamp(min=0.0)
    a = torch.maximum(-lo, hi)
    best_s, best_z = range_params(lo, hi, bits, symmetric)
    best_err = _lp(m, _qdq(m, best_s, best_z, bits, 0), p)
    for r in grid.tolist():
        s, z = range_params(torch.maximum(lo, -r * a), torch.minimum(hi, r * a), bits, symmetric)
        err = _lp(m, _qdq(m, s, z, bits, 0), p)
        better = err < best_err  # strict: ties keep the wider range
        best_s, best_z, best_err = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                    torch.where(better, err, best_err))
    return _out(best_s, axis), _out(best_z, axis)


# ------------------------------------------------------------------------------------ log domain
def log2_params(x: torch.Tensor, bits: int, axis=None):
    """(scale, None) for mode "log2": scale = max(x), so the top level is the largest value and the
    2**bits levels halve from there (values below the last level flush to 0). For softmax rows whose
    max is near 1 this is FQ-ViT's grid 1, 1/2, 1/4, ... up to rounding of the scale."""
    fn = "log2_params"
    _check_x(x, fn)
    bits, axis = _check_bits(bits, fn), _check_axis(axis, x, fn)
    top = channels_first(x, axis).amax(1)
    scale = torch.where(top > 0, top, torch.ones_like(top))  # no positive value: any scale, all flush to 0
    return _out(scale, axis), None


def shift_log2_params(x: torch.Tensor, bits: int, axis=None, etas=ETAS, grid=None, p: float = 2.0):
    """(scale, None, eta) for mode "shift_log2" (SULQ) by grid search of the least mean |x - fq(x)|^p.

    For each shift eta the log-domain step that just reaches the smallest value is
    s0 = -log2(min(x) + eta) / qmax (the top level, q = 0, is 2^0 - eta = 1 - eta, fixed); the search
    tries s = r * s0 for r in ``grid`` (default 0.5 ... 1.5). x should be >= 0 and <= 1 (probabilities).
    """
    fn = "shift_log2_params"
    _check_x(x, fn)
    bits, axis = _check_bits(bits, fn), _check_axis(axis, x, fn)
    etas = _check_grid(etas, "etas", fn)
    grid = torch.linspace(0.5, 1.5, 21) if grid is None else _check_grid(grid, "grid", fn)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or p <= 0:
        raise ValueError(f"{fn}: p must be a positive number, got {p!r}")
    qmax = 2 ** bits - 1
    m = channels_first(x, axis)
    lo = m.amin(1)
    best = None
    for eta in etas.tolist():
        e = torch.full_like(lo, eta)
        # step reaching the smallest value; at least a tiny positive step when min(x) + eta >= 1
        s0 = (-torch.log2((lo + eta).clamp(min=1e-30)) / qmax).clamp(min=1e-6)
        for r in grid.tolist():
            s = s0 * r
            err = _lp(m, _qdq(m, s, None, bits, 0, mode="shift_log2", eta=e), p)
            if best is None:
                best = [s, e, err]
                continue
            better = err < best[2]
            best = [torch.where(better, s, best[0]), torch.where(better, e, best[1]),
                    torch.where(better, err, best[2])]
    return _out(best[0], axis), None, _out(best[1], axis)
