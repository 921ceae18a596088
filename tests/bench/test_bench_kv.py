"""Smoke runs of the int8 KV cache's benches: they exit 0 and write their JSON and PNG.

Each runs as a user would (`python bench/<script>.py --quick`), in a subprocess without
TRITON_INTERPRET (that tests/conftest.py sets for the kernel tests): on a CPU the benches measure
the PyTorch reference path, and the interpreter would make them time Python.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(script, out):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def test_eval_kv_quality_quick_writes_its_report(tmp_path):
    stdout = run_bench("eval_kv_quality.py", tmp_path)
    report = json.loads((tmp_path / "kv_quality.json").read_text())
    assert (tmp_path / "kv_quality.png").stat().st_size > 0
    assert {"settings", "environment", "runs", "pooled", "memory", "targets", "summary"} <= report.keys()
    (run,) = report["runs"]  # --quick trains one model
    assert {"seed", "training", "perplexity", "greedy"} <= run.keys()
    ppl, greedy, memory = run["perplexity"], run["greedy"], report["memory"]
    for key in ("ppl_full", "ppl_int8", "ppl_rel_diff", "ppl_full_forward_no_cache", "L", "documents"):
        assert key in ppl
    # The full-precision cache decodes what one forward over the whole sequence computes.
    assert ppl["ppl_full"] == pytest.approx(ppl["ppl_full_forward_no_cache"], rel=1e-4)
    for key in ("token_agreement", "identical_continuations", "teacher_forced_argmax_agreement",
                "max_abs_logit_diff", "mean_abs_logit_diff"):
        assert key in greedy
    assert 0 <= greedy["token_agreement"] <= 1 and greedy["max_abs_logit_diff"] >= 0
    assert 0 < memory["int8_bytes"] and 0 < memory["full_bytes"]
    # With one model the pooled figures are that model's.
    assert report["pooled"]["token_agreement"] == greedy["token_agreement"]
    assert report["pooled"]["ppl_rel_diff_worst"] == ppl["ppl_rel_diff"]
    metrics = {row["metric"]: row for row in report["summary"]}
    assert {"ppl_rel_diff_worst_seed", "greedy_token_agreement", "teacher_forced_argmax_agreement"} <= metrics.keys()
    assert metrics["ppl_rel_diff_worst_seed"]["result"] in ("pass", "miss")
    assert "perplexity" in stdout


def test_bench_kv_cache_quick_writes_its_report(tmp_path):
    run_bench("bench_kv_cache.py", tmp_path)
    reports = list(tmp_path.glob("kv_cache_*.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert reports[0].with_suffix(".png").stat().st_size > 0
    assert {"environment", "path", "timing", "targets", "summary", "rows"} <= report.keys()
    rows = [row for row in report["rows"] if row["status"] == "ok"]
    assert rows
    for row in rows:
        for key in ("ours_ms", "dynamic_sdpa_ms", "quantized_fp8_sdpa_ms", "kernel_ms", "ours_bytes",
                    "dynamic_sdpa_bytes", "ours_over_dynamic_time", "ours_over_dynamic_bytes"):
            assert key in row, key
        # int8 + a float32 scale per 128 values against bfloat16, 132 / 256 of the bytes, plus the
        # exact ring of 32 bfloat16 tokens (the timed layer holds context + 1 tokens).
        context = row["context"]
        assert row["ours_over_dynamic_bytes"] == pytest.approx((132 * (context + 1) + 256 * 32) / (256 * context))
    for entry in report["memory_by_context"]:
        assert entry["int8_only_over_dynamic"] == pytest.approx(132 / 256)
        context = entry["context"]
        assert entry["ours_over_dynamic"] == pytest.approx((132 * context + 256 * 32) / (256 * context))
    memory = report["targets"][0]
    assert "16384" in memory["target"] and memory["result"] == "pass"
