"""CellVTA (chapter 6): deformable attention, adapter modules, HV targets, post-processing, metrics, cells data."""
import pytest
import torch

from vitlab.data.cells import TYPE_CODE, CellsDataset, cell_images, cells, split_masks
from vitlab.methods.robustness import cellvta as C
from vitlab.models.vit import VisionTransformer

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)


def _locs(x, y):
    """locations [N=1, Lq=1, M=1, L=1, P=1, 2]."""
    return torch.tensor([x, y]).view(1, 1, 1, 1, 1, 2)


def test_core_is_bilinear_sampling():
    value = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 4, 1, 1)  # [N, S, M, D], a 2 x 2 map
    w = torch.ones(1, 1, 1, 1, 1)
    core = lambda x, y: float(C.ms_deform_attn_core(value, [(2, 2)], _locs(x, y), w))  # noqa: E731
    assert core(0.25, 0.25) == pytest.approx(0.0)  # pixel centres sit at 0.25 and 0.75
    assert core(0.75, 0.25) == pytest.approx(1.0)
    assert core(0.5, 0.25) == pytest.approx(0.5)  # halfway between 0 and 1
    assert core(0.5, 0.5) == pytest.approx(1.5)  # the mean of all four
    assert core(0.25, 1.0) == pytest.approx(1.0)  # half a pixel outside: zero padding halves the border value
    # two points with weights 0.25 / 0.75
    locs = torch.tensor([[0.25, 0.25], [0.75, 0.75]]).view(1, 1, 1, 1, 2, 2)
    out = C.ms_deform_attn_core(value, [(2, 2)], locs, torch.tensor([0.25, 0.75]).view(1, 1, 1, 1, 2))
    assert float(out) == pytest.approx(0.75 * 3.0)


def test_msdeformattn_zero_offsets_reads_the_reference_pixel():
    torch.manual_seed(0)
    attn = C.MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=3)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()  # every point at the reference
    feat = torch.randn(1, 16, 8)  # a 4 x 4 map
    shapes = torch.tensor([[4, 4]])
    ref = C.reference_points([(4, 4)])  # the 16 pixel centres
    query = torch.randn(1, 16, 8)
    out = attn(query, ref, feat, shapes)
    assert torch.allclose(out, attn.output_proj(attn.value_proj(feat)), atol=1e-5)
    # official init: attention weights uniform, offsets on a ring of (i + 1) pixels per point
    assert torch.allclose(C.MSDeformAttn(8, 1, 2, 3).sampling_offsets.bias.view(2, 1, 3, 2)[0, 0],
                          torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))


def test_deform_inputs_levels():
    x = torch.zeros(2, 3, 64, 64)
    (r1, s1, i1), (r2, s2, i2) = C.deform_inputs(x, 8)
    assert s1.tolist() == [[32, 32], [16, 16], [8, 8]] and i1.tolist() == [0, 1024, 1280]
    assert r1.shape == (1, 64, 1, 2) and s2.tolist() == [[8, 8]] and i2.tolist() == [0]
    assert r2.shape == (1, 1024 + 256 + 64, 1, 2)
    assert torch.allclose(r1[0, 0, 0], torch.tensor([1 / 16, 1 / 16]))  # first token's centre, (x, y)
    assert torch.allclose(r1[0, 1, 0], torch.tensor([3 / 16, 1 / 16]))  # row-major: x moves first
    with pytest.raises(ValueError, match="patch_size"):
        C.deform_inputs(torch.zeros(1, 3, 60, 60), 8)
    with pytest.raises(ValueError, match="x must be"):
        C.deform_inputs(torch.zeros(3, 64, 64), 8)


def test_injector_gamma_zero_is_identity_and_interaction_runs_blocks_without_cls():
    torch.manual_seed(0)
    vit = VisionTransformer(**TINY).eval()
    ad = C.AdapterEncoder(vit, num_interactions=2)
    x = torch.rand(2, 3, 32, 32)
    in1, in2 = C.deform_inputs(x, 8)
    c1, c2, c3, c4 = ad.spm(x)
    c = torch.cat([c2, c3, c4], 1)
    tokens = vit.embed(x)
    inj = ad.interactions[0].injector
    assert float(inj.gamma.detach().abs().sum()) == 0.0
    assert torch.equal(inj(tokens[:, 1:], in1[0], c, in1[1]), tokens[:, 1:])
    out, c_new = ad.interactions[0](tokens, c, [vit.blocks[0], vit.blocks[1]], in1, in2)
    expect = vit.blocks[1](vit.blocks[0](tokens[:, 1:]))  # the blocks see the patch tokens only
    assert torch.allclose(out[:, 1:], expect, atol=1e-6) and torch.equal(out[:, :1], tokens[:, :1])
    assert c_new.shape == c.shape and not torch.allclose(c_new, c)  # the extractor wrote into the adapter tokens
    assert ad.interactions[1].extra_extractors is not None and ad.interactions[0].extra_extractors is None


def test_hv_targets_single_disc():
    inst = torch.zeros(1, 9, 9, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    inst[0][(yy - 4) ** 2 + (xx - 4) ** 2 <= 4] = 3  # a disc of radius 2 at (4, 4), id 3
    hv = C.hv_targets(inst)
    h, v = hv[0, 0], hv[0, 1]
    assert h[4, 6] == 1 and h[4, 2] == -1 and h[4, 4] == 0 and h[4, 5] == 0.5
    assert v[6, 4] == 1 and v[2, 4] == -1 and v[5, 4] == 0.5
    assert torch.allclose(h, -h.flip(1)) and torch.allclose(v, h.T)  # antisymmetric, v is h transposed
    assert hv[0][:, inst[0] == 0].abs().sum() == 0  # zero on background
    with pytest.raises(ValueError, match="instances"):
        C.hv_targets(torch.zeros(1, 9, 9))


def test_post_processing_splits_two_touching_discs():
    inst = torch.zeros(1, 16, 24, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(24), indexing="ij")
    inst[0][(yy - 8) ** 2 + (xx - 7) ** 2 <= 16] = 1
    inst[0][(yy - 8) ** 2 + (xx - 15) ** 2 <= 16] = 2  # touching at x = 11
    pred = C.instances_from_maps((inst > 0).float(), C.hv_targets(inst))
    assert int(pred.max()) == 2
    assert float(C.panoptic_quality(inst, pred)["pq"][0]) > 0.8
    plain = C.instances_from_maps((inst > 0).float(), torch.zeros(1, 2, 16, 24))
    assert int(plain.max()) == 1  # without HV gradients they stay one component
    with pytest.raises(ValueError, match="hv must be"):
        C.instances_from_maps(torch.zeros(1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_metrics_on_known_cases():
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    t[0, 0, :2] = 1
    t[0, 3, :2] = 2
    q = C.panoptic_quality(t, t * 5)  # ids need not be consecutive
    assert float(q["pq"][0]) == 1.0 and float(C.aggregated_jaccard(t, t)[0]) == 1.0
    p = torch.zeros(1, 4, 4, dtype=torch.long)
    p[0, 0, :2] = 1  # one exact match
    p[0, 2, 3] = 2  # one spurious; instance 2 of t missed
    q = C.panoptic_quality(t, p)
    assert float(q["dq"][0]) == pytest.approx(0.5) and float(q["sq"][0]) == 1.0 and float(q["pq"][0]) == 0.5
    # AJI: inter 2 / (union 2 + missed true 2 + unused pred 1)
    assert float(C.aggregated_jaccard(t, p)[0]) == pytest.approx(2 / 5)
    a, b = torch.zeros(1, 2, 4, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.bool)
    a[0, 0, :2] = True
    b[0, 0, :4] = True
    assert float(C.dice_score(a, b)[0]) == pytest.approx(2 * 2 / 6)
    assert float(C.dice_score(a & False, b & False)[0]) == 1.0
    with pytest.raises(ValueError, match="dice_score"):
        C.dice_score(a, b[:, :1])
    with pytest.raises(ValueError, match="panoptic_quality"):
        C.panoptic_quality(t, p[0])


def test_cells_generator():
    a = cell_images(3, img_size=32, seed=5)
    b = cell_images(3, img_size=32, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    images, inst, typ = a
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert set(typ.unique().tolist()) <= {0, 1, 2, 3} and torch.equal(inst > 0, typ > 0)
    for i in range(3):  # ids 1..K, every nucleus smaller than an 8 x 8 patch's area times 2
        ids = inst[i].unique()
        assert ids.tolist() == list(range(len(ids)))
        sizes = torch.bincount(inst[i].flatten())[1:]
        assert sizes.min() >= 4 and sizes.max() <= 2 * 64
    ds = cells("val", n=4, img_size=32)
    assert isinstance(ds, CellsDataset) and ds.masks.dtype == torch.int64
    inst2, typ2 = split_masks(ds.masks)
    assert torch.equal(ds.masks, inst2 * TYPE_CODE + typ2) and torch.equal(ds.instances, inst2)
    sub = ds.subset([1, 2])
    assert isinstance(sub, CellsDataset) and torch.equal(sub.masks, ds.masks[1:3])
    with pytest.raises(ValueError, match="split"):
        cells("dev")
    with pytest.raises(ValueError, match="img_size"):
        cell_images(2, img_size=8)


def test_tiny_forward_backward_and_bad_inputs():
    torch.manual_seed(0)
    ds = cells("val", n=2, img_size=32)
    for mode in C.MODES:
        net = C.CellSegmenter(VisionTransformer(**TINY), mode, num_interactions=2)
        out = net(ds.images)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "binary": (2, 2, 32, 32), "hv": (2, 2, 32, 32), "type": (2, 4, 32, 32)}
        loss = C.segmentation_loss(out, ds.masks)
        loss.backward()
        assert torch.isfinite(loss)
        if mode == "adapter":
            g = net.adapter.interactions[0].injector.gamma.grad
            assert g is not None and g.abs().sum() > 0  # gamma starts at 0 but learns
    with pytest.raises(ValueError, match="mode"):
        C.CellSegmenter(VisionTransformer(**TINY), "prompt")
    with pytest.raises(TypeError, match="vit"):
        C.CellSegmenter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="multiples of the patch"):
        C.CellSegmenter(VisionTransformer(**TINY), "decoder")(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="n_heads"):
        C.MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(TypeError, match="measure"):
        C.measure(torch.nn.Linear(2, 2))
    assert C.entry_name("adapter", 1) == "ch6_cellvta_adapter_s1"
    with pytest.raises(ValueError, match="mode"):
        C.entry_name("lora", 0)


# ------------------------------------------------------------------ equivalence with the official CellVTA code
# Expected numbers below were computed once from the official JieZheng-ShanghaiTech/CellVTA
# ``models/encoders/adapter_modules.py`` (``MultiScaleDeformableAttention`` stubbed, ``MSDeformAttnFunction.apply``
# routed to ``ms_deform_attn_core_pytorch``), loaded with the very weights ``_seeded`` puts into our modules
# (parameter names equal except ours ``ffn.dwconv`` = official ``ffn.dwconv.dwconv``). Ours matched the official to
# max |diff| 0 (MSDeformAttn, Injector, SPM) and 1.2e-6 (InteractionBlock's adapter tokens). The official code is
# not needed here. Token grid 2 x 3 (16 x 24 px, patch 8): non-square, so an (x, y) / (H, W) swap would show;
# our deform_inputs there equals the official deform_inputs on 32 x 48 px (patch 16).
def _seeded(module, seed):
    """Every float tensor of the state dict, in sorted-name order, from one generator (running_var positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.5)
    return module


def _close(got, expect, atol=1e-5):
    assert torch.allclose(got.detach().flatten(), torch.tensor(expect), atol=atol, rtol=0), (got, expect)


def test_deform_inputs_match_official_levels():
    """Official ``deform_inputs`` hard-codes /4, /8, /16; ours at patch 16 is that, exactly (hand-copied here)."""
    x = torch.zeros(1, 3, 32, 48)
    (r1, s1, i1), (r2, s2, i2) = C.deform_inputs(x, 16)
    assert s1.tolist() == [[8, 12], [4, 6], [2, 3]] and i1.tolist() == [0, 96, 120]
    assert s2.tolist() == [[2, 3]] and i2.tolist() == [0] and r2.shape == (1, 126, 1, 2)
    centres = torch.tensor([[1, 1], [3, 1], [5, 1], [1, 3], [3, 3], [5, 3]]) / torch.tensor([6, 4])  # (x, y)
    assert torch.allclose(r1[0, :, 0], centres)
    small = C.deform_inputs(torch.zeros(1, 3, 16, 24), 8)  # patch 8 at half the size: the same levels
    for a, b in zip(small, C.deform_inputs(x, 16)):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_msdeformattn_matches_official_numbers():
    """3 levels (8x12, 4x6, 2x3), 2 heads, 2 points, random offsets and logits (points land in and outside)."""
    attn = _seeded(C.MSDeformAttn(8, 3, 2, 2), 0)
    in1, _ = C.deform_inputs(torch.zeros(1, 3, 16, 24), 8)
    g = torch.Generator().manual_seed(1)
    query, feat = torch.randn(2, 6, 8, generator=g), torch.randn(2, 126, 8, generator=g)
    with torch.no_grad():
        out = attn(query, in1[0], feat, in1[1])
    assert out.shape == (2, 6, 8)
    assert float(out.sum()) == pytest.approx(27.55147, abs=1e-4)
    _close(out[0, 0], [0.002061, -0.143457, 1.044236, 1.607219, -0.116348, -0.285109, -0.746729, 0.647005])
    _close(out[1, 5], [2.824157, 1.875994, -0.312937, 2.212981, -2.496964, -1.994558, -1.955791, -0.084502])


def test_interaction_block_matches_official_numbers():
    """Injector (gamma random, nonzero) -> one block (Linear + GELU) on the patch tokens -> Extractor + 2 extra
    extractors with ConvFFN. The official DWConv splits by N // 21; here (levels 16:4:1 of 6) it agrees with ours."""
    ib = _seeded(C.InteractionBlock(8, 2, 2, True, 0.25, 0.0, extra_extractor=True), 2)
    blk = _seeded(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()), 3)
    assert float(ib.injector.gamma.detach().abs().min()) > 0
    in1, in2 = C.deform_inputs(torch.zeros(1, 3, 16, 24), 8)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, 7, 8, generator=g), torch.randn(2, 126, 8, generator=g)  # CLS + 2 x 3 tokens
    with torch.no_grad():
        x_out, c_out = ib(x, c, [blk], in1, in2)
    assert torch.equal(x_out[:, 0], x[:, 0])
    assert float(x_out.sum()) == pytest.approx(57.21533, abs=1e-4)
    _close(x_out[0, 1], [-0.012271, -0.049194, 0.601455, -0.127713, -0.014538, -0.000161, 0.850789, 2.236694])
    _close(x_out[1, 6], [0.990756, -0.145056, -0.156649, -0.169695, -1e-06, -0.00497, 3.388547, -0.023509])
    assert float(c_out.sum()) == pytest.approx(173.49847, abs=2e-4)
    _close(c_out[0, 0], [-1.707933, -2.047315, -1.947766, 1.467869, -1.81809, -2.078879, 1.382969, -2.502097])
    _close(c_out[0, 100], [-0.349064, 0.921224, 2.407073, 0.207379, 0.051725, 0.084694, 4.398639, -1.860868])
    _close(c_out[1, 125], [1.16042, 0.033908, 0.796971, 1.221103, -2.12185, -3.240812, 2.113609, -2.98932])


def test_spatial_prior_module_matches_official_numbers():
    """Official SPM with its stem's last conv set to stride 1 (our documented pyramid-stride deviation; otherwise
    the same layers and names), eval mode, inplanes 2, width 8, a 16 x 24 image: c1 at 16 x 24, c2..c4 tokens."""
    spm = _seeded(C.SpatialPriorModule(2, 8), 5).eval()
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        outs = spm(img)
    assert [tuple(t.shape) for t in outs] == [(1, 8, 16, 24), (1, 96, 8), (1, 24, 8), (1, 6, 8)]
    sums = [-616.58777, -107.24371, 14.11667, -14.30443]
    tails = [[0.106436, 0.112149, 0.095466], [-0.434727, -0.54284, -0.939137], [-0.268621, -0.281731, 0.400902],
             [0.20717, -0.626068, 0.014081]]
    for t, s, tail in zip(outs, sums, tails):
        assert float(t.sum()) == pytest.approx(s, abs=5e-4)
        _close(t.flatten()[-3:], tail)
