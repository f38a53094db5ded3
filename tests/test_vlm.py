"""vitlab.vlm: tokenizer, causal LM with KV cache, projector, VLM loss/generation/TTFT, tiny CLIP, training."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.models import VisionTransformer
from vitlab.seed import seed_everything
from vitlab.vlm import (IGNORE, LOGIT_SCALE_MAX, SPECIAL_TOKENS, VOCAB, KVCache, TextEncoder, TinyCLIP, TinyLM,
                        TinyVLM, VisionProjector, WordTokenizer, answer_accuracy, answer_loss, caption_scenes,
                        clip_loss, contrastive_objective, moving_shapes_videos, pack_answers, recall_at_k, train_clip, train_vlm,
                        zero_shot_classify)

TOK = WordTokenizer()


def vit(patch=8, dim=16, img=32):
    return VisionTransformer(img_size=img, patch_size=patch, in_chans=3, num_classes=0, embed_dim=dim, depth=1,
                             num_heads=2, mlp_ratio=2)


def tiny_vlm(patch=8, dim=16, depth=2, **lm_kw):
    torch.manual_seed(0)
    lm = TinyLM(len(TOK), dim=dim, depth=depth, num_heads=2, max_len=300, mlp_ratio=2, **lm_kw)
    return TinyVLM(vit(patch, dim), VisionProjector(dim, dim), lm).eval()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_ids_are_fixed_and_round_trip():
    assert TOK.itos[:5] == list(SPECIAL_TOKENS) and TOK.itos[5:] == list(VOCAB)
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.img_id, TOK.unk_id) == (0, 1, 2, 3, 4)
    assert WordTokenizer().stoi == TOK.stoi and len(TOK) == 5 + len(VOCAB)
    ds = caption_scenes("val", n=20)
    for text in list(ds.captions) + [q for row in ds.questions for q in row]:
        ids = TOK.encode(text)
        assert TOK.unk_id not in ids and TOK.decode(ids) == text
    assert TOK.encode("what colour is the circle", bos=True, eos=True)[0::6] == [TOK.bos_id, TOK.eos_id]
    assert TOK.encode("What COLOUR?") == TOK.encode("what colour ?")  # case and punctuation


def test_unknown_words_and_specials():
    ids = TOK.encode("a purple circle <img>")
    assert ids == [TOK.stoi["a"], TOK.unk_id, TOK.stoi["circle"], TOK.img_id]
    assert TOK.decode(ids) == "a <unk> circle" and TOK.decode(ids, skip_special=False) == "a <unk> circle <img>"
    custom = WordTokenizer(["b", "a", "b"])
    assert custom.itos == list(SPECIAL_TOKENS) + ["b", "a"]


def test_batch_encode_pads_right():
    ids, mask = TOK.batch_encode(["yes", "a red circle"], eos=True)
    assert ids.shape == mask.shape == (2, 4) and ids.dtype == torch.long
    assert ids[0].tolist() == [TOK.stoi["yes"], TOK.eos_id, 0, 0] and mask.sum(1).tolist() == [2, 4]
    assert TOK.batch_encode(["yes"], max_len=6)[0].shape == (1, 6)
    with pytest.raises(ValueError, match="more than max_len=2"):
        TOK.batch_encode(["a red circle"], max_len=2)
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        TOK.batch_encode(["a"], max_len=0)
    with pytest.raises(TypeError, match="texts must be a non-empty list of str"):
        TOK.batch_encode("a red circle")
    with pytest.raises(ValueError, match="words must be single lower-case tokens"):
        WordTokenizer(["red circle"])
    with pytest.raises(ValueError, match="ids must be ints in 0..51"):
        TOK.decode([99])


# ------------------------------------------------------------------------------------------------ TinyLM
@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyLM(40, dim=16, depth=2, num_heads=2, max_len=32).eval()


def test_causal_mask(lm):
    prefix = torch.randn(2, 3, 16)
    ids = torch.randint(5, 40, (2, 6))
    changed = ids.clone()
    changed[:, 4] = (ids[:, 4] + 1) % 40
    a, b = lm(ids, prefix_embeds=prefix), lm(changed, prefix_embeds=prefix)
    assert a.shape == (2, 9, 40)
    torch.testing.assert_close(a[:, :3 + 4], b[:, :3 + 4])  # before the change: identical
    assert not torch.allclose(a[:, 3 + 4:], b[:, 3 + 4:])  # from it on: not


def test_kv_cache_equals_the_full_forward(lm):
    prefix, prompt = torch.randn(2, 3, 16), torch.randint(5, 40, (2, 4))
    cache = KVCache()
    logits = lm(prompt, prefix_embeds=prefix, kv_cache=cache)[:, -1]
    assert len(cache) == 7 and len(cache.keys) == 2 and cache.keys[0].shape == (2, 2, 7, 8)
    seq = prompt
    for _ in range(5):  # greedy tokens, one at a time through the cache
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits = lm(nxt, kv_cache=cache)[:, -1]
        full = lm(seq, prefix_embeds=prefix)[:, -1]  # recomputed from scratch
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert len(cache) == 12
    chunk = KVCache()  # several new tokens after a cached prefix: the offset causal mask
    lm(seq[:, :2], prefix_embeds=prefix, kv_cache=chunk)
    torch.testing.assert_close(lm(seq[:, 2:], kv_cache=chunk), lm(seq, prefix_embeds=prefix)[:, 5:],
                               atol=1e-5, rtol=1e-5)


def test_lm_head_tying_and_bad_input(lm):
    assert lm.head is None and TinyLM(40, dim=16, tie_embeddings=False).head.weight.shape == (40, 16)
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor"):
        lm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids must lie in 0..39"):
        lm(torch.tensor([[40]]))
    with pytest.raises(ValueError, match=r"prefix_embeds must be \[B, P, 16\]"):
        lm(prefix_embeds=torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="exceed max_len=32"):
        lm(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="give input_ids, prefix_embeds or both"):
        lm()
    with pytest.raises(ValueError, match="num_heads=3 does not divide dim=16"):
        TinyLM(40, dim=16, num_heads=3)


# ------------------------------------------------------------------------------------------------ projector
@pytest.mark.parametrize("kind, params", [("linear", 12 * 20 + 20), ("mlp", 12 * 20 + 20 + 20 * 20 + 20)])
def test_projector(kind, params):
    p = VisionProjector(12, 20, kind)
    assert p(torch.randn(2, 5, 12)).shape == (2, 5, 20) and sum(t.numel() for t in p.parameters()) == params
    if kind == "mlp":
        assert isinstance(p.proj[1], nn.GELU)


def test_projector_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        VisionProjector(12, 20, "qformer")
    with pytest.raises(ValueError, match=r"x must be visual tokens \[B, N, 12\]"):
        VisionProjector(12, 20)(torch.randn(2, 5, 13))


# ------------------------------------------------------------------------------------------------ TinyVLM
def test_visual_tokens_are_the_patch_tokens():
    m, x = tiny_vlm(), torch.rand(2, 3, 32, 32)
    assert m.encode_images(x).shape == (2, 16, 16) and m.visual_prefix(x).shape == (2, 16, 16)
    m.use_cls = True
    assert m.encode_images(x).shape == (2, 17, 16)


def test_pack_answers_hand_case():
    text, labels = pack_answers(torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[8, 2], [9, 2]]))
    assert text.tolist() == [[5, 6, 8, 2], [7, 9, 2, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 8, 2], [IGNORE, 9, 2, IGNORE]]
    with pytest.raises(ValueError, match="every row of answer_ids needs at least one token"):
        pack_answers(torch.tensor([[5]]), torch.tensor([[0]]))


def test_loss_counts_answer_tokens_only():
    torch.manual_seed(0)
    P, V = 3, 11
    labels = torch.tensor([[IGNORE, IGNORE, 8, 2], [IGNORE, 9, 2, IGNORE]])
    logits = torch.randn(2, P + 4, V)
    loss = answer_loss(logits, labels)
    # by hand: logit P + j - 1 predicts text token j
    want = torch.stack([F.cross_entropy(logits[0, P + 1], torch.tensor(8)), F.cross_entropy(logits[0, P + 2],
                        torch.tensor(2)), F.cross_entropy(logits[1, P], torch.tensor(9)),
                        F.cross_entropy(logits[1, P + 1], torch.tensor(2))]).mean()
    torch.testing.assert_close(loss, want)
    other = logits.clone()
    other[:, :P] = torch.randn(2, P, V) * 10  # image positions (the last one predicts a prompt token)
    other[0, P] = other[0, P - 1] * 3  # a prompt position whose target is a prompt token
    other[:, -1] = 5.0  # the last position predicts nothing
    torch.testing.assert_close(answer_loss(other, labels), loss)
    other[1, P] += torch.randn(V)  # the logit before an answer token does count
    assert not torch.allclose(answer_loss(other, labels), loss)
    # and through the model: the loss is this function on the model's logits
    m = tiny_vlm()
    x = torch.rand(2, 3, 32, 32)
    prompts, _ = TOK.batch_encode(["what colour is the circle", "how many shapes are there"])
    answers, _ = TOK.batch_encode(["red", "two"], eos=True)
    text, lab = pack_answers(prompts, answers)
    torch.testing.assert_close(m.loss(x, prompts, answers), answer_loss(m(x, text), lab))


def test_generate_picks_the_argmax_on_a_hand_set_lm():
    m = tiny_vlm()
    winner = TOK.stoi["blue"]
    with torch.no_grad():  # every position's final hidden state is e_0; only `winner`'s embedding has e_0
        m.lm.norm.weight.zero_()
        m.lm.norm.bias.zero_()
        m.lm.norm.bias[0] = 1.0
        m.lm.tok_emb.weight[:, 0] = 0.0
        m.lm.tok_emb.weight[winner, 0] = 5.0
    prompt = torch.tensor([TOK.encode("what colour is the circle")] * 3)
    assert m.generate(torch.rand(3, 3, 32, 32), prompt, 4).tolist() == [[winner] * 4] * 3
    with torch.no_grad():
        m.lm.tok_emb.weight[winner, 0] = 0.0
        m.lm.tok_emb.weight[TOK.eos_id, 0] = 5.0
    assert m.generate(torch.rand(3, 3, 32, 32), prompt, 4).tolist() == [[TOK.eos_id]] * 3  # stops at <eos>


def test_generate_equals_argmax_without_cache():
    m = tiny_vlm()
    x, prompt = torch.rand(2, 3, 32, 32), torch.tensor([TOK.encode("where is the cross")] * 2)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, m(x, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    out = m.generate(x, prompt, 5)
    done = (out == TOK.eos_id).cumsum(1) - (out == TOK.eos_id).long() > 0  # after an <eos>: padding
    assert torch.equal(out[~done], seq[:, prompt.shape[1]:][~done]) and (out[done] == TOK.pad_id).all()
    torch.manual_seed(1)
    sampled = m.generate(x, prompt, 3, greedy=False, temperature=2.0)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 3


def test_generate_bad_input():
    m = tiny_vlm()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="prompt_ids must not contain <pad>"):
        m.generate(x, torch.tensor([[5, 6], [5, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        m.generate(x, torch.tensor([[5], [6]]), 0)
    with pytest.raises(ValueError, match="images has 2 rows, prompt_ids 1"):
        m.generate(x, torch.tensor([[5]]))
    with pytest.raises(TypeError, match="prompt_ids must be int64"):
        m.generate(x, torch.tensor([[5.0], [6.0]]))
    with pytest.raises(TypeError, match="lm must be a vitlab.vlm.TinyLM"):
        TinyVLM(vit(), VisionProjector(16, 16), nn.Linear(2, 2))


def test_ttft_is_positive_and_grows_with_visual_tokens():
    # a batch of 32, so the 16x more tokens dominate fixed overheads; the best of 3 medians, so a busy CI worker
    # (this ran at 7.5 ms vs 3.3 ms once, with one image) cannot flip the order by a stall
    prompt = torch.tensor([TOK.encode("what colour is the circle")] * 32)
    x = torch.rand(32, 3, 32, 32)
    few, many = tiny_vlm(patch=8), tiny_vlm(patch=2)  # 16 vs 256 visual tokens, same widths
    t_few = min(few.ttft(x, prompt, repeats=5) for _ in range(3))
    t_many = min(many.ttft(x, prompt, repeats=5) for _ in range(3))
    assert 0 < t_few < t_many
    few.train()
    few.ttft(x, prompt, warmup=0, repeats=1)
    assert few.training and few.lm.training  # timed in eval mode, handed back as it was


# ------------------------------------------------------------------------------------------------ CLIP
def test_clip_loss_hand_cases():
    e = torch.eye(4)  # identical normalised embeddings, orthogonal across pairs
    assert clip_loss(100 * e @ e.T).item() < 1e-6
    torch.testing.assert_close(clip_loss(torch.eye(2)), torch.tensor(math.log(1 + math.exp(-1))))
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    rows = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)
    cols = -math.log(math.exp(2) / (math.exp(2) + math.e)) - math.log(math.e / (1 + math.e))
    torch.testing.assert_close(clip_loss(logits), torch.tensor((rows / 2 + cols / 2) / 2))
    with pytest.raises(ValueError, match="logits must be square"):
        clip_loss(torch.zeros(2, 3))


def tiny_clip():
    torch.manual_seed(0)
    return TinyCLIP(vit(dim=16), TextEncoder(len(TOK), dim=16, depth=1, num_heads=2), embed_dim=8)


def test_clip_temperature_init_and_clamp():
    m = tiny_clip()
    assert m.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.scale.item() == pytest.approx(100.0) and LOGIT_SCALE_MAX == pytest.approx(math.log(100))
    m.scale.backward()
    assert m.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further
    with torch.no_grad():
        m.logit_scale.fill_(-3.0)
    assert m.scale.item() == pytest.approx(1.0)


def test_clip_forward_and_text_encoder():
    m = tiny_clip()
    ids, _ = TOK.batch_encode(["a red circle", "a large blue square at the top"], eos=True)
    logits = m(torch.rand(2, 3, 32, 32), ids)
    assert logits.shape == (2, 2) and logits.abs().max() <= m.scale + 1e-4  # cosines times the scale
    padded, _ = TOK.batch_encode(["a red circle", "a large blue square at the top"], max_len=12, eos=True)
    for pool in ("eos", "mean"):  # padding does not change a text's embedding
        enc = TextEncoder(len(TOK), dim=16, depth=2, num_heads=2, pool=pool, causal=pool == "eos").eval()
        torch.testing.assert_close(enc(ids), enc(padded), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="image_dim is needed"):
        TinyCLIP(nn.Linear(3, 3), TextEncoder(len(TOK), dim=16), 8)
    with pytest.raises(ValueError, match="pool must be one of"):
        TextEncoder(len(TOK), pool="cls")
    with pytest.raises(ValueError, match="every text needs at least one token"):
        TextEncoder(len(TOK), dim=16)(torch.zeros(1, 3, dtype=torch.long))


def test_contrastive_objective_steps_curve_and_metrics():
    m = tiny_clip()
    text, _ = TOK.batch_encode(["a red circle", "a blue square", "a small green triangle", "a large circle"], eos=True)
    images = torch.rand(4, 3, 32, 32)
    calls = []

    def validate(net):
        calls.append(net.training)
        return 0.5, 0.25

    obj = contrastive_objective(lambda x: text, validate, lambda model, split: {"r1": 1.0 if split == "test" else 0.0},
                                eval_every=2, curve=("a", "b"))
    idx = torch.tensor([2, 0, 3, 1])
    for _ in range(3):
        loss, logits = obj.step_fn(m, images, idx)
        # the batch's own captions, in the batch's order: CLIP's loss of the model's logits on them
        torch.testing.assert_close(loss, clip_loss(m(images, text[idx])))
        assert logits is None
    out = obj.metrics(m, None, None, None)
    assert out["val_curve_step"] == [0, 2, 3] and out["val_curve_a"] == [0.5] * 3 and out["val_curve_b"] == [0.25] * 3
    assert out["test_r1"] == 1.0 and out["val_r1"] == 0.0 and out["logit_scale"] == pytest.approx(float(m.scale.detach()))
    with pytest.raises(TypeError, match="validate must be callable"):
        contrastive_objective(lambda x: text, 3, lambda m, s: {}, eval_every=1, curve=("a",))
    with pytest.raises(ValueError, match="eval_every"):
        contrastive_objective(lambda x: text, validate, lambda m, s: {}, eval_every=0, curve=("a",))
    bad = contrastive_objective(lambda x: text, validate, lambda m, s: {}, eval_every=1, curve=("a",))
    with pytest.raises(ValueError, match="2 values for the curve"):
        bad.step_fn(m, images, idx)


def test_zero_shot_and_recall_by_hand():
    m = tiny_clip().eval()
    x = torch.rand(5, 3, 32, 32)
    prompts = [["a red circle", "a small red circle"], "a blue square", ["a yellow cross"]]
    pred, scores = zero_shot_classify(m, x, prompts, return_scores=True)
    with torch.no_grad():
        txt = [m.encode_text(TOK.batch_encode([p] if isinstance(p, str) else p, eos=True)[0]) for p in prompts]
        classes = F.normalize(torch.stack([t.mean(0) for t in txt]), dim=-1)
        want = m.encode_image(x) @ classes.T
    torch.testing.assert_close(scores, want)
    assert torch.equal(pred, want.argmax(1))
    ids, _ = TOK.batch_encode(["a red circle", "a blue square", "a red circle", "a yellow cross", "one"], eos=True)
    assert recall_at_k(m, x, ids, k=5) == {"i2t": 1.0, "t2i": 1.0}
    with torch.no_grad():
        sim = m.encode_image(x) @ m.encode_text(ids).T
    same = [[ids[a].tolist() == ids[b].tolist() for b in range(5)] for a in range(5)]
    i2t = sum(same[i][sim[i].argmax()] for i in range(5)) / 5
    assert recall_at_k(m, x, ids)["i2t"] == pytest.approx(i2t)
    with pytest.raises(ValueError, match="class_prompts must list at least 2 classes"):
        zero_shot_classify(m, x, ["a red circle"])


def test_train_clip_on_scenes_and_videos():
    m = tiny_clip()
    ds = caption_scenes("train", n=64)
    h = train_clip(m, ds, steps=12, lr=3e-3, batch_size=32, progress=False)
    assert h["step"][-1] == 12 and h["train_loss"][-1] < h["train_loss"][0]

    class FrameMean(nn.Module):  # a stand-in video tower: the ViT's features averaged over frames
        def __init__(self):
            super().__init__()
            self.vit, self.num_features = vit(dim=16), 16

        def forward(self, v):
            return self.vit(v.flatten(0, 1)).unflatten(0, v.shape[:2]).mean(1)

    torch.manual_seed(0)
    video_clip = TinyCLIP(FrameMean(), TextEncoder(len(TOK), dim=16, depth=1, num_heads=2), 8)
    h = train_clip(video_clip, moving_shapes_videos("train", n=16, frames=4), steps=2, batch_size=8, progress=False)
    assert len(h["train_loss"]) == 1 and math.isfinite(h["train_loss"][0])
    with pytest.raises(TypeError, match="train_clip: data must be CaptionScenes or MovingShapes"):
        train_clip(m, (ds.images, ds.captions), steps=1)


# ------------------------------------------------------------------------------------------------ end to end
def test_a_tiny_vlm_learns_the_colour_question():
    """64 scenes, colour questions only (chance 25 %): the whole path — ViT patch tokens, projector, LM, answer-only
    loss through fit, greedy generation — has to work for the answers to come out right."""
    seed_everything(0)
    lm = TinyLM(len(TOK), dim=32, depth=2, num_heads=2, max_len=64, mlp_ratio=2)
    m = TinyVLM(vit(8, 32), VisionProjector(32, 32), lm)
    data = caption_scenes("train", n=64)
    before = answer_accuracy(m, data, kinds="colour")
    h = train_vlm(m, data, steps=250, lr=3e-3, batch_size=32, kinds="colour", warmup=0.0, weight_decay=0.0,
                  progress=False)
    acc = answer_accuracy(m, data, kinds="colour", per_kind=True)
    assert before < 0.35 and h["train_loss"][-1] < h["train_loss"][0] / 5
    assert acc["colour"] > 0.5 and acc["all"] == acc["colour"]  # measured: 0.73 (seeds 0-2: 0.66-0.82)


def test_training_bad_input():
    m = tiny_vlm()
    data = caption_scenes("train", n=64)
    with pytest.raises(TypeError, match="train_vlm: data must be CaptionScenes"):
        train_vlm(m, (data.images, data.captions), steps=1)
    with pytest.raises(ValueError, match="tokenizer has 52 tokens but the model's vocab_size is 10"):
        train_vlm(TinyVLM(vit(), VisionProjector(16, 16), TinyLM(10, dim=16)), data, steps=1)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        answer_accuracy(m, data, kinds="color")


def test_question_sampler_draws_one_question_of_the_scene():
    from vitlab.vlm import QuestionSampler, caption_scenes, qa_tensors

    data = caption_scenes("val", n=40)
    tok = WordTokenizer()
    scene, text, _ = qa_tensors(data, tok, ("position",))
    qs = QuestionSampler(data, tok, ("position",), seed=3)
    assert torch.equal(qs.scenes, torch.unique(scene))
    idx = qs.scenes[:6].repeat(5)
    drawn, labels = qs(idx)
    assert drawn.shape[0] == labels.shape[0] == len(idx)
    for i, row in zip(idx.tolist(), drawn):  # each drawn question is one of its own scene's
        assert any(torch.equal(row, t) for t in text[scene == i])
    again, _ = QuestionSampler(data, tok, ("position",), seed=3)(idx)
    assert torch.equal(drawn, again)  # seeded: the same draws for the same batches
    missing = [i for i in range(len(data)) if i not in set(qs.scenes.tolist())]
    if missing:
        with pytest.raises(ValueError, match="no question"):
            qs(torch.tensor(missing[:1]))
    with pytest.raises(TypeError, match="CaptionScenes"):
        QuestionSampler(data.images)


def test_seeded_entry_names_the_seeds_and_the_plateau_check():
    from vitlab import vlm

    assert vlm.seeded_entry("ch7_x_arm", 2, (0, 1, 2)) == "ch7_x_arm_s2"
    assert vlm.seeded_entry("ch7_x_arm", 0, (0, 1, 2), long=True) == "ch7_x_arm_long_s0"
    with pytest.raises(ValueError, match=r"entry_name: seed must be one of \(0,\), got 1"):
        vlm.seeded_entry("ch7_x_arm", 1, (0, 1, 2), long=True)  # the longer run exists for the first seed only
    with pytest.raises(ValueError, match=r"qa_entry_name: seed must be one of \(0, 1, 2\), got True"):
        vlm.seeded_entry("ch7_x_arm", True, (0, 1, 2), fn="qa_entry_name")
