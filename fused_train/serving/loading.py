"""Loading a servable `Engine`: the model and tokenizer of a Hugging Face directory on a device, in
a dtype, with peft adapters. Used by `fused-train serve`, the Ray Serve replicas, the tests and benches.
"""

DTYPES = ("auto", "bfloat16", "float16", "float32")


def open_engine(model_path, adapters=None, *, device=None, dtype="auto", **engine_options):
    """An `Engine` over the model and tokenizer in the Hugging Face directory `model_path`, with
    `adapters` (name -> peft adapter directory) loaded, on `device` (None: CUDA when there is one)
    in `dtype` ("auto": bfloat16 on CUDA, float32 on the CPU); `engine_options` go to `Engine`."""
    import torch
    import transformers

    from fused_train.serving import Engine

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
    return Engine(model, tokenizer, adapters=dict(adapters or {}), **engine_options)
