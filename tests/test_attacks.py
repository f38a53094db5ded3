"""vitlab.attacks: PGD stays inside the ε-ball, [0, 1] and its mask, ascends the loss, matches a hand-computed
first step on a linear model, is reproducible; patch masks are one grid cell; fooling rate counts; bad input."""
import pytest
import torch
import torch.nn as nn

from tests.model_helpers import tiny_vit
from vitlab.attacks import fooling_rate, patch_mask, pgd


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_patch_mask_is_one_grid_cell_per_image_and_seeded():
    x, _ = _batch()
    m = patch_mask(x, 4, seed=3)
    assert m.shape == (8, 1, 16, 16) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == 16).all(), "one 4x4 cell"
    cells = m[:, 0].view(8, 4, 4, 4, 4)  # [N, gh, P, gw, P]
    assert (cells.all(4).all(2) == cells.any(4).any(2)).all(), "grid-aligned: a cell is in whole or not at all"
    assert torch.equal(m, patch_mask(x, 4, seed=3))
    assert (patch_mask(x, 4, patches=3).flatten(1).sum(1) == 48).all()


def test_pgd_stays_in_the_ball_the_range_and_the_mask():
    model, (x, y) = tiny_vit(), _batch()
    mask = patch_mask(x, 4, seed=0)
    adv = pgd(model, x, y, eps=0.1, steps=5, mask=mask)
    d = adv - x
    assert d.abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (d[~mask.expand_as(d)] == 0).all(), "outside the mask nothing changes"
    assert (d[mask.expand_as(d)] != 0).any()


def test_pgd_ascends_the_loss_and_is_reproducible():
    model, (x, y) = tiny_vit(), _batch(32)
    adv, losses = pgd(model, x, y, eps=8 / 255, steps=5, random_start=False, return_losses=True)
    assert losses.shape == (6,)
    assert (losses[1:4] > losses[:3]).all(), "the first steps raise the loss"
    assert losses[-1] > losses[0]
    assert torch.equal(pgd(model, x, y, eps=0.05, steps=3, seed=1), pgd(model, x, y, eps=0.05, steps=3, seed=1))
    assert not model.training and all(p.grad is None for p in model.parameters()), "no parameter gradients"


def test_one_step_on_a_linear_model_is_the_signed_gradient():
    # logits = W x with two classes: d CE / d x for label 0 is (p - onehot) W = p1 (w1 - w0), so one step of size a
    # moves each pixel by a * sign(w1 - w0) (clamped to [0, 1])
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        lin[1].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.5], [0.0, 1.0, -1.0, 1.5]]))
    x = torch.full((1, 1, 2, 2), 0.5)
    adv = pgd(lin, x, torch.tensor([0]), eps=0.3, steps=1, step_size=0.2, random_start=False)
    assert torch.allclose(adv.flatten(), torch.tensor([0.3, 0.7, 0.3, 0.7]))


def test_fooling_rate_counts_only_correct_images():
    class Fixed(nn.Module):  # predicts class 0 unless the first pixel is above 0.5
        def forward(self, x):
            return torch.stack([0.5 - x[:, 0, 0, 0], x[:, 0, 0, 0] - 0.5], dim=1)

    x = torch.zeros(4, 1, 2, 2)
    labels = torch.tensor([0, 0, 0, 1])  # the last one is wrong already
    adv = x.clone()
    adv[0, 0, 0, 0] = 1.0
    assert fooling_rate(Fixed(), x, adv, labels) == pytest.approx(1 / 3)


def test_bad_input_names_the_argument():
    model, (x, y) = tiny_vit(), _batch()
    with pytest.raises(ValueError, match="images must be"):
        pgd(model, x[0], y, eps=0.1, steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 3, y, eps=0.1, steps=1)
    with pytest.raises(ValueError, match="labels"):
        pgd(model, x, y[:3], eps=0.1, steps=1)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="mask"):
        pgd(model, x, y, eps=0.1, steps=1, mask=torch.ones(8, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_size=5 must divide"):
        patch_mask(x, 5)
    with pytest.raises(ValueError, match="patches"):
        patch_mask(x, 4, patches=17)
    with pytest.raises(ValueError, match="adversarial"):
        fooling_rate(model, x, x[:2], y)
    with pytest.raises(TypeError, match="model"):
        fooling_rate("vit", x, x, y)


def test_a_custom_loss_is_ascended_instead_of_the_cross_entropy():
    # loss = the sum of the pixels: one signed step of size eps brightens every pixel by eps (clamped to 1)
    model, (x, y) = tiny_vit(), _batch()
    adv = pgd(model, x, y, eps=0.1, steps=1, step_size=0.1, random_start=False,
              loss_fn=lambda a, clean, labels: a.sum())
    assert torch.allclose(adv, (x + 0.1).clamp(max=1))
    with pytest.raises(TypeError, match="loss_fn"):
        pgd(model, x, y, eps=0.1, steps=1, loss_fn="cosine")
