"""Benchmark vitlab's Triton kernels against eager PyTorch and torch.compile on a CUDA GPU.

    python benchmarks/kernels.py            # ViT-Ti/S/B shapes, batch 64/128/256, fwd and fwd+bwd
    python benchmarks/kernels.py --quick    # ViT-S at batch 64 only, shorter timing runs
    python benchmarks/kernels.py --ops layernorm mlp --models vit_base --batches 256 --no-compile

Each op runs in bf16 at N=197 tokens (224 px, patch 16, + CLS), head dim 64. Times are medians from
``triton.testing.do_bench`` (L2 flushed between runs). Throughput is reported as
  TFLOP/s  for attention, mlp, linear_attention (model FLOPs: matmuls only; backward = 2.5x forward for
           attention, as FlashAttention counts it, 2x for the others), and
  GB/s     for layernorm, fake_quant, token_merge (the minimum bytes the op must move: each activation
           tensor read or written once; parameters, indices and per-row statistics ignored),
and as a fraction of the device's peak (dense bf16 tensor-core FLOP/s, HBM bandwidth) when the device
is in PEAKS. The same FLOP and byte counts are used for every implementation, so the ratios between
rows are ratios of times. Results go to benchmarks/results/kernels-<device>.json.

Fair baselines. Attention's are SDPA pinned to the flash backend (recorded), and SDPA plus the O(N d) CLS row
the model computes without a kernel ("sdpa+cls": what our attention-with-CLS must beat), besides eager and
torch.compile of the version that materialises the probabilities. Column sums and the diagonal are benchmarked
too. fake_quant gets what the model's quantiser passes (1-element tensors, not Python numbers). Every
implementation's output is checked against eager before it is timed (a wrong fast kernel is a failed row, not a
result), and each row records the device time (CUDA kernels only, from the profiler) beside the wall time,
so host overhead shows. The record holds the git commit, the driver and the autotuner's chosen configs.

On a machine without CUDA it prints why it cannot run and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing vitlab

# device-name substring -> (dense bf16 tensor-core TFLOP/s, HBM TB/s); first match wins
PEAKS = {
    "H200": (989.0, 4.8),
    "H100 SXM": (989.0, 3.35),
    "H100 80GB HBM3": (989.0, 3.35),  # how the SXM part names itself
}
MODELS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads (d = 64)
OPS = ("attention", "attention_colsum", "attention_diag", "layernorm", "add_layernorm", "mlp", "token_merge",
       "fake_quant", "fake_quant_log2", "linear_attention")
# max |impl - eager| allowed before a row counts as wrong: bf16 outputs (8 bits of mantissa), summed in other
# orders, differ by a few ulp of the largest value; a wrong kernel is off by far more
ATOL, RTOL = 1e-2, 2e-2
TOKENS, HEAD_DIM, MERGE_R = 197, 64, 16  # MERGE_R: tokens removed by one ToMe merge
DTYPE = torch.bfloat16
DEVICE = "cuda"  # a module constant so the logic can be smoke-tested on CPU under the interpreter


def peaks(name: str):
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None, None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------------------------------
# the cases: for each op, the inputs, the implementations, and the work they do
# ----------------------------------------------------------------------------------------------------
def sdpa_backend():
    """SDPA pinned to the flash backend (the fastest for these shapes; what we compare with), if available."""
    from contextlib import nullcontext

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return nullcontext()
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if DEVICE == "cuda" else nullcontext()


def check_outputs(outs, refs) -> float:
    """max |out - ref| over the outputs both give (the CLS row / side output too); raises past
    ATOL + RTOL * max |ref| for any of them."""
    err = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise AssertionError(f"shape {tuple(o.shape)} != eager's {tuple(r.shape)}")
        e, bound = (o.float() - r.float()).abs().max().item(), ATOL + RTOL * r.float().abs().max().item()
        if not e <= bound:
            raise AssertionError(f"wrong result: max |impl - eager| = {e:.3g} > {bound:.3g}")
        err = max(err, e)
    return err


def device_ms(step, iters: int = 10) -> float:
    """Milliseconds per step spent in CUDA kernels (profiler sums), without the host's launch overhead."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e3 / iters


def _randn(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE).requires_grad_(grad)


def case(op: str, C: int, H: int, B: int):
    """Returns (inputs, impls {name: fn(*inputs) -> tensor or tuple}, n_grad_outputs, work, unit).

    work = (forward, forward+backward) in FLOPs or bytes; the first impl is ours, "eager" the baseline.
    """
    from vitlab.kernels import attention as A
    from vitlab.kernels import fake_quant as FQ
    from vitlab.kernels import layernorm as LN
    from vitlab.kernels import linear_attention as LA
    from vitlab.kernels import mlp as MLP
    from vitlab.kernels import token_merge as TM

    N, d, e = TOKENS, HEAD_DIM, torch.finfo(DTYPE).bits // 8
    if op == "attention":
        q, k, v = (_randn(B, H, N, d) for _ in range(3))
        scale = d ** -0.5

        def ours(q, k, v):
            out, sides = A.attention(q, k, v, return_cls=True)
            return out, sides["cls"]

        def ours_fused_bwd(q, k, v):  # the same forward; the one-program-per-head backward (not the default)
            saved, A.FUSED_BWD_MAX_N = A.FUSED_BWD_MAX_N, A.FUSED_BWD_LIMIT  # read when the forward saves its context
            try:
                return ours(q, k, v)
            finally:
                A.FUSED_BWD_MAX_N = saved

        def eager(q, k, v):  # materialises the probabilities to read the CLS row
            p = (q @ k.transpose(-2, -1) * scale).softmax(-1)
            return p @ v, p[:, :, 0, :]

        def sdpa(q, k, v):  # fastest PyTorch attention, but cannot give the CLS row
            with sdpa_backend():
                return F.scaled_dot_product_attention(q, k, v)

        def sdpa_cls(q, k, v):  # the model's own fallback: SDPA, then one query's softmax for the CLS row, O(N d)
            with sdpa_backend():
                out = F.scaled_dot_product_attention(q, k, v)
            return out, ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).float().softmax(-1)[:, :, 0]

        fl = 4 * B * H * N * N * d
        impls = {"triton": ours, "triton_fused": ours_fused_bwd, "eager": eager, "compile": eager, "sdpa": sdpa,
                 "sdpa+cls": sdpa_cls}
        return (q, k, v), impls, 1, (fl, 3.5 * fl), "TFLOP/s"
    if op in ("attention_colsum", "attention_diag"):  # a side output needing every row's lse
        q, k, v = (_randn(B, H, N, d) for _ in range(3))
        scale, side = d ** -0.5, op.split("_")[1]

        def ours(q, k, v):
            out, sides = A.attention(q, k, v, **{f"return_{side}": True})
            return out, sides[side]

        def eager(q, k, v):
            p = (q @ k.transpose(-2, -1) * scale).softmax(-1)
            return p @ v, (p.float().sum(-2) if side == "colsum" else p.float().diagonal(dim1=-2, dim2=-1))

        fl = 4 * B * H * N * N * d
        return (q, k, v), {"triton": ours, "eager": eager, "compile": eager}, 1, (fl, 3.5 * fl), "TFLOP/s"
    if op in ("layernorm", "add_layernorm"):
        x, r = _randn(B, N, C), _randn(B, N, C)
        w = torch.ones(C, device=DEVICE, dtype=DTYPE, requires_grad=True)
        b = torch.zeros(C, device=DEVICE, dtype=DTYPE, requires_grad=True)
        n = B * N * C * e
        if op == "layernorm":
            def ours(x, w, b):
                return LN.layer_norm(x, w, b, 1e-6)

            def eager(x, w, b):
                return F.layer_norm(x, (C,), w, b, 1e-6)

            return (x, w, b), {"triton": ours, "eager": eager, "compile": eager}, 1, (2 * n, 5 * n), "GB/s"

        def ours(x, r, w, b):
            return LN.layer_norm(x, w, b, 1e-6, residual=r)

        def eager(x, r, w, b):
            s = x + r
            return F.layer_norm(s, (C,), w, b, 1e-6), s

        return (x, r, w, b), {"triton": ours, "eager": eager, "compile": eager}, 2, (4 * n, 8 * n), "GB/s"
    if op == "mlp":
        x, w, b = _randn(B, N, C), _randn(4 * C, C, scale=C ** -0.5), _randn(4 * C, scale=0.1)

        def eager(x, w, b):
            return F.gelu(F.linear(x, w, b))

        fl = 2 * B * N * C * 4 * C
        return (x, w, b), {"triton": MLP.linear_gelu, "eager": eager, "compile": eager}, 1, (fl, 3 * fl), \
            "TFLOP/s"
    if op == "token_merge":
        J = N - MERGE_R
        x = _randn(B, N, C)
        size = torch.ones(B, N, device=DEVICE)
        # ToMe-like: the first J tokens stay, the last MERGE_R each join a random kept token
        dst = torch.arange(N, device=DEVICE).repeat(B, 1)
        dst[:, J:] = torch.randint(0, J, (B, MERGE_R), device=DEVICE)

        def ours(x):
            return TM.merge(x, size, dst, J, check_index=False)

        def eager(x):
            return TM.merge_ref(x, size, dst, J, check_index=False)

        n = (B * N * C + B * J * C) * e
        return (x,), {"triton": ours, "eager": eager, "compile": eager}, 1, (n, 2 * n), "GB/s"
    if op == "fake_quant":
        x = _randn(B, N, C, scale=2.0)
        # what vitlab.quant's FakeQuantizer passes: its calibrated buffers, 1-element tensors on the device
        scale_t = torch.tensor([0.05], device=DEVICE)
        zp_t = torch.tensor([128], device=DEVICE, dtype=torch.int32)

        def ours(x):
            return FQ.fake_quant(x, scale_t, zp_t, 8)

        def eager(x):  # torch's own fused kernel
            return torch.fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255)

        n = x.numel()
        return (x,), {"triton": ours, "eager": eager, "compile": eager}, 1, (2 * n * e, n * (4 * e + 2)), "GB/s"
    if op == "fake_quant_log2":
        p = torch.softmax(torch.randn(B, H, N, N, device=DEVICE), -1).to(DTYPE).requires_grad_()

        def ours(p):
            return FQ.fake_quant(p, 1.0, None, 4, mode="log2")

        def eager(p):  # the same definition in torch ops, with the straight-through trick
            with torch.no_grad():
                pf = p.float()
                pos = pf > 0
                qf = torch.where(pos, torch.round(-torch.log2(torch.where(pos, pf, 1.0))), 16.0)
                y = torch.where(qf > 15, 0.0, torch.exp2(-qf.clamp_min(0))).to(p.dtype)
                keep = (qf >= 0) & (qf <= 15)
            return y + (p - p.detach()) * keep

        n = p.numel()
        return (p,), {"triton": ours, "eager": eager, "compile": eager}, 1, (2 * n * e, n * (4 * e + 2)), "GB/s"
    if op == "linear_attention":
        q, k, v = (_randn(B, H, N, d) for _ in range(3))
        fl = 4 * B * H * N * d * d
        return (q, k, v), {"triton": LA.linear_attention, "eager": LA.linear_attention_ref,
                           "compile": LA.linear_attention_ref}, 1, (fl, 3 * fl), "TFLOP/s"
    raise ValueError(f"unknown op {op!r}; valid: {list(OPS)}")


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _compile_fn(fn):
    torch._dynamo.reset()  # fresh caches per case: no recompile limits, no stale dynamic shapes
    return torch.compile(fn, dynamic=False)


def run_case(op, model, B, *, rep, warmup, compile_on, peak):
    import triton.testing

    C, H = MODELS[model]
    inputs, impls, n_grad, work, unit = case(op, C, H, B)
    if not compile_on:
        impls = {k: f for k, f in impls.items() if k != "compile"}
    leaves = [t for t in inputs if t.requires_grad]
    with torch.no_grad():
        refs = [t.float() for t in _tuple(impls["eager"](*inputs))]  # every implementation is checked against these
    rows = []
    for mode, w in zip(("fwd", "fwd+bwd"), work):
        times = {}
        for name, fn in impls.items():
            row = dict(op=op, model=model, batch=B, tokens=TOKENS, width=C, heads=H, mode=mode, impl=name,
                       dtype=str(DTYPE).replace("torch.", ""), unit=unit)
            try:
                f = _compile_fn(fn) if name == "compile" else fn
                if mode == "fwd":
                    def step(f=f):
                        with torch.no_grad():
                            return f(*inputs)
                    out = _tuple(step())  # warm-up: compilation, autotuning
                    row["max_abs_diff_vs_eager"] = check_outputs(out, refs)  # a wrong result fails the row
                else:
                    outs = _tuple(f(*inputs))[:n_grad]
                    grads = [torch.randn_like(o) for o in outs]

                    def step(f=f, grads=grads):
                        torch.autograd.backward(_tuple(f(*inputs))[:n_grad], grads)
                    step()  # warm-up: compilation, autotuning
                    for t in leaves:
                        t.grad = None
                ms = triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=leaves or None,
                                             return_mode="median")
                row["device_ms"] = device_ms(step)
                value = w / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
                top = peak[0] if unit == "TFLOP/s" else (peak[1] * 1e3 if peak[1] else None)
                row.update(ms=ms, value=value, frac_peak=(value / top if top else None))
                times[name] = ms
            except Exception as exc:  # keep going: one failing baseline must not lose the other rows
                row.update(ms=None, value=None, frac_peak=None, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
        for row in rows[-len(impls):]:
            if row.get("ms") and times.get("eager"):
                row["speedup_vs_eager"] = times["eager"] / row["ms"]
            if row.get("ms") and times.get("compile"):
                row["speedup_vs_compile"] = times["compile"] / row["ms"]
            for base in ("sdpa", "sdpa+cls"):
                if row.get("ms") and times.get(base):
                    row[f"speedup_vs_{base}"] = times[base] / row["ms"]
    return rows


def print_table(rows):
    head = f"{'op':<17}{'model':<10}{'B':>4} {'mode':<8}{'impl':<9}{'ms':>9}{'dev ms':>8}{'value':>10} {'unit':<8}" \
           f"{'%peak':>6}{'x eager':>8}{'x comp':>7}{'x sdpa':>7}{'x sdpa+cls':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("ms") is None:
            print(f"{r['op']:<17}{r['model']:<10}{r['batch']:>4} {r['mode']:<8}{r['impl']:<9}  "
                  f"failed: {r.get('error', '')[:80]}")
            continue
        pct = f"{100 * r['frac_peak']:.0f}" if r.get("frac_peak") else "-"
        se = f"{r['speedup_vs_eager']:.2f}" if r.get("speedup_vs_eager") else "-"
        sc = f"{r['speedup_vs_compile']:.2f}" if r.get("speedup_vs_compile") else "-"
        ss = f"{r['speedup_vs_sdpa']:.2f}" if r.get("speedup_vs_sdpa") else "-"
        sc2 = f"{r['speedup_vs_sdpa+cls']:.2f}" if r.get("speedup_vs_sdpa+cls") else "-"
        print(f"{r['op']:<17}{r['model']:<10}{r['batch']:>4} {r['mode']:<8}{r['impl']:<9}{r['ms']:>9.3f}"
              f"{r.get('device_ms') or 0:>8.3f}{r['value']:>10.1f} {r['unit']:<8}{pct:>6}{se:>8}{sc:>7}{ss:>7}{sc2:>11}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="ViT-S at batch 64, short timing runs")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device found. The Triton kernels only run for real on a GPU "
              "(on CPU they run in Triton's interpreter, which is for tests, not timing). Nothing to do.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/kernels.py: TRITON_INTERPRET=1 is set; unset it to benchmark the compiled kernels.")
        return 2

    import triton

    models = args.models or (["vit_small"] if args.quick else list(MODELS))
    batches = args.batches or ([64] if args.quick else [64, 128, 256])
    rep, warmup = (20, 5) if args.quick else (100, 25)
    name = torch.cuda.get_device_name()
    peak = peaks(name)
    torch.manual_seed(0)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    print(f"{name}: peaks {peak[0]} TFLOP/s bf16 dense, {peak[1]} TB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}")

    out = args.out or ROOT / "benchmarks" / "results" / f"kernels-{slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for op in args.ops:
        for model in models:
            for B in batches:
                print(f"  {op} {model} B={B} ...", flush=True)
                rows += run_case(op, model, B, rep=rep, warmup=warmup, compile_on=not args.no_compile, peak=peak)
                torch.cuda.empty_cache()  # the case's tensors died with run_case's frame
                save_record(out, name, peak, args, models, batches, rows)  # a run cut short keeps its rows
    print()
    print_table(rows)
    print(f"\nsaved {out}")
    return 0


def save_record(out: Path, name: str, peak, args, models, batches, rows) -> None:
    """Writes the record atomically (the rows so far, the environment, the autotuner's picks)."""
    import triton

    record = dict(
        device=name, peak_tflops_bf16=peak[0], peak_hbm_tbps=peak[1], driver=_driver(), commit=_commit(),
        sdpa_backend="flash (pinned)", chosen_configs=_chosen_configs(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        args=dict(quick=args.quick, ops=args.ops, models=models, batches=batches, compile=not args.no_compile),
        notes=("dtype bf16, N=197, head dim 64; ms = do_bench median; TFLOP/s from model FLOPs "
               "(attention bwd = 2.5x fwd, mlp/linear_attention bwd = 2x fwd); GB/s from the minimum "
               "activation bytes; frac_peak vs the PEAKS table"),
        rows=rows,
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)


def _commit() -> str | None:
    """HEAD, or VITLAB_COMMIT where the tree was copied without .git (a lent GPU machine)."""
    if os.environ.get("VITLAB_COMMIT"):
        return os.environ["VITLAB_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def _chosen_configs() -> dict:
    """The autotuner's pick per kernel and key (block sizes, warps, stages), as strings."""
    from vitlab.kernels import attention as A
    from vitlab.kernels import layernorm as LN

    out = {}
    for name, kern in (("attn_fwd", A._attn_fwd), ("attn_bwd_dkdv", A._attn_bwd_dkdv), ("attn_bwd_dq", A._attn_bwd_dq),
                       ("attn_bwd_fused", A._attn_bwd_fused), ("attn_bwd_dbias", A._attn_bwd_dbias),
                       ("attn_sides", A._attn_sides), ("ln_fwd", getattr(LN, "_ln_fwd_kernel", None)),
                       ("ln_bwd", getattr(LN, "_ln_bwd_kernel", None))):
        cache = getattr(kern, "cache", None) or {}
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
