"""fused_train: packed, varlen fine-tuning of Hugging Face LLMs with Triton kernels; its public names.

The package by capability: `ops/` (the custom ops over `kernels/`, their autograd, input checks and
the Triton-or-reference dispatch), `hf/` (transformers and peft integration: `patch`, the attention
implementation, the int8 KV cache, LoRA routing, the fused loss, quantized bases), `training/`
(packing, collation, batch sampling, the trainer, telemetry), `serving/` (adapter pool, engine,
server, Ray Serve). The flat layout's module paths (`fused_train.patching`, `fused_train.serving.ray`,
...) still import, as the very modules they moved to (`_MOVED`).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from fused_train.hf.int8_cache import Int8KVCache
from fused_train.hf.patching import TESTED_MODEL_TYPES, is_patched, patch, unpatch
from fused_train.hf.quantize import dequantize_base, quantize_base
from fused_train.ops.linear_cross_entropy import linear_cross_entropy
from fused_train.ops.lora import lora_linear
from fused_train.ops.multi_lora import multi_lora_linear
from fused_train.ops.varlen_attention import varlen_attention
from fused_train.training.batch_sampler import PackedBatchSampler
from fused_train.training.collator import PackedCollator, block_diagonal_causal_mask
from fused_train.training.packing import plan_packing, plan_packing_arrays
from fused_train.training.telemetry import TrainingTelemetry
from fused_train.training.token_count import global_token_count

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
        from fused_train.training.trainer import PackedTrainer

        return PackedTrainer
    if name == "TelemetryCallback":
        from fused_train.training.callbacks import TelemetryCallback

        return TelemetryCallback
    if name in _MOVED:  # `import fused_train` then `fused_train.patching`, as before the move
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fused_train' has no attribute {name!r}")


# Where each module of the flat layout moved (old name -> new name under fused_train).
_MOVED = {
    "attention": "ops.varlen_attention", "attention_ops": "ops.varlen_attention_triton",
    "cpu_attention": "ops.varlen_attention_cpu", "dispatch": "ops.dispatch", "kv_cache_ops": "ops.int8_kv",
    "linear_cross_entropy": "ops.linear_cross_entropy", "lora": "ops.lora", "multi_lora": "ops.multi_lora",
    "paged_kv_ops": "ops.paged_kv",
    "fused_loss": "hf.fused_loss", "hf_attention": "hf.attention", "kv_cache": "hf.int8_cache",
    "layout": "hf.varlen_layout", "patching": "hf.patching", "peft_patch": "hf.peft_lora", "quantize": "hf.quantize",
    "collator": "training.collator", "distributed": "training.token_count", "packing": "training.packing",
    "sampler": "training.batch_sampler", "telemetry": "training.telemetry", "trainer": "training.trainer",
    "trainer_callback": "training.callbacks",
    "serving.ray": "serving.ray_serve",
}  # fmt: skip


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import fused_train.<old>` gives the module it moved to, imported on first use (so the old
    path of a heavy module such as the trainer costs nothing until it is imported): the same module
    object, so `from fused_train.patching import patch` is `fused_train.hf.patching.patch`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("fused_train.") and fullname[len("fused_train."):] in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module("fused_train." + _MOVED[spec.name[len("fused_train."):]])
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the old name's next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_MovedModules())
# The old module `linear_cross_entropy` has the name of the public function: registered now, so that
# importing it by its old path does not rebind `fused_train.linear_cross_entropy` to the module.
sys.modules[__name__ + ".linear_cross_entropy"] = sys.modules[__name__ + ".ops.linear_cross_entropy"]
