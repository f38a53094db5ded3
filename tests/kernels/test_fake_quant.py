"""vitlab.kernels.fake_quant: uniform mode bit-exact with torch.fake_quantize_*; log modes against the
reference and hand-checked levels; straight-through gradients.

No gradcheck here: the quantiser is piecewise constant, so its true derivative is 0 almost everywhere
and the straight-through backward is a deliberate mismatch. We check the STE gradient itself instead
(bit-exact with torch's fake_quantize backward in uniform mode).
"""
import pytest
import torch

from vitlab.kernels import fake_quant as FQ
from vitlab.kernels._dispatch import interpreting

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreting() else [])


def _ties(device):
    """Exact .5 ties (0.5, 1.5, 2.5, -0.5, ...) and their float neighbours, plus saturating values."""
    k = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    extra = torch.tensor([0.0, -0.0, 1e-8, 254.5, 255.5, 300.0, -300.0])
    return torch.cat([k, torch.nextafter(k, k + 1), torch.nextafter(k, k - 1), extra]).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale,zp,bits", [(1.0, 0, 8), (0.1, 3, 8), (0.37, 7, 4), (3.0, 2, 2), (0.05, 128, 8)])
def test_uniform_per_tensor_bit_exact_with_torch(device, dtype, scale, zp, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([_ties(device) * scale, (torch.randn(2, 197, 192, generator=g) * 3).to(device).flatten()])
    x = x.to(dtype).requires_grad_()
    y = FQ.fake_quant(x, scale, zp, bits)
    want = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2 ** bits - 1)
    assert y.dtype == dtype and torch.equal(y, want)
    # straight-through: the same gradient as torch's
    gy = torch.randn(x.shape, generator=g).to(device, dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gw,) = torch.autograd.grad(want, x, gy)
    assert torch.equal(gx, gw)
    # and scale / zero point may be given as tensors, or one of each
    y2 = FQ.fake_quant(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), bits)
    assert torch.equal(y2, want)
    assert torch.equal(FQ.fake_quant(x, torch.tensor(scale), zp, bits), want)
    assert torch.equal(FQ.fake_quant(x, scale, torch.tensor(zp), bits), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_uniform_per_channel_bit_exact_with_torch(device, axis):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 50, 384, generator=g) * 2).to(device).requires_grad_()
    C = x.shape[axis]
    scale = (torch.rand(C, generator=g) * 0.2 + 0.01).to(device)
    zp = torch.randint(0, 16, (C,), generator=g, dtype=torch.int32).to(device)
    y = FQ.fake_quant(x, scale, zp, 4, axis=axis)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % 3, 0, 15)
    assert torch.equal(y, want)
    gy = torch.randn(x.shape, generator=g).to(device)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(want, x, gy)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_log2_hand_checked_levels(device):
    x = torch.tensor([1.0, 0.75, 0.7, 0.71, 0.5, 0.25, 2 ** -7, 2 ** -8, 0.0, -0.3, 3.0], device=device)
    # -log2: 0, .415, .515, .494, 1, 2, 7, 8, inf, (x<=0), -1.58  -> q: 0, 0, 1, 0, 1, 2, 7, 8(>7: 0), 0, 0, 0
    y = FQ.fake_quant(x, 1.0, None, 3, mode="log2")  # qmax = 7
    want = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.5, 0.25, 2 ** -7, 0.0, 0.0, 0.0, 1.0], device=device)
    # (GPU exp2 is approximate: allow an ulp)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    # scale s: the grid is s * 2^-k
    torch.testing.assert_close(FQ.fake_quant(x * 4, 4.0, None, 3, mode="log2"), want * 4, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_shift_log2_hand_checked_levels(device):
    eta, s = 2.0 ** -4, 1.0  # -log2(x + eta) on a unit grid
    x = torch.tensor([0.0, 1 - eta, 0.5 - eta, 3.0, -0.5], device=device)
    # x=0: -log2(eta) = 4 -> 2^-4 - eta = 0 ; 1-eta -> q=0 -> 1-eta ; 0.5-eta -> q=1 -> 0.5-eta
    # 3.0 -> q<0 clamps to 0 -> 1-eta ; -0.5 (x+eta<=0) -> q = qmax = 7 -> 2^-7 - eta
    y = FQ.fake_quant(x, s, None, 3, mode="shift_log2", eta=eta)
    want = torch.tensor([0.0, 1 - eta, 0.5 - eta, 1 - eta, 2.0 ** -7 - eta], device=device)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)


def _probs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(2, 3, 50, 197, generator=g) * 3, dim=-1).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("mode,scale,eta", [("log2", 1.0, None), ("log2", 0.5, None), ("shift_log2", 0.7, 1e-3)])
def test_log_modes_match_reference(device, bits, mode, scale, eta):
    p = _probs(device).requires_grad_()
    y = FQ.fake_quant(p, scale, None, bits, mode=mode, eta=eta)
    r = FQ.fake_quant_ref(p, scale, None, bits, mode=mode, eta=eta)
    # log2/exp2 may differ by an ulp between the kernel and torch: allow a vanishing fraction of
    # near-tie values to land on the neighbouring level, and ulp-level differences elsewhere
    close = torch.isclose(y, r, rtol=1e-6, atol=1e-7)
    assert close.float().mean() >= 1 - 1e-4, f"{(~close).sum().item()} of {close.numel()} differ"
    gy = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (gk,) = torch.autograd.grad(y, p, gy)
    (gr,) = torch.autograd.grad(r, p, gy)
    assert (gk == gr).float().mean() >= 1 - 1e-4
    assert set(torch.unique(gk / gy).tolist()) <= {0.0, 1.0}  # STE: pass or block


@pytest.mark.parametrize("device", DEVICES)
def test_log2_per_channel_and_fp16(device):
    p = _probs(device, seed=2)  # [2, 3, 50, 197]: one scale per head (axis 1)
    scale = torch.tensor([1.0, 0.5, 0.25], device=device)
    y = FQ.fake_quant(p.half(), scale, None, 4, axis=1, mode="log2")
    r = FQ.fake_quant_ref(p.half(), scale, None, 4, axis=1, mode="log2")
    assert y.dtype == torch.float16
    assert torch.isclose(y.float(), r.float(), rtol=1e-3, atol=0).float().mean() >= 1 - 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_strided(device):
    x = torch.randn(4, 6, device=device)
    assert FQ.fake_quant(x[:0], 0.1, 0, 8).shape == (0, 6)
    xt = x.t()  # non-contiguous: accepted (copied), same as torch
    assert torch.equal(FQ.fake_quant(xt, 0.1, 3, 8), torch.fake_quantize_per_tensor_affine(xt, 0.1, 3, 0, 255))


def test_bad_inputs():
    x = torch.rand(4, 8)
    for bits in (1, 9, 3.5, True):
        with pytest.raises(ValueError, match="bits must be an int in \\[2, 8\\]"):
            FQ.fake_quant(x, 0.1, 0, bits)
    with pytest.raises(ValueError, match="unknown mode 'log'"):
        FQ.fake_quant(x, 0.1, 0, 8, mode="log")
    with pytest.raises(ValueError, match="zero_point must lie in \\[0, 15\\]"):
        FQ.fake_quant(x, 0.1, 16, 4)
    with pytest.raises(ValueError, match="scale must be > 0"):
        FQ.fake_quant(x, 0.0, 0, 8)
    with pytest.raises(ValueError, match="scale has 3 elements"):
        FQ.fake_quant(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), 8, axis=1)
    with pytest.raises(TypeError, match="zero_point must be an integer tensor"):
        FQ.fake_quant(x, torch.ones(8), torch.zeros(8), 8, axis=1)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        FQ.fake_quant(x, 0.1, 0.5, 8)
    with pytest.raises(ValueError, match="needs a zero_point"):
        FQ.fake_quant(x, 0.1, None, 8)
    with pytest.raises(ValueError, match="needs eta"):
        FQ.fake_quant(x, 0.1, None, 8, mode="shift_log2")
    with pytest.raises(ValueError, match="eta is only used"):
        FQ.fake_quant(x, 0.1, 0, 8, eta=0.1)
    with pytest.raises(ValueError, match="zero_point is not used by mode 'log2'"):
        FQ.fake_quant(x, 1.0, 3, 8, mode="log2")
    with pytest.raises(ValueError, match="axis must be None or an int in \\[-2, 2\\)"):
        FQ.fake_quant(x, 0.1, 0, 8, axis=2)
    with pytest.raises(TypeError, match="x has dtype int64"):
        FQ.fake_quant(x.long(), 0.1, 0, 8)
    with pytest.raises(TypeError, match="scale must be a number or a tensor"):
        FQ.fake_quant(x, "0.1", 0, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_host_path_builds_no_parameter_tensors(device, monkeypatch):
    """Per-tensor Python numbers go to the kernel as scalars, per-channel tensors as they are (the kernel
    converts on load): the launcher allocates the outputs and nothing else (no fills, casts, reciprocals,
    no .item() sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    launches = []  # the kernel itself is stubbed: this counts the launcher's own host work
    monkeypatch.setattr(FQ, "_fake_quant_kernel", type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: launches.append((k["LAYOUT"], k["S_T"], k["Z_T"]))})())
    x = torch.randn(4, 300, device=device, requires_grad=True)
    scale, zp = torch.full((4,), 0.05, device=device), torch.full((4,), 7, dtype=torch.int32, device=device)
    with Ops() as per_tensor:
        FQ.fake_quant(x, 0.05, 7, 4)
    with Ops() as per_channel:
        FQ.fake_quant(x, scale, zp, 4, axis=0)
    checks = ("le", "lt", "gt", "bitwise_or", "any", "_local_scalar_dense")  # value checks: CPU tensors only
    for ops in (per_tensor, per_channel):
        allowed = ("empty", "view", "detach", "alias", "_reshape_alias") + (checks if device == "cpu" else ())
        made = [n for n in ops.names if not n.startswith(allowed)]
        assert not made, f"the launcher ran tensor ops besides allocating its outputs: {made}"
    assert launches == [(FQ.TENSOR, False, False), (FQ.ROWS, True, True)]
