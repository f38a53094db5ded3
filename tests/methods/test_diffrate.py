"""DiffRate: STE ops and the DDP by hand, the policy softmax, the merge rule, search == deploy, keep-all == base."""
import math
from types import SimpleNamespace

import pytest
import torch

from vitlab.methods.efficient.diffrate import (DEFAULTS, DDP, DiffRateViT, UniformMerge, _policy_attention, for_compare,
                                               merge_tail, search, softmax_with_policy, ste_ceil, ste_min,
                                               search_steps, uniform_merge_schedule, vit_macs)
from vitlab.methods.efficient.recipes import Reduced, finetune_steps
from vitlab.models import VisionTransformer


def _vit(seed=0, depth=3):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=depth,
                             num_heads=2, mlp_ratio=2.0).eval()


def _set(ddp, kept_patches):
    """Logits whose expected kept count is kept_patches − 0.5 exactly: ceil gives kept_patches (+1 CLS)."""
    with torch.no_grad():
        ddp.logits.fill_(-30.0)
        c = ddp.candidates.tolist()
        ddp.logits[c.index(kept_patches)] = 30.0
        ddp.logits[c.index(kept_patches - 1)] = 30.0


# ------------------------------------------------------------------------------------------------ STE ops
def test_ste_ceil_and_min_by_hand():
    x = torch.tensor([1.2, 2.0, -0.5], requires_grad=True)
    y = ste_ceil(x)
    assert y.tolist() == [2.0, 2.0, 0.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # identity backward

    n = torch.tensor(5.0, requires_grad=True)
    p = torch.tensor(3.0, requires_grad=True)
    m = torch.tensor(4.0, requires_grad=True)
    out = ste_min(n, p, m)
    assert out.item() == 3.0
    (2 * out).backward()
    assert n.grad is None and p.grad.item() == 2.0 and m.grad.item() == 2.0  # both kept counts, never N


# ------------------------------------------------------------------------------------------------ DDP
def test_ddp_kept_count_and_mask_by_hand():
    d = DDP(num_patches=4, granularity=2)  # candidates k = 4, 2 patches; α = 0 → π = (1/2, 1/2)
    assert d.candidates.tolist() == [4.0, 2.0]
    K = d.kept_count()  # ceil(4·½ + 2·½) + CLS = 3 + 1
    assert K.item() == 4.0 and d.kept == 4
    # m_t = Σ_{k+1 > t} π_k: tokens 0..2 survive under both candidates, 3 and 4 only under k = 4
    torch.testing.assert_close(d.token_prob(), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5]))
    mask = d.token_mask(d.kept)
    assert mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # forward: hard 0/1
    mask.sum().backward()  # backward: through m, Σm = 5π_0 + 3π_1, dπ_0/dα_0 = π_0π_1 = ¼
    torch.testing.assert_close(d.logits.grad, torch.tensor([0.5, -0.5]))

    d.logits.grad = None
    with torch.no_grad():
        d.logits.copy_(torch.tensor([math.log(3.0), 0.0]))  # π = (¾, ¼): E = 3.5 → K = 4 + 1
    K = d.kept_count()
    assert K.item() == 5.0
    K.backward()  # ceil passes the gradient: dE/dα_k = π_k (k − E)
    torch.testing.assert_close(d.logits.grad, torch.tensor([0.375, -0.375]))
    # only the positions kept..upto−1 are zeroed
    assert DDP(4, 1).token_mask(2, 4).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_ddp_fix_and_bad_input():
    d = DDP(8, 2)
    assert d.fix(3).kept == 3 and d.fix(None).kept == d.kept_count().item()
    with pytest.raises(ValueError, match="num_patches"):
        DDP(0)
    with pytest.raises(TypeError, match="granularity"):
        DDP(8, 2.0)
    with pytest.raises(ValueError, match="kept must be <= num_patches"):
        d.fix(10)


# ------------------------------------------------------------------------------------------------ attention
def test_policy_softmax_all_ones_is_softmax_and_zeros_drop_keys():
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(softmax_with_policy(logits, torch.ones(2, 5)), logits.softmax(-1), atol=1e-5,
                               rtol=1e-5)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]] * 2)
    p = softmax_with_policy(logits, policy)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)
    for j in (2, 4):  # dropped keys get ~0 from every other query, but a token still sees itself
        others = [i for i in range(5) if i != j]
        assert p[:, :, others, j].max() < 1e-3  # ε/N over a sum that can be small
        seen = sorted({0, 1, 3, j})  # a dropped query's own row: the kept keys and itself
        torch.testing.assert_close(p[:, :, j, seen], logits[:, :, j, seen].softmax(-1), atol=1e-3, rtol=1e-3)
    # the kept keys share the softmax among themselves
    keep = [0, 1, 3]
    torch.testing.assert_close(p[:, :, 0, keep], logits[:, :, 0, keep].softmax(-1), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="policy must be"):
        softmax_with_policy(logits, torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits must be"):
        softmax_with_policy(torch.randn(3, 5, 5), torch.ones(3, 5))


def test_policy_attention_matches_the_model_attention():
    blk = _vit().blocks[0]
    x = torch.randn(2, 17, 32)
    out, probs = _policy_attention(blk.attn, x, None, torch.ones(2, 17))
    torch.testing.assert_close(out, blk.attn(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ merge
def test_merge_tail_by_hand_and_size():
    cls, a, b = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), torch.tensor([0.0, 0, 1])
    c = torch.tensor([0.0, 0.6, 0.8])  # cos(c, a) = 0.6, cos(c, b) = 0.8: goes into b
    d = torch.tensor([0.9, 0.1, 0.0])  # most similar to CLS, which is no target: goes into a (cos ≈ 0.11)
    x = torch.stack([cls, a, b, c, d])[None]
    size = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0]])
    out, s = merge_tail(x, size, keep=3)
    assert out.shape == (1, 3, 3)
    torch.testing.assert_close(out[0, 0], cls)
    torch.testing.assert_close(out[0, 2], (b + c) / 2)  # plain mean of the target and its source
    torch.testing.assert_close(out[0, 1], (a + d) / 2)
    cos_d = 0.1 / math.hypot(0.9, 0.1)
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0 + cos_d, 2.0 + 3.0 * 0.8]]))  # size += sim · size
    # search mode keeps the sources in place (to be masked), with their scaled sizes
    out2, s2 = merge_tail(x, size, keep=3, keep_sources=True)
    torch.testing.assert_close(out2[0, :3], out[0]) and torch.testing.assert_close(out2[0, 3:], x[0, 3:])
    torch.testing.assert_close(s2[0, 3:], torch.tensor([3.0 * 0.8, cos_d]))
    # the official search floors each source's scaled size at 1 before adding it: d (cos_d · 1 < 1) counts as 1
    out3, s3 = merge_tail(x, size, keep=3, keep_sources=True, clamp_sizes=True)
    torch.testing.assert_close(out3, out2)
    torch.testing.assert_close(s3[0], torch.tensor([1.0, 1.0 + 1.0, 2.0 + 3.0 * 0.8, 3.0 * 0.8, 1.0]))


def test_the_search_clamps_merged_sizes_and_the_deployed_model_does_not():
    model = DiffRateViT(_vit())
    assert model.clamp_search_sizes and not DiffRateViT(_vit(), clamp_search_sizes=False).clamp_search_sizes
    with pytest.raises(TypeError, match="clamp_search_sizes"):
        DiffRateViT(_vit(), clamp_search_sizes=1)


def test_merge_conserves_total_size_when_sources_match_and_tome_baseline_conserves_it():
    torch.manual_seed(0)
    kept = torch.randn(2, 6, 8)
    src_idx = torch.tensor([[1, 3, 3, 5], [2, 2, 4, 1]])
    src = torch.gather(kept, 1, src_idx[..., None].expand(-1, -1, 8)) * 2.0  # same direction: cosine 1
    x = torch.cat([kept, src], dim=1)
    size = torch.rand(2, 10) + 0.5
    out, s = merge_tail(x, size, keep=6)
    torch.testing.assert_close(s.sum(1), size.sum(1))
    # the ToMe-style baseline's merges (vitlab.tokens) keep the total size exactly
    from vitlab.tokens import bipartite_soft_matching, merge_tokens
    dst, n = bipartite_soft_matching(x, 3)
    _, s3 = merge_tokens(x, size, dst, n)
    torch.testing.assert_close(s3.sum(1), size.sum(1))
    with pytest.raises(ValueError, match="keep"):
        merge_tail(x, size, keep=1)
    with pytest.raises(ValueError, match="size must be"):
        merge_tail(x, size[:, :5], keep=3)


# ------------------------------------------------------------------------------------------------ model
def test_keep_all_equals_the_base_model():
    vit = _vit()
    model = DiffRateViT(vit, granularity=2)
    for d in (*model.prune, *model.merge):
        with torch.no_grad():
            d.logits.fill_(-30.0)
            d.logits[0] = 30.0  # all mass on "keep all 16 patches"
    x = torch.randn(4, 3, 16, 16)
    ref = vit(x)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.train()(x), ref, atol=1e-4, rtol=1e-4)  # ε of the policy softmax
    assert model.relative_flops().item() == pytest.approx(1.0)
    assert model.eval().relative_flops().item() == pytest.approx(1.0)
    assert model.schedule()["attn"] == [17, 17, 17]


def test_search_masking_equals_deployed_truncation_and_merging():
    vit = _vit(depth=3)
    model = DiffRateViT(vit, granularity=1, clamp_search_sizes=False)  # the deployed sizes, unclamped
    _set(model.prune[0], 12)  # block 1: keep CLS + 12, then merge down to CLS + 8
    _set(model.merge[0], 8)
    _set(model.prune[1], 16)  # block 2: no pruning, merge to CLS + 5
    _set(model.merge[1], 5)
    s = model.eval().schedule()
    assert s["prune"] == [17, 13, 17] and s["merge"] == [17, 9, 6]
    assert s["attn"] == [17, 17, 9] and s["mlp"] == [17, 9, 6]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        deployed = model.eval()(x)
        searched = model.train()(x)
    torch.testing.assert_close(searched, deployed, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(deployed, vit(x), atol=1e-3)
    model.clamp_search_sizes = True  # the official search: same tokens kept, merged sizes floored at 1
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), deployed, atol=1e-4)
    model.clamp_search_sizes = False
    # the differentiable FLOPs equal the deployed ones, and reach both DDPs of every block
    rel = model.relative_flops()
    assert rel.item() == pytest.approx(model.eval().relative_flops().item(), rel=1e-6)
    model.train()(x)
    rel = model.relative_flops()
    rel.backward()
    for d in (*model.prune, *model.merge):
        assert d.logits.grad is not None and d.logits.grad.abs().sum() > 0


def test_vit_macs_by_hand():
    vit = _vit(depth=2)  # C = 32, H = 64, 16 patches of 4×4×3, 5 classes
    C, H = 32, 64
    expected = 16 * C * 48 + C * 5 + 2 * (4 * 17 * C * C + 2 * 17 * 17 * C + 2 * 17 * C * H)
    assert vit_macs(vit, [17, 17], [17, 17]).item() == expected
    assert vit_macs(vit, [17, 17], [17, 9]).item() == expected - 2 * 8 * C * H


def test_search_trains_only_the_logits_and_is_deterministic():
    vit = _vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    torch.manual_seed(1)
    data = SimpleNamespace(images=torch.randn(40, 3, 16, 16), labels=torch.randint(0, 5, (40,)))
    runs = []
    for _ in range(2):
        model = DiffRateViT(vit, granularity=2)
        hist = search(model, data, target=0.5, steps=4, batch_size=16, lr=0.05, seed=3)
        runs.append((hist, [p.detach().clone() for p in model.arch_parameters()]))
        assert not model.training and len(hist["flops"]) == 4 and len(hist["prune"][0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0]["loss"] == runs[1][0]["loss"]
    assert any(p.abs().sum() > 0 for p in runs[0][1])  # the logits moved
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # the ViT did not
    assert all(p.grad is None for p in vit.parameters()) and not vit.training
    with pytest.raises(ValueError, match="target"):
        search(model, data, target=1.5)
    with pytest.raises(TypeError, match="data"):
        search(model, torch.randn(3), target=0.5)
    with pytest.raises(TypeError, match="DiffRateViT"):
        search(vit, data)


def test_uniform_merge_baseline():
    vit = _vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(UniformMerge(vit, [0, 0, 0])(x), vit(x), atol=1e-5, rtol=1e-5)
    r = uniform_merge_schedule(vit, 0.6)
    u = UniformMerge(vit, r)
    assert abs(u.relative_flops() - 0.6) < 0.05 and max(r) - min(r) <= 1
    attn, mlp = u.tokens()
    assert attn[0] == 17 and all(a - m == min(k, (a + 1) // 2 - 1) for a, m, k in zip(attn, mlp, r))
    assert u(x).shape == (2, 5)
    with pytest.raises(ValueError, match="one int per block"):
        UniformMerge(vit, [1, 2])
    with pytest.raises(ValueError, match="target"):
        uniform_merge_schedule(vit, 0.0)


def test_bad_model_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        DiffRateViT("vit")
    with pytest.raises(ValueError, match="granularity must be < num_patches"):
        DiffRateViT(_vit(), granularity=16)
    with pytest.raises(ValueError, match="CLS"):
        DiffRateViT(VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                      global_pool="avg"))
    with pytest.raises(ValueError, match="prune must list 2"):
        DiffRateViT(_vit()).fix([10], None)


def test_for_compare_on_a_tiny_model():
    vit = _vit()
    data = SimpleNamespace(images=torch.randn(64, 3, 16, 16), labels=torch.randint(0, 5, (64,)))
    out = for_compare(vit, data, "smoke")
    assert isinstance(out, Reduced) and not out.model.training and out.gflops is None
    assert len(out.tokens_per_block) == 3 and out.tokens_per_block[0] == 17
    assert all(a >= b for a, b in zip(out.tokens_per_block, out.tokens_per_block[1:]))
    assert 0 < out.extra["relative_flops"] < 1 and "prune" in out.note
    assert out.model(data.images[:2]).shape == (2, 5)
    assert out.extra["search_steps"] == search_steps("smoke") == DEFAULTS["steps"]["smoke"]


def test_for_compare_trains_only_the_rates_and_takes_a_seed():
    vit = _vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    data = SimpleNamespace(images=torch.randn(256, 3, 16, 16), labels=torch.randint(0, 5, (256,)))
    a, b = for_compare(vit, data, "smoke", seed=0), for_compare(vit, data, "smoke", seed=0)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # the backbone is frozen
    assert a.extra["schedule"] == b.extra["schedule"]  # same seed, same search
    assert all(torch.equal(p, q) for p, q in zip(a.model.arch_parameters(), b.model.arch_parameters()))
    c = for_compare(vit, data, "smoke", seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.model.arch_parameters(), c.model.arch_parameters()))
    with pytest.raises(ValueError, match="seed"):
        for_compare(vit, data, "smoke", seed=-1)


def test_defaults_are_the_papers_search_recipe():
    assert (DEFAULTS["lr"], DEFAULTS["min_lr"], DEFAULTS["granularity"]) == (0.01, 0.001, 4)
    assert search_steps("cpu") <= finetune_steps("cpu")  # a search costs at most one chapter fine-tune


def test_fate_counts_match_the_schedule():
    vit = _vit(depth=3)
    model = DiffRateViT(vit, granularity=1)
    _set(model.prune[0], 12)
    _set(model.merge[0], 8)
    _set(model.prune[1], 16)
    _set(model.merge[1], 5)
    fate = model.eval().fate(torch.randn(3, 3, 16, 16))
    assert fate.shape == (3, 16)
    assert ((fate == 0).sum(1) == 16 - 12).all()  # pruned in block 1
    assert ((fate == 2).sum(1) == 5).all()  # the 5 patch tokens left at the end, each its own patch
    assert ((fate == 1).sum(1) == 12 - 5).all()
