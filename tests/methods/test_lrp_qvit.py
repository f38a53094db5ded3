"""LRP-QViT: the LRP rules by hand and against Chefer's official relprop rules, their sum rule, conservation through a whole ViT, exact bit budgets,
clipped channel-wise parameters against torch's fake quantiser, the quantised pipeline, bad input."""
import pytest
import torch
import torch.nn as nn

from vitlab.methods.quantization.lrp_qvit import (
    allocate_bits, allocate_bits_by_cost, average_bits, clipped_channel_params, depth_prior_scores, layer_scores,
    linear_params, lrp_linear, lrp_linear_stack, lrp_matmul, lrp_qvit, lrp_residual, post_ln_inputs, random_scores,
    vit_relevance)
from vitlab.models import create_model

D = torch.float64


def test_lrp_linear_by_hand():
    # y = x W^T with x = [1, -2], W = [[1, 1], [2, -1]]: contributions x_j W_kj are [[1, -2], [2, 2]]
    x = torch.tensor([[1.0, -2.0]], dtype=D)
    w = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=D)
    r = torch.tensor([[3.0, 4.0]], dtype=D)
    # z+ rule: output 0 has one positive contribution (x_0 W_00 = 1) -> all of R_0 = 3 to input 0;
    # output 1 has two (2 and 2) -> R_1 = 4 split 2 / 2
    out = lrp_linear(x, w, r)
    torch.testing.assert_close(out, torch.tensor([[5.0, 2.0]], dtype=D), rtol=0, atol=1e-12)


def test_sum_rule_on_a_tiny_linear_stack():
    torch.manual_seed(0)
    # GELU keeps negative values, so every output has positive contributions (x_j^+ W^+ or x_j^- W^-); after a
    # ReLU an output whose positive inputs all meet negative weights would have Z = 0 and drop its relevance
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.GELU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 6, dtype=D)
    r_out = torch.rand(4, 3, dtype=D)
    r_in, totals = lrp_linear_stack(net, x, r_out)
    assert r_in.shape == x.shape
    # every rule conserves the total: per sample and at every layer
    torch.testing.assert_close(r_in.sum(1), r_out.sum(1), rtol=0, atol=1e-10)
    for t in totals:
        assert abs(t - r_out.sum().item()) < 1e-10
    # a bias takes no share: the same stack with different biases gives the same relevance for the same inputs
    # of each layer (z+ ignores b), so the total still equals the output relevance
    for m in net:
        if isinstance(m, nn.Linear):
            m.bias.data.add_(1.0)
    r_in2, _ = lrp_linear_stack(net, x, r_out)
    torch.testing.assert_close(r_in2.sum(1), r_out.sum(1), rtol=0, atol=1e-10)


def test_matmul_and_residual_rules_conserve():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 4, generator=g, dtype=D) + 0.1, torch.rand(2, 4, 5, generator=g, dtype=D) + 0.1
    r = torch.randn(2, 3, 5, generator=g, dtype=D)
    ra, rb = lrp_matmul(a, b, r)
    torch.testing.assert_close(ra.sum((1, 2)), r.sum((1, 2)), rtol=0, atol=1e-10)  # each side carries the total
    torch.testing.assert_close(rb.sum((1, 2)), r.sum((1, 2)), rtol=0, atol=1e-10)
    x, y = torch.randn(3, 7, generator=g, dtype=D), torch.randn(3, 7, generator=g, dtype=D)
    r = torch.randn(3, 7, generator=g, dtype=D)
    rx, ry = lrp_residual(x, y, r)
    torch.testing.assert_close((rx + ry).sum(1), r.sum(1), rtol=0, atol=1e-10)
    # hand case: a = [1, 1], b = [3, 3], R = [1, 1] -> shares 1/4 and 3/4 of the total 2
    rx, ry = lrp_residual(torch.tensor([[1.0, 1.0]], dtype=D), torch.tensor([[3.0, 3.0]], dtype=D),
                          torch.tensor([[1.0, 1.0]], dtype=D))
    torch.testing.assert_close(rx, torch.tensor([[0.25, 0.25]], dtype=D))
    torch.testing.assert_close(ry, torch.tensor([[0.75, 0.75]], dtype=D))


# ---- equivalence with Chefer's rules (hila-chefer/Transformer-Explainability, modules/layers_ours.py) -------------
# The official rules, read from the code: safe_divide(a, b) = a / (b + 1e-9) where b != 0, 0 where b == 0 (the 1e-9
# is below these tests' tolerance); Linear.relprop with alpha = 1 (beta = 0) keeps only the "activator" term
# x+ * (S @ W+) + x- * (S @ W-) with S = R / (x+ W+^T + x- W-^T); einsum (RelPropSimple) returns X_i * grad, i.e.
# a * (S b^T) and b * (a^T S) for z = a b, and the ViT's Attention.relprop halves both; Add.relprop scales
# a * S and b * S so that their sums split sum(R) in the ratio |sum a*S| : |sum b*S|. Expected tensors by hand.
def test_chefer_linear_rule_alpha1_by_hand_with_a_dead_output():
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=D)
    w = torch.tensor([[1.0, 1.0, 2.0], [2.0, -1.0, -2.0], [-1.0, 1.0, 0.0]], dtype=D)
    r = torch.tensor([[4.0, 2.0, 3.0]], dtype=D)
    # contributions x_j W_kj: out 0 (1, -2, 1): positive ones x0 (x+W+) and x2 (x+W+), Z = 2 -> R_0 = 4 split 2 / 2
    #                         out 1 (2, 2, -1): positive ones x0 (x+W+) and x1 (x-W-), Z = 4 -> R_1 = 2 split 1 / 1
    #                         out 2 (-1, -2, 0): none positive, Z = 0 -> safe_divide gives 0: R_2 = 3 is dropped
    torch.testing.assert_close(lrp_linear(x, w, r), torch.tensor([[3.0, 1.0, 2.0]], dtype=D), rtol=0, atol=1e-8)


def test_chefer_matmul_rule_by_hand():
    a = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]], dtype=D)
    b = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]], dtype=D)
    r = torch.tensor([[[3.0, 8.0], [2.0, 2.0]]], dtype=D)
    # z = a b = [[3, 4], [1, 2]], S = R / z = [[1, 2], [2, 1]]
    # R_a = a * (S b^T) = a * [[1, 5], [2, 4]] = [[1, 10], [0, 4]];  R_b = b * (a^T S) = b * [[1, 2], [4, 5]]
    ra, rb = lrp_matmul(a, b, r)
    torch.testing.assert_close(ra, torch.tensor([[[1.0, 10.0], [0.0, 4.0]]], dtype=D), rtol=0, atol=1e-8)
    torch.testing.assert_close(rb, torch.tensor([[[1.0, 0.0], [4.0, 10.0]]], dtype=D), rtol=0, atol=1e-8)
    assert ra.sum().item() == pytest.approx(15.0) and rb.sum().item() == pytest.approx(15.0)  # halved: 7.5 + 7.5


def test_chefer_add_rule_by_hand():
    a = torch.tensor([[1.0, -1.0, 2.0]], dtype=D)
    b = torch.tensor([[1.0, 3.0, -2.0]], dtype=D)
    r = torch.tensor([[2.0, 4.0, 6.0]], dtype=D)
    # z = [2, 2, 0], S = [1, 2, 0] (safe_divide: 0 where z = 0); a*S = [1, -2, 0] (sum -1), b*S = [1, 6, 0] (sum 7)
    # sum(R) = 12 split |-1| : |7| -> 1.5 and 10.5;  R_a = a*S * (1.5 / -1), R_b = b*S * (10.5 / 7)
    ra, rb = lrp_residual(a, b, r)
    torch.testing.assert_close(ra, torch.tensor([[-1.5, 3.0, 0.0]], dtype=D), rtol=0, atol=1e-8)
    torch.testing.assert_close(rb, torch.tensor([[1.5, 9.0, 0.0]], dtype=D), rtol=0, atol=1e-8)


# ---- the controls of the lesson: a depth prior and a measured (KL) cost table at the same exact budget ----------
def test_depth_prior_scores_by_hand():
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.2.mlp.fc1"]
    # L = 3 blocks: raw scores 3, 3, 2, 1 -> / 9
    sc = depth_prior_scores(names)
    assert sc == pytest.approx({names[0]: 3 / 9, names[1]: 3 / 9, names[2]: 2 / 9, names[3]: 1 / 9})
    with pytest.raises(ValueError, match="block layer name"):
        depth_prior_scores(["head"])


def test_allocate_bits_by_cost_by_hand():
    params = {"a": 2, "b": 1, "c": 1}  # units 2, 1, 1; budget 3 bits on average -> Σ u b = 12
    costs = {"a": {2: 10.0, 3: 1.0, 4: 0.0}, "b": {2: 0.5, 3: 0.2, 4: 0.0}, "c": {2: 5.0, 3: 1.0, 4: 0.0}}
    # the candidates with Σ u b = 12: (a, b, c) = (3, 3, 3): 2.2; (3, 2, 4): 1.5; (3, 4, 2): 6.0;
    # (4, 2, 2): 5.5; (2, 4, 4): 10 -> (3, 2, 4)
    bits = allocate_bits_by_cost(costs, params, 3.0, (2, 3, 4))
    assert bits == {"a": 3, "b": 2, "c": 4} and average_bits(bits, params) == 3.0
    with pytest.raises(ValueError, match="every choice"):
        allocate_bits_by_cost({"a": {3: 1.0}, "b": {3: 1.0}, "c": {3: 1.0}}, params, 3.0, (2, 3, 4))
    with pytest.raises(ValueError, match="same"):
        allocate_bits_by_cost({"a": costs["a"]}, params, 3.0, (2, 3, 4))


def _vit(seed=0):
    torch.manual_seed(seed)
    return create_model("vit_nano", img_size=8, patch_size=4, num_classes=10).eval()


def test_vit_relevance_conserves_and_leaves_model_alone():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    out = vit_relevance(model, x, torch.tensor([1, 2, 3]))
    # one-hot start: total 1 per image, conserved down to the token embeddings (float64)
    torch.testing.assert_close(out["input_total"], torch.ones(3, dtype=D), rtol=0, atol=1e-8)
    torch.testing.assert_close(out["logits"].float(), model(x), rtol=1e-4, atol=1e-5)  # same forward
    assert list(out["mass"]) == list(linear_params(model))
    assert all(v > 0 for v in out["mass"].values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert next(model.parameters()).dtype == torch.float32
    scores = layer_scores(model, x, batch_size=2)
    assert abs(sum(scores.values()) - 1.0) < 1e-12 and all(v > 0 for v in scores.values())


def test_bit_budget_met_exactly_and_ordered():
    params = {"a": 300, "b": 100, "c": 200, "d": 200, "e": 200}
    scores = {"a": 0.4, "b": 0.05, "c": 0.3, "d": 0.2, "e": 0.05}
    for budget, choices in [(4.0, (3, 4, 5, 6)), (6.0, (4, 6, 8)), (3.0, (2, 3, 4, 5)), (5.0, (4, 6, 8))]:
        bits = allocate_bits(scores, params, budget, choices)
        assert set(bits.values()) <= set(choices)
        num = sum(bits[n] * params[n] for n in params)
        assert num == budget * sum(params.values()), (budget, bits)  # exact, in integers
        assert average_bits(bits, params) == budget
        # equal-size layers: the more relevant never gets fewer bits
        assert bits["c"] >= bits["d"] >= bits["e"]
    # uniform scores on equal sizes at a reachable integer budget: all layers at the budget is optimal (convexity)
    eq = {n: 100 for n in "wxyz"}
    assert set(allocate_bits({n: 1.0 for n in eq}, eq, 4.0, (2, 4, 6)).values()) == {4}
    # random scores: still exact
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bits = allocate_bits(random_scores(params, g), params, 4.0, (3, 4, 5, 6))
        assert average_bits(bits, params) == 4.0


def test_budget_on_the_course_layout():
    model = create_model("vit_tiny")
    params = linear_params(model)
    assert len(params) == 4 * len(model.blocks)
    scores = random_scores(params, torch.Generator().manual_seed(0))
    for budget, choices in [(3.0, (2, 3, 4, 5)), (4.0, (3, 4, 5, 6)), (6.0, (5, 6, 7, 8)), (4.5, (4, 5))]:
        assert average_bits(allocate_bits(scores, params, budget, choices), params) == budget


def test_unreachable_budget_raises():
    with pytest.raises(ValueError, match="budget"):
        allocate_bits({"a": 1.0, "b": 1.0}, {"a": 3, "b": 3}, 4.1, (4, 6))  # multiples of 1/2 only
    with pytest.raises(ValueError, match="budget"):
        allocate_bits({"a": 1.0}, {"a": 3}, 5.0, (4, 6))  # one layer: only 4 or 6
    with pytest.raises(ValueError, match="outside"):
        allocate_bits({"a": 1.0}, {"a": 3}, 9.0, (4, 6))


def test_clipped_channel_params_match_torch_fake_quant():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=g) * torch.tensor([0.5, 1, 2, 4, 8, 1])
    x[0, 3] = 60.0  # one outlier in channel 3
    s0, z0 = clipped_channel_params(x, 4, clip=None)  # min-max: as torch's per-channel observer
    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=1, quant_min=0, quant_max=15,
                                                         dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(x)
    ts, tz = obs.calculate_qparams()
    torch.testing.assert_close(s0, ts.float(), rtol=1e-6, atol=0)
    assert torch.equal(z0, tz.to(torch.int32))
    s1, z1 = clipped_channel_params(x, 4, clip=(0.01, 0.99))
    assert s1[3] < s0[3] / 3  # the outlier no longer sets channel 3's step
    from vitlab.kernels.fake_quant import fake_quant
    y = fake_quant(x, s1, z1, 4, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x, s1, z1, 1, 0, 15)
    assert torch.equal(y, ref)
    # the search never does worse than min-max on its calibration data, per channel
    s2, z2 = clipped_channel_params(x, 4, clip="search")
    err = lambda s, z: (fake_quant(x, s, z, 4, axis=1) - x).pow(2).mean(0)
    assert bool((err(s2, z2) <= err(s0, z0) + 1e-12).all())
    assert err(s2, z2).sum() < err(s0, z0).sum()


def test_pipeline_builds_and_sets_post_ln_params():
    model = _vit()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    params = linear_params(model)
    bits = allocate_bits(layer_scores(model, x), params, 4.0, (3, 4, 5, 6))
    q = lrp_qvit(model, x, bits)
    from vitlab.quant.model import quant_layers
    layers = quant_layers(q)
    for name, b in bits.items():
        assert layers[name].w_bits == layers[name].a_bits == b
    for name, a in post_ln_inputs(model, x).items():
        assert layers[name].a_quant.scale.shape == (a.shape[-1],)  # channel-wise on post-LN inputs
    assert layers["blocks.0.attn.proj"].a_quant.scale.numel() == 1  # per tensor elsewhere
    y = q(x)
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    q8 = lrp_qvit(model, x, 8)
    assert (q8(x) - model(x)).abs().max() < 0.05  # 8 bits: close to float


def test_bad_arguments():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shapes"):
        lrp_linear(x, torch.ones(4, 5), torch.ones(2, 4))
    with pytest.raises(TypeError, match="x"):
        lrp_linear([1.0], torch.ones(4, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        lrp_residual(x, torch.ones(2, 4), x)
    with pytest.raises(TypeError, match="layers"):
        lrp_linear_stack([nn.Conv2d(1, 1, 1)], x)
    with pytest.raises(TypeError, match="model"):
        vit_relevance("vit", torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="images"):
        vit_relevance(_vit(), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="target"):
        vit_relevance(_vit(), torch.ones(2, 1, 8, 8), torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="same"):
        allocate_bits({"a": 1.0}, {"b": 3}, 4.0)
    with pytest.raises(ValueError, match=r"scores\['a'\]"):
        allocate_bits({"a": -1.0}, {"a": 3}, 4.0)
    with pytest.raises(ValueError, match=r"params\['a'\]"):
        allocate_bits({"a": 1.0}, {"a": 0}, 4.0)
    with pytest.raises(ValueError, match="choices"):
        allocate_bits({"a": 1.0}, {"a": 3}, 4.0, (4, 16))
    with pytest.raises(TypeError, match="budget"):
        allocate_bits({"a": 1.0}, {"a": 3}, "4")
    with pytest.raises(ValueError, match="bits"):
        clipped_channel_params(x, 9)
    with pytest.raises(ValueError, match="clip"):
        clipped_channel_params(x, 4, clip=(0.9, 0.1))
    with pytest.raises(ValueError, match="bits"):
        lrp_qvit(_vit(), torch.ones(2, 1, 8, 8), 12)
    with pytest.raises(ValueError, match="missing"):
        lrp_qvit(_vit(), torch.ones(2, 1, 8, 8), {"blocks.0.attn.qkv": 4})
