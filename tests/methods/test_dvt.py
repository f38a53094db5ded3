"""DVT (official Jiawei-Yang/Denoising-ViT; its stage 1 needs tiny-cuda-nn on CUDA, so it is not run here): dense
features of the course ViT, the crop sampler's coordinates by hand, the grid field's bilinear read, the loss
composition pinned on hand cases (and which term trains what), the freeze/residual switch, a planted artifact found
by stage 1, stage 2 learning, the two measures on hand cases, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.model_helpers import tiny_vit
from vitlab.methods.robustness import dvt as D


def _image(c=3, h=16, w=16, seed=0):
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))


def _centres(n):  # patch centres of n patches across [-1, 1]
    return (torch.arange(n) + 0.5) * 2 / n - 1


def _zero_field(coords):
    return coords.new_zeros(*coords.shape[:-1], 8)


# ------------------------------------------------------------------------------------------------ features
def test_dense_features_are_the_final_normed_patch_tokens():
    vit = tiny_vit()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    feats = D.dense_features(vit, x)
    assert feats.shape == (3, 4, 4, 32) and not feats.requires_grad
    with torch.no_grad():
        want = vit.forward_features(x)[:, 1:].reshape(3, 4, 4, 32)  # raster order, CLS dropped
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(D.dense_features(vit, x, batch_size=1), want)  # chunking changes nothing
    reg = tiny_vit(reg_tokens=2)  # CLS + 2 registers: all three prefix tokens dropped
    with torch.no_grad():
        torch.testing.assert_close(D.dense_features(reg, x), reg.forward_features(x)[:, 3:].reshape(3, 4, 4, 32))


# ---------------------------------------------------------------------------------------------------- views
def test_identity_crop_coordinates_are_the_patch_centres():
    img = _image()
    v = D.sample_views(img, 2, img_size=16, patch_size=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert v.images.shape == (3, 3, 16, 16) and v.coords.shape == (3, 4, 4, 2) and v.pos.shape == (3, 4, 4)
    assert v.boxes.tolist() == [[0, 0, 16, 16]] * 3 and not v.flipped.any()  # 2 crops + the full image, last
    torch.testing.assert_close(v.images, img.expand(3, -1, -1, -1))  # a same-size resize is the identity
    c = _centres(4)  # -0.75, -0.25, 0.25, 0.75
    for k in range(3):
        torch.testing.assert_close(v.coords[k, :, :, 0], c.expand(4, 4))  # x runs along a row
        torch.testing.assert_close(v.coords[k, :, :, 1], c[:, None].expand(4, 4))  # y down a column
        assert torch.equal(v.pos[k], torch.arange(16).view(4, 4))


def test_flipped_crop_mirrors_x():
    img = _image()
    v = D.sample_views(img, 12, img_size=16, patch_size=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True,
                       include_full=False, seed=3)
    assert 0 < int(v.flipped.sum()) < 12  # the coin came up both ways
    full = D.patch_centres((0, 0, 16, 16), (16, 16), (4, 4))
    for k in range(12):
        if v.flipped[k]:
            torch.testing.assert_close(v.images[k], img.flip(-1))
            torch.testing.assert_close(v.coords[k, ..., 0], -full[..., 0])  # column j shows column 3 - j
            torch.testing.assert_close(v.coords[k, ..., 1], full[..., 1])
        else:
            torch.testing.assert_close(v.coords[k], full)
        assert torch.equal(v.pos[k], torch.arange(16).view(4, 4))  # the position in the view the ViT saw


def test_random_crops_match_their_boxes_and_are_seeded():
    img = _image(h=24, w=32)  # not square, not the ViT's size
    v = D.sample_views(img, 10, img_size=16, patch_size=4, seed=5)
    assert v.images.shape == (11, 3, 16, 16)
    for k in range(10):
        top, left, h, w = v.boxes[k].tolist()
        assert 0 <= top and top + h <= 24 and 0 <= left and left + w <= 32
        assert 0.08 <= h * w / (24 * 32) <= 0.55  # scale (0.1, 0.5), up to rounding to whole pixels
        crop = F.interpolate(img[None, :, top:top + h, left:left + w], size=(16, 16), mode="bicubic",
                             align_corners=False, antialias=True)[0]
        torch.testing.assert_close(v.images[k], crop.flip(-1) if v.flipped[k] else crop)
        x = 2 * (left + (torch.arange(4) + 0.5) * w / 4) / 32 - 1
        y = 2 * (top + (torch.arange(4) + 0.5) * h / 4) / 24 - 1
        torch.testing.assert_close(v.coords[k, 0, :, 0], x.flip(0) if v.flipped[k] else x)
        torch.testing.assert_close(v.coords[k, :, 0, 1], y)
    again = D.sample_views(img, 10, img_size=16, patch_size=4, seed=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(v, again))
    other = D.sample_views(img, 10, img_size=16, patch_size=4, seed=6)
    assert not torch.equal(v.boxes, other.boxes)


# -------------------------------------------------------------------------------------------------- stage 1
def test_grid_field_reads_its_grid_bilinearly():
    field = D.GridFeatureField(8)
    assert field.resolutions == [4, 8, 16, 32]
    assert field(torch.zeros(2, 3, 2)).shape == (2, 3, 8)
    one = D.GridFeatureField(4, n_levels=1, base_resolution=2, max_resolution=2, features_per_level=1)
    with torch.no_grad():
        one.levels[0].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2))  # rows: y = -1, +1
    xy = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(one.encode(xy)[:, 0], torch.tensor([1.0, 2.0, 3.0, 2.5, 1.5]))


def test_loss_dict_on_hand_cases():
    """field = 0: raw = G[pos] gives a zero main loss and only the three main keys; with h switched on and fixed
    to a constant c (last layer: weight 0, bias c), raw = G[pos] + c leaves only the sparsity 0.02 mean|c|, and
    raw = G[pos] + 2c gives MSE = mean c^2, the cosine term, 0.1 mean c^2 and 0.02 mean|c|."""
    torch.manual_seed(0)
    den = D.SingleImageDenoiser(8, (2, 3))
    pos = torch.tensor([0, 5, 3, 3, 1])
    coords = torch.zeros(5, 2)
    G = den.artifact.detach().reshape(6, 8)[pos]
    out = den(G.clone(), coords, pos, field=_zero_field)
    assert set(out) == {"loss", "patch_l2_loss", "cosine_similarity_loss"}
    assert out["patch_l2_loss"].item() == 0 and abs(out["loss"].item()) < 1e-6

    c = torch.linspace(-0.5, 0.3, 8)
    den.start_residual()
    with torch.no_grad():
        den.residual[-1].weight.zero_()
        den.residual[-1].bias.copy_(c)
    out = den(G + c, coords, pos, field=_zero_field)
    assert set(out) == {"loss", "patch_l2_loss", "cosine_similarity_loss", "residual_loss", "residual_sparsity_loss"}
    assert out["patch_l2_loss"].item() < 1e-12 and abs(out["cosine_similarity_loss"].item()) < 1e-6
    assert out["residual_loss"].item() < 1e-12
    torch.testing.assert_close(out["residual_sparsity_loss"], 0.02 * c.abs().mean())
    torch.testing.assert_close(out["loss"], 0.02 * c.abs().mean(), atol=1e-6, rtol=0)

    out = den(G + 2 * c, coords, pos, field=_zero_field)
    cos = 1 - F.cosine_similarity(G + c, G + 2 * c, dim=-1).mean()
    torch.testing.assert_close(out["patch_l2_loss"], c.pow(2).mean())
    torch.testing.assert_close(out["cosine_similarity_loss"], cos)
    torch.testing.assert_close(out["residual_loss"], 0.1 * c.pow(2).mean())
    torch.testing.assert_close(out["loss"], c.pow(2).mean() + cos + 0.1 * c.pow(2).mean() + 0.02 * c.abs().mean())


def test_each_term_trains_its_own_part():
    """The main loss sees h detached; the residual loss sees F and G detached (as the official)."""
    torch.manual_seed(0)
    den = D.SingleImageDenoiser(8, (2, 2))
    den.start_residual()
    raw, coords, pos = torch.randn(6, 8), torch.rand(6, 2) * 2 - 1, torch.tensor([0, 1, 2, 3, 0, 1])
    out = den(raw, coords, pos)
    main = torch.autograd.grad(out["patch_l2_loss"] + out["cosine_similarity_loss"], list(den.parameters()),
                               allow_unused=True)
    res = torch.autograd.grad(out["residual_loss"], list(den.parameters()), allow_unused=True)
    names = [n for n, _ in den.named_parameters()]
    for n, gm, gr in zip(names, main, res):
        if n.startswith("residual"):  # (a dead ReLU unit may leave some of h's gradients at 0)
            assert gm is None and gr is not None
        else:
            assert gr is None and gm is not None and gm.abs().sum() > 0
    assert res[names.index("residual.4.bias")].abs().sum() > 0


def test_fit_freezes_G_and_switches_h_on_after_half():
    torch.manual_seed(0)
    den = D.SingleImageDenoiser(8, (2, 2))
    v = D.sample_views(_image(h=8, w=8), 4, img_size=8, patch_size=4)
    feats = torch.randn(5, 2, 2, 8)
    hist = den.fit(feats, v.coords, 10, batch_size=16)
    assert all(len(h) == 10 for h in hist.values())
    assert hist["residual_loss"][:6] == [0.0] * 6 and all(r > 0 for r in hist["residual_loss"][6:])  # step > 5
    assert hist["lr"][0] == 0.0 and max(hist["lr"]) == pytest.approx(0.01) and hist["lr"][-1] < 0.002
    assert den.residual_on and not den.artifact.requires_grad
    G = den.artifact_map.clone()
    den.fit(feats, v.coords, 5, batch_size=16)
    assert torch.equal(den.artifact_map, G)  # frozen stays frozen
    raw = feats[:2]
    torch.testing.assert_close(den.denoise(raw), raw - G - den.residual(raw).detach())


def test_stage1_finds_a_planted_artifact():
    """Features = a smooth function of the global image coordinate + a fixed pattern per view position: G recovers
    the pattern, and the denoised features have a lower position-only variance share than the raw ones."""
    g = torch.Generator().manual_seed(1)
    W, phase = torch.randn(16, 2, generator=g) * 2.0, torch.rand(16, generator=g) * 6.28
    pattern = torch.randn(4, 4, 16, generator=g) * 0.5
    views = D.sample_views(torch.zeros(3, 16, 16), 48, img_size=16, patch_size=4, seed=0)
    semantic = torch.sin(views.coords @ W.t() + phase)
    raw = semantic + pattern
    torch.manual_seed(0)
    den = D.SingleImageDenoiser(16, (4, 4))
    hist = den.fit(raw, views.coords, 400, batch_size=512)
    assert hist["loss"][-1] < 0.1 * hist["loss"][0]
    assert D.artifact_alignment(den.artifact_map, pattern) > 0.95  # measured 0.97-0.99 over 6 seeds
    clean = den.denoise(raw)
    share_raw, share_clean = D.position_variance_share(raw), D.position_variance_share(clean)
    assert share_raw > 0.4 and share_clean < share_raw - 0.25  # measured over 6 seeds: 0.47-0.59 -> 0.11-0.20
    assert (clean - semantic).pow(2).mean() < 0.3 * (raw - semantic).pow(2).mean()  # measured 0.10-0.21


def test_denoise_image_on_the_course_vit():
    vit = tiny_vit()
    img = _image(h=20, w=20)  # resized to the ViT's 16 px first
    out = D.denoise_image(vit, img, num_views=6, iters=12, batch_size=32)
    assert out["views"].images.shape == (7, 3, 16, 16) and out["features"].shape == (7, 4, 4, 32)
    full = F.interpolate(img[None], size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out["raw"], D.dense_features(vit, full)[0])
    den = out["denoiser"]
    torch.testing.assert_close(out["denoised"], den.denoise(out["raw"]))
    torch.testing.assert_close(out["field"], den.field_features(D.patch_centres((0, 0, 16, 16), (16, 16), (4, 4))))
    again = D.denoise_image(vit, img, num_views=6, iters=12, batch_size=32)
    torch.testing.assert_close(again["denoised"], out["denoised"])  # seeded end to end


# -------------------------------------------------------------------------------------------------- stage 2
def test_stage2_denoiser_learns_to_remove_a_pattern():
    torch.manual_seed(0)
    pattern = torch.randn(4, 4, 16) * 0.5
    raw = torch.randn(64, 4, 4, 16)
    den = D.Denoiser(16, (4, 4))
    assert den(raw[:2]).shape == (2, 4, 4, 16) and den(raw[:2].reshape(2, 16, 16)).shape == (2, 16, 16)
    assert {"pos_embed", "denoiser.norm1.weight", "denoiser.attn.qkv.weight", "denoiser.mlp.fc2.bias"} \
        <= set(den.state_dict())  # the official Denoiser's key layout
    hist = D.train_denoiser(den, raw, raw - pattern, 150, batch_size=16, lr=3e-3)
    first, last = sum(hist["loss"][:10]) / 10, sum(hist["loss"][-10:]) / 10
    assert last < 0.6 * first and not den.training


def test_denoiser_loss_is_mse_plus_one_minus_cosine():
    pred, target = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    out = D.denoiser_loss(pred, target)
    assert out["l2_loss"].item() == pytest.approx(2.5) and out["cosine_similarity_loss"].item() == pytest.approx(1)
    assert out["loss"].item() == pytest.approx(3.5)


# --------------------------------------------------------------------------------------------------- measures
def test_position_variance_share_hand_cases():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(4, 4, 8, generator=g)
    assert D.position_variance_share(pattern.expand(10, -1, -1, -1)) == pytest.approx(1.0)  # position only
    per_image = torch.randn(10, 1, 1, 8, generator=g).expand(-1, 4, 4, -1)  # the same at every position
    assert D.position_variance_share(per_image) == pytest.approx(0.0, abs=1e-12)
    assert D.position_variance_share(torch.randn(400, 16, 8, generator=g)) < 0.01  # noise: about 1/M
    assert D.position_variance_share(torch.ones(3, 4, 2)) == 0.0
    x = torch.tensor([[0.0, 2.0], [2.0, 4.0]]).view(2, 2, 1)  # grand mean 2, total 2, per-position means 1, 3
    assert D.position_variance_share(x) == pytest.approx(0.5)


def test_artifact_alignment():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(4, 4, 8, generator=g)
    feats = pattern + 3.0 + 0.1 * torch.randn(50, 4, 4, 8, generator=g)  # pattern + a mean image + noise
    assert D.artifact_alignment(pattern - 1.0, feats) > 0.99  # offsets are free between F and G
    assert D.artifact_alignment(pattern - 1.0, feats, center=False) < 0.9
    assert D.artifact_alignment(-pattern, pattern) == pytest.approx(-1.0)
    assert D.artifact_alignment(pattern.reshape(16, 8), feats.reshape(50, 16, 8)) > 0.99


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument():
    img = _image()
    kw = dict(img_size=16, patch_size=4)
    for scale in ((0.0, 0.5), (0.1, 1.2), (0.5, 0.1), 0.5):
        with pytest.raises(ValueError, match="scale"):
            D.sample_views(img, 2, scale=scale, **kw)
    with pytest.raises(ValueError, match="ratio"):
        D.sample_views(img, 2, ratio=(-1.0, 1.0), **kw)
    with pytest.raises(ValueError, match="num_views"):
        D.sample_views(img, 0, **kw)
    with pytest.raises(ValueError, match="image"):
        D.sample_views(img[None], 2, **kw)
    with pytest.raises(ValueError, match="patch_size"):
        D.sample_views(img, 2, img_size=16, patch_size=5)
    with pytest.raises(ValueError, match="seed"):
        D.sample_views(img, 2, seed=-1, **kw)

    vit = tiny_vit()
    with pytest.raises(ValueError, match="images"):
        D.dense_features(vit, torch.rand(2, 3, 20, 20))
    with pytest.raises(TypeError, match="vit"):
        D.dense_features(torch.nn.Linear(2, 2), torch.rand(2, 3, 16, 16))

    den = D.SingleImageDenoiser(8, (2, 2))
    feats, coords = torch.randn(3, 2, 2, 8), torch.zeros(3, 2, 2, 2)
    for iters in (0, -5):
        with pytest.raises(ValueError, match="iters"):
            den.fit(feats, coords, iters)
    with pytest.raises(TypeError, match="iters"):
        den.fit(feats, coords, 2.5)
    with pytest.raises(ValueError, match="features"):
        den.fit(torch.randn(3, 2, 2, 7), coords, 5)
    with pytest.raises(ValueError, match="coords"):
        den.fit(feats, torch.zeros(3, 2, 2, 3), 5)
    with pytest.raises(ValueError, match="same V"):
        den.fit(feats, torch.zeros(4, 2, 2, 2), 5)
    with pytest.raises(ValueError, match="freeze_after"):
        den.fit(feats, coords, 5, freeze_after=1.5)
    with pytest.raises(ValueError, match="raw"):
        den(torch.randn(4, 7), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="coords"):
        den(torch.randn(4, 8), torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="pos"):
        den(torch.randn(4, 8), torch.zeros(4, 2), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="raw"):
        den.denoise(torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="grid_size"):
        D.SingleImageDenoiser(8, 4)
    with pytest.raises(ValueError, match="base_resolution"):
        D.GridFeatureField(8, base_resolution=1)

    online = D.Denoiser(16, (4, 4))
    with pytest.raises(ValueError, match="x must be"):
        online(torch.randn(2, 15, 16))
    with pytest.raises(ValueError, match="num_heads"):
        D.Denoiser(16, (4, 4), num_heads=3)
    with pytest.raises(ValueError, match="target"):
        D.train_denoiser(online, torch.randn(4, 16, 16), torch.randn(4, 16, 15), 5)
    with pytest.raises(ValueError, match="steps"):
        D.train_denoiser(online, torch.randn(4, 16, 16), torch.randn(4, 16, 16), 0)
    with pytest.raises(ValueError, match="features"):
        D.position_variance_share(torch.randn(4, 8))
    with pytest.raises(ValueError, match="M >= 2"):
        D.position_variance_share(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="reference"):
        D.artifact_alignment(torch.randn(4, 4, 8), torch.randn(5, 4, 4, 7))


def test_lesson_measure_runs_small(monkeypatch):
    """The lesson's measure end to end on a tiny ViT, with every size cut down: every number is there and sane."""
    monkeypatch.setattr(D, "LESSON", dict(n_stage1=2, num_views=4, iters=6, stage2_steps=4, n_probe_train=20,
                                          n_test=10))
    vit = tiny_vit(img_size=32, num_classes=10)
    out = D.measure(vit, "smoke", seed=0)
    for name in ("raw", "stage2", "control"):
        assert 0 <= out[f"{name}/share"] <= 1 and 0 <= out[f"{name}/miou"] <= 1
    assert -1 <= out["stage1/alignment"] <= 1 and out["stage1/share_raw"] >= 0
    assert out["control/loss_last_quarter"] >= 0
