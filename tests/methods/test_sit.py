"""SiT: the TSM's convex combinations by hand, CLS untouched, RTSM shapes, the FRD loss by hand, for_compare."""
import math

import pytest
import torch
import torch.nn as nn

from vitlab import measure
from vitlab.methods.efficient.recipes import Reduced
from vitlab.methods.efficient.sit import (HardDrop, ReverseTSM, SiT, TokenSlimming, default_stages, finetune,
                                          for_compare, frd_loss, slim, teacher_tokens, DEFAULTS)
from model_helpers import tiny_vit


def _vit(seed=0, **kw):
    return tiny_vit(seed, **{"num_classes": 3, "mlp_ratio": 2.0, **kw})


# ------------------------------------------------------------------------------------------------ TSM
def test_tsm_by_hand():
    tsm = TokenSlimming(dim=2, num_out=2)
    tsm.weight = nn.Identity()  # W = x itself, so A is softmax over the tokens of x's columns
    l3 = math.log(3.0)
    x = torch.tensor([[[0.0, l3], [l3, 0.0]]])  # 2 tokens, 2 channels
    A = tsm.weights(x)[0]
    torch.testing.assert_close(A, torch.tensor([[0.25, 0.75], [0.75, 0.25]]))
    out = tsm(x)[0]  # new token j = sum_i A[i, j] x_i
    torch.testing.assert_close(out, torch.tensor([[0.75 * l3, 0.25 * l3], [0.25 * l3, 0.75 * l3]]))
    with torch.no_grad():
        tsm.scale.fill_(2.0)  # s sharpens: softmax([0, 2 ln 3]) = [1/10, 9/10]
    torch.testing.assert_close(tsm.weights(x)[0, :, 0], torch.tensor([0.1, 0.9]))


def test_tsm_outputs_are_convex_combinations():
    tsm = TokenSlimming(dim=16, num_out=5)
    for p in tsm.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 12, 16)
    A = tsm.weights(x)
    assert A.shape == (3, 12, 5) and (A >= 0).all()
    torch.testing.assert_close(A.sum(1), torch.ones(3, 5))  # every column sums to 1: over the input tokens
    out = tsm(x)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out, torch.einsum("bnk,bnc->bkc", A, x))
    lo, hi = x.min(1).values[:, None], x.max(1).values[:, None]  # a convex combination stays inside the hull
    assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()


def test_tsm_starts_near_the_mean_token():
    # the official init (small weights): W ≈ 0, so every new token starts as (almost) the mean of the old ones
    tsm = TokenSlimming(dim=16, num_out=4)
    for m in tsm.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(tsm(x), x.mean(1, keepdim=True).expand(-1, 4, -1), atol=0.05, rtol=0)


def test_official_init_makes_identical_tokens_and_the_wide_init_does_not():
    vit = _vit(img_size=32, depth=4)
    images = torch.rand(3, 3, 32, 32)

    def spread(A):  # mean L1 distance of A's columns (the new tokens' mixtures) to their mean column
        return (A - A.mean(-1, keepdim=True)).abs().sum(1).mean().item()

    official = SiT(vit, stages=(1, 1, 1, 1)).eval().slim_weights(images)
    wide = SiT(vit, stages=(1, 1, 1, 1), tsm_init_std=0.3).eval().slim_weights(images)
    assert spread(official[0]) < 0.05 < 0.3 < spread(wide[0])
    # identical tokens stay identical: the later TSMs of the official init see (almost) equal rows, so A is uniform
    W2 = official[1]
    torch.testing.assert_close(W2, torch.full_like(W2, 1 / W2.shape[1]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="tsm_init_std"):
        SiT(vit, stages=(1, 1, 1, 1), tsm_init_std=0.0)


def test_hard_drop_keeps_the_top_scores():
    x = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 3)
    out = HardDrop(2)(x, torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0]]))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 3.0]))


# ------------------------------------------------------------------------------------------------ RTSM
def test_rtsm_shapes_and_residual():
    r = ReverseTSM(dim=8, num_in=4, num_out=16)
    assert r.mlp1.fc1.out_features == 64 and r.mlp2.fc1.out_features == 32  # 4N and 4C hidden
    assert r(torch.randn(2, 4, 8)).shape == (2, 16, 8)
    with torch.no_grad():  # with the channel MLP zeroed, out = token MLP of LN(t) alone
        r.mlp2.fc2.weight.zero_()
        r.mlp2.fc2.bias.zero_()
    t = torch.randn(2, 4, 8)
    u = r.mlp1(r.norm1(t).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(r(t), u)
    with pytest.raises(ValueError, match="4"):
        r(torch.randn(2, 5, 8))


# ------------------------------------------------------------------------------------------------ SiT
def test_stages_tokens_and_slimming_points():
    vit = _vit(img_size=32, depth=6)  # 64 patches, like the course base
    s = SiT(vit, stages=(1, 2, 2, 1), keep=0.5)
    assert s.slim_after == (0, 2, 4)
    assert s.tokens_per_block == [65, 33, 33, 17, 17, 9]
    assert [m.num_out for m in s.slimmers] == [32, 16, 8]
    assert [getattr(r, "num_in", None) for r in s.rtsm] == [32, 32, 16, 16, 8, 8]
    assert default_stages(6) == (1, 2, 2, 1) and default_stages(12) == (2, 4, 4, 2) and sum(default_stages(9)) == 9
    assert default_stages(2) == (1, 1)
    assert SiT(_vit(img_size=32, depth=6), keep=0.5).stages == (1, 2, 2, 1)


def test_cls_untouched_and_patches_slimmed():
    vit = _vit(depth=2)
    s = SiT(vit, stages=(1, 1), keep=0.5).eval()
    for p in s.slimmers.parameters():
        nn.init.normal_(p)
    seen = {}
    s.vit.blocks[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    images = torch.rand(2, 3, 16, 16)
    s(images)
    with torch.no_grad():
        after0 = vit.blocks[0](vit.embed(images))  # the dense block-0 output
        expected = s.slimmers[0](after0[:, 1:])
    assert seen["x"].shape == (2, 1 + 8, 32)
    assert torch.equal(seen["x"][:, 0], after0[:, 0]), "the CLS token goes through the TSM unchanged"
    torch.testing.assert_close(seen["x"][:, 1:], expected)


def test_hard_slimming_uses_the_cls_attention():
    vit = _vit(depth=2)
    s = SiT(vit, stages=(1, 1), keep=0.5, slimming="hard").eval()
    seen = {}
    s.vit.blocks[1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    images = torch.rand(2, 3, 16, 16)
    s(images)
    with torch.no_grad():
        x, sides = vit.blocks[0](vit.embed(images), side=("cls",))
    keep = sides["cls"].mean(1)[:, 1:].topk(8, dim=1).indices
    torch.testing.assert_close(seen["x"][:, 1:], torch.stack([x[b, 1:][keep[b]] for b in range(2)]))
    assert not list(s.slimmers.parameters()), "hard dropping has nothing to learn"


def test_slim_copies_the_base_and_first_layers_match_the_teacher():
    base = _vit(depth=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    s = slim(base, stages=(2, 1))  # no slimming until after block 1
    assert s.vit is not base
    images = torch.rand(4, 3, 16, 16)
    t_logits, t_tok = teacher_tokens(base, images)
    torch.testing.assert_close(t_logits, base(images))
    s.train()
    logits, tok = s(images, return_tokens=True)
    assert [t.shape for t in tok] == [t.shape for t in t_tok] == [(4, 16, 32)] * 3  # RTSMs give back N tokens
    torch.testing.assert_close(tok[0], t_tok[0])  # before any slimming the student is the teacher
    assert isinstance(s.rtsm[0], nn.Identity) and isinstance(s.rtsm[1], ReverseTSM)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_deploy_drops_rtsm_and_saves_flops():
    base = _vit(img_size=32, depth=4)
    s = slim(base, stages=(1, 1, 1, 1))
    n_train = measure.count_params(s)
    s.deploy().eval()
    assert s.rtsm is None and measure.count_params(s) < n_train
    with pytest.raises(ValueError, match="deploy"):
        s(torch.rand(1, 3, 32, 32), return_tokens=True)
    x = torch.rand(2, 3, 32, 32)
    assert measure.flops(s, x) < 0.6 * measure.flops(base, x)


# ------------------------------------------------------------------------------------------------ FRD loss
def test_frd_loss_by_hand():
    l3 = math.log(3.0)
    s_logits, t_logits = torch.zeros(1, 2), torch.tensor([[l3, 0.0]])  # p_s = (1/2, 1/2), p_t = (3/4, 1/4)
    t_tok = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3)]
    s_tok = [t + d for t, d in zip(t_tok, (1.0, 3.0))]  # MSE 1 and 9: mean 5
    out = frd_loss(s_logits, s_tok, t_logits, t_tok, torch.tensor([0]), label_smoothing=0.0)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out["ce"].item() == pytest.approx(math.log(2.0))
    assert out["token"].item() == pytest.approx(2 * 5.0)
    assert out["logits"].item() == pytest.approx(2 * kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(math.log(2.0) + 10.0 + 2 * kl, rel=1e-5)
    # tau: KL between the tau-softened distributions, times tau²
    out2 = frd_loss(s_logits, s_tok, t_logits, t_tok, torch.tensor([0]), tau=2.0, lambda_logits=1.0)
    p = torch.tensor([l3 / 2, 0.0]).softmax(0)
    kl2 = (p * (p / 0.5).log()).sum().item() * 4
    assert out2["logits"].item() == pytest.approx(kl2, rel=1e-5)
    zero = frd_loss(t_logits, t_tok, t_logits, t_tok, torch.tensor([0]))
    assert zero["token"].item() == 0 and abs(zero["logits"].item()) < 1e-7


# ------------------------------------------------------------------------------------------------ training
def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_finetune_runs_exact_steps_and_is_deterministic():
    base = _vit()
    data = _data()
    runs = []
    for _ in range(2):
        s = slim(base)
        h = finetune(s, base, data, steps=6, profile="smoke")
        runs.append(s)
        assert h["step"][-1] == 6 and len(h["parts"]) == 6 and not s.training
        assert h["parts"][0]["token"] > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    s = slim(base)
    h = finetune(s, None, data, steps=3, distill=False, profile="smoke")  # CE only needs no teacher
    assert h["step"][-1] == 3 and h["parts"] == []


def test_for_compare_on_a_tiny_model():
    base = _vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = for_compare(base, _data(), "smoke")
    assert isinstance(out, Reduced) and not out.model.training and out.gflops is None
    assert out.tokens_per_block == [17.0, 9.0] and "keep 0.5" in out.note
    assert out.model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "base untouched"
    assert out.extra["history"]["step"][-1] == 5, "the chapter's smoke budget"
    other = for_compare(base, _data(), "smoke", seed=1)
    x = torch.rand(2, 3, 16, 16)
    assert not torch.equal(out.model(x), other.model(x)), "the seed matters"


def test_finetune_uses_the_chapter_lr_and_the_new_modules_scale():
    from vitlab.methods.efficient.recipes import finetune_kwargs

    base = _vit()
    s = slim(base)
    seen = {}
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, groups, lr):
            seen["lrs"] = [g.get("lr", lr) for g in groups]
            super().__init__(groups, lr=lr)

    torch.optim.AdamW = Spy
    try:
        finetune(s, base, _data(), steps=1, profile="smoke")
    finally:
        torch.optim.AdamW = real
    lr = finetune_kwargs("smoke")["lr"]
    assert seen["lrs"] == [lr, lr, lr * DEFAULTS["new_lr_scale"]]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    vit = _vit(depth=2)
    with pytest.raises(ValueError, match="stages"):
        SiT(vit, stages=(1, 2))
    with pytest.raises(TypeError, match="stages"):
        SiT(vit, stages=(1, 1.0))
    with pytest.raises(ValueError, match="keep"):
        SiT(vit, stages=(1, 1), keep=1.5)
    with pytest.raises(TypeError, match="keep"):
        SiT(vit, stages=(1, 1), keep="0.5")
    with pytest.raises(ValueError, match="slimming"):
        SiT(vit, stages=(1, 1), slimming="random")
    with pytest.raises(ValueError, match="keep"):
        SiT(vit, stages=(1, 1), keep=0.01)
    with pytest.raises(TypeError, match="vit"):
        SiT(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_out"):
        TokenSlimming(8, 0)
    with pytest.raises(ValueError, match="x must be"):
        TokenSlimming(8, 2)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="score"):
        HardDrop(2)(torch.randn(1, 4, 3), None)
    with pytest.raises(ValueError, match="layer 0"):
        frd_loss(torch.zeros(1, 2), [torch.zeros(1, 2, 3)], torch.zeros(1, 2), [torch.zeros(1, 4, 3)],
                 torch.tensor([0]))
    with pytest.raises(ValueError, match="tau"):
        frd_loss(torch.zeros(1, 2), [torch.zeros(1)], torch.zeros(1, 2), [torch.zeros(1)], torch.tensor([0]), tau=0)
    with pytest.raises(TypeError, match="student"):
        finetune(vit, vit, _data(), steps=1)
    with pytest.raises(ValueError, match="steps"):
        finetune(slim(vit), vit, _data(), steps=0)
    with pytest.raises(ValueError, match="RTSM"):
        finetune(slim(vit).deploy(), vit, _data(), steps=1)
    with pytest.raises(TypeError, match="model"):
        for_compare("base", _data(), "smoke")
