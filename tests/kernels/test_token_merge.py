"""vitlab.kernels.token_merge: size-weighted merge and gather against the PyTorch reference.

Tolerance rule: error against an fp64 oracle <= 2 x the error of a plain scatter_add/gather in the
same dtype, + a small atol. fp64 gradcheck (fast mode) runs the kernels themselves.
"""
import pytest
import torch

from vitlab.kernels import token_merge as T
from vitlab.kernels._dispatch import interpreting

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreting() else [])
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rule(name, got, oracle, native, atol):
    if got.dtype == torch.bfloat16 and interpreting():
        # the interpreter converts fp32 -> bf16 by truncation, not rounding: up to one ulp of error per store
        atol += torch.finfo(torch.bfloat16).eps * oracle.double().abs().max().item()
    err = (got.double() - oracle.double()).abs().max().item()
    base = (native.double() - oracle.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x torch's own {base:.3g} + {atol:g}"


def _case(B, N, C, J, dtype, device, seed=0):
    """Random tokens, integer sizes, and a ToMe-like assignment that leaves a few destinations empty."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g).to(device, dtype).requires_grad_()
    size = torch.randint(1, 6, (B, N), generator=g).to(device, torch.float32)
    dst = torch.randint(0, J - 2, (B, N), generator=g).to(device)  # J-2, J-1 stay empty
    return x, size, dst


def _native_merge(x, size, dst, J):
    """Plain PyTorch in x's dtype (no fp32 accumulation): the 'PyTorch's own error' baseline."""
    B, N, C = x.shape
    w = size.to(x.dtype)
    num = torch.zeros(B, J, C, dtype=x.dtype, device=x.device).scatter_add(
        1, dst[..., None].expand(B, N, C), x * w[..., None])
    den = torch.zeros(B, J, dtype=x.dtype, device=x.device).scatter_add(1, dst, w)
    return num / den.clamp_min(1)[..., None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,C,J", [(2, 197, 192, 99), (3, 50, 384, 17)])
def test_merge_matches_reference(device, dtype, B, N, C, J):
    x, size, dst = _case(B, N, C, J, dtype, device)
    gm = torch.randn(B, J, C, generator=torch.Generator().manual_seed(1)).to(device)
    merged, msize = T.merge(x, size, dst, J)
    assert type(merged.grad_fn).__name__ == "MergeFunctionBackward"  # the Triton path ran
    (dx,) = torch.autograd.grad(merged, x, gm.to(dtype))
    x64 = x.detach().double().requires_grad_()
    m64, s64 = T.merge_ref(x64, size, dst, J)
    (dx64,) = torch.autograd.grad(m64, x64, gm.double())
    mn = _native_merge(x, size, dst, J)
    (dxn,) = torch.autograd.grad(mn, x, gm.to(dtype))
    assert merged.shape == (B, J, C) and merged.dtype == dtype and msize.dtype == torch.float32
    torch.testing.assert_close(msize, s64.float(), rtol=0, atol=0)
    _rule("merged", merged, m64, mn, ATOL[dtype])
    _rule("dx", dx, dx64, dxn, ATOL[dtype])
    assert (merged[:, J - 2:] == 0).all() and (msize[:, J - 2:] == 0).all()  # empty destinations


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,C,J", [(2, 197, 192, 99), (3, 50, 384, 17)])
def test_gather_matches_reference(device, dtype, B, N, C, J):
    _, _, dst = _case(B, N, C, J, dtype, device)
    xm = torch.randn(B, J, C, generator=torch.Generator().manual_seed(2)).to(device, dtype).requires_grad_()
    gx = torch.randn(B, N, C, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out = T.gather(xm, dst)
    (dxm,) = torch.autograd.grad(out, xm, gx)
    ref = T.gather_ref(xm, dst)
    (dref,) = torch.autograd.grad(ref, xm, gx)  # scatter-add in the dtype: PyTorch's own
    xm64 = xm.detach().double().requires_grad_()
    (d64,) = torch.autograd.grad(T.gather_ref(xm64, dst), xm64, gx.double())
    assert torch.equal(out, ref)  # a gather is exact
    _rule("dx_merged", dxm, d64, dref, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_merge_keeps_large_sizes_exact(device, dtype):
    """16-bit inputs go to the MMA natively with a 0/1 one-hot; the sizes scale x's rows instead, so sizes far
    above bf16's exact integers (256) still sum exactly and weight correctly."""
    B, N, C, J = 1, 40, 32, 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, N, C, generator=g).to(device, dtype)
    size = torch.randint(200, 1000, (B, N), generator=g).to(device, torch.float32)
    dst = (torch.arange(N) % J)[None].to(device)
    merged, msize = T.merge(x, size, dst, J)
    m64, s64 = T.merge_ref(x.double(), size.double(), dst, J)
    torch.testing.assert_close(msize.double(), s64, rtol=0, atol=0)
    eps = torch.finfo(dtype).eps
    err = (merged.double() - m64).abs().max().item()
    assert err <= 4 * eps * x.abs().max().item(), f"{dtype}: error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_hand_checked_merge(device):
    x = torch.tensor([[[1.0, 0.0], [4.0, 3.0], [5.0, -5.0]]], device=device)  # [1, 3, 2]
    size = torch.tensor([[1.0, 2.0, 1.0]], device=device)
    dst = torch.tensor([[0, 0, 2]], device=device)  # destination 1 is empty
    merged, msize = T.merge(x, size, dst, 3)
    torch.testing.assert_close(merged.cpu(), torch.tensor([[[3.0, 2.0], [0.0, 0.0], [5.0, -5.0]]]))
    torch.testing.assert_close(msize.cpu(), torch.tensor([[3.0, 0.0, 1.0]]))
    torch.testing.assert_close(T.gather(merged, dst).cpu(), torch.tensor([[[3.0, 2.0], [3.0, 2.0], [5.0, -5.0]]]))


@pytest.mark.parametrize("device", DEVICES)
def test_invariants_and_determinism(device):
    x, size, dst = _case(2, 65, 48, 20, torch.float32, device)
    x = x.detach()
    merged, msize = T.merge(x, size, dst, 20)
    # total size and size-weighted mass are kept
    torch.testing.assert_close(msize.sum(1), size.sum(1))
    torch.testing.assert_close((merged * msize[..., None]).sum(1), (x * size[..., None]).sum(1),
                               rtol=1e-5, atol=1e-4)
    again, _ = T.merge(x, size, dst, 20)
    assert torch.equal(merged, again)  # no atomics: bitwise reproducible
    # unit sizes by default; [B, N, 1] sizes and int32 indices accepted
    m1, s1 = T.merge(x, None, dst, 20)
    m2, _ = T.merge(x, torch.ones(2, 65, 1, device=device), dst.int(), 20)
    assert torch.equal(m1, m2) and s1.dtype == torch.float32
    # a permutation merge followed by gather is the identity
    perm = torch.stack([torch.randperm(65, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    mp, _ = T.merge(x, size, perm.to(device), 65)
    torch.testing.assert_close(T.gather(mp, perm.to(device)), x)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x, size, dst = _case(2, 9, 5, 6, torch.float64, device)
    assert torch.autograd.gradcheck(lambda x: T.merge(x, size.double(), dst, 6)[0], (x,), fast_mode=True)
    xm = torch.randn(2, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xm: T.gather(xm, dst), (xm,), fast_mode=True)


def test_bad_inputs():
    x, size, dst = torch.randn(2, 5, 4), torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"dst_index values must lie in \[0, 3\)"):
        T.merge(x, size, dst + 3, 3)
    with pytest.raises(ValueError, match="dst_index values"):
        T.gather(torch.randn(2, 3, 4), dst - 1)
    with pytest.raises(ValueError, match="dst_index has shape"):
        T.merge(x, size, dst[:, :4], 3)
    with pytest.raises(TypeError, match="dst_index has dtype float32"):
        T.merge(x, size, dst.float(), 3)
    with pytest.raises(ValueError, match="num_dst must be a positive int"):
        T.merge(x, size, dst, 0)
    with pytest.raises(ValueError, match="size has shape"):
        T.merge(x, torch.ones(2, 4), dst, 3)
    with pytest.raises(ValueError, match="x must have 3 dims"):
        T.merge(x[0], size, dst, 3)
    with pytest.raises(ValueError, match="expected batch 3"):
        T.gather(torch.randn(3, 3, 4), dst)
