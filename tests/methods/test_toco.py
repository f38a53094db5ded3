"""ToCo (official rulixiang/ToCo, model/model_seg_neg.py, model/losses.py, utils/camutils.py; not installed): PTC,
thresholds, crop rules and CTC (with the official's always-added term) on cases worked by hand, the network against
the course ViT run by hand, multi-scale CAMs, a few training steps, the EMA teacher, the measures and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.model_helpers import tiny_vit
from vitlab.methods.robustness import toco as T

R2 = math.sqrt(2.0)


def _images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _net(depth=4, seed=0, **kw):
    return T.ToCoNet(tiny_vit(seed, depth=depth), **kw)


# ------------------------------------------------------------------------------------------------ PTC
def test_ptc_loss_by_hand():
    """Tokens F0 = (1, 0), F1 = (1, 1), F2 = (-1, 1), F3 ignored; labels 1, 1, 0, ignore. Positive pairs (0,1), (1,0):
    |cos| = 1/sqrt2 each; negatives (0,2), (2,0): |-1/sqrt2|, (1,2), (2,1): 0. The diagonal and token 3 are out:
    L = 0.5 (1 - sqrt2 / 3) + 0.5 sqrt2 / 5."""
    labels = torch.tensor([[1, 1, 0, T.IGNORE]])
    aff = T.label_to_aff_mask(labels)
    I = T.IGNORE
    assert aff[0].tolist() == [[I, 1, 0, I], [1, I, 0, I], [0, 0, I, I], [I, I, I, I]]
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [0.3, 0.7]]])
    want = 0.5 * (1 - R2 / 3) + 0.5 * R2 / 5
    assert T.ptc_loss(tokens, aff).item() == pytest.approx(want, abs=1e-6)
    tokens[0, 3] = torch.tensor([-5.0, 2.0])  # the ignored token does not count
    assert T.ptc_loss(tokens, aff).item() == pytest.approx(want, abs=1e-6)
    # a [B, h, w] label map gives the same mask as its flattened [B, N]
    assert torch.equal(T.label_to_aff_mask(labels.reshape(1, 2, 2)), aff)


def test_cam_thresholds_by_hand():
    """Top CAM among the image's classes: class if > bkg; pseudo mode: class if > 0.7, ignore in (0.25, 0.7],
    background <= 0.25. roi: 0 if <= 0.25, 2 if >= 0.7: a CAM of exactly 0.7 is 'ignore' but 'confident'."""
    cam = torch.tensor([[[[0.9, 0.6, 0.3, 0.1, 0.25, 0.1]],
                         [[0.2, 0.8, 0.7, 0.05, 0.1, 0.71]]]])  # [1, 2, 1, 6]
    both = torch.tensor([[1.0, 1.0]])
    I = T.IGNORE
    assert T.cam_to_label(cam, both).tolist() == [[[1, 2, 2, 0, 0, 2]]]
    assert T.cam_to_label(cam, both, 0.5, 0.7, 0.25).tolist() == [[[1, 2, I, 0, 0, 2]]]
    # class 1 is not in the image: its CAM is masked out; indices [B] work as one-hot targets
    assert T.cam_to_label(cam, torch.tensor([0])).tolist() == [[[1, 1, 0, 0, 0, 0]]]
    assert T.cam_to_roi(cam, both).tolist() == [[[2, 2, 2, 0, 0, 2]]]
    assert T.cam_to_roi(cam, torch.tensor([0])).tolist() == [[[2, 1, 1, 0, 0, 0]]]
    # PTC's token labels: the CAM resized to the grid first (here the same size: no change)
    assert torch.equal(T.token_pseudo_labels(cam, both, (1, 6)), T.cam_to_label(cam, both, 0.5, 0.7, 0.25))


def test_cam_normalisation_is_per_image_and_class():
    logits = torch.tensor([[[[-1.0, 1.0], [3.0, 5.0]], [[2.0, 2.0], [4.0, 6.0]]]])  # [1, 2, 2, 2]
    cam = T.cam_from_logits(logits)
    torch.testing.assert_close(cam[0, 0], torch.tensor([[0.0, 0.2], [0.6, 1.0]]) / (1 + 2e-6), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam[0, 1], torch.tensor([[0.0, 0.0], [0.5, 1.0]]), atol=1e-5, rtol=0)
    assert T.cam_from_logits(logits, size=(8, 8)).shape == (1, 2, 8, 8)


# ------------------------------------------------------------------------------------------------ crops
def _coord_images(B=2, H=8, W=8):
    """Channel 0 holds each pixel's row, channel 1 its column: a crop tells where it was cut."""
    rows = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    cols = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    return torch.stack([rows, cols, torch.zeros(H, W)])[None].repeat(B, 1, 1, 1)


def test_crop_rules_on_a_hand_roi():
    """8 x 8 roi, all 2 (confident foreground) except a 3 x 3 zero block at rows/cols 1-3 and one uncertain pixel at
    (6, 6). 2 px crops (margin 1): centres 1..6, and exactly 10 centres have roi <= 1 (the 9 zeros and (6, 6)), so
    10 crops take them all. A crop is negative when sum(roi) / 4 <= 0.2, i.e. it lies inside the zero block: the
    4 crops centred at (2..3, 2..3). The two global views are always positive."""
    roi = torch.full((2, 8, 8), 2, dtype=torch.long)
    roi[:, 1:4, 1:4] = 0
    roi[:, 6, 6] = 1
    images = _coord_images()
    crops, flags = T.crop_from_roi(images, roi, num_crops=10, crop_size=2, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (10, 2, 3, 2, 2) and flags.shape == (2, 12)
    assert flags[:, :2].eq(1).all()
    for b in range(2):
        centres = set()
        for k in range(10):
            r, c = int(crops[k, b, 0, 0, 0]), int(crops[k, b, 1, 0, 0])  # top-left; centre = + margin 1
            centres.add((r + 1, c + 1))
            assert torch.equal(crops[k, b], images[b, :, r:r + 2, c:c + 2])
            negative = roi[b, r:r + 2, c:c + 2].sum().item() / 4 <= 0.2
            assert flags[b, k + 2].item() == (0.0 if negative else 1.0)
        assert centres == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)} | {(6, 6)}
        assert {k for k in range(10) if flags[b, k + 2] == 0} == \
            {k for k in range(10) if (int(crops[k, b, 0, 0, 0]) + 1, int(crops[k, b, 1, 0, 0]) + 1)
             in {(2, 2), (2, 3), (3, 2), (3, 3)}}
    # 11 crops but only 10 qualifying centres: the official falls back to any centre, so one lands on roi = 2
    crops, _ = T.crop_from_roi(images, roi, num_crops=11, crop_size=2, generator=torch.Generator().manual_seed(0))
    centre_roi = [roi[0, int(crops[k, 0, 0, 0, 0]) + 1, int(crops[k, 0, 1, 0, 0]) + 1].item() for k in range(11)]
    assert max(centre_roi) == 2


# ------------------------------------------------------------------------------------------------ CTC
def _ctc_by_hand(p, flags, tau):
    """Literal per-view sums (one image): p[t][v] = exp(t . s_v / tau)."""
    pos = [v for v, f in enumerate(flags) if f]
    total = 0.0
    for t in range(2):
        neg = sum(p[t][v] for v, f in enumerate(flags) if not f)
        total += sum(-math.log(p[t][v] / (p[t][v] + neg + 1e-4)) for v in pos)
        total += -math.log(1 / (1 + neg + 1e-4))  # the for ... else term
    return total / 2 / (len(pos) + 1e-4)


def test_ctc_loss_by_hand_with_the_extra_term():
    """Teacher views t1 = (1, 0), t2 = (0, 1); student views s0 = (1, 0), s1 = (0, 1) (globals), s2 = (1, 1) (local,
    positive), s3 = (-1, 0) (local, negative); tau = 0.5, so p = exp(2 t . s). For t1: p = e^2, 1, e^2, e^-2 and
    N = e^-2; for t2: p = 1, e^2, e^2, 1 and N = 1."""
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    student = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]], [[-1.0, 0.0]]])  # [4, 1, 2]
    flags = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    e = math.e
    p = [[e ** 2, 1.0, e ** 2, e ** -2], [1.0, e ** 2, e ** 2, 1.0]]
    want = _ctc_by_hand(p, [1, 1, 1, 0], 0.5)
    n1, n2 = e ** -2, 1.0  # spelt out: the positives' terms, then the extra term, then the scaling
    spelt = (2 * math.log((e ** 2 + n1 + 1e-4) / e ** 2) + math.log(1 + n1 + 1e-4) + math.log(1 + n1 + 1e-4)
             + math.log(1 + n2 + 1e-4) + 2 * math.log((e ** 2 + n2 + 1e-4) / e ** 2) + math.log(1 + n2 + 1e-4)
             ) / 2 / (3 + 1e-4)
    assert want == pytest.approx(spelt, rel=1e-12)
    assert T.ctc_loss(student, teacher, flags, temp=0.5).item() == pytest.approx(want, rel=1e-5)
    # without the extra term the loss would be lower by sum_t log(1 + N_t + 1e-4) / 2 / 3
    extra = (math.log(1 + n1 + 1e-4) + math.log(1 + n2 + 1e-4)) / 2 / (3 + 1e-4)
    assert extra > 0.1
    # both locals negative: only the two globals are positives; the batch mean over two copies is unchanged
    flags2 = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    want2 = _ctc_by_hand(p, [1, 1, 0, 0], 0.5)
    got2 = T.ctc_loss(student.repeat(1, 2, 1), teacher.repeat(1, 2, 1), flags2.repeat(2, 1), temp=0.5)
    assert got2.item() == pytest.approx(want2, rel=1e-5)


def test_ctc_loss_stays_finite_where_exp_overflows():
    teacher = torch.full((2, 1, 4), 10.0)
    student = torch.full((3, 1, 4), 10.0, requires_grad=True)  # t . s / tau = 800: exp overflows float32
    loss = T.ctc_loss(student, teacher, torch.tensor([[1.0, 1.0, 0.0]]), temp=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ------------------------------------------------------------------------------------------------ measures
def test_mean_pairwise_cosine():
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1)[None]
    assert T.mean_pairwise_cosine(same).item() == pytest.approx(1.0, abs=1e-6)
    assert T.mean_pairwise_cosine(torch.eye(4)[None]).item() == pytest.approx(0.0, abs=1e-7)
    # (1, 0), (0, 1), (1, 1): pairs 0, 1/sqrt2, 1/sqrt2 -> sqrt2 / 3; averaged with an identical-token image
    mixed = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]])
    assert T.mean_pairwise_cosine(mixed).item() == pytest.approx((R2 / 3 + 1) / 2, abs=1e-6)


def test_cam_miou_by_hand():
    """Image 1, class 1, mask the top row; CAM of class 1 says fg at the left column (class 0's high CAM is not
    the image's class and is ignored). Image 2, class 0, all object, all predicted. fg/bg over both images:
    fg inter 1 + 4, union 3 + 4; bg inter 1, union 3 -> (5/7 + 1/3) / 2. Per class: bg 1/3, class 0 (label 1)
    4/4, class 1 (label 2) 1/3 -> 5/9."""
    cam = torch.zeros(2, 2, 2, 2)
    cam[0, 0] = 0.99
    cam[0, 1] = torch.tensor([[0.9, 0.4], [0.6, 0.1]])
    cam[1, 0] = 0.9
    masks = torch.tensor([[[True, True], [False, False]], [[True, True], [True, True]]])
    labels = torch.tensor([1, 0])
    assert T.cam_miou(cam, masks, labels) == pytest.approx((5 / 7 + 1 / 3) / 2)
    assert T.cam_miou(cam, masks, labels, per_class=True) == pytest.approx(5 / 9)
    gt = T.label_map(masks, labels)
    assert gt.tolist() == [[[2, 2], [0, 0]], [[1, 1], [1, 1]]]
    gt[0, 1, 1] = T.IGNORE  # an ignored pixel (a correct background one) drops out: bg inter 0, union 2
    assert T.cam_miou(cam, gt, labels) == pytest.approx((5 / 7 + 0) / 2)


def test_pseudo_label_accuracy_by_hand():
    I = T.IGNORE
    pseudo = torch.tensor([[[1, I], [0, 0]]])
    gt = torch.tensor([[[1, 0], [0, 1]]])
    assert T.pseudo_label_accuracy(pseudo, gt) == pytest.approx({"acc": 2 / 3, "coverage": 3 / 4})
    # a 4 x 4 ground truth is reduced to the 2 x 2 grid by a majority vote per 2 x 2 cell
    fine = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]])
    assert T.pseudo_label_accuracy(pseudo, fine) == pytest.approx({"acc": 2 / 3, "coverage": 3 / 4})


# ------------------------------------------------------------------------------------------------ network
def test_network_shapes_cams_and_max_pooling():
    net = _net(depth=4, num_classes=3)
    x = _images(2)
    out = net(x)
    assert out.logits.shape == out.aux_logits.shape == (2, 3)
    assert out.cam.shape == out.aux_cam.shape == (2, 3, 4, 4) and out.grid == (4, 4)
    assert out.tokens.shape == out.aux_tokens.shape == (2, 16, 32) and out.cls.shape == (2, 32)
    assert out.teacher is None and out.student is None
    # CAM = the 1 x 1 classifier on each token, in raster order; scores = classifier(channel-wise max of tokens)
    torch.testing.assert_close(out.cam.flatten(2), (out.tokens @ net.classifier.weight.T).transpose(1, 2))
    torch.testing.assert_close(out.logits, out.tokens.max(dim=1).values @ net.classifier.weight.T)
    torch.testing.assert_close(out.aux_logits, out.aux_tokens.max(dim=1).values @ net.aux_classifier.weight.T)
    assert net.classifier.bias is None and net.aux_classifier.bias is None
    cam, aux_cam = net.cam_logits(x)
    torch.testing.assert_close(cam, out.cam)
    torch.testing.assert_close(aux_cam, out.aux_cam)
    # with views: teacher [2, B, K] from (x, view), student [2 + n, B, K]
    out = net(x, _images(2, seed=1), torch.rand(3, 2, 3, 8, 8))
    assert out.teacher.shape == (2, 2, 256) and out.student.shape == (5, 2, 256)
    assert not out.teacher.requires_grad and out.student.requires_grad
    torch.testing.assert_close(out.teacher[0], net.proj_head_t(out.cls))
    torch.testing.assert_close(out.student[0], net.proj_head(out.cls))


def test_aux_tokens_come_from_the_requested_block():
    vit = tiny_vit(depth=4)
    x = _images(2)
    with torch.no_grad():
        z = vit.embed(x)
        per_block = []
        for blk in vit.blocks:
            z = blk(z)
            per_block.append(z)
        final = vit.norm(z)
        for aux_layer, block in ((-3, 1), (0, 0), (-2, 2)):
            out = T.ToCoNet(vit, aux_layer=aux_layer)(x)
            torch.testing.assert_close(out.aux_tokens, per_block[block][:, 1:], rtol=0, atol=0)
            torch.testing.assert_close(out.tokens, final[:, 1:], rtol=0, atol=0)
            torch.testing.assert_close(out.cls, final[:, 0], rtol=0, atol=0)
        # the last block: the normed final tokens, as the official (embeds[-1] is replaced by norm(x))
        torch.testing.assert_close(T.ToCoNet(vit, aux_layer=-1)(x).aux_tokens, final[:, 1:])


def test_vit_features_at_other_sizes():
    vit = tiny_vit()
    cls, tokens, aux, grid = T.vit_features(vit, _images(2, size=8), aux_layer=0)
    assert grid == (2, 2) and tokens.shape == aux.shape == (2, 4, 32) and cls.shape == (2, 32)
    _, tokens, _, grid = T.vit_features(vit, _images(1, size=24), aux_layer=-1)
    assert grid == (6, 6) and tokens.shape == (1, 36, 32)


def test_multi_scale_cam_follows_the_official_rules():
    net = _net(depth=3, num_classes=3).eval()
    x = _images(2)
    with torch.no_grad():
        cam, aux = net.cam_logits(x)
        cam_f, aux_f = net.cam_logits(x.flip(-1))
        up = lambda c: F.interpolate(c, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
        want = T.minmax_cam(F.relu(torch.maximum(up(cam), up(cam_f).flip(-1))))
        want_aux = T.minmax_cam(F.relu(torch.maximum(up(aux), up(aux_f).flip(-1))))
    got, got_aux = T.multi_scale_cam(net, x, scales=(1.0,))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_aux, want_aux)
    peak = got.amax(dim=(2, 3))  # each image's class map peaks at 1 - 1e-5, or is all 0 where ReLU left nothing
    assert got.min() >= 0 and got.max() < 1 and ((peak > 0.99) | (peak == 0)).all() and (peak > 0.99).any()
    # scale 1.0 always runs: (0.5,) means 1.0 + 0.5; and it is the sum before the min-max
    half = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        c8, _ = net.cam_logits(half)
        c8f, _ = net.cam_logits(half.flip(-1))
        s1 = F.relu(torch.maximum(up(cam), up(cam_f).flip(-1)))
        s2 = F.relu(torch.maximum(up(c8), up(c8f).flip(-1)))
    torch.testing.assert_close(T.multi_scale_cam(net, x, scales=(0.5,))[0], T.minmax_cam(s1 + s2))
    torch.testing.assert_close(T.multi_scale_cam(net, x, scales=(0.5, 1.0))[0], T.minmax_cam(s1 + s2))
    # flip="mean" averages; flip=None is the single pass
    mean = T.multi_scale_cam(net, x, scales=(1.0,), flip="mean")[0]
    torch.testing.assert_close(mean, T.minmax_cam(F.relu((up(cam) + up(cam_f).flip(-1)) / 2)))
    torch.testing.assert_close(T.multi_scale_cam(net, x, scales=(1.0,), flip=None)[0], T.cam_from_logits(cam, (16, 16)))


# ------------------------------------------------------------------------------------------------ training
def test_ema_teacher_moves_by_the_ema_rule():
    net = _net(depth=3)
    for t, s in zip(net.proj_head_t.parameters(), net.proj_head.parameters()):
        assert torch.equal(t, s) and not t.requires_grad and s.requires_grad
    with torch.no_grad():
        for s in net.proj_head.parameters():
            s.add_(1.0)
    t0 = [t.clone() for t in net.proj_head_t.parameters()]
    s0 = [s.clone() for s in net.proj_head.parameters()]
    net.update_teacher()  # m = 0.9, the official constant
    for t, a, b in zip(net.proj_head_t.parameters(), t0, s0):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)
    # the training step moves it once, before its projection, with the student as it was
    t1 = [t.clone() for t in net.proj_head_t.parameters()]
    T.toco_step(crop_size=8, num_crops=2, cam_scales=(1.0,))(net.train(), _images(2), torch.tensor([0, 1]))
    for t, a, b in zip(net.proj_head_t.parameters(), t1, s0):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)
    assert net.head_parameters()[0] is net.classifier.weight
    assert not any(p is q for p in net.head_parameters() for q in net.proj_head_t.parameters())


def test_a_few_training_steps_lower_the_loss():
    """The full ToCo step (official weights) for 12 steps on one batch, its random crops and view fixed by the seed:
    the classification terms fall. The PTC / CTC targets are the model's own CAMs and a fast EMA teacher (m = 0.9),
    so those terms move with their targets and the total is not monotone step to step; each is checked on frozen
    targets below."""
    torch.manual_seed(0)
    net = _net(depth=3).train()
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    step = T.toco_step(crop_size=8, num_crops=3, cam_scales=(1.0, 0.5))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    parts = []
    for _ in range(12):
        torch.manual_seed(1)
        loss, logits = step(net, x, y)
        assert logits.shape == (4, 5) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts.append(step.last)
    assert set(step.last) == {"loss", "cls", "cls_aux", "ptc", "ctc"}
    assert all(parts[0][k] > 0 for k in ("cls", "cls_aux", "ptc", "ctc"))
    assert parts[-1]["cls"] < parts[0]["cls"] - 0.15 and parts[-1]["cls_aux"] < parts[0]["cls_aux"] - 0.03
    res = T.measure_toco(net, x, torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5, y)
    assert set(res) == {"acc", "cam_miou", "aux_cam_miou", "cam_miou_class", "token_cos", "aux_token_cos",
                        "pseudo_acc", "pseudo_coverage", "cam_auc", "aux_cam_auc"}
    assert 0 <= res["cam_miou"] <= 1 and -1 <= res["token_cos"] <= 1 and net.training


@pytest.mark.parametrize("term", ["ptc", "ctc"])
def test_contrast_terms_fall_on_frozen_targets(term):
    """Token labels, roi, crops and the second view fixed (and the teacher held still): 10 AdamW steps on the term
    alone lower it, so the gradients reach the tokens and the student head."""
    x = _images(4)
    pseudo = torch.randint(0, 3, (4, 4, 4), generator=torch.Generator().manual_seed(2))
    pseudo[:, 0, 0] = T.IGNORE
    aff = T.label_to_aff_mask(pseudo)
    roi = torch.randint(0, 3, (4, 16, 16), generator=torch.Generator().manual_seed(3))
    roi[:, :8] = 0
    g = torch.Generator().manual_seed(4)
    crops, flags = T.crop_from_roi(x, roi, 3, 8, generator=g)
    view = T.random_resized_crop(x, generator=g)
    assert (flags == 0).any() and view.shape == x.shape
    net = _net(depth=3).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(10):
        out = net(x, view, crops)
        loss = T.ptc_loss(out.tokens, aff) if term == "ptc" else T.ctc_loss(out.student, out.teacher, flags)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * (0.9 if term == "ptc" else 0.5), losses


def test_weights_switch_terms_off():
    """All weights 0: the single-stage CAM baseline, the final CAM's multi-label soft-margin loss alone; the teacher
    does not move and no CAM, crop or projection is computed."""
    net = _net(depth=3).train()
    x, y = _images(2), torch.tensor([1, 3])
    t0 = [t.clone() for t in net.proj_head_t.parameters()]
    res = T.toco_losses(net, x, y, w_aux=0, w_ptc=0, w_ctc=0)
    want = F.multilabel_soft_margin_loss(net(x).logits, T.multi_hot(y, 5))
    torch.testing.assert_close(res["loss"], want)
    assert res["ptc"].item() == res["ctc"].item() == res["cls_aux"].item() == 0 and "aux_cam" not in res
    assert all(torch.equal(a, b) for a, b in zip(t0, net.proj_head_t.parameters()))
    res = T.toco_losses(net, x, y, w_ctc=0, cam_scales=(1.0,))  # PTC on, CTC off
    torch.testing.assert_close(res["loss"], res["cls"] + res["cls_aux"] + 0.2 * res["ptc"])
    assert res["pseudo"].shape == (2, 4, 4) and "flags" not in res


def test_trains_through_vitlab_fit():
    """The step is a ``fit`` step_fn; ``head_parameters`` gives the official 10x-lr group to ``adamw_lr_scaled``."""
    from tests.model_helpers import toy_train
    from vitlab.train import adamw_lr_scaled, fit

    net = _net(depth=3)
    history = fit(net, toy_train(8), steps=2, batch_size=4, progress=False, profile="smoke",
                  step_fn=T.toco_step(crop_size=8, num_crops=2, cam_scales=(1.0,)),
                  optimizer=adamw_lr_scaled(lambda m: m.head_parameters(), 10))
    assert len(history["train_loss"]) == 1 and math.isfinite(history["train_loss"][0])


def test_multi_hot():
    assert T.multi_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    mh = torch.tensor([[1, 0, 1]])
    assert T.multi_hot(mh, 3).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    cam, lab = torch.rand(1, 2, 4, 4), torch.tensor([0])
    return [
        (lambda: T.ToCoNet(torch.nn.Linear(2, 2)), TypeError, "vit"),
        (lambda: T.ToCoNet(tiny_vit(), aux_layer=-3), ValueError, "aux_layer"),
        (lambda: T.ToCoNet(tiny_vit(), aux_layer=0, momentum=1.5), ValueError, "momentum"),
        (lambda: T.ToCoNet(tiny_vit(), aux_layer=0, num_classes=0), ValueError, "num_classes"),
        (lambda: T.multi_hot(torch.tensor([0, 7]), 5), ValueError, "labels"),
        (lambda: T.cam_to_label(cam, lab, bkg_thre=1.5), ValueError, "bkg_thre"),
        (lambda: T.cam_to_label(cam, lab, high_thre=0.7), ValueError, "low_thre"),
        (lambda: T.cam_to_label(cam, torch.tensor([0, 1])), ValueError, "targets"),
        (lambda: T.cam_to_roi(cam, lab, high_thre=0.2, low_thre=0.5), ValueError, "low_thre"),
        (lambda: T.ptc_loss(torch.rand(1, 4, 3), torch.zeros(1, 3, 3)), ValueError, "aff_mask"),
        (lambda: T.ctc_loss(torch.rand(4, 1, 2), torch.rand(2, 1, 2), torch.ones(1, 3)), ValueError, "flags"),
        (lambda: T.ctc_loss(torch.rand(4, 1, 2), torch.rand(2, 1, 2), torch.ones(1, 4), temp=0), ValueError, "temp"),
        (lambda: T.crop_from_roi(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), crop_size=9),
         ValueError, "crop_size"),
        (lambda: T.crop_from_roi(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), num_crops=99,
                                 crop_size=4), ValueError, "num_crops"),
        (lambda: T.crop_from_roi(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8)), ValueError, "roi"),
        (lambda: T.multi_scale_cam(_net(depth=2, aux_layer=0), _images(1), flip="min"), ValueError, "flip"),
        (lambda: T.multi_scale_cam(_net(depth=2, aux_layer=0), _images(1), scales=(0.1,)), ValueError, "scales"),
        (lambda: T.multi_scale_cam(tiny_vit(), _images(1)), TypeError, "net"),
        (lambda: T.toco_step(w_ptc=-1), ValueError, "w_ptc"),
        (lambda: T.toco_step(crop=4), TypeError, "crop"),
        (lambda: T.mean_pairwise_cosine(torch.rand(4, 3)), ValueError, "tokens"),
        (lambda: T.vit_features(tiny_vit(), torch.rand(1, 1, 16, 16), aux_layer=0), ValueError, "in_chans"),
        (lambda: _net(depth=2, aux_layer=0)(_images(1), local_views=torch.rand(1, 1, 3, 8, 8)), ValueError,
         "global_view"),
        (lambda: T.label_map(torch.ones(1, 4, 4, dtype=torch.bool), torch.tensor([[1.0, 0.0]])), ValueError,
         "labels"),
        (lambda: T.cam_miou(cam, torch.ones(1, 8, 8, dtype=torch.bool), lab), ValueError, "masks"),
        (lambda: T.measure_toco(_net(depth=2, aux_layer=0), _images(2), torch.ones(2, 8, 8, dtype=torch.bool),
                                torch.tensor([0, 1])), ValueError, "masks"),
        (lambda: T.pseudo_label_accuracy(torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)), ValueError,
         "pseudo"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    call, err, name = _bad_cases()[case]
    with pytest.raises(err, match=name):
        call()


# ------------------------------------------------------------------------------------------------ lesson pieces
def test_cam_auc_by_hand_and_against_sklearn():
    """Object pixels 0.9, 0.5; background 0.1, 0.5: of the 4 pairs 3 are ranked right and one tied (half): 3.5 / 4."""
    cam = torch.zeros(1, 2, 2, 2)
    cam[0, 1] = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    masks = torch.tensor([[[True, False], [True, False]]])
    assert T.cam_auc(cam, masks, torch.tensor([1])) == pytest.approx(0.875)
    assert T.cam_auc(cam, ~masks, torch.tensor([1])) == pytest.approx(0.125)  # pointing at the background
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    cam, masks, labels = torch.rand(3, 4, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g) > 0.7, torch.tensor([2, 0, 3])
    own = cam[torch.arange(3), labels]
    want = sklearn.roc_auc_score(masks.flatten().numpy(), own.flatten().numpy())
    assert T.cam_auc(cam, masks, labels) == pytest.approx(want, abs=1e-12)


def test_cam_auc_bad_input():
    cam = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="masks must be bool"):
        T.cam_auc(cam, torch.ones(2, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be class indices"):
        T.cam_auc(cam, torch.ones(2, 4, 4, dtype=torch.bool), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="both object and background"):
        T.cam_auc(cam, torch.ones(2, 4, 4, dtype=torch.bool), torch.tensor([0, 1]))


def test_measure_toco_reports_the_cam_auc():
    net = _net()
    x, masks = _images(4), torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 4:10] = True
    out = T.measure_toco(net, x, masks, torch.tensor([0, 1, 2, 3]))
    assert 0.0 <= out["cam_auc"] <= 1.0 and 0.0 <= out["aux_cam_auc"] <= 1.0


def test_start_from_loads_the_vit_and_leaves_the_heads():
    base, net = tiny_vit(1, depth=4), _net()
    heads = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("vit.")}
    net.start_from(base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in net.vit.state_dict().items())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in heads.items())
    with pytest.raises(TypeError):
        net.start_from(torch.nn.Linear(2, 2))


def test_the_zoo_starts_a_toco_entry_from_its_vit():
    """Through the zoo's own path: a model with ``start_from`` takes its base that way (not a strict load of a
    differently keyed state dict)."""
    from vitlab import zoo

    base, net = tiny_vit(2, depth=4), _net()
    zoo._start_from(net, base)
    assert torch.equal(net.vit.pos_embed, base.pos_embed)


def test_lesson_entries_and_head_lr():
    from vitlab import zoo
    from vitlab.train import adamw_lr_scaled

    assert T.entry_name("toco", 1) == "ch6_toco_toco_scenes_s1" and T.entry_name("cam", 0, "half").endswith("_half")
    for v in T.VARIANTS:
        r = zoo.ZOO[T.entry_name(v, 0)]
        assert r.init == "ch6_vit_scenes_s0" and r.objective == "toco" and r.fit["head_lr_scale"] == 10.0
    assert zoo.ZOO[T.entry_name("cam", 2)].objective_kwargs["w_ptc"] == 0.0
    with pytest.raises(ValueError, match="variant"):
        T.entry_name("ptc", 0)
    with pytest.raises(ValueError, match="seed"):
        T.entry_name("toco", 1, "half")
    net = _net()
    opt = adamw_lr_scaled(lambda m: m.head_parameters(), 10.0)(net, 1e-4, 0.01)
    heads = {id(p) for p in net.head_parameters()}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 if id(g["params"][0]) in heads else 1e-4)
