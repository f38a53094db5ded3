"""Uni4Eye: Sobel targets by hand, one encoder for images and volumes, token counts, the masked loss, training,
export to a ViT, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.mae import masked_mse, patchify, patchify3d, sincos_pos_embed_2d, sincos_pos_embed_3d
from vitlab.methods.selfsup.uni4eye import UnifiedPatchEmbed, Uni4EyeMAE, gradient_target, sobel_2d, sobel_3d
from vitlab.models import VisionTransformer

IMG, VOL = 16, (8, 16, 12)  # 16 image tokens, 2·4·3 = 24 volume tokens at patch 4


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"img_size": IMG, "vol_size": VOL, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 4,
          "decoder_dim": 24, "decoder_depth": 1, "decoder_heads": 4, "mlp_ratio": 2.0, **kw}
    return Uni4EyeMAE(**kw)


def _rand(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _smooth(*shape, seed=1):
    """Learnable inputs: seeded noise, blurred (images or volumes), in [0, 1]."""
    x = _rand(*shape, seed=seed)
    pool = F.avg_pool2d if len(shape) == 4 else F.avg_pool3d
    x = pool(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - x.amin()) / (x.amax() - x.amin())


# ------------------------------------------------------------------------------------------------ Sobel
def test_sobel_2d_vertical_step_by_hand():
    x = torch.zeros(1, 1, 6, 6)
    x[..., 3:] = 1.0  # a vertical edge between columns 2 and 3
    # 3x3: Gx = (1 + 2 + 1) · 1 = 4 on both columns beside the edge, Gy = 0; 0.5|Gx| + 0.5|Gy| = 2 (raw)
    raw = torch.zeros(6, 6)
    raw[:, 2:4] = 2.0
    torch.testing.assert_close(sobel_2d(x, normalize=False)[0, 0], raw, rtol=0, atol=0)
    torch.testing.assert_close(sobel_2d(x)[0, 0], raw / 4)  # normalised: |Gx| = 1 (the step), mean 0.5
    # 5x5 (the official ksize): derivative (-1, -2, 0, 2, 1) ⊗ smoothing (1, 4, 6, 4, 1), positive sum 3·16 = 48:
    # columns 2, 3 see weights 2 + 1 -> 48/48; columns 1, 4 see weight 1 -> 16/48
    want5 = torch.tensor([0.0, 1 / 3, 1.0, 1.0, 1 / 3, 0.0]) * 0.5
    torch.testing.assert_close(sobel_2d(x, ksize=5)[0, 0], want5.expand(6, 6), rtol=0, atol=1e-6)
    # a horizontal edge: the transposed map; a step of height 3: three times the map
    torch.testing.assert_close(sobel_2d(x.transpose(-1, -2))[0, 0], (raw / 4).T)
    torch.testing.assert_close(sobel_2d(3 * x), 3 * sobel_2d(x))


def test_sobel_constant_is_zero():
    for x in (torch.full((2, 3, 5, 7), 0.7), torch.full((1, 1, 4, 5, 6), -2.0)):
        for ksize in (3, 5) if x.ndim == 4 else (3,):
            g = sobel_2d(x, ksize) if x.ndim == 4 else sobel_3d(x, ksize)
            assert g.shape == (x.shape[0], 1, *x.shape[2:])
            assert g.abs().max().item() < 1e-6


def test_sobel_3d_and_per_slice_by_hand():
    v = torch.zeros(1, 1, 4, 5, 6)
    v[..., 3:] = 1.0  # a step along w, constant along d and h
    want = torch.zeros(4, 5, 6)
    want[..., 2:4] = 1.0
    torch.testing.assert_close(sobel_3d(v)[0, 0], want / 3)  # (|Gd| + |Gh| + |Gw|) / 3 with |Gw| = 1
    torch.testing.assert_close(sobel_3d(v, normalize=False)[0, 0], want * 16 / 3)  # 1 · 4 · 4 raw
    torch.testing.assert_close(gradient_target(v)[0, 0], want / 2)  # per slice: 2-D Sobel, 0.5 |Gx|
    torch.testing.assert_close(gradient_target(v, volume_grad="3d"), sobel_3d(v))
    d = torch.zeros(1, 1, 4, 5, 6)
    d[:, :, 2:] = 1.0  # a step along depth: every slice is constant
    assert gradient_target(d).abs().max().item() == 0.0
    want_d = torch.zeros(4, 5, 6)
    want_d[1:3] = 1 / 3
    torch.testing.assert_close(sobel_3d(d)[0, 0], want_d)


def test_sobel_equals_scipy_ndimage():
    # scipy's sobel is the 3-tap derivative times (1, 2, 1) on every other axis; mode "mirror" is cv2's reflect-101
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _rand(2, 1, 5, 7, 6, seed=7).double()
    for vol, ours in ((x[:, :, 0], sobel_2d(x[:, :, 0], normalize=False)), (x, sobel_3d(x, normalize=False))):
        for b in range(2):
            a = vol[b, 0].numpy()
            ref = sum(abs(ndimage.sobel(a, axis=k, mode="mirror")) for k in range(a.ndim)) / a.ndim
            torch.testing.assert_close(ours[b, 0], torch.from_numpy(ref))


def test_gradient_target_uses_the_grey_image():
    x = torch.zeros(1, 3, 6, 6)
    x[:, 1, :, 3:] = 1.0
    x[:, 2, :, 3:] = 2.0  # channel mean: a step of height 1
    grey = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(gradient_target(x), sobel_2d(grey))
    assert gradient_target(x)[0, 0, 0, 2].item() == pytest.approx(0.5)


# -------------------------------------------------------------------------------- unified patch embedding
def test_unified_embed_is_a_linear_map_of_patchify_plus_sincos():
    torch.manual_seed(0)
    pe = UnifiedPatchEmbed(img_size=8, vol_size=(4, 8, 12), patch_size=4, in_chans=2, embed_dim=48)
    img, vol = _rand(2, 2, 8, 8), _rand(2, 2, 4, 8, 12, seed=2)
    w2 = pe.proj2.weight.permute(0, 2, 3, 1).reshape(48, -1)  # (row, col, channel), as patchify
    w3 = pe.proj3.weight.permute(0, 2, 3, 4, 1).reshape(48, -1)  # (depth, row, col, channel), as patchify3d
    torch.testing.assert_close(pe(img), patchify(img, 4) @ w2.T + pe.proj2.bias + sincos_pos_embed_2d(2, 2, 48))
    torch.testing.assert_close(pe(vol), patchify3d(vol, 4) @ w3.T + pe.proj3.bias + sincos_pos_embed_3d(1, 2, 3, 48))
    # a width that 6 does not divide: the 3-D table fills 60 of 64 channels, the last 4 are zero
    pe64 = UnifiedPatchEmbed(img_size=8, vol_size=8, patch_size=4, embed_dim=64)
    torch.testing.assert_close(pe64.pos_embed3[0, :, :60], sincos_pos_embed_3d(2, 2, 2, 60))
    assert pe64.pos_embed3[0, :, 60:].abs().max().item() == 0.0


def test_token_counts():
    m = _model()
    img, vol = _rand(3, 1, IMG, IMG), _rand(3, 1, *VOL)
    assert (m.num_patches(img), m.num_patches(vol)) == (16, 24)
    assert m.forward_features(img).shape == (3, 17, 48) and m.forward_features(vol).shape == (3, 25, 48)
    latent, mask, ids = m.forward_encoder(img, 0.75, generator=torch.Generator().manual_seed(0))
    assert latent.shape == (3, 1 + 4, 48) and mask.shape == ids.shape == (3, 16)  # keep int(16 · 0.25) = 4
    latent, mask, ids = m.forward_encoder(vol, 0.75, generator=torch.Generator().manual_seed(0))
    assert latent.shape == (3, 1 + 6, 48) and mask.shape == (3, 24)  # keep int(24 · 0.25) = 6
    assert (mask.sum(dim=1) == 18).all()
    _, parts, _ = m(vol, 0.5, generator=torch.Generator().manual_seed(0))
    assert parts["pred_image"].shape == (3, 24, 64) and parts["pred_grad"].shape == (3, 24, 64)
    _, parts, _ = m(img, 0.5, generator=torch.Generator().manual_seed(0))
    assert parts["pred_image"].shape == (3, 16, 16) and parts["pred_grad"].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------- shared encoder
def test_one_encoder_for_images_and_volumes():
    m = _model()
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("blocks.") for n in names) == len(list(m.blocks.parameters()))
    assert not any(".blocks." in n for n in names if not n.startswith("decoder_"))  # no second encoder
    shared = [p for n, p in m.named_parameters() if n.startswith(("blocks.", "norm.", "cls_token"))]
    for x, used, unused in ((_rand(2, 1, IMG, IMG), "proj2", "proj3"), (_rand(2, 1, *VOL), "proj3", "proj2")):
        m.zero_grad(set_to_none=True)
        m(x, 0.5, generator=torch.Generator().manual_seed(0))[0].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)  # both ranks train the blocks
        assert getattr(m.patch_embed, used).weight.grad.abs().sum() > 0
        assert getattr(m.patch_embed, unused).weight.grad is None
    # the same blocks, by hand: the 3-D features are CLS ⊕ (proj3 + pos3) through m.blocks and m.norm
    vol = _rand(2, 1, *VOL)
    with torch.no_grad():
        t = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(vol)], dim=1)
        for blk in m.blocks:
            t = blk(t)
        torch.testing.assert_close(m.forward_features(vol), m.norm(t))


def test_gradients_flow_everywhere():
    m = _model()
    g = torch.Generator().manual_seed(0)
    loss = m(_smooth(2, 1, IMG, IMG), 0.75, generator=g)[0] + m(_smooth(2, 1, *VOL, seed=2), 0.75, generator=g)[0]
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------- the loss
def test_masked_mse_by_hand():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])  # per-patch MSE: 1, 2, 25
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.5)  # (1 + 2) / 2; patch 3 is visible
    target2 = target.clone()
    target2[0, 2] = 1e6  # a visible patch's target does not count
    assert masked_mse(pred, target2, mask).item() == pytest.approx(1.5)
    assert masked_mse(pred, target, torch.zeros(1, 3)).item() == 0.0  # nothing removed: 0, not 0/0


@pytest.mark.parametrize("shape", [(2, 1, IMG, IMG), (2, 1, *VOL)])
def test_loss_is_the_sum_of_two_masked_mses(shape):
    m = _model(grad_weight=0.5)
    x = _smooth(*shape)
    n = m.num_patches(x)
    noise = _rand(2, n, seed=3)
    loss, parts, mask = m(x, 0.75, noise=noise)
    assert mask.sum().item() == 2 * (n - int(n * 0.25))
    assert torch.equal(mask, (noise.argsort(1).argsort(1) >= int(n * 0.25)).float())  # the largest noise removed
    t_img, t_grad = m.targets(x)
    img = ((parts["pred_image"] - t_img) ** 2).mean(-1)[mask.bool()].mean()
    grad = ((parts["pred_grad"] - t_grad) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(parts["image"], img)
    torch.testing.assert_close(parts["grad"], grad)
    torch.testing.assert_close(loss, img + 0.5 * grad)
    cut = patchify if len(shape) == 4 else patchify3d
    torch.testing.assert_close(t_grad, cut(gradient_target(x), 4))


def test_mask_ratio_edge_cases():
    m = _model()
    x = _smooth(2, 1, IMG, IMG)
    loss, parts, mask = m(x, 0.0, generator=torch.Generator().manual_seed(0))
    assert mask.sum().item() == 0 and loss.item() == 0.0  # nothing removed, nothing to reconstruct
    loss, parts, mask = m(x, 0.99, generator=torch.Generator().manual_seed(0))  # keeps int(16 · 0.01) = 0
    assert mask.sum().item() == 32 and torch.isfinite(loss) and loss.item() > 0
    assert m.forward_encoder(x, 0.99)[0].shape == (2, 1, 48)  # the CLS token only


def test_a_few_steps_reduce_both_losses_for_both_ranks():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    img, vol = _smooth(4, 1, IMG, IMG), _smooth(4, 1, *VOL, seed=2)

    def losses():
        with torch.no_grad():
            return [m(x, 0.5, generator=torch.Generator().manual_seed(9))[1] for x in (img, vol)]

    before = losses()
    for step in range(30):  # alternate modalities, as the official schedule alternates epochs
        x = img if step % 2 == 0 else vol
        loss = m(x, 0.5, generator=torch.Generator().manual_seed(step))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = losses()
    for b, a in zip(before, after):
        for k in ("image", "grad"):
            assert a[k].item() < 0.7 * b[k].item(), (k, b[k].item(), a[k].item())


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_to_vit_gives_the_same_features(global_pool):
    m = _model()
    for p in m.parameters():  # move every parameter away from its init (LayerNorms 1/0 included)
        p.data.add_(0.05 * _rand(*p.shape, seed=p.numel()) - 0.025)
    x = _rand(3, 1, IMG, IMG, seed=4)
    vit = m.to_vit(num_classes=5, global_pool=global_pool)
    assert isinstance(vit, VisionTransformer) and vit.head.out_features == 5
    feats = m.forward_features(x)
    with torch.no_grad():
        if global_pool == "token":
            torch.testing.assert_close(vit.forward_features(x), feats, rtol=0, atol=1e-6)
        else:  # the avg ViT has no final norm: compare before it
            torch.testing.assert_close(m.norm(vit.forward_features(x)), feats, rtol=0, atol=1e-5)
    state = m.encoder_state()
    dropped = {"norm.weight", "norm.bias"} if global_pool == "avg" else set()  # the avg ViT normalises after pooling
    assert set(state) - dropped <= set(vit.state_dict())
    assert state["pos_embed"].shape == (1, 17, 48) and state["pos_embed"][0, 0].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="does not match"):
        m.load_into(VisionTransformer(img_size=IMG, patch_size=4, embed_dim=48, depth=2, num_heads=4,
                                      mlp_ratio=1.0))


# --------------------------------------------------------------------------------------------- bad input
CASES = [
    ("x rank 3", lambda m: m(torch.rand(2, IMG, IMG)), ValueError, "x"),
    ("x channels", lambda m: m(torch.rand(2, 3, IMG, IMG)), ValueError, "in_chans"),
    ("x image size", lambda m: m(torch.rand(2, 1, 12, 12)), ValueError, "img_size"),
    ("x volume size", lambda m: m(torch.rand(2, 1, 8, 16, 16)), ValueError, "vol_size"),
    ("x list", lambda m: m.forward_features([1.0]), ValueError, "x"),
    ("mask_ratio 1", lambda m: m(torch.rand(2, 1, IMG, IMG), 1.0), ValueError, "mask_ratio"),
    ("mask_ratio str", lambda m: m(torch.rand(2, 1, IMG, IMG), "0.5"), TypeError, "mask_ratio"),
    ("noise shape", lambda m: m(torch.rand(2, 1, IMG, IMG), noise=torch.rand(2, 5)), ValueError, "noise"),
    ("load_into junk", lambda m: m.load_into("vit"), TypeError, "vit"),
    ("patch vs img", lambda m: _model(img_size=18), ValueError, "patch_size"),
    ("patch vs vol", lambda m: _model(vol_size=(8, 16, 10)), ValueError, "patch_size"),
    ("vol_size pair", lambda m: _model(vol_size=(8, 16)), ValueError, "vol_size"),
    ("vol_size 0", lambda m: _model(vol_size=(0, 16, 12)), ValueError, "vol_size"),
    ("embed_dim 4k", lambda m: _model(embed_dim=50, num_heads=5), ValueError, "embed_dim"),
    ("decoder_dim 4k", lambda m: _model(decoder_dim=30, decoder_heads=3), ValueError, "decoder_dim"),
    ("heads", lambda m: _model(num_heads=5), ValueError, "num_heads"),
    ("depth float", lambda m: _model(depth=2.0), TypeError, "depth"),
    ("volume_grad", lambda m: _model(volume_grad="2d"), ValueError, "volume_grad"),
    ("sobel_ksize", lambda m: _model(sobel_ksize=4), ValueError, "sobel_ksize"),
    ("grad_weight", lambda m: _model(grad_weight=-1), ValueError, "grad_weight"),
    ("norm_pix_loss", lambda m: _model(norm_pix_loss=1), TypeError, "norm_pix_loss"),
    ("sobel_2d rank", lambda m: sobel_2d(torch.rand(1, 1, 4, 6, 6)), ValueError, "images"),
    ("sobel_2d int", lambda m: sobel_2d(torch.ones(1, 1, 6, 6, dtype=torch.int64)), TypeError, "images"),
    ("sobel_2d ksize", lambda m: sobel_2d(torch.rand(1, 1, 6, 6), ksize=7), ValueError, "ksize"),
    ("sobel_2d tiny", lambda m: sobel_2d(torch.rand(1, 1, 2, 6), ksize=5), ValueError, "images"),
    ("sobel_3d rank", lambda m: sobel_3d(torch.rand(1, 1, 6, 6)), ValueError, "volumes"),
    ("gradient_target rank", lambda m: gradient_target(torch.rand(6, 6)), ValueError, "x"),
    ("gradient_target mode", lambda m: gradient_target(torch.rand(1, 1, 6, 6), volume_grad="x"), ValueError,
     "volume_grad"),
]


@pytest.mark.parametrize("name,call,exc,arg", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(name, call, exc, arg):
    m = _model()
    with pytest.raises(exc, match=arg):
        call(m)


def test_model_is_deterministic_for_a_seed():
    a, b = _model(seed=5), _model(seed=5)
    x = _rand(2, 1, *VOL)
    la = a(x, 0.75, generator=torch.Generator().manual_seed(0))[0]
    lb = b(x, 0.75, generator=torch.Generator().manual_seed(0))[0]
    assert la.item() == lb.item() and math.isfinite(la.item())


# ------------------------------------------------------------------------ the lesson's recipe
def test_the_two_pretrainings_differ_only_in_the_modalities():
    from vitlab import zoo
    from vitlab.methods.selfsup import uni4eye as U

    assert U.VARIANTS == {"uni": ("2d", "3d"), "2d": ("2d",)}
    for seed in U.SEEDS:
        a, b = (zoo.ZOO[f"uni4eye_{v}_s{seed}"].config("cpu") for v in U.VARIANTS)
        assert a.pop("objective")["modalities"] == ["2d", "3d"] and b.pop("objective")["modalities"] == ["2d"]
        assert a == b  # same model, volumes, steps, lr, batch, seed
    assert U.entry_names() == [f"uni4eye_{v}_s{s}" for v in U.VARIANTS for s in U.SEEDS]


def test_the_objective_alternates_the_modalities():
    from vitlab.methods.selfsup import uni4eye as U

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, mask_ratio):
            seen.append(x.ndim)
            return x.sum(), {}, None

    obj = U.uni4eye_objective(("2d", "3d"))
    vols = torch.rand(2, 1, 4, 4, 4)
    for _ in range(4):
        obj.step_fn(Spy(), vols, None)
    assert seen == [4, 5, 4, 5]
    seen.clear()
    obj2d = U.uni4eye_objective(("2d",))
    loss, _ = obj2d.step_fn(Spy(), vols, None)
    assert seen == [4] and loss.item() == pytest.approx(vols.amax(dim=2).sum().item())  # the max projection
    with pytest.raises(ValueError, match="modalities"):
        U.uni4eye_objective(("2d", "4d"))


def test_reconstruction_losses_cover_both_modalities():
    from vitlab.methods.selfsup import uni4eye as U
    from vitlab.models.registry import MODELS

    torch.manual_seed(0)
    m = U.uni4eye_model(**MODELS["uni4eye_shapes"], img_size=16)
    vols = _smooth(3, 1, 16, 16, 16)
    out = U.reconstruction_losses(m, vols, batch_size=2)
    assert set(out) == {"2d_image", "2d_grad", "3d_image", "3d_grad"} and all(v > 0 for v in out.values())
    again = U.reconstruction_losses(m, vols)  # fixed masks: the same numbers for any batching
    assert all(again[k] == pytest.approx(v, rel=1e-5) for k, v in out.items())
    with pytest.raises(ValueError, match="volumes"):
        U.reconstruction_losses(m, torch.rand(2, 1, 16, 16))


def test_the_objective_on_a_dataset_of_images():
    from vitlab.methods.selfsup import uni4eye as U

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, mask_ratio):
            seen.append(tuple(x.shape))
            return x.sum(), {}, None

    imgs = torch.rand(2, 1, 8, 8)
    U.uni4eye_objective(("2d",)).step_fn(Spy(), imgs, None)
    assert seen == [(2, 1, 8, 8)]  # the images themselves
    with pytest.raises(ValueError, match="no '3d' modality"):
        U.uni4eye_objective(("3d",)).step_fn(Spy(), imgs, None)
