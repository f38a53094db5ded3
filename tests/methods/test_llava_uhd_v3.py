"""LLaVA-UHD v3 (vitlab.methods.vision_language.llava_uhd_v3): WTC against the official code's outputs, hand cases,
RPE (PI-resize) against timm and its defining property, position tables, the lesson's zoo and bad inputs."""
import pytest
import torch
import torch.nn as nn

from vitlab.methods.vision_language import llava_uhd_v3 as U
from vitlab.models import VisionTransformer

D = 16


def _fill(t: torch.Tensor, k: int) -> None:
    with torch.no_grad():
        t.copy_(torch.sin(torch.arange(t.numel(), dtype=torch.float32) * 0.37 + k).reshape(t.shape) * 0.5)


def _packed():
    """The official test input: two images packed, grids 2x2 and 2x4 (12 tokens of width 16)."""
    return torch.cos(torch.arange(12 * D, dtype=torch.float32) * 0.11).reshape(12, D)


# Outputs of the official ``WTC`` (modeling_moonvit.py, thunlp/LLaVA-UHD main) on _packed() with
# cu_seqlens [0, 4, 12], spatial_shapes [[2, 2], [2, 4]] (its PatchMergingLayer in modeling_swin_siglip2_zyc.py gives
# the same on the padded batch), m_pooling weights from _fill(param_k, k) in parameters() order; run outside the repo.
OFFICIAL = {
    "avg_pooling": [
        [0.105072, 0.110762, 0.115114, 0.118074, 0.119606, 0.119693, 0.118333, 0.115543, 0.111356, 0.105823,
         0.099010, 0.091001, 0.081892, 0.071793, 0.060827, 0.049125],
        [-0.254557, -0.311701, -0.365078, -0.414042, -0.458000, -0.496423, -0.528845, -0.554875, -0.574197,
         -0.586578, -0.591870, -0.590006, -0.581011, -0.564992, -0.542145, -0.512743],
        [0.434036, 0.475620, 0.511455, 0.541108, 0.564220, 0.580512, 0.589786, 0.591932, 0.586922, 0.574818,
         0.555765, 0.529994, 0.497817, 0.459623, 0.415872, 0.367095]],
    "m_pooling": [
        [0.287034, 0.317365, 0.333903, 0.326098, 0.287548, 0.219477, 0.130827, 0.032676, -0.067176, -0.161766,
         -0.239960, -0.288284, -0.296701, -0.261805, -0.187747, -0.087191],
        [-0.432679, -0.507260, -0.545541, -0.553261, -0.540910, -0.522173, -0.511067, -0.517091, -0.541460,
         -0.577844, -0.616237, -0.646179, -0.658088, -0.643797, -0.597681, -0.518914],
        [0.475333, 0.476794, 0.485647, 0.501010, 0.519670, 0.536979, 0.546340, 0.538688, 0.505856, 0.447808,
         0.375917, 0.307446, 0.257428, 0.233723, 0.235246, 0.253773]],
}


@pytest.mark.parametrize("merging", U.MERGING)
def test_wtc_matches_official_outputs(merging):
    wtc = U.WTC(D, merging, init="default")
    if merging == "m_pooling":
        for k, p in enumerate(wtc.attn_layer.parameters()):
            _fill(p, k)
    x = _packed()
    y0, g0 = wtc(x[None, :4], (2, 2))  # image 0: 2x2 -> 1 token
    y1, g1 = wtc(x[None, 4:], (2, 4))  # image 1: 2x4 -> 2 tokens
    assert (g0, g1) == ((1, 1), (1, 2))
    torch.testing.assert_close(torch.cat([y0[0], y1[0]]), torch.tensor(OFFICIAL[merging]), atol=2e-5, rtol=0)


def test_window_order_and_avg_by_hand():
    x = torch.arange(8.0).reshape(1, 8, 1)  # grid 2x4: rows [0 1 2 3], [4 5 6 7]
    win = U.window_tokens(x, (2, 4))
    assert win[0, :, :, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert U.avg_pooling(x, (2, 4))[0, :, 0].tolist() == [2.5, 4.5]
    x = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 -> 2x2, windows row-major
    assert U.avg_pooling(x, 4)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_m_pooling_by_hand_and_starts_as_avg():
    x = torch.randn(2, 16, 8)
    fresh = U.WTC(8, "m_pooling", num_heads=4)  # init="avg": the last layer is zero -> uniform weights
    torch.testing.assert_close(fresh(x, (4, 4))[0], U.WTC(8, "avg_pooling")(x, (4, 4))[0])

    class Fixed(nn.Module):  # logits log 3 at the window's first position, 0 elsewhere: weights 1/2, 1/6 x 3
        def forward(self, z):
            out = torch.zeros(*z.shape[:-1], 8)
            out[..., 0, :] = torch.log(torch.tensor(3.0))
            return out

    wtc = U.WTC(8, "m_pooling", num_heads=4)
    wtc.attn_layer = Fixed()
    x = torch.arange(4.0)[None, :, None].expand(1, 4, 8)  # one 2x2 window with values 0, 1, 2, 3
    y, grid = wtc(x, (2, 2))
    assert grid == (1, 1)
    torch.testing.assert_close(y, torch.full((1, 1, 8), 0 / 2 + (1 + 2 + 3) / 6))
    w = wtc.weights(U.window_tokens(x, (2, 2)))
    torch.testing.assert_close(w.sum(dim=-2), torch.ones(1, 1, 8))


def test_m_pooling_heads_change_nothing():
    torch.manual_seed(0)
    a, b = U.WTC(16, "m_pooling", num_heads=16, init="default"), U.WTC(16, "m_pooling", num_heads=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16, 16)
    torch.testing.assert_close(a(x, 4)[0], b(x, 4)[0])


def test_wtc_prefix_tokens_pass_through():
    x = torch.randn(2, 2 + 16, 8)
    y, grid = U.WTC(8, "avg_pooling")(x, (4, 4), num_prefix=2)
    assert y.shape == (2, 2 + 4, 8) and grid == (2, 2)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(y[:, 2:], U.avg_pooling(x[:, 2:], 4))


def _vit(cls=VisionTransformer, patch=4, **kw):
    return cls(img_size=16, patch_size=patch, in_chans=3, num_classes=0, embed_dim=16, depth=3, num_heads=2,
               mlp_ratio=2.0, class_token=False, global_pool="avg", **kw)


def test_uhd_vit_tokens_and_plain_equivalence():
    torch.manual_seed(0)
    vit = _vit(U.UHDViT, patch=2, merge_after=(0, 1))
    assert vit.token_counts() == [64, 16, 4, 4] and vit.num_visual_tokens == 4
    x = torch.rand(2, 3, 16, 16)
    assert vit.forward_features(x).shape == (2, 4, 16)
    plain, same = _vit(), _vit(U.UHDViT)  # no merger: exactly the course ViT
    same.load_state_dict(plain.state_dict())
    torch.testing.assert_close(same.forward_features(x), plain.forward_features(x))
    with_cls = U.UHDViT(img_size=16, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                        merge_after=(0,))
    assert with_cls.forward_features(x).shape == (2, 1 + 16, 16) and with_cls(x).shape == (2, 5)


def test_pi_resize_equals_timm_and_is_exact_when_upsampling():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    ours, timm_ = U.pi_resize(w, 4), U.refine_patch_embed(w, 4)  # timm computes in float32
    torch.testing.assert_close(ours, timm_, atol=1e-5, rtol=0)
    torch.testing.assert_close(U.pi_resize(w.float(), 3), U.refine_patch_embed(w.float(), 3), atol=1e-5, rtol=0)
    # <x, w> == <B x, w'>: a 2x2 patch and its bicubic 4x4 upsampling give the same token
    B = U.pi_resize_matrix(2, 4)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    up = x @ B.T  # [7, 3, 16]
    tok_old = torch.einsum("nck,ock->no", x, w.flatten(2))
    tok_new = torch.einsum("nck,ock->no", up, ours.flatten(2))
    torch.testing.assert_close(tok_new, tok_old)


def test_pi_resize_downsampling_exact_on_representable_patches():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    w2 = U.pi_resize(w, 2)  # RPE: patch 4 -> 2
    torch.testing.assert_close(w2, U.refine_patch_embed(w, 2), atol=1e-5, rtol=0)
    B = U.pi_resize_matrix(4, 2)  # [4, 16]
    x = torch.randn(6, 3, 4, dtype=torch.float64) @ B  # 4x4 patches in B's row space
    tok_old = torch.einsum("nck,ock->no", x, w.flatten(2))
    tok_new = torch.einsum("nck,ock->no", x @ B.T, w2.flatten(2))
    torch.testing.assert_close(tok_new, tok_old)


def test_resize_pos_embed_bucket_and_bicubic():
    pos = torch.arange(4.0).reshape(1, 4, 1)  # a 2x2 table
    up = U.resize_pos_embed(pos, 2, 4)  # the official bucket rule: each cell repeated 2x2
    assert up[0, :, 0].reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    big = torch.arange(16.0).reshape(1, 16, 1)
    assert U.resize_pos_embed(big, 4, 2)[0, :, 0].tolist() == [0, 2, 8, 10]
    with_cls = torch.cat([torch.full((1, 1, 1), -1.0), pos], dim=1)
    out = U.resize_pos_embed(with_cls, 2, 4, num_prefix=1)
    assert out.shape == (1, 17, 1) and out[0, 0, 0] == -1
    torch.testing.assert_close(U.resize_pos_embed(big, 4, 4, mode="bicubic"), big)
    assert U.resize_pos_embed(big, 4, 8, mode="bicubic").shape == (1, 64, 1)


def test_refine_vit_copies_weights():
    torch.manual_seed(0)
    src = _vit()
    fine = U.refine_vit(src, 2, merge_after=(0, 1))
    assert isinstance(fine, U.UHDViT) and fine.token_counts() == [64, 16, 4, 4]
    torch.testing.assert_close(fine.patch_embed.proj.weight, U.refine_patch_embed(src.patch_embed.proj.weight, 2))
    torch.testing.assert_close(fine.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    x = torch.rand(2, 3, 16, 16)
    same = U.refine_vit(src, 4)  # same patch size, no merger: the same network
    torch.testing.assert_close(same.forward_features(x), src.forward_features(x))
    coarse = U.refine_vit(src, 8, pos_mode="bicubic")
    assert coarse.num_visual_tokens == 4


def test_patch_merger_matches_official_ordering():
    torch.manual_seed(0)
    pm = U.PatchMerger2x2(4, 6, (2, 4))
    x = torch.randn(2, 8, 4)
    # the official: LN, [B, D, h, w], unfold 2x2 -> [B, D, n, 4] -> [B, n, 4, D] -> [B, n, 4D]
    z = pm.nl(x).transpose(1, 2).unflatten(-1, (2, 4))
    z = z.unfold(2, 2, 2).unfold(3, 2, 2).contiguous().view(2, 4, -1, 4).permute(0, 2, 3, 1).reshape(2, -1, 16)
    torch.testing.assert_close(pm(x), pm.mlp(z))
    assert pm(x).shape == (2, 2, 6)


def test_bad_inputs():
    x = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="merging"):
        U.WTC(8, "max_pooling")
    with pytest.raises(ValueError, match="num_heads"):
        U.WTC(8, "m_pooling", num_heads=3)
    with pytest.raises(ValueError, match="init"):
        U.WTC(8, init="zeros")
    with pytest.raises(ValueError, match="even"):
        U.WTC(8, "avg_pooling")(torch.randn(1, 12, 8), (3, 4))
    with pytest.raises(ValueError, match="tokens"):
        U.WTC(8, num_heads=4)(x, (2, 4))
    with pytest.raises(ValueError, match="width"):
        U.WTC(4, num_heads=4)(x, (4, 4))
    with pytest.raises(ValueError, match="x"):
        U.avg_pooling(torch.randn(16, 8), 4)
    with pytest.raises(TypeError, match="grid"):
        U.window_tokens(x, (4, 4, 1))
    with pytest.raises(ValueError, match="merge_after"):
        _vit(U.UHDViT, merge_after=(5,))
    with pytest.raises(ValueError, match="merge_after"):
        _vit(U.UHDViT, merge_after=(1, 0))
    with pytest.raises(TypeError, match="merge_after"):
        _vit(U.UHDViT, merge_after=1)
    with pytest.raises(ValueError, match="halved"):
        _vit(U.UHDViT, patch=4, merge_after=(0, 1, 2))
    with pytest.raises(ValueError, match="side"):
        _vit(U.UHDViT).forward_features(torch.rand(1, 3, 16, 16), side=("cls",))
    with pytest.raises(ValueError, match="weight"):
        U.refine_patch_embed(torch.randn(3, 4, 4), 2)
    with pytest.raises(ValueError, match="patch_size"):
        U.refine_patch_embed(torch.randn(2, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="interpolation"):
        U.pi_resize_matrix(2, 4, interpolation="lanczos")
    with pytest.raises(ValueError, match="mode"):
        U.resize_pos_embed(torch.randn(1, 4, 2), 2, 4, mode="nearest")
    with pytest.raises(ValueError, match="positions"):
        U.resize_pos_embed(torch.randn(1, 5, 2), 2, 4)
    with pytest.raises(TypeError, match="vit"):
        U.refine_vit(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="divide"):
        U.refine_vit(_vit(), 3)
    wide = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=32, depth=3,
                             num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="differ"):
        U.load_refined(_vit(), wide)
    with pytest.raises(ValueError, match="even"):
        U.PatchMerger2x2(4, 4, (3, 4))
    with pytest.raises(ValueError, match="tokens"):
        U.PatchMerger2x2(4, 4, (2, 2))(torch.randn(1, 4, 5))


def test_lesson_models_and_entries():
    from vitlab import zoo

    base = U.base_vlm()
    assert U.visual_tokens(base) == 64
    for v, n in (("p4", 64), ("rpe_wtc", 16), ("p8", 16), ("p2", 256)):
        m = U.uhd_vlm(v)
        m.start_from(base)
        assert U.visual_tokens(m) == n
    m = U.uhd_vlm("rpe_wtc")
    m.start_from(base)  # RPE'd kernel, copied LM, fresh mergers that start as avg_pooling
    torch.testing.assert_close(m.vision_encoder.patch_embed.proj.weight,
                               U.refine_patch_embed(base.vision_encoder.patch_embed.proj.weight, 2))
    torch.testing.assert_close(m.lm.tok_emb.weight, base.lm.tok_emb.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert m(torch.rand(1, 3, 32, 32), ids).shape[:2] == (1, 16 + 3)
    assert U.entry_name("rpe_wtc", 0, long=True) in zoo.ZOO and U.entry_name("p8", 2) in zoo.ZOO
    assert zoo.ZOO[U.entry_name("p4", 1)].init == U.BASE_ENTRY
    for v in U.VARIANTS:  # same steps, lr, data for every variant
        r = zoo.ZOO[U.entry_name(v, 0)]
        assert r.fit == U.FT_FIT and r.per_profile["cpu"]["steps"] == U.STEPS["cpu"] and r.shares == {"smoke": "cpu"}


def test_qa_objective_step():
    torch.manual_seed(0)
    obj = U.qa_objective(eval_every=1000)
    m = U.uhd_vlm("p8")
    from vitlab.vlm import caption_scenes

    images = caption_scenes("train", n=8).images
    loss, logits = obj.step_fn(m, images, torch.arange(8))
    assert logits is None and torch.isfinite(loss) and loss.requires_grad


def test_lesson_bad_inputs():
    with pytest.raises(ValueError, match="variant"):
        U.uhd_encoder("p16")
    with pytest.raises(ValueError, match="variant"):
        U.entry_name("p2", 0)
    with pytest.raises(ValueError, match="variant"):
        U.entry_name("p4", 0, long=True)
    with pytest.raises(ValueError, match="seed"):
        U.entry_name("p4", 3)
    with pytest.raises(TypeError, match="model"):
        U.visual_tokens(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="base"):
        U.uhd_vlm("p4").start_from(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="eval_every"):
        U.qa_objective(eval_every=1.5)
