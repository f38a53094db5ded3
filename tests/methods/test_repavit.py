"""RePaViT: the partial activation, exact reparameterisation (random BN statistics), parameter counts, edge cases."""
import copy

import pytest
import torch
import torch.nn as nn

from vitlab import measure
from vitlab.methods.efficient.recipes import Reduced, finetune_steps
from vitlab.methods.efficient.repavit import (DEFAULTS, RePaBlock, RePaLinearMlp, RePaMlp, _line_fit, _set_bn_affine,
                                              active_channels, ffn_params, for_compare, idle_ratios, match_base_,
                                              recalibrate_bn, reparameterize, to_repa)
from model_helpers import tiny_vit


def _vit(seed=0, **kw):
    return tiny_vit(seed, **{"num_classes": 3, "mlp_ratio": 2.0, **kw})


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


# ------------------------------------------------------------------------------------------------ the FFN
def test_partial_activation_by_hand():
    mlp = RePaMlp(dim=2, hidden=4, idle_ratio=0.75).eval()  # a = 1: GELU on channel 0 only
    assert mlp.act_channels == 1
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        mlp.fc1.bias.zero_()
        mlp.fc2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        mlp.fc2.bias.zero_()  # BNs at their init: eval mode is y = x / sqrt(1 + eps)
    x = torch.tensor([[[-1.0, -2.0]]])
    s = (1 + 1e-5) ** -0.5
    h = torch.tensor([-1.0, -1.0, -2.0, -2.0]) * s
    h = torch.cat([nn.functional.gelu(h[:1]), h[1:]]) * s
    expected = x + torch.stack([h[0] + h[1], h[2] + h[3]])
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("idle", [0.0, 0.5, 0.75, 1.0])
def test_reparam_is_exact_with_random_bn_statistics(idle):
    mlp = _randomise_bn(RePaMlp(dim=12, hidden=24, idle_ratio=idle)).eval()
    x = torch.randn(3, 7, 12)
    fast = RePaLinearMlp.from_repa(mlp)
    torch.testing.assert_close(fast(x), mlp(x), rtol=0, atol=1e-5)
    a = active_channels(24, idle)
    assert fast.act_channels == a and measure.count_params(fast) == ffn_params(12, 24, idle)
    if a == 0:  # the whole FFN and its shortcut are one linear map
        assert not hasattr(fast, "fc_act")
        assert [n for n, _ in fast.named_parameters()] == ["linear.weight", "linear.bias"]
    if a == 24:  # nothing idle: the linear part is the identity alone (plus the folded biases)
        torch.testing.assert_close(fast.linear.weight, torch.eye(12))


def test_reparam_of_the_whole_model_is_exact():
    model = _randomise_bn(to_repa(_vit(depth=3), 0.75))
    model.train()
    x = torch.rand(4, 3, 16, 16)
    model(x)  # a train-mode pass (batch statistics) must not leak into the comparison
    _randomise_bn(model, seed=1).eval()
    fast = reparameterize(model)
    assert fast is not model and not fast.training
    assert all(isinstance(b.mlp, RePaLinearMlp) for b in fast.blocks)
    assert (fast(x) - model(x)).abs().max().item() <= 1e-5
    assert reparameterize(model, inplace=True) is model
    with pytest.raises(ValueError, match="no trainable RePa"):
        reparameterize(model)


def test_parameter_count_formula():
    C, H = 32, 64
    for idle in (0.0, 0.25, 0.75, 1.0):
        a = active_channels(H, idle)
        assert ffn_params(C, H, idle) == C * C + C + (2 * a * C + a if a else 0)
        assert ffn_params(C, H, idle, deployed=False) == measure.count_params(RePaMlp(C, H, idle))
    assert active_channels(H, 0.75) == 16 and active_channels(H, 1.0) == 0 and active_channels(H, 0.0) == H
    assert active_channels(192, 0.75) == 48 and active_channels(10, 0.75) == 3  # ceil, as the official code
    # mlp_ratio 4, idle 0.75: 8C² + 5C → 3C² + 2C + C/4 (the paper's 8C² → 3C²)
    assert ffn_params(64, 256, 0.75) == 3 * 64 * 64 + 2 * 64
    vit = _vit(depth=2)
    repa = to_repa(vit)
    fast = reparameterize(_randomise_bn(repa).eval())
    vanilla_ffn = sum(measure.count_params(b.mlp) + measure.count_params(b.norm2) for b in vit.blocks)
    assert measure.count_params(vit) - vanilla_ffn + 2 * ffn_params(32, 64, 0.75) == measure.count_params(fast)


def test_repa_block_keeps_attention_and_widths():
    vit = _vit()
    repa = to_repa(vit, 0.75)
    assert all(isinstance(b, RePaBlock) for b in repa.blocks) and not any(isinstance(b, RePaBlock) for b in vit.blocks)
    b0, v0 = repa.blocks[0], vit.blocks[0]
    assert torch.equal(b0.attn.qkv.weight, v0.attn.qkv.weight) and b0.attn.qkv.weight is not v0.attn.qkv.weight
    assert torch.equal(b0.mlp.fc1.weight, v0.mlp.fc1.weight) and torch.equal(b0.mlp.norm1.weight, v0.norm2.weight)
    assert isinstance(b0.norm2, nn.Identity) and b0.mlp.fc1.out_features == 64
    # idle ratio 0 with BN as identity and the LayerNorm's affine: the RePa block is the vanilla block up to the norm
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(b0.forward_attn(x), v0.forward_attn(x))
    fresh = to_repa(vit, from_ffn=False)
    assert not torch.equal(fresh.blocks[0].mlp.fc1.weight, v0.mlp.fc1.weight)
    with pytest.raises(ValueError, match="already"):
        to_repa(repa)


def test_idle_ratio_heuristics():
    assert idle_ratios(4, 0.75) == [0.75] * 4
    lin = idle_ratios(5, 0.75, "linear")
    assert lin[-1] == 0.0 and lin[0] == pytest.approx(0.625) and lin[-2] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lin[:-2], lin[1:-1]))
    model = to_repa(_vit(depth=3), 0.75, heuristic="linear")
    assert [b.mlp.idle_ratio for b in model.blocks] == pytest.approx(idle_ratios(3, 0.75, "linear"))


def test_recalibrate_bn_estimates_the_statistics():
    model = to_repa(_vit(depth=1))
    images = torch.rand(40, 3, 16, 16)
    recalibrate_bn(model, images, batch_size=20)  # two equal batches: the mean of means is the mean
    assert not model.training and model.blocks[0].mlp.norm1.momentum == 0.1
    with torch.no_grad():  # BN1 sees the attention half's output: its running mean is that mean
        tokens = model.blocks[0].forward_attn(model.embed(images))
    torch.testing.assert_close(model.blocks[0].mlp.norm1.running_mean, tokens.mean((0, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(_vit(), images)


def test_bn_fit_by_hand():
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]])
    k, d, mean, var = _line_fit(x, 3 * x + 1)  # an exact line: k = 3, d = 1
    torch.testing.assert_close(k, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0]))
    bn = nn.BatchNorm1d(2).eval()
    _set_bn_affine(bn, k, d, mean, var)
    torch.testing.assert_close(bn(x), 3 * x + 1)  # eval-mode BN now computes k·x + d


def test_match_base_approximates_the_base():
    base = _vit(depth=2)
    images = torch.rand(64, 3, 16, 16)
    with torch.no_grad():
        ref = base(images)
        plain = recalibrate_bn(to_repa(base, 0.0), images)
        matched = match_base_(to_repa(base, 0.0), base, images)
        err_plain, err_matched = ((plain(images) - ref) ** 2).mean(), ((matched(images) - ref) ** 2).mean()
    assert not matched.training and err_matched < 0.1 * err_plain, (err_matched, err_plain)
    # idle channels: BN₂ is the least-squares line through the GELU of the base's pre-activations
    m = match_base_(to_repa(base, 1.0), base, images)
    with torch.no_grad():
        h = base.blocks[0].mlp.fc1(base.blocks[0].norm2(base.blocks[0].forward_attn(base.embed(images))))
    h = h.flatten(0, 1)
    k, d, _, _ = _line_fit(h.double(), nn.functional.gelu(h.double()))
    torch.testing.assert_close(m.blocks[0].mlp.norm2(h), (k * h.double() + d).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="to_repa"):
        match_base_(base, base, images)


def test_for_compare_on_a_tiny_model():
    base = _vit()
    before = copy.deepcopy(base.state_dict())
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(128, 3, 16, 16, generator=g), torch.randint(0, 3, (128,), generator=g))
    out = for_compare(base, data, "smoke")
    assert isinstance(out, Reduced) and out.tokens_per_block is None and not out.model.training
    assert all(isinstance(b.mlp, RePaLinearMlp) for b in out.model.blocks) and "idle 0.75" in out.note
    assert measure.count_params(out.model) < measure.count_params(base)
    assert out.model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():  # the training graph it returns computes the same eval outputs as the deployed model
        assert torch.allclose(out.extra["train_graph"](x), out.model(x), atol=1e-4)
    assert out.extra["history"]["step"][-1] == finetune_steps("smoke")  # the chapter's fine-tune length


def test_for_compare_fine_tunes_with_the_chapter_recipe_and_a_seed():
    from vitlab.methods.efficient.recipes import finetune_kwargs

    base = _vit()
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(128, 3, 16, 16, generator=g), torch.randint(0, 3, (128,), generator=g))
    a, b = for_compare(base, data, "smoke", seed=0), for_compare(base, data, "smoke", seed=1)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(a.model(x), b.model(x))  # the seed sets the batches
    assert finetune_kwargs("smoke")["lr"] == 1e-4 and DEFAULTS["idle_ratio"] == 0.75 and "lr" not in DEFAULTS
    with pytest.raises(ValueError, match="seed"):
        for_compare(base, data, "smoke", seed=-1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="idle_ratio"):
        RePaMlp(8, 16, idle_ratio=1.5)
    with pytest.raises(TypeError, match="idle_ratio"):
        RePaMlp(8, 16, idle_ratio="0.75")
    with pytest.raises(ValueError, match="hidden"):
        RePaMlp(8, 0)
    with pytest.raises(ValueError, match="heuristic"):
        idle_ratios(4, 0.75, "cosine")
    with pytest.raises(TypeError, match="vit"):
        to_repa(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model"):
        reparameterize("model")
    with pytest.raises(ValueError, match="no trainable RePa"):
        reparameterize(_vit())
    with pytest.raises(ValueError, match="images"):
        recalibrate_bn(to_repa(_vit()), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="act_channels"):
        RePaLinearMlp(8, -1)
    with pytest.raises(TypeError, match="model"):
        for_compare(None, None, "smoke")
