"""Serving many LoRA adapters of one base model: the adapter pool, and the continuous-batching
engine over a paged KV cache."""

from fused_train.serving.adapters import BASE_ADAPTER, AdapterPool, NoFreeSlot
from fused_train.serving.engine import Engine, QueueFull, RequestFailed, RequestHandle, RequestOutput, SamplingParams

__all__ = [
    "AdapterPool", "BASE_ADAPTER", "Engine", "NoFreeSlot", "QueueFull", "RequestFailed", "RequestHandle",
    "RequestOutput", "SamplingParams",
]  # fmt: skip
