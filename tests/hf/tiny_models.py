"""Tiny random-init configs of every tested architecture, float32, no download."""

import torch
import transformers

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Windows are shorter than the longest test document, so the window path is exercised.
CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 7}),
    "qwen2": (transformers.Qwen2Config, {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "gemma2": (
        transformers.Gemma2Config,
        {"head_dim": 16, "sliding_window": 6, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
    ),
    "phi3": (transformers.Phi3Config, {"sliding_window": 8}),
}


def tiny_model(model_type: str, attn_implementation: str = "eager", seed: int = 0):
    config_class, extra = CONFIGS[model_type]
    config = config_class(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.float()
