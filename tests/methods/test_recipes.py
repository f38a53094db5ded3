"""The chapter-4 comparison's entry point: every recipe trains the same ViT for the same steps and deploys it."""
import pytest
import torch

from vitlab import data
from vitlab.measure import count_params
from vitlab.methods.training.recipes import RECIPES, train_recipe
from vitlab.models import VisionTransformer


@pytest.fixture(scope="module")
def tiny_lt():
    train = data.long_tailed(data.load("digits8", "train", "smoke"), 4, seed=0)
    return train.subset(torch.arange(0, len(train), 4)), data.load("digits8", "val", "smoke")


def test_every_recipe_runs_the_same_steps_and_deploys_the_base_vit(tiny_lt):
    train, val = tiny_lt
    kw = dict(model="vit_nano", model_kw=dict(patch_size=4, depth=1, num_heads=2), profile="smoke", epochs=1,
              batch_size=16, seed=0)
    runs = {name: train_recipe(name, train, val, **kw) for name in RECIPES}
    steps = {name: r.history["step"][-1] for name, r in runs.items()}
    assert len(set(steps.values())) == 1, steps
    base = count_params(runs["baseline"].model)
    for name, r in runs.items():
        assert not r.model.training and r.seconds > 0 and r.cpu_seconds > 0
        if name != "deit_lt":
            assert type(r.model) is VisionTransformer and count_params(r.model) == base, name
    assert count_params(runs["deit_lt"].model) > base and "teacher_seconds" in runs["deit_lt"].extra
    # same seed, same recipe: the same trained weights, bit for bit
    again = train_recipe("baseline", train, val, **kw)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 runs["baseline"].model.state_dict().values()))


def test_bad_recipe_arguments(tiny_lt):
    train, val = tiny_lt
    with pytest.raises(ValueError, match="unknown recipe 'adam'"):
        train_recipe("adam", train, val, epochs=1)
    with pytest.raises(TypeError, match="teacher"):
        train_recipe("deit_lt", train, val, epochs=1, teacher="resnet")


def test_recipes_read_their_modules_defaults(tiny_lt, monkeypatch):
    """One place per recipe: train_recipe takes Lion's lr factor from lion.DEFAULTS and DeiT-LT's DRW point from
    deit_lt.RECIPE, and a given teacher is used as it is (not retrained)."""
    from vitlab.methods.training import deit_lt, lion

    train, val = tiny_lt
    kw = dict(model="vit_nano", model_kw=dict(patch_size=4, depth=1, num_heads=2), profile="smoke", epochs=2,
              batch_size=16, seed=0)
    seen = {}
    real = lion.lion_for

    def spy(model, lr, weight_decay):
        seen["lr"], seen["wd"] = lr, weight_decay
        return real(model, lr, weight_decay)

    monkeypatch.setattr(lion, "lion_for", spy)
    monkeypatch.setitem(lion.DEFAULTS, "lion_lr_factor", 0.25)
    train_recipe("lion", train, val, lr=2e-3, weight_decay=0.05, **kw)
    assert seen["lr"] == pytest.approx(5e-4) and seen["wd"] == pytest.approx(0.2)  # lr·λ kept: 2e-3·0.05
    teacher = deit_lt.small_resnet(train, widths=(4,))
    before = [p.clone() for p in teacher.parameters()]
    monkeypatch.setitem(deit_lt.RECIPE, "drw_at", 0.25)
    run = train_recipe("deit_lt", train, val, teacher=teacher, **kw)
    steps = 2 * (len(train) // 16)
    assert run.steps == steps and run.extra["drw_step"] == int(0.25 * steps) and "teacher_seconds" not in run.extra
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
