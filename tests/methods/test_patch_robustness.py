"""Patch robustness: the attention temperature divides every block's logits by T (T = 1 is the model unchanged, on
the fast path too), patch corruptions stay in their patches, the CLS attention share is 1/N under uniform
attention, the measurements run on a tiny model, the zoo entries start from chapter 1's ViT, and bad input."""
import pytest
import torch

from tests.model_helpers import tiny_vit
from vitlab import zoo
from vitlab.methods.robustness import patch_robustness as PR
from vitlab.models import create_model


def _images(n=6, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_temperature_one_is_the_model_unchanged():
    x = _images()
    base = tiny_vit()
    hot = PR.set_temperature(tiny_vit(), 1.0)
    assert torch.equal(base(x), hot(x))


def test_temperature_divides_the_logits_on_every_path():
    x = _images()
    base, hot = tiny_vit(), PR.set_temperature(tiny_vit(), 2.0)
    _, sides = base(x, side=("probs",))
    _, hot_sides = hot(x, side=("probs",))
    # block 0 sees the same input in both models: its probabilities are softmax(logits / 2)
    q, k, _ = base.blocks[0].attn.qkv_heads(base.blocks[0].norm1(base.embed(x)))
    expected = (base.blocks[0].attn.logits(q, k) / 2).softmax(-1)
    assert torch.allclose(hot_sides[0]["probs"], expected, atol=1e-6)
    # the default (SDPA) path honours the changed scale: it equals the materialised path's output
    logits_fast = hot(x)
    logits_slow, _ = hot(x, side=("probs",))
    assert torch.allclose(logits_fast, logits_slow, atol=1e-5)
    assert not torch.equal(logits_fast, base(x))  # (an untrained ViT attends almost uniformly: a small change)


def test_corrupt_patches_only_touches_the_mask():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    mask = PR.patch_mask(x, 4, seed=0, patches=3)
    xc = PR.corrupt_patches(x, "gaussian_noise", 5, mask)
    assert torch.equal(xc[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert (xc[mask.expand_as(x)] != x[mask.expand_as(x)]).any()


def test_cls_attention_share_is_one_over_n_under_uniform_attention():
    vit = tiny_vit()
    for blk in vit.blocks:  # zero queries: every logit 0, every row uniform over the 1 + 16 tokens
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    x = _images()
    share = PR.cls_attention_on(vit, x, PR.patch_mask(x, 4, seed=0, patches=2))
    assert share.shape == (2,)
    assert torch.allclose(share, torch.full((2,), 2 / 17), atol=1e-6)


def test_measure_reads_every_number_on_a_small_model():
    vit = create_model("ch6_vit_t1p0", num_classes=10)
    out = PR.measure(vit, "smoke", n_attack=8)
    assert set(out) == {"clean", "clean_attacked", "fooled", "attn_clean", "attn_natural", "attn_adversarial",
                        *(f"drop_{k}_{n}" for k in PR.NATURAL for n in PR.PATCHES)}
    assert 0 <= out["fooled"] <= 1 and 0 < out["attn_clean"] < 1
    cnn = create_model("ch6_cnn")
    assert "attn_clean" not in PR.measure_attack(cnn, "smoke", n_attack=8)
    hot = PR.measure_posthoc(vit, "smoke", n_attack=8)
    assert set(hot) == {f"{k}_t{t}" for k in ("clean", "fooled") for t in PR.TEMPERATURES[1:]}
    assert vit.blocks[0].attn.scale == vit.blocks[0].attn.head_dim ** -0.5, "the model itself is not changed"


def test_zoo_entries_start_from_chapter_ones_vit():
    for seed in PR.SEEDS:
        assert zoo.ZOO[PR.cnn_name(seed)].init is None
        for t in PR.TEMPERATURES:
            r = zoo.ZOO[PR.temperature_name(t, seed)]
            assert r.init == PR.vit_name(seed) and r.seed == seed
    vit = create_model("ch6_vit_t2p0")
    assert vit.blocks[0].attn.scale == pytest.approx(vit.blocks[0].attn.head_dim ** -0.5 / 2)
    base = create_model("ch1_vit")
    vit.load_state_dict(base.state_dict(), strict=True)  # the same weights: a fine-tune loads the trained ViT


def test_bad_input_names_the_argument():
    vit, x = tiny_vit(), _images()
    with pytest.raises(ValueError, match="temperature"):
        PR.set_temperature(vit, 0)
    with pytest.raises(ValueError, match="no attention blocks"):
        PR.set_temperature(torch.nn.Linear(2, 2), 2.0)
    with pytest.raises(ValueError, match="mask"):
        PR.corrupt_patches(x, "blur", 5, torch.ones(6, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown kind"):
        PR.corrupt_patches(x, "fog", 5, PR.patch_mask(x, 4))
    with pytest.raises(ValueError, match="mask"):
        PR.cls_attention_on(vit, x, PR.patch_mask(x[:2], 4))
    with pytest.raises(TypeError, match="VisionTransformer"):
        PR.cls_attention_on(create_model("ch6_cnn"), x, PR.patch_mask(x, 4))
    with pytest.raises(ValueError, match="temperature"):
        PR.temperature_name(4.0, 0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        PR.measure_posthoc(create_model("ch6_cnn"))
