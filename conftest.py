"""Project-wide pytest set-up: CPU runs of Triton kernels go through the interpreter, and the
terminal summary lists the slowest notebooks (nbval reports per cell; we add them up per notebook)."""
import os
from collections import defaultdict

os.environ.setdefault("VITLAB_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
# Must precede the first `import triton` in the process: kernels decorated without it cannot run on CPU.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    per_nb = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for rep in reports:
            nodeid = getattr(rep, "nodeid", "")
            if ".ipynb" in nodeid and getattr(rep, "when", None) == "call":
                per_nb[nodeid.split("::")[0]] += rep.duration
    if per_nb:
        terminalreporter.write_sep("=", "slowest notebooks (seconds, summed over cells)")
        for nb, secs in sorted(per_nb.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{secs:7.1f}  {nb}")
