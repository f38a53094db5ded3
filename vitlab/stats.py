"""Seed statistics for "method vs control" claims: a mean, its standard error, and a margin that can fail.

A lesson that claims "the method beats its control" trains both with the same steps, lr, data and seeds, then

    gap = stats.paired_gap(method_accs, control_accs)     # per-seed differences, method - control
    assert gap.lower() > 0, gap                            # mean - 2 SE of the paired differences
    display(Markdown(f"The method is {gap:+.1%} ahead of its control."))

Paired differences cancel what the seeds share (initialisation, batch order, data draw), so the margin is the
spread of the *effect*, not of each run. With one seed (the smoke profile) the standard error is unknown: it is
reported as nan and ``lower``/``upper`` fall back to the mean, so a smoke run still checks the sign.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Spread", "spread", "paired_gap", "verdict", "kendall_tau", "plateau_text", "late_loss_drop"]


def _floats(values, name: str, fn: str) -> list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{fn}: {name} must be a sequence of numbers, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must hold finite numbers, got {v!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{fn}: {name} is empty; expected one value per seed")
    return out


@dataclass(frozen=True)
class Spread:
    """Mean and standard error of the mean over ``n`` seeds (se is nan for one seed)."""
    mean: float
    se: float
    n: int

    def lower(self, k: float = 2.0) -> float:
        """mean - k SE (the mean itself when the SE is unknown)."""
        return self.mean - k * self.se if self.n > 1 else self.mean

    def upper(self, k: float = 2.0) -> float:
        """mean + k SE (the mean itself when the SE is unknown)."""
        return self.mean + k * self.se if self.n > 1 else self.mean

    def __format__(self, spec: str) -> str:
        """``f"{s:.1%}"`` gives "61.2 % ± 0.4 %" (mean ± SE); the format applies to both."""
        spec = spec or ".4g"
        mean = format(self.mean, spec).replace("%", " %")
        if self.n < 2:
            return f"{mean} (1 seed)"
        se = format(self.se, spec.lstrip("+")).replace("%", " %")
        return f"{mean} ± {se}"


def spread(values) -> Spread:
    """Mean ± standard error of the mean (sample std / sqrt(n)) of per-seed values."""
    xs = _floats(values, "values", "spread")
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return Spread(mean, se, n)


def paired_gap(method, control) -> Spread:
    """Spread of the per-seed differences ``method[i] - control[i]`` (same seeds, same order)."""
    a = _floats(method, "method", "paired_gap")
    b = _floats(control, "control", "paired_gap")
    if len(a) != len(b):
        raise ValueError(f"paired_gap: method and control need one value per seed each, got {len(a)} and {len(b)}")
    return spread([x - y for x, y in zip(a, b)])


def verdict(gap: Spread, k: float = 2.0) -> str:
    """Where a paired gap lies against zero, as the lessons say it: "above" (mean - k SE > 0), "below"
    (mean + k SE < 0) or "within the seed spread of" zero."""
    if not isinstance(gap, Spread):
        raise TypeError(f"verdict: gap must be a Spread (stats.paired_gap), got {type(gap).__name__}")
    return "above" if gap.lower(k) > 0 else "below" if gap.upper(k) < 0 else "within the seed spread of"


def kendall_tau(a, b) -> float:
    """Kendall's tau-a between two score lists over the same items (+1: the same order, -1: reversed; a pair tied in
    either list counts as neither): how well one ranking (a proxy, a supernet) predicts another (trained accuracy)."""
    a, b = list(map(float, a)), list(map(float, b))  # +-inf orders fine (an ill-conditioned proxy); nan does not
    if any(math.isnan(x) for x in a + b):
        raise ValueError("kendall_tau: the scores hold nan, which has no rank")
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"kendall_tau: a and b need the same length >= 2, got {len(a)} and {len(b)}")
    n = len(a)
    s = sum((a[i] > a[j]) - (a[i] < a[j]) if b[i] > b[j] else (a[j] > a[i]) - (a[j] < a[i]) if b[i] < b[j] else 0
            for i in range(n) for j in range(i + 1, n))
    return 2 * s / (n * (n - 1))


def plateau_text(runs: dict, threshold: float = 0.015, fmt: str = "{:+.1%}") -> str:
    """One sentence on whether every run plateaued: the validation gain over the last quarter of training per seed
    (the zoo's ``plateau_gain``: accuracy, or mean AUC for multi-label models), against ``threshold``. ``runs``
    maps a label to {seed: (model, info)}; ``fmt`` formats a gain and the threshold."""
    gains = {label: [info["metrics"]["plateau_gain"] for _, info in by_seed.values()]
             for label, by_seed in runs.items()}
    worst = max(max(g) for g in gains.values())
    return ("Validation gain over the last quarter of training, per seed: "
            + "; ".join(f"{label} " + ", ".join(fmt.format(g) for g in gs) for label, gs in gains.items())
            + (f" (all within {fmt.format(threshold).lstrip('+')}: plateaued)." if worst <= threshold else
               f" (some still rose more than {fmt.format(threshold).lstrip('+')}: not fully plateaued)."))


def late_loss_drop(losses, fraction: float = 1 / 8) -> float:
    """How much a training loss still fell over the last ``fraction`` of its logged values, relative: (mean of
    the window before − mean of the last window) / mean of the last. Near zero (or negative) means more steps would
    not have helped: the plateau test of an objective that has no validation accuracy (a tokenizer, an MAE)."""
    xs = _floats(losses, "losses", "late_loss_drop")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"late_loss_drop: fraction must be a number in (0, 0.5], got {fraction!r}")
    k = max(1, int(len(xs) * fraction))
    if len(xs) < 2 * k:
        raise ValueError(f"late_loss_drop: losses needs at least {2 * k} values, got {len(xs)}")
    before, last = sum(xs[-2 * k:-k]) / k, sum(xs[-k:]) / k
    return (before - last) / last
