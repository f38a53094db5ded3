"""benchmarks/kernels.py's logic on CPU (the kernels' references run; timing needs a GPU): every case builds,
every implementation agrees with eager within the benchmark's own correctness bound, and a wrong result fails."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEVICE = "cpu"
    return mod


@pytest.mark.parametrize("op", ["attention", "attention_colsum", "attention_diag", "layernorm", "add_layernorm",
                                "mlp", "token_merge", "fake_quant", "fake_quant_log2", "linear_attention"])
def test_every_case_builds_and_every_impl_matches_eager(bench, op):
    torch.manual_seed(0)
    inputs, impls, n_grad, work, unit = bench.case(op, 192, 3, 1)
    assert work[1] > work[0] > 0 and unit in ("TFLOP/s", "GB/s")
    with torch.no_grad():
        refs = bench._tuple(impls["eager"](*inputs))
        for name, fn in impls.items():
            bench.check_outputs(bench._tuple(fn(*inputs)), refs)
    if op == "attention":
        assert {"sdpa", "sdpa+cls"} <= set(impls)  # the fair baselines are there


def test_a_wrong_result_fails_the_row(bench):
    ref = torch.zeros(4)
    with pytest.raises(AssertionError, match="wrong result"):
        bench.check_outputs((ref + 1,), (ref,))
    with pytest.raises(AssertionError, match="shape"):
        bench.check_outputs((torch.zeros(3),), (ref,))


def test_without_cuda_it_says_so_and_exits_0(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    assert bench.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_committed_gpu_records_summarise():
    """Each committed kernels-*.json record renders (every op it holds, triton against its baselines)."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("kernels_summary", root / "benchmarks" / "kernels_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    records = sorted((root / "benchmarks" / "results").glob("kernels-*.json"))
    for path in records:
        record = json.loads(path.read_text())
        text = summary.table(record)
        assert record["commit"] and record["driver"], path.name
        for r in record["rows"]:
            assert r.get("ms") is not None, f"{path.name}: a failed row {r['op']} {r['impl']}: {r.get('error')}"
            assert f"| {r['op']} | {r['model']} | {r['batch']} | {r['mode']} |" in text
    assert summary.main([]) == 2
