"""Chapter 1's shared set-up: one from-scratch recipe for every architecture and a cache that trains any
registered architecture once (the zoo builds it through the model registry, not only ViTs)."""
import pytest
import torch
import torch.nn as nn

from vitlab import zoo
from vitlab.methods.architectures import recipes
from vitlab.models import create_model
from vitlab.models.registry import builder
from vitlab.profiles import PROFILES


class TinyMLP(nn.Module):
    """A non-ViT architecture: what the zoo must now cache too."""

    def __init__(self, img_size: int = 28, in_chans: int = 1, num_classes: int = 10, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size ** 2, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


if "ch1_test_mlp" not in zoo.ZOO:
    recipes.register("test_mlp", TinyMLP, hidden=16)


def test_every_entry_gets_the_same_recipe_data_and_seeds():
    for method in ("vit", "test_mlp"):
        for seed in recipes.SEEDS:
            recipe = zoo.ZOO[recipes.entry_name(method, seed, "cpu")]
            cfg = recipe.config("cpu")
            assert cfg["fit"] == {**recipes.TRAIN, "steps": recipes.STEPS["cpu"]} == recipes.train_kwargs("cpu")
            assert cfg["max_train"] == recipes.DATASETS["digits"][2] and cfg["seed"] == seed
            assert cfg["data_seed"] == recipes.DATA_SEED, "every seed is tested on the same images"
            assert recipe.checkpoint_profile("smoke") == "cpu", "CI checks the claims on the committed models"
    assert recipes.entry_name("vit", 1, "cpu") == "ch1_vit_digits_s1"
    assert len(recipes.seeds("smoke")) >= 3


def test_data_is_the_small_training_set():
    train, val, test = recipes.data("digits", "smoke")
    assert len(train) == 2000 and train.images.shape[1:] == (1, 28, 28) and len(test) == 1000
    assert torch.equal(train.images, recipes.data("digits", "cpu")[0].images), "the same data in every profile"


def test_the_zoo_trains_and_rebuilds_a_non_vit_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CHECKPOINTS", str(tmp_path))
    name = "ch1_test_mlp_tiny"
    if name not in zoo.ZOO:
        zoo.register(name, zoo.Recipe(model="ch1_test_mlp", data="digits8", fit=dict(epochs=1, lr=1e-3),
                                      data_seed=0))
    model = zoo.get(name, "smoke", progress=False)
    assert isinstance(model, TinyMLP) and builder("ch1_test_mlp") is TinyMLP
    again = zoo.get(name, "smoke", progress=False)  # loaded from the checkpoint, rebuilt by the registry's builder
    assert zoo.state_hash(again.state_dict()) == zoo.state_hash(model.state_dict())


def test_check_matched_says_how_far_off_the_parameters_are():
    control = create_model("ch1_vit")
    assert recipes.check_matched(control, control) == 1.0
    with pytest.raises(ValueError, match="check_matched: the model has .*x the control's parameters"):
        recipes.check_matched(TinyMLP(hidden=2), control)


def test_measure_row_has_the_chapters_columns():
    _, _, test = recipes.data("digits", "smoke")
    row = recipes.measure_row("mlp", TinyMLP().eval(), test, latency_batch=8, repeats=2)
    assert set(row) == {"method", "accuracy", "params", "gflops", "throughput", "latency_ms"}
    assert 0 <= row["accuracy"] <= 1 and row["params"] == sum(p.numel() for p in TinyMLP().parameters())


def test_train_step_ms_times_a_step_and_leaves_the_model_alone():
    train, _, _ = recipes.data("digits", "smoke")
    model = TinyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = recipes.train_step_ms(model, train, batch_size=8, warmup=1, repeats=2)
    assert 0 < ms < 10_000
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call, match", [
    (lambda: recipes.trained("vit", 7, "smoke"), "trained: seed must be one of"),
    (lambda: recipes.trained("nope", 0, "smoke"), "unknown chapter-1 method 'nope'"),
    (lambda: recipes.data("imagenet", "smoke"), "data: dataset must be one of"),
    (lambda: recipes.register("test_mlp", TinyMLP, hidden=32), "already registered with another"),
    (lambda: recipes.register("bad name", TinyMLP), "register: method must be"),
    (lambda: recipes.register("x", TinyMLP, dataset="cifar"), "register: dataset must be one of"),
    (lambda: recipes.register("y", 3), "register: builder must be callable"),
    (lambda: recipes.check_matched(3, TinyMLP()), "check_matched: model must be an nn.Module"),
    (lambda: recipes.train_step_ms("vit", None), "train_step_ms: model must be an nn.Module"),
    (lambda: builder("no_such_model"), "unknown model 'no_such_model'"),
    (lambda: recipes.equal_time_steps("test_mlp"), "equal_time_steps: no measured step time for 'test_mlp'"),
    (lambda: recipes.trained_equal_time("vit", 0, PROFILES["gpu"]), "trained_equal_time: the step budgets are measured on CPU"),
    (lambda: recipes.trained_equal_time("vit", 5, "smoke"), "trained_equal_time: seed must be one of"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _fake_runs(gains):
    return {s: (None, {"history": {"epoch": [1, 2, 3], "val_acc": [0.5, 0.8, 0.9]},
                       "metrics": {"plateau_gain": g}}) for s, g in enumerate(gains)}


def test_plateau_text_and_training_plot():
    import matplotlib

    matplotlib.use("Agg")
    runs = {"ViT": _fake_runs([0.0, 0.01, 0.005]), "X": _fake_runs([0.002, 0.0, 0.0])}
    assert recipes.plateau_text(runs).endswith("plateaued).") and "ViT +0.0%, +1.0%, +0.5%" in recipes.plateau_text(runs)
    runs["X"] = _fake_runs([0.05, 0.0, 0.0])
    assert "not fully plateaued" in recipes.plateau_text(runs)
    ax = recipes.plot_training(runs)
    assert len(ax.lines) == 6 and [t.get_text() for t in ax.get_legend().get_texts()] == ["ViT", "X"]


def test_import_all_registers_the_chapter():
    found = recipes.import_all()
    assert {"shift_equivariant", "ggem_pooling", "l2vit"} <= set(found) and set(found) <= set(recipes.MODULES)
    assert recipes.registered("shift_equivariant") == "digits" and recipes.registered("patch_scaling_p1") == "digits8"


def test_equal_time_steps_fill_the_plain_vits_training_time():
    import json
    from pathlib import Path

    budget = recipes.STEPS["cpu"] * recipes.STEP_MS_CPU["vit"]
    assert recipes.equal_time_steps("vit") == recipes.STEPS["cpu"]
    for method, ms in recipes.STEP_MS_CPU.items():
        steps = recipes.equal_time_steps(method)
        assert steps % 50 == 0 and abs(steps * ms - budget) <= 25 * ms  # rounded to the nearest 50 steps
    # twice as slow -> half the steps; the committed timing is the one the constants were copied from
    assert recipes.equal_time_steps("duoformer") < recipes.STEPS["cpu"] < recipes.equal_time_steps("crossvit")
    timed = json.loads((Path(__file__).parents[2] / "benchmarks/results/ch1_step_ms_cpu.json").read_text())
    assert timed["ms_per_step"] == recipes.STEP_MS_CPU


def test_equal_time_entries_differ_from_the_equal_step_ones_only_in_steps():
    recipes.import_all()
    slow = zoo.ZOO["ch1_duoformer_digits_eqtime_s1"].config("cpu")
    same = zoo.ZOO["ch1_duoformer_digits_s1"].config("cpu")
    assert slow["fit"].pop("steps") == recipes.equal_time_steps("duoformer") and same["fit"].pop("steps") == 3000
    assert slow == same
    assert "ch1_volo_digits_eqtime_s0" not in zoo.ZOO  # its budget rounds to 3,000 steps: the first model serves
