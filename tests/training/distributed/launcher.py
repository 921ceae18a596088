"""Run a function on `world_size` CPU processes joined by a gloo process group, from pytest.

    results = run_on_ranks(fn, world_size=2, args=(...), timeout_s=120)

`fn(rank, world_size, *args)` must be a module-level function (the children are spawned, so they
import it by name). Each child gets the environment that torchrun would give it (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT on 127.0.0.1 and a free port), so `transformers.Trainer` and
accelerate find the process group that the child initializes before calling `fn`. `fn`'s return
value comes back through a file (`torch.save`, so tensors are fine); `results[rank]` is rank's. A
child that raises makes `run_on_ranks` raise with the child's traceback; a run past `timeout_s`
(e.g. a collective that one rank never joins) kills the children and raises TimeoutError.
`env` sets environment variables in the children before `fn` runs, e.g.
`{"TRITON_INTERPRET": "0"}` to run a patched model's plain-PyTorch CPU path instead of the
interpreted kernels, which are tested elsewhere and cost minutes per training step.
"""

import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_on_ranks(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0, env: dict | None = None) -> list:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"rank{rank}.pt") for rank in range(world_size)]
        children = [
            context.Process(target=_child, args=(fn, rank, world_size, port, args, env or {}, paths[rank]))
            for rank in range(world_size)
        ]
        # Spawned children import `fn` by its module's name (`tests.…`), so the repository root goes on
        # their sys.path, which spawn copies from this process at start(); pytest keeps it off this one's.
        parent_path = list(sys.path)
        sys.path.insert(0, _REPO)
        try:
            for child in children:
                child.start()
        finally:
            sys.path[:] = parent_path
        deadline = time.monotonic() + timeout_s
        try:
            # Poll rather than join: once a rank fails, the others may wait forever at a collective.
            while any(child.is_alive() for child in children) and time.monotonic() < deadline:
                if any(_read(path, "error") for path in paths):
                    break
                time.sleep(0.1)
        finally:
            running = [rank for rank, child in enumerate(children) if child.is_alive()]
            for child in children:
                if child.is_alive():
                    child.kill()
                child.join()
        outcomes = [_read(path) for path in paths]
    errors = [
        f"rank {rank}:\n{outcome[1]}" for rank, outcome in enumerate(outcomes) if outcome and outcome[0] == "error"
    ]
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    if running:
        raise TimeoutError(f"ranks {running} still ran after {timeout_s} s (a collective that not every rank joined?)")
    missing = [rank for rank, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        codes = [children[rank].exitcode for rank in missing]
        raise RuntimeError(f"ranks {missing} exited (codes {codes}) without a result")
    return [outcome[1] for outcome in outcomes]


def _child(fn, rank, world_size, port, args, env, path):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    # Two ranks share the CI machine's cores.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    torch.save(outcome, path + ".partial")
    os.replace(path + ".partial", path)
    if dist.is_initialized():
        dist.destroy_process_group()


def _read(path, status=None):
    if not os.path.exists(path):
        return None
    outcome = torch.load(path, weights_only=False)
    return outcome if status is None or outcome[0] == status else None
