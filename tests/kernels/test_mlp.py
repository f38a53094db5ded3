"""vitlab.kernels.mlp.linear_gelu: the fused GEMM + bias + GELU kernel against PyTorch.

Tolerance rule: error against an fp64 oracle <= 2 x the error of eager F.gelu(F.linear(...)) in the
same dtype, + a small atol. fp64 gradcheck (fast mode) runs the kernel itself, which supports fp64.
"""
import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import mlp
from vitlab.kernels._dispatch import interpreting

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreting() else [])
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _rule(name, got, oracle, native, atol):
    err = (got.double() - oracle.double()).abs().max().item()
    base = (native.double() - oracle.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x torch's own {base:.3g} + {atol:g}"


def _inputs(lead, K, N, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype).requires_grad_()
    b = (0.5 * torch.randn(N, generator=g)).to(device, dtype).requires_grad_() if bias else None
    return x, w, b


def _run(fn, x, w, b, gy):
    out = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad(out, leaves, gy.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,K,N,bias", [((1, 197), 192, 384, True), ((2, 50), 384, 192, False)])
def test_forward_backward_match_reference(device, dtype, lead, K, N, bias):
    x, w, b = _inputs(lead, K, N, dtype, device, bias)
    gy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(1)).to(device)
    out, grads = _run(mlp.linear_gelu, x, w, b, gy)
    assert type(out.grad_fn).__name__ == "LinearGeluFunctionBackward"  # the Triton path ran
    assert out.shape == (*lead, N) and out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    o64, g64 = _run(mlp.linear_gelu_ref, *leaves64, gy.double())
    on, gn = _run(mlp.linear_gelu_ref, x, w, b, gy)  # eager PyTorch in the same dtype
    _rule("out", out, o64, on, ATOL[dtype])
    for name, gk, gr, gnat in zip(["dx", "dweight", "dbias"], grads, g64, gn):
        assert gk.dtype == dtype
        _rule(name, gk, gr, gnat, ATOL[dtype] * (10 if name != "dx" else 1))  # dW, db sum over rows


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x, w, b = _inputs((3, 5), 24, 40, torch.float64, device)  # sizes not multiples of the tiles
    assert torch.autograd.gradcheck(mlp.linear_gelu, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_backward_kernel_is_exact_gelu_derivative(device):
    h = torch.linspace(-8, 8, 1001, dtype=torch.float64, device=device).requires_grad_()
    dy = torch.randn(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    (want,) = torch.autograd.grad(F.gelu(h, approximate="none"), h, dy)
    torch.testing.assert_close(mlp.gelu_backward(dy, h.detach()), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_skips_saving_and_matches(device):
    x, w, b = _inputs((2, 7), 32, 48, torch.float32, device)
    with torch.no_grad():
        out = mlp.linear_gelu(x, w, b)
    torch.testing.assert_close(out, mlp.linear_gelu_ref(x, w, b).detach(), rtol=1e-5, atol=1e-5)
    assert out.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_like_f_linear(device):
    x, w, b = _inputs((2, 9), 64, 32, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = mlp.linear_gelu(x, w, b)
        ref = F.gelu(F.linear(x, w, b))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    x, w, b = _inputs((3, 10), 32, 16, torch.float32, device)
    xt = x.detach()[:, ::2]  # strided rows
    wt = w.detach().t().contiguous().t()  # column-major weight
    torch.testing.assert_close(mlp.linear_gelu(xt, wt, b.detach()), mlp.linear_gelu_ref(xt, wt, b.detach()),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    with pytest.raises(ValueError, match="same K"):
        mlp.linear_gelu(x, torch.randn(4, 7), b)
    with pytest.raises(ValueError, match="bias has shape"):
        mlp.linear_gelu(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        mlp.linear_gelu(x, torch.randn(4, 8, 1), b)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        mlp.linear_gelu(x, w.half(), b)
    with pytest.raises(TypeError, match="x has dtype int64"):
        mlp.linear_gelu(x.long(), w, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mlp.linear_gelu([1.0] * 8, w, b)
