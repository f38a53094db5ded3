"""Fused attention for ViT shapes: FlashAttention-2-style forward and backward in Triton.

    out = softmax(q k^T * scale + bias) v        q [B,H,Nq,D], k/v [B,H,Nk,D]

Online softmax. The N×N score matrix never reaches memory. A program owns BLOCK_M query rows and
walks over the keys in tiles of BLOCK_N. It keeps three things per row: a running max m, a running
sum l of exp(s - m), and an unnormalised output acc. When a new tile raises the max from m to m',
the old l and acc are rescaled by exp(m - m'). After the last tile, out = acc / l, and the row's
log-sum-exp lse = m + log l is stored. The backward uses lse to recompute any probability
p_ij = exp(s_ij - lse_i) from q_i and k_j alone, so nothing N×N is saved for it either. We work in
base 2 (exp2 is the hardware instruction): scores are scaled by log2(e) and lse is stored in log2 units.

Extras for the course's methods:
  bias      dense additive [B|1, H|1, Nq, Nk] (relative-position tables, masks)
  key_bias  per-key additive [B, Nk] or [B, H, Nk] (log token size: ToMe's proportional attention)
  gmm       a Gaussian-mixture distance bias computed in the kernel from token grid coordinates
  sides     the CLS row, the column sums and the diagonal of the probabilities (token-scoring methods:
            EViT, GTP, HiPrune, DiffRate, ...). The CLS row and the diagonal come out of the forward kernel
            itself: the program holding row 0 parks that row's raw scores and normalises them with its final
            lse; every program keeps its rows' diagonal scores. Column sums need every row's final lse, so
            they take a second light pass over the keys.

Launch order: a (batch, head)'s query tiles are on grid axis 0, which varies fastest, so the programs that
read the same K and V run together and find them in L2 (a 1-D grid past axis 1's 65,535 limit).

Dispatch: CUDA tensors → Triton; CPU tensors with TRITON_INTERPRET=1 → Triton in the interpreter (tests);
anything else → `attention_ref` (pure PyTorch, also the test oracle), or SDPA when nothing extra is asked.

Backward, short sequences (N <= 256, a ViT's 197): one program per (batch, head) computes delta, then walks the
key tiles with dK/dV in registers and adds each tile's dQ share into an fp32 scratch only it touches: every
probability tile is recomputed once. Longer sequences: two kernels and no pre-pass. The dQ kernel (a program per query tile) runs first and also writes
each row's delta_i = out_i . dout_i; the dK/dV kernel (a program per key tile) then works on transposed tiles,
S^T = k q^T with q loaded transposed, so P^T and dS^T never need a register transpose.

Gradients. q, k, v, bias and key_bias get gradients from the Triton backward. A bias shared across the batch
and/or the heads (a relative-position table [H, N, N]) has its gradient summed in a third kernel that walks over
the (batch, head) pairs sharing each tile: the [B,H,N,N] fp32 buffer is never made (477 MB at ViT-B/16, batch
256) and the sum needs no atomics, so it is deterministic. The gmm parameters
(sigma, logits) get none there, so if they require grad, `attention` takes the reference path,
which autograd differentiates. Side outputs carry no gradient: they are detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.kernels._dispatch import (
    HAS_TRITON, check_same_device, check_tensor, interpreting, triton, tl, use_triton,
)

__all__ = [
    "attention", "attention_ref", "GaussianMixtureBias", "grid_coords", "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_GMM_COMPONENTS = 4
SIDE_NAMES = ("cls", "colsum", "diag")


# ----------------------------------------------------------------------------------------------
# The Gaussian-mixture bias: a small description, and its dense PyTorch version (the oracle)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GaussianMixtureBias:
    """Additive bias from distances between token coordinates, one mixture of Gaussians per head.

        bias[b,h,i,j] = log sum_m w[h,m] exp(-|c_i - c_j|^2 / (2 sigma[h,m]^2)),  w[h] = softmax(logits[h])

    It is at most 0, and 0 at distance 0. A token without a coordinate (the CLS token) has NaN
    coordinates, and any row or column that involves one gets a bias of 0.
        coords_q  [Nq, 2] or [B, Nq, 2]  (row, col) grid positions of the queries
        coords_k  [Nk, 2] or [B, Nk, 2]  the same for the keys
        sigma     [H, M] or [1, M], M <= 4, > 0, in grid units
        logits    like sigma (mixture weights before the softmax), or None for equal weights
    """
    coords_q: torch.Tensor
    coords_k: torch.Tensor
    sigma: torch.Tensor
    logits: torch.Tensor | None = None

    def log_weights(self, dtype=torch.float32) -> torch.Tensor:  # [H|1, M]
        if self.logits is None:
            return torch.full(self.sigma.shape, -math.log(self.sigma.shape[-1]), dtype=dtype, device=self.sigma.device)
        return torch.log_softmax(self.logits.to(dtype), dim=-1)

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        """The bias as a dense tensor [B|1, H|1, Nq, Nk] in `dtype`, differentiable in sigma and logits."""
        dt = dtype
        cq = self.coords_q.to(dt)
        ck = self.coords_k.to(dt)
        cq, ck = (cq[None] if cq.ndim == 2 else cq), (ck[None] if ck.ndim == 2 else ck)  # [B|1, N, 2]
        valid = ~cq.isnan().any(-1)[:, :, None] & ~ck.isnan().any(-1)[:, None, :]  # [B|1, Nq, Nk]
        # zero the NaNs before the arithmetic so that no NaN reaches autograd through the masked branch
        d2 = (cq.nan_to_num(0.0)[:, :, None, :] - ck.nan_to_num(0.0)[:, None, :, :]).pow(2).sum(-1)
        logw = self.log_weights(dt)  # [H|1, M]
        inv2s2 = 0.5 / self.sigma.to(dt).pow(2)  # [H|1, M]
        a = logw[None, :, None, None, :] - d2[:, None, :, :, None] * inv2s2[None, :, None, None, :]
        bias = torch.logsumexp(a, dim=-1)  # [B|1, H|1, Nq, Nk]
        return torch.where(valid[:, None], bias, torch.zeros((), dtype=dt, device=bias.device))


def grid_coords(grid_h: int, grid_w: int, num_prefix: int = 1, device=None) -> torch.Tensor:
    """Coordinates [num_prefix + grid_h*grid_w, 2] of a ViT's tokens: NaN for the prefix (CLS) tokens,
    then (row, col) of each patch in raster order. The usual `coords_q`/`coords_k` for `GaussianMixtureBias`."""
    for name, val, lo in (("grid_h", grid_h, 1), ("grid_w", grid_w, 1), ("num_prefix", num_prefix, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise ValueError(f"grid_coords: {name} must be an int >= {lo}, got {val!r}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    patches = torch.stack([rows, cols], -1).reshape(-1, 2).float()
    prefix = torch.full((num_prefix, 2), float("nan"))
    return torch.cat([prefix, patches]).to(device)


# ----------------------------------------------------------------------------------------------
# Argument checks, shared by the Triton path and the reference
# ----------------------------------------------------------------------------------------------
def _check_inputs(op, q, k, v, scale, bias, key_bias, gmm):
    """Validate; return (scale, bias [B,H,Nq,Nk] view | None, key_bias [B,H,Nk] view | None, gmm | None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=DTYPES, op=op)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_same_device(op, q=q, k=k, v=v)
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{op}: q [B,H,Nq,D], k and v [B,H,Nk,D] must share B, H and D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k and v must have the same number of keys Nk; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Nk = k.shape[2]
    if Nq == 0 or Nk == 0 or B == 0 or H == 0:
        raise ValueError(f"{op}: empty input; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D={D} not supported; expected one of {list(SUPPORTED_HEAD_DIMS)}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a finite float > 0 or None, got {scale!r}")
    elif not (math.isfinite(scale) and scale > 0):  # a sign flip would turn attention to the least similar keys
        raise ValueError(f"{op}: scale must be a finite float > 0 or None, got {scale!r}")
    scale = float(scale)

    if bias is not None:
        check_tensor("bias", bias, dtypes=DTYPES, op=op)
        want = (B, H, Nq, Nk)
        ok = 2 <= bias.ndim <= 4 and all(s in (1, w) for s, w in zip(bias.shape[::-1], want[::-1]))
        if not ok:
            raise ValueError(f"{op}: bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"[B,H,Nq,Nk] = {list(want)}")
        check_same_device(op, q=q, bias=bias)
        bias = bias.expand(want)  # a view: broadcast dims get stride 0
    if key_bias is not None:
        check_tensor("key_bias", key_bias, dtypes=DTYPES, op=op)
        kb = key_bias if key_bias.ndim != 2 else key_bias[:, None, :]
        ok = kb.ndim == 3 and kb.shape[0] in (1, B) and kb.shape[1] in (1, H) and kb.shape[2] == Nk
        if not ok:
            raise ValueError(f"{op}: key_bias of shape {tuple(key_bias.shape)} must be [B,Nk] or [B,H,Nk] "
                             f"with B={B}, H={H}, Nk={Nk}")
        check_same_device(op, q=q, key_bias=key_bias)
        key_bias = kb.expand(B, H, Nk)
    if gmm is not None:
        gmm = _check_gmm(op, gmm, q, B, H, Nq, Nk)
    return scale, bias, key_bias, gmm


def _check_gmm(op, gmm, q, B, H, Nq, Nk) -> GaussianMixtureBias:
    if isinstance(gmm, (tuple, list)) and len(gmm) in (3, 4):
        gmm = GaussianMixtureBias(*gmm)
    if not isinstance(gmm, GaussianMixtureBias):
        raise TypeError(f"{op}: gmm must be a GaussianMixtureBias or a tuple (coords_q, coords_k, sigma[, logits]); "
                        f"got {type(gmm).__name__}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t, n in (("gmm.coords_q", gmm.coords_q, Nq), ("gmm.coords_k", gmm.coords_k, Nk)):
        check_tensor(name, t, dtypes=floats, op=op)
        ok = (t.ndim == 2 and t.shape == (n, 2)) or (t.ndim == 3 and t.shape[0] in (1, B) and t.shape[1:] == (n, 2))
        if not ok:
            raise ValueError(f"{op}: {name} must be [{n}, 2] or [B={B}, {n}, 2], got {tuple(t.shape)}")
    check_tensor("gmm.sigma", gmm.sigma, ndim=2, dtypes=floats, op=op)
    M = gmm.sigma.shape[1]
    if gmm.sigma.shape[0] not in (1, H) or not 1 <= M <= MAX_GMM_COMPONENTS:
        raise ValueError(f"{op}: gmm.sigma must be [H={H} or 1, M] with 1 <= M <= {MAX_GMM_COMPONENTS}, "
                         f"got {tuple(gmm.sigma.shape)}")
    if gmm.logits is not None:
        check_tensor("gmm.logits", gmm.logits, dtypes=floats, op=op)
        if gmm.logits.shape != gmm.sigma.shape:
            raise ValueError(f"{op}: gmm.logits must have sigma's shape {tuple(gmm.sigma.shape)}, "
                             f"got {tuple(gmm.logits.shape)}")
    check_same_device(op, q=q, coords_q=gmm.coords_q, coords_k=gmm.coords_k, sigma=gmm.sigma, logits=gmm.logits)
    return gmm


def _side_dict(p, want):
    """Side outputs read off a full probability matrix p [B,H,Nq,Nk] (reference path)."""
    n = min(p.shape[-2], p.shape[-1])
    sides = {"cls": p[:, :, 0, :], "colsum": p.sum(-2), "diag": p.diagonal(dim1=-2, dim2=-1)[..., :n]}
    return {name: sides[name].contiguous() for name in SIDE_NAMES if name in want}


def _wanted(return_cls, return_colsum, return_diag):
    return tuple(n for n, w in zip(SIDE_NAMES, (return_cls, return_colsum, return_diag)) if w)


# ----------------------------------------------------------------------------------------------
# The reference: plain PyTorch, fp32 (fp64 for fp64 inputs) math, materialises the probabilities
# ----------------------------------------------------------------------------------------------
def attention_ref(q, k, v, *, scale=None, bias=None, key_bias=None, gmm=None,
                  return_cls=False, return_colsum=False, return_diag=False):
    """Same signature and result as `attention`, computed densely. The CPU path and the tests' oracle."""
    scale, bias, key_bias, gmm = _check_inputs("attention_ref", q, k, v, scale, bias, key_bias, gmm)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # [B,H,Nq,Nk]
    if bias is not None:
        s = s + bias.to(acc)
    if key_bias is not None:
        s = s + key_bias.to(acc)[:, :, None, :]
    if gmm is not None:
        s = s + gmm.dense(acc)
    p = s.softmax(-1)
    out = (p @ v.to(acc)).to(q.dtype)  # [B,H,Nq,D]
    want = _wanted(return_cls, return_colsum, return_diag)
    if not want:
        return out
    return out, _side_dict(p.detach(), want)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    LOG2E: tl.constexpr = 1.4426950408889634  # scores are kept in log2 units: exp(x) = exp2(x * log2(e))

    @triton.jit
    def _gmm_bias(cq_x, cq_y, ck_x, ck_y, gw_ptr, gs_ptr, GMM_M: tl.constexpr):
        """Gaussian-mixture bias of one tile, natural-log units. cq_* [BM], ck_* [BN] -> [BM, BN].

        log sum_m exp(a_m), a_m = log w_m - d^2 / (2 sigma_m^2), taken stably around max_m a_m so that far
        tokens get a large negative bias and not log(0). gw_ptr/gs_ptr: this head's log w and 1/(2 sigma^2).
        """
        valid = ((cq_x == cq_x) & (cq_y == cq_y))[:, None] & ((ck_x == ck_x) & (ck_y == ck_y))[None, :]
        dx = cq_x[:, None] - ck_x[None, :]
        dy = cq_y[:, None] - ck_y[None, :]
        d2 = tl.where(valid, dx * dx + dy * dy, 0.0)  # NaN coords (CLS) -> distance 0, masked below
        a_max = tl.load(gw_ptr) - d2 * tl.load(gs_ptr)
        for m in tl.static_range(1, GMM_M):
            a_max = tl.maximum(a_max, tl.load(gw_ptr + m) - d2 * tl.load(gs_ptr + m))
        total = tl.zeros_like(d2)
        for m in tl.static_range(GMM_M):
            total += tl.exp(tl.load(gw_ptr + m) - d2 * tl.load(gs_ptr + m) - a_max)
        return tl.where(valid, a_max + tl.log(total), 0.0)

    @triton.jit
    def _gmm_tile(ca_ptr, s_can, s_cac, offs_a, mask_a, cb_ptr, s_cbn, s_cbc, offs_b, mask_b, gw_ptr, gs_ptr,
                  GMM_M: tl.constexpr):
        """The Gaussian-mixture bias between tokens offs_a (rows) and offs_b (columns), from their coordinates
        [N, 2] at ca_ptr / cb_ptr. [BA, BB]"""
        ca_x = tl.load(ca_ptr + offs_a * s_can, mask=mask_a, other=0.0)
        ca_y = tl.load(ca_ptr + offs_a * s_can + s_cac, mask=mask_a, other=0.0)
        cb_x = tl.load(cb_ptr + offs_b * s_cbn, mask=mask_b, other=0.0)
        cb_y = tl.load(cb_ptr + offs_b * s_cbn + s_cbc, mask=mask_b, other=0.0)
        return _gmm_bias(ca_x, ca_y, cb_x, cb_y, gw_ptr, gs_ptr, GMM_M)

    @triton.jit
    def _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale,
                bias_ptr, s_bm, s_bn, kb_ptr, s_kbn,
                cq_ptr, s_cqn, s_cqc, ck_ptr, s_ckn, s_ckc, gw_ptr, gs_ptr,
                HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr, PREC: tl.constexpr):
        """One tile of scores in log2 units: (q k^T * scale + biases) * log2(e); -inf on padded keys.

        q [BM, D], k [BN, D], offs_m [BM], offs_n [BN] -> [BM, BN]. The pointers are already offset to
        this (batch, head); the biases are loaded with zeros outside [Nq, Nk].
        """
        mask_m = offs_m < Nq
        mask_n = offs_n < Nk
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            s += b.to(s.dtype) * LOG2E
        if HAS_KB:
            kb = tl.load(kb_ptr + offs_n * s_kbn, mask=mask_n, other=0.0)
            s += kb.to(s.dtype)[None, :] * LOG2E
        if GMM_M > 0:
            g = _gmm_tile(cq_ptr, s_cqn, s_cqc, offs_m, mask_m, ck_ptr, s_ckn, s_ckc, offs_n, mask_n, gw_ptr, gs_ptr,
                          GMM_M)
            s += g.to(s.dtype) * LOG2E
        return tl.where(mask_n[None, :], s, float("-inf"))

    @triton.jit
    def _tile_ids(n_tiles, FLAT: tl.constexpr):
        """(tile, batch*head) of this program. Tiles of one (batch, head) are adjacent in launch order (axis 0
        varies fastest), so the programs that read the same K/V run together and find them in L2. Axis 1 is
        limited to 65535: past that (window attention: B*H huge) the launcher flattens the grid to 1-D."""
        if FLAT:
            pid = tl.program_id(0)
            return pid % n_tiles, pid // n_tiles
        return tl.program_id(0), tl.program_id(1)

    @triton.jit
    def _scores_t(k, qT, offs_m, offs_n, Nq, Nk, qk_scale,
                  bias_ptr, s_bm, s_bn, kb_ptr, s_kbn,
                  cq_ptr, s_cqn, s_cqc, ck_ptr, s_ckn, s_ckc, gw_ptr, gs_ptr,
                  HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr, PREC: tl.constexpr):
        """The transposed tile S^T [BN, BM] = (k q^T * scale + biases^T) * log2(e), computed as such (k [BN, D]
        times q^T [D, BM], loaded transposed): the dK/dV kernel needs P^T and dS^T, and a register transpose of
        a computed [BM, BN] tile costs shuffles that loading q^T does not. -inf on padded keys (rows here)."""
        mask_m = offs_m < Nq
        mask_n = offs_n < Nk
        s = tl.dot(k, qT, input_precision=PREC) * qk_scale
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n[:, None] * s_bn + offs_m[None, :] * s_bm,
                        mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            s += b.to(s.dtype) * LOG2E
        if HAS_KB:
            kb = tl.load(kb_ptr + offs_n * s_kbn, mask=mask_n, other=0.0)
            s += kb.to(s.dtype)[:, None] * LOG2E
        if GMM_M > 0:  # the bias depends on the distance only: with the roles swapped it is the transpose
            g = _gmm_tile(ck_ptr, s_ckn, s_ckc, offs_n, mask_n, cq_ptr, s_cqn, s_cqc, offs_m, mask_m, gw_ptr, gs_ptr,
                          GMM_M)
            s += g.to(s.dtype) * LOG2E
        return tl.where(mask_n[:, None], s, float("-inf"))

    # The extras' arguments, in the same order in every kernel below (see `_extra_args`):
    #   Bias [B,H,Nq,Nk] (broadcast dims stride 0), KB [B,H,Nk], CQ [B,Nq,2], CK [B,Nk,2], GW/GS [H,M]
    @triton.jit
    def _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh, CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                    HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr):
        """The extras' base pointers for batch b, head h (only those in use: the interpreter pays per statement)."""
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = Bias, KB, CQ, CK, GW, GS
        if HAS_BIAS:
            bias_p = Bias + b * s_bb + h * s_bh
        if HAS_KB:
            kb_p = KB + b * s_kbb + h * s_kbh
        if GMM_M > 0:
            cq_p, ck_p, gw_p, gs_p = CQ + b * s_cqb, CK + b * s_ckb, GW + h * s_gh, GS + h * s_gh
        return bias_p, kb_p, cq_p, ck_p, gw_p, gs_p

    def _fwd_configs():
        if interpreting():  # one big tile: the interpreter pays per executed statement, not per element
            return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=4)]
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]

    @triton.autotune(configs=_fwd_configs(), key=["Nq", "Nk", "HEAD_DIM"])
    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,  # q [B,H,Nq,D], k/v [B,H,Nk,D], out like q, LSE [B,H,Nq] fp32 (log2 units)
                  CLS, DIAG,  # side outputs, fp32: CLS [B,H,Nk] = p[0, :], DIAG [B,H,min(Nq,Nk)] = p[i, i]
                  s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                  Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                  CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                  H, Nq, Nk, qk_scale,
                  HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                  WANT_CLS: tl.constexpr, WANT_DIAG: tl.constexpr, FLAT: tl.constexpr,
                  DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_M query rows against all keys, online softmax. Side outputs come from the same
        pass: the program holding row 0 parks that row's raw scores in CLS and normalises them with the row's
        final log-sum-exp; each program keeps its rows' diagonal score in a register. (Column sums need every
        row's final lse, so they stay in a second pass, `_attn_sides`.)"""
        pid_m, pid_bh = _tile_ids(tl.cdiv(Nq, BLOCK_M), FLAT)
        b = pid_bh // H
        h = pid_bh % H
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                           CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                           HAS_BIAS, HAS_KB, GMM_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < Nq
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0).to(DOT)  # [BM, D]
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=ACC)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)  # running unnormalised output
        s_diag = tl.zeros([BLOCK_M], dtype=ACC)  # each row's own score s_ii (log2 units)
        has_row0 = pid_m == 0
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(DOT)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(DOT)
            s = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                        cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                        HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)  # [BM, BN]
            if WANT_CLS:  # row 0's raw scores, parked in the output until its lse is known
                if has_row0:
                    tl.store(CLS + pid_bh * Nk + offs_n, tl.sum(tl.where(offs_m[:, None] == 0, s, 0.0), 0),
                             mask=mask_n)
            if WANT_DIAG:
                s_diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], s, 0.0), 1)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row whose scores so far are all -inf (a user's -inf bias) must not produce inf - inf = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC).to(ACC)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=mask_m[:, None])
        lse = m_i + tl.log2(l_i)
        tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=mask_m)
        if WANT_DIAG:
            n_diag = tl.minimum(Nq, Nk)
            tl.store(DIAG + pid_bh * n_diag + offs_m, tl.exp2(s_diag - lse), mask=offs_m < n_diag)
        if WANT_CLS:
            if has_row0:
                lse0 = tl.sum(tl.where(offs_m == 0, lse, 0.0), 0)
                tl.debug_barrier()  # every thread's parked scores are in memory before any thread reads them back
                for start_n in range(0, Nk, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    raw = tl.load(CLS + pid_bh * Nk + offs_n, mask=offs_n < Nk, other=0.0)
                    tl.store(CLS + pid_bh * Nk + offs_n, tl.exp2(raw - lse0), mask=offs_n < Nk)

    def _bwd_configs(wide: str):
        """Tiles for a backward kernel: ``wide`` names the block the program owns and accumulates into
        ("BLOCK_N" keys for dK/dV, "BLOCK_M" queries for dQ); the block it walks over stays narrow. Asymmetric
        tiles and 2-4 pipeline stages, as FlashAttention-2's backward tunes them."""
        if interpreting():
            return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=4)]
        walk = "BLOCK_M" if wide == "BLOCK_N" else "BLOCK_N"
        return [triton.Config({wide: w, walk: n}, num_warps=nw, num_stages=st)
                for w, n, nw in ((64, 64, 4), (128, 32, 4), (128, 64, 8)) for st in (2, 3, 4)]

    @triton.autotune(configs=_bwd_configs("BLOCK_N"), key=["Nq", "Nk", "HEAD_DIM"])
    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DBias, DKB,
                       s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                       Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                       CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                       H, Nq, Nk, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                       BIAS_GRAD: tl.constexpr, KB_GRAD: tl.constexpr, FLAT: tl.constexpr,
                       DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """A program owns BLOCK_N keys and walks over all queries, in transposed tiles [BN, BM]:
            dv_j = sum_i p_ij do_i,  dk_j = scale * sum_i ds_ij q_i,  ds_ij = p_ij (do_i . v_j - delta_i).
        P^T and dS^T are computed as such (S^T = k q^T with q loaded transposed), never transposed in registers.
        delta comes from the dQ kernel, which runs first.
        ds is also the gradient of the additive biases: written to DBias [B,H,Nq,Nk] (fp32) or summed over
        queries into DKB [B,H,Nk] (fp32) when asked. DK/DV are contiguous [B,H,Nk,D]."""
        pid_n, pid_bh = _tile_ids(tl.cdiv(Nk, BLOCK_N), FLAT)
        b = pid_bh // H
        h = pid_bh % H
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                           CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                           HAS_BIAS, HAS_KB, GMM_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_n = offs_n < Nk
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0).to(DOT)  # [BN, D]
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0).to(DOT)
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_dob + h * s_doh
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
        dkb = tl.zeros([BLOCK_N], dtype=ACC)
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            qT = tl.load(q_base + offs_d[:, None] + offs_m[None, :] * s_qn, mask=mask_m[None, :],
                         other=0.0).to(DOT)  # [D, BM]: loaded transposed
            do = tl.load(do_base + offs_m[:, None] * s_don + offs_d[None, :], mask=mask_m[:, None], other=0.0).to(DOT)
            lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
            sT = _scores_t(k, qT, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                           cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                           HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)  # [BN, BM]
            pT = tl.where(mask_m[None, :], tl.exp2(sT - lse[None, :]), 0.0)  # padded queries: exactly 0
            dv += tl.dot(pT.to(DOT), do, input_precision=PREC).to(ACC)  # [BN, D]
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC).to(ACC)  # [BN, BM]
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(DOT), tl.trans(qT), input_precision=PREC).to(ACC)
            if BIAS_GRAD:
                tl.store(DBias + pid_bh * Nq * Nk + offs_m[None, :] * Nk + offs_n[:, None], dsT,
                         mask=mask_n[:, None] & mask_m[None, :])
            if KB_GRAD:
                dkb += tl.sum(dsT, 1)
        out = pid_bh * Nk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
        if KB_GRAD:
            tl.store(DKB + pid_bh * Nk + offs_n, dkb, mask=mask_n)

    @triton.autotune(configs=_bwd_configs("BLOCK_M"), key=["Nq", "Nk", "HEAD_DIM"])
    @triton.jit
    def _attn_bwd_dq(Q, K, V, O, DO, LSE, Delta, DQ,
                     s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_dob, s_doh, s_don,
                     Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                     CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                     H, Nq, Nk, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                     FLAT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """A program owns BLOCK_M queries and walks over all keys: dq_i = scale * sum_j ds_ij k_j.
        It first computes its rows' delta_i = out_i . dout_i (the softmax backward's row term) and stores it for
        the dK/dV kernel, which runs after it: no separate pre-pass. (A separate kernel from dK/dV, so that no
        two programs add into the same rows: no atomics.)"""
        pid_m, pid_bh = _tile_ids(tl.cdiv(Nq, BLOCK_M), FLAT)
        b = pid_bh // H
        h = pid_bh % H
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                           CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                           HAS_BIAS, HAS_KB, GMM_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < Nq
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0).to(DOT)  # [BM, D]
        do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_don + offs_d[None, :],
                     mask=mask_m[:, None], other=0.0).to(DOT)
        lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
        o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], mask=mask_m[:, None],
                    other=0.0)
        delta = tl.sum(o.to(ACC) * do.to(ACC), 1)  # [BM]
        tl.store(Delta + pid_bh * Nq + offs_m, delta, mask=mask_m)
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(DOT)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(DOT)
            s = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                        cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                        HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)
            p = tl.where(mask_m[:, None], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(DOT), k, input_precision=PREC).to(ACC)
        tl.store(DQ + pid_bh * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])

    def _fused_bwd_configs():
        if interpreting():
            return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=nw, num_stages=st)
                for m, n, nw in ((64, 64, 4), (32, 64, 4), (64, 128, 8)) for st in (1, 2)]

    @triton.autotune(configs=_fused_bwd_configs(), key=["Nq", "Nk", "HEAD_DIM"], reset_to_zero=["DQacc"])
    @triton.jit
    def _attn_bwd_fused(Q, K, V, O, DO, LSE, Delta, DQacc, DQ, DK, DV, DBias, DKB,
                        s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                        s_dob, s_doh, s_don,
                        Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                        CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                        H, Nq, Nk, qk_scale, scale,
                        HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                        BIAS_GRAD: tl.constexpr, KB_GRAD: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The whole backward of one (batch, head) in one program, for short sequences (N <= 256: a ViT's 197):
        each probability tile is recomputed once, not twice (the two-kernel path recomputes S and dP in the dQ
        kernel and again in the dK/dV kernel: 2 of its 7 tile products).
            1. delta_i = out_i . dout_i for every row;
            2. per key tile j (dk_j, dv_j in registers), per query tile i:
                 dv_j += p^T do_i,  ds = p (do_i v_j^T - delta_i),  dk_j += ds^T q_i,  dq_i += ds k_j
               where dq_i is a fp32 scratch row block only this program touches: read-add-write through L2,
               no atomics, the same order every run (deterministic);
            3. dq = scale * scratch, in the input dtype.
        The price is parallelism: B*H programs instead of tiles x B*H, plenty for a training batch."""
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                           CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                           HAS_BIAS, HAS_KB, GMM_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_dob + h * s_doh
        acc_base = DQacc + pid_bh * Nq * HEAD_DIM
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], mask=mask_m[:, None],
                        other=0.0).to(ACC)
            do = tl.load(do_base + offs_m[:, None] * s_don + offs_d[None, :], mask=mask_m[:, None],
                         other=0.0).to(ACC)
            tl.store(Delta + pid_bh * Nq + offs_m, tl.sum(o * do, 1), mask=mask_m)
        tl.debug_barrier()  # every row's delta is in memory before any thread reads one back
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0).to(DOT)  # [BN, D]
            v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0).to(DOT)
            dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
            dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
            dkb = tl.zeros([BLOCK_N], dtype=ACC)
            for start_m in range(0, Nq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                mask_m = offs_m < Nq
                q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :], mask=mask_m[:, None],
                            other=0.0).to(DOT)  # [BM, D]
                do = tl.load(do_base + offs_m[:, None] * s_don + offs_d[None, :], mask=mask_m[:, None],
                             other=0.0).to(DOT)
                lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
                delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=mask_m, other=0.0)
                s = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                            cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                            HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)  # [BM, BN]
                p = tl.where(mask_m[:, None], tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC).to(ACC)  # [BN, D]
                dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
                ds = p * (dp - delta[:, None])
                ds_dot = ds.to(DOT)
                dk += tl.dot(tl.trans(ds_dot), q, input_precision=PREC).to(ACC)
                acc_ptr = acc_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
                dq = tl.load(acc_ptr, mask=mask_m[:, None], other=0.0)
                tl.store(acc_ptr, dq + tl.dot(ds_dot, k, input_precision=PREC).to(ACC), mask=mask_m[:, None])
                if BIAS_GRAD:
                    tl.store(DBias + pid_bh * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :], ds,
                             mask=mask_m[:, None] & mask_n[None, :])
                if KB_GRAD:
                    dkb += tl.sum(ds, 0)
            out = pid_bh * Nk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None])
            tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
            if KB_GRAD:
                tl.store(DKB + pid_bh * Nk + offs_n, dkb, mask=mask_n)
            tl.debug_barrier()  # the next key tile adds into the dq rows this one wrote
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            dq = tl.load(acc_base + rows, mask=mask_m[:, None], other=0.0)
            tl.store(DQ + pid_bh * Nq * HEAD_DIM + rows, (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])

    def _dbias_configs():
        if interpreting():
            return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=st)
                for m, n in ((64, 64), (128, 64), (64, 128)) for st in (2, 3)]

    @triton.autotune(configs=_dbias_configs(), key=["Nq", "Nk", "HEAD_DIM"])
    @triton.jit
    def _attn_bwd_dbias(Q, K, V, DO, LSE, Delta, DBias,
                        s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                        Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                        CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                        B, H, Nq, Nk, qk_scale,
                        HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                        SUM_B: tl.constexpr, SUM_H: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The gradient of a bias shared across the batch (SUM_B) and/or the heads (SUM_H), reduced here:
            dbias[hb, i, j] = sum over the (b, h) sharing it of ds_bhij,   ds = p (do v^T - delta).
        A program owns one [BM, BN] tile of one bias slice (axis 1: that slice, a head when only the batch is
        summed, a batch when only the heads are) and walks over the pairs that share it, recomputing p and dp
        (two small dots per pair): no [B,H,Nq,Nk] fp32 buffer, and no atomics, so the sum is deterministic.
        DBias: contiguous [B|1, H|1, Nq, Nk] fp32. Runs after the dQ kernel, which writes Delta."""
        n_tiles_n = tl.cdiv(Nk, BLOCK_N)
        pid_m = tl.program_id(0) // n_tiles_n
        pid_n = tl.program_id(0) % n_tiles_n
        slice_id = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < Nq
        mask_n = offs_n < Nk
        n_b = B if SUM_B else 1
        n_h = H if SUM_H else 1
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for ib in range(0, n_b):
            for ih in range(0, n_h):
                b = ib if SUM_B else slice_id
                h = ih if SUM_H else slice_id
                bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                                   CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                                   HAS_BIAS, HAS_KB, GMM_M)
                q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                            mask=mask_m[:, None], other=0.0).to(DOT)  # [BM, D]
                do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_don + offs_d[None, :],
                             mask=mask_m[:, None], other=0.0).to(DOT)
                k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                            mask=mask_n[:, None], other=0.0).to(DOT)  # [BN, D]
                v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :],
                            mask=mask_n[:, None], other=0.0).to(DOT)
                row = (b * H + h) * Nq + offs_m
                lse = tl.load(LSE + row, mask=mask_m, other=0.0)
                delta = tl.load(Delta + row, mask=mask_m, other=0.0)
                s = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                            cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                            HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)
                p = tl.where(mask_m[:, None], tl.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
                acc += p * (dp - delta[:, None])
        tl.store(DBias + slice_id * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _prob_tile(q_base, s_qn, k, start_m, offs_n, offs_d, LSE_row, Nq, Nk, qk_scale,
                   bias_p, s_bm, s_bn, kb_p, s_kbn, cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p,
                   HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
        """Final probabilities p_ij = exp2(s_ij - lse_i) of queries start_m.. against the keys in k. [BM, BN]"""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Nq
        q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :], mask=mask_m[:, None], other=0.0).to(DOT)
        lse = tl.load(LSE_row + offs_m, mask=mask_m, other=0.0)
        s = _scores(q, k, offs_m, offs_n, Nq, Nk, qk_scale, bias_p, s_bm, s_bn, kb_p, s_kbn,
                    cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc, gw_p, gs_p, HAS_BIAS, HAS_KB, GMM_M, PREC).to(ACC)
        return tl.where(mask_m[:, None], tl.exp2(s - lse[:, None]), 0.0), offs_m

    def _side_configs():
        if interpreting():
            return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=4)]
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]

    @triton.autotune(configs=_side_configs(), key=["Nq", "Nk", "HEAD_DIM"])
    @triton.jit
    def _attn_sides(Q, K, LSE, CLS, COLSUM, DIAG,  # CLS/COLSUM [B,H,Nk], DIAG [B,H,min(Nq,Nk)], fp32
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn,
                    Bias, s_bb, s_bh, s_bm, s_bn, KB, s_kbb, s_kbh, s_kbn,
                    CQ, s_cqb, s_cqn, s_cqc, CK, s_ckb, s_ckn, s_ckc, GW, GS, s_gh,
                    H, Nq, Nk, qk_scale,
                    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KB: tl.constexpr, GMM_M: tl.constexpr,
                    WANT_CLS: tl.constexpr, WANT_COLSUM: tl.constexpr, WANT_DIAG: tl.constexpr,
                    FLAT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Side outputs, one program per BLOCK_N keys. All three are column reductions of p:
            cls_j = p_0j,  colsum_j = sum_i p_ij,  diag_j = p_jj.
        Column sums need every query block; the CLS row needs only the first, the diagonal only the
        blocks that cross it, so without column sums this costs a tile or two per program. (The forward
        kernel returns the CLS row and the diagonal itself; this pass runs for column sums.)"""
        pid_n, pid_bh = _tile_ids(tl.cdiv(Nk, BLOCK_N), FLAT)
        b = pid_bh // H
        h = pid_bh % H
        bias_p, kb_p, cq_p, ck_p, gw_p, gs_p = _extra_ptrs(b, h, Bias, s_bb, s_bh, KB, s_kbb, s_kbh,
                                                           CQ, s_cqb, CK, s_ckb, GW, GS, s_gh,
                                                           HAS_BIAS, HAS_KB, GMM_M)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_n = offs_n < Nk
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0).to(DOT)  # [BN, D]
        q_base = Q + b * s_qb + h * s_qh
        lse_row = LSE + pid_bh * Nq
        cls = tl.zeros([BLOCK_N], dtype=ACC)
        colsum = tl.zeros([BLOCK_N], dtype=ACC)
        diag = tl.zeros([BLOCK_N], dtype=ACC)
        if WANT_COLSUM:  # every query block; the CLS row and the diagonal come along for free
            for start_m in range(0, Nq, BLOCK_M):
                p, offs_m = _prob_tile(q_base, s_qn, k, start_m, offs_n, offs_d, lse_row, Nq, Nk, qk_scale,
                                       bias_p, s_bm, s_bn, kb_p, s_kbn, cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc,
                                       gw_p, gs_p, HAS_BIAS, HAS_KB, GMM_M, DOT, ACC, PREC, BLOCK_M)
                colsum += tl.sum(p, 0)
                cls += tl.sum(tl.where(offs_m[:, None] == 0, p, 0.0), 0)
                diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], p, 0.0), 0)
        else:
            if WANT_CLS:  # the first query block holds row 0
                p, offs_m = _prob_tile(q_base, s_qn, k, 0, offs_n, offs_d, lse_row, Nq, Nk, qk_scale,
                                       bias_p, s_bm, s_bn, kb_p, s_kbn, cq_p, s_cqn, s_cqc, ck_p, s_ckn, s_ckc,
                                       gw_p, gs_p, HAS_BIAS, HAS_KB, GMM_M, DOT, ACC, PREC, BLOCK_M)
                cls += tl.sum(tl.where(offs_m[:, None] == 0, p, 0.0), 0)
            if WANT_DIAG:  # query blocks that meet rows start_n .. start_n + BLOCK_N
                hi = tl.minimum(start_n + BLOCK_N, Nq)
                for start_m in range((start_n // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
                    p, offs_m = _prob_tile(q_base, s_qn, k, start_m, offs_n, offs_d, lse_row, Nq, Nk, qk_scale,
                                           bias_p, s_bm, s_bn, kb_p, s_kbn, cq_p, s_cqn, s_cqc, ck_p, s_ckn,
                                           s_ckc, gw_p, gs_p, HAS_BIAS, HAS_KB, GMM_M, DOT, ACC, PREC, BLOCK_M)
                    diag += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], p, 0.0), 0)
        if WANT_CLS:
            tl.store(CLS + pid_bh * Nk + offs_n, cls, mask=mask_n)
        if WANT_COLSUM:
            tl.store(COLSUM + pid_bh * Nk + offs_n, colsum, mask=mask_n)
        if WANT_DIAG:
            n_diag = tl.minimum(Nq, Nk)
            tl.store(DIAG + pid_bh * n_diag + offs_n, diag, mask=offs_n < n_diag)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _dtypes(x: torch.Tensor):
    """(DOT, ACC, PREC) constexprs for an input dtype.

    DOT: the dtype of tl.dot's operands. On GPU fp16/bf16 stay native (tensor cores, fp32 accumulate;
    products of halves are exact in fp32, the same as upcasting first). The interpreter computes bf16
    wrongly, so there everything is upcast to fp32 right after the load. fp64 stays fp64 (gradcheck).
    PREC: fp32 dots follow PyTorch's own setting (TF32 only if torch.backends.cuda.matmul.allow_tf32).
    """
    if x.dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if x.dtype == torch.float32 or interpreting():
        tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
        return tl.float32, tl.float32, ("tf32" if tf32 else "ieee")
    return (tl.float16 if x.dtype == torch.float16 else tl.bfloat16), tl.float32, "tf32"


def _extra_args(q, bias, key_bias, gmm, H):
    """Positional kernel arguments for the extras (a dummy pointer and zero strides where absent),
    and their constexpr flags. Broadcast dims get stride 0, so nothing is materialised."""
    dummy = q
    if bias is not None:
        bias_args = (bias, bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3))
    else:
        bias_args = (dummy, 0, 0, 0, 0)
    if key_bias is not None:
        kb_args = (key_bias, key_bias.stride(0), key_bias.stride(1), key_bias.stride(2))
    else:
        kb_args = (dummy, 0, 0, 0)
    gmm_m = 0
    if gmm is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        cq = gmm.coords_q.to(acc)
        ck = gmm.coords_k.to(acc)
        cq, ck = (cq[None] if cq.ndim == 2 else cq), (ck[None] if ck.ndim == 2 else ck)  # [B|1, N, 2]
        cq_b = cq.stride(0) if cq.shape[0] > 1 else 0
        ck_b = ck.stride(0) if ck.shape[0] > 1 else 0
        gw = gmm.log_weights(acc).detach().expand(H, -1).contiguous()  # [H, M]
        gs = (0.5 / gmm.sigma.detach().to(acc).pow(2)).expand(H, -1).contiguous()  # [H, M]
        gmm_m = gw.shape[1]
        gmm_args = (cq, cq_b, cq.stride(1), cq.stride(2), ck, ck_b, ck.stride(1), ck.stride(2), gw, gs, gw.stride(0))
    else:
        gmm_args = (dummy, 0, 0, 0, dummy, 0, 0, 0, dummy, dummy, 0)
    flags = dict(HAS_BIAS=bias is not None, HAS_KB=key_bias is not None, GMM_M=gmm_m)
    return bias_args + kb_args + gmm_args, flags


def _strides3(x):  # (batch, head, token) strides of a [B,H,N,D] tensor whose last dim is contiguous
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x):
    """The kernels assume stride 1 along D (they index d directly); copy only if that is not so."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_like_layout(q, N):
    """Output [B,H,N,D] in q's memory order: if q is a [B,N,H,D] buffer seen as [B,H,N,D] (the usual
    qkv.reshape(B,N,3,H,D).permute(...) of a ViT), the output is too, so out.transpose(1,2).reshape(B,N,C)
    after it costs no copy."""
    B, H, _, D = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)


MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1
# The one-program-per-head backward (_attn_bwd_fused) takes sequences up to FUSED_BWD_LIMIT; it is used for those
# up to FUSED_BWD_MAX_N. Off by default, as measured: on an H200 (benchmarks/results/kernels-nvidia-h200-*.json,
# bf16, N=197) the dQ + dK/dV kernels took less device time at ViT-S batch 64 (0.138 vs 0.186 ms fwd+bwd) and at
# ViT-B batch 256 (0.950 vs 1.173 ms). Fewer launches still make the fused one quicker when the host is the
# bottleneck (tiny batches); set FUSED_BWD_MAX_N = FUSED_BWD_LIMIT there.
FUSED_BWD_LIMIT = 256
FUSED_BWD_MAX_N = 0


def _grid(n: int, block: str, bh: int):
    """(grid, FLAT) for ``n`` rows in tiles of META[block] for each of ``bh`` (batch, head) pairs: tiles on axis 0
    (they vary fastest, so one head's programs run together), batch*head on axis 1, or 1-D past its limit."""
    flat = bh > MAX_GRID_Y

    def grid(META):
        tiles = triton.cdiv(n, META[block])
        return (tiles * bh,) if flat else (tiles, bh)
    return grid, flat


def _forward(q, k, v, scale, bias, key_bias, gmm, want_cls=False, want_diag=False):
    """Triton forward. Returns out [B,H,Nq,D], lse [B,H,Nq] (log2 units, fp32/fp64), and the CLS row [B,H,Nk]
    and diagonal [B,H,min(Nq,Nk)] of the probabilities when asked (else None)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    DOT, ACC, PREC = _dtypes(q)
    o = _empty_like_layout(q, Nq)
    lse = torch.empty(B, H, Nq, dtype=torch.float64 if ACC == tl.float64 else torch.float32, device=q.device)
    cls = torch.empty(B, H, Nk, dtype=lse.dtype, device=q.device) if want_cls else lse
    diag = torch.empty(B, H, min(Nq, Nk), dtype=lse.dtype, device=q.device) if want_diag else lse
    extra, flags = _extra_args(q, bias, key_bias, gmm, H)
    grid, flat = _grid(Nq, "BLOCK_M", B * H)
    _attn_fwd[grid](q, k, v, o, lse, cls, diag, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
                    *extra, H, Nq, Nk, scale * 1.4426950408889634,
                    HEAD_DIM=D, WANT_CLS=want_cls, WANT_DIAG=want_diag, FLAT=flat, DOT=DOT, ACC=ACC, PREC=PREC,
                    **flags)
    return o, lse, (cls if want_cls else None), (diag if want_diag else None)


def _sides(q, k, lse, scale, bias, key_bias, gmm, want):
    """Triton side outputs from the forward's lse: dict of [B,H,Nk] / [B,H,min(Nq,Nk)] tensors."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    DOT, ACC, PREC = _dtypes(q)
    out_dt = lse.dtype
    cls = torch.empty(B, H, Nk, dtype=out_dt, device=q.device) if "cls" in want else lse
    colsum = torch.empty(B, H, Nk, dtype=out_dt, device=q.device) if "colsum" in want else lse
    diag = torch.empty(B, H, min(Nq, Nk), dtype=out_dt, device=q.device) if "diag" in want else lse
    extra, flags = _extra_args(q, bias, key_bias, gmm, H)
    grid, flat = _grid(Nk, "BLOCK_N", B * H)
    _attn_sides[grid](q, k, lse, cls, colsum, diag, *_strides3(q), *_strides3(k),
                      *extra, H, Nq, Nk, scale * 1.4426950408889634,
                      HEAD_DIM=D, WANT_CLS="cls" in want, WANT_COLSUM="colsum" in want, WANT_DIAG="diag" in want,
                      FLAT=flat, DOT=DOT, ACC=ACC, PREC=PREC, **flags)
    sides = {"cls": cls, "colsum": colsum, "diag": diag}
    return {name: sides[name] for name in SIDE_NAMES if name in want}


def _backward(do, q, k, v, o, lse, scale, bias, key_bias, gmm, bias_grad, kb_grad, fused):
    """Triton backward: dq, dk, dv (contiguous, input dtype) and, if asked, the fp32 gradients of the
    expanded bias [B,H,Nq,Nk] and key bias [B,H,Nk] (the caller sums them back to the given shapes)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    DOT, ACC, PREC = _dtypes(q)
    do = _unit_last(do)
    delta = torch.empty_like(lse)  # [B,H,Nq]: written by the dQ kernel, read by the dK/dV kernel after it
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Nk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, Nk, D, dtype=v.dtype, device=q.device)
    # a bias shared across the batch and/or the heads gets its gradient summed in a kernel of its own, so the
    # [B,H,Nq,Nk] fp32 buffer exists only for a per-example, per-head bias (whose gradient is that size anyway)
    sum_b, sum_h = (bias.stride(0) == 0 and B > 1, bias.stride(1) == 0 and H > 1) if bias_grad else (False, False)
    reduce_bias = (sum_b or sum_h) and bias.stride(2) != 0 and bias.stride(3) != 0
    in_dkdv = bias_grad and not reduce_bias
    dbias = torch.empty(B, H, Nq, Nk, dtype=lse.dtype, device=q.device) if in_dkdv else lse
    dkb = torch.empty(B, H, Nk, dtype=lse.dtype, device=q.device) if kb_grad else lse
    extra, flags = _extra_args(q, bias, key_bias, gmm, H)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *extra, H, Nq, Nk,
              scale * 1.4426950408889634, scale)
    if fused:  # one program per (batch, head) does it all
        dq_acc = torch.zeros(B, H, Nq, D, dtype=lse.dtype, device=q.device)
        _attn_bwd_fused[(B * H,)](q, k, v, o, do, lse, delta, dq_acc, dq, dk, dv, dbias, dkb,
                                  *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_strides3(do),
                                  *extra, H, Nq, Nk, scale * 1.4426950408889634, scale, HEAD_DIM=D,
                                  BIAS_GRAD=in_dkdv, KB_GRAD=kb_grad, DOT=DOT, ACC=ACC, PREC=PREC, **flags)
    else:
        grid_q, flat = _grid(Nq, "BLOCK_M", B * H)
        consts = dict(HEAD_DIM=D, FLAT=flat, DOT=DOT, ACC=ACC, PREC=PREC, **flags)
        _attn_bwd_dq[grid_q](q, k, v, o, do, lse, delta, dq, *_strides3(q), *_strides3(k), *_strides3(v),
                             *_strides3(o), *_strides3(do), *extra, H, Nq, Nk, scale * 1.4426950408889634, scale,
                             **consts)  # first: it writes delta
        grid_kv, _ = _grid(Nk, "BLOCK_N", B * H)
        _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, dbias, dkb, *common,
                                BIAS_GRAD=in_dkdv, KB_GRAD=kb_grad, **consts)
    if reduce_bias:
        slices = 1 if (sum_b or B == 1) and (sum_h or H == 1) else (H if sum_b else B)
        dbias = torch.empty(B if not sum_b else 1, H if not sum_h else 1, Nq, Nk, dtype=lse.dtype,
                            device=q.device)
        _attn_bwd_dbias[lambda META: (triton.cdiv(Nq, META["BLOCK_M"]) * triton.cdiv(Nk, META["BLOCK_N"]),
                                      slices)](
            q, k, v, do, lse, delta, dbias, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *extra,
            B, H, Nq, Nk, scale * 1.4426950408889634, HEAD_DIM=D, SUM_B=sum_b, SUM_H=sum_h, DOT=DOT, ACC=ACC,
            PREC=PREC, **flags)
    return dq, dk, dv, (dbias if bias_grad else None), (dkb if kb_grad else None)


class _FlashAttention(torch.autograd.Function):
    """autograd through the Triton kernels. Inputs: q, k, v, the user's bias and key_bias (their
    original shapes, for the gradients), the extras as the kernels take them, scale, and which side outputs
    the forward returns. Returns (out, lse, cls, diag); only out is differentiable (cls/diag: None if unasked)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_in, key_bias_in, bias, key_bias, gmm, scale, want_cls, want_diag):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse, cls, diag = _forward(q, k, v, scale, bias, key_bias, gmm, want_cls, want_diag)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.extras = (bias_in, key_bias_in, bias, key_bias, gmm, scale)
        ctx.fused = max(q.shape[2], k.shape[2]) <= min(FUSED_BWD_MAX_N, FUSED_BWD_LIMIT)  # decided here: the benchmark times both
        ctx.mark_non_differentiable(lse, *(t for t in (cls, diag) if t is not None))
        ctx.set_materialize_grads(False)  # no zero-filled dout when nothing downstream needs the output
        return o, lse, cls, diag

    @staticmethod
    def backward(ctx, do, _dlse, _dcls, _ddiag):
        if do is None:
            return (None,) * 11
        q, k, v, o, lse = ctx.saved_tensors
        bias_in, key_bias_in, bias, key_bias, gmm, scale = ctx.extras
        bias_grad, kb_grad = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dq, dk, dv, dbias, dkb = _backward(do, q, k, v, o, lse, scale, bias, key_bias, gmm, bias_grad, kb_grad,
                                           ctx.fused)
        if dbias is not None:  # undo the broadcast: sum over the dims the user's bias did not have
            dbias = dbias.sum_to_size(bias_in.shape).to(bias_in.dtype)
        if dkb is not None:  # [B,H,Nk] -> the user's [B,Nk] or [B|1, H|1, Nk]
            shape = key_bias_in.shape
            dkb = (dkb.sum(1) if len(shape) == 2 else dkb).sum_to_size(shape).to(key_bias_in.dtype)
        return dq, dk, dv, dbias, dkb, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------
def _gmm_needs_grad(gmm) -> bool:
    if gmm is None or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (gmm.coords_q, gmm.coords_k, gmm.sigma, gmm.logits))


def attention(q, k, v, *, scale=None, bias=None, key_bias=None, gmm=None,
              return_cls=False, return_colsum=False, return_diag=False):
    """softmax(q k^T * scale + bias + key_bias + gmm) v, fused.

    q [B,H,Nq,D], k/v [B,H,Nk,D], D in (16, 32, 64, 128), dtype fp16/bf16/fp32 (fp64: interpreter and
    reference only); scale defaults to D**-0.5.
    bias      [B|1, H|1, Nq, Nk] (any broadcastable shape of 2-4 dims) dense additive bias
    key_bias  [B, Nk] or [B, H, Nk] per-key additive bias, e.g. log token size
    gmm       `GaussianMixtureBias` (or a tuple of its fields), computed in the kernel
    return_*  side outputs, detached, fp32 (fp64 for fp64 inputs):
              "cls" [B,H,Nk] row 0 of the probabilities (average over heads yourself: .mean(1)),
              "colsum" [B,H,Nk] attention each key receives, summed over queries,
              "diag" [B,H,min(Nq,Nk)] p[i,i].
    Returns out [B,H,Nq,D] in q's dtype, or (out, sides dict) when a side output is requested.
    """
    scale, bias_x, kb_x, gmm = _check_inputs("attention", q, k, v, scale, bias, key_bias, gmm)
    want = _wanted(return_cls, return_colsum, return_diag)
    triton_ok = (use_triton(q, k, v) and not (q.is_cuda and q.dtype == torch.float64)
                 and not _gmm_needs_grad(gmm))
    if triton_ok:
        return _attention_triton(q, k, v, scale, bias, key_bias, bias_x, kb_x, gmm, want)
    plain = not want and bias is None and key_bias is None and gmm is None
    if plain and (q.dtype == torch.float32 or q.is_cuda):  # same result as the reference, without N×N
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_ref(q, k, v, scale=scale, bias=bias, key_bias=key_bias, gmm=gmm,
                         return_cls=return_cls, return_colsum=return_colsum, return_diag=return_diag)


@torch.compiler.disable  # torch.compile sees a call it does not trace (a graph break), never a half-traced launcher
def _attention_triton(q, k, v, scale, bias, key_bias, bias_x, kb_x, gmm, want):
    # the CLS row and the diagonal come out of the forward kernel itself; column sums need a second pass
    in_forward = "colsum" not in want
    out, lse, cls, diag = _FlashAttention.apply(q, k, v, bias, key_bias, bias_x, kb_x, gmm, scale,
                                                in_forward and "cls" in want, in_forward and "diag" in want)
    if not want:
        return out
    if in_forward:
        return out, {name: t for name, t in (("cls", cls), ("diag", diag)) if name in want}
    with torch.no_grad():
        sides = _sides(_unit_last(q.detach()), _unit_last(k.detach()), lse, scale,
                       None if bias_x is None else bias_x.detach(), None if kb_x is None else kb_x.detach(),
                       gmm, want)
    return out, sides
