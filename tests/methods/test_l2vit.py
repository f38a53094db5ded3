"""L2ViT (official ChuanyangZheng/L2ViT, classification/models/l2vit.py; CURRICULUM.md #32). Not installed: the
tests pin the official kv-first LinearAttention formula on hand-checkable cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.methods.architectures import l2vit as L
from model_helpers import assert_rejects_bad_images


def official_kv_first(q, k, v, temperature):
    """The official forward, written out: relu, denominator clamped at 100, temperature on the kv product."""
    q, k = F.relu(q), F.relu(k)
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    return q @ (k.transpose(-2, -1) @ v * temperature) / denom


def test_linear_attention_is_the_official_kv_first_formula():
    torch.manual_seed(0)
    attn = L.LinearAttention(16, num_heads=2)
    x = torch.randn(3, 10, 16) * 5
    q, k, v = attn.qkv_heads(x)
    want = official_kv_first(q, k, v, attn.temperature).transpose(1, 2).reshape(3, 10, 16)
    torch.testing.assert_close(attn(x), attn.proj(want))


def test_the_clamp_by_hand():
    """One head, d = 1, N = 2: phi(q) = (2, 0), phi(k) = (3, 1), v = (1, 5). kv = 3*1 + 1*5 = 8, sum phi(k) = 4.
    Row 0: 2*8 / max(2*4, 100) = 0.16; row 1: 0 / max(0, 100) = 0. Times tau."""
    q = torch.tensor([2.0, -1.0]).reshape(1, 1, 2, 1)
    k = torch.tensor([3.0, 1.0]).reshape(1, 1, 2, 1)
    v = torch.tensor([1.0, 5.0]).reshape(1, 1, 2, 1)
    tau = torch.tensor(0.5).reshape(1, 1, 1)
    torch.testing.assert_close(official_kv_first(q, k, v, tau).flatten(), torch.tensor([0.08, 0.0]))
    from vitlab.kernels.linear_attention import linear_attention

    torch.testing.assert_close((linear_attention(q, k, v, eps=L.CLAMP) * tau).flatten(), torch.tensor([0.08, 0.0]))


def test_qk_first_map_reproduces_the_output():
    torch.manual_seed(1)
    attn = L.LinearAttention(8, num_heads=2)
    x = torch.randn(2, 12, 8) * 4
    q, k, v = attn.qkv_heads(x)
    out = (attn.attention_map(x) @ v).transpose(1, 2).reshape(2, 12, 8)
    torch.testing.assert_close(attn.proj(out), attn(x), atol=1e-5, rtol=1e-5)


def test_one_window_covering_the_grid_is_global_softmax_attention():
    torch.manual_seed(2)
    lwa = L.LWABlock(8, 2, mlp_ratio=2.0, window_size=4)
    x = torch.randn(2, 16, 8)
    shortcut = lwa.cpe[0](x, (4, 4))
    want = shortcut + lwa.attn(lwa.norm1(shortcut))
    want = lwa.cpe[1](want, (4, 4))
    want = want + lwa.mlp(lwa.norm2(want))
    torch.testing.assert_close(lwa(x, (4, 4)), want)


def test_windows_do_not_mix():
    """With 2x2 windows on a 4x4 grid, changing a token in one window leaves another window's attention output
    unchanged before the CPEs mix neighbours (checked on the attention step alone)."""
    torch.manual_seed(3)
    attn = L.WindowAttention(4, 1)
    windows = torch.randn(4, 4, 4)
    out = attn(windows)
    moved = windows.clone()
    moved[0] += 1.0
    torch.testing.assert_close(attn(moved)[1:], out[1:])


def test_map_entropy_by_hand():
    assert L.map_entropy(torch.ones(1, 4, 4)).item() == pytest.approx(math.log(4))
    assert L.map_entropy(torch.eye(4)[None]).item() == pytest.approx(0.0, abs=1e-6)


def test_variants_and_shapes():
    x = torch.randn(2, 1, 28, 28)
    for variant in L.VARIANTS:
        model = L.L2ViT(variant=variant)
        assert model(x).shape == (2, 10)
    lga = L.L2ViT(variant="l2vit").stages[0][1]
    assert isinstance(lga.attn, L.LinearAttention) and lga.lcm is not None
    assert L.L2ViT(variant="linear").stages[0][1].lcm is None
    assert isinstance(L.L2ViT(variant="softmax").stages[0][1].attn, L.SoftmaxAttention)
    tokens, size = L.L2ViT().forward_tokens(x, stop_at=(1, 1))
    assert size == (7, 7) and tokens.shape == (2, 49, 72)


@pytest.mark.parametrize("call, match", [
    (lambda: L.L2ViT(variant="mamba"), "L2ViT: variant must be one of"),
    (lambda: L.L2ViT(img_size=30), "L2ViT: img_size=30 must be divisible by 4"),
    (lambda: L.L2ViT(dims=(8,), depths=(1,), num_heads=(1,)), "L2ViT: dims, depths and num_heads must each have 2"),
    (lambda: L.L2ViT()(torch.randn(1, 3, 28, 28)), r"L2ViT: x is \(3, 28, 28\); expected \(1, 28, 28\)"),
    (lambda: L.LinearAttention(10, num_heads=3), "LinearAttention: num_heads=3 does not divide dim=10"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bad_images():
    assert_rejects_bad_images(L.L2ViT(), in_chans=1, img_size=28)
