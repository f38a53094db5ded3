"""The shared argument checks in ``vitlab.checks``: ``check_heads``, ``check_images`` and ``check_batch``."""
import numpy as np
import pytest
import torch

from vitlab.checks import check_batch, check_heads, check_images


def test_check_heads_returns_the_head_width():
    assert check_heads(64, 4, "f") == 16
    assert check_heads(np.int64(12), 3, "f") == 4
    assert type(check_heads(np.int64(12), 3, "f")) is int


@pytest.mark.parametrize("dim, num_heads, err, match", [
    (10, 3, ValueError, r"^Attn: num_heads=3 does not divide dim=10$"),
    (8, 0, ValueError, r"Attn: num_heads must be an int >= 1, got 0"),
    (0, 2, ValueError, r"Attn: dim must be an int >= 1, got 0"),
    (8.0, 2, TypeError, r"Attn: dim must be an int, got float"),
    (8, True, TypeError, r"Attn: num_heads must be an int, got bool"),
])
def test_check_heads_rejects(dim, num_heads, err, match):
    with pytest.raises(err, match=match):
        check_heads(dim, num_heads, "Attn")


def test_check_images_passes_a_good_batch_through():
    x = torch.zeros(2, 1, 28, 28)
    assert check_images(x, 1, 28, "M") is x


@pytest.mark.parametrize("x, match", [
    (torch.zeros(1, 28, 28), r"M: x must be an image batch \[B, C, H, W\], got \(1, 28, 28\)"),
    (torch.zeros(2, 1, 1, 28, 28), r"M: x must be an image batch \[B, C, H, W\], got \(2, 1, 1, 28, 28\)"),
    ([[1.0]], r"M: x must be an image batch \[B, C, H, W\], got list"),
    (torch.zeros(2, 3, 28, 28), r"^M: x is \(3, 28, 28\); expected \(1, 28, 28\) \(in_chans=1, img_size=28\)$"),
    (torch.zeros(2, 1, 32, 32), r"^M: x is \(1, 32, 32\); expected \(1, 28, 28\) \(in_chans=1, img_size=28\)$"),
    (torch.zeros(2, 1, 28, 32), r"M: x is \(1, 28, 32\)"),
])
def test_check_images_rejects(x, match):
    with pytest.raises(ValueError, match=match):
        check_images(x, 1, 28, "M")


def test_check_images_names_the_argument():
    with pytest.raises(ValueError, match=r"M: images is \(3, 8, 8\)"):
        check_images(torch.zeros(1, 3, 8, 8), 1, 8, "M", name="images")


def test_check_batch_names_the_argument():
    check_batch(torch.zeros(2, 1, 4, 4), torch.zeros(2), "f")
    with pytest.raises(ValueError, match="f: images must be a tensor \\[N, C, H, W\\], got \\(2, 4, 4\\)"):
        check_batch(torch.zeros(2, 4, 4), torch.zeros(2), "f")
    with pytest.raises(ValueError, match="f: labels must be a tensor \\[N=2\\], got \\(3,\\)"):
        check_batch(torch.zeros(2, 1, 4, 4), torch.zeros(3), "f")
    with pytest.raises(ValueError, match="labels must be a tensor \\[N=2\\], got list"):
        check_batch(torch.zeros(2, 1, 4, 4), [0, 1], "f")
