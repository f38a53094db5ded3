"""SN-Netv2: configuration enumeration by hand, least squares on an exact linear map, LoRA, anchors, sampling."""
import copy

import pytest
import torch

from vitlab.methods.efficient.recipes import Reduced
from vitlab.methods.efficient.snnetv2 import (SNNetv2, StitchLinear, config_flops, evaluate_configs, fit_snnet,
                                              group_by_flops, least_squares_stitch, mid_config, sample_config,
                                              selective_forward, stitch_configs, v1_configs)
from vitlab.models import VisionTransformer
from model_helpers import toy_train


def _vit(depth, dim, seed=0, heads=2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=dim, depth=depth,
                             num_heads=heads, mlp_ratio=2.0).eval()


def _pair(lora_r=4):
    return SNNetv2(_vit(4, 16, seed=0), _vit(6, 24, seed=1), lora_r=lora_r)


# ------------------------------------------------------------------------------------------------ enumeration
def test_configs_for_depths_4_6_by_hand():
    S, L = 0, 1
    routes = [c.route for c in stitch_configs((4, 6))]
    # L block j ↦ S block ⌊4j/6⌋ = [0, 0, 1, 2, 2, 3]; the last L block of each S block: 1, 2, 4, 5
    hand = [
        ((S, 0, 3),), ((L, 0, 5),),                                                     # anchors
        ((S, 0, 0), (L, 2, 5)), ((S, 0, 1), (L, 3, 5)), ((S, 0, 2), (L, 5, 5)), ((S, 0, 3), (L, 6, 5)),  # S→L
        ((L, 0, 1), (S, 1, 3)), ((L, 0, 2), (S, 2, 3)), ((L, 0, 4), (S, 3, 3)),          # L→S
        ((L, 0, 1), (S, 1, 1), (L, 3, 5)), ((L, 0, 1), (S, 1, 2), (L, 5, 5)), ((L, 0, 2), (S, 2, 2), (L, 5, 5)),
        ((S, 0, 0), (L, 2, 2), (S, 2, 3)), ((S, 0, 0), (L, 2, 4), (S, 3, 3)), ((S, 0, 1), (L, 3, 4), (S, 3, 3)),
    ]
    assert routes == hand
    kinds = [c.kind for c in stitch_configs((4, 6))]
    assert [kinds.count(k) for k in ("S", "L", "S→L", "L→S", "L→S→L", "S→L→S")] == [1, 1, 4, 3, 3, 3]
    assert len(v1_configs((4, 6))) == 5 and all(c.kind in ("L", "S→L") for c in v1_configs((4, 6)))
    assert len(stitch_configs((4, 6), two_way=False)) == 6


def test_configs_match_the_official_enumeration_where_it_runs():
    # official get_stitch_configs_bidirection, depths (4, 8): S→L (i, 2(i+1)); L→S at odd j < 7 → S from j//2 + 1
    cfgs = stitch_configs((4, 8))
    sl = [(c.route[0][2], c.route[1][1]) for c in cfgs if c.kind == "S→L"]
    ls = [(c.route[0][2], c.route[1][1]) for c in cfgs if c.kind == "L→S"]
    assert sl == [(0, 2), (1, 4), (2, 6), (3, 8)] and ls == [(1, 1), (3, 2), (5, 3)]
    assert len(cfgs) == 15  # 2 + 4 + 3 + 3 + 3, as the official code gives for (4, 8)
    # equal depths (DeiT-S/B, 12 blocks each): 12 S→L, 11 L→S
    kinds = [c.kind for c in stitch_configs((12, 12))]
    assert kinds.count("S→L") == 12 and kinds.count("L→S") == 11


def test_every_route_runs_each_anchor_and_chains_depths():
    for depths in ((4, 6), (4, 8), (3, 3), (2, 7)):
        for c in stitch_configs(depths):
            assert c.route[0][1] == 0 and len(c.stitches) == len(c.route) - 1
            assert c.route[-1][2] == depths[c.route[-1][0]] - 1
            for a, b, e in c.route[:-1]:
                assert b <= e, (depths, c.label)  # every anchor but a last S→L's L runs a block at least


def test_bad_depths():
    with pytest.raises(ValueError, match="small <= large"):
        stitch_configs((6, 4))
    with pytest.raises(TypeError, match="depths"):
        stitch_configs(4)
    with pytest.raises(ValueError, match="depths"):
        stitch_configs((0, 4))


# ------------------------------------------------------------------------------------------------ stitching layers
def test_least_squares_recovers_an_exact_linear_map():
    torch.manual_seed(0)
    w, b = torch.randn(5, 3), torch.randn(5)
    x = torch.randn(2, 10, 3)  # 20 tokens, more than D_in + 1
    w_hat, b_hat = least_squares_stitch(x, x @ w.T + b)
    torch.testing.assert_close(w_hat, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_hat, b, atol=1e-5, rtol=1e-5)
    # hand case: y = 2x + 1 in one dimension
    w1, b1 = least_squares_stitch(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[1.0], [3.0], [5.0]]))
    torch.testing.assert_close(w1, torch.tensor([[2.0]]))
    torch.testing.assert_close(b1, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same number of tokens"):
        least_squares_stitch(torch.randn(4, 3), torch.randn(5, 2))


def test_lora_with_zero_b_is_the_frozen_layer_and_merges():
    st = StitchLinear(6, 4, lora_r=2)
    assert not st.weight.requires_grad and st.bias.requires_grad and st.lora_A.requires_grad
    x = torch.randn(3, 6)
    torch.testing.assert_close(st(x), x @ st.weight.T + st.bias)  # B = 0: exactly W x + b
    with torch.no_grad():
        st.lora_B.normal_()
    assert not torch.allclose(st(x), x @ st.weight.T + st.bias)
    torch.testing.assert_close(st.merged()(x), st(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.merged().weight, st.weight + 0.5 * st.lora_B @ st.lora_A)  # α/r = 1/2
    assert StitchLinear(6, 4, lora_r=0).weight.requires_grad
    with pytest.raises(ValueError, match="lora_r"):
        StitchLinear(6, 4, lora_r=5)


def test_init_stitches_solves_least_squares_on_the_features():
    model = _pair()
    x = torch.rand(4, 3, 16, 16)
    model.init_stitches(x)
    S, L = model.anchors
    with torch.no_grad():
        fs = selective_forward(S, S.embed(x), 0, 1)  # after S block 1
        fl = selective_forward(L, L.embed(x), 0, 2)  # S→L after S block 1 resumes L at block 3
    w, b = least_squares_stitch(fs, fl)
    torch.testing.assert_close(model.stitch_layers["s2l_1"].weight, w)
    torch.testing.assert_close(model.stitch_layers["s2l_1"].bias, b)


# ------------------------------------------------------------------------------------------------ the network
def test_anchor_configs_equal_the_anchors():
    model = _pair()
    model.init_stitches(torch.rand(4, 3, 16, 16))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, config=0), model.anchors[0](x))
        torch.testing.assert_close(model(x, config=1), model.anchors[1](x))


def test_extract_and_shared_prefix_evaluation_match_forward():
    model = _pair()
    with torch.no_grad():
        for st in model.stitch_layers.values():
            st.lora_B.normal_(std=0.1)
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 5, (6,))
    acc = evaluate_configs(model, (x, y), batch_size=4)
    with torch.no_grad():
        for c in range(len(model.configs)):
            logits = model(x, config=c)
            torch.testing.assert_close(model.extract(c)(x), logits, atol=1e-5, rtol=1e-4)
            assert acc[c] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    with pytest.raises(ValueError, match="config"):
        model(x, config=len(model.configs))


def test_flops_lie_between_and_groups_sample_uniformly():
    model = _pair()
    flops = config_flops(model, torch.rand(1, 3, 16, 16))
    assert min(flops) >= flops[0] * 0.99 and max(flops) <= flops[1] * 1.01  # S ≤ every stitch ≤ L (roughly)
    assert group_by_flops([1.0, 1.5, 3.0, 3.2, 10.0], gap=1.0) == [[0, 1], [2, 3], [4]]
    groups = [[0, 1, 2, 3], [4]]
    gen = torch.Generator().manual_seed(0)
    draws = [sample_config(groups, gen) for _ in range(2000)]
    assert abs(draws.count(4) / 2000 - 0.5) < 0.05  # the lone group is drawn half the time
    c = mid_config(flops, model)
    assert model.configs[c].kind not in ("S", "L")
    with pytest.raises(ValueError, match="gap"):
        group_by_flops([1.0], gap=-1)


def test_fit_trains_lora_not_the_frozen_weight():
    model = _pair()
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 5, (32,))
    model.init_stitches(x[:8])
    w0 = {k: v.weight.detach().clone() for k, v in model.stitch_layers.items()}
    hist = fit_snnet(model, (x, y), steps=3, batch_size=8, groups=[[2, 3], [6]])
    assert len(hist["config"]) == 3 and set(hist["config"]) <= {2, 3, 6}
    assert all(torch.equal(w0[k], v.weight) for k, v in model.stitch_layers.items())
    with pytest.raises(TypeError, match="SNNetv2"):
        fit_snnet(model.anchors[0], (x, y), steps=1)


def test_bad_anchors():
    with pytest.raises(ValueError, match="deeper"):
        SNNetv2(_vit(6, 24), _vit(4, 16))
    other = VisionTransformer(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="image size"):
        SNNetv2(other, _vit(4, 16))
    with pytest.raises(TypeError, match="nn.Module"):
        SNNetv2("vit", _vit(4, 16))


def test_for_compare_returns_a_sane_reduced(monkeypatch):
    from vitlab import zoo
    from vitlab.methods.efficient import snnetv2

    monkeypatch.setattr(zoo, "get", lambda name, P=None, **kw: _vit(2, 16, seed=3))
    monkeypatch.setattr(snnetv2, "SMALL_ANCHOR", {"smoke": "vit_nano_scenes"})
    base = _vit(3, 24, seed=4)
    before = copy.deepcopy(base.state_dict())
    train = toy_train()
    out = snnetv2.for_compare(base, train, "smoke")
    assert isinstance(out, Reduced) and out.tokens_per_block is None and "SN-Netv2" in out.note
    assert not out.model.training and out.model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "base is not modified"


def test_fit_snnet_goes_through_fit_with_the_stitch_lr_scale(monkeypatch):
    """Anchors' weights at fit's lr, stitching layers at lr × stitch_lr_scale; exactly ``steps`` steps."""
    import vitlab.train as vtrain

    model = _pair()
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 5, (32,))
    model.init_stitches(x[:8])
    seen, calls = {}, {}
    orig = vtrain.fit

    def spy(net, train, *args, optimizer=None, **kw):
        calls.update(kw)
        opt = optimizer(net, kw["lr"], kw["weight_decay"])
        seen.update({id(p): g["lr"] for g in opt.param_groups for p in g["params"]})
        return orig(net, train, *args, optimizer=optimizer, **kw)

    monkeypatch.setattr(vtrain, "fit", spy)
    hist = fit_snnet(model, (x, y), steps=4, batch_size=8, lr=2e-4, stitch_lr_scale=5.0, groups=[[2], [6]])
    assert calls["steps"] == 4 and calls["lr"] == 2e-4 and len(hist["config"]) == 4
    stitch = {id(p) for p in model.stitch_layers.parameters()}
    for p in model.parameters():
        if p.requires_grad:
            assert seen[id(p)] == pytest.approx(1e-3 if id(p) in stitch else 2e-4)
    assert all(id(st.weight) not in seen for st in model.stitch_layers.values()), "the frozen W is not optimised"
    with pytest.raises(ValueError, match="stitch_lr_scale"):
        fit_snnet(model, (x, y), steps=1, batch_size=8, stitch_lr_scale=0, groups=[[2]])


def test_for_compare_seed_changes_the_stitches(monkeypatch):
    from vitlab import zoo
    from vitlab.methods.efficient import snnetv2

    monkeypatch.setattr(zoo, "get", lambda name, P=None, **kw: _vit(2, 16, seed=3))
    monkeypatch.setattr(snnetv2, "SMALL_ANCHOR", {"smoke": "vit_nano_scenes"})
    base, train = _vit(3, 24, seed=4), toy_train()
    a, b, c = (snnetv2.for_compare(base, train, "smoke", seed=s) for s in (0, 0, 1))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert a.extra["config"] == b.extra["config"], "the same seed picks the same stitch"
        torch.testing.assert_close(a.model(x), b.model(x))
        assert c.extra["config"] != a.extra["config"] or not torch.allclose(a.model(x), c.model(x))
