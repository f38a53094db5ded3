"""Hyena N-D (official Itamarzimm/HyenaND, pytorch-image-models/timm/models/layers/hyena2d.py; CURRICULUM.md
#53). Not installed: the tests pin the official operator's behaviour on hand-checkable cases."""
import math

import pytest
import torch

from vitlab.methods.architectures import hyena_nd as H
from vitlab.models import create_model


def test_fftconv2d_is_the_causal_conv_over_2L_plus_bias():
    """The official fftconv2d divides the FFT of k by fft_size = 2L: causal conv / (2L), plus bias * u."""
    g = torch.Generator().manual_seed(0)
    u, k, b = torch.randn(2, 3, 5, 5, generator=g), torch.randn(3, 5, 5, generator=g), torch.randn(3, generator=g)
    want = H.causal_conv2d(u, k) / 10 + u * b[:, None, None]
    torch.testing.assert_close(H.fftconv2d(u, k, b), want, atol=1e-5, rtol=1e-5)


def test_causal_conv_by_hand():
    """A single 1 at (0, 0) of u reproduces the filter; a 1 at (1, 1) shifts it down-right (causal)."""
    k = torch.arange(9.0).reshape(1, 3, 3)
    u = torch.zeros(1, 1, 3, 3)
    u[0, 0, 0, 0] = 1
    torch.testing.assert_close(H.causal_conv2d(u, k)[0], k)
    u = torch.zeros(1, 1, 3, 3)
    u[0, 0, 1, 1] = 1
    want = torch.zeros(1, 3, 3)
    want[0, 1:, 1:] = k[0, :2, :2]
    torch.testing.assert_close(H.causal_conv2d(u, k)[0], want)


def test_the_operator_is_causal_and_flip_reverses_it():
    """Order 2, no flip: the output at (i, j) depends on inputs at (p <= i, q <= j) only, through the long conv
    (the short 3x3 conv and the gates add a one-token halo)."""
    torch.manual_seed(0)
    op = H.HyenaOperator2d(8, grid=6)
    x = torch.randn(1, 36, 8, requires_grad=True)
    op(x)[0, 2 * 6 + 2].sum().backward()  # token (2, 2)
    influence = x.grad[0].abs().sum(-1).reshape(6, 6)
    tiny = 1e-6 * influence.max()  # the FFT leaves round-off, not signal
    assert influence[4:, :].max() < tiny and influence[:, 4:].max() < tiny  # nothing from rows/cols >= 2 + 2
    op.flip = True
    x.grad = None
    op(x)[0, 2 * 6 + 2].sum().backward()
    influence = x.grad[0].abs().sum(-1).reshape(6, 6)
    tiny = 1e-6 * influence.max()
    assert influence[:1, :].max() < tiny and influence[:, :1].max() < tiny  # the other direction


def test_filter_is_separable_and_decays():
    f = H.ImplicitFilter2d(channels=4, grid=5)
    h = f()
    assert h.shape == (4, 5, 5)
    for c in range(4):  # rank one per channel: h[c] = hx[:, c] hy[:, c]^T
        s = torch.linalg.svdvals(h[c].detach())
        assert s[1] <= 1e-5 * max(s[0].item(), 1e-12)
    decay = torch.exp(-f.t * f.deltas.abs())
    assert (decay[-1] < decay[0]).all() and decay[-1, -1] == pytest.approx(1e-2 ** (1 / 0.3), rel=1e-4)


def test_position_features_are_the_official_ones():
    """emb_dim 3: (t, cos, -sin) of 2 pi n / L with one band at frequency 1e-4."""
    f = H.ImplicitFilter2d(channels=2, grid=4)
    n = torch.arange(4.0)
    w = 2 * math.pi * n / 4
    want = torch.stack([torch.linspace(0, 1, 4), torch.cos(1e-4 * w), -torch.sin(1e-4 * w)], dim=1)
    torch.testing.assert_close(f.z.detach(), want)


def test_mixers_and_layout():
    hy, hybrid, att = (create_model(f"ch1_hyena_{m}") for m in H.MIXERS)
    assert all(isinstance(b.attn, H.HyenaOperator2d) for b in hy.blocks)
    assert [isinstance(b.attn, H.HyenaOperator2d) for b in hybrid.blocks] == [True, True, False, False]
    assert [b.attn.flip for b in hy.blocks] == [True, False, True, False]  # directions alternate ("seq")
    assert not any(isinstance(b.attn, H.HyenaOperator2d) for b in att.blocks) and att.cls_token is None
    assert hy(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("call, match", [
    (lambda: H.hyena_vit(mixer="mamba"), "hyena_vit: mixer must be one of"),
    (lambda: H.hyena_vit(patch_size=5), "hyena_vit: patch_size=5 does not divide img_size=28"),
    (lambda: H.HyenaOperator2d(8, grid=3)(torch.randn(1, 10, 8)), "HyenaOperator2d: 10 tokens; expected a square"),
    (lambda: H.ImplicitFilter2d(4, 5, emb_dim=4), "ImplicitFilter2d: emb_dim must be odd"),
    (lambda: H.HyenaOperator2d(0, grid=3), "HyenaOperator2d: dim must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
