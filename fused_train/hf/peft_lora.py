"""Route peft's LoRA `Linear` layers through the fused `lora_linear`, per call, when their state allows.

`patch_lora_layers(model)` sets an instance-level `forward` on every `peft.tuners.lora.layer.Linear`
of the model. Each call asks `fused_fallback_reason(layer, x)`: when it has no objection the layer
computes `lora_linear(x, W, A, B, scaling, bias, dropout_p, weight_scale, weight_offset)`, else peft's own
`Linear.forward` runs unchanged. So `disable_adapter()`, merge/unmerge, `set_adapter`, several
active adapters, DoRA and the other variants keep peft's behaviour, and a layer goes back to the
fused path as soon as its state allows again. Under autocast the fused path computes in autocast's
dtype, as peft's forward would (a float32 base weight is cast per call, as `F.linear` casts it).
The first call that falls back for a reason no `LoraPatchReport` named logs a warning. Nothing is
added to the modules' parameters, buffers or submodules: state_dict keys, `save_pretrained` and
`from_pretrained` are untouched.
`unpatch_lora_layers(model)` removes the instance attribute again.

Mixed batches: a call with peft's `adapter_names` (one adapter per row, "__base__" for none; peft's
`forward` and `generate` pass it to every LoRA layer) asks `mixed_batch_fallback_reason` instead,
and computes the whole batch with one `multi_lora_linear` call per layer, whatever the number of
distinct adapters (peft runs a gather, two matmuls and a scatter per adapter). The layer's plain
adapters are stacked, ranks zero-padded, once and kept while they are unchanged; per call only the
token -> slot map is built, once per distinct `adapter_names` and shared by the layers. The op is
forward-only: a mixed batch that needs gradients, or uses DoRA, another variant, active dropout
or lora_bias, runs peft's path (which itself refuses DoRA there).
"""

import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

from fused_train.hf.quantize import QuantizedLinear
from fused_train.kernels.lora_ref import MAX_RANK
from fused_train.ops.checks import FLOAT_DTYPES, is_dtensor
from fused_train.ops.lora import lora_linear
from fused_train.ops.multi_lora import SlotPlan, multi_lora_linear, plan_slots

logger = logging.getLogger("fused_train")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names
_BASE_WEIGHT_DTYPES = (*FLOAT_DTYPES, torch.int8, torch.uint8)
# int8, and int4 packed in uint8 (`fused_train.hf.quantize`): dequantized to whatever dtype x has.
_QUANTIZED_DTYPES = (torch.int8, torch.uint8)
# Fallback reasons already told, by a report or at a call: each is logged once, the first time a call meets it.
_told_reasons: set[str] = set()


@dataclass
class LoraPatchReport:
    """What `patch_lora_layers` found: layers that take the fused path now, and why others do not.

    `fused`: names of LoRA `Linear` layers whose current state takes the fused path, for inputs in
    the base weight's dtype or under autocast (which the fused path follows as `F.linear` would).
    `fallback`: name -> reason, for LoRA layers that run peft's forward in their current state.
    The choice is remade on every call (this is the state at patch time); a call that falls back for
    a reason no report named logs it, once per reason.
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
        return "extra forward arguments"
    reason = _layer_state_reason(layer)
    if reason is not None:
        return reason
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    adapter = active[0]
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}"
    reason = _adapter_reason(layer, adapter)
    if reason is not None:
        return reason
    if layer.get_base_layer().weight.requires_grad:
        return "base weight is trainable"
    return _operands_reason(layer, [adapter], x)


def mixed_batch_fallback_reason(layer: LoraLinear, x: torch.Tensor, adapter_names) -> str | None:
    """Why a call with peft's `adapter_names` (one adapter per row of `x`, "__base__" for none) cannot
    take the multi-LoRA path, or None when it can."""
    reason = _layer_state_reason(layer)
    if reason is not None:
        return reason
    if not isinstance(adapter_names, (list, tuple)) or x.dim() < 2 or len(adapter_names) != len(x):
        return "adapter_names does not give one name per row of the input"
    used = _used_adapters(layer, adapter_names)
    for adapter in used:
        dropout = layer.lora_dropout[adapter]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)) or (dropout.training and dropout.p > 0):
            return f"dropout ({type(dropout).__name__}) active in a mixed-adapter batch"
        reason = _adapter_reason(layer, adapter)
        if reason is not None:
            return reason
        if layer.lora_B[adapter].bias is not None:
            return "lora_bias in a mixed-adapter batch"
    if torch.is_grad_enabled() and (
        x.requires_grad
        or layer.get_base_layer().weight.requires_grad
        or any(layer.lora_A[a].weight.requires_grad or layer.lora_B[a].weight.requires_grad for a in used)
    ):
        return "a mixed-adapter batch that needs gradients (multi_lora_linear is forward-only)"
    return _operands_reason(layer, used, x)


def _layer_state_reason(layer: LoraLinear) -> str | None:
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    return None


def _adapter_reason(layer: LoraLinear, adapter: str) -> str | None:
    variant = _lora_variant(layer, adapter)
    if variant is not None:
        return f"LoRA variant {variant}"
    if layer.r[adapter] > MAX_RANK:
        return f"rank {layer.r[adapter]} > {MAX_RANK}"
    return None


def _operands_reason(layer: LoraLinear, adapters: list[str], x: torch.Tensor) -> str | None:
    """The base layer, the input and the adapters' dtypes, as the kernels take them."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or weight is None or weight.dtype not in _BASE_WEIGHT_DTYPES:
        return f"base layer {type(base).__name__} is not a float, int8 or int4 nn.Linear"
    if weight.dtype in _QUANTIZED_DTYPES and not isinstance(base, QuantizedLinear):
        # e.g. bitsandbytes' packed NF4: same storage dtype, another format.
        return f"base layer {type(base).__name__} holds {weight.dtype} weights not made by fused_train.quantize_base"
    if x.dtype not in FLOAT_DTYPES:
        return f"input dtype {x.dtype} is not float16, bfloat16 or float32"
    adapter_weights = [modules[a].weight for modules in (layer.lora_A, layer.lora_B) for a in adapters]
    if any(is_dtensor(w) for w in (weight, *adapter_weights)):
        # An FSDP2 unit of its own (a wrap policy that shards LoRA modules apart) gathers its weight
        # only when called: peft's forward calls it, the fused path would read the shard.
        return "a weight is an FSDP2 shard (DTensor) outside its module's forward"
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and weight.dtype not in _QUANTIZED_DTYPES and x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from base weight dtype {weight.dtype}"
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    for adapter in adapters:
        a_dtype, b_dtype = layer.lora_A[adapter].weight.dtype, layer.lora_B[adapter].weight.dtype
        if a_dtype != b_dtype or a_dtype not in (dtype, torch.float32):
            return f"adapter weights in {a_dtype} and {b_dtype}, not both float32 or both the compute dtype {dtype}"
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


def _fused_forward(layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    mixed = not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None
    if mixed:
        reason = mixed_batch_fallback_reason(layer, x, kwargs["adapter_names"])
    else:
        reason = fused_fallback_reason(layer, x, args, kwargs)
    if reason is not None:
        if reason not in _told_reasons:
            _told_reasons.add(reason)
            logger.warning("fused LoRA: a call runs peft's forward instead: %s (logged once per reason)", reason)
        return LoraLinear.forward(layer, x, *args, **kwargs)
    if mixed:
        return _mixed_batch_forward(layer, x, kwargs["adapter_names"])
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
    x, weight, bias = _in_compute_dtype(x, base.weight, bias)
    return lora_linear(
        x,
        weight,
        lora_a.weight,
        lora_b.weight,
        scaling,
        bias=bias,
        dropout_p=dropout_p,
        weight_scale=getattr(base, "weight_scale", None),
        weight_offset=getattr(base, "weight_offset", None),
    )


def _in_compute_dtype(x, weight, bias):
    if not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    # As autocast does for F.linear (and so for peft's forward): the float operands in autocast's dtype.
    # A float32 base weight then costs a cast copy per call, kept for the backward, as it does under
    # peft: autocast caches casts only of weights that require grad.
    dtype = torch.get_autocast_dtype(x.device.type)
    weight = weight.to(dtype) if weight.is_floating_point() else weight
    return x.to(dtype), weight, None if bias is None else bias.to(dtype)


def _used_adapters(layer: LoraLinear, adapter_names) -> list[str]:
    """The adapters of the batch that this layer has (peft skips the others on it, as "__base__")."""
    return sorted({name for name in adapter_names if name != BASE_ADAPTER and name in layer.lora_A})


def _mixed_batch_forward(layer: LoraLinear, x: torch.Tensor, adapter_names) -> torch.Tensor:
    base = layer.get_base_layer()
    if not _used_adapters(layer, adapter_names):
        return base(x)
    x, weight, bias = _in_compute_dtype(x, base.weight, base.bias)
    lora_a, lora_b, scalings, ranks, slot_of = _stacked_adapters(layer, x.dtype, x.device)
    token_slots, plan = _token_slots(adapter_names, slot_of, x.numel() // (x.shape[-1] * len(x)), x.device)
    # The slots, ranks and plan are ours, valid by construction: no read-back (a host sync per layer on a GPU).
    return multi_lora_linear(
        x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=bias,
        weight_scale=getattr(base, "weight_scale", None), weight_offset=getattr(base, "weight_offset", None),
        check_values=False, slot_plan=plan,
    )  # fmt: skip


# layer -> (key, stacked adapters): rebuilt when an adapter is added, removed, replaced, updated in place
# or rescaled, or another dtype or device is asked for. Weak keys: a dropped model frees its stacks.
_stacks: "weakref.WeakKeyDictionary[LoraLinear, tuple]" = weakref.WeakKeyDictionary()


def _stacked_adapters(layer: LoraLinear, compute_dtype: torch.dtype, device: torch.device):
    """`(lora_a [S, r_max, in], lora_b [S, out, r_max], scalings [S], ranks [S], slot_of)` of every
    plain LoRA adapter of `layer`, ranks zero-padded to their largest; `slot_of` maps name -> slot.
    A copy of the adapters, kept between calls: per call only the token -> slot map is new.

    The stack keeps the adapters' dtype when they share one that the op takes (the compute dtype or
    float32, in which peft computes the LoRA branch too), and is float32 otherwise."""
    names = [name for name in layer.lora_A if _lora_variant(layer, name) is None]
    dtypes = {p.dtype for name in names for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    dtype = dtype if dtype == compute_dtype else torch.float32
    key = (dtype, device) + tuple(
        (name, layer.scaling[name], *((p.data_ptr(), p._version) for p in (layer.lora_A[name].weight,
                                                                           layer.lora_B[name].weight)))
        for name in names
    )  # fmt: skip
    cached = _stacks.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    r_max = max(layer.r[name] for name in names)
    # Never inference tensors (generate runs under inference mode): the op's reference path caches a
    # padded copy of the stacks by their version counters, which those lack.
    with torch.inference_mode(False), torch.no_grad():
        lora_a = torch.zeros(len(names), r_max, layer.in_features, dtype=dtype, device=device)
        lora_b = torch.zeros(len(names), layer.out_features, r_max, dtype=dtype, device=device)
        for slot, name in enumerate(names):
            rank = layer.r[name]
            lora_a[slot, :rank] = layer.lora_A[name].weight
            lora_b[slot, :, :rank] = layer.lora_B[name].weight
        scalings = torch.tensor([layer.scaling[name] for name in names], dtype=torch.float32, device=device)
        ranks = torch.tensor([layer.r[name] for name in names], dtype=torch.int32, device=device)
    stacked = (lora_a, lora_b, scalings, ranks, {name: slot for slot, name in enumerate(names)})
    _stacks[layer] = (key, stacked)
    return stacked


# (adapter_names, slot_of, tokens per row, device) -> token_slots and their SlotPlan. Every layer with
# the same adapters shares one entry, and a decode step's entry serves the next steps: no
# host-to-device copy, and no grouping of tokens by slot, per layer.
_token_slots_cache: dict[tuple, tuple[torch.Tensor, SlotPlan]] = {}
_TOKEN_SLOTS_CACHE_SIZE = 64


def _token_slots(
    adapter_names, slot_of: dict[str, int], tokens_per_row: int, device: torch.device
) -> tuple[torch.Tensor, SlotPlan]:
    key = (tuple(adapter_names), tuple(slot_of.items()), tokens_per_row, device)
    cached = _token_slots_cache.get(key)
    if cached is None:
        rows = torch.tensor([slot_of.get(name, -1) for name in adapter_names], dtype=torch.int32)
        token_slots = rows.repeat_interleave(tokens_per_row).to(device)
        cached = (token_slots, plan_slots(token_slots, len(slot_of)))
        if len(_token_slots_cache) >= _TOKEN_SLOTS_CACHE_SIZE:
            _token_slots_cache.clear()
        _token_slots_cache[key] = cached
    return cached


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
            probe_dtype = weight.dtype
            if weight.dtype in _QUANTIZED_DTYPES:
                # A quantized base takes any float input: assume the adapters' dtype (float32 as peft keeps
                # them, or the model's when it was cast as a whole).
                probe_dtype = next((a.weight.dtype for a in module.lora_A.values()), torch.float32)
            probe = torch.empty(0, dtype=probe_dtype, device=weight.device)
            reason = fused_fallback_reason(module, probe)
            if reason is None:
                report.fused.append(name)
            else:
                report.fallback[name] = reason
                _told_reasons.add(reason)
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
