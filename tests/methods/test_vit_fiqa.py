"""ViT-FIQA (vitlab.methods.robustness.vit_fiqa) and its face set (vitlab.data.faces).

Expected numbers marked "official" were computed once by the official code (atzoriandrea/ViT-FIQA-...,
``losses.py::CombinedMarginLoss`` and ``backbones/vit_qs.py::VisionTransformer``) in a throwaway script outside
the repository; the tests carry only the numbers.
"""
import math

import pytest
import torch

from vitlab.data.faces import (DEGRADATIONS, N_SEEN, N_UNSEEN, degrade, face_images, faces,
                               faces_verification, identity_params)
from vitlab.mae import random_masking
from vitlab.methods.robustness import vit_fiqa as V


def tiny(mode="token", **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=1, num_heads=2,
               mode=mode)
    cfg.update(kw)
    return V.ViTFIQA(**cfg)


# ------------------------------------------------------------------------------------------------ margin + target
COS = torch.tensor([[0.9, 0.2, -0.1, 0.5], [0.1, 0.3, 0.7, -0.4], [-0.2, -0.5, 0.1, 0.0]])
LABELS = torch.tensor([0, 2, 1])


def test_cosface_logits_match_official_combined_margin_loss():
    logits, ccs, nnccs = V.cosface_logits(COS.clone(), LABELS, s=64.0, m=0.4)
    # official CombinedMarginLoss(64, 1.0, 0.0, 0.4)(COS, LABELS)
    want = torch.tensor([[32.0, 12.8, -6.4, 32.0], [6.4, 19.2, 19.2, -25.6], [-12.8, -57.6, 6.4, 0.0]])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(ccs, torch.tensor([[0.9], [0.7], [-0.5]]))
    # official nccs = max other cosine + (1 + 1e-9) = [1.5, 1.3, 1.1]; ours returns the cosine itself
    torch.testing.assert_close(nnccs, torch.tensor([[0.5], [0.3], [0.1]]))
    # official ccs / nccs
    torch.testing.assert_close(V.cr_target(ccs, nnccs), torch.tensor([[0.6], [0.5384616], [-0.4545454]]))


def test_ccs_nnccs_detached_and_margin_only_on_own_class():
    cos = COS.clone().requires_grad_(True)
    logits, ccs, nnccs = V.cosface_logits(cos, LABELS, s=2.0, m=0.25)
    assert not ccs.requires_grad and not nnccs.requires_grad
    diff = (2.0 * COS - logits.detach())
    want = torch.zeros_like(COS)
    want[torch.arange(3), LABELS] = 0.5
    torch.testing.assert_close(diff, want)
    logits.sum().backward()
    torch.testing.assert_close(cos.grad, torch.full_like(COS, 2.0))


def test_target_formula_by_hand():
    t = V.cr_target(torch.tensor([0.8, -0.3]), torch.tensor([0.2, -0.5]))
    assert t[0].item() == pytest.approx(0.8 / 1.2)
    assert t[1].item() == pytest.approx(-0.6)


def test_fiqa_loss_is_ce_plus_ten_smooth_l1():
    net = tiny().eval()  # eval: no masking, so two forwards agree
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    loss, parts, cos = V.fiqa_loss(net, x, y)
    emb, q, cos2 = net(x, output="all")
    logits, ccs, nn_ = V.cosface_logits(cos2, y)
    t = V.cr_target(ccs, nn_)
    ce = torch.nn.functional.cross_entropy(logits, y)
    d = (t - q).abs()
    sl1 = torch.where(d < 0.5, 0.5 * d ** 2 / 0.5, d - 0.25).mean()
    assert loss.item() == pytest.approx((ce + 10 * sl1).item(), rel=1e-5)
    assert parts["quality"].item() == pytest.approx(sl1.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- model
def _fill_like_official(model):
    """Deterministic weights, enumerated in the official state dict's sorted key order (qs_token for cls_token)."""
    sd = model.state_dict()
    names = {("qs_token" if k == "cls_token" else k): k for k in sd if k != "class_centers"}
    with torch.no_grad():
        for i, off in enumerate(sorted(names)):
            p = sd[names[off]]
            if not p.dtype.is_floating_point:
                continue
            v = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i) * 0.2
            if off.endswith("running_var"):
                v = 1 + 0.5 * v.abs()
            if ("norm" in off or off.startswith(("head_qs.0", "feature.1", "feature.3"))) and off.endswith("weight"):
                v = 1 + v
            p.copy_(v.reshape(p.shape).to(p.dtype))


def test_forward_matches_official_vit_qs_token_mode():
    # official VisionTransformer(img_size=32, patch_size=4, in_channels=1, embed_dim=64, depth=2, num_heads=4,
    # mask_ratio=0.0, mode="token") with these weights, eval mode
    m = V.ViTFIQA(img_size=32, patch_size=4, in_chans=1, num_classes=4, embed_dim=64, depth=2, num_heads=4,
                  mlp_ratio=4.0, mask_ratio=0.0, drop_path_rate=0.0, mode="token").eval()
    _fill_like_official(m)
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-5  # official nn.LayerNorm default
    x = (torch.sin(torch.arange(2 * 32 * 32, dtype=torch.float32) * 0.11).reshape(2, 1, 32, 32) + 1) / 2
    emb, qs = m(x, output="fiqa")
    want_emb = torch.tensor([[-0.4676419, 2.2117946, 0.6714075, -2.2788808, -1.5998983, 1.1525840],
                             [-0.4128538, 2.1540101, 0.6070301, -2.2407138, -1.5341696, 1.1334760]])
    torch.testing.assert_close(emb[:, :6], want_emb, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(qs, torch.tensor([[1.4775976], [1.4759748]]), atol=2e-5, rtol=1e-5)


def test_quality_token_is_position_zero_and_feeds_only_the_quality_head():
    m = tiny().eval()
    assert m.quality_index == 0 and m.num_prefix_tokens == 1
    assert isinstance(m.blocks[0].mlp.act, torch.nn.ReLU6)
    x = torch.rand(3, 1, 16, 16)
    tokens = m.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 16)
    emb, q = m.heads(tokens)
    t2 = tokens.clone()
    t2[:, 0] += 1.0  # changing the quality token moves q, not the embedding
    emb2, q2 = m.heads(t2)
    torch.testing.assert_close(emb, emb2)
    assert not torch.allclose(q, q2)
    c = tiny("crfiqa").eval()
    assert c.quality_index is None and c.forward_features(x).shape == (3, 16, 16)
    assert c.head_qs[0].num_features == c.emb_dim


def test_masking_keeps_int_90_percent_and_reinserts_mask_token():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    g = torch.Generator().manual_seed(0)
    kept, mask, ids_restore = random_masking(x, 0.1 * 5 / 5 * 4, generator=g)  # ratio 0.4 -> keep int(5*0.6)=3
    assert kept.shape == (2, 3, 3)
    tok = torch.full((1, 1, 3), -7.0)
    full = V.reinsert_masked(kept, tok, ids_restore)
    assert full.shape == x.shape
    removed = mask.bool()
    torch.testing.assert_close(full[~removed], x[~removed])
    assert (full[removed] == -7.0).all() and int(removed.sum()) == 2 * 2
    # the model: 65 tokens at ratio 0.1 keep int(58.5) = 58 and the heads still see 65
    m = V.ViTFIQA(num_classes=4, depth=1).train()
    seen = {}
    m.blocks[0].register_forward_hook(lambda mod, i, o: seen.update(n=o.shape[1]))
    tokens = m.forward_features(torch.rand(2, 1, 32, 32))
    assert seen["n"] == 58 and tokens.shape[1] == 65
    n_mask = (tokens == m.norm(tokens).new_tensor(0) + m.mask_token.detach()).all(-1).sum(1)
    assert (n_mask == 7).all()
    m.eval()
    m.forward_features(torch.rand(2, 1, 32, 32))
    assert seen["n"] == 65


def test_tiny_forward_backward_and_logits_are_cosines():
    m = tiny().train()
    x, y = torch.rand(6, 1, 16, 16), torch.randint(0, 5, (6,))
    loss, _, cos = V.fiqa_loss(m, x, y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert m.cls_token.grad is not None and m.class_centers.grad is not None and m.head_qs[1].weight.grad is not None
    assert cos.abs().max() <= 1 and m.eval()(x).shape == (6, 5)


# ----------------------------------------------------------------------------------------------- evaluation
def test_spearman_by_hand():
    assert V.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1)
    assert V.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 1, 1, 0])) == pytest.approx(-0.9486833)


def test_edc_on_hand_made_pairs():
    # 4 impostors (scores 0.1..0.4) fix the threshold; 4 genuine pairs, two of them below it
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.8, 0.05])
    genuine = torch.tensor([False, False, False, False, True, True, True, True])
    quality = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 0.1, 0.95, 0.2])
    thr = V.fnmr_threshold(scores[~genuine], 0.25)  # at most int(0.25*4) = 1 impostor above: thr = 0.3
    assert thr == pytest.approx(0.3)
    curve = V.edc(scores, genuine, quality, discard=(0.0, 0.125, 0.25, 0.5), fmr=0.25)
    # nothing dropped: 0.35 > 0.3 matches, 0.05 misses -> 1/4; drop 1 pair (q=0.1, the 0.35 genuine): 1/3;
    # drop 2 (q=0.1, 0.2): 0/2; drop 4 (q 0.1, 0.2, 0.5, 0.6): 0/2
    torch.testing.assert_close(curve, torch.tensor([0.25, 1 / 3, 0.0, 0.0], dtype=torch.float64))
    assert V.edc_auc(curve, (0.0, 0.125, 0.25, 0.5)) == pytest.approx(0.125 * (0.25 + 1 / 3) / 2
                                                                       + 0.125 * (1 / 3) / 2)
    pairs = V.verification_pairs(torch.eye(3), torch.tensor([0, 0, 1]))
    assert pairs[1].tolist() == [True, False, False]


# -------------------------------------------------------------------------------------------------- face data
def test_face_generator_is_deterministic_and_bounded():
    a = face_images(12, range(3), seed=1)
    b = face_images(12, range(3), seed=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    images, ids, sev, kinds = a
    assert images.shape == (12, 1, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert set(ids.tolist()) == {0, 1, 2} and ((sev >= 0) & (sev <= 1)).all()
    assert not torch.equal(face_images(12, range(3), seed=2)[0], images)
    assert torch.equal(identity_params([5], seed=1), identity_params([7, 5], seed=1)[1:])  # identity k is one person


def test_degrade_severity_zero_is_identity_and_grows():
    clean = face_images(4, [0], seed=0, max_severity=0.0)[0]
    for k in range(len(DEGRADATIONS)):
        kinds = torch.full((4,), k)
        same = degrade(clean, torch.zeros(4), kinds)
        torch.testing.assert_close(same, clean)
        errs = [(degrade(clean, torch.full((4,), s), kinds) - clean).abs().mean().item() for s in (0.2, 0.9)]
        assert errs[1] > errs[0] > 0, DEGRADATIONS[k]


def test_verification_identities_are_unseen():
    _, ids, _, _ = faces_verification(per_identity=2)
    assert ids.min() >= N_SEEN and ids.max() < N_SEEN + N_UNSEEN
    ds = faces("val", n=70)
    assert ds.labels.max() < N_SEEN and ds.num_classes == N_SEEN and ds.severity.shape == (70,)


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: V.ViTFIQA(mode="full"), "mode"),
    (lambda: V.ViTFIQA(mask_ratio=1.0), "mask_ratio"),
    (lambda: V.cosface_logits(COS, torch.tensor([0, 1])), "labels"),
    (lambda: V.cosface_logits(COS, torch.tensor([0, 1, 9])), "labels"),
    (lambda: V.cosface_logits(COS[:, :1], LABELS), "2 classes"),
    (lambda: V.cosface_logits(COS, LABELS, s=0), "s"),
    (lambda: V.cr_target(torch.zeros(2), torch.zeros(3)), "ccs and nnccs"),
    (lambda: V.reinsert_masked(torch.zeros(2, 3), torch.zeros(1, 1, 3), torch.zeros(2, 4).long()), "x_kept"),
    (lambda: V.spearman(torch.zeros(3), torch.zeros(4)), "spearman"),
    (lambda: V.edc(torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(3)), "genuine"),
    (lambda: V.fnmr_threshold(torch.zeros(3), fmr=0), "fmr"),
    (lambda: V.entry_name("token", 7), "seed"),
    (lambda: V.measure(torch.nn.Linear(2, 2)), "model"),
    (lambda: face_images(0), "n"),
    (lambda: face_images(4, []), "identities"),
    (lambda: face_images(4, [-1]), "identities"),
    (lambda: faces("dev"), "split"),
    (lambda: degrade(torch.zeros(2, 1, 8, 8), torch.tensor([0.5, 2.0]), torch.zeros(2).long()), "severity"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_zoo_entries_registered():
    from vitlab import zoo

    for mode in V.MODES:
        for seed in V.SEEDS:
            recipe = zoo.ZOO[V.entry_name(mode, seed)]
            assert recipe.objective == "vitfiqa" and recipe.data == "faces"
