"""Logprobs through the live server: each output token's logprob and top-k equal log_softmax of an
unpatched HF forward (float32, the same adapter through peft) over the prompt and the tokens
before it, for completions and chat, streamed and not; with `echo`, the prompt's tokens too.
Every engine output's `mean_logprob` is the mean of those logprobs over its tokens."""

import pytest
import torch

from tests.serving.conftest import SERVER_PACKAGES

for package in SERVER_PACKAGES:
    pytest.importorskip(package)

import openai  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402

from bench.tiny_serving import CHAT_TEMPLATE  # noqa: E402
from fused_train.serving import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def float_server(tiny_model_dir, tiny_adapters, reference_path):
    from tests.serving.conftest import running

    with running(tiny_model_dir, tiny_adapters, kv_dtype="model") as server:
        yield server


def _reference_logprobs(model_dir, adapter_dir, prompt_ids, output_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def test_completion_logprobs_equal_hf(float_server, tiny_model_dir, tiny_adapters):
    tokenizer = float_server.engine.tokenizer
    prompt_ids = tokenizer("The cat")["input_ids"]
    out = float_server.client().completions.create(model="a", prompt=prompt_ids, max_tokens=5, temperature=0.8,
                                                   seed=3, logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    logprobs = out.choices[0].logprobs
    # The byte tokenizer's texts do not give ids back (a lone byte decodes to U+FFFD): the engine's
    # run of the same seeded request does.
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)
    output_ids = float_server.engine.generate(prompt_ids, params, "a")[0].token_ids
    expected = _reference_logprobs(tiny_model_dir, tiny_adapters["a"], prompt_ids, output_ids)
    assert logprobs.tokens == [tokenizer.decode([i]) for i in output_ids]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs), expected[torch.arange(5), output_ids],
                               rtol=0, atol=1e-4)  # fmt: skip
    for position, top in enumerate(logprobs.top_logprobs):
        values, ids = expected[position].topk(3)
        texts = [tokenizer.decode([i]) for i in ids.tolist()]
        assert set(top) == set(texts)  # tokens of the same text share one key, as in OpenAI's shape
        for text, value in top.items():
            assert min(abs(value - float(v)) for t, v in zip(texts, values) if t == text) < 1e-4
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]


def _all_logprobs(model_dir, adapter_dir, token_ids):
    """log_softmax of the unpatched model at every position of `token_ids`: row p predicts token p + 1."""
    # The rows from position 0 on: a prompt of the first token, followed by the rest.
    return _reference_logprobs(model_dir, adapter_dir, token_ids[:1], token_ids[1:])


def test_echo_scores_the_prompt_and_the_completion_as_hf(float_server, tiny_model_dir, tiny_adapters):
    tokenizer = float_server.engine.tokenizer
    prompt = "The cat sat on the mat"
    prompt_ids = tokenizer(prompt)["input_ids"]
    client = float_server.client()
    out = client.completions.create(model="a", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    output_ids = float_server.engine.generate(prompt_ids, greedy, "a")[0].token_ids
    choice, token_ids = out.choices[0], prompt_ids + output_ids
    assert choice.text == prompt + tokenizer.decode(output_ids)
    logprobs = choice.logprobs
    # A special token (the BOS) is no text, as in the echoed text: text_offset indexes that text.
    assert logprobs.tokens == [tokenizer.decode([i], skip_special_tokens=True) for i in token_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = _all_logprobs(tiny_model_dir, tiny_adapters["a"], token_ids)
    chosen = expected[torch.arange(len(token_ids) - 1), token_ids[1:]]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]), chosen, rtol=0, atol=1e-4)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        values, ids = expected[position].topk(2)
        texts = [tokenizer.decode([i]) for i in ids.tolist()]
        assert set(top) == set(texts)
        for text, value in top.items():
            assert min(abs(value - float(v)) for t, v in zip(texts, values) if t == text) < 1e-4
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(token_ids))]
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 3

    # max_tokens 0 (what lm-eval's log-likelihood requests send): the prompt alone, scored.
    alone = client.completions.create(model="a", prompt=prompt_ids, max_tokens=0, logprobs=1, echo=True).choices[0]
    assert alone.text == prompt and alone.finish_reason == "length"
    assert alone.logprobs.tokens == logprobs.tokens[: len(prompt_ids)]
    assert alone.logprobs.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(alone.logprobs.token_logprobs[1:]),
                               torch.tensor(logprobs.token_logprobs[1 : len(prompt_ids)]), rtol=0, atol=1e-4)
    plain = client.completions.create(model="tiny", prompt=[prompt, "Hi"], max_tokens=0, echo=True, n=2)
    assert [c.text for c in plain.choices] == [prompt, prompt, "Hi", "Hi"] and plain.choices[0].logprobs is None
    assert plain.usage.completion_tokens == 0


def test_chat_logprobs_equal_hf(float_server, tiny_model_dir):
    tokenizer = float_server.engine.tokenizer
    messages = [{"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = float_server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                        temperature=0, logprobs=True, top_logprobs=2,
                                                        extra_body={"ignore_eos": True})  # fmt: skip
    content = out.choices[0].logprobs.content
    output_ids = float_server.engine.generate(prompt_ids, SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True))[0].token_ids  # fmt: skip
    assert [entry.token for entry in content] == [tokenizer.decode([i]) for i in output_ids]
    expected = _reference_logprobs(tiny_model_dir, None, prompt_ids, output_ids)
    for position, entry in enumerate(content):
        assert entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - float(expected[position, output_ids[position]])) < 1e-4
        values, ids = expected[position].topk(2)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in ids.tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), values, rtol=0, atol=1e-4)


def test_streamed_logprobs_concatenated_equal_the_answer_not_streamed(float_server):
    client = float_server.client()
    options = dict(model="a", prompt="The cat", max_tokens=8, temperature=0.8, seed=3, n=2, logprobs=3,
                   extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**options)
    streamed = {index: dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[], text="") for index in (0, 1)}
    for chunk in client.completions.create(stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index]["text"] += choice.text
            if choice.logprobs is not None:
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    streamed[choice.index][field] += getattr(choice.logprobs, field)
    for choice in whole.choices:
        assert streamed[choice.index] == dict(choice.logprobs.model_dump(), text=choice.text)

    messages = [{"role": "user", "content": "Hi there"}]
    options = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                   extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**options).choices[0]
    content, text = [], ""
    for chunk in client.chat.completions.create(stream=True, **options):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                content += [entry.model_dump() for entry in choice.logprobs.content]
    assert text == whole.message.content and len(content) == 6
    assert content == [entry.model_dump() for entry in whole.logprobs.content]


def _streamed_completions(client, **options) -> dict:
    """Each choice's streamed text and logprobs fields, concatenated, and the order of its chunks' texts."""
    streamed = {}
    for chunk in client.completions.create(stream=True, **options):
        for choice in chunk.choices:
            got = streamed.setdefault(choice.index, dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[],
                                                         text="", logprobs=None, pieces=[]))  # fmt: skip
            got["text"] += choice.text
            got["pieces"].append(choice.text)
            if choice.logprobs is not None:
                got["logprobs"] = True
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    got[field] += getattr(choice.logprobs, field)
    return streamed


@pytest.mark.parametrize("max_tokens", [4, 0])
def test_streamed_echo_equals_the_answer_not_streamed(float_server, max_tokens):
    """The prompt (and its logprobs) is each choice's first chunk; concatenated, a stream equals the
    answer not streamed, with logprobs and without, several prompts and choices."""
    client = float_server.client()
    options = dict(model="a", prompt=["The cat sat", "Hi"], max_tokens=max_tokens, temperature=0.8, seed=5, n=2,
                   echo=True, extra_body={"ignore_eos": True})  # fmt: skip
    for logprobs in (2, None):
        whole = client.completions.create(**options, logprobs=logprobs)
        streamed = _streamed_completions(client, **options, logprobs=logprobs)
        assert sorted(streamed) == [0, 1, 2, 3]
        for choice in whole.choices:
            got = streamed[choice.index]
            prompt = options["prompt"][choice.index // 2]
            assert got["text"] == choice.text and got["pieces"][0] == prompt
            if logprobs is None:
                assert choice.logprobs is None and got["logprobs"] is None
            else:
                fields = {field: got[field] for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                assert fields == choice.logprobs.model_dump() and fields["token_logprobs"][0] is None


def test_out_of_range_logprobs_are_refused(float_server):
    client = float_server.client()
    for call, param in ((lambda: client.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=21),
                         "logprobs"),
                        (lambda: client.chat.completions.create(model="tiny",
                                                                messages=[{"role": "user", "content": "x"}],
                                                                max_tokens=1, logprobs=True, top_logprobs=21),
                         "top_logprobs")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as error:
            call()
        assert error.value.body["param"] == param and error.value.body["code"] != "unsupported_parameter"


def test_every_output_has_its_mean_logprob_under_the_raw_model(float_server, tiny_model_dir, tiny_adapters):
    # Without logprobs asked, sampled, with a penalty and a bias: the mean is still of the model's own
    # distribution (the quality signal of /metrics), over the tokens the request kept.
    tokenizer = float_server.engine.tokenizer
    prompt_ids = tokenizer("A dog")["input_ids"]
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True, presence_penalty=1.5,
                            logit_bias={40: 5.0})  # fmt: skip
    output = float_server.engine.generate(prompt_ids, params, "b")[0]
    expected = _reference_logprobs(tiny_model_dir, tiny_adapters["b"], prompt_ids, output.token_ids)
    assert output.logprobs is None and len(output.token_ids) == 6
    assert abs(output.mean_logprob - float(expected[torch.arange(6), output.token_ids].mean())) < 1e-4
