"""ReLU-kernel linear attention (L2ViT's local-to-global "LinearAttention"), kv-first:

    phi = relu
    KV  = sum_j phi(k_j)^T v_j          [D, Dv]      z = sum_j phi(k_j)     [D]
    out_i = phi(q_i) KV / max(phi(q_i) . z, eps)

Cost O(N D^2) instead of softmax attention's O(N^2 D). One program per (batch, head): a first loop
over key tiles accumulates KV and z in registers (fp32), a second loop over query tiles writes the
outputs. KV and z are saved for backward.

Backward, with c_i = max(phi(q_i).z, eps), o_i = out_i, g_i = dout_i:
    dnum_i = g_i / c_i                       dden_i = -(g_i . o_i) / c_i  (0 where the clamp is active)
    dphi(q_i) = dnum_i KV^T + dden_i z       dq = dphi(q) * [q > 0]
    dKV = sum_i phi(q_i)^T dnum_i            dz = sum_i dden_i phi(q_i)
    dphi(k_j) = v_j dKV^T + dz               dk = dphi(k) * [k > 0]
    dv_j = phi(k_j) dKV
again one program per (batch, head): a loop over query tiles (dq, and dKV, dz in registers), then a
loop over key tiles (dk, dv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_same_device, check_tensor, interpreting, use_triton

__all__ = ["linear_attention", "linear_attention_ref", "linear_attention_triton", "LinearAttentionFunction"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}
_MAX_D = 128


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype):
    """tl.dot operands: the input's dtype on GPU (tensor cores); fp32/fp64 in the interpreter (bf16 bug)."""
    if interpreting() or dtype in (torch.float32, torch.float64):
        return _acc(dtype)
    return _TL[dtype]


def _precision(dtype):
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block_n(N):
    if interpreting():
        return max(16, min(256, triton.next_power_of_2(N)))  # one or two tiles for ViT lengths
    return 64


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _la_fwd_kernel(
    Q, K, V, O, KV, Z,  # Q, O: [BH, Nq, D]; K, V: [BH, Nk, D]; KV: [BH, D, D] (ACC); Z: [BH, D] (ACC)
    Nq, Nk, D, eps,
    sqb, sqn, skb, skn, svb, svn, sob, son,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    kv = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    z = tl.zeros((BLOCK_D,), dtype=ACC)
    # pass 1: KV = phi(K)^T V, z = sum phi(K)
    for n0 in range(0, Nk, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < Nk)[:, None] & dmask[None, :]
        k = tl.maximum(tl.load(K + bh * skb + ns[:, None] * skn + ds[None, :], mask=m, other=0.0).to(ACC), 0.0)
        v = tl.load(V + bh * svb + ns[:, None] * svn + ds[None, :], mask=m, other=0.0).to(ACC)
        kv = tl.dot(tl.trans(k.to(DOT)), v.to(DOT), kv, input_precision=PREC)  # [D, D]
        z += tl.sum(k, axis=0)
    tl.store(KV + bh * D * D + ds[:, None] * D + ds[None, :], kv,
             mask=dmask[:, None] & dmask[None, :])
    tl.store(Z + bh * D + ds, z, mask=dmask)
    # pass 2: out = phi(Q) KV / max(phi(Q) . z, eps)
    for n0 in range(0, Nq, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < Nq)[:, None] & dmask[None, :]
        q = tl.maximum(tl.load(Q + bh * sqb + ns[:, None] * sqn + ds[None, :], mask=m, other=0.0).to(ACC), 0.0)
        num = tl.dot(q.to(DOT), kv.to(DOT), input_precision=PREC).to(ACC)  # [BN, D]
        den = tl.maximum(tl.sum(q * z[None, :], axis=1), eps)  # [BN]
        tl.store(O + bh * sob + ns[:, None] * son + ds[None, :], (num / den[:, None]).to(O.dtype.element_ty),
                 mask=m)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _la_bwd_kernel(
    Q, K, V, DO, KV, Z, DQ, DK, DV,  # as forward; DO, DQ: [BH, Nq, D]; DK, DV: [BH, Nk, D]
    Nq, Nk, D, eps,
    sqb, sqn, skb, skn, svb, svn, sdob, sdon,  # DQ, DK, DV are contiguous like Q, K, V's shapes
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    kv = tl.load(KV + bh * D * D + ds[:, None] * D + ds[None, :], mask=dmask[:, None] & dmask[None, :],
                 other=0.0)  # [D, D] (ACC)
    z = tl.load(Z + bh * D + ds, mask=dmask, other=0.0)  # [D]
    dkv = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    dz = tl.zeros((BLOCK_D,), dtype=ACC)
    # pass 1 over queries: dq, and the sums dKV, dz
    for n0 in range(0, Nq, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < Nq)[:, None] & dmask[None, :]
        qraw = tl.load(Q + bh * sqb + ns[:, None] * sqn + ds[None, :], mask=m, other=0.0).to(ACC)
        q = tl.maximum(qraw, 0.0)
        g = tl.load(DO + bh * sdob + ns[:, None] * sdon + ds[None, :], mask=m, other=0.0).to(ACC)
        num = tl.dot(q.to(DOT), kv.to(DOT), input_precision=PREC).to(ACC)  # [BN, D]
        den = tl.sum(q * z[None, :], axis=1)
        c = tl.maximum(den, eps)
        dnum = g / c[:, None]
        # d(out)/dc = -num / c^2, so dc = -(g . num) / c^2; the clamp passes it only where den >= eps
        dden = tl.where(den >= eps, -tl.sum(g * num, axis=1) / (c * c), 0.0)  # [BN]
        dphiq = tl.dot(dnum.to(DOT), tl.trans(kv).to(DOT), input_precision=PREC).to(ACC) \
            + dden[:, None] * z[None, :]
        dq = tl.where(qraw > 0, dphiq, 0.0)
        tl.store(DQ + bh * Nq * D + ns[:, None] * D + ds[None, :], dq.to(DQ.dtype.element_ty), mask=m)
        dkv = tl.dot(tl.trans(q.to(DOT)), dnum.to(DOT), dkv, input_precision=PREC)
        dz += tl.sum(dden[:, None] * q, axis=0)
    # pass 2 over keys: dk, dv
    for n0 in range(0, Nk, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = (ns < Nk)[:, None] & dmask[None, :]
        kraw = tl.load(K + bh * skb + ns[:, None] * skn + ds[None, :], mask=m, other=0.0).to(ACC)
        k = tl.maximum(kraw, 0.0)
        v = tl.load(V + bh * svb + ns[:, None] * svn + ds[None, :], mask=m, other=0.0).to(ACC)
        dphik = tl.dot(v.to(DOT), tl.trans(dkv).to(DOT), input_precision=PREC).to(ACC) + dz[None, :]
        dk = tl.where(kraw > 0, dphik, 0.0)
        dv = tl.dot(k.to(DOT), dkv.to(DOT), input_precision=PREC).to(ACC)
        tl.store(DK + bh * Nk * D + ns[:, None] * D + ds[None, :], dk.to(DK.dtype.element_ty), mask=m)
        tl.store(DV + bh * Nk * D + ns[:, None] * D + ds[None, :], dv.to(DV.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------
# launchers and autograd
# ----------------------------------------------------------------------------------------------------
def _bhnd(t):
    """[B, H, N, D] -> [B*H, N, D] with a unit last stride (a view when possible)."""
    t3 = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def _meta(q):
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16
    num_warps = 8 if block_d >= 128 else 4
    return dict(ACC=_acc(q.dtype), DOT=_dot_dtype(q.dtype), PREC=_precision(q.dtype),
                BLOCK_N=_block_n(max(q.shape[-2], 1)), BLOCK_D=block_d, num_warps=num_warps)


def linear_attention_fwd(q, k, v, eps):
    """Launch the forward. Returns (out [B, H, Nq, D], kv [B*H, D, D], z [B*H, D]) (kv, z in fp32/fp64)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    q3, k3, v3 = _bhnd(q), _bhnd(k), _bhnd(v)
    out = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    o3 = out.view(B * H, Nq, D)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv = torch.zeros(B * H, D, D, dtype=acc, device=q.device)
    z = torch.zeros(B * H, D, dtype=acc, device=q.device)
    if B * H > 0 and Nq > 0:
        _la_fwd_kernel[(B * H,)](
            q3, k3, v3, o3, kv, z, Nq, Nk, D, float(eps),
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
            o3.stride(0), o3.stride(1), **_meta(q),
        )
    return out, kv, z


def linear_attention_bwd(dout, q, k, v, kv, z, eps):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    q3, k3, v3, do3 = _bhnd(q), _bhnd(k), _bhnd(v), _bhnd(dout)
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Nk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, Nk, D, dtype=v.dtype, device=q.device)
    if B * H > 0 and Nq > 0:
        _la_bwd_kernel[(B * H,)](
            q3, k3, v3, do3, kv, z, dq, dk, dv, Nq, Nk, D, float(eps),
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
            do3.stride(0), do3.stride(1), **_meta(q),
        )
    else:
        dk.zero_(), dv.zero_()
    return dq, dk, dv


class LinearAttentionFunction(torch.autograd.Function):
    """Forward saves q, k, v and the fp32 sums KV, z; backward is one Triton kernel."""

    @staticmethod
    def forward(ctx, q, k, v, eps):
        out, kv, z = linear_attention_fwd(q, k, v, eps)
        ctx.save_for_backward(q, k, v, kv, z)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kv, z = ctx.saved_tensors
        dq, dk, dv = linear_attention_bwd(dout, q, k, v, kv, z, ctx.eps)
        return dq, dk, dv, None


def _check(q, k, v, eps):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=_DTYPES, op="linear_attention")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"linear_attention: k has shape {tuple(k.shape)}; expected [B, H, Nk, D] with "
                         f"B={B}, H={H}, D={D} from q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"linear_attention: v has shape {tuple(v.shape)}; expected k's shape {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"linear_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= D <= _MAX_D:
        raise ValueError(f"linear_attention: head dim D={D} is unsupported; expected 1 <= D <= {_MAX_D}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"linear_attention: eps must be a positive number, got {eps!r}")
    check_same_device("linear_attention", q=q, k=k, v=v)


def linear_attention_triton(q, k, v, eps=1e-6):
    """The Triton path of :func:`linear_attention` (autograd-aware)."""
    _check(q, k, v, eps)
    return LinearAttentionFunction.apply(q, k, v, float(eps))


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def linear_attention_ref(q, k, v, eps=1e-6):
    """Pure PyTorch, kv-first, in the input dtype (eager's own precision): the CPU path and the oracle."""
    _check(q, k, v, eps)
    q, k = torch.relu(q), torch.relu(k)
    kv = k.transpose(-2, -1) @ v  # [B, H, D, D]
    z = k.sum(dim=-2)  # [B, H, D]
    num = q @ kv  # [B, H, Nq, D]
    den = (q * z[..., None, :]).sum(-1, keepdim=True).clamp_min(eps)  # [B, H, Nq, 1]
    return num / den


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
def linear_attention(q, k, v, eps=1e-6):
    """ReLU linear attention: relu(q) (relu(k)^T v) / max(relu(q) . sum_j relu(k_j), eps).

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (Nk may differ from Nq); D <= 128 -> [B, H, Nq, D].
    Forward and backward. Triton on CUDA (or on CPU under TRITON_INTERPRET=1), else the reference.
    """
    if use_triton(q, k, v):
        return linear_attention_triton(q, k, v, eps)
    return linear_attention_ref(q, k, v, eps)
