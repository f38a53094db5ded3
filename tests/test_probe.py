"""vitlab.probe: frozen features (cls / avg, batched = unbatched, mode restored, MAE encoders too), a linear
probe that separates separable features and is reproducible with a seed, MAE's layer-wise lr decay groups,
finetune over fit, bad input."""
import pytest
import torch
import torch.nn as nn

from vitlab.mae import MaskedAutoencoder
from vitlab.models import VisionTransformer
from vitlab.probe import Standardize, features, finetune, layer_decay_optimizer, linear_probe, param_groups_lrd


def tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2,
               mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def blobs(n_per_class, seed, dim=5):
    """Three well-separated Gaussian clusters (means 6 apart on different axes, std 1): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(3, dim)
    means[0, 0], means[1, 1], means[2, 2] = 6.0, 6.0, 6.0
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), dim, generator=g) + 100.0  # an offset the standardisation removes
    return x, y


def test_features_cls_avg_batched_and_mode():
    vit = tiny_vit().train()
    x = torch.rand(5, 1, 8, 8)
    f = features(vit, x, pool="cls", batch_size=2)  # batches of 2, 2, 1
    assert vit.training  # mode restored
    assert f.shape == (5, 16) and not f.requires_grad
    vit.eval()
    with torch.no_grad():
        tokens = vit.forward_features(x)
    torch.testing.assert_close(f, tokens[:, 0])
    torch.testing.assert_close(features(vit, (x, torch.zeros(5, dtype=torch.long)), pool="avg"),
                               tokens[:, 1:].mean(1))


def test_features_of_an_mae_encoder():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                            decoder_dim=8, decoder_depth=1, decoder_heads=2, mlp_ratio=2.0)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(features(mae, x), features(mae.to_vit(), x))
    torch.testing.assert_close(features(mae, x, pool="avg"), features(mae.to_vit(), x, pool="avg"))


def test_linear_probe_separates_and_is_reproducible():
    xtr, ytr = blobs(20, seed=0)
    xte, yte = blobs(10, seed=1)
    a = linear_probe(xtr, ytr, xte, yte, epochs=50, lr=0.05, seed=0)
    assert a["acc"] == 1.0 and a["train_acc"] == 1.0
    b = linear_probe(xtr, ytr, xte, yte, epochs=50, lr=0.05, seed=0)
    assert torch.equal(a["head"][1].weight, b["head"][1].weight) and a["loss"] == b["loss"]
    c = linear_probe(xtr, ytr, xte, yte, epochs=50, lr=0.05, seed=1)
    assert not torch.equal(a["head"][1].weight, c["head"][1].weight)
    # the head standardises with the train statistics (BatchNorm without affine, at eval)
    std = a["head"][0]
    assert isinstance(std, Standardize)
    torch.testing.assert_close(std.mean, xtr.mean(0))
    torch.testing.assert_close(std(xtr).std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=1e-4)
    assert (a["head"](xte).argmax(1) == yte).all()
    # mini-batches: seeded shuffling, same head twice
    m1 = linear_probe(xtr, ytr, xte, yte, epochs=20, lr=0.05, batch_size=16, seed=3)
    m2 = linear_probe(xtr, ytr, xte, yte, epochs=20, lr=0.05, batch_size=16, seed=3)
    assert m1["acc"] == 1.0 and torch.equal(m1["head"][1].weight, m2["head"][1].weight)


def test_param_groups_lrd_scales():
    """depth 2 → num_layers 3: patch_embed/cls/pos layer 0 (0.5³), block i layer i+1, the rest layer 3 (1)."""
    vit = tiny_vit()
    groups = param_groups_lrd(vit, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.125
    assert scale["blocks.0.attn.qkv.weight"] == 0.25 and scale["blocks.1.mlp.fc2.bias"] == 0.5
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["norm.weight"] == decay["pos_embed"] == decay["cls_token"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters()))
    opt = layer_decay_optimizer(0.5)(vit, 1e-3, 0.05)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])


def test_finetune_wraps_fit():
    vit = tiny_vit()
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    before = vit.patch_embed.proj.weight.detach().clone()
    hist = finetune(vit, train, train, layer_decay=0.75, steps=2, batch_size=8, progress=False, device="cpu")
    assert len(hist["train_loss"]) == 1 and len(hist["val_acc"]) == 1
    assert not torch.equal(before, vit.patch_embed.proj.weight)


def test_bad_input():
    vit = tiny_vit()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="pool"):
        features(vit, x, pool="max")
    with pytest.raises(TypeError, match="forward_features"):
        features(nn.Linear(2, 2), x)
    with pytest.raises(TypeError, match="data"):
        features(vit, [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        features(vit, x, batch_size=0)
    xtr, ytr = blobs(4, seed=0)
    with pytest.raises(ValueError, match="train_feats"):
        linear_probe(xtr[:, 0], ytr, xtr, ytr)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(xtr, ytr.float(), xtr, ytr)
    with pytest.raises(ValueError, match="test_feats"):
        linear_probe(xtr, ytr, xtr[:, :2], ytr)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(xtr, ytr, xtr, ytr, num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(xtr, ytr, xtr, ytr, epochs=0)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(vit, layer_decay=1.5)
    with pytest.raises(ValueError, match="layer_decay or optimizer"):
        finetune(vit, (x, torch.zeros(2, dtype=torch.long)), layer_decay=0.75, optimizer="adamw")


def test_partial_optimizer_trains_only_the_named_parameters():
    from tests.model_helpers import tiny_vit, toy_train
    from vitlab.probe import partial_optimizer
    from vitlab.train import fit

    vit = tiny_vit()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    fit(vit, toy_train(32), steps=3, batch_size=16, lr=1e-2, optimizer=partial_optimizer(("blocks.1.", "head.")),
        progress=False)
    changed = {n for n, p in vit.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("blocks.1.", "head.")) for n in changed)
    assert "head.weight" in changed and "blocks.1.attn.qkv.weight" in changed
    with pytest.raises(ValueError, match="no parameter of the model starts with"):
        fit(tiny_vit(), toy_train(32), steps=1, batch_size=16, optimizer=partial_optimizer(("decoder.",)),
            progress=False)
    with pytest.raises(ValueError, match="trainable"):
        partial_optimizer("head.")


def test_dense_probe_scores_miou_on_separable_patches():
    from vitlab.probe import dense_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 4, generator=g) + 4.0 * y[:, None]  # two well separated clusters
    out = dense_probe(x[:100], y[:100], x[100:], y[100:], 2, seed=0)
    assert out["miou"] == 1.0 and out["acc"] == 1.0 and out["train_acc"] == 1.0
