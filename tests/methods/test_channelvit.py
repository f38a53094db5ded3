"""ChannelViT (official insitro/ChannelViT, channelvit/backbone/channel_vit.py PatchEmbedPerChannel and
ChannelVisionTransformer, hcs_channel_vit.py; CURRICULUM.md #30): token layout, channel subsets, HCS."""
import pytest
import torch

from vitlab.methods.architectures import channelvit as C


def test_tokens_are_channel_major_with_shared_weights_and_channel_embeddings():
    """Two channels, 2x2 patches of a 4x4 image: token (c, i) = W x_c[patch i] + e_c (W shared)."""
    torch.manual_seed(0)
    emb = C.PatchEmbedPerChannel(img_size=4, patch_size=2, in_chans=3, embed_dim=5)
    x = torch.randn(1, 2, 4, 4)
    channels = torch.tensor([0, 2])
    tokens = emb(x, channels)
    assert tokens.shape == (1, 2 * 4, 5)
    W, b = emb.proj.weight.reshape(5, 4), emb.proj.bias
    for c, cid in enumerate(channels.tolist()):
        for i, (r, q) in enumerate(((0, 0), (0, 2), (2, 0), (2, 2))):
            patch = x[0, c, r:r + 2, q:q + 2].reshape(4)
            torch.testing.assert_close(tokens[0, c * 4 + i], W @ patch + b + emb.channel_embed.weight[cid])


def test_a_subset_is_the_same_tokens_as_the_full_input_minus_the_missing_channel():
    torch.manual_seed(1)
    model = C.ChannelViT(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2).eval()
    x = torch.randn(2, 3, 8, 8)
    full = model.patch_embed(x, torch.arange(3))
    part = model.patch_embed(x[:, [0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(part, torch.cat([full[:, :4], full[:, 8:]], dim=1))
    assert model(x[:, [1]], channels=[1]).shape == (2, 10)


def test_the_one_channel_comparison_row_is_the_plain_vit_plus_a_channel_embedding():
    from vitlab import zoo
    from vitlab.methods.architectures import recipes
    from vitlab.models import create_model

    model, plain = (create_model(recipes.model_name(m)) for m in ("channelvit_1ch", "vit"))
    assert model.patch_embed.num_patches == plain.patch_embed.num_patches == 49  # one token per patch
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in (("c", model), ("v", plain))}
    assert n["c"] - n["v"] == 64  # the channel embedding (the qkv biases, init and layout match the plain ViT's)
    cfg, plain_cfg = (zoo.ZOO[recipes.entry_name(m, 2)].config("cpu") for m in ("channelvit_1ch", "vit"))
    assert cfg.pop("model") != plain_cfg.pop("model") and cfg == plain_cfg  # same data, recipe and seed


def test_hcs_draws_the_number_of_channels_uniformly():
    """m ~ U{1..C}: over 4,000 draws with C = 4 each count is near 1,000 (chi-square, 3 dof, p = 0.001: 16.3)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    seen = set()
    for _ in range(4000):
        s = C.sample_channels(4, generator=g)
        counts[len(s) - 1] += 1
        assert len(set(s.tolist())) == len(s) and s.tolist() == sorted(s.tolist())
        seen.add(tuple(s.tolist()))
    chi2 = ((counts - 1000) ** 2 / 1000).sum().item()
    assert chi2 < 16.3, f"counts {counts.tolist()}"
    assert len(seen) == 15, "every non-empty subset appears"


def test_hcs_only_in_training():
    torch.manual_seed(2)
    model = C.ChannelViT(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    outs = {tuple(model(x)[0].detach().tolist()) for _ in range(20)}
    assert len(outs) > 1, "training draws different channel subsets"


def test_subset_logits_zero_the_missing_channels_for_a_plain_vit():
    vit = C.HCSViT(img_size=8, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depth=1, num_heads=2).eval()
    x = torch.randn(3, 3, 8, 8)
    zeroed = x.clone()
    zeroed[:, 1] = 0
    torch.testing.assert_close(C.subset_logits(vit, x, [0, 2]), vit(zeroed))


def test_multichannel_digits_are_the_mnist5k_digits():
    from vitlab import data

    ds = data.load("multichannel_digits", "test", "smoke")
    base = data.load("mnist5k", "test", "smoke")
    assert ds.images.shape == (1000, 4, 28, 28) and torch.equal(ds.labels, base.labels)
    torch.testing.assert_close(ds.images[:, 0:1], base.images)  # channel 0 is the digit itself
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    other = data.load("multichannel_digits", "test", "smoke", seed=1)
    assert torch.equal(other.images[:, :3], ds.images[:, :3]) and not torch.equal(other.images[:, 3], ds.images[:, 3])


@pytest.mark.parametrize("call, match", [
    (lambda: C.ChannelViT()(torch.randn(1, 2, 28, 28)), "ChannelViT: x has 2 channels; pass their ids"),
    (lambda: C.ChannelViT()(torch.randn(1, 2, 28, 28), channels=[0, 0]), "channels must be distinct ids"),
    (lambda: C.ChannelViT()(torch.randn(1, 2, 28, 28), channels=[0, 5]), r"channels must be distinct ids in \[0, 4\)"),
    (lambda: C.ChannelViT()(torch.randn(1, 2, 28, 28), channels=[0]), "channels must list one id per channel"),
    (lambda: C.PatchEmbedPerChannel(28, 5), "PatchEmbedPerChannel: patch_size=5 does not divide img_size=28"),
    (lambda: C.sample_channels(0), "sample_channels: num_channels must be"),
    (lambda: C.ChannelViT(embed_dim=30, num_heads=4), "ChannelViT: num_heads=4 does not divide embed_dim=30"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: __import__("vitlab").data.multichannel.multichannel_digits("dev"), "multichannel_digits: unknown split"),
    (lambda: __import__("vitlab").data.multichannel.multichannel_digits("test", seed="0"),
     "multichannel_digits: seed must be an int"),
])
def test_multichannel_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
