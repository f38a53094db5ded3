"""Hi-End-MAE: which encoder layers feed which decoder layers, the loss on removed patches only, the official
shuffled-order forward, training, the segmentation transfer and mIoU by hand, bad input."""
import pytest
import torch
import torch.nn.functional as F

from vitlab.mae import MaskedAutoencoder, patchify
from vitlab.methods.selfsup.hiend_mae import HiEndMAE, SegmentationViT, default_taps, miou
from vitlab.models import VisionTransformer

CFG = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2, decoder_dim=16,
           decoder_depth=1, decoder_heads=2, mlp_ratio=2.0)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return HiEndMAE(**{**CFG, "taps": 2, **kw})


def images(n=4, seed=1):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def noise(n=4, seed=2):
    return torch.rand(n, 16, generator=torch.Generator().manual_seed(seed))


def test_default_taps_follow_the_official_spacing():
    assert default_taps(12, 3) == (9, 6, 3)  # hidden_states_out[9], [6], [3] of the 12-block ViT, deep first
    assert default_taps(6, 2) == (4, 2)
    assert default_taps(4, 2) == (2, 1)
    assert default_taps(5, 0) == ()
    assert model().taps == (2, 1) and model(taps=(3, 0)).taps == (3, 0)


def test_shapes_and_mask():
    m, x = model(), images()
    loss, pred, mask = m(x, 0.75, noise=noise())
    assert loss.ndim == 0 and pred.shape == (4, 16, 16) and mask.shape == (4, 16)
    assert (mask.sum(1) == 12).all()  # int(16 * 0.25) = 4 kept
    latent, hidden, _, _ = m.forward_encoder_states(x, 0.75, noise=noise())
    assert latent.shape == (4, 5, 32) and len(hidden) == 4 and all(h.shape == (4, 5, 32) for h in hidden)
    torch.testing.assert_close(latent, m.norm(hidden[-1]))


def test_same_masks_as_mae_for_the_same_seed():
    x = images()
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**CFG)
    _, _, mask_mae = mae(x, 0.6, generator=torch.Generator().manual_seed(5))
    _, _, mask = model()(x, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, mask_mae)


def test_each_cross_block_reads_its_tapped_layer():
    # hand check of the routing: cross block j gets decoder_tap_embed[j](hidden[taps[j]]), CLS + visible tokens
    m, x = model(taps=(3, 0)), images()
    seen = {}
    for j, blk in enumerate(m.decoder_cross_blocks):
        blk.register_forward_hook(lambda mod, args, out, j=j: seen.__setitem__(j, args[1]))
    latent, hidden, mask, ids_restore = m.forward_encoder_states(x, 0.75, noise=noise())
    m.forward_decoder(latent, ids_restore, hidden)
    torch.testing.assert_close(seen[0], m.decoder_tap_embed[0](hidden[3]))
    torch.testing.assert_close(seen[1], m.decoder_tap_embed[1](hidden[0]))
    assert seen[0].shape == (4, 5, 16)  # 1 + 4 visible tokens, decoder width


def test_decoder_consumes_exactly_the_tapped_layers():
    m, x = model().eval(), images()  # taps (2, 1)
    latent, hidden, mask, ids_restore = m.forward_encoder_states(x, 0.75, noise=noise())
    with torch.no_grad():
        base = m.forward_decoder(latent, ids_restore, hidden)
        g = torch.Generator().manual_seed(3)
        for k in range(4):
            h = list(hidden)
            h[k] = h[k] + torch.randn(h[k].shape, generator=g)
            changed = (m.forward_decoder(latent, ids_restore, h) - base).abs().max().item()
            if k in (2, 1):
                assert changed > 1e-3, k
            else:  # blocks 0 and 3 reach the decoder only through the encoder's forward pass (3 via latent)
                assert changed == 0, k
        moved = m.forward_decoder(latent + torch.randn(latent.shape, generator=g), ids_restore, hidden)
        assert (moved - base).abs().max() > 1e-3  # and the last layer, through decoder_embed


def test_no_taps_is_mae():
    x, nz = images(), noise()
    hi = model(taps=(), norm_pix_loss=False)
    mae = MaskedAutoencoder(**CFG)
    mae.load_state_dict(hi.state_dict())  # strict: the same keys
    for a, b in zip(hi(x, 0.75, noise=nz), mae(x, 0.75, noise=nz)):
        torch.testing.assert_close(a, b)


def test_equals_the_official_shuffled_order_forward():
    # hi_end_mae.py runs the decoder in shuffled order (CLS, visible, masked) and takes MSE on the last tokens
    m, x, nz = model(), images(), noise()
    loss, pred, mask = m(x, 0.75, noise=nz)
    latent, hidden, _, _ = m.forward_encoder_states(x, 0.75, noise=nz)
    shuffle = nz.argsort(dim=1)
    keep = 4
    with torch.no_grad():
        y = torch.cat([m.decoder_embed(latent), m.mask_token.expand(4, 16 - keep, -1)], dim=1)
        pos = m.decoder_pos_embed[:, 1:].expand(4, -1, -1).gather(1, shuffle[..., None].expand(-1, -1, 16))
        y = torch.cat([y[:, :1], y[:, 1:] + pos], dim=1)
        for blk in m.decoder_blocks:
            y = blk(y)
        for blk, emb, t in zip(m.decoder_cross_blocks, m.decoder_tap_embed, (2, 1)):
            y = blk(y, emb(hidden[t]))
        y = m.decoder_pred(m.decoder_norm(y))
        patches = patchify(x, 4).gather(1, shuffle[..., None].expand(-1, -1, 16))
        target = F.layer_norm(patches[:, keep:], (16,), eps=1e-6)  # nn.LayerNorm(out_chans, affine=False)
        official = F.mse_loss(y[:, -(16 - keep):], target)
    torch.testing.assert_close(loss.detach(), official, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.detach().gather(1, shuffle[..., None].expand(-1, -1, 16)), y[:, 1:],
                               rtol=1e-5, atol=1e-5)


def test_loss_counts_removed_patches_only():
    m, x = model(), images()
    _, _, mask = m(x, 0.75, noise=noise())
    t = m.target(x)
    visible = (1 - mask)[..., None]
    assert m.forward_loss(x, t + 5.0 * visible, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert m.forward_loss(x, t + 2.0 * mask[..., None], mask).item() == pytest.approx(4.0, rel=1e-5)
    # the target: each patch LayerNorm-ed with the biased variance, by hand on one patch
    p = patchify(x, 4)[0, 0]
    torch.testing.assert_close(t[0, 0], (p - p.mean()) / (((p - p.mean()) ** 2).mean() + 1e-6).sqrt())


def test_gradients_reach_every_parameter():
    m = model()
    m(images(), 0.75, noise=noise())[0].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_the_loss():
    m, x, nz = model(), images(8, seed=4), noise(8, seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = m(x, 0.75, noise=nz)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_reconstruct_keeps_the_visible_patches():
    m, x = model(), images()
    _, pred, mask = m(x, 0.75, noise=noise())
    rec = m.reconstruct(x, pred, mask)
    vis = (1 - mask)[..., None].bool().expand(-1, -1, 16)
    assert rec.shape == x.shape
    torch.testing.assert_close(patchify(rec, 4)[vis], patchify(x, 4)[vis])
    # an exact prediction of the normalised target gives back the image
    torch.testing.assert_close(m.reconstruct(x, m.target(x), mask), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["mae", "hiend"])
def test_segmentation_from_either_pretraining(source):
    torch.manual_seed(0)
    pre = MaskedAutoencoder(**CFG) if source == "mae" else model()
    seg = SegmentationViT(pre, num_classes=3, width=8)
    x = images(2)
    assert isinstance(seg.vit, VisionTransformer) and seg.taps == (1, 2, 3)
    with torch.no_grad():
        feats = seg.features(x)
        torch.testing.assert_close(feats[-1], pre.forward_features(x)[:, 1:])  # the encoder's own weights
    assert len(feats) == 4 and all(f.shape == (2, 16, 32) for f in feats)
    out = seg(x)
    assert out.shape == (2, 3, 16, 16)
    F.cross_entropy(out, torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))).backward()
    assert seg.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and seg.skip.weight.grad.abs().sum() > 0
    assert SegmentationViT(pre.to_vit(), 2, taps=(2,)).taps == (2,)


def test_miou_by_hand():
    pred = torch.tensor([[0, 0], [1, 1]])
    target = torch.tensor([[0, 1], [1, 1]])
    # class 0: |∩| = 1, |∪| = 2; class 1: |∩| = 2, |∪| = 3
    assert miou(pred, target, 2) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert miou(pred, target, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 2 absent from both: not counted
    logits = F.one_hot(pred, 2).permute(2, 0, 1)[None].float()  # [1, K, H, W]
    assert miou(logits, target[None], 2) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert miou(target.bool(), target.bool(), 2) == 1.0


BAD = [
    ("taps too many", lambda: HiEndMAE(**CFG, taps=4), ValueError, "taps"),
    ("taps index", lambda: HiEndMAE(**CFG, taps=(1, 4)), ValueError, "taps[1]"),
    ("taps str", lambda: HiEndMAE(**CFG, taps="9,6,3"), TypeError, "taps"),
    ("taps bool", lambda: HiEndMAE(**CFG, taps=True), TypeError, "taps"),
    ("decoder_depth 0", lambda: HiEndMAE(**{**CFG, "decoder_depth": 0}), ValueError, "decoder_depth"),
    ("images shape", lambda: model()(torch.rand(2, 1, 8, 8)), ValueError, "images"),
    ("mask_ratio 1", lambda: model()(images(), 1.0), ValueError, "mask_ratio"),
    ("hidden short", lambda: model().forward_decoder(torch.rand(1, 5, 32), torch.arange(16)[None], []),
     ValueError, "hidden"),
    ("default_taps n", lambda: default_taps(4, 4), ValueError, "n"),
    ("seg encoder", lambda: SegmentationViT(torch.nn.Linear(2, 2), 2), TypeError, "encoder"),
    ("seg num_classes", lambda: SegmentationViT(model(), 1), ValueError, "num_classes"),
    ("seg width", lambda: SegmentationViT(model(), 2, width=0), ValueError, "width"),
    ("seg images", lambda: SegmentationViT(model(), 2)(torch.rand(1, 3, 16, 16)), ValueError, "images"),
    ("miou num_classes", lambda: miou(torch.zeros(2, 2).long(), torch.zeros(2, 2).long(), 0), ValueError,
     "num_classes"),
    ("miou shapes", lambda: miou(torch.zeros(2, 2).long(), torch.zeros(2, 3).long(), 2), ValueError, "pred"),
    ("miou float target", lambda: miou(torch.zeros(2, 2).long(), torch.zeros(2, 2), 2), TypeError, "target"),
    ("miou range", lambda: miou(torch.full((2, 2), 2), torch.zeros(2, 2).long(), 2), ValueError, "pred"),
    ("miou logits K", lambda: miou(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2).long(), 2), ValueError, "pred"),
    ("miou list", lambda: miou([0, 1], torch.zeros(2).long(), 2), TypeError, "pred"),
]


@pytest.mark.parametrize("name, call, exc, word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, call, exc, word):
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
        call()


# ------------------------------------------------------------------------ the lesson's recipe
def test_the_two_pretrainings_differ_only_in_the_decoder():
    from vitlab import zoo
    from vitlab.methods.selfsup import hiend_mae as M
    from vitlab.models.registry import MODELS

    a, b = dict(MODELS["mae_scenes_hiend"]), dict(MODELS["mae_scenes_plain"])
    for cfg in (a, b):
        for key in M.ENCODER:
            assert cfg.pop(key) == M.ENCODER[key]
    assert a["decoder_depth"] + a["taps"] == b["decoder_depth"] == 3 and b["taps"] == ()  # equal decoder depth
    ca, cb = (zoo.ZOO[f"mae_scenes_{d}"].config("cpu") for d in M.DECODERS)
    assert ca.pop("model") != cb.pop("model") and ca == cb  # same scenes, steps, lr, batch, mask ratio, seed
    for seed in M.SEEDS:  # the fine-tunes differ only in their start
        cs = [dict(zoo.ZOO[f"seg_scenes_{v}_s{seed}"].config("cpu")) for v in (*M.DECODERS, "scratch")]
        assert cs[0] == cs[1] == cs[2] and cs[0]["max_train"] == M.LABELLED and cs[0]["fit"]["targets"] == "masks"
        assert [zoo.ZOO[f"seg_scenes_{v}_s{seed}"].init for v in (*M.DECODERS, "scratch")] == \
            ["mae_scenes_hiend", "mae_scenes_plain", None]
    assert len(M.entry_names()) == 2 + 3 * len(M.SEEDS)


def test_a_fine_tune_starts_from_the_pretrained_encoder():
    from vitlab.methods.selfsup import hiend_mae as M
    from vitlab.models.registry import MODELS
    from vitlab.zoo import _start_from

    torch.manual_seed(0)
    pre = M.hiend_model(**MODELS["mae_scenes_hiend"])
    seg = M.segmentation_model(num_classes=10, **M.ENCODER)  # a scene dataset's 10 digit labels are ignored
    assert seg.num_classes == len(M.SEG_CLASSES) == 2
    _start_from(seg, pre)
    assert torch.equal(seg.vit.blocks[3].mlp.fc1.weight, pre.blocks[3].mlp.fc1.weight)
    assert torch.equal(seg.vit.patch_embed.proj.weight, pre.patch_embed.proj.weight)


def test_segmentation_metrics_by_hand():
    from types import SimpleNamespace

    from vitlab.methods.selfsup.hiend_mae import segmentation_metrics

    class Oracle(torch.nn.Module):  # predicts "digit" on the left half of every image
        def forward(self, x):
            logits = torch.zeros(len(x), 2, *x.shape[-2:])
            logits[:, 1, :, : x.shape[-1] // 2] = 1.0
            return logits

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :, :1] = True  # the digit: the first column, a quarter of the image
    out = segmentation_metrics(Oracle(), SimpleNamespace(images=torch.rand(2, 3, 4, 4), masks=masks), batch_size=1)
    # digit: |P ∩ T| = 8, |P ∪ T| = 16 -> 0.5; background: |P ∩ T| = 16, |P ∪ T| = 24 -> 2/3
    assert out["digit_iou"] == pytest.approx(0.5) and out["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    with pytest.raises(TypeError, match="data"):
        segmentation_metrics(Oracle(), torch.rand(2, 3, 4, 4))


def test_segmentation_objective_trains_on_masks_and_logs_val():
    from vitlab.methods.selfsup.hiend_mae import segmentation_objective

    obj = segmentation_objective(eval_every=1000)
    assert callable(obj.step_fn) and callable(obj.metrics)
    with pytest.raises(ValueError, match="eval_every"):
        segmentation_objective(eval_every=0)
