"""`patch(model, fused_loss=True)`: a causal LM's training loss through `linear_cross_entropy`.

Hugging Face causal LMs compute `logits = lm_head(decoder(...)[0])`, upcast them to float32 and
call `loss_function(logits, labels, ...)`: a `[tokens, vocab]` tensor that, with its log-softmax
and gradient, is the largest transient of a LoRA step. The hook is the model's `forward` (an
instance attribute, removed by `unpatch`): in training mode with `labels`, it runs the decoder
(`model.base_model`) with the same arguments, then the fused loss of its hidden states against
`lm_head`; otherwise, and for evaluation, the model's own forward. So, in training with labels,
the output's `logits` is None.

Honoured as HF does: the shift of `labels` (or `shift_labels` given already shifted, as
`PackedCollator`'s -100 at each document start needs no special case), `ignore_index`,
`num_items_in_batch` (gradient accumulation: sum / num_items_in_batch), `logits_to_keep` (the kept
positions must then match `labels`), Gemma 2's `final_logit_softcapping`, `return_dict`, and an
`lm_head` that peft keeps in `modules_to_save` (its active copy is trained). Refused, with a
ValueError: model types not in `TESTED_MODEL_TYPES` (their forwards may transform logits in
other ways), a custom `loss_function`, a peft LoRA (or other adapter) on `lm_head`, an `lm_head`
that is not a plain `nn.Linear` (quantized), and peft's mixed-batch `adapter_names`.

FSDP2: where `lm_head` (or peft's wrapper of it) is its own `fully_shard` unit, its weight is a
sharded DTensor outside `lm_head`'s forward, which the fused loss never calls; the loss then runs
as a forward method of that unit (`register_fsdp_forward_method`), so FSDP gathers the weight
before it (casting the hidden states to its `MixedPrecisionPolicy`) and again for the backward.
"""

import functools
import inspect

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from fused_train.hf.model_types import TESTED_MODEL_TYPES
from fused_train.ops.linear_cross_entropy import linear_cross_entropy

_ORIGINAL_FORWARD = "_fused_train_forward_before_fused_loss"
# The loss as a forward method of an FSDP2 unit holding lm_head (set at its first call).
_FSDP_LOSS_METHOD = "_fused_train_fsdp_loss"
_NO_INSTANCE_FORWARD = object()


def patch_loss(model) -> None:
    """Route `model`'s (a transformers causal LM) training loss through `linear_cross_entropy`."""
    name = f"{type(model).__name__} (model_type={model.config.model_type!r})"
    if model.config.model_type not in TESTED_MODEL_TYPES:
        raise ValueError(
            f"fused_loss=True supports model types {', '.join(TESTED_MODEL_TYPES)}; {name} may transform its "
            "logits in ways the fused loss does not know, patch it without fused_loss"
        )
    _check_loss_function(model)
    _lm_head_linear(model, {})
    if hasattr(model, _ORIGINAL_FORWARD):
        return
    setattr(model, _ORIGINAL_FORWARD, model.__dict__.get("forward", _NO_INSTANCE_FORWARD))
    model.forward = _fused_loss_forward(model, model.forward)


def unpatch_loss(model) -> None:
    """Give `model` back the forward it had before `patch_loss`; a no-op if not patched."""
    original = model.__dict__.pop(_ORIGINAL_FORWARD, None)
    if original is None:
        return
    for module in model.get_output_embeddings().modules():
        module.__dict__.pop(_FSDP_LOSS_METHOD, None)
    del model.forward
    if original is not _NO_INSTANCE_FORWARD:
        model.forward = original


def _check_loss_function(model):
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"fused_loss=True computes HF's ForCausalLMLoss, but {type(model).__name__}.loss_function is "
            f"{getattr(model.loss_function, '__name__', model.loss_function)!r}; patch without fused_loss"
        )


def _lm_head_linear(model, kwargs):
    """The linear layer that `model.lm_head` runs now, or a ValueError saying why not."""
    head = model.get_output_embeddings()
    if isinstance(head, BaseTunerLayer):
        raise ValueError(
            f"lm_head is a peft {type(head).__name__} (an adapter on lm_head), which fused_loss=True does not "
            "compute; leave lm_head out of target_modules (or in modules_to_save), or patch without fused_loss"
        )
    if isinstance(head, ModulesToSaveWrapper):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names (peft mixed batches) with fused_loss=True: patch without fused_loss")
        active = not head.disable_adapters and head.active_adapters
        head = head.modules_to_save[head.active_adapters[0]] if active else head.original_module
    # fully_shard makes the class FSDP<Class>(FSDPModule, Class).
    head_class = type(head).__bases__[1] if isinstance(head, FSDPModule) else type(head)
    if head_class is not torch.nn.Linear:
        raise ValueError(
            f"lm_head is a {head_class.__name__}, not a torch.nn.Linear: fused_loss=True needs its weight "
            "as a plain tensor; patch without fused_loss"
        )
    return head


def _head_loss(unit, hidden, labels, *, linear, **kwargs):
    # `unit`: the FSDP2 module this runs as a method of (None without FSDP); FSDP's hooks need the binding.
    return linear_cross_entropy(hidden, linear.weight, labels, bias=linear.bias, **kwargs)


def _fused_loss_forward(model, original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments |= arguments.pop(name, {})
        if not model.training or arguments.get("labels") is None:
            return original(*args, **kwargs)
        return _forward_with_fused_loss(model, arguments)

    return forward


def _loss_function(model, linear):
    """`_head_loss` as a forward method of the FSDP2 unit whose forward gathers `linear`'s weight, if any."""
    units = [module for module in (linear, model.get_output_embeddings()) if isinstance(module, FSDPModule)]
    if not units:
        return functools.partial(_head_loss, None)
    unit = units[0]
    if _FSDP_LOSS_METHOD not in unit.__dict__:
        setattr(unit, _FSDP_LOSS_METHOD, _head_loss.__get__(unit))
        register_fsdp_forward_method(unit, _FSDP_LOSS_METHOD)
    return getattr(unit, _FSDP_LOSS_METHOD)


def _forward_with_fused_loss(model, arguments):
    _check_loss_function(model)
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    # The loss's own arguments; HF passes them to the decoder too, where they mean nothing.
    ignore_index = arguments.pop("ignore_index", -100)
    shift_labels = arguments.pop("shift_labels", None)
    linear = _lm_head_linear(model, arguments)
    outputs = model.base_model(**arguments, return_dict=True)
    hidden = outputs[0]
    kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, kept, :]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(shift_labels.shape)} must match the positions whose logits are kept "
            f"{tuple(hidden.shape[:-1])} (logits_to_keep={logits_to_keep!r})"
        )
    num_items_in_batch = arguments.get("num_items_in_batch")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    loss = _loss_function(model, linear)(
        hidden, shift_labels.to(hidden.device), linear=linear, ignore_index=ignore_index,
        softcap=getattr(model.config, "final_logit_softcapping", None), num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
    rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
    output = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else output.to_tuple()
