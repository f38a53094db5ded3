"""``load`` caps generated scenes by rendering only the stratified prefix it keeps: the same tensors as rendering
all of them and cutting afterwards."""
import pytest
import torch

from vitlab.data import load
from vitlab.profiles import profile as get_profile
from vitlab.data.dataset import stratified_prefix
from vitlab.data.scenes import _CHUNK, cluttered_scenes


@pytest.mark.parametrize("n, cap", [(3 * _CHUNK + 17, 40), (2 * _CHUNK, 2 * _CHUNK - 1), (_CHUNK + 5, 10_000)])
def test_capped_scenes_equal_the_cut_of_all_scenes(n, cap):
    full = cluttered_scenes("train", seed=3, n=n)
    capped = cluttered_scenes("train", seed=3, n=n, max_train=cap)
    want = stratified_prefix(full, cap)
    for a, b in ((capped.images, want.images), (capped.labels, want.labels), (capped.masks, want.masks)):
        assert torch.equal(a, b)


def test_load_passes_the_profile_cap_and_other_splits_stay_whole():
    n = get_profile("smoke").max_train + 100
    smoke = load("cluttered_scenes", "train", "smoke", seed=1, n=n)
    assert len(smoke) == n - 100
    assert torch.equal(smoke.images, stratified_prefix(cluttered_scenes("train", seed=1, n=n), n - 100).images)
    assert len(cluttered_scenes("val", max_train=10)) == 500


def test_bad_cap():
    with pytest.raises(ValueError, match="cluttered_scenes: max_train must be a positive int"):
        cluttered_scenes("train", max_train=0)
    with pytest.raises(TypeError, match="takes no keyword argument 'max_train'"):
        load("cluttered_scenes", "train", "smoke", max_train=5)
