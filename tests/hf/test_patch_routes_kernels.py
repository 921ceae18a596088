"""A patched model runs the Triton kernels wherever they can run (on CUDA, or in the interpreter)."""

import peft
import torch

import fused_train
import fused_train.ops.varlen_attention_triton
import fused_train.ops.lora
from tests.conftest import DEVICE
from tests.hf.tiny_models import tiny_model


def test_patched_peft_model_trains_through_both_kernels(monkeypatch):
    calls = {"attention": 0, "lora": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        fused_train.ops.varlen_attention_triton, "varlen_attention_fwd",
        counting("attention", fused_train.ops.varlen_attention_triton.varlen_attention_fwd),
    )  # fmt: skip
    monkeypatch.setattr(fused_train.ops.lora, "lora_linear_fwd", counting("lora", fused_train.ops.lora.lora_linear_fwd))
    model = tiny_model("llama").to(DEVICE, torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    fused_train.patch(model)
    docs = [torch.randint(3, 97, (n,)) for n in (9, 20, 4)]
    batch = fused_train.PackedCollator(max_tokens=32)([{"input_ids": d} for d in docs])
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    layers = model.get_base_model().config.num_hidden_layers
    assert calls == {"attention": layers, "lora": 2 * layers}
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
