"""Where an op runs: the Triton kernel whenever it can, the PyTorch reference otherwise."""

import os

import torch


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel can run on these tensors.

    That is on CUDA tensors, or on CPU tensors when Triton's interpreter was switched on
    (`TRITON_INTERPRET=1` before triton was imported; that is how the tests run the kernels
    without a GPU). Elsewhere the plain-PyTorch reference runs, so the library works on any CPU.
    """
    if all(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in tensors)
