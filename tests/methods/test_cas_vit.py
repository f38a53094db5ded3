"""CAS-ViT: the spatial and channel gates by hand, Phi = C(S(.)), the CATM formula, the block's three residual
branches, linear cost in tokens, and the layout of the official code.

Official reference (not installed, not vendored): `Tianfang-Zhang/CAS-ViT`, `classification/model/rcvit.py`
(`SpatialOperation`, `ChannelOperation`, `AdditiveTokenMixer`, `LocalIntegration`, `Mlp`, `AdditiveBlock`,
`Stage`, `Embedding`, `stem`, `RCViT`). The expected values below are derived by hand from that file: the gates'
layer order, the mixer's `proj(dwc(oper_q(q) + oper_k(k)) * v)`, the block's `x + local(x)`, `x + attn(norm1 x)`,
`x + mlp(norm2 x)`, the state-dict key names, and the parameter counts its MODEL_ZOO.md publishes.
"""
import math

import pytest
import torch

from vitlab import measure
from vitlab.methods.architectures.cas_vit import (TINY, AdditiveBlock, AdditiveTokenMixer, ChannelOperation, RCViT,
                                                  SpatialOperation)
from model_helpers import assert_rejects_bad_images

Z = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]]]])  # [B=1, C=2, H=1, W=2]: channel 0 = (1, -2), channel 1 = (0.5, 3)
sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731


def _identity_dw(conv):
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = 1.0
        conv.bias.zero_()


def _zero(*mods):
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.zero_()


def test_spatial_operation_by_hand():
    """S(z) = z * sigmoid(w . ReLU(BN(DW(z)))): DW = identity, BN at its initial statistics, w = (1, -1)."""
    s = SpatialOperation(2).eval()
    _identity_dw(s.block[0])
    s.block[1].eps = 0.0  # running mean 0, var 1: BN is the identity
    with torch.no_grad():
        s.block[3].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    g0, g1 = sig(1 - 0.5), sig(0 - 3)  # position 0: relu(1) - relu(0.5); position 1: relu(-2) - relu(3)
    expected = torch.tensor([[[[1 * g0, -2 * g1]], [[0.5 * g0, 3 * g1]]]])
    torch.testing.assert_close(s(Z), expected)


def test_channel_operation_by_hand():
    """C(z) = z * sigmoid(W GAP(z)): GAP = (-0.5, 1.75), W = diag(1, -1)."""
    c = ChannelOperation(2)
    with torch.no_grad():
        c.block[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1))
    expected = torch.cat([Z[:, :1] * sig(-0.5), Z[:, 1:] * sig(-1.75)], dim=1)
    torch.testing.assert_close(c(Z), expected)


def test_phi_is_channel_after_spatial():
    """oper_q = Sequential(SpatialOperation, ChannelOperation): Phi(z) = C(S(z)), which is not S(C(z))."""
    torch.manual_seed(0)
    m = AdditiveTokenMixer(4).eval()
    z = torch.randn(2, 4, 5, 5)
    S, C = m.oper_q
    assert isinstance(S, SpatialOperation) and isinstance(C, ChannelOperation)
    with torch.no_grad():
        torch.testing.assert_close(m.oper_q(z), C(S(z)))
        assert not torch.allclose(m.oper_q(z), S(C(z)), atol=1e-4)
        assert not torch.allclose(m.oper_q(z), m.oper_k(z), atol=1e-4)  # separate weights for q and k


def test_catm_formula():
    """CATM(x) = proj(dwc(Phi_q(q) + Phi_k(k)) * v) with q, k, v = chunk(qkv(x), 3); no qkv bias by default."""
    torch.manual_seed(1)
    m = AdditiveTokenMixer(6).eval()
    assert m.qkv.bias is None
    x = torch.randn(2, 6, 4, 3)
    with torch.no_grad():
        qkv = torch.nn.functional.conv2d(x, m.qkv.weight)
        q, k, v = qkv[:, :6], qkv[:, 6:12], qkv[:, 12:]
        expected = m.proj(m.dwc(m.oper_q(q) + m.oper_k(k)) * v)
        torch.testing.assert_close(m(x), expected)
        m.qkv.weight[12:] = 0.0  # v = 0: the similarity is multiplied away, only proj's bias is left
        torch.testing.assert_close(m(x), m.proj.bias.view(1, 6, 1, 1).expand(2, 6, 4, 3))


def test_block_residual_structure():
    """x + local(x) (no pre-norm), then + attn(norm1 x), then + mlp(norm2 x)."""
    torch.manual_seed(2)
    blk = AdditiveBlock(4).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        _zero(blk.local_perception.network[4], blk.attn.proj, blk.mlp.fc2)
        torch.testing.assert_close(blk(x), x)  # every branch's last layer zeroed: the identity
        torch.manual_seed(3)
        blk2 = AdditiveBlock(4).eval()
        _zero(blk2.attn.proj, blk2.mlp.fc2)
        torch.testing.assert_close(blk2(x), x + blk2.local_perception(x))
        blk3 = AdditiveBlock(4).eval()
        y = x + blk3.local_perception(x)
        y = y + blk3.attn(blk3.norm1(y))
        torch.testing.assert_close(blk3(x), y + blk3.mlp(blk3.norm2(y)))


def test_mixer_cost_is_linear_in_tokens():
    """FLOPs = a N + b (b: the channel gate's C x C product on the pooled vector): no N x N term, so the
    increments of N (64 -> 256 -> 1024 tokens, steps x4) give FLOP increments x4 exactly."""
    m = AdditiveTokenMixer(8)
    f = [measure.flops(m, torch.randn(1, 8, s, s)) for s in (8, 16, 32)]
    assert f[2] - f[1] == 4 * (f[1] - f[0]) and f[0] > 0


@pytest.mark.parametrize("name,dims,depths,published", [
    ("xs", [48, 56, 112, 220], [2, 2, 4, 2], 3.20), ("s", [48, 64, 128, 256], [3, 3, 6, 3], 5.76),
    ("m", [64, 96, 192, 384], [3, 3, 6, 3], 12.42)])
def test_official_configs_match_published_parameter_counts(name, dims, depths, published):
    """MODEL_ZOO.md's counts include the distillation head we drop (one more Linear(dims[-1], 1000))."""
    m = RCViT(img_size=224, in_chans=3, num_classes=1000, embed_dims=dims, depths=depths)
    total = measure.count_params(m) + dims[-1] * 1000 + 1000
    assert round(total / 1e6, 2) == published


def test_state_dict_uses_the_official_keys():
    m = RCViT(img_size=224, in_chans=3, num_classes=1000, embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    sd = m.state_dict()
    shapes = {
        "patch_embed.0.weight": (8, 3, 3, 3), "patch_embed.4.running_var": (16,),
        "network.0.0.local_perception.network.1.weight": (16,), "network.0.0.norm1.weight": (16,),
        "network.0.0.attn.qkv.weight": (48, 16, 1, 1), "network.0.0.attn.oper_q.0.block.3.weight": (1, 16, 1, 1),
        "network.0.0.attn.oper_k.1.block.1.weight": (16, 16, 1, 1), "network.0.0.attn.dwc.weight": (16, 1, 3, 3),
        "network.0.0.attn.proj.bias": (16,), "network.0.0.mlp.fc1.weight": (64, 16, 1, 1),
        "network.1.proj.weight": (32, 16, 3, 3), "network.1.norm.running_mean": (32,),
        "network.6.0.mlp.fc2.weight": (128, 512, 1, 1), "norm.weight": (128,), "head.weight": (1000, 128)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "network.0.0.attn.qkv.bias" not in sd and "network.0.0.attn.oper_q.0.block.3.bias" not in sd
    assert not any(k.startswith("dist_head") for k in sd)
    assert len(m.network) == 7  # stage, embedding, stage, embedding, stage, embedding, stage


def test_tiny_shapes_and_maps():
    m = RCViT(**TINY).eval()
    x = torch.randn(3, 1, 28, 28)
    sides = []
    hooks = [layer.register_forward_hook(lambda mod, i, o: sides.append(tuple(o.shape[1:]))) for layer in m.network]
    with torch.no_grad():
        assert m(x).shape == (3, 10)
    for h in hooks:
        h.remove()
    assert sides == [(24, 7, 7), (48, 4, 4), (48, 4, 4), (64, 2, 2), (64, 2, 2)]


def test_bad_input():
    assert_rejects_bad_images(RCViT(**TINY), in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="embed_dims"):
        RCViT(embed_dims=[16, 32], depths=[1])
    with pytest.raises(ValueError, match="img_size"):
        RCViT(img_size=8, embed_dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="dim"):
        AdditiveTokenMixer(0)
    with pytest.raises(ValueError, match=r"x must be a feature map \[B, 4"):
        AdditiveTokenMixer(4)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="mlp_ratio"):
        AdditiveBlock(4, mlp_ratio=0)
