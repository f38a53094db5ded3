"""One training step (forward, backward, AdamW) of the course ViT against timm's VisionTransformer of the same
configuration, on CPU, in one run. Prints the speed ratio timm_time / vitlab_time (>= 1 means vitlab is faster).

    .venv/bin/python benchmarks/cpu_train_step.py [--model vit_tiny] [--batch 128] [--repeats 30]

Steps alternate between the two models so that machine noise hits both alike; we report medians.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from vitlab.models import create_model, model_config


def make_step(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = model_config(args.model)
    ours = create_model(args.model).train()
    ref = timm.models.vision_transformer.VisionTransformer(**cfg).train()
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(args.batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    y = torch.randint(0, cfg["num_classes"], (args.batch,))
    steps = {"vitlab": make_step(ours, x, y), "timm": make_step(ref, x, y)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in (steps.items() if i % 2 else reversed(steps.items())):
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = med["timm"] / med["vitlab"]
    result = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "vitlab_ms": round(med["vitlab"], 2), "timm_ms": round(med["timm"], 2), "ratio_timm_over_vitlab":
              round(ratio, 3), "torch": torch.__version__, "timm": timm.__version__, "cpu": platform.processor()
              or platform.machine()}
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats} steps")
    print(f"  vitlab ViT: {med['vitlab']:.1f} ms/step    timm ViT: {med['timm']:.1f} ms/step")
    print(f"  ratio timm/vitlab = {ratio:.3f}  ({'vitlab not slower' if ratio >= 0.95 else 'vitlab SLOWER'})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
