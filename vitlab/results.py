"""What each lesson verified, collected by ``make run`` into ``build/results.md``.

A notebook ends with ``results.record("vit_from_scratch", claim="...", test_acc=0.93, ...)`` after its asserts.
When ``$VITLAB_RESULTS_DIR`` is set (``make run`` sets it) the row is written there as JSON; otherwise the
call only returns the row, so a notebook run by hand or by nbval writes nothing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["record", "collect", "to_markdown"]


def _plain(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float):  # significant digits, so a gap of 3e-7 does not print as 0.0
        return float(f"{v:.4g}")
    return v if isinstance(v, (int, str, bool)) or v is None else str(v)


def record(lesson: str, claim: str, **figures) -> dict:
    """Record a lesson's verified claim and its figures (numbers or short strings)."""
    if not isinstance(lesson, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", lesson):
        raise ValueError(f"record: lesson must be a simple name like 'vit_from_scratch', got {lesson!r}")
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError("record: claim must be a non-empty sentence")
    from .profiles import profile

    row = {"lesson": lesson, "claim": claim.strip(), "profile": profile().name,
           "figures": {k: _plain(v) for k, v in figures.items()}}
    out = os.environ.get("VITLAB_RESULTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{lesson}.json").write_text(json.dumps(row, indent=1))
    return row


def collect(folder: str | os.PathLike) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def to_markdown(rows: list[dict], status: dict[str, str] | None = None) -> str:
    """One row per lesson: the notebook, its status, the claim it checked and its figures."""
    status = status or {}
    by_lesson = {r["lesson"]: r for r in rows}
    names = sorted(set(by_lesson) | set(status))
    lines = ["| lesson | status | claim checked | figures |", "| --- | --- | --- | --- |"]
    for name in names:
        r = by_lesson.get(name, {})
        figs = ", ".join(f"{k} = {v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {name} | {status.get(name, 'passed' if r else '')} | {r.get('claim', '')} | {figs} |")
    return "\n".join(lines) + "\n"
