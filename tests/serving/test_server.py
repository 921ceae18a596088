"""The OpenAI-compatible server, live on 127.0.0.1, through the real `openai` client and raw HTTP:
its outputs equal the engine's for the same request, and every fault and bad input gets its
documented status and error body while /health stays OK."""

import pytest

from bench.tiny_serving import CHAT_TEMPLATE
from fused_train.serving import SamplingParams

MAX_TOKENS = 8
PROMPT = "The cat"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _engine_output(server, prompt_ids, adapter, **params):
    params = SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0, **params})
    return server.engine.generate([prompt_ids], params, adapter)[0]


def _chat_ids(server, messages, template=CHAT_TEMPLATE):
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("model", ["tiny", "a", "b", "c"])
def test_completions_and_chat_equal_the_engine_streamed_or_not(live_server, model):
    client = live_server.client()
    adapter = None if model == "tiny" else model
    tokenizer = live_server.engine.tokenizer
    expected = _engine_output(live_server, tokenizer(PROMPT)["input_ids"], adapter)

    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert got.model == model and got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == expected.finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)

    expected = _engine_output(live_server, _chat_ids(live_server, MESSAGES), adapter)
    got = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_models_lists_the_base_and_every_adapter(live_server):
    models = {m.id: m for m in live_server.client().models.list().data}
    assert set(models) == {"tiny", "a", "b", "c", "d"}
    assert models["tiny"].parent is None and models["tiny"].owned_by == "fused_train"
    for name in "abcd":
        assert models[name].parent == "tiny" and models[name].root == live_server.adapters[name]
