"""The set-up stays honest: pyproject's ranges and environment.yml's pins name the same packages,
each pin satisfies its range, and CI runs exactly `make test`."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    text = (ROOT / "environment.yml").read_text()
    return {m[0].lower(): m[1] for m in re.findall(r"^\s*-\s*([A-Za-z0-9_.-]+)==(\S+)\s*$", text, re.M)}


def ranges() -> dict[str, Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = proj["dependencies"] + proj["optional-dependencies"]["dev"]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_same_packages_in_both_lists():
    assert set(pins()) == set(ranges())


def test_each_pin_satisfies_its_range():
    for name, req in ranges().items():
        assert req.specifier.contains(pins()[name], prereleases=True), (name, pins()[name], str(req))


def test_torch_pins_are_the_course_pins():
    assert pins()["torch"] == "2.14.1" and pins()["torchvision"] == "0.29.1"
    assert "torch==2.14.1 torchvision==0.29.1" in (ROOT / "Makefile").read_text()


def test_ci_runs_make_test_and_nothing_else():
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[-1] == "make test"
    assert all(l.startswith(("set ", "cd ")) for l in lines[:-1])


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first_code = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    assert "make run" in first_code and "make test" in first_code


def test_every_notebook_has_a_matching_place_and_asserts():
    import json

    notebooks = sorted((ROOT / "notebooks").rglob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        assert re.fullmatch(r"\d_[a-z_]+", nb.parent.name), nb
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "assert " in code, f"{nb.name} verifies nothing"
        assert "vitlab.profile(" in code or "profile(" in code, f"{nb.name} does not pick a profile"
