"""What every test shares: the Triton interpreter on a machine without CUDA, `bench` importable by
name from its folder alone, the test device, and the versions under test in the log's header."""

import importlib.machinery
import importlib.util
import os
import sys

import torch

# Kernels run compiled on a GPU; without one, through Triton's interpreter, which reads this
# variable when triton is first imported, so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tests import bench/'s scripts and helpers as `bench.<name>`, from that folder alone: the repository
# root never goes on sys.path (pytest runs with --import-mode=importlib), so nothing at the root can
# shadow a dependency of the same name.
_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
_bench_spec = importlib.machinery.ModuleSpec("bench", None, is_package=True)
_bench_spec.submodule_search_locations = [_BENCH]
sys.modules.setdefault("bench", importlib.util.module_from_spec(_bench_spec))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    """The versions under test, first in the log, so that a break caused by a new release names it."""
    import importlib.metadata

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    names = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "kernels")
    return "versions: " + ", ".join(f"{name} {version(name)}" for name in names)
