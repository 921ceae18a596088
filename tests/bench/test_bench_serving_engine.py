"""The serving bench runs its trace through the engine and a peft baseline and reports what it
claims (it checks itself that every way delivered every asked-for token)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_bench_serving_engine_small_trace(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO / "bench" / "bench_serving_engine.py"), "--requests", "6", "--rate", "100",
               "--ways", "engine_int8,peft_static", f"--out={tmp_path}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = json.loads((tmp_path / f"serving_engine_{device}.json").read_text())
    engine, static = report["ways"]["engine_int8"], report["ways"]["peft_static"]
    assert engine["output_tokens"] == static["output_tokens"] > 0
    assert engine["kv_bytes_per_token"] < static["kv_bytes_per_token"]
    assert engine["ttft_ms_p99"] >= engine["ttft_ms_p50"] > 0


def _run(tmp_path, *args):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO / "bench" / "bench_serving_engine.py"), *args, f"--out={tmp_path}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(tmp_path.glob("serving_*.json")).read_text())


def test_bench_serving_engine_shared_prefix_compares_with_and_without_the_cache(tmp_path):
    report = _run(tmp_path, "--workload", "shared-prefix", "--requests", "8", "--rate", "100", "--systems", "2",
                  "--system-tokens", "64")  # fmt: skip
    cached, uncached = report["ways"]["prefix_cache"], report["ways"]["no_prefix_cache"]
    assert cached["output_tokens"] == uncached["output_tokens"] == 8 * 8
    assert cached["prefix_cache_hits"] > 0 and uncached["prefix_cache_hits"] == 0
    assert report["ttft_p50_cache_over_no_cache"] == cached["ttft_ms_p50"] / uncached["ttft_ms_p50"]


def test_bench_serving_engine_long_prompt_times_decodes_chunked_and_in_one_step(tmp_path):
    report = _run(tmp_path, "--workload", "long-prompt", "--long-prompt-tokens", "96", "--decoders", "2",
                  "--max-batch-tokens", "32")  # fmt: skip
    assert report["runs"]["chunked"]["max_batch_tokens"] == 32 and report["runs"]["one_step"]["max_batch_tokens"] == 98
    for run in report["runs"].values():
        assert run["itl_during_ms_max"] >= run["itl_during_ms_p50"] > 0 and run["long_prompt_ttft_ms"] > 0
