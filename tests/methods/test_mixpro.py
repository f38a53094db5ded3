"""MixPro: MaskMix keeps every ViT patch whole, λ_area is the pixel ratio, PAL's λ and s by hand, the step_fns."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.augment import mix_targets, soft_cross_entropy, soft_targets
from vitlab.methods.training.mixpro import (MixStep, attention_lambda, baseline_step, cls_patch_attention, maskmix,
                                            maskmix_step, mixpro_step, pal_lambda, pal_loss, progressive_factor,
                                            timm_mix_step, transmix_step)
from vitlab.models import VisionTransformer


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _batch(B=6, C=3, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, H, generator=g), torch.arange(B) % 5


# ------------------------------------------------------------------------------------------------ MaskMix
@pytest.mark.parametrize("patch,cell,ratio", [(4, 8, 0.3), (4, 4, 0.55), (2, 8, 0.9), (4, 16, 0.5)])
def test_every_patch_comes_from_one_image(patch, cell, ratio):
    # images whose pixels name their source: image i is the constant i + 1, so a mixed patch would show two values
    B, H = 5, 16
    x = (torch.arange(B, dtype=torch.float32) + 1).view(B, 1, 1, 1).expand(B, 2, H, H).clone()
    x = x + torch.rand(B, 2, H, H) * 1e-3  # break ties without changing the source
    mb = maskmix(x, torch.arange(B), patch_size=patch, cell_size=cell, ratio=ratio,
                 generator=torch.Generator().manual_seed(1))
    src = mb.images.round()  # [B, 2, H, H] the source image index + 1
    patches = src.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 2, H/p, W/p, p, p]
    per_patch = patches.flatten(-2)
    assert torch.equal(per_patch.amin(-1), per_patch.amax(-1)), "a ViT patch mixes two images"
    # and the patch's source is x where patch_keep is 1, the partner elsewhere
    own = (torch.arange(B) + 1).float().view(B, 1)
    partner = (mb.perm + 1).float().view(B, 1)
    expect = torch.where(mb.patch_keep.bool(), own, partner)  # [B, N]
    assert torch.equal(per_patch[:, 0, ..., 0].flatten(1), expect)


def test_lam_area_is_the_pixel_ratio_and_the_official_count():
    x, y = _batch(B=8, H=16)
    for ratio in (0.0, 0.01, 0.25, 0.26, 0.5, 0.999, 1.0):
        mb = maskmix(x, y, patch_size=4, cell_size=4, ratio=ratio, generator=torch.Generator().manual_seed(0))
        k = math.ceil(16 * ratio)  # 16 cells, ⌈r·K⌉ from x
        from_x = (mb.images == x).all(dim=1).float().mean(dim=(1, 2))  # pixel share equal to x (x ≠ x[perm] a.s.)
        fixed = mb.perm == torch.arange(8)  # a sample partnered with itself is all "from x"
        torch.testing.assert_close(mb.lam_area, torch.full((8,), k / 16))
        torch.testing.assert_close(from_x[~fixed], mb.lam_area[~fixed])
        assert (mb.keep.flatten(1).sum(1) == k).all()
        torch.testing.assert_close(mb.patch_keep.mean(1), mb.lam_area)


def test_maskmix_partner_labels_and_determinism():
    x, y = _batch(B=6)
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    mb = maskmix(x, y, patch_size=4, cell_size=8, ratio=0.5, perm=perm)
    assert torch.equal(mb.y_a, y) and torch.equal(mb.y_b, y[perm])
    a = maskmix(x, y, patch_size=4, cell_size=8, generator=torch.Generator().manual_seed(3))
    b = maskmix(x, y, patch_size=4, cell_size=8, generator=torch.Generator().manual_seed(3))
    assert a.ratio == b.ratio and torch.equal(a.images, b.images) and torch.equal(a.perm, b.perm)
    assert 0.0 <= a.ratio <= 1.0


def test_ratio_follows_beta():
    x, y = _batch(B=4)
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([maskmix(x, y, patch_size=4, cell_size=8, alpha=2.0, generator=g).ratio for _ in range(400)])
    # Beta(2, 2): mean 1/2, variance 1/20
    assert abs(r.mean().item() - 0.5) < 0.03 and abs(r.var().item() - 0.05) < 0.01


# ------------------------------------------------------------------------------------------------ PAL
def test_attention_lambda_by_hand():
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.05, 0.05]])
    keep = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(attention_lambda(attn, keep), torch.tensor([0.5, 0.75]))  # (0.1+0.4)/1, 0.15/0.2
    # scale-free: the CLS column is dropped, the rest need not sum to 1
    torch.testing.assert_close(attention_lambda(3 * attn, keep), torch.tensor([0.5, 0.75]))


def test_pal_lambda_on_a_hand_case():
    # 2x2 patches, one cell per patch; sample 0 keeps the top-left and bottom-right patches (λ_area = 1/2) where
    # the attention is 0.6 and 0.2 of 1.0: λ_attn = 0.8. With s = 0.25, λ = 0.25·0.8 + 0.75·0.5 = 0.575
    keep = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    attn = torch.tensor([[0.6, 0.1, 0.1, 0.2]])
    lam_attn = attention_lambda(attn, keep)
    torch.testing.assert_close(lam_attn, torch.tensor([0.8]))
    torch.testing.assert_close(pal_lambda(torch.tensor([0.5]), lam_attn, torch.tensor([0.25])), torch.tensor([0.575]))
    torch.testing.assert_close(pal_lambda(torch.tensor([0.5]), lam_attn, torch.tensor([0.0])), torch.tensor([0.5]))
    torch.testing.assert_close(pal_lambda(torch.tensor([0.5]), lam_attn, torch.tensor([1.0])), torch.tensor([0.8]))


def test_progressive_factor_by_hand():
    # uniform prediction (zero logits) against t = (0.7, 0.3, 0): cos = (0.7 + 0.3)/3 / (|t|·|u|)
    t = torch.tensor([[0.7, 0.3, 0.0]])
    u = torch.full((3,), 1 / 3)
    expected = (t[0] @ u) / (t[0].norm() * u.norm())
    s = progressive_factor(t, torch.zeros(1, 3))
    torch.testing.assert_close(s, expected.view(1))
    torch.testing.assert_close(s, torch.tensor([1 / math.sqrt(3 * 0.58)]))  # 1/(|t|·√C), |t|² = 0.49 + 0.09
    # a prediction equal to the target: s = 1; disjoint: s = 0
    torch.testing.assert_close(progressive_factor(t, torch.tensor([[0.7, 0.3, 1e-30]]).log()), torch.tensor([1.0]))
    assert progressive_factor(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-1e4, 0.0, 0.0]])).item() < 1e-6


def test_progressive_factor_keeps_the_gradient():
    logits = torch.randn(4, 5, requires_grad=True)
    t = mix_targets(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), 0.6, 5, 0.1)
    progressive_factor(t, logits).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_cls_patch_attention_is_the_last_blocks_head_mean():
    model = _vit().eval()
    x = torch.randn(3, 1, 16, 16)
    logits, a = cls_patch_attention(model, x)
    _, sides = model.forward_with_attention(x, side=("probs",))
    probs = sides[-1]["probs"]  # [B, H, N+1, N+1]
    torch.testing.assert_close(a, probs[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(logits, model(x))
    assert not a.requires_grad and a.shape == (3, 16)


# ------------------------------------------------------------------------------------------------ step_fns
def test_mixpro_step_matches_the_formula():
    model = _vit().train()
    x, y = _batch(B=6, C=1)
    step = mixpro_step(5, cell_size=8, smoothing=0.1, generator=torch.Generator().manual_seed(0))
    loss, logits = step(model, x, y)
    last = step.last
    mb = last["batch"]
    # recompute from the same mixed batch
    logits2, a = cls_patch_attention(model, mb.images)
    torch.testing.assert_close(logits, logits2)
    t_area = mix_targets(mb.y_a, mb.y_b, mb.lam_area, 5, 0.1)
    s = progressive_factor(t_area, logits2)
    lam = s * attention_lambda(a, mb.patch_keep) + (1 - s) * mb.lam_area
    torch.testing.assert_close(last["lam"], lam.detach())
    # the official loss: hard λ·CE(y_a) + (1 − λ)·CE(y_b); the smoothing (0.1) enters only through s
    ce = lambda yy: F.cross_entropy(logits2, yy, reduction="none")
    torch.testing.assert_close(loss, (lam * ce(mb.y_a) + (1 - lam) * ce(mb.y_b)).mean())
    torch.testing.assert_close(last["targets"].sum(-1), torch.ones(6))  # targets sum to 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    hist = step.history()
    assert len(hist["s"]) == 1 and abs(hist["s"][0] - s.mean().item()) < 1e-6


def test_default_is_the_official_hard_loss_with_a_smoothed_s():
    # official main.train_one_epoch: sim = cos(mix_targets (smoothed), softmax(z)); lam = sim*lam_attn + (1-sim)*lam_old;
    # loss = (lam * CE(z, y) + (1 - lam) * CE(z, y_flip)).mean() with CrossEntropyLoss(reduction="none"): no smoothing
    model = _vit().train()
    x, y = _batch(B=4, C=1)
    step = mixpro_step(5, cell_size=4, generator=torch.Generator().manual_seed(2))  # smoothing=0.1, loss_smoothing=0
    loss, logits = step(model, x, y)
    mb, lam = step.last["batch"], step.last["lam"]
    t_area = mix_targets(mb.y_a, mb.y_b, mb.lam_area, 5, 0.1)  # s from the *smoothed* MaskMix target
    s = F.cosine_similarity(t_area, logits.softmax(-1), dim=1)
    torch.testing.assert_close(lam, s * step.last["lam_attn"] + (1 - s) * mb.lam_area)
    official = (lam * F.cross_entropy(logits, mb.y_a, reduction="none")
                + (1 - lam) * F.cross_entropy(logits, mb.y_b, reduction="none")).mean()
    torch.testing.assert_close(loss, official)
    smoothed = mixpro_step(5, cell_size=4, loss_smoothing=0.1, generator=torch.Generator().manual_seed(2))
    loss_s, _ = smoothed(model, x, y)
    assert not torch.allclose(loss, loss_s), "loss_smoothing=0.1 must change the loss (the older, non-official form)"


def test_pal_loss_on_a_hand_case():
    # z = (ln 2, 0, 0, 0): softmax (2/5, 1/5, 1/5, 1/5), so CE(class 0) = ln(5/2) and CE(class 1) = ln 5
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0, 0.0]] * 2)
    y_a, y_b = torch.tensor([0, 1]), torch.tensor([1, 0])
    lam = torch.tensor([0.75, 0.25])
    by_hand = (0.75 * math.log(2.5) + 0.25 * math.log(5.0) + 0.25 * math.log(5.0) + 0.75 * math.log(2.5)) / 2
    assert abs(pal_loss(logits, y_a, y_b, lam).item() - by_hand) < 1e-6
    # smoothed (eps = 0.1 over C = 4): targets 0.925 / 0.025 on each side, so CE_eps(0) = 0.925 ln(5/2) + 0.075 ln 5
    ce0 = 0.925 * math.log(2.5) + 0.075 * math.log(5.0)
    ce1 = 0.025 * math.log(2.5) + 0.975 * math.log(5.0)
    smoothed_by_hand = (0.75 * ce0 + 0.25 * ce1 + 0.25 * ce1 + 0.75 * ce0) / 2
    assert abs(pal_loss(logits, y_a, y_b, lam, smoothing=0.1).item() - smoothed_by_hand) < 1e-6
    # and it is the soft cross-entropy against lam * t(y_a) + (1 - lam) * t(y_b), gradient through lam included
    lam_g = lam.clone().requires_grad_(True)
    pal_loss(logits, y_a, y_b, lam_g).backward()
    torch.testing.assert_close(lam_g.grad, torch.tensor([math.log(2.5) - math.log(5.0), math.log(5.0) - math.log(2.5)]) / 2)
    with pytest.raises(ValueError, match="lam"):
        pal_loss(logits, y_a, y_b, torch.ones(3))


def test_maskmix_matches_the_official_formula_on_a_hand_case(monkeypatch):
    # official utils.MaskMix: mask of ceil(K*r) cells from x, upsampled with np.repeat (each cell a block), then
    # samples * mask + flip_samples * (1 - mask); mask_ (patch level) flattened row-major; targets = mixup_target
    # with lam = mask_count / K. Fix the cells, then compare with tensors written out by hand.
    import vitlab.methods.training.mixpro as mixpro

    keep = torch.tensor([[[True, False], [False, True]], [[True, True], [False, False]]])
    monkeypatch.setattr(mixpro, "cell_mask", lambda B, grid, n, generator=None: keep if n == 2 else None)
    x = torch.stack([torch.arange(16.0), 100 + torch.arange(16.0)]).view(2, 1, 4, 4)
    mb = maskmix(x, torch.tensor([0, 2]), patch_size=1, cell_size=2, ratio=0.5, perm=torch.tensor([1, 0]))
    expected = torch.tensor([[[0., 1., 102., 103.], [4., 5., 106., 107.], [108., 109., 10., 11.], [112., 113., 14., 15.]],
                             [[100., 101., 102., 103.], [104., 105., 106., 107.], [8., 9., 10., 11.], [12., 13., 14., 15.]]])
    torch.testing.assert_close(mb.images[:, 0], expected)
    torch.testing.assert_close(mb.patch_keep, torch.tensor([[1., 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1],
                                                            [1., 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(mb.lam_area, torch.tensor([0.5, 0.5]))
    on, off = 0.9 + 0.1 / 3, 0.1 / 3  # official one_hot with smoothing 0.1 over 3 classes
    t = mix_targets(mb.y_a, mb.y_b, mb.lam_area, 3, 0.1)
    torch.testing.assert_close(t, torch.tensor([[(on + off) / 2, off, (on + off) / 2]] * 2))


@pytest.mark.parametrize("make,label", [(maskmix_step, "area"), (transmix_step, "attention"), (mixpro_step, "pal")])
def test_the_three_labels(make, label):
    model = _vit().train()
    x, y = _batch(B=6, C=1)
    step = make(5, cell_size=8, generator=torch.Generator().manual_seed(0))
    step(model, x, y)
    last = step.last
    expected = {"area": last["batch"].lam_area, "attention": last["lam_attn"],
                "pal": pal_lambda(last["batch"].lam_area, last["lam_attn"], last["s"])}[label]
    torch.testing.assert_close(last["lam"], expected)
    eps = 0.1 if label == "area" else 0.0  # the area arm trains on the smoothed MaskMix target; PAL on hard CE
    torch.testing.assert_close(last["targets"],
                               mix_targets(last["batch"].y_a, last["batch"].y_b, expected, 5, eps))
    torch.testing.assert_close(last["targets"].sum(-1), torch.ones(6))


def test_detach_s_changes_only_the_gradient():
    x, y = _batch(B=6, C=1)
    out = {}
    for detach in (False, True):
        model = _vit().train()
        step = mixpro_step(5, cell_size=8, detach_s=detach, generator=torch.Generator().manual_seed(0))
        loss, _ = step(model, x, y)
        loss.backward()
        out[detach] = (loss.detach(), model.head.weight.grad.clone())
    torch.testing.assert_close(out[False][0], out[True][0])
    assert not torch.allclose(out[False][1], out[True][1]), "the official code back-propagates through s"


def test_timm_and_baseline_steps():
    model = _vit().train()
    x, y = _batch(B=6, C=1)
    x0 = x.clone()
    loss, logits = baseline_step(0.1)(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y, label_smoothing=0.1))
    step = timm_mix_step(5, mixup_alpha=0.0, cutmix_alpha=1.0)
    loss, logits = step(model, x, y)
    assert torch.equal(x, x0), "timm's Mixup mixes in place; the step must leave the caller's batch alone"
    assert torch.isfinite(loss) and logits.shape == (6, 5)
    with pytest.raises(ValueError, match="even batch"):
        step(model, x[:5], y[:5])


def test_maskmix_prob_falls_back_to_mixup():
    model = _vit().train()
    x, y = _batch(B=6, C=1)
    calls = []

    def mixup(xx, yy):
        calls.append(1)
        return xx, soft_targets(yy, 5, 0.1)
    step = mixpro_step(5, cell_size=8, maskmix_prob=0.0, mixup=mixup)
    loss, _ = step(model, x, y)
    assert calls == [1] and step.history()["s"] == []
    torch.testing.assert_close(loss, soft_cross_entropy(model(x), soft_targets(y, 5, 0.1)))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    x, y = _batch(B=4, H=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        maskmix(x, y, patch_size=4, cell_size=6)
    with pytest.raises(ValueError, match="divide the image size"):
        maskmix(x, y, patch_size=4, cell_size=12)
    with pytest.raises(ValueError, match="alpha"):
        maskmix(x, y, patch_size=4, cell_size=8, alpha=0.0)
    with pytest.raises(ValueError, match="ratio"):
        maskmix(x, y, patch_size=4, cell_size=8, ratio=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        maskmix(x[:1], y[:1], patch_size=4, cell_size=8)
    with pytest.raises(TypeError, match="y must be"):
        maskmix(x, y.float(), patch_size=4, cell_size=8)
    with pytest.raises(TypeError, match="x must be"):
        maskmix(x[0], y, patch_size=4, cell_size=8)
    with pytest.raises(TypeError, match="patch_size"):
        maskmix(x, y, patch_size=4.0, cell_size=8)
    with pytest.raises(ValueError, match="perm"):
        maskmix(x, y, patch_size=4, cell_size=8, perm=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="attn and patch_keep"):
        attention_lambda(torch.rand(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-negative"):
        attention_lambda(-torch.rand(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="targets and logits"):
        progressive_factor(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        pal_lambda(torch.rand(2), torch.rand(3), torch.rand(2))
    with pytest.raises(ValueError, match="label"):
        MixStep(5, label="cutmix", cell_size=8)
    with pytest.raises(ValueError, match="loss_smoothing"):
        MixStep(5, cell_size=8, loss_smoothing=1.0)
    with pytest.raises(TypeError, match="y_b"):
        pal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), torch.ones(2))
    with pytest.raises(ValueError, match="smoothing"):
        pal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), smoothing=-0.1)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        mixpro_step(5, cell_size=6, patch_size=4)
    with pytest.raises(ValueError, match="needs mixup"):
        mixpro_step(5, cell_size=8, maskmix_prob=0.5)
    with pytest.raises(ValueError, match="smoothing"):
        mixpro_step(5, cell_size=8, smoothing=1.0)
    with pytest.raises(ValueError, match="both 0"):
        timm_mix_step(5, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="multiple of patch_size"):  # the model's own patch size is checked too
        mixpro_step(5, cell_size=6)(_vit(img_size=12, patch_size=4), torch.rand(4, 1, 12, 12), torch.arange(4))
    with pytest.raises(TypeError, match="forward_with_attention"):
        cls_patch_attention(torch.nn.Linear(3, 3), torch.rand(2, 3))


def test_pal_attention_goes_through_the_wrapper_ddp_syncs():
    """DDP syncs the gradients of what its own forward ran: the attention forward must go through the wrapper."""
    import torch
    import torch.nn as nn

    from vitlab.methods.training.mixpro import cls_patch_attention
    from vitlab.models import create_model

    class Wrapper(nn.Module):  # DDP's shape: .module, forward passes through
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *a, **kw):
            self.calls += 1
            return self.module(*a, **kw)

    vit = create_model("vit_nano", depth=1)
    net = Wrapper(vit)
    logits, a = cls_patch_attention(net, torch.rand(2, 1, 28, 28))
    assert net.calls == 1 and logits.shape == (2, 10) and a.shape == (2, vit.patch_embed.num_patches)
