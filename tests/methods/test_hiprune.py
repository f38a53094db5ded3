"""HiPrune (vitlab.methods.vision_language.hiprune): the official selection (extracted from the official
``encode_images``) against ours on N = 576, hand-checked anchors / buffers / registers, the generalised grid and its
wrap-around quirk, the baselines, the pruned TinyVLM and the bad inputs."""
import pytest
import torch

from vitlab.methods.vision_language import hiprune as H
from vitlab.models import VisionTransformer
from vitlab.vlm import TinyLM, TinyVLM, VisionProjector, WordTokenizer, answer_accuracy, caption_scenes


# ------------------------------------------------------------------------------------------ the official code
def official_selection(all_image_attentions, N, B, retention, alpha, object_layer, select_layer):
    """Danielement321/HiPrune ``LLaVA/llava/model/llava_arch.py`` ``encode_images``, the selection, line for line:
    the environment variables HIPRUNE_RETENTION / HIPRUNE_ALPHA / HIPRUNE_OBJECT_LAYER and
    ``self.config.mm_vision_select_layer`` are arguments, ``.cuda()`` is removed, ``image_features`` gives only N and B
    (and the device), and the projector is left out. Returns the index masks [B, N]."""
    device = all_image_attentions[0].device
    visual_token_num = int(int(retention) / B)
    deep_attention = all_image_attentions[select_layer]
    deep_attention = deep_attention.mean(dim=1).mean(dim=1)[:, 1:]  # Global attention
    shallow_attention = all_image_attentions[int(object_layer) - 1]
    shallow_attention = shallow_attention.mean(dim=1).mean(dim=1)[:, 1:]  # Global attention
    shallow_token_num = round(visual_token_num * float(alpha) / 5)

    index_masks = []
    for i in range(B):
        shallow_token_indices = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
        shallow_token_indices = torch.cat([shallow_token_indices,
                                           shallow_token_indices - 1,
                                           shallow_token_indices + 1,
                                           shallow_token_indices - 24,
                                           shallow_token_indices + 24], dim=1)  # (B, T * 5)
        shallow_token_indices = shallow_token_indices.clamp(0, 575)
        shallow_token_indices = torch.unique(shallow_token_indices, sorted=False).unsqueeze(0)
        deep_token_num = visual_token_num - shallow_token_indices.shape[1]

        available_index_mask = torch.zeros(1, N, dtype=torch.bool, device=device)  # (B, N)
        available_index_mask.scatter_(1, shallow_token_indices, 1)

        deep_attention[i] -= available_index_mask.int().squeeze()

        deep_token_indices = torch.topk(deep_attention[i].unsqueeze(0), k=deep_token_num, dim=1)[1]  # (B, T)
        token_indices = torch.cat([shallow_token_indices, deep_token_indices], dim=1)
        token_indices = torch.sort(token_indices, dim=1)[0]  # (B, T)

        index_mask = torch.zeros(1, N, dtype=torch.bool, device=device)  # (B, N)
        index_mask.scatter_(1, token_indices, True)  # (B, N)
        index_masks.append(index_mask)

    return torch.cat(index_masks, dim=0)


def _clip_attentions(seed: int, batch: int = 2, heads: int = 2, depth: int = 24, distinct=(8, 22)):
    """CLIP-L-shaped attentions (577 = CLS + 24 x 24): softmax of random logits with a few peaked keys, for the
    layers the selection reads (the rest share one tensor: they are never read)."""
    g = torch.Generator().manual_seed(seed)

    def layer():
        logits = torch.randn(batch, heads, 577, 577, generator=g)
        logits += 3 * torch.rand(batch, 1, 1, 577, generator=g) ** 4  # some keys draw attention from every query
        return logits.softmax(dim=-1)

    filler = layer()
    return [layer() if i in distinct else filler for i in range(depth)]


def _ours(attns, retention, alpha, object_layer=9, select_layer=-2):
    score = lambda a: a.mean(dim=1).mean(dim=1)[:, 1:]  # noqa: E731  (what attention_scores gives per layer)
    idx = H.hiprune_select(score(attns[object_layer - 1]), score(attns[select_layer]), retention, (24, 24),
                           alpha=alpha)
    return torch.zeros(idx.shape[0], 576, dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.parametrize("retention,alpha,seed", [(192, 0.1, 0), (64, 0.1, 1), (192, 0.5, 2), (64, 0.9, 3),
                                                  (128, 0.3, 4), (576 // 9, 0.5, 5), (300, 0.1, 6)])
def test_matches_official_selection_n576(retention, alpha, seed):
    attns = _clip_attentions(seed)
    official = official_selection(attns, 576, 1, retention, alpha, 9, -2)  # B = 1 (one image per call)
    official = torch.cat([official, official_selection([a[1:] for a in attns], 576, 1, retention, alpha, 9, -2)])
    ours = _ours(attns, retention, alpha)
    assert ours.sum(dim=1).tolist() == [retention] * 2
    assert torch.equal(ours, official)


def test_official_batch_and_object_layer_variants():
    attns = _clip_attentions(7, batch=3, distinct=(3, 8, 22, 23))
    for object_layer, select_layer in ((9, -2), (4, -1), (24, -2)):
        official = official_selection(attns, 576, 3, 3 * 96, 0.5, object_layer, select_layer)  # retention / B
        assert torch.equal(_ours(attns, 96, 0.5, object_layer, select_layer), official)


def test_too_many_anchors_fails_like_the_official():
    # alpha = 1 at 24 tokens: 5 anchors, up to 25 tokens with their buffers; fewer where they touch or clamp
    failed = 0
    for seed in range(4):
        attns = _clip_attentions(10 + seed)
        try:
            official = official_selection(attns, 576, 1, 24, 1.0, 9, -2)
        except RuntimeError:  # the official: topk with k < 0
            failed += 1
            with pytest.raises(ValueError, match="alpha"):
                _ours([a[:1] for a in attns], 24, 1.0)
        else:
            assert torch.equal(_ours([a[:1] for a in attns], 24, 1.0), official)
    assert failed


# ------------------------------------------------------------------------------------------ hand-checkable cases
def test_anchor_buffer_register_by_hand():
    obj = torch.full((1, 16), 0.01)
    obj[0, 5] = 0.5  # the anchor: round(8 * 0.5 / 5) = 1 anchor
    deep = torch.arange(16, dtype=torch.float32)[None] * 1e-3
    for j, v in {5: 0.9, 0: 0.8, 15: 0.7, 9: 0.6, 10: 0.5, 3: 0.4}.items():
        deep[0, j] = v
    idx, kinds = H.hiprune_select(obj, deep, 8, (4, 4), alpha=0.5, return_kinds=True)
    # anchor 5 (row 1, col 1); buffers 4, 6, 1, 9; registers: the 3 best of deep outside those: 0, 15, 10
    assert idx.tolist() == [[0, 1, 4, 5, 6, 9, 10, 15]]
    assert {j: int(k) for j, k in enumerate(kinds[0]) if k} == {5: 1, 1: 2, 4: 2, 6: 2, 9: 2, 0: 3, 10: 3, 15: 3}
    # the paper's alpha gives no anchor at this budget: HiPrune is the deep top-k
    assert H.anchor_count(8, 0.1) == 0
    assert H.hiprune_select(obj, deep, 8, (4, 4)).tolist() == H.topk_select(deep, 8).tolist()


def test_buffers_wrap_quirk_and_the_2d_neighbourhood():
    a = torch.tensor([[7, 2, 13]])  # on 4 x 4: right end of row 1, top row, bottom row
    cand = H.buffer_candidates(a, (4, 4), wrap=True).view(5, 3).T.tolist()
    assert cand == [[7, 6, 8, 3, 11], [2, 1, 3, 0, 6], [13, 12, 14, 9, 15]]  # 8: next row; 0 and 15: clamped
    cand = H.buffer_candidates(a, (4, 4), wrap=False).view(5, 3).T.tolist()
    assert cand == [[7, 6, 7, 3, 11], [2, 1, 3, 2, 6], [13, 12, 14, 9, 13]]  # missing neighbours -> the anchor
    deep = torch.linspace(1, 0, 16)[None]  # registers prefer low indices
    obj = torch.zeros(1, 16)
    obj[0, 7] = 1
    assert H.hiprune_select(obj, deep, 6, (4, 4), alpha=1.0).tolist() == [[0, 3, 6, 7, 8, 11]]
    assert H.hiprune_select(obj, deep, 6, (4, 4), alpha=1.0, wrap=False).tolist() == [[0, 1, 3, 6, 7, 11]]


def test_generalised_grid():
    # a 3 x 5 grid (w = 5): anchor 9 is the end of row 1; its +1 is token 10, the start of row 2
    obj = torch.zeros(1, 15)
    obj[0, 9] = 1
    deep = torch.linspace(0, 1, 15)[None]  # registers prefer high indices
    assert H.hiprune_select(obj, deep, 7, (3, 5), alpha=0.8).tolist() == [[4, 8, 9, 10, 12, 13, 14]]
    assert H.hiprune_select(obj, deep, 7, (3, 5), alpha=0.8, wrap=False).tolist() == [[4, 8, 9, 11, 12, 13, 14]]
    # grid (24, 24) is the official's hard-coded one: same candidates as its arithmetic
    a = torch.randint(0, 576, (3, 4), generator=torch.Generator().manual_seed(0))
    official = torch.cat([a, a - 1, a + 1, a - 24, a + 24], dim=1).clamp(0, 575)
    assert torch.equal(H.buffer_candidates(a, (24, 24)), official)


@pytest.mark.parametrize("num_keep", [1, 4, 7, 11, 16, 21, 32, 48, 63, 64])
def test_every_method_keeps_exactly_the_budget(num_keep):
    g = torch.Generator().manual_seed(num_keep)
    scores = torch.rand(5, 4, 64, generator=g).softmax(-1)
    for method in H.METHODS:
        for alpha in (0.1, 0.5):
            try:
                idx = H.select(method, scores, num_keep, (8, 8), alpha=alpha, generator=g)
            except ValueError as e:  # alpha = 0.5 at num_keep 4: 1 anchor, up to 5 tokens > 4
                assert "alpha" in str(e) and method == "hiprune"
                continue
            assert idx.shape == (5, num_keep)
            assert all(len(set(r)) == num_keep and r == sorted(r) for r in idx.tolist())
            if num_keep == 64:
                assert idx.tolist() == [list(range(64))] * 5


def test_uniform_and_random_by_hand():
    assert H.uniform_select((8, 8), 4).tolist() == [18, 22, 50, 54]
    assert H.uniform_select((8, 8), 16).tolist() == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert H.uniform_select((8, 8), 64).tolist() == list(range(64))
    assert H.uniform_select((2, 8), 6).tolist() == [1, 4, 6, 9, 12, 14]  # 2 x 3 lattice: columns at 8/3 (j + 1/2)
    a = H.random_select(3, 64, 7, torch.Generator().manual_seed(1))
    assert torch.equal(a, H.random_select(3, 64, 7, torch.Generator().manual_seed(1)))
    assert a.shape == (3, 7) and not torch.equal(a[0], a[1])


def test_object_layer_mapping_and_anchor_count():
    assert H.object_layer_for(24) == 9 and H.object_layer_for(4) == 2 and H.object_layer_for(12) == 5
    assert H.object_layer_for(1) == 1
    assert [H.anchor_count(n) for n in (7, 21, 32, 64, 192)] == [0, 0, 1, 1, 4]  # the paper's alpha = 0.1


def test_object_coverage_by_hand():
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, 1:3, 1:3] = 1  # object 1 in patch 0 (top left)
    masks[0, 6, 7] = 2  # object 2: one pixel of patch 3 (bottom right)
    cov = H.object_coverage(masks, torch.tensor([[0, 1]]), 4)
    assert cov == {"on_object": 0.5, "base_rate": 0.5, "objects_hit": 0.5}
    assert H.object_coverage(masks, torch.tensor([[0, 3]]), 4)["objects_hit"] == 1.0


def test_dispersion_by_hand():
    assert H.dispersion(torch.tensor([[0, 3]]), (2, 2)) == pytest.approx(2 ** 0.5)  # opposite corners
    assert H.dispersion(torch.tensor([[0, 1, 2]]), (1, 3)) == pytest.approx((1 + 2 + 1) / 3)
    with pytest.raises(ValueError, match="idx"):
        H.dispersion(torch.tensor([[0]]), (2, 2))


# ------------------------------------------------------------------------------------------ the pruned TinyVLM
def _vlm(seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=0, embed_dim=32, depth=4, num_heads=2,
                            class_token=False, global_pool="avg")
    return TinyVLM(vit, VisionProjector(32, 32), TinyLM(len(WordTokenizer()), dim=32, depth=1, num_heads=2)).eval()


def test_attention_scores_are_the_forward_and_the_official_score():
    vlm = _vlm()
    x = caption_scenes("test", n=4).images
    feats, scores = H.attention_scores(vlm.vision_encoder, x)
    torch.testing.assert_close(feats, vlm.encode_images(x), atol=1e-5, rtol=1e-5)
    assert scores.shape == (4, 4, 64)
    torch.testing.assert_close(scores.sum(-1), torch.ones(4, 4))  # attention received, averaged: sums to 1
    _, sides = vlm.vision_encoder(x, side=("probs",))
    official = sides[1]["probs"].mean(dim=1).mean(dim=1)  # no CLS column to drop
    torch.testing.assert_close(scores[:, 1], official)


def test_pruned_forward_with_all_tokens_is_the_unpruned_vlm():
    vlm = _vlm()
    tok = WordTokenizer()
    x = caption_scenes("test", n=3).images
    text = torch.tensor([tok.encode("what colour is the circle")] * 3)
    for method in H.METHODS:
        pruned = H.PrunedVLM(vlm, method, 64).eval()
        torch.testing.assert_close(pruned(x, text), vlm(x, text), atol=1e-5, rtol=1e-5)
    out = H.PrunedVLM(vlm, "hiprune", 7, alpha=0.5)(x, text)
    assert out.shape[1] == 7 + text.shape[1]


def test_cached_tokens_give_the_pruned_vlm_answers():
    vlm = _vlm(1)
    data = caption_scenes("test", n=24)
    tokens, scores = H.encode_scenes(vlm, data.images, batch_size=10)
    assert tokens.shape == (24, 64, 32) and scores.shape == (24, 4, 64)
    idx = H.select("hiprune", scores, 11, (8, 8), alpha=0.5)
    pruned = H.PrunedVLM(vlm, "hiprune", 11, alpha=0.5)
    assert torch.equal(pruned.select_tokens(data.images)[1], idx)
    kept = tokens.gather(1, idx[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(pruned.visual_prefix(data.images), kept + vlm.lm.pos_emb[0][idx], atol=1e-5, rtol=1e-5)
    kinds = ("colour", "size")
    assert H.kept_accuracy(vlm, data, tokens, idx, kinds=kinds) == answer_accuracy(pruned, data, kinds=kinds)
    contiguous = H.PrunedVLM(vlm, "hiprune", 11, alpha=0.5, positions="contiguous")
    torch.testing.assert_close(contiguous.visual_prefix(data.images), kept, atol=1e-5, rtol=1e-5)
    assert H.kept_accuracy(vlm, data, tokens, idx, kinds=kinds, positions="contiguous") == \
        answer_accuracy(contiguous, data, kinds=kinds)


def test_kept_positions_generate_like_the_unpruned_lm():
    # every token kept: KeptPositionLM's prefill and each cached step are the TinyLM's own
    from vitlab.vlm import KVCache

    vlm = _vlm(2)
    x = caption_scenes("test", n=2).images
    ids = torch.tensor([WordTokenizer().encode("what colour is the circle")] * 2)
    pruned = H.PrunedVLM(vlm, "deep_topk", 64)
    assert isinstance(pruned.lm, H.KeptPositionLM) and pruned.lm.pos_emb is vlm.lm.pos_emb
    assert torch.equal(pruned.generate(x, ids, 4), vlm.generate(x, ids, 4))
    a, b = KVCache(), KVCache()
    pruned.lm(ids, prefix_embeds=pruned.visual_prefix(x), kv_cache=a)
    vlm.lm(ids, prefix_embeds=vlm.visual_prefix(x), kv_cache=b)
    step = ids[:, :1]
    torch.testing.assert_close(pruned.lm(step, kv_cache=a), vlm.lm(step, kv_cache=b), atol=1e-5, rtol=1e-5)
    # 7 kept tokens (carrying their positions already): the text sits at positions 64.., its trained place
    lm = H.KeptPositionLM(vlm.lm, 64)
    vis = torch.zeros(1, 7, 32)
    with torch.no_grad():
        out = lm(ids[:1], prefix_embeds=vis)
        pos, T = vlm.lm.pos_emb, ids.shape[1]  # TinyLM adds pos rows 0..7+T-1: take them back out, put 64.. in
        ref = vlm.lm(prefix_embeds=torch.cat([vis - pos[:, :7], vlm.lm.tok_emb(ids[:1]) + pos[:, 64:64 + T]
                                              - pos[:, 7:7 + T]], dim=1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lm_prefill_costs_fall_with_tokens():
    from vitlab import measure

    vlm = _vlm()
    pre = H.LMPrefill(vlm.lm)
    ids = torch.tensor([WordTokenizer().encode("what size is the square")])
    macs = [measure.macs(pre, (torch.zeros(1, k, 32), ids)) for k in (7, 21, 64)]
    assert macs[0] < macs[1] < macs[2]


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_argument():
    s = torch.rand(2, 16)
    with pytest.raises(ValueError, match="num_keep"):
        H.hiprune_select(s, s, 0, (4, 4))
    with pytest.raises(ValueError, match="num_keep"):
        H.hiprune_select(s, s, 17, (4, 4))
    with pytest.raises(ValueError, match="grid"):
        H.hiprune_select(s, s, 4, (4, 5))
    with pytest.raises(ValueError, match="alpha"):
        H.hiprune_select(s, s, 4, (4, 4), alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        H.hiprune_select(s, s, 8, (4, 4), alpha=4.0)  # 6 anchors: more than 8 tokens with their buffers
    with pytest.raises(ValueError, match="object_scores"):
        H.hiprune_select(s[0], s, 4, (4, 4))
    with pytest.raises(ValueError, match="must have one shape"):
        H.hiprune_select(s[:1], s, 4, (4, 4))
    with pytest.raises(TypeError, match="deep_scores"):
        H.hiprune_select(s, (s * 10).long(), 4, (4, 4))
    with pytest.raises(ValueError, match="method"):
        H.select("cls", s[:, None], 4, (4, 4))
    with pytest.raises(ValueError, match="deep_layer"):
        H.select("deep_topk", s[:, None], 4, (4, 4), deep_layer=3)
    with pytest.raises(ValueError, match="object_layer"):
        H.select("hiprune", s[:, None], 4, (4, 4), object_layer=2)
    with pytest.raises(ValueError, match="anchors"):
        H.buffer_candidates(torch.tensor([[16]]), (4, 4))
    with pytest.raises(TypeError, match="generator"):
        H.random_select(2, 16, 4, generator=0)
    with pytest.raises(ValueError, match="num_keep"):
        H.uniform_select((4, 4), 17)
    with pytest.raises(ValueError, match="depth"):
        H.object_layer_for(0)
    with pytest.raises(ValueError, match="patch_size"):
        H.object_coverage(torch.zeros(1, 8, 8), torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="vlm"):
        H.PrunedVLM(torch.nn.Linear(2, 2))
    vlm = _vlm()
    with pytest.raises(ValueError, match="num_keep"):
        H.PrunedVLM(vlm, "random", 65)
    with pytest.raises(ValueError, match="method"):
        H.PrunedVLM(vlm, "tome", 8)
    with pytest.raises(TypeError, match="vit"):
        H.attention_scores(torch.nn.Linear(2, 2), torch.zeros(1, 3, 32, 32))
    from vitlab.methods.vision_language import llava_uhd_v3 as U

    with pytest.raises(ValueError, match="merge"):
        H.attention_scores(U.uhd_encoder("rpe_wtc"), torch.zeros(1, 3, 32, 32))
    data = caption_scenes("test", n=4)
    with pytest.raises(ValueError, match="tokens"):
        H.kept_accuracy(vlm, data, torch.zeros(3, 64, 32), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        H.kept_accuracy(vlm, data, torch.zeros(4, 64, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="lm"):
        H.LMPrefill(vlm)
    with pytest.raises(ValueError, match="positions"):
        H.PrunedVLM(vlm, "random", 8, positions="rope")
    with pytest.raises(TypeError, match="lm"):
        H.KeptPositionLM(vlm, 64)
    with pytest.raises(ValueError, match="kv_cache"):
        H.KeptPositionLM(vlm.lm, 64)(torch.zeros(1, 3, dtype=torch.long))
    from vitlab.vlm import KVCache

    cache, vis = KVCache(), torch.zeros(1, 7, vlm.lm.dim)
    H.KeptPositionLM(vlm.lm, 64)(torch.zeros(1, 3, dtype=torch.long), prefix_embeds=vis, kv_cache=cache)
    with pytest.raises(ValueError, match="prefix_embeds must come first"):
        H.KeptPositionLM(vlm.lm, 64)(prefix_embeds=vis, kv_cache=cache)
    with pytest.raises(ValueError, match=r"KeptPositionLM: prefix_embeds must be \[B, P, 32\]"):
        H.KeptPositionLM(vlm.lm, 64)(prefix_embeds=torch.zeros(1, 7, 5))
