"""`patch(model)` / `unpatch(model)`: route a Hugging Face model's attention through fused_train.

How `patch` decides whether it can handle a model:
  - the model types in `TESTED_MODEL_TYPES` are tested end to end (packed == per-document loss and
    gradients, padded batches, generation with a cache);
  - any other decoder whose attention layers call transformers' `AttentionInterface` (the class can
    switch its attention implementation at run time) is accepted too: it gets the same varlen
    path, with sliding windows and softcapping read from the arguments its attention passes;
  - encoder-decoders, models whose attention is hard-coded, and models with attention dropout are
    refused with a ValueError that says why.
On a peft model, `patch` also routes its LoRA `Linear` layers through the fused LoRA kernel
(`fused_train.hf.peft_lora`), per call, whenever a layer's state allows, and logs which layers were
fused and why the others fall back (a warning when any does).
With `fused_loss=True`, the training loss of the model types in
`TESTED_MODEL_TYPES` runs through `linear_cross_entropy`, with no
`[tokens, vocab]` logits tensor; their output's `logits` is then None (`fused_train.hf.fused_loss` says
what is honoured and what is refused).
Patching changes no parameter, buffer or `state_dict` key: only the name of the attention
implementation in the config and the forward of LoRA layers (and, for the fused loss, of the
model), which `unpatch` restores.
"""

import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from fused_train.hf.attention import ATTENTION_NAME, fused_train_attention, fused_train_mask
from fused_train.hf.fused_loss import patch_loss, unpatch_loss
from fused_train.hf.model_types import TESTED_MODEL_TYPES
from fused_train.hf.peft_lora import patch_lora_layers, unpatch_lora_layers
from fused_train.hf.varlen_layout import clear_per_forward_caches

logger = logging.getLogger("fused_train")

_ORIGINAL_ATTENTION = "_fused_train_original_attn_implementation"

AttentionInterface.register(ATTENTION_NAME, fused_train_attention)
AttentionMaskInterface.register(ATTENTION_NAME, fused_train_mask)


def patch(model: torch.nn.Module, fused_loss: bool = False) -> torch.nn.Module:
    """Switch `model` (a transformers model, or a peft model around one) to fused_train attention,
    and its peft LoRA `Linear` layers to the fused LoRA path; with `fused_loss`, its training loss
    to `linear_cross_entropy` (in training mode with labels; `logits` is then None).

    Idempotent (`fused_loss` follows the latest call); `unpatch` restores the previous attention
    implementation, LoRA forwards and model forward. Returns the model.
    """
    base = _transformers_model(model)
    if fused_loss:
        patch_loss(base)
    else:
        unpatch_loss(base)
    if getattr(base, _ORIGINAL_ATTENTION, None) is None:
        _check_supported(base)
        original = base.config._attn_implementation
        base.set_attn_implementation(ATTENTION_NAME)
        if base.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(
                f"{type(base).__name__} did not accept attn_implementation={ATTENTION_NAME!r} "
                f"(it kept {base.config._attn_implementation!r}); fused_train cannot patch it"
            )
        setattr(base, _ORIGINAL_ATTENTION, original)
        # Each forward derives its layout afresh, even from buffers updated in place under inference_mode.
        base.register_forward_pre_hook(_start_of_forward)
    report = patch_lora_layers(model)
    if report.num_fallback:
        logger.warning("%s", report)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: the model gets back the attention implementation it had. A no-op if unpatched."""
    base = _transformers_model(model)
    unpatch_loss(base)
    unpatch_lora_layers(model)
    original = getattr(base, _ORIGINAL_ATTENTION, None)
    if original is not None:
        base.set_attn_implementation(original)
        delattr(base, _ORIGINAL_ATTENTION)
        for hook_id in [i for i, hook in base._forward_pre_hooks.items() if hook is _start_of_forward]:
            del base._forward_pre_hooks[hook_id]
    return model


def _start_of_forward(module, args):
    clear_per_forward_caches()


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(_transformers_model(model), _ORIGINAL_ATTENTION, None) is not None


def _transformers_model(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise ValueError(
            f"model must be a transformers PreTrainedModel or a peft model wrapping one, got {type(model).__name__}"
        )
    return base


def _check_supported(model: PreTrainedModel) -> None:
    config = model.config
    name = f"{type(model).__name__} (model_type={config.model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder; fused_train patches decoder-only causal LMs")
    if config.model_type not in TESTED_MODEL_TYPES and not type(model)._can_set_attn_implementation():
        raise ValueError(
            f"{name} does not route its attention through transformers' AttentionInterface, so fused_train "
            f"cannot replace it; tested model types: {', '.join(TESTED_MODEL_TYPES)}"
        )
    if getattr(config, "attention_chunk_size", None):
        raise ValueError(
            f"{name} uses chunked attention (attention_chunk_size={config.attention_chunk_size}), which fused_train "
            "attention does not implement"
        )
    sinks = next((n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "sinks"), None)
    if sinks is not None:
        raise ValueError(
            f"{name} has attention sinks ({sinks}: one extra logit per head in the softmax), which fused_train "
            "attention does not implement"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"{name} has attention_dropout={config.attention_dropout}; fused_train attention has no dropout, "
            "set config.attention_dropout = 0.0 before patching"
        )
