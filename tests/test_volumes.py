"""3-D shape volumes (``shape_volumes``), ``VolumeDataset`` and the matched 2-D views (``volume_slices``)."""
import pytest
import torch

from vitlab.data import ImageDataset, load
from vitlab.data.dataset import stratified_prefix
from vitlab.data.volumes import VOLUME_CLASSES, VOLUME_SIZES, VolumeDataset, _CHUNK, shape_volumes, volume_slices
from vitlab.profiles import profile

CPU = profile("cpu")


@pytest.fixture(scope="module")
def train():
    return shape_volumes("train")


def test_shapes_dtypes_ranges(train):
    ds = train
    assert isinstance(ds, VolumeDataset) and len(ds) == VOLUME_SIZES["train"] == 2000
    assert ds.images.shape == (2000, 1, 16, 16, 16) and ds.images.dtype == torch.float32
    assert ds.volumes is ds.images
    assert ds.labels.shape == (2000,) and ds.labels.dtype == torch.int64
    assert ds.masks.shape == (2000, 16, 16, 16) and ds.masks.dtype == torch.bool
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert (ds.classes, ds.num_classes, ds.in_chans, ds.img_size) == (list(VOLUME_CLASSES), 6, 1, 16)
    # every volume holds an object, brighter than its background, and well inside the volume
    assert ds.masks.flatten(1).sum(1).min() >= 8
    inside = (ds.images[:, 0] * ds.masks).flatten(1).sum(1) / ds.masks.flatten(1).sum(1)
    outside = (ds.images[:, 0] * ~ds.masks).flatten(1).sum(1) / (~ds.masks).flatten(1).sum(1)
    assert (inside > outside + 0.2).all()
    border = ds.masks.clone()
    border[:, 1:-1, 1:-1, 1:-1] = False
    assert border.flatten(1).sum(1).max() <= 4  # objects stay (almost) clear of the faces
    x, y = ds[5]
    assert torch.equal(x, ds.images[5]) and y == ds.labels[5]
    assert "VolumeDataset" in repr(ds)
    assert shape_volumes("val", size=24, n=3).images.shape == (3, 1, 24, 24, 24)


def test_class_balance(train):
    counts = train.class_counts()
    assert counts.sum() == 2000 and counts.max() - counts.min() <= 12
    assert torch.equal(train.subset(range(_CHUNK)).class_counts(), torch.full((6,), _CHUNK // 6))
    assert len(set(train.labels[:30].tolist())) >= 5  # shuffled, not sorted


def test_determinism_and_prefix():
    a, b = shape_volumes("train", seed=2, n=130), shape_volumes("train", seed=2, n=130)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    longer = shape_volumes("train", seed=2, n=250)
    assert torch.equal(longer.images[:130], a.images) and torch.equal(longer.labels[:130], a.labels)
    assert torch.equal(longer.masks[:130], a.masks)
    assert not torch.equal(shape_volumes("train", seed=3, n=130).images, a.images)
    assert not torch.equal(shape_volumes("test", seed=2, n=130).images, a.images)


def test_max_train_and_load():
    full = shape_volumes("train", seed=1, n=300)
    want = stratified_prefix(full, 100)
    capped = shape_volumes("train", seed=1, n=300, max_train=100)
    assert torch.equal(capped.images, want.images) and torch.equal(capped.labels, want.labels)
    assert capped.class_counts().min() >= 100 // 6 - 1
    loaded = load("shape_volumes", "train", CPU.replace(max_train=100), seed=1, n=300)
    assert isinstance(loaded, VolumeDataset) and torch.equal(loaded.images, want.images)
    assert len(shape_volumes("val", n=50, max_train=10)) == 50


def test_volume_slices(train):
    ds = train.subset(range(12))
    centre = volume_slices(ds)
    assert isinstance(centre, ImageDataset) and centre.images.shape == (12, 1, 16, 16)
    assert torch.equal(centre.images, ds.images[:, :, 8]) and torch.equal(centre.labels, ds.labels)
    assert torch.equal(centre.masks, ds.masks[:, 8])
    mip = volume_slices(ds, mode="max", axis=2)
    assert torch.equal(mip.images, ds.images.amax(dim=4)) and torch.equal(mip.masks, ds.masks.any(dim=3))
    assert torch.allclose(volume_slices(ds.images, mode="mean", axis=1), ds.images.mean(dim=3))


def test_shell_is_hollow_and_ellipsoid_is_not(train):
    """The central slice through a shell is a ring; through an ellipsoid, a filled disk."""
    def filled(i):  # is the centroid of the object's central slice inside the object?
        sl = train.masks[i, 8]
        yy, xx = sl.nonzero().float().mean(0).round().long().tolist()
        return bool(sl[yy, xx])
    shells = (train.labels == 4).nonzero().flatten()[:20]
    solids = (train.labels == 0).nonzero().flatten()[:20]
    assert sum(filled(int(i)) for i in shells) <= 4
    assert sum(filled(int(i)) for i in solids) >= 14


def test_classes_separable_above_chance(train):
    from sklearn.linear_model import LogisticRegression

    tr, te = train.subset(range(800)), train.subset(range(1400, 2000))
    clf = LogisticRegression(C=0.1, max_iter=300).fit(tr.images.flatten(1).numpy(), tr.labels.numpy())
    acc = clf.score(te.images.flatten(1).numpy(), te.labels.numpy())
    assert 0.4 < acc < 0.9  # chance is 1/6; rotations keep a linear model far from perfect


@pytest.mark.parametrize("kwargs, err, match", [
    ({"split": "dev"}, ValueError, "unknown split"),
    ({"seed": "0"}, TypeError, "seed"),
    ({"size": 4}, ValueError, "size"),
    ({"size": 16.0}, ValueError, "size"),
    ({"n": 0}, ValueError, "n must be"),
    ({"max_train": -1}, ValueError, "max_train"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        shape_volumes(**kwargs)


def test_bad_slices_and_dataset():
    v = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        volume_slices(v, mode="median")
    with pytest.raises(ValueError, match="axis"):
        volume_slices(v, axis=3)
    with pytest.raises(TypeError, match="data"):
        volume_slices(torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="labels"):
        VolumeDataset(v, torch.zeros(2), name="v", split="train", classes=["a"])
    with pytest.raises(ValueError, match="cubes"):
        VolumeDataset(torch.zeros(2, 1, 4, 4, 5), torch.zeros(2, dtype=torch.long), name="v", split="train",
                      classes=["a"])
