"""The naive per-request peft server, as a baseline for the load test: one request at a time.

`NaiveEngine` has the engine interface that `fused_train.serving.server.build_app` uses, so
`build_app(NaiveEngine(...), ...)` serves the same OpenAI API as our `Engine`. Behind it, what a
peft user writes first: a worker thread takes requests in arrival order from a bounded queue, and
for each one `set_adapter` (or the base with the adapters disabled), a prefill, then token-by-token
decoding with a `DynamicCache`, each token published to the request's handle as it is made (so
the time to first token it shows is honest). Sampling is the engine's (`runner.sample`, one seeded
generator per request; greedy at temperature 0), and so are the stop rules, so both give the same
tokens for the same greedy request.

    python bench/naive_engine.py serve --model DIR --adapter a=DIR_A --adapter b=DIR_B --port 8001
"""

import argparse
import contextlib
import inspect
import os
import sys
import threading
import time
from collections import deque

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from fused_train.ops.checks import check_int  # noqa: E402
from fused_train.serving.requests import (  # noqa: E402
    RequestHandle, RequestLoop, SamplingParams, encode_prompt, request_generator, suppress_stops,
)
from fused_train.serving.adapter_files import check_adapter_dir  # noqa: E402
from fused_train.serving.scheduler import QueueFull  # noqa: E402
from fused_train.serving.runner import sample  # noqa: E402



class _Request:
    def __init__(self, request_id, prompt_ids, params, adapter, handle, arrival):
        self.request_id, self.prompt_token_ids, self.params, self.adapter = request_id, prompt_ids, params, adapter
        self.handle, self.arrival = handle, arrival
        self.generator = request_generator(params.seed)
        self.generated: list[int] = []
        self.text: str | None = None
        self.first_scheduled = self.first_token = None
        self.cancelled = False
        self.preemptions = 0  # one request at a time: none is ever preempted


class NaiveEngine(RequestLoop):
    """One request at a time over a peft model (see the module docstring).

    Args:
        model: a `peft.PeftModel`, or a plain transformers causal LM (wrapped in peft when
            `adapters` are given).
        tokenizer: the model's Hugging Face tokenizer (the server needs it).
        adapters: name -> peft adapter directory (safetensors only, as the pool's rule).
        max_waiting: requests queued at most; `add_request` raises `QueueFull` beyond.
    """

    def __init__(self, model, tokenizer=None, *, adapters=None, max_waiting: int = 1024, clock=time.monotonic):
        from peft import PeftModel

        check_int(max_waiting=max_waiting)
        if not hasattr(model, "config") or not hasattr(model, "generation_config"):
            raise ValueError(f"model must be a transformers causal LM or a peft model, got {type(model).__name__}")
        self.tokenizer, self.clock, self.max_waiting = tokenizer, clock, max_waiting
        self._names: list[str] = list(model.peft_config) if isinstance(model, PeftModel) else []
        for name, path in (adapters or {}).items():
            self._check_adapter(name, path)
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            self._names.append(name)
        self.model = model.eval()
        config = model.config.get_text_config(decoder=True)
        self._vocab = config.vocab_size
        eos = model.generation_config.eos_token_id
        eos = config.eos_token_id if eos is None else eos
        self._eos = frozenset([eos] if isinstance(eos, int) else eos or ())
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns).
        forward = model.get_base_model().forward if isinstance(model, PeftModel) else model.forward
        self._cache_kwarg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = next(model.parameters()).dtype.itemsize
        self._kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize
        super().__init__("naive-engine")
        self._model_lock = threading.Lock()  # adapters are added or removed between requests, never during one
        self._waiting: deque[_Request] = deque()
        self._running: _Request | None = None
        self._start()

    # ---------------------------------------------------------------- the engine interface

    def add_request(self, prompt, params: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None) -> RequestHandle:  # fmt: skip
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.prompt_logprobs is not None or params.max_tokens == 0:
            raise ValueError("the naive baseline scores no prompt (prompt_logprobs) and draws at least one token "
                             "(max_tokens >= 1)")  # fmt: skip
        prompt_ids = encode_prompt(prompt, self.tokenizer)
        if not prompt_ids:
            raise ValueError("prompt must hold at least one token")
        if any(not 0 <= t < self._vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self._vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer; give stop_token_ids instead")
        with self._lock:
            if adapter is not None and adapter not in self._names:
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {self._names}")
            request_id = self._new_request_id(request_id)
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            handle = RequestHandle(self, request_id)
            request = _Request(request_id, prompt_ids, params, adapter, handle, self.clock())
            self._requests[request_id] = request
            self._waiting.append(request)
            self._counters["prompt_tokens"] += len(prompt_ids)
            self._lock.notify_all()
        return handle

    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def load_adapter(self, name: str, path) -> None:
        path = os.fspath(path)
        self._check_adapter(name, path)
        with self._model_lock:
            with self._lock:
                if name in self._names:
                    raise ValueError(f"adapter {name!r} is already loaded")
            self.model.load_adapter(path, adapter_name=name)
            with self._lock:
                self._names.append(name)

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            with self._lock:
                if name not in self._names:
                    raise ValueError(f"unknown adapter {name!r}; loaded: {self._names}")
                self._names.remove(name)
            self.model.delete_adapter(name)

    def metrics(self) -> dict:
        """Engine.metrics' keys: no pages here (a DynamicCache per request), so the page counts are 0."""
        with self._lock:
            running = self._running
            tokens = 0 if running is None else len(running.prompt_token_ids) + len(running.generated)
            return dict(
                self._counters,
                waiting=len(self._waiting),
                running=int(running is not None),
                batch_size=int(running is not None),
                preemptions=0,
                kv_pages_total=0,
                kv_pages_used=0,
                kv_pages_free=0,
                kv_page_size=0,
                kv_bytes=tokens * self._kv_bytes_per_token,
                kv_bytes_per_token=self._kv_bytes_per_token,
                adapters=dict(hits=0, loads=0, evictions=0, disk_reads=len(self._names), cpu_evictions=0,
                              load_ms=0.0, resident=list(self._names), host=[], pinned=[],
                              leased_slots=[]),  # fmt: skip
            )

    # ---------------------------------------------------------------- the worker

    def _check_adapter(self, name, path) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        check_adapter_dir(path)  # the pool's rule for files: safetensors, never pickles

    def _is_running(self, request: _Request) -> bool:
        return request is self._running  # the worker ends a running one between two tokens

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._stopping)
                if self._stopping and not self._drain:
                    for request in list(self._waiting):
                        self._end(request, "cancelled")
                if not self._waiting:
                    return
                request = self._running = self._waiting.popleft()
                request.first_scheduled = self.clock()
            try:
                with self._model_lock:
                    self._decode(request)
            except Exception as error:  # noqa: BLE001 - the request fails alone, the worker goes on
                with self._lock:
                    self._end(request, "error", f"{type(error).__name__}: {error}")

    @torch.inference_mode()
    def _decode(self, request: _Request) -> None:
        from transformers import DynamicCache

        model = self.model
        if request.adapter is not None:
            model.set_adapter(request.adapter)
            adapter_context = contextlib.nullcontext()
        else:
            adapter_context = model.disable_adapter() if self._names else contextlib.nullcontext()
        device = next(model.parameters()).device
        cache = DynamicCache()
        input_ids = torch.tensor([request.prompt_token_ids], device=device)
        with adapter_context:
            while True:
                started = time.perf_counter()
                logits = model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}).logits[0, -1]
                logits = suppress_stops(logits.float().cpu(), request.params, request.generated, self._eos)
                token = sample(logits, request.params.temperature, request.params.top_p, request.params.top_k,
                               request.generator)  # fmt: skip
                with self._lock:
                    self._counters["steps"] += 1
                    self._counters["step_tokens"] += input_ids.shape[1]
                    self._counters["step_seconds"] += time.perf_counter() - started
                    if request.cancelled:
                        self._end(request, "cancelled")
                        return
                    if self._append(request, token, self.clock()):
                        return
                input_ids = torch.tensor([[token]], device=device)

    def _release(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if self._running is request:
            self._running = None
        elif request in self._waiting:
            self._waiting.remove(request)


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI API over a NaiveEngine (uvicorn, until Ctrl-C)")
    serve.add_argument("--model", required=True, help="Hugging Face model directory")
    serve.add_argument("--adapter", action="append", type=_named_path, default=[], metavar="NAME=PATH")
    serve.add_argument("--adapter-dir", action="append", default=[], help="folders /v1/load_lora_adapter may read")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--served-model-name", help="the base model's name in the API (default: the folder's name)")
    serve.add_argument("--api-key")
    serve.add_argument("--max-waiting", type=int, default=1024)
    args = parser.parse_args(argv)

    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fused_train.serving.server import build_app

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = NaiveEngine(model, tokenizer, adapters=dict(args.adapter), max_waiting=args.max_waiting)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = build_app(engine, model_name=name, adapter_dirs=args.adapter_dir, api_key=args.api_key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown(drain=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
