"""Serving many LoRA adapters of one base model: the adapter pool, and the continuous-batching
engine over a paged KV cache."""

from fused_train.serving.adapters import BASE_ADAPTER, AdapterPool, AdapterVersion, NoFreeSlot, UnknownAdapter
from fused_train.serving.engine import (
    Engine, EngineStopped, PromptTooLong, QueueFull, RequestFailed, RequestHandle, RequestOutput, SamplingParams,
)  # fmt: skip

__all__ = [
    "AdapterPool", "AdapterVersion", "BASE_ADAPTER", "Engine", "EngineStopped", "NoFreeSlot", "PromptTooLong",
    "QueueFull", "RequestFailed", "RequestHandle", "RequestOutput", "SamplingParams", "UnknownAdapter",
]  # fmt: skip
