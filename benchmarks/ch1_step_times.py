"""The training-step time of every chapter-1 architecture on one CPU thread, measured round-robin so that machine
noise hits them alike: the source of chapter 1's equal-wall-clock step counts (``recipes.STEP_MS``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ch1_step_times.py [--rounds 8] [--steps 8]

Each round times ``--steps`` steps of the chapter's recipe (forward, label-smoothed loss, backward, AdamW) on a batch
of 64 training digits for each architecture in turn; we report the median over rounds of the per-step mean and
write ``benchmarks/results/ch1_step_ms_cpu.json``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ch1_step_times.py --add ggem_vit channelvit_1ch vit_patch2

times architectures added later round-robin with the plain ViT and records each at its measured ratio to the plain
ViT times the recorded plain-ViT time (the budgets are ratios; the recorded ones, and the models trained by them,
stay as they are). The raw times of that run are kept under ``added``.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vitlab.methods.architectures import recipes
from vitlab.models import create_model
from vitlab import seed_everything

METHODS = ("vit", "t2t_vit", "crossvit", "volo", "dhvt", "dualtoken_vit", "cas_vit", "duoformer",
           "shift_equivariant", "l2vit", "gmm_vit", "hyena_hyena", "hyena_hybrid", "vit_resnas")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--add", nargs="+", metavar="METHOD", help="time only these (with the plain ViT) and add them")
    args = ap.parse_args()
    methods = ("vit", *args.add) if args.add else METHODS
    torch.set_num_threads(1)
    recipes.import_all()
    train, _, _ = recipes.data("digits", "cpu")
    x, y = train.images[:64], train.labels[:64]
    steps = {}
    for method in methods:
        seed_everything(0)
        step = recipes.make_train_step(create_model(recipes.model_name(method)), x, y)
        step(), step()  # warm-up: allocator and AdamW state
        steps[method] = step
    times = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[method].append((time.perf_counter() - t0) * 1e3 / args.steps)
    ms = {m: round(statistics.median(t), 1) for m, t in times.items()}
    for m, v in ms.items():
        print(f"{m:18s} {v:7.1f} ms/step  ({v / ms['vit']:.2f}x the plain ViT)")
    out = Path(__file__).parent / "results" / "ch1_step_ms_cpu.json"
    record = {"rounds": args.rounds, "steps": args.steps, "threads": 1, "batch": 64,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    if args.add:
        old = json.loads(out.read_text())
        for m in args.add:
            old["ms_per_step"][m] = round(ms[m] / ms["vit"] * old["ms_per_step"]["vit"], 1)
        old.setdefault("added", []).append({"ms_per_step_raw": ms, **record})
        out.write_text(json.dumps(old, indent=1) + "\n")
    else:
        out.write_text(json.dumps({"ms_per_step": ms, **record}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
