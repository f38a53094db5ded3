"""HieraTok: the scale-causal mask by hand, multi-scale pooling by hand, the encoder is scale-causal, token counts,
the equal-token single-scale control, gradients, a few steps of training, bad input."""
import pytest
import torch

from vitlab.mae import sincos_1d, sincos_pos_embed_2d
from vitlab.methods.selfsup.hieratok import (HieraTok, default_scales, multiscale_pos_embed, multiscale_tokens,
                                             scale_causal_bias, scale_causal_mask)

# a 16×16 image at patch 4: a 4×4 token map, pooled to 1×1 and 2×2: T = 1 + 4 + 16 = 21 tokens
KW = dict(img_size=16, patch_size=4, in_chans=1, dim=32, depth=1, num_heads=2, scales=(1, 2, 4), latent_dim=8)


def images(n=4, seed=0):
    """Smooth, learnable images: 4×4 noise upsampled to 16×16."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=16, mode="bilinear",
                                           align_corners=False)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return HieraTok(**{**KW, **kw})


def test_mask_by_hand():
    m = scale_causal_mask((1, 4, 16))
    assert m.shape == (21, 21) and m.dtype == torch.bool
    want = torch.zeros(21, 21, dtype=torch.bool)
    want[0, 0] = True  # the 1×1 token sees only itself
    want[1:5, :5] = True  # the 2×2 tokens see the 1×1 token and each other
    want[5:, :] = True  # the 4×4 tokens see everything
    assert torch.equal(m, want)
    # a tiny one written out: scales of 2 and 1 tokens
    assert scale_causal_mask([2, 1]).tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    b = scale_causal_bias((1, 4, 16))
    assert torch.equal(b == 0, want) and torch.isneginf(b[~want]).all()


def test_multiscale_tokens_by_hand():
    tm = torch.arange(16.0).reshape(1, 16, 1)  # a 4×4 map, row-major, D = 1
    out = multiscale_tokens(tm, (1, 2, 4))
    assert out.shape == (1, 21, 1)
    assert out[0, 0, 0] == 7.5  # the mean of 0..15
    assert out[0, 1:5, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # the means of {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, ...
    assert torch.equal(out[0, 5:, 0], torch.arange(16.0))  # the finest scale is the map itself
    emb = torch.tensor([[100.0], [200.0], [300.0]])
    out2 = multiscale_tokens(tm, (1, 2, 4), pos=torch.ones(21, 1), scale_embed=emb)
    assert torch.equal(out2 - out, 1 + torch.tensor([100.0] + [200.0] * 4 + [300.0] * 16).reshape(1, 21, 1))


def test_positions_share_the_finest_frame():
    pe = multiscale_pos_embed((1, 2, 4), 16)
    assert pe.shape == (21, 16)
    torch.testing.assert_close(pe[5:], sincos_pos_embed_2d(4, 4, 16), rtol=0, atol=0)
    # the 1×1 token sits at the centre of the 4×4 grid, (1.5, 1.5); the first 2×2 token at (0.5, 0.5)
    for i, c in ((0, 1.5), (1, 0.5)):
        want = torch.cat([sincos_1d(torch.tensor([c]), 8), sincos_1d(torch.tensor([c]), 8)], dim=1)[0]
        torch.testing.assert_close(pe[i], want, rtol=0, atol=0)


def test_token_counts():
    m = model()
    assert m.scales == (1, 2, 4) and m.token_counts == (1, 4, 16) and m.token_count == 21
    x = images(2)
    assert m.embed(x).shape == (2, 21, 32) and m.encode(x).shape == (2, 21, 8)
    assert default_scales(8) == (1, 2, 4, 8) and default_scales(7) == (1, 7) and default_scales(6) == (1, 3, 6)
    torch.manual_seed(0)
    assert HieraTok(img_size=32, patch_size=4, dim=32, depth=1, num_heads=2).token_count == 85  # 1+4+16+64


@pytest.mark.parametrize("map_depth", [0, 1])
def test_encoder_is_scale_causal(map_depth):
    m = model(map_depth=map_depth).eval()
    seq = m.embed(images(2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = m.encode_tokens(seq)
        fine = seq.clone()
        fine[:, 5 + 7] += torch.randn(32, generator=g)  # one token of the finest (4×4) scale
        out_fine = m.encode_tokens(fine)
        mid = seq.clone()
        mid[:, 2] += torch.randn(32, generator=g)  # one token of the 2×2 scale
        out_mid = m.encode_tokens(mid)
    torch.testing.assert_close(out_fine[:, :5], out[:, :5], rtol=0, atol=1e-6)  # coarse outputs do not move
    assert (out_fine[:, 5:] - out[:, 5:]).abs().amax(-1).min() > 1e-4  # every fine output does (full inside a scale)
    torch.testing.assert_close(out_mid[:, :1], out[:, :1], rtol=0, atol=1e-6)
    assert (out_mid[:, 1:] - out[:, 1:]).abs().amax(-1).min() > 1e-4  # coarse → fine: all of scales ≥ 2×2 move


def test_single_scale_control_has_equal_tokens():
    ms, base = model(), model(single_scale=True)
    assert base.scales == (4,) and base.num_extra == 5 and base.attn_bias is None  # full attention, one scale
    assert base.token_count == ms.token_count == 21
    x = images(2)
    assert base.encode(x).shape == ms.encode(x).shape == (2, 21, 8)  # the same latent: tokens × channels
    n_ms, n_base = (sum(p.numel() for p in m.parameters()) for m in (ms, base))
    assert abs(n_ms - n_base) / n_ms < 0.02  # nearly equal parameters too
    # with a single scale and no extra tokens, the two variants are one network (a plain ViT autoencoder)
    one, one_ss = model(scales=(4,)), model(scales=(4,), single_scale=True)
    one_ss.load_state_dict(one.state_dict())
    assert one.attn_bias is None and one_ss.num_extra == 0
    torch.testing.assert_close(one.eval()(x)[0], one_ss.eval()(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, {"bottleneck": "vq"}, {"single_scale": True}, {"map_depth": 1}])
def test_gradients_flow(kw):
    m = model(**kw).train()
    recon, parts = m(images(4))
    assert recon.shape == (4, 1, 16, 16) and set(parts) == {"rec", "reg", "loss"}
    parts["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("single_scale", [False, True])
def test_a_few_steps_reduce_the_reconstruction_loss(single_scale):
    m = model(single_scale=single_scale).train()
    x = images(8)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, parts = m(x)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["rec"].item())
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(m.eval()(x)[0], x).item()
    assert final < 0.5 * losses[0], (losses[0], final)


BAD = [
    (lambda: scale_causal_mask([]), TypeError, "token_counts"),
    (lambda: scale_causal_mask((1, 0)), ValueError, r"token_counts\[1\]"),
    (lambda: scale_causal_mask((1, 2.0)), TypeError, r"token_counts\[1\]"),
    (lambda: multiscale_tokens(torch.rand(1, 15, 4), (1,)), ValueError, "token_map"),
    (lambda: multiscale_tokens(torch.rand(1, 16), (1, 4)), ValueError, "token_map"),
    (lambda: multiscale_tokens(torch.rand(1, 16, 4), (2, 1, 4)), ValueError, "scales"),
    (lambda: multiscale_tokens(torch.rand(1, 16, 4), (1, 2)), ValueError, "scales"),
    (lambda: multiscale_tokens(torch.rand(1, 16, 4), 4), TypeError, "scales"),
    (lambda: multiscale_tokens(torch.rand(1, 16, 4), (1, 4), pos=torch.rand(16, 4)), ValueError, "pos"),
    (lambda: multiscale_tokens(torch.rand(1, 16, 4), (1, 4), scale_embed=torch.rand(2, 3)), ValueError,
     "scale_embed"),
    (lambda: multiscale_pos_embed((1, 2), 6), ValueError, "dim"),
    (lambda: default_scales(0), ValueError, "grid"),
    (lambda: model(scales=(1, 3, 4)), ValueError, "scales"),
    (lambda: model(patch_size=5), ValueError, "patch_size"),
    (lambda: model(dim=36, num_heads=8), ValueError, "num_heads"),
    (lambda: model(dim=6, num_heads=2), ValueError, "dim"),
    (lambda: model(bottleneck="ae"), ValueError, "bottleneck"),
    (lambda: model(reg_weight=-1.0), ValueError, "reg_weight"),
    (lambda: model(single_scale=1), TypeError, "single_scale"),
    (lambda: model(map_depth=-1), ValueError, "map_depth"),
    (lambda: model(depth=0), ValueError, "depth"),
    (lambda: model()(torch.rand(2, 1, 8, 8)), ValueError, "x"),
    (lambda: model()(torch.zeros(2, 1, 16, 16, dtype=torch.long)), TypeError, "x"),
    (lambda: model().decode(torch.rand(2, 20, 8)), ValueError, "z"),
    (lambda: model().encode_tokens(torch.rand(2, 21, 16)), ValueError, "seq"),
    (lambda: model().codes(images(1)), ValueError, "bottleneck"),
]


@pytest.mark.parametrize("call, exc, name", BAD)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# ------------------------------------------------------------------------ the lesson's recipe
def test_the_two_tokenizers_differ_only_in_the_scales():
    from vitlab import zoo
    from vitlab.methods.selfsup import hieratok as H
    from vitlab.models.registry import MODELS

    a, b = dict(MODELS["hieratok_multiscale_digits"]), dict(MODELS["hieratok_single_digits"])
    assert (a.pop("single_scale"), b.pop("single_scale")) == (False, True)
    assert a == b == H.TOKENIZER
    for seed in H.SEEDS:
        ca, cb = (zoo.ZOO[f"hieratok_{v}_digits_s{seed}"].config("cpu") for v in H.VARIANTS)
        assert ca.pop("model") != cb.pop("model") and ca == cb  # same data, steps, lr, batch, seed
    ms, ss = (H.hieratok_model(**MODELS[f"hieratok_{v}_digits"]) for v in H.VARIANTS)
    assert ms.scales == (1, 2, 4, 8) and ss.scales == (8,)
    assert ms.token_count == ss.token_count == 85  # 1 + 4 + 16 + 64 latent tokens each
    # the latent compresses: 85 tokens x latent_dim floats < 16 x 16 pixels
    assert ms.token_count * H.TOKENIZER["latent_dim"] < H.TOKENIZER["img_size"] ** 2
    assert H.entry_names() == [f"hieratok_{v}_digits_s{s}" for v in H.VARIANTS for s in H.SEEDS]


def test_tokenizer_metrics_by_hand():
    from vitlab.methods.selfsup.hieratok import tokenizer_metrics

    m, x = model().eval(), images(6)
    out = tokenizer_metrics(m, x, batch_size=4)  # two batches
    with torch.no_grad():
        per_image = (m.decode(m.encode(x)) - x).pow(2).flatten(1).mean(1)
    assert out["mse"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert out["psnr"] == pytest.approx((-10 * per_image.log10()).mean().item(), rel=1e-5)

    class Exact(torch.nn.Module):  # reconstructs every image with an error of 0.1 per pixel: PSNR = 20 dB
        in_chans, img_size = 1, 16

        def encode(self, x):
            return x

        def decode(self, z):
            return z + 0.1

    assert tokenizer_metrics(Exact(), x)["psnr"] == pytest.approx(20.0, rel=1e-5)
    with pytest.raises(ValueError, match="data"):
        tokenizer_metrics(m, torch.rand(2, 3, 16, 16))
