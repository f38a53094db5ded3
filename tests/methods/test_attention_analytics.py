"""Attention analytics: all-ones gates are the model, a zero gate removes exactly that head's output, the Taylor
score equals a finite difference, the offset profile and attention distance of identity / uniform / shifted
attention are exact, re-centred maps put the query in the centre, the pattern autoencoder separates two patterns,
and bad input."""
import pytest
import torch

from tests.model_helpers import tiny_vit
from vitlab.methods.robustness import attention_analytics as AA


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_all_ones_gates_reproduce_the_logits_exactly():
    vit, (x, _) = tiny_vit(), _batch()
    with AA.gated_heads(vit, torch.ones(2, 2)):
        gated = vit(x)
    assert torch.equal(gated, vit(x))
    assert all(not blk.attn.proj._forward_pre_hooks for blk in vit.blocks), "the hooks are removed on exit"


def test_a_zero_gate_removes_that_heads_output():
    vit = tiny_vit()
    attn = vit.blocks[1].attn
    tokens = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    gates = torch.ones(2, 2)
    gates[1, 0] = 0
    with AA.gated_heads(vit, gates), torch.no_grad():
        out = attn(tokens)
    with torch.no_grad():  # by hand: each head's softmax(q kᵀ / √d) v, head 0 zeroed, then proj
        q, k, v = attn.qkv_heads(tokens)
        heads = ((q @ k.transpose(-2, -1)) / attn.head_dim ** 0.5).softmax(-1) @ v  # [B, H, N, Dh]
        heads[:, 0] = 0
        expected = attn.proj(heads.transpose(1, 2).reshape(3, 17, 32))
    assert torch.allclose(out, expected, atol=1e-5)


def test_taylor_score_equals_a_finite_difference():
    vit, (x, y) = tiny_vit(), _batch(8)
    score = AA.taylor_importance(vit, x, y, batch_size=8)  # one batch: |dL/dgate|
    eps = 1e-3
    for layer, h in ((0, 1), (1, 0)):
        losses = []
        for sign in (1, -1):
            gates = torch.ones(2, 2, dtype=torch.float64)
            gates[layer, h] += sign * eps
            with AA.gated_heads(vit.double(), gates), torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(vit(x.double()), y).item())
        vit.float()
        assert score[layer, h].item() == pytest.approx(abs(losses[0] - losses[1]) / (2 * eps), rel=1e-3, abs=1e-7)


def test_ablation_importance_is_the_accuracy_drop():
    vit, (x, y) = tiny_vit(), _batch(20)
    drop = AA.ablation_importance(vit, x, y)
    base = (vit(x).argmax(-1) == y).float().mean()
    gates = torch.ones(2, 2)
    gates[0, 1] = 0
    with AA.gated_heads(vit, gates), torch.no_grad():
        off = (vit(x).argmax(-1) == y).float().mean()
    assert drop.shape == (2, 2) and drop[0, 1].item() == pytest.approx((base - off).item())


def _probs(attn_patch: torch.Tensor, B=2, H=1) -> torch.Tensor:
    """[B, H, 1 + L, 1 + L] with the given patch-to-patch block and a CLS row / column of zeros."""
    L = attn_patch.shape[-1]
    p = torch.zeros(B, H, L + 1, L + 1)
    p[..., 1:, 1:] = attn_patch
    p[..., 0, 0] = 1
    return p


def test_offset_profile_of_identity_uniform_and_shifted_attention_is_exact():
    g, L = 3, 9
    ident = AA.offset_profile(_probs(torch.eye(L)), g)
    assert ident.shape == (1, 5, 5)
    assert ident[0, 2, 2] == 1 and ident.sum() == 1
    uni = AA.offset_profile(_probs(torch.full((L, L), 1 / L)), g)
    assert torch.allclose(uni, torch.full((1, 5, 5), 1 / L))
    right = torch.zeros(L, L)  # each patch attends to its right-hand neighbour (the last column to itself)
    for q in range(L):
        r, c = divmod(q, g)
        right[q, r * g + min(c + 1, g - 1)] = 1
    prof = AA.offset_profile(_probs(right), g)[0]
    assert prof[2, 3] == pytest.approx(1.0), "offset (0, +1): every query that has it uses it"
    assert prof[2, 2] == pytest.approx(3 / 9), "offset (0, 0): the 3 last-column queries of the 9"


def test_recentred_maps_put_the_query_in_the_centre():
    maps = AA.recentred_maps(_probs(torch.eye(4)), 2)  # [B, H, L, 3, 3]
    assert maps.shape == (2, 1, 4, 3, 3)
    assert (maps[..., 1, 1] == 1).all() and maps.sum() == 2 * 4


def test_attention_distance_is_exact():
    g, L = 3, 9
    assert AA.attention_distance(_probs(torch.eye(L)), g, 4).item() == 0
    right = torch.zeros(L, L)
    for q in range(L):
        r, c = divmod(q, g)
        right[q, r * g + (c + 1) % g] = 1  # wraps: distances 4, 4, 8 per row
    assert AA.attention_distance(_probs(right), g, 4).item() == pytest.approx(16 / 3)


def test_pattern_autoencoder_separates_two_patterns():
    torch.manual_seed(0)
    centre, right = torch.zeros(5, 5), torch.zeros(5, 5)
    centre[2, 2], right[2, 4] = 1, 1
    maps = torch.stack([centre] * 40 + [right] * 40) + 0.01 * torch.rand(80, 5, 5)
    out = AA.fit_patterns(maps, clusters=2, steps=200, code=4)
    assert set(out["labels"][:40].tolist()) != set(out["labels"][40:].tolist())
    assert len(set(out["labels"][:40].tolist())) == 1 and len(set(out["labels"][40:].tolist())) == 1
    assert out["prototypes"].shape == (2, 5, 5) and out["losses"][-1] < out["losses"][0]


def test_measure_and_unpack_on_a_small_vit():
    from vitlab.methods.architectures import recipes
    from vitlab.models import create_model

    vit = create_model(recipes.model_name("vit"), depth=2)  # chapter 1's ViT, two blocks (quick)
    out = AA.measure(vit, "smoke")
    assert len(out) == 3 * 2 * 4
    for name in ("drop", "taylor", "dist"):
        t = AA.unpack(out, name)
        assert t.shape == (2, 4) and torch.isfinite(t).all()
    with pytest.raises(ValueError, match="no 'speed' numbers"):
        AA.unpack(out, "speed")


def test_bad_input_names_the_argument():
    vit, (x, y) = tiny_vit(), _batch()
    with pytest.raises(ValueError, match="gates"):
        with AA.gated_heads(vit, torch.ones(3, 2)):
            pass
    with pytest.raises(TypeError, match="VisionTransformer"):
        AA.ablation_importance(torch.nn.Linear(2, 2), x, y)
    with pytest.raises(ValueError, match="labels"):
        AA.taylor_importance(vit, x, y[:3])
    with pytest.raises(ValueError, match="probs"):
        AA.offset_profile(torch.rand(1, 1, 10, 10), 4)
    with pytest.raises(ValueError, match="maps"):
        AA.fit_patterns(torch.rand(10, 5, 4))
    with pytest.raises(ValueError, match="clusters"):
        AA.fit_patterns(torch.rand(3, 5, 5), clusters=4)
