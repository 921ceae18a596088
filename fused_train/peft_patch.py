"""Route peft's LoRA `Linear` layers through the fused `lora_linear`, per call, when their state allows.

`patch_lora_layers(model)` sets an instance-level `forward` on every `peft.tuners.lora.layer.Linear`
of the model. Each call asks `fused_fallback_reason(layer, x)`: when it has no objection the layer
computes `lora_linear(x, W, A, B, scaling, bias, dropout_p, weight_scale, weight_offset)`, else peft's own
`Linear.forward` runs unchanged. So `disable_adapter()`, merge/unmerge, `set_adapter`, several
active adapters, DoRA and the other variants keep peft's behaviour, and a layer goes back to the
fused path as soon as its state allows again. Nothing is added to the modules' parameters,
buffers or submodules: state_dict keys, `save_pretrained` and `from_pretrained` are untouched.
`unpatch_lora_layers(model)` removes the instance attribute again.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

from fused_train.kernels.lora import MAX_RANK
from fused_train.lora import lora_linear
from fused_train.quantize import QuantizedLinear

logger = logging.getLogger("fused_train")

_BASE_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8)
# int8, and int4 packed in uint8 (`fused_train.quantize`): dequantized to whatever dtype x has.
_QUANTIZED_DTYPES = (torch.int8, torch.uint8)


@dataclass
class LoraPatchReport:
    """What `patch_lora_layers` found: layers that take the fused path now, and why others do not.

    `fused`: names of LoRA `Linear` layers whose current state takes the fused path.
    `fallback`: name -> reason, for LoRA layers that run peft's forward in their current state
    (the choice is remade on every call; this is the state at patch time).
    """

    fused: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    @property
    def num_fallback(self) -> int:
        return len(self.fallback)

    def __str__(self) -> str:
        total = self.num_fused + self.num_fallback
        lines = [f"fused LoRA: {self.num_fused} of {total} LoRA layers fused, {self.num_fallback} fall back to peft"]
        by_reason = defaultdict(list)
        for name, reason in self.fallback.items():
            by_reason[reason].append(name)
        for reason, names in sorted(by_reason.items()):
            shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
            lines.append(f"  {len(names)} x {reason}: {shown}")
        return "\n".join(lines)


def fused_fallback_reason(layer: LoraLinear, x: torch.Tensor, args=(), kwargs=None) -> str | None:
    """Why this call of a peft LoRA `Linear` cannot take the fused path, or None when it can."""
    if args or kwargs:
        return "extra forward arguments (e.g. adapter_names)"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    adapter = active[0]
    variant = _lora_variant(layer, adapter)
    if variant is not None:
        return f"LoRA variant {variant}"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}"
    if layer.r[adapter] > MAX_RANK:
        return f"rank {layer.r[adapter]} > {MAX_RANK}"
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or weight is None or weight.dtype not in _BASE_WEIGHT_DTYPES:
        return f"base layer {type(base).__name__} is not a float, int8 or int4 nn.Linear"
    if weight.dtype in _QUANTIZED_DTYPES and not isinstance(base, QuantizedLinear):
        # e.g. bitsandbytes' packed NF4: same storage dtype, another format.
        return f"base layer {type(base).__name__} holds {weight.dtype} weights not made by fused_train.quantize_base"
    if weight.requires_grad:
        return "base weight is trainable"
    if x.dtype != _compute_dtype(x, weight):
        if not torch.is_autocast_enabled(x.device.type):
            return f"input dtype {x.dtype} differs from base weight dtype {weight.dtype}"
        return f"autocast to {torch.get_autocast_dtype(x.device.type)} over a {weight.dtype} base weight"
    return None


def _lora_variant(layer: LoraLinear, adapter: str) -> str | None:
    """The name of the variant (DoRA, ...) that `adapter` uses on `layer`, or None for plain LoRA.

    peft >= 0.16 keeps variants in `layer.lora_variant`; older releases (pyproject allows 0.13) have no
    such attribute and mark their one variant, DoRA, in `layer.use_dora`."""
    variants = getattr(layer, "lora_variant", None)
    if variants is None:
        return "DoRA" if layer.use_dora.get(adapter) else None
    variant = variants.get(adapter)
    return None if variant is None else type(variant).__name__


def _compute_dtype(x, weight):
    """The dtype the base matmul runs in: autocast's when it is on, else x's; a quantized W follows it."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if weight.dtype in _QUANTIZED_DTYPES or weight.dtype == dtype:
        return dtype
    return None


def _fused_forward(layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if fused_fallback_reason(layer, x, args, kwargs) is not None:
        return LoraLinear.forward(layer, x, *args, **kwargs)
    adapter = next(name for name in layer.active_adapters if name in layer.lora_A)
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    scaling = layer.scaling[adapter]
    dropout = layer.lora_dropout[adapter]
    dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    bias = base.bias
    if lora_b.bias is not None:
        # peft's lora_bias: B's bias is scaled with the LoRA branch; the sum stays differentiable.
        lora_bias = lora_b.bias * scaling
        bias = lora_bias if bias is None else bias + lora_bias
    return lora_linear(
        x,
        base.weight,
        lora_a.weight,
        lora_b.weight,
        scaling,
        bias=bias,
        dropout_p=dropout_p,
        weight_scale=getattr(base, "weight_scale", None),
        weight_offset=getattr(base, "weight_offset", None),
    )


def _is_patched(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch_lora_layers(model: nn.Module) -> LoraPatchReport:
    """Route every peft LoRA `Linear` of `model` through the fused path (idempotent).

    Returns a `LoraPatchReport` (also logged at INFO) of which layers fuse in their current state.
    Other LoRA layer types (Embedding, Conv, quantized bnb/GPTQ layers) are listed as fallbacks.
    """
    report = LoraPatchReport()
    for name, module in model.named_modules():
        if type(module) is LoraLinear:
            if not _is_patched(module):
                module.forward = _fused_forward.__get__(module)
            weight = module.get_base_layer().weight
            probe_dtype = torch.float32 if weight.dtype in _QUANTIZED_DTYPES else weight.dtype
            probe = torch.empty(0, dtype=probe_dtype, device=weight.device)
            reason = fused_fallback_reason(module, probe)
            if reason is None:
                report.fused.append(name)
            else:
                report.fallback[name] = reason
        elif isinstance(module, LoraLayer):
            report.fallback[name] = f"layer type {type(module).__name__} is not fused"
    if report.num_fused or report.num_fallback:
        logger.info("%s", report)
    return report


def unpatch_lora_layers(model: nn.Module) -> int:
    """Give every patched LoRA layer of `model` peft's forward back; returns how many were patched."""
    restored = 0
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            restored += 1
    return restored
