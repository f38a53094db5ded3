"""EWA: RUP routing, the averaging rule by hand, collapse back to the exact base ViT, and the β = 1 limit."""
import copy

import pytest
import torch
from timm.layers import Mlp

from vitlab.methods.training.ewa import (EWAMoE, ExpertLinear, average_experts_, collapse, ewa_optimizer,
                                         expert_divergence, fit_ewa, moe_layers, moeify, random_uniform_partition)
from vitlab.models import VisionTransformer


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _spread_experts(moe, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ routing
def test_partition_is_balanced_and_random_per_step():
    moe = EWAMoE(Mlp(4, 6), num_experts=3)
    with torch.no_grad():  # expert e outputs the constant e: fc2 weight 0, fc2 bias e
        moe.fc2.weight.zero_()
        moe.fc2.bias.copy_(torch.arange(3.0)[:, None].expand(3, 4))
    x = torch.randn(2, 5, 4)  # T = 10 tokens over 3 experts: 4, 3, 3
    moe.train()
    first = moe(x)[..., 0].flatten().long()
    assert sorted(torch.bincount(first, minlength=3).tolist()) == [3, 3, 4]
    # the rule: token perm[k] goes to expert k % 3
    perm = random_uniform_partition(10, 3, generator=torch.Generator().manual_seed(5))
    assert sorted(perm.tolist()) == list(range(10))
    seen = {tuple(moe(x)[..., 0].flatten().long().tolist()) for _ in range(8)}
    assert len(seen) > 1, "a new random partition every training step"
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a, b), "eval routing is deterministic (fixed seed)"
    assert sorted(torch.bincount(a[..., 0].flatten().long(), minlength=3).tolist()) == [3, 3, 4]


def test_partition_follows_the_dealing_rule():
    moe = EWAMoE(Mlp(2, 3), num_experts=4).train()
    with torch.no_grad():
        moe.fc2.weight.zero_()
        moe.fc2.bias.copy_(torch.arange(4.0)[:, None].expand(4, 2))
    out = moe(torch.randn(1, 9, 2))[0, :, 0].long()  # [9]
    expected = torch.empty(9, dtype=torch.long)
    expected[moe.last_perm] = torch.arange(9) % 4
    assert torch.equal(out, expected)


def test_identical_experts_equal_the_dense_ffn():
    mlp = Mlp(8, 16)
    x = torch.randn(3, 7, 8)
    for routing in ("random", "mean"):
        moe = EWAMoE(mlp, num_experts=4, eval_routing=routing)
        for train in (True, False):
            moe.train(train)
            torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_expert_linear_matches_per_expert_linear():
    lin = ExpertLinear(3, 4, 5)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, 6, 4)
    y = lin(x)
    for e in range(3):
        torch.testing.assert_close(y[e], x[e] @ lin.weight[e].T + lin.bias[e])


# ------------------------------------------------------------------------------------------------ averaging
def test_average_by_hand():
    moe = EWAMoE(Mlp(1, 1), num_experts=2)
    with torch.no_grad():
        moe.fc1.weight.copy_(torch.tensor([[[1.0]], [[3.0]]]))  # mean 2
    average_experts_(moe, 0.25)  # 1 -> 0.75*1 + 0.25*2 = 1.25 ; 3 -> 2.75
    torch.testing.assert_close(moe.fc1.weight.flatten(), torch.tensor([1.25, 2.75]))


def test_share_rate_zero_is_noop_and_one_gives_the_mean():
    model = moeify(_vit(), blocks=(0, 1), num_experts=3)
    for _, moe in moe_layers(model):
        _spread_experts(moe)
    before = copy.deepcopy(model.state_dict())
    average_experts_(model, 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert expert_divergence(model) > 0.1

    means = {k: v.mean(0) for k, v in before.items() if ".mlp.fc" in k}
    average_experts_(model, 0.3)  # the mean is kept, the spread shrinks by 0.7
    for k, v in model.state_dict().items():
        if k in means:
            torch.testing.assert_close(v.mean(0), means[k])
            torch.testing.assert_close(v - v.mean(0), 0.7 * (before[k] - means[k]))
    average_experts_(model, 1.0)
    for k, m in means.items():
        torch.testing.assert_close(model.state_dict()[k], m.expand_as(before[k]))
    assert expert_divergence(model) < 1e-6


def test_toward_the_others_form_is_a_rescaled_share_rate():
    # W_e <- (1 - b')W_e + b' mean_{j != e} W_j  equals our rule with b = b' E / (E - 1)
    E, b_others = 4, 0.3
    moe = EWAMoE(Mlp(3, 5), num_experts=E)
    _spread_experts(moe)
    w = moe.fc1.weight.detach().clone()
    others = (w.sum(0, keepdim=True) - w) / (E - 1)
    expected = (1 - b_others) * w + b_others * others
    average_experts_(moe, b_others * E / (E - 1))
    torch.testing.assert_close(moe.fc1.weight.detach(), expected)


# ------------------------------------------------------------------------------------------------ collapse
def test_collapse_gives_the_base_architecture_with_mean_weights():
    base = _vit()
    model = moeify(copy.deepcopy(base), num_experts=4)
    assert [n for n, _ in moe_layers(model)] == ["blocks.1.mlp"]  # every other block by default
    _spread_experts(moe_layers(model)[0][1])
    moe_state = model.state_dict()
    dense = collapse(model)
    assert moe_layers(model), "collapse copies by default"
    assert type(dense) is VisionTransformer and isinstance(dense.blocks[1].mlp, Mlp)
    assert list(dense.state_dict()) == list(base.state_dict())
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in base.parameters())
    for k, v in dense.state_dict().items():
        expected = moe_state[k].mean(0) if k.startswith("blocks.1.mlp.fc") else moe_state[k]
        torch.testing.assert_close(v, expected)
    # the mean-routing MoE computes exactly the collapsed model
    model.eval()
    moe_layers(model)[0][1].eval_routing = "mean"
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), dense.eval()(x), rtol=1e-5, atol=1e-6)
    # loads into a fresh base model
    fresh = _vit(seed=3)
    fresh.load_state_dict(dense.state_dict())


def test_collapse_of_identical_experts_is_exact():
    base = _vit().eval()
    x = torch.rand(4, 1, 8, 8)
    model = moeify(copy.deepcopy(base), blocks=[0, 1], num_experts=3).eval()
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)
    dense = collapse(model, inplace=True)
    assert dense is model and not moe_layers(dense)
    for k, v in dense.state_dict().items():  # the mean of E equal floats, up to one rounding
        torch.testing.assert_close(v, base.state_dict()[k], rtol=2e-7, atol=0)


def test_share_rate_one_with_sgd_is_dense_training_with_ffn_lr_over_e():
    # experts start equal, so the forward (and every non-FFN gradient) is the dense model's; expert e gets the
    # gradient of its own tokens g_e, and the mean after an SGD step is W - lr/E * sum_e g_e: the dense step
    # with the FFN's learning rate divided by E.
    E, lr = 4, 0.1
    base = _vit(depth=2)
    dense, model = copy.deepcopy(base), moeify(copy.deepcopy(base), blocks=(0, 1), num_experts=E)
    ffn = [p for n, p in dense.named_parameters() if ".mlp." in n]
    rest = [p for n, p in dense.named_parameters() if ".mlp." not in n]
    opt_dense = torch.optim.SGD([{"params": rest}, {"params": ffn, "lr": lr / E}], lr=lr)
    opt_moe = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        for net, opt in ((dense, opt_dense), (model, opt_moe)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        average_experts_(model, 1.0)
    for k, v in collapse(model).state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training
def test_fit_ewa_runs_averaging_after_every_step():
    model = moeify(_vit(), num_experts=2)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    hist = fit_ewa(model, data, share_rate=1.0, profile="smoke", epochs=2, batch_size=8, progress=False, shift=0)
    assert len(hist["divergence"]) == 8 and max(hist["divergence"]) < 1e-6  # β = 1: experts equal after each step
    free = moeify(_vit(), num_experts=2)
    hist0 = fit_ewa(free, data, share_rate=0.0, profile="smoke", epochs=2, batch_size=8, progress=False, shift=0)
    assert hist0["divergence"][-1] > 1e-4, "without EWA the experts drift apart"


def test_deterministic():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = moeify(_vit(), num_experts=2).train()
        outs.append(model(torch.ones(2, 1, 8, 8)))
    assert torch.equal(*outs)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    vit = _vit()
    with pytest.raises(ValueError, match="num_experts"):
        EWAMoE(Mlp(4, 8), num_experts=1)
    with pytest.raises(TypeError, match="num_experts"):
        EWAMoE(Mlp(4, 8), num_experts=2.0)
    with pytest.raises(TypeError, match="mlp"):
        EWAMoE(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="eval_routing"):
        EWAMoE(Mlp(4, 8), eval_routing="top1")
    with pytest.raises(ValueError, match="blocks"):
        moeify(copy.deepcopy(vit), blocks=(5,))
    with pytest.raises(ValueError, match="blocks"):
        moeify(copy.deepcopy(vit), blocks=(1, 1))
    with pytest.raises(TypeError, match="blocks"):
        moeify(copy.deepcopy(vit), blocks="1")
    with pytest.raises(TypeError, match="model"):
        moeify(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already"):
        moeify(moeify(copy.deepcopy(vit), blocks=(1,)), blocks=(1,))
    with pytest.raises(ValueError, match="share_rate"):
        average_experts_(moeify(copy.deepcopy(vit)), 1.5)
    with pytest.raises(TypeError, match="share_rate"):
        average_experts_(moeify(copy.deepcopy(vit)), "0.3")
    with pytest.raises(ValueError, match="no EWAMoE"):
        average_experts_(vit, 0.3)
    with pytest.raises(ValueError, match="no EWAMoE"):
        collapse(vit)
    with pytest.raises(ValueError, match="no EWAMoE"):
        expert_divergence(vit)
    with pytest.raises(ValueError, match="share_rate"):
        ewa_optimizer(-0.1)
    with pytest.raises(ValueError, match="no EWAMoE"):
        fit_ewa(vit, (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), share_rate=0.3)
    with pytest.raises(ValueError, match="num_tokens"):
        random_uniform_partition(0, 2)
    with pytest.raises(TypeError, match="generator"):
        random_uniform_partition(4, 2, generator=0)
