"""Int8KVCache in `model.generate` on tiny patched models (the int8 kernels run in the interpreter)."""

import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import Cache

import fused_train
import fused_train.hf.attention
import fused_train.ops.int8_kv
import fused_train.ops.varlen_attention
from fused_train import Int8KVCache
from fused_train.kernels.int8_kv_quantize import dequantize_kv_ref, quantize_kv_ref
from tests.hf.tiny_models import COMMON, tiny_model

# transformers 5 renamed generate's and forward's `past_key_values` to `cache`.
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def sharp_tiny_model(model_type="llama"):
    """A tiny model with a confident head: random init gives near-uniform logits, where greedy
    decoding would flip on any rounding; scaling the output layer makes the argmax meaningful."""
    model = tiny_model(model_type).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping = None  # it would squash the scaled logits back together
    return model


def left_padded(prompt_lengths, seed=0, vocab=COMMON["vocab_size"]):
    generator = torch.Generator().manual_seed(seed)
    width = max(prompt_lengths)
    input_ids = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
    for row, length in enumerate(prompt_lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def greedy(model, cache, inputs, max_new_tokens):
    with torch.no_grad():
        return model.generate(
            **inputs, **{CACHE: cache}, max_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )


class DequantizedCache(DynamicCache):
    """transformers' cache handing attention what Int8KVCache's stands for, in full precision: the
    last `residual_length` positions exact, older ones what their int8 values stand for; and, like
    Int8KVCache, prefill its exact keys and values. The same attention inputs without the int8
    kernel, so logits must agree to float32 rounding. (No crop or reorder: not for those tests.)"""

    def __init__(self, *args, residual_length, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_length = residual_length
        self.dequantized = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        prefill = self.get_seq_length(layer_idx) == 0
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        new = [dequantize_kv_ref(*quantize_kv_ref(states), states.dtype) for states in (key_states, value_states)]
        old = None if prefill else self.dequantized[layer_idx]
        self.dequantized[layer_idx] = new if old is None else [torch.cat(pair, dim=2) for pair in zip(old, new)]
        if prefill:
            return key_states, value_states
        # Sliding-window layers return only the last positions: align both copies at the end.
        held = keys.shape[2]
        cut = max(0, held - self.residual_length)
        return tuple(
            torch.cat([dequantized[:, :, -held:][:, :, :cut], exact[:, :, cut:]], dim=2)
            for dequantized, exact in zip(self.dequantized[layer_idx], (keys, values))
        )


@pytest.fixture
def reference_path(monkeypatch):
    """What a plain CPU runs (no GPU, no interpreter): the PyTorch references, not the kernels."""
    monkeypatch.setattr(fused_train.ops.int8_kv, "triton_runs_on", lambda *tensors: False)
    monkeypatch.setattr(fused_train.ops.varlen_attention, "triton_runs_on", lambda *tensors: False)


def assert_generation_equals_the_dequantized_cache(model, inputs, new_tokens, residual_length):
    expected = greedy(model, DequantizedCache(config=model.config, residual_length=residual_length), inputs, new_tokens)
    got = greedy(model, Int8KVCache(model.config, residual_length=residual_length), inputs, new_tokens)
    assert torch.equal(got.sequences, expected.sequences)
    for got_step, expected_step in zip(got.logits, expected.logits):
        torch.testing.assert_close(got_step, expected_step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("model_type", "residual_length"), [("llama", 4), ("mistral", 4), ("gemma2", 4), ("qwen2", 4), ("llama", 0)]
)
def test_generation_equals_attention_over_the_dequantized_cache(model_type, residual_length):
    # GQA (all), sliding windows (mistral, qwen2, gemma2), softcap (gemma2), left padding. With 4
    # exact positions and 13 + 12 tokens, both the int8 data and the exact ring (wrapping) are read.
    model = fused_train.patch(sharp_tiny_model(model_type))
    assert_generation_equals_the_dequantized_cache(model, left_padded([9, 4, 13, 1], seed=1), 12, residual_length)


def test_reference_path_on_a_plain_cpu(reference_path):
    model = fused_train.patch(sharp_tiny_model("mistral"))
    assert_generation_equals_the_dequantized_cache(model, left_padded([9, 4, 13, 1], seed=2), 8, residual_length=4)


def test_thousands_of_new_tokens(reference_path):
    # The reference path keeps this fast; the cache grows through several blocks.
    config = transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = fused_train.patch(transformers.AutoModelForCausalLM.from_config(config).eval())
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    inputs = left_padded([20, 7], seed=6)
    new_tokens = 1500
    expected = greedy(model, DequantizedCache(config=model.config, residual_length=32), inputs, new_tokens)
    cache = Int8KVCache(model.config)
    got = greedy(model, cache, inputs, new_tokens)
    assert got.sequences.shape == (2, 20 + new_tokens)
    assert cache.get_seq_length() == 20 + new_tokens - 1
    assert all(layer.capacity == 1536 for layer in cache.layers)
    # The same attention inputs, summed in another order: equal but for rare float32 near-ties.
    assert (got.sequences == expected.sequences).float().mean() >= 0.99


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_generation_matches_the_full_precision_cache(model_type):
    model = fused_train.patch(sharp_tiny_model(model_type))
    inputs = left_padded([9, 4, 13, 1, 7, 11], seed=1)
    new_tokens = 16
    expected = greedy(model, DynamicCache(config=model.config), inputs, new_tokens)
    got = greedy(model, Int8KVCache(model.config), inputs, new_tokens)
    same = (got.sequences == expected.sequences)[:, -new_tokens:]
    assert same.all(dim=1).sum() >= 5, f"prompts with the same greedy tokens: {same.all(dim=1).tolist()}"
    # Until a prompt's tokens first differ, its logits differ by int8 rounding only.
    steps_alike = same.long().cumprod(dim=1).sum(dim=1)
    for row, steps in enumerate(steps_alike.tolist()):
        for step in range(min(steps + 1, new_tokens)):
            torch.testing.assert_close(got.logits[step][row], expected.logits[step][row], atol=0.15, rtol=0.02)


def test_decode_steps_run_the_int8_kernel(monkeypatch):
    calls = []
    original = fused_train.hf.attention.int8_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[1].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_train.hf.attention, "int8_decode_attention", spy)
    model = fused_train.patch(sharp_tiny_model())
    greedy(model, Int8KVCache(model.config), left_padded([5, 3]), max_new_tokens=3)
    # Prefill attends with the varlen kernel; each of the 2 later steps reads int8 in both layers.
    assert calls == [torch.int8] * 4


def test_sampling_and_long_generation_fill_the_cache():
    model = fused_train.patch(sharp_tiny_model())
    cache = Int8KVCache(model.config, block_tokens=16)
    inputs = left_padded([6, 2], seed=3)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, **{CACHE: cache}, max_new_tokens=40, min_new_tokens=40, do_sample=True,
                             top_k=5, pad_token_id=0)
    assert out.shape == (2, 6 + 40)
    # The last token is generated, not yet fed back: the cache holds all but one position.
    assert cache.get_seq_length() == 6 + 40 - 1
    assert all(layer.capacity == 48 for layer in cache.layers)


@pytest.mark.parametrize(("tokens", "residual_length"), [(256, 0), (4096, 32)])
def test_memory_is_about_half_of_a_bfloat16_cache(reference_path, tokens, residual_length):
    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 256, "num_attention_heads": 2,
                                         "num_key_value_heads": 2, "max_position_embeddings": tokens})
    assert config.hidden_size // config.num_attention_heads == 128
    model = fused_train.patch(transformers.AutoModelForCausalLM.from_config(config).eval()).to(torch.bfloat16)
    input_ids = torch.randint(3, 97, (2, tokens))
    int8_cache = Int8KVCache(model.config, residual_length=residual_length)
    with torch.no_grad():
        model(input_ids=input_ids, **{CACHE: int8_cache}, use_cache=True)
        bf16_cache = DynamicCache(config=model.config)
        fused_train.unpatch(model)(input_ids=input_ids, **{CACHE: bf16_cache}, use_cache=True)
    bf16_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in bf16_cache.layers)
    # (128 int8 + one float32 scale) per token and head against 128 bfloat16, plus the exact ring.
    assert int8_cache.nbytes() / bf16_bytes == pytest.approx((132 * tokens + 256 * residual_length) / (256 * tokens))
    assert int8_cache.nbytes() / bf16_bytes <= 0.53


def test_beam_search_reorders_the_cache():
    model = fused_train.patch(sharp_tiny_model())
    inputs = left_padded([7, 4], seed=5)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **{CACHE: DynamicCache(config=model.config)}, **kwargs)
        got = model.generate(**inputs, **{CACHE: Int8KVCache(model.config)}, **kwargs)
    assert (got == expected).float().mean() >= 0.95


@pytest.mark.parametrize("residual_length", [0, 32])
def test_assisted_decoding_crops_rejected_candidates(reference_path, monkeypatch, residual_length):
    # A different assistant proposes tokens the model rejects; the cache drops them with crop.
    # (9 + 20 tokens: with 32 exact positions, the exact ring holds them all, crops included.)
    crops = []
    monkeypatch.setattr(Int8KVCache, "crop", lambda self, n: crops.append(n) or Cache.crop(self, n), raising=False)
    model = fused_train.patch(sharp_tiny_model())
    assistant = tiny_model("llama", seed=1).eval()
    inputs = left_padded([9], seed=1)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = DequantizedCache(config=model.config, residual_length=residual_length)
        expected = model.generate(**inputs, **{CACHE: reference}, **kwargs)
        cache = Int8KVCache(model.config, residual_length=residual_length)
        got = model.generate(**inputs, **{CACHE: cache}, assistant_model=assistant, **kwargs)
    assert crops, "the assistant's candidates were never rejected"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("residual_length", [0, 4])
def test_crop_then_continue_equals_a_cache_that_never_saw_the_dropped_tokens(residual_length):
    model = fused_train.patch(sharp_tiny_model())
    ids = torch.randint(3, 97, (1, 12))
    cropped = Int8KVCache(model.config, residual_length=residual_length)
    fresh = Int8KVCache(model.config, residual_length=residual_length)
    with torch.no_grad():
        model(input_ids=ids[:, :8], **{CACHE: cropped}, use_cache=True)
        model(input_ids=ids[:, 8:11], **{CACHE: cropped}, use_cache=True)
        cropped.crop(-3)
        assert cropped.get_seq_length() == 8
        got = model(input_ids=ids[:, 8:12], **{CACHE: cropped}, use_cache=True).logits
        model(input_ids=ids[:, :8], **{CACHE: fresh}, use_cache=True)
        expected = model(input_ids=ids[:, 8:12], **{CACHE: fresh}, use_cache=True).logits
    torch.testing.assert_close(got, expected)
    cropped.reset()
    assert cropped.get_seq_length() == 0


def test_a_padding_hole_falls_back_to_the_dequantized_cache():
    # Left padding goes to the int8 kernel; any other mask (here a hole) attends to the
    # dequantized cache through the general path: both give the full-precision cache's logits.
    model = fused_train.patch(sharp_tiny_model())
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 3] = 0
    logits = {}
    for name, cache in (("int8", Int8KVCache(model.config)), ("full", DynamicCache(config=model.config))):
        with torch.no_grad():
            model(input_ids=ids[:, :8], attention_mask=mask[:, :8], **{CACHE: cache}, use_cache=True)
            logits[name] = model(input_ids=ids[:, 8:], attention_mask=mask, **{CACHE: cache}, use_cache=True).logits
    torch.testing.assert_close(logits["int8"], logits["full"], atol=0.15, rtol=0.02)


def test_unpatched_model_is_refused():
    model = sharp_tiny_model()
    with pytest.raises(ValueError, match=r"fused_train.patch\(model\)"):
        greedy(model, Int8KVCache(model.config), left_padded([3]), max_new_tokens=2)


def test_max_cache_len_is_enforced():
    model = fused_train.patch(sharp_tiny_model())
    cache = Int8KVCache(model.config, max_cache_len=8)
    assert cache.nbytes() == 0
    with pytest.raises(ValueError, match="max_cache_len=8"):
        greedy(model, cache, left_padded([6]), max_new_tokens=4)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_cache_len=0), "max_cache_len"),
    (dict(block_tokens=0), "block_tokens"),
    (dict(residual_length=-1), "residual_length"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int8KVCache(tiny_model("llama").config, **kwargs)


def test_exact_ring_keeps_the_last_positions_through_appends_and_crops():
    """The layer's bookkeeping alone: after appends of 1 to 7 tokens (wrapping the ring) and
    crops, positions from exact_from on read their exact values, older ones their int8 ones, and
    the ring always covers at least the last residual_length positions it can."""
    torch.manual_seed(0)
    layer = fused_train.hf.int8_cache.Int8KVLayer(block_tokens=8, residual_length=5)
    exact = torch.empty(2, 3, 0, 16)
    for step, (action, amount) in enumerate([("append", 3), ("append", 1), ("append", 7), ("crop", -2), ("append", 1),
                                             ("crop", -6), ("append", 4), ("append", 2)]):
        if action == "append":
            new = torch.randn(2, 3, amount, 16)
            layer.update(new, new * 2)
            exact = torch.cat([exact, new], dim=2)
        else:
            layer.crop(amount)  # minus the tokens to drop: both transformers conventions take that
            exact = exact[:, :, :amount]
        length = exact.shape[2]
        assert layer.length == length
        assert length - 5 <= layer.exact_from <= length
        expected = dequantize_kv_ref(*quantize_kv_ref(exact), exact.dtype)
        expected[:, :, layer.exact_from :] = exact[:, :, layer.exact_from :]
        assert torch.equal(layer.keys_int8.dequantize(), expected), f"step {step}"
        assert torch.equal(layer.values_int8.dequantize(), expected * 2), f"step {step}"
    # The crop of 6 left no exact position (the ring had lost positions 0-3); appends refill it.
    assert layer.exact_from == layer.length - 5
