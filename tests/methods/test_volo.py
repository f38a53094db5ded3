"""VOLO (Yuan et al., TPAMI 2022): outlook attention on hand cases and against a loop-by-loop reading of the official
``OutlookAttention`` (sail-sg/volo models/volo.py), and the whole model against timm's ``VOLO`` (timm/models/volo.py,
a faithful port of the official code) on the same weights."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.volo import VOLO as TimmVOLO

from vitlab import measure
from vitlab.methods.architectures import recipes
from vitlab.methods.architectures import volo as vo
from vitlab.models import VisionTransformer
from vitlab.models.vit import Attention
from model_helpers import assert_rejects_bad_images


def _set_identity(oa: vo.OutlookAttention, dim: int) -> None:
    with torch.no_grad():
        oa.v.weight.copy_(torch.eye(dim))
        oa.proj.weight.copy_(torch.eye(dim))
        oa.proj.bias.zero_()


def _reference(oa: vo.OutlookAttention, x: torch.Tensor) -> torch.Tensor:
    """Outlook attention written window by window from the official definition: for each window centre (i, j) on
    the stride grid, the weights come from the centre's average-pooled token (ceil mode: a partial last pool window
    averages only the pixels inside the map), each of the K² outputs is a softmax-weighted sum of the K² values of
    the window (zero outside the map), and every output is added back at its position."""
    B, H, W, C = x.shape
    K, s, p, nh = oa.kernel_size, oa.stride, oa.padding, oa.num_heads
    dh = C // nh
    v = oa.v(x)
    out = torch.zeros(B, H, W, C)
    for i in range(math.ceil(H / s)):
        for j in range(math.ceil(W / s)):
            pool = x[:, i * s:min(H, i * s + s), j * s:min(W, j * s + s)].mean(dim=(1, 2))  # [B, C]
            a = (oa.attn(pool).reshape(B, nh, K * K, K * K) * dh ** -0.5).softmax(-1)
            pos = [(i * s - p + di, j * s - p + dj) for di in range(K) for dj in range(K)]
            vals = torch.stack([v[:, r, c] if 0 <= r < H and 0 <= c < W else torch.zeros(B, C) for r, c in pos], 1)
            vals = vals.reshape(B, K * K, nh, dh).transpose(1, 2)  # [B, nh, K², dh]
            y = (a @ vals).transpose(1, 2).reshape(B, K * K, C)
            for o, (r, c) in enumerate(pos):
                if 0 <= r < H and 0 <= c < W:
                    out[:, r, c] += y[:, o]
    return oa.proj(out)


@pytest.mark.parametrize("stride, size", [(1, 5), (2, 7), (2, 6), (2, 14)])
def test_outlook_attention_equals_window_by_window_reference(stride, size):
    torch.manual_seed(0)
    oa = vo.OutlookAttention(8, 2, kernel_size=3, padding=1, stride=stride)
    x = torch.randn(2, size, size, 8)
    with torch.no_grad():
        torch.testing.assert_close(oa(x), _reference(oa, x), atol=1e-5, rtol=1e-5)


def _coverage(H: int, W: int, K: int, s: int, p: int) -> torch.Tensor:
    """How many windows (ceil(H/s) x ceil(W/s) of K×K, padding p) cover each position: fold of ones."""
    h, w = math.ceil(H / s), math.ceil(W / s)
    return F.fold(torch.ones(1, K * K, h * w), (H, W), K, padding=p, stride=s)[0, 0]


def test_outlook_attention_hand_case_identity_weights():
    """Attention that puts output o of every window on its own value o (a large bias on the diagonal of each
    K²×K² block), v = proj = identity: each window copies its values, and the fold adds each position's value once
    per window covering it. Stride 1, K 3, 4×4 map: corners are covered by 4 windows, edges by 6, the inside by 9."""
    K, dim = 3, 1
    oa = vo.OutlookAttention(dim, 1, K, 1, 1)
    _set_identity(oa, dim)
    with torch.no_grad():
        oa.attn.weight.zero_()
        oa.attn.bias.copy_(torch.eye(K * K).flatten() * 100.0)
    x = torch.arange(16.0).reshape(1, 4, 4, 1) + 1
    cover = torch.tensor([[4., 6., 6., 4.], [6., 9., 9., 6.], [6., 9., 9., 6.], [4., 6., 6., 4.]])
    torch.testing.assert_close(_coverage(4, 4, K, 1, 1), cover)
    with torch.no_grad():
        torch.testing.assert_close(oa(x)[0, ..., 0], x[0, ..., 0] * cover)
    # stride 2 on 5×5 (3×3 centres at rows/cols 0, 2, 4): the even rows/cols are covered by more windows
    oa2 = vo.OutlookAttention(dim, 1, K, 1, 2)
    _set_identity(oa2, dim)
    oa2.attn.load_state_dict(oa.attn.state_dict())
    x5 = torch.randn(1, 5, 5, 1)
    cover5 = _coverage(5, 5, K, 2, 1)
    # by hand, per axis: position r is covered by the centres c in {0, 2, 4} with |r - c| <= 1:
    # r = 0 -> 1, 1 -> 2, 2 -> 1, 3 -> 2, 4 -> 1 windows; the count on the map is the product of the two axes.
    per_axis = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])
    torch.testing.assert_close(cover5, torch.outer(per_axis, per_axis))
    with torch.no_grad():
        torch.testing.assert_close(oa2(x5)[0, ..., 0], x5[0, ..., 0] * cover5)


def test_outlook_weights_come_from_the_ceil_mode_pooled_centre():
    """Stride 2 on a 7×7 map: 4×4 centres; the last centre's pool window holds one pixel (ceil mode), so its
    weights depend on x[6, 6] alone, averaged over 1 pixel (not 4)."""
    torch.manual_seed(0)
    oa = vo.OutlookAttention(4, 2, 3, 1, 2)
    x = torch.zeros(1, 7, 7, 4)
    x[0, 6, 6] = torch.randn(4)
    w = oa.weights(x)  # [1, heads, 16, 9, 9]
    assert w.shape == (1, 2, 16, 9, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 16, 9))
    expected = (oa.attn(x[0, 6, 6]).reshape(2, 9, 9) * oa.scale).softmax(-1)
    torch.testing.assert_close(w[0, :, 15], expected)


def test_class_block_updates_only_the_cls():
    blk = vo.ClassBlock(8, 2, 2.0)
    x = torch.randn(2, 5, 8)
    y = blk(x)
    torch.testing.assert_close(y[:, 1:], x[:, 1:])
    assert not torch.allclose(y[:, :1], x[:, :1])


def _timm_volo(img_size, patch_size, layers, aux, post):
    n = len(layers)
    return TimmVOLO(layers=list(layers), img_size=img_size, patch_size=patch_size, in_chans=1, num_classes=10,
                    stem_hidden_dim=8, embed_dims=[32] + [64] * (n - 1), num_heads=[1] + [4] * (n - 1),
                    downsamples=(True,) + (False,) * (n - 1), outlook_attention=(True,) + (False,) * (n - 1),
                    mlp_ratio=2.0, post_layers=("ca",) * post, use_aux_head=aux)


@pytest.mark.parametrize("img_size, patch_size, layers, aux, post", [
    (32, 4, (2, 2), False, 2), (64, 8, (1, 1, 1), True, 1), (28, 2, (1, 2), False, 1)])
def test_equals_timm_volo_on_the_same_weights(img_size, patch_size, layers, aux, post):
    """Same config, same weights (batch-norm statistics randomised, eval mode): the same logits. timm only builds
    patch 4/8/16; the lesson's patch 2 (a 1×1 projection after the stride-2 stem, 7×7 positions) is built as
    patch 4 with those two tensors swapped for the patch-2 shapes, which timm's forward accepts as they are."""
    torch.manual_seed(0)
    n = len(layers)
    ref = _timm_volo(img_size, max(patch_size, 4), layers, aux, post)
    if patch_size == 2:
        ref.patch_embed.proj = torch.nn.Conv2d(8, 32, 1, 1)
        ref.pos_embed = torch.nn.Parameter(torch.randn(1, img_size // 4, img_size // 4, 64) * 0.02)
    ours = vo.VOLO(img_size=img_size, in_chans=1, num_classes=10, patch_size=patch_size, stem_hidden_dim=8,
                   layers=layers, embed_dims=(32,) + (64,) * (n - 1), num_heads=(1,) + (4,) * (n - 1), mlp_ratio=2.0,
                   num_post_layers=post, use_aux_head=aux)
    sd = ref.state_dict()
    sd = {k: v + torch.rand_like(v) if k.endswith(("running_mean", "running_var")) else v for k, v in sd.items()}
    ref.load_state_dict(sd)
    assert set(sd) == set(ours.state_dict()), "the key mapping is the identity"
    ours.load_state_dict(sd, strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(3, 1, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_outlook_cost_is_linear_in_tokens_and_mhsa_quadratic():
    """MACs at 8×8, 16×16, 32×32 maps (×4 tokens each): outlook attention ×4 exactly (every term is per token or
    per window); self-attention's N×N scores make its ratio grow past 4."""
    dim = 32
    oa = vo.OutlookAttention(dim, 1, 3, 1, 2)
    mhsa = Attention(dim, 1)
    o = [measure.macs(oa, torch.randn(1, s, s, dim)) for s in (8, 16, 32)]
    m = [measure.macs(mhsa, torch.randn(1, s * s, dim)) for s in (8, 16, 32)]
    assert o[1] == 4 * o[0] and o[2] == 4 * o[1]
    assert m[1] / m[0] > 4.5 and m[2] / m[1] > m[1] / m[0]
    # by hand: v and proj C² MACs per token; per window (L = tokens / 4): the weights C·h·K⁴, a·v h·K²·K²·(C/h)
    n = 16 * 16
    assert o[1] == 2 * n * dim * dim + (n // 4) * (dim * 81 + 81 * dim)


def test_lesson_model_is_registered_and_matched():
    model = vo.VOLO(img_size=28, in_chans=1, num_classes=10, **vo.TINY)
    control = VisionTransformer(img_size=28, in_chans=1, num_classes=10, **recipes.BASELINE)
    assert 0.7 <= recipes.check_matched(model, control) <= 1.3
    assert recipes.registered("volo") == "digits"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.patch_embed(torch.randn(1, 1, 28, 28)).shape == (1, 24, 14, 14)  # the Outlookers' 14×14 map


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch_size=3), "patch_size must be even"),
    (dict(img_size=30, patch_size=2), "img_size / patch_size an even number"),
    (dict(kernel_size=2), "kernel_size must be odd"),
    (dict(layers=(1,), embed_dims=(32,), num_heads=(1,)), "one entry per stage"),
    (dict(num_heads=(5, 4)), "num_heads\\[0\\]=5 does not divide embed_dims\\[0\\]=24"),
    (dict(layers=(1, 1, 1), embed_dims=(24, 64, 48), num_heads=(1, 4, 4)), "share one width"),
    (dict(num_post_layers=0), "num_post_layers"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vo.VOLO(**{**dict(img_size=28, in_chans=1, num_classes=10, **vo.TINY), **kwargs})


def test_bad_input():
    model = vo.VOLO(img_size=28, in_chans=1, num_classes=10, **vo.TINY)
    assert_rejects_bad_images(model, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="x must be \\[B, H, W, 8\\]"):
        vo.OutlookAttention(8, 2)(torch.randn(1, 5, 5, 4))
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=8"):
        vo.OutlookAttention(8, 3)
    with pytest.raises(ValueError, match="windows"):
        vo.OutlookAttention(8, 2, kernel_size=3, padding=0, stride=1)(torch.randn(1, 5, 5, 8))
