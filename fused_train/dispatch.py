"""Where an op runs: the Triton kernel whenever it can, the PyTorch reference otherwise."""

import os

import torch


def triton_runs_on(inputs: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernel can run on `inputs` (whose dtype the op computes in) and `tensors`.

    That is on CUDA tensors, or on CPU tensors when Triton's interpreter was switched on
    (`TRITON_INTERPRET=1` before triton was imported; that is how the tests run the kernels
    without a GPU). Elsewhere the plain-PyTorch reference runs, so the library works on any CPU.

    On a GPU, Triton computes float32 matmuls as tf32. Float32 CUDA tensors therefore take the
    kernel only where torch itself would use tf32 (`torch.set_float32_matmul_precision("high")`
    or `"medium"`); under torch's default, "highest", they get the exact float32 reference.
    """
    tensors = (inputs, *tensors)
    if all(t.is_cuda for t in tensors):
        return not (inputs.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")
    return os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in tensors)
