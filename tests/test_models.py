"""The course ViT is timm's ViT (same keys, same logits) plus attention side outputs."""
import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitlab.models import (MODELS, CrossAttention, PatchEmbed, VisionTransformer, WindowAttention, create_model,
                           window_partition, window_reverse)

TINY = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=3, num_heads=3, mlp_ratio=2.0)


@pytest.mark.parametrize("extra", [{}, {"global_pool": "avg"}, {"reg_tokens": 2}, {"qk_norm": True}])
def test_timm_state_dict_loads_and_gives_the_same_logits(extra):
    torch.manual_seed(0)
    timm_vit = TimmViT(**TINY, **extra).eval()
    ours = VisionTransformer(**TINY, **extra).eval()
    assert set(ours.state_dict()) == set(timm_vit.state_dict())
    ours.load_state_dict(timm_vit.state_dict())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert (ours(x) - timm_vit(x)).abs().max() <= 1e-5
        # and the other way round: our weights load into timm
        timm_vit.load_state_dict(VisionTransformer(**TINY, **extra).state_dict())


def test_layernorm_eps_is_timms():
    m = create_model("vit_nano")
    assert all(n.eps == 1e-6 for n in m.modules() if isinstance(n, torch.nn.LayerNorm))


def test_side_outputs_equal_the_full_probability_matrix():
    torch.manual_seed(0)
    m = create_model("vit_nano").eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits, sides = m.forward_with_attention(x, side=("probs", "cls", "colsum", "diag"))
        _, cls_only = m.forward_with_attention(x, side=("cls",))  # the O(N) fast path
        assert torch.allclose(logits, m(x), atol=1e-6)  # asking for side outputs changes nothing
    for s, fast in zip(sides, cls_only):
        p = s["probs"]  # [B, H, N, N]
        assert p.shape == (3, 4, 50, 50)
        assert torch.allclose(p.sum(-1), torch.ones(3, 4, 50), atol=1e-5)
        assert torch.allclose(s["cls"], p[:, :, 0, :])
        assert torch.allclose(fast["cls"], p[:, :, 0, :], atol=1e-6)
        assert torch.allclose(s["colsum"], p.sum(dim=2), atol=1e-5)
        assert torch.allclose(s["diag"], torch.diagonal(p, dim1=-2, dim2=-1))


def test_hand_checkable_attention_uniform_when_keys_equal():
    """If every token is identical, every query attends uniformly: p = 1/N everywhere."""
    m = create_model("vit_nano").eval()
    attn = m.blocks[0].attn
    x = torch.ones(1, 5, 64)
    _, s = attn(x, side=("probs",))
    assert torch.allclose(s["probs"], torch.full((1, 4, 5, 5), 0.2), atol=1e-6)


def test_registry_and_overrides():
    assert {"vit_nano", "vit_tiny", "vit_small", "vit_s16"} <= set(MODELS)
    m = create_model("vit_tiny", img_size=32, in_chans=3, num_classes=7)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert m.patch_embed.num_patches == 64


def test_create_model_takes_shapes_from_a_dataset():
    class FakeData:
        img_size, in_chans, num_classes = 8, 1, 10
    m = create_model("vit_nano", data=FakeData())
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_cross_attention_shapes_and_one_query():
    torch.manual_seed(0)
    ca = CrossAttention(32, num_heads=4, context_dim=48).eval()
    x, ctx = torch.rand(2, 1, 32), torch.rand(2, 9, 48)
    out, probs = ca(x, ctx, return_probs=True)
    assert out.shape == (2, 1, 32) and probs.shape == (2, 4, 1, 9)
    assert torch.allclose(out, ca(x, ctx), atol=1e-6)


def test_window_partition_roundtrip():
    x = torch.rand(2, 8, 8, 5)
    w = window_partition(x, 4)
    assert w.shape == (8, 16, 5)
    assert torch.equal(window_reverse(w, 4, 8, 8), x)
    assert torch.equal(w[0], x[0, :4, :4].reshape(16, 5))


def test_window_attention_matches_timm_swin():
    torch.manual_seed(0)
    ours = WindowAttention(32, num_heads=4, window_size=4).eval()
    ref = TimmWindowAttention(32, num_heads=4, window_size=4).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("relative_position_index" in k for k in missing)
    x = torch.rand(6, 16, 32)
    mask = torch.zeros(3, 16, 16)
    mask[1, :8, 8:] = -100.0  # a shifted-window style mask for one window
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
        assert torch.allclose(ours(x, mask), ref(x, mask), atol=1e-6)


def test_patch_embed_counts_tokens():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    assert pe(torch.rand(2, 3, 32, 32)).shape == (2, 16, 16)


def test_attention_is_its_three_shared_steps():
    """qkv_heads -> logits -> softmax -> merge_heads is exactly forward (the steps method variants reuse)."""
    import torch

    from vitlab.models import Attention

    torch.manual_seed(0)
    attn = Attention(16, num_heads=4).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv_heads(x)
    assert q.shape == k.shape == v.shape == (2, 4, 5, 4)
    logits = attn.logits(q, k)
    hand = (q[0, 1, 2] * 4 ** -0.5) @ k[0, 1, 3]  # one score by hand: q·k / sqrt(Dh)
    assert torch.allclose(logits[0, 1, 2, 3], hand, atol=1e-6)
    out = attn.merge_heads(logits.softmax(-1) @ v)
    assert torch.allclose(out, attn(x), atol=1e-6)


def test_init_linear_is_timms_vit_init_in_module_order():
    from timm.layers import trunc_normal_

    from vitlab.models import init_linear_

    def net():
        return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Sequential(nn.Linear(256, 32, bias=False)))

    torch.manual_seed(0)
    a = net()
    init_linear_(a)
    torch.manual_seed(0)
    b = net()
    for m in (b[0], b[2][0]):  # the same draws, in the same order, as a hand-written loop
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(a[0].bias, torch.zeros(256)) and torch.equal(a[1].weight, torch.ones(256))
    assert abs(a[0].weight.std().item() - 0.02) < 0.002
