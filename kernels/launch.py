"""What the launchers and their input checks share: the device guard, whether Triton runs in its
interpreter, output buffers, how a bad argument is described in an error, and where a check may read
values back.

The device guard: Triton launches on the current CUDA device and its current stream, which need
not be the tensors' device (a model on cuda:1, or spread over GPUs by `device_map="auto"`), so
each launcher makes its tensors' device current first. Nothing here imports triton: the references
and their checks import it too, on machines without triton.
"""

import functools
import os

import torch


def on_device_of_first_argument(launcher):
    """`launcher`, run with its first argument's CUDA device current; CPU tensors (the
    interpreter) need no guard, and what is no tensor is left to the launcher's checks."""

    @functools.wraps(launcher)
    def guarded(tensor, *args, **kwargs):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_cuda):
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)

    return guarded


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1, how the tests run the kernels on a CPU).

    The kernels' `UPCAST` follows it: the interpreter computes bf16 arithmetic (tl.dot included)
    wrongly, so there tiles are cast to fp32 right after loading; compiled kernels keep the input
    dtype for the tensor cores. Read per call, as `fused_train.ops.dispatch` reads it."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def output_buffer(shape, device, dtype):
    """A launcher's output; NaN-filled (poisoned) under the interpreter, where the tests run, so an
    element a kernel forgets to write fails them. Compiled runs skip the fill: it would cost a full
    write of the output."""
    if interpreting():
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def describe(value) -> str:
    """A bad argument as an error message names it: a tensor's shape, dtype and device, else its type."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return type(value).__name__


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values on the host: on a CPU that is free; on a GPU it waits
    for the device (a sync in every call, and no CUDA-graph capture), so there `assert_on_device` checks."""
    return tensor.device.type == "cpu"


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Fail unless the one-element bool tensor `condition` is True, without waiting for the device: a
    device-side assert on a GPU (it fails a later call and ends the process's CUDA context, as an
    out-of-range index would), RuntimeError(`message`) on a CPU, nothing on the meta device."""
    torch._assert_async(condition, message)
