"""CrossViT (Chen, Fan, Panda; ICCV 2021): the one-query CLS fusion on hand cases, and the whole model against timm's
``CrossVit`` (timm/models/crossvit.py, the maintained port of IBM/CrossViT models/crossvit.py) on the same weights."""
import pytest
import torch
import torch.nn as nn
from timm.models.crossvit import CrossVit as TimmCrossVit

from vitlab import measure
from vitlab.methods.architectures import crossvit as cv
from vitlab.methods.architectures import recipes
from vitlab.models import VisionTransformer
from model_helpers import assert_rejects_bad_images


def _identity_attention(dim: int, num_heads: int = 1) -> cv.CrossAttention:
    attn = cv.CrossAttention(dim, num_heads)
    with torch.no_grad():
        for lin in (attn.wq, attn.wk, attn.wv, attn.proj):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    return attn


def test_cross_attention_one_query_by_hand():
    """q = k = v = x, one head, D = 2: the first token's scores are x_0·x_j / √2, softmaxed, and the output is
    the weighted mean of the tokens; no other token is updated (the output is [B, 1, D])."""
    attn = _identity_attention(2)
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    w = torch.softmax(torch.tensor([1.0, 2.0, 0.0]) / 2 ** 0.5, dim=0)
    expected = (w[:, None] * x[0]).sum(0)
    out = attn(x)
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(attn.probs(x)[0, 0, 0], w)
    # zero queries: uniform attention, the plain mean of the N tokens (CLS included, as in the official code)
    with torch.no_grad():
        attn.wq.weight.zero_()
    torch.testing.assert_close(attn(x)[0, 0], x[0].mean(0))


def test_cross_attention_block_residual_is_the_cls():
    """c'' = c' + attn(LN(z)): with the attention's output projection at zero, the block returns the CLS as it
    came in (the residual is in the other branch's space, no MLP)."""
    blk = cv.CrossAttentionBlock(4, 2)
    with torch.no_grad():
        blk.attn.proj.weight.zero_()
        blk.attn.proj.bias.zero_()
    z = torch.randn(3, 6, 4)
    torch.testing.assert_close(blk(z), z[:, :1])


def test_multiscale_block_fusion_replaces_only_the_cls():
    """After the per-branch blocks, the fusion changes each branch's CLS (and only it), and that CLS reads the
    OTHER branch's patch tokens."""
    torch.manual_seed(0)
    msb = cv.MultiScaleBlock((8, 12), (1, 1, 1), (2, 3), (2.0, 2.0)).eval()
    xs = [torch.randn(2, 5, 8), torch.randn(2, 3, 12)]
    outs = msb(xs)
    local = [blocks(x) for blocks, x in zip(msb.blocks, xs)]
    for b in range(2):
        torch.testing.assert_close(outs[b][:, 1:], local[b][:, 1:])  # patch tokens: the branch's own blocks only
        assert not torch.allclose(outs[b][:, :1], local[b][:, :1])
    # perturb branch 1's patch tokens: branch 0's new CLS moves (it read them), branch 0's patches do not
    xs2 = [xs[0], xs[1].clone()]
    xs2[1][:, 1:] += torch.randn_like(xs2[1][:, 1:])
    outs2 = msb(xs2)
    assert (outs2[0][:, :1] - outs[0][:, :1]).abs().max() > 1e-4
    torch.testing.assert_close(outs2[0][:, 1:], outs[0][:, 1:])


@pytest.mark.parametrize("cfg", [
    dict(img_size=28, in_chans=1, num_classes=10, **cv.TINY),  # the lesson's model
    dict(img_size=24, img_scale=(1.0, 28 / 24), patch_size=(4, 7), embed_dim=(16, 24), num_heads=(2, 3),
         depth=((1, 2, 2), (2, 1, 1), (1, 1, 1)), mlp_ratio=(3.0, 2.0, 1.0), in_chans=3, num_classes=5),
])
def test_equals_timm_crossvit_on_the_same_weights(cfg):
    """timm's CrossVit with the same config and weights gives the same logits (the key mapping is the identity:
    this module keeps timm's names). The second config resizes branch 1's input (bicubic, as the 240/224 models)."""
    torch.manual_seed(0)
    ref = TimmCrossVit(**cfg).eval()
    ours = cv.CrossViT(**cfg).eval()
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_official_key_mapping():
    """IBM/CrossViT keeps the embeddings in ParameterLists (``pos_embed.0``); timm and this module name them
    ``pos_embed_0``; every other key is the same."""
    sd = {"pos_embed.0": 1, "cls_token.1": 2, "blocks.0.fusion.0.0.attn.wq.weight": 3, "head.1.bias": 4}
    assert cv.from_official_keys(sd) == {"pos_embed_0": 1, "cls_token_1": 2, "blocks.0.fusion.0.0.attn.wq.weight": 3,
                                         "head.1.bias": 4}


def test_fusion_cost_is_linear_in_tokens_and_all_to_all_is_quadratic():
    """MACs of the CLS fusion on [1 + N, D]: wq (1 token) + proj (1 token) + wk, wv (1 + N tokens) = (2 + 2(1+N)) D²,
    plus q·kᵀ and a·v: 2 (1+N) D. Linear in N. The all-to-all exchange has an N² term."""
    D = 16
    blk = cv.CrossAttentionBlock(D, 2)
    for n in (8, 32, 128):
        assert measure.macs(blk, torch.randn(1, 1 + n, D)) == (2 + 2 * (1 + n)) * D * D + 2 * (1 + n) * D
    a2a = cv.AllToAllFusion((D, D), D, 2)
    m = [measure.macs(a2a, (torch.randn(1, n, D), torch.randn(1, n, D))) for n in (64, 128, 256)]
    assert m[2] - m[1] > 1.8 * (m[1] - m[0])  # the increments grow: a quadratic term


def test_default_img_scale_fits_each_patch():
    """img_scale=None: each branch sees the largest multiple of its patch that fits (the official per-branch
    resize): 28 px with patches (4, 7) is not resized; 32 px (CIFAR) gives the patch-7 branch 28 px."""
    assert cv.CrossViT(img_size=28, in_chans=1, num_classes=10, **cv.TINY).img_size_scaled == (28, 28)
    m = cv.CrossViT(img_size=32, in_chans=3, num_classes=100, **cv.TINY)
    assert m.img_size_scaled == (32, 28) and m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_lesson_model_is_registered_and_matched():
    model = cv.CrossViT(img_size=28, in_chans=1, num_classes=10, **cv.TINY)
    control = VisionTransformer(img_size=28, in_chans=1, num_classes=10, **recipes.BASELINE)
    assert 0.7 <= recipes.check_matched(model, control) <= 1.3
    assert recipes.registered("crossvit") == "digits"
    assert [pe.num_patches for pe in model.patch_embed] == list(cv.BRANCH_TOKENS)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch_size=(4, 6), img_scale=(1.0, 1.0)), "patch_size\\[1\\]=6 does not divide"),
    (dict(img_scale=(1.0,)), "img_scale must have one entry per branch"),
    (dict(patch_size=(4,), embed_dim=(32,), num_heads=(2,)), "patch_size must give one patch size per branch"),
    (dict(embed_dim=(32, 64, 16)), "embed_dim must have one entry per branch"),
    (dict(num_heads=(3, 4)), "num_heads\\[0\\]=3 does not divide embed_dim\\[0\\]"),
    (dict(depth=((1, 1, 0),)), "fusion depth"),
    (dict(depth=((1, 1),)), "depth must give one block count per branch"),
    (dict(depth=()), "depth must list at least one"),
    (dict(mlp_ratio=(2.0,)), "mlp_ratio must have 2"),
    (dict(img_size=0), "img_size"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cv.CrossViT(**{**dict(img_size=28, in_chans=1, num_classes=10, **cv.TINY), **kwargs})


def test_bad_input():
    model = cv.CrossViT(img_size=28, in_chans=1, num_classes=10, **cv.TINY)
    assert_rejects_bad_images(model, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="x must be"):
        cv.CrossAttention(8, 2)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=8"):
        cv.CrossAttention(8, 3)
    assert isinstance(model.patch_embed[0], nn.Module)
