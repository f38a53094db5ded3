"""The course runner: saved notebooks keep only the final state of progress bars."""
import nbformat

from vitlab.course import collapse_progress


def test_progress_updates_collapse_to_the_final_text():
    cell = nbformat.v4.new_code_cell("fit(...)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="epoch table\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rtrain:   0%|     | 0/9"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rtrain:  50%|##   | 4/9"),
                    nbformat.v4.new_output("stream", name="stderr", text="\r                        \r"),
                    nbformat.v4.new_output("stream", name="stdout", text="done\n\rkept: 100%\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    collapse_progress(nb)
    assert [(o.name, o.text) for o in nb.cells[0].outputs] == [("stdout", "epoch table\n"), ("stdout", "done\nkept: 100%\n")]


def test_outputs_without_carriage_returns_are_untouched():
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n\n2\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "3"}, execution_count=1)]
    nb = nbformat.v4.new_notebook(cells=[cell])
    collapse_progress(nb)
    assert nb.cells[0].outputs[0].text == "1\n\n2\n" and len(nb.cells[0].outputs) == 2


def test_run_records_the_profile_and_time_in_the_notebook(tmp_path):
    import nbformat

    from vitlab.course import run_notebook

    src = tmp_path / "lesson.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(os.environ['VITLAB_PROFILE'])")])
    nbformat.write(nb, src)
    ok, secs, err = run_notebook(src, tmp_path / "out" / "lesson.ipynb", "smoke", tmp_path / "results")
    assert ok and not err
    done = nbformat.read(tmp_path / "out" / "lesson.ipynb", as_version=4)
    assert done.metadata["vitlab"]["profile"] == "smoke" and done.metadata["vitlab"]["passed"] is True
    assert 0 < done.metadata["vitlab"]["seconds"] <= secs + 1
    assert done.cells[0].outputs[0].text.strip() == "smoke"
    assert "iopub.execute_input" in done.cells[0].metadata["execution"]  # the per-cell timing the budget test reads
