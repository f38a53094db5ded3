"""MPTQ-ViT: SQ-b factors by hand and its float equivalence, the two-region (OPT-m) grid by hand and against
torch.fake_quantize where they coincide, the ratio search, Greedy MP's order and exact budgets, bad input."""
import pytest
import torch
import torch.nn as nn

from vitlab.methods.quantization.mptq_vit import (TwoRegionQuantizer, budget_for_average, fold_smoothing,
                                                  greedy_mp, layer_sizes, linear_inputs, logit_kl, mptq_quantize,
                                                  search_ratio, sensitivity_table, smoothing_factors,
                                                  smoothquant_bias, two_region_fake_quant, weight_size_bits)
from vitlab.models import create_model


def _vit(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = create_model("vit_nano", img_size=8, patch_size=4, num_classes=10).eval()
    with torch.no_grad():  # asymmetric post-LN channels, as trained ViTs have: random LayerNorm shifts and gains
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_(0, 1.5)
                m.weight.uniform_(0.5, 2.0)
    return model.to(dtype)


def _images(n=16, seed=1, dtype=torch.float32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------ SQ / SQ-b
def test_smoothing_factors_by_hand():
    # channel 0 spans [1, 5] (mid-range 3, half range 2); channel 1 spans [-4, 0] (mid-range -2, half range 2)
    x = torch.tensor([[1.0, -4.0], [5.0, 0.0], [2.0, -1.0]])
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])  # max |W_:,j| = [2, 1]
    s, z = smoothing_factors(x, w, alpha=0.5, bias=True)
    torch.testing.assert_close(z, torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(s, torch.tensor([(2 / 2) ** 0.5, (2 / 1) ** 0.5]))  # sqrt(max|x - z| / max|W|)
    s, z = smoothing_factors(x, w, alpha=0.5, bias=False)  # SmoothQuant: no shift, max|x| = [5, 4]
    torch.testing.assert_close(z, torch.zeros(2))
    torch.testing.assert_close(s, torch.tensor([(5 / 2) ** 0.5, (4 / 1) ** 0.5]))
    s, _ = smoothing_factors(x, w, alpha=1.0, bias=False)  # all the difficulty to the weights: s = max|x|
    torch.testing.assert_close(s, torch.tensor([5.0, 4.0]))
    _, z = smoothing_factors(x, w, bias=True, shift="mean")
    torch.testing.assert_close(z, torch.tensor([8 / 3, -5 / 3]))


def test_fold_by_hand_and_the_quantiser_sees_centred_channels():
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(4, eps=1e-6).double(), nn.Linear(4, 3).double()
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([3.0, -2.0, 0.5, 0.0], dtype=torch.float64))
    x = torch.randn(50, 4, dtype=torch.float64)
    y_ref = lin(norm(x))
    y_ln = norm(x).detach()
    s, z = smoothing_factors(y_ln.float(), lin.weight.float(), alpha=0.5)
    fold_smoothing(norm, lin, s, z)
    torch.testing.assert_close(lin(norm(x)), y_ref, rtol=0, atol=1e-12)
    centred = norm(x).detach()  # (Y - z) / s: each channel's mid-range is now 0
    mid = (centred.amax(0) + centred.amin(0)) / 2
    assert mid.abs().max() < 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_smoothed_vit_computes_the_same_logits(bias):
    images = _images()
    model = _vit()
    smooth, factors = smoothquant_bias(model, images, alpha=0.5, bias=bias)
    with torch.no_grad():
        torch.testing.assert_close(smooth(images), model(images), rtol=1e-5, atol=1e-5)  # float32
    assert set(factors) == {f"blocks.{i}.{n}" for i in range(4) for n in ("attn.qkv", "mlp.fc1")}
    assert all(bool((f["z"] == 0).all()) != bias for f in factors.values())
    model64 = _vit(dtype=torch.float64)
    smooth64, _ = smoothquant_bias(model64, _images(dtype=torch.float64), bias=bias)
    with torch.no_grad():
        gap = (smooth64(_images(dtype=torch.float64)) - model64(_images(dtype=torch.float64))).abs().max()
    assert gap < 1e-11
    assert smooth is not model and model.blocks[0].norm1.bias.abs().sum() > 0  # the original is untouched


def test_sqb_shrinks_the_per_tensor_range_of_asymmetric_channels():
    images, model = _images(), _vit()
    x = linear_inputs(model, images, ["blocks.0.attn.qkv"])["blocks.0.attn.qkv"]
    w = model.blocks[0].attn.qkv.weight
    ranges = {}
    for bias in (False, True):
        s, z = smoothing_factors(x, w, bias=bias)
        xs = (x - z) / s
        ranges[bias] = (xs.amax() - xs.amin()).item()
    assert ranges[True] < ranges[False]


# ------------------------------------------------------------------------------------ OPT-m
def test_two_region_grid_by_hand():
    # 3 bits: codes 0..3 for x >= 0 (step 1), -4..0 for x < 0 (step 1/2^2 = 0.25): PTQ4ViT's clamps
    x = torch.tensor([-1.3, -1.0, -0.3, -0.1, 0.0, 0.4, 1.6, 2.5, 10.0])
    want = torch.tensor([-1.0, -1.0, -0.25, 0.0, 0.0, 0.0, 2.0, 2.0, 3.0])  # 2.5 rounds half to even
    torch.testing.assert_close(two_region_fake_quant(x, 1.0, 2, 3), want, rtol=0, atol=0)


def test_two_region_equals_ptq4vit_post_gelu_quantiser():
    # PTQ4ViT (hahnyuan/PTQ4ViT, PostGeluPTQSLQuantLinear.quant_input), b = 4 bits, a_qmax = 2^(b-1) = 8:
    #   x_pos = clamp(round(x / d_pos), 0, a_qmax - 1) * d_pos
    #   x_neg = clamp(round(x / d_neg), -a_qmax, 0) * d_neg          (x_hat = x_pos + x_neg)
    # with d_pos = 0.5 and d_neg = d_pos / 2^4 = 1/32 (PTQ4ViT fixes d_neg = 0.16997 / a_qmax; OPT-m searches
    # the power-of-two ratio). Worked by hand, value by value:
    #   -0.17 / (1/32) = -5.44 -> -5 -> -5/32;   -0.26 -> -8.32 -> -8 -> -0.25;   -1.0 -> -32 -> clamp -8 -> -0.25
    #   -0.25 -> exactly -8 -> -0.25 (the bottom code, only reachable with the -2^(b-1) clamp)
    #   0.3 / 0.5 = 0.6 -> 1 -> 0.5;   3.3 -> 6.6 -> 7 -> 3.5;   3.74 -> 7.48 -> 7 -> 3.5;   9.0 -> 18 -> clamp 7 -> 3.5
    x = torch.tensor([-1.0, -0.26, -0.25, -0.17, -0.01, 0.0, 0.3, 3.3, 3.74, 9.0])
    want = torch.tensor([-0.25, -0.25, -0.25, -5 / 32, 0.0, 0.0, 0.5, 3.5, 3.5, 3.5])
    torch.testing.assert_close(two_region_fake_quant(x, 0.5, 4, 4), want, rtol=0, atol=0)
    # the 2^b values of the signed code range [-2^(b-1), 2^(b-1) - 1]: 9 negative-or-zero, 7 positive
    grid = two_region_fake_quant(torch.linspace(-2, 5, 20001), 0.5, 4, 4).unique()
    assert grid.numel() == 2 ** 4 and grid.min().item() == -0.25 and grid.max().item() == 3.5


def test_two_region_matches_torch_fake_quantize_where_they_coincide():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 2
    pos = x.clamp(min=0)
    for bits in (3, 4, 8):
        half = 2 ** (bits - 1) - 1
        # on x >= 0: the unsigned (b-1)-bit grid of step scale
        ref = torch.fake_quantize_per_tensor_affine(pos, 0.1, 0, 0, half)
        torch.testing.assert_close(two_region_fake_quant(pos, 0.1, 3, bits), ref, rtol=0, atol=0)
        # m = 0: one step for both signs, the signed b-bit grid -(half + 1)..half
        ref = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -half - 1, half)
        torch.testing.assert_close(two_region_fake_quant(x, 0.1, 0, bits), ref, rtol=0, atol=1e-6)


def test_search_ratio_finds_an_exactly_representable_grid():
    # values on the 3-bit grid with step 1 (x >= 0) and step 1/4 (x < 0); max = 3 = half * step
    x = torch.tensor([-0.75, -0.5, -0.25, 0.0, 1.0, 2.0, 3.0]).repeat(10).reshape(-1, 7)
    res = search_ratio(x, 3)
    assert res["m"] == 2 and res["scale"] == pytest.approx(1.0) and res["err"] == 0.0
    assert res["err_by_m"][0] > 0 and res["err_by_m"][2] == 0.0
    assert search_ratio(x, 3, ms=[0])["m"] == 0  # a single candidate: the hand-set ratio


def test_opt_m_never_loses_to_any_fixed_ratio_it_searched():
    g = torch.Generator().manual_seed(0)
    h = torch.nn.functional.gelu(torch.randn(512, 32, generator=g) * 1.5)
    w = torch.randn(16, 32, generator=g)
    res = search_ratio(h, 4, weight=w)
    assert res["err"] == min(res["err_by_m"].values())
    assert res["m"] > 0  # GELU's dense negative part wants a finer negative step than the positive tail
    q = TwoRegionQuantizer(4).calibrate(h, weight=w)
    assert int(q.m) == res["m"] and float(q.scale) == pytest.approx(res["scale"])
    xr = h.clone().requires_grad_(True)
    q(xr).sum().backward()  # straight-through: gradient 1 inside the range, 0 where clamped
    top, bottom = float(q.scale) * 7, -float(q.scale) * 8 / 2 ** int(q.m)
    inside = (h < top) & (h > bottom) & (h != 0)
    assert bool((xr.grad[inside] == 1).all())


# ------------------------------------------------------------------------------------ Greedy MP
def test_greedy_mp_order_by_hand():
    sizes = {"a": 2, "b": 1, "c": 1}
    table = {  # error at each bit-width; per weight bit saved, lowering 'a' costs (0.2-0)/2 = 0.1 at first
        "a": {4: 0.0, 3: 0.2, 2: 1.0},
        "b": {4: 0.0, 3: 0.05, 2: 0.5},
        "c": {4: 0.0, 3: 0.3, 2: 0.6},
    }
    res = greedy_mp(sizes, table, budget_bits=12, max_bits=4, min_bits=2)  # start: 16 bits
    # step 1: b (0.05) -> 15; step 2: a (0.1 per bit) -> 13; step 3: c (0.3) vs a (0.4) vs b (0.45) -> c -> 12
    assert [s[0] for s in res.steps] == ["b", "a", "c"]
    assert res.bits == {"a": 3, "b": 3, "c": 3} and res.size_bits == 12 == res.budget_bits
    assert res.average_bits == 3.0
    # a callable cost that adds the same table gives the same answer
    joint = greedy_mp(sizes, lambda bits: sum(table[k][v] for k, v in bits.items()), 12, max_bits=4, min_bits=2)
    assert joint.bits == res.bits


def test_greedy_mp_fills_the_slack():
    sizes = {"big": 4, "small": 1}
    table = {"big": {3: 0.0, 2: 0.1}, "small": {3: 0.0, 2: 10.0}}
    # from 15 bits: lower big (0.025 per bit) -> 11 <= 13; fill: small is already at max, big's +4 > slack 2
    res = greedy_mp(sizes, table, budget_bits=13, max_bits=3, min_bits=2)
    assert res.bits == {"big": 2, "small": 3} and res.size_bits == 11
    sizes = {"big": 2, "small": 1}
    table = {"big": {3: 0.0, 2: 0.01}, "small": {3: 0.0, 2: 0.001}}
    # lowering small first (0.001/bit) then big (0.005/bit) overshoots 7 -> 6; fill raises small back: 7
    res = greedy_mp(sizes, table, budget_bits=7, max_bits=3, min_bits=2)
    assert res.size_bits == 7 and res.bits == {"big": 2, "small": 3}


@pytest.mark.parametrize("avg", [4.0, 4.5, 5.0, 6.25])
def test_greedy_mp_meets_vit_budgets_exactly(avg):
    sizes = layer_sizes(_vit())  # qkv / proj / fc1 / fc2: multiples of one size, so every budget is reachable
    g = torch.Generator().manual_seed(0)
    table = {k: {b: float(torch.rand((), generator=g)) * 2.0 ** -b for b in range(3, 9)} for k in sizes}
    budget = budget_for_average(sizes, avg)
    res = greedy_mp(sizes, table, budget, max_bits=8, min_bits=3)
    assert weight_size_bits(sizes, res.bits) == res.size_bits == budget
    assert all(3 <= b <= 8 for b in res.bits.values())


def test_vit_mixed_precision_end_to_end(monkeypatch):
    import vitlab.kernels.fake_quant as fq
    from vitlab.quant import model_size_bits, quant_layers

    # the PyTorch reference instead of Triton's interpreter (which the kernel tests set up): same grid, faster
    monkeypatch.setattr(fq, "use_triton", lambda *t: False)
    model, images = _vit(), _images(8)
    layers = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    table = sensitivity_table(model, images, bits=(4, 5, 6), layers=layers)
    assert set(table) == set(layers) and all(set(r) == {4, 5, 6} for r in table.values())
    assert all(r[4] >= 0 for r in table.values())
    sizes = layer_sizes(model, layers)
    res = greedy_mp(sizes, table, budget_for_average(sizes, 5.0), max_bits=6, min_bits=4)
    assert res.size_bits == res.budget_bits == 5 * sum(sizes.values())
    q_mp = mptq_quantize(model, images, 5, 5, layer_bits=res.bits)
    q_5 = mptq_quantize(model, images, 5, 5)
    assert model_size_bits(q_mp) == model_size_bits(q_5)  # equal size: what the budget promised
    ql = quant_layers(q_mp)
    for name, b in res.bits.items():
        assert ql[name].w_bits == ql[name].a_bits == b
    assert all(isinstance(ql[n].a_quant, TwoRegionQuantizer) for n in ql if n.endswith("fc2"))
    q8 = mptq_quantize(model, images, 8, 8)
    with torch.no_grad():
        assert logit_kl(model(images), q8(images)) < 1e-2


def test_sensitivity_is_the_single_layer_kl(monkeypatch):
    import vitlab.kernels.fake_quant as fq
    from vitlab.quant import quant_layers, set_quant_state

    monkeypatch.setattr(fq, "use_triton", lambda *t: False)
    model, images = _vit(), _images(8)
    names = ["blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    table = sensitivity_table(model, images, bits=(5,), layers=names)  # runs from block 1's cached input
    for name in names:  # by hand: the whole model at 5 bits, every quantiser off but this layer's two
        q = mptq_quantize(model, images, 5, 5)
        set_quant_state(q, weights=False, acts=False)
        for n, layer in quant_layers(q).items():
            layer.a_quant.enabled = layer.w_quant.enabled = n == name
        with torch.no_grad():
            kl = logit_kl(model(images), q(images))
        assert table[name][5] == pytest.approx(kl, rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input():
    model, images = _vit(), _images(4)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_bias(model, images, alpha=1.5)
    with pytest.raises(ValueError, match="shift"):
        smoothquant_bias(model, images, shift="median")
    with pytest.raises(TypeError, match="images"):
        smoothquant_bias(model, [1, 2])
    with pytest.raises(TypeError, match="model"):
        smoothquant_bias("vit", images)
    with pytest.raises(ValueError, match="channels"):
        smoothing_factors(torch.rand(5, 3), torch.rand(4, 2))
    with pytest.raises(TypeError, match="norm"):
        fold_smoothing(nn.Linear(2, 2), nn.Linear(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="s must be"):
        fold_smoothing(nn.LayerNorm(2), nn.Linear(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="bits"):
        two_region_fake_quant(torch.rand(4), 1.0, 1, 2)
    with pytest.raises(ValueError, match="scale"):
        two_region_fake_quant(torch.rand(4), 0.0, 1, 4)
    with pytest.raises(ValueError, match="m must"):
        two_region_fake_quant(torch.rand(4), 1.0, -1, 4)
    with pytest.raises(ValueError, match="grid"):
        search_ratio(torch.rand(8, 2), 4, grid=[1.5])
    with pytest.raises(RuntimeError, match="calibrated"):
        TwoRegionQuantizer(4)(torch.rand(3))
    with pytest.raises(ValueError, match="budget_bits"):
        greedy_mp({"a": 10}, {"a": {3: 0.0}}, budget_bits=20, max_bits=3, min_bits=3)
    with pytest.raises(TypeError, match="cost"):
        greedy_mp({"a": 10}, 3.0, budget_bits=30, max_bits=3, min_bits=3)
    with pytest.raises(ValueError, match="cost table"):
        greedy_mp({"a": 10}, {"a": {4: 0.0}}, budget_bits=30, max_bits=4, min_bits=3)
    with pytest.raises(ValueError, match="smooth"):
        mptq_quantize(model, images, smooth="awq")
    with pytest.raises(ValueError, match="layer_sizes"):
        layer_sizes(model, ["blocks.9.attn.qkv"])
    with pytest.raises(TypeError, match="layer_bits"):
        mptq_quantize(model, images, layer_bits={"blocks.0.attn.qkv": "four"})
