"""LLaVA-SP (official CnFaker/LLaVA-SP, llava/model/llava_arch.py, llava/model/multimodal_encoder/clip_encoder.py; not
installed): the nested crops by index arithmetic, the pooling and DFI pieces on cases worked by hand, both variants
against numbers from the official code paths at the official 24 x 24 grid, TinyVLM with the spatial projector (a loss
and a backward on caption scenes), and bad input."""
from collections import Counter

import pytest
import torch
import torch.nn as nn

from tests.model_helpers import objective_losses, tiny_vit
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


# ------------------------------------------------------------------------------------------------ the lesson's zoo
SMALL = dict(vit=dict(embed_dim=16, depth=1, num_heads=2), lm=dict(dim=16, depth=1))  # 24 px: a 6 x 6 grid


def _small(arm, seed=0):
    torch.manual_seed(seed)
    return sp.vlm_model(arm, img_size=24, **SMALL)


def test_vlm_model_arms():
    """The arms differ only in the projector: the same ViT and LM shapes, 6 more visual tokens with spatial tokens."""
    x = torch.rand(2, 3, 48, 48)
    models = {arm: sp.vlm_model(arm) for arm in ("mlp", "pooling", "cropping")}
    assert isinstance(models["mlp"].projector, vlm.VisionProjector)
    assert models["pooling"].projector.variant == "pooling" and models["pooling"].projector.dfi is None
    assert models["cropping"].projector.variant == "cropping" and models["cropping"].projector.dfi is not None
    with torch.no_grad():
        assert models["mlp"].visual_prefix(x).shape == (2, 144, sp.LM["dim"])
        assert models["pooling"].visual_prefix(x).shape == (2, 150, sp.LM["dim"])
    for arm, m in models.items():
        assert m.lm.max_len == 192 and len(m.vision_encoder.blocks) == sp.VIT["depth"]
        assert m.vision_encoder.patch_embed.grid_size == (12, 12)
        same = {k: v.shape for k, v in m.state_dict().items() if not k.startswith("projector.")}
        assert same == {k: v.shape for k, v in models["mlp"].state_dict().items() if not k.startswith("projector.")}
    # the pooling projector is the control's MLP plus the spatial branch (official: its 6 full-kernel convolutions)
    mlp_keys = {k.replace("projector.", "projector.patch_proj.") for k in models["mlp"].state_dict()
                if k.startswith("projector.")}
    assert mlp_keys <= set(models["pooling"].state_dict())


def test_qa_accuracy_equals_greedy_answers():
    """Teacher-forced exact match (one forward per question, each scene encoded once) gives vlm.answer_accuracy's
    greedy numbers, per kind."""
    data = vlm.caption_scenes("test", n=30, img_size=24)
    model = _small("pooling")
    vlm.train_vlm(model, vlm.caption_scenes("train", n=64, img_size=24), steps=60, batch_size=32, lr=1e-2,
                  warmup=0.0, progress=False)
    fast = sp.qa_accuracy(model, data, batch_size=40)
    greedy = vlm.answer_accuracy(model, data, per_kind=True)
    assert fast["all"] > 0.05  # the few steps taught it some answers: the comparison is not 0 == 0
    for kind, acc in greedy.items():
        assert fast[kind] == pytest.approx(acc), kind
    counts = Counter(q.kind for _, q in data.items())
    assert fast["all"] == pytest.approx(sum(fast[k] * n for k, n in counts.items()) / sum(counts.values()))
    only = sp.qa_accuracy(model, data, kinds=("count",))
    assert set(only) == {"count", "all"} and only["count"] == pytest.approx(fast["count"])
    where = sp.qa_accuracy(model, data, kinds=("position",), by="answer")  # by the true answer: left, right, ...
    places = Counter(q.answer for _, q in data.items(("position",)))
    assert set(where) == set(places) | {"all"} and where["all"] == pytest.approx(fast["position"])
    assert where["all"] == pytest.approx(sum(where[p] * n for p, n in places.items()) / sum(places.values()))
    with pytest.raises(ValueError, match="by"):
        sp.qa_accuracy(model, data, by="colour")
    hits = sp.answer_hits(model, data, kinds=("position",))  # one bool per question, in data.items order
    assert hits.dtype == torch.bool and len(hits) == sum(places.values())
    assert hits.float().mean().item() == pytest.approx(where["all"])
    shapes = sp.qa_accuracy(model, data, kinds=("position",), by="objects")  # by the scene's number of shapes
    n = [len(data.objects[i]) for i, _ in data.items(("position",))]
    for k in (1, 2, 3):
        assert shapes[k] == pytest.approx(hits[[m == k for m in n]].float().mean().item())


def test_prior_accuracy_by_hand():
    """On its own training scenes the prior answers "how many shapes are there" with the most frequent count, so its
    count accuracy is that count's share."""
    from collections import Counter

    data = vlm.caption_scenes("train", n=250, img_size=24)
    prior = sp.prior_accuracy(data, data)
    counts = Counter(len(o) for o in data.objects)
    assert prior["count"] == pytest.approx(max(counts.values()) / len(data))
    assert all(0 <= v <= 1 for v in prior.values()) and set(vlm.QUESTION_KINDS) <= set(prior)
    assert sp.prior_accuracy(data, data, kinds=("exist",))["exist"] == pytest.approx(0.5, abs=0.1)


def test_qa_objective_steps_and_curve():
    from vitlab import data, zoo

    obj = zoo.OBJECTIVES["llava_sp_qa"](data_seed=0, seed=0, eval_every=2, val_n=20, eval_n=30)
    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=24)
    assert train.num_classes == len(train) and train.labels[:3].tolist() == [0, 1, 2]
    model = _small("pooling")
    idx = torch.arange(32)
    losses = objective_losses(obj, model, train.images[idx], idx, lr=3e-3)
    assert losses[-1] < losses[0]
    m = obj.metrics(model.eval(), train, None, None)
    assert m["val_curve_step"] == [0, 2, 3] and len(m["val_curve_position"]) == 3
    assert set(m) == {"test_position", "test_all", "val_position", "val_all", "val_curve_step", "val_curve_position",
                      "val_curve_all"}  # position questions only (sp.KINDS)
    assert m["test_position"] == sp.measure(model, "test", n=30, img_size=24)["position"]
    with pytest.raises(ValueError, match="kinds"):
        zoo.OBJECTIVES["llava_sp_qa"](kinds=("where",))


def test_zoo_entries_are_equal_step_controls():
    from vitlab import zoo

    recipes = {(a, s): zoo.ZOO[sp.entry_name(a, s)] for a in sp.ARMS for s in sp.SEEDS}
    for (a, s), r in recipes.items():
        assert r.model == sp.model_name(a) and r.seed == s and r.objective == "llava_sp_qa"
        assert r.shares == {"smoke": "cpu"} and r.data_seed == sp.DATA_SEED
        assert r.objective_kwargs["seed"] == s
        # everything but the projector is identical between the arms of a seed
        other = recipes[("mlp", s)]
        assert r.config("cpu") | {"model": None} == other.config("cpu") | {"model": None}
        assert r.config("gpu") | {"model": None} == other.config("gpu") | {"model": None}
    assert zoo.path_for(sp.entry_name("mlp", 0), "smoke") == zoo.path_for(sp.entry_name("mlp", 0), "cpu")
    for a in sp.ARMS:  # the longer run differs from seed 0's entry in its steps (and eval spacing) only
        long, base = zoo.ZOO[sp.entry_name(a, 0, long=True)], recipes[(a, 0)]
        assert long.config("cpu")["fit"] == {**base.config("cpu")["fit"], "steps": sp.LONG_STEPS["cpu"]}
        assert long.model == base.model and long.seed == base.seed and long.data == base.data
    assert sp.LONG_STEPS["cpu"] == 2 * sp.STEPS["cpu"] and "mlp" in sp.ARMS
    from vitlab.models import model_config

    assert model_config(sp.model_name("pooling"))["projector"] == "pooling"
    enc = zoo.ZOO[sp.ENCODER_ENTRY]  # one frozen tower for every arm and seed, pretrained once
    assert enc.objective == "vlm_patch_attr" and enc.shares == {"smoke": "cpu"} and enc.data_seed == sp.DATA_SEED
    assert all(r.init == sp.ENCODER_ENTRY for r in recipes.values())
    assert sp.FIT["trainable"] == ("projector.", "lm.")


def test_qa_objective_frozen_tower_caches_the_same_logits():
    """With the tower frozen (FIT["trainable"]), the step reads cached tower features: the same loss as the full
    forward, and no gradient reaches the tower."""
    from vitlab import data, zoo
    from vitlab.probe import partial_optimizer

    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=24)
    idx = torch.tensor([5, 17, 3, 40])
    losses = []
    for freeze in (False, True):
        obj = zoo.OBJECTIVES["llava_sp_qa"](data_seed=0, seed=2, eval_every=1000, val_n=5)
        model = _small("mlp")
        if freeze:
            partial_optimizer(sp.FIT["trainable"])(model, 1e-3, 0.0)  # what fit does: the tower stops requiring grad
        loss, _ = obj.step_fn(model, train.images[idx], idx)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def test_first_token_macs():
    """Six more visual tokens: the LM's prefill grows by 6 positions, the projector by its six convolutions."""
    x, q = torch.rand(1, 3, 48, 48), torch.tensor([[5, 6, 7]])
    macs = {a: sp.first_token_macs(sp.vlm_model(a).eval(), x, q) for a in ("mlp", "pooling")}
    assert 0 < macs["pooling"] - macs["mlp"] < 0.1 * macs["mlp"]
    convs = sum(64 * 32 * s * s for s in sp.pool_sides(12))  # one output per convolution: Dv * d * s^2 MACs
    assert macs["pooling"] - macs["mlp"] > convs
    with pytest.raises(TypeError, match="first_token_macs: model must be a TinyVLM"):
        sp.first_token_macs(nn.Linear(2, 2), x, q)


def test_patch_labels_by_hand():
    """A scene's patch targets: background 0; a patch mostly covered by object k gets 1 + 4 colour + shape of it."""
    from vitlab.vlm import COLOURS, SHAPES

    data = vlm.caption_scenes("train", n=8, img_size=48)
    y = sp.patch_labels(data)
    assert y.shape == (8, 12, 12) and y.dtype == torch.long
    for i in range(8):
        cls = [0] + [1 + 4 * COLOURS.index(o.colour) + SHAPES.index(o.shape) for o in data.objects[i]]
        for (r, c) in ((0, 0), (6, 6), (3, 5), (9, 2), (5, 2), (2, 5)):
            block = [cls[k] for k in data.masks[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten().tolist()]
            want = max(sorted(set(block)), key=block.count)  # most pixels; ties to the lower class
            assert y[i, r, c].item() == want, (i, r, c)
    assert (y > 0).any(dim=(1, 2)).all()  # every scene has at least one object patch
    assert sp.patch_labels(data, 8).shape == (8, 6, 6)


def test_encoder_pretraining_objective_and_handover():
    from vitlab import data, zoo

    obj = zoo.OBJECTIVES["vlm_patch_attr"](data_seed=0, eval_every=2, val_n=10)
    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=24)
    torch.manual_seed(0)
    enc = sp.encoder_model(24, vit=SMALL["vit"])
    assert enc(train.images[:2]).shape == (2, 36, sp.NUM_PATCH_CLASSES)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    idx = torch.arange(32)
    losses = []
    for _ in range(3):
        loss, logits = obj.step_fn(enc, train.images[idx], idx)
        assert logits is None and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    acc = sp.patch_accuracy(enc, vlm.caption_scenes("test", n=10, img_size=24))
    assert 0 <= acc["object"] <= 1 and 0 <= acc["patch"] <= 1
    # the zoo starts a VLM from the pretraining through load_into: the VLM's tower is the encoder's ViT
    model = _small("pooling", seed=1)
    enc.load_into(model)
    for k, v in enc.vit.state_dict().items():
        assert torch.equal(model.vision_encoder.state_dict()[k], v), k
    with pytest.raises(TypeError, match="load_into: model must be a TinyVLM"):
        enc.load_into(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="patch_accuracy: model must be a PatchAttributeEncoder"):
        sp.patch_accuracy(model, vlm.caption_scenes("test", n=2, img_size=24))
    with pytest.raises(TypeError, match="patch_labels: data must be CaptionScenes"):
        sp.patch_labels(torch.zeros(2, 24, 24))
    with pytest.raises(ValueError, match="patch_size=5 does not divide"):
        sp.patch_labels(vlm.caption_scenes("test", n=2, img_size=24), 5)
    with pytest.raises(TypeError, match="vit must be a dict"):
        sp.encoder_model(vit=3)


def test_zoo_bad_input():
    with pytest.raises(ValueError, match="projector"):
        sp.vlm_model("conv")
    with pytest.raises(TypeError, match="vit must be a dict"):
        sp.vlm_model("mlp", vit=4)
    with pytest.raises(ValueError, match="max_len=128 cannot hold 150 visual tokens"):
        sp.vlm_model("pooling", lm=dict(max_len=128))
    with pytest.raises(ValueError, match="img_size"):
        sp.vlm_model("mlp", img_size=0)
    with pytest.raises(TypeError, match="qa_accuracy: model must be a TinyVLM"):
        sp.qa_accuracy(nn.Linear(2, 2), vlm.caption_scenes("test", n=2, img_size=24))
    with pytest.raises(TypeError, match="qa_accuracy: data must be CaptionScenes"):
        sp.qa_accuracy(_small("mlp"), torch.zeros(2, 3, 24, 24))
    with pytest.raises(ValueError, match="batch_size"):
        sp.qa_accuracy(_small("mlp"), vlm.caption_scenes("test", n=2, img_size=24), batch_size=0)
    with pytest.raises(TypeError, match="prior_accuracy: test must be CaptionScenes"):
        sp.prior_accuracy(vlm.caption_scenes("test", n=2, img_size=24), None)
    with pytest.raises(ValueError, match="split"):
        sp.measure(_small("mlp"), "dev")
    with pytest.raises(ValueError, match="eval_every"):
        sp.qa_objective(eval_every=0)
    with pytest.raises(ValueError, match="seed"):
        sp.qa_objective(seed=-1)
    with pytest.raises(ValueError, match="seed"):
        sp.entry_name("mlp", 3)
    with pytest.raises(ValueError, match="seed"):
        sp.entry_name("mlp", 1, long=True)
    with pytest.raises(ValueError, match="arm"):
        sp.entry_name("linear", 0)
    with pytest.raises(ValueError, match="arm"):
        sp.model_name("linear")
