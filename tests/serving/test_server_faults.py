"""The server under what users do beyond the plain path (issue 25): an adapter unloaded under
running requests, huge bodies, fuzzed fields, vLLM's extensions that guidellm sends, a tokenizer
that cleans up spaces. Live servers on 127.0.0.1, the `openai` client and raw HTTP."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

from tests.serving.conftest import SERVER_PACKAGES, assert_error

for package in SERVER_PACKAGES:  # skipped where the serve extra or openai is not installed
    pytest.importorskip(package)

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fused_train.serving import SamplingParams  # noqa: E402
from fused_train.serving.engine import ended_output  # noqa: E402
from fused_train.serving.openai_protocol import (  # noqa: E402
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from fused_train.serving.server import _Detokenizer  # noqa: E402

PROMPT = "The cat"
MESSAGES = [{"role": "user", "content": "Hi there"}]


def _wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _draining(url) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.labels["adapter"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "fused_train_adapter_draining_requests" for s in f.samples}  # fmt: skip


def test_unload_under_running_requests_lets_them_finish_and_new_ones_get_404(serve):
    server = serve()
    engine, url = server.engine, f"{server.url}/v1/completions"
    ids = engine.tokenizer(PROMPT)["input_ids"]
    (expected,) = engine.generate([ids], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "c")
    body = {"model": "c", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    plain = []
    thread = threading.Thread(target=lambda: plain.append(httpx.post(url, json=body, timeout=120)))
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as streamed:
        lines = streamed.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]
        thread.start()
        _wait_for(lambda: engine.metrics()["running"] == 2)
        unload = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "c"}, timeout=30)
        assert unload.status_code == 200
        assert_error(httpx.post(url, json=body, timeout=30), 404, "model", "model_not_found")
        assert "c" not in [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]]
        assert _draining(server.url) == {"c": 2}
        events += [line for line in lines if line.startswith("data: ")]
    thread.join(120)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert plain[0].status_code == 200 and plain[0].json()["choices"][0]["text"] == expected.text
    assert _draining(server.url) == {}
    adapters = engine.metrics()["adapters"]
    assert "c" not in adapters["resident"] + adapters["host"] and engine.metrics()["kv_pages_used"] == 0


class _GatedTokenizer:
    """The engine's tokenizer, whose encoding of a text holding "GATE" waits until `opened` is set."""

    def __init__(self, tokenizer):
        self._tokenizer, self.entered, self.opened = tokenizer, threading.Event(), threading.Event()

    def __call__(self, text, *args, **kwargs):
        if "GATE" in text:
            self.entered.set()
            assert self.opened.wait(60)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("path, body", [
    ("completions", {"model": "tiny", "prompt": "GATE", "max_tokens": 2}),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "GATE"}], "max_tokens": 2}),
])  # fmt: skip
def test_tokenizing_runs_off_the_event_loop(serve, monkeypatch, path, body):
    server = serve()
    gated = _GatedTokenizer(server.engine.tokenizer)
    monkeypatch.setattr(server.engine, "tokenizer", gated)
    answers = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{server.url}/v1/{path}", json=body,
                                                                       timeout=60)))  # fmt: skip
    thread.start()
    try:
        assert gated.entered.wait(30)
        # Tokenizing on the loop would hold /health until the gate opens: this would time out.
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        gated.opened.set()
        thread.join(60)
    assert answers[0].status_code == 200


def test_a_body_beyond_the_limit_gets_413(serve):
    server = serve(max_body_bytes=2000)
    url = f"{server.url}/v1/completions"
    assert_error(httpx.post(url, json={"model": "tiny", "prompt": "x" * 2000}, timeout=30), 413,
                  code="request_too_large", match="2000 bytes")  # fmt: skip

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    assert_error(httpx.post(url, content=chunked(), timeout=30), 413, code="request_too_large")
    assert httpx.post(url, json={"model": "tiny", "prompt": "x" * 100, "max_tokens": 1}, timeout=30).status_code == 200


FUZZ_VALUES = [None, True, -1, 0, 2**64, -(2**64), 1.5, "", "\x00", "x", [], [None], {}, {"a": 1}]


def test_fuzzed_fields_get_answers_in_openais_shape_naming_the_field(serve, tiny_adapters):
    server = serve()
    bases = {
        "completions": {"model": "tiny", "prompt": "Hi", "max_tokens": 1},
        "chat/completions": {"model": "tiny", "messages": MESSAGES, "max_tokens": 1},
        "load_lora_adapter": {"lora_name": "fuzz", "lora_path": tiny_adapters["a"]},
        "unload_lora_adapter": {"lora_name": "nope"},
    }
    fields = {"completions": CompletionRequest, "chat/completions": ChatRequest,
              "load_lora_adapter": LoadAdapterRequest, "unload_lora_adapter": UnloadAdapterRequest}  # fmt: skip
    with httpx.Client(base_url=f"{server.url}/v1", timeout=60) as http:
        for path, base in bases.items():
            for field in fields[path].model_fields:
                for value in FUZZ_VALUES:
                    if path == "load_lora_adapter" and field == "lora_name" and value == "x":
                        continue  # a valid name: it would load
                    response = http.post(f"/{path}", json={**base, field: value})
                    where = (path, field, value, response.status_code, response.text[:300])
                    assert response.status_code in (200, 400, 403, 404), where
                    if response.status_code == 200:
                        continue
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}, where
                    if error["code"] == "context_length_exceeded":
                        assert error["param"] in ("prompt", "messages", "max_tokens", "max_completion_tokens"), where
                    elif response.status_code == 404:
                        assert error["param"] in ("model", "lora_name"), where
                    else:
                        assert (error["param"] or "").split(".")[0] == field, where
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    _wait_for(lambda: server.engine.metrics()["kv_pages_used"] == 0)


def test_vllm_extensions_as_guidellm_sends_them(live_server):
    """guidellm streams with `stream_options.continuous_usage_stats` (vLLM's); the other extensions
    are vLLM's `stop_token_ids`, `min_tokens` and `include_stop_str_in_output`."""
    engine = live_server.engine
    ids = engine.tokenizer(PROMPT)["input_ids"]
    (free,) = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "a")
    stop = next(c for c in free.text[2:] if c.isprintable() and c != "\ufffd")
    options = dict(model="a", prompt=PROMPT, max_tokens=8, temperature=0)

    async def send():
        async with live_server.async_client() as client:
            stream = await client.completions.create(
                stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True}, **options)  # fmt: skip
            chunks = [chunk async for chunk in stream]
            chat = await client.chat.completions.create(
                model="a", messages=MESSAGES, max_completion_tokens=4, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
            chat_chunks = [chunk async for chunk in chat]
            included = await client.completions.create(stop=[stop], extra_body={"include_stop_str_in_output": True},
                                                       **options)  # fmt: skip
            stop_id = await client.completions.create(extra_body={"stop_token_ids": [free.token_ids[1]]}, **options)
            held = await client.completions.create(
                extra_body={"stop_token_ids": [free.token_ids[0]], "min_tokens": 2}, **options)  # fmt: skip
            return chunks, chat_chunks, included, stop_id, held

    chunks, chat_chunks, included, stop_id, held = asyncio.run(send())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == free.text
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage.prompt_tokens == len(ids) for c in chunks) and counts == sorted(counts) and counts[-1] == 8
    assert all(c.usage is not None for c in chat_chunks) and chat_chunks[-1].usage.completion_tokens == 4
    assert included.choices[0].text == free.text[: free.text.find(stop) + len(stop)]
    assert included.choices[0].finish_reason == "stop"
    assert stop_id.usage.completion_tokens == 2 and stop_id.choices[0].finish_reason == "stop"
    assert free.token_ids[0] not in engine.generate(
        [ids], SamplingParams(max_tokens=8, temperature=0, min_tokens=2, stop_token_ids=[free.token_ids[0]]), "a"
    )[0].token_ids[:2]  # fmt: skip
    assert held.usage.completion_tokens >= 2


def _spaced_tokenizer():
    """One token per character, with transformers' clean-up of tokenization spaces on (" ," -> ",")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): 3 + i for i in range(95)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)  # fmt: skip


def test_streamed_text_equals_the_final_text_with_a_tokenizer_that_cleans_up_spaces():
    tokenizer = _spaced_tokenizer()
    ids = tokenizer("Hello , world . It 's fine , do n't ?", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Hello, world. It's fine, don't?"  # its own decode cleans up
    request = SimpleNamespace(prompt_token_ids=[], generated=ids, text=None, arrival=0.0, first_scheduled=None,
                              first_token=None)  # fmt: skip
    final = ended_output(request, "r", None, "length", None, 1.0, tokenizer).text  # the engine's RequestOutput.text
    detokenizer = _Detokenizer(tokenizer, ())
    streamed = "".join(detokenizer.push(token_id) for token_id in ids)
    assert streamed == final  # every character final as it comes: nothing left for the end
    assert detokenizer.finish(final) == ""
