"""Size-weighted token merging (ToMe) and its inverse gather (GTP-style propagation / unmerge).

    merge:   merged[b, j] = sum_{i: dst[b,i]=j} size[b,i] * x[b,i] / sum_{i: dst[b,i]=j} size[b,i]
             merged_size[b, j] = sum_{i: dst[b,i]=j} size[b,i]          (0 and a zero row if j is empty)
    gather:  x[b, i] = x_merged[b, dst[b,i]]

Token sizes are carried along so that repeated merges stay true averages of the original patches
(ToMe's proportional attention then adds log(size) to the attention logits).

Kernel design: a segment sum written as a one-hot GEMM built on the fly. A program owns a tile of
BLOCK_J destinations x BLOCK_C channels and loops over tiles of BLOCK_I sources, building
A[j, i] = size[i] * (dst[i] == j) in registers and accumulating ``tl.dot(A, x_tile)``. No atomics:
the result is deterministic (same bits every run, unlike a scatter-add with atomics), and the
one-hot matrix never touches memory. fp16/bf16 inputs feed the MMA as they are (the sizes scale x's rows,
so the one-hot stays exact), half the register tiles and twice the tensor-core rate of a TF32 dot. The extra FLOPs (N x num_dst x C per image) are nothing for
ViT token counts (N <= ~1k) on tensor cores; for very long sequences a sort-based segmented
reduction would be the better algorithm.

Gradients: merge's backward is a weighted gather, dx[b,i] = size[b,i] / merged_size[b,dst] *
dmerged[b,dst]; gather's backward is an unweighted segment sum. Both reuse the two kernels below.
Sizes are counts, not trained: they get no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_same_device, check_tensor, interpreting, use_triton

__all__ = ["merge", "gather", "merge_ref", "gather_ref", "merge_triton", "gather_triton",
           "MergeFunction", "GatherFunction"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _native16(dtype: torch.dtype) -> bool:
    """16-bit operands straight into tl.dot? fp16 always; bf16 on GPU only: Triton's interpreter computes bf16
    dots wrongly (as attention's launcher notes), so there bf16 takes the fp32 path and the tests run the
    native path in fp16."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreting())


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _segment_sum_kernel(
    X, W, Dst, Out, OutW,  # X: [B, N, C]; W: [B, N] (weights); Dst: [B, N]; Out: [B, J, C]; OutW: [B, J]
    N, J, C,
    sxb, sxn, swb, sdb, sob, soj, sowb,
    HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
    NATIVE16: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Out[b, j] = sum_{i: dst[b,i]=j} w[b,i] x[b,i]  (/ sum w if NORMALIZE); OutW[b, j] = sum w
    b = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1)
    pid_c = tl.program_id(2)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] destination ids
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    cmask = cs < C
    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=ACC)
    wsum = tl.zeros((BLOCK_J,), dtype=ACC)
    for i0 in range(0, N, BLOCK_I):
        its = i0 + tl.arange(0, BLOCK_I)  # [BI] source ids
        imask = its < N
        # out-of-range destinations (masked sources read -1) match no j: they are dropped, never written
        dst = tl.load(Dst + b * sdb + its, mask=imask, other=-1).to(tl.int64)
        if HAS_W:
            w = tl.load(W + b * swb + its, mask=imask, other=0.0).to(ACC)
        else:
            w = tl.where(imask, 1.0, 0.0).to(ACC)
        hit = dst[None, :] == js[:, None]  # [BJ, BI]
        x = tl.load(X + b * sxb + its[:, None] * sxn + cs[None, :], mask=imask[:, None] & cmask[None, :],
                    other=0.0)  # [BI, BC]
        if NATIVE16:
            # 16-bit operands straight into the MMA (fp32 accumulator): the one-hot is exact in any dtype, and
            # the sizes scale the rows of x instead (one rounding to x's dtype, the data's own precision);
            # sizes inside the one-hot would lose integers above 256 in bf16
            if HAS_W:
                x = (x.to(ACC) * w[:, None]).to(x.dtype)
            acc = tl.dot(tl.where(hit, 1.0, 0.0).to(x.dtype), x, acc)
            wsum += tl.sum(tl.where(hit, w[None, :], 0.0), axis=1)
        else:
            a = tl.where(hit, w[None, :], 0.0)  # [BJ, BI] weighted one-hot
            acc = tl.dot(a, x.to(ACC), acc, input_precision="ieee")  # TF32 would round fp32 data to 10 bits
            wsum += tl.sum(a, axis=1)
    if NORMALIZE:
        acc = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]  # empty destinations stay 0
    jmask = js < J
    tl.store(Out + b * sob + js[:, None] * soj + cs[None, :], acc.to(Out.dtype.element_ty),
             mask=jmask[:, None] & cmask[None, :])
    if pid_c == 0:
        tl.store(OutW + b * sowb + js, wsum.to(OutW.dtype.element_ty), mask=jmask)


@triton.jit
def _gather_kernel(
    XM, Dst, W, WM, Out,  # XM: [B, J, C]; Dst: [B, N]; W: [B, N]; WM: [B, J]; Out: [B, N, C]
    N, J, C,
    sxb, sxj, sdb, swb, swmb, sob, son,
    SCALED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Out[b, i] = XM[b, dst[b,i]] (* W[b,i] / WM[b, dst[b,i]] if SCALED: merge's backward)
    b = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    nmask = ns < N
    cmask = cs < C
    dst = tl.load(Dst + b * sdb + ns, mask=nmask, other=0).to(tl.int64)
    ok = nmask & (dst >= 0) & (dst < J)  # out-of-range rows read as 0 (memory-safe)
    mask = ok[:, None] & cmask[None, :]
    v = tl.load(XM + b * sxb + dst[:, None] * sxj + cs[None, :], mask=mask, other=0.0).to(ACC)
    if SCALED:
        w = tl.load(W + b * swb + ns, mask=ok, other=0.0).to(ACC)
        wm = tl.load(WM + b * swmb + dst, mask=ok, other=1.0).to(ACC)
        v = v * (w / tl.where(wm != 0, wm, 1.0))[:, None]
    tl.store(Out + b * sob + ns[:, None] * son + cs[None, :], v.to(Out.dtype.element_ty),
             mask=nmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _blocks_segsum(C):
    block_c = max(16, triton.next_power_of_2(C))  # tl.dot needs every tile dim >= 16
    if interpreting():  # few, large programs
        return 128, 128, min(block_c, 512)
    return 64, 64, min(block_c, 128)  # BLOCK_I, BLOCK_J, BLOCK_C


def _segment_sum(x, dst, num_dst, w=None, normalize=False):
    """x [B, N, C] (last dim contiguous), dst [B, N], w [B, N] or None -> (out [B, J, C], wsum [B, J])."""
    B, N, C = x.shape
    out = torch.empty(B, num_dst, C, dtype=x.dtype, device=x.device)
    wdtype = w.dtype if w is not None else torch.float32
    if wdtype not in (torch.float32, torch.float64):
        wdtype = torch.float32  # accumulate sizes in fp32 at least
    wsum = torch.empty(B, num_dst, dtype=wdtype, device=x.device)
    if B == 0 or num_dst == 0 or C == 0:
        return out, wsum.zero_()
    if N == 0:
        return out.zero_(), wsum.zero_()
    BI, BJ, BC = _blocks_segsum(C)
    wt = w if w is not None else dst  # dummy pointer when unweighted
    grid = (B, triton.cdiv(num_dst, BJ), triton.cdiv(C, BC))
    _segment_sum_kernel[grid](
        x, wt, dst, out, wsum, N, num_dst, C,
        x.stride(0), x.stride(1), wt.stride(0), dst.stride(0), out.stride(0), out.stride(1), wsum.stride(0),
        HAS_W=w is not None, NORMALIZE=normalize, ACC=_acc(x.dtype),
        NATIVE16=_native16(x.dtype), BLOCK_I=BI, BLOCK_J=BJ, BLOCK_C=BC, num_warps=4,
    )
    return out, wsum


def _gather(xm, dst, w=None, wm=None):
    """xm [B, J, C], dst [B, N] -> [B, N, C]; with w [B, N], wm [B, J]: rows scaled by w / wm[dst]."""
    B, J, C = xm.shape
    N = dst.shape[1]
    out = torch.empty(B, N, C, dtype=xm.dtype, device=xm.device)
    if out.numel() == 0:
        return out
    BN, BC = (256, min(triton.next_power_of_2(C), 512)) if interpreting() else \
        (32, min(triton.next_power_of_2(C), 128))
    scaled = w is not None
    wt = w if scaled else dst
    wmt = wm if scaled else dst
    grid = (B, triton.cdiv(N, BN), triton.cdiv(C, BC))
    _gather_kernel[grid](
        xm, dst, wt, wmt, out, N, J, C,
        xm.stride(0), xm.stride(1), dst.stride(0), wt.stride(0), wmt.stride(0), out.stride(0), out.stride(1),
        SCALED=scaled, ACC=_acc(xm.dtype), BLOCK_N=BN, BLOCK_C=BC, num_warps=4,
    )
    return out


def _lastdim(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class MergeFunction(torch.autograd.Function):
    """merge forward: weighted segment sum / size; backward: weighted gather."""

    @staticmethod
    def forward(ctx, x, size, dst_index, num_dst):
        merged, msize = _segment_sum(_lastdim(x), dst_index, num_dst, w=size, normalize=True)
        ctx.save_for_backward(size, dst_index, msize)  # msize: fp32/fp64 sums for the backward
        msize_out = msize.to(size.dtype if size is not None else torch.float32)
        ctx.mark_non_differentiable(msize_out)
        return merged, msize_out

    @staticmethod
    def backward(ctx, dmerged, _dsize):
        size, dst_index, msize = ctx.saved_tensors
        if size is None:  # unit sizes
            size = torch.ones(dst_index.shape, dtype=msize.dtype, device=dst_index.device)
        dx = _gather(_lastdim(dmerged), dst_index, w=size, wm=msize)
        return dx, None, None, None


class GatherFunction(torch.autograd.Function):
    """gather forward: row gather; backward: unweighted segment sum."""

    @staticmethod
    def forward(ctx, x_merged, dst_index):
        ctx.save_for_backward(dst_index)
        ctx.num_dst = x_merged.shape[1]
        return _gather(_lastdim(x_merged), dst_index)

    @staticmethod
    def backward(ctx, dx):
        (dst_index,) = ctx.saved_tensors
        dxm, _ = _segment_sum(_lastdim(dx), dst_index, ctx.num_dst)
        return dxm, None


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def _check_index(op, dst_index, B, N, num_dst, check_values):
    check_tensor("dst_index", dst_index, ndim=2, dtypes=_INDEX_DTYPES, op=op)
    if tuple(dst_index.shape) != (B, N):
        raise ValueError(f"{op}: dst_index has shape {tuple(dst_index.shape)}; expected ({B}, {N}) = [B, N]")
    if check_values and dst_index.numel() > 0:
        lo, hi = int(dst_index.min()), int(dst_index.max())  # one device sync on CUDA
        if lo < 0 or hi >= num_dst:
            raise ValueError(f"{op}: dst_index values must lie in [0, {num_dst}) (num_dst={num_dst}); "
                             f"got min {lo}, max {hi}")


def _check_merge(x, size, dst_index, num_dst, check_index=True):
    check_tensor("x", x, ndim=3, dtypes=_DTYPES, op="merge")
    B, N, C = x.shape
    if isinstance(num_dst, bool) or not isinstance(num_dst, int) or num_dst < 1:
        raise ValueError(f"merge: num_dst must be a positive int, got {num_dst!r}")
    if size is not None:
        check_tensor("size", size, dtypes=_DTYPES, op="merge")
        if tuple(size.shape) not in ((B, N), (B, N, 1)):
            raise ValueError(f"merge: size has shape {tuple(size.shape)}; expected ({B}, {N}) or ({B}, {N}, 1)")
    _check_index("merge", dst_index, B, N, num_dst, check_index)
    check_same_device("merge", x=x, size=size, dst_index=dst_index)


def _check_gather(x_merged, dst_index, check_index=True):
    check_tensor("x_merged", x_merged, ndim=3, dtypes=_DTYPES, op="gather")
    B, J, C = x_merged.shape
    check_tensor("dst_index", dst_index, ndim=2, dtypes=_INDEX_DTYPES, op="gather")
    if dst_index.shape[0] != B:
        raise ValueError(f"gather: dst_index has shape {tuple(dst_index.shape)}; expected batch {B} = "
                         f"x_merged's first dim")
    _check_index("gather", dst_index, B, dst_index.shape[1], J, check_index)
    check_same_device("gather", x_merged=x_merged, dst_index=dst_index)


def _size2d(size):
    return size.reshape(size.shape[0], size.shape[1]) if size is not None else None


# ----------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------
def merge_ref(x, size, dst_index, num_dst, *, check_index=True):
    """Pure PyTorch merge (scatter_add in fp32/fp64): the CPU path and the test oracle."""
    _check_merge(x, size, dst_index, num_dst, check_index)
    B, N, C = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _size2d(size).to(acc) if size is not None else torch.ones(B, N, dtype=acc, device=x.device)
    idx = dst_index.long()
    num = torch.zeros(B, num_dst, C, dtype=acc, device=x.device)
    num = num.scatter_add(1, idx[..., None].expand(B, N, C), x.to(acc) * w[..., None])
    den = torch.zeros(B, num_dst, dtype=acc, device=x.device).scatter_add(1, idx, w)
    merged = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    msize_dtype = size.dtype if size is not None else torch.float32
    return merged.to(x.dtype), den.to(msize_dtype)


def gather_ref(x_merged, dst_index, *, check_index=True):
    """Pure PyTorch gather: x[b, i] = x_merged[b, dst_index[b, i]]."""
    _check_gather(x_merged, dst_index, check_index)
    B, J, C = x_merged.shape
    idx = dst_index.long()
    return torch.gather(x_merged, 1, idx[..., None].expand(B, idx.shape[1], C))


# ----------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------
def merge_triton(x, size, dst_index, num_dst, *, check_index=True):
    """The Triton path of :func:`merge` (autograd-aware)."""
    _check_merge(x, size, dst_index, num_dst, check_index)
    size = _size2d(size).contiguous() if size is not None else None
    return MergeFunction.apply(x, size, dst_index.contiguous(), num_dst)


def gather_triton(x_merged, dst_index, *, check_index=True):
    """The Triton path of :func:`gather` (autograd-aware)."""
    _check_gather(x_merged, dst_index, check_index)
    return GatherFunction.apply(x_merged, dst_index.contiguous())


def merge(x, size, dst_index, num_dst, *, check_index=True):
    """Size-weighted average of the tokens sent to each destination (ToMe merge).

    x: [B, N, C]; size: [B, N] (or [B, N, 1]) token sizes, or None for all ones; dst_index: [B, N]
    int64/int32 in [0, num_dst). Returns (merged [B, num_dst, C] in x's dtype, merged_size
    [B, num_dst] in size's dtype, fp32 if None). A destination no token maps to gets a zero row and
    size 0. Gradient flows to x only. ``check_index`` validates dst_index's range (one device sync on
    CUDA; the kernel itself drops out-of-range sources rather than writing out of bounds).
    """
    if use_triton(x, size, dst_index):
        return merge_triton(x, size, dst_index, num_dst, check_index=check_index)
    return merge_ref(x, size, dst_index, num_dst, check_index=check_index)


def gather(x_merged, dst_index, *, check_index=True):
    """Propagate merged tokens back to their sources: x[b, i] = x_merged[b, dst_index[b, i]].

    x_merged: [B, J, C]; dst_index: [B, N] in [0, J) -> [B, N, C]. Gradient: a segment sum to x_merged.
    """
    if use_triton(x_merged, dst_index):
        return gather_triton(x_merged, dst_index, check_index=check_index)
    return gather_ref(x_merged, dst_index, check_index=check_index)
