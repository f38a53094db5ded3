"""Polyphase anchoring (CURRICULUM.md #56; official willding123/Shift-Equivariant-Vision-Transformers,
models/poly_utils.py: PolyOrder picks the largest-L2-norm polyphase component, first index on ties, and shifts it
to the origin; its backward applies the inverse shift)."""
import pytest
import torch

from vitlab.methods.architectures import shift_equivariant as S


def test_polyphase_norms_by_hand():
    """A 4x4 image, p = 2: component (i, j) holds pixels x[i::2, j::2]."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 0] = 3.0  # component (1, 0): index 2
    x[0, 0, 3, 2] = 4.0  # also (1, 0)
    x[0, 0, 0, 1] = 1.0  # component (0, 1): index 1
    torch.testing.assert_close(S.polyphase_norms(x, 2), torch.tensor([[0.0, 1.0, 5.0, 0.0]]))


def test_anchor_moves_the_largest_component_to_the_origin():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 5.0  # component (1, 0) -> rolled up by 1 row, 0 columns
    out, idx = S.poly_anchor(x, 2)
    assert idx.tolist() == [2]
    assert out[0, 0, 0, 2] == 5.0 and out.sum() == 5.0


def test_ties_take_the_first_component():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 1] = 2.0  # index 1
    x[0, 0, 1, 1] = 2.0  # index 3, same norm
    _, idx = S.poly_anchor(x, 2)
    assert idx.tolist() == [1]


def test_anchoring_makes_circular_shifts_whole_patch_shifts():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 8, 8, generator=g)
    a, _ = S.poly_anchor(x, 4)
    b, _ = S.poly_anchor(torch.roll(x, shifts=(3, -5), dims=(2, 3)), 4)
    # b is a, rolled by multiples of 4 in each direction
    assert any(torch.equal(b, torch.roll(a, shifts=(4 * i, 4 * j), dims=(2, 3))) for i in range(2) for j in range(2))


def test_the_gradient_of_the_anchor_is_the_inverse_shift():
    """The official PolyOrder.backward rolls the gradient back; autograd of torch.roll does the same."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0  # index 3: shift by (-1, -1)
    x.requires_grad_()
    out, _ = S.poly_anchor(x, 2)
    weight = torch.arange(16.0).reshape(1, 1, 4, 4)
    (out * weight).sum().backward()
    torch.testing.assert_close(x.grad, torch.roll(weight, shifts=(1, 1), dims=(2, 3)))


def test_peg_is_equivariant_to_circular_token_shifts():
    peg = S.PEG(8, (3, 3))
    x = torch.randn(2, 9, 8)
    rolled = x.reshape(2, 3, 3, 8).roll(shifts=(1, 2), dims=(1, 2)).reshape(2, 9, 8)
    want = peg(x).reshape(2, 3, 3, 8).roll(shifts=(1, 2), dims=(1, 2)).reshape(2, 9, 8)
    torch.testing.assert_close(peg(rolled), want)


def test_polyvit_logits_are_invariant_to_circular_shifts():
    torch.manual_seed(0)
    model = S.PolyViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        base = model(x)
        for dy, dx in ((1, 0), (0, 3), (5, -2), (-7, 6)):
            torch.testing.assert_close(model(torch.roll(x, shifts=(dy, dx), dims=(2, 3))), base, atol=1e-5,
                                       rtol=1e-5)


def test_shift_consistency_counts_agreements():
    class FirstPixel(torch.nn.Module):  # predicts from one pixel: not shift-invariant
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], 1 - x[:, 0, 0, 0]], dim=1)

    x = torch.zeros(2, 1, 4, 4)
    x[:, 0, 0, 0] = 1.0
    out = S.shift_consistency(FirstPixel(), x, max_shift=1, num_shifts=3, seed=0)
    moved = (out["shifts"] != 0).any(-1)  # a shift that moves the pixel changes the prediction
    assert out["consistency"] == pytest.approx(1 - moved.float().mean().item())
    invariant = S.PolyViT(img_size=4, patch_size=2, embed_dim=8, depth=1, num_heads=2)
    assert S.shift_consistency(invariant, torch.rand(5, 1, 4, 4), max_shift=2)["consistency"] == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: S.polyphase_norms(torch.rand(1, 1, 6, 6), 4), "polyphase_norms: patch_size=4 must divide"),
    (lambda: S.polyphase_norms(torch.rand(6, 6), 2), "polyphase_norms: x must be"),
    (lambda: S.PolyPatchEmbed(28, 5), "PolyPatchEmbed: patch_size=5 does not divide img_size=28"),
    (lambda: S.PolyViT()(torch.rand(2, 3, 28, 28)), r"PolyPatchEmbed: x is \(3, 28, 28\); expected \(1, 28, 28\)"),
    (lambda: S.PolyViT()(torch.rand(2, 1, 32, 32)), r"PolyPatchEmbed: x is \(1, 32, 32\); .*img_size=28"),
    (lambda: S.PolyViT(embed_dim=30, num_heads=4), "PolyViT: num_heads=4 does not divide embed_dim=30"),
    (lambda: S.circular_shift(torch.rand(2, 1, 4, 4), torch.zeros(3, 2)), "circular_shift: shifts must be"),
    (lambda: S.shift_consistency(3, torch.rand(1, 1, 4, 4)), "shift_consistency: model must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
