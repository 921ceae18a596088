"""Scale-out on Ray Serve: replicas of the engine, with requests for an adapter routed to a replica
that holds it (Ray Serve's model multiplexing), behind the same OpenAI-compatible app as
`fused-train serve`.

    from ray import serve
    from fused_train.serving.ray_serve import build_deployment
    serve.run(build_deployment("models/tiny", {"support": "adapters/support", "legal": "adapters/legal"},
                               num_replicas=2, max_models_per_replica=2))

or, from a shell or a Serve config file, `serve run fused_train.serving.ray_serve:app_builder
model_dir=models/tiny adapters=support=adapters/support,legal=adapters/legal`.

Two deployments. `EngineDeployment`: one `Engine` per replica, over the model directory with its
own tokenizer. Its adapters are Serve's multiplexed models, keyed by name: a request names its
adapter with `handle.options(multiplexed_model_id=name)` (the base model: no id), the router sends
it to a replica that holds that adapter (or, when none does, to the one holding fewest), and the
replica loads it into its engine's pool on a miss. At most `max_models_per_replica` adapters stay
in a replica; Serve drops the least recently used one by calling its model object's `__del__`,
which unloads it from the engine, or, while requests of that adapter still run there, once the
last of them ends. `generate` streams the request's token ids, then its `RequestOutput`.
`OpenAIIngress`: `fused_train.serving.server.build_app` over `RemoteEngine`, a stand-in for the
engine that forwards each request to `EngineDeployment` with the request's adapter as its model
id, so the HTTP API is the one `fused-train serve` has.

Adapter paths are read by the replicas, so on several machines they must be on a filesystem every
node sees (or the same path on each). The adapter set is fixed when the application is built:
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are refused (redeploy to change it).
"""

import asyncio
import os
import threading
from collections import Counter

try:
    from ray import serve
except ImportError as error:  # ray is an optional extra
    raise ImportError(
        "fused_train.serving.ray_serve needs Ray Serve: pip install 'fused_train[ray]'"
    ) from error

from ray.exceptions import RayError, RayTaskError

from fused_train.ops.checks import check_int
from fused_train.serving.requests import RequestFailed, RequestOutput, SamplingParams
from fused_train.serving.loading import open_engine
from fused_train.serving.routing import Route, parse_route

__all__ = ["EngineDeployment", "OpenAIIngress", "RemoteEngine", "app_builder", "build_deployment"]

_COUNTERS = ("requests_finished", "requests_cancelled", "requests_failed", "prompt_tokens", "generation_tokens")
# A replica's engine batches every request it is sent, so Serve must not cap them at its default
# of 5 in flight; the engine's own queue bound (`max_waiting`) refuses what is beyond.
MAX_ONGOING_REQUESTS = 1024


class _Resident:
    """What Serve's multiplexer holds for one adapter in one replica: Serve calls `__del__` when it
    evicts the adapter (and Python calls it once more when the object is collected)."""

    def __init__(self, deployment: "EngineDeployment", name: str):
        self._deployment, self.name, self._evicted = deployment, name, False

    def __del__(self):
        if not self._evicted:
            self._evicted = True
            self._deployment._evict(self.name)


class EngineDeployment:
    """One engine per replica; its adapters are multiplexed models (see the module docstring).

    Args:
        model_dir: a Hugging Face model directory with its tokenizer.
        adapters: name -> peft adapter directory, the adapters requests may name.
        max_models_per_replica: adapters a replica holds at most (Serve evicts the least recently
            used beyond); the engine's `max_loras` should be at least this.
        engine_kwargs: keyword arguments of `fused_train.serving.loading.open_engine`: `device` (None: CUDA when
            there is one), `dtype`, and the `Engine`'s (kv_dtype, max_loras, kv_cache_tokens, ...).
    """

    def __init__(self, model_dir: str, adapters: dict, max_models_per_replica: int = 2,
                 engine_kwargs: dict | None = None):  # fmt: skip
        self.engine = open_engine(model_dir, **(engine_kwargs or {}))
        self._paths = dict(adapters)
        self._lock = threading.Lock()  # Serve runs a synchronous `__del__` in a worker thread
        self._running = Counter()  # adapter -> requests of it in this replica now
        self._unload_when_idle: set[str] = set()
        self._loads = Counter()
        self._served = Counter()

        async def load(name: str) -> _Resident:
            return await self._load(name)

        # A method decorated here, rather than in the class body, so that K is an argument.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)

    async def _load(self, name: str) -> _Resident:
        if name not in self._paths:
            raise ValueError(f"unknown adapter {name!r}; this deployment serves {sorted(self._paths)}")
        with self._lock:
            still_loaded = name in self._unload_when_idle
            self._unload_when_idle.discard(name)
            self._loads[name] += 1
        if not still_loaded:
            await asyncio.to_thread(self.engine.load_adapter, name, self._paths[name])
        return _Resident(self, name)

    def _evict(self, name: str) -> None:
        with self._lock:
            if self._running[name]:
                self._unload_when_idle.add(name)
                return
        self.engine.unload_adapter(name)

    def _release(self, name: str) -> None:
        with self._lock:
            self._running[name] -= 1
            unload = not self._running[name] and name in self._unload_when_idle
            if unload:
                self._unload_when_idle.discard(name)
        if unload:
            self.engine.unload_adapter(name)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        """Stream the request's id once its engine has queued it, then its token ids (pairs of a
        token id and its logprobs where the request asked for them; before them the list of its
        prompt's logprobs where it asked for those), then its `RequestOutput`; the
        adapter is the request's multiplexed model id (none: the base model).
        Raises what `Engine.add_request` raises."""
        name = serve.get_multiplexed_model_id() or None
        if name is not None:
            await self._get_adapter(name)
            with self._lock:  # no await since the adapter was found: Serve cannot evict it in between
                self._running[name] += 1
        try:
            handle = self.engine.add_request(prompt_token_ids, params, name, request_id)
            try:
                yield handle.request_id  # queued: the ingress returns its handle now
                async for item in handle.stream(logprobs=params.logprobs is not None,
                                                prompt_logprobs=params.prompt_logprobs is not None):  # fmt: skip
                    yield item  # (token id, its logprobs) where the request asked for them; the prompt's first
            except RequestFailed:
                pass  # the output below says why; the ingress raises it there
            finally:
                if not handle.done():  # the caller went away (Serve cancelled this generator)
                    handle.cancel()
            with self._lock:
                self._served[name] += 1
            yield handle.result()
        finally:
            if name is not None:
                self._release(name)

    def stats(self) -> dict:
        """This replica's own counters: its id, the adapters Serve holds in it now, how many times
        each was loaded into it, how many requests of each (None: the base model) it served, and its
        engine's `metrics()`."""
        with self._lock:
            held = [name for name in self.engine.adapters() if name not in self._unload_when_idle]
            return dict(replica=serve.get_replica_context().replica_id.unique_id, adapters=held,
                        loads=dict(self._loads), served=dict(self._served), metrics=self.engine.metrics())  # fmt: skip

    def __del__(self):
        self.engine.shutdown(drain=False)


class RemoteRequest:
    """`RequestHandle`'s interface over a streaming call of `EngineDeployment.generate`."""

    def __init__(self, engine: "RemoteEngine", response):
        self.request_id: str | None = None
        self._engine = engine
        self._response = response
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ended = threading.Event()

    async def _next(self):
        """The call's next item; raises what the replica raised, as the local engine raises it."""
        try:
            return await self._response.__anext__()
        except RayTaskError as error:
            raise error.cause from None
        except RayError as error:  # the replica died, or the call was cancelled
            raise RequestFailed(f"request {self.request_id} failed: {type(error).__name__}: {error}") from error

    async def stream(self, logprobs: bool = False, prompt_logprobs: bool = False):
        """The request's token ids as its replica produces them (`RequestHandle.stream`'s items);
        raises `RequestFailed` if it fails."""
        try:
            while not isinstance(item := await self._next(), RequestOutput):
                if isinstance(item, list):  # the prompt's logprobs
                    if prompt_logprobs:
                        yield item
                    continue
                token, entry = item if isinstance(item, tuple) else (item, None)
                yield (token, entry) if logprobs else token
        except BaseException as error:
            gone = isinstance(error, (GeneratorExit, asyncio.CancelledError))  # our caller went away
            self._end(None, error, "requests_cancelled" if gone else "requests_failed")
            raise
        self._end(item, None, _OUTCOMES.get(item.finish_reason, "requests_finished"))
        if item.finish_reason == "error":
            raise RequestFailed(f"request {item.request_id} failed: {item.error}")

    async def wait(self) -> RequestOutput:
        """`RequestHandle.wait`: the `RequestOutput` once the request ends, its stream consumed (the
        replica sends every token); raises `RequestFailed` if it fails."""
        async for _ in self.stream():
            pass
        return self.result(timeout=0)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The `RequestOutput`, once `stream()` has ended; raises what ended it otherwise."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not end within {timeout} s")
        if self._output is None:
            raise self._error
        return self._output

    def cancel(self) -> None:
        if self._output is None:  # the replica's generator is cancelled, and cancels its request
            self._response.cancel()
            self._end(None, RequestFailed(f"request {self.request_id} was cancelled"), "requests_cancelled")

    def _end(self, output: RequestOutput | None, error: BaseException | None, outcome: str) -> None:
        if self._ended.is_set():
            return
        self._output, self._error = output, error
        self._engine._count(outcome, output)
        self._ended.set()


_OUTCOMES = {"cancelled": "requests_cancelled", "error": "requests_failed"}


class RemoteEngine:
    """The engine interface `build_app` uses, over the handle of an `EngineDeployment`: each request
    goes to a replica chosen by its adapter (`multiplexed_model_id`). The tokenizer is local; the
    metrics are this ingress's own (the requests through it)."""

    def __init__(self, handle, tokenizer, adapters):
        self.tokenizer = tokenizer
        self._handle = handle.options(stream=True)
        self._adapters = list(adapters)
        self._counters = Counter(dict.fromkeys(_COUNTERS, 0))
        self._running = 0

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                          request_id: str | None = None) -> RemoteRequest:  # fmt: skip
        """Returns the request's handle once a replica's engine has queued it; raises what that
        engine's `add_request` raised."""
        if adapter is not None and adapter not in self._adapters:
            raise ValueError(f"unknown adapter {adapter!r}; loaded: {self._adapters}")
        handle = self._handle if adapter is None else self._handle.options(multiplexed_model_id=adapter)
        request = RemoteRequest(self, handle.generate.remote(list(prompt_token_ids), params, request_id))
        try:
            request.request_id = await request._next()
        except BaseException:
            request._response.cancel()  # our caller went away meanwhile (or the replica refused: a no-op)
            raise
        self._counters["prompt_tokens"] += len(prompt_token_ids)
        self._running += 1
        return request

    def _count(self, outcome: str, output: RequestOutput | None) -> None:
        self._running -= 1
        self._counters[outcome] += 1
        self._counters["generation_tokens"] += 0 if output is None else len(output.token_ids)

    def metrics(self) -> dict:
        return dict(self._counters, running=self._running)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path) -> None:
        raise ValueError("the adapters of a Ray Serve application are fixed when it is built; redeploy to change them")

    def unload_adapter(self, name: str) -> None:
        raise ValueError("the adapters of a Ray Serve application are fixed when it is built; redeploy to change them")


@serve.ingress()  # the app is built in the replica, over its own RemoteEngine
class OpenAIIngress:
    """The OpenAI-compatible app of `fused-train serve` (`build_app`) over `RemoteEngine`."""

    def __init__(self, engine_handle, model_dir: str, adapters: dict, model_name: str, api_key: str | None = None,
                 routes=(), quality_window: int = 100):  # fmt: skip
        from transformers import AutoTokenizer

        self.engine = RemoteEngine(engine_handle, AutoTokenizer.from_pretrained(model_dir), adapters)
        self._app_options = dict(model_name=model_name, adapter_paths=dict(adapters), api_key=api_key,
                                 routes=list(routes), quality_window=quality_window)  # fmt: skip

    def __serve_build_asgi_app__(self):
        from fused_train.serving.server import build_app

        return build_app(self.engine, **self._app_options)


def build_deployment(model_dir: str, adapters: dict, *, num_replicas: int = 2, max_models_per_replica: int = 2,
                     served_model_name: str | None = None, api_key: str | None = None,
                     engine_kwargs: dict | None = None, ray_actor_options: dict | None = None, routes=(),
                     quality_window: int = 100):  # fmt: skip
    """The Serve application: `OpenAIIngress` in front of `num_replicas` replicas of
    `EngineDeployment`, each holding at most `max_models_per_replica` of `adapters` (name -> peft
    adapter directory) at a time. `served_model_name` is the base model's `model` name (default:
    the directory's name); `engine_kwargs` go to each replica's `open_engine` (device, dtype and the
    `Engine`'s options); `ray_actor_options` are each engine replica's resources (e.g.
    `{"num_gpus": 1}`); `routes` and `quality_window` are `build_app`'s (A/B routes, the quality
    signals' window). Run it with `serve.run(app)`."""
    check_int(num_replicas=num_replicas, max_models_per_replica=max_models_per_replica, quality_window=quality_window)
    routes = [route if isinstance(route, Route) else parse_route(route) for route in routes]  # a bad spec: now
    if not os.path.isdir(model_dir):
        raise ValueError(f"model_dir must be a model directory, got {model_dir!r}")
    adapters = {str(name): os.fspath(path) for name, path in dict(adapters).items()}
    engine = serve.deployment(EngineDeployment, num_replicas=num_replicas, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                              ray_actor_options=ray_actor_options or {})  # fmt: skip
    ingress = serve.deployment(OpenAIIngress, max_ongoing_requests=MAX_ONGOING_REQUESTS)
    model_name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    return ingress.bind(engine.bind(model_dir, adapters, max_models_per_replica, engine_kwargs), model_dir, adapters,
                        model_name, api_key, routes, quality_window)  # fmt: skip


def app_builder(args: dict):
    """`serve run fused_train.serving.ray_serve:app_builder model_dir=DIR adapters=NAME=DIR,NAME=DIR
    [num_replicas=2] [max_models_per_replica=2] [served_model_name=NAME] [api_key=KEY]
    [routes="NAME=ARM:WEIGHT,...;NAME=..."] [quality_window=100]`, or the same keys under an
    application's `args:` in a Serve config file, where `adapters`, `engine_kwargs` and
    `ray_actor_options` may be mappings and `routes` a list."""
    args = dict(args)
    if "model_dir" not in args:
        raise ValueError("app_builder needs model_dir=DIR")
    adapters = args.pop("adapters", {})
    if isinstance(adapters, str):
        items = [item.partition("=") for item in adapters.split(",") if item]
        if any(not name or not sep or not path for name, sep, path in items):
            raise ValueError(f"adapters must be NAME=DIR,NAME=DIR..., got {adapters!r}")
        adapters = {name: path for name, _, path in items}
    if isinstance(args.get("routes"), str):
        args["routes"] = [route for route in args["routes"].split(";") if route]
    for arg in ("num_replicas", "max_models_per_replica", "quality_window"):
        if arg in args:
            try:
                args[arg] = int(args[arg])
            except (TypeError, ValueError):
                raise ValueError(f"{arg} must be an int, got {args[arg]!r}") from None
    known = {"model_dir", "num_replicas", "max_models_per_replica", "served_model_name", "api_key", "engine_kwargs",
             "ray_actor_options", "routes", "quality_window"}  # fmt: skip
    if set(args) - known:
        raise ValueError(f"unknown app_builder args {sorted(set(args) - known)}; known: {sorted(known | {'adapters'})}")
    return build_deployment(args.pop("model_dir"), adapters, **args)
