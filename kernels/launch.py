"""The launchers' device guard: Triton launches on the current CUDA device and its current stream,
which need not be the tensors' device (a model on cuda:1, or spread over GPUs by
`device_map="auto"`), so each launcher makes its tensors' device current first."""

import functools

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
