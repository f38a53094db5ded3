"""Linear + bias + exact GELU (the FFN's first layer) as one Triton GEMM with a fused epilogue.

    out = gelu(x @ weight.T + bias),    gelu(h) = h * Phi(h) = 0.5 * h * (1 + erf(h / sqrt(2)))

The FFN holds about two thirds of a ViT's FLOPs. The forward is a tiled ``tl.dot`` GEMM (Triton
tutorial layout, grouped program order for L2 reuse) whose epilogue adds the bias and applies the
exact (erf) GELU before the single store, so the pre-activation never makes a round trip through
memory unless backward needs it.

Backward (honest split): the two GEMMs, dx = dh @ W and dW = dh.T @ x, are torch matmuls (cuBLAS
is hard to beat there); the part that is ours is a Triton elementwise kernel for the GELU
derivative, dh = dy * (Phi(h) + h * phi(h)), applied to the pre-activation saved by the forward
(torch's eager nn.Linear + nn.GELU saves the same tensor, so memory is the same as eager).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_same_device, check_tensor, interpreting, pick_configs, use_triton

__all__ = ["linear_gelu", "linear_gelu_ref", "linear_gelu_triton", "gelu_backward", "LinearGeluFunction"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot: the input's on GPU (tensor cores); fp32 in the interpreter (bf16 bug)."""
    if interpreting() or dtype == torch.float32:
        return tl.float32 if dtype != torch.float64 else tl.float64
    return _TL[dtype]


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch: TF32 only if torch.backends.cuda.matmul.allow_tf32 is on."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # ignored for 16-bit operands


# The first config is the interpreter's (big tiles: few programs, few loop trips).
_MM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=3, num_warps=4),
]


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # h * Phi(h); 0.707... = 1/sqrt(2)


# ----------------------------------------------------------------------------------------------------
# forward: GEMM + bias + GELU epilogue
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=pick_configs(_MM_CONFIGS), key=["M", "N", "K", "STORE_PRE"])
@triton.jit
def _linear_gelu_kernel(
    X, W, Bias, Pre, Out,  # X: [M, K]; W: [N, K]; Bias: [N]; Pre, Out: [M, N] (contiguous)
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grouped ordering: consecutive programs share W tiles (and X tiles) in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = X + rm[:, None] * stride_xm + rk[None, :] * stride_xk  # [BM, BK]
    b_ptrs = W + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # [BK, BN]: a tile of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < K - k0), other=0.0)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    # epilogue: bias, (pre-activation for backward), exact GELU
    nmask = rn < N
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(ACC)[None, :]
    mask = (rm[:, None] < M) & nmask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if STORE_PRE:
        tl.store(Pre + offs, acc.to(Pre.dtype.element_ty), mask=mask)
    tl.store(Out + offs, _gelu(acc).to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# backward: elementwise GELU derivative
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_bwd_kernel(DY, H, DH, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # DY, H, DH: flat [n]. gelu'(h) = Phi(h) + h * phi(h)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(H + offs, mask=mask, other=0.0).to(ACC)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # phi(h); 0.398... = 1/sqrt(2 pi)
    tl.store(DH + offs, (dy * (cdf + h * pdf)).to(DH.dtype.element_ty), mask=mask)


def gelu_backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dL/dh for out = gelu(h), exact erf GELU, via the Triton kernel. Same shape and dtype as h."""
    dy = dy.contiguous()
    h = h.contiguous()
    if dy.shape != h.shape:
        raise ValueError(f"gelu_backward: dy has shape {tuple(dy.shape)}; expected h's {tuple(h.shape)}")
    dh = torch.empty_like(h)
    n = h.numel()
    block = 65536 if interpreting() else 1024
    if n > 0:
        _gelu_bwd_kernel[(triton.cdiv(n, block),)](dy, h, dh, n, ACC=_acc(h.dtype), BLOCK=block,
                                                   num_warps=4)
    return dh


# ----------------------------------------------------------------------------------------------------
# launcher and autograd
# ----------------------------------------------------------------------------------------------------
def _check(x, weight, bias):
    check_tensor("x", x, dtypes=_DTYPES, op="linear_gelu")
    check_tensor("weight", weight, ndim=2, dtypes=_DTYPES, op="linear_gelu")
    if x.ndim < 1:
        raise ValueError(f"linear_gelu: x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K or K == 0:
        raise ValueError(f"linear_gelu: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; "
                         f"expected x [..., K] and weight [N, K] with the same K > 0")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=_DTYPES, op="linear_gelu")
        if bias.shape[0] != N:
            raise ValueError(f"linear_gelu: bias has shape {tuple(bias.shape)}; expected ({N},) = weight's N")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"linear_gelu: {name} has dtype {t.dtype} but x has {x.dtype}; they must match "
                            f"(under torch.autocast the public linear_gelu casts them for you)")
    check_same_device("linear_gelu", x=x, weight=weight, bias=bias)


def linear_gelu_fwd(x, weight, bias, store_pre: bool):
    """Launch the GEMM. x [..., K], weight [N, K] -> (out [..., N], pre [..., N] or None)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)  # [M, K], any strides (so is weight: its strides are passed)
    bias = bias.contiguous() if bias is not None else None
    M = x2.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if store_pre else None
    if M > 0 and N > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _linear_gelu_kernel[grid](
            x2, weight, bias if bias is not None else weight, pre if store_pre else out, out,
            M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, STORE_PRE=store_pre, ACC=_acc(x.dtype), DOT=_dot_dtype(x.dtype),
            PREC=_precision(x.dtype), GROUP_M=8,
        )
    return out, pre


class LinearGeluFunction(torch.autograd.Function):
    """Forward: fused Triton GEMM + GELU (saves the pre-activation). Backward: Triton GELU' + torch GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, needs_grad):
        out, pre = linear_gelu_fwd(x, weight, bias, store_pre=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, weight, pre)
            ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, pre = ctx.saved_tensors
        N, K = weight.shape
        dh = gelu_backward(dout, pre).reshape(-1, N)  # [M, N]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dh @ weight).reshape(x.shape)  # [M, K]
        if ctx.needs_input_grad[1]:
            dw = dh.t() @ x.reshape(-1, K)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dh.sum(0, dtype=torch.float64 if dh.dtype == torch.float64 else torch.float32).to(dh.dtype)
        return dx, dw, db, None


def linear_gelu_triton(x, weight, bias=None):
    """The Triton path (checks arguments, autograd-aware). Same contract as :func:`linear_gelu`."""
    _check(x, weight, bias)
    # decided here: inside Function.forward grad mode is always off, and needs_input_grad ignores no_grad
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return LinearGeluFunction.apply(x, weight, bias, needs_grad)


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def linear_gelu_ref(x, weight, bias=None):
    """Pure PyTorch (eager nn.Linear + exact nn.GELU): the CPU path and the test oracle."""
    _check(x, weight, bias)
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="none")


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def _autocast_args(x, weight, bias):
    """Mimic F.linear under torch.autocast: cast floating inputs to the autocast dtype."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


def linear_gelu(x, weight, bias=None):
    """gelu_erf(x @ weight.T + bias). x: [..., K]; weight: [N, K]; bias: [N] or None -> [..., N].

    Forward and backward. Runs the Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1), else
    the reference. Under torch.autocast the inputs are cast like F.linear's.
    """
    if not all(isinstance(t, torch.Tensor) for t in (x, weight)) or not isinstance(bias, (torch.Tensor, type(None))):
        _check(x, weight, bias)  # raises a TypeError naming the argument
    x, weight, bias = _autocast_args(x, weight, bias)
    if use_triton(x, weight, bias):
        return linear_gelu_triton(x, weight, bias)
    return linear_gelu_ref(x, weight, bias)
