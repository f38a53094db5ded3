"""vitlab.tokens and the split Block (forward_attn / forward_mlp) the token-reduction methods use."""
import pytest
import torch

from vitlab.models import VisionTransformer
from vitlab.tokens import (bipartite_soft_matching, gather_tokens, keep_top_k, merge_tokens, ones_size,
                           proportional_bias)


def test_block_halves_compose_to_forward():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2).eval()
    x = model.embed(torch.randn(2, 3, 16, 16))
    blk = model.blocks[0]
    mid, sides = blk.forward_attn(x, side=("cls", "colsum"))
    assert torch.allclose(blk.forward_mlp(mid), blk(x), atol=1e-6)
    assert sides["cls"].shape == sides["colsum"].shape == (2, 2, 17)


def test_keep_top_k_and_gather_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    idx = keep_top_k(scores, 2)
    assert idx.tolist() == [[3, 1]]  # highest first, as torch.topk(sorted=True)
    x = torch.arange(4.0).reshape(1, 4, 1).expand(1, 4, 3)
    assert gather_tokens(x, idx)[0, :, 0].tolist() == [3.0, 1.0]
    assert torch.equal(gather_tokens(scores, idx), scores[:, [3, 1]])
    with pytest.raises(ValueError, match="k must be"):
        keep_top_k(scores, 5)
    with pytest.raises(ValueError, match="idx must be"):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.long))


def test_bipartite_matching_hand_case():
    # tokens: 0 CLS, then 1..4. A = {0, 2, 4}, B = {1, 3}. Token 2 equals token 3; token 4 is orthogonal to both.
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[2], e[2], e[3]])[None]  # [1, 5, 4]
    dst, n = bipartite_soft_matching(metric, 1)
    assert n == 4
    # unmerged A (0, 4) -> 0, 1; B (1, 3) -> 2, 3; token 2 merges into B token 3 -> 3
    assert dst.tolist() == [[0, 2, 3, 3, 1]]
    x = torch.randn(1, 5, 6)
    merged, size = merge_tokens(x, ones_size(x), dst, n)
    assert torch.allclose(merged[0, 3], (x[0, 2] + x[0, 3]) / 2)
    assert torch.equal(merged[0, 0], x[0, 0]) and size.sum() == 5 and size.tolist() == [[1, 1, 1, 2]]


def test_bipartite_matching_caps_r_and_protects_cls():
    metric = torch.randn(3, 9, 8)
    dst, n = bipartite_soft_matching(metric, 100)
    assert n == 9 - 4  # 5 A tokens, CLS protected: at most 4 merges
    assert (dst[:, 0] == 0).all()
    dst0, n0 = bipartite_soft_matching(metric, 0)
    assert n0 == 9 and torch.equal(dst0, torch.arange(9).expand(3, 9))
    with pytest.raises(ValueError, match="r must be"):
        bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError, match="metric must be"):
        bipartite_soft_matching(metric[0], 1)


def test_proportional_bias_counts_a_token_as_its_size():
    # one query, keys with equal logits: a key of size 3 gets 3x the attention of a key of size 1
    size = torch.tensor([[1.0, 3.0]])
    probs = (torch.zeros(1, 1, 1, 2) + proportional_bias(size)).softmax(-1)
    assert torch.allclose(probs.flatten(), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="size must be"):
        proportional_bias(torch.ones(3))
