"""Chapter 2's shared set-up: one fine-tune recipe, and dense controls trained with exactly it."""
import pytest

from vitlab import zoo
from vitlab.methods.efficient import recipes


def test_the_control_is_trained_with_the_chapter_finetune():
    for name in ("smoke", "cpu"):
        kw = recipes.finetune_kwargs(name)
        assert kw["steps"] == recipes.finetune_steps(name) and kw["lr"] == 1e-4 and kw["batch_size"] == 64
        for seed in recipes.seeds(name):
            recipe = zoo.ZOO[f"vit_tiny_scenes_ft{seed}"]
            fit = {**recipe.fit, **recipe.per_profile[name]}
            assert fit == {**kw, "seed": seed}, "control and method fine-tunes must get the same fit arguments"
            assert recipe.init == "vit_tiny_scenes" and recipe.train_kwargs == zoo.ZOO["vit_tiny_scenes"].train_kwargs
    assert recipes.seeds("smoke") == (0,) and len(recipes.seeds("cpu")) >= 3


def test_scenes_are_the_bases_training_data():
    train, val, test = recipes.scenes("smoke")
    assert train.images.shape[1:] == (3, 32, 32) and len(train) == 2000  # 20,000 generated, smoke caps to 2,000
    assert len(test) == 1000


@pytest.mark.parametrize("seed", [3, -1, "0"])
def test_dense_control_rejects_unknown_seeds(seed):
    with pytest.raises(ValueError, match="dense_control: seed must be one of"):
        recipes.dense_control(seed, "smoke")


def test_finetune_kwargs_overrides_are_checked():
    base = recipes.finetune_kwargs("smoke")
    small = recipes.finetune_kwargs("smoke", steps=3, batch_size=8)
    assert small == {**base, "steps": 3, "batch_size": 8}
    assert recipes.finetune_kwargs("smoke", steps=None, batch_size=None) == base
    with pytest.raises(ValueError, match="finetune: steps"):
        recipes.finetune_kwargs("smoke", steps=0, fn="finetune")
    with pytest.raises((TypeError, ValueError), match="finetune_kwargs: batch_size"):
        recipes.finetune_kwargs("smoke", batch_size=2.5)
