"""I&S-ViT: SULQ levels on a hand case, exact round trips, the reparameterisation's equivalence, reconstruction."""
import copy
import math

import pytest
import torch

from vitlab.kernels.fake_quant import fake_quant, fake_quant_ref
from vitlab.methods.quantization.is_vit import (ETAS, block_io, block_reconstruct, is_vit_quantize,
                                                post_softmax_values, reparam_model, reparam_post_ln,
                                                repq_style_quantize, stage0, sulq_levels, sulq_search,
                                                use_sulq)
from vitlab.models.vit import VisionTransformer
from vitlab.quant import FakeQuantizer, QuantAttention, calibrate_model, quantize_model, set_quant_state


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
                          mlp_ratio=2.0).eval()
    with torch.no_grad():  # LayerNorms with a real affine, and a few wide channels, as trained ViTs have
        for blk in m.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(torch.rand(16) * 2 + 0.2)
                norm.weight[:2] *= 8
                norm.bias.copy_(0.1 * torch.randn(16))  # small: vitlab.quant mse_params fails on one-signed channels
    return m


def images(n=24, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def softmax_maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(8, 3, 20, 20, generator=g)).softmax(-1)


# ------------------------------------------------------------------------------------------------ SULQ
def test_sulq_hand_case():
    # 2 bits, s = 1, eta = 1/4: levels 2^-q - 1/4 for q = 0..3
    assert sulq_levels(2, 1.0, 0.25).tolist() == [-0.125, 0.0, 0.25, 0.75]
    x = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])
    # x + eta = .25 .35 .55 .85 1.25 -> -log2 = 2, 1.51, 0.86, 0.23, -0.32 -> q = 2, 2, 1, 0, 0 (clamped)
    assert fake_quant(x, 1.0, None, 2, mode="shift_log2", eta=0.25).tolist() == [0.0, 0.0, 0.25, 0.75, 0.75]
    # a fractional step: 2^(-q/2) - 1/2
    want = [2 ** (-q / 2) - 0.5 for q in range(4)][::-1]
    assert torch.allclose(sulq_levels(2, 0.5, 0.5).double(), torch.tensor(want, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale,eta", [(1.0, 0.01), (0.37, 0.02), (0.9, 0.001)])
def test_sulq_round_trip_exact(bits, scale, eta):
    lv = sulq_levels(bits, scale, eta)
    # the reference (the CPU path) reproduces every level bit for bit
    assert torch.equal(fake_quant_ref(lv, scale, None, bits, mode="shift_log2", eta=eta), lv)
    assert torch.equal(fake_quant_ref(lv.reshape(2, -1), scale, None, bits, mode="shift_log2", eta=eta),
                       lv.reshape(2, -1))
    # the dispatched op (Triton on CUDA or under TRITON_INTERPRET, whose log2 / exp2 may differ by an ulp):
    # the same levels to float32 precision, and its own outputs are exact fixed points
    q = FakeQuantizer(bits, mode="shift_log2")
    q.set_params(scale, eta=eta)
    y = q(lv)
    assert torch.allclose(y, lv, rtol=1e-6, atol=1e-7)
    assert torch.equal(q(y), y)
    p = softmax_maps()
    assert torch.equal(q(q(p)), q(p))


def test_official_grid_is_powers_of_two_minus_eta():
    # s = 1 is the official LogSqrt2Quantizer's grid: outputs 2^k - eta, k integer <= 0
    p = softmax_maps()
    for eta in (0.005, 0.04):
        y = fake_quant(p, 1.0, None, 4, mode="shift_log2", eta=eta).double() + eta
        k = torch.log2(y)
        assert torch.allclose(k, k.round(), atol=1e-5) and float(k.max()) <= 1e-6


def test_sulq_against_the_official_log_sqrt2_quantizer_by_hand():
    # zysxmu/IaS-ViT quant/quantizer.py, LogSqrt2Quantizer.forward with its calibrated state (eta, minv, maxv),
    # b bits, n = 2^b:  l = log2(x + eta);  step = (maxv - minv) / n;  k = clamp(round((l - minv) / step), 0, n);
    #                   x_hat = 2^round(k step + minv) - eta        (a uniform log grid, then an integer exponent)
    # Here b = 3, calibrated on these x with eta = 0.04 (the official search's pick on them): minv = log2(0.04) =
    # -4.6439, maxv = log2(1.04) = 0.0566, step = 0.5876. By hand:
    #   x = 0     l = -4.644  k = 0  exponent round(-4.644) = -5  -> 1/32 - 0.04 = -0.00875
    #   x = 0.02  l = -4.059  k = 1  round(-4.056) = -4          -> 1/16 - 0.04 =  0.0225
    #   x = 0.45  l = -1.029  k = 6  round(-1.119) = -1          -> 1/2  - 0.04 =  0.46
    #   x = 0.8   l = -0.252  k = 7  round(-0.531) = -1          -> 0.46   (k = 7.48: the log grid, not l, is rounded)
    #   x = 1     l =  0.057  k = 8  round(0.057) = 0            -> 1 - 0.04 = 0.96
    x = torch.tensor([0.0, 0.004, 0.02, 0.05, 0.1, 0.2, 0.45, 0.8, 1.0])
    official = torch.tensor([-0.00875, -0.00875, 0.0225, 0.085, 0.085, 0.21, 0.46, 0.46, 0.96])
    # vitlab's shift_log2 with s = 1 is the same grid of levels 2^-q - eta (q = 0..7), rounding -log2(x + eta) once
    ours = fake_quant(x, 1.0, None, 3, mode="shift_log2", eta=0.04)
    same = torch.ones(9, dtype=torch.bool)
    same[7] = False
    torch.testing.assert_close(ours[same], official[same], rtol=0, atol=1e-6)
    # the one value that differs sits between the two decision boundaries of exponents -1 and 0: vitlab's at
    # l = -0.5 (x = 0.667), the official one at grid index 7.5, l = 7.5 step + minv = -0.237 (x = 0.809); the shift
    # is under half an official grid step, the documented effect of the double rounding
    assert ours[7].item() == pytest.approx(0.96, abs=1e-6) and official[7].item() == pytest.approx(0.46)
    step = (math.log2(1.04) - math.log2(0.04)) / 8
    official_boundary = 7.5 * step + math.log2(0.04)
    assert -0.5 < math.log2(0.8 + 0.04) < official_boundary and official_boundary - (-0.5) < step / 2
    # both have the top level 2^0 - eta (eta < sqrt(2) - 1); vitlab's grid also keeps 2^-6, 2^-7 below the data
    assert sulq_levels(3, 1.0, 0.04)[-1].item() == pytest.approx(0.96)


def test_sulq_search():
    p = softmax_maps()
    s, eta, mse = sulq_search(p, 3)
    assert eta in [pytest.approx(e) for e in ETAS]
    assert mse == pytest.approx(float((fake_quant(p, s, None, 3, mode="shift_log2", eta=eta) - p).pow(2).mean()),
                                rel=1e-5)
    _, _, mse_frac = sulq_search(p, 3, integer_exponent=False)
    assert mse <= mse_frac  # the official integer-exponent grid is one more candidate
    # never worse than any single candidate of the official grid
    assert all(mse <= float((fake_quant(p, 1.0, None, 3, mode="shift_log2", eta=e) - p).pow(2).mean()) + 1e-12
               for e in ETAS)
    s4, _, mse4 = sulq_search(p, 4)
    assert mse4 < mse  # more bits, less error


# ------------------------------------------------------------------------------------------------ stage 2
def calibrated(model, bits=4, per_channel=True):
    q = quantize_model(model, bits, bits, act_per_channel=("qkv", "fc1") if per_channel else ())
    return calibrate_model(q, images(), method="mse")


def test_reparam_fp_equivalence():
    m = tiny_vit()
    q = calibrated(m)
    x = images(16, seed=5)
    set_quant_state(q, weights=False, acts=False)
    with torch.no_grad():
        before = q(x)
        ln_before = q.blocks[0].norm1(q.embed(x))
    info = reparam_model(q)
    with torch.no_grad():
        after = q(x)
        ln_after = q.blocks[0].norm1(q.embed(x))
    assert (after - before).abs().max() < 1e-5
    assert not torch.allclose(ln_before, ln_after)  # the LayerNorm output did change ...
    assert [(d["block"], d["layer"]) for d in info] == [(0, "qkv"), (0, "fc1"), (1, "qkv"), (1, "fc1")]
    for blk in q.blocks:  # ... into something a per-tensor quantiser handles
        for lin in (blk.attn.qkv, blk.mlp.fc1):
            assert lin.a_quant.axis is None and lin.a_quant.scale.numel() == 1 and lin.w_quant.calibrated


def test_reparam_keeps_the_activation_codes():
    # channel-wise quantised LN output -> linear  ==  per-tensor quantised reparameterised output -> linear
    m = tiny_vit()
    q = calibrated(m, bits=3)
    set_quant_state(q, weights=False, acts=False)
    norm, lin = q.blocks[0].norm1, q.blocks[0].attn.qkv
    tokens = q.embed(images(16, seed=7)).detach()
    with torch.no_grad():
        lin.a_quant.enabled = True
        before = lin(norm(tokens))
        s_c = lin.a_quant.scale.clone()
        s, z = reparam_post_ln(norm, lin)
        lin.a_quant.enabled = True
        after = lin(norm(tokens))
        # the new per-tensor quantiser is torch's per-tensor affine one, bit for bit
        y = norm(tokens)
        assert torch.equal(lin.a_quant(y), torch.fake_quantize_per_tensor_affine(y, float(s), int(z), 0, 7))
    assert float(s) == pytest.approx(float(s_c.mean()))
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    # representable values of the per-tensor grid round-trip exactly
    grid = (torch.arange(8) - int(z)).float() * s
    assert torch.equal(lin.a_quant(grid), grid)


def test_reparam_bad_input():
    m = tiny_vit()
    q = calibrated(m, per_channel=False)  # per-tensor input quantisers: nothing to fold
    with pytest.raises(ValueError, match="per-channel"):
        reparam_post_ln(q.blocks[0].norm1, q.blocks[0].attn.qkv)
    with pytest.raises(TypeError, match="QuantLinear"):
        reparam_post_ln(q.blocks[0].norm1, torch.nn.Linear(16, 48))
    with pytest.raises(TypeError, match="LayerNorm"):
        reparam_post_ln(torch.nn.Identity(), q.blocks[0].attn.qkv)
    q2 = calibrated(m)
    with pytest.raises(ValueError, match="weight_method"):
        reparam_post_ln(q2.blocks[0].norm1, q2.blocks[0].attn.qkv, weight_method="nope")


# ------------------------------------------------------------------------------------------------ stages 1, 3
def test_block_reconstruct_lowers_the_block_mse():
    m = tiny_vit()
    q = calibrated(m, bits=3)
    use_sulq(q, m, images())
    set_quant_state(q, weights=True, acts=True)
    xs = block_io(m, images(32, seed=2))
    w0 = q.blocks[0].attn.qkv.weight.detach().clone()
    ln0 = q.blocks[0].norm1.weight.detach().clone()
    out = block_reconstruct(q.blocks[0], xs[0], xs[1], iters=8, lr=3e-4, batch_size=16)
    assert out["loss_after"] < 0.9 * out["loss_before"], out
    assert len(out["losses"]) == 8
    assert not torch.equal(q.blocks[0].attn.qkv.weight, w0)  # the linears were tuned ...
    assert torch.equal(q.blocks[0].norm1.weight, ln0)  # ... the LayerNorm was not
    assert all(p.grad is None for p in q.parameters())
    none = block_reconstruct(q.blocks[1], xs[1], xs[2], iters=0)
    assert none["loss_before"] == none["loss_after"] and none["losses"] == []


def test_is_vit_quantize_end_to_end():
    m = tiny_vit()
    fp_state = copy.deepcopy(m.state_dict())
    q, info = is_vit_quantize(m, images(16), 3, 3, iters=2, lr=3e-4, batch_size=8)
    assert all(torch.equal(v, fp_state[k]) for k, v in m.state_dict().items())  # the float model is untouched
    attns = [a for a in q.modules() if isinstance(a, QuantAttention)]
    assert all(a.softmax_quant.mode == "shift_log2" and a.softmax_quant.bits == 3 for a in attns)
    assert all(b.attn.qkv.a_quant.axis is None and b.mlp.fc1.a_quant.axis is None for b in q.blocks)
    assert len(info["stage1"]) == len(info["stage3"]) == 2 and len(info["sulq"]) == 2
    assert all(d["loss_after"] <= d["loss_before"] * 1.05 for d in info["stage1"] + info["stage3"])
    assert torch.isfinite(q(images(4))).all()
    r = repq_style_quantize(m, images(16), 3, 3)
    assert all(a.softmax_quant.mode == "log2" for a in r.modules() if isinstance(a, QuantAttention))
    base = stage0(m, images(16), 3, 3)
    r2 = repq_style_quantize(m, images(16), 3, 3, base=base)  # a shared stage 0 gives the same model
    with torch.no_grad():
        assert torch.equal(r(images(4)), r2(images(4)))
    assert base.blocks[0].attn.qkv.a_quant.axis is not None  # the base itself is not modified
    with pytest.raises(ValueError, match="base"):
        is_vit_quantize(m, images(16), 4, 4, base=base)  # built for 3 bits


def test_post_softmax_values():
    m = tiny_vit()
    p = post_softmax_values(m, images(5))
    assert len(p) == 2 and p[0].shape == (5, 2, 5, 5)
    assert torch.allclose(p[0].sum(-1), torch.ones(5, 2, 5), atol=1e-5)


def test_bad_input():
    m = tiny_vit()
    with pytest.raises(ValueError, match="bits"):
        sulq_levels(9, 1.0, 0.1)
    with pytest.raises(ValueError, match="eta"):
        sulq_levels(3, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sulq_search(torch.randn(100), 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sulq_search([0.1, 0.2], 3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        is_vit_quantize(torch.nn.Linear(3, 3), images())
    with pytest.raises(TypeError, match="images"):
        is_vit_quantize(m, torch.randn(8, 10))
    with pytest.raises(ValueError, match="iters"):
        is_vit_quantize(m, images(), iters=-1)
    with pytest.raises(ValueError, match="w_bits"):
        is_vit_quantize(m, images(), w_bits=1)
    with pytest.raises(ValueError, match="softmax_mode"):
        is_vit_quantize(m, images(), softmax_mode="log2")
    with pytest.raises(ValueError, match="softmax"):
        repq_style_quantize(m, images(), softmax="float")
    with pytest.raises(ValueError, match="batch size"):
        block_reconstruct(torch.nn.Linear(4, 4), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="lr"):
        block_reconstruct(torch.nn.Linear(4, 4), torch.randn(3, 4), torch.randn(3, 4), lr=0)
    with pytest.raises(ValueError, match="QuantAttention"):
        use_sulq(m, m, images())
