"""LayerNorm with an optional fused residual add, forward and backward, in Triton.

    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias,    s = x (+ residual)

A pre-norm ViT block computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. Fusing "add, then
norm" reads the two summands once and writes both the new residual stream ``s`` and ``norm(s)``:
``y, s = layer_norm(h, w, b, residual=x)``.

Layout: the input is viewed as rows [M, C] (M = every leading dim). One program normalises a tile of
BLOCK_M rows x BLOCK_C columns (BLOCK_C = next power of two >= C, so a whole row sits in one tile).
Many rows per program keep the interpreter fast (its cost is per executed statement per program) and
give small-C rows (ViT-Ti: C=192) enough work per program on a GPU.

Backward: a fixed number of programs each loop over row tiles, write dx for their rows and accumulate partial
dweight and dbias in registers; every program writes its [C] partials (no zero-fill), and one torch reduction
over the programs finishes both.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import check_same_device, check_tensor, pick_configs, use_triton

__all__ = ["layer_norm", "layer_norm_ref", "layer_norm_triton", "LayerNormFunction"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_C = 16384  # one row must fit in one tile


def _acc(dtype: torch.dtype):
    """Accumulation dtype inside kernels: fp64 for fp64 inputs (gradcheck), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prune(configs, named_args, **kwargs):
    """Keep tiles of at most 16K elements on GPU (larger ones spill registers)."""
    block_c = kwargs.get("BLOCK_C") or triton.next_power_of_2(named_args["C"])
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * block_c <= 16384]
    return keep or configs[:1]


# The first config is the interpreter's (one config there: it cannot benchmark). 128 rows per program.
_CONFIGS = [triton.Config({"BLOCK_M": 128}, num_warps=8)] + [
    triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8, 16, 32) for w in (4, 8)
]


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=pick_configs(_CONFIGS), key=["C", "HAS_RES"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ln_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,  # X, R, S, Y: [M, C] row-strided; W, B: [C]; Mean, Rstd: [M] (ACC)
    M, C, stride_x, stride_r, stride_s, stride_y, eps,
    HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    cols = tl.arange(0, BLOCK_C)  # [BC]
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]  # [BM, BC]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
        # round the sum to its storage dtype first, so y is exactly the norm of the s we return
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(ACC)

    mean = tl.sum(x, axis=1) / C  # [BM]
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C  # biased variance, as nn.LayerNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
# The grid has a fixed number of programs, whatever BLOCK_M the autotuner picks: every program writes its row of
# partials (zeros when it got no tile), so the partials need no zero-fill and one sum finishes dweight and dbias.
@triton.autotune(configs=pick_configs(_CONFIGS), key=["C", "HAS_DS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ln_bwd_kernel(
    X, W, Mean, Rstd, DY, DS, DX, DWp, DBp,  # X, DY, DS, DX: [M, C]; DWp, DBp: [programs, C] (ACC), every row written
    M, C, stride_x, stride_dy, stride_ds, stride_dx,
    HAS_DS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_C,), dtype=ACC)
    db = tl.zeros((BLOCK_C,), dtype=ACC)
    for tile in range(pid, n_tiles, n_prog):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:  # gradient flowing into the returned residual stream s
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DWp + pid * C + cols, dw, mask=cmask)
    tl.store(DBp + pid * C + cols, db, mask=cmask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """View [..., C] as [M, C]; the last dim must be unit-stride (rows may be strided)."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"layer_norm: {name} must be contiguous in its last dim (got strides {t.stride()} "
                         f"for shape {tuple(t.shape)}); call .contiguous() first")
    return t.reshape(-1, t.shape[-1])  # a view when the leading dims can be merged, else a copy


def _check(x, weight, bias, eps, residual):
    check_tensor("x", x, dtypes=_DTYPES, op="layer_norm")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C > _MAX_C:
        raise ValueError(f"layer_norm: width C={C} is larger than the supported {_MAX_C}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, ndim=1, dtypes=_DTYPES, op="layer_norm")
        if t.shape[0] != C:
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}; expected ({C},) to match "
                             f"x's last dim")
    if residual is not None:
        check_tensor("residual", residual, dtypes=_DTYPES, op="layer_norm")
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)}; expected x's shape "
                             f"{tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps!r}")
    check_same_device("layer_norm", x=x, weight=weight, bias=bias, residual=residual)


def _out_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def layer_norm_fwd(x, weight, bias, eps=1e-6, residual=None):
    """Launch the forward kernel. Returns (y, s, mean, rstd); s is None without a residual."""
    C = x.shape[-1]
    x2 = _rows("x", x)  # [M, C]
    M = x2.shape[0]
    out_dtype = _out_dtype(x, residual)
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(-1, C)
    mean = torch.empty(M, dtype=acc_dtype, device=x.device)
    rstd = torch.empty(M, dtype=acc_dtype, device=x.device)
    if residual is not None:
        r2 = _rows("residual", residual)
        s = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        s2 = s.view(-1, C)
    else:
        r2 = s2 = x2  # unused (HAS_RES=False); any pointer will do
        s = None
    if M > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        _ln_fwd_kernel[grid](
            x2, r2, s2, y2, weight, bias, mean, rstd,
            M, C, x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0), float(eps),
            HAS_RES=residual is not None, ACC=_acc(out_dtype), BLOCK_C=triton.next_power_of_2(C),
        )
    return y, s, mean, rstd


def layer_norm_bwd(dy, ds, xs, weight, mean, rstd):
    """Launch the backward kernel on the normalised input ``xs`` (x, or s = x + residual).

    Returns (dx_total, dweight, dbias) where dx_total = dLN/dxs (+ ds when given).
    """
    C = xs.shape[-1]
    x2 = xs.reshape(-1, C)
    dy2 = dy.reshape(-1, C)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    ds2 = None
    if ds is not None:
        ds2 = ds.reshape(-1, C)
        if ds2.stride(-1) != 1:
            ds2 = ds2.contiguous()
    M = x2.shape[0]
    dx = torch.empty(xs.shape, dtype=xs.dtype, device=xs.device)
    dx2 = dx.view(-1, C)
    if M == 0:
        zero = torch.zeros(C, dtype=weight.dtype, device=xs.device)
        return dx, zero, zero.clone()
    # enough programs to fill the GPU (a fixed count: see the kernel); each loops over its share of row tiles
    n_prog = min(4 * _num_sms(xs.device.index or 0) if xs.is_cuda else 64, M)
    partials = torch.empty(2, n_prog, C, dtype=mean.dtype, device=xs.device)  # [dweight, dbias] per program
    _ln_bwd_kernel[(n_prog,)](
        x2, weight, mean, rstd, dy2, ds2 if ds2 is not None else dy2, dx2, partials[0], partials[1],
        M, C, x2.stride(0), dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, dx2.stride(0),
        HAS_DS=ds2 is not None, ACC=_acc(mean.dtype), BLOCK_C=triton.next_power_of_2(C),
    )
    dw, db = partials.sum(1).to(weight.dtype)  # one reduction over the programs for both
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (s or x, weight, mean, rstd); backward recomputes xhat."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them with unit stride
        y, s, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual)
        xs = x if s is None else s
        ctx.save_for_backward(xs, weight, mean, rstd)
        ctx.has_res = residual is not None
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        if s is None:
            return y
        return y, s

    @staticmethod
    def backward(ctx, dy, ds=None):
        xs, weight, mean, rstd = ctx.saved_tensors
        dxs, dw, db = layer_norm_bwd(dy, ds, xs, weight, mean, rstd)
        if not ctx.has_res:
            return dxs, dw, db, None, None
        # s = x + residual: both receive d(s)
        return dxs.to(ctx.dtypes[0]), dw, db, None, dxs.to(ctx.dtypes[1])


def layer_norm_triton(x, weight, bias, eps=1e-6, residual=None):
    """The Triton path (checks arguments, autograd-aware). Same contract as :func:`layer_norm`."""
    _check(x, weight, bias, eps, residual)
    return LayerNormFunction.apply(x, weight, bias, float(eps), residual)


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def layer_norm_ref(x, weight, bias, eps=1e-6, residual=None):
    """Pure PyTorch: the CPU path and the test oracle. Math in fp32 (fp64 for fp64 inputs)."""
    _check(x, weight, bias, eps, residual)
    out_dtype = _out_dtype(x, residual)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    if residual is not None:
        s = (x.to(acc) + residual.to(acc)).to(out_dtype)
        y = torch.nn.functional.layer_norm(s.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps)
        return y.to(out_dtype), s
    y = torch.nn.functional.layer_norm(x.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dim, with an optional fused residual add.

    x: [..., C]; weight, bias: [C]. Without ``residual`` returns y = LN(x) (x's dtype). With it
    returns ``(LN(x + residual), x + residual)`` (the pre-norm block's "add, then norm"), both in the
    promoted dtype of x and residual. Trains: grads for x, weight, bias and residual.
    Runs the Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1), else the reference.
    """
    if use_triton(x, weight, bias, residual):
        return layer_norm_triton(x, weight, bias, eps, residual)
    return layer_norm_ref(x, weight, bias, eps, residual)
