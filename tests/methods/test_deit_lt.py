"""DeiT-LT: timm-equal distilled ViT, class weights and the loss by hand, the DRW switch, SAM on a quadratic."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled

from vitlab.methods.training.deit_lt import (SAM, DeiTLTStep, DistilledVisionTransformer, balanced_softmax_loss,
                                             class_balanced_weights, deit_lt_loss, distilled_vit, drw_weights,
                                             head_mid_tail_report, predict_heads, sam_training, small_resnet,
                                             split_classes, strong_mix)
from vitlab.train import fit

CFG = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)


def _pair(seed=0):
    torch.manual_seed(seed)
    ours = DistilledVisionTransformer(**CFG)
    ref = VisionTransformerDistilled(**CFG)
    return ours, ref


# ------------------------------------------------------------------------------------------------ the model
def test_same_keys_and_outputs_as_timm():
    ours, ref = _pair()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(5, 1, 8, 8)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)  # eval: the mean of the two heads
    ours.train(), ref.train()
    ref.set_distilled_training(True)
    for a, b in zip(ours(x), ref(x)):  # train: (cls, dist)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and timm's weights load into ours
    fresh = DistilledVisionTransformer(**CFG)
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh.eval()(x), ref.eval()(x), rtol=0, atol=1e-6)


def test_forward_heads_in_eval_and_avg():
    ours, _ = _pair()
    x = torch.rand(3, 1, 8, 8)
    ours.train()
    cls_t, dist_t = ours(x)
    ours.eval()
    cls_e, dist_e = ours.forward_heads(x)
    torch.testing.assert_close(cls_e, cls_t)
    torch.testing.assert_close(dist_e, dist_t)
    torch.testing.assert_close(ours(x), (cls_e + dist_e) / 2)
    heads = predict_heads(ours, (x, torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(heads["avg"], (heads["cls"] + heads["dist"]) / 2)
    assert ours.set_distilled_training(False).train()(x).shape == (3, 3)  # timm's default: the mean


def test_registry_builder_and_no_weight_decay():
    m = distilled_vit("vit_nano", img_size=8, patch_size=4, num_classes=4)
    assert m.pos_embed.shape[1] == 4 + 2 and m.head_dist.out_features == 4
    assert "dist_token" in m.no_weight_decay()


# ------------------------------------------------------------------------------------------------ loss pieces
def test_class_weights_by_hand():
    counts, beta = [100, 10, 1], 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]  # 0.1/(1-0.9^100), 0.1/(1-0.9^10), 1.0
    expected = torch.tensor([3 * r / sum(raw) for r in raw])
    torch.testing.assert_close(class_balanced_weights(counts, beta), expected)
    assert class_balanced_weights(torch.tensor([5, 7, 9]), beta=0.0).tolist() == [1.0, 1.0, 1.0]
    w = class_balanced_weights([500, 50, 5], beta=0.9999)  # beta -> 1: close to inverse frequency
    assert abs(w.sum().item() - 3) < 1e-5 and 9.5 < (w[1] / w[0]).item() < 10.5


def test_hard_distillation_loss_by_hand():
    cls = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    dist = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0], [3.0, 1.0]])  # argmax: 1, 0
    y = torch.tensor([0, 1])
    ce = lambda z, k: math.log(sum(math.exp(v) for v in z)) - z[k]
    base = (ce([2, 0], 0) + ce([0, 1], 1)) / 2
    d = (ce([1, 0], 1) + ce([0, 0], 0)) / 2
    loss, parts = deit_lt_loss(cls, dist, y, teacher, alpha=0.5, return_parts=True)
    assert abs(parts["cls"].item() - base) < 1e-6 and abs(parts["dist"].item() - d) < 1e-6
    assert abs(loss.item() - (0.5 * base + 0.5 * d)) < 1e-6
    # class weights enter only the distillation term, as a weighted mean over the teacher's labels
    w = torch.tensor([3.0, 1.0])
    dw = (1.0 * ce([1, 0], 1) + 3.0 * ce([0, 0], 0)) / (1.0 + 3.0)
    loss_w = deit_lt_loss(cls, dist, y, teacher, alpha=0.25, class_weights=w)
    assert abs(loss_w.item() - (0.75 * base + 0.25 * dw)) < 1e-6
    # soft (mixed) targets on the CLS head
    soft = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
    base_soft = (0.7 * ce([2, 0], 0) + 0.3 * ce([2, 0], 1) + ce([0, 1], 1)) / 2
    assert abs(deit_lt_loss(cls, dist, soft, teacher, alpha=0.0).item() - base_soft) < 1e-6


def test_teacher_gets_no_gradient():
    teacher = torch.randn(4, 3, requires_grad=True)
    cls, dist = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    deit_lt_loss(cls, dist, torch.tensor([0, 1, 2, 0]), teacher).backward()
    assert teacher.grad is None and dist.grad is not None


def test_balanced_softmax_is_ce_with_log_prior():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = balanced_softmax_loss([50, 5, 1])(logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits + torch.tensor([50.0, 5.0, 1.0]).log(), y))


# ------------------------------------------------------------------------------------------------ DRW
def test_drw_switch():
    w = torch.tensor([0.5, 2.5])
    assert drw_weights(0, 3, w) is None and drw_weights(2, 3, w) is None
    assert drw_weights(3, 3, w) is w and drw_weights(10, 3, w) is w
    assert drw_weights(10, None, w) is None


def test_step_fn_switches_weights_and_mixing_at_drw_step():
    torch.manual_seed(0)
    student = DistilledVisionTransformer(**CFG).train()
    teacher = small_resnet(in_chans=1, num_classes=3, widths=(4,))
    w = class_balanced_weights([30, 3, 1])
    step = DeiTLTStep(teacher, num_classes=3, class_weights=w, drw_step=2, seed=0)
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    for _ in range(4):
        loss, logits = step(student, x, y)
        assert loss.ndim == 0 and logits.shape == (8, 3)
    assert [e["weighted"] for e in step.log] == [False, False, True, True]
    # after the switch: no mixing, plain CE on the hard labels (no smoothing, as the official --no-mixup-drw
    # stage) and the weighted distillation CE, by hand
    cls, dist = student(x)
    with torch.no_grad():
        t = teacher.eval()(x).argmax(1)
    by_hand = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, t, weight=w)
    torch.testing.assert_close(step(student, x, y)[0], by_hand)
    # without DRW nothing is ever weighted
    plain = DeiTLTStep(teacher, num_classes=3, mix=False)
    plain(student, x, y)
    assert plain.weights_now() is None and plain.log[-1]["weighted"] is False


class _Fixed(torch.nn.Module):
    """A 'model' that returns fixed logits whatever the images (a dummy parameter keeps it an nn.Module)."""

    def __init__(self, *outs):
        super().__init__()
        self.outs = outs
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        outs = tuple(o + 0 * self.p for o in self.outs)
        return outs if len(outs) > 1 else outs[0]


# Equivalence with the official DistillationLoss (hard type, losses.py) on a hand case, expected values worked out
# from its formula  (1 − α)·base(cls, y) + α·F.cross_entropy(dist, argmax teacher, weight=w):
# cls = [[1,0,0],[0,2,0]], dist = [[0,1,0],[0,0,0]], teacher argmax = [2, 0], y = [0, 1], w = [0.5, 1, 2], α = 0.5
#   base (hard CE)   = (log(2+e) − 1 + log(2+e²) − 2)/2                  = 0.39549474
#   base (smooth 0.1) = batch mean of 0.9·CE(z, y) + 0.1·mean_c CE(z, c)  = 0.49549474
#   dist (weighted)  = (2·log(2+e) + 0.5·log 3)/(2 + 0.5)                = 1.46087823
#   dist (plain)     = (log(2+e) + log 3)/2                               = 1.32502850
CLS_L = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
DIST_L = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
TEACH_L = torch.tensor([[0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
Y = torch.tensor([0, 1])
W = torch.tensor([0.5, 1.0, 2.0])


def test_loss_equals_the_official_hard_distillation_loss_on_a_hand_case():
    loss, parts = deit_lt_loss(CLS_L, DIST_L, Y, TEACH_L, alpha=0.5, class_weights=W, return_parts=True)
    assert abs(parts["cls"].item() - 0.3954947400769677) < 1e-6
    assert abs(parts["dist"].item() - 1.4608782288792628) < 1e-6
    assert abs(loss.item() - 0.9281864844781152) < 1e-6
    assert abs(deit_lt_loss(CLS_L, DIST_L, Y, TEACH_L, alpha=0.5).item() - 0.860261620688524) < 1e-6


def test_after_drw_the_cls_head_learns_hard_labels_without_smoothing():
    """Official --no-mixup-drw: base criterion torch.nn.CrossEntropyLoss() on the unmixed integer targets."""
    student, teacher = _Fixed(CLS_L, DIST_L), _Fixed(TEACH_L)
    x = torch.zeros(2, 1, 4, 4)
    step = DeiTLTStep(teacher, num_classes=3, class_weights=W, drw_step=0, grid=(1, 1), seed=0)  # DRW from step 0
    assert abs(step(student, x, Y)[0].item() - 0.9281864844781152) < 1e-6  # hard CE + weighted distillation
    smoothed = DeiTLTStep(teacher, num_classes=3, class_weights=W, drw_step=0, grid=(1, 1), drw_smoothing=0.1)
    assert abs(smoothed(student, x, Y)[0].item() - 0.9781864844781153) < 1e-6  # the old behaviour, on request
    # the "without DRW" control: the same schedule with unit weights is the plain distillation CE
    no_drw = DeiTLTStep(teacher, num_classes=3, class_weights=torch.ones(3), drw_step=0, grid=(1, 1))
    assert abs(no_drw(student, x, Y)[0].item() - 0.860261620688524) < 1e-6
    # before the DRW step, unmixed batches keep the smoothed targets (timm's Mixup smooths every target)
    before = DeiTLTStep(teacher, num_classes=3, class_weights=W, drw_step=5, mix_prob=0.0, grid=(1, 1))
    assert abs(before(student, x, Y)[0].item() - (0.5 * 0.49549474007696775 + 0.5 * 1.32502850130008)) < 1e-6


def test_fit_with_the_step_fn():
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    student = DistilledVisionTransformer(**CFG)
    teacher = small_resnet(in_chans=1, num_classes=3, widths=(4,))
    step = DeiTLTStep(teacher, num_classes=3, class_weights=torch.ones(3), drw_step=4)
    hist = fit(student, data, profile="smoke", epochs=2, batch_size=8, progress=False, shift=0, step_fn=step)
    assert step.step == 8 and sum(e["weighted"] for e in step.log) == 4 and len(hist["train_loss"]) == 2
    report = head_mid_tail_report(student, data, [30, 3, 1])
    assert set(report) == {"cls", "dist", "avg"} and set(report["avg"]) == {"all", "head", "mid", "tail"}


# ------------------------------------------------------------------------------------------------ mixing
def test_strong_mix_targets_follow_the_pasted_area():
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(6)])
    y = torch.arange(6) % 3
    for switch in (1.0, 0.0):  # CutMix, then Mixup
        xm, t = strong_mix(x, y, 3, (2, 2), switch_prob=switch, smoothing=0.0, generator=g)
        assert xm.shape == x.shape and torch.allclose(t.sum(1), torch.ones(6))
    # CutMix on a 2x2 grid (image i is the constant i): each pixel comes from the image or its partner, and
    # the label weights are the areas: t_i = kept_i * onehot(y_i) + (1 - kept_i) * onehot(y_partner)
    xm, t = strong_mix(x, y, 3, (2, 2), switch_prob=1.0, smoothing=0.0, generator=torch.Generator().manual_seed(3))
    for i in range(6):
        kept = (xm[i] == i).float().mean()
        partner = int(xm[i][xm[i] != i][0]) if kept < 1 else i
        assert set(xm[i].unique().tolist()) <= {float(i), float(partner)}
        expected = kept * F.one_hot(y[i], 3).float() + (1 - kept) * F.one_hot(y[partner], 3).float()
        torch.testing.assert_close(t[i], expected)
    a = strong_mix(x, y, 3, (2, 2), generator=torch.Generator().manual_seed(7))
    b = strong_mix(x, y, 3, (2, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------ SAM
def test_sam_step_on_a_quadratic_by_hand():
    # f(w) = ||w||^2 / 2, g = w. w = (3, 4): ||g|| = 5, eps = 0.05 * w / 5, g' = w + eps = 1.01 w,
    # SGD lr 0.1: w <- w - 0.1 * 1.01 w = 0.899 w
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    closure = lambda: 0.5 * (w ** 2).sum()
    closure().backward()
    sam.step(closure)
    torch.testing.assert_close(w.detach(), torch.tensor([2.697, 3.596], dtype=torch.float64), rtol=0, atol=1e-12)
    assert sam.param_groups[0] is sam.base.param_groups[0]  # one lr for both (schedulers act on SAM)


def test_sam_training_plugs_into_fit():
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    teacher = small_resnet(in_chans=1, num_classes=3, widths=(4, 8))
    make_opt, step = sam_training(balanced_softmax_loss([8, 5, 3]), rho=0.05)
    before = [p.detach().clone() for p in teacher.parameters()]
    hist = fit(teacher, data, profile="smoke", epochs=2, batch_size=8, progress=False, shift=0,
               optimizer=make_opt, step_fn=step, lr=0.05)
    assert len(hist["train_loss"]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


# ------------------------------------------------------------------------------------------------ groups
def test_split_classes():
    counts = [500, 300, 180, 108, 65, 39, 23, 14, 8, 5]
    s = split_classes(counts)
    assert s["head"].tolist() == [0, 1, 2] and s["mid"].tolist() == [3, 4, 5, 6] and s["tail"].tolist() == [7, 8, 9]
    s = split_classes(counts, many=100, few=20)
    assert s["head"].tolist() == [0, 1, 2, 3] and s["mid"].tolist() == [4, 5, 6] and s["tail"].tolist() == [7, 8, 9]
    s = split_classes([5, 50, 20, 10])  # ranked by count, whatever the order
    assert s["head"].tolist() == [1] and s["tail"].tolist() == [0]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([5, 3], beta=1.0)
    with pytest.raises(ValueError, match="counts"):
        class_balanced_weights([5, 0])
    with pytest.raises(TypeError, match="counts"):
        class_balanced_weights([5.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        deit_lt_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3),
                     alpha=1.5)
    with pytest.raises(ValueError, match="targets"):
        deit_lt_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        deit_lt_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class_weights"):
        deit_lt_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3),
                     class_weights=torch.ones(4))
    with pytest.raises(TypeError, match="step"):
        drw_weights(1.5, 3, torch.ones(2))
    with pytest.raises(ValueError, match="rho"):
        SAM(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), rho=0.0)
    with pytest.raises(TypeError, match="base"):
        SAM(object())
    with pytest.raises(ValueError, match="closure"):
        SAM(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)).step()
    with pytest.raises(TypeError, match="loss_fn"):
        sam_training("ce")
    with pytest.raises(ValueError, match="global_pool"):
        DistilledVisionTransformer(**CFG, global_pool="avg")
    with pytest.raises(ValueError, match="reg_tokens"):
        DistilledVisionTransformer(**CFG, reg_tokens=2)
    teacher = small_resnet(in_chans=1, num_classes=3, widths=(4,))
    with pytest.raises(ValueError, match="class_weights"):
        DeiTLTStep(teacher, num_classes=3, drw_step=5)
    with pytest.raises(TypeError, match="teacher"):
        DeiTLTStep("resnet", num_classes=3)
    with pytest.raises(ValueError, match="mix_prob"):
        DeiTLTStep(teacher, num_classes=3, mix_prob=2.0)
    with pytest.raises(ValueError, match="drw_smoothing"):
        DeiTLTStep(teacher, num_classes=3, drw_smoothing=1.0)
    with pytest.raises(TypeError, match="DistilledVisionTransformer"):
        DeiTLTStep(teacher, num_classes=3, mix=False)(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)),
                                           torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="grid"):
        strong_mix(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 3, (0, 2))
    with pytest.raises(ValueError, match="few"):
        split_classes([9, 5, 1], many=3, few=None)
    with pytest.raises(ValueError, match="few"):
        split_classes([9, 5, 1], many=3, few=5)
    with pytest.raises(ValueError, match="classes"):
        head_mid_tail_report(DistilledVisionTransformer(**CFG),
                             (torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), [5, 3, 2, 1])
    with pytest.raises(ValueError, match="widths"):
        small_resnet(widths=())
    with pytest.raises(TypeError, match="DistilledVisionTransformer"):
        predict_heads(torch.nn.Linear(2, 2), (torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))


def test_train_teacher_reads_the_recipe():
    from vitlab.methods.training.deit_lt import RECIPE, train_teacher

    class _Data:  # a tiny ImageDataset stand-in: images, labels, class counts
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.images, self.labels = torch.rand(16, 1, 8, 8, generator=g), torch.arange(16) % 3
            self.in_chans, self.num_classes = 1, 3

        def class_counts(self):
            return torch.bincount(self.labels, minlength=3)

    teacher, hist = train_teacher(_Data(), profile="smoke", epochs=1, batch_size=8, widths=(4,))
    assert not teacher.training and len(hist["train_loss"]) == 1
    assert teacher.stem[0].stride == (RECIPE["teacher_stem_stride"],) * 2
    assert small_resnet(in_chans=1, num_classes=3, widths=(4,), stem_stride=2)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
