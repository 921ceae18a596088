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
    report = json.loads((tmp_path / f"serving_engine_{'cuda' if torch.cuda.is_available() else 'cpu'}.json").read_text())
    engine, static = report["ways"]["engine_int8"], report["ways"]["peft_static"]
    assert engine["output_tokens"] == static["output_tokens"] > 0
    assert engine["kv_bytes_per_token"] < static["kv_bytes_per_token"]
    assert engine["ttft_ms_p99"] >= engine["ttft_ms_p50"] > 0
