"""LLaVA-SP (official CnFaker/LLaVA-SP, llava/model/llava_arch.py, llava/model/multimodal_encoder/clip_encoder.py; not
installed): the nested crops by index arithmetic, the pooling and DFI pieces on cases worked by hand, both variants
against numbers from the official code paths at the official 24 x 24 grid, TinyVLM with the spatial projector (a loss
and a backward on caption scenes), and bad input."""
import pytest
import torch
import torch.nn as nn

from tests.model_helpers import tiny_vit
from vitlab import vlm
from vitlab.methods.vision_language import llava_sp as sp


# ------------------------------------------------------------------------------------------------ crops and sides
def test_nested_crops_by_hand():
    """12 x 12 grid, sides 2, 4, ..., 12: crop k covers rows and columns 5-k .. 6+k (the centre 2 x 2 is cells 5, 6)."""
    assert sp.crop_sides(12) == (2, 4, 6, 8, 10, 12)
    assert sp.nested_crops(12) == [(5, 7), (4, 8), (3, 9), (2, 10), (1, 11), (0, 12)]
    # the official's 24 x 24: F[10-i : 14+i] for i = 0, 2, ..., 10 (clip_encoder.py, a = '336_6_tokens')
    assert sp.nested_crops(24) == [(10 - i, 14 + i) for i in range(0, 12, 2)]
    assert sp.nested_crops(7, sides=(1, 3, 7)) == [(3, 4), (2, 5), (0, 7)]


def test_crop_sfe_reads_exactly_its_crop():
    """A conv with all-ones weights sums its crop: on a map that is 1 at one cell only, crop k's token is 1 iff the
    cell lies in crop k. Cell (3, 8) of 12 x 12 is in the crops with start <= 3 and 8 < stop: (3, 9), (2, 10), (1, 11), (0, 12)."""
    sfe = sp.CroppingSFE(1, 1, 12)
    for conv in sfe.convs:
        nn.init.ones_(conv.weight)
    fmap = torch.zeros(1, 1, 12, 12)
    fmap[0, 0, 3, 8] = 1.0
    assert sfe(fmap)[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1]


def test_pool_sides():
    assert sp.pool_sides(24) == (4, 8, 12, 16, 20, 24)  # the official
    assert sp.pool_sides(12) == (2, 4, 6, 8, 10, 12)
    assert sp.pool_sides(8) == (1, 3, 4, 5, 7, 8)  # round(8 k / 6)


def test_pooling_sfe_constant_map_by_hand():
    """Pooling keeps a constant map c constant, so with all-ones weights token k = c * Dv * s_k^2 (a sum over the
    kernel): Dv = 3, c = 0.5, sides 2..12 -> 1.5 * (4, 16, 36, 64, 100, 144)."""
    sfe = sp.PoolingSFE(3, 2, 12)
    for conv in sfe.convs:
        nn.init.ones_(conv.weight)
    out = sfe(torch.full((2, 3, 12, 12), 0.5))
    assert out.shape == (2, 6, 2)
    want = torch.tensor([1.5 * s * s for s in (2, 4, 6, 8, 10, 12)])
    torch.testing.assert_close(out, want[None, :, None].expand(2, 6, 2))


def test_pooling_token_is_a_weighted_mean_of_regions():
    """Side 2 on a 4 x 4 map pools 2 x 2 quadrants; a 2 x 2 conv with weight 1 at (0, 1) reads the top-right
    quadrant's mean."""
    sfe = sp.PoolingSFE(1, 1, 4, sides=(2, 4))
    nn.init.zeros_(sfe.convs[0].weight)
    sfe.convs[0].weight.data[0, 0, 0, 1] = 1.0
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert sfe(fmap)[0, 0, 0].item() == pytest.approx((2 + 3 + 6 + 7) / 4)


# ------------------------------------------------------------------------------------------------ DFI
def test_cross_attend_identical_keys_give_mean_of_values():
    q = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    k = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(1)).expand(2, 5, 4)
    v = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    out = sp.cross_attend(q, k, v)
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(2, 6, 4))


def test_cross_attend_scale_by_hand():
    """One query (1, 0), keys (a, 0) and (0, 0), d = 2: weights softmax(a / sqrt2, 0)."""
    a = 2.0
    q, k = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[a, 0.0], [0.0, 0.0]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = torch.softmax(torch.tensor([a / 2 ** 0.5, 0.0]), 0)
    torch.testing.assert_close(sp.cross_attend(q, k, v)[0, 0], w)


def test_dfi_detail_tokens():
    assert sp.DFI(4, 2, 24).num_detail_tokens == 25  # official conv_CM: kernel 16, stride 2 on 24 x 24
    d = sp.DFI(4, 2, 12)
    assert (d.cm_kernel, d.cm_stride, d.num_detail_tokens) == (8, 1, 25)
    assert sp.DFI(4, 2, 12, cm_stride=2).num_detail_tokens == 9  # the curriculum's 3 x 3 sketch
    assert d(torch.randn(3, 6, 2), torch.randn(3, 4, 12, 12)).shape == (3, 6, 4)  # [c ; attention]


# ------------------------------------------------------------------------------------------------ the projector
@pytest.mark.parametrize("variant,dfi", [("pooling", None), ("cropping", None), ("cropping", False)])
def test_projector_shapes(variant, dfi):
    p = sp.SpatialProjector(16, 24, 12, variant, dfi=dfi)
    x = torch.randn(2, 144, 16)
    out = p(x)
    assert out.shape == (2, 6 + 144, 24)
    torch.testing.assert_close(out[:, 6:], p.patch_proj(x))  # the patch tokens come after the spatial tokens
    assert (p.dfi is not None) == (variant == "cropping" and dfi is None)
    assert p.head[1].bias is None if p.dfi is None else p.head[1].bias is not None  # as each official branch


def test_fmap_is_row_major():
    p = sp.SpatialProjector(2, 4, 6, "pooling")
    x = torch.arange(72.0).reshape(1, 36, 2)  # token t = (row t // 6, column t % 6)
    f = p.fmap(x)
    assert f[0, :, 2, 5].tolist() == x[0, 2 * 6 + 5].tolist()


def _fill(module):
    """Deterministic weights, the formula the reference script used (sorted parameter names)."""
    for i, (_, prm) in enumerate(sorted(module.named_parameters())):
        with torch.no_grad():
            prm.copy_(0.3 * torch.sin(torch.arange(prm.numel(), dtype=torch.float64) * 0.37 + i).reshape(prm.shape))


# Produced by running the official encode_images branches conv336_pooling_sfe and conv336_cropping_sfe_dfi and the
# crop loop of feature_select ('336_6_tokens') verbatim, with these weights copied in, at L = 24, Dv = 4, d = 2,
# D_lm = 3, float64 (a throwaway script outside the repo); both agreed with ours to 4e-16.
OFFICIAL = {
    "pooling": [[-0.0137931072, -0.0677220672, -0.0862281275], [0.007305614, 0.0428830037, 0.0560298859],
                [-0.0042521341, -0.0213436802, -0.0272711394], [-0.0163033355, -0.0745319216, -0.093775626],
                [0.0111379006, 0.0170760636, 0.0140823715], [0.2215934444, 4.3774585803, 6.243637613]],
    "cropping": [[0.6637928507, 0.3927871041, -0.2290288999], [0.1241008013, 0.259334653, 0.2864624485],
                 [0.3424853934, 0.2798960565, 0.0718065281], [0.0589152893, 0.2541458071, 0.3507069983],
                 [0.1405247873, 0.258164877, 0.2698263315], [6.5763109037, -0.686849501, -6.3373317625]],
}


@pytest.mark.parametrize("variant", ["pooling", "cropping"])
def test_matches_official_code_at_24(variant):
    n = 24 * 24 * 4
    ar = torch.arange(n, dtype=torch.float64)
    x = (torch.sin(ar * 0.1) + 0.5 * torch.cos(ar * 0.013)).reshape(1, 576, 4)
    p = sp.SpatialProjector(4, 3, 24, variant, sp_dim=2).double()
    _fill(p)
    with torch.no_grad():
        got = p.spatial_tokens(x)[0]
    torch.testing.assert_close(got, torch.tensor(OFFICIAL[variant], dtype=torch.float64), atol=2e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ in TinyVLM
@pytest.mark.parametrize("variant", ["pooling", "cropping"])
def test_tinyvlm_forward_and_backward(variant):
    tok = vlm.WordTokenizer()
    vit = tiny_vit(0, img_size=48, patch_size=4, num_classes=0, embed_dim=16, depth=1, num_heads=2)  # 12 x 12 grid
    lm = vlm.TinyLM(len(tok), dim=16, depth=1, max_len=192)
    model = vlm.TinyVLM(vit, sp.SpatialProjector(16, 16, 12, variant), lm).train()
    data = vlm.caption_scenes("train", n=4, img_size=48)
    scene, text, labels = vlm.qa_tensors(data, tok)
    scene, text, labels = scene[:6], text[:6], labels[:6]
    images = data.images[scene]
    assert model.visual_prefix(images).shape == (6, 6 + 144, 16)
    logits = model(images, text)
    assert logits.shape == (6, 150 + text.shape[1], len(tok))
    loss = vlm.answer_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, prm in model.projector.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert model.projector.sfe.convs[0].weight.grad.abs().sum() > 0
    out = model.eval().generate(images[:1], text[:1, :3], max_new_tokens=2)  # generation goes through it too
    assert out.shape[0] == 1


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(ValueError, match="grid=8.*multiple of 12"):
        sp.SpatialProjector(16, 16, 8, "cropping")
    with pytest.raises(ValueError, match="grid=8.*multiple of 12"):
        sp.crop_sides(8)
    with pytest.raises(ValueError, match="grid=4 is too small"):
        sp.SpatialProjector(16, 16, 4, "pooling")
    with pytest.raises(ValueError, match="variant"):
        sp.SpatialProjector(16, 16, 12, "both")
    with pytest.raises(ValueError, match="dfi=True needs variant='cropping'"):
        sp.SpatialProjector(16, 16, 12, "pooling", dfi=True)
    with pytest.raises(TypeError, match="dfi"):
        sp.SpatialProjector(16, 16, 12, "cropping", dfi="yes")
    with pytest.raises(ValueError, match="parity"):
        sp.nested_crops(12, sides=(3, 12))
    with pytest.raises(ValueError, match="strictly increasing"):
        sp.CroppingSFE(4, 2, 12, sides=(4, 2))
    with pytest.raises(ValueError, match="sides"):
        sp.PoolingSFE(4, 2, 12, sides=(2, 13))
    with pytest.raises(ValueError, match="cm_kernel"):
        sp.DFI(4, 2, 12, cm_kernel=13)
    p = sp.SpatialProjector(16, 16, 12, "cropping")
    with pytest.raises(ValueError, match=r"grid\*grid=144, vit_dim=16.*use_cls=False"):
        p(torch.randn(2, 145, 16))  # a CLS token left in
    with pytest.raises(ValueError, match="vit_dim=16"):
        p(torch.randn(2, 144, 8))  # wrong channels
    with pytest.raises(ValueError, match="fmap must be a feature map"):
        p.sfe(torch.randn(2, 16, 10, 10))
    with pytest.raises(ValueError, match="DFI: c must be crop tokens"):
        p.dfi(torch.randn(2, 6, 3), torch.randn(2, 16, 12, 12))
    with pytest.raises(ValueError, match="cross_attend"):
        sp.cross_attend(torch.randn(1, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 2, 4))
