"""vitlab.kernels.linear_attention: ReLU linear attention (kv-first) against the PyTorch reference.

Tolerance rule: error against an fp64 oracle <= 2 x the error of the eager reference run in the
same dtype, + a small atol. fp64 gradcheck (fast mode) runs the kernel itself, which supports fp64.
"""
import pytest
import torch

from vitlab.kernels import linear_attention as LA
from vitlab.kernels._dispatch import interpreting

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreting() else [])
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _rule(name, got, oracle, native, atol):
    err = (got.double() - oracle.double()).abs().max().item()
    base = (native.double() - oracle.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x torch's own {base:.3g} + {atol:g}"


def _qkv(B, H, Nq, Nk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D))
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def _run(fn, q, k, v, go):
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), go.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,Nq,Nk,D", [(2, 3, 197, 197, 64), (1, 6, 50, 50, 32), (1, 2, 50, 65, 48)])
def test_forward_backward_match_reference(device, dtype, B, H, Nq, Nk, D):
    q, k, v = _qkv(B, H, Nq, Nk, D, dtype, device)
    go = torch.randn(B, H, Nq, D, generator=torch.Generator().manual_seed(1)).to(device)
    out, grads = _run(LA.linear_attention, q, k, v, go)
    assert type(out.grad_fn).__name__ == "LinearAttentionFunctionBackward"  # the Triton path ran
    assert out.shape == q.shape and out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, g64 = _run(LA.linear_attention_ref, *leaves64, go.double())
    on, gn = _run(LA.linear_attention_ref, q, k, v, go)  # eager in the same dtype
    _rule("out", out, o64, on, ATOL[dtype])
    for name, gk, gr, gnat in zip(["dq", "dk", "dv"], grads, g64, gn):
        assert gk.dtype == dtype
        _rule(name, gk, gr, gnat, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    q, k, v = _qkv(1, 2, 7, 9, 16, torch.float64, device)
    with torch.no_grad():
        q[0, 1, 3] = -q[0, 1, 3].abs() - 0.1  # a query with phi(q) = 0: the eps clamp is active
    assert torch.autograd.gradcheck(LA.linear_attention, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_clamped_rows_and_kv_first_identity(device):
    q, k, v = _qkv(1, 1, 6, 6, 16, torch.float32, device)
    q = q.detach().clone()
    q[0, 0, 2] = -1.0  # relu(q) = 0 -> numerator 0, denominator clamped: output row 0
    out = LA.linear_attention(q, k.detach(), v.detach())
    assert torch.equal(out[0, 0, 2], torch.zeros(16, device=device))
    # kv-first equals the quadratic form: sum_j (phi q_i . phi k_j) v_j / sum_j (phi q_i . phi k_j)
    a = torch.relu(q) @ torch.relu(k.detach()).transpose(-2, -1)  # [1, 1, 6, 6]
    quad = (a @ v.detach()) / a.sum(-1, keepdim=True).clamp_min(1e-6)
    torch.testing.assert_close(out, quad, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k has shape"):
        LA.linear_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="v has shape"):
        LA.linear_attention(q, q, torch.randn(1, 2, 6, 16))
    with pytest.raises(TypeError, match="must share a dtype"):
        LA.linear_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="q must have 4 dims"):
        LA.linear_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head dim D=200 is unsupported"):
        x = torch.randn(1, 1, 3, 200)
        LA.linear_attention(x, x, x)
    with pytest.raises(ValueError, match="eps must be a positive"):
        LA.linear_attention(q, q, q, eps=-1.0)
    with pytest.raises(TypeError, match="q has dtype int64"):
        LA.linear_attention(q.long(), q, q)
