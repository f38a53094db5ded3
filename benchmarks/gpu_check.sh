#!/usr/bin/env bash
# The checks a lent GPU machine runs, in one call (device time is scarce): the kernel tests compiled for the
# GPU, the quick benchmark, and attention at the size the targets name (ViT-B, batch 256). Each step has its
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
timeout 200 $PY -m pytest -q -p no:cacheprovider -n 8 --tb=short tests/kernels tests/test_benchmarks.py 2>&1 \
  | tee "$OUT/gpu_tests_kernels.log"
echo "tests rc=$?" | tee -a "$OUT/gpu_tests_kernels.log"
timeout 170 $PY benchmarks/kernels.py --quick --out "$OUT/kernels-quick.json" 2>&1 | tee "$OUT/gpu_bench_quick.log"
timeout 120 $PY benchmarks/kernels.py --ops attention attention_colsum attention_diag --models vit_base \
  --batches 256 --out "$OUT/kernels-vit_base-b256.json" 2>&1 | tee "$OUT/gpu_bench_vitb.log"
