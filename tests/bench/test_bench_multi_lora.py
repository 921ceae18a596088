"""The multi-LoRA bench's providers compute the same layer, and its end-to-end part runs.

Each provider is timed on the same case; a provider that computed something else (a wrong peft
scaling, a slot mapped to the wrong adapter) would make the ratios meaningless, so the outputs are
compared here on a small case of each phase. The end-to-end part runs as a user runs it, in a
subprocess without TRITON_INTERPRET (on a CPU, the PyTorch reference path), and checks the
providers' logits itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_multi_lora
from fused_train.kernels.multi_lora_ref import multi_lora_linear_ref


@pytest.mark.parametrize("phase, tokens", [("decode", 32), ("prefill", 128)])
def test_every_layer_provider_computes_the_batch(phase, tokens):
    case = bench_multi_lora.make_case(phase, tokens, 48, 40, adapters=8, dtype=torch.float32, device="cpu")
    expected = multi_lora_linear_ref(
        case.x.double(), case.weight.double(), case.lora_a.double(), case.lora_b.double(), case.token_slots,
        case.scalings.double(), case.ranks,
    )  # fmt: skip
    with torch.no_grad():
        for name, builder in bench_multi_lora.PROVIDERS.items():
            if name == "base":
                continue
            got = builder(case)().reshape(tokens, -1)
            tolerance = 0.1 if name == "multi_lora_int8" else 1e-4  # int8 rounding of the base weight
            torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance, msg=name)


def test_end_to_end_part_writes_every_provider(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(repo / "bench" / "bench_multi_lora.py"), "--model-only", "--runs", "1",
               f"--out={tmp_path}"]  # fmt: skip
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "multi_lora_cpu_model.json").read_text())
    assert [row["phase"] for row in report["end_to_end"]] == ["prefill", "decode"]
    for row in report["end_to_end"]:
        for name in bench_multi_lora.E2E_PROVIDERS:
            assert row[f"{name}_ms"] > 0 and row[f"{name}_max_abs_diff"] <= 1e-3, name
