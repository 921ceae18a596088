"""fused_train: packed, varlen fine-tuning of Hugging Face LLMs with Triton kernels."""

from fused_train.attention import varlen_attention
from fused_train.collator import PackedCollator, block_diagonal_causal_mask
from fused_train.distributed import global_token_count
from fused_train.kv_cache import Int8KVCache
from fused_train.linear_cross_entropy import linear_cross_entropy
from fused_train.lora import lora_linear
from fused_train.multi_lora import multi_lora_linear
from fused_train.packing import plan_packing, plan_packing_arrays
from fused_train.patching import TESTED_MODEL_TYPES, is_patched, patch, unpatch
from fused_train.quantize import dequantize_base, quantize_base
from fused_train.sampler import PackedBatchSampler
from fused_train.telemetry import TrainingTelemetry

__all__ = [
    "Int8KVCache",
    "PackedBatchSampler",
    "PackedCollator",
    "PackedTrainer",
    "TESTED_MODEL_TYPES",
    "TelemetryCallback",
    "TrainingTelemetry",
    "block_diagonal_causal_mask",
    "dequantize_base",
    "global_token_count",
    "is_patched",
    "linear_cross_entropy",
    "lora_linear",
    "multi_lora_linear",
    "patch",
    "plan_packing",
    "plan_packing_arrays",
    "quantize_base",
    "unpatch",
    "varlen_attention",
]


def __getattr__(name):
    # PackedTrainer pulls in transformers.Trainer and accelerate: loaded on first use only.
    if name == "PackedTrainer":
        from fused_train.trainer import PackedTrainer

        return PackedTrainer
    if name == "TelemetryCallback":
        from fused_train.trainer_callback import TelemetryCallback

        return TelemetryCallback
    raise AttributeError(f"module 'fused_train' has no attribute {name!r}")
