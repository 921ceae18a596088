"""TelemetryCallback in one process: what it counts per forward, the figures' arithmetic, its place
among the Trainer's callbacks. (Its figures on a real 2-rank Trainer run: tests/training/distributed/.)"""

from types import SimpleNamespace

import pytest
import torch

from fused_train import TelemetryCallback


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(10))

    def forward(self, input_ids, attention_mask=None, labels=None):
        return input_ids


def test_counts_masked_and_packed_batches_in_training_only():
    model, clock = _Model(), iter([0.0, 2.0, 2.0]).__next__
    callback = TelemetryCallback(peak_flops=1e3, clock=clock)
    args = SimpleNamespace(device=torch.device("cpu"), world_size=1, average_tokens_across_devices=True)
    callback.on_train_begin(args, None, None, model=model, train_dataloader=None)
    model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    # Packed: real up to the last target; the two filler positions after it do not count.
    model(input_ids=torch.ones(1, 6, dtype=torch.long), labels=torch.tensor([[-100, 3, -100, 4, -100, -100]]))
    model.eval()
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    model.train()
    state = SimpleNamespace(log_history=[{"loss": 1.0}])
    logs = {"loss": 1.0}
    callback.on_log(args, state, None, logs=logs)
    real, processed, seconds = 4 + 4, 8 + 6, 2.0
    assert logs["telemetry/real_tokens_per_s"] == pytest.approx(real / seconds)
    assert logs["telemetry/padding_fraction"] == pytest.approx(1 - real / processed)
    assert logs["telemetry/real_tokens_per_rank_max"] == logs["telemetry/real_tokens_per_rank_mean"] == real
    assert logs["telemetry/rank_imbalance"] == 1.0
    assert logs["telemetry/mfu"] == pytest.approx(6 * 10 * real / seconds / 1e3)
    assert state.log_history[-1] == logs
    callback.on_train_end(args, state, None)
    assert not model._forward_pre_hooks


def test_add_to_goes_before_the_logging_integrations():
    trainer = SimpleNamespace(
        callback_handler=SimpleNamespace(callbacks=["DefaultFlowCallback", "TensorBoardCallback"])
    )
    callback = TelemetryCallback().add_to(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    with pytest.raises(ValueError, match="peak_flops"):
        TelemetryCallback(peak_flops=0)
