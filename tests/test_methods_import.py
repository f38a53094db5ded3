"""Every lesson module registers its models, datasets, zoo objectives and entries when imported; a name two modules
both register raises. A compare notebook imports many of them at once, so they must all import into one process."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_module_imports_into_one_process():
    code = ("import importlib, pkgutil, vitlab.methods as m\n"
            "names = [i.name for i in pkgutil.walk_packages(m.__path__, 'vitlab.methods.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(len(names))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.split()[-1]) > 50
