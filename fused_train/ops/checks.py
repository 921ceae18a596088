"""The input checks and constants that the ops, the integration and the serving stack share: the
float dtypes the kernels take, a bad argument's description, where a value check may read values back
(`values_readable`, else `assert_on_device`), the DTensor test, the positive-int check and the int4
weight check (the int4 format of `kernels/lora_ref.py`)."""

from numbers import Integral

import torch

from fused_train.kernels.launch import assert_on_device, describe, values_readable
from fused_train.kernels.lora_ref import INT4_GROUP_SIZE

__all__ = [
    "FLOAT_DTYPES", "assert_on_device", "check_int", "check_int4_weight", "describe", "is_dtensor", "values_readable"
]

# The activation and LoRA weight dtypes the kernels take (the int8/int4 base weights aside).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int(minimum: int = 1, **values) -> None:
    """Raise ValueError naming the argument unless each value is an int >= `minimum` (a bool is none):
    `check_int(num_pages=num_pages, page_size=page_size)`."""
    for name, value in values.items():
        if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
            wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"{name} must be {wanted}, got {value!r}")


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 or tensor parallel), which the kernels cannot take whole."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def check_int4_weight(weight, weight_scale, weight_offset, in_features):
    """Raise ValueError naming the argument unless `weight` is uint8-packed int4 [out, in/2 padded to
    the group] with float `weight_scale` and `weight_offset` [out, groups]."""
    groups = -(-in_features // INT4_GROUP_SIZE)
    packed_width = groups * INT4_GROUP_SIZE // 2
    if weight.dim() != 2 or weight.shape[1] != packed_width:
        raise ValueError(
            f"weight (int4, uint8-packed) must be [out, {packed_width}] for in={in_features}, got {tuple(weight.shape)}"
        )
    for name, t in (("weight_scale", weight_scale), ("weight_offset", weight_offset)):
        if t is None:
            raise ValueError(f"{name} must be given for an int4 (uint8-packed) weight")
        if t.shape != (weight.shape[0], groups) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be a float tensor [out={weight.shape[0]}, groups={groups}] for an int4 weight, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
