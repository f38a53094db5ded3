"""Sparsifiner: the top-k connectivity mask, masked attention by hand, keep rate 1 = the base model, the
predictor's shapes and inference sparsification, the two training stages, the analytic FLOPs by hand."""
import math

import pytest
import torch

from vitlab.methods.efficient.sparsifiner import (ConnectivityPredictor, SparseAttention, attention_budget,
                                                  attention_recall, connectivity_mask, distill_loss, finetune,
                                                  for_compare, last_masks, masked_attention, mhsa_flops,
                                                  model_gflops, random_mask, recon_loss, sparse_attention,
                                                  sparse_layers, sparsify, stage_steps, train_predictor,
                                                  window_mask, DEFAULTS)
from model_helpers import tiny_vit


def _vit(seed=0, **kw):
    return tiny_vit(seed, **{"num_classes": 4, "mlp_ratio": 2.0, **kw})


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


# ------------------------------------------------------------------------------------------------ masks
def test_mask_keeps_ceil_quarter_of_keys_and_the_whole_cls_row():
    N = 17  # 16 patches + CLS: ceil(0.25 * 17) = 5
    assert attention_budget(N, 0.25) == 5 and attention_budget(65, 0.25) == 17 and attention_budget(197) == 50
    scores = torch.randn(2, 3, N - 1, N)
    mask = connectivity_mask(scores, attention_budget(N))
    assert mask.shape == (2, 3, N, N) and mask.dtype == torch.bool
    assert mask[:, :, 0].all(), "the CLS query keeps every key"
    assert (mask[:, :, 1:].sum(-1) == 5).all(), "every other query keeps exactly ceil(0.25 N) keys"
    # the kept keys are the row's highest scores
    kept_min = scores.masked_fill(~mask[:, :, 1:], math.inf).amin(-1)
    dropped_max = scores.masked_fill(mask[:, :, 1:], -math.inf).amax(-1)
    assert (kept_min > dropped_max).all()


def test_mask_is_detached():
    scores = torch.randn(1, 1, 4, 5, requires_grad=True)
    assert not connectivity_mask(scores, 2).requires_grad


def test_window_and_random_masks_keep_the_same_budget():
    w = window_mask((4, 4), 5)
    assert w.shape == (17, 17) and w[0].all() and w[1:, 0].all() and (w[1:].sum(-1) == 5).all()
    # the top-left patch (token 1) keeps itself, its right and lower neighbours and the diagonal one
    assert w[1].nonzero().flatten().tolist() == [0, 1, 2, 5, 6]
    assert w.diagonal()[1:].all(), "every patch keeps itself"
    r = random_mask(17, 5, num_heads=2, seed=3)
    assert r.shape == (2, 17, 17) and r[:, 0].all() and (r[:, 1:].sum(-1) == 5).all()
    assert torch.equal(r, random_mask(17, 5, num_heads=2, seed=3)) and not torch.equal(r[0], r[1])


# ------------------------------------------------------------------------------------------------ attention
def test_masked_attention_by_hand():
    # one head, 3 tokens, d = 1: q = k = [1, 2, 3], v = [10, 20, 30], scale 1
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    v = torch.tensor([10.0, 20.0, 30.0]).view(1, 1, 3, 1)
    mask = torch.tensor([[True, True, True], [False, True, True], [True, False, False]])
    out, probs = masked_attention(q, q, v, mask, scale=1.0)
    # row 0: logits 1, 2, 3 over all keys
    e = torch.tensor([1.0, 2.0, 3.0]).exp()
    assert torch.allclose(probs[0, 0, 0], e / e.sum())
    # row 1: logits 2·2 = 4 and 2·3 = 6 on keys 1, 2: weights 1/(1+e^2), e^2/(1+e^2)
    w = torch.tensor([0.0, 1.0, math.exp(2.0)]) / (1 + math.exp(2.0))
    assert torch.allclose(probs[0, 0, 1], w)
    assert torch.allclose(out[0, 0, 1, 0], (w * torch.tensor([10.0, 20.0, 30.0])).sum())
    # row 2 keeps only key 0: all its weight there, output v_0
    assert torch.equal(probs[0, 0, 2], torch.tensor([1.0, 0.0, 0.0])) and out[0, 0, 2, 0] == 10.0
    # a row with no key left gives zeros, not NaN (nan_to_num)
    out, probs = masked_attention(q, q, v, torch.tensor([[True] * 3, [False] * 3, [True] * 3]), scale=1.0)
    assert torch.equal(probs[0, 0, 1], torch.zeros(3)) and out[0, 0, 1, 0] == 0.0


def test_sparse_gather_attention_equals_masked_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    scores = torch.randn(2, 3, 8, 9)
    index = scores.topk(3, dim=-1).indices
    out = sparse_attention(q, k, v, index, scale=0.5)
    ref, _ = masked_attention(q, k, v, connectivity_mask(scores, 3), scale=0.5)
    assert torch.allclose(out, ref, atol=1e-5)


def test_side_path_and_sdpa_path_agree():
    base = _vit()
    model = sparsify(base, mask="random")
    x = _data(4)[0]
    with torch.no_grad():
        logits = model(x)
        logits_side, _ = model.forward_with_attention(x, side=("probs",))
    assert torch.allclose(logits, logits_side, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the model
def test_keep_rate_one_equals_the_base_model():
    base = _vit()
    x = _data(8)[0]
    with torch.no_grad():
        ref = base(x)
        for mask in ("predicted", "window", "random", "dense"):
            model = sparsify(base, keep_rate=1.0, mask=mask)
            assert torch.allclose(model(x), ref, atol=1e-5), mask
            assert all(m.budget == 17 for m in sparse_layers(model))
    assert set(base.state_dict()) < set(sparsify(base).state_dict()), "base keys kept; predictors added"


def test_predictor_shapes_and_inference_sparsification():
    pred = ConnectivityPredictor(head_dim=32, num_heads=3, num_tokens=65, coef_topk=8)
    assert (pred.reduced_c, pred.reduced_n) == (16, 10) and pred.scale == 3 ** -0.5
    assert pred.proj_n.shape == (65, 10) and pred.proj_back_n.shape == (65, 10)
    q, k = torch.randn(2, 3, 65, 32), torch.randn(2, 3, 65, 32)
    assert pred.coefficients(q, k, sparse=False).shape == (2, 3, 64, 10)
    assert pred(q, k, sparse=False).shape == (2, 3, 64, 65), "Â: non-CLS queries × all keys"
    coef = pred.coefficients(q, k, sparse=True)
    assert ((coef > 0).sum(-1) == 8).all(), "β keeps its top 8 entries"
    with torch.no_grad():
        pred.proj_back_n.copy_(torch.linspace(-0.05, 0.05, 650).view(65, 10))
    b = pred.basis(sparse=True)
    raw = pred.proj_back_n.t()
    assert torch.equal(b == 0, raw.abs() <= 0.02) and torch.equal(b[b > 0], raw.abs()[raw.abs() > 0.02])
    assert torch.equal(pred.basis(sparse=False), raw)
    with pytest.raises(ValueError, match="heads"):
        pred(torch.randn(1, 2, 65, 32), torch.randn(1, 2, 65, 32))


def test_model_uses_the_predicted_mask():
    base = _vit()
    model = sparsify(base)
    x = _data(3)[0]
    masks = last_masks(model, x)
    assert len(masks) == 2 and all(m.shape == (3, 2, 17, 17) for m in masks)
    assert all((m[:, :, 1:].sum(-1) == 5).all() and m[:, :, 0].all() for m in masks)
    layer = sparse_layers(model)[0]
    assert torch.equal(masks[0], connectivity_mask(layer.last_approx, 5))
    # window mode: the same fixed mask for every image
    w = last_masks(sparsify(base, mask="window"), x)[0]
    assert torch.equal(w[0], w[2])


# ------------------------------------------------------------------------------------------------ training
def test_stage_one_trains_only_the_predictor_with_dense_attention():
    base = _vit()
    model = sparsify(base)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x, y = _data(32)
    losses = train_predictor(model, base, (x, y), steps=6, lr=1e-2, batch_size=16)
    assert len(losses) == 6 and losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".predictor." in n), n
    assert not model.training and all(not m.recon for m in sparse_layers(model))
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored"


def test_stage_two_trains_only_the_backbone():
    base = _vit()
    model = sparsify(base)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x, y = _data(32)
    hist = finetune(model, base, (x, y), steps=3, profile="smoke")
    assert hist["step"][-1] == 3 and len(hist["losses"]) == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(".predictor." in n for n in changed)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), _vit().parameters())), "base untouched"


def test_losses_by_hand():
    a = [torch.full((1, 1, 2, 3), 0.5)]
    t = [torch.zeros(1, 1, 3, 3)]  # the CLS row (row 0) is dropped from the target
    assert recon_loss(a, t).item() == pytest.approx(6 * 0.25)
    logits = torch.tensor([[2.0, 0.0]])
    tokens = torch.zeros(1, 2, 3)
    loss = distill_loss(logits, tokens, torch.tensor([0]), logits, tokens, label_smoothing=0.0)
    assert loss.item() == pytest.approx(-torch.log_softmax(logits, -1)[0, 0].item()), "KL and MSE vanish"


def test_oracle_mask_keeps_the_top_k_of_the_dense_attention():
    base = _vit()
    x = _data(4)[0]
    _, sides = base.forward_with_attention(x, side=("probs",))
    best = sides[0]["probs"][:, :, 1:].topk(5, dim=-1).values.sum(-1).mean().item()
    # block 0 sees the same tokens in both models (later blocks see the masked model's own features)
    assert attention_recall(sparsify(base, mask="oracle"), base, x)[0] == pytest.approx(best, abs=1e-5)


def test_attention_recall_is_one_at_full_connectivity():
    base = _vit()
    x = _data(4)[0]
    assert attention_recall(sparsify(base, keep_rate=1.0), base, x) == pytest.approx([1.0, 1.0])
    r = attention_recall(sparsify(base, mask="random"), base, x)
    assert all(0.0 < v < 1.0 for v in r)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_mhsa_flops_by_hand():
    # N = 5 tokens, D = 4, H = 2 (d = 2), keep 0.4 -> k = 2; predictor c = 1, n' = 2, t = min(8, 2) = 2
    assert mhsa_flops(5, 4, 2)["total"] == 2 * 2 * 5 * 5 * 4  # 400
    f = mhsa_flops(5, 4, 2, keep_rate=0.4, reduce_n=2, reduce_c=2)
    assert f["attention"] == 2 * 2 * (4 * 2 + 5) * 4  # 208: 4 queries × 2 keys + the dense CLS row
    proj = 2 * 5 * 2 * 2 * 1  # q̃ and k̃: 2 · N · H · d · c
    token = 2 * 1 * 5 * 2  # k̂: H · c · N · n'
    beta = 2 * 4 * 1 * 2  # β: H · (N-1) · c · n'
    approx = 2 * 4 * 2 * 5  # Â: H · (N-1) · t · N
    assert f["predictor"] == 2 * (proj + token + beta + approx) == 2 * (40 + 20 + 16 + 80)
    assert f["total"] == 208 + 312
    assert mhsa_flops(5, 4, 2, keep_rate=0.4, predictor=False)["predictor"] == 0


def test_model_gflops_swaps_the_counted_dense_attention_for_the_sparse_one():
    from vitlab import measure

    base = _vit()  # 2 blocks, N = 17, D = 32, H = 2
    x = _data(2)[0]
    dense = measure.flops(base, x) / 1e9
    assert model_gflops(base, x, keep_rate=None) == pytest.approx(dense)
    per_block = mhsa_flops(17, 32, 2, keep_rate=0.25)["total"] - mhsa_flops(17, 32, 2)["total"]
    assert model_gflops(base, x) == pytest.approx(dense + 2 * per_block / 1e9)
    no_pred = mhsa_flops(17, 32, 2, keep_rate=0.25, predictor=False)["total"] - mhsa_flops(17, 32, 2)["total"]
    assert model_gflops(base, x, predictor=False) == pytest.approx(dense + 2 * no_pred / 1e9)
    assert no_pred < 0


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs():
    base = _vit()
    with pytest.raises(ValueError, match="mask"):
        sparsify(base, mask="diagonal")
    with pytest.raises(ValueError, match="keep_rate"):
        sparsify(base, keep_rate=0.0)
    with pytest.raises(TypeError, match="keep_rate"):
        attention_budget(65, "0.25")
    with pytest.raises(TypeError, match="model"):
        sparsify("vit")
    with pytest.raises(ValueError, match="scores"):
        connectivity_mask(torch.randn(1, 1, 5, 5), 2)
    with pytest.raises(ValueError, match="budget"):
        connectivity_mask(torch.randn(1, 1, 4, 5), 6)
    with pytest.raises(TypeError, match="mask"):
        masked_attention(*(torch.randn(1, 1, 3, 2) for _ in range(3)), torch.ones(3, 3), scale=1.0)
    with pytest.raises(ValueError, match="v"):
        masked_attention(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), torch.randn(1, 3, 2), None, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        sparse_layers(sparsify(base))[0](torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match="no SparseAttention"):
        train_predictor(base, base, _data(8), steps=1)
    with pytest.raises(ValueError, match="no predictor"):
        train_predictor(sparsify(base, mask="window"), base, _data(8), steps=1)
    with pytest.raises(ValueError, match="steps"):
        finetune(sparsify(base), base, _data(8), steps=0)
    with pytest.raises(ValueError, match="grid"):
        window_mask((4,), 3)
    with pytest.raises(ValueError, match="budget"):
        random_mask(5, 6)
    with pytest.raises(TypeError, match="attn"):
        SparseAttention(torch.nn.Linear(2, 2), 5)
    with pytest.raises(ValueError, match="dim"):
        mhsa_flops(5, 5, 2)


# ------------------------------------------------------------------------------------------------ comparison
def test_for_compare_returns_a_sane_reduced():
    from vitlab.methods.efficient.recipes import Reduced

    base = _vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x, y = _data(64)
    out = for_compare(base, (x, y), "smoke")
    assert isinstance(out, Reduced) and out.tokens_per_block is None and not out.model.training
    assert out.gflops == pytest.approx(model_gflops(base, x[:2])) and out.gflops > 0
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "base not modified"
    assert out.model(x[:2]).shape == (2, 4)
    again = for_compare(base, (x, y), "smoke")
    assert torch.equal(out.model(x[:4]), again.model(x[:4])), "deterministic"
    other = for_compare(base, (x, y), "smoke", seed=1)
    assert not torch.equal(out.model(x[:4]), other.model(x[:4])), "the seed matters"
    first, second = stage_steps("smoke")
    assert len(out.extra["recon_losses"]) == first and out.extra["finetune"]["step"][-1] == second


def test_stages_split_the_chapter_budget():
    from vitlab.methods.efficient.recipes import finetune_kwargs, finetune_steps

    for p in ("smoke", "cpu"):
        first, second = stage_steps(p)
        assert first >= 1 and second >= 1 and first + second == finetune_steps(p)
    assert stage_steps("cpu") == (70, 30)
    assert finetune_kwargs("cpu")["lr"] == 1e-4 and DEFAULTS["predictor_lr"] == 1e-2


def test_stage_one_reads_the_teacher_attention_from_the_model_itself():
    """While the backbone equals the teacher's, stage 1 takes the dense attention from the model's own forward:
    the same loss, step by step, as with a separate teacher whose weights differ by nothing."""
    base = _vit()
    x, y = _data(32)
    a, b = sparsify(base), sparsify(base)
    la = train_predictor(a, base, (x, y), steps=4, batch_size=16)
    teacher = _vit()
    with torch.no_grad():
        teacher.head.bias.add_(1.0)  # a different head: the attention is the same, the shortcut is not taken
    lb = train_predictor(b, teacher, (x, y), steps=4, batch_size=16)
    assert la == pytest.approx(lb, rel=1e-4)
