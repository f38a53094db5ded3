"""Project-wide pytest set-up: CPU runs of Triton kernels go through the interpreter, and the
terminal summary lists the slowest notebooks (nbval reports per cell; we add them up per notebook)."""
import os
from collections import defaultdict

import pytest

os.environ.setdefault("VITLAB_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
# Must precede the first `import triton` in the process: kernels decorated without it cannot run on CPU.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Notebook kernels start without TRITON_INTERPRET: in this process it routes CPU tensors through Triton's
    interpreter (for the kernel tests), but a lesson should run as a user runs it, on the PyTorch references
    (about 15x faster for fake-quant). The kernels lesson sets the variable itself, before importing triton."""
    if ".ipynb" not in item.nodeid:
        yield
        return
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


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
