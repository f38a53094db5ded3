"""BUS (no official code: a re-implementation from the paper, so internal checks only): keep-all TSPS is the identity
(alone and inside the encoder, which then computes the plain ViT's tokens), TSPS keeps exactly the top-k by a hand
score, the patch keys are the block's own, PAD shapes, PTM labels against hand masks, gradients reach TSPS through
PTM, pairwise retrieval against a pair-by-pair loop, recall by hand, the zoo entries, bad input."""
import math

import pytest
import torch

from tests.model_helpers import objective_losses, tiny_vit
from vitlab.methods.vision_language import bus as B
from vitlab.vlm import TextEncoder, TinyCLIP, WordTokenizer

TOL = dict(atol=1e-5, rtol=1e-5)


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_bus(keep_ratio=0.5, seed=0, **kw):
    """16 px, patch 4 (16 patches + CLS), 2 x 32 ViT, TSPS before block 1, a 2 x 32 text tower."""
    vit = tiny_vit(seed, num_classes=0)
    torch.manual_seed(seed)
    text = TextEncoder(len(WordTokenizer()), dim=32, depth=1, num_heads=2)
    return B.BUSCLIP(B.BUSVisionEncoder(vit, 32, keep_ratio=keep_ratio, **kw), text, embed_dim=16).eval()


def _ids(texts):
    return WordTokenizer().batch_encode(texts, eos=True)[0]


TEXTS = ["a small red circle on the left", "a large blue square at the top and a small green cross on the right",
         "a large yellow triangle in the centre"]


# ------------------------------------------------------------------------------------------ TSPS
def test_keep_all_tsps_is_the_identity():
    tsps = B.TSPS(8, 5, keep_ratio=1.0)
    x, keys, text = torch.randn(3, 1 + 6, 8), torch.randn(3, 6, 8), torch.randn(3, 5)
    out, idx, logits = tsps(x, keys, text)
    assert torch.equal(out, x) and torch.equal(idx, torch.arange(6).expand(3, 6)) and logits.shape == (3, 6)


def test_keep_all_encoder_computes_the_plain_vit():
    """keep_ratio=1: the blocks after TSPS see every token in raster order, so the encoder's tokens are the ViT's."""
    bus = _tiny_bus(keep_ratio=1.0)
    x, ids = _images(2), _ids(TEXTS[:2])
    with torch.no_grad():
        out = bus.image_encoder(x, bus.text_encoder(ids))
        assert torch.allclose(out["tokens"], bus.image_encoder.vit.forward_features(x), **TOL)
    assert out["kept"].shape == (2, 16) and out["summary"].shape == (2, 8, 32)


def test_tsps_keeps_exactly_the_top_k_by_hand():
    """dim 2, text_proj = identity with zero bias, text (1, 0): the logit of patch i is keys[i, 0] / sqrt(2)."""
    tsps = B.TSPS(2, 2, keep_ratio=0.5)
    with torch.no_grad():
        tsps.text_proj.weight.copy_(torch.eye(2))
        tsps.text_proj.bias.zero_()
    keys = torch.tensor([[[0.1, 9.0], [3.0, 0.0], [-1.0, 5.0], [2.0, 0.0], [0.5, 0.0], [4.0, -7.0]]])
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)  # CLS + 6 patches
    out, idx, logits = tsps(x, keys, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(logits, keys[..., 0] / math.sqrt(2))
    assert idx.tolist() == [[1, 3, 5]]  # the three largest first coordinates (4, 3, 2), back in raster order
    assert torch.equal(out, x[:, [0, 2, 4, 6]])  # CLS first, then patches 1, 3, 5 (tokens 2, 4, 6)
    assert torch.allclose(tsps.scores(keys, torch.tensor([[1.0, 0.0]])).sum(-1), torch.ones(1))
    assert tsps.num_keep(64) == 32 and B.TSPS(2, 2, keep_ratio=0.01).num_keep(64) == 1


def test_patch_keys_are_the_blocks_own_keys():
    vit = tiny_vit(0, num_classes=0)
    x = torch.randn(2, 17, 32)
    blk = vit.blocks[1]
    _, k, _ = blk.attn.qkv_heads(blk.norm1(x))  # [B, H, N, Dh]
    assert torch.allclose(B.patch_keys(blk, x), k.transpose(1, 2).reshape(2, 17, 32), **TOL)


def test_tsps_placement_and_token_counts():
    bus = _tiny_bus()
    enc = bus.image_encoder
    assert enc.select_at == 1 and enc.num_patches == 16 and enc.num_kept == 8
    x, keys = enc.first_half(_images(2))
    assert x.shape == (2, 17, 32) and keys.shape == (2, 16, 32)
    out = enc.second_half(x, keys, bus.text_encoder(_ids(TEXTS[:2])))
    assert out["tokens"].shape == (2, 9, 32) and out["kept"].shape == (2, 8) and out["ptm_logits"].shape == (2, 16)
    assert (out["kept"].diff(dim=1) > 0).all()  # raster order, no repeats


# ------------------------------------------------------------------------------------------ PAD
def test_pad_output_shapes():
    pad = B.PatchAbstractionDecoder(32, num_queries=8, num_heads=2, depth=2)
    for m in (1, 5, 33):  # any context length
        assert pad(torch.randn(3, m, 32)).shape == (3, 8, 32)
    bus = _tiny_bus(num_queries=4)
    logits, aux = bus(_images(3), _ids(TEXTS), return_aux=True)
    assert logits.shape == (3, 3) and aux["summary"].shape == (3, 4, 32)
    assert bus.image_encoder.pool(aux["summary"]).shape == (3, 32)


# ------------------------------------------------------------------------------------------ PTM
def test_ptm_labels_by_hand():
    """An 8 x 8 mask, patch 4 (2 x 2 patches): object 1 covers the top-left patch fully and one pixel of the top-right
    patch; object 2 covers half of the bottom-right patch; the bottom-left patch is background."""
    m = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m[0, :4, :4] = 1
    m[0, 0, 4] = 1
    m[0, 4:8, 6:8] = 2
    assert B.ptm_labels(m, 4).tolist() == [[1.0, 1.0, 0.0, 1.0]]  # any pixel of any object
    assert B.ptm_labels(m, 4, min_cover=0.25).tolist() == [[1.0, 0.0, 0.0, 1.0]]  # 1/16 of a patch is not enough
    only1 = torch.tensor([[True, False, False]])  # the text mentions object 1 only
    assert B.ptm_labels(m, 4, slots=only1).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    only2 = torch.tensor([[False, True, False]])
    assert B.ptm_labels(m, 4, slots=only2).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_ptm_labels_match_the_scene_masks():
    from vitlab.vlm import caption_scenes

    cs = caption_scenes("val", n=20)
    y = B.ptm_labels(cs.masks, 4).view(20, 8, 8)
    on = (cs.masks > 0).view(20, 8, 4, 8, 4).any(dim=(2, 4))  # some object pixel in the patch
    assert torch.equal(y.bool(), on) and (y.sum((1, 2)) > 0).all()  # every scene has at least one object


def test_selection_recall_and_ptm_loss():
    kept = torch.tensor([[0, 2], [1, 3]])
    labels = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    r = B.selection_recall(kept, labels)
    assert r[0].item() == pytest.approx(2 / 3) and math.isnan(r[1].item())
    assert B.ptm_loss(torch.zeros(2, 4), labels).item() == pytest.approx(math.log(2))


def test_gradients_reach_tsps_through_ptm():
    bus = _tiny_bus().train()
    cs_masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    cs_masks[:, :8, :8] = 1
    _, aux = bus(_images(2), _ids(TEXTS[:2]), return_aux=True)
    B.ptm_loss(aux["ptm_logits"], B.ptm_labels(cs_masks, 4)).backward()
    enc = bus.image_encoder
    for p in (enc.tsps.text_proj.weight, enc.tsps.bias, enc.vit.blocks[1].attn.qkv.weight, enc.vit.patch_embed.proj.weight,
              bus.text_encoder.tok_emb.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert enc.pad.queries.grad is None  # PTM does not touch PAD


def test_itc_gradient_does_not_pass_the_hard_selection():
    bus = _tiny_bus().train()
    bus(_images(3), _ids(TEXTS)).diagonal().sum().backward()
    assert bus.image_encoder.tsps.text_proj.weight.grad is None  # top-k is not differentiable: only PTM trains TSPS
    assert bus.image_encoder.pad.queries.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ retrieval
def test_pairwise_similarity_reads_each_image_under_each_text():
    bus = _tiny_bus()
    x, ids = _images(3), _ids(TEXTS)
    sim = B.pairwise_similarity(bus, x, ids, chunk=4)  # 1 text per chunk: the chunking is exercised
    with torch.no_grad():
        txt = bus.encode_text(ids)
        for j in range(3):
            img = bus.encode_image(x, ids[[j] * 3])  # every image under text j
            assert torch.allclose(sim[:, j], img @ txt[j], **TOL)
        assert torch.allclose(bus(x, ids).diagonal() / bus.scale, sim.diagonal(), **TOL)
    plain = TinyCLIP(tiny_vit(0, num_classes=0), TextEncoder(len(WordTokenizer()), dim=32, depth=1), 16).eval()
    with torch.no_grad():
        assert torch.allclose(B.pairwise_similarity(plain, x, ids), plain.encode_image(x) @ plain.encode_text(ids).T,
                              **TOL)


def test_recall_by_hand_and_galleries():
    ids = torch.tensor([[5, 6], [7, 8], [5, 6], [9, 9]])  # texts 0 and 2 are the same caption
    sim = torch.tensor([[0.9, 0.3, 0.95, 0.0],  # retrieves text 2: the same caption, a hit
                        [0.0, 0.2, 0.9, 0.0],   # wrong
                        [0.8, 0.0, 0.1, 0.0],   # retrieves text 0: the same caption, a hit
                        [0.0, 0.0, 0.0, 1.0]])  # right
    r = B.recall_from_similarity(sim, ids, 1)
    assert r["i2t"] == pytest.approx(0.75)
    # t2i: text 0 -> image 0 (hit), text 1 -> image 0 (miss), text 2 -> image 0 (its caption: a hit), text 3 -> 3 (hit)
    assert r["t2i"] == pytest.approx(0.75)
    assert B.recall_from_similarity(sim, ids, 2)["t2i"] == pytest.approx(1.0)
    bus = _tiny_bus()
    out = B.gallery_recall(bus, _images(4), _ids(TEXTS + TEXTS[:1]), gallery=2, ks=(1, 2))
    assert set(out) == {"r1_i2t", "r1_t2i", "r2_i2t", "r2_t2i"} and out["r2_i2t"] == 1.0


def test_pair_similarity_matches_the_full_matrix():
    bus = _tiny_bus()
    x, ids = _images(3), _ids(TEXTS)
    full = B.pairwise_similarity(bus, x, ids)
    img = torch.tensor([2, 0, 1, 2, 2])
    txt = torch.tensor([0, 1, 1, 2, 1])
    assert torch.allclose(B.pair_similarity(bus, x, ids[txt], img, chunk=2), full[img, txt], **TOL)


def test_hard_negatives_by_hand():
    from vitlab.vlm.data import SceneObject, _caption

    one = (SceneObject("red", "circle", "small", "left"),)
    negs = B.hard_negatives(one)
    kinds = [k for _, k in negs]
    # 3 other colours, 1 other size, 3 other shapes, 4 other places; no swap with a single object
    assert {k: kinds.count(k) for k in set(kinds)} == {"colour": 3, "size": 1, "shape": 3, "position": 4}
    assert ("a large red circle on the left", "size") in negs and _caption(one) not in [c for c, _ in negs]
    two = (SceneObject("red", "circle", "small", "left"), SceneObject("red", "square", "large", "top"))
    negs = B.hard_negatives(two)
    swaps = [c for c, k in negs if k == "swap"]  # colours are equal: only size and place swap
    assert swaps == ["a large red circle on the left and a small red square at the top",
                     "a small red circle at the top and a large red square on the left"]
    shapes = [c for c, k in negs if k == "shape"]  # a shape already in the scene is not offered
    assert len(shapes) == 4 and not any("circle" in c.split(" and ")[1] for c in shapes)
    assert len({c for c, _ in negs}) == len(negs)


def test_hard_negative_accuracy_by_construction():
    from vitlab.vlm import caption_scenes

    data = caption_scenes("val", n=6)
    torch.manual_seed(0)
    out = B.hard_negative_accuracy(B.bus_clip(), data, per_kind=True)
    assert set(out) >= {"all", "chance", "colour", "size", "shape", "position"}
    assert 0 < out["chance"] < 0.1 and 0 <= out["all"] <= 1


def test_measure_on_a_few_scenes():
    torch.manual_seed(0)
    m = B.measure(B.bus_clip(), "val", n=20, gallery=10)
    assert {"r1_i2t", "r5_t2i", "zs_object", "hn_all", "hn_chance", "ptm_loss", "sel_recall"} <= set(m)
    assert 0 <= m["sel_recall"] <= 1 and m["ptm_loss"] > 0
    assert "sel_recall" not in B.measure(B.plain_clip(), "val", n=20, gallery=10)


# ------------------------------------------------------------------------------------------ the lesson's models
def test_builders_share_the_towers():
    torch.manual_seed(0)
    bus, plain = B.bus_clip(), B.plain_clip()
    enc = bus.image_encoder
    assert enc.select_at == 2 and enc.num_patches == 64 and enc.num_kept == 32 and enc.pad.num_queries == 8
    vit_keys = {k for k in plain.state_dict() if k.startswith("image_encoder.")}
    assert {k.replace("image_encoder.vit.", "image_encoder.") for k in bus.state_dict()
            if k.startswith("image_encoder.vit.")} == vit_keys  # the same ViT inside
    assert {k for k in bus.state_dict() if k.startswith("text_encoder.")} == \
        {k for k in plain.state_dict() if k.startswith("text_encoder.")}


def test_zoo_entries_are_equal_step_controls():
    from vitlab import zoo

    recipes = {(a, s): zoo.ZOO[B.entry_name(a, s)] for a in B.ARMS for s in B.SEEDS}
    for (a, s), r in recipes.items():
        assert r.model == B.model_name(a) and r.seed == s and r.objective == "bus_itc"
        assert r.shares == {"smoke": "cpu"} and r.data_seed == B.DATA_SEED
        other = recipes[("vit" if a == "bus" else "bus", s)]
        assert r.config("cpu") | {"model": None} == other.config("cpu") | {"model": None}
    for a in B.ARMS:
        long, base = zoo.ZOO[B.entry_name(a, 0, long=True)], recipes[(a, 0)]
        assert long.config("cpu")["fit"] == {**base.config("cpu")["fit"], "steps": B.LONG_STEPS["cpu"]}
    assert B.LONG_STEPS["cpu"] == 2 * B.STEPS["cpu"]


def test_pad_only_ablation_is_bus_keeping_every_patch():
    from vitlab import zoo
    from vitlab.models.registry import MODELS

    assert MODELS[B.model_name(B.PAD_ONLY)]["keep_ratio"] == 1.0
    for s in B.SEEDS:
        clip, bus = zoo.ZOO[B.ablation_entry_name(s)], zoo.ZOO[B.entry_name("bus", s)]
        assert clip.config("cpu") | {"model": None} == bus.config("cpu") | {"model": None}
        qa, bus_qa = zoo.ZOO[B.ablation_entry_name(s, qa=True)], zoo.ZOO[B.qa_entry_name("bus", s)]
        assert qa.init == B.ablation_entry_name(s) and bus_qa.init == B.entry_name("bus", s)
        assert {k: v for k, v in vars(qa).items() if k not in ("model", "init")} == \
            {k: v for k, v in vars(bus_qa).items() if k not in ("model", "init")}
    torch.manual_seed(0)
    enc = B.bus_clip(keep_ratio=1.0).image_encoder.eval()
    assert enc.num_kept == enc.num_patches  # every block sees every patch: only PAD's summary remains
    with pytest.raises(ValueError, match="seed must be one of"):
        B.ablation_entry_name(3)


def test_objective_steps():
    from vitlab import data, zoo

    obj = zoo.OBJECTIVES["bus_itc"](eval_every=100, val_n=20, val_gallery=10)
    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=32)
    idx = torch.arange(16)
    torch.manual_seed(0)
    losses = objective_losses(obj, B.bus_clip(), train.images[idx], idx, steps=4)
    assert losses[-1] < losses[0]
    obj = zoo.OBJECTIVES["bus_itc"](eval_every=100, val_n=20, val_gallery=10)
    losses = objective_losses(obj, B.plain_clip(), train.images[idx], idx, steps=4)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ the QA read-out
def test_with_eos_appends_after_the_prompt():
    prompts = torch.tensor([[7, 8, 9], [7, 8, 0]])
    assert B._with_eos(prompts).tolist() == [[7, 8, 9, 2], [7, 8, 2, 0]]


def test_qa_models_start_from_a_clip_frozen():
    torch.manual_seed(0)
    clip = B.bus_clip()
    qa = B.qa_model("bus")
    qa.start_from(clip)
    assert torch.equal(qa.vision_encoder.tsps.text_proj.weight, clip.image_encoder.tsps.text_proj.weight)
    assert torch.equal(qa.text_encoder.tok_emb.weight, clip.text_encoder.tok_emb.weight)
    assert not any(p.requires_grad for p in qa.vision_encoder.parameters())
    assert not any(p.requires_grad for p in qa.text_encoder.parameters())
    assert all(p.requires_grad for p in qa.lm.parameters())
    x = torch.rand(2, 3, 32, 32)
    prompt = WordTokenizer().batch_encode(["what colour is the circle", "where is the square"])[0]
    assert qa.visual_prefix(x, prompt).shape == (2, 8, 64)
    plain = B.qa_model("vit")
    plain.start_from(B.plain_clip())
    assert plain.visual_prefix(x).shape == (2, 64, 64) and plain.text_encoder is None
    with pytest.raises(TypeError, match="base"):
        plain.start_from(clip)
    with pytest.raises(TypeError, match="prompt_ids"):
        qa.visual_prefix(x)


def test_qa_prefix_reads_the_question_not_the_answer():
    """The objective hands TSPS the prompt with the answer blanked: two texts that differ only in the answer give the
    same visual tokens, two questions about different objects give different ones."""
    torch.manual_seed(0)
    qa = B.qa_model("bus").eval()
    tok = WordTokenizer()
    x = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    q = tok.batch_encode(["what colour is the circle", "what colour is the circle"])[0]
    a = tok.batch_encode(["red", "blue"], eos=True)[0]
    from vitlab.vlm import IGNORE, pack_answers

    text, labels = pack_answers(q, a)
    prompt = torch.where(labels == IGNORE, text, torch.zeros_like(text))
    with torch.no_grad():
        pre = qa.visual_prefix(x, prompt)
        assert torch.allclose(pre[0], pre[1])
        other = qa.visual_prefix(x, tok.batch_encode(["what colour is the circle", "what colour is the cross"])[0])
        assert not torch.allclose(other[0], other[1])
        assert torch.allclose(qa(x, text, prompt_ids=prompt)[:, 8:], qa(x, text, prompt_ids=q)[:, 8:], atol=1e-5)


def test_qa_objective_steps_and_generation():
    from vitlab import data, zoo
    from vitlab.vlm import answer_accuracy, caption_scenes

    train = data.load("vlm_caption_scenes", "train", "cpu", img_size=32)
    idx = torch.arange(16)
    for arm in B.ARMS:
        obj = zoo.OBJECTIVES["bus_qa"](kinds=["colour"], eval_every=100, val_n=10)
        torch.manual_seed(0)
        losses = objective_losses(obj, B.qa_model(arm), train.images[idx], idx, steps=4)
        assert losses[-1] < losses[0]
    acc = answer_accuracy(B.qa_model("bus"), caption_scenes("val", n=5), kinds=("colour",), per_kind=True)
    assert set(acc) == {"colour", "all"}
    r = zoo.ZOO[B.qa_entry_name("bus", 1)]
    assert r.init == B.entry_name("bus", 1) and r.objective == "bus_qa"
    assert r.config("cpu") | {"model": None} == zoo.ZOO[B.qa_entry_name("vit", 1)].config("cpu") | {"model": None}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(ValueError, match="keep_ratio"):
        B.TSPS(8, 8, keep_ratio=0.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        B.TSPS(8, 8, keep_ratio=1.5)
    with pytest.raises(TypeError, match="dim"):
        B.TSPS(8.0, 8)
    tsps = B.TSPS(8, 4)
    with pytest.raises(ValueError, match="keys"):
        tsps.logits(torch.randn(2, 5, 7), torch.randn(2, 4))
    with pytest.raises(ValueError, match="text"):
        tsps.logits(torch.randn(2, 5, 8), torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="keys"):
        tsps(torch.randn(2, 6, 8), torch.randn(2, 4, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_queries"):
        B.PatchAbstractionDecoder(8, num_queries=0)
    with pytest.raises(ValueError, match="context"):
        B.PatchAbstractionDecoder(8)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="select_at"):
        B.BUSVisionEncoder(tiny_vit(num_classes=0), 32, select_at=2)
    with pytest.raises(TypeError, match="CLS token"):
        B.BUSVisionEncoder(tiny_vit(num_classes=0, class_token=False, global_pool="avg"), 32)
    with pytest.raises(TypeError, match="image_encoder"):
        B.BUSCLIP(tiny_vit(num_classes=0), TextEncoder(len(WordTokenizer()), dim=32))
    with pytest.raises(ValueError, match="text_dim"):
        B.BUSCLIP(B.BUSVisionEncoder(tiny_vit(num_classes=0), 16), TextEncoder(len(WordTokenizer()), dim=32))
    bus = _tiny_bus()
    with pytest.raises(TypeError, match="text_ids"):
        bus.encode_image(_images(2))
    with pytest.raises(ValueError, match="pairs must align"):
        bus(_images(3), _ids(TEXTS[:2]))
    with pytest.raises(ValueError, match="img_size=16"):
        bus(_images(2, size=20), _ids(TEXTS[:2]))
    m = torch.zeros(1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="patch_size"):
        B.ptm_labels(m, 3)
    with pytest.raises(TypeError, match="masks"):
        B.ptm_labels(m.float(), 4)
    with pytest.raises(ValueError, match="min_cover"):
        B.ptm_labels(m, 4, min_cover=1.0)
    with pytest.raises(ValueError, match="slots"):
        B.ptm_labels(m, 4, slots=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        B.ptm_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(TypeError, match="model"):
        B.pairwise_similarity(torch.nn.Linear(2, 2), _images(2), _ids(TEXTS[:2]))
    with pytest.raises(ValueError, match="gallery"):
        B.gallery_recall(bus, _images(3), _ids(TEXTS), gallery=2)
    with pytest.raises(ValueError, match="sim"):
        B.recall_from_similarity(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="arm"):
        B.model_name("deit")
    with pytest.raises(ValueError, match="seed"):
        B.entry_name("bus", 3)
    with pytest.raises(ValueError, match="seed"):
        B.entry_name("vit", 1, long=True)
    with pytest.raises(ValueError, match="val_n"):
        B.itc_ptm_objective(val_n=30, val_gallery=20)
    with pytest.raises(TypeError, match="model"):
        B.measure(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_index"):
        B.pair_similarity(bus, _images(2), _ids(TEXTS[:2]), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="objects"):
        B.hard_negatives([])
    with pytest.raises(TypeError, match="data"):
        B.hard_negative_accuracy(bus, _images(2))
    with pytest.raises(ValueError, match="arm"):
        B.qa_model("deit")
    with pytest.raises(ValueError, match="kinds"):
        B.qa_objective(kinds=["colour", "weather"])
    with pytest.raises(TypeError, match="vision_encoder"):
        B.BUSQA(tiny_vit(num_classes=0), None, None, None)
    with pytest.raises(TypeError, match="block"):
        B.patch_keys(torch.nn.Linear(2, 2), torch.randn(1, 3, 2))
