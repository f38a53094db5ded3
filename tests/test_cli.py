"""The command lines (train, course, zoo): --help at once (no torch), choices and defaults shown, errors in one line, --save checked
before training and readable by the zoo."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitlab import cli, zoo

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=120):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("module", [("vitlab.train",), ("vitlab.course", "run"), ("vitlab.zoo", "train")])
def test_help_is_full_and_quick(module):
    p, secs = run(*module, "--help")
    assert p.returncode == 0 and secs < 5, secs  # < 2 s on a quiet machine; no torch import
    assert "default" in p.stdout and "smoke" in p.stdout and "cpu" in p.stdout
    if module[0] == "vitlab.train":
        for word in ("--steps", "--device", "--warmup", "--weight-decay", "--shift", "cluttered_scenes", "vit_tiny",
                     "at most one of --epochs, --steps, --seconds"):
            assert word in p.stdout, word


def test_help_does_not_import_torch():
    code = ("import sys; from vitlab.cli import train_parser, course_parser, zoo_parser; train_parser(); "
            "course_parser(); zoo_parser(); "
            "import vitlab; vitlab.profile('cpu'); print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stdout.strip() == "False", p.stderr


def test_names_match_the_registries():
    # the registries as a fresh process has them: lesson modules (chapter 1's ch1_*, chapter 5's MAE and tokenizers)
    # register their own models and data uses when imported, and are not CLI choices
    code = "import json; from vitlab.data import DATASETS; from vitlab.models import MODELS; " \
           "print(json.dumps([sorted(DATASETS), sorted(MODELS)]))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    datasets, models = json.loads(p.stdout)
    # the multi-label x-rays and the 3-D volumes feed chapter 5's own loops, the captioned scenes chapter 7's, not
    # `python -m vitlab.train`
    not_cli = {"thorax_xrays", "shape_volumes", "vlm_caption_scenes"}
    assert set(cli.DATASET_NAMES) == set(datasets) - not_cli and set(cli.MODEL_NAMES) == set(models)


@pytest.mark.parametrize("args, word", [
    (("--profile", "laptop"), "invalid choice: 'laptop'"),
    (("--data", "imagenet"), "invalid choice: 'imagenet'"),
    (("--model", "vit_huge"), "invalid choice: 'vit_huge'"),
    (("--epochs", "2", "--seconds", "3"), "not allowed with argument"),
    (("--epochs", "0"), "expected a positive int"),
    (("--lr", "-1"), "expected a finite number"),
    (("--save", "."), "is a directory"),
])
def test_train_errors_are_one_line(args, word):
    p, _ = run("vitlab.train", *args)
    last = p.stderr.strip().splitlines()[-1]  # argparse's usage, then the error on one line
    assert p.returncode == 2 and last.startswith("python -m vitlab.train: error:") and word in last, p.stderr
    assert "Traceback" not in p.stderr


def test_a_bad_combination_found_after_parsing_is_one_line_too():
    p, _ = run("vitlab.train", "--profile", "smoke", "--data", "digits8", "--model", "vit_nano", "--steps", "1",
               "--shift", "8", timeout=300)  # digits8 images are 8 px: a shift of 8 is as large as the image
    assert p.returncode == 2 and "shift must be an int in 0..7" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_course_errors_are_one_line():
    p, _ = run("vitlab.course", "run", "--nb", "notebooks/nope.ipynb")
    assert p.returncode == 2 and "is not a notebook file" in p.stderr and "Traceback" not in p.stderr


def test_saved_checkpoint_is_one_the_zoo_reads(tmp_path):
    out = tmp_path / "vit.pt"
    p, _ = run("vitlab.train", "--profile", "smoke", "--data", "digits8", "--model", "vit_nano", "--steps", "2",
               "--batch-size", "32", "--save", str(out), timeout=300)
    assert p.returncode == 0, p.stderr
    payload = zoo.load_checkpoint(out)
    from vitlab.models import VisionTransformer

    model = VisionTransformer(**payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    assert payload["config"]["cli"]["steps"] == 2


def test_zoo_command_line_loads_shows_and_names_a_bad_entry():
    # a committed checkpoint: `train` loads it (no training) and prints its scores; `show` reads files only
    p, _ = run("vitlab.zoo", "train", "vit_tiny_mnist5k", "--profile", "cpu", timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("vit_tiny_mnist5k: ") and "'test_acc': " in p.stdout, p.stderr
    p, _ = run("vitlab.zoo", "show", "vit_tiny_mnist5*", "--profile", "smoke", timeout=300)
    assert p.returncode == 0 and "'model': 'vit_tiny'" in p.stdout and "vit_tiny_mnist5k-" in p.stdout, p.stderr
    if not torch.cuda.is_available():
        p, _ = run("vitlab.zoo", "train", "vit_tiny_mnist5k", "--profile", "gpu")
        assert p.returncode == 2 and "needs a CUDA device" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p, _ = run("vitlab.zoo", "train", "no_such_entry", timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last == ("python -m vitlab.zoo: error: no zoo entry matches 'no_such_entry' "
                                          "(python -m vitlab.zoo list shows them)"), p.stderr


def test_zoo_list_filters_by_pattern(capsys, monkeypatch):
    monkeypatch.setattr(zoo, "register_all", lambda: [])  # the base entries suffice; keep this process's registries
    assert zoo.main(["list", "vit_tiny_mnist5k", "--profile", "cpu"]) == 0
    assert capsys.readouterr().out.split() == ["vit_tiny_mnist5k", "file"]
