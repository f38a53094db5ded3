"""EViT: top-k CLS-attention tokens kept, the fused token by hand, keep=1 is the base ViT, the schedule."""
import copy
import math

import pytest
import torch

from vitlab.methods.efficient.evit import (EViT, cls_attention_scores, finetune, for_compare, keep_count,
                                           keep_rate_schedule, reorganize)
from model_helpers import tiny_vit


def _vit(seed=0, **kw):
    return tiny_vit(seed, **kw)


# ------------------------------------------------------------------------------------------------ by hand
def test_keep_count():
    assert keep_count(64, 0.5) == 32 and keep_count(64, 0.6) == 39 and keep_count(33, 0.5) == 17
    assert keep_count(10, 0.7) == 7, "0.7 * 10 is 7, not ceil(7.000000000000001) = 8"
    assert keep_count(3, 0.01) == 1 and keep_count(5, 1.0) == 5


def test_reorganize_by_hand():
    # 1 CLS + 5 image tokens; token i holds the value i in every channel
    x = torch.arange(6.0)[None, :, None].expand(1, 6, 3).clone()
    a = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])  # CLS attention to image tokens 1..5
    out, idx = reorganize(x, a, 0.4, fuse=True)  # k = ceil(0.4 * 5) = 2: tokens 2 (0.4) then 4 (0.3)
    assert idx.tolist() == [[1, 3]]
    fused = 0.1 * 1 + 0.05 * 3 + 0.15 * 5  # raw weights of the dropped tokens 1, 3, 5 (not renormalised)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 2.0, 4.0, fused]))
    out_drop, _ = reorganize(x, a, 0.4, fuse=False)
    torch.testing.assert_close(out_drop[0, :, 0], torch.tensor([0.0, 2.0, 4.0]))
    same, none = reorganize(x, a, 1.0)
    assert none is None and same is x


def test_reorganize_keeps_exactly_the_top_k_and_fuses_the_rest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=g)
    a = torch.rand(3, 16, generator=g).softmax(-1)
    out, idx = reorganize(x, a, 0.5)
    k = 8
    assert out.shape == (3, 1 + k + 1, 8)
    top = a.argsort(dim=1, descending=True)[:, :k]
    assert torch.equal(idx, top), "top-k by CLS attention, highest first (sorted, not spatial order)"
    torch.testing.assert_close(out[:, 0], x[:, 0])
    for b in range(3):
        torch.testing.assert_close(out[b, 1:1 + k], x[b, 1:][top[b]])
        rest = [j for j in range(16) if j not in set(top[b].tolist())]
        torch.testing.assert_close(out[b, -1], (a[b, rest, None] * x[b, 1:][rest]).sum(0))


def test_scores_are_the_head_mean_cls_row_from_the_attention_side_output():
    vit = _vit()
    x = vit.embed(torch.rand(2, 3, 16, 16))
    blk = vit.blocks[0]
    _, side = blk.forward_attn(x, side=("cls",))
    _, side_probs = blk.forward_attn(x, side=("probs",))
    a = cls_attention_scores(side["cls"])
    torch.testing.assert_close(a, side_probs["probs"][:, :, 0, 1:].mean(1))
    assert a.shape == (2, 16)


# ------------------------------------------------------------------------------------------------ the model
def test_keep_one_equals_the_base_model():
    vit = _vit()
    x = torch.rand(4, 3, 16, 16)
    for m in (EViT(vit, 1.0, (0, 1)), EViT(vit, 0.5, (0, 1))):
        out = m(x, keep_rate=1.0) if m.keep_rate < 1 else m(x)
        torch.testing.assert_close(out, vit(x), rtol=0, atol=1e-6)
        assert m.last_tokens == [17, 17]


def test_model_reduces_and_tracks_kept_patches():
    vit = _vit(depth=3)
    m = EViT(vit, 0.5, (0, 2)).eval()
    x = torch.rand(2, 3, 16, 16)
    logits = m(x)
    assert logits.shape == (2, 5)
    assert m.last_tokens == [17, 1 + 8 + 1, 1 + 8 + 1]  # block 0 reduces 16 -> 8 + fused; block 2's MLP sees 1+5+1
    kept = m.last_kept  # after block 2: ceil(0.5 * 9) = 5 tokens, then the fused one (-1)
    assert kept.shape == (2, 6) and (kept[:, -1] == -1).all()
    mask = m.kept_mask(x)
    assert mask.shape == (2, 16) and mask.sum(1).le(5).all()
    # a block's kept tokens are the top-k of its own CLS attention: check block 0 directly
    t = vit.embed(x)
    t1, side = vit.blocks[0].forward_attn(t, side=("cls",))
    top = cls_attention_scores(side["cls"]).topk(8, dim=1).indices
    m(x)
    final = m.last_kept  # the patches that survive both reductions are among block 0's top-8
    for b in range(2):
        assert set(final[b][final[b] >= 0].tolist()) <= set(top[b].tolist())


def test_shares_weights_and_does_not_modify_the_base():
    vit = _vit()
    before = copy.deepcopy(vit.state_dict())
    m = EViT(vit, 0.5, 1)
    assert m.vit is vit and sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in vit.parameters())
    m(torch.rand(2, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_gradients_flow_through_the_fused_token():
    vit = _vit().train()
    m = EViT(vit, 0.5, (0,))
    m(torch.rand(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


# ------------------------------------------------------------------------------------------------ schedule
def test_keep_rate_schedule():
    assert keep_rate_schedule(0, 10, 0.5) == 1.0
    assert keep_rate_schedule(5, 10, 0.5) == pytest.approx(0.75)
    assert keep_rate_schedule(10, 10, 0.5) == 0.5 and keep_rate_schedule(99, 10, 0.5) == 0.5
    assert keep_rate_schedule(3, 10, 0.5, start=4) == 1.0
    assert keep_rate_schedule(7, 10, 0.5, start=4) == pytest.approx(0.75)
    # the official formula: base + (max - base) * (cos(pi * t / T) + 1) / 2
    t, T = 3, 8
    assert keep_rate_schedule(t, T, 0.7) == pytest.approx(0.7 + 0.3 * (math.cos(math.pi * t / T) + 1) / 2)
    rates = [keep_rate_schedule(s, 20, 0.6) for s in range(25)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_finetune_runs_the_schedule_for_exact_steps():
    vit = _vit()
    m = EViT(copy.deepcopy(vit), 0.5, (1,))
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 3, 16, 16, generator=g), torch.randint(0, 5, (40,), generator=g))
    hist = finetune(m, data, steps=6, batch_size=8, profile="smoke")
    assert len(hist["keep_rate"]) == 6 and hist["keep_rate"][0] == 1.0 and hist["keep_rate"][-1] == 0.5
    assert hist["step"][-1] == 6


def test_for_compare_on_a_tiny_model():
    from vitlab.methods.efficient.recipes import Reduced

    base = _vit(depth=4)
    before = copy.deepcopy(base.state_dict())
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(64 * 20, 3, 16, 16, generator=g), torch.randint(0, 5, (64 * 20,), generator=g))
    out = for_compare(base, data, "smoke")
    assert isinstance(out, Reduced) and not out.model.training
    assert out.tokens_per_block == [17.0, 17.0, 1 + 10 + 1, 1 + 10 + 1]  # keep 0.6 at blocks 1 and 3
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "base untouched"
    assert out.model(torch.rand(2, 3, 16, 16)).shape == (2, 5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    vit = _vit(depth=4)
    with pytest.raises(ValueError, match="keep_rate"):
        EViT(vit, 0.0)
    with pytest.raises(TypeError, match="keep_rate"):
        EViT(vit, "0.5")
    with pytest.raises(ValueError, match="reduce_at"):
        EViT(vit, 0.5, (4,))
    with pytest.raises(ValueError, match="reduce_at"):
        EViT(vit, 0.5, (1, 1))
    with pytest.raises(TypeError, match="reduce_at"):
        EViT(vit, 0.5, "1")
    with pytest.raises(TypeError, match="fuse"):
        EViT(vit, 0.5, fuse=1)
    with pytest.raises(TypeError, match="vit"):
        EViT(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="vit must be"):
        EViT("vit")
    with pytest.raises(ValueError, match="keep_rate"):
        EViT(vit, 0.5)(torch.rand(1, 3, 16, 16), keep_rate=1.5)
    with pytest.raises(ValueError, match="scores"):
        reorganize(torch.rand(1, 5, 3), torch.rand(1, 5), 0.5)
    with pytest.raises(ValueError, match="x must"):
        reorganize(torch.rand(5, 3), torch.rand(1, 4), 0.5)
    with pytest.raises(ValueError, match="cls_row"):
        cls_attention_scores(torch.rand(2, 5))
    with pytest.raises(ValueError, match="base_keep_rate"):
        keep_rate_schedule(0, 10, 1.2)
    with pytest.raises(ValueError, match="start"):
        keep_rate_schedule(0, 10, 0.5, start=10)
    with pytest.raises(ValueError, match="step"):
        keep_rate_schedule(-1, 10, 0.5)
    with pytest.raises(TypeError, match="model"):
        finetune(vit, (torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)), steps=1)


def test_finetune_uses_the_chapter_recipe_exactly(monkeypatch):
    """EViT's fine-tune is fit(**recipes.finetune_kwargs(P), seed=s): the dense control's arguments, plus a step_fn."""
    import vitlab.train
    from vitlab.methods.efficient import recipes

    seen = {}

    def fake_fit(model, train, val=None, **kw):
        seen.update(kw)
        return {"step": [kw["steps"]], "seconds": [0.0]}

    monkeypatch.setattr(vitlab.train, "fit", fake_fit)
    base = _vit(depth=4)
    out = for_compare(base, (torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)), "cpu", seed=2)
    step_fn = seen.pop("step_fn")
    assert callable(step_fn) and seen.pop("seed") == 2 and seen.pop("profile") == "cpu"
    seen.pop("progress"), seen.pop("desc")
    assert seen == recipes.finetune_kwargs("cpu"), "the control's lr, steps, batch, schedule, shift and smoothing"
    assert "history" in out.extra and "seed 2" in out.note
    with pytest.raises(TypeError, match="seed"):
        for_compare(base, None, "smoke", seed=1.5)
