"""The engine's prompt logprobs (`SamplingParams.prompt_logprobs`): each prompt token's logprob and
top-k equal log_softmax of an unpatched HF forward of the prompt (float32, the adapter through
peft), whole or prefilled in chunks, with the prefix cache warm, and with max_tokens=0."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fused_train.serving import Engine, SamplingParams
from tests.hf.tiny_models import tiny_model

TOP = 3
# A 1-token prompt (nothing to score), and prompts longer than a page (16) and than a chunk.
LENGTHS_AND_ADAPTERS = [(1, None), (6, "a"), (23, None), (40, "a"), (33, None)]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt_logprobs") / "a"
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(tiny_model("llama"), config).save_pretrained(path)
    return str(path)


@pytest.fixture
def cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read per call by fused_train.ops.dispatch


def _prompts():
    generator = torch.Generator().manual_seed(5)
    system = torch.randint(3, 97, (32,), generator=generator).tolist()  # two full pages the last prompts share
    prompts = [torch.randint(3, 97, (length,), generator=generator).tolist() for length, _ in LENGTHS_AND_ADAPTERS]
    prompts[3][:32] = system
    prompts[4][:32] = system
    return prompts


def _expected(prompt, adapter_dir):
    """log_softmax over the prompt's positions of the unpatched model: row p predicts token p + 1."""
    model = tiny_model("llama").eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _assert_equal_to_hf(output, adapter_dir):
    prompt = output.prompt_token_ids
    assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
    expected = _expected(prompt, adapter_dir)
    for position, (logprob, top) in enumerate(output.prompt_logprobs[1:]):
        assert abs(logprob - float(expected[position, prompt[position + 1]])) < 1e-4, position
        values, ids = expected[position].topk(TOP)
        assert [token for token, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([value for _, value in top]), values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("max_batch_tokens", [1024, 7], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_hf_whole_chunked_and_with_a_warm_prefix_cache(adapter_dir, cpu_path,
                                                                             max_batch_tokens):  # fmt: skip
    prompts = _prompts()
    adapters = [adapter for _, adapter in LENGTHS_AND_ADAPTERS]
    with Engine(tiny_model("llama"), adapters={"a": adapter_dir}, kv_dtype="model", kv_cache_tokens=1024,
                max_batch_tokens=max_batch_tokens) as engine:  # fmt: skip
        plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        warm = engine.generate(prompts, plain, adapters)  # their full pages are in the prefix cache now
        assert all(output.prompt_logprobs is None for output in warm)
        hits = engine.metrics()["prefix_cache_hits"]
        scored = engine.generate(prompts, [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True,
                                                          prompt_logprobs=TOP)] * 4
                                 + [SamplingParams(max_tokens=0, prompt_logprobs=TOP)], adapters)  # fmt: skip
        assert engine.metrics()["prefix_cache_hits"] == hits  # a cached page has no logits: none was read
        assert engine.metrics()["kv_pages_used"] == 0
    for output, adapter, before in zip(scored, adapters, warm):
        _assert_equal_to_hf(output, None if adapter is None else adapter_dir)
    assert [output.token_ids for output in scored[:4]] == [output.token_ids for output in warm[:4]]
    assert scored[4].token_ids == [] and scored[4].finish_reason == "length" and scored[4].text is None


def test_a_request_preempted_after_its_prompt_was_scored_scores_it_once(cpu_path):
    prompts = _prompts()[1:3]  # 6 and 23 tokens: 3 of the 4 pages at first, 5 at their longest
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=TOP)
    with Engine(tiny_model("llama"), kv_dtype="model", kv_cache_tokens=64) as engine:
        outputs = engine.generate(prompts, params)
        assert engine.metrics()["preemptions"] > 0
    for output in outputs:
        _assert_equal_to_hf(output, None)


def test_prompt_logprobs_zero_gives_the_tokens_logprobs_alone(cpu_path):
    prompt = _prompts()[2]
    with Engine(tiny_model("llama"), kv_dtype="model", kv_cache_tokens=512) as engine:
        (output,) = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))
    expected = _expected(prompt, None)
    assert output.prompt_logprobs[0] is None and all(top == [] for _, top in output.prompt_logprobs[1:])
    torch.testing.assert_close(torch.tensor([logprob for logprob, _ in output.prompt_logprobs[1:]]),
                               expected[torch.arange(len(prompt) - 1), prompt[1:]], rtol=0, atol=1e-4)  # fmt: skip


def test_prompt_logprobs_are_validated():
    for value in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=value)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
