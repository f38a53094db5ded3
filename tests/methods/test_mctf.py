"""MCTF (vitlab.methods.efficient.mctf): the score formula, bidirectional matching, fusion, the merged attention."""
import copy
import math

import pytest
import torch

from vitlab.methods.efficient import mctf
from vitlab.methods.efficient.mctf import (MCTFViT, attention_received, bidirectional_matching, consistency_step,
                                           fuse_tokens, mctf_scores, merge_attention, reduction, token_schedule)
from vitlab.models import VisionTransformer
from vitlab.tokens import bipartite_soft_matching, merge_tokens

# five tokens: cls (A), b0 (B), a1 (A), b1 (B), a2 (A)
X = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.8, 0.6]]])


@pytest.fixture
def eager_merge(monkeypatch):
    """Whole-model runs use the PyTorch merge: under pytest TRITON_INTERPRET=1 would send every fusion through
    Triton's (slow) CPU interpreter. The small cases above still run the kernel in the interpreter."""
    import vitlab.kernels._dispatch as dispatch

    monkeypatch.setattr(dispatch, "_INTERPRET", False)


def tiny_vit(seed=0, depth=2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=depth,
                             num_heads=2).eval()


def test_score_formula_hand_case():
    received = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1]])  # 1/ā normalised: [.25, 1, .5, .5, 1]
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 4.0]])      # 1/s normalised:  [1, 1, .5, 1, .25]
    w = mctf_scores(X, received, size, tau_sim=1, tau_info=2, tau_size=1)
    # rows: A = cls, a1, a2; columns: B = b0, b1.  W = ((cos+1)/2) · (ĩ_a ĩ_b)^(1/2) · (s̃_a s̃_b)
    sim = torch.tensor([[0.5, 1.0], [0.9, 0.8]])           # a1·b0 = 0, a1·b1 = 1, a2·b0 = .8, a2·b1 = .6
    info = torch.tensor([[0.5 * 1, 0.5 * 0.5], [1 * 1, 1 * 0.5]]).sqrt()
    siz = torch.tensor([[0.5 * 1, 0.5 * 1], [0.25 * 1, 0.25 * 1]])
    assert torch.isinf(w[0, 0]).all() and (w[0, 0] < 0).all(), "the CLS row is -inf"
    torch.testing.assert_close(w[0, 1:], sim * info * siz)
    # τ = 0 turns a criterion off: similarity only
    torch.testing.assert_close(mctf_scores(X, received, size, tau_sim=1, tau_info=0, tau_size=0)[0, 1:], sim)
    # the informativeness input from probabilities and from the colsum side output agree
    p = torch.randn(2, 3, 7, 7).softmax(-1)
    torch.testing.assert_close(attention_received(p), attention_received(p.sum(dim=-2)))


def test_bidirectional_matching_hand_case():
    w = mctf_scores(X, None, None, tau_sim=1, tau_info=0, tau_size=0)
    # A→B: a1's best (b1, 1.0) beats a2's (b0, 0.9): a1 → b1. B→A: b0 → a2 (0.9) beats b1 → a2 (0.8).
    dst, n = bidirectional_matching(w, 2)
    assert n == 3 and dst.tolist() == [[0, 1, 2, 2, 1]]  # [cls, a2+b0, b1+a1]
    # one direction only (ToMe): a1 → b1 and a2 → b0 would both be A→B; with r = 1 only a1 goes
    dst, n = bidirectional_matching(w, 1, bidirectional=False)
    assert n == 4 and dst.tolist() == [[0, 2, 3, 3, 1]]  # [cls, a2, b0, b1+a1]


@pytest.mark.parametrize("N,r", [(65, 8), (17, 7), (10, 4), (33, 1), (12, 5)])
def test_matching_merges_exactly_r_and_keeps_size(N, r):
    torch.manual_seed(N + r)
    x = torch.randn(3, N, 8)
    received = torch.rand(3, N) + 0.01
    size = torch.randint(1, 5, (3, N)).float()
    dst, n = bidirectional_matching(mctf_scores(x, received, size), r)
    assert n == N - r
    for row in dst:  # every output slot is used, CLS alone in slot 0
        assert sorted(set(row.tolist())) == list(range(N - r))
        assert row[0] == 0 and (row[1:] != 0).all()
    x2, s2 = fuse_tokens(x, received * size, size, dst, n)
    assert x2.shape == (3, N - r, 8)
    torch.testing.assert_close(s2.sum(1), size.sum(1))


def test_fused_token_is_hand_weighted_mean():
    received = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1]])
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 4.0]])
    dst = torch.tensor([[0, 1, 2, 2, 1]])  # [cls, a2+b0, b1+a1]
    x, s = fuse_tokens(X, received * size, size, dst, 3)
    w = received[0] * size[0]  # ā·s = [.4, .1, .4, .2, .4]
    torch.testing.assert_close(x[0, 1], (w[1] * X[0, 1] + w[4] * X[0, 4]) / (w[1] + w[4]))
    torch.testing.assert_close(x[0, 2], (w[2] * X[0, 2] + w[3] * X[0, 3]) / (w[2] + w[3]))
    torch.testing.assert_close(x[0, 0], X[0, 0])
    assert s.tolist() == [[1.0, 5.0, 3.0]]


def test_merge_attention_identity_is_noop_and_rows_stay_normalised():
    torch.manual_seed(0)
    p = torch.randn(2, 3, 9, 9).softmax(-1)
    w = torch.rand(2, 9) + 0.1
    ident = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(merge_attention(p, w, ident, 9), p)
    dst, n = bidirectional_matching(mctf_scores(torch.randn(2, 9, 4), None, None), 4)
    pm = merge_attention(p, w, dst, n)
    torch.testing.assert_close(pm.sum(-1), torch.ones(2, 3, n))
    # hand check of one entry: fused query = w-weighted mean of its rows, fused key = sum of its columns
    q, k = (dst[0] == 1).nonzero()[:, 0], (dst[0] == n - 1).nonzero()[:, 0]
    want = (w[0, q, None] * p[0, 0][q][:, k]).sum() / w[0, q].sum()
    torch.testing.assert_close(pm[0, 0, 1, n - 1], want)


def test_one_direction_similarity_only_equals_tome_matching():
    """With one direction and only W_sim, the choice is ToMe's (vitlab.tokens.bipartite_soft_matching): same
    destinations, same order; fused with the sizes as weights it is ToMe's merge."""
    torch.manual_seed(1)
    x = torch.randn(2, 17, 6)
    for r in (1, 4, 8):
        ours, n = bidirectional_matching(mctf_scores(x, None, None, tau_info=0, tau_size=0), r, bidirectional=False)
        tome, n_t = bipartite_soft_matching(x, r)
        assert n == n_t and torch.equal(ours, tome)
        size = torch.randint(1, 3, (2, 17)).float()
        torch.testing.assert_close(fuse_tokens(x, size, size, ours, n)[0], merge_tokens(x, size, tome, n)[0])


def test_r0_equals_base_and_schedule(eager_merge):
    vit = tiny_vit(depth=3)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(MCTFViT(vit, 0)(x), vit(x), atol=1e-5, rtol=1e-5)
        m = MCTFViT(vit, 3)
        out = m(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    # the official DeiT recipe: block 0 sees every token, blocks 1.. fuse r each
    assert m.last_tokens == token_schedule(17, 3, 3) == [17, 14, 11] and m.layers == (1, 2)
    for g, s in zip(m.last_groups, m.last_size):  # sizes count the input tokens fused into each final token
        assert torch.equal(torch.bincount(g, minlength=10).float(), s)
    assert (m.last_groups[:, 0] == 0).all() and (m.last_size[:, 0] == 1).all(), "CLS is never fused"
    assert reduction(65, 40) == 32 and reduction(12, 8) == 2 and reduction(65, 0) == 0
    with torch.no_grad():  # one-step-ahead off: the block runs on all tokens, then fuses
        m_off = MCTFViT(vit, 3, one_step_ahead=False)
        m_off(x)
        every = MCTFViT(vit, 3, layers=range(3))
        every(x)
    assert m_off.last_tokens == [17, 17, 14]
    # fusing in every block: 17 - 3, 14 - 3, then at least 10 stay
    assert every.last_tokens == token_schedule(17, 3, 3, layers=range(3)) == [14, 11, 10]


def test_training_step_and_gradients(eager_merge):
    vit = tiny_vit()
    m = MCTFViT(copy.deepcopy(vit), 4).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    loss, logits = consistency_step(2, generator=torch.Generator().manual_seed(0))(m, x, y)
    loss.backward()
    assert logits.shape == (8, 5) and math.isfinite(loss.item())
    assert m.vit.blocks[0].attn.qkv.weight.grad[:32].abs().sum() > 0, "Q/K get gradients through the merged P"
    # nobody confident (threshold ~1): the loss is the two cross-entropies
    torch.manual_seed(0)
    l_hi, _ = consistency_step(1, threshold=0.999)(m, x, y)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        want = ce(m(x), y, label_smoothing=0.1) + ce(m(x, r=0), y, label_smoothing=0.1)
    torch.testing.assert_close(l_hi.detach(), want)


def test_bad_inputs():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="tau_info"):
        mctf_scores(X, None, None, tau_info=-1)
    with pytest.raises(ValueError, match="received"):
        mctf_scores(X, torch.ones(1, 4), None)
    with pytest.raises(ValueError, match="r=4"):
        bidirectional_matching(mctf_scores(X, None, None), 4)
    with pytest.raises(ValueError, match="r"):
        reduction(65, -1)
    with pytest.raises(TypeError, match="model"):
        MCTFViT("vit")
    with pytest.raises(ValueError, match="layers"):
        MCTFViT(vit, 4, layers=[0, 7])
    with pytest.raises(TypeError, match="r"):
        MCTFViT(vit, 2.5)
    with pytest.raises(ValueError, match="weight"):
        fuse_tokens(X, torch.ones(1, 4), torch.ones(1, 5), torch.zeros(1, 5, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="MCTFViT"):
        mctf.finetune(vit, None, steps=1)


def test_for_compare_tiny(eager_merge):
    from vitlab.methods.efficient.recipes import Reduced

    vit = tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 5, (64,), generator=g))
    out = mctf.for_compare(vit, train, "smoke")
    assert isinstance(out, Reduced) and not out.model.training and out.gflops is None
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items()), "base untouched"
    with torch.no_grad():
        out.model(train[0][:2])
    assert out.tokens_per_block == [float(t) for t in out.model.last_tokens] == [17.0, 10.0]


def test_finetune_uses_the_chapter_recipe_exactly(monkeypatch):
    """MCTF's fine-tune is fit(**recipes.finetune_kwargs(P), seed=s): the dense control's arguments, plus a step_fn;
    the default leaves the consistency loss (a second pass per step) off."""
    import vitlab.train
    from vitlab.methods.efficient import recipes

    seen = {}

    def fake_fit(model, train, val=None, **kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(vitlab.train, "fit", fake_fit)
    out = mctf.for_compare(tiny_vit(), None, "cpu", seed=1)
    step_fn = seen.pop("step_fn")
    assert callable(step_fn) and seen.pop("seed") == 1 and seen.pop("profile") == "cpu"
    seen.pop("progress"), seen.pop("desc")
    assert seen == recipes.finetune_kwargs("cpu"), "the control's lr, steps, batch, schedule, shift and smoothing"
    assert mctf.DEFAULTS["consistency"] is False and "consistency" not in out.note and "seed 1" in out.note
    calls = []

    def net(x, r=None, return_cls=False):
        calls.append(r)
        return torch.zeros(len(x), 5, requires_grad=True), torch.zeros(len(x), 4)

    loss, _ = step_fn(net, torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert calls == [None], "one (student) pass per step by default"
    assert loss.item() == pytest.approx(math.log(5)), "label-smoothed CE of uniform logits is log(classes)"
