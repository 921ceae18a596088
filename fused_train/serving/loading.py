"""Loading a servable `Engine`: the model and tokenizer of a Hugging Face directory on a device, in
a dtype, with peft adapters. Used by `fused-train serve`, the Ray Serve replicas, the tests and benches.
"""

DTYPES = ("auto", "bfloat16", "float16", "float32")


def open_engine(model_path, adapters=None, *, device=None, dtype="auto", quantize_base=None, **engine_options):
    """An `Engine` over the model and tokenizer in the Hugging Face directory `model_path`, with
    `adapters` (name -> peft adapter directory) loaded, on `device` (None: CUDA when there is one)
    in `dtype` ("auto": bfloat16 on CUDA, float32 on the CPU); `quantize_base` 8 or 4 stores every
    linear layer of the decoder int8 or int4 (`fused_train.quantize_base`; the lm_head and the
    embeddings stay float, as in QLoRA), None leaves the model as it is; `engine_options` go to `Engine`."""
    import torch
    import transformers

    import fused_train
    from fused_train.serving import Engine

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if quantize_base not in (None, 8, 4):
        raise ValueError(f"quantize_base must be 8, 4 or None, got {quantize_base!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
    if quantize_base is not None:
        # quantize_base leaves weights that require grad alone; a served model trains nothing.
        fused_train.quantize_base(model.requires_grad_(False).get_decoder(), bits=quantize_base, only_lora_layers=False)
    return Engine(model, tokenizer, adapters=dict(adapters or {}), **engine_options)
