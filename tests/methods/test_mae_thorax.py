"""The MAE-for-thorax lesson's recipes: the scratch control matches the fine-tunes in everything but the start,
the two pre-training recipes differ only in mask ratio and crop range, standardised data, bad input."""
import pytest
import torch

from vitlab import zoo
from vitlab.data.thorax import standardize_images, thorax_xrays
from vitlab.methods.selfsup import mae_thorax as M


def test_the_recipes_are_the_papers_and_maes():
    assert M.RECIPES["medical"] == dict(mask_ratio=0.9, crop_scale=[0.5, 1.0])
    assert M.RECIPES["natural"] == dict(mask_ratio=0.75, crop_scale=[0.2, 1.0])


def test_pretrainings_differ_only_in_the_recipe():
    med, nat = (zoo.ZOO[f"mae_thorax_{r}"] for r in ("medical", "natural"))
    assert med.objective == nat.objective == "mae"
    cfg = {r: zoo.ZOO[f"mae_thorax_{r}"].config("cpu") for r in M.RECIPES}
    assert cfg["medical"].pop("objective") != cfg["natural"].pop("objective")
    assert cfg["medical"] == cfg["natural"]


@pytest.mark.parametrize("seed", M.SEEDS)
def test_the_scratch_control_matches_the_finetunes(seed):
    """Same model, data, steps, lr, batch, schedule and seed: only the start (and LLRD, which needs one) differ."""
    ctrl = zoo.ZOO[f"vit_thorax_scratch_s{seed}"]
    assert ctrl.init is None
    for recipe in M.RECIPES:
        ft = zoo.ZOO[f"vit_thorax_{recipe}_s{seed}"]
        assert ft.init == f"mae_thorax_{recipe}"
        for profile in ("cpu", "gpu"):
            a, b = ft.config(profile), ctrl.config(profile)
            assert a["fit"].pop("layer_decay") == M.LAYER_DECAY
            assert a == b


def test_every_entry_is_registered_and_smoke_loads_cpu():
    names = M.entry_names()
    assert len(names) == len(M.RECIPES) * (1 + len(M.SEEDS)) + len(M.SEEDS)
    for name in names:
        assert zoo.ZOO[name].checkpoint_profile("smoke") == "cpu"


def test_data_is_standardised_per_image():
    train, val, test = M.data("smoke")
    assert len(val) == 500 and len(test) == 1000
    x = test.images
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), torch.zeros(len(x)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(1, 2, 3)), torch.ones(len(x)), atol=1e-4, rtol=0)
    raw = thorax_xrays("test", img_size=32)
    assert torch.equal(raw.labels, test.labels)  # the same patients, only the pixels rescaled
    torch.testing.assert_close(standardize_images(raw.images), x)


def test_standardize_images_by_hand():
    x = torch.tensor([1.0, 3.0, 1.0, 3.0]).reshape(1, 1, 2, 2)  # mean 2, unbiased std 2/sqrt(3)
    out = standardize_images(x, eps=0.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]) * 3 ** 0.5 / 2)
    with pytest.raises(TypeError, match="images"):
        standardize_images(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="standardize"):
        thorax_xrays("val", n=2, standardize="yes")


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="recipe"):
        M.pretrained("imagenet", "smoke")
    with pytest.raises(ValueError, match="recipe"):
        M.finetuned("bogus", 0, "smoke")
    with pytest.raises(ValueError, match="seed"):
        M.finetuned("medical", 7, "smoke")
    with pytest.raises(ValueError, match="seed"):
        M.scratch(True, "smoke")


def test_every_run_trains_on_the_same_xrays():
    """Seeds vary the weights and the data order; the patients are the same (data drawn with seed 0)."""
    for name in M.entry_names():
        r = zoo.ZOO[name]
        assert (r.seed if r.data_seed is None else r.data_seed) == M.DATA_SEED, name
