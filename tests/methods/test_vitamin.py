"""ViTamin (official Beckschen/ViTamin ViTamin/models/vitamin.py; identical in timm.models.vitamin, installed): the
tiny config and its blocks against timm's classes with the same weights, GeGLU and the shortcut by hand, shapes,
the official ViTamin-S key layout, bad input, a backward pass and a few TinyCLIP steps."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models import vitamin as TV
from timm.models.vision_transformer import VisionTransformer as TimmViT

from tests.model_helpers import assert_rejects_bad_images, objective_losses
from vitlab.methods.vision_language import vitamin as V
from vitlab.models import VisionTransformer
from vitlab.vlm import TextEncoder, TinyCLIP

TOL = dict(atol=1e-5, rtol=1e-5)


def _perturb_(module, seed=0):
    """Move every parameter off its init (LayerNorms off 1 / 0, biases off 0) so a copy is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _timm_tiny(stem_stride=1):
    """timm's ViTamin classes at the course's tiny config (as ``vitamin_tiny``), eval mode, perturbed weights."""
    torch.manual_seed(0)
    cfg = TV.VitCfg(embed_dim=(16, 32, 64), depths=(2, 2, 4), stem_width=16,
                    conv_cfg=TV.VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6))
    backbone = TV.MbConvStages(cfg, in_chans=3)
    backbone.stem.conv1.stride = (stem_stride, stem_stride)  # our one deviation: stride 1 in the stem
    model = TimmViT(img_size=32, patch_size=1, in_chans=3, num_classes=0, embed_dim=64, depth=4, num_heads=2,
                    mlp_ratio=2.0, mlp_layer=TV.GeGluMlp, class_token=False, global_pool="avg",
                    embed_layer=partial(HybridEmbed, backbone=backbone, proj=False))
    return _perturb_(model).eval()


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ hand checks
def test_geglu_by_hand():
    """gelu(0) = 0, gelu(1) = Phi(1) = 0.841345, gelu(-1) = -(1 - Phi(1)) = -0.158655."""
    a, b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 3.0, 4.0])
    want = torch.tensor([0.0, 3 * 0.8413447461, 4 * -0.1586552539])
    assert torch.allclose(V.geglu(a, b), want, atol=1e-6)
    mlp = V.GeGLUMlp(4, 8).eval()
    x = torch.randn(3, 4)
    h = F.layer_norm(x, (4,), mlp.norm.weight, mlp.norm.bias, 1e-6)
    assert torch.allclose(mlp(x), mlp.w2(F.gelu(mlp.w0(h)) * mlp.w1(h)), **TOL)


def test_shapes_through_each_stage():
    m = V.vitamin_tiny().eval()
    bb, x = m.patch_embed.backbone, _images()
    s = bb.stem(x)
    assert s.shape == (2, 16, 32, 32)  # stem stride 1 (the named deviation)
    s1 = bb.stages[0](s)
    assert s1.shape == (2, 16, 16, 16)
    s2 = bb.stages[1](s1)
    assert s2.shape == (2, 32, 8, 8)
    assert bb.pool(s2).shape == (2, 64, 4, 4)
    assert bb.stride == 8 and m.grid_size == (4, 4)
    assert m.forward_features(x).shape == (2, 16, 64) and m(x).shape == (2, 64)
    # the official strides at 32 px: total stride 16, a 2 x 2 grid
    off = V.vitamin_tiny(stem_stride=2).eval()
    assert off.patch_embed.backbone.stride == 16 and off.forward_features(x).shape == (2, 4, 64)
    # a head when asked for one
    assert V.vitamin_tiny(num_classes=5).eval()(x).shape == (2, 5)


def test_shortcuts():
    """Stride 2: avg-pool 3x3 s2 p1 without counting padding, then 1x1; stride 1: 1x1 on a width change, else id."""
    blk = V.MBConvLNBlock(16, 32, stride=2).eval()
    assert isinstance(blk.shortcut, V.Downsample2d) and blk.conv2_kxk.stride == (2, 2)
    assert blk.conv1_1x1.out_channels == 128 and blk.conv2_kxk.groups == 128  # hidden = 4 x out width
    assert blk(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)
    assert blk.shortcut(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)
    pool = V.Downsample2d(1, 1)  # same width: pool only
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # output (0, 0) sees rows/cols {0, 1} only (padding not counted): mean(0, 1, 4, 5) = 2.5;
    # output (1, 1) sees rows/cols {1, 2, 3}: mean of 5,6,7,9,10,11,13,14,15 = 10
    assert pool(x)[0, 0].tolist() == [[2.5, 4.0], [8.5, 10.0]]
    assert isinstance(V.MBConvLNBlock(16, 32).shortcut, torch.nn.Conv2d)
    assert isinstance(V.MBConvLNBlock(16, 16).shortcut, torch.nn.Identity)


# ------------------------------------------------------------------------------------------ against timm
def test_mbconv_block_matches_timm():
    for cin, cout, stride in ((16, 32, 2), (32, 32, 1), (16, 32, 1)):
        torch.manual_seed(0)
        ref = _perturb_(TV.MbConvLNBlock(cin, cout, stride=stride)).eval()
        ours = V.MBConvLNBlock(cin, cout, stride=stride).eval()
        ours.load_state_dict(ref.state_dict())  # strict: the same names
        x = torch.randn(2, cin, 8, 8)
        assert torch.allclose(ours(x), ref(x), **TOL)


def test_geglu_mlp_stem_and_strided_conv_match_timm():
    torch.manual_seed(0)
    ref = _perturb_(TV.GeGluMlp(64, 128)).eval()
    ours = V.GeGLUMlp(64, 128).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 64)
    assert torch.allclose(ours(x), ref(x), **TOL)
    for ref, ours, c in ((TV.Stem(3, 16), V.ConvStem(3, 16), 3), (TV.StridedConv(in_chans=32, embed_dim=64),
                                                                 V.StridedConv(32, 64), 32)):
        ours.load_state_dict(_perturb_(ref).state_dict())
        x = torch.randn(2, c, 8, 8)
        assert torch.allclose(ours.eval()(x), ref.eval()(x), **TOL)


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_tiny_matches_timm_with_the_same_weights(stem_stride):
    ref = _timm_tiny(stem_stride)
    ours = V.vitamin_tiny(stem_stride=stem_stride).eval()
    ours.load_state_dict(ref.state_dict())  # strict: identical keys and shapes
    x = _images(3)
    with torch.no_grad():
        f_ref, f_ours = ref.forward_features(x), ours.forward_features(x)
        p_ref, p_ours = ref.forward_head(f_ref, pre_logits=True), ours.forward_head(f_ours, pre_logits=True)
    assert f_ours.shape == f_ref.shape == (3, (32 // (8 * stem_stride)) ** 2, 64)
    diff = max((f_ours - f_ref).abs().max().item(), (p_ours - p_ref).abs().max().item())
    print(f"max |ours - timm| (stem_stride={stem_stride}): {diff:.2e}")
    assert diff < 1e-5
    assert torch.allclose(ours(x), ref(x), **TOL)


def test_small_has_timm_vitamin_small_224_layout():
    """The official ViTamin-S config: timm's ``vitamin_small_224`` state dict has our keys and shapes exactly."""
    import timm

    ref = timm.create_model("vitamin_small_224", pretrained=False, num_classes=0)
    ours = V.vitamin_small()
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert ours.grid_size == (14, 14) and ours.patch_embed.backbone.stride == 16


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    m = V.vitamin_tiny().eval()
    assert_rejects_bad_images(m, 3, 32)
    with pytest.raises(ValueError, match="img_size=36"):
        V.vitamin_tiny(img_size=36)  # not a multiple of the total stride 8
    with pytest.raises(ValueError, match="stride"):
        V.vitamin_tiny(stem_stride=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        V.vitamin_tiny(num_heads=3)
    with pytest.raises(ValueError, match="widths"):
        V.vitamin_tiny(widths=(16, 32, 64))
    with pytest.raises(ValueError, match="mlp_ratio"):
        V.vitamin_tiny(mlp_ratio=0.0)
    with pytest.raises(TypeError, match="in_chs"):
        V.MBConvLNBlock(16.0, 32)
    with pytest.raises(ValueError, match="kernel_size"):
        V.MBConvLNBlock(16, 32, kernel_size=4)
    with pytest.raises(TypeError, match="model must be a ViTamin"):
        V.matched_vit(VisionTransformer())


# ------------------------------------------------------------------------------------------ training
def test_forward_backward():
    m = V.vitamin_tiny(num_classes=3)
    loss = F.cross_entropy(m(_images(4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_few_steps_inside_tinyclip():
    """8 pairs memorised: the loss falls well below chance (log 8) in 20 AdamW steps (checked over seeds 0-3)."""
    torch.manual_seed(0)
    clip = TinyCLIP(V.vitamin_tiny(), TextEncoder(20, dim=32, depth=1, num_heads=2, max_len=6), embed_dim=32)
    g = torch.Generator().manual_seed(2)
    # noise plus a per-image colour ramp, so that the images differ in more than noise
    images = 0.3 * _images(8) + 2 * torch.rand(8, 3, 1, 1, generator=g) * torch.linspace(0, 1, 32)
    ids = torch.randint(1, 20, (8, 5), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = clip.loss(images, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < math.log(8) - 0.5 and losses[-1] < losses[0] - 0.5, losses
    assert clip.encode_image(images).shape == (8, 32)


def test_matched_vit():
    m = V.vitamin_tiny()
    vit, mac = V.matched_vit(m)
    assert isinstance(vit, VisionTransformer) and vit.embed_dim == 64 and vit.patch_embed.patch_size == 4
    assert abs(mac["vit"] - mac["vitamin"]) <= 0.25 * mac["vitamin"]


# ------------------------------------------------------------------------------------------ the lesson's zoo
def test_clip_model_towers():
    from vitlab.measure import macs

    vit_clip, vitamin_clip = V.clip_model("vit"), V.clip_model("vitamin", num_classes=4000)  # num_classes ignored
    assert isinstance(vitamin_clip.image_encoder, V.ViTamin)
    assert isinstance(vit_clip.image_encoder, VisionTransformer)
    # the same text tower architecture, the image towers at ~equal MACs
    assert [p.shape for p in vit_clip.text_encoder.parameters()] == \
        [p.shape for p in vitamin_clip.text_encoder.parameters()]
    x = _images(2)
    a, b = macs(vitamin_clip.image_encoder, x[:1]), macs(vit_clip.image_encoder, x[:1])
    assert abs(a - b) <= 0.25 * a
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    assert vit_clip(x, ids).shape == vitamin_clip(x, ids).shape == (2, 2)
    with pytest.raises(ValueError, match="tower"):
        V.clip_model("resnet")


def test_caption_dataset_and_prompts():
    from vitlab import data
    from vitlab.vlm import VOCAB, caption_scenes

    ds = data.load("vlm_caption_scenes", "val", "cpu", img_size=32)
    cs = caption_scenes("val")
    assert torch.equal(ds.images, cs.images) and ds.labels.tolist() == list(range(len(cs)))
    assert ds.classes == list(cs.captions) and ds.num_classes == len(cs)
    for task, k, per in (("object", 16, 10), ("shape", 4, 40), ("colour", 4, 40)):
        names, prompts = V.zero_shot_prompts(task)
        assert len(names) == len(prompts) == k and all(len(p) == per for p in prompts)
        assert all(w in VOCAB for g in prompts for p in g for w in p.split())
    # every one-object caption the generator writes is one of its class's prompts
    names, prompts = V.zero_shot_prompts("object")
    for objs, cap in zip(cs.objects, cs.captions):
        if len(objs) == 1:
            assert cap in prompts[names.index(f"{objs[0].colour} {objs[0].shape}")]
    with pytest.raises(ValueError, match="task"):
        V.zero_shot_prompts("size")


def test_zero_shot_accuracy_and_measure_bad_input():
    from vitlab.vlm import caption_scenes

    clip = V.clip_model("vit")
    acc = V.zero_shot_accuracy(clip, caption_scenes("val", n=60), "colour")
    assert 0.0 <= acc <= 1.0
    with pytest.raises(TypeError, match="CaptionScenes"):
        V.zero_shot_accuracy(clip, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="one-object"):
        V.zero_shot_accuracy(clip, caption_scenes("val").subset(
            [i for i, o in enumerate(caption_scenes("val").objects) if len(o) > 1][:5]))
    with pytest.raises(TypeError, match="TinyCLIP"):
        V.measure(V.vitamin_tiny())


def test_zoo_entries_are_equal_step_controls():
    from vitlab import zoo

    recipes = {(t, s): zoo.ZOO[V.entry_name(t, s)] for t in V.TOWERS for s in V.SEEDS}
    for (t, s), r in recipes.items():
        assert r.model == V.model_name(t) and r.seed == s and r.objective == "clip"
        assert r.shares == {"smoke": "cpu"} and r.data_seed == V.DATA_SEED
        other = recipes[("vit" if t == "vitamin" else "vitamin", s)]
        # everything but the image tower is identical between the two towers of a seed
        assert r.config("cpu") | {"model": None} == other.config("cpu") | {"model": None}
    assert zoo.path_for(V.entry_name("vit", 0), "smoke") == zoo.path_for(V.entry_name("vit", 0), "cpu")
    for t in V.TOWERS:  # the longer run differs from seed 0's entry in its steps (and eval spacing) only
        long, base = zoo.ZOO[V.entry_name(t, 0, long=True)], recipes[(t, 0)]
        assert long.config("cpu")["fit"] == {**base.config("cpu")["fit"], "steps": V.LONG_STEPS["cpu"]}
        assert long.model == base.model and long.seed == base.seed and long.data == base.data
    assert V.LONG_STEPS["cpu"] == 2 * V.STEPS["cpu"]
    with pytest.raises(ValueError, match="seed"):
        V.entry_name("vit", 3)
    with pytest.raises(ValueError, match="seed"):
        V.entry_name("vit", 1, long=True)
    with pytest.raises(ValueError, match="tower"):
        V.model_name("deit")


def test_clip_objective_steps_and_curve():
    from vitlab import data, zoo

    obj = zoo.OBJECTIVES["clip"](data_seed=0, eval_every=2)
    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=32)
    torch.manual_seed(0)
    clip = V.clip_model("vit")
    idx = torch.arange(16)
    losses = objective_losses(obj, clip, train.images[idx], idx, lr=1e-3)
    assert losses[-1] < losses[0]
    m = obj.metrics(clip.eval(), train, None, None)
    assert m["val_curve_step"] == [0, 2, 3] and len(m["val_curve_zs"]) == 3
    assert {"test_zs_object", "test_r1_i2t", "val_r5_t2i", "logit_scale"} <= set(m)
