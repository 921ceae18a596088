"""bench/load_test.py against a live server on 127.0.0.1 (the tiny model over our Engine): its counts add
up and its figures are computed from the per-request records it writes; it refuses non-loopback
URLs. bench/naive_engine.py, the baseline it can start, gives our Engine's greedy tokens."""

import json

import pytest

from tests.serving.conftest import SERVER_PACKAGES

for package in SERVER_PACKAGES:  # skipped where the serve extra or openai is not installed
    pytest.importorskip(package)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench import load_test  # noqa: E402
from bench.naive_engine import NaiveEngine  # noqa: E402
from bench.tiny_serving import make_adapters, make_model_dir  # noqa: E402
from fused_train.serving import Engine, QueueFull, SamplingParams  # noqa: E402
from fused_train.serving.loading import open_engine  # noqa: E402
from fused_train.serving.server import build_app, start_server  # noqa: E402

MODEL_NAME = "tiny"


@pytest.fixture(scope="module")
def reference_path():
    # The engines run the PyTorch reference path: through Triton's interpreter a step takes seconds.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_test")
    model_dir = make_model_dir(root / "model")
    return model_dir, make_adapters(model_dir, root / "adapters", {"a": 4, "b": 8})


@pytest.fixture(scope="module")
def live(tiny, reference_path):
    model_dir, adapters = tiny
    engine = open_engine(model_dir, adapters, kv_dtype="int8", kv_cache_tokens=4096, max_batch_tokens=1024)
    try:
        with start_server(build_app(engine, model_name=MODEL_NAME, adapter_paths=adapters)) as server:
            yield server.url, engine
    finally:
        engine.shutdown(drain=False)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://[2001:db8::1]:80", "ftp://127.0.0.1/"])  # fmt: skip
def test_refuses_non_loopback(url, capsys):
    with pytest.raises(ValueError, match="--base-url"):
        load_test.check_loopback(url)
    with pytest.raises(SystemExit) as exit:
        load_test.main(["--base-url", url])
    assert exit.value.code == 2 and "--base-url" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://127.9.8.7:1", "http://localhost:80",
                                 "https://[::1]:8443"])  # fmt: skip
def test_accepts_loopback(url):
    assert load_test.check_loopback(url) == url.rstrip("/")


def _stats_ms(values):
    values = np.asarray(values) * 1e3
    return dict(mean=values.mean(), **{f"p{p}": np.percentile(values, p) for p in (50, 95, 99)})


def test_counts_add_up_and_figures_come_from_the_records(live, tmp_path):
    url, engine = live
    tokens_before = engine.metrics()["generation_tokens"]
    argv = ["--base-url", url, "--num-adapters", "2", "--request-rate", "40", "--num-requests", "12",
            "--max-tokens", "5", "--warmup", "0", "--slo-ttft-ms", "60000", "--out", str(tmp_path)]  # fmt: skip
    assert load_test.main(argv) == 0
    report = json.loads((tmp_path / "load_test.json").read_text())
    assert (tmp_path / "load_test.png").stat().st_size > 0
    assert report["models"] == ["a", "b"]
    (run,) = report["runs"]
    summary, records = run["summary"], run["requests"]
    assert summary["sent"] == len(records) == 12
    assert summary["ok"] + summary["errors"] == summary["sent"] and summary["errors"] == 0
    assert {r["model"] for r in records} <= {"a", "b"}
    # The output tokens counted are the ones the engine made (usage), at most max_tokens each.
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in records)
    assert summary["output_tokens"] == engine.metrics()["generation_tokens"] - tokens_before
    assert all(1 <= r["output_tokens"] <= 5 for r in records)
    for r in records:
        assert 0 < r["ttft"] <= r["e2el"] <= r["end"] - r["sent"] + 1e-6
        if r["output_tokens"] > 1:
            assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1))
    expected = {
        "ttft_ms": _stats_ms([r["ttft"] for r in records]),
        "tpot_ms": _stats_ms([r["tpot"] for r in records if r["tpot"] is not None]),
        "itl_ms": _stats_ms([gap for r in records for gap in r["itl"]]),
        "e2el_ms": _stats_ms([r["e2el"] for r in records]),
    }
    for metric, stats in expected.items():
        assert summary[metric] == pytest.approx(stats), metric
    duration = max(r["end"] for r in records)
    assert summary["duration_s"] == pytest.approx(duration)
    assert summary["requests_per_s"] == pytest.approx(12 / duration)
    assert summary["output_tokens_per_s"] == pytest.approx(summary["output_tokens"] / duration)
    assert summary["good"] == 12 and summary["goodput_requests_per_s"] == pytest.approx(12 / duration)


def test_the_shared_prefix_workload_puts_system_prompts_before_the_user_turns(live, tmp_path):
    url, engine = live
    hits_before = engine.metrics()["prefix_cache_hits"]
    argv = ["--base-url", url, "--num-adapters", "0", "--request-rate", "inf", "--max-concurrency", "1",
            "--num-requests", "6", "--max-tokens", "2", "--warmup", "0", "--workload", "shared-prefix",
            "--system-prompts", "2", "--system-prompt-tokens", "64", "--out", str(tmp_path)]  # fmt: skip
    assert load_test.main(argv) == 0
    (run,) = json.loads((tmp_path / "load_test.json").read_text())["runs"]
    assert run["summary"]["ok"] == 6
    # One request at a time over two system prompts: at least four of them find theirs cached.
    assert engine.metrics()["prefix_cache_hits"] - hits_before >= 4 * 48


def test_failed_requests_are_counted_as_errors(live, tmp_path):
    url, _ = live
    argv = ["--base-url", url, "--adapter-prefix", "missing", "--num-adapters", "2", "--request-rate", "inf",
            "--num-requests", "5", "--warmup", "0", "--slo-ttft-ms", "1000", "--out", str(tmp_path)]  # fmt: skip
    assert load_test.main(argv) == 0
    (run,) = json.loads((tmp_path / "load_test.json").read_text())["runs"]
    summary, records = run["summary"], run["requests"]
    assert summary["sent"] == summary["errors"] == 5 and summary["ok"] == 0 and summary["error_rate"] == 1.0
    assert all(r["status"] == 404 and "missing" in r["error"] for r in records)
    assert summary["ttft_ms"]["p99"] is None and summary["good"] == 0


def test_naive_engine_gives_the_engines_greedy_tokens(tiny, reference_path):
    model_dir, adapters = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in ("Return the value.", "Raise an error if x is None.")]
    requests = [(prompts[0], None), (prompts[1], "a"), (prompts[0], "b")]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ours = Engine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, adapters=adapters, kv_dtype="model",
                  kv_cache_tokens=1024)  # fmt: skip
    try:
        expected = [output.token_ids for output in ours.generate([p for p, _ in requests], params,
                                                                 [a for _, a in requests])]  # fmt: skip
    finally:
        ours.shutdown()
    naive = NaiveEngine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, adapters=adapters)
    try:
        handles = [naive.add_request(prompt, params, adapter) for prompt, adapter in requests]
        assert [list(handle) for handle in handles] == expected
        assert [handle.result(timeout=10).finish_reason for handle in handles] == ["length"] * 3
        assert len({tuple(tokens) for tokens in expected}) == 3  # the adapters change the output
        # Served by the same app: a streamed completion gives its tokens.
        with start_server(build_app(naive, model_name=MODEL_NAME)) as server:
            body = dict(model="a", prompt="Raise an error if x is None.", max_tokens=6, temperature=0, stream=True,
                        ignore_eos=True, stream_options={"include_usage": True})  # fmt: skip
            lines = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).text.splitlines()
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 6
        with pytest.raises(ValueError, match="unknown adapter"):
            naive.add_request(prompts[0], params, "nope")
        with pytest.raises(ValueError, match="prompt_logprobs"):  # rather than a token max_tokens=0 never asked for
            naive.add_request(prompts[0], SamplingParams(max_tokens=0, prompt_logprobs=1))
    finally:
        naive.shutdown()


def test_naive_engine_queue_is_bounded_and_cancels(tiny, reference_path):
    model_dir, adapters = tiny
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    naive = NaiveEngine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, adapters=adapters, max_waiting=1)
    try:
        long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        running = naive.add_request([1, 70, 71], long, "a")
        next(iter(running))  # it is decoding: the queue is empty again
        waiting = naive.add_request([1, 72], long, None)
        with pytest.raises(QueueFull):
            naive.add_request([1, 73], long, None)
        waiting.cancel()
        assert waiting.result(timeout=1).finish_reason == "cancelled" and waiting.result().token_ids == []
        running.cancel()
        output = running.result(timeout=10)
        assert output.finish_reason == "cancelled" and 1 <= len(output.token_ids) < 1000
        metrics = naive.metrics()
        assert metrics["requests_cancelled"] == 2 and metrics["waiting"] == metrics["running"] == 0
    finally:
        naive.shutdown(drain=False)
