"""PH-Reg (official 0raiser0/PH-Reg, DINOv2_full/; not runnable here: DINOv2 download, CUDA): the view machinery by
hand (farthest-point sampling, index maps, shift + recovery on a toy whose features are its patches' positions), the
teacher against hand-built averages of the plain ViT, the student's registers and trainable set, the loss on hand
cases, a short distillation, the measurements and bad input."""
import math

import pytest
import torch

from model_helpers import tiny_vit
from vitlab.data import ImageDataset, patch_mask
from vitlab.methods.robustness import ph_reg as P

GRID = (4, 4)  # tiny_vit: 16 px, patch 4


def _images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _vit_patches(vit, x):
    with torch.no_grad():
        return vit.forward_features(x)[:, vit.num_prefix_tokens:]


# ------------------------------------------------------------------------------------------------------ views
def test_farthest_point_sample_by_hand():
    """From the origin: (2, 2) and (-2, -2) are both 8 away, the lower index wins; then (-2, -2) is 8 from the
    nearest chosen point while (1, 0) and (0, 1) are 1; then those two tie at 1 and (1, 0) (index 1) wins."""
    pts = torch.tensor([[0, 0], [1, 0], [2, 2], [-2, -2], [0, 1]])
    got = P.farthest_point_sample(pts, 4)
    assert got.tolist() == [[0, 0], [2, 2], [-2, -2], [1, 0]]
    assert got.dtype == pts.dtype
    assert P.farthest_point_sample(pts, 1).tolist() == [[0, 0]]


def test_sample_views_view0_identity_in_range_and_seeded():
    off, flips = P.sample_views((8, 8), 6, generator=3)
    assert off.shape == (6, 2) and flips.shape == (6,) and flips.dtype == torch.bool
    assert off[0].tolist() == [0, 0] and not flips[0]
    assert off.abs().max() <= round(0.15 * 8)  # s = 1 on an 8 x 8 grid
    off2, flips2 = P.sample_views((8, 8), 6, generator=3)
    assert torch.equal(off, off2) and torch.equal(flips, flips2)
    # s = 1 gives 8 non-zero offsets; farthest-point picks the 4 corners (distance 2) before any edge midpoint
    off, _ = P.sample_views((8, 8), 5, generator=0)
    assert sorted(map(tuple, off[1:].tolist())) == [(-1, -1), (-1, 1), (1, -1), (1, 1)]


def test_identity_view_and_index_maps_by_hand():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(P.patch_index_map(GRID, (0, 0)), torch.stack([rows, cols]))
    x = _images()
    assert torch.equal(P.shift_images(x, (0, 0), patch_size=4), x)
    # one patch right: view column w shows original column w + 1; the last view column shows the fill
    m = P.patch_index_map(GRID, (0, 1))
    assert m[:, 2, 0].tolist() == [2, 1] and m[:, 2, 3].tolist() == [-1, -1]
    # flipped: view column w shows what the unflipped view had at column 3 - w
    mf = P.patch_index_map(GRID, (0, 1), flip=True)
    assert mf[:, 2, 0].tolist() == [-1, -1] and mf[:, 2, 3].tolist() == [2, 1]
    up = P.patch_index_map(GRID, (-1, 0))  # view row h shows original row h - 1
    assert up[:, 0, 1].tolist() == [-1, -1] and up[:, 1, 1].tolist() == [0, 1]
    s = P.shift_images(x, (0, 1), patch_size=4, fill=(0.5, 0.25, 2.0))
    assert torch.equal(s[..., :12], x[..., 4:])
    assert torch.equal(s[:, :, :, 12:], torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1).expand(2, 3, 16, 4))


def test_shift_then_recover_is_exact_for_position_coded_patches():
    """Each original patch is a constant: its raster position + 1. A toy 'model' whose features are its patches' mean
    pixel (translation equivariant, blind to a flip within a constant patch) sees, in every view, the code of the
    patch each view patch shows; recovery must give back every patch's own code exactly, and the fill (99) never
    enters the average."""
    p, codes = 4, torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) + 1
    img = codes.repeat_interleave(p, -2).repeat_interleave(p, -1).expand(2, 3, 16, 16).contiguous()
    offsets = torch.tensor([[0, 0], [0, 1], [1, -1], [-2, 0], [1, 1]])
    flips = torch.tensor([False, False, True, True, False])
    views, maps = P.make_views(img, offsets, flips, patch_size=p, fill=99.0)
    feats = torch.nn.functional.avg_pool2d(views.flatten(0, 1), p).flatten(2).transpose(1, 2)  # [V·B, 16, 3]
    feats = feats.unflatten(0, (5, 2))
    assert (feats == 99).any()  # the fill is there to be left out
    out, counts = P.recover_patches(feats, maps, return_counts=True)
    assert torch.equal(out, codes.flatten().view(1, 16, 1).expand(2, 16, 3))
    # counts by hand for the first two views: (0, 0) sees all; (0, 1) every column but the first
    _, c2 = P.recover_patches(feats[:2], maps[:2], return_counts=True)
    assert c2.view(4, 4).tolist() == [[1, 2, 2, 2]] * 4
    assert counts.sum() == sum(int((m >= 0).all(0).sum()) for m in maps)


def test_recover_averages_over_valid_views_only():
    """Two views, identity and (0, 1): patch (h, 0) keeps view 0's feature, every other patch (h, w) is the mean of
    view 0 at (h, w) and view 1 at (h, w - 1); view 1's last column (the fill) is dropped."""
    f = torch.randn(2, 1, 16, 5)
    maps = torch.stack([P.patch_index_map(GRID, (0, 0)), P.patch_index_map(GRID, (0, 1))])
    out = P.recover_patches(f, maps).view(4, 4, 5)
    a, b = f[0, 0].view(4, 4, 5), f[1, 0].view(4, 4, 5)
    torch.testing.assert_close(out[:, 0], a[:, 0])
    torch.testing.assert_close(out[:, 1:], (a[:, 1:] + b[:, :-1]) / 2)


# ---------------------------------------------------------------------------------------------------- teacher
def test_teacher_one_view_is_the_plain_vit():
    vit, x = tiny_vit(), _images()
    teacher = P.PHRegTeacher(vit, num_views=1)
    torch.testing.assert_close(teacher(x), _vit_patches(vit, x), rtol=0, atol=1e-6)
    assert teacher.last_views[0].tolist() == [[0, 0]]
    assert all(not t.requires_grad for t in teacher.parameters())
    assert all(t.requires_grad for t in vit.parameters())  # the caller's ViT is untouched (a deep copy)
    teacher.train()
    assert not teacher.vit.training


def test_teacher_matches_a_hand_built_average():
    """Views (0, 0) and (0, 0) flipped: patch (h, w) = mean of the plain ViT's features of x at (h, w) and of the
    mirrored image at (h, 3 - w). Views (0, 0) and (0, 1): as in test_recover_averages_over_valid_views_only."""
    vit, x = tiny_vit(), _images()
    teacher = P.PHRegTeacher(vit, num_views=2, fill=0.3)
    a = _vit_patches(vit, x).view(2, 4, 4, -1)
    b = _vit_patches(vit, x.flip(-1)).view(2, 4, 4, -1)
    out = teacher(x, views=(torch.tensor([[0, 0], [0, 0]]), torch.tensor([False, True]))).view(2, 4, 4, -1)
    torch.testing.assert_close(out, (a + b.flip(2)) / 2, rtol=0, atol=1e-5)
    shifted = torch.cat([x[..., 4:], torch.full((2, 3, 16, 4), 0.3)], dim=-1)
    c = _vit_patches(vit, shifted).view(2, 4, 4, -1)
    out = teacher(x, views=(torch.tensor([[0, 0], [0, 1]]), torch.tensor([False, False]))).view(2, 4, 4, -1)
    torch.testing.assert_close(out[:, :, 0], a[:, :, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, :, 1:], (a[:, :, 1:] + c[:, :, :-1]) / 2, rtol=0, atol=1e-5)


def test_teacher_draws_new_seeded_views():
    vit, x = tiny_vit(), _images()
    t1, t2 = P.PHRegTeacher(vit, num_views=4, max_shift=1, seed=5), P.PHRegTeacher(vit, num_views=4, max_shift=1,
                                                                                    seed=5)
    torch.testing.assert_close(t1(x), t2(x))
    first = t1.last_views
    t1(x)
    assert first[0][0].tolist() == [0, 0] and t1.last_views[0][0].tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------- student
def test_student_shape_registers_without_positions():
    vit, x = tiny_vit(), _images()
    st = P.PHRegStudent(vit, num_registers=3, seed=0).eval()
    assert st(x).shape == (2, 16, 32) and st.num_prefix_tokens == 4
    assert st.forward_features(x).shape == (2, 3 + 1 + 16, 32)
    tokens = st.embed(x)
    assert torch.equal(tokens[:, :3], st.registers.detach().expand(2, 3, 32))  # no position added
    torch.testing.assert_close(tokens[:, 3:], vit.embed(x))  # then CLS and patches, as the ViT embeds them
    assert abs(st.registers.std().item() * math.sqrt(32) - 1) < 0.5  # randn / sqrt(D)
    # with no positions the registers are a set: permuting them leaves the patch tokens as they were
    out = st(x)
    with torch.no_grad():
        st.registers.copy_(st.registers[:, [2, 0, 1]])
    torch.testing.assert_close(st(x), out, rtol=0, atol=1e-5)
    with torch.no_grad():  # and they are seen: moving one changes the patch tokens (not along (1, ..., 1): the
        st.registers[:, 0] += 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(1))  # LN removes that)
    assert not torch.allclose(st(x), out, atol=1e-3)


def test_student_without_registers_is_the_plain_vit():
    vit, x = tiny_vit(), _images()
    st = P.PHRegStudent(vit, num_registers=0).eval()
    torch.testing.assert_close(st(x), _vit_patches(vit, x), rtol=0, atol=1e-6)


def test_only_registers_pos_patch_embed_and_last_block_train():
    vit = tiny_vit()
    st = P.PHRegStudent(vit, num_registers=2, seed=0)
    want = {"registers", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"} | \
        {f"vit.blocks.1.{n}" for n, _ in vit.blocks[1].named_parameters()}
    assert set(P.set_trainable(st)) == want
    assert {n for n, t in st.named_parameters() if t.requires_grad} == want
    P.distill_loss(st(_images()), torch.randn(2, 16, 32)).backward()
    assert {n for n, t in st.named_parameters() if t.grad is not None} == want
    assert st.vit.cls_token.grad is None and st.vit.norm.weight.grad is None
    assert all(t.requires_grad for t in vit.parameters()) and vit.pos_embed.grad is None  # caller's ViT untouched


# ---------------------------------------------------------------------------------------------- loss, training
def test_loss_by_hand():
    f = torch.randn(2, 5, 8)
    assert P.distill_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    e = torch.eye(8)
    a, b = e[0].expand(2, 5, 8), e[1].expand(2, 5, 8)  # orthogonal unit vectors: cos 0, MSE 2 / D
    assert P.distill_loss(a, b).item() == pytest.approx(1 + 2 / 8, abs=1e-6)
    assert P.distill_loss(a, b, mse_weight=0.0).item() == pytest.approx(1.0, abs=1e-6)
    loss, parts = P.distill_loss(a, -a, return_parts=True)  # opposite: cos -1, MSE 4 / D
    assert parts["cos"].item() == pytest.approx(-1.0, abs=1e-6) and parts["mse"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(2.5, abs=1e-6)


def test_exp_decay_lr():
    lrs = [P.exp_decay_lr(t, 5, 1e-4, 1e-6) for t in range(5)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-6)
    assert all(b / a == pytest.approx(10 ** -0.5) for a, b in zip(lrs, lrs[1:]))
    assert P.exp_decay_lr(0, 1) == P.LR


def test_a_few_distillation_steps_lower_the_loss():
    vit, x = tiny_vit(), _images(4, seed=1)
    teacher = P.PHRegTeacher(vit, num_views=3, max_shift=1, seed=0)
    st = P.PHRegStudent(vit, num_registers=2, seed=0)
    views = teacher.draw_views()
    target = teacher(x, views=views)

    def loss():
        with torch.no_grad():
            return P.distill_loss(st.eval()(x), target).item()

    before = loss()
    frozen = {n: t.detach().clone() for n, t in st.named_parameters() if not t.requires_grad}
    hist = P.distill(st, teacher, x, steps=12, batch_size=4, lr=3e-3, end_lr=1e-3, seed=0)
    assert len(hist) == 12 and hist[0]["lr"] == pytest.approx(3e-3) and hist[-1]["lr"] == pytest.approx(1e-3)
    assert set(hist[0]) == {"step", "lr", "loss", "cos", "mse"}
    assert loss() < 0.8 * before
    assert all(torch.equal(t, frozen[n]) for n, t in st.named_parameters() if n in frozen)
    assert not st.training


# ------------------------------------------------------------------------------------------------ measurements
def test_smoothness_by_hand():
    e = torch.eye(3)[0]
    const = e.expand(1, 4, 3)  # a 2 x 2 grid of one vector: every cosine 1
    assert P.smoothness(const, (2, 2)) == pytest.approx({"neighbour": 1.0, "random": 1.0, "score": 0.0})
    checker = torch.stack([e, -e, -e, e]).unsqueeze(0)  # neighbours opposite; 12 ordered pairs sum to 0 - 4
    got = P.smoothness(checker, (2, 2))
    assert got == pytest.approx({"neighbour": -1.0, "random": -1 / 3, "score": -2 / 3})
    # masked to the top row: one neighbour pair (cos -1), and it is the only pair
    mask = torch.tensor([[True, True, False, False]])
    assert P.smoothness(checker, (2, 2), mask) == pytest.approx({"neighbour": -1.0, "random": -1.0, "score": 0.0})


def test_outlier_fraction_and_patch_features():
    feats = torch.ones(1, 20, 1)
    feats[0, 7] = 100.0  # norms: 19 ones and 100; mean 5.95, std 21.6 -> only the 100 is above mean + 3 std
    assert P.outlier_fraction(feats) == pytest.approx(0.05)
    assert P.outlier_fraction(torch.ones(2, 5, 4)) == 0.0
    vit, x = tiny_vit(), _images(3)
    st = P.PHRegStudent(vit, num_registers=2, seed=0)
    for model in (vit, st, P.PHRegTeacher(vit, num_views=2)):
        f = P.patch_features(model, x, batch_size=2)
        assert f.shape == (3, 16, 32) and f.dtype == torch.float32
    torch.testing.assert_close(P.patch_features(vit, x), _vit_patches(vit, x))
    st.train()
    P.patch_features(st, x)
    assert st.training  # mode restored


def test_probe_patches_and_segmentation_probe():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[:, 2:9, 5:11] = True
    data = ImageDataset(torch.rand(6, 3, 16, 16, generator=g), torch.arange(6) % 5, name="toy", split="train",
                        classes=[str(c) for c in range(5)], masks=masks)
    vit = tiny_vit()
    feats, labels = P.probe_patches(vit, data)
    assert feats.shape == (6 * 16, 32) and torch.equal(labels, patch_mask(masks, 4).long().flatten())
    _, cls = P.probe_patches(vit, data, labels="class")
    assert torch.equal(cls, (patch_mask(masks, 4).long() * (data.labels.view(-1, 1) + 1)).flatten())
    res = P.segmentation_probe(vit, data, data, epochs=5)
    assert 0 <= res["miou"] <= 1 and set(res) == {"miou", "acc", "train_acc"}


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    vit, x = tiny_vit(), _images()
    with pytest.raises(ValueError, match="num_samples"):
        P.farthest_point_sample(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="points"):
        P.farthest_point_sample(torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="shift_frac"):
        P.sample_views(GRID, 3, shift_frac=1.5)
    with pytest.raises(ValueError, match="max_shift"):
        P.sample_views(GRID, 3, max_shift=4)
    with pytest.raises(ValueError, match="dx, in patches"):
        P.patch_index_map(GRID, (0, 4))
    with pytest.raises(TypeError, match="flip"):
        P.patch_index_map(GRID, (0, 1), flip=1)
    with pytest.raises(ValueError, match="fill"):
        P.shift_images(x, (0, 1), patch_size=4, fill=(1.0, 0.0))
    with pytest.raises(ValueError, match="patch_size=3"):
        P.shift_images(x, (0, 1), patch_size=3)
    with pytest.raises(ValueError, match="seen by no view"):
        P.recover_patches(torch.zeros(1, 1, 16, 2), P.patch_index_map(GRID, (0, 1))[None])
    with pytest.raises(ValueError, match="same original patch"):
        P.recover_patches(torch.zeros(1, 1, 16, 2), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="flips"):
        P.make_views(x, torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, dtype=torch.bool), patch_size=4)
    with pytest.raises(TypeError, match="vit"):
        P.PHRegTeacher("vit")
    with pytest.raises(ValueError, match="num_views"):
        P.PHRegTeacher(vit, num_views=0)
    with pytest.raises(ValueError, match="fill"):
        P.PHRegTeacher(vit, fill=(1.0, 1.0))
    with pytest.raises(ValueError, match="images"):
        P.PHRegTeacher(vit, num_views=1)(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="num_registers"):
        P.PHRegStudent(vit, num_registers=-1)
    with pytest.raises(TypeError, match="student"):
        P.set_trainable(vit)
    with pytest.raises(ValueError, match="same shape"):
        P.distill_loss(torch.zeros(1, 4, 8), torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="mse_weight"):
        P.distill_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), mse_weight=-1.0)
    with pytest.raises(ValueError, match="step"):
        P.exp_decay_lr(5, 5)
    with pytest.raises(ValueError, match="steps"):
        P.distill(P.PHRegStudent(vit, 1), P.PHRegTeacher(vit, 1), x, steps=0)
    with pytest.raises(ValueError, match="grid"):
        P.smoothness(torch.zeros(1, 16, 4), (3, 3))
    with pytest.raises(ValueError, match="mask"):
        P.smoothness(torch.zeros(1, 4, 4), (2, 2), torch.tensor([[True, False, False, False]]))
    with pytest.raises(ValueError, match="labels"):
        P.probe_patches(vit, x, labels="pixels")
    with pytest.raises(TypeError, match="model"):
        P.patch_features(torch.nn.Linear(2, 2), x)
