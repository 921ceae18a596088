"""guidellm (the load generator vLLM's users run) against the server on 127.0.0.1 (issue 25): its
openai_http backend streams with vLLM's extensions (stream_options.continuous_usage_stats, ignore_eos,
max_completion_tokens), and every one of its requests must succeed with its TTFT measured."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("guidellm")

REQUESTS = 8
PROMPT_TOKENS = 16
OUTPUT_TOKENS = 8


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_streams_every_request_and_reports_ttft(live_server, tiny_model_dir, tmp_path, request_format):
    report = tmp_path / "guidellm.json"
    command = [sys.executable, "-m", "guidellm", "run",
               "--backend", f"kind=openai_http,target={live_server.url},model={live_server.model_name},"
                            f"request_format={request_format}",
               "--profile", "kind=synchronous",
               "--constraint", f"kind=max_requests,count={REQUESTS}",
               "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
               "--tokenizer", f"kind=hf_auto,model={tiny_model_dir}",
               "--output", f"kind=json,path={report}",
               "--disable-console"]  # fmt: skip
    # The tokenizer is the tiny model's on disk: nothing from the Hub.
    run = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    metrics = benchmark["metrics"]
    assert metrics["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    # ignore_eos and max_completion_tokens honoured: every request streamed all its tokens.
    output_tokens = metrics["output_token_count"]["successful"]
    assert output_tokens["min"] == output_tokens["max"] == OUTPUT_TOKENS
    ttft = metrics["time_to_first_token_ms"]["successful"]
    assert ttft["count"] == REQUESTS and ttft["min"] > 0
    throughput = metrics["output_tokens_per_second"]["successful"]["mean"]
    print(f"guidellm {request_format}: TTFT mean {ttft['mean']:.1f} ms, median {ttft['median']:.1f} ms, "
          f"p95 {ttft['percentiles']['p95']:.1f} ms; {throughput:.0f} output tokens/s")  # fmt: skip
