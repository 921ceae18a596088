"""int8 frozen base weights for LoRA training, read directly by the fused LoRA kernel.

`quantize_base(model)` replaces each frozen `nn.Linear` under a peft LoRA `Linear` (or, with
`only_lora_layers=False`, every frozen `nn.Linear`) by an `Int8Linear`, a subclass of `nn.Linear`:

    weight_scale[o] = max_i |W[o, i]| / 127          (float32, buffer, [out])
    weight[o, i]    = round(W[o, i] / weight_scale[o]) (int8 Parameter, requires_grad=False)

State dict: `...weight` keeps its key and shape but becomes int8; one key is added per layer,
`...weight_scale`; `bias` is unchanged. peft's adapter checkpoints (`save_pretrained`) hold only
LoRA weights and are unaffected. The fused LoRA path reads `weight` and `weight_scale` as they are;
`Int8Linear.forward` (used when peft's own forward runs, and for non-LoRA layers) dequantizes to
the input dtype on the fly. peft's merge into an int8 base is not supported (the delta would be
lost to int8 rounding); it raises.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class Int8Linear(nn.Linear):
    """Frozen linear layer `y = x · (weight · weight_scale[:, None])ᵀ + bias` with an int8 `weight`."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: nn.Parameter | None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a float weight
        self.out_features, self.in_features = weight_int8.shape
        self.weight = nn.Parameter(weight_int8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        weight_int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(weight_int8, scale, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def quantize_base(model: nn.Module, bits: int = 8, only_lora_layers: bool = True) -> int:
    """Store frozen `nn.Linear` base weights as int8 with per-output-channel scales; returns how many.

    Args:
        model: any module tree, typically a peft model.
        bits: 8 (the only width supported).
        only_lora_layers: quantize only base layers of peft LoRA `Linear`s (default); when false,
            also every other frozen `nn.Linear` (trainable ones, e.g. `modules_to_save`, stay float).

    Weights that require grad are left alone: their gradient would be lost. Quantizing an
    already-quantized model is a no-op for the layers already int8.
    """
    if bits != 8:
        raise ValueError(f"bits must be 8, got {bits}")
    targets = []  # (parent, attribute, linear); replaced after the walk, not during it
    for parent_name, parent in model.named_modules():
        if any(part.startswith("lora_") for part in parent_name.split(".")):
            continue  # adapter weights (lora_A, lora_B, ...) are never the frozen base
        for attr, child in parent.named_children():
            if type(child) is not nn.Linear or child.weight.requires_grad:
                continue
            under_lora = isinstance(parent, LoraLinear) and attr == "base_layer"
            if under_lora or not only_lora_layers:
                targets.append((parent, attr, child))
    for parent, attr, linear in targets:
        setattr(parent, attr, Int8Linear.from_linear(linear))
    return len(targets)
