"""The model types fused_train is tested on end to end: the one `model_type` table that `patch` and the
fused loss both read."""

# Each is tested end to end: packed == per-document loss and gradients, padded batches, generation
# with a cache (tests/hf/test_patch_models.py); and each `*ForCausalLM.forward` is
# `decoder -> lm_head (-> final softcap) -> ForCausalLMLoss`, which the fused loss takes over
# (tests/hf/test_fused_loss.py covers llama and gemma2, the softcapped one).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
