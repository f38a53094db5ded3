"""vitlab.kernels.layernorm: Triton (interpreter on CPU, real on CUDA) against the PyTorch reference.

Tolerance rule: error against an fp64 oracle <= 2 x the error of PyTorch's own F.layer_norm run in the
same dtype, + a small atol. fp64 gradcheck (fast mode: random projections, few interpreter calls) runs the kernel itself, which
supports fp64.
"""
import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import layernorm as L
from vitlab.kernels._dispatch import interpreting

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreting() else [])
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rule(name, got, oracle, native, atol):
    err = (got.double() - oracle.double()).abs().max().item()
    base = (native.double() - oracle.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x torch's own {base:.3g} + {atol:g}"


def _inputs(shape, dtype, device, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(C, generator=g)).to(device, dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(device, dtype).requires_grad_() if residual else None
    return x, w, b, r


def _run(fn, x, w, b, r, gy, gs):
    """Outputs and grads of (x, w, b[, r]) for upstream grads gy (and gs on the returned sum)."""
    out = fn(x, w, b, residual=r)
    outs = out if isinstance(out, tuple) else (out,)
    ups = (gy, gs) if r is not None else (gy,)
    leaves = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for o, u in zip(outs, ups)])
    return outs, grads


def _native(x, w, b, residual):
    r = residual  # PyTorch's own LayerNorm in the input dtype
    if r is None:
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-6)
    s = x + r
    return F.layer_norm(s, (x.shape[-1],), w, b, 1e-6), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (2, 197, 192)), (torch.float32, (3, 50, 384)),
    (torch.float16, (2, 197, 192)), (torch.float16, (3, 50, 384)),
    (torch.bfloat16, (2, 50, 192)),
])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_backward_match_reference(device, dtype, shape, residual):
    x, w, b, r = _inputs(shape, dtype, device, residual)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(shape, generator=g).to(device)
    gs = torch.randn(shape, generator=g).to(device)
    outs, grads = _run(L.layer_norm, x, w, b, r, gy, gs)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b) + ((r,) if residual else ())]
    o64, g64 = _run(L.layer_norm_ref, *leaves64[:3], leaves64[3] if residual else None, gy.double(), gs.double())
    on, gn = _run(_native, x, w, b, r, gy, gs)
    assert type(outs[0].grad_fn).__name__ == "LayerNormFunctionBackward"  # the Triton path ran
    names = ["y", "s"]
    for i, (o, ref, nat) in enumerate(zip(outs, o64, on)):
        assert o.dtype == dtype and o.shape == x.shape
        _rule(names[i], o, ref, nat, ATOL[dtype])
    for name, gk, gr, gnat in zip(["dx", "dweight", "dbias", "dresidual"], grads, g64, gn):
        assert gk.dtype == dtype
        # dweight/dbias sum over B*N rows: scale atol by sqrt(rows)
        atol = ATOL[dtype] * (x.numel() // x.shape[-1]) ** 0.5 if name in ("dweight", "dbias") else ATOL[dtype]
        _rule(name, gk, gr, gnat, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_fp64(device, residual):
    x, w, b, r = _inputs((2, 5, 24), torch.float64, device, residual)
    if residual:
        fn = lambda x, w, b, r: L.layer_norm(x, w, b, 1e-6, residual=r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, r), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: L.layer_norm(x, w, b), (x, w, b), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_only_the_sum_used_gets_gradients(device):
    # a block that returns s and drops y: the kernel backward must still give dx = dresidual = ds
    x, w, b, r = _inputs((2, 7, 32), torch.float32, device, True)
    _, s = L.layer_norm(x, w, b, residual=r)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtype_residual_promotes(device):
    x, w, b, r = _inputs((2, 9, 64), torch.bfloat16, device, True)
    r32 = r.detach().float().requires_grad_()
    w32, b32 = w.detach().float(), b.detach().float()
    y, s = L.layer_norm(x, w32, b32, residual=r32)  # fp32 weights with bf16 activations, as under autocast
    ys, ss = L.layer_norm_ref(x, w32, b32, residual=r32)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, ss, rtol=0, atol=0)
    torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-5)
    (y.sum() + s.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and r32.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_deterministic(device):
    x, w, b, _ = _inputs((2, 11, 48), torch.float32, device, False)
    xs = x.detach()[:, 1:]  # non-contiguous rows, unit last stride
    y1 = L.layer_norm(xs, w.detach(), b.detach())
    y2 = L.layer_norm(xs.contiguous(), w.detach(), b.detach())
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, L.layer_norm_ref(xs, w.detach(), b.detach()), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x = torch.randn(2, 5, 8)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="weight has shape"):
        L.layer_norm(x, torch.ones(7), b)
    with pytest.raises(ValueError, match="bias must have 1 dims"):
        L.layer_norm(x, w, torch.zeros(8, 1))
    with pytest.raises(ValueError, match="residual has shape"):
        L.layer_norm(x, w, b, residual=torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="x has dtype int64"):
        L.layer_norm(x.long(), w, b)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        L.layer_norm(x, None, b)
    with pytest.raises(ValueError, match="eps must be a positive"):
        L.layer_norm(x, w, b, eps=0)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        L.layer_norm_triton(x.transpose(1, 2).contiguous().transpose(1, 2)[..., :5], w[:5], b[:5])
    with pytest.raises(ValueError, match="larger than the supported"):
        L.layer_norm(torch.randn(1, 20000), torch.ones(20000), torch.zeros(20000))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_a_row_count_below_the_program_count(device):
    """No rows: zero weight/bias gradients. Fewer rows than programs (3 < 64): every partial is still written."""
    from vitlab.kernels.layernorm import layer_norm_triton

    w = torch.ones(8, device=device, requires_grad=True)
    b = torch.zeros(8, device=device, requires_grad=True)
    for rows in (0, 3):
        x = torch.randn(rows, 8, device=device, requires_grad=True)
        layer_norm_triton(x, w, b).sum().backward()
        ref_w, ref_b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        torch.nn.functional.layer_norm(x.detach(), (8,), ref_w, ref_b, 1e-6).sum().backward()
        assert torch.allclose(w.grad, ref_w.grad, atol=1e-5) and torch.allclose(b.grad, ref_b.grad)
        w.grad = b.grad = None
