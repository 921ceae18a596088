"""The suite collects without its optional packages, as on the lent GPU machine (../shared/GPU.md),
where neither `datasets` nor `trl`, the serve and eval extras, `openai` nor `ray` are installed: the tests
that need one skip, and a collection error would stop the whole run before its first test."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("datasets", "trl", "fastapi", "uvicorn", "httpx", "prometheus_client", "openai", "ray", "guidellm",
            "lm_eval", "liger_kernel", "rouge_score")  # fmt: skip

# Runs pytest with OPTIONAL made absent: their imports fail as those of missing packages do, and
# importlib's find_spec and metadata (which transformers' `is_*_available` read) do not see them.
_WITHOUT_OPTIONAL = """
import importlib.abc, importlib.metadata, importlib.util, sys
import pytest

OPTIONAL = set(sys.argv[1].split(","))

def absent(name):
    return name.split(".")[0].replace("-", "_") in OPTIONAL

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

def hide(function, error):
    def hidden(name, *args):
        if absent(name):
            raise error(name)
        return function(name, *args)
    return hidden

sys.meta_path.insert(0, Absent())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if absent(name) else find_spec(name, package)
importlib.metadata.version = hide(importlib.metadata.version, importlib.metadata.PackageNotFoundError)
importlib.metadata.distribution = hide(importlib.metadata.distribution, importlib.metadata.PackageNotFoundError)
sys.exit(pytest.main(sys.argv[2:]))
"""


def test_suite_collects_without_optional_packages():
    command = [sys.executable, "-c", _WITHOUT_OPTIONAL, ",".join(OPTIONAL), "--collect-only", "-q",
               "-p", "no:cacheprovider", "tests"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and " error" not in output, output[-4000:]
    assert "tests/training/test_trainer.py" in output and "could not import 'datasets'" in output
