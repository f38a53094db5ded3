"""A markdown table from benchmarks/kernels.py records: each op's Triton time against every baseline, wall and device.

    python benchmarks/kernels_summary.py benchmarks/results/kernels-nvidia-h200-*.json

Wall time (do_bench median) includes the host's launch overhead; device time (profiler sums of CUDA kernels) does
not. At ViT sizes the two differ by several times for the elementwise ops, so both are shown.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def table(record: dict) -> str:
    lines = [f"**{record['device']}**, driver {record['driver']}, torch {record['torch']}, triton {record['triton']}, "
             f"commit `{(record.get('commit') or '?')[:7]}`, {record['date']}", "",
             "| op | model | batch | mode | triton ms (device) | eager | compile | sdpa | sdpa+cls | "
             "triton vs fastest other, wall | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in record["rows"]:
        groups.setdefault((r["op"], r["model"], r["batch"], r["mode"]), {})[r["impl"]] = r
    for (op, model, batch, mode), impls in groups.items():
        ours = impls.get("triton")
        if not ours or not ours.get("ms"):
            continue
        others = {k: v for k, v in impls.items() if k not in ("triton", "triton_2k", "triton_fused") and v.get("ms")}

        def cell(name):
            r = impls.get(name)
            return f"{r['ms']:.3f} ({r['device_ms']:.3f})" if r and r.get("ms") else "-"

        best_wall = min(v["ms"] for v in others.values())
        best_dev = min(v["device_ms"] for v in others.values())
        lines.append(f"| {op} | {model} | {batch} | {mode} | {cell('triton')} | {cell('eager')} | {cell('compile')} "
                     f"| {cell('sdpa')} | {cell('sdpa+cls')} | {best_wall / ours['ms']:.2f}x "
                     f"| {best_dev / ours['device_ms']:.2f}x |")
    return "\n".join(lines)


def main(paths) -> int:
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        print(table(json.loads(Path(p).read_text())))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
