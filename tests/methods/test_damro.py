"""DAMRO (vitlab.methods.vision_language.damro): the official outlier selection (coder-gx/DAMRO modeling_llava.py) and
the official contrastive step with its cutoff (sample_method/sample.py ``_sample``), each written out here line for
line and compared on identical tensors; hand cases; the q/k capture against the block's weights; DAMRO generation
against TinyVLM.generate and against uncached forwards (two KV caches); POPE counting against the official
eval_pope.py loop; the lesson's measurement helpers; and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab import zoo
from vitlab.methods.vision_language import damro as D
from vitlab.models import VisionTransformer
from vitlab.vlm import TinyLM, TinyVLM, VisionProjector, WordTokenizer, caption_scenes

TOK = WordTokenizer()


# ------------------------------------------------------------------------- the official code paths, line for line
def official_outliers(selected_image_feature, desired_layer_q, desired_layer_k, damro_topk):
    """modeling_llava.py, LlavaForConditionalGeneration.forward, the ``if damro_topk!=None`` block after the vision
    tower ran (selected_image_feature already without its CLS: the "default" strategy)."""
    B, N, C = selected_image_feature.shape
    attn = (desired_layer_q @ desired_layer_k.transpose(-2, -1)) * C ** -0.5
    attn = F.softmax(attn, dim=-1)
    cls_attn = attn[:, 0, 1:]
    _, idx = torch.topk(cls_attn, damro_topk, dim=1, largest=True)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    selected_image_feature = torch.gather(selected_image_feature, dim=1, index=index)
    return selected_image_feature, idx, cls_attn


def official_contrast(next_token_logits, next_token_logits_cd, damro_alpha, damro_beta):
    """sample.py, ``_sample``, the ``if use_damro`` block after both branches' logits."""
    alpha = damro_alpha
    beta = damro_beta
    cutoff = torch.log(torch.tensor(beta)) + next_token_logits.max(dim=-1, keepdim=True).values
    diffs = (1 + alpha) * next_token_logits - alpha * next_token_logits_cd
    next_token_logits = diffs.masked_fill(next_token_logits < cutoff, -float("inf"))
    return next_token_logits


def official_pope(gt_answers, gen_answers):
    """eval_pope.py's counting loop (the ``'yes' in gen_answer`` substring tests kept: the answers here are words)."""
    true_pos = true_neg = false_pos = false_neg = yes_answers = 0
    for gt_answer, gen_answer in zip(gt_answers, gen_answers):
        gt_answer, gen_answer = gt_answer.lower().strip(), gen_answer.lower().strip()
        if gt_answer == 'yes':
            if 'yes' in gen_answer:
                true_pos += 1
                yes_answers += 1
            else:
                false_neg += 1
        elif gt_answer == 'no':
            if 'no' in gen_answer:
                true_neg += 1
            else:
                yes_answers += 1
                false_pos += 1
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    f1 = 2 * precision * recall / (precision + recall)
    accuracy = (true_pos + true_neg) / len(gt_answers)
    return dict(precision=precision, recall=recall, f1=f1, accuracy=accuracy, yes_ratio=yes_answers / len(gt_answers))


# ------------------------------------------------------------------------- fixtures
def _vlm(seed=0, img_size=32, patch=8, dim=16):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img_size, patch_size=patch, in_chans=3, num_classes=0, embed_dim=dim, depth=2,
                            num_heads=2)
    lm = TinyLM(len(TOK), dim=16, depth=2, num_heads=2, max_len=(img_size // patch) ** 2 + 16)
    with torch.no_grad():  # spread the attention (a fresh ViT's CLS attention is almost uniform)
        for p in vit.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return TinyVLM(vit, VisionProjector(dim, 16), lm).eval()


@pytest.fixture(scope="module")
def vlm():
    return _vlm()


@pytest.fixture(scope="module")
def scenes():
    return caption_scenes("test", seed=0, img_size=32, n=12)


def _prompts(scenes, kind="present"):
    items = scenes.items(kind, source="probes")
    return torch.tensor([TOK.encode(q.question) for _, q in items]), torch.tensor([i for i, _ in items])


# ------------------------------------------------------------------------- equivalence with the official code
@pytest.mark.parametrize("n,c,k", [(9, 8, 3), (256, 64, 4), (576, 32, 10)])
def test_outlier_selection_matches_official(n, c, k):
    g = torch.Generator().manual_seed(n)
    q, kk = torch.randn(2, 1 + n, c, generator=g), torch.randn(2, 1 + n, c, generator=g)
    feats = torch.randn(2, n, c, generator=g)
    want_feats, want_idx, want_attn = official_outliers(feats, q, kk, k)
    attn = D.cls_attention(q, kk)
    idx = D.outlier_indices(attn, k)
    torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-7)
    assert torch.equal(idx, want_idx)
    assert torch.equal(D.gather_tokens(feats, idx), want_feats)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (1.5, 0.1), (0.0, 0.1), (2.0, 0.5), (1.0, 1.0)])
def test_contrastive_step_matches_official(alpha, beta):
    g = torch.Generator().manual_seed(int(10 * alpha + 100 * beta))
    full, cd = 3 * torch.randn(4, 52, generator=g), 3 * torch.randn(4, 52, generator=g)
    assert torch.equal(D.contrastive_logits(full, cd, alpha, beta), official_contrast(full, cd, alpha, beta))


def test_damro_features_match_official_on_a_vit(vlm, scenes):
    """The whole encoder-side path on a real (small) ViT: q, k read from the last block's qkv weights by hand."""
    vit = vlm.vision_encoder
    x = scenes.images[:3]
    blk, seen = vit.blocks[-1], {}
    h = blk.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        feats = vit.forward_features(x)[:, 1:]
        h.remove()
        ln = blk.norm1(seen["x"])
        C = vit.embed_dim
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        q, k = ln @ w[:C].T + b[:C], ln @ w[C:2 * C].T + b[C:2 * C]  # q_proj, k_proj
    want_out, want_idx, want_attn = official_outliers(feats, q, k, 4)
    got_feats, got_out, got_idx, got_attn = D.damro_features(vlm, x, 4)
    torch.testing.assert_close(got_feats, feats)
    torch.testing.assert_close(got_attn, want_attn, rtol=1e-5, atol=1e-7)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_out, want_out)
    with D.CaptureQK(vit) as cap, torch.no_grad():
        vit.forward_features(x)
    torch.testing.assert_close(cap.q, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.k, k, rtol=1e-5, atol=1e-6)
    assert not blk.attn.qkv._forward_hooks, "the hook is removed on exit"


# ------------------------------------------------------------------------- hand cases
def test_outliers_by_hand():
    """C = 4, CLS query (2, 0, 0, 0), patch keys s_j e_1 with s = (0, 3, 1, 2), CLS key 0: scores s_j exactly, so the
    top-2 are patches 1 and 3 and the CLS row is exp(s) / (1 + sum exp(s))."""
    s = torch.tensor([0.0, 3.0, 1.0, 2.0])
    q = torch.zeros(1, 5, 4)
    q[0, 0, 0] = 2.0
    k = torch.zeros(1, 5, 4)
    k[0, 1:, 0] = s
    a = D.cls_attention(q, k)
    torch.testing.assert_close(a[0], s.exp() / (1 + s.exp().sum()))
    assert D.outlier_indices(a, 2).tolist() == [[1, 3]]
    feats = torch.arange(8.0).reshape(1, 4, 2)
    assert D.gather_tokens(feats, D.outlier_indices(a, 2)).tolist() == [[[2.0, 3.0], [6.0, 7.0]]]


def test_contrastive_by_hand():
    """l_full (2, 1, -5), l_out (2.5, 0, 0), alpha 1, beta 0.1: cutoff 2 + log 0.1 = -0.30 masks token 2; the contrast
    2 l_full - l_out = (1.5, 2, .) flips the answer from token 0 (greedy) to token 1."""
    full, out = torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[2.5, 0.0, 0.0]])
    got = D.contrastive_logits(full, out, alpha=1.0, beta=0.1)
    assert got[0, :2].tolist() == [1.5, 2.0] and got[0, 2] == -math.inf
    assert full.argmax() == 0 and got.argmax() == 1
    assert D.contrastive_logits(full, out, alpha=0.0, beta=0.1)[0, :2].tolist() == [2.0, 1.0]


def test_alpha_zero_is_greedy_and_the_cutoff_masks_what_it_should():
    g = torch.Generator().manual_seed(3)
    full, out = 2 * torch.randn(64, 52, generator=g), 2 * torch.randn(64, 52, generator=g)
    assert torch.equal(D.contrastive_logits(full, out, 0.0).argmax(-1), full.argmax(-1))
    for beta in (0.1, 0.5):
        got = D.contrastive_logits(full, out, 1.0, beta)
        p = full.softmax(-1)
        keep = p >= beta * p.max(-1, keepdim=True).values  # the cutoff in probability terms
        ok = (keep == torch.isfinite(got)) | ((p / p.max(-1, keepdim=True).values - beta).abs() < 1e-5)
        assert ok.all()
        assert torch.isfinite(got.gather(1, full.argmax(-1, keepdim=True))).all(), "the full argmax always survives"
    for mode in D.MODES:  # answer_probs: alpha None = regular decoding, alpha 0 + greedy = the same argmax
        assert torch.equal(D.answer_probs(full, out, alpha=0.0).argmax(-1), D.answer_probs(full).argmax(-1))
        p = D.answer_probs(full, out, alpha=0.5, mode=mode)
        torch.testing.assert_close(p.sum(-1), torch.ones(64))


# ------------------------------------------------------------------------- generation with two KV caches
def test_generate_with_alpha_zero_equals_tinyvlm_generate(vlm, scenes):
    ids, sc = _prompts(scenes)
    x = scenes.images[sc]
    want = vlm.generate(x, ids, max_new_tokens=5)
    n = vlm.vision_encoder.patch_embed.num_patches
    for k in (n, 4):
        assert torch.equal(D.damro_generate(vlm, x, ids, max_new_tokens=5, topk=k, alpha=0.0), want)


def test_generate_matches_uncached_contrast(vlm, scenes):
    """Each step of damro_generate = the contrast of two uncached forwards over [prefix; prompt; tokens so far]: the
    two branches keep separate, correct KV caches (positions start at 0 in each)."""
    ids, sc = _prompts(scenes)
    x = scenes.images[sc][:4]
    ids = ids[:4]
    out = D.damro_generate(vlm, x, ids, max_new_tokens=4, topk=3, alpha=1.0, beta=0.01)
    assert not torch.equal(out, vlm.generate(x, ids, max_new_tokens=4)), "the contrast changes some tokens here"
    feats, outl, _, _ = D.damro_features(vlm, x, 3)
    with torch.no_grad():
        for t in range(out.shape[1]):
            text = torch.cat([ids, out[:, :t]], dim=1)
            lf = vlm.lm(text, prefix_embeds=vlm.projector(feats))[:, -1]
            lo = vlm.lm(text, prefix_embeds=vlm.projector(outl))[:, -1]
            want = D.contrastive_logits(lf, lo, 1.0, 0.01).argmax(-1)
            live = (out[:, :t] != vlm.eos_id).all(dim=1)  # rows still generating at step t
            assert torch.equal(out[live, t], want[live])


def test_first_token_fast_path_equals_generate(vlm, scenes):
    ids, sc = _prompts(scenes)
    scan = D.encoder_scan(vlm, scenes.images, batch_size=5)
    idx = D.outlier_indices(scan["cls_attn"], 4)
    logits = D.first_token_logits(vlm, scan["features"], sc, ids, {"top4": idx}, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(logits["full"], vlm.prefill(scenes.images[sc], ids)[0], rtol=1e-4, atol=1e-5)
    fast = D.contrastive_logits(logits["full"], logits["top4"], 0.5).argmax(-1)
    assert torch.equal(D.damro_generate(vlm, scenes.images[sc], ids, 1, topk=4, alpha=0.5)[:, 0], fast)
    rnd = D.random_indices(len(scenes), idx.shape[1] * 4, 4, seed=1)
    via_idx = D.damro_generate(vlm, scenes.images[sc], ids, 1, alpha=0.5, idx=rnd[sc])[:, 0]
    logits = D.first_token_logits(vlm, scan["features"], sc, ids, {"r": rnd})
    assert torch.equal(via_idx, D.contrastive_logits(logits["full"], logits["r"], 0.5).argmax(-1))


def test_sampling_draws_from_the_contrast(vlm, scenes):
    ids, sc = _prompts(scenes)
    x = scenes.images[sc][:2]
    a = D.damro_generate(vlm, x, ids[:2], 3, greedy=False, generator=torch.Generator().manual_seed(0))
    b = D.damro_generate(vlm, x, ids[:2], 3, greedy=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- measuring helpers
def test_pope_metrics_match_official_counting():
    gt = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    gen = ["yes", "no", "red", "no", "yes", "circle", "yes", "no"]
    want = official_pope(gt, gen)
    p_yes = torch.tensor([float(a == "yes") for a in gen])
    p_no = torch.tensor([float(a == "no") for a in gen])
    got = D.pope_metrics(p_yes, p_no, torch.tensor([a == "yes" for a in gt]))
    for key, val in want.items():
        assert got[key] == pytest.approx(val)
    assert (got["tp"], got["fn"], got["tn"], got["fp"]) == (2, 2, 2, 2)
    # probabilities: the expected counts under sampling
    got = D.pope_metrics(torch.tensor([0.3, 0.2]), torch.tensor([0.6, 0.7]), torch.tensor([True, False]))
    assert got["tp"] == pytest.approx(0.3) and got["fn"] == pytest.approx(0.7)
    assert got["tn"] == pytest.approx(0.7) and got["fp"] == pytest.approx(0.3)
    assert got["yes_ratio"] == pytest.approx(0.3) and got["accuracy"] == pytest.approx(0.5)
    never = D.pope_metrics(torch.zeros(4), torch.ones(4), torch.tensor([True, True, False, False]))
    assert never["precision"] == 0 and never["f1"] == 0 and never["accuracy"] == 0.5 and never["yes_ratio"] == 0


def test_patch_coverage_and_random_indices():
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    masks[0, 0, 0] = 1
    masks[0, 2:, 2:] = 2
    assert D.patch_coverage(masks, 2).tolist() == [[0.25, 0.0, 0.0, 1.0]]
    r = D.random_indices(5, 16, 4, seed=2)
    assert r.shape == (5, 4) and all(len(set(row.tolist())) == 4 for row in r)
    assert torch.equal(r, D.random_indices(5, 16, 4, seed=2)) and not torch.equal(r, D.random_indices(5, 16, 4, seed=3))


def test_encoder_scan_and_probe_run(vlm, scenes):
    scan = D.encoder_scan(vlm, scenes.images, batch_size=5)
    feats, _, _, a = D.damro_features(vlm, scenes.images, 1)
    torch.testing.assert_close(scan["features"], feats)
    torch.testing.assert_close(scan["cls_attn"], a)
    x, outs = vlm.vision_encoder.embed(scenes.images), []
    with torch.no_grad():
        for blk in vlm.vision_encoder.blocks:
            x = blk(x)
            outs.append(x.norm(dim=-1))
    norms = torch.stack(outs, dim=1)
    torch.testing.assert_close(scan["norms"], norms[..., 1:])
    torch.testing.assert_close(scan["cls_norms"], norms[..., 0])
    res = D.probe_run(vlm, scenes, topks=(2, 5), batch_size=7)
    pr = res["probes"]
    assert len(pr["kind"]) == 2 * len(scenes) and set(pr["logits"]) == {"full", "top2", "top5", "rand2", "rand5"}
    assert (pr["answer"] == TOK.stoi["yes"]).sum() == len(scenes)
    q = res["questions"]
    assert set(q["kind"]) == {"colour"} and q["logits"]["full"].shape == (len(q["kind"]), len(TOK))
    ids = torch.tensor([TOK.encode(s) for s in q["question"][:3]])
    with torch.no_grad():
        want = vlm.prefill(scenes.images[q["scene"][:3]], ids)[0]
    torch.testing.assert_close(q["logits"]["full"][:3], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(res["outlier_idx"][2], D.outlier_indices(res["cls_attn"], 2))


def test_lesson_models_are_the_fastvlm_vit_entries():
    from vitlab.methods.vision_language import fastvlm

    assert D.VLM_ENTRIES == tuple(fastvlm.entry_name("vit", s) for s in fastvlm.SEEDS)
    for name in D.VLM_ENTRIES:
        assert name in zoo.ZOO and zoo.available(name, "cpu"), f"{name}: committed checkpoint expected"


# ------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument(vlm, scenes):
    q = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="q and k"):
        D.cls_attention(q, torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match="q must"):
        D.cls_attention(torch.randn(5, 4), q)
    with pytest.raises(ValueError, match="topk"):
        D.outlier_indices(torch.rand(1, 4), 5)
    with pytest.raises(TypeError, match="topk"):
        D.outlier_indices(torch.rand(1, 4), 1.5)
    with pytest.raises(ValueError, match="idx"):
        D.gather_tokens(torch.rand(1, 4, 2), torch.tensor([[4]]))
    with pytest.raises(ValueError, match="logits_full and logits_outlier"):
        D.contrastive_logits(torch.rand(1, 5), torch.rand(1, 4))
    with pytest.raises(ValueError, match="alpha"):
        D.contrastive_logits(torch.rand(1, 5), torch.rand(1, 5), alpha=-1)
    with pytest.raises(ValueError, match="beta"):
        D.contrastive_logits(torch.rand(1, 5), torch.rand(1, 5), beta=0)
    with pytest.raises(TypeError, match="vlm"):
        D.damro_features(vlm.vision_encoder, scenes.images[:1])
    with pytest.raises(ValueError, match="layer"):
        D.damro_features(vlm, scenes.images[:1], layer=5)
    no_cls = TinyVLM(VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=16, depth=1,
                                       num_heads=2, class_token=False, global_pool="avg"),
                     VisionProjector(16, 16), TinyLM(len(TOK), dim=16, depth=1))
    with pytest.raises(TypeError, match="CLS"):
        D.damro_features(no_cls, scenes.images[:1])
    with_cls = TinyVLM(vlm.vision_encoder, vlm.projector, vlm.lm, use_cls=True)
    with pytest.raises(ValueError, match="use_cls"):
        D.damro_features(with_cls, scenes.images[:1])
    ids = torch.tensor([TOK.encode("is there a red circle")])
    with pytest.raises(TypeError, match="max_new_tokens"):
        D.damro_generate(vlm, scenes.images[:1], ids, max_new_tokens=1.0)
    with pytest.raises(ValueError, match="alpha"):
        D.damro_generate(vlm, scenes.images[:1], ids, alpha=-0.5)
    with pytest.raises(ValueError, match="images"):
        D.damro_generate(vlm, scenes.images[:2], ids)
    with pytest.raises(ValueError, match="masks"):
        D.patch_coverage(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match="patch_size"):
        D.patch_coverage(torch.zeros(1, 6, 6), 4)
    with pytest.raises(ValueError, match="k must"):
        D.random_indices(2, 4, 5)
    with pytest.raises(ValueError, match="mode"):
        D.answer_probs(torch.rand(2, 5), mode="beam")
    with pytest.raises(ValueError, match="logits_outlier"):
        D.answer_probs(torch.rand(2, 5), alpha=0.5)
    with pytest.raises(ValueError, match="p_yes, p_no and truth"):
        D.pope_metrics(torch.rand(3), torch.rand(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="truth"):
        D.pope_metrics(torch.zeros(2), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="probabilities"):
        D.pope_metrics(torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.bool))
    feats = torch.rand(2, 16, 16)
    with pytest.raises(ValueError, match="scene_idx"):
        D.first_token_logits(vlm, feats, torch.tensor([0, 5]), torch.ones(2, 3, dtype=torch.long) * 10)
    with pytest.raises(ValueError, match="prompt_ids"):
        D.first_token_logits(vlm, feats, torch.tensor([0]), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="index_sets"):
        D.first_token_logits(vlm, feats, torch.tensor([0]), ids, {"full": torch.zeros(2, 1, dtype=torch.long)})
    with pytest.raises(TypeError, match="topks"):
        D.probe_run(vlm, scenes, topks=4)
    with pytest.raises(ValueError, match="topks"):
        D.probe_run(vlm, scenes, topks=(17,))
