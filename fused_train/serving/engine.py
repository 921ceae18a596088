"""`Engine`: continuous batching of many-adapter requests over a paged KV cache.

    engine = Engine(model, tokenizer, adapters={"support": "adapters/support", "legal": "adapters/legal"})
    outputs = engine.generate(["Hello", "Hi"], SamplingParams(max_tokens=32), adapters=["support", None])
    handle = engine.add_request("Hello", SamplingParams(max_tokens=32), adapter="legal")
    for token_id in handle: ...          # or `async for token_id in handle.stream():`
    engine.shutdown()

One background thread runs the loop: schedule a step (`scheduler.Scheduler`: finished requests
leave, waiting ones join, decodes first, then prefills or chunks of them under the step's token
budget, a cached prefix shared instead of computed, preemption when pages run out), run it
(`runner.Runner`: one forward of the patched Hugging Face model for the whole batch, every request
with its own adapter through the `AdapterPool`), sample the next token of each request whose step
reached its last token (a chunk inside a prompt draws none), stream it, end what is finished. Every
request ends finished ("stop", "length"), cancelled ("cancelled") or failed ("error", with the
reason): its pages and adapter leases are released there, in one place. A request holds the
version of its adapter it started with (`AdapterPool.acquire`) until it ends: an unload or a reload
of that name meanwhile changes nothing for it, only for the requests that come after.

The model is patched (`fused_train.patch`) so that its attention reads the paged cache; it must be
a plain transformers causal LM (adapters come from the pool, not from peft). Sampling runs on the
model's device, one vectorized pass for the step (`runner.sample_batch`), and only the chosen ids
come to the host; its noise is a pure function of (the request's seed, the token's index), so a
seeded request draws the same tokens whatever batches it shares; greedy is temperature 0.

Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's): the steps of such a request keep the
logits of every prompt token they feed, chunk after chunk, and `RequestOutput.prompt_logprobs`
gets each prompt token's logprob and top-k (None for the first). It reads no cached prefix (a
cached page has no logits, as in vLLM) but registers its pages for the others. With max_tokens=0
it draws nothing and ends ("length") once its prompt is computed (vLLM refuses 0 and its server
draws one token for an `echo` that asks for none; here nothing is drawn).
"""

import secrets
import time

import torch

import fused_train
from fused_train.serving.adapters import AdapterPool
from fused_train.serving.pages import PageAllocator
from fused_train.serving.paged_cache import PagedKVCache
from fused_train.serving.runner import Runner, chosen_logprobs, penalize, sample_batch
from fused_train.serving.requests import (  # noqa: F401 - re-exported: their old paths
    SEED_RANGE, EngineStopped, RequestFailed, RequestHandle, RequestLoop, RequestOutput, SamplingParams, _Request,
    decode_text, encode_prompt, ended_output, held_back_ids, request_generator, stop_reason, suppress_stops,
)
from fused_train.serving.structured_output import GrammarCompiler, accept, apply_masks
from fused_train.serving.scheduler import FINISHED, PromptTooLong, QueueFull, Scheduler, Sequence, Step


__all__ = [
    "Engine", "EngineStopped", "PromptTooLong", "QueueFull", "RequestFailed", "RequestHandle", "RequestOutput",
    "SamplingParams",
]  # fmt: skip

DEFAULT_KV_CACHE_TOKENS = 65536


class Engine(RequestLoop):
    """Continuous batching over `model` (see the module docstring).

    Args:
        model: a transformers causal LM (not a peft model); patched here.
        tokenizer: for text prompts, output text and stop strings; None for token ids only.
        adapters: name -> peft adapter directory (safetensors), loaded into the pool now.
        max_loras, max_cpu_loras, max_rank: the `AdapterPool`'s device slots, CPU tier, rank cap;
            a step holds at most `max_loras` distinct adapters.
        kv_dtype: "int8" (int8 pages, a float32 scale per token and kv head) or "model" (the
            model's dtype).
        kv_cache_tokens: tokens the paged cache holds, all requests together (rounded up to
            pages); None for 65,536.
        page_size: tokens per page (a power of two >= 8).
        max_batch_tokens: tokens one step may run (prefill tokens + one per decode); a prompt
            longer than this is prefilled in chunks over several steps (decodes go on meanwhile).
        max_running: sequences in one step at most.
        max_waiting: requests waiting at most; `add_request` raises `QueueFull` beyond.
        max_overtakes: how many later requests may be admitted ahead of one waiting for an adapter
            slot (the scheduler's adapter-aware admission); 0: first come first served.
        max_model_len: prompt + max_tokens at most, per request (`PromptTooLong` beyond); None: the
            model's `max_position_embeddings`, which it may lower, never raise.
        enable_prefix_caching: keep full pages of computed tokens cached, keyed by the adapter
            (its version) and every token up to the page's end, and share them with later requests
            that start with the same tokens, which then compute only the rest (vLLM's automatic
            prefix caching, on by default as in vLLM v1).
        clock: seconds, for the metrics (time.monotonic).
    """

    def __init__(self, model, tokenizer=None, *, adapters=None, max_loras: int = 8, max_cpu_loras: int = 64,
                 max_rank: int = 64, kv_dtype: str = "int8", kv_cache_tokens: int | None = None, page_size: int = 16,
                 max_batch_tokens: int = 4096, max_running: int = 256, max_waiting: int = 1024,
                 max_overtakes: int = 16, max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 clock=time.monotonic):  # fmt: skip
        if kv_dtype not in ("int8", "model"):
            raise ValueError(f'kv_dtype must be "int8" or "model", got {kv_dtype!r}')
        if not isinstance(page_size, int) or page_size < 8 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 8, got {page_size!r}")
        kv_cache_tokens = DEFAULT_KV_CACHE_TOKENS if kv_cache_tokens is None else kv_cache_tokens
        if not isinstance(kv_cache_tokens, int) or isinstance(kv_cache_tokens, bool) or kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be a positive int or None, got {kv_cache_tokens!r}")
        if not hasattr(model, "config") or not hasattr(model, "generation_config"):
            raise ValueError(f"model must be a transformers causal LM, got {type(model).__name__}")
        positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len < 1:
                raise ValueError(f"max_model_len must be a positive int or None, got {max_model_len!r}")
            if positions is not None and max_model_len > positions:
                raise ValueError(f"max_model_len={max_model_len} is more than the model's max_position_embeddings "
                                 f"({positions}): it would run past the positions it was trained on")  # fmt: skip
        self.max_model_len = positions if max_model_len is None else max_model_len
        parameter = next(model.parameters())
        self.model = fused_train.patch(model.eval())
        self.tokenizer = tokenizer
        self.clock = clock
        self.pool = AdapterPool(model, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_rank=max_rank)
        try:
            for name, path in (adapters or {}).items():
                self.pool.load(name, path)
        except Exception:
            self.pool.close()
            raise
        pages = PageAllocator(-(-kv_cache_tokens // page_size), page_size)
        self.cache = PagedKVCache(model.config, pages.num_pages, page_size, kv_dtype, parameter.dtype, parameter.device)
        self.scheduler = Scheduler(pages, max_batch_tokens=max_batch_tokens, max_running=max_running,
                                   max_adapters=max_loras, max_waiting=max_waiting,
                                   max_overtakes=max_overtakes, prefix_caching=enable_prefix_caching)  # fmt: skip
        self.runner = Runner(model, self.cache, self.pool)
        self.kv_dtype = kv_dtype
        eos = model.generation_config.eos_token_id
        eos = model.config.eos_token_id if eos is None else eos
        self._eos = frozenset([eos] if isinstance(eos, int) else eos or ())
        self._grammars = None  # a GrammarCompiler, made at the first response_format
        super().__init__("fused_train-engine")
        self._in_flight: frozenset = frozenset()  # the running step's sequences
        self._last_batch_size = 0
        self._start()

    # ---------------------------------------------------------------- requests

    def add_request(self, prompt, params: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None) -> RequestHandle:  # fmt: skip
        """Queue one request: `prompt` text (needs the tokenizer) or a list of token ids; `adapter`
        a loaded adapter's name or None for the base model. Raises ValueError on a bad request
        (`PromptTooLong` when it could never fit the cache or the context length), `QueueFull` when the waiting
        queue is full, `EngineStopped` once `shutdown` began; otherwise returns its handle at once.
        The request holds the adapter's current version until it ends."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt_ids = encode_prompt(prompt, self.tokenizer)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer; give stop_token_ids instead")
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise PromptTooLong(
                f"this model's maximum context length is {self.max_model_len} tokens; this request asks for {total} "
                f"tokens ({len(prompt_ids)} in the prompt, max_tokens={params.max_tokens} in the completion): "
                "shorten the prompt or lower max_tokens"
            )
        grammar = None
        if params.response_format is not None and params.response_format.get("type") != "text":
            if self.tokenizer is None:
                raise ValueError("response_format needs the engine's tokenizer")
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, vocab)
            grammar = self._grammars.matcher(self._grammars.compile(params.response_format))
        seed = secrets.randbits(64) if params.seed is None else params.seed
        with self._lock:
            request_id = self._new_request_id(request_id)
            version = None if adapter is None else self.pool.acquire(adapter)  # raises UnknownAdapter
            # A cached page has no logits: a request that scores its prompt computes all of it (as vLLM).
            seq = Sequence(request_id, list(prompt_ids), total, version,
                           reads_prefix_cache=params.prompt_logprobs is None)  # fmt: skip
            handle = RequestHandle(self, request_id)
            try:
                self.scheduler.add(seq)  # raises ValueError / QueueFull before anything is recorded
            except BaseException:
                if version is not None:
                    self.pool.release(version)
                raise
            self._requests[request_id] = _Request(
                seq, params, list(prompt_ids), seed, self.clock(), handle, adapter, grammar=grammar,
                logprobs=None if params.logprobs is None else [],
                prompt_logprobs=None if params.prompt_logprobs is None else [None],
            )
            self._counters["prompt_tokens"] += len(prompt_ids)
            self._lock.notify_all()
        return handle

    def generate(self, prompts, params=None, adapters=None) -> list[RequestOutput]:
        """Run `prompts` (texts or token-id lists) to the end and return their outputs in order;
        `params` one SamplingParams for all or one per prompt; `adapters` one name (or None) for
        all, or one per prompt. Like vLLM's `LLM.generate`: a failed request's output says why."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt of token ids
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        for arg, values in (("params", params), ("adapters", adapters)):
            if len(values) != len(prompts):
                raise ValueError(f"{arg} must hold one entry per prompt ({len(prompts)}), got {len(values)}")
        handles = []
        try:
            with self._lock:  # the loop schedules them together: one batch, whatever the thread timing
                for prompt, param, adapter in zip(prompts, params, adapters):
                    handles.append(self.add_request(prompt, param, adapter))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return [handle.result() for handle in handles]

    def load_adapter(self, name: str, path) -> None:
        self.pool.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unregister `name` at once; its running requests end as they would have (they hold their
        version), and `metrics()["adapters"]["draining"]` counts them meanwhile."""
        self.pool.unload(name)

    def adapters(self) -> list[str]:
        return self.pool.names()

    def metrics(self) -> dict:
        """Plain numbers (totals since start, and the state now) for an exporter."""
        with self._lock:
            pages = self.scheduler.pages
            return dict(
                self._counters,
                waiting=len(self.scheduler.waiting),
                running=len(self.scheduler.running),
                batch_size=self._last_batch_size,
                preemptions=self.scheduler.num_preemptions,
                prefix_cache_queries=self.scheduler.prefix_cache_queries,
                prefix_cache_hits=self.scheduler.prefix_cache_hits,
                kv_pages_cached=pages.cached_pages,
                kv_pages_total=pages.num_pages,
                kv_pages_used=pages.used_pages,
                kv_pages_free=pages.free_pages,
                kv_page_size=pages.page_size,
                kv_bytes=self.cache.nbytes(),
                kv_bytes_per_token=self.cache.bytes_per_token(),
                adapters=self.pool.stats(),
            )

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; `drain` runs the queued and running ones to their end, otherwise they
        are cancelled. Returns when the loop thread has ended; the adapter pool is closed."""
        super().shutdown(drain, timeout)
        self.pool.close()

    # ---------------------------------------------------------------- the loop

    def _is_running(self, request: _Request) -> bool:
        return request.seq in self._in_flight

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # a bug here must not leave requests waiting forever
            with self._lock:
                self._stopping = True
                for request in list(self._requests.values()):
                    self._end(request, "error", f"engine loop failed: {type(error).__name__}: {error}")
            raise

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self.scheduler.has_work() or self._stopping)
                if self._stopping and not self._drain:
                    for request in list(self._requests.values()):
                        self._end(request, "cancelled")
                if not self.scheduler.has_work():
                    return  # stopping, and nothing left
                step = self.scheduler.schedule()
                self._in_flight = frozenset(step.sequences)
                requests = [self._requests[seq.request_id] for seq in step.sequences]
                now = self.clock()
                for request in requests:
                    if request.first_scheduled is None:
                        request.first_scheduled = now
            if not requests:
                raise AssertionError("the scheduler gave an empty step with work pending")
            started = time.perf_counter()
            sampled = self._run(step, requests)
            with self._lock:
                self._in_flight = frozenset()
                self._counters["steps"] += 1
                self._counters["step_tokens"] += step.num_tokens
                self._counters["step_seconds"] += time.perf_counter() - started
                self._last_batch_size = len(requests)
                now = self.clock()
                for request, token, logprob in sampled:
                    self.scheduler.computed(request.seq)
                    if request.cancelled:
                        self._end(request, "cancelled")
                    elif token is not None:
                        self._append(request, token, now, logprob)
                    elif request.params.max_tokens == 0 and not request.seq.num_uncached:
                        self._end(request, "length")  # its prompt is computed, and it draws nothing

    def _run(self, step, requests) -> list[tuple[_Request, int | None, float | None]]:
        """Forward and sample: (request, its next token, that token's logprob) for each request of
        the step, None twice for a request whose step ended inside its prefill (a chunk: nothing to
        draw yet) or that draws nothing (max_tokens=0). A request whose adapter cannot be served
        fails alone, and the step runs again without it. When the forward raises for another
        reason, each request runs again alone, and only those that raise alone fail: one bad
        request does not fail the others of its step."""
        try:
            requests, logits = self._forward(step, requests)
        except Exception as error:  # noqa: BLE001 - every request must end with a reason
            requests = [r for r in requests if r.seq.status != FINISHED]
            if len(requests) == 1:
                with self._lock:
                    self._end(requests[0], "error", f"{type(error).__name__}: {error}")
                return []
            kept, rows = [], []
            for request in requests:
                seq = request.seq
                alone = Step([seq], [], []) if seq in step.prefills else Step([], [seq], [])
                try:
                    alive, row = self._forward(alone, [request])
                except Exception as error:  # noqa: BLE001
                    with self._lock:
                        self._end(request, "error", f"{type(error).__name__}: {error}")
                    continue
                if alive:
                    kept += alive
                    rows.append(row)
            requests, logits = kept, torch.cat(rows) if rows else None
        drawing = [row for row, request in enumerate(requests) if request.seq.samples and request.params.max_tokens]
        if len(drawing) < len(requests):
            drawn = set(drawing)
            chunks = [(request, None, None) for row, request in enumerate(requests) if row not in drawn]
            requests = [requests[row] for row in drawing]
            logits = logits[torch.tensor(drawing, dtype=torch.int64, device=logits.device)] if drawing else None
        else:
            chunks = []
        if not requests:
            return chunks
        vocab = logits.shape[-1]
        banned = [(row, token) for row, request in enumerate(requests)
                  for token in held_back_ids(request.params, request.generated, self._eos, vocab)]  # fmt: skip
        params = [request.params for request in requests]
        processed = self._processed_logits(logits, requests)
        seeds, indices = [r.seed for r in requests], [len(r.generated) for r in requests]
        tokens = sample_batch(processed, [p.temperature for p in params], [p.top_p for p in params],
                              [p.top_k for p in params], seeds, indices, banned)  # fmt: skip
        # The model's own distribution (raw logits: before penalties, bias and temperature, vLLM's
        # default "raw_logprobs"), once for the chosen tokens and the top logprobs.
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = chosen_logprobs(logprobs, tokens)
        self._record_logprobs(logprobs, requests, chosen)
        return chunks + list(zip(requests, tokens, chosen))

    def _record_logprobs(self, logprobs: torch.Tensor, requests, chosen: list[float]) -> None:
        """For the rows that ask: the chosen token's logprob (`chosen`, one per row) and the top
        `params.logprobs` of `logprobs` (the step's raw log_softmax), taken on the device; only
        those values come to the host."""
        rows = [row for row, request in enumerate(requests) if request.params.logprobs is not None]
        if not rows:
            return
        k = max(requests[row].params.logprobs for row in rows)
        top_values, top_ids = [[]] * len(rows), [[]] * len(rows)
        if k:
            index = torch.tensor(rows, dtype=torch.int64, device=logprobs.device)
            top = logprobs.index_select(0, index).topk(k, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for i, row in enumerate(rows):
            want = requests[row].params.logprobs
            requests[row].logprobs.append((chosen[row], list(zip(top_ids[i][:want], top_values[i][:want]))))

    def _record_prompt_logprobs(self, requests, fed: dict) -> None:
        """For the requests whose prompt is being scored: the logprobs of the prompt tokens that the
        step's rows (`fed`: each sequence's logits at every token it fed) predict, with the top
        `params.prompt_logprobs`, raw as `_record_logprobs`. The row at position p predicts token
        p + 1; a request preempted after its prompt was scored computes it again and records nothing.
        Once all are scored they go to its handle, so a stream (`echo`) has them before the first token."""
        for request in requests:
            self._score_prompt(request, fed.get(request.seq))
            scored = request.prompt_logprobs
            if scored is not None and not request.prompt_published and len(scored) == len(request.prompt_token_ids):
                request.prompt_published = True
                request.handle.publish([], None, prompt_logprobs=list(scored))

    @staticmethod
    def _score_prompt(request, logits) -> None:
        """`_record_prompt_logprobs` of one request, `logits` its rows of the step (None: none)."""
        if logits is None:
            return
        scored, cached, prompt = len(request.prompt_logprobs), request.seq.num_cached, request.prompt_token_ids
        first, end = scored - 1 - cached, min(len(logits), len(prompt) - 1 - cached)  # rows of the step
        if first < 0:  # it reads no cached prefix, and its chunks come in order: a bug
            raise AssertionError(f"request {request.request_id}: prompt token {scored} was skipped")
        if end <= first:  # the step fed only the last prompt token (it predicts the first output)
            return
        logprobs = torch.log_softmax(logits[first:end], dim=-1)
        targets = torch.tensor(prompt[scored : scored + end - first], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = request.params.prompt_logprobs
        if k:
            top = logprobs.topk(k, dim=-1)
            tops = [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [[] for _ in chosen]
        request.prompt_logprobs.extend(zip(chosen, tops))

    def _processed_logits(self, logits: torch.Tensor, requests) -> torch.Tensor:
        """The one place per-row logits processors apply before sampling, on the device: the logit
        bias and the penalties (`runner.penalize`) of the rows that ask for them, then the
        response_format masks, last, since nothing may lift a -inf they set."""
        rows = [row for row, request in enumerate(requests) if request.params.penalized]
        if rows:
            chosen = [requests[row] for row in rows]
            index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            params = [request.params for request in chosen]
            penalized = penalize(logits.index_select(0, index), [r.prompt_token_ids for r in chosen],
                                 [r.generated for r in chosen], [p.presence_penalty for p in params],
                                 [p.frequency_penalty for p in params], [p.repetition_penalty for p in params],
                                 [p.logit_bias for p in params])  # fmt: skip
            logits = logits.index_copy(0, index, penalized)
        return apply_masks(logits, [request.grammar for request in requests])

    def _forward(self, step, requests) -> tuple[list[_Request], torch.Tensor]:
        """The step's logits on the model's device, and its requests still alive: those whose adapter breaks
        fail here and the step runs again without them. Other errors propagate."""
        while True:
            try:
                versions = [request.seq.adapter for request in requests]
                token_slots = None
                if any(version is not None for version in versions):
                    token_slots = self.pool.slots_for(versions, num_tokens=[r.seq.num_new for r in requests])
                scoring = frozenset(request.seq for request in requests if request.scoring_prompt)
                logits, fed = self.runner.run(step, token_slots, every_token=scoring)
                self._record_prompt_logprobs(requests, fed)
                return requests, logits
            except Exception:
                broken = self._broken_adapters(versions)
                if not broken:
                    raise
                with self._lock:
                    for request in requests:
                        if request.seq.adapter in broken:
                            self._end(request, "error", f"adapter {request.adapter!r}: {broken[request.seq.adapter]}")
                    requests = [r for r in requests if r.seq.status != FINISHED]
                    step.prefills[:] = [s for s in step.prefills if s.status != FINISHED]
                    step.decodes[:] = [s for s in step.decodes if s.status != FINISHED]
                if not requests:
                    return [], torch.empty(0)

    def _broken_adapters(self, versions) -> dict:
        broken = {}
        for version in dict.fromkeys(v for v in versions if v is not None):
            try:
                self.pool.slots_for([version])
            except Exception as error:  # noqa: BLE001
                broken[version] = f"{type(error).__name__}: {error}"
        return broken

    def _append(self, request: _Request, token: int, now: float, logprob: float) -> bool:
        request.seq.token_ids.append(token)
        if request.grammar is not None and not accept(request.grammar, token):
            # This request alone fails: the others of the step go on.
            self._end(request, "error", "response_format: its grammar allows no token here "
                      "(min_tokens or stop settings that the format cannot satisfy?)")  # fmt: skip
            return True
        request.logprob_sum += logprob
        return super()._append(request, token, now)

    def _release(self, request: _Request) -> None:
        """Its pages and adapter version freed."""
        self.scheduler.finish(request.seq)
        if self._requests.pop(request.request_id, None) is request and request.seq.adapter is not None:
            self.pool.release(request.seq.adapter)
