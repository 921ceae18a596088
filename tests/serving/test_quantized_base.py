"""An engine over a quantized base (`open_engine(quantize_base=8|4)`, as `fused-train eval --quantize-base`
opens one): its adapters and base rows generate what unpatched peft generates over the same
`fused_train.quantize_base` layers."""

import pytest
import torch
import transformers
from peft import PeftModel

import fused_train
from fused_train.hf.quantize import QuantizedLinear
from fused_train.serving import SamplingParams
from fused_train.serving.loading import open_engine

PROMPTS = [[1, 40, 41, 42], [1, 90, 91, 92, 93, 94, 95]]
MAX_TOKENS = 6


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_engine_equals_peft_over_the_same_quantized_layers(bits, tiny_model_dir, tiny_adapters,
                                                                          reference_path):  # fmt: skip
    adapters = {"b": tiny_adapters["b"]}
    engine = open_engine(tiny_model_dir, adapters, quantize_base=bits, kv_dtype="model", kv_cache_tokens=1024)
    try:
        quantized = [type(m).__name__ for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
        outputs = engine.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                                  [None] * len(PROMPTS) + ["b"] * len(PROMPTS))  # fmt: skip
    finally:
        engine.shutdown(drain=False)
    assert quantized == [f"Int{bits}Linear"] * 28  # 7 projections x 4 layers; lm_head stays float
    for adapter in (None, "b"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapters[adapter]).eval()
        model.requires_grad_(False)
        fused_train.quantize_base(model.get_decoder(), bits=bits, only_lora_layers=False)
        for prompt, output in zip(PROMPTS, outputs[: len(PROMPTS)] if adapter is None else outputs[len(PROMPTS):]):
            with torch.no_grad():
                expected = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
            assert output.error is None and output.token_ids == expected, (adapter, prompt)
