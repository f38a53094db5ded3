"""vitlab.data: fixed splits, profile caps, cluttered scenes, long tails, corruptions, offline CIFAR."""
import hashlib
import math
import socket
import time

import pytest
import torch

from vitlab import data
from vitlab.data import online, scenes
from vitlab.profiles import profile

CPU = profile("cpu")  # max_train None: whole splits


def _hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images]


# ------------------------------------------------------------------------------------------ real datasets
@pytest.mark.parametrize("name, sizes, shape", [
    ("mnist5k", (3500, 500, 1000), (1, 28, 28)),
    ("digits8", (1257, 180, 360), (1, 8, 8)),
])
def test_fixed_splits(name, sizes, shape):
    splits = {s: data.load(name, s, CPU) for s in data.SPLITS}
    for (split, ds), n in zip(splits.items(), sizes):
        assert len(ds) == n and ds.images.shape == (n, *shape)
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert 0 <= ds.images.min() and ds.images.max() <= 1 and ds.images.max() > 0.9
        assert (ds.num_classes, ds.in_chans, ds.img_size, ds.split) == (10, 1, shape[-1], split)
        assert ds.classes == [str(d) for d in range(10)] and ds.masks is None
        counts = ds.class_counts()
        assert counts.max() - counts.min() <= max(2, n // 100)  # stratified
        x, y = ds[3]
        assert torch.equal(x, ds.images[3]) and y == ds.labels[3]
    # disjoint by content, and the same images on every call (whatever the seed)
    hashes = {s: set(_hashes(ds.images)) for s, ds in splits.items()}
    assert sum(len(h) for h in hashes.values()) == sum(sizes)
    again = data.load(name, "test", CPU, seed=7)
    assert torch.equal(again.images, splits["test"].images) and torch.equal(again.labels, splits["test"].labels)


def test_mnist5k_is_shuffled():
    labels = data.load("mnist5k", "train", CPU).labels
    assert len(set(labels[:100].tolist())) == 10  # the source is sorted by label
    assert torch.equal(torch.bincount(labels), torch.full((10,), 350))


def test_max_train_caps_train_only():
    smoke = profile("smoke")
    ds = data.load("mnist5k", "train", smoke)
    assert len(ds) == smoke.max_train == 2000
    assert torch.equal(ds.class_counts(), torch.full((10,), 200))
    small = data.load("mnist5k", "train", CPU.replace(max_train=123))
    assert len(small) == 123 and small.class_counts().min() >= 12
    # a deterministic, nested prefix of the full split
    full_hashes = _hashes(data.load("mnist5k", "train", CPU).images)
    assert set(_hashes(small.images)) <= set(_hashes(ds.images)) <= set(full_hashes)
    assert len(data.load("mnist5k", "test", smoke.replace(max_train=10))) == 1000
    assert len(data.load("mnist5k", "train", "smoke")) == 2000  # a profile name works too


def test_subset_and_repr():
    ds = data.load("cluttered_scenes", "val", CPU, n=20)
    sub = ds.subset([3, 1, 4])
    assert torch.equal(sub.images, ds.images[[3, 1, 4]]) and torch.equal(sub.masks, ds.masks[[3, 1, 4]])
    assert len(ds.subset(ds.labels == ds.labels[0])) == int((ds.labels == ds.labels[0]).sum())
    assert "cluttered_scenes" in repr(ds) and "n=20" in repr(ds)
    with pytest.raises(ValueError, match=r"subset: a bool mask must have shape \(20,\)"):
        ds.subset(torch.ones(5, dtype=torch.bool))  # one row rule for every dataset class (data.dataset.row_indices)


# ------------------------------------------------------------------------------------------ cluttered scenes
def test_scenes_deterministic_and_seeded():
    scenes._scenes.cache_clear()
    a = data.load("cluttered_scenes", "val", CPU, n=100)
    scenes._scenes.cache_clear()
    b = data.load("cluttered_scenes", "val", CPU, n=100)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)
    c = data.load("cluttered_scenes", "val", CPU, n=100, seed=1)
    assert (a.images - c.images).abs().mean() > 0.05
    # the first scenes do not depend on n; splits differ
    d = data.load("cluttered_scenes", "val", CPU, n=700)
    assert torch.equal(d.images[:100], a.images)
    t = data.load("cluttered_scenes", "test", CPU, n=100)
    assert (a.images - t.images).abs().mean() > 0.05


@pytest.mark.parametrize("img_size, in_chans", [(32, 3), (48, 1), (64, 3)])
def test_scenes_content(img_size, in_chans):
    n = 200
    ds = data.load("cluttered_scenes", "test", CPU, img_size=img_size, in_chans=in_chans, n=n)
    assert ds.images.shape == (n, in_chans, img_size, img_size) and ds.images.dtype == torch.float32
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert ds.masks.shape == (n, img_size, img_size) and ds.masks.dtype == torch.bool
    assert ds.labels.dtype == torch.int64 and len(set(ds.labels.tolist())) == 10
    # the target digit is non-empty, sized ~0.4-0.6 of the image, and fully inside (off the border)
    area = ds.masks.flatten(1).float().mean(1)
    assert area.min() > 0.005 and area.max() < 0.4
    border = ds.masks[:, [0, -1]].any() | ds.masks[:, :, [0, -1]].any()
    assert not border
    rows = ds.masks.any(2).float()
    height = rows.shape[1] - rows.argmax(1) - rows.flip(1).argmax(1)
    assert height.float().mean() > 0.3 * img_size and height.max() <= 0.75 * img_size
    # every patch carries signal: background patches (no target pixel) are textured
    p = 4
    obj = data.patch_mask(ds.masks, p)  # [N, L]
    g = img_size // p
    patches = ds.images.reshape(n, in_chans, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    std = patches.std(dim=-1)
    assert (std[~obj] > 0.02).float().mean() > 0.95


def test_patch_mask():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 5, 2] = True  # patch (1, 0) for p=4
    masks[1, :, :] = True
    pm = data.patch_mask(masks, 4)
    assert pm.tolist() == [[False, False, True, False], [True] * 4]
    assert data.patch_mask(masks, 2).shape == (2, 16)


# ------------------------------------------------------------------------------------------ long tail
@pytest.mark.parametrize("imbalance, expected", [
    (10, [350, 270, 209, 162, 125, 97, 75, 58, 45, 35]),
    (100, [350, 209, 125, 75, 45, 27, 16, 9, 5, 3]),
])
def test_long_tailed_counts_exact(imbalance, expected):
    base = data.load("mnist5k", "train", CPU)
    assert expected == [math.floor(350 * imbalance ** (-c / 9)) for c in range(10)]
    lt = data.long_tailed(base, imbalance, seed=3)
    assert lt.class_counts().tolist() == expected
    assert set(_hashes(lt.images)) <= set(_hashes(base.images))
    assert torch.equal(data.long_tailed(base, imbalance, seed=3).images, lt.images)
    assert not torch.equal(data.long_tailed(base, imbalance, seed=4).images, lt.images)


def test_mnist5k_lt():
    lt = data.load("mnist5k_lt", "train", CPU, imbalance=100)
    assert lt.class_counts().tolist() == [350, 209, 125, 75, 45, 27, 16, 9, 5, 3]
    assert lt.name == "mnist5k_lt"
    val = data.load("mnist5k_lt", "val", CPU, imbalance=100)
    assert torch.equal(val.class_counts(), torch.full((10,), 50))
    assert data.load("mnist5k_lt", "train", CPU, imbalance=10).class_counts()[-1] == 35


# ------------------------------------------------------------------------------------------ corruptions
@pytest.fixture(scope="module")
def clean():
    return data.load("mnist5k", "test", CPU).images[:32].clone()


@pytest.mark.parametrize("kind", ["gaussian_noise", "blur", "contrast", "occlusion", "patch_shuffle"])
def test_corrupt_monotone_and_pure(clean, kind):
    before = clean.clone()
    outs = [data.corrupt(clean, kind, s, seed=5) for s in range(1, 6)]
    assert torch.equal(clean, before)  # input untouched
    mse = [((o - clean) ** 2).mean().item() for o in outs]
    assert all(a < b for a, b in zip(mse, mse[1:])), mse
    for o in outs:
        assert o.shape == clean.shape and o.dtype == clean.dtype and 0 <= o.min() and o.max() <= 1
    assert torch.equal(data.corrupt(clean, kind, 3, seed=5), outs[2])  # deterministic for the seed


def test_corrupt_seed_changes_noise(clean):
    a = data.corrupt(clean, "gaussian_noise", 2, seed=0)
    assert not torch.equal(a, data.corrupt(clean, "gaussian_noise", 2, seed=1))


def test_corrupt_occlusion_nested(clean):
    # squares share a centre across severities, so a pixel occluded at s stays occluded at s+1
    x = torch.zeros(4, 1, 28, 28)
    hit = [data.corrupt(x, "occlusion", s, seed=2) > 0 for s in range(1, 6)]
    for a, b in zip(hit, hit[1:]):
        assert (a <= b).all() and b.sum() > a.sum()


@pytest.mark.parametrize("patch_size", [4, 7])
def test_patch_shuffle_keeps_patches(clean, patch_size):
    n, c, h, w = clean.shape
    g = h // patch_size

    def patches(x):  # [N, L, C*p*p]
        return x.reshape(n, c, g, patch_size, g, patch_size).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)

    moved = []
    for s in (1, 5):
        out = data.corrupt(clean, "patch_shuffle", s, seed=1, patch_size=patch_size)
        a, b = patches(clean), patches(out)
        for i in range(n):  # the same multiset of patches, only their places change
            sa = sorted(map(tuple, a[i].tolist()))
            sb = sorted(map(tuple, b[i].tolist()))
            assert sa == sb
        moved.append((a != b).any(-1).float().mean().item())
    assert 0 < moved[0] < moved[1]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda: data.load("foo"), ValueError, r"unknown dataset 'foo'.*mnist5k"),
    (lambda: data.load("mnist5k", "valid"), ValueError, r"unknown split 'valid'.*train"),
    (lambda: data.load("mnist5k", profile="huge"), ValueError, r"unknown profile 'huge'"),
    (lambda: data.load("mnist5k", img_size=32), ValueError, r"mnist5k: img_size must be an int in \[4, 28\]"),
    (lambda: data.load("mnist5k", n=32), TypeError, r"'mnist5k' takes no keyword argument 'n'"),
    (lambda: data.load("mnist5k", allow_download="yes"), TypeError, r"allow_download"),
    (lambda: data.load("mnist5k", seed=1.5), TypeError, r"seed"),
    (lambda: data.load("cluttered_scenes", img_size=16), ValueError, r"img_size must be an int in 32\.\.64, got 16"),
    (lambda: data.load("cluttered_scenes", img_size=65), ValueError, r"img_size.*65"),
    (lambda: data.load("cluttered_scenes", img_size=32.0), ValueError, r"img_size.*32\.0"),
    (lambda: data.load("cluttered_scenes", in_chans=2), ValueError, r"in_chans must be 1 or 3, got 2"),
    (lambda: data.load("cluttered_scenes", in_chans=1.0), ValueError, r"in_chans must be 1 or 3, got 1\.0"),
    (lambda: data.load("cluttered_scenes", n=0), ValueError, r"n must be a positive int"),
    (lambda: data.cluttered_scenes("dev"), ValueError, r"cluttered_scenes: unknown split 'dev'"),
    (lambda: data.load("mnist5k_lt", imbalance=0.5), ValueError, r"imbalance must be >= 1.*0\.5"),
    (lambda: data.load("mnist5k_lt", "test", imbalance=0.5), ValueError, r"imbalance"),
    (lambda: data.long_tailed(data.load("digits8"), 1000), ValueError, r"imbalance=1000 is too large"),
    (lambda: data.long_tailed(torch.zeros(3), 10), TypeError, r"ds must be an ImageDataset"),
    (lambda: data.corrupt(torch.rand(2, 1, 8, 8), "blur", 0), ValueError, r"severity.*1\.\.5, got 0"),
    (lambda: data.corrupt(torch.rand(2, 1, 8, 8), "blur", 6), ValueError, r"severity.*got 6"),
    (lambda: data.corrupt(torch.rand(2, 1, 8, 8), "fog", 1), ValueError, r"unknown kind 'fog'.*blur"),
    (lambda: data.corrupt(torch.rand(1, 8, 8), "blur", 1), TypeError, r"images must be a 4-D float tensor"),
    (lambda: data.corrupt(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "blur", 1), TypeError, r"images.*uint8"),
    (lambda: data.corrupt(torch.rand(2, 1, 8, 8), "patch_shuffle", 1, patch_size=3), ValueError,
     r"patch_size=3 must divide"),
    (lambda: data.patch_mask(torch.zeros(2, 8, 8, dtype=torch.bool), 3), ValueError, r"patch_size.*got 3"),
    (lambda: data.patch_mask(torch.zeros(8, 8, dtype=torch.bool), 4), TypeError, r"masks must be"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------ online (no network)
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    root = tmp_path / "vitlab_data"
    monkeypatch.setenv("VITLAB_DATA", str(root))
    online._arrays.cache_clear()
    yield root
    online._arrays.cache_clear()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_offline_cifar_fails_fast(no_network, name):
    root = no_network
    for kwargs in ({"profile": CPU}, {"profile": "smoke"}, {"profile": CPU, "allow_download": False}):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"{name}.*needs a download") as err:
            data.load(name, "train", **kwargs)
        assert time.perf_counter() - start < 1.0
        msg = str(err.value)
        assert "allow_download=True" in msg and "VITLAB_PROFILE=gpu" in msg and str(root) in msg
    assert not root.exists()  # nothing was created, let alone downloaded


def test_cifar_files_present_load_without_download(no_network, monkeypatch):
    root = no_network
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in online.ONLINE["cifar10"][2]:
        (folder / f).write_bytes(b"")
    calls = []

    class FakeCIFAR10:  # what torchvision would read from those files
        classes = [f"class{i}" for i in range(10)]

        def __init__(self, root, train, download):
            calls.append(download)
            n = 100 if train else 20
            g = torch.Generator().manual_seed(int(train))
            self.data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
            self.targets = (torch.arange(n) % 10).tolist()

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    tr, va, te = (data.load("cifar10", s, CPU) for s in data.SPLITS)
    assert calls and not any(calls)  # read from disk, never asked to download
    assert (len(tr), len(va), len(te)) == (90, 10, 20)
    assert tr.images.dtype == torch.float32 and tr.images.shape[1:] == (3, 32, 32) and tr.images.max() <= 1
    assert tr.classes[0] == "class0" and tr.num_classes == 10
    assert set(_hashes(tr.images)).isdisjoint(_hashes(va.images))


def test_data_dir_default(monkeypatch):
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    root = data.data_dir()
    assert root.name == "data" and (root.parent / "vitlab" / "data" / "__init__.py").is_file()
    monkeypatch.setenv("VITLAB_DATA", "/tmp/elsewhere")
    assert str(data.data_dir()) == "/tmp/elsewhere"


def test_mnist5k_shrinks_to_img_size():
    big, small = data.load("mnist5k", "test", CPU), data.load("mnist5k", "test", CPU, img_size=16)
    assert small.images.shape == (1000, 1, 16, 16) and torch.equal(small.labels, big.labels)
    assert 0 <= small.images.min() and small.images.max() <= 1
    # antialiased: each small pixel is close to the mean of the big pixels around it
    pooled = torch.nn.functional.adaptive_avg_pool2d(big.images, 16)
    assert (small.images - pooled).abs().mean() < 0.05
    assert data.load("mnist5k", "test", CPU, img_size=28).images is big.images or \
        torch.equal(data.load("mnist5k", "test", CPU, img_size=28).images, big.images)
    for bad in (3, 29, 16.0, True):
        with pytest.raises(ValueError, match="img_size"):
            data.load("mnist5k", "test", CPU, img_size=bad)


def test_digits8_enlarges_to_img_size():
    small, big = data.load("digits8", "test", CPU), data.load("digits8", "test", CPU, img_size=28)
    assert big.images.shape == (360, 1, 28, 28) and torch.equal(big.labels, small.labels)
    assert 0 <= big.images.min() and big.images.max() <= 1
    # shrunk back, the enlarged digits are (blurred) 8-px ones: far closer to them than to another digit
    back = torch.nn.functional.adaptive_avg_pool2d(big.images, 8)
    assert (back - small.images).abs().mean() < 0.5 * (back - small.images.roll(1, dims=0)).abs().mean()
    for bad in (7, 65, 28.0, True):
        with pytest.raises(ValueError, match="digits8: img_size"):
            data.load("digits8", "test", CPU, img_size=bad)
