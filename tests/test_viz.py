import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vitlab import viz  # noqa: E402


def images(n=5, c=1, size=16):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0))


def n_axes(fig):
    return len(fig.axes)


def test_use_style_sets_rcparams():
    viz.use_style()
    assert matplotlib.rcParams["axes.spines.top"] is False


def test_figures_are_returned_and_not_left_open():
    before = plt.get_fignums()
    fig = viz.image_grid(images(3))
    assert isinstance(fig, Figure) and plt.get_fignums() == before


@pytest.mark.parametrize("n, ncols, expected", [(5, 8, 5), (10, 4, 10), (1, 8, 1)])
def test_image_grid_one_axis_per_image(n, ncols, expected):
    fig = viz.image_grid(images(n), labels=list(range(n)), ncols=ncols)
    assert n_axes(fig) == expected
    assert fig.axes[0].get_title() == "0"


def test_image_grid_rgb_titles_and_hw_input():
    fig = viz.image_grid(images(3, c=3), titles=["a", "b", "c"], labels=[0, 1, 2])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    assert n_axes(viz.image_grid(np.random.rand(4, 8, 8))) == 4
    fig = viz.image_grid(images(2), labels=torch.tensor([3, 4]))
    assert [ax.get_title() for ax in fig.axes] == ["3", "4"]
    assert viz.image_grid(images(2), labels=np.array([5, 6])).axes[1].get_title() == "6"


def test_attention_maps_mean_and_per_head():
    x = images(3, size=16)  # 4x4 patches of 4 px
    fig = viz.attention_maps(x, torch.rand(3, 16), patch_size=4, titles=["a", "b", "c"])
    assert n_axes(fig) == 3 + 1  # overlays + colorbar
    fig = viz.attention_maps(x, torch.rand(3, 2, 16), patch_size=4, mode="nearest")
    assert n_axes(fig) == 3 * 2 + 1
    assert fig.axes[0].get_title() == "head 0"


def test_attention_maps_overlay_is_upsampled_and_scaled():
    attn = torch.zeros(1, 4)
    attn[0, 3] = 5.0  # bottom-right patch
    fig = viz.attention_maps(images(1, size=8), attn, patch_size=4, mode="nearest")
    overlay = fig.axes[0].get_images()[1].get_array()
    assert overlay.shape == (8, 8) and overlay.max() == 1.0
    assert (overlay[4:, 4:] == 1).all() and (overlay[:4] == 0).all()


def test_training_curves_one_panel_per_family():
    hist = {"epoch": [1, 2, 3], "train_loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.2, 0.8],
            "val_acc": [0.3, 0.6, 0.8], "lr": [1e-3] * 30}
    fig = viz.training_curves(hist)
    assert n_axes(fig) == 3
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate"]
    assert len(fig.axes[0].get_lines()) == 2
    lr_x = fig.axes[2].get_lines()[0].get_xdata()
    assert len(lr_x) == 30 and lr_x[-1] == pytest.approx(3) and lr_x[0] > 0  # per-step lr spread over epochs
    assert n_axes(viz.training_curves(hist, keys=["val_acc"])) == 1
    # a list of per-epoch dicts works too
    assert n_axes(viz.training_curves([{"epoch": 1, "loss": 1.0, "acc": 0.5}, {"epoch": 2, "loss": 0.5}])) == 2


HAND = [
    dict(name="A", x=1.0, y=0.70),
    dict(name="B", x=2.0, y=0.80),
    dict(name="C", x=2.5, y=0.75),  # dominated by B
    dict(name="D", x=3.0, y=0.90),
    dict(name="E", x=3.0, y=0.85),  # dominated by D (same x, lower y)
    dict(name="F", x=0.5, y=0.60),
    dict(name="G", x=4.0, y=0.90),  # dominated by D (same y, higher x)
]


def test_pareto_frontier_hand_made():
    assert viz.pareto_frontier(HAND) == ["F", "A", "B", "D"]
    assert viz.pareto_frontier([dict(name="only", x=1, y=1)]) == ["only"]
    ties = [dict(name="p", x=1, y=1), dict(name="q", x=1, y=1)]
    assert sorted(viz.pareto_frontier(ties)) == ["p", "q"]


def test_pareto_plot():
    pts = [dict(p, group="pruning" if p["name"] in "ABC" else "merging") for p in HAND]
    fig = viz.pareto(pts, xlabel="GFLOPs", ylabel="top-1")
    ax = fig.axes[0]
    assert n_axes(fig) == 1 and "GFLOPs" in ax.get_xlabel()
    assert len(ax.texts) == len(HAND)
    frontier_line = ax.get_lines()[0]
    assert list(frontier_line.get_xdata()) == [0.5, 1.0, 2.0, 3.0]
    assert n_axes(viz.pareto(HAND, frontier=False, logx=True)) == 1


def test_bar():
    fig = viz.bar({"dense": 0.95, "evit": 0.93}, ylabel="accuracy")
    assert n_axes(fig) == 1 and fig.axes[0].get_ylabel() == "accuracy"
    fig = viz.bar({"dense": (0.95, 0.01), "tome": (0.92, 0.02)}, ylabel="accuracy")
    assert len(fig.axes[0].patches) == 2


def test_figures_save(tmp_path):
    viz.bar({"a": 1.0}, ylabel="y").savefig(tmp_path / "bar.png")
    assert (tmp_path / "bar.png").stat().st_size > 0


@pytest.mark.parametrize("call, err, match", [
    (lambda: viz.image_grid([1, 2]), TypeError, "images must be a tensor or array"),
    (lambda: viz.image_grid(torch.rand(2, 4, 8, 8)), ValueError, r"C in \(1, 3\), got \(2, 4, 8, 8\)"),
    (lambda: viz.image_grid(torch.rand(2, 1, 8, 8), ncols=0), ValueError, "ncols must be an int >= 1, got 0"),
    (lambda: viz.image_grid(torch.rand(2, 1, 8, 8), titles=["a"]), ValueError, "titles must be a list of 2"),
    (lambda: viz.attention_maps(torch.rand(2, 1, 8, 8), torch.rand(2, 5), patch_size=4), ValueError,
     "drop the CLS column"),
    (lambda: viz.attention_maps(torch.rand(2, 1, 8, 8), torch.rand(3, 4), patch_size=4), ValueError,
     r"attn must have shape \[2, 4\]"),
    (lambda: viz.attention_maps(torch.rand(2, 1, 8, 8), torch.rand(2, 4), patch_size=3), ValueError,
     "patch_size must be a positive int dividing"),
    (lambda: viz.attention_maps(torch.rand(2, 1, 8, 8), torch.rand(2, 4), patch_size=4, mode="cubic"),
     ValueError, "mode must be"),
    (lambda: viz.attention_maps(torch.rand(2, 1, 8, 8), "x", patch_size=4), TypeError, "attn must be a tensor"),
    (lambda: viz.training_curves({}), TypeError, "history must be a non-empty dict"),
    (lambda: viz.training_curves({"loss": "abc"}), TypeError, r"history\['loss'\] must be a list"),
    (lambda: viz.training_curves({"loss": [1.0]}, keys=["acc"]), ValueError, r"keys \['acc'\] not in history"),
    (lambda: viz.pareto_frontier([]), TypeError, "points must be a non-empty list"),
    (lambda: viz.pareto_frontier([dict(name="a", x=1)]), ValueError, "keys name, x, y"),
    (lambda: viz.pareto_frontier([dict(name="a", x=1, y="hi")]), ValueError, "y='hi'; expected a finite"),
    (lambda: viz.pareto([dict(name="a", x=1, y=1), dict(name="a", x=2, y=2)]), ValueError, "unique"),
    (lambda: viz.bar({}, ylabel="y"), TypeError, "values must be a non-empty dict"),
    (lambda: viz.bar({"a": (1.0, 2.0, 3.0)}, ylabel="y"), ValueError, r"values\['a'\] must be a number"),
    (lambda: viz.bar({"a": (1.0, -1.0)}, ylabel="y"), ValueError, "std >= 0"),
])
def test_bad_inputs_raise(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_attention_maps_colorbar_names_what_is_drawn():
    fig = viz.attention_maps(images(2, size=8), torch.rand(2, 4), patch_size=4)
    assert fig.axes[-1].get_ylabel() == "relative attention"
    fig = viz.attention_maps(images(2, size=8), (torch.rand(2, 4) > 0.5).float(), patch_size=4, label="kept token")
    assert fig.axes[-1].get_ylabel() == "kept token"
    with pytest.raises(TypeError, match="label"):
        viz.attention_maps(images(2, size=8), torch.rand(2, 4), patch_size=4, label=3)


def test_pareto_labels_do_not_collide_and_error_bars_show():
    import itertools

    pts = [dict(name=f"method_{i}", x=1.0 + 0.01 * (i % 4), y=0.95 + 0.002 * (i // 4), yerr=0.003) for i in range(12)]
    fig = viz.pareto(pts)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(p["name"] for p in pts)
    assert not [(a, b) for a, b in itertools.combinations(range(len(boxes)), 2) if boxes[a].overlaps(boxes[b])]
    assert ax.containers, "yerr is drawn as error bars"
    with pytest.raises(ValueError, match="yerr=-1; expected a finite number >= 0"):
        viz.pareto([dict(name="a", x=1, y=1, yerr=-1)])
