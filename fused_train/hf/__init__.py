"""transformers and peft integration: `patch(model)` (patching), the `"fused_train"` attention
implementation with its KV handles (attention), the int8 KV cache (int8_cache), peft LoRA routing
(peft_lora), the fused training loss (fused_loss), a batch's varlen layout (varlen_layout) and
int8/int4 base weights (quantize). The public names are re-exported by `fused_train`.
"""
