"""AdapterPool serves real peft adapters on a plain tiny Llama exactly as peft's mixed batch does."""

import os
import pickle
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fused_train.kernels import multi_lora_ref
from fused_train.kernels.multi_lora_ref import plan_slots
from fused_train.ops import multi_lora as multi_lora_ops
from fused_train.serving import AdapterPool, NoFreeSlot
from fused_train.serving import adapters as adapters_module
from tests.conftest import DEVICE
from tests.hf.tiny_models import COMMON, tiny_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Different ranks, target sets, rank/alpha patterns and rsLoRA; init_lora_weights=False makes B non-zero.
ADAPTERS = {
    "attn4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=ATTENTION + MLP, rank_pattern={"down_proj": 2},
                 alpha_pattern={"o_proj": 3}),
    "mlp2": dict(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj"], use_rslora=True),
}  # fmt: skip
BATCH, SEQ_LEN = 4, 5
# fp32 kernels run exactly in the interpreter, as tf32 on the GPU.
TOLERANCE = 1e-2 if DEVICE == "cuda" else 1e-5


def _base():
    return tiny_model("llama").to(DEVICE).eval()


def _save_adapter(directory, seed, base=None, safe=True, **config):
    torch.manual_seed(seed)
    model = get_peft_model(base or _base(), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(directory, safe_serialization=safe)
    return str(directory)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: _save_adapter(root / name, seed, **config) for seed, (name, config) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def reference(adapter_dirs):
    """Unpatched peft holding every adapter: its mixed-batch path is what the pool must match."""
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(_base(), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


def _input_ids(batch=BATCH):
    return torch.randint(3, 97, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(7)).to(DEVICE)


def _assert_close(actual, expected):
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), error


@torch.no_grad()
def _pool_logits(pool, model, names):
    token_slots = pool.slots_for(names, num_tokens=[SEQ_LEN] * len(names))
    with pool.activate(token_slots):
        return model(_input_ids(len(names))).logits


def _pool(model, adapter_dirs, names=None, **sizes):
    pool = AdapterPool(model, **{"max_loras": 3, "max_cpu_loras": 3, "max_rank": 8, **sizes})
    for name in names or adapter_dirs:
        pool.load(name, adapter_dirs[name])
    return pool


def test_mixed_batch_matches_peft_and_outside_is_the_base(adapter_dirs, reference):
    model, plain = _base(), _base()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    pool = _pool(model, adapter_dirs)
    names = ["attn4", "__base__", "all8", "mlp2"]
    with torch.no_grad():
        expected = reference(_input_ids(), adapter_names=names).logits
        single = reference(_input_ids(1), adapter_names=["all8"]).logits
    _assert_close(_pool_logits(pool, model, names), expected)
    _assert_close(_pool_logits(pool, model, ["all8"]), single)
    with torch.no_grad():
        assert torch.equal(model(_input_ids()).logits, plain(_input_ids()).logits)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    pool.close()
    assert not any("forward" in module.__dict__ for module in model.modules())
    AdapterPool(model, max_loras=1, max_cpu_loras=1, max_rank=8)  # closed: the model takes a new pool


def test_lru_eviction_order_and_counts(adapter_dirs):
    pool = AdapterPool(_base(), max_loras=2, max_cpu_loras=3, max_rank=8)
    for name in "abc":
        pool.load(name, adapter_dirs["attn4"])
    assert pool.names() == ["a", "b", "c"]
    pool.slots_for(["a"])
    pool.slots_for(["b"])
    pool.slots_for(["a"])  # hit: b is now the least recently used
    pool.slots_for(["c"])
    stats = pool.stats()
    assert stats["resident"] == ["a", "c"]
    assert (stats["hits"], stats["loads"], stats["evictions"], stats["disk_reads"]) == (1, 3, 1, 3)
    # Two adapters in one batch: both stay; the third distinct one does not fit.
    assert pool.slots_for(["b", None, "c"]).tolist() == [0, -1, 1]
    assert pool.stats()["resident"] == ["b", "c"]
    with pytest.raises(ValueError, match="max_loras"):
        pool.slots_for(["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown adapter 'd'"):
        pool.slots_for(["d"])


def test_pinned_adapters_are_never_evicted(adapter_dirs):
    pool = AdapterPool(_base(), max_loras=2, max_cpu_loras=3, max_rank=8)
    for name in "abc":
        pool.load(name, adapter_dirs["attn4"])
    pool.pin("a")
    for name in "bcbc":
        pool.slots_for([name])
    assert pool.stats()["resident"] == ["a", "c"]
    pool.pin("c")
    before = pool.stats()
    with pytest.raises(NoFreeSlot, match="2 hold pinned"):
        pool.slots_for(["b"])
    assert pool.stats() == before
    pool.unpin("c")
    pool.slots_for(["b"])
    assert pool.stats()["resident"] == ["a", "b"]


def test_leased_slots_are_not_evicted_until_the_tensor_dies(adapter_dirs):
    pool = AdapterPool(_base(), max_loras=2, max_cpu_loras=3, max_rank=8)
    for name in "abc":
        pool.load(name, adapter_dirs["attn4"])
    token_slots = pool.slots_for(["a", "b"], num_tokens=[2, 3])
    assert token_slots.tolist() == [0, 0, 1, 1, 1]
    assert pool.stats()["leased_slots"] == [0, 1]
    with pytest.raises(NoFreeSlot, match="2 are leased"):
        pool.slots_for(["c"])
    pool.unload("a")  # unregistered now; its slot stays as it is while leased
    with pytest.raises(NoFreeSlot):
        pool.slots_for(["c"])
    del token_slots
    assert pool.stats()["leased_slots"] == []
    assert pool.slots_for(["c"]).tolist() == [0]


def test_activate_checks_slots_built_elsewhere(adapter_dirs):
    model = _base()
    pool = _pool(model, adapter_dirs, names=["attn4", "mlp2"])
    by_pool = _pool_logits(pool, model, ["mlp2", "attn4"])
    # The same slots, in a tensor that slots_for did not make (no lease of its own).
    token_slots = pool.slots_for(["mlp2", "attn4"], num_tokens=[SEQ_LEN] * 2).clone()
    with torch.no_grad(), pool.activate(token_slots):
        assert torch.equal(model(_input_ids(2)).logits, by_pool)
    for slots, message in (([3], "outside -1..2"), ([2], "holds no adapter")):
        with pytest.raises(ValueError, match=message), pool.activate(torch.tensor(slots, dtype=torch.int32)):
            pass
    with pytest.raises(ValueError, match="1-D int32"), pool.activate(token_slots.long()):
        pass
    with pytest.raises(ValueError, match="token_slots"), torch.no_grad(), pool.activate(token_slots[:3]):
        model(_input_ids(2))
    assert pool.stats()["leased_slots"] == []


def test_reload_after_eviction_is_identical(adapter_dirs):
    model = _base()
    pool = _pool(model, adapter_dirs, max_loras=1, max_cpu_loras=1)
    first = _pool_logits(pool, model, ["attn4", None])
    _pool_logits(pool, model, ["all8"])
    stats = pool.stats()
    assert stats["resident"] == ["all8"] and stats["host"] == ["all8"] and stats["evictions"] == 1
    again = _pool_logits(pool, model, ["attn4", None])
    assert torch.equal(first, again)
    assert pool.stats()["disk_reads"] == 3 + 3  # the loads, then a CPU-tier miss per batch
    assert pool.stats()["load_ms"] > 0


def _truncated(directory, source):
    os.makedirs(directory)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as file:
            data = file.read()
        with open(os.path.join(directory, name), "wb") as file:
            file.write(data[: len(data) - 40] if name.endswith(".safetensors") else data)
    return str(directory)


def _renamed(directory, source):
    _truncated(directory, source)  # copies; then rewrite the weights with names the model lacks
    weights = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(os.path.join(source, "adapter_model.safetensors"))
    save_file({key.replace("self_attn", "attention"): value for key, value in tensors.items()}, weights)
    return str(directory)


def _bad_adapter(kind, directory, adapter_dirs):
    if kind == "pickle only":
        return _save_adapter(directory, 0, safe=False, r=4, lora_alpha=8, target_modules=["q_proj"])
    if kind == "hidden size":
        narrow = LlamaForCausalLM(LlamaConfig(**{**COMMON, "hidden_size": 32})).to(DEVICE)
        return _save_adapter(directory, 0, base=narrow, r=4, lora_alpha=8, target_modules=["q_proj"])
    if kind == "module names":
        return _renamed(directory, adapter_dirs["attn4"])
    if kind == "rank":
        return _save_adapter(directory, 0, r=16, lora_alpha=8, target_modules=["q_proj"])
    if kind == "truncated":
        return _truncated(directory, adapter_dirs["attn4"])
    if kind == "dora":
        return _save_adapter(directory, 0, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    raise AssertionError(kind)


BAD = {
    "pickle only": "only pickle weights",
    "hidden size": "do not fit",
    "module names": "does not have",
    "rank": "rank 16 > max_rank 8",
    "truncated": "corrupt or truncated",
    "dora": "use_dora",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_adapters_are_refused_and_change_nothing(kind, adapter_dirs, tmp_path, monkeypatch):
    model = _base()
    pool = _pool(model, adapter_dirs, names=["attn4"])
    expected = _pool_logits(pool, model, ["attn4"])
    before = pool.stats()
    forwards = {name for name, module in model.named_modules() if "forward" in module.__dict__}
    path = _bad_adapter(kind, tmp_path / kind, adapter_dirs)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the pool unpickled a file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    with pytest.raises(ValueError, match=BAD[kind]):
        pool.load("bad", path)
    assert pool.names() == ["attn4"] and pool.stats() == before
    assert {name for name, module in model.named_modules() if "forward" in module.__dict__} == forwards
    assert torch.equal(_pool_logits(pool, model, ["attn4"]), expected)


def test_loads_while_a_batch_runs_leave_it_alone(adapter_dirs, reference):
    """A second thread loads, fills a free slot, tries to evict and unloads while a forward is
    paused halfway through its layers: the batch still computes its own adapters."""
    model = _base()
    pool = _pool(model, adapter_dirs, names=["attn4", "all8"], max_loras=3)
    halfway, resume = threading.Event(), threading.Event()

    def pause(module, args):
        halfway.set()
        assert resume.wait(30)

    hook = model.model.layers[1].register_forward_pre_hook(pause)
    names = ["attn4", "all8", None, "attn4"]
    result = {}
    runner = threading.Thread(target=lambda: result.update(logits=_pool_logits(pool, model, names)))
    runner.start()
    try:
        assert halfway.wait(30)
        pool.load("mlp2", adapter_dirs["mlp2"])
        pool.load("extra", adapter_dirs["mlp2"])
        held = pool.slots_for(["mlp2"])  # the free slot, leased while `held` lives
        with pytest.raises(NoFreeSlot):
            pool.slots_for(["extra"])  # would evict a slot the running batch reads
        pool.unload("all8")
    finally:
        resume.set()
        runner.join(60)
        hook.remove()
    with torch.no_grad():
        expected = reference(_input_ids(), adapter_names=[name or "__base__" for name in names]).logits
    _assert_close(result["logits"], expected)
    assert pool.stats()["leased_slots"] == [held.item()]
    assert pool.slots_for(["extra"]).tolist() == [1]  # all8's slot, free now


def test_reference_path_groups_tokens_by_slot_once_per_forward(adapter_dirs, reference, monkeypatch):
    """Where the PyTorch reference runs (a CPU without Triton's interpreter), `activate` groups the
    batch's tokens by slot once (`plan_slots`) and every layer reuses it; the logits match peft's."""
    monkeypatch.setattr(multi_lora_ops, "triton_runs_on", lambda *tensors: False)
    plans = []
    monkeypatch.setattr(adapters_module, "plan_slots", lambda *args: plans.append(args) or plan_slots(*args))

    def no_plan_per_layer(*args):
        raise AssertionError("a layer grouped the tokens by slot itself")

    monkeypatch.setattr(multi_lora_ref, "plan_slots", no_plan_per_layer)
    model = _base()
    pool = _pool(model, adapter_dirs)
    names = ["attn4", "__base__", "all8", "mlp2"]
    with torch.no_grad():
        expected = reference(_input_ids(), adapter_names=names).logits
    _assert_close(_pool_logits(pool, model, names), expected)
    assert len(plans) == 1
