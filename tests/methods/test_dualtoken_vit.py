"""DualToken-ViT (arXiv 2309.12424; no official code): property tests of the paper-level build.

Global branch zeroed = the conv-only block; the attention over [step-wise downsampled map; global tokens] by hand;
the position-aware update of the global tokens on a hand case (grid cell (i, j) receives region (i, j)); the tokens
change in every block and cross the stages; shapes across stages; the ablation without global tokens.
"""
import pytest
import torch

from vitlab import measure
from vitlab.methods.architectures.dualtoken_vit import (TINY, TINY_NOGLOBAL, DualTokenBlock, DualTokenViT,
                                                        GlobalBranch, LocalBranch, StepwiseDownsample,
                                                        downsample_steps)
from model_helpers import assert_rejects_bad_images


def _zero(*mods):
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.zero_()


@pytest.mark.parametrize("side,kv_side,steps", [(14, 4, 2), (7, 4, 1), (4, 4, 0), (28, 4, 3), (16, 2, 3)])
def test_downsample_steps(side, kv_side, steps):
    assert downsample_steps(side, kv_side) == steps
    d = StepwiseDownsample(3, steps)
    assert d(torch.randn(1, 3, side, side)).shape[-1] <= kv_side


def test_global_branch_zeroed_is_the_conv_only_block():
    torch.manual_seed(0)
    blk = DualTokenBlock(8, 2, side=7).eval()
    _zero(blk.glob.proj)
    x, g = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 8)
    with torch.no_grad():
        out, g_out = blk(x, g)
        y = x + blk.local(blk.norm1(x))  # conv-only block: local branch + MLP, nothing global
        torch.testing.assert_close(out, y + blk.mlp(blk.norm2(y)))
        assert not torch.allclose(g_out, g)  # the global tokens still update


def test_local_branch_zeroed_leaves_the_global_branch():
    torch.manual_seed(1)
    blk = DualTokenBlock(8, 2, side=7).eval()
    _zero(blk.local.pw)
    x, g = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 8)
    with torch.no_grad():
        out, _ = blk(x, g)
        y = x + blk.glob(blk.norm1(x), g)[0]
        torch.testing.assert_close(out, y + blk.mlp(blk.norm2(y)))


def test_attention_over_downsampled_map_and_global_tokens_by_hand():
    """Every position queries the concatenation [downsampled tokens; LN(global tokens after the fusion)]."""
    torch.manual_seed(2)
    gb = GlobalBranch(4, 1, side=8, kv_side=4, global_side=2).eval()
    x, g = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4)
    with torch.no_grad():
        d = gb.down(x)  # one stride-2 step: 4x4
        assert d.shape == (1, 4, 4, 4)
        pooled = torch.stack([d[0, :, :2, :2].mean((1, 2)), d[0, :, :2, 2:].mean((1, 2)),
                              d[0, :, 2:, :2].mean((1, 2)), d[0, :, 2:, 2:].mean((1, 2))])[None]
        g_fused = g + pooled
        ctx = torch.cat([d.flatten(2).transpose(1, 2), gb.norm_g(g_fused)], 1)  # 16 + 4 key/value tokens
        k, v = gb.kv(ctx).chunk(2, -1)
        q = gb.q(x.flatten(2).transpose(1, 2))
        att = ((q @ k.transpose(1, 2)) / 2.0).softmax(-1)  # head dim 4: scale 1/2
        expected = gb.proj(att @ v).transpose(1, 2).reshape(1, 4, 8, 8)
        qg = gb.q_g(gb.norm_g(g_fused))
        g_expected = g_fused + gb.proj_g(((qg @ k.transpose(1, 2)) / 2.0).softmax(-1) @ v)
        out, g_out = gb(x, g)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g_out, g_expected)


def test_position_aware_update_by_hand():
    """4x4 map, no downsampling, a 2x2 grid of global tokens, their attention output zeroed: global token (i, j)
    gains exactly the mean of the map's quadrant (i, j)."""
    gb = GlobalBranch(1, 1, side=4, kv_side=4, global_side=2).eval()
    assert gb.down.steps == 0
    _zero(gb.proj_g)
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3: 0-3, 4-7, 8-11, 12-15
    g = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    with torch.no_grad():
        _, g_out = gb(x, g)
    quadrant_means = torch.tensor([2.5, 4.5, 10.5, 12.5])  # (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+...)/4
    torch.testing.assert_close(g_out[0, :, 0], g[0, :, 0] + quadrant_means)


def test_global_tokens_update_in_every_block_and_cross_stages():
    torch.manual_seed(3)
    m = DualTokenViT(**TINY).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats, trace = m.forward_features(x, return_global=True)
    assert [tuple(t.shape) for t in trace] == [(2, 16, 32), (2, 16, 48), (2, 16, 64)]
    g0 = m.global_init.expand(2, -1, -1)
    assert not torch.allclose(trace[0], g0)
    assert not torch.allclose(trace[0][0], trace[0][1])  # image-dependent after the first block
    assert feats.shape == (2, 64, 2, 2)


def test_shapes_across_stages():
    m = DualTokenViT(**TINY).eval()
    assert m.sides == [7, 4, 2]
    assert [blk.glob.down.steps for st in m.stages for blk in st] == [1, 0, 0]
    maps = []
    hooks = [st[-1].register_forward_hook(lambda mod, i, o: maps.append(tuple(o[0].shape))) for st in m.stages]
    with torch.no_grad():
        assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    for h in hooks:
        h.remove()
    assert maps == [(3, 32, 7, 7), (3, 48, 4, 4), (3, 64, 2, 2)]
    m2 = DualTokenViT(**{**TINY, "stem_stride": 2})  # the stride-2 stem: 14x14 -> 7x7 -> 4x4
    assert m2.sides == [14, 7, 4] and [blk.glob.down.steps for st in m2.stages for blk in st] == [2, 1, 0]


def test_flop_counter_sees_the_model():
    """torch's flop counter (its module tracker) runs through the model: the global tokens enter the blocks as a
    tensor with a grad_fn (``repeat``, not an ``expand`` view of the parameter, which the tracker rejects)."""
    x = torch.randn(2, 1, 28, 28)
    with_g, without_g = measure.flops(DualTokenViT(**TINY), x), measure.flops(DualTokenViT(**TINY_NOGLOBAL), x)
    assert with_g > without_g > 0


def test_ablation_without_global_tokens():
    m = DualTokenViT(**TINY_NOGLOBAL).eval()
    assert m.global_init is None and not hasattr(m.stages[0][0].glob, "q_g")
    with torch.no_grad():
        _, trace = m.forward_features(torch.randn(2, 1, 28, 28), return_global=True)
        ctx, g = m.stages[0][0].glob.kv_tokens(torch.randn(2, 32, 7, 7), None)
    assert trace == [None, None, None] and g is None and ctx.shape == (2, 16, 32)  # the downsampled map only
    full = DualTokenViT(**TINY)
    ctx_full, _ = full.stages[0][0].glob.kv_tokens(torch.randn(2, 32, 7, 7), torch.zeros(2, 16, 32))
    assert ctx_full.shape == (2, 32, 32)  # concatenated with the 16 global tokens


def test_bad_input():
    assert_rejects_bad_images(DualTokenViT(**TINY), in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="num_heads"):
        DualTokenViT(embed_dims=[32, 48], depths=[1, 1], num_heads=[2])
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=32"):
        GlobalBranch(32, 3, side=8)
    with pytest.raises(ValueError, match="g must be global tokens"):
        GlobalBranch(8, 2, side=8)(torch.randn(1, 8, 8, 8), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"x must be a feature map \[B, 8"):
        LocalBranch(8)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="img_size"):
        DualTokenViT(img_size=4, embed_dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="stem_stride"):
        DualTokenViT(stem_stride=8)
    with pytest.raises(ValueError, match="kv_side"):
        downsample_steps(8, 0)
