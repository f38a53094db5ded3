"""Procedural chest x-rays (``thorax_xrays``), ``MultiLabelDataset`` and ``mean_auc``."""
import numpy as np
import pytest
import torch

from vitlab.data import load
from vitlab.data.procedural import seeded_generator
from vitlab.data.thorax import (FINDINGS, PREVALENCE, THORAX_SIZES, MultiLabelDataset, _draw, _render, _thorax,
                                thorax_xrays)
from vitlab.metrics import mean_auc
from vitlab.profiles import profile

CPU = profile("cpu")


@pytest.fixture(scope="module")
def train2k():
    return thorax_xrays("train", n=2000)


# ------------------------------------------------------------------------------------------ the dataset
def test_shapes_dtypes_ranges(train2k):
    ds = train2k
    assert isinstance(ds, MultiLabelDataset) and len(ds) == 2000
    assert ds.images.shape == (2000, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (2000, 5) and ds.labels.dtype == torch.float32
    assert set(ds.labels.unique().tolist()) == {0.0, 1.0}
    assert ds.masks.shape == (2000, 5, 32, 32) and ds.masks.dtype == torch.bool
    assert 0 <= ds.images.min() and ds.images.max() <= 1 and 0.2 < ds.images.mean() < 0.7
    assert (ds.classes, ds.num_classes, ds.in_chans, ds.img_size, ds.split) == (list(FINDINGS), 5, 1, 32, "train")
    x, y = ds[7]
    assert torch.equal(x, ds.images[7]) and torch.equal(y, ds.labels[7])
    sub = ds.subset([3, 1])
    assert torch.equal(sub.labels, ds.labels[[3, 1]]) and torch.equal(sub.masks, ds.masks[[3, 1]])
    assert "MultiLabelDataset" in repr(ds)
    big = thorax_xrays("val", img_size=64, n=3)
    assert big.images.shape == (3, 1, 64, 64) and big.masks.shape == (3, 5, 64, 64)


def test_prevalence_near_targets(train2k):
    prev = train2k.prevalence()
    for k, f in enumerate(FINDINGS):
        p = PREVALENCE[f]
        assert abs(prev[k] - p) < 3.5 * (p * (1 - p) / 2000) ** 0.5 + 1e-3, (f, prev[k].item(), p)
    # drawn independently: the pairwise correlations are near zero
    corr = torch.corrcoef(train2k.labels.T)
    assert (corr - torch.eye(5)).abs().max() < 0.08


def test_masks_mark_present_findings_only(train2k):
    area = train2k.masks.flatten(2).sum(-1)  # [N,5]
    y = train2k.labels.bool()
    assert not area[~y].any()  # no finding, no mask
    assert (area[y] > 0).float().mean() > 0.97  # a present finding is (nearly always) visible somewhere


def test_determinism_and_prefix(train2k):
    a = thorax_xrays("train", n=260)  # crosses a chunk boundary (250)
    assert torch.equal(train2k.images[:260], a.images) and torch.equal(train2k.labels[:260], a.labels)
    assert torch.equal(train2k.masks[:260], a.masks)
    _thorax.cache_clear()  # drawn again, not served from the cache
    b = thorax_xrays("train", n=260)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.images is not b.images
    other = thorax_xrays("train", seed=4, n=40)
    assert not torch.equal(other.images, a.images[:40]) and not torch.equal(other.labels, a.labels[:40])
    assert not torch.equal(thorax_xrays("val", n=40).images, a.images[:40])


def test_max_train_is_a_prefix_and_load_keeps_it(train2k):
    assert THORAX_SIZES == {"train": 4000, "val": 500, "test": 1000}
    capped = thorax_xrays("train", n=2000, max_train=300)
    assert len(capped) == 300 and torch.equal(capped.images, train2k.images[:300])
    loaded = load("thorax_xrays", "train", CPU.replace(max_train=300), n=2000)
    assert isinstance(loaded, MultiLabelDataset) and torch.equal(loaded.images, train2k.images[:300])
    assert len(thorax_xrays("val", n=40, max_train=10)) == 40  # val/test are never cut
    assert len(load("thorax_xrays", "val", "smoke", n=40)) == 40


# ------------------------------------------------------------------------------------------ findings
def _pair(k: int, m: int = 64, size: int = 32):
    """The same m patients rendered without findings and with finding k only."""
    p = _draw(m, size, seeded_generator(11, 0, 0, 7))
    p["labels"][:] = False
    without = _render(p, size)[0]
    p["labels"][:, k] = True
    with_, masks = _render(p, size)
    return without, with_, masks[:, k]


@pytest.mark.parametrize("k", range(5))
def test_each_finding_changes_the_image_where_its_mask_is(k):
    without, with_, mask = _pair(k)
    diff = (with_ - without)[:, 0]
    assert mask.flatten(1).any(1).float().mean() > 0.95
    assert (diff.flatten(1).abs().amax(1) > 0.03).float().mean() > 0.95  # visible in (nearly) every patient
    # the change sits at the finding: most of it within one pixel of the mask
    near = torch.nn.functional.max_pool2d(mask[:, None].float(), 3, 1, 1)[:, 0].bool()
    assert diff.abs()[near].sum() / diff.abs().sum() > 0.85
    inside = diff[mask].mean()
    if FINDINGS[k] == "pneumothorax":  # a lucent rim (with a thin bright pleural line inside it)
        assert inside < 0
    else:  # opacities: brighter
        assert inside > 0.02


def test_effusion_brightens_the_lung_bases(train2k):
    x, eff = train2k.images[:, 0], train2k.labels[:, 1].bool()
    bases = torch.cat([x[:, 17:23, 4:12].flatten(1), x[:, 17:23, 20:28].flatten(1)], 1).mean(1)
    assert bases[eff].mean() > bases[~eff].mean() + 0.01


def test_cardiomegaly_widens_the_heart():
    without, with_, mask = _pair(2)
    assert (mask.flatten(1).sum(1) > 0).all()
    assert with_.mean() > without.mean()  # a larger heart shadow covers dark lung


def test_learnable_but_not_trivial(train2k):
    """Logistic regression on raw pixels: some findings (cardiomegaly, effusion) are linearly visible, the
    small or subtle ones (nodule, pneumothorax) are not; a model has to learn features."""
    from sklearn.linear_model import LogisticRegression

    tr, te = train2k.subset(range(1000)), train2k.subset(range(1000, 2000))
    scores = []
    for k in range(5):
        clf = LogisticRegression(C=0.1, max_iter=300).fit(tr.images.flatten(1).numpy(), tr.labels[:, k].numpy())
        scores.append(clf.decision_function(te.images.flatten(1).numpy()))
    m, per = mean_auc(np.stack(scores, 1), te.labels, classes=FINDINGS)
    assert 0.6 < m < 0.8, per
    assert max(per) < 0.98 and min(per) > 0.4, per


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, err, match", [
    ({"split": "training"}, ValueError, "unknown split"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"img_size": 8}, ValueError, "img_size"),
    ({"img_size": 32.0}, ValueError, "img_size"),
    ({"img_size": True}, ValueError, "img_size"),
    ({"n": 0}, ValueError, "n must be"),
    ({"n": "10"}, ValueError, "n must be"),
    ({"max_train": 0}, ValueError, "max_train"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        thorax_xrays(**kwargs)


def test_dataset_checks():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(TypeError, match="labels"):
        MultiLabelDataset(x, torch.zeros(2, 3), name="t", split="train", classes=["a", "b"])
    with pytest.raises(TypeError, match="images"):
        MultiLabelDataset(x.double(), torch.zeros(2, 2), name="t", split="train", classes=["a", "b"])
    ds = MultiLabelDataset(x, torch.zeros(2, 2), name="t", split="train", classes=["a", "b"])
    with pytest.raises(ValueError, match="indices"):
        ds.subset([5])


# ------------------------------------------------------------------------------------------ mean_auc
def test_mean_auc_hand_cases():
    y = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 0]])
    s = torch.tensor([[0.1, 0.9], [0.4, 0.2], [0.35, 0.8], [0.8, 0.3]])
    m, per = mean_auc(s, y)
    assert per[0] == pytest.approx(0.75) and per[1] == pytest.approx(1.0) and m == pytest.approx(0.875)
    assert mean_auc(-s[:, 1:], y[:, 1:])[0] == pytest.approx(0.0)  # reversed scores
    assert mean_auc(np.array([0.2, 0.7]), np.array([0, 1]))[0] == 1.0  # 1-D: one finding


def test_mean_auc_errors():
    y = torch.tensor([[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="'b' has only positive"):
        mean_auc(torch.rand(2, 2), y, classes=["a", "b"])
    with pytest.raises(ValueError, match="column 1"):
        mean_auc(torch.rand(2, 2), y)
    with pytest.raises(ValueError, match="same shape"):
        mean_auc(torch.rand(2, 3), y)
    with pytest.raises(ValueError, match="0/1"):
        mean_auc(torch.rand(2, 2), torch.tensor([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="classes"):
        mean_auc(torch.rand(2, 2), torch.tensor([[0, 1], [1, 0]]), classes=["a"])
