"""The flat layout's module paths (before `fused_train/ops/`, `hf/`, `training/`) still import, as the
very modules they moved to, and every public name is the object its new module holds."""

import importlib

import pytest

import fused_train

MOVED = {
    "attention": "ops.varlen_attention", "attention_ops": "ops.varlen_attention_triton",
    "cpu_attention": "ops.varlen_attention_cpu", "dispatch": "ops.dispatch", "kv_cache_ops": "ops.int8_kv",
    "linear_cross_entropy": "ops.linear_cross_entropy", "lora": "ops.lora", "multi_lora": "ops.multi_lora",
    "paged_kv_ops": "ops.paged_kv", "fused_loss": "hf.fused_loss", "hf_attention": "hf.attention",
    "kv_cache": "hf.int8_cache", "layout": "hf.varlen_layout", "patching": "hf.patching", "peft_patch": "hf.peft_lora",
    "quantize": "hf.quantize", "collator": "training.collator", "distributed": "training.token_count",
    "packing": "training.packing", "sampler": "training.batch_sampler", "telemetry": "training.telemetry",
    "trainer": "training.trainer", "trainer_callback": "training.callbacks", "serving.ray": "serving.ray_serve",
}  # fmt: skip


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_moved_module(old):
    if old == "serving.ray":
        pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    moved = importlib.import_module(f"fused_train.{MOVED[old]}")
    assert importlib.import_module(f"fused_train.{old}") is moved
    assert moved.__spec__.name == moved.__name__ == f"fused_train.{MOVED[old]}"


def test_old_paths_of_public_names_give_the_same_objects():
    from fused_train.collator import PackedCollator
    from fused_train.linear_cross_entropy import linear_cross_entropy
    from fused_train.patching import TESTED_MODEL_TYPES, patch
    from fused_train.trainer import PackedTrainer

    assert patch is fused_train.patch and TESTED_MODEL_TYPES is fused_train.TESTED_MODEL_TYPES
    assert PackedCollator is fused_train.PackedCollator and PackedTrainer is fused_train.PackedTrainer
    # the old module of that name did not rebind the function
    assert linear_cross_entropy is fused_train.linear_cross_entropy and callable(fused_train.linear_cross_entropy)
    assert fused_train.patching is importlib.import_module("fused_train.hf.patching")  # attribute, as before


def test_names_of_split_modules_still_import_from_where_they_were():
    from fused_train.kernels import lora, lora_gemm, lora_gemm_ref, lora_ref
    from fused_train.serving import adapter_files, adapters

    for name in ("lora_gemm", "GEMM_CONFIGS", "gemm_config_name", "TensorDescriptor"):
        assert getattr(lora, name) is getattr(lora_gemm, name), name
    for name in ("INT4_GROUP_SIZE", "quantize_int8", "quantize_int4", "dequantize_int4"):
        assert getattr(lora, name) is getattr(lora_ref, name) is getattr(lora_gemm_ref, name), name
    assert (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE) == (adapter_files.CONFIG_FILE, adapter_files.WEIGHTS_FILE)


def test_every_public_name_is_there():
    assert sorted(fused_train.__all__) == sorted(set(fused_train.__all__))
    for name in fused_train.__all__:
        assert getattr(fused_train, name) is not None


def test_request_side_names_still_import_from_the_engine():
    from fused_train.serving import engine, paged_cache, requests
    from fused_train.hf.attention import PagedAttentionMetadata

    for name in ("RequestFailed", "EngineStopped", "SamplingParams", "RequestOutput", "_Request", "RequestHandle",
                 "encode_prompt", "decode_text", "request_generator", "ended_output", "stop_reason", "held_back_ids",
                 "suppress_stops"):  # fmt: skip
        assert getattr(engine, name) is getattr(requests, name), name
    assert paged_cache.PagedLayout is paged_cache.PagedAttentionMetadata is PagedAttentionMetadata
