"""run_on_ranks itself (its results path is what every other test here uses): a failing rank's
traceback is raised at once, while the other rank still waits at a collective it cannot finish."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.training.distributed.launcher import run_on_ranks


def _rank_one_fails(rank, world_size):
    if rank == 1:
        raise KeyError("only on rank 1")
    dist.all_reduce(torch.zeros(1))


def test_a_failing_rank_raises_its_traceback_without_waiting_for_the_timeout():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1:.*_rank_one_fails.*KeyError: 'only on rank 1'"):
        run_on_ranks(_rank_one_fails, 2, timeout_s=600)
    assert time.monotonic() - started < 300
