"""Gaussian-mixture mask attention (official CatworldLee/Gaussian-Mixture-Mask-Attention, models/gmm.py and
models/vit.py; CURRICULUM.md #49). Not installed: hand-checked cases of the official formulas."""
import math

import pytest
import torch

from vitlab.methods.architectures import gmm_attention as G
from vitlab.models import create_model


def test_distance_mask_by_hand():
    """Grid 2x2 in raster order: neighbours at distance 1 -> exp(-1/2), the diagonal at sqrt(2) -> exp(-1)."""
    D = G.distance_mask(2)
    torch.testing.assert_close(D[0], torch.tensor([1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-1.0)]))
    torch.testing.assert_close(D, D.T)


def test_mixture_mask_by_hand():
    """K = 2 kernels, 1 head: alpha = (1, 2), sigma = (1, 2). At distance 1:
    M = 1 * exp(-1/2)^(1/(1 + 1e-5)) + 2 * exp(-1/2)^(1/(4 + 1e-5))."""
    m = G.GaussianMixtureMask(num_heads=1, num_kernels=2, grid=2)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
        m.sigma.copy_(torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1))
    want = math.exp(-0.5) ** (1 / (1 + 1e-5)) + 2 * math.exp(-0.5) ** (1 / (4 + 1e-5))
    assert m.mask()[0, 0, 1].item() == pytest.approx(want, rel=1e-6)
    assert m.mask()[0, 0, 0].item() == pytest.approx(3.0)  # D = 1 on the diagonal: sum of alphas
    dots = torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(m(dots), m.mask().expand(1, 1, 4, 4))  # multiplied into the logits


def test_masked_attention_is_the_official_forward():
    torch.manual_seed(0)
    attn = G.MaskedAttention(16, 2, grid=3, mask="gmm", num_kernels=3)
    x = torch.randn(2, 9, 16)
    q, k, v = attn.qkv_heads(x)
    dots = q @ k.transpose(-2, -1) * (8 ** -0.5)
    want = (attn.mask.mask() * dots).softmax(-1) @ v  # official: dots = M * dots; softmax; @ v
    torch.testing.assert_close(attn(x), attn.merge_heads(want))


def test_elm_starts_uniform_and_none_is_plain_attention():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8)
    elm = G.MaskedAttention(8, 2, grid=2, mask="elm")
    _, _, v = elm.qkv_heads(x)
    torch.testing.assert_close(elm(x), elm.merge_heads(v.mean(dim=2, keepdim=True).expand_as(v)))
    plain = G.MaskedAttention(8, 2, grid=2, mask="none")
    q, k, v = plain.qkv_heads(x)
    torch.testing.assert_close(plain(x), plain.merge_heads((plain.logits(q, k).softmax(-1)) @ v))


def test_bias_variant_adds_the_kernel_mixture():
    torch.manual_seed(2)
    attn = G.MaskedAttention(32, 2, grid=3, mask="bias", num_kernels=2)  # the kernel takes head dims 16..128
    x = torch.randn(1, 9, 32)
    q, k, v = attn.qkv_heads(x)
    bias = attn.locality()  # [H, N, N], log-mixture: 0 on the diagonal, negative elsewhere
    assert torch.allclose(bias.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 9), atol=1e-6) and (bias <= 1e-6).all()
    want = (attn.logits(q, k) + bias).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.merge_heads(want))


def test_gmm_vit_layout_and_parameter_cost():
    """No CLS, mean pooling; the mask costs 2 K H parameters per layer (+160 for 4 layers, 4 heads, K = 5), and
    dropping the CLS token and its position saves 2 x 64."""
    vit = create_model("ch1_vit")
    gmm = create_model("ch1_gmm_vit")
    assert gmm.cls_token is None and gmm.global_pool == "avg"
    extra = sum(p.numel() for p in gmm.parameters()) - sum(p.numel() for p in vit.parameters())
    assert extra == 4 * 2 * 5 * 4 - 2 * 64
    assert gmm(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("call, match", [
    (lambda: G.MaskedAttention(8, 2, grid=2, mask="alibi"), "MaskedAttention: mask must be one of"),
    (lambda: G.MaskedAttention(8, 2, grid=2)(torch.randn(1, 5, 8)), "MaskedAttention: 5 tokens; expected grid"),
    (lambda: G.gmm_vit(patch_size=5), "gmm_vit: patch_size=5 does not divide img_size=28"),
    (lambda: G.distance_mask(0), "distance_mask: grid must be"),
    (lambda: G.MaskedAttention(8, 2, grid=2, mask="bias"), "mask='bias' runs through vitlab.kernels.attention"),
    (lambda: G.MaskedAttention(8, 2, grid=2, mask="none").locality(), "mask='none' has no locality mask"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
