"""`TrainingTelemetry`: tokens per second, padding waste and peak memory of a training loop."""

import pytest
import torch

from fused_train.training.telemetry import TrainingTelemetry
from tests.conftest import DEVICE


class FakeClock:
    """Each step's body advances time by the duration it is told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_excludes_warmup_and_padding_counts_every_step():
    clock = FakeClock()
    telemetry = TrainingTelemetry("cpu", warmup_steps=1, clock=clock)
    # (seconds, real tokens, processed tokens); the first step is warm-up.
    steps = [(10.0, 50, 100), (2.0, 300, 400), (3.0, 200, 200)]
    for seconds, real, processed in steps:
        with telemetry.step(real_tokens=real, processed_tokens=processed):
            clock.now += seconds
    summary = telemetry.summary()
    assert telemetry.step_seconds == [10.0, 2.0, 3.0]
    assert summary["timed_steps"] == 2
    assert summary["timed_seconds"] == 5.0
    assert summary["real_tokens_per_s"] == pytest.approx(500 / 5)
    assert summary["processed_tokens_per_s"] == pytest.approx(600 / 5)
    assert summary["padding_fraction"] == pytest.approx(1 - 550 / 700)


def test_peak_memory_sees_a_transient_allocation():
    telemetry = TrainingTelemetry(DEVICE, warmup_steps=0)
    size = 256 * 2**20
    if DEVICE == "cpu":
        # The CPU measure is the process's lifetime peak RSS (earlier tests may have set it):
        # allocate past it, so that this allocation must raise it.
        size += telemetry.peak_memory_bytes() - telemetry.memory_at_start_bytes
    with telemetry.step(real_tokens=1, processed_tokens=1):
        # Filled with ones so that every page is touched (resident), not merely reserved.
        buffer = torch.ones(size // 4, dtype=torch.float32, device=DEVICE)
        del buffer
    summary = telemetry.summary()
    assert summary["peak_memory_bytes"] - summary["memory_at_start_bytes"] >= 0.9 * size


def test_bad_input_raises():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingTelemetry("cpu", warmup_steps=-1)
    telemetry = TrainingTelemetry("cpu", warmup_steps=1)
    with pytest.raises(ValueError, match="real_tokens"):
        with telemetry.step(real_tokens=5, processed_tokens=4):
            pass
    with telemetry.step(real_tokens=1, processed_tokens=1):
        pass
    with pytest.raises(ValueError, match="timed step"):
        telemetry.summary()
