"""The chapter-6 scenes ViT: registered once, by chapter 1's recipe on cluttered scenes, its checkpoints committed."""
import pytest

from vitlab import zoo
from vitlab.methods.architectures import recipes as R
from vitlab.methods.robustness import scenes_vit as S


def test_recipe_and_names():
    for seed in S.SEEDS:
        recipe = zoo._recipe(S.vit_name(seed))
        cfg = recipe.config("cpu")
        assert cfg["data"] == "cluttered_scenes" and cfg["fit"]["steps"] == S.STEPS["cpu"]
        assert {k: cfg["fit"][k] for k in R.TRAIN} == R.TRAIN and recipe.seed == seed
        assert recipe.checkpoint_profile("smoke") == "cpu"  # CI loads the committed cpu checkpoint
    assert S.vit_name(2) == "ch6_vit_scenes_s2"
    with pytest.raises(ValueError, match="seed"):
        S.vit_name(-1)


def test_committed_checkpoints_plateaued():
    for seed in S.SEEDS:
        vit, info = S.trained(seed, "smoke")
        m = info["metrics"]
        assert m["plateau_gain"] <= 0.015 and m["test_acc"] > 0.9, (seed, m)
        assert not vit.training and vit.grid_size == (8, 8)
