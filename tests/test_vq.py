"""vitlab.vq: nearest code on a 2-D hand case, straight-through gradient = identity, the codebook and commitment
terms by hand (and legacy's swap), the l2-normalised factorised lookup picks by cosine, codebook usage on hand
histograms, bad input."""
import math

import pytest
import torch

from vitlab.vq import VectorQuantizer, codebook_usage


def vq_with(codebook, **kw):
    q = VectorQuantizer(len(codebook), 2, **kw)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.tensor(codebook))
        if q.factorized:  # identity projections: the lookup space is z's own
            for lin in (q.proj_in, q.proj_out):
                lin.weight.copy_(torch.eye(2))
                lin.bias.zero_()
    return q


def test_nearest_code_2d():
    q = vq_with([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.2, 0.1], [0.6, 0.6]])
    out, idx, _ = q(z)
    assert idx.tolist() == [1, 2, 0, 1]  # (0.6, 0.6): codes 1 and 2 tie (0.52 vs 0.72 for code 0): the first wins
    torch.testing.assert_close(out, q.codebook.weight[idx].detach())
    assert torch.equal(q.encode(z), idx)
    torch.testing.assert_close(q.decode(idx), out.detach())
    # leading dims are kept
    out3, idx3, _ = q(z.reshape(2, 2, 2))
    assert idx3.shape == (2, 2) and out3.shape == (2, 2, 2)


def test_straight_through_gradient_is_identity():
    q = vq_with([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8]], requires_grad=True)
    out, _, _ = q(z)
    (out * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # d out / d z = I
    assert q.codebook.weight.grad is None  # the output alone does not move the codes


@pytest.mark.parametrize("legacy", [False, True])
def test_codebook_and_commitment_terms_by_hand(legacy):
    """z = (0.2, 0.1), nearest code (0, 0): both terms are mean((e − z)²) = (0.04 + 0.01)/2 = 0.025, so
    loss = 1.25 · 0.025 = 0.03125 either way; the gradients tell the terms apart:
    commitment (on z)    w_c · 2(z − e)/2 = w_c · (0.2, 0.1)
    codebook (on e)      w_b · 2(e − z)/2 = w_b · (−0.2, −0.1)
    with (w_b, w_c) = (1, β) as the papers, (β, 1) with legacy=True (taming's legacy, thuanz123)."""
    beta = 0.25
    q = vq_with([[0.0, 0.0], [1.0, 1.0]], beta=beta, legacy=legacy)
    z = torch.tensor([[0.2, 0.1]], requires_grad=True)
    _, idx, loss = q(z)
    assert idx.tolist() == [0]
    torch.testing.assert_close(loss, torch.tensor(0.03125))
    loss.backward()
    w_b, w_c = (beta, 1.0) if legacy else (1.0, beta)
    torch.testing.assert_close(z.grad, w_c * torch.tensor([[0.2, 0.1]]))
    torch.testing.assert_close(q.codebook.weight.grad, torch.tensor([[-0.2 * w_b, -0.1 * w_b], [0.0, 0.0]]))


def test_l2_normalised_factorised_lookup_picks_by_cosine():
    """Codes (10, 1) and (0.5, 0.5), z = (2, 0): Euclid picks the near short code 1 (distance² 2.5 vs 65);
    cosine picks code 0 (cos 10/√101 ≈ 0.995 vs 0.707)."""
    book = [[10.0, 1.0], [0.5, 0.5]]
    z = torch.tensor([[2.0, 0.0]])
    assert vq_with(book)(z)[1].tolist() == [1]
    q = vq_with(book, factorized=True, code_dim=2, l2_normalized=True)
    out, idx, loss = q(z)
    assert idx.tolist() == [0]
    torch.testing.assert_close(out, torch.tensor([[10.0, 1.0]]) / math.sqrt(101))  # the unit code, projected back
    # loss on unit vectors: ‖u − e‖² = 2 − 2 cos, mean over the 2 elements, × (1 + β)
    cos = 10 / math.sqrt(101)
    torch.testing.assert_close(loss, torch.tensor(1.25 * (2 - 2 * cos) / 2))
    # l2 without factorisation picks by cosine too
    assert vq_with(book, l2_normalized=True)(z)[1].tolist() == [0]


def test_factorised_shapes_and_gradients():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 12, factorized=True, l2_normalized=True)  # default code_dim 8
    assert q.codebook.weight.shape == (16, 8) and q.code_dim == 8
    z = torch.randn(2, 5, 12, requires_grad=True)
    out, idx, loss = q(z)
    assert out.shape == (2, 5, 12) and idx.shape == (2, 5) and idx.dtype == torch.int64
    (out.sum() + loss).backward()
    for p in (z, q.proj_in.weight, q.proj_out.weight, q.codebook.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    torch.testing.assert_close(q.decode(idx), out.detach())
    assert torch.allclose(q.codes().norm(dim=1), torch.ones(16))
    # codebook init as taming: uniform(−1/K, 1/K)
    assert VectorQuantizer(16, 12).codebook.weight.abs().max() <= 1 / 16


def test_codebook_usage_by_hand():
    u = codebook_usage(torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), 8)  # 4 codes, each twice
    assert u["perplexity"] == pytest.approx(4.0) and u["used"] == 0.5
    assert u["counts"].tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    one = codebook_usage(torch.zeros(2, 3, dtype=torch.long), 4)  # collapse: one code
    assert one["perplexity"] == pytest.approx(1.0) and one["used"] == 0.25
    # p = (3/4, 1/4): H = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335, perplexity e^H = 1.754765
    skew = codebook_usage(torch.tensor([[0, 0], [0, 1]]), 2)
    assert skew["perplexity"] == pytest.approx(1.754765, abs=1e-6) and skew["used"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuantizer(0, 4)
    with pytest.raises(ValueError, match="code_dim"):
        VectorQuantizer(8, 4, code_dim=2)
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer(8, 4, beta=-1.0)
    q = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="z must be a tensor"):
        q(torch.randn(3, 5))
    with pytest.raises(ValueError, match="indices"):
        q.decode(torch.tensor([8]))
    with pytest.raises(ValueError, match="indices must be in 0..3"):
        codebook_usage(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError, match="indices"):
        codebook_usage(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="num_codes"):
        codebook_usage(torch.tensor([0]), 0)
