"""int8 or int4 frozen base weights for LoRA training, read directly by the fused LoRA kernel.

`quantize_base(model, bits)` replaces each frozen `nn.Linear` under a peft LoRA `Linear` (or, with
`only_lora_layers=False`, every frozen `nn.Linear`) by a subclass of `nn.Linear`:

- `bits=8`, `Int8Linear`, per output channel (half the bytes of bf16):

      weight_scale[o] = max_i |W[o, i]| / 127            (float32, buffer, [out])
      weight[o, i]    = round(W[o, i] / weight_scale[o])   (int8 Parameter, requires_grad=False)

- `bits=4`, `Int4Linear`, per group of 64 input channels (0.31× the bytes of bf16, scales and
  offsets included; `fused_train.kernels.lora_gemm_ref.quantize_int4` has the format):

      weight_offset[o, g] = min of the group, weight_scale[o, g] = (max - min) / 15  (float32 buffers)
      weight[o, j]        = two 4-bit levels per byte (uint8 Parameter [out, groups · 32])

State dict: `...weight` keeps its key but becomes int8 (same shape) or uint8 (packed shape); the
scales (and int4 offsets) are added as float32 buffers, which stay float32 when the model is
cast (`model.to(torch.bfloat16)`); `bias` is unchanged. peft's adapter checkpoints
(`save_pretrained`) hold only LoRA weights and are unaffected. The fused LoRA path reads the
quantized tensors as they are; `forward` (used when peft's own forward runs, and for non-LoRA
layers) dequantizes to the input dtype on the fly. peft's merge into a quantized base is not
supported (the delta would be lost to rounding); it raises. `dequantize_base(model, dtype)` turns
the quantized layers back into float `nn.Linear`s (their rounding kept), after which peft's
`merge_and_unload` works, e.g. to export a model trained over a quantized base.
"""

import logging
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from fused_train.kernels.lora_ref import dequantize_int4, quantize_int4, quantize_int8

logger = logging.getLogger("fused_train")


class QuantizedLinear(nn.Linear):
    """A frozen `nn.Linear` whose `weight` `quantize_base` stored quantized; `forward` dequantizes it
    to the input's dtype with the subclass's `dequantized_weight(dtype)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` or `.half()` after quantize_base would round the scales (and
        # int4 offsets) too, adding up to 2⁻⁹ of relative error to every weight of a channel. They
        # keep their float32 values and follow only the device (bitsandbytes keeps its absmax
        # float32 alike).
        exact = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in exact.items():
            moved = self._buffers[name]
            if buffer is not None and buffer.is_floating_point() and moved.dtype != buffer.dtype:
                self._buffers[name] = buffer.to(moved.device)
        return self


class Int8Linear(QuantizedLinear):
    """Frozen linear layer `y = x · (weight · weight_scale[:, None])ᵀ + bias` with an int8 `weight`."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: nn.Parameter | None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a float weight
        self.out_features, self.in_features = weight_int8.shape
        self.weight = nn.Parameter(weight_int8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_int8(linear.weight), linear.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]


class Int4Linear(QuantizedLinear):
    """Frozen linear layer whose `weight` is int4, packed two per byte, with a scale and an offset
    per group of 64 input channels: `W[o, i] = q[o, i] · weight_scale[o, g] + weight_offset[o, g]`."""

    def __init__(self, packed, weight_scale, weight_offset, in_features: int, bias: nn.Parameter | None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a float weight
        self.out_features, self.in_features = packed.shape[0], in_features
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_offset", weight_offset)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        return cls(*quantize_int4(linear.weight), linear.in_features, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.weight_offset, self.in_features).to(dtype)


_QUANTIZED = {8: Int8Linear, 4: Int4Linear}


def quantize_base(model: nn.Module, bits: int = 8, only_lora_layers: bool = True) -> int:
    """Store frozen `nn.Linear` base weights as int8 or int4 (see the module docstring); returns how many.

    Args:
        model: any module tree, typically a peft model.
        bits: 8 (per-output-channel scales) or 4 (a scale and an offset per 64 input channels).
        only_lora_layers: quantize only base layers of peft LoRA `Linear`s (default); when false,
            also every other frozen `nn.Linear` (trainable ones, e.g. `modules_to_save`, stay float).

    Weights that require grad are left alone: their gradient would be lost. So are weights that
    another module shares (an `lm_head` tied to the input embedding): quantizing the layer would
    untie it and add a quantized copy beside the float weight the other module keeps; they are
    logged. Layers already quantized (to either width) are left as they are.
    """
    if bits not in _QUANTIZED:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    # id(parameter) -> how many modules hold it
    owners = Counter(id(param) for module in model.modules() for param in module.parameters(recurse=False))
    targets = []  # (parent, attribute, linear); replaced after the walk, not during it
    for parent_name, parent in model.named_modules():
        if any(part.startswith("lora_") for part in parent_name.split(".")):
            continue  # adapter weights (lora_A, lora_B, ...) are never the frozen base
        for attr, child in parent.named_children():
            if type(child) is not nn.Linear or child.weight.requires_grad:
                continue
            under_lora = isinstance(parent, LoraLinear) and attr == "base_layer"
            if only_lora_layers and not under_lora:
                continue
            if owners[id(child.weight)] > 1:
                name = f"{parent_name}.{attr}" if parent_name else attr
                logger.info("quantize_base: %s left float: its weight is tied to another module's", name)
                continue
            targets.append((parent, attr, child))
    for parent, attr, linear in targets:
        setattr(parent, attr, _QUANTIZED[bits].from_linear(linear))
    return len(targets)


def dequantize_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every `Int8Linear`/`Int4Linear` of `model` by a frozen `nn.Linear` holding its
    dequantized weight in `dtype` (the quantization's rounding stays); returns how many."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    targets = [
        (parent, attr, child)
        for parent in model.modules()
        for attr, child in parent.named_children()
        if isinstance(child, QuantizedLinear)
    ]
    for parent, attr, quantized in targets:
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(quantized.dequantized_weight(dtype), requires_grad=False)
        linear.bias = quantized.bias
        setattr(parent, attr, linear)
    return len(targets)
