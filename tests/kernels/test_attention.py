"""vitlab.kernels.attention: the Triton kernels against the PyTorch reference.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1);
on a CUDA machine the same tests run the compiled kernels.

Tolerance rule: error against an fp64 oracle at most 2x PyTorch's own error for the same computation in
the same dtype, plus a small atol. (fp64 rather than fp32 as the oracle, so that the fp32 case measures
something: PyTorch's fp32 computation *is* the fp32 reference.)
"""
import math

import pytest
import torch

from vitlab.kernels._dispatch import interpreting, use_triton
from vitlab.kernels.attention import GaussianMixtureBias, attention, attention_ref, grid_coords

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (Triton's CPU interpreter)")
ATOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
SIDES = dict(return_cls=True, return_colsum=True, return_diag=True)


def make_qkv(B, H, Nq, Nk, D, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
    return tuple(x.to(device=DEVICE, dtype=dtype).requires_grad_(grad) for x in (q, k, v))


def naive(q, k, v, scale=None, bias=None):
    """Attention the way one writes it in PyTorch, in the inputs' own dtype: PyTorch's own error."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    return s.softmax(-1) @ v


def oracle(q, k, v, **kw):
    """attention_ref on fp64 copies of the inputs (the biases too)."""
    kw = {n: (x.double() if torch.is_tensor(x) else x) for n, x in kw.items()}
    return attention_ref(q.double(), k.double(), v.double(), **kw)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_rule(got, torch_own, want, dtype, what=""):
    err, own = max_err(got, want), max_err(torch_own, want)
    bound = 2 * own + ATOL[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x PyTorch's own {own:.3g} + atol {ATOL[dtype]:g}"


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
FWD_CASES = [  # B, H, Nq, Nk, D, dtype
    (1, 2, 197, 197, 64, torch.float32),
    (1, 2, 197, 197, 64, torch.float16),
    (2, 1, 50, 50, 32, torch.float32),
    (1, 2, 50, 50, 32, torch.float16),
    (1, 2, 50, 50, 64, torch.bfloat16),
    (1, 2, 1, 65, 32, torch.float32),
    (1, 2, 17, 65, 64, torch.float16),
    (1, 1, 65, 17, 16, torch.float32),
    (1, 1, 65, 65, 128, torch.float32),
    (1, 1, 260, 300, 16, torch.float32),  # more than one tile each way, also under the interpreter
]


@needs_triton
@pytest.mark.parametrize("B,H,Nq,Nk,D,dtype", FWD_CASES)
def test_forward_matches_reference(B, H, Nq, Nk, D, dtype):
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype)
    out = attention(q, k, v)
    assert out.shape == (B, H, Nq, D) and out.dtype == dtype and out.device == q.device
    assert_close_rule(out, naive(q, k, v), oracle(q, k, v), dtype, f"forward {dtype}")
    # the reference itself obeys the same rule (it is the CPU path)
    assert_close_rule(attention_ref(q, k, v), naive(q, k, v), oracle(q, k, v), dtype, "reference")


@needs_triton
def test_forward_scale_and_deterministic():
    q, k, v = make_qkv(1, 2, 50, 50, 32)
    a = attention(q, k, v, scale=0.3)
    assert torch.equal(a, attention(q, k, v, scale=0.3))  # same inputs, same bits
    assert_close_rule(a, naive(q, k, v, scale=0.3), oracle(q, k, v, scale=0.3), torch.float32)


@needs_triton
def test_strided_inputs_and_output_layout():
    """q/k/v as slices of a ViT's fused qkv buffer [B,N,3,H,D]: no copy needed, output in [B,N,H,D] order."""
    B, N, H, D = 2, 50, 2, 32
    qkv = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B,H,N,D], non-contiguous
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # .transpose(1,2).reshape(B,N,H*D) is free
    assert max_err(out, oracle(q, k, v)) < 1e-5


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
BWD_CASES = [
    (1, 2, 197, 197, 64, torch.float32),
    (1, 2, 50, 50, 32, torch.float16),
    (1, 2, 17, 65, 32, torch.float32),
    (1, 2, 1, 65, 64, torch.float16),
    (1, 1, 50, 50, 128, torch.float32),
    (1, 1, 260, 300, 16, torch.float32),
]


def grads(fn, q, k, v, dout, **kw):
    out = fn(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_kernels"])
@pytest.mark.parametrize("B,H,Nq,Nk,D,dtype", BWD_CASES)
def test_backward_matches_reference(B, H, Nq, Nk, D, dtype, fused, monkeypatch):
    """Both backward paths: one program per head (N <= FUSED_BWD_LIMIT) and the dQ + dK/dV kernels."""
    from vitlab.kernels import attention as A

    if fused and max(Nq, Nk) > A.FUSED_BWD_LIMIT:
        pytest.skip("longer than the fused backward takes")
    monkeypatch.setattr(A, "FUSED_BWD_MAX_N", A.FUSED_BWD_LIMIT if fused else 0)
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype, grad=True)
    dout = torch.randn(B, H, Nq, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = grads(attention_ref, q64, k64, v64, dout)
    got = grads(attention, q, k, v, dout)
    own = grads(naive, q, k, v, dout)
    for name, g, o, w in zip("qkv", got, own, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close_rule(g, o, w, dtype, f"d{name} {dtype}")


@needs_triton
def test_backward_through_sum_and_bias_grads():
    """A stride-0 upstream gradient (out.sum()), and the gradients of a broadcast dense bias and a key bias."""
    B, H, N, D = 2, 2, 33, 32
    q, k, v = make_qkv(B, H, N, N, D, grad=True)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(H, N, N, generator=g).to(DEVICE).requires_grad_()  # broadcast over B
    kb = torch.randn(B, N, generator=g).to(DEVICE).requires_grad_()
    ins = (q, k, v, bias, kb)
    got = torch.autograd.grad(attention(q, k, v, bias=bias, key_bias=kb).sum(), ins)
    want = torch.autograd.grad(attention_ref(q, k, v, bias=bias, key_bias=kb).sum(), ins)
    for name, a, b in zip(("q", "k", "v", "bias", "key_bias"), got, want):
        assert a.shape == b.shape, name
        assert max_err(a, b) < 2e-5, name


@needs_triton
@pytest.mark.parametrize("shape,reduced", [
    ((3, 2, 33, 40), False),  # per example and head: its gradient is [B,H,Nq,Nk] anyway
    ((2, 33, 40), True),      # shared across the batch (a relative-position table)
    ((1, 1, 33, 40), True),   # shared across batch and heads
    ((33, 40), True),
    ((3, 1, 33, 40), True),   # shared across heads only (a per-image mask)
    ((1, 2, 1, 40), False),   # broadcast over queries too: the general path (materialise, then sum)
])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_kernels"])
def test_broadcast_bias_grad_is_reduced_in_kernel(shape, reduced, fused, monkeypatch):
    """A bias shared across the batch and/or heads gets its gradient summed by the dbias kernel (no
    [B,H,Nq,Nk] fp32 buffer), and it equals the reference's, after either backward path."""
    from vitlab.kernels import attention as A

    monkeypatch.setattr(A, "FUSED_BWD_MAX_N", A.FUSED_BWD_LIMIT if fused else 0)

    B, H, Nq, Nk, D = 3, 2, 33, 40, 16
    q, k, v = make_qkv(B, H, Nq, Nk, D, grad=True)
    bias = (0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(4))).to(DEVICE).requires_grad_()
    dout = torch.randn(B, H, Nq, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    calls = []
    kernel = A._attn_bwd_dbias
    monkeypatch.setattr(A, "_attn_bwd_dbias", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), kernel[grid])[1]})())
    got = torch.autograd.grad(attention(q, k, v, bias=bias), (q, k, v, bias), dout)
    want = torch.autograd.grad(attention_ref(q, k, v, bias=bias), (q, k, v, bias), dout)
    assert bool(calls) == reduced
    for name, a, b in zip(("q", "k", "v", "bias"), got, want):
        assert a.shape == b.shape, name
        assert max_err(a, b) < 2e-5, name


@needs_triton
@pytest.mark.skipif(not interpreting(), reason="fp64 runs in the interpreter; on CUDA fp64 takes the reference path")
def test_gradcheck_fp64():
    q, k, v = make_qkv(1, 1, 3, 5, 16, torch.float64, grad=True)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(1, 1, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    kb = torch.randn(1, 5, generator=g, dtype=torch.float64).requires_grad_()
    fn = lambda q, k, v, b, kb: attention(q, k, v, bias=b, key_bias=kb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias, kb), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Side outputs and the extras
# ----------------------------------------------------------------------------------------------
def sides_from_probs(q, k, v, scale=None, dense_bias=None):
    """The side outputs read off the full probability matrix, in fp64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if dense_bias is not None:
        s = s + dense_bias.double()
    p = s.softmax(-1)
    n = min(p.shape[-2:])
    return {"cls": p[:, :, 0], "colsum": p.sum(-2), "diag": torch.diagonal(p, dim1=-2, dim2=-1)[..., :n]}


@needs_triton
@pytest.mark.parametrize("Nq,Nk", [(50, 50), (17, 65), (65, 17)])
def test_side_outputs_plain(Nq, Nk):
    q, k, v = make_qkv(1, 2, Nq, Nk, 32)
    out, sides = attention(q, k, v, **SIDES)
    want = sides_from_probs(q, k, v)
    assert set(sides) == {"cls", "colsum", "diag"}
    for name in want:
        assert sides[name].shape == want[name].shape, name
        assert max_err(sides[name], want[name]) < 1e-5, name
    assert max_err(out, oracle(q, k, v)) < 1e-5
    assert torch.allclose(sides["cls"].sum(-1).double(), torch.ones(1, 2, dtype=torch.float64), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("Nq,Nk", [(300, 260), (260, 300)])
def test_side_outputs_each_alone_many_blocks(Nq, Nk):
    """One side output at a time takes the short paths (first query block, diagonal blocks); 260-300
    tokens span more than one tile both under the interpreter and on GPU."""
    q, k, v = make_qkv(1, 1, Nq, Nk, 16)
    want = sides_from_probs(q, k, v)
    for name in ("cls", "colsum", "diag"):
        out, sides = attention(q, k, v, **{f"return_{name}": True})
        assert list(sides) == [name]
        assert max_err(sides[name], want[name]) < 1e-5, name
    assert max_err(out, oracle(q, k, v)) < 1e-5


@needs_triton
def test_side_outputs_with_all_biases():
    B, H, D, side = 2, 2, 32, 7  # 1 CLS + 7x7 patches = 50 tokens
    N = 1 + side * side
    q, k, v = make_qkv(B, H, N, N, D)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(1, H, N, N, generator=g).to(DEVICE)
    kb = torch.log(torch.randint(1, 5, (B, N), generator=g).float()).to(DEVICE)  # log token sizes
    c = grid_coords(side, side, device=DEVICE)
    gmm = GaussianMixtureBias(c, c, torch.tensor([[1.0, 3.0], [0.5, 2.0]]).to(DEVICE),
                              torch.tensor([[0.0, 1.0], [2.0, -1.0]]).to(DEVICE))
    out, sides = attention(q, k, v, bias=bias, key_bias=kb, gmm=gmm, **SIDES)
    dense = bias + kb[:, None, None, :] + gmm.dense()
    want = sides_from_probs(q, k, v, dense_bias=dense)
    for name in want:
        assert max_err(sides[name], want[name]) < 1e-5, name
    ref_out, ref_sides = attention_ref(q, k, v, bias=bias, key_bias=kb, gmm=gmm, **SIDES)
    assert max_err(out, ref_out) < 1e-5
    for name in want:
        assert max_err(ref_sides[name], want[name]) < 1e-6, name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_biases_forward_rule(dtype):
    """Dense bias + per-key bias + gmm at N=197 (CLS + 14x14 patches), fp32 and fp16, by the tolerance rule."""
    B, H, N, D = 1, 2, 197, 64
    q, k, v = make_qkv(B, H, N, N, D, dtype)
    g = torch.Generator().manual_seed(5)
    bias = (0.5 * torch.randn(B, H, N, N, generator=g)).to(DEVICE, dtype)
    kb = (0.5 * torch.randn(B, N, generator=g)).to(DEVICE, dtype)
    c = grid_coords(14, 14, device=DEVICE)
    gmm = GaussianMixtureBias(c, c, torch.tensor([[2.0], [4.0]], device=DEVICE))
    out = attention(q, k, v, bias=bias, key_bias=kb, gmm=gmm)
    dense = bias.float() + kb.float()[:, None, None, :] + gmm.dense()
    assert_close_rule(out, naive(q, k, v, bias=dense.to(dtype)),
                      oracle(q, k, v, bias=bias, key_bias=kb, gmm=gmm), dtype, f"biased forward {dtype}")


@needs_triton
def test_gmm_backward_and_learnable_sigma():
    B, H, D, side = 1, 2, 32, 5
    N = 1 + side * side
    q, k, v = make_qkv(B, H, N, N, D, grad=True)
    c = grid_coords(side, side, device=DEVICE)
    gmm = GaussianMixtureBias(c, c, torch.tensor([[1.0, 2.0], [1.5, 0.7]], device=DEVICE))
    got = torch.autograd.grad(attention(q, k, v, gmm=gmm).square().sum(), (q, k, v))  # Triton backward
    want = torch.autograd.grad(attention_ref(q, k, v, gmm=gmm).square().sum(), (q, k, v))
    for a, b in zip(got, want):
        assert max_err(a, b) < 2e-5
    # learnable sigma: the Triton backward has no gradient for it, so attention takes the reference path
    sigma = torch.tensor([[1.0, 2.0], [1.5, 0.7]], device=DEVICE, requires_grad=True)
    attention(q, k, v, gmm=(c, c, sigma)).sum().backward()
    assert sigma.grad is not None and torch.isfinite(sigma.grad).all() and sigma.grad.abs().sum() > 0


def test_gmm_bias_by_hand():
    c = grid_coords(2, 2)  # CLS (NaN), (0,0), (0,1), (1,0), (1,1)
    assert c.shape == (5, 2) and c[0].isnan().all() and c[4].tolist() == [1.0, 1.0]
    sigma = torch.tensor([[2.0]])
    b = GaussianMixtureBias(c, c, sigma).dense()  # one Gaussian: bias = -d^2 / (2 sigma^2)
    assert b.shape == (1, 1, 5, 5)
    assert (b[0, 0, 0] == 0).all() and (b[0, 0, :, 0] == 0).all()  # CLS rows/cols: no bias
    assert b[0, 0, 1, 1] == 0  # distance 0
    assert math.isclose(b[0, 0, 1, 4].item(), -2 / 8, rel_tol=1e-6)  # (0,0)-(1,1): d^2 = 2
    # two components with weights w = softmax(logits): log(w1 e^{-d2/(2 s1^2)} + w2 e^{-d2/(2 s2^2)})
    gm = GaussianMixtureBias(c, c, torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, math.log(3.0)]]))
    want = math.log(0.25 * math.exp(-1 / 2) + 0.75 * math.exp(-1 / 18))  # (0,0)-(0,1): d^2 = 1
    assert math.isclose(gm.dense()[0, 0, 1, 2].item(), want, rel_tol=1e-6)
    far = GaussianMixtureBias(torch.zeros(1, 2), torch.full((1, 2), 1e3), torch.tensor([[0.1, 0.2]])).dense()
    assert torch.isfinite(far).all() and far.item() < -1e6  # stable far away: no log(0)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [attention, attention_ref])
def test_bad_input(fn):
    q, k, v = make_qkv(1, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="share B, H and D"):
        fn(q, k[..., :16], v)
    with pytest.raises(ValueError, match="share B, H and D"):
        fn(q, torch.cat([k, k], 1), v)
    with pytest.raises(ValueError, match="same number of keys"):
        fn(q, k, v[:, :, :5])
    with pytest.raises(TypeError, match="k has dtype int64"):
        fn(q, k.long(), v)
    with pytest.raises(TypeError, match="share one dtype"):
        fn(q, k.half(), v)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn(q, k.tolist(), v)
    q48 = torch.randn(1, 2, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dim D=48 not supported; expected one of \[16, 32, 64, 128\]"):
        fn(q48, q48, q48)
    with pytest.raises(ValueError, match="same device"):
        fn(q, k.to("meta"), v)
    with pytest.raises(TypeError, match="scale must be a finite float"):
        fn(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="bias of shape"):
        fn(q, k, v, bias=torch.zeros(1, 2, 8, 7, device=DEVICE))
    with pytest.raises(ValueError, match="key_bias of shape"):
        fn(q, k, v, key_bias=torch.zeros(1, 9, device=DEVICE))
    c = grid_coords(1, 7, device=DEVICE)
    with pytest.raises(ValueError, match=r"gmm.sigma must be \[H=2 or 1, M\]"):
        fn(q, k, v, gmm=(c, c, torch.ones(2, 5, device=DEVICE)))
    with pytest.raises(ValueError, match="gmm.coords_k must be"):
        fn(q, k, v, gmm=(c, c[:5], torch.ones(2, 1, device=DEVICE)))
    with pytest.raises(TypeError, match="gmm must be a GaussianMixtureBias"):
        fn(q, k, v, gmm="gauss")
    with pytest.raises(ValueError, match="grid_w must be an int"):
        grid_coords(3, 0)


# ----------------------------------------------------------------------------------------------
# GPU tile shapes, the flat grid, side outputs from the forward kernel, and proof that Triton ran
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_tiles(monkeypatch):
    """The kernels with GPU-sized tiles (64 x 64) even under the interpreter, so that at N = 197 every
    multi-tile path runs: several query blocks per head, several key tiles per block, the diagonal in
    several programs, the CLS row parked over several key tiles."""
    import vitlab.kernels.attention as A
    from triton import Config

    for kern in (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq, A._attn_sides):
        monkeypatch.setattr(kern, "configs", [Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)])
        monkeypatch.setattr(kern, "cache", {})
    yield


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if `attention` quietly took the PyTorch path instead of the Triton kernels."""
    import vitlab.kernels.attention as A

    def refuse(*a, **k):
        raise AssertionError("took the PyTorch fallback, not the Triton kernels")

    monkeypatch.setattr(A, "attention_ref", refuse)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", refuse)


@needs_triton
@pytest.mark.parametrize("flat", [False, True])
def test_gpu_tiles_at_197_tokens_forward_backward_sides(gpu_tiles, no_fallback, monkeypatch, flat):
    import vitlab.kernels.attention as A

    if flat:  # the 1-D grid a huge batch*heads (window attention) needs, tried on a small case
        monkeypatch.setattr(A, "MAX_GRID_Y", 1)
    q, k, v = make_qkv(2, 2, 197, 197, 32, grad=True)
    out, sides = attention(q, k, v, return_cls=True, return_diag=True)  # both from the forward kernel
    want = sides_from_probs(q.detach(), k.detach(), v.detach())
    for name in ("cls", "diag"):
        assert max_err(sides[name], want[name]) < 1e-5, name
    ref = oracle(q.detach(), k.detach(), v.detach())
    assert max_err(out, ref) < 1e-5
    _, all_sides = attention(q.detach(), k.detach(), v.detach(), **SIDES)  # column sums: the second pass
    for name in want:
        assert max_err(all_sides[name], want[name]) < 1e-5, name
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    wanted = torch.autograd.grad(attention_ref(qd, kd, vd), (qd, kd, vd), dout.double())
    for name, g, w in zip("qkv", got, wanted):
        assert max_err(g, w) < 1e-5, f"d{name}"


@needs_triton
def test_cls_and_diag_come_from_the_forward_kernel(monkeypatch):
    """Without column sums the second (sides) pass does not run at all."""
    import vitlab.kernels.attention as A

    monkeypatch.setattr(A, "_sides", lambda *a, **k: pytest.fail("ran the second pass"))
    q, k, v = make_qkv(1, 2, 65, 65, 16)
    _, sides = attention(q, k, v, return_cls=True, return_diag=True)
    want = sides_from_probs(q, k, v)
    assert max_err(sides["cls"], want["cls"]) < 1e-5 and max_err(sides["diag"], want["diag"]) < 1e-5


@needs_triton
def test_output_unused_in_the_loss_needs_no_backward():
    """set_materialize_grads(False): a loss on a side branch only leaves the attention without a dout."""
    q, k, v = make_qkv(1, 1, 17, 17, 16, grad=True)
    out, sides = attention(q, k, v, return_cls=True)
    loss = (q * 2).sum()  # out is not used
    loss.backward()
    assert torch.equal(q.grad, torch.full_like(q, 2.0)) and k.grad is None


@needs_triton
def test_gpu_tiles_bias_and_key_bias_gradients(gpu_tiles, no_fallback):
    """dBias / dKeyBias from the transposed dK/dV tiles, several tiles each way (N = 197, 64 x 64 tiles)."""
    N = 197
    q, k, v = make_qkv(2, 2, N, N, 16, grad=True)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(1, 2, N, N, generator=g).to(DEVICE).requires_grad_()
    kb = torch.randn(2, N, generator=g).to(DEVICE).requires_grad_()
    out = attention(q, k, v, bias=bias, key_bias=kb)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias, kb), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias, kb)]
    ref = attention_ref(*leaves[:3], bias=leaves[3], key_bias=leaves[4])
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dbias", "dkey_bias"), got, want):
        assert max_err(a, b) < 2e-5, name


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_kernels"])
def test_backward_is_deterministic(fused, monkeypatch):
    """No atomics in either backward path: the same inputs give the same gradient bits every run."""
    from vitlab.kernels import attention as A

    monkeypatch.setattr(A, "FUSED_BWD_MAX_N", A.FUSED_BWD_LIMIT if fused else 0)
    q, k, v = make_qkv(2, 2, 70, 70, 32, grad=True)
    bias = torch.randn(2, 70, 70, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_()
    dout = torch.randn(2, 2, 70, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    first, second = (torch.autograd.grad(attention(q, k, v, bias=bias), (q, k, v, bias), dout) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
