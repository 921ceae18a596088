"""Smoke runs of the LoRA benches: they exit 0 and write their JSON and PNG with what they claim.

Like tests/bench/test_bench_kv.py, each runs as a user would, without TRITON_INTERPRET: on a CPU they
measure the PyTorch reference path.
"""

import json
import math

import pytest
import torch

from tests.bench.test_bench_kv import run_bench


def int4_row_bytes(fan_in):
    """Bytes per output row of an int4 weight: the packed levels of each 64-wide group (the last
    padded) plus its float32 scale and offset."""
    groups = math.ceil(fan_in / 64)
    return 32 * groups + 8 * groups


def test_bench_lora_writes_every_provider(tmp_path):
    run_bench("bench_lora.py", tmp_path)  # on a CPU, --quick or not, its reduced shapes
    stem = f"bench_lora_{'cuda' if torch.cuda.is_available() else 'cpu'}_quick"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    assert report["rows"] and report["summary"]
    for row in report["rows"]:
        for name in ("base", "peft", "fused", "fused_int8", "fused_int4"):
            assert row[f"{name}_ms"] > 0, name
        elements = row["fan_in"] * row["fan_out"]
        assert row["base_weight_mb"] * 2**20 == torch.finfo(getattr(torch, row["dtype"])).bits // 8 * elements
        assert row["fused_int8_weight_mb"] * 2**20 == elements + 4 * row["fan_out"]
        assert row["fused_int4_weight_mb"] * 2**20 == row["fan_out"] * int4_row_bytes(row["fan_in"])
        assert row["fused_int4_over_base"] == pytest.approx(row["fused_int4_ms"] / row["base_ms"])
    host = report["host_overhead"]
    assert host["base_us"] > 0 and host["peft_us"] > 0 and host["fused_us"] > 0
    assert ("wall time" if torch.cuda.is_available() else "stubbed") in host["method"]


def test_eval_quantized_base_quick_writes_its_report(tmp_path):
    stdout = run_bench("eval_quantized_base.py", tmp_path)
    report = json.loads((tmp_path / "quantized_base_quick.json").read_text())
    assert (tmp_path / "quantized_base_quick.png").stat().st_size > 0
    bases = report["bases"]
    assert list(bases) == ["float32", "int8", "int4"]
    for name, base in bases.items():
        assert base["fused_layers"] == 7 * 4, name  # 7 projections in each of the 4 layers
        assert len(base["lora_losses"]) == report["lora"]["steps"]
        # An undertrained model, but a broken dequantization would still move it by far more.
        assert abs(base["ppl_rel_diff_before_lora"]) < 0.05, name
        assert math.isfinite(base["ppl_after_lora"])
    assert bases["float32"]["ppl_rel_diff_before_lora"] == 0
    # Hidden 128 = 2 groups of 64; MLP 352 = 6 groups, the last half padding.
    int4 = 4 * 128 * int4_row_bytes(128) + 2 * 352 * int4_row_bytes(128) + 128 * int4_row_bytes(352)
    bf16 = 2 * (4 * 128 * 128 + 3 * 128 * 352)
    assert bases["int4"]["projection_bytes_over_bfloat16"] == pytest.approx(int4 / bf16)
    int8 = bf16 / 2 + 4 * (4 * 128 + 2 * 352 + 128)  # int8 weights + a float32 scale per output row
    assert bases["int8"]["projection_bytes_over_bfloat16"] == pytest.approx(int8 / bf16)
    assert "int4" in stdout
