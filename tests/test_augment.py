"""vitlab.augment: patch-aligned masks paste whole cells, and the soft labels sum to one."""
import pytest
import torch

from vitlab.augment import cell_mask, cells_to_pixels, mix_targets, paste, soft_cross_entropy, soft_targets


def test_soft_targets_by_hand():
    t = soft_targets(torch.tensor([2, 0]), 4, smoothing=0.2)
    torch.testing.assert_close(t, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]))


def test_mix_targets_sum_to_one_and_weight_by_lam():
    t = mix_targets(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0.75, 0.5]), 3)
    torch.testing.assert_close(t, torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(mix_targets(torch.tensor([0]), torch.tensor([2]), 0.3, 3, 0.1).sum(-1), torch.ones(1))


def test_soft_cross_entropy_equals_hard_on_one_hot():
    logits, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(soft_cross_entropy(logits, soft_targets(y, 4)), torch.nn.functional.cross_entropy(logits, y))


def test_cell_mask_exact_counts():
    m = cell_mask(6, (3, 4), torch.tensor([0, 1, 5, 12, 7, 3]), generator=torch.Generator().manual_seed(0))
    assert m.shape == (6, 3, 4) and m.flatten(1).sum(1).tolist() == [0, 1, 5, 12, 7, 3]
    with pytest.raises(ValueError, match="n_cells"):
        cell_mask(2, (2, 2), 5)


def test_paste_takes_whole_cells_from_the_partner():
    a, b = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    cells = torch.tensor([[[True, False], [False, False]]])
    out = paste(a, b, cells)
    assert out[0, 0, :2, :2].eq(1).all() and out.sum() == 4
    assert torch.equal(cells_to_pixels(cells, 2)[0, 0].float(), out[0, 0])
    with pytest.raises(ValueError, match="dividing"):
        paste(a, b, torch.ones(1, 3, 3, dtype=torch.bool))


def test_random_resized_crop_samples_the_box_bilinearly():
    from torchvision.transforms import v2

    from vitlab.augment import random_resized_crop

    ramp = torch.arange(32.0).expand(32, 32)  # value = column index: bilinear sampling reproduces it exactly
    x = torch.stack([ramp, ramp.T])[:, None]  # [2, 1, 32, 32]: columns, then rows
    torch.manual_seed(3)
    out = random_resized_crop(x, (0.3, 0.6))
    torch.manual_seed(3)
    boxes = [v2.RandomResizedCrop.get_params(img, [0.3, 0.6], [3 / 4, 4 / 3]) for img in x]
    j = torch.arange(32.0)
    (top0, left0, h0, w0), (top1, left1, h1, w1) = boxes
    assert torch.allclose(out[0, 0, 5], left0 + (j + 0.5) * w0 / 32 - 0.5, atol=1e-4)  # pixel centres of the box
    assert torch.allclose(out[1, 0, :, 5], top1 + (j + 0.5) * h1 / 32 - 0.5, atol=1e-4)
    assert out.shape == x.shape


def test_random_resized_crop_is_seeded_and_checks_its_arguments():
    from vitlab.augment import random_resized_crop

    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(0)
    a = random_resized_crop(x)
    torch.manual_seed(0)
    assert torch.equal(a, random_resized_crop(x))
    assert torch.allclose(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0)), x, atol=1e-5)  # the whole image
    for kwargs, match in ((dict(scale=(0.5, 1.5)), "at most 1"), (dict(scale=(0.0, 1.0)), "scale must be"),
                          (dict(ratio=(2.0, 1.0)), "ratio must be")):
        with pytest.raises(ValueError, match=match):
            random_resized_crop(x, **kwargs)
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B,C,H,W\]"):
        random_resized_crop(x[0])
