"""TrajViT (official RAIVNLab/trajvit, entry/share_models/): trajectories from object-id maps, masked pooling, the
trajectory gather, boxes, the sinusoidal box code and the Perceiver's key padding by hand; the whole tokenizer and
encoder against numbers computed with the official ``VideoTokenViT`` (same weights, eager attention); ViT3D, the
zoo entries and objective, bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.model_helpers import assert_rejects_bad_images
from vitlab.methods.vision_language import trajvit as TV

# ------------------------------------------------------------------------------------------ numbers from the official
# code (RAIVNLab/trajvit at b866c5f, run outside the repo with transformers 4.49; ``ViTConfig.from_pretrained``
# patched to a tiny config with eager attention, the official PerceiverResampler / PosEncoder / CustomTransformer /
# encode_appearance_token as written, its appearance CNN swapped for ours, weights copied from the model
# ``_official_case`` builds). Max |official - ours| over the whole token sequence was 4.5e-6.
OFFICIAL_CLS = [
    [6.57377815246582, 12.603498458862305, 1.7521201372146606, -4.068904876708984, -7.522439002990723,
     -6.364880561828613, -2.0726234912872314, 0.053954124450683594, 0.05253636837005615, -6.219414710998535,
     9.129562377929688, 4.766755104064941, -2.706850290298462, 5.870850563049316, 6.143612384796143,
     9.430543899536133],
    [6.283013343811035, 12.30433464050293, 1.586931586265564, -4.069575309753418, -7.687439441680908,
     -6.28945255279541, -1.8996686935424805, 0.2287442684173584, -0.1793287992477417, -5.99650764465332,
     8.664708137512207, 4.731053829193115, -2.775214672088623, 5.939650535583496, 6.21992301940918,
     9.404136657714844]]
OFFICIAL_TOKEN_SUMS = [[10.049196243286133, 9.403963088989258, 13.364706993103027],
                       [10.031438827514648, 11.87106704711914, 10.392023086547852]]
# SinuPosEncoding(4, 8) of the coordinates (0, 0.25, 0.5, 1) and (-1, -1, -1, -1)
OFFICIAL_SINU = [[0.0, 1.0, 0.024997394531965256, 0.9999687671661377, 0.004999978933483362, 0.9999987483024597,
                  0.0009999998146668077, 0.9999999403953552],
                 [-0.8414709568023682, 0.950415313243866, -0.0998334139585495, 0.999500036239624,
                  -0.009999833069741726, 0.9999949932098389, -0.0009999998146668077, 0.9999999403953552]]


def _fill_(module, seed=0):
    """Every float parameter and buffer from a generator, in sorted state-dict order (as the official run did)."""
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    with torch.no_grad():
        for k in sorted(sd):
            t = sd[k]
            if not t.dtype.is_floating_point:
                continue
            if "running_var" in k:
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g) + (1.0 if k.endswith("weight") and t.ndim == 1 else 0.0))
    return module


def _official_case():
    """Two 4-frame 16-px videos: video 0 has the background, object 1 moving right and object 2 in frames 1-2 only;
    video 1 has the background and object 3 (ids need not be contiguous): 3 trajectories and a padding row."""
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 4, 3, 16, 16, generator=g)
    masks = torch.zeros(2, 4, 16, 16, dtype=torch.long)
    for t in range(4):
        masks[0, t, 2:8, 2 + 2 * t:8 + 2 * t] = 1
    masks[0, 1:3, 10:14, 10:14] = 2
    masks[1, :, 4:12, 4:10] = 3
    model = TV.TrajViT(img_size=16, num_frames=16, embed_dim=16, depth=2, num_heads=2, widths=(4, 8),
                       perceiver_depth=1, mask_down=2, encoder_passes=2)
    return _fill_(model).eval(), video, masks


# ------------------------------------------------------------------------------------------ hand checks
def test_video_trajectories_by_hand():
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    masks[0, :, 0, 0] = 3  # object 3 in every frame
    masks[0, 1, 3, 3] = 1  # object 1 only in frame 1; object 2 never: dropped
    segmask, graph = TV.video_trajectories(masks, down=1)
    # per frame, segments numbered in object order: background 1, then the objects present
    assert segmask[0, 0, 0, 0] == 2 and segmask[0, 0, 1, 1] == 1
    assert segmask[0, 1, 3, 3] == 2 and segmask[0, 1, 0, 0] == 3
    assert graph.tolist() == [[[1, 1, 1], [0, 2, 0], [2, 3, 2]]]  # background, object 1, object 3
    assert TV.num_trajectories(graph).tolist() == [3]
    _, fg = TV.video_trajectories(masks, down=1, background=False)
    assert fg.tolist() == [[[0, 1, 0], [1, 2, 1]]]
    # half resolution keeps every other pixel (nearest): object 1 at (3, 3) vanishes
    seg2, g2 = TV.video_trajectories(masks, down=2)
    assert seg2.shape == (1, 3, 2, 2) and g2.tolist() == [[[1, 1, 1], [2, 2, 2]]]
    # a batch pads the shorter video with zero rows
    two = torch.stack([masks[0], torch.zeros_like(masks[0])])
    assert TV.video_trajectories(two, down=1)[1][1].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_decompose_masks_and_masked_pooling_by_hand():
    seg = torch.tensor([[[[0, 1], [2, 2]]]])
    one = TV.decompose_masks(seg)
    assert one.shape == (1, 1, 3, 2, 2) and not one[0, 0, 0].any()  # channel 0 (no segment) is empty
    assert one[0, 0, 2].tolist() == [[False, False], [True, True]]
    # the official masked_pooling on features arange(18) [1,1,3,3,2]: segment 1 = row 0, segment 2 = pixel (2, 2)
    feat = torch.arange(18.0).view(1, 1, 3, 3, 2)
    m = torch.zeros(1, 1, 3, 3, 3, dtype=torch.bool)
    m[0, 0, 1, 0, :] = True
    m[0, 0, 2, 2, 2] = True
    assert TV.masked_pooling(feat, m).tolist() == [[[[0.0, 0.0], [2.0, 3.0], [16.0, 17.0]]]]


def test_gather_trajectories_by_hand():
    per_frame = torch.arange(2 * 3 * 1, dtype=torch.float32).view(1, 2, 3, 1)  # frame t, segment n -> 3 t + n
    graph = torch.tensor([[[1, 2], [0, 1], [2, 0]]])
    assert TV.gather_trajectories(per_frame, graph)[..., 0].tolist() == [[[1.0, 5.0], [0.0, 4.0], [2.0, 3.0]]]


def test_segment_boxes_and_sinusoid_match_the_official():
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[0, 1:3, 2] = True  # rows 1-2, column 2
    # official compute_bounding_boxes: (top, left, bottom, right) / 4, inclusive; the empty mask gives
    # (1, 1, -1/4, -1/4) (its -1 branch compares after normalising and never fires)
    assert TV.segment_boxes(m).tolist() == [[0.25, 0.5, 0.5, 0.5], [1.0, 1.0, -0.25, -0.25]]
    coords = torch.tensor([[0.0, 0.25, 0.5, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.allclose(TV.sinusoidal_coords(coords, 8), torch.tensor(OFFICIAL_SINU), atol=1e-6)
    # by hand: channel 2 is sin(0.25 * 10000^(-2/8)) = sin(0.025)
    assert abs(TV.sinusoidal_coords(coords, 8)[0, 2].item() - torch.sin(torch.tensor(0.025)).item()) < 1e-7


def test_resize_bilinear_is_interpolate():
    x = torch.randn(3, 4, 5, 6)
    for size in ((8, 10), (16, 16), (4, 5), (3, 2)):
        want = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(TV.resize_bilinear(x, size), want.permute(0, 2, 3, 1), atol=1e-6)


def test_perceiver_key_padding():
    torch.manual_seed(0)
    res = TV.PerceiverResampler(8, depth=2, heads=2, num_latents=1, max_seq_len=6).eval()
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    out = res(x, pad)
    y = x.clone()
    y[0, 3:] = 100 * torch.randn(2, 8)  # a padded frame changes nothing
    assert torch.allclose(res(y, pad), out, atol=1e-6)
    y[0, 1] += torch.randn(8)  # an unpadded one does (not a constant: LayerNorm removes that)
    assert not torch.allclose(res(y, pad)[0], out[0], atol=1e-3)
    # masking frames equals dropping them (same media positions for the rest)
    assert torch.allclose(res(x[:1, :3]), out[:1], atol=1e-6)
    # one layer by hand, one head: latents attend to [latents; x + pos], a residual, then LayerNorm
    one = TV.PerceiverResampler(4, depth=1, heads=1, num_latents=1, max_seq_len=3).eval()
    x = torch.randn(1, 3, 4)
    a = one.layers[0][0]
    lat = one.latents[None]
    xl, ll = a.norm_media(x + one.media_pos_emb), a.norm_latents(lat)
    k, v = a.to_kv(torch.cat([ll, xl], 1)).chunk(2, -1)
    w = (a.to_q(ll) @ k.transpose(1, 2) / 2.0).softmax(-1)
    assert torch.allclose(one(x), one.norm(a.to_out(w @ v) + lat), atol=1e-6)
    # a trajectory absent everywhere: the official unmasks its first 10 frames, so the output stays finite
    graph = torch.zeros(1, 1, 12, dtype=torch.long)
    kp = TV._key_padding(graph)
    assert kp[0, :10].logical_not().all() and kp[0, 10:].all()


def test_matches_the_official_video_token_vit():
    model, video, masks = _official_case()
    segmask, graph = TV.video_trajectories(masks, down=2)
    assert graph.tolist() == [[[1, 1, 1, 1], [2, 2, 2, 2], [0, 3, 3, 0]], [[1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]]]
    with torch.no_grad():
        out = model.forward_tokens(video, segmask, graph)
    assert out.shape == (2, 4, 16)
    assert torch.allclose(out[:, 0], torch.tensor(OFFICIAL_CLS), atol=1e-4)
    assert torch.allclose(out[:, 1:].sum(-1), torch.tensor(OFFICIAL_TOKEN_SUMS), atol=1e-4)
    # the padded trajectory of video 1 is masked: changing its graph row's token does not move the CLS
    with torch.no_grad():
        single = TV.TrajViT(img_size=16, num_frames=16, embed_dim=16, depth=2, num_heads=2, widths=(4, 8),
                            encoder_passes=1).eval()
        single.load_state_dict(model.state_dict())
        assert (single.forward_tokens(video, segmask, graph) - out).abs().max() > 1.0  # the double pass matters


def test_double_pass_is_the_blocks_twice():
    model, video, masks = _official_case()
    model.encoder_passes = 1
    with torch.no_grad():
        once = model.forward_tokens(video, *TV.video_trajectories(masks))
        valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
        bias = torch.zeros(2, 1, 1, 4).masked_fill(~valid[:, None, None], float("-inf"))
        twice = once
        for blk in model.blocks:
            twice = blk(twice, attn_bias=bias)
        model.encoder_passes = 2
        assert torch.allclose(model.forward_tokens(video, *TV.video_trajectories(masks)), twice, atol=1e-5)


def test_tokens_per_video_is_the_number_of_trajectories():
    from vitlab.vlm import moving_shapes_videos

    v = moving_shapes_videos("val", n=16)
    x = TV.pack_videos(v.images, v.masks)
    torch.manual_seed(0)
    model = TV.TrajViT().eval()
    n = TV.tokens_per_video(model, x)
    seen = torch.tensor([len(torch.unique(m[:, ::2, ::2])) for m in v.masks])  # background + objects seen
    assert n.tolist() == seen.tolist() and set(n.tolist()) <= {2, 3, 4}
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert tokens.shape == (16, 1 + int(n.max()), 64) and model(x).shape == (16, 64)
    assert TV.tokens_per_video(TV.ViT3D(), x).tolist() == [256] * 16
    # pack / unpack round trip
    video, ids = TV.unpack_videos(x, 8)
    assert torch.equal(video, v.images) and torch.equal(ids, v.masks.long())


def test_vit3d_tubelets_and_position_table():
    torch.manual_seed(0)
    m = TV.ViT3D(img_size=32, num_frames=8, tubelet_size=2, patch_size=4, embed_dim=64, depth=1).eval()
    assert m.num_patches == 4 * 8 * 8
    table = m.positional_embeddings_3d[0]
    assert table.shape == (1 + 256, 64)
    assert torch.equal(table[1:65], table[65:129])  # at init the 2-D table is repeated over time
    video = torch.rand(2, 8, 3, 32, 32)
    with torch.no_grad():
        tokens = m.forward_video(video)
        # official: patch tokens get rows 0..N-1 of the table (its CLS slot included), the CLS token no position
        x = m.patch_embed_3d(video.transpose(1, 2)).flatten(2).transpose(1, 2) + table[:256]
        want = m.blocks[0](torch.cat([m.cls_token.expand(2, -1, -1), x], 1))
    assert torch.allclose(tokens, want, atol=1e-5)


def test_forward_backward_and_parameters_matched():
    from vitlab import measure

    clips = {arm: TV.clip_model(arm) for arm in TV.ARMS}
    p = {arm: measure.count_params(c.image_encoder) for arm, c in clips.items()}
    assert abs(p["traj"] - p["vit3d"]) <= 0.15 * p["vit3d"]  # 56 k vs 62 k at width 32
    x = TV.pack_videos(torch.rand(4, 8, 3, 32, 32), torch.randint(0, 3, (4, 8, 32, 32)))
    ids = torch.randint(4, 20, (4, 6))
    for clip in clips.values():
        loss = clip.loss(x, ids)
        loss.backward()
        enc = clip.image_encoder
        assert torch.isfinite(loss) and all(q.grad is not None for q in enc.parameters() if q.requires_grad)


def test_bad_input():
    torch.manual_seed(0)
    model = TV.TrajViT()
    assert_rejects_bad_images(model, 32, 32)
    assert_rejects_bad_images(TV.ViT3D(), 32, 32)
    with pytest.raises(ValueError, match="videos"):
        TV.pack_videos(torch.rand(2, 3, 32, 32), torch.zeros(2, 8, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="masks"):
        TV.pack_videos(torch.rand(2, 8, 3, 32, 32), torch.zeros(2, 8, 32, 32))
    with pytest.raises(ValueError, match="num_frames"):
        TV.unpack_videos(torch.rand(2, 12, 8, 8), 4)
    with pytest.raises(TypeError, match="masks"):
        TV.video_trajectories(torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="down"):
        TV.video_trajectories(torch.zeros(1, 2, 5, 5, dtype=torch.long), down=2)
    with pytest.raises(ValueError, match="masks"):
        TV.video_trajectories(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="video_graph ids"):
        TV.gather_trajectories(torch.rand(1, 2, 3, 4), torch.full((1, 1, 2), 3))
    with pytest.raises(ValueError, match="masks"):
        TV.masked_pooling(torch.rand(1, 2, 4, 4, 8), torch.ones(1, 2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim"):
        TV.sinusoidal_coords(torch.rand(3, 4), 10)
    with pytest.raises(ValueError, match="padding_mask"):
        TV.PerceiverResampler(8)(torch.rand(2, 3, 8), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_down"):
        TV.TrajViT(mask_down=4)
    with pytest.raises(ValueError, match="num_classes"):
        TV.TrajViT(num_classes=10)
    with pytest.raises(ValueError, match="tubelet_size"):
        TV.ViT3D(num_frames=7)
    with pytest.raises(ValueError, match="arm"):
        TV.clip_model("vit")
    with pytest.raises(ValueError, match="in_chans"):
        TV.clip_model("traj", in_chans=30)
    with pytest.raises(TypeError, match="TrajViT or ViT3D"):
        TV.tokens_per_video(torch.nn.Linear(2, 2), torch.rand(1, 32, 32, 32))
    with pytest.raises(TypeError, match="TinyCLIP"):
        TV.measure(model)


def test_retrieval_agreement_and_trajectory_probe():
    from vitlab.vlm import moving_shapes_videos

    torch.manual_seed(0)
    clip = TV.clip_model("traj")
    v = moving_shapes_videos("val", n=16)
    a = TV.retrieval_agreement(clip, v)
    assert set(a) == {"caption", "count", "colours", "shapes", "sizes", "motions"}
    assert all(0 <= x <= 1 for x in a.values()) and a["caption"] <= a["colours"]
    p = TV.trajectory_probe(clip, n_train=16, n_test=8)
    assert set(p) == {f"{k}_{t}" for k in ("appearance", "position") for t in TV.PROBE_TARGETS}
    with pytest.raises(TypeError, match="MovingShapes"):
        TV.retrieval_agreement(clip, TV.pack_videos(v.images, v.masks))
    with pytest.raises(TypeError, match="TrajViT"):
        TV.trajectory_probe(TV.clip_model("vit3d"))
    with pytest.raises(ValueError, match="n_train"):
        TV.trajectory_probe(clip, n_train=2)


# ------------------------------------------------------------------------------------------ the lesson's zoo
def test_zoo_entries_are_equal_step_controls():
    from vitlab import data, zoo

    assert data.DATASETS["vlm_moving_shapes"] is TV.moving_shapes_dataset
    recipes = {(a, s): zoo.ZOO[TV.entry_name(a, s)] for a in TV.ARMS for s in TV.SEEDS}
    for (a, s), r in recipes.items():
        assert r.model == TV.model_name(a) and r.seed == s and r.objective == "trajvit_clip"
        assert r.shares == {"smoke": "cpu"} and r.data_seed == TV.DATA_SEED
        other = recipes[("vit3d" if a == "traj" else "traj", s)]
        assert r.config("cpu") | {"model": None} == other.config("cpu") | {"model": None}
    for a in TV.ARMS:
        long, base = zoo.ZOO[TV.entry_name(a, 0, long=True)], recipes[(a, 0)]
        assert long.config("cpu")["fit"] == {**base.config("cpu")["fit"], "steps": TV.LONG_STEPS["cpu"]}
    assert TV.LONG_STEPS["cpu"] == 2 * TV.STEPS["cpu"]
    assert TV.entry_name("traj", 1) == "ch7_trajvit_traj_s1"
    with pytest.raises(ValueError, match="seed"):
        TV.entry_name("traj", len(TV.SEEDS))
    with pytest.raises(ValueError, match="seed"):
        TV.entry_name("vit3d", 1, long=True)
    with pytest.raises(ValueError, match="arm"):
        TV.model_name("deit")
    ds = data.load("vlm_moving_shapes", "val", "cpu")
    assert ds.images.shape == (200, 32, 32, 32) and ds.labels.tolist() == list(range(200))


def test_clip_objective_steps_and_curve():
    from vitlab import data, zoo

    obj = zoo.OBJECTIVES["trajvit_clip"](data_seed=0, eval_every=2)
    train = data.load("vlm_moving_shapes", "train", "cpu")
    torch.manual_seed(0)
    clip = TV.clip_model("traj")
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    idx = torch.arange(16)
    losses = []
    for _ in range(3):
        loss, logits = obj.step_fn(clip, train.images[idx], idx)
        assert logits is None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    m = TV.measure(clip.eval(), "test", n=32)
    assert {"r1_i2t", "r1_t2i", "r5_i2t", "r5_t2i", "tokens"} == set(m) and 2 <= m["tokens"] <= 4
    assert 0 <= m["r1_i2t"] <= m["r5_i2t"] <= 1
    out = obj.metrics(clip.eval(), train, None, None)
    assert out["val_curve_step"] == [0, 2, 3] and len(out["val_curve_r1"]) == 3
    assert {"test_r1_i2t", "test_r5_t2i", "val_r1_t2i", "test_tokens", "logit_scale"} <= set(out)
