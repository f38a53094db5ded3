"""DIMAP: the importance by hand, its properties (range, monotone, scale-invariant, brute force), modules, masks."""
import copy

import pytest
import torch

from vitlab.methods.efficient.dimap import (DEFAULTS, MODULE_KINDS, apply_masks_, dimap_importance,
                                            dimap_importance_bruteforce, finetune_masked, module_groups,
                                            module_sparsity, prunable, prune_masks, sparsity, tiny_swin)
from vitlab.methods.efficient.recipes import Reduced
from vitlab.models import VisionTransformer
from model_helpers import toy_train


def _vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


# ------------------------------------------------------------------------------------------------ importance
def test_importance_by_hand():
    (imp,) = dimap_importance(torch.tensor([3.0, -2.0, 1.0]))  # squares 9, 4, 1; cumulative 9, 13, 14
    torch.testing.assert_close(imp, torch.tensor([1.0, 4 / 13, 1 / 14]))
    (tie,) = dimap_importance(torch.tensor([1.0, 2.0, -2.0, 0.0]))  # ties count as "at least as large"
    torch.testing.assert_close(tie, torch.tensor([1 / 9, 0.5, 0.5, 0.0]))


def test_importance_range_monotone_and_bruteforce():
    g = torch.Generator().manual_seed(0)
    fc1, fc2 = torch.randn(6, 4, generator=g), 0.3 * torch.randn(4, 6, generator=g)  # one MLP module
    imps = dimap_importance([fc1, fc2])
    assert [i.shape for i in imps] == [fc1.shape, fc2.shape]
    flat_w = torch.cat([fc1.flatten(), fc2.flatten()]).abs()
    flat_i = torch.cat([i.flatten() for i in imps])
    assert flat_i.min() > 0 and flat_i.max() == 1.0
    order = flat_w.argsort(descending=True)
    assert (flat_i[order][1:] <= flat_i[order][:-1]).all(), "larger |w| never gets lower Imp within a module"
    for a, b in zip(imps, dimap_importance_bruteforce([fc1, fc2])):
        torch.testing.assert_close(a, b)


def test_importance_and_masks_invariant_to_rescaling_a_module():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 7, generator=g)
    torch.testing.assert_close(dimap_importance(w)[0], dimap_importance(0.01 * w)[0])
    model = _vit()
    scaled = copy.deepcopy(model)
    with torch.no_grad():  # a function-preserving rescale: LN1 × 10, qkv weight × 0.1
        blk = scaled.blocks[1]
        blk.norm1.weight.mul_(10)
        blk.norm1.bias.mul_(10)
        blk.attn.qkv.weight.mul_(0.1)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(scaled(x), model(x), atol=1e-5, rtol=1e-4)
    d0, d1 = prune_masks(model, 0.5, "dimap"), prune_masks(scaled, 0.5, "dimap")
    assert all(torch.equal(d0[k], d1[k]) for k in d0), "DIMAP ignores a module's scale"
    g0, g1 = prune_masks(model, 0.5, "global"), prune_masks(scaled, 0.5, "global")
    assert not all(torch.equal(g0[k], g1[k]) for k in g0), "global magnitude does not"
    assert 1 - g1["blocks.1.attn.qkv.weight"].float().mean() > 0.95, "it wipes the down-scaled module"


# ------------------------------------------------------------------------------------------------ modules and masks
def test_module_groups_of_a_swin_and_a_vit():
    swin = tiny_swin()
    groups = module_groups(swin)
    kinds = [g["kind"] for g in groups.values()]
    assert [kinds.count(k) for k in MODULE_KINDS] == [4, 4, 4, 3]  # 2 + 2 blocks; patch embed, merging, head
    assert groups["layers.0.blocks.1.mlp"]["params"] == ["layers.0.blocks.1.mlp.fc1.weight",
                                                        "layers.0.blocks.1.mlp.fc2.weight"]
    assert "layers.1.downsample.reduction" in groups and groups["head.fc"]["kind"] == "AUX-M"
    assert not any("relative_position" in p for g in groups.values() for p in g["params"])
    vit_kinds = [g["kind"] for g in module_groups(_vit()).values()]
    assert [vit_kinds.count(k) for k in MODULE_KINDS] == [2, 2, 2, 2]


@pytest.mark.parametrize("method", ["dimap", "global", "layer"])
def test_masks_hit_the_sparsity(method):
    model = tiny_swin()
    masks = prune_masks(model, 0.5, method)
    assert set(masks) == set(prunable(model))
    assert abs(sparsity(masks) - 0.5) < 1e-3
    if method == "layer":
        assert all(abs(1 - m.float().mean().item() - 0.5) < 0.02 for m in masks.values())
    per_module = module_sparsity(model, masks)
    assert all(0.0 <= s <= 1.0 and k in MODULE_KINDS for k, s in per_module.values())
    pruned = apply_masks_(copy.deepcopy(model), masks)
    assert all((p[~masks[n]] == 0).all() for n, p in prunable(pruned).items())


def test_bad_inputs():
    model = _vit()
    with pytest.raises(ValueError, match="sparsity"):
        prune_masks(model, 1.0)
    with pytest.raises(ValueError, match="method"):
        prune_masks(model, 0.5, "random")
    with pytest.raises(TypeError, match="weights"):
        dimap_importance([])
    with pytest.raises(TypeError, match="model"):
        prune_masks("model", 0.5)


def test_masked_finetune_keeps_pruned_weights_zero():
    model = _vit()
    masks = prune_masks(model, 0.7, "dimap")
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,))
    before = {n: p.detach().clone() for n, p in prunable(model).items()}
    hist = finetune_masked(model, masks, (x, y), "smoke", steps=3, batch_size=8)
    assert hist["step"][-1] == 3 and not model.training
    assert all((p[~masks[n]] == 0).all() for n, p in prunable(model).items())
    assert any(not torch.equal(p[masks[n]], before[n][masks[n]]) for n, p in prunable(model).items())  # kept ones train
    assert not any("parametrizations" in n for n, _ in model.named_parameters())  # the mask is folded back in


def test_masked_finetune_is_the_chapter_recipe():
    """Same arguments as the dense control: with nothing pruned, the masked fine-tune IS fit(**finetune_kwargs)."""
    from vitlab.methods.efficient.recipes import finetune_kwargs
    from vitlab.train import fit

    a, b = _vit(), _vit()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,))
    none = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable(a).items()}
    finetune_masked(a, none, (x, y), "smoke", seed=1, batch_size=8)
    fit(b, (x, y), None, profile="smoke", seed=1, progress=False, **{**finetune_kwargs("smoke"), "batch_size": 8})
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert finetune_kwargs("smoke")["lr"] == 1e-4


def test_for_compare_returns_a_sane_reduced():
    from vitlab.methods.efficient import dimap

    base = _vit()
    before = copy.deepcopy(base.state_dict())
    train = toy_train()
    out = dimap.for_compare(base, train, "smoke")
    assert isinstance(out, Reduced) and out.tokens_per_block is None and "DIMAP" in out.note
    assert abs(out.extra["sparsity"] - 0.5) < 1e-3 and out.extra["nonzero_gflops"] < out.extra["dense_gflops"]
    assert not out.model.training and out.model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "base is not modified"


def test_for_compare_takes_a_seed_and_keeps_the_mask():
    from vitlab.methods.efficient import dimap

    base, train = _vit(), toy_train()
    a, b = dimap.for_compare(base, train, "smoke", seed=0), dimap.for_compare(base, train, "smoke", seed=1)
    pa, pb = prunable(a.model), prunable(b.model)
    assert any(not torch.equal(pa[n], pb[n]) for n in pa)  # the seed sets the batches and shifts
    masks = prune_masks(base, DEFAULTS["sparsity"], DEFAULTS["method"])
    assert all(torch.equal(pa[n] != 0, masks[n] & (pa[n] != 0)) and (pa[n][~masks[n]] == 0).all() for n in pa)
    with pytest.raises(ValueError, match="seed"):
        dimap.for_compare(base, train, "smoke", seed=-1)

