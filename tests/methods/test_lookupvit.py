"""LookupViT: reverse attention reuses the transposed logits, shapes at several compressed grids, equivalence
with vit_pytorch's LookViT, from_vit reproduces the ViT at the full grid, FLOPs fall with the grid, bad input."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from vitlab import measure
from vitlab.methods.efficient.lookupvit import (LOOKVIT_COMPAT, AtGrid, LookupBlock, LookupViT,
                                                ReverseCrossAttention, at_grid, fit_multires, for_compare,
                                                from_vit, resize_grid, reverse_probs, sincos_2d)
from vitlab.methods.efficient.recipes import Reduced
from vitlab.models import VisionTransformer


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def tiny_lookup(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
               mlp_ratio=2.0, lookup_mlp_ratio=0.5, compressed_grid=2)
    cfg.update(kw)
    return LookupViT(**cfg).eval()


# ------------------------------------------------------------------------------------------------ mechanism
def test_reverse_attention_hand_case():
    """Aᵀ with a softmax over the compressed axis; values are the compressed tokens (identity projections)."""
    rev = ReverseCrossAttention(2, num_heads=1, qkv_bias=False, norm_layer=lambda d: nn.Identity())
    with torch.no_grad():
        rev.v.weight.copy_(torch.eye(2))
        rev.proj.weight.copy_(torch.eye(2))
        rev.proj.bias.zero_()
    ln2 = math.log(2.0)
    A = torch.tensor([[0.0, ln2, 0.0],  # compressed token 0 against lookup tokens 0, 1, 2
                      [ln2, 0.0, 0.0]])[None, None]  # [B=1, H=1, M=2, N=3]
    compressed = torch.eye(2)[None]  # token m = e_m, so the output rows are the attention rows
    out = rev(compressed, A)[0]
    expected = torch.tensor([[1 / 3, 2 / 3],  # lookup 0 sees logits (0, ln2) over the two compressed tokens
                             [2 / 3, 1 / 3],  # lookup 1: (ln2, 0)
                             [1 / 2, 1 / 2]])  # lookup 2: (0, 0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(reverse_probs(A)[0, 0], expected)
    # not the gather's probabilities transposed (those sum to one over the lookup axis)
    assert not torch.allclose(A.softmax(-1)[0, 0].T, expected)


def test_block_scatter_reuses_the_gathers_logits():
    blk = LookupBlock(16, num_heads=2, mlp_ratio=2.0, lookup_mlp_ratio=0.5).eval()
    seen = {}
    blk.gather.register_forward_hook(lambda m, args, out: seen.update(gather=out[1]))
    blk.scatter.register_forward_pre_hook(lambda m, args: seen.update(scatter=args[1]))
    c, l = torch.randn(2, 5, 16), torch.randn(2, 16, 16)
    c2, l2 = blk(c, l)
    assert seen["scatter"] is seen["gather"] and seen["gather"].shape == (2, 2, 5, 16)
    assert c2.shape == c.shape and l2.shape == l.shape
    assert not hasattr(blk.scatter, "q") and not hasattr(blk.scatter, "k")  # only a value projection


def test_resize_grid_is_average_pooling_at_half_and_identity_at_full():
    t = torch.randn(2, 64, 8)
    pooled = torch.nn.functional.avg_pool2d(t.transpose(1, 2).reshape(2, 8, 8, 8), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(resize_grid(t, 4), pooled)
    torch.testing.assert_close(resize_grid(t, 8), t)
    assert resize_grid(t, 3).shape == (2, 9, 8)


@pytest.mark.parametrize("class_token", [False, True])
def test_shapes_at_several_grids(class_token):
    m = tiny_lookup(class_token=class_token, global_pool="token" if class_token else "avg")
    x = torch.randn(3, 3, 16, 16)
    for g in (1, 2, 3, 4):
        c, l = m.embed(x, grid=g)
        assert c.shape == (3, g * g + class_token, 32) and l.shape == (3, 16, 32)
        assert m(x, grid=g).shape == (3, 5)
        assert m.tokens_per_block(g) == g * g + class_token
        torch.testing.assert_close(at_grid(m, g)(x), m(x, grid=g))


def test_sincos_matches_lucidrains():
    from vit_pytorch.look_vit import posemb_sincos_2d

    torch.testing.assert_close(sincos_2d(3, 3, 16), posemb_sincos_2d(torch.zeros(1, 3, 3, 16)))


# ------------------------------------------------------------------------------------------------ equivalence
def lookvit_to_lookupvit(sd: dict, depth: int, in_chans: int = 3) -> dict:
    """State dict of vit_pytorch's LookViT → ours. Its LayerNorms are bias-free with weight (γ + 1); its q, k,
    v and output projections have no bias (ours: zeros); the patch vector is ordered (p1, p2, c), ours (c, p1, p2)."""
    g = lambda k: sd[k] + 1  # noqa: E731
    W = sd["to_patches.1.weight"]  # [D, p1·p2·c, k, k]
    D, pd, k, _ = W.shape
    p = math.isqrt(pd // in_chans)
    zeros = torch.zeros(D)
    out = {"patch_embed.proj.weight": W.reshape(D, p, p, in_chans, k, k).permute(0, 3, 1, 2, 4, 5).reshape(W.shape),
           "patch_embed.proj.bias": sd["to_patches.1.bias"], "patch_embed.norm.weight": g("to_patches.3.gamma")}
    for i in range(depth):
        L, B = f"layers.{i}.", f"blocks.{i}."
        attn, mlp, look, rev, post, lmlp = (f"{L}{j}." for j in range(6))
        out.update({
            B + "block.norm1.weight": g(attn + "norm.gamma"),
            B + "block.attn.qkv.weight": torch.cat([sd[attn + f"to_{n}.weight"] for n in "qkv"]),
            B + "block.attn.proj.weight": sd[attn + "to_out.1.weight"], B + "block.attn.proj.bias": zeros,
            B + "block.norm2.weight": g(mlp + "0.gamma"),
            B + "gather.norm.weight": g(look + "norm.gamma"),
            B + "gather.norm_context.weight": g(look + "norm_context.gamma"),
            B + "gather.q.weight": sd[look + "to_q.weight"],
            B + "gather.kv.weight": torch.cat([sd[look + "to_k.weight"], sd[look + "to_v.weight"]]),
            B + "gather.proj.weight": sd[look + "to_out.1.weight"], B + "gather.proj.bias": zeros,
            B + "scatter.norm.weight": g(rev + "norm_context.gamma"), B + "scatter.v.weight": sd[rev + "to_v.weight"],
            B + "scatter.proj.weight": sd[rev + "to_out.1.weight"], B + "scatter.proj.bias": zeros,
            B + "post_norm.weight": g(post + "gamma"), B + "lookup_norm.weight": g(lmlp + "0.gamma"),
        })
        for mine, theirs in (("block.mlp", mlp), ("lookup_mlp", lmlp)):
            for a, b in (("fc1", "1"), ("fc2", "4")):
                for t in ("weight", "bias"):
                    out[f"{B}{mine}.{a}.{t}"] = sd[f"{theirs}{b}.{t}"]
    out.update({"norm.weight": g("norm.gamma"), "lookup_head_norm.weight": g("highres_norm.gamma"),
                "head.weight": sd["to_logits.weight"], "head.bias": torch.zeros(sd["to_logits.weight"].shape[0])})
    return out


def test_equivalent_to_vit_pytorch_lookvit():
    from vit_pytorch.look_vit import LookViT

    torch.manual_seed(0)
    # their attention width heads·dim_head equals dim here (ours is always dim); dropout 0
    ref = LookViT(dim=32, image_size=16, num_classes=5, depth=2, patch_size=8, heads=2, dim_head=16, mlp_factor=2,
                  highres_patch_size=4, highres_mlp_factor=1, cross_attn_heads=2, cross_attn_dim_head=16,
                  patch_conv_kernel_size=3, dropout=0.0).eval()
    with torch.no_grad():  # their LayerNorm gains start at 0 (weight 1): move them so the map is exercised
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0, 0.3)
    mine = tiny_lookup(lookup_mlp_ratio=1.0, compressed_grid=2, patch_kernel=3, **LOOKVIT_COMPAT)
    mine.load_state_dict(lookvit_to_lookupvit(ref.state_dict(), depth=2))  # strict: every key mapped
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)
        # the pre-norm option (our default) computes something else
        alt = copy.deepcopy(mine)
        for b in alt.blocks:
            b.post_norm = nn.Identity()
        assert (alt(x) - ref(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ from a ViT
def test_from_vit_at_full_grid_is_the_vit_and_leaves_it_alone():
    vit = tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    m = from_vit(vit, compressed_grid=2)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid=4), vit(x), atol=1e-5, rtol=1e-5)  # 4×4 = the ViT's own grid
        assert m(x).shape == (4, 5) and m.tokens_per_block() == 5
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    assert m.patch_embed.proj.weight.data_ptr() != vit.patch_embed.proj.weight.data_ptr()


def test_flops_fall_with_the_grid():
    vit = tiny_vit()
    m = from_vit(vit, compressed_grid=2)
    x = torch.randn(2, 3, 16, 16)
    flops = [measure.flops(at_grid(m, g), x) for g in (1, 2, 3)]
    assert flops[0] < flops[1] < flops[2]
    assert flops[0] < measure.flops(vit, x)


def test_lookup_update_skipped_without_lookup_head():
    m = tiny_lookup(lookup_in_head=False)
    x = torch.randn(2, 3, 16, 16)
    calls = []
    m.blocks[-1].scatter.register_forward_hook(lambda *a: calls.append(1))
    m(x)
    assert calls == [] and m.lookup_head_norm is None


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    m = tiny_lookup()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="grid"):
        m(x, grid=5)  # larger than the 4×4 lookup grid
    with pytest.raises(ValueError, match="grid"):
        m(x, grid=0)
    with pytest.raises(TypeError, match="grid"):
        m(x, grid=2.0)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="global_pool"):
        tiny_lookup(global_pool="max")
    with pytest.raises(ValueError, match="class_token"):
        tiny_lookup(global_pool="token")
    with pytest.raises(ValueError, match="pos_embed"):
        tiny_lookup(pos_embed="rope")
    with pytest.raises(ValueError, match="lookup_mlp_ratio"):
        tiny_lookup(lookup_mlp_ratio=0)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_lookup(num_heads=3)
    with pytest.raises(TypeError, match="LookupViT"):
        AtGrid(tiny_vit(), 2)
    with pytest.raises(TypeError, match="VisionTransformer"):
        from_vit(m)
    with pytest.raises(TypeError, match="grids"):
        fit_multires(m, (x, torch.zeros(2, dtype=torch.long)), grids=[], steps=1)
    with pytest.raises(TypeError, match="LookupViT"):
        fit_multires(tiny_vit(), (x, torch.zeros(2, dtype=torch.long)), grids=(2,), steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit_multires(m, (x, torch.zeros(2, dtype=torch.long)), grids=(2,), steps=0)


# ------------------------------------------------------------------------------------------------ comparison
def test_fit_multires_runs_exact_steps_and_uses_every_grid():
    m = tiny_lookup()
    torch.manual_seed(0)
    data = (torch.rand(64, 3, 16, 16), torch.randint(0, 5, (64,)))
    grids_seen = []
    orig = m.forward

    def spy(x, grid=None):
        grids_seen.append(grid)
        return orig(x, grid=grid)

    m.forward = spy
    hist = fit_multires(m, data, grids=(1, 2, 3), steps=6, batch_size=8, progress=False)
    assert hist["step"][-1] == 6 and set(grids_seen) == {1, 2, 3}


def test_for_compare_on_a_tiny_vit():
    vit = tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    torch.manual_seed(0)
    train = (torch.rand(128, 3, 16, 16), torch.randint(0, 5, (128,)))
    out = for_compare(vit, train, "smoke")
    assert isinstance(out, Reduced) and isinstance(out.model, LookupViT) and not out.model.training
    assert out.tokens_per_block == [17.0, 17.0] and out.gflops is None and "LookupViT" in out.note  # 4x4 + CLS
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert out.model(x).shape == (2, 5)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())


def test_finetune_from_vit_scales_only_the_new_layers_lr(monkeypatch):
    """The base's weights get fit's lr; gather, scatter and the lookup MLPs/norms get lr × new_lr_scale."""
    import vitlab.train as vtrain
    from vitlab.methods.efficient.lookupvit import NEW_LAYERS, finetune_from_vit

    model = from_vit(tiny_vit(), compressed_grid=2)
    seen = {}
    orig = vtrain.fit

    def spy(net, train, *args, optimizer=None, **kw):
        opt = optimizer(net, kw["lr"], 0.05)
        seen.update({id(p): g["lr"] for g in opt.param_groups for p in g["params"]})
        return orig(net, train, *args, optimizer=optimizer, **kw)

    monkeypatch.setattr(vtrain, "fit", spy)
    data = (torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,)))
    finetune_from_vit(model, data, grid=2, new_lr_scale=7.0, lr=1e-4, steps=2, batch_size=8)
    for name, p in model.named_parameters():
        new = any(part in NEW_LAYERS for part in name.split("."))
        assert seen[id(p)] == pytest.approx(7e-4 if new else 1e-4), name
    assert any(n.startswith("blocks.0.gather") for n, _ in model.named_parameters())
    assert not model.training


def test_for_compare_seeds_differ_and_repeat():
    vit = tiny_vit()
    torch.manual_seed(0)
    train = (torch.rand(128, 3, 16, 16), torch.randint(0, 5, (128,)))
    x = torch.rand(2, 3, 16, 16)
    models = [for_compare(vit, train, "smoke", seed=s).model for s in (0, 0, 1)]
    with torch.no_grad():
        a, b, c = (m(x) for m in models)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
