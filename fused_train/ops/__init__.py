"""The custom ops over `kernels/`: each module is named after its kernel file and holds the ops'
registration, autograd, input checks and the Triton-or-reference choice (`dispatch`).

    varlen_attention          varlen_attention (its Triton ops: varlen_attention_triton; CPU: varlen_attention_cpu)
    lora, multi_lora          lora_linear, multi_lora_linear
    linear_cross_entropy      linear_cross_entropy
    int8_kv                   quantize_kv_append, int8_decode_attention (the int8 KV cache)
    paged_kv                  write_kv_pages, paged_decode_attention (the paged KV cache)
    dispatch, checks          where an op runs; the input checks and constants the ops (and hf, serving) share

Every op is registered one way (torchao's `ops.py` style): a typed
`@torch.library.custom_op("fused_train::name", mutates_args=...)` function, its `@name.register_fake`
right below, and `name.register_autograd(backward, setup_context=...)` where it has a backward. The
public functions call the op in eager mode and under `torch.compile` alike (`torch.library.opcheck`
covers the one path), at the price of the dispatcher's host time per call (`bench/bench_lora.py`
measures it: its host overhead).

The public functions are re-exported by `fused_train`, not here: `ops.varlen_attention` and
`ops.linear_cross_entropy` name the modules, which a function of the same name would hide.
"""
