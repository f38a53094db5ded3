"""TAP and ADL (official guoyongcs/TAPADL, TAPADL_RVT/tap_robust_models.py and engine.py; not installed): the dilated
pooling and the ADL by hand, TAP forced to the identity is the plain Block, numbers of the official functions on fixed
inputs, the training step, the zoo entries (not trained here) and bad input."""
import copy

import pytest
import torch

from model_helpers import tiny_vit, toy_train
from vitlab import zoo
from vitlab.methods.architectures import recipes as R
from vitlab.methods.robustness import tap_adl as T
from vitlab.models import Block, VisionTransformer, create_model
from vitlab.train import fit

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
            mlp_ratio=4.0)  # model_helpers.tiny_vit's config: a 4 x 4 grid + CLS


def _images(n=4, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _force_scale(block: T.TAPBlock, k: int, big: float = 100.0) -> None:
    """Make the predictor put all weight on scale k: conv1 = 0, so BN outputs its bias (train or eval mode); BN bias
    = big on channel k; conv2 = the identity on the centre tap. The official predictor has no conv bias."""
    proj = block.tap.dilation_predictor.proj
    with torch.no_grad():
        proj[0].weight.zero_()
        proj[1].bias.zero_()
        proj[1].bias[k] = big
        proj[2].weight.zero_()
        for j in range(proj[2].weight.shape[0]):
            proj[2].weight[j, j, 1, 1] = 1.0


# ------------------------------------------------------------------------------------------------ pooling
def test_dilated_pooling_on_one_hot_grids():
    """A one-hot token at the centre (3, 3) of a 7 x 7 grid: the dilation-k mean puts 1/9 on the token itself and on
    its 8 neighbours k cells away, 0 elsewhere. A one-hot at the corner (0, 0) (channel 1): only the 4 window cells
    inside the grid, still 1/9 each (zero padding, divided by 9)."""
    x = torch.zeros(1, 2, 7, 7)
    x[0, 0, 3, 3] = 1.0
    x[0, 1, 0, 0] = 1.0
    assert torch.equal(T.DilatedAvgPooling(0)(x), x)
    for k in (1, 2, 3):
        want = torch.zeros(1, 2, 7, 7)
        for dr in (-k, 0, k):
            for dc in (-k, 0, k):
                want[0, 0, 3 + dr, 3 + dc] = 1 / 9
        for r in (0, k):
            for c in (0, k):
                want[0, 1, r, c] = 1 / 9
        torch.testing.assert_close(T.DilatedAvgPooling(k)(x), want)


def test_predictor_weights_are_a_softmax_over_scales():
    tap = T.TokenAwarePooling(8, num_scales=3)
    w = tap.weights(torch.randn(2, 8, 5, 4))
    assert w.shape == (2, 3, 5, 4) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, 5, 4))
    # conv 8->3 (3x3, no bias), BN(3), conv 3->3 (3x3, no bias): the official layout and names
    assert {k: tuple(v.shape) for k, v in tap.state_dict().items() if "running" not in k and "num_b" not in k} == {
        "dilation_predictor.proj.0.weight": (3, 8, 3, 3), "dilation_predictor.proj.1.weight": (3,),
        "dilation_predictor.proj.1.bias": (3,), "dilation_predictor.proj.2.weight": (3, 3, 3, 3)}


# ------------------------------------------------------------------------------------------------ TAP block
@pytest.mark.parametrize("train", [False, True])
def test_tap_forced_to_scale_zero_is_the_plain_block(train):
    vit = tiny_vit()
    x = vit.embed(_images())  # [4, 1 + 16, 32]
    plain = vit.blocks[0].train(train)
    tap = T.TAPBlock.from_block(copy.deepcopy(plain), grid=(4, 4), num_prefix_tokens=1).train(train)
    _force_scale(tap, 0)
    torch.testing.assert_close(tap(x), plain(x))
    (out, sides), (want, want_sides) = tap(x, side=("probs",)), plain(x, side=("probs",))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(sides["probs"], want_sides["probs"])


def test_tap_pools_patches_passes_cls_and_adds_onto_the_original_tokens():
    vit = tiny_vit()
    x = vit.embed(_images())
    tap = T.TAPBlock.from_block(copy.deepcopy(vit.blocks[0]), grid=(4, 4), num_prefix_tokens=1).eval()
    _force_scale(tap, 1)
    patches = x[:, 1:].transpose(1, 2).reshape(4, 32, 4, 4)
    want = torch.cat([x[:, :1], T.DilatedAvgPooling(1)(patches).flatten(2).transpose(1, 2)], dim=1)
    pooled = tap.pool_tokens(x)
    torch.testing.assert_close(pooled, want)
    assert torch.equal(pooled[:, 0], x[:, 0])  # the CLS token is not pooled
    torch.testing.assert_close(tap.forward_attn(x), x + tap.attn(tap.norm1(pooled)))  # residual onto x, not pooled
    assert not torch.allclose(tap(x), vit.blocks[0].eval()(x), atol=1e-4)


# ------------------------------------------------------------------------------------------------ ADL by hand
def test_adl_of_identical_rows_is_one():
    """Every query row equals the mean row [0.7, 0.1, 0.1, 0.1]: above 2/4 only 0.7 survives, cos = 1, loss = 1."""
    row = torch.tensor([0.7, 0.1, 0.1, 0.1])
    probs = row.expand(2, 3, 4, 4).clone()  # [B, H, N, N]
    assert T.attention_diversification_loss([probs, probs]).item() == pytest.approx(1.0)


def test_adl_zeroes_entries_at_or_below_threshold_over_n():
    """Rows 0, 1 = [.6, .4, 0, 0], rows 2, 3 = [0, 0, .4, .6]; the mean row m = [.3, .2, .2, .3].
    threshold 2 (cut 0.5): m is zeroed entirely, cos = 0, loss 0.
    threshold 1 (cut 0.25): rows keep .6 / .4, m -> [.3, 0, 0, .3]:
    cos = .18 / (sqrt(.52) * .3 sqrt(2)) = .6 / sqrt(1.04).
    Without the cut cos would be .26 / sqrt(.52 * .26) = 0.7071."""
    a, b = [0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]
    probs = torch.tensor([a, a, b, b]).reshape(1, 1, 4, 4)
    assert T.attention_diversification_loss([probs], threshold=2.0).item() == pytest.approx(0.0)
    assert T.attention_diversification_loss([probs], threshold=1.0).item() == pytest.approx(0.6 / 1.04 ** 0.5, rel=1e-6)
    # an entry equal to the cut is zeroed too (the official keeps > threshold / N)
    assert T.attention_diversification_loss([torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 1, 4, 4)]).item() == 0.0


def test_adl_drops_the_cls_row_and_column_and_counts_patch_tokens():
    """N = 1 CLS + 4 patches; the patch block's rows are [.45, .45, .05, .05]. With the CLS dropped the cut is 2/4 =
    0.5: everything is zeroed, loss 0 (with N = 5 the cut would be 0.4 and the loss 1)."""
    probs = torch.zeros(1, 1, 5, 5)
    probs[..., 1:, 1:] = torch.tensor([0.45, 0.45, 0.05, 0.05])
    probs[..., 0, :] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    assert T.attention_diversification_loss([probs], num_prefix_tokens=1).item() == 0.0
    assert T.attention_diversification_loss([probs[..., 1:, 1:]], threshold=1.6).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ official numbers
def test_matches_the_official_functions_on_fixed_inputs():
    """Expected numbers from running the official code (guoyongcs/TAPADL @ 6e4dbff, TAPADL_RVT/tap_robust_models.py
    ``DilatedAvgPooling``, ``DilationPredictor`` and the TAP lines of ``Block.forward``: mask = predictor(x), cat of the
    K pools, sum(pools * mask); TAPADL_RVT/engine.py ``AttentionDiversificationLoss``) in a scratch directory on the
    inputs below, rounded to 1e-5 (torch 2.14, CPU)."""
    # DilatedAvgPooling(d) on randn(1, 2, 5, 5) (Generator seed 0): channels 0, 1 at (h, w) = (0, 0), (2, 2), (4, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 5, generator=g)
    official = {1: [-0.21136, -0.32503, 0.21401, -0.07292, 0.33074, 0.19022],
                2: [-0.10073, 0.22962, 0.20486, -0.06844, -0.11354, 0.08971],
                3: [-0.13782, 0.01332, 0.38513, 0.4911, -0.04353, -0.17573]}
    for d, want in official.items():
        got = T.DilatedAvgPooling(d)(x)[0][:, [0, 2, 4], [0, 2, 3]].flatten()
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    # DilationPredictor(8, 4) in train mode, each parameter (state-dict order, running stats excluded) = 0.2 *
    # randn (Generator seed 1), then x = randn(2, 8, 5, 5) from the same generator
    tap = T.TokenAwarePooling(8, 4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in tap.dilation_predictor.state_dict().items():
            if t.is_floating_point() and "running" not in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    x = torch.randn(2, 8, 5, 5, generator=g)
    w, y = tap.weights(x), tap(x)
    assert w.shape == (2, 4, 5, 5) and y.shape == (2, 8, 5, 5)  # official: mask [2, 1, 5, 5, 4], x_attn [2, 8, 5, 5]
    torch.testing.assert_close(w[:, :, 1, 2], torch.tensor([[0.16791, 0.19369, 0.53283, 0.10556],
                                                            [0.15953, 0.21461, 0.51828, 0.10758]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[1, :, 4, 4], torch.tensor([0.2943, 0.27646, 0.31331, 0.11593]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, :3, 2, 2], torch.tensor([-0.95479, -0.0976, 0.0189]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1, 5, [0, 3], [4, 1]], torch.tensor([0.27865, -0.18592]), atol=1e-5, rtol=0)
    assert y.sum().item() == pytest.approx(10.2648, abs=1e-3)
    # AttentionDiversificationLoss on 2 layers of softmax(6 * randn(2, 3, 10, 10)) (Generator seed 2)
    g = torch.Generator().manual_seed(2)
    attn = [(6 * torch.randn(2, 3, 10, 10, generator=g)).softmax(-1) for _ in range(2)]
    assert T.attention_diversification_loss(attn, 2).item() == pytest.approx(0.120124, abs=1e-5)
    assert T.attention_diversification_loss(attn, 1).item() == pytest.approx(0.552947, abs=1e-5)
    assert T.attention_diversification_loss(attn[:1], 2).item() == 0.0  # official: 0.0 (layer 0's mean row is cut)


# ------------------------------------------------------------------------------------------------ model, training
def test_tap_vit_keeps_the_vit_weights_and_layout():
    torch.manual_seed(0)
    plain = VisionTransformer(**TINY)
    torch.manual_seed(0)
    tap = T.tap_adl_vit(tap=True, num_scales=3, **TINY)
    assert all(isinstance(b, T.TAPBlock) and isinstance(b, Block) for b in tap.blocks)
    ps, ts = plain.state_dict(), tap.state_dict()
    assert set(ts) - set(ps) == {k for k in ts if ".tap.dilation_predictor." in k} and set(ps) <= set(ts)
    assert all(torch.equal(ps[k], ts[k]) for k in ps)  # same seed: the same ViT weights
    torch.manual_seed(0)
    adl_only = T.tap_adl_vit(tap=False, **TINY)
    assert type(adl_only.blocks[0]) is Block and all(torch.equal(v, ps[k]) for k, v in adl_only.state_dict().items())
    logits, sides = tap.eval()(_images(), side=("probs",))
    assert logits.shape == (4, 5) and len(sides) == 2 and sides[0]["probs"].shape == (4, 2, 17, 17)


def test_parameters_within_thirty_percent_of_the_control():
    ratio = R.check_matched(create_model(T.model_name("tap")), create_model(R.model_name("vit")))
    assert 1.0 < ratio < 1.1  # 4 blocks x (64*4*9 + 2*4 + 4*4*9) = 9,824 extra on 139,018


def test_training_step_is_finite_and_reaches_the_predictor():
    torch.manual_seed(0)
    model = T.tap_adl_vit(**TINY).train()
    images, labels = _images(8), torch.arange(8) % 5
    loss, logits = T.adl_step()(model, images, labels)
    ce, _ = T.adl_step(weight=0.0)(model, images, labels)
    assert torch.isfinite(loss) and logits.shape == (8, 5) and loss.item() >= ce.item() - 1e-6
    assert torch.isfinite(T.adl_step()(T.tap_adl_vit(tap=False, **TINY).train(), images, labels)[0])  # ADL alone
    loss.backward()
    for blk in model.blocks:
        assert blk.tap.dilation_predictor.proj[0].weight.grad.abs().sum() > 0
    # peaked attention (qkv scaled up): the ADL itself is positive and sends gradient into the attention
    model.zero_grad()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(20)
    _, sides = model(images, side=("probs",))
    adl = T.attention_diversification_loss([s["probs"] for s in sides], num_prefix_tokens=1)
    adl.backward()
    assert adl.item() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # and through vitlab.train.fit, as the zoo objective runs it
    torch.manual_seed(0)
    history = fit(T.tap_adl_vit(**TINY), toy_train(16), steps=2, batch_size=8, step_fn=T.adl_step(), progress=False)
    assert all(torch.isfinite(torch.tensor(history["train_loss"])))


def test_objective_metrics_on_toy_data():
    data = toy_train(16)
    obj = T.adl_objective()
    model = T.tap_adl_vit(**TINY).eval()
    metrics = obj.metrics(model, data, data, data)
    assert obj.classifies, "the zoo scores it on val every epoch (plateau_gain), as the control"
    assert set(metrics) == {"test_adl"} and 0.0 <= metrics["test_adl"] <= 1.0


def test_zoo_entries_follow_chapter_ones_recipe():
    assert "adl" in zoo.OBJECTIVES
    for seed in T.SEEDS:
        control = zoo.ZOO[R.entry_name("vit", seed, "cpu")]
        for variant, (tap, adl) in T.VARIANTS.items():
            r = zoo.ZOO[f"ch6_tapadl_{variant}_digits_s{seed}"]
            assert r.model == ("ch6_tapadl_tap" if tap else "ch1_vit") == T.model_name(variant)
            for field in ("data", "data_kwargs", "fit", "seed", "data_seed", "per_profile", "shares", "init"):
                assert getattr(r, field) == getattr(control, field), field
            assert r.fit == R.TRAIN and r.per_profile["cpu"] == dict(steps=R.STEPS["cpu"], max_train=2000)
            assert r.objective == ("adl" if adl else None)
            assert r.objective_kwargs == (dict(weight=1.0, threshold=2.0, label_smoothing=0.1) if adl else {})


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, err, match", [
    (lambda: T.TAPBlock(32, 2, grid=(4,)), ValueError, "TAPBlock: grid must be"),
    (lambda: T.TAPBlock(32, 2, grid=(4, 0)), ValueError, r"TAPBlock: grid\[1\]"),
    (lambda: T.TAPBlock(32, 2, grid=(3, 3))(torch.randn(1, 17, 32)), ValueError, r"grid=\(3, 3\)"),
    (lambda: T.tap_adl_vit(num_scales=0, **TINY), ValueError, "tap_adl_vit: num_scales"),
    (lambda: T.tap_adl_vit(tap="yes", **TINY), TypeError, "tap_adl_vit: tap must be a bool"),
    (lambda: T.TokenAwarePooling(8, num_scales=0), ValueError, "TokenAwarePooling: num_scales"),
    (lambda: T.TokenAwarePooling(8)(torch.randn(2, 8, 5)), ValueError, r"token grid \[B, C, H, W\]"),
    (lambda: T.DilatedAvgPooling(-1), ValueError, "DilatedAvgPooling: dilation"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 1, 4, 4)], threshold=0), ValueError, "threshold"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 1, 4, 4)], threshold=-2), ValueError, "threshold"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 4, 4)]), ValueError, r"probs_per_layer\[0\]"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)]), ValueError,
     r"probs_per_layer\[1\]"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 1, 4, 4), torch.rand(2, 1, 4, 4)]), ValueError,
     r"probs_per_layer\[1\] has batch 2"),
    (lambda: T.attention_diversification_loss([torch.rand(1, 1, 2, 2)], num_prefix_tokens=2), ValueError,
     "num_prefix_tokens=2"),
    (lambda: T.attention_diversification_loss([]), TypeError, "probs_per_layer"),
    (lambda: T.attention_diversification_loss(torch.rand(2, 1, 1, 4, 4)), TypeError, "probs_per_layer"),
    (lambda: T.adl_step(weight=-1), ValueError, "adl_step: weight"),
    (lambda: T.adl_step(threshold=0), ValueError, "adl_step: threshold"),
    (lambda: T.entry_name("mixup", 0), ValueError, "variant"),
    (lambda: T.entry_name("tap", 3), ValueError, "seed"),
    (lambda: T.TAPBlock.from_block(torch.nn.Linear(2, 2), grid=(2, 2)), TypeError, "block must be a vitlab Block"),
])
def test_bad_input_names_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_measure_reads_clean_adl_and_every_corruption():
    from vitlab.data import CORRUPTIONS
    from vitlab.models import create_model

    vit = create_model("ch6_tapadl_tap", depth=1)  # one TAP block on 28-px digits: quick
    out = T.measure(vit, "smoke")
    assert set(out) == {"clean", "adl", *(f"acc_{k}_{s}" for k in CORRUPTIONS for s in range(1, 6))}
    assert 0 <= out["adl"] <= 1 and all(0 <= v <= 1 for v in out.values())
    with pytest.raises(TypeError, match="VisionTransformer"):
        T.measure(torch.nn.Linear(2, 2))
