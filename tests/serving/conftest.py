"""Fixtures of the serving tests: the tiny servable model and its adapters on disk (bench/tiny_serving.py),
and live OpenAI-compatible servers over an `Engine` on 127.0.0.1, stopped by the fixture even when a test fails.

    def test_x(live_server):                      # one server per test module, adapters "a".."d"
        client = live_server.client()             # an openai.OpenAI on its /v1
    def test_y(serve):                            # a server of its own, stopped after the test
        server = serve(max_waiting=1, api_key="k")

The engines run the PyTorch reference path (`reference_path`): through Triton's interpreter a step
of the tiny model takes seconds, and the kernels have their own tests.
"""

import contextlib
import os
from dataclasses import dataclass

import pytest

from bench.tiny_serving import make_adapters, make_model_dir
from fused_train.serving.loading import open_engine
from fused_train.serving import Engine

MODEL_NAME = "tiny"
# What a live server and its clients need: the `serve` extra and `openai` (the `test` extra). The
# engine's tests need neither, so the server is imported only where one starts.
SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai")
ADAPTER_RANKS = {"a": 4, "b": 8, "c": 12, "d": 16}
# Small enough to start in a second, large enough for every test's requests at once.
ENGINE_OPTIONS = dict(kv_dtype="int8", kv_cache_tokens=8192, max_batch_tokens=1024)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    engine: Engine
    model_name: str
    adapters: dict  # name -> directory of the adapters loaded at start
    api_key: str | None = None

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=60, **options)  # fmt: skip

    def async_client(self, **options):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=60, **options)  # fmt: skip


def assert_error(response, status, param=None, code=None, match=""):
    """`response` (httpx) carries OpenAI's error shape with this status, param and code, its
    message holding `match`; returns the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and match in error["message"], error
    return error


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """name -> directory, all in one folder (the `adapter_dirs` root of the servers here)."""
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("tiny_adapters"), ADAPTER_RANKS)


@pytest.fixture(scope="module")
def reference_path():
    # fused_train.ops.dispatch reads TRITON_INTERPRET per call, in the engine's thread too.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        yield


@contextlib.contextmanager
def running(model_dir, adapters, *, api_key=None, adapter_dirs=None, engine=None, max_body_bytes=None, routes=(),
            quality_window=100, **engine_options):  # fmt: skip
    """A LiveServer over `engine` (or a new Engine on `model_dir` with `adapters` and `engine_options`
    over ENGINE_OPTIONS); server and engine are stopped on exit. `max_body_bytes` None: the server's
    default; `routes` and `quality_window` are `build_app`'s. Skips the test where SERVER_PACKAGES are
    not installed."""
    for name in SERVER_PACKAGES:
        pytest.importorskip(name)
    from fused_train.serving.server import build_app, start_server

    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    if adapter_dirs is None:
        adapter_dirs = sorted({os.path.dirname(path) for path in adapters.values()})
    engine = engine or open_engine(model_dir, adapters, **{**ENGINE_OPTIONS, **engine_options})
    try:
        app = build_app(engine, model_name=MODEL_NAME, adapter_dirs=adapter_dirs, api_key=api_key,
                        adapter_paths=adapters, routes=routes, quality_window=quality_window, **limits)  # fmt: skip
        with start_server(app) as server:
            yield LiveServer(server.url, engine, MODEL_NAME, dict(adapters), api_key)
    finally:
        engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tiny_adapters, reference_path):
    """One server for the module: the tiny model, adapters "a".."d", no api key."""
    with running(tiny_model_dir, tiny_adapters) as server:
        yield server


@pytest.fixture
def serve(tiny_model_dir, tiny_adapters, reference_path):
    """serve(**options) -> LiveServer of this test (options as `running`'s; adapters default to
    "a".."d"); every one started is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(adapters=None, **options):
            return stack.enter_context(running(tiny_model_dir, tiny_adapters if adapters is None else adapters,
                                               **options))  # fmt: skip

        yield start
