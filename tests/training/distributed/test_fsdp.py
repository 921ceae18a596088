"""FSDP2 (`fully_shard`, gloo, 2 ranks) on a peft LoRA model patched by `fused_train.patch`.

Each decoder layer and `lm_head` are their own FSDP units, as users shard them, so the fused loss
(`patch(model, fused_loss=True)`) reads `lm_head.weight` outside `lm_head`'s forward; in one
run every LoRA A and B is a unit too, which the fused LoRA path reads the same way. The
gradients of the LoRA parameters must be the single-process ones: float32 within 1e-5; a bf16
frozen base with float32 LoRA (peft's default dtypes) under a bf16 `MixedPrecisionPolicy` within
bf16 error of them.
"""

import peft
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fused_train
from fused_train.training.token_count import global_token_count
from tests.hf.tiny_models import tiny_model
from tests.training.distributed.test_exact_loss import _documents, _examples

MAX_TOKENS = 64


def _lora_model(dtype=torch.float32, fused_loss=True):
    base = tiny_model("llama").to(dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config)
    # peft starts B at zero; random B makes every LoRA gradient non-trivial.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return fused_train.patch(model, fused_loss=fused_loss)


def _lora_gradients(model):
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _shard(model, world_size, mixed_precision=None, lora_units=False):
    mesh = init_device_mesh("cpu", (world_size,))
    kwargs = {"mesh": mesh} | ({"mp_policy": mixed_precision} if mixed_precision else {})
    base = model.get_base_model()
    if lora_units:
        # As wrap policies that give trainable parameters their own units do: the fused LoRA path
        # reads lora_A/lora_B weights without calling those modules.
        for module in [m for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]:
            for linear in module.values():
                fully_shard(linear, **kwargs)
    for layer in base.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(base.lm_head, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _step(model, batch, world_size):
    # FSDP2 averages gradients over ranks, as DDP does.
    count = global_token_count(batch["labels"])
    loss = model(**batch, num_items_in_batch=count / world_size).loss
    loss.backward()
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    return float(reduced) / world_size


def rank_checks(rank, world_size):
    batch = fused_train.PackedCollator(MAX_TOKENS)(_examples(_documents(8)[rank::world_size]))
    out = {}
    bf16_params = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name, dtype, mixed_precision, lora_units in (
        ("float32", torch.float32, None, False),
        ("lora_units", torch.float32, None, True),
        ("bf16_base", torch.bfloat16, bf16_params, False),
    ):
        model = _shard(_lora_model(dtype), world_size, mixed_precision, lora_units)
        out[name] = {"loss": _step(model, batch, world_size), "gradients": _lora_gradients(model)}
    return out


@pytest.fixture
def fsdp(two_ranks):
    return [ranked["fsdp"] for ranked in two_ranks]


@pytest.fixture(scope="module")
def one_process():
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        model = _lora_model()
        loss = model(**fused_train.PackedCollator(MAX_TOKENS)(_examples(_documents(8)))).loss
        loss.backward()
    return {"loss": loss.item(), "gradients": _lora_gradients(model)}


@pytest.mark.parametrize("units", ["float32", "lora_units"])
def test_fully_shard_lora_fused_loss_equals_one_process(fsdp, one_process, units):
    for ranked in fsdp:
        assert ranked[units]["loss"] == pytest.approx(one_process["loss"], rel=1e-5)
        assert ranked[units]["gradients"].keys() == one_process["gradients"].keys()
        for name, gradient in one_process["gradients"].items():
            torch.testing.assert_close(ranked[units]["gradients"][name], gradient, atol=1e-5, rtol=1e-5, msg=name)


def test_fully_shard_bf16_base_float32_lora_within_bf16_error(fsdp, one_process):
    for ranked in fsdp:
        mixed = ranked["bf16_base"]
        assert mixed["loss"] == pytest.approx(one_process["loss"], rel=2e-2)
        for name, gradient in one_process["gradients"].items():
            error = (mixed["gradients"][name] - gradient).norm() / gradient.norm()
            assert error < 5e-2, f"{name}: relative error {error:.3g}"
