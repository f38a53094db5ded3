"""vitlab.mae: patch order and round trips (2-D, 3-D), sin-cos tables by hand (and timm's up to a channel
permutation), MAE masking with fixed noise, a loss on removed patches only, norm-pix targets by hand, an encoder
that sees 1 + len_keep tokens, the encoder as a VisionTransformer, bad input."""
import math

import pytest
import torch
import torch.nn as nn

from vitlab.mae import (MaskedAutoencoder, patchify, patchify3d, random_masking, sincos_pos_embed_2d,
                        sincos_pos_embed_3d, unpatchify, unpatchify3d)
from vitlab.models import VisionTransformer

S1, C1 = math.sin(1.0), math.cos(1.0)  # 0.841471, 0.540302


def tiny_mae(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, decoder_dim=8,
               decoder_depth=1, decoder_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    return MaskedAutoencoder(**cfg)


# ------------------------------------------------------------------------------------------------ patches
def test_patchify_hand_order():
    """x[c, i, j] = 100c + 10i + j, p = 2: a patch lists (row, col, channel), patches row-major."""
    c, i, j = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    x = (100 * c + 10 * i + j).float()[None]  # [1, 2, 4, 4]
    t = patchify(x, 2)
    assert t.shape == (1, 4, 8)
    # patch 1 = grid (row 0, col 1): pixels (0,2) (0,3) (1,2) (1,3), each channel 0 then 1
    assert t[0, 1].tolist() == [2, 102, 3, 103, 12, 112, 13, 113]
    # patch 2 = grid (row 1, col 0): pixels (2,0) (2,1) (3,0) (3,1)
    assert t[0, 2].tolist() == [20, 120, 21, 121, 30, 130, 31, 131]
    torch.testing.assert_close(unpatchify(t, 2), x)


def test_patchify_round_trips_and_rectangles():
    x = torch.randn(2, 3, 6, 4)
    t = patchify(x, 2)
    assert t.shape == (2, 6, 12)
    torch.testing.assert_close(unpatchify(t, 2, grid=(3, 2)), x)
    v = torch.randn(2, 2, 4, 2, 6)
    t3 = patchify3d(v, 2)
    assert t3.shape == (2, 2 * 1 * 3, 16)
    torch.testing.assert_close(unpatchify3d(t3, 2, grid=(2, 1, 3)), v)
    cube = torch.randn(1, 1, 4, 4, 4)
    torch.testing.assert_close(unpatchify3d(patchify3d(cube, 2), 2), cube)  # default grid: a cube


def test_patchify3d_hand_order():
    """x[d, h, w] = 100d + 10h + w on a 2x2x4 volume, p = 2: patch 1 covers w = 2, 3; values (d, h, w) order."""
    d, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(4), indexing="ij")
    x = (100 * d + 10 * h + w).float()[None, None]
    t = patchify3d(x, 2)
    assert t.shape == (1, 2, 8)
    assert t[0, 1].tolist() == [2, 3, 12, 13, 102, 103, 112, 113]


@pytest.mark.parametrize("three_d", [False, True])
def test_patch_order_is_the_conv_patch_embeddings(three_d):
    """A strided conv whose output channel k reads the k-th value of our patch layout gives patchify's tokens
    in the same token order: patchify is the patch embedding with one-hot weights (Conv2d / Conv3d + flatten)."""
    C, p = 2, 2
    k = p ** (3 if three_d else 2) * C
    x = torch.randn(2, C, 4, 4, 6) if three_d else torch.randn(2, C, 4, 6)
    conv = (nn.Conv3d if three_d else nn.Conv2d)(C, k, kernel_size=p, stride=p, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        shape = conv.weight.shape[2:]
        for out in range(k):  # out = ((depth·p + row)·p + col)·C + channel
            pos, ch = divmod(out, C)
            idx = torch.unravel_index(torch.tensor(pos), tuple(shape))
            conv.weight[(out, ch) + tuple(int(i) for i in idx)] = 1.0
    tokens = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, patchify3d(x, p) if three_d else patchify(x, p))


# ------------------------------------------------------------------------------------ sin-cos positions
def test_sincos_2d_by_hand():
    # dim 4: one frequency per axis, ω = 1/10000^0 = 1; channels [sin w, cos w, sin h, cos h] (w first, as MAE)
    # 1x2 grid: token 0 = (h0, w0) → [0, 1, 0, 1]; token 1 = (h0, w1) → [sin 1, cos 1, 0, 1]
    torch.testing.assert_close(sincos_pos_embed_2d(1, 2, 4), torch.tensor([[0, 1, 0, 1], [S1, C1, 0, 1]]))
    # 2x1 grid: token 1 = (h1, w0) → the second half moves
    torch.testing.assert_close(sincos_pos_embed_2d(2, 1, 4), torch.tensor([[0, 1, 0, 1], [0, 1, S1, C1]]))
    # dim 8: two frequencies per axis, ω = 1/10000^(i/2) = (1, 0.01); w = 1 → [sin 1, sin .01, cos 1, cos .01]
    s, c = math.sin(0.01), math.cos(0.01)
    torch.testing.assert_close(sincos_pos_embed_2d(1, 2, 8, cls_token=True),
                               torch.tensor([[0.0] * 8, [0, 0, 1, 1, 0, 0, 1, 1], [S1, s, C1, c, 0, 0, 1, 1]]))


def test_sincos_2d_matches_maes_numpy_formula():
    """A transcription of MAE's get_2d_sincos_pos_embed (NumPy, float32) on a 3x3 grid, dim 16."""
    import numpy as np

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(3, dtype=np.float32), np.arange(3, dtype=np.float32)), axis=0)
    ref = np.concatenate([one_d(8, g[0]), one_d(8, g[1])], axis=1)
    torch.testing.assert_close(sincos_pos_embed_2d(3, 3, 16), torch.from_numpy(ref).float())


def test_sincos_2d_is_timms_up_to_a_channel_permutation():
    """timm's build_sincos2d_pos_embed((h, w), dim): same tokens (row-major), same frequencies
    (1/T^(i/(dim/4))), quarters [sin h, sin w, cos h, cos w]; ours (MAE) [sin w, cos w, sin h, cos h].
    (vitlab.methods.efficient.lookupvit.sincos_2d, lucidrains' layout, divides by dim/4 − 1: other frequencies.)"""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    h, w, dim = 3, 5, 24
    q = dim // 4
    t = build_sincos2d_pos_embed([h, w], dim)
    sin_h, sin_w, cos_h, cos_w = t.split(q, dim=1)
    torch.testing.assert_close(sincos_pos_embed_2d(h, w, dim), torch.cat([sin_w, cos_w, sin_h, cos_h], dim=1))


def test_sincos_3d_by_hand():
    # dim 6: one frequency per axis (ω = 1); parts [sin d, cos d, sin h, cos h, sin w, cos w], tokens (d, h, w)
    torch.testing.assert_close(sincos_pos_embed_3d(2, 1, 1, 6), torch.tensor([[0, 1, 0, 1, 0, 1],
                                                                             [S1, C1, 0, 1, 0, 1]]))
    torch.testing.assert_close(sincos_pos_embed_3d(1, 1, 2, 6), torch.tensor([[0, 1, 0, 1, 0, 1],
                                                                             [0, 1, 0, 1, S1, C1]]))
    e = sincos_pos_embed_3d(2, 3, 4, 12, cls_token=True)
    assert e.shape == (1 + 24, 12) and not e[0].any()
    # token (d=1, h=2, w=3) = 1·12 + 2·4 + 3 = 23 (+1 for the CLS row); ω = (1, 0.01) per axis
    om = torch.tensor([1.0, 0.01])
    want = torch.cat([torch.cat([(v * om).sin(), (v * om).cos()]) for v in (1.0, 2.0, 3.0)])
    torch.testing.assert_close(e[24], want)


# ------------------------------------------------------------------------------------------------ masking
def test_random_masking_fixed_noise():
    x = torch.arange(5.0).reshape(1, 5, 1)
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]])
    kept, mask, ids_restore = random_masking(x, 0.6, noise=noise)  # len_keep = int(5 · 0.4) = 2
    # argsort(noise) = [1, 3, 0, 4, 2]: keep tokens 1 and 3 (smallest noise first)
    assert kept.flatten().tolist() == [1.0, 3.0]
    assert mask.tolist() == [[1, 0, 1, 0, 1]]
    assert ids_restore.tolist() == [[2, 0, 4, 1, 3]]  # argsort of [1, 3, 0, 4, 2]
    shuffled = torch.tensor([[1.0, 3.0, 0.0, 4.0, 2.0]])[..., None]  # kept, then removed
    torch.testing.assert_close(torch.gather(shuffled, 1, ids_restore[..., None]), x)


def test_random_masking_rng():
    x = torch.randn(3, 16, 4)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _, m1, r1 = random_masking(x, 0.75, generator=g1)
    _, m2, r2 = random_masking(x, 0.75, generator=g2)
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    assert (m1.sum(1) == 12).all()
    # no generator: one torch.rand(B, N) from the global RNG, as the official code
    torch.manual_seed(5)
    _, m3, _ = random_masking(x, 0.75)
    torch.manual_seed(5)
    noise = torch.rand(3, 16)
    _, m4, _ = random_masking(x, 0.75, noise=noise)
    assert torch.equal(m3, m4)
    # a kept token is the token at that position
    kept, mask, ids = random_masking(x, 0.5, noise=noise)
    keep_ids = torch.argsort(noise, 1)[:, :8]
    torch.testing.assert_close(kept, torch.gather(x, 1, keep_ids[..., None].expand(-1, -1, 4)))
    assert torch.equal(mask.gather(1, keep_ids), torch.zeros(3, 8))


# --------------------------------------------------------------------------------------------------- model
def test_loss_counts_removed_patches_only():
    m = tiny_mae()
    x = torch.rand(2, 3, 8, 8)
    target = patchify(x, 2)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    pred = target + 5.0 * (1 - mask)[..., None]  # exact on removed patches, far off on visible ones
    assert m.forward_loss(x, pred, mask).item() == 0.0
    pred = target + 1.0 * mask[..., None] + 5.0 * (1 - mask)[..., None]  # off by 1 on removed patches
    torch.testing.assert_close(m.forward_loss(x, pred, mask), torch.tensor(1.0))
    # the full forward: its loss is the mean squared error on its own removed patches
    loss, pred, mask = m(x, 0.75, generator=torch.Generator().manual_seed(0))
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    assert m.forward_loss(x, pred, torch.zeros(2, 16)).item() == 0.0  # nothing removed: 0, not 0/0


def test_norm_pix_target_by_hand():
    m = tiny_mae(in_chans=1, norm_pix_loss=True)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # patch 0 = [1, 2, 3, 4]
    # mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3 → (v − 2.5) / √(5/3 + 1e-6)
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3 + 1e-6)
    t = m.target(x)
    torch.testing.assert_close(t[0, 0], want)
    torch.testing.assert_close(t[0, 1], torch.zeros(4))  # a constant patch → 0 (the 1e-6 keeps it finite)
    # reconstruct maps the normalised prediction back to pixels: pred = target gives the image back
    mask = torch.ones(1, 16)
    torch.testing.assert_close(m.reconstruct(x, t, mask), x)


def test_encoder_sees_only_visible_tokens():
    m = tiny_mae()
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(enc=tuple(args[0].shape)))
    m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(dec=tuple(args[0].shape)))
    loss, pred, mask = m(torch.rand(2, 3, 8, 8), mask_ratio=0.75)
    assert seen["enc"] == (2, 1 + 4, 16)  # N = 16 patches, len_keep = 4, plus CLS
    assert seen["dec"] == (2, 1 + 16, 8)  # the decoder sees every position
    assert pred.shape == (2, 16, 12) and mask.shape == (2, 16)
    assert (mask.sum(1) == 12).all()
    loss.backward()
    names = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"patch_embed.proj.weight", "cls_token", "mask_token", "decoder_pred.weight",
            "blocks.0.attn.qkv.weight"} <= names
    assert "pos_embed" not in dict(m.named_parameters()) and "pos_embed" in m.state_dict()  # a fixed buffer


def test_fixed_positions_and_init():
    m = tiny_mae()
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_2d(4, 4, 16, cls_token=True))
    torch.testing.assert_close(m.decoder_pos_embed[0], sincos_pos_embed_2d(4, 4, 8, cls_token=True))
    bound = math.sqrt(6 / (16 + 48))  # xavier-uniform bound of qkv (16 → 48)
    assert m.blocks[0].attn.qkv.weight.abs().max() <= bound and not m.blocks[0].attn.qkv.bias.any()
    assert m.blocks[0].attn.qkv.weight.std() > 0.1  # xavier: std = bound/√3 ≈ 0.18
    v = tiny_mae(init="vit")
    assert 0.015 < v.blocks[0].attn.qkv.weight.std() < 0.025  # init_linear_: trunc-normal std 0.02


def test_encoder_loads_into_vision_transformer():
    m = tiny_mae().eval()
    x = torch.rand(2, 3, 8, 8)
    state = m.encoder_state()
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=3, num_classes=4, embed_dim=16, depth=2,
                            num_heads=2, mlp_ratio=2.0)
    res = vit.load_state_dict(state, strict=False)
    assert set(res.missing_keys) == {"head.weight", "head.bias"} and not res.unexpected_keys
    v = m.to_vit(num_classes=4).eval()
    torch.testing.assert_close(v.forward_features(x), m.forward_features(x))
    assert v.head.weight.abs().max() < 1e-4  # MAE's fine-tune head init, std 2e-5
    assert isinstance(v.pos_embed, nn.Parameter)
    va = m.to_vit(num_classes=0, global_pool="avg").eval()  # no `norm` there: MAE drops it, fc_norm is fresh
    assert isinstance(va.norm, nn.Identity)
    torch.testing.assert_close(va.fc_norm.weight, torch.ones(16))
    # mask_ratio 0: the encoder is the ViT on a shuffled sequence; ids_restore puts it back in order
    latent, mask, ids = m.forward_encoder(x, 0.0, generator=torch.Generator().manual_seed(0))
    assert not mask.any()
    full = v.forward_features(x)
    torch.testing.assert_close(latent[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.gather(latent[:, 1:], 1, ids[..., None].expand(-1, -1, 16)), full[:, 1:],
                               atol=1e-5, rtol=1e-5)


def test_seeded_forward_matches_official_rng_use():
    """With no generator, forward draws torch.rand(B, N) once: seeding the global RNG fixes the mask."""
    m = tiny_mae()
    x = torch.rand(2, 3, 8, 8)
    torch.manual_seed(3)
    _, _, mask = m(x)
    torch.manual_seed(3)
    _, want, _ = random_masking(torch.zeros(2, 16, 1), 0.75)
    assert torch.equal(mask, want)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, word", [
    (dict(patch_size=3), "patch_size"), (dict(num_heads=3), "num_heads"), (dict(decoder_heads=3), "decoder_heads"),
    (dict(embed_dim=18, num_heads=2), "embed_dim"), (dict(depth=0), "depth"), (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(init="xavier"), "init")])
def test_bad_constructor(kw, word):
    with pytest.raises(ValueError, match=word):
        tiny_mae(**kw)


def test_bad_forward_input():
    m = tiny_mae()
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.rand(1, 3, 8, 8), mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        m(torch.rand(1, 3, 8, 8), mask_ratio=-0.1)
    with pytest.raises(ValueError, match="images.*in_chans=3"):
        m(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="images"):
        m(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="noise"):
        m(torch.rand(1, 3, 8, 8), noise=torch.rand(1, 15))


def test_bad_function_input():
    with pytest.raises(ValueError, match="p=3"):
        patchify(torch.rand(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="images"):
        patchify(torch.rand(8, 8), 2)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.rand(1, 6, 4), 2)  # 6 tokens: not a square, grid needed
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.rand(1, 6, 4), 2, grid=(2, 2))
    with pytest.raises(ValueError, match="volumes"):
        patchify3d(torch.rand(1, 1, 4, 4), 2)
    with pytest.raises(ValueError, match="dim"):
        sincos_pos_embed_2d(2, 2, 6)
    with pytest.raises(ValueError, match="dim must be divisible by 6"):
        sincos_pos_embed_3d(2, 2, 2, 8)
    with pytest.raises(ValueError, match="grid_h"):
        sincos_pos_embed_2d(0, 2, 8)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.rand(1, 4, 2), 1.5)
    with pytest.raises(ValueError, match="noise or generator"):
        random_masking(torch.rand(1, 4, 2), 0.5, generator=torch.Generator(), noise=torch.rand(1, 4))
