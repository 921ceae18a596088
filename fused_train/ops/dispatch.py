"""Where an op runs: the Triton kernel whenever it can, the PyTorch reference otherwise.

Triton is optional: it has wheels for Linux only, so on macOS or Windows the package installs
without it and every op runs its reference. Modules that launch kernels import them only when
`HAS_TRITON`; without Triton, `triton_runs_on` is False and those imports are never needed.
"""

import importlib.util
import warnings

import torch

from fused_train.kernels.launch import interpreting
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Reasons already warned about (`warn_reference_path`): each is said once per process.
_WARNED = set()
_NO_TRITON = (
    "Triton is not installed, so CUDA tensors run each op's PyTorch reference (varlen attention: one "
    "attention per document) instead of its kernel; `pip install triton` (Linux) to run the kernels."
)
_FLOAT32_HIGHEST = (
    "float32 CUDA tensors run each op's exact PyTorch reference (varlen attention: one attention per "
    "document) instead of its Triton kernel, whose float32 matmuls are tf32, because torch's float32 matmul "
    'precision is "highest". Call torch.set_float32_matmul_precision("high") to run the kernels, or pass '
    "bfloat16/float16 inputs."
)


def _on_cuda(tensors) -> bool:
    return all(t.is_cuda for t in tensors)


def warn_reference_path(inputs: torch.Tensor, reason: str, message: str) -> None:
    """Warn once per `reason` when `inputs` is a CUDA tensor that takes the PyTorch reference path
    (`message` says what runs and how to get the kernel); reference runs elsewhere are expected."""
    if reason in _WARNED or not _on_cuda((inputs,)):
        return
    _WARNED.add(reason)
    warnings.warn(f"fused_train: {message}", stacklevel=3)


def triton_runs_on(inputs: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernel can run on `inputs` (whose dtype the op computes in) and `tensors`.

    That is on CUDA tensors, or on CPU tensors when Triton's interpreter was switched on
    (`TRITON_INTERPRET=1` before triton was imported; that is how the tests run the kernels
    without a GPU). Elsewhere the plain-PyTorch reference runs, so the library works on any CPU.
    Without Triton installed it is always False.

    On a GPU, Triton computes float32 matmuls as tf32. Float32 CUDA tensors therefore take the
    kernel only where torch itself would use tf32 (`torch.set_float32_matmul_precision("high")`
    or `"medium"`); under torch's default, "highest", they get the exact float32 reference.
    CUDA tensors that get the reference warn once per reason (`warn_reference_path`).
    """
    tensors = (inputs, *tensors)
    if _on_cuda(tensors):
        if not HAS_TRITON:
            warn_reference_path(inputs, "no triton", _NO_TRITON)
            return False
        if inputs.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
            warn_reference_path(inputs, "float32 highest", _FLOAT32_HIGHEST)
            return False
        return True
    return HAS_TRITON and interpreting() and all(t.device.type == "cpu" for t in tensors)
