"""The multi-process tests' fixture: every test file's `rank_checks`, from one run on 2 gloo ranks."""

import importlib.util

import pytest

from tests.training.distributed.launcher import run_on_ranks

# The patched model's plain-PyTorch CPU path: the interpreted kernels (tested elsewhere) would take
# minutes per step, and what is checked here is how the loss and gradients combine across processes.
NO_INTERPRETER = {"TRITON_INTERPRET": "0"}


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _every_check(rank, world_size, folder):
    # One pair of processes for all files: each spawn costs seconds of imports.
    from tests.training.distributed import test_exact_loss, test_fsdp

    results = {}
    if importlib.util.find_spec("datasets") is not None:  # test_exact_loss's Trainer runs read datasets
        results["exact_loss"] = test_exact_loss.rank_checks(rank, world_size, folder)
    results["fsdp"] = test_fsdp.rank_checks(rank, world_size)
    return results


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """Every rank's results of each test file's `rank_checks`, from one run on 2 gloo ranks."""
    folder = str(tmp_path_factory.mktemp("ranks"))
    return run_on_ranks(_every_check, 2, args=(folder,), timeout_s=300, env=NO_INTERPRETER)
