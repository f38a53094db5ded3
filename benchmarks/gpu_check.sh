#!/usr/bin/env bash
# The checks a lent GPU machine runs, in one call (device time is scarce): the kernel tests compiled for the
# GPU, the quick benchmark, and (FULL=1) attention at the size the targets name (ViT-B, batch 256). Each step has its
# own time limit so one slow step cannot eat the others; logs and JSON go to $OUT (default benchmarks/results).
#   VITLAB_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/gpu_env.txt"
# one pytest per file, -v: a run cut short by its limit still names every result so far (a -q run printed its
# failures only at the end, and lost them, on 2026-12-04)
for f in tests/kernels/test_*.py tests/test_benchmarks.py; do
  limit=30; [[ $f == *test_attention.py ]] && limit=150  # attention holds most cases (and autotuning)
  timeout $limit $PY -m pytest -v -p no:cacheprovider -p no:benchmark -n 8 --tb=line -rf "$f" 2>&1 \
    | grep -v "PytestBenchmarkWarning\|warner(" | tee -a "$OUT/gpu_tests_kernels.log"
  echo "$f rc=$?" | tee -a "$OUT/gpu_tests_kernels.log"
done
timeout 170 $PY benchmarks/kernels.py --quick --out "$OUT/kernels-quick.json" 2>&1 | tee "$OUT/gpu_bench_quick.log"
# the size the targets name; recorded on 2026-12-04 (benchmarks/results), so only with FULL=1 (the call's 600 s)
if [ "${FULL:-0}" = 1 ]; then
  timeout 120 $PY benchmarks/kernels.py --ops attention attention_colsum attention_diag --models vit_base \
    --batches 256 --out "$OUT/kernels-vit_base-b256.json" 2>&1 | tee "$OUT/gpu_bench_vitb.log"
fi
