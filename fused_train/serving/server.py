"""An OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn).

    app = build_app(engine, model_name="tiny", adapter_dirs=["/srv/adapters"], api_key="secret")
    with start_server(app, port=8000) as server:  # uvicorn in a background thread
        print(server.url)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` as server-sent
events ending with `data: [DONE]`), `GET /v1/models`, `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`, `GET /health`, `GET /metrics` (Prometheus text). The request's
`model` is the base model's name or an adapter's (vLLM's and LoRAX's convention), or a route's
(`routes`, `routing.Route`): an alias whose requests are split between adapters by weight, sticky
by the body's `user`; the response's `model` names the arm that served it.

/metrics holds the engine's `metrics()`, latency histograms, requests per route and arm, and each
model's rolling quality signals with their drift (`quality.QualityMonitor`): the mean output-token
logprob, output length and finish-reason shares of its last requests, and `fused_train_drift`, the
Kolmogorov-Smirnov statistic between those requests' mean logprobs and a reference window's.

The app uses only this much of the engine, so another engine (a naive baseline, a Ray proxy) can
stand in: `tokenizer` (the server tokenizes, applies chat templates and detokenizes),
`add_request(prompt_token_ids, params, adapter, request_id)` returning a handle with `stream()`,
`result(timeout)` and `cancel()` (or an awaitable of that handle: a remote engine's, once queued
there), `adapters()`, `load_adapter(name, path)`, `unload_adapter(name)` and `metrics()`; and, where
it has them, `max_model_len` (shown by `/v1/models`) and `accepting` (False: `/health` answers 503).

Tokenizing and applying chat templates run in a worker thread, never on the event loop: one long
prompt does not stall the other streams or `/health`. A body beyond `max_body_bytes` gets 413.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (`openai_protocol`,
with the request bodies); a stream that fails after its first event ends, as vLLM's do, with a
`data: {"error": ...}` event, then `data: [DONE]`. A parameter that would change the output and
that the engine does not have is refused (400 naming it), never ignored.
"""

import asyncio
import hmac
import inspect
import itertools
import json
import os
import threading
import time
import uuid

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fused_train.serving.quality import QualityMonitor
from fused_train.serving.requests import RequestFailed, SamplingParams, decode_text
from fused_train.serving.routing import validate_routes
from fused_train.serving.openai_protocol import (
    CHAT_MAX_TOKENS, COMPLETION_MAX_TOKENS, MAX_BODY_BYTES, APIError, ChatMessage, ChatRequest, CompletionRequest,
    LoadAdapterRequest, UnloadAdapterRequest, engine_error, parse_body, refuse_unsupported, sampling_params, usage,
)  # fmt: skip

__all__ = ["RunningServer", "build_app", "start_server"]

# Engine totals exported as counters (the rest of `metrics()` are gauges: the state now).
COUNTERS = frozenset({
    "requests_finished", "requests_cancelled", "requests_failed", "prompt_tokens", "generation_tokens", "steps",
    "step_tokens", "step_seconds", "preemptions", "prefix_cache_queries", "prefix_cache_hits", "adapters_hits",
    "adapters_loads", "adapters_evictions",
    "adapters_disk_reads", "adapters_cpu_evictions", "adapters_load_ms",
})  # fmt: skip
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


# ---------------------------------------------------------------- streaming text


class _Detokenizer:
    """A choice's text as its tokens arrive, released only once final: never the tail of an
    incomplete UTF-8 sequence (the decoder shows U+FFFD there until it completes), never a stop
    string or the start of one. The engine's final `RequestOutput.text` has the last word; both
    decode as `decode_text` does, so each decode extends the text already sent."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = decode_text(self.tokenizer, self.token_ids)
        end = len(text.rstrip("\ufffd"))
        for stop in self.stop:
            found = text.find(stop)
            if found >= 0:
                end = min(end, found)
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : end], text[:end]
        return delta

    def finish(self, text: str) -> str:
        return text[len(self.sent) :] if text.startswith(self.sent) else ""


# ---------------------------------------------------------------- metrics


class _EngineCollector:
    """The engine's `metrics()` read at scrape time: totals as counters, the rest as gauges (a
    nested dict's numbers prefixed by its key, a list as its length)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        metrics = self.engine.metrics()
        draining = (metrics.get("adapters") or {}).get("draining")
        for name, value in sorted(_flatten(metrics).items()):
            family = CounterMetricFamily if name in COUNTERS else GaugeMetricFamily
            yield family(f"fused_train_{name}", f"engine metrics()[{name!r}]", value=value)
        if isinstance(draining, dict):
            family = GaugeMetricFamily("fused_train_adapter_draining_requests",
                                       "running requests of an unloaded adapter, which is freed when they end",
                                       labels=["adapter"])  # fmt: skip
            for adapter, count in sorted(draining.items()):
                family.add_metric([adapter], count)
            yield family


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}_"))
        elif isinstance(value, (list, tuple)):
            flat[name] = len(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class _QualityCollector:
    """Each model's rolling quality signals (`QualityMonitor.snapshot`) read at scrape time, as
    gauges labelled by `adapter` (the base model by its served name)."""

    def __init__(self, monitor: QualityMonitor):
        self.monitor = monitor

    def collect(self):
        window = self.monitor.window
        families = {
            "requests": GaugeMetricFamily("fused_train_quality_window_requests",
                                          f"completed requests in the window (the last {window})", labels=["adapter"]),
            "mean_logprob": GaugeMetricFamily("fused_train_quality_mean_logprob",
                                              "mean over the window's requests of their mean output-token logprob",
                                              labels=["adapter"]),
            "output_tokens": GaugeMetricFamily("fused_train_quality_output_tokens",
                                               "mean output tokens of the window's requests", labels=["adapter"]),
            "finish_reasons": GaugeMetricFamily("fused_train_quality_finish_reason_ratio",
                                                "share of the window's requests that ended with this reason",
                                                labels=["adapter", "reason"]),
            "drift": GaugeMetricFamily("fused_train_drift",
                                       f"Kolmogorov-Smirnov statistic between the mean output logprobs of the last "
                                       f"{window} requests and of the first {window} after load", labels=["adapter"]),
        }  # fmt: skip
        for adapter, signals in self.monitor.snapshot().items():
            for key, family in families.items():
                value = signals[key]
                if key == "finish_reasons":
                    for reason, share in value.items():
                        family.add_metric([adapter, reason], share)
                elif value is not None:
                    family.add_metric([adapter], value)
        yield from families.values()


class _Metrics:
    def __init__(self, engine, quality: QualityMonitor, routes: dict):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.registry.register(_QualityCollector(quality))
        self.route_requests = Counter("fused_train_route_requests", "requests to a route, by the arm chosen for them",
                                      ["route", "arm"], registry=self.registry)  # fmt: skip
        for route in routes.values():  # every arm shows from the start, at 0
            for arm, _ in route.arms:
                self.route_requests.labels(route.name, arm)

        def histogram(name, what):
            return Histogram(f"fused_train_{name}_seconds", what, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token", "arrival to first token, per request")
        self.tpot = histogram("time_per_output_token", "(last token - first token) / (tokens - 1), per request")
        self.e2e = histogram("e2e_request_latency", "arrival to end, per request")
        self.queue = histogram("request_queue_time", "arrival to first scheduled, per request")

    def observe(self, output) -> None:
        for histogram, value in ((self.ttft, output.time_to_first_token), (self.tpot, output.time_per_output_token),
                                 (self.e2e, output.latency), (self.queue, output.queue_time)):  # fmt: skip
            if value is not None:
                histogram.observe(value)


# ---------------------------------------------------------------- the app


def _read_chat_template(path: str) -> str | None:
    """An adapter directory's own chat template (chat_template.jinja, or tokenizer_config.json's), if any."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as file:
            return file.read()
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as file:
            template = json.load(file).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


class _Server:
    """The app's state and request handling (the routes are thin wrappers in `build_app`)."""

    def __init__(self, engine, model_name, adapter_dirs, adapter_paths, max_body_bytes, routes, quality_window):
        self.engine, self.model_name, self.max_body_bytes = engine, model_name, max_body_bytes
        self.adapter_dirs = [os.path.realpath(d) for d in adapter_dirs]
        self.adapter_paths = dict(adapter_paths or {})
        self.templates = {name: _read_chat_template(path) for name, path in self.adapter_paths.items()}
        self.routes = validate_routes(routes, model_name, engine.adapters())
        self.quality = QualityMonitor(quality_window)
        self.metrics = _Metrics(engine, self.quality, self.routes)
        self.created = int(time.time())

    # -- models

    def adapter_for(self, model: str, user: str | None) -> str | None:
        """The adapter (None: the base model) that serves a request for `model`: a route's arm
        for `user`, or `model` itself."""
        route = self.routes.get(model)
        if route is not None:
            model = route.choose(user)
            self.metrics.route_requests.labels(route.name, model).inc()
        if model == self.model_name:
            return None
        if model in self.engine.adapters():
            return model
        raise APIError(404, f"the model {model!r} does not exist; see GET /v1/models", param="model",
                       code="model_not_found")  # fmt: skip

    def observe(self, output) -> None:
        self.metrics.observe(output)
        self.quality.observe(self.model_name if output.adapter is None else output.adapter, output)

    def models(self) -> dict:
        max_model_len = getattr(self.engine, "max_model_len", None)

        def card(name, root, parent):
            card = {"id": name, "object": "model", "created": self.created, "owned_by": "fused_train", "root": root,
                    "parent": parent}  # fmt: skip
            return card if max_model_len is None else {**card, "max_model_len": max_model_len}

        cards = [card(self.model_name, self.model_name, None)]
        cards += [card(name, self.adapter_paths.get(name, name), self.model_name) for name in self.engine.adapters()]
        # A route is a model clients may ask for: listed with its arms' weights.
        cards += [{**card(name, self.model_name, None), "route": dict(route.arms)}
                  for name, route in self.routes.items()]  # fmt: skip
        return {"object": "list", "data": cards}

    # -- adapters at run time

    async def load_adapter(self, body: LoadAdapterRequest) -> dict:
        if not self.adapter_dirs:
            raise APIError(403, "loading adapters at run time is off: start the server with --adapter-dir DIR",
                           type="permission_error", param="lora_path")  # fmt: skip
        path = os.path.realpath(body.lora_path)
        if not any(os.path.commonpath([path, root]) == root for root in self.adapter_dirs):
            raise APIError(403, f"lora_path {body.lora_path!r} is not under an --adapter-dir of this server",
                           type="permission_error", param="lora_path")  # fmt: skip
        if body.lora_name in (self.model_name, *self.routes) or body.lora_name in self.engine.adapters():
            raise APIError(400, f"the model {body.lora_name!r} exists already", param="lora_name")
        try:
            await run_in_threadpool(self.engine.load_adapter, body.lora_name, path)
        except ValueError as error:
            raise APIError(400, str(error), param="lora_path") from error
        self.quality.reset(body.lora_name)  # its quality is a new adapter's: a new reference window
        self.adapter_paths[body.lora_name] = path
        self.templates[body.lora_name] = _read_chat_template(path)
        return {"status": "ok", "lora_name": body.lora_name}

    async def unload_adapter(self, body: UnloadAdapterRequest) -> dict:
        if body.lora_name not in self.engine.adapters():
            raise APIError(404, f"no adapter {body.lora_name!r} is loaded", param="lora_name", code="model_not_found")
        routes = [name for name, route in self.routes.items() if body.lora_name in dict(route.arms)]
        if routes:
            raise APIError(400, f"the adapter {body.lora_name!r} is an arm of the route(s) {routes} of this server: "
                           "their requests for it would fail", param="lora_name")  # fmt: skip
        try:
            await run_in_threadpool(self.engine.unload_adapter, body.lora_name)
        except ValueError as error:  # unloaded meanwhile
            raise APIError(404, str(error), param="lora_name", code="model_not_found") from error
        self.adapter_paths.pop(body.lora_name, None)
        self.templates.pop(body.lora_name, None)
        self.quality.reset(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}

    # -- generation

    def encode_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        tokenizer = self.engine.tokenizer
        return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompt]

    def encode_chat(self, messages: list[ChatMessage], adapter: str | None) -> list[int]:
        tokenizer = self.engine.tokenizer
        template = self.templates.get(adapter) if adapter is not None else None
        if template is None and tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        plain = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.text for part in content)
            plain.append({"role": message.role, "content": content or ""})
        try:
            text = tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a template's raise_exception (e.g. roles out of turn)
            raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from error
        # The template writes the special tokens (BOS) itself.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams], adapter, request_id: str,
                     param: str):  # fmt: skip
        """Engine handles, prompt-major then choice (OpenAI's choice index order); all or none."""
        handles = []
        try:
            for i, prompt_ids in enumerate(prompts):
                for j, choice_params in enumerate(params):
                    handle = self.engine.add_request(prompt_ids, choice_params, adapter, f"{request_id}-{i}-{j}")
                    if inspect.isawaitable(handle):  # a remote engine (the Ray proxy) answers once queued
                        handle = await handle
                    handles.append(handle)
        except BaseException as error:
            for handle in handles:
                handle.cancel()
            raise engine_error(error, param) from error
        return handles

    async def generate(self, request: fastapi.Request, kind: str, body, prompts: list[list[int]], adapter, param: str):
        refuse_unsupported(body)
        if kind == "chat":
            max_tokens, default = body.max_completion_tokens or body.max_tokens, CHAT_MAX_TOKENS
        else:
            max_tokens, default = body.max_tokens, COMPLETION_MAX_TOKENS
        params = sampling_params(body, max_tokens, default)
        limit = getattr(self.engine, "max_model_len", None)
        if limit is not None and params[0].max_tokens >= limit:  # too long whatever the prompt: name the field
            field = "max_completion_tokens" if kind == "chat" and body.max_completion_tokens else "max_tokens"
            message = f"{field}={params[0].max_tokens} leaves no room for a prompt in this model's maximum context"
            raise APIError(400, f"{message} length of {limit} tokens", param=field, code="context_length_exceeded")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        handles = await self.submit(prompts, params, adapter, request_id, param)
        # The model that served it: a route's arm (as OpenAI answers an alias with its snapshot).
        served = self.model_name if adapter is None else adapter
        base = {"id": request_id, "created": int(time.time()), "model": served}
        echoed = None
        if kind == "completion" and body.echo:
            echoed = await run_in_threadpool(self.prompt_texts, body.prompt, prompts)
        if body.stream:
            options = body.stream_options
            include_usage = options is not None and options.include_usage
            continuous = include_usage and options.continuous_usage_stats
            prompt_tokens = sum(len(prompt) for prompt in prompts) if continuous else None
            logprobs = params[0].logprobs is not None
            # With echo, each choice's prompt (and its prompt's logprobs) comes before its first token.
            echoes = None if echoed is None else [(echoed[i], prompt) for i, prompt in enumerate(prompts)
                                                  for _ in params]  # fmt: skip
            events = self.stream_events(kind, base, handles, params[0].stop, logprobs, include_usage, prompt_tokens,
                                        len(params), echoes)  # fmt: skip
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(await self.complete(request, kind, base, handles, len(params), echoed))

    def prompt_texts(self, prompt, prompts: list[list[int]]) -> list[str]:
        """The text of each prompt, for `echo`: as sent, or its token ids decoded."""
        texts = [prompt] if isinstance(prompt, str) else prompt if prompt and isinstance(prompt[0], str) else None
        return texts or [decode_text(self.engine.tokenizer, ids) for ids in prompts]

    async def complete(self, request: fastapi.Request, kind, base, handles, n, echoed=None) -> dict:
        """The answer of a request not streamed; `echoed` (with `echo`): each prompt's text, put
        before its choices' texts, its tokens' logprobs before theirs."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
        try:
            outputs = []
            for handle in handles:
                outputs.append(await handle.wait())
                self.observe(outputs[-1])
        except RequestFailed as error:
            raise APIError(500, str(error), type="server_error", code="request_failed") from error
        finally:
            watcher.cancel()
            for handle in handles:
                handle.cancel()
        choices = await run_in_threadpool(self.choices, kind, outputs, n, echoed)  # decodes each token
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {**base, "object": obj, "choices": choices, "usage": usage(outputs, n)}

    def choices(self, kind: str, outputs, n: int, echoed) -> list[dict]:
        choices = []
        for index, output in enumerate(outputs):
            echo = echoed is not None
            choice = {"index": index, "logprobs": self.logprobs(kind, output, echo),
                      "finish_reason": output.finish_reason}  # fmt: skip
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": output.text}
            else:
                choice["text"] = echoed[index // n] + output.text if echo else output.text
            choices.append(choice)
        return choices

    def logprobs(self, kind: str, output, echo: bool = False) -> dict | None:
        """A choice's `logprobs` in OpenAI's shape for `kind` (None when not asked for); with `echo`
        (completions), the prompt's tokens first, the first with a null logprob (nothing predicts it)."""
        if output.logprobs is None or (echo and output.prompt_logprobs is None):
            return None
        token_ids, entries = output.token_ids, output.logprobs
        if echo:
            token_ids, entries = output.prompt_token_ids + token_ids, output.prompt_logprobs + entries
        return self.logprobs_of(kind, token_ids, entries)

    def logprobs_of(self, kind: str, token_ids: list[int], entries: list, text_offset: int = 0) -> dict:
        """OpenAI's `logprobs` for `kind` of `token_ids` and their `RequestOutput.logprobs` entries
        (None: a first prompt token); a completion's `text_offset` counts from `text_offset`."""
        tokenizer = self.engine.tokenizer

        def text(token_id):
            return decode_text(tokenizer, [token_id])

        if kind == "chat":
            def entry(token_id, logprob):
                token = text(token_id)
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            return {"content": [{**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                                for token_id, (logprob, top) in zip(token_ids, entries)]}  # fmt: skip
        tokens = [text(token_id) for token_id in token_ids]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset)) if tokens else []
        return {"tokens": tokens, "token_logprobs": [None if entry is None else entry[0] for entry in entries],
                "top_logprobs": [None if entry is None else {text(t): lp for t, lp in entry[1]} for entry in entries],
                "text_offset": offsets}  # fmt: skip

    async def stream_events(self, kind, base, handles, stop, logprobs, include_usage, prompt_tokens, n, echoes=None):
        """The SSE events; with `logprobs`, each chunk has those of its tokens (OpenAI's shape for
        `kind`, concatenated: the answer's not streamed); with `prompt_tokens`
        (continuous_usage_stats), every chunk has the usage so far; `echoes` (completions' echo):
        each handle's prompt text and token ids, its first chunk."""
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        completion_tokens = [0] * len(handles)

        def chunk(choices, **extra) -> str:
            if prompt_tokens is not None and "usage" not in extra:
                done = sum(completion_tokens)
                extra["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                  "total_tokens": prompt_tokens + done}  # fmt: skip
            return f"data: {json.dumps({**base, 'object': obj, 'choices': choices, **extra})}\n\n"

        text_offsets = [0] * len(handles)  # of each choice's next token in its text

        def choice(index, text, finish_reason=None, pieces=None, echo=False):
            shaped = None
            # pieces: the token ids since the last chunk, and their logprobs (None: the engine gave
            # none; an echoed prompt's first token has None, nothing predicts it)
            if pieces is not None and pieces[0] and None not in pieces[1][1 if echo else 0 :]:
                shaped = self.logprobs_of(kind, *pieces, text_offset=text_offsets[index])
                if kind != "chat":
                    text_offsets[index] += sum(len(token) for token in shaped["tokens"])
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                return {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": finish_reason}
            return {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": finish_reason}

        outputs = [None] * len(handles)
        try:
            try:
                if kind == "chat":
                    for index in range(len(handles)):
                        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}])  # fmt: skip
                choices = [self.choice_events(handle, stop, logprobs, None if echoes is None else echoes[index])
                           for index, handle in enumerate(handles)]  # fmt: skip
                async for index, text, output, tokens, pieces, echo in _merge(choices):
                    completion_tokens[index] = tokens
                    if output is None:
                        yield chunk([choice(index, text, pieces=pieces, echo=echo)])
                        continue
                    outputs[index] = output
                    if text:
                        yield chunk([choice(index, text, pieces=pieces)])
                        pieces = None
                    yield chunk([choice(index, None, output.finish_reason, pieces)])
                if include_usage:
                    yield chunk([], usage=usage(outputs, n))
            except RequestFailed as error:
                failed = APIError(500, str(error), type="server_error", code="request_failed")
                yield f"data: {json.dumps(failed.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that went away cancels its requests: their pages come back
            for handle in handles:
                handle.cancel()

    async def choice_events(self, handle, stop, logprobs: bool, echo=None):
        """(text, None, tokens so far, pieces, False) as a choice's text becomes final, then (the
        rest, its RequestOutput, its tokens, pieces, False); with `logprobs`, pieces are the token
        ids since the last item and their logprobs entries (else None). With `echo` (the prompt's
        text and token ids), first (its text, None, 0, its pieces, True)."""
        detokenizer = _Detokenizer(self.engine.tokenizer, tuple(stop))
        entries, sent = [], 0
        if echo is not None and not logprobs:
            yield echo[0], None, 0, None, True
        async for item in handle.stream(logprobs=logprobs, prompt_logprobs=echo is not None and logprobs):
            if isinstance(item, list):  # the prompt's logprobs, before its first token
                yield echo[0], None, 0, (echo[1], item), True
                continue
            token_id, entry = item if logprobs else (item, None)
            entries.append(entry)
            text = detokenizer.push(token_id)
            if text:
                done = len(detokenizer.token_ids)
                pieces = (detokenizer.token_ids[sent:done], entries[sent:done]) if logprobs else None
                yield text, None, done, pieces, False
                sent = done
        output = handle.result(timeout=0)
        self.observe(output)
        pieces = (detokenizer.token_ids[sent:], entries[sent:]) if logprobs else None
        yield detokenizer.finish(output.text), output, len(output.token_ids), pieces, False


async def _cancel_on_disconnect(request: fastapi.Request, handles) -> None:
    """A client that goes away before its (not streamed) answer cancels its requests. The body is
    read already, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for handle in handles:
        handle.cancel()


async def _merge(streams):
    """(index, *item) from several async iterators as items arrive; the first error propagates."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for item in stream:
                await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, error))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield (index, *item)
    finally:
        for task in tasks:
            task.cancel()


def build_app(engine, *, model_name: str, adapter_dirs=(), api_key: str | None = None,
              adapter_paths: dict | None = None, max_body_bytes: int = MAX_BODY_BYTES, routes=(),
              quality_window: int = 100) -> fastapi.FastAPI:  # fmt: skip
    """The FastAPI app over `engine` (see the module docstring).

    Args:
        engine: an `Engine`, or anything with its serving interface (module docstring).
        model_name: the base model's `model` name.
        adapter_dirs: directories under which `POST /v1/load_lora_adapter` may load adapters
            (their real paths: no `..` or symlink leads out); none: loading at run time is off.
        api_key: when given, every /v1 route needs `Authorization: Bearer <api_key>`; /health
            and /metrics stay open.
        adapter_paths: name -> directory of the adapters loaded at start: `/v1/models` shows
            them as `root`, and an adapter's own chat template is read from there.
        max_body_bytes: a request body beyond this gets 413 (8 MiB by default).
        routes: A/B routes, `NAME=ARM:WEIGHT,...` strings (or `routing.Route`s): `model: NAME`
            is served by one arm (the base model's name or a loaded adapter's), chosen by weight,
            sticky by the body's `user`. Their arms cannot be unloaded.
        quality_window: completed requests per model in /metrics' quality signals, and the size of
            the drift statistic's reference window and recent window (`quality.QualityMonitor`).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty str, got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty str or None")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if isinstance(adapter_dirs, (str, os.PathLike)):
        raise ValueError("adapter_dirs must be a list of directories, not one path")
    for directory in adapter_dirs:
        if not os.path.isdir(directory):
            raise ValueError(f"adapter_dirs: {directory!r} is not a directory")
    if not isinstance(quality_window, int) or isinstance(quality_window, bool) or quality_window < 2:
        raise ValueError(f"quality_window must be an int >= 2, got {quality_window!r}")
    if isinstance(routes, str):
        raise ValueError("routes must be a list of NAME=ARM:WEIGHT,... strings, not one string")
    server = _Server(engine, model_name, adapter_dirs, adapter_paths, max_body_bytes, routes, quality_window)
    app = fastapi.FastAPI(title="fused_train", openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request, error: Exception):  # a bug: still an answer in OpenAI's shape
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error",
                        code="internal_error").response()  # fmt: skip

    async def body_of(request, model):
        return await parse_body(request, model, server.max_body_bytes)

    async def authorized(authorization: str | None = fastapi.Header(None)):
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <key>", type="authentication_error",
                           code="invalid_api_key")  # fmt: skip

    v1 = fastapi.APIRouter(prefix="/v1", dependencies=[fastapi.Depends(authorized)])

    @v1.post("/completions")
    async def completions(request: fastapi.Request):
        body = await body_of(request, CompletionRequest)
        adapter = server.adapter_for(body.model, body.user)
        prompts = await run_in_threadpool(server.encode_prompts, body.prompt)
        return await server.generate(request, "completion", body, prompts, adapter, "prompt")

    @v1.post("/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await body_of(request, ChatRequest)
        adapter = server.adapter_for(body.model, body.user)
        prompts = [await run_in_threadpool(server.encode_chat, body.messages, adapter)]
        return await server.generate(request, "chat", body, prompts, adapter, "messages")

    @v1.get("/models")
    async def models():
        return server.models()

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: fastapi.Request):
        return await server.load_adapter(await body_of(request, LoadAdapterRequest))

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: fastapi.Request):
        return await server.unload_adapter(await body_of(request, UnloadAdapterRequest))

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not getattr(engine, "accepting", True):  # draining: a load balancer stops sending here
            return APIError(503, "the server is shutting down", type="server_error", code="unavailable").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return fastapi.Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class RunningServer:
    """A uvicorn server running `app` in a background thread (`start_server`)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int):
        self._server, self._thread = server, thread
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 30) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the server at {self.url} did not stop within {timeout} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_server(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 startup_timeout: float = 30) -> RunningServer:  # fmt: skip
    """Serve `app` on `host`:`port` (0: a free port, read back from the bound socket) from a
    background thread; returns once it accepts connections."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    # A stream still open at stop() gets a few seconds, then is closed.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, host, port)
