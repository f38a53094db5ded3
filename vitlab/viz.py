"""Plots every lesson shares, in one style: image grids, attention maps, training curves, Pareto plots, bars.

Each function returns a matplotlib ``Figure`` and never calls ``plt.show()``. The figure is closed in
pyplot's registry before it is returned, so a notebook shows it exactly once: as the cell's last value
or through ``display(fig)``; ``fig.savefig(path)`` works as usual. Images are tensors or arrays
[N, C, H, W] with values in [0, 1] (C = 1 or 3).
"""
from __future__ import annotations

import math
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

__all__ = ["use_style", "image_grid", "attention_maps", "training_curves", "pareto_frontier", "pareto", "bar", "plot_training"]

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.prop_cycle": matplotlib.cycler(color=plt.get_cmap("tab10").colors),
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "image.cmap": "gray",
}
HEATMAP = "inferno"  # attention overlays: dark = ignored, bright = attended


def use_style() -> None:
    """Apply the course's rcParams (every plot function calls it; notebooks may call it for their own plots)."""
    matplotlib.rcParams.update(STYLE)


def _new_figure(nrows: int, ncols: int, *, size: tuple[float, float], **kw) -> tuple[Figure, np.ndarray]:
    use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False, **kw)
    plt.close(fig)  # out of pyplot's registry: shown once, by whoever displays the returned figure
    return fig, axes


# ----------------------------------------------------------------------------- argument checks

def _images(images, fn: str) -> np.ndarray:
    """float [N, H, W, C] in [0, 1] for imshow, C in {1, 3}; accepts [N, C, H, W] or [N, H, W]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{fn}: images must be a tensor or array [N,C,H,W], got {type(images).__name__}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{fn}: images must have shape [N,C,H,W] with N >= 1 and C in (1, 3), got "
                         f"{tuple(images.shape)}; select or average channels first")
    return np.clip(images.astype(np.float32), 0.0, 1.0).transpose(0, 2, 3, 1)


def _titles(titles, n: int, name: str, fn: str) -> list[str] | None:
    if titles is None:
        return None
    if isinstance(titles, (torch.Tensor, np.ndarray)):
        titles = titles.tolist()
    if isinstance(titles, str) or not isinstance(titles, Sequence) or len(titles) != n:
        raise ValueError(f"{fn}: {name} must be a list of {n} entries (one per image), got {titles!r:.80}")
    return [str(t) for t in titles]


def _show(ax, img: np.ndarray) -> None:
    """img [H, W, C]; grey when C == 1."""
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)


# ----------------------------------------------------------------------------- images

def image_grid(images, labels=None, *, ncols: int = 8, titles=None) -> Figure:
    """Images in a grid of ``ncols`` columns, titled by ``titles`` or else by ``labels``; one axis per image."""
    imgs = _images(images, "image_grid")
    n = imgs.shape[0]
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"image_grid: ncols must be an int >= 1, got {ncols!r}")
    names = _titles(titles, n, "titles", "image_grid") or _titles(labels, n, "labels", "image_grid")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _new_figure(nrows, ncols, size=(1.3 * ncols, 1.3 * nrows + (0.25 * nrows if names else 0)))
    for i, ax in enumerate(axes.flat):
        if i >= n:
            fig.delaxes(ax)
            continue
        _show(ax, imgs[i])
        if names:
            ax.set_title(names[i], fontsize=9, pad=2)
    return fig


def _patch_grid(patch_size, h: int, w: int, fn: str) -> tuple[int, int]:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if isinstance(ph, bool) or not (isinstance(ph, int) and isinstance(pw, int)) or ph < 1 or pw < 1 \
            or h % ph or w % pw:
        raise ValueError(f"attention_maps: patch_size must be a positive int dividing the image size "
                         f"{h}x{w}, got {patch_size!r}")
    return h // ph, w // pw


def attention_maps(images, attn, *, patch_size, alpha: float = 0.5, titles=None, ncols: int = 8,
                   mode: str = "bilinear", label: str = "relative attention") -> Figure:
    """Per-patch attention upsampled onto each image and overlaid as a heatmap, with one colorbar.

    ``attn``: [N, P] (e.g. the CLS row averaged over heads, CLS column dropped) drawn as a grid of
    ``ncols`` columns, or [N, heads, P] drawn as one row per image and one column per head.
    P = (H / patch_size) * (W / patch_size). Each map is min-max scaled to [0, 1] so the colour shows
    where a map looks, not how peaked it is; ``mode`` is "bilinear" or "nearest" (patch blocks). ``label`` names
    the colorbar: say what the map is when it is not attention (a kept-token mask, a token's fate).
    """
    imgs = _images(images, "attention_maps")
    n, h, w, _ = imgs.shape
    if isinstance(attn, np.ndarray):
        attn = torch.from_numpy(attn)
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attention_maps: attn must be a tensor or array [N, P] or [N, heads, P], got "
                        f"{type(attn).__name__}")
    attn = attn.detach().float().cpu()
    gh, gw = _patch_grid(patch_size, h, w, "attention_maps")
    per_head = attn.dim() == 3
    if attn.dim() not in (2, 3) or attn.shape[0] != n or attn.shape[-1] != gh * gw:
        hint = "; drop the CLS column first" if attn.dim() in (2, 3) and attn.shape[-1] == gh * gw + 1 else ""
        raise ValueError(f"attention_maps: attn must have shape [{n}, {gh * gw}] or [{n}, heads, {gh * gw}] "
                         f"({gh}x{gw} patches), got {tuple(attn.shape)}{hint}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"attention_maps: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"attention_maps: alpha must be in [0, 1], got {alpha!r}")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"attention_maps: ncols must be an int >= 1, got {ncols!r}")
    names = _titles(titles, n, "titles", "attention_maps")
    if not isinstance(label, str):
        raise TypeError(f"attention_maps: label must be a str, got {type(label).__name__}")

    heads = attn.shape[1] if per_head else 1
    maps = attn.reshape(n * heads, 1, gh, gw)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    maps = F.interpolate(maps, size=(h, w), mode=mode, **kw).reshape(n, heads, h, w)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).numpy()

    if per_head:
        nrows, cols = n, heads
    else:
        cols = min(ncols, n)
        nrows = math.ceil(n / cols)
    fig, axes = _new_figure(nrows, cols, size=(1.5 * cols + 0.6, 1.5 * nrows + 0.3))
    for i, ax in enumerate(axes.flat):
        img_i, head = (i // heads, i % heads) if per_head else (i, 0)
        if img_i >= n:
            fig.delaxes(ax)
            continue
        _show(ax, imgs[img_i])
        ax.imshow(maps[img_i, head], cmap=HEATMAP, vmin=0, vmax=1, alpha=alpha, interpolation="nearest")
        if per_head and img_i == 0:
            ax.set_title(f"head {head}", fontsize=9, pad=2)
        if per_head and head == 0 and names:
            ax.set_ylabel(names[img_i], fontsize=9)
        elif not per_head and names:
            ax.set_title(names[img_i], fontsize=9, pad=2)
    # the colorbar shows the colormap at full strength, not the translucent overlay
    heat = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=HEATMAP)
    cbar = fig.colorbar(heat, ax=axes, shrink=0.9, pad=0.02, aspect=10 + 8 * nrows)
    cbar.set_label(label)
    cbar.outline.set_visible(False)
    return fig


# ----------------------------------------------------------------------------- training

_FAMILIES = (("loss", "loss"), ("acc", "accuracy"), ("lr", "learning rate"))


def _family(key: str) -> str:
    k = key.lower()
    for needle, family in _FAMILIES:
        if needle in k:
            return family
    return key  # anything else gets a panel of its own


def _history(history, fn: str) -> dict[str, np.ndarray]:
    """{key: float array}; accepts a dict of lists or a list of per-epoch dicts. None becomes NaN."""
    if isinstance(history, (list, tuple)) and history and all(isinstance(r, dict) for r in history):
        keys = list(dict.fromkeys(k for r in history for k in r))
        history = {k: [r.get(k) for r in history] for k in keys}
    if not isinstance(history, dict) or not history:
        raise TypeError(f"{fn}: history must be a non-empty dict of lists (or a list of dicts), got "
                        f"{type(history).__name__}")
    out = {}
    for k, v in history.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
            raise TypeError(f"{fn}: history[{k!r}] must be a list of numbers, got {type(v).__name__}")
        try:
            out[k] = np.array([np.nan if x is None else float(x) for x in v], dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: history[{k!r}] must hold numbers, got {list(v)[:5]!r}...") from None
    return out


def training_curves(history, *, keys: Sequence[str] | None = None) -> Figure:
    """One panel per metric family: every key with "loss" shares a panel, "acc" another, "lr" another,
    anything else its own. The x axis is ``history["epoch"]`` (else "step", else 1..n); a series of a
    different length (e.g. lr per step against epochs) is spread evenly over the same range."""
    hist = _history(history, "training_curves")
    xkey = next((k for k in ("epoch", "step") if k in hist), None)
    if keys is None:
        keys = [k for k in hist if k != xkey]
    else:
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise TypeError(f"training_curves: keys must be a list of names, got {type(keys).__name__}")
        missing = [k for k in keys if k not in hist]
        if missing:
            raise ValueError(f"training_curves: keys {missing} not in history; available: {sorted(hist)}")
    keys = [k for k in keys if len(hist[k])]
    if not keys:
        raise ValueError(f"training_curves: nothing to plot; history has {sorted(hist)}")

    panels: dict[str, list[str]] = {}
    for k in keys:
        panels.setdefault(_family(k), []).append(k)
    x_ref = hist[xkey] if xkey else np.arange(1, max(len(hist[k]) for k in keys) + 1, dtype=np.float64)
    x0, x1 = (x_ref[0] - (x_ref[1] - x_ref[0] if len(x_ref) > 1 else 1)), x_ref[-1]

    fig, axes = _new_figure(1, len(panels), size=(3.6 * len(panels), 2.8))
    for ax, (family, ks) in zip(axes.flat, panels.items()):
        for k in ks:
            y = hist[k]
            # same length: plot against x; otherwise spread over (x0, x1] so per-step series line up
            x = x_ref if len(y) == len(x_ref) else np.linspace(x0, x1, len(y) + 1)[1:]
            ax.plot(x, y, label=k, marker="o" if len(y) <= 30 else None, markersize=3)
        ax.set_title(family)
        ax.set_xlabel(xkey or "index")
        if family == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(ks) > 1 or ks[0] != family:
            ax.legend()
    return fig


# ----------------------------------------------------------------------------- comparisons

def _points(points, fn: str) -> list[dict]:
    if isinstance(points, dict) or not isinstance(points, Sequence) or not points:
        raise TypeError(f"{fn}: points must be a non-empty list of dicts with name, x, y, got "
                        f"{type(points).__name__}")
    seen = set()
    for p in points:
        if not isinstance(p, dict) or not {"name", "x", "y"} <= p.keys():
            raise ValueError(f"{fn}: each point must be a dict with keys name, x, y (group, xerr, yerr optional), "
                             f"got {p!r}")
        for k in ("x", "y"):
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{fn}: point {p['name']!r} has {k}={v!r}; expected a finite number")
        for k in ("xerr", "yerr"):
            v = p.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{fn}: point {p['name']!r} has {k}={v!r}; expected a finite number >= 0")
        if p["name"] in seen:
            raise ValueError(f"{fn}: point names must be unique, {p['name']!r} appears twice")
        seen.add(p["name"])
    return list(points)


def pareto_frontier(points) -> list[str]:
    """Names of the points no other point dominates (another with x <= and y >=, one strictly), by x.

    Lower x is better (cost: GFLOPs, ms), higher y is better (accuracy). Ties are all kept.
    """
    pts = _points(points, "pareto_frontier")

    def dominated(p):
        return any(q["x"] <= p["x"] and q["y"] >= p["y"] and (q["x"] < p["x"] or q["y"] > p["y"]) for q in pts)

    front = [p for p in pts if not dominated(p)]
    return [p["name"] for p in sorted(front, key=lambda p: (p["x"], p["y"]))]


# Label offsets (points) tried in turn: right, left, above, below, then further out; the first that overlaps no
# label placed so far (nor a marker) wins, so clustered methods stay readable.
_LABEL_OFFSETS = [(6, 4), (6, -11), (-6, 4), (-6, -11), (0, 10), (0, -17), (12, 14), (12, -21), (-12, 14),
                  (-12, -21), (18, 24), (18, -31), (-18, 24), (-18, -31)]


def _place_labels(fig: Figure, ax, pts: list[dict]) -> None:
    """Annotate each point with its name where it collides with no other label or marker."""
    fig.draw_without_rendering()  # run the constrained layout first: label boxes are measured in display space
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig).get_renderer()
    markers = {}
    for p in pts:
        cx, cy = ax.transData.transform((p["x"], p["y"]))
        markers[p["name"]] = Bbox.from_extents(cx - 4, cy - 4, cx + 4, cy + 4)
    labels: list[Bbox] = []
    style = dict(textcoords="offset points", fontsize=8, zorder=5,
                 bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    for p in sorted(pts, key=lambda q: -q["y"]):
        others = labels + [b for name, b in markers.items() if name != p["name"]]
        near_right = markers[p["name"]].x1 > ax.bbox.x0 + 0.8 * ax.bbox.width  # labels go left there, not off the plot
        offsets = [(-dx, dy) for dx, dy in _LABEL_OFFSETS] if near_right else _LABEL_OFFSETS
        for i, (dx, dy) in enumerate(offsets):
            far = abs(dx) + abs(dy) > 17
            text = ax.annotate(str(p["name"]), (p["x"], p["y"]), xytext=(dx, dy), ha="left" if dx >= 0 else "right",
                               va="bottom" if dy >= 0 else "top", **style,
                               arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if far else None)
            text.set_in_layout(False)  # labels must not shrink the axes after they were placed
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in others):
                break
            if i + 1 < len(offsets):
                text.remove()
            # else: nowhere free; keep the last try (still next to its point)
        labels.append(box)


def pareto(points, *, xlabel: str = "GFLOPs", ylabel: str = "accuracy", frontier: bool = True,
           logx: bool = False, title: str | None = None) -> Figure:
    """Scatter of methods (cost x, quality y), each labelled, coloured by ``group`` when given; with
    ``frontier`` the Pareto-optimal points are joined by a dashed line and ringed."""
    pts = _points(points, "pareto")
    groups = list(dict.fromkeys(p.get("group") for p in pts))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, axes = _new_figure(1, 1, size=(5.6, 4.0))
    ax = axes[0, 0]
    for g in groups:
        gp = [p for p in pts if p.get("group") == g]
        ax.scatter([p["x"] for p in gp], [p["y"] for p in gp], color=colors[g], s=36, zorder=3,
                   label=None if g is None else str(g))
        if any(p.get("xerr", 0) or p.get("yerr", 0) for p in gp):  # e.g. ±1 standard error over seeds
            ax.errorbar([p["x"] for p in gp], [p["y"] for p in gp], xerr=[p.get("xerr", 0.0) for p in gp],
                        yerr=[p.get("yerr", 0.0) for p in gp], fmt="none", ecolor=colors[g], elinewidth=1.1,
                        capsize=3, zorder=3)
    if frontier:
        names = pareto_frontier(pts)
        fp = sorted((p for p in pts if p["name"] in names), key=lambda p: p["x"])
        ax.plot([p["x"] for p in fp], [p["y"] for p in fp], ls="--", color="0.35", lw=1.2, zorder=2,
                label="Pareto frontier")
        ax.scatter([p["x"] for p in fp], [p["y"] for p in fp], s=110, facecolors="none", edgecolors="0.2",
                   linewidths=1.2, zorder=4)
    if logx:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the labels at the edges
    _place_labels(fig, ax, pts)
    ax.set_xlabel(xlabel + " (lower is better)")
    ax.set_ylabel(ylabel + " (higher is better)")
    if title:
        ax.set_title(title)
    if any(g is not None for g in groups) or frontier:
        ax.legend(loc="best")
    return fig


def bar(values: dict, *, ylabel: str, title: str | None = None, fmt: str = "{:.3g}") -> Figure:
    """Bars from {name: value} or {name: (mean, std)} (std drawn as an error bar), each labelled with its value."""
    if not isinstance(values, dict) or not values:
        raise TypeError(f"bar: values must be a non-empty dict name -> float or (mean, std), got "
                        f"{type(values).__name__}")
    if not isinstance(ylabel, str):
        raise TypeError(f"bar: ylabel must be a str, got {type(ylabel).__name__}")
    names, means, stds = [], [], []
    for k, v in values.items():
        v = v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v
        if isinstance(v, (tuple, list)):
            mean, std = v if len(v) == 2 else (None, None)
        else:
            mean, std = v, 0.0
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or \
                isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
            raise ValueError(f"bar: values[{k!r}] must be a number or (mean, std >= 0), got {v!r}")
        names.append(str(k))
        means.append(float(mean))
        stds.append(float(std))
    has_err = any(s > 0 for s in stds)
    fig, axes = _new_figure(1, 1, size=(max(3.5, 0.7 * len(names) + 1.5), 3.4))
    ax = axes[0, 0]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    bars = ax.bar(names, means, yerr=stds if has_err else None, capsize=4 if has_err else 0, color=colors,
                  error_kw={"elinewidth": 1.2, "ecolor": "0.25"})
    labels = [fmt.format(m) + (f"±{fmt.format(s)}" if s > 0 else "") for m, s in zip(means, stds)]
    ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    if title:
        ax.set_title(title)
    if max(len(n) for n in names) * len(names) > 48:  # long or many names: slant them so they don't collide
        for t in ax.get_xticklabels():
            t.set(rotation=30, ha="right", rotation_mode="anchor")
    return fig


def plot_training(runs: dict, key: str = "val_acc", ax=None, ylim=(0.8, 1.0)):
    """Every seed's stored training curve (a zoo record's ``history``), one colour per model: ``runs`` maps a label
    to {seed: (model, info)} as ``zoo.get(..., return_info=True)`` returns them. Returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    for i, (label, by_seed) in enumerate(runs.items()):
        for j, (_, info) in enumerate(by_seed.values()):
            h = info["history"]
            ax.plot(h["epoch"], h[key], color=f"C{i}", alpha=0.7, label=label if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend()
    ax.set_title(f"{key.replace('_', ' ')} while training ({len(next(iter(runs.values())))} seeds each)")
    return ax
