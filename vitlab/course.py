"""Run the course headless: ``python -m vitlab.course run [--profile smoke] [--nb path] [--out build]``.

Each notebook runs in a fresh kernel with ``VITLAB_PROFILE`` set, is saved executed under
``<out>/notebooks/``, and its ``vitlab.results.record`` row goes into ``<out>/results.md``.
``--inplace`` writes the outputs back into ``notebooks/`` instead (how the committed outputs are made).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .profiles import PROFILES
from .results import collect, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def find_notebooks(nb: str | None = None) -> list[Path]:
    if nb:
        p = Path(nb)
        p = p if p.is_absolute() else (Path.cwd() / p)
        if not p.exists() or p.suffix != ".ipynb":
            raise ValueError(f"course: --nb {nb!r} is not a notebook file; expected e.g. "
                             f"notebooks/0_foundations/vit_from_scratch.ipynb")
        return [p.resolve()]
    return sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def collapse_progress(nb) -> None:
    """Keep only the final state of progress bars in saved outputs, as a terminal shows them.

    Headless, tqdm writes every update as its own ``\\r``-led stream output; a committed notebook would carry
    thousands of them. Consecutive stream outputs of one stream are merged and each line keeps the text after
    its last carriage return; lines a finished bar blanked out are dropped.
    """
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream" and "\r" in out.text:
                lines = [line.rsplit("\r", 1)[-1] for line in out.text.split("\n")]
                out.text = "\n".join(line for line in lines if line.strip() or line == lines[-1])
        cell.outputs = [o for o in merged if not (o.output_type == "stream" and not o.text.strip())]


def run_notebook(path: Path, dest: Path, profile: str, results_dir: Path, timeout: int = 1800) -> tuple[bool, float, str]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    # the inline backend, so figures are saved into the executed notebook as images
    # tqdm.auto's plea for ipywidgets (its text bars work headless) would be committed as stderr noise
    env = {"VITLAB_PROFILE": profile, "VITLAB_RESULTS_DIR": str(results_dir),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONWARNINGS": "ignore:IProgress not found"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    start = time.perf_counter()
    error = ""
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        ok = True
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:  # a failed lesson, not a failed course
        ok, error = False, re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[-1][:300]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    collapse_progress(nb)
    # what made these outputs: tests/test_committed_notebooks.py checks committed lessons were cpu runs in budget
    nb.metadata["vitlab"] = {"profile": profile, "passed": ok, "seconds": round(time.perf_counter() - start, 1),
                             "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    if not ok and dest.resolve() == path.resolve():  # --inplace: a failed run never replaces the lesson
        dest = results_dir.parent / "failed" / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return ok, time.perf_counter() - start, error


def run(profile: str, nb: str | None, out: Path, inplace: bool, timeout: int = 1800) -> int:
    if profile not in PROFILES:
        raise SystemExit(f"course: unknown profile {profile!r}; valid profiles are {sorted(PROFILES)}")
    notebooks = find_notebooks(nb)
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    status, times = {}, {}
    for path in (bar := tqdm(notebooks, desc=f"course ({profile})", unit="nb")):
        bar.set_postfix_str(path.stem)
        dest = path if inplace else out / "notebooks" / path.relative_to(ROOT / "notebooks")
        ok, secs, err = run_notebook(path, dest, profile, results_dir, timeout)
        status[path.stem] = f"passed ({secs:.0f} s)" if ok else f"FAILED ({secs:.0f} s): {err}"
        times[path.stem] = secs
        tqdm.write(f"{'ok ' if ok else 'FAIL'} {secs:6.1f} s  {path.relative_to(ROOT)}" + ("" if ok else f"  {err}"))
    report = out / "results.md"
    report.write_text(f"# ViT Lab results (profile `{profile}`)\n\n"
                      f"Generated by `make run PROFILE={profile}`; one row per lesson.\n\n"
                      + to_markdown(collect(results_dir), status))
    print(f"wrote {report}")
    return 0 if all(s.startswith("passed") for s in status.values()) else 1


def main(argv=None) -> int:
    from .cli import course_parser

    ap = course_parser()
    args = ap.parse_args(argv)
    try:
        notebooks_ok = run(args.profile, args.nb, Path(args.out or ROOT / "build").resolve(), args.inplace,
                           args.timeout)
    except ValueError as e:  # a bad --nb: one line, not a traceback
        ap.error(str(e))
    return notebooks_ok


if __name__ == "__main__":
    sys.exit(main())
