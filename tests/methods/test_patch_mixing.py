"""Patch Mixing: identity at r = 0, exactly N₁ grid-aligned cells pasted, labels = area, out-of-context donors of
another class, the CNN equal to torchvision's ResNet-18 layout, and bad input."""
import pytest
import torch
import torchvision

from vitlab.augment import soft_cross_entropy, soft_targets
from vitlab.methods.training.patch_mixing import (PatchMix, SmallCNN, patchmix_step, replace_out_of_context,
                                                   robustness_curves, small_cnn)
from vitlab.train import fit


def _batch(B=6, C=1, H=8, W=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g), torch.arange(B) % classes


def _changed_cells(a, b, P):
    """[B, gh, gw] bool: which P×P cells differ between a and b; also whether each cell changed as a whole."""
    B, C, H, W = a.shape
    diff = (a != b).any(1).view(B, H // P, P, W // P, P)
    return diff.any(4).any(2), (diff.all(4).all(2) == diff.any(4).any(2)).all()


# ------------------------------------------------------------------------------------------------ PatchMix
def test_r_zero_is_the_identity():
    x, y = _batch()
    mixer = PatchMix(4, 3, smoothing=0.1, seed=0)
    x_mix, targets, cells = mixer(x, y, n_cells=0)
    assert torch.equal(x_mix, x)
    assert not cells.any()
    assert torch.allclose(targets, soft_targets(y, 3, smoothing=0.1))


def test_exactly_n1_cells_pasted_from_the_partner_and_grid_aligned():
    x, y = _batch(B=5, H=12, W=8)  # a 3x2 grid of 4x4 cells; random pixels, so every pasted cell differs
    perm = torch.tensor([1, 2, 3, 4, 0])  # no image is its own partner
    n = torch.tensor([0, 1, 2, 3, 6])
    x_mix, _, mask_cells = PatchMix(4, 3, max_ratio=1.0)(x, y, n_cells=n, perm=perm)
    cells, whole = _changed_cells(x_mix, x, 4)
    assert whole, "a cell is pasted whole or not at all"
    assert torch.equal(cells.flatten(1).sum(1), n)
    assert torch.equal(cells, mask_cells), "the returned mask is the pasted cells"
    mask = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert torch.equal(x_mix, torch.where(mask, x[perm], x)), "x~ = (1 - M) x_A + M x_B"


def test_random_n1_stays_in_range_and_covers_it():
    x, y = _batch(B=400, H=8, W=8)  # 4 cells, max_ratio 0.5 -> N1 in {0, 1, 2}
    _, _, cells = PatchMix(4, 3, max_ratio=0.5, seed=1)(x, y)
    assert set(cells.flatten(1).sum(1).tolist()) == {0, 1, 2}
    a, b = PatchMix(4, 3, seed=3)(x, y), PatchMix(4, 3, seed=3)(x, y)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "a seed gives the same mix"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_labels_sum_to_one_and_equal_the_area(smoothing):
    x, y = _batch(B=4, H=8, W=8, classes=4)  # labels 0, 1, 2, 3
    perm = torch.tensor([1, 0, 3, 2])
    n = torch.tensor([1, 2, 3, 0])  # of 4 cells
    _, targets, cells = PatchMix(4, 4, max_ratio=1.0, smoothing=smoothing)(x, y, n_cells=n, perm=perm)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    r = n / 4
    off = smoothing / 4
    rows = torch.arange(4)
    assert torch.allclose(targets[rows, y], (1 - r) * (1 - smoothing) + off)
    assert torch.allclose(targets[rows, y[perm]], r * (1 - smoothing) + off)
    assert torch.allclose(cells.flatten(1).float().mean(1), r), "r is the pasted area"


def test_same_class_partner_keeps_the_label():
    x, _ = _batch(B=2)
    y = torch.tensor([1, 1])
    _, targets, _ = PatchMix(4, 3, max_ratio=1.0, smoothing=0.0)(x, y, n_cells=2, perm=torch.tensor([1, 0]))
    assert torch.equal(targets, soft_targets(y, 3))


def test_step_fn_trains_with_fit():
    x, y = _batch(B=32, H=8, W=8, classes=2, seed=2)
    mixer = PatchMix(4, 2, seed=0)
    net = small_cnn(widths=(4, 8), in_chans=1, num_classes=2)
    step = patchmix_step(mixer)
    loss, logits = step(net, x, y)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (32, 2)
    # the loss is the soft cross-entropy on the batch the mixer makes with the same draws
    mixer.generator.manual_seed(5)
    torch.manual_seed(0)
    net.eval()
    loss, logits = step(net, x, y)
    mixer.generator.manual_seed(5)
    x_mix, targets, _ = mixer(x, y)
    assert torch.allclose(loss, soft_cross_entropy(net(x_mix), targets))
    hist = fit(net, (x, y), None, profile="smoke", epochs=1, batch_size=16, shift=0, step_fn=step, progress=False)
    assert len(hist["train_loss"]) == 1 and torch.isfinite(torch.tensor(hist["train_loss"][0]))


# ------------------------------------------------------------------------------------------------ out of context
def test_out_of_context_uses_only_other_classes():
    x, y = _batch(B=30, H=8, W=8, classes=3)
    previous, first_donors = None, None
    for frac, n in [(0.0, 0), (0.25, 1), (0.5, 2), (1.0, 4)]:
        out, donors = replace_out_of_context(x, y, frac, 4, seed=1)
        assert (y[donors] != y).all(), "every donor is an image of another class"
        first_donors = donors if first_donors is None else first_donors
        assert torch.equal(donors, first_donors), "the same donors at every fraction"
        cells, whole = _changed_cells(out, x, 4)
        assert previous is None or (cells | ~previous).all(), "replaced patches are nested as f grows"
        previous = cells
        assert whole and (cells.flatten(1).sum(1) == n).all(), f"exactly round({frac}*4) = {n} cells replaced"
        mask = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
        assert torch.equal(out, torch.where(mask, x[donors], x))
    a, b = replace_out_of_context(x, y, 0.5, 4, seed=2), replace_out_of_context(x, y, 0.5, 4, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_donors_are_uniform_over_the_other_classes():
    x = torch.rand(8, 1, 8, 8)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    seen = torch.zeros(8, 8)
    for seed in range(400):
        seen[torch.arange(8), replace_out_of_context(x, y, 0.5, 4, seed=seed)[1]] += 1
    other = y[:, None] != y[None, :]
    assert (seen[~other] == 0).all() and (seen[other] > 0).all(), "every other-class image can be a donor"
    share = seen / 400  # image 0 has 4 possible donors, image 3 has 6
    assert (share[0, other[0]] - 1 / 4).abs().max() < 0.1 and (share[3, other[3]] - 1 / 6).abs().max() < 0.1


def test_robustness_curves_shape_and_clean_point():
    from vitlab.data import ImageDataset

    x, y = _batch(B=20, H=8, W=8, classes=2)
    ds = ImageDataset(x, y, name="t", split="test", classes=["a", "b"])
    net = small_cnn(ds, widths=(4,)).eval()
    c = robustness_curves(net, ds, 4, fractions=(0.0, 0.5), severities=(1, 5))
    assert len(c["out_of_context"]) == 2 and len(c["occlusion"]) == len(c["patch_shuffle"]) == 2
    assert c["out_of_context"][0] == c["clean"], "no patch replaced = clean accuracy"


# ------------------------------------------------------------------------------------------------ CNN
def test_resnet18_layout_equals_torchvision():
    """widths (64,128,256,512) × 2 blocks with a 3×3 stride-1 stem is torchvision's ResNet-18 with the CIFAR stem."""
    ours = SmallCNN(3, 10, widths=(64, 128, 256, 512), blocks=2, stem_stride=1).eval()
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = torch.nn.Identity()
    ref.eval()
    src, dst = ours.state_dict(), ref.state_dict()
    assert len(src) == len(dst)
    torch.manual_seed(0)
    for (k, v), (k2, v2) in zip(src.items(), dst.items()):  # the same order, module by module
        assert v.shape == v2.shape, (k, k2)
        if k.endswith("running_var"):
            v.copy_(torch.rand_like(v) + 0.5)
        elif v.is_floating_point():
            v.copy_(torch.randn_like(v) * 0.1)
    ref.load_state_dict(dict(zip(dst.keys(), src.values())))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 11_173_962


def test_small_cnn_is_about_vit_nano_size():
    from vitlab.models import create_model

    cnn = small_cnn(in_chans=1, num_classes=10)
    vit = create_model("vit_nano")
    n_cnn, n_vit = (sum(p.numel() for p in m.parameters()) for m in (cnn, vit))
    assert 0.5 < n_cnn / n_vit < 2
    assert cnn(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, err", [
    (dict(patch_size=0, num_classes=3), ValueError), (dict(patch_size=4.0, num_classes=3), TypeError),
    (dict(patch_size=4, num_classes=1), ValueError), (dict(patch_size=4, num_classes=3, max_ratio=1.5), ValueError),
    (dict(patch_size=4, num_classes=3, smoothing=1.0), ValueError),
    (dict(patch_size=4, num_classes=3, max_ratio="half"), TypeError),
])
def test_bad_mixer_arguments(kwargs, err):
    with pytest.raises(err):
        PatchMix(**kwargs)


def test_bad_call_arguments():
    x, y = _batch()
    mixer = PatchMix(4, 3)
    with pytest.raises(ValueError, match="patch_size"):
        PatchMix(3, 3)(x, y)
    with pytest.raises(TypeError, match="labels"):
        mixer(x, y.float())
    with pytest.raises(TypeError, match="images"):
        mixer(x[0], y)
    with pytest.raises(ValueError, match="perm"):
        mixer(x, y, perm=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="n_cells"):
        mixer(x, y, n_cells=5)
    with pytest.raises(TypeError, match="mixer"):
        patchmix_step("mix")
    with pytest.raises(ValueError, match="another class"):
        replace_out_of_context(x, torch.zeros(6, dtype=torch.long), 0.5, 4)
    with pytest.raises(ValueError, match="fraction"):
        replace_out_of_context(x, y, 1.5, 4)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=())
    with pytest.raises(TypeError, match="model"):
        robustness_curves("net", None, 4)


# ------------------------------------------------------------------------------------------------ the CutMix control
def test_cutmix_step_pastes_one_box_and_mixes_labels_by_its_area():
    import numpy as np

    from vitlab.methods.training.patch_mixing import cutmix_step

    x, y = _batch(B=4, H=8, W=8, classes=3)
    keep = x.clone()
    seen = {}

    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0], [-1.0, 1.0, 0.0]])

    def net(inp):
        seen["x"] = inp
        return logits

    np.random.seed(0)  # a draw that pastes a box of 25 of the 64 pixels
    step = cutmix_step(3, smoothing=0.0)
    loss, _ = step(net, x, y)
    assert torch.equal(x, keep), "the caller's batch is not pasted into"
    x_mix = seen["x"]
    changed = (x_mix != x).any(1)  # [B, H, W]: pixels that came from the partner (random pixels always differ)
    rows, cols = changed.any(0).any(1).nonzero().flatten(), changed.any(0).any(0).nonzero().flatten()
    # one box, the same for the whole batch, taken from the batch in reverse order
    if len(rows):
        box = torch.zeros(8, 8, dtype=torch.bool)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert all(torch.equal(c, box) for c in changed)
        assert torch.equal(x_mix[:, :, box], x.flip(0)[:, :, box])
    area = changed[0].float().mean().item()
    targets = torch.zeros(4, 3)
    targets[torch.arange(4), y] += 1 - area
    targets[torch.arange(4), y.flip(0)] += area
    # labels mixed by the pasted area (timm's correct_lam), soft cross-entropy on them
    assert 0 < area < 1
    by_hand = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5


def test_cutmix_step_bad_input():
    from vitlab.methods.training.patch_mixing import cutmix_step

    with pytest.raises(TypeError, match="num_classes"):
        cutmix_step(2.5)
    with pytest.raises(ValueError, match="alpha"):
        cutmix_step(10, alpha=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        cutmix_step(10, smoothing=1.0)
