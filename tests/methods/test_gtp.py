"""GTP-ViT: graphs, MixedAttnMax, propagation by hand on a 3-token graph, sizes, P=0 is the base ViT."""
import copy

import pytest
import torch

from vitlab.methods.efficient.gtp import (GTP, for_compare, mixed_attn_max, mixed_graph, normalize_graph, propagate,
                                          select, semantic_graph, spatial_graph)
from vitlab.models import VisionTransformer


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    vit = VisionTransformer(**cfg).eval()
    with torch.no_grad():  # livelier weights than the init, so that selections and logits differ between methods
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit


# ------------------------------------------------------------------------------------------------ graphs
def test_spatial_graph_is_the_8_neighbour_grid():
    g = spatial_graph(3, 3)
    assert torch.equal(g, g.T) and g.diagonal().sum() == 0
    assert g.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]  # corners, edges, centre
    assert g[0, 4] == 1 and g[0, 2] == 0 and g[1, 3] == 1


def test_semantic_graph_picks_the_most_similar_tokens():
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    g = semantic_graph(x, 1)
    assert g[0].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert semantic_graph(torch.randn(2, 10, 4), 3).sum(-1).ge(3).all()


def test_normalize_and_mixed_graph():
    adj = torch.tensor([[[0.0, 1, 1], [1, 0, 0], [1, 0, 0]]])
    w = normalize_graph(adj)  # degrees 2, 1, 1: W_01 = 1/sqrt(2 * 1)
    torch.testing.assert_close(w[0, 0, 1], torch.tensor(2 ** -0.5))
    x = torch.randn(2, 16, 8)
    m = mixed_graph(x, (4, 4), 2)
    adj = torch.maximum(spatial_graph(4, 4), semantic_graph(x, 2))  # OR of the two graphs
    torch.testing.assert_close(m, normalize_graph(adj))


# ------------------------------------------------------------------------------------------------ one block
def test_mixed_attn_max_matches_the_official_formula_on_the_matrix():
    vit = _vit()
    t = vit.embed(torch.rand(2, 3, 16, 16))
    _, side = vit.blocks[0].forward_attn(t, side=("probs", "diag", "colsum"))
    a = side["probs"]
    expected = torch.diagonal(a, dim1=-2, dim2=-1)[:, :, 1:].max(1)[0] * a[:, :, :, 1:].sum(-2).max(1)[0]
    torch.testing.assert_close(mixed_attn_max(side["diag"], side["colsum"]), expected)


def test_select_lowest_scores_are_propagated():
    kept, prop = select(torch.tensor([[0.3, 0.1, 0.5, 0.2]]), 2)
    assert kept.tolist() == [[2, 0]] and prop.tolist() == [[3, 1]]


def test_propagation_by_hand_on_a_three_token_graph():
    # image tokens a=1, b=10, c=100 on a path a - b - c; b is propagated into a and c
    x = torch.tensor([[[0.0], [1.0], [10.0], [100.0]]])  # CLS first
    w = torch.tensor([[[0.0, 0.5, 0.0], [0.5, 0.0, 0.25], [0.0, 0.25, 0.0]]])
    size = torch.ones(1, 4)
    kept, prop = torch.tensor([[2, 0]]), torch.tensor([[1]])  # keep c then a, propagate b
    out, g, s = propagate(x, w, size, kept, prop, "graph", alpha=0.2)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 100 + 0.2 * 0.25 * 10, 1 + 0.2 * 0.5 * 10]))
    torch.testing.assert_close(s[0], torch.tensor([1.0, 1 + 0.2 * 0.25, 1 + 0.2 * 0.5]))
    torch.testing.assert_close(g[0], torch.tensor([[0.0, 0.0], [0.0, 0.0]]))  # c and a are not linked
    drop, g_none, s_none = propagate(x, w, size, kept, prop, "none")
    torch.testing.assert_close(drop[0, :, 0], torch.tensor([0.0, 100.0, 1.0]))
    torch.testing.assert_close(s_none[0], torch.ones(3))
    mean, _, s_mean = propagate(x, w, size, torch.tensor([[2]]), torch.tensor([[0, 1]]), "mean")
    torch.testing.assert_close(mean[0, :, 0], torch.tensor([0.0, 100.0, 5.5]))
    torch.testing.assert_close(s_mean[0], torch.tensor([1.0, 1.0, 2.0]))


def test_sizes_follow_the_weights_and_are_conserved_when_they_sum_to_one_over_alpha():
    # the total size grows by alpha * sum_k W[k, p] s_p: conserved exactly when each propagated token's weights
    # to the kept tokens sum to 1/alpha, and never lost by "mean" (its token stands for the sum)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g)
    size = torch.rand(2, 6, generator=g) + 0.5
    kept, prop = torch.tensor([[0, 1, 2], [4, 3, 2]]), torch.tensor([[3, 4], [0, 1]])
    w = torch.zeros(2, 5, 5)
    for b in range(2):
        for p in prop[b]:
            share = torch.rand(3, generator=g)
            w[b, kept[b], p] = share / share.sum() / 0.5  # columns sum to 1 / alpha
    _, _, s = propagate(x, w, size, kept, prop, "graph", alpha=0.5)
    torch.testing.assert_close(s.sum(1), size.sum(1))
    _, _, s_mean = propagate(x, None, size, kept, prop, "mean")
    torch.testing.assert_close(s_mean.sum(1), size.sum(1))


# ------------------------------------------------------------------------------------------------ the model
def test_zero_propagation_equals_the_base_model():
    vit = _vit()
    x = torch.rand(3, 3, 16, 16)
    for kw in ({}, dict(propagation="none"), dict(selection="random")):
        m = GTP(vit, 0, **kw)
        torch.testing.assert_close(m(x), vit(x), rtol=0, atol=1e-6)
        assert m.last_tokens == [17, 17]


def test_model_reduces_tokens_and_is_deterministic():
    vit = _vit(depth=4)
    x = torch.rand(3, 3, 16, 16)
    for kw in ({}, dict(propagation="mean"), dict(propagation="none"), dict(selection="random")):
        m = GTP(vit, 5, **kw)
        out = m(x)
        assert out.shape == (3, 5) and torch.equal(out, m(x))
        expected = [17, 13, 9, 5] if kw.get("propagation") == "mean" else [17, 12, 7, 2]
        assert m.last_tokens == expected, kw
    assert not torch.equal(GTP(vit, 5)(x), GTP(vit, 5, propagation="none")(x))
    assert GTP(vit, [0, 2, 2, 2])(x).shape == (3, 5)
    m = GTP(vit, 100)  # capped: one image token always stays
    m(x)
    assert m.last_tokens == [17, 2, 2, 2]


def test_shares_weights_and_does_not_modify_the_base():
    vit = _vit()
    before = copy.deepcopy(vit.state_dict())
    m = GTP(vit, 4)
    assert m.vit is vit
    m(torch.rand(2, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_for_compare_on_a_tiny_model():
    from vitlab.methods.efficient.recipes import Reduced

    base = _vit(depth=4)
    out = for_compare(base, None, "smoke")
    assert isinstance(out, Reduced) and not out.model.training
    out.model(torch.rand(2, 3, 16, 16))
    assert out.tokens_per_block == [float(t) for t in out.model.last_tokens] == [17.0, 13.0, 9.0, 5.0]  # P = 4


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    vit = _vit()
    with pytest.raises(ValueError, match="num_prop"):
        GTP(vit, -1)
    with pytest.raises(ValueError, match="num_prop"):
        GTP(vit, [1, 2, 3])
    with pytest.raises(ValueError, match="selection"):
        GTP(vit, 2, selection="cls")
    with pytest.raises(ValueError, match="propagation"):
        GTP(vit, 2, propagation="GraphProp")
    with pytest.raises(ValueError, match="graph"):
        GTP(vit, 2, graph="knn")
    with pytest.raises(ValueError, match="alpha"):
        GTP(vit, 2, alpha=-0.1)
    with pytest.raises(TypeError, match="token_scale"):
        GTP(vit, 2, token_scale=1)
    with pytest.raises(TypeError, match="vit"):
        GTP(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_prop"):
        select(torch.rand(1, 4), 4)
    with pytest.raises(ValueError, match="num_neighbours"):
        semantic_graph(torch.rand(1, 4, 3), 4)
    with pytest.raises(ValueError, match="needs the token graph"):
        propagate(torch.rand(1, 3, 2), None, torch.ones(1, 3), torch.tensor([[0]]), torch.tensor([[1]]), "graph")
    with pytest.raises(ValueError, match="mode"):
        propagate(torch.rand(1, 3, 2), None, torch.ones(1, 3), torch.tensor([[0]]), torch.tensor([[1]]), "sum")
    with pytest.raises(ValueError, match="diag and colsum"):
        mixed_attn_max(torch.rand(1, 2, 4), torch.rand(1, 2, 5))
    with pytest.raises(ValueError, match="adj"):
        normalize_graph(torch.rand(3, 3))


def test_for_compare_seed_and_defaults():
    from vitlab.methods.efficient.gtp import DEFAULTS

    base = _vit(depth=4)
    a, b = for_compare(base, None, "cpu", seed=0).model, for_compare(base, None, "cpu", seed=2).model
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # the default selection is deterministic
    assert a.num_prop == [DEFAULTS["num_prop"]] * 4 and a.alpha == DEFAULTS["alpha"] and b.seed == 2
    with pytest.raises(ValueError, match="seed"):
        for_compare(base, None, "cpu", seed=-1)
