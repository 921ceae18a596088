"""fused_train: packed, varlen fine-tuning of Hugging Face LLMs with Triton kernels."""

from fused_train.attention import varlen_attention

__all__ = ["varlen_attention"]
