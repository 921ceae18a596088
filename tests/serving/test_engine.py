"""The serving engine end to end on a tiny Llama with real peft adapters: every request's tokens
equal running it alone through unpatched peft.

The test of what the kernels compute (greedy equality, model-dtype pages) runs them through the
interpreter on CPU; the others (int8 pages, seeds, preemption, cancellation, failures) run the
engine as a CPU user does, on the PyTorch reference path (`cpu_path`), because the interpreter
makes each step seconds long.
"""

import asyncio
import copy
import os
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig

from fused_train.serving import Engine, PromptTooLong, QueueFull, RequestFailed, SamplingParams
from fused_train.serving.paged_cache import PagedKVCache
from tests.conftest import DEVICE
from tests.hf.tiny_models import tiny_model

ADAPTERS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
    "mlp2": dict(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj"]),
}  # fmt: skip
# Prompt lengths (a 1-token prompt included) and adapters (None: the base model) of the mix.
MIX = [(1, None), (5, "qv4"), (12, "all8"), (3, "mlp2"), (17, "qv4"), (7, None), (2, "all8")]
MAX_TOKENS = 6


def _base():
    return tiny_model("llama").to(DEVICE).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_adapters")
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        get_peft_model(_base(), LoraConfig(init_lora_weights=False, **config)).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def _prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 97, (length,), generator=generator).tolist() for length, _ in MIX]


def _engine(adapter_dirs, **options):
    return Engine(_base(), adapters=adapter_dirs, **{"kv_dtype": "model", "kv_cache_tokens": 512, **options})


def _run_mix(engine, params):
    """The mix, arriving at different steps: the first three, then the rest once the first has
    produced two tokens."""
    prompts = _prompts()
    handles = [engine.add_request(p, params[i], adapter) for i, (p, (_, adapter)) in enumerate(zip(prompts[:3], MIX))]
    stream = iter(handles[0])
    next(stream), next(stream)
    handles += [engine.add_request(p, params[i + 3], adapter) for i, (p, (_, adapter)) in
                enumerate(zip(prompts[3:], MIX[3:]))]  # fmt: skip
    return [handle.result(timeout=300) for handle in handles]


@pytest.fixture
def cpu_path(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read per call by fused_train.ops.dispatch


def _greedy():
    return [SamplingParams(max_tokens=MAX_TOKENS, temperature=0)] * len(MIX)


@pytest.fixture(scope="module")
def greedy_outputs(adapter_dirs):
    with _engine(adapter_dirs) as engine:
        outputs = _run_mix(engine, _greedy())
        assert engine.metrics()["kv_pages_used"] == 0
    return outputs


def test_greedy_mix_equals_each_request_alone_through_peft(adapter_dirs, greedy_outputs):
    for prompt, (_, adapter), output in zip(_prompts(), MIX, greedy_outputs):
        model = _base() if adapter is None else PeftModel.from_pretrained(_base(), adapter_dirs[adapter]).eval()
        with torch.no_grad():
            expected = model.generate(input_ids=torch.tensor([prompt], device=DEVICE), max_new_tokens=MAX_TOKENS,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        assert output.token_ids == expected, (adapter, len(prompt))
        assert output.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert output.adapter == adapter and output.prompt_token_ids == prompt
        assert output.time_to_first_token >= output.queue_time >= 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(adapter_dirs, cpu_path):
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, top_k=20, seed=seed)
              for seed in range(len(MIX))]
    with _engine(adapter_dirs) as engine:
        mixed = _run_mix(engine, params)
        alone = [engine.generate([prompt], params[i], adapter)[0] for i, (prompt, (_, adapter)) in
                 enumerate(zip(_prompts(), MIX))]  # fmt: skip
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in mixed}) > 1


def _agreement(outputs, expected) -> float:
    """The share of tokens equal, each request compared up to its first difference (after it, the two
    continue different texts)."""
    agree = total = 0
    for got, wanted in zip(outputs, expected):
        for a, b in zip(got, wanted):
            total += 1
            agree += a == b
            if a != b:
                break
    return agree / total


def test_int8_pages_agree_with_model_dtype_pages(adapter_dirs, greedy_outputs, cpu_path):
    with _engine(adapter_dirs, kv_dtype="int8") as engine:
        outputs = _run_mix(engine, _greedy())
        assert engine.metrics()["kv_pages_used"] == 0
    assert _agreement([o.token_ids for o in outputs], [o.token_ids for o in greedy_outputs]) >= 0.95


def test_a_pool_too_small_preempts_and_every_request_finishes_the_same(adapter_dirs, cpu_path, greedy_outputs):
    # 3 pages of 16 tokens, the mix arriving at once: the first three are admitted (a page each), and
    # the 12-token one needs a fourth page at its 17th token while the other two still run.
    with _engine(adapter_dirs, kv_cache_tokens=48) as engine:
        outputs = engine.generate(_prompts(), _greedy(), [adapter for _, adapter in MIX])
        metrics = engine.metrics()
    assert metrics["preemptions"] > 0 and metrics["kv_pages_used"] == 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in greedy_outputs]


def test_kv_bytes_per_token_against_bfloat16():
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=1, intermediate_size=64, vocab_size=32)  # fmt: skip
    bf16_per_token = 2 * 8 * 128 * 2  # keys and values, 8 kv heads of 128, 2 bytes
    for context, bound in ((512, 0.6), (4096, 0.53)):
        pages = -(-context // 16)
        cache = PagedKVCache(config, pages, 16, "int8", torch.bfloat16, "cpu")
        assert cache.nbytes() <= bound * context * bf16_per_token, context


def test_cancel_stream_stop_ids_and_a_full_queue(adapter_dirs, cpu_path):
    with _engine(adapter_dirs, max_running=1, max_waiting=2) as engine:
        long = engine.add_request([5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        next(iter(long))  # running now; the next two wait behind it (one sequence per step)
        waiting = [engine.add_request([8, 9], SamplingParams(max_tokens=3, temperature=0), "qv4") for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.add_request([4], SamplingParams(max_tokens=3))
        long.cancel()
        assert long.result(timeout=60).finish_reason == "cancelled"
        first, second = (handle.result(timeout=300) for handle in waiting)
        assert first.token_ids == second.token_ids and first.finish_reason in ("length", "stop")

        async def streamed():
            handle = engine.add_request([8, 9], SamplingParams(max_tokens=3, temperature=0), "qv4")
            return [token async for token in handle.stream()]

        assert asyncio.run(streamed()) == first.token_ids
        stopped = engine.generate([[8, 9]], SamplingParams(max_tokens=3, temperature=0,
                                                           stop_token_ids=[first.token_ids[0]]), "qv4")[0]  # fmt: skip
        assert stopped.token_ids == first.token_ids[:1] and stopped.finish_reason == "stop"
        with pytest.raises(ValueError, match="unknown adapter"):
            engine.add_request([8, 9], adapter="nope")
        assert engine.metrics()["kv_pages_used"] == 0


def test_waiting_for_the_end_wakes_its_asyncio_loop_once_and_raises_for_a_failure(adapter_dirs, cpu_path):
    """`wait()` (how the server awaits an answer not streamed) is woken at the end alone: a wake-up
    per token costs the loop thread's steps."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def wait_counting_wakes(engine, prompt):
        loop, wakes = asyncio.get_running_loop(), []
        call_soon_threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: wakes.append(args) or call_soon_threadsafe(*args)
        handle = engine.add_request(prompt, params, "qv4")
        output = await handle.wait()
        return output, len(wakes), await handle.wait()

    with _engine(adapter_dirs) as engine:
        (expected,) = engine.generate([[5, 6, 7]], params, "qv4")
        output, wakes, again = asyncio.run(wait_counting_wakes(engine, [5, 6, 7]))
        assert output.token_ids == expected.token_ids and len(output.token_ids) == 12 and again is output
        assert wakes == 1

        def poisoned(module, args):
            if (args[0] == 96).any():
                raise RuntimeError("poisoned input")

        engine.model.model.embed_tokens.register_forward_pre_hook(poisoned)
        with pytest.raises(RequestFailed, match="poisoned input"):
            asyncio.run(wait_counting_wakes(engine, [8, 96]))


def test_a_request_whose_adapter_breaks_fails_alone(adapter_dirs, cpu_path, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(adapter_dirs["qv4"]):
        (broken / name).write_bytes((tmp_path / ".." / adapter_dirs["qv4"] / name).read_bytes())
    # One adapter in host memory at a time: "broken" is read from its directory again when needed.
    with Engine(_base(), adapters={"broken": str(broken), "mlp2": adapter_dirs["mlp2"]}, kv_dtype="model",
                kv_cache_tokens=256, max_cpu_loras=1, max_loras=1) as engine:  # fmt: skip
        weights = broken / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated on disk
        params = SamplingParams(max_tokens=3, temperature=0)
        good, bad, base = (engine.add_request([5, 6], params, adapter) for adapter in ("mlp2", "broken", None))
        with pytest.raises(RequestFailed, match="broken"):
            list(bad)
        assert bad.result().finish_reason == "error"
        assert len(good.result(timeout=300).token_ids) == 3 and len(base.result(timeout=300).token_ids) == 3
        assert engine.metrics()["kv_pages_used"] == 0


def _char_tokenizer():
    """A character-level tokenizer over the tiny model's 97 ids: `<pad>`, `<s>`, `</s>`, then 90 characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): 3 + i for i in range(90)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_text_prompts_text_outputs_and_stop_strings(cpu_path):
    tokenizer = _char_tokenizer()
    with Engine(_base(), tokenizer, kv_dtype="model", kv_cache_tokens=256) as engine:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        (free,) = engine.generate("hello world", params)
        assert free.prompt_token_ids == tokenizer("hello world")["input_ids"]
        assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=True) and len(free.text) >= 4
        stop = free.text[2:4]
        (stopped,) = engine.generate("hello world", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                   stop=stop))  # fmt: skip
        cut = free.text.find(stop)
        assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
        assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    with pytest.raises(ValueError, match="tokenizer"):
        with Engine(_base(), kv_dtype="model", kv_cache_tokens=64) as engine:
            engine.add_request("text without a tokenizer")


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma2", "phi3"])
def test_sliding_windows_and_softcapping_equal_generate(model_type, cpu_path):
    # Windows of 6-9 tokens (tests/hf/tiny_models.py) against prompts of up to 17 + 6 tokens.
    reference = tiny_model(model_type).to(DEVICE).eval()
    with Engine(copy.deepcopy(reference), kv_dtype="model", kv_cache_tokens=256) as engine:
        outputs = engine.generate(_prompts(), SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, output in zip(_prompts(), outputs):
        with torch.no_grad():
            expected = reference.generate(input_ids=torch.tensor([prompt], device=DEVICE), max_new_tokens=MAX_TOKENS,
                                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        assert output.token_ids == expected, len(prompt)


def test_a_request_whose_forward_raises_fails_alone(adapter_dirs, cpu_path):
    poison = 96

    def poisoned(module, args):
        # Only the bad prompt's prefill holds three: a step's decodes hold one token per request.
        if (args[0] == poison).sum() >= 3:
            raise RuntimeError("poisoned input")

    params = SamplingParams(max_tokens=4, temperature=0)
    with _engine(adapter_dirs) as engine:
        (expected,) = engine.generate([[5, 6, 7]], params, "qv4")
        engine.model.model.embed_tokens.register_forward_pre_hook(poisoned)
        good = engine.add_request([5, 6, 7], params, "qv4")
        next(iter(good))  # decoding now: the bad prefill joins its next step
        bad = engine.add_request([8, poison, poison, poison], params)
        with pytest.raises(RequestFailed, match="poisoned input"):
            list(bad)
        assert good.result(timeout=300).token_ids == expected.token_ids
        assert engine.metrics()["kv_pages_used"] == 0


def test_a_cancelled_async_consumer_leaves_the_engine_running(adapter_dirs, cpu_path):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    with _engine(adapter_dirs) as engine:
        (expected,) = engine.generate([[5, 6, 7]], greedy, "qv4")
        handle = engine.add_request([5, 6, 7], SamplingParams(max_tokens=250, temperature=0, ignore_eos=True))

        async def consume():
            async for _ in handle.stream():
                pass

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(asyncio.wait_for(consume(), 0.05))  # cancelled while waiting, then its loop closes
        # The request goes on, its tokens published to nobody; the engine serves the others.
        assert handle.result(timeout=300).finish_reason == "length"
        assert engine.generate([[5, 6, 7]], greedy, "qv4")[0].token_ids == expected.token_ids
        assert engine.metrics()["kv_pages_used"] == 0


def _running(engine, prompt, params, adapter):
    """A request that has produced two tokens: running, with most of its tokens to come."""
    handle = engine.add_request(prompt, params, adapter)
    tokens = iter(handle)
    next(tokens), next(tokens)
    return handle


def test_a_request_keeps_the_adapter_version_it_started_with(adapter_dirs, cpu_path):
    prompt, params = [5, 6, 7], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    with Engine(_base(), adapters={"x": adapter_dirs["qv4"]}, kv_dtype="model", kv_cache_tokens=512) as engine:
        (old,) = engine.generate([prompt], params, "x")
        handle = _running(engine, prompt, params, "x")
        engine.unload_adapter("x")
        engine.load_adapter("x", adapter_dirs["all8"])  # the same name, other weights
        assert not handle.done()
        (new,) = engine.generate([prompt], params, "x")  # alongside the running one: both versions in its steps
        assert new.token_ids != old.token_ids
        assert handle.result(timeout=300).token_ids == old.token_ids
        metrics = engine.metrics()
        assert metrics["adapters"]["draining"] == {} and metrics["adapters"]["resident"] == ["x"]
        assert metrics["kv_pages_used"] == 0


def test_unload_waits_for_the_running_requests_of_the_adapter(adapter_dirs, cpu_path):
    prompt, params = [5, 6, 7], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    with _engine(adapter_dirs) as engine:
        (alone,) = engine.generate([prompt], params, "all8")
        handle = _running(engine, prompt, params, "all8")
        engine.unload_adapter("all8")
        assert "all8" not in engine.adapters() and engine.metrics()["adapters"]["draining"] == {"all8": 1}
        with pytest.raises(ValueError, match="unknown adapter 'all8'"):
            engine.add_request(prompt, params, "all8")
        output = handle.result(timeout=300)
        assert output.finish_reason == "length" and output.token_ids == alone.token_ids and output.adapter == "all8"
        adapters = engine.metrics()["adapters"]
        assert adapters["draining"] == {} and "all8" not in adapters["resident"] + adapters["host"]


def test_prompt_and_max_tokens_are_held_to_the_context_length(cpu_path):
    assert _base().config.max_position_embeddings == 256
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(_base(), kv_dtype="model", kv_cache_tokens=64, max_model_len=257)
    with Engine(_base(), kv_dtype="model", kv_cache_tokens=1024) as engine:
        assert engine.max_model_len == 256
        with pytest.raises(PromptTooLong, match="maximum context length is 256 tokens.*250 in the prompt"):
            engine.add_request([5] * 250, SamplingParams(max_tokens=7))
        assert len(engine.generate([[5] * 250], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids) == 6
    with Engine(_base(), kv_dtype="model", kv_cache_tokens=64, max_model_len=32) as engine:
        with pytest.raises(PromptTooLong, match="maximum context length is 32 tokens"):
            engine.add_request([5] * 30, SamplingParams(max_tokens=3))


def test_min_tokens_holds_back_the_stop_tokens(adapter_dirs, cpu_path):
    with _engine(adapter_dirs) as engine:
        (free,) = engine.generate([[8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        stop_id = free.token_ids[0]
        params = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_id], min_tokens=3)
        (held,) = engine.generate([[8, 9]], params)
        assert stop_id not in held.token_ids[:3] and len(held.token_ids) >= 3
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)


def test_requests_of_a_running_adapter_overtake_one_waiting_for_a_slot(adapter_dirs, cpu_path):
    # The head-of-line case: two slots, long requests on qv4 and all8, then one for mlp2 (no slot),
    # then three short ones for qv4: these end while the long ones run, and every request's tokens
    # are those it gets alone.
    prompts = _prompts()
    long_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    short_params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    requests = [(prompts[0], long_params, "qv4"), (prompts[1], long_params, "all8"), (prompts[2], short_params, "mlp2")]
    requests += [(prompt, short_params, "qv4") for prompt in prompts[3:6]]
    with _engine(adapter_dirs, max_loras=2) as engine:
        longs = [engine.add_request(*request) for request in requests[:2]]
        for handle in longs:
            next(iter(handle))
        others = [engine.add_request(*request) for request in requests[2:]]
        shorts = [handle.result(timeout=60) for handle in others[1:]]
        assert not any(handle.done() for handle in longs)
        mixed = [handle.result(timeout=60) for handle in longs + others]
        alone = [engine.generate([prompt], params, adapter)[0] for prompt, params, adapter in requests]
        assert engine.metrics()["kv_pages_used"] == 0
    assert [len(output.token_ids) for output in shorts] == [2, 2, 2]
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone]


def _shared_prefix_prompts():
    """Four prompts on one 40-token system prompt (two full pages of 16, then a partial one)."""
    generator = torch.Generator().manual_seed(5)
    system = torch.randint(3, 97, (40,), generator=generator).tolist()
    return [system + torch.randint(3, 97, (n,), generator=generator).tolist() for n in (3, 9, 1, 20)]


def test_prefix_cache_shares_a_system_prompt_per_adapter_with_equal_outputs(adapter_dirs, cpu_path):
    prompts, params = _shared_prefix_prompts(), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    adapters = [None, "qv4", "qv4", None]  # the same tokens under two adapters share nothing
    outputs, metrics = {}, {}
    for caching in (False, True):
        with _engine(adapter_dirs, enable_prefix_caching=caching) as engine:
            first = engine.generate([prompts[0], prompts[1]], params, adapters[:2])  # one per adapter: no hits
            assert engine.metrics()["prefix_cache_hits"] == 0
            outputs[caching] = first + engine.generate(prompts[2:], params, adapters[2:])
            metrics[caching] = engine.metrics()
    assert [o.token_ids for o in outputs[True]] == [o.token_ids for o in outputs[False]]
    # Each later prompt found its adapter's two full system pages (32 tokens) and computed only the rest.
    assert metrics[True]["prefix_cache_hits"] == 2 * 32 and metrics[False]["prefix_cache_hits"] == 0
    assert metrics[True]["prefix_cache_queries"] == sum(map(len, prompts))
    assert metrics[True]["kv_pages_used"] == 0 and metrics[True]["kv_pages_cached"] > 0


def test_a_prompt_longer_than_max_batch_tokens_is_prefilled_in_chunks_with_equal_tokens(adapter_dirs, cpu_path):
    generator = torch.Generator().manual_seed(6)
    long_prompt = torch.randint(3, 97, (90,), generator=generator).tolist()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with _engine(adapter_dirs, enable_prefix_caching=False) as engine:
        whole = engine.generate([long_prompt, _prompts()[1]], params, ["all8", "qv4"])
    with _engine(adapter_dirs, max_batch_tokens=16, enable_prefix_caching=False) as engine:
        decoding = engine.add_request(_prompts()[1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                      "qv4")  # fmt: skip
        next(iter(decoding))
        chunked = engine.generate([long_prompt], params, "all8")
        assert not decoding.done()  # it decoded through the chunks' steps
        assert decoding.result(timeout=60).token_ids[:6] == whole[1].token_ids
        steps = engine.metrics()["steps"]
    assert chunked[0].token_ids == whole[0].token_ids
    assert steps >= 90 // 16


def test_int8_pages_cached_and_chunked_agree_with_one_exact_prefill(adapter_dirs, cpu_path):
    # Int8 pages: a prefill after cached pages or earlier chunks reads that context quantized, where a
    # prefill in one step attends to its exact keys; the tokens still agree as int8 decoding does.
    prompts, params = _shared_prefix_prompts(), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    runs = {}
    for name, options in (("whole", dict(enable_prefix_caching=False)), ("cached", dict(max_batch_tokens=24))):
        with _engine(adapter_dirs, kv_dtype="int8", **options) as engine:
            runs[name] = [engine.generate([prompt], params, "all8")[0].token_ids for prompt in prompts]
            runs[name + "_hits"] = engine.metrics()["prefix_cache_hits"]
    assert runs["cached_hits"] == 3 * 32 and runs["whole_hits"] == 0
    assert _agreement(runs["cached"], runs["whole"]) >= 0.95


def test_requests_without_response_format_need_no_grammar_package(monkeypatch, cpu_path):
    """xgrammar is the serve extra's: an engine without it serves plain requests and refuses a
    response_format with a ValueError that says what to install."""
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    tokenizer = _char_tokenizer()
    with Engine(_base(), tokenizer, kv_dtype="model", kv_cache_tokens=256) as engine:
        (plain,) = engine.generate("hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert plain.finish_reason == "length" and len(plain.token_ids) == 4
        with pytest.raises(ValueError, match=r"fused_train\[serve\]"):
            engine.add_request("hello", SamplingParams(max_tokens=4, response_format={"type": "json_object"}))
