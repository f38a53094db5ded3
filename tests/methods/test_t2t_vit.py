"""T2T-ViT (vitlab.methods.architectures.t2t_vit): soft split, re-structurisation, the official token transformer's
v-residual and input-width scale, the sinusoid table, and equivalence with vit-pytorch's ``T2TViT`` where its
layout allows.

Official code: yitu-opensource/T2T-ViT, ``models/token_transformer.py`` (``Attention``, ``Token_transformer``),
``models/t2t_vit.py`` (``T2T_module``, ``T2T_ViT``), ``models/transformer_block.py`` (``get_sinusoid_encoding``).
vit-pytorch's ``T2TViT`` (vit_pytorch/t2t.py) differs in its token layers (a standard pre-norm transformer that
keeps the width C·k², padding stride // 2, learned positions), so the equivalence tests cover what is the same:
the re-structurisation + soft split between layers, and a one-split model (overlapping patch embedding,
backbone, head) with the same weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab import measure
from vitlab.models import VisionTransformer
from vitlab.methods.architectures import recipes
from vitlab.methods.architectures.t2t_vit import (CONFIG, OFFICIAL_KERNELS, SoftSplit, T2TModule, T2TViT,
                                                  TokenAttention, TokenTransformer, restructure, sinusoid_table,
                                                  unfold_size)
from model_helpers import assert_rejects_bad_images


def test_soft_split_hand_case():
    """A 4x4 image 0..15, 3x3 windows, stride 1, padding 1: 16 overlapping tokens of 9 values each."""
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens = SoftSplit(3, 1, 1)(img)
    assert tokens.shape == (1, 16, 9)
    assert tokens[0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]       # top-left: padding on two sides
    assert tokens[0, 5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]      # (1, 1): the full neighbourhood
    assert tokens[0, 15].tolist() == [10, 11, 0, 14, 15, 0, 0, 0, 0]  # bottom-right
    # stride 2: every other window; kernel = stride, no padding: the plain ViT's hard patches
    assert SoftSplit(3, 2, 1)(img)[0, 1].tolist() == [0, 0, 0, 1, 2, 3, 5, 6, 7]
    assert SoftSplit(2, 2, 0)(img)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_grid_sizes_of_the_lesson_and_official_layouts():
    assert unfold_size(28, 7, 2, 3) == 14 and unfold_size(14, 3, 2, 1) == 7 and unfold_size(7, 3, 1, 1) == 7
    m = T2TModule(28, 1, 48, 16, CONFIG["kernels"])
    assert m.grid_sizes == (14, 7, 7) and m.num_patches == 49
    # the official module at 224 px: 56² -> 28² -> 14², token widths 3·49 = 147 and 64·9 = 576
    off = T2TModule(224, 3, 384, 64, OFFICIAL_KERNELS)
    assert off.grid_sizes == (56, 28, 14) and off.num_patches == (224 // 16) ** 2
    assert [a.attn.dim for a in off.attentions] == [147, 576] and off.project.in_features == 576
    # official scale: from the input width (147, 576), not from token_dim 64
    assert [a.attn.scale for a in off.attentions] == [147 ** -0.5, 576 ** -0.5]
    assert T2TModule(64, 3, 32, 8, OFFICIAL_KERNELS)(torch.randn(2, 3, 64, 64)).shape == (2, 16, 32)


def test_restructure_puts_tokens_back_on_their_grid():
    tokens = torch.arange(2 * 9 * 3.0).reshape(2, 9, 3)  # 3x3 grid, 3 channels
    grid = restructure(tokens)
    assert grid.shape == (2, 3, 3, 3)
    assert grid[1, 2, 1, 0].item() == tokens[1, 3, 2].item()  # token (row 1, col 0) = index 3, channel 2
    assert torch.equal(grid.flatten(2).transpose(1, 2), tokens)


def test_token_attention_v_residual_hand_case():
    """Official ``Attention`` of token_transformer.py: x = v + proj(attn @ v), the skip through v (the input
    width 2 is not the output width 1). q = k = 0: uniform attention, so attn @ v = mean(v)."""
    att = TokenAttention(dim=2, in_dim=1)
    with torch.no_grad():
        att.qkv.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))  # q, k = 0; v = x[..., 0]
        att.proj.weight.fill_(2.0)
        att.proj.bias.zero_()
    x = torch.tensor([[[1.0, 5.0], [2.0, 7.0], [6.0, 0.0]]])
    # v = [1, 2, 6], mean 3: out = v + 2 · 3
    assert att(x).flatten().tolist() == [7.0, 8.0, 12.0]


def test_token_attention_scale_comes_from_the_input_width():
    """dim 4 -> in_dim 1: scale 4^-1/2 = 0.5 (the official head_dim = dim // num_heads), not 1^-1/2."""
    att = TokenAttention(dim=4, in_dim=1)
    assert att.scale == 0.5
    with torch.no_grad():  # q = x0, k = x1, v = x2; proj = identity
        att.qkv.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        att.proj.weight.fill_(1.0)
        att.proj.bias.zero_()
    x = torch.tensor([[[2.0, 1.0, 10.0, 0.0], [0.0, 3.0, 20.0, 0.0]]])
    # query 0: logits 0.5 · 2 · [1, 3] = [1, 3]; query 1: q = 0, uniform
    p = 1 / (1 + math.exp(2.0))  # softmax([1, 3])[0]
    expected = [10 + p * 10 + (1 - p) * 20, 20 + 15.0]
    torch.testing.assert_close(att(x).flatten(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_token_transformer_is_attention_then_mlp_residual():
    torch.manual_seed(0)
    tt = TokenTransformer(dim=9, in_dim=4).eval()
    x = torch.randn(2, 5, 9)
    y = tt.attn(tt.norm1(x))  # no residual around the attention: the width changes
    torch.testing.assert_close(tt(x), y + tt.mlp(tt.norm2(y)))
    assert tt.mlp.fc1.out_features == 4  # mlp_ratio 1, as in the official T2T module
    assert tt.attn.qkv.bias is None      # official qkv_bias=False


def test_sinusoid_table_hand_values():
    t = sinusoid_table(3, 4)[0]
    assert t.shape == (3, 4)
    assert t[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    p = 2.0  # angles p / 10000^(2·⌊j/2⌋/4) = [p, p, p/100, p/100]
    torch.testing.assert_close(t[2], torch.tensor([math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)]))


def _vitpytorch():
    return pytest.importorskip("vit_pytorch.t2t")


def test_equal_to_vit_pytorch_restructure_and_soft_split():
    """Between two T2T layers: vit-pytorch's RearrangeImage -> Unfold(3, s2, p1) -> 'b c n -> b n c' equals our
    restructure -> SoftSplit (no weights involved)."""
    t2t = _vitpytorch()
    ref = t2t.T2TViT(image_size=28, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64, channels=1,
                     t2t_layers=((7, 4), (3, 2), (3, 2)))
    rearrange_image, unfold, to_tokens = ref.to_patch_embedding[4:7]
    assert isinstance(unfold, torch.nn.Unfold) and unfold.kernel_size == 3 and unfold.stride == 2
    tokens = torch.randn(2, 49, 49)  # after the first layer: 7² tokens of 1·7² values
    ours = SoftSplit(3, 2, 1)(restructure(tokens))
    torch.testing.assert_close(ours, to_tokens(unfold(rearrange_image(tokens))), atol=0, rtol=0)


def test_equal_to_vit_pytorch_one_split_model():
    """With a single soft split (k4, s4, p2: an overlapping-window patch embedding), vit-pytorch's T2TViT and ours
    have the same layout: Unfold + Linear, CLS + positions, pre-norm blocks without qkv bias, final LayerNorm, CLS
    head. Same weights (their learned positions set to our sinusoid table) -> same logits."""
    t2t = _vitpytorch()
    torch.manual_seed(0)
    ours = T2TViT(img_size=28, in_chans=1, num_classes=10, kernels=((4, 4, 2),), embed_dim=48, depth=2,
                  num_heads=3, mlp_ratio=2.0).eval()
    ref = t2t.T2TViT(image_size=28, num_classes=10, dim=48, depth=2, heads=3, dim_head=16, mlp_dim=96, channels=1,
                     t2t_layers=((4, 4),)).eval()
    sd = ours.state_dict()
    with torch.no_grad():
        ref.to_patch_embedding[4].weight.copy_(sd["tokens_to_token.project.weight"])
        ref.to_patch_embedding[4].bias.copy_(sd["tokens_to_token.project.bias"])
        ref.cls_token.copy_(sd["cls_token"])
        ref.pos_embedding.copy_(sd["pos_embed"])
        for i, (attn, ff) in enumerate(ref.transformer.layers):
            b = f"blocks.{i}."
            attn.norm.weight.copy_(sd[b + "norm1.weight"]); attn.norm.bias.copy_(sd[b + "norm1.bias"])
            attn.to_qkv.weight.copy_(sd[b + "attn.qkv.weight"])
            attn.to_out[0].weight.copy_(sd[b + "attn.proj.weight"]); attn.to_out[0].bias.copy_(sd[b + "attn.proj.bias"])
            ff.net[0].weight.copy_(sd[b + "norm2.weight"]); ff.net[0].bias.copy_(sd[b + "norm2.bias"])
            ff.net[1].weight.copy_(sd[b + "mlp.fc1.weight"]); ff.net[1].bias.copy_(sd[b + "mlp.fc1.bias"])
            ff.net[4].weight.copy_(sd[b + "mlp.fc2.weight"]); ff.net[4].bias.copy_(sd[b + "mlp.fc2.bias"])
        ref.transformer.norm.weight.copy_(sd["norm.weight"]); ref.transformer.norm.bias.copy_(sd["norm.bias"])
        ref.mlp_head.weight.copy_(sd["head.weight"]); ref.mlp_head.bias.copy_(sd["head.bias"])
    x = torch.randn(3, 1, 28, 28)
    assert ours.tokens_to_token.grid_sizes == (8,)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_lesson_config_shapes_params_and_fixed_positions():
    torch.manual_seed(0)
    model = T2TViT(**CONFIG)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, not trained
    vit = VisionTransformer(img_size=28, in_chans=1, num_classes=10, **recipes.BASELINE)
    ratio = recipes.check_matched(model, vit)
    assert 0.85 < ratio < 1.1, ratio
    assert measure.count_params(model) == sum(p.numel() for p in model.parameters())


def test_gradients_reach_the_first_soft_split_layer():
    torch.manual_seed(0)
    model = T2TViT(**CONFIG)
    F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.tokens_to_token.attentions[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_inputs():
    model = T2TViT(**CONFIG)
    assert_rejects_bad_images(model, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="num_heads must be 1"):
        TokenAttention(9, 4, num_heads=3)
    with pytest.raises(ValueError, match=r"kernels\[1\]"):
        T2TModule(28, 1, 32, 16, ((7, 2, 3), (3, 2)))
    with pytest.raises(ValueError, match="padding 3 >= kernel 3"):
        T2TModule(28, 1, 32, 16, ((7, 2, 3), (3, 1, 3)))
    with pytest.raises(ValueError, match="kernels must be a non-empty"):
        T2TModule(28, 1, 32, 16, ())
    with pytest.raises(ValueError, match="num_heads=5 does not divide embed_dim=48"):
        T2TViT(num_heads=5)
    with pytest.raises(ValueError, match="square number"):
        restructure(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match=r"dim=9"):
        TokenAttention(9, 4)(torch.randn(1, 5, 8))
