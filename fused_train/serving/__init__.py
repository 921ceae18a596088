"""Serving many LoRA adapters of one base model: the adapter pool (engine and server to come)."""

from fused_train.serving.adapters import BASE_ADAPTER, AdapterPool, NoFreeSlot

__all__ = ["AdapterPool", "BASE_ADAPTER", "NoFreeSlot"]
