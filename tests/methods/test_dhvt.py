"""DHVT (vitlab.methods.architectures.dhvt): SOPE, DAFF, HI-MHSA head tokens, pinned on hand cases.

No installed reference exists (timm and vit-pytorch have no DHVT). The expected values below follow the official
``ArieSeirack/DHVT`` ``vision_transformer.py`` behaviour, read from its classes:
- ``ConvPatchEmbed`` (SOPE): pre ``Affine`` -> conv3x3 s2 (no bias) + BN -> GELU -> conv3x3 s2 + BN -> post
  ``Affine`` for patch 4; widths D/2, D; no position embedding in ``VisionTransformer(apply_dhvt=True)``;
- ``DAFF``: CLS split off, grid -> conv1 + bn1 + GELU -> (conv2 dw + bn2 + GELU) + shortcut -> conv3 + bn3; the
  CLS token times ``excitation(GELU(compress(avgpool(out))))`` (no sigmoid);
- ``HI_Attention``: per-head channel groups averaged over all N tokens, ``ht_proj`` D/h -> D, reshaped to h
  chunks of D/h for ``ht_norm = LayerNorm(D/h)``, GELU, + ``pos_embed``; MHSA over N + h tokens; after ``proj``
  the head tokens' mean is added to CLS and they are dropped.
Our state-dict keys are the official ones, so an official checkpoint of the same config loads as is.
"""
import math

import pytest
import torch
import torch.nn as nn

from vitlab import measure
from vitlab.methods.architectures import recipes
from vitlab.methods.architectures.dhvt import CONFIG, DAFF, DHVT, SOPE, Affine, DHVTBlock, HIAttention
from vitlab.models import VisionTransformer
from model_helpers import assert_rejects_bad_images


def gelu(v: float) -> float:
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    """Eval-mode BN with running mean 0, var 1 and eps 0: the identity (the hand cases stay exact)."""
    bn.eps = 0.0
    bn.eval()


def test_affine_is_per_channel_scale_and_shift():
    a = Affine(2)
    with torch.no_grad():
        a.alpha.copy_(torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1))
        a.beta.copy_(torch.tensor([1.0, 0.5]).reshape(1, 2, 1, 1))
    x = torch.ones(1, 2, 1, 1)
    assert a(x).flatten().tolist() == [3.0, -0.5]
    assert Affine(3)(torch.randn(1, 3, 2, 2)).shape == (1, 3, 2, 2)


def test_sope_hand_case():
    """Patch 4, 1 channel, D = 2: both convs are centre taps (stride 2 picks pixel (2i, 2j)), BN the identity.
    Token (i, j) = post_affine([1, -1] · GELU(pre_affine(x)[4i, 4j]))."""
    sope = SOPE(img_size=8, patch_size=4, in_chans=1, embed_dim=2).eval()
    conv1, bn1 = sope.proj[0]
    conv2, bn2 = sope.proj[2]
    assert isinstance(sope.proj[1], nn.GELU) and len(sope.proj) == 3  # conv-BN, GELU, conv-BN: no GELU after
    assert conv1.bias is None and (conv1.out_channels, conv2.out_channels) == (1, 2)  # widths D/2, D
    with torch.no_grad():
        sope.pre_affine.alpha.fill_(2.0); sope.pre_affine.beta.fill_(1.0)
        conv1.weight.zero_(); conv1.weight[0, 0, 1, 1] = 1.0
        conv2.weight.zero_(); conv2.weight[0, 0, 1, 1] = 1.0; conv2.weight[1, 0, 1, 1] = -1.0
        sope.post_affine.alpha.copy_(torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1))
        sope.post_affine.beta.copy_(torch.tensor([0.0, 0.5]).reshape(1, 2, 1, 1))
    _identity_bn(bn1); _identity_bn(bn2)
    x = torch.arange(64.0).reshape(1, 1, 8, 8) / 64
    out = sope(x)
    assert out.shape == (1, 4, 2)
    for t, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        g = gelu(2 * x[0, 0, 4 * i, 4 * j].item() + 1)
        torch.testing.assert_close(out[0, t], torch.tensor([g, -3 * g + 0.5]))


def test_sope_layouts_of_the_official_patch_sizes():
    assert [m[0].out_channels for m in SOPE(32, 16, 3, 64).proj if isinstance(m, nn.Sequential)] == [8, 16, 32, 64]
    p2 = SOPE(32, 2, 3, 64).proj
    assert len(p2) == 2 and isinstance(p2[1], nn.GELU)  # the official patch-2 stem ends with a GELU
    assert SOPE(28, 4, 1, 64)(torch.randn(2, 1, 28, 28)).shape == (2, 49, 64)


def test_head_tokens_hand_case_chunkwise_layernorm():
    """D = 4, h = 2. Group means over all tokens (CLS included), ht_proj D/h -> D, then LayerNorm over each
    chunk of D/h = 2 channels (official reshape to [B, h, h, D/h]), GELU, + head positions."""
    att = HIAttention(dim=4, num_heads=2)
    with torch.no_grad():
        # ht_proj: [g0, g1] -> [g0, 3·g0, 0, 4·g1]
        att.ht_proj.weight.copy_(torch.tensor([[1.0, 0], [3.0, 0], [0, 0], [0, 4.0]]))
        att.ht_proj.bias.zero_()
        att.pos_embed.copy_(torch.tensor([[[0.0, 0, 0, 0], [1.0, 1, 1, 1]]]))
    att.ht_norm.eps = 0.0
    x = torch.tensor([[[1.0, 3.0, 2.0, 2.0], [3.0, 5.0, 0.0, 0.0]]])  # 2 tokens
    # group means: head 0 = mean of channels 0-1 over tokens = [2, 4]; head 1 = channels 2-3 = [1, 1]
    # head token 0 from g = [2, 4]: [2, 6, 0, 16] -> chunks [2, 6] -> [-1, 1], [0, 16] -> [-1, 1]
    # head token 1 from g = [1, 1]: [1, 3, 0, 4]  -> the same normalised chunks, then + 1
    a, b = gelu(-1.0), gelu(1.0)
    expected = torch.tensor([[[a, b, a, b], [a + 1, b + 1, a + 1, b + 1]]])
    torch.testing.assert_close(att.head_tokens(x), expected)
    # a LayerNorm over the whole head token (not per chunk) would give other values
    whole = torch.nn.functional.layer_norm(torch.tensor([2.0, 6.0, 0.0, 16.0]), (4,))
    assert not torch.allclose(whole[:2], torch.tensor([-1.0, 1.0]), atol=0.1)


def test_hi_attention_merges_head_tokens_into_cls_and_drops_them():
    """qkv = 0: every attention output is 0, so every token leaves proj as its bias b. The CLS token gets
    b + mean(head tokens) = 2b, the patches b, and the h head tokens are gone."""
    att = HIAttention(dim=4, num_heads=2)
    b = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with torch.no_grad():
        att.qkv.weight.zero_(); att.qkv.bias.zero_()
        att.proj.bias.copy_(b)
    out = att(torch.randn(3, 5, 4))  # CLS + 2x2 grid
    assert out.shape == (3, 5, 4)
    torch.testing.assert_close(out[:, 0], (2 * b).expand(3, 4))
    torch.testing.assert_close(out[:, 1:], b.expand(3, 4, 4))


def test_hi_attention_is_mhsa_over_tokens_and_head_tokens():
    """The patch outputs are those of plain MHSA (same qkv / proj) over [x; head tokens]."""
    torch.manual_seed(0)
    att = HIAttention(dim=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    xx = torch.cat([x, att.head_tokens(x)], dim=1)
    q, k, v = att.qkv(xx).reshape(2, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)
    o = att.proj(((q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 8))
    out = att(x)
    torch.testing.assert_close(out[:, 1:], o[:, 1:5])
    torch.testing.assert_close(out[:, :1], o[:, :1] + o[:, 5:].mean(dim=1, keepdim=True))


def test_daff_cls_path_hand_case():
    """The CLS token bypasses the convs and is rescaled by SE weights from the pooled output (no sigmoid).
    conv3 = 0 and bn3's bias [1, 2, 3, 4]: every patch output is [1, 2, 3, 4], so is the pooled vector;
    compress = 0.1·sum -> 1, GELU(1); excitation [1, 2, 3, 4]·GELU(1)."""
    daff = DAFF(4, 4).eval()
    with torch.no_grad():
        daff.conv3.weight.zero_(); daff.conv3.bias.zero_()
        daff.bn3.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        daff.compress.weight.fill_(0.1); daff.compress.bias.zero_()
        daff.excitation.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]])); daff.excitation.bias.zero_()
    _identity_bn(daff.bn3)
    x = torch.randn(1, 5, 4)
    x[0, 0] = torch.tensor([1.0, -1.0, 2.0, 0.5])
    out = daff(x)
    w = gelu(1.0) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, -1.0, 2.0, 0.5]) * w)
    torch.testing.assert_close(out[0, 1:], torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(4, 4))


def test_daff_patch_path_hand_case():
    """Identity 1x1 convs, a centre-tap depthwise conv, identity BNs: y = h + GELU(h) with h = GELU(x),
    element by element on the grid (the depthwise branch has a residual around it)."""
    daff = DAFF(4, 4).eval()
    with torch.no_grad():
        for conv in (daff.conv1, daff.conv3):
            conv.weight.copy_(torch.eye(4)[:, :, None, None]); conv.bias.zero_()
        daff.conv2.weight.zero_(); daff.conv2.weight[:, 0, 1, 1] = 1.0; daff.conv2.bias.zero_()
    for bn in (daff.bn1, daff.bn2, daff.bn3):
        _identity_bn(bn)
    x = torch.randn(2, 10, 4)  # CLS + 3x3
    h = torch.nn.functional.gelu(x[:, 1:])
    torch.testing.assert_close(daff(x)[:, 1:], h + torch.nn.functional.gelu(h))
    assert daff.conv2.groups == 4 and daff.compress.out_features == 1  # depthwise; SE reduction 4


def test_block_and_model_follow_the_official_layout():
    torch.manual_seed(0)
    blk = DHVTBlock(8, 2, mlp_ratio=2.0).eval()
    x = torch.randn(2, 5, 8)
    y = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2(y)))
    model = DHVT(img_size=32, in_chans=3, num_classes=10, patch_size=4, embed_dim=64, depth=1, num_heads=4,
                 mlp_ratio=4.0)
    assert not any("pos_embed" in k and not k.startswith("blocks") for k in model.state_dict())  # no abs. pos
    official_keys = {  # VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, apply_dhvt=True)
        "cls_token", "patch_embed.pre_affine.alpha", "patch_embed.pre_affine.beta", "patch_embed.post_affine.alpha",
        "patch_embed.post_affine.beta", "patch_embed.proj.0.0.weight", "patch_embed.proj.2.0.weight",
        "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.attn.ht_proj.weight",
        "blocks.0.attn.ht_proj.bias", "blocks.0.attn.ht_norm.weight", "blocks.0.attn.ht_norm.bias",
        "blocks.0.attn.pos_embed", "blocks.0.norm2.weight", "blocks.0.norm2.bias", "norm.weight", "norm.bias",
        "head.weight", "head.bias"}
    official_keys |= {f"patch_embed.proj.{i}.1.{n}" for i in (0, 2)
                      for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    official_keys |= {f"blocks.0.mlp.{m}.{n}" for m in ("conv1", "conv2", "conv3", "compress", "excitation")
                      for n in ("weight", "bias")}
    official_keys |= {f"blocks.0.mlp.bn{i}.{n}" for i in (1, 2, 3)
                      for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(model.state_dict()) == official_keys
    # parameters of that official config, layer by layer: stem 864+64 + 18432+128 + 6+128; CLS 64;
    # block: LNs 256, qkv 12480, proj 4160, ht_proj 1088, ht_norm 32, head pos 256, DAFF 16640+2560+16448+1152
    # +1040+1088; final norm 128; head 650
    assert measure.count_params(model) == 19622 + 64 + 57200 + 128 + 650
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lesson_config_is_matched_to_the_control():
    torch.manual_seed(0)
    model = DHVT(**CONFIG)
    vit = VisionTransformer(img_size=28, in_chans=1, num_classes=10, **recipes.BASELINE)
    assert 1.0 < recipes.check_matched(model, vit) < 1.3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_inputs():
    model = DHVT(**CONFIG)
    assert_rejects_bad_images(model, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="patch_size must be a power of 2"):
        SOPE(24, 3, 1, 64)
    with pytest.raises(ValueError, match="patch_size=8 does not divide img_size=28"):
        SOPE(28, 8, 1, 64)
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=64"):
        HIAttention(64, 3)
    with pytest.raises(ValueError, match="square grid"):
        DAFF(8)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DAFF(8, kernel_size=2)
    with pytest.raises(ValueError, match=r"dim=8"):
        HIAttention(8, 2)(torch.randn(1, 5, 4))
