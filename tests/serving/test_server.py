"""The OpenAI-compatible server, live on 127.0.0.1, through the real `openai` client and raw HTTP:
its outputs equal the engine's for the same request, and every fault and bad input gets its
documented status and error body while /health stays OK.

Requests run concurrently where they can: the engine batches them, so a test costs a few steps of
the tiny model rather than one run per request."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.serving.conftest import SERVER_PACKAGES, assert_error

for package in SERVER_PACKAGES:  # skipped where the serve extra or openai is not installed
    pytest.importorskip(package)

import httpx  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.tiny_serving import CHAT_TEMPLATE, make_tokenizer  # noqa: E402
from fused_train.serving import SamplingParams  # noqa: E402
from fused_train.serving.server import _Detokenizer  # noqa: E402

MAX_TOKENS = 6
PROMPT = "The cat"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
MODELS = ["tiny", "a", "b", "c"]


def _adapter(model):
    return None if model == "tiny" else model


def _chat_ids(engine, messages, template=CHAT_TEMPLATE):
    tokenizer = engine.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(max_tokens=MAX_TOKENS, **params):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **params)


def _healthy(server, http=httpx):
    response = http.get(f"{server.url}/health", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def _wait_idle(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while (metrics := engine.metrics())["kv_pages_used"] or metrics["running"] or metrics["waiting"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.02)


async def _stream_completion(client, **request):
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **request)
    chunks = [chunk async for chunk in stream]
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


async def _stream_chat(client, **request):
    stream = await client.chat.completions.create(stream=True, **request)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks


def test_every_model_streamed_or_not_equals_the_engine(live_server):
    engine = live_server.engine
    prompt_ids, chat_ids = engine.tokenizer(PROMPT)["input_ids"], _chat_ids(engine, MESSAGES)
    adapters = [_adapter(model) for model in MODELS]
    completions = engine.generate([prompt_ids] * 4, _greedy(), adapters)
    chats = engine.generate([chat_ids] * 4, _greedy(), adapters)
    sampling = dict(temperature=0.8, top_p=0.9, top_k=20)
    seeded = [SamplingParams(max_tokens=MAX_TOKENS, seed=7 + i, **sampling) for i in range(2)]
    sampled = engine.generate([prompt_ids] * 2, seeded, "d")
    assert sampled[0].token_ids != sampled[1].token_ids
    two_prompts = engine.generate([prompt_ids, engine.tokenizer("A dog")["input_ids"]], _greedy(), "a")
    stop = next(c for c in completions[1].text[1:] if c != "\ufffd")  # a whole character the output holds
    (stopped,) = engine.generate([prompt_ids], _greedy(stop=stop), "a")
    assert stopped.finish_reason == "stop" and stop not in stopped.text

    async def send_all():
        async with live_server.async_client() as client:
            options = dict(max_tokens=MAX_TOKENS, temperature=0)
            plain = [client.completions.create(model=m, prompt=PROMPT, **options) for m in MODELS]
            streamed = [_stream_completion(client, model=m, prompt=PROMPT, **options) for m in MODELS]
            chat = [client.chat.completions.create(model=m, messages=MESSAGES, **options) for m in MODELS]
            chat_streamed = [_stream_chat(client, model=m, messages=MESSAGES, **options) for m in MODELS]
            n = client.completions.create(model="d", prompt=PROMPT, max_tokens=MAX_TOKENS, n=2, seed=7,
                                          extra_body={"top_k": 20}, temperature=0.8, top_p=0.9)  # fmt: skip
            batch = client.completions.create(model="a", prompt=[PROMPT, "A dog"], **options)
            stop_plain = client.completions.create(model="a", prompt=PROMPT, stop=[stop], **options)
            stop_streamed = _stream_completion(client, model="a", prompt=PROMPT, stop=stop, **options)
            return await asyncio.gather(*plain, *streamed, *chat, *chat_streamed, n, batch, stop_plain, stop_streamed)

    results = asyncio.run(send_all())
    plain, streamed, chat, chat_streamed, (n, batch, stop_plain, (stop_text, _)) = (
        results[i : i + 4] for i in range(0, 20, 4)
    )
    for model, expected, got, (text, chunks) in zip(MODELS, completions, plain, streamed):
        assert got.model == model and got.object == "text_completion" and got.id.startswith("cmpl-")
        assert got.choices[0].text == expected.text == text, model
        assert got.choices[0].finish_reason == expected.finish_reason == chunks[-2].choices[0].finish_reason
        assert got.usage.prompt_tokens == len(prompt_ids) and got.usage.completion_tokens == len(expected.token_ids)
        assert got.usage.total_tokens == len(prompt_ids) + len(expected.token_ids)
        assert chunks[-1].choices == [] and chunks[-1].usage == got.usage
    for model, expected, got, (text, chunks) in zip(MODELS, chats, chat, chat_streamed):
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == expected.text == text, model
        assert got.usage.prompt_tokens == len(chat_ids)
        assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert [choice.text for choice in n.choices] == [output.text for output in sampled]
    assert [choice.index for choice in n.choices] == [0, 1]
    assert n.usage.prompt_tokens == len(prompt_ids)
    assert [choice.text for choice in batch.choices] == [output.text for output in two_prompts]
    assert batch.usage.prompt_tokens == sum(len(output.prompt_token_ids) for output in two_prompts)
    assert stop_plain.choices[0].text == stop_text == stopped.text and stop_plain.choices[0].finish_reason == "stop"
    _wait_idle(engine)


def test_models_lists_the_base_and_every_adapter(live_server):
    models = {m.id: m for m in live_server.client().models.list().data}
    assert set(models) == {"tiny", "a", "b", "c", "d"}
    assert {m.max_model_len for m in models.values()} == {2048}  # max_position_embeddings, as vLLM shows it
    assert models["tiny"].parent is None and models["tiny"].owned_by == "fused_train"
    for name in "abcd":
        assert models[name].parent == "tiny" and models[name].root == live_server.adapters[name]


def test_64_concurrent_streams_over_4_adapters_equal_each_alone(live_server):
    combos = [(adapter, prompt) for adapter in "abcd" for prompt in ("Once upon", "A dog ran")]

    async def one(client, adapter, prompt):
        text, chunks = await _stream_completion(client, model=adapter, prompt=prompt, max_tokens=MAX_TOKENS,
                                                temperature=0)  # fmt: skip
        return text, chunks[-1].usage.completion_tokens

    async def send():
        async with live_server.async_client() as client:
            alone = [await one(client, *combo) for combo in combos]
            together = await asyncio.gather(*(one(client, *combos[i % len(combos)]) for i in range(64)))
        return alone, together

    alone, together = asyncio.run(send())
    assert len({text for text, _ in alone}) > 4  # the adapters and prompts do change the text
    assert together == [alone[i % len(combos)] for i in range(64)]
    _wait_idle(live_server.engine)


def test_streamed_text_holds_back_incomplete_utf8_and_stop_strings():
    tokenizer = make_tokenizer()
    text = "héllo wörld, 3€ 🙂!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters take several tokens

    def stream(stop):
        detokenizer = _Detokenizer(tokenizer, stop)
        deltas = [detokenizer.push(token_id) for token_id in ids]
        return deltas, detokenizer

    deltas, detokenizer = stream(())
    assert "".join(deltas) + detokenizer.finish(text) == text and not any("\ufffd" in d for d in deltas)
    deltas, detokenizer = stream(("wör", "3€ 🙂?"))
    assert "".join(deltas) == "héllo " and detokenizer.finish("héllo ") == ""
    deltas, _ = stream(("3€ 🙂?",))  # held back while it may become the stop string, released when not
    assert "".join(deltas[:-1]) == "héllo wörld, " and "".join(deltas) == text


BAD_COMPLETIONS = [
    # body, status, param, code, message
    (b'{"model": "tiny", "prompt": ', 400, None, "invalid_json", "not valid JSON"),
    (b"[1, 2]", 400, None, None, "JSON object"),
    ({"prompt": PROMPT}, 400, "model", None, "required"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt", None, ""),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", None, "greater than"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": "4"}, 400, "max_tokens", None, "integer"),
    ({"model": "tiny", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature", None, ""),
    ({"model": "tiny", "prompt": PROMPT, "top_p": 0}, 400, "top_p", None, ""),
    ({"model": "tiny", "prompt": PROMPT, "n": 0}, 400, "n", None, ""),
    ({"model": "tiny", "prompt": PROMPT, "stop": [""]}, 400, "stop", None, "non-empty"),
    ({"model": "tiny", "prompt": PROMPT, "logprobs": 21}, 400, "logprobs", None, "less than"),
    ({"model": "tiny", "prompt": PROMPT, "frequency_penalty": 2.5}, 400, "frequency_penalty", None, "less than"),
    ({"model": "tiny", "prompt": PROMPT, "temprature": 0}, 400, "temprature", "unsupported_parameter", "unknown"),
    ({"model": "nope", "prompt": PROMPT}, 404, "model", "model_not_found", "nope"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 10**6}, 400, "max_tokens", "context_length_exceeded",
     "maximum context length of 2048 tokens"),
    ({"model": "tiny", "prompt": [1] * 2040, "max_tokens": 100}, 400, "prompt", "context_length_exceeded",
     "maximum context length is 2048 tokens"),
    ({"model": "tiny", "prompt": [1, 5, 10**6]}, 400, "prompt", None, "token ids"),
    ({"model": "tiny", "prompt": PROMPT, "seed": 2**64}, 400, "seed", None, ""),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", None, "at most"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", None, "needs echo"),
]  # fmt: skip
BAD_CHATS = [
    ({"model": "tiny", "messages": "hi"}, 400, "messages", None, ""),
    ({"model": "tiny", "messages": []}, 400, "messages", None, ""),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content", None, ""),
    ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None, "needs logprobs"),
    ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter",
     ""),
]  # fmt: skip


def test_bad_requests_get_400_or_404_in_openais_shape_and_health_stays_ok(live_server):
    with httpx.Client(timeout=30) as http:  # one client: making one costs ~0.1 s
        for path, cases in (("completions", BAD_COMPLETIONS), ("chat/completions", BAD_CHATS)):
            for body, status, param, code, match in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                assert_error(http.post(f"{live_server.url}/v1/{path}", content=content), status, param, code, match)
                _healthy(live_server, http)
    # Harmless OpenAI parameters are accepted; a neutral value of an unsupported one changes nothing.
    ok = live_server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2, user="me",
                                                 frequency_penalty=0)  # fmt: skip
    assert ok.usage.completion_tokens >= 1
    assert_error(httpx.get(f"{live_server.url}/v1/nothing", timeout=30), 404, match="Not Found")
    assert live_server.engine.metrics()["kv_pages_used"] == 0


def test_api_key_guards_v1_but_not_health(serve):
    server = serve(api_key="sekret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30)
        assert_error(response, 401, code="invalid_api_key", match="API key")
    assert [m.id for m in server.client().models.list().data][0] == "tiny"
    _healthy(server)


def _copy_adapter(source, target, chat_template=None):
    shutil.copytree(source, target)
    if chat_template is not None:
        with open(os.path.join(target, "chat_template.jinja"), "w") as file:
            file.write(chat_template)
    return str(target)


def test_adapters_load_only_from_under_adapter_dir_as_safetensors(serve, tiny_adapters, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    own_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    custom = _copy_adapter(tiny_adapters["a"], allowed / "custom", own_template)
    pickled = allowed / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(tiny_adapters["a"], "adapter_config.json"), pickled)
    torch.save({}, pickled / "adapter_model.bin")
    outside = _copy_adapter(tiny_adapters["b"], tmp_path / "outside")
    os.symlink(outside, allowed / "link_out")
    server = serve(adapters={}, adapter_dirs=[str(allowed)])

    def load(name, path):
        return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)

    for path in (outside, str(allowed / ".." / "outside"), str(allowed / "link_out")):
        assert_error(load("x", path), 403, "lora_path", match="--adapter-dir")
    assert_error(load("x", str(pickled)), 400, "lora_path", match="pickle")
    assert_error(load("x", str(allowed / "missing")), 400, "lora_path", match="not a directory")
    assert_error(load("tiny", custom), 400, "lora_name", match="exists")
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x"}, timeout=30)
    assert_error(response, 400, "lora_path", match="required")
    assert load("custom", custom).status_code == 200
    assert_error(load("custom", custom), 400, "lora_name", match="exists")
    assert {m.id: m.parent for m in server.client().models.list().data} == {"tiny": None, "custom": "tiny"}

    # The adapter's own chat template shapes its chat prompts.
    chat = server.client().chat.completions.create(model="custom", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                   temperature=0)  # fmt: skip
    expected = server.engine.generate([_chat_ids(server.engine, MESSAGES, own_template)], _greedy(), "custom")[0]
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == len(expected.prompt_token_ids) != len(_chat_ids(server.engine, MESSAGES))

    unload = f"{server.url}/v1/unload_lora_adapter"
    assert httpx.post(unload, json={"lora_name": "custom"}, timeout=30).status_code == 200
    assert_error(httpx.post(unload, json={"lora_name": "custom"}, timeout=30), 404, "lora_name", "model_not_found")
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "custom", "prompt": PROMPT}, timeout=30)
    assert_error(response, 404, "model", "model_not_found")
    _healthy(server)

    closed = serve(adapters={}, adapter_dirs=[])
    response = httpx.post(f"{closed.url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": custom},
                          timeout=30)  # fmt: skip
    assert assert_error(response, 403, "lora_path", match="off")["type"] == "permission_error"


def test_a_client_that_disconnects_cancels_its_request(live_server):
    engine = live_server.engine
    cancelled = engine.metrics()["requests_cancelled"]
    body = {"model": "b", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live_server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert engine.metrics()["kv_pages_used"] > 0
    _wait_idle(engine)
    assert engine.metrics()["requests_cancelled"] == cancelled + 1
    # Not streamed: the client gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/v1/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(30, read=0.5))  # fmt: skip
    _wait_idle(engine)
    assert engine.metrics()["requests_cancelled"] == cancelled + 2
    _healthy(live_server)


def test_a_full_queue_gets_429_with_retry_after(serve):
    server = serve(max_running=1, max_waiting=1)
    url = f"{server.url}/v1/completions"
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as running:
        lines = running.iter_lines()  # held: a dropped iterator closes the response
        next(line for line in lines if line.startswith("data: "))
        short = {"model": "a", "prompt": PROMPT, "max_tokens": 2}
        waiting = threading.Thread(target=httpx.post, args=(url,), kwargs=dict(json=short, timeout=60))
        waiting.start()
        deadline = time.monotonic() + 30
        while server.engine.metrics()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = httpx.post(url, json=short, timeout=30)
        assert_error(response, 429, code="rate_limit_exceeded", match="queue is full")
        assert response.headers["Retry-After"] == "1"
        _healthy(server)
    waiting.join(60)
    _wait_idle(server.engine)


POISON = 258  # the byte 0xff: never in UTF-8 text


def test_a_request_whose_forward_raises_fails_alone_with_500(live_server):
    engine = live_server.engine
    good = [(m, engine.tokenizer(PROMPT)["input_ids"]) for m in ("tiny", "a")]
    expected = engine.generate([ids for _, ids in good], _greedy(), [_adapter(m) for m, _ in good])
    bad_prompt = [1] + [POISON] * 5

    def poisoned(module, args):
        # Only a prefill of the bad prompt holds five: a batch of decodes holds one token per request.
        if (args[0] == POISON).sum() >= 5:
            raise RuntimeError("poisoned input")

    async def send():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
            options = dict(max_tokens=MAX_TOKENS, temperature=0)

            async def streamed(body):
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    return [line async for line in response.aiter_lines() if line]

            return await asyncio.gather(
                *(client.post("/v1/completions", json={"model": m, "prompt": PROMPT, **options}) for m, _ in good),
                client.post("/v1/completions", json={"model": "a", "prompt": bad_prompt, **options}),
                streamed({"model": "tiny", "prompt": bad_prompt, **options}),
            )

    hook = engine.model.model.embed_tokens.register_forward_pre_hook(poisoned)
    try:
        *ok, failed, stream = asyncio.run(send())
    finally:
        hook.remove()
    assert [r.json()["choices"][0]["text"] for r in ok] == [output.text for output in expected]
    error = assert_error(failed, 500, code="request_failed", match="poisoned input")
    assert error["type"] == "server_error"
    assert json.loads(stream[-2].removeprefix("data: "))["error"]["code"] == "request_failed"
    assert stream[-1] == "data: [DONE]"
    _wait_idle(engine)
    _healthy(live_server)


def test_503_while_draining_then_metrics(serve):
    server = serve()
    url = f"{server.url}/v1/completions"
    with httpx.stream("POST", url, json={"model": "c", "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True,
                                         "stream": True}, timeout=60) as running:  # fmt: skip
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        drain = threading.Thread(target=server.engine.shutdown)
        drain.start()
        deadline = time.monotonic() + 30
        while not server.engine._stopping:  # set by shutdown() at once; the drain takes the 11 tokens left
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # The base model: an adapter's name is unknown once the drain has ended (the pool is closed).
        response = httpx.post(url, json={"model": "tiny", "prompt": PROMPT}, timeout=30)
        assert_error(response, 503, code="unavailable", match="shutting down")
        # A load balancer's health check: stop sending here.
        assert_error(httpx.get(f"{server.url}/health", timeout=30), 503, code="unavailable", match="shutting down")
        rest = [line for line in lines if line]
    drain.join(60)
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert families["fused_train_requests_finished"].type == "counter"
    assert value["fused_train_requests_finished_total"] == 1 and value["fused_train_generation_tokens_total"] == 12
    assert value["fused_train_kv_pages_used"] == 0
    assert families["fused_train_prefix_cache_hits"].type == "counter"
    assert value["fused_train_prefix_cache_queries_total"] == value["fused_train_prompt_tokens_total"] > 0
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time"):
        assert value[f"fused_train_{name}_seconds_count"] == 1, name


def test_the_cli_serves_until_terminated(tiny_model_dir, tiny_adapters):
    command = [sys.executable, "-m", "fused_train.cli", "serve", "--model", tiny_model_dir, "--adapter",
               f"a={tiny_adapters['a']}", "--port", "0", "--served-model-name", "tiny", "--max-model-len", "512",
               "--max-body-bytes", "1000", "--no-enable-prefix-caching", "--log-level", "warning",
               "--route", "exp=a:1,tiny:1", "--quality-window", "10"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, lines
            time.sleep(0.1)
        url = next(line for line in lines if "serving" in line).split()[-1]
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 512), ("a", 512), ("exp", 512)]
        response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x" * 1000}, timeout=30)
        assert_error(response, 413, code="request_too_large", match="1000 bytes")
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
