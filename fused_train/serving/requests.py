"""A request's side of serving: its parameters, its output, its live handle, the stop rules, and
`RequestLoop`, the base of an engine whose loop thread owns requests.

Both the continuous-batching `Engine` (`fused_train.serving.engine`) and the naive per-request
baseline (`bench/naive_engine.py`) are a `RequestLoop`: one lock, the running requests by id, the
counters an exporter reads, `shutdown` and the context manager, and the one `_end` where a request
ends and its output is published to its `RequestHandle`. Consumers read a handle (iterate it, `async
for` over `stream()`, `result()`); the loop thread writes to it through `publish`.
"""

import asyncio
import contextlib
import itertools
import math
import threading
from dataclasses import dataclass, field

import torch

from fused_train.serving.scheduler import Sequence

MAX_LOGPROBS = 20  # top logprobs per token at most (vLLM's default limit)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class RequestFailed(RuntimeError):
    """A request ended with an error (its `RequestOutput.error` says which)."""


class EngineStopped(RuntimeError):
    """`add_request` after `shutdown` began: the engine takes no more requests."""


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops (vLLM's names and defaults)."""

    max_tokens: int = 16  # 0: none; the request ends once its prompt is computed (for prompt_logprobs)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no cut
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None  # needs the engine's tokenizer
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # no end of sequence, stop id or stop string before this many tokens
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0  # minus this from a logit whose token the output holds
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # a logit of a prompt or output token: / if > 0, * if < 0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # each output token's logprob and this many top ones (None: none)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (None: none)
    # OpenAI's {"type": "json_object"} / {"type": "json_schema", ...}: a grammar masks every step's tokens
    response_format: dict | None = None

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        temperature = self.temperature
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1: no cut), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):  # fmt: skip
            raise ValueError(f"seed must be an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None, got {self.seed!r}")
        if (not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool)
                or not 0 <= self.min_tokens <= self.max_tokens):  # fmt: skip
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        stop_ids = tuple(self.stop_token_ids or ())
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        penalty = self.repetition_penalty
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not 0 < penalty <= 2**24:
            raise ValueError(f"repetition_penalty must be a number > 0, got {penalty!r}")
        bias = dict(self.logit_bias or {})
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
                   and not isinstance(b, bool) and -100 <= b <= 100 for t, b in bias.items()):  # fmt: skip
            raise ValueError(
                f"logit_bias must map token ids (ints >= 0) to numbers in [-100, 100], got {self.logit_bias!r}"
            )
        object.__setattr__(self, "logit_bias", bias)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):  # fmt: skip
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {value!r}")

    @property
    def penalized(self) -> bool:
        """Whether its logits change before sampling (penalties or a logit bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)


@dataclass
class RequestOutput:
    """A request as it ended: its generated `token_ids` (a stop token included, as HF `generate`
    keeps it), `text` (with a tokenizer; cut before a stop string), `finish_reason` ("stop",
    "length", "cancelled" or "error", then `error` says why) and its timings in seconds."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    adapter: str | None
    error: str | None = None
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first token
    time_per_output_token: float | None = None  # (last token - first token) / (tokens - 1)
    latency: float | None = None  # arrival -> end
    preemptions: int = 0
    # With `SamplingParams.logprobs`: per generated token (its logprob, [(token id, logprob)] top first).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # The mean of its generated tokens' logprobs under the model (raw logits), whatever the request
    # asked: a quality signal (`quality.QualityMonitor`). None without tokens, or from an engine
    # that does not compute it.
    mean_logprob: float | None = None
    # With `SamplingParams.prompt_logprobs`: per prompt token, None for the first (nothing predicts it),
    # then the same tuples as `logprobs`: each token's logprob given the tokens before it. Shorter only
    # when the request ended (cancelled, failed) before its whole prompt was computed.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    prompt_token_ids: list[int]
    seed: int  # the request's, or drawn at its start: its sampling noise is a function of it
    arrival: float
    handle: "RequestHandle"
    adapter: str | None  # its name; `seq.adapter` holds the version this request runs with
    generated: list[int] = field(default_factory=list)
    logprobs: list | None = None  # one per generated token, with `params.logprobs`
    logprob_sum: float = 0.0  # of every generated token's logprob
    prompt_logprobs: list | None = None  # [None, one per prompt token scored so far], with params.prompt_logprobs
    prompt_published: bool = False  # its complete prompt_logprobs went to the handle (for a stream)
    text: str | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    grammar: object = None  # its structured_output matcher, advanced with each token

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def preemptions(self) -> int:
        return self.seq.preemptions

    @property
    def scoring_prompt(self) -> bool:
        """Whether it asked for prompt logprobs and some prompt tokens have none yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)


class RequestHandle:
    """A request's live view: iterate it (or `async for` over `stream()`) for its token ids as they
    are produced (`stream(logprobs=True)`: with each one's logprobs; `prompt_logprobs=True`: the
    prompt's first); `result()` waits for the `RequestOutput`; `cancel()` ends it."""

    def __init__(self, owner: "RequestLoop", request_id: str):
        self.request_id = request_id
        self._owner = owner
        self._tokens: list[int] = []
        self._logprobs: list = []  # one per token where the request asked for logprobs, else none
        self._prompt_logprobs: list | None = None  # `RequestOutput.prompt_logprobs`, once all are scored
        self._output: RequestOutput | None = None
        self._changed = threading.Condition()
        # Consumers of each token (iteration, `stream()`) wait on `_changed` and `_async_waiters`;
        # those of the end alone (`result()`, `wait()`) on `_ended` and `_end_waiters`, so that a
        # token wakes no thread that only waits for the end (at batch 1 on a CPU, a wake-up per
        # token costs the loop thread several percent of its step).
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._ended = threading.Event()
        self._end_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def done(self) -> bool:
        return self._output is not None

    def cancel(self) -> None:
        self._owner._cancel(self)

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not end within {timeout} s")
        return self._output

    async def wait(self) -> RequestOutput:
        """The asyncio form of `result()`: the output once the request ends, the loop woken once
        (`stream()` wakes it at every token); raises RequestFailed if the request fails."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._changed:
            waits = not self.done()
            if waits:
                self._end_waiters.append((loop, event))
        if waits:
            try:
                await event.wait()
            finally:  # cancelled, too (see `stream`)
                with self._changed:
                    if (loop, event) in self._end_waiters:
                        self._end_waiters.remove((loop, event))
        self._raise_if_failed()
        return self._output

    def __iter__(self):
        """Token ids as they are produced; raises RequestFailed if the request fails."""
        index = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(self._tokens) > index or self.done())
                new, ended = self._tokens[index:], self.done()
            yield from new
            index += len(new)
            if ended and index == len(self._tokens):
                self._raise_if_failed()
                return

    async def stream(self, logprobs: bool = False, prompt_logprobs: bool = False):
        """The asyncio form of iterating the handle: `async for token_id in handle.stream()`; with
        `logprobs`, `(token_id, entry)`: its `RequestOutput.logprobs` entry, None where the request
        asked for none. With `prompt_logprobs` (a request that asked for them), the first item is
        the list of its `RequestOutput.prompt_logprobs`, before any token; a request that ends
        before its prompt is scored (cancelled, failed) gives none."""
        loop = asyncio.get_running_loop()
        index, prompt_due = 0, prompt_logprobs
        while True:
            event = asyncio.Event()
            with self._changed:
                ended, prompt = self.done(), None
                if prompt_due:
                    prompt = self._prompt_logprobs
                    if prompt is None and ended:
                        prompt_due = False
                new = [] if prompt_due and prompt is None else self._tokens[index:]
                entries = self._logprobs[index : index + len(new)]
                waits = not new and not ended and prompt is None
                if waits:
                    self._async_waiters.append((loop, event))
            if waits:
                try:
                    await event.wait()
                finally:  # cancelled, too: a waiter left behind would be woken on a loop that may be closed
                    with self._changed:
                        if (loop, event) in self._async_waiters:
                            self._async_waiters.remove((loop, event))
                continue
            if prompt is not None:
                prompt_due = False
                yield prompt
                continue
            for offset, token in enumerate(new):
                yield (token, entries[offset] if offset < len(entries) else None) if logprobs else token
            index += len(new)
            if ended and index == len(self._tokens):
                self._raise_if_failed()
                return

    def _raise_if_failed(self):
        if self._output.finish_reason == "error":
            raise RequestFailed(f"request {self.request_id} failed: {self._output.error}")

    def publish(self, tokens: list[int], output: RequestOutput | None, logprobs=(), prompt_logprobs=None) -> None:
        """The producer's side (the loop thread): `tokens` are produced, with their `logprobs`
        entries where the request asked for them; `prompt_logprobs`, when given, all of the prompt's
        (before its first token); `output`, when given, ends the request. Wakes every waiting
        consumer, threads and asyncio loops alike."""
        with self._changed:
            if prompt_logprobs is not None:
                self._prompt_logprobs = prompt_logprobs
            self._tokens.extend(tokens)
            self._logprobs.extend(logprobs)
            waiters, self._async_waiters = self._async_waiters, []
            if output is not None:
                self._output = output
                self._ended.set()
                waiters, self._end_waiters = waiters + self._end_waiters, []
            self._changed.notify_all()
        for loop, event in waiters:
            # A consumer's loop that closed meanwhile has nobody waiting: it must not stop the engine.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)


def encode_prompt(prompt, tokenizer) -> list[int]:
    """The token ids of `prompt`: a text (needs `tokenizer`), a list of ids or a tensor of them."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the engine's tokenizer; pass token ids instead")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt must be a string or a list of token ids")
    return list(prompt)


def decode_text(tokenizer, token_ids) -> str:
    """The text of generated `token_ids`: special tokens skipped, and no clean-up of tokenization
    spaces (as vLLM), which rewrites text already there (" ," -> ","): then the decode of more tokens
    always extends the decode of fewer, and a streamed text equals the final one."""
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def request_generator(seed: int | None) -> torch.Generator:
    """A request's own sampling generator (the naive baseline's, for `runner.sample`): seeded, or
    from fresh entropy when `seed` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def ended_output(request, request_id: str, adapter: str | None, reason: str, error: str | None, now: float,
                 tokenizer, preemptions: int = 0) -> RequestOutput:  # fmt: skip
    """The `RequestOutput` of `request` ending at `now`; `request` holds its `prompt_token_ids`,
    `generated` ids, `text` (None: decoded here), `arrival`, `first_scheduled` and `first_token` times."""
    text = request.text
    if text is None and tokenizer is not None:
        text = decode_text(tokenizer, request.generated)
    logprobs = getattr(request, "logprobs", None)  # a list where the request asked for them
    logprob_sum = getattr(request, "logprob_sum", None)  # where the engine computes it
    prompt_logprobs = getattr(request, "prompt_logprobs", None)
    tpot = None
    if request.first_token is not None and len(request.generated) > 1:
        tpot = (now - request.first_token) / (len(request.generated) - 1)
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=request.prompt_token_ids,
        token_ids=list(request.generated),
        text=text,
        finish_reason=reason,
        adapter=adapter,
        error=error,
        queue_time=None if request.first_scheduled is None else request.first_scheduled - request.arrival,
        time_to_first_token=None if request.first_token is None else request.first_token - request.arrival,
        time_per_output_token=tpot,
        latency=now - request.arrival,
        preemptions=preemptions,
        logprobs=None if logprobs is None else logprobs[: len(request.generated)],
        mean_logprob=logprob_sum / len(request.generated) if logprob_sum is not None and request.generated else None,
        prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
    )


def stop_reason(params: SamplingParams, generated: list[int], eos, tokenizer) -> tuple[str | None, str | None]:
    """Whether a request ends with its last generated token: ("stop" or "length", or None), and
    its text cut before a stop string when one appeared (after it with `include_stop_str_in_output`;
    else None). `eos` holds the end ids. Before `min_tokens` tokens nothing stops it."""
    token = generated[-1]
    reason, text = None, None
    if len(generated) < params.min_tokens:
        return None, None
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos):
        reason = "stop"
    if params.stop:
        decoded = decode_text(tokenizer, generated)
        found = [(i, -len(s)) for i, s in ((decoded.find(s), s) for s in params.stop) if i >= 0]
        if found:
            cut, minus_length = min(found)  # the first stop string, the longest of those starting there
            reason, text = "stop", decoded[: cut - minus_length if params.include_stop_str_in_output else cut]
    if reason is None and len(generated) >= params.max_tokens:
        reason = "length"
    return reason, text


def held_back_ids(params: SamplingParams, generated: list[int], eos, vocab: int) -> list[int]:
    """The ids a request may not choose next: the end-of-sequence (unless `ignore_eos`) and stop ids
    while it has fewer than `min_tokens` tokens, so it cannot end before then (vLLM's `min_tokens`)."""
    if len(generated) >= params.min_tokens:
        return []
    ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
    return sorted(i for i in ids if i < vocab)


def suppress_stops(logits: torch.Tensor, params: SamplingParams, generated: list[int], eos) -> torch.Tensor:
    """`logits` with `held_back_ids` at -inf."""
    ids = held_back_ids(params, generated, eos, logits.shape[-1])
    if not ids:
        return logits
    return logits.index_fill(-1, torch.tensor(ids), float("-inf"))




class RequestLoop:
    """The base of an engine whose one loop thread owns its requests (see the module docstring).

    A subclass sets `tokenizer`, `clock` and `_eos` (the end-of-sequence ids), implements `_loop`
    (the thread's body), `_is_running(request)` (a request the loop is working on right now ends at
    the loop's next chance, not at once, when cancelled) and `_release(request)` (what a request
    holds, freed when it ends, under the lock), then calls `_start()`. Its requests have
    `request_id`, `adapter`, `params`, `handle`, `generated`, `text`, `cancelled`, `preemptions`
    and the times `ended_output` reads.
    """

    def __init__(self, thread_name: str):
        self._lock = threading.Condition()
        self._requests: dict = {}
        self._ids = itertools.count()
        self._stopping = False
        self._drain = True
        self._counters = dict(requests_finished=0, requests_cancelled=0, requests_failed=0, prompt_tokens=0,
                              generation_tokens=0, steps=0, step_tokens=0, step_seconds=0.0)  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        """False once `shutdown` began (draining) or the loop failed: `add_request` would refuse."""
        with self._lock:
            return not self._stopping

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; `drain` runs the queued and running ones to their end, otherwise they
        are cancelled. Returns when the loop thread has ended."""
        with self._lock:
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the {self._thread.name} loop did not end within {timeout} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain=exc[0] is None)

    def _new_request_id(self, request_id: str | None) -> str:
        """Under the lock: the id of a new request (`request_id`, or the next "req-N"), refused once
        `shutdown` began or while a request of that id runs."""
        if self._stopping:
            raise EngineStopped("the engine is shutting down")
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        return request_id

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            request = self._requests.get(handle.request_id)
            if request is None or request.handle is not handle:
                return
            request.cancelled = True
            if not self._is_running(request):
                self._end(request, "cancelled")

    def _append(self, request, token: int, now: float) -> bool:
        """Under the lock: records `token` and publishes it; True when it ended the request (`stop_reason`)."""
        request.generated.append(token)
        if request.first_token is None:
            request.first_token = now
        self._counters["generation_tokens"] += 1
        reason, text = stop_reason(request.params, request.generated, self._eos, self.tokenizer)
        if text is not None:
            request.text = text
        logprobs = getattr(request, "logprobs", None)  # recorded before the token is appended
        entries = logprobs[len(request.generated) - 1 : len(request.generated)] if logprobs else []
        if reason is None:
            request.handle.publish([token], None, entries)
            return False
        self._end(request, reason, new_tokens=[token], new_logprobs=entries)
        return True

    def _end(self, request, reason: str, error: str | None = None, new_tokens=(), new_logprobs=()) -> None:
        """The one place a request ends (under the lock): what it holds released, its output published."""
        self._release(request)
        key = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(reason, "requests_finished")
        self._counters[key] += 1
        output = ended_output(request, request.request_id, request.adapter, reason, error, self.clock(),
                              self.tokenizer, preemptions=request.preemptions)  # fmt: skip
        request.handle.publish(list(new_tokens), output, list(new_logprobs))
