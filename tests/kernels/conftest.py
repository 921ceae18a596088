import pytest
import torch


@pytest.fixture(autouse=True)
def float32_kernels_on_gpu():
    """Kernel tests exercise the kernels in float32 too: on a GPU those take tf32, as torch's
    "high" matmul precision allows (under "highest" float32 goes to the exact reference)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)
