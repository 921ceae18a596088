"""`TelemetryCallback`: packed-training throughput figures in the `transformers.Trainer`'s logs.

At every log step it adds, over the optimizer steps since the previous log (all ranks together):

    telemetry/real_tokens_per_s      real tokens of all ranks / seconds of the slowest rank
    telemetry/padding_fraction       1 - real / processed tokens, all ranks
    telemetry/real_tokens_per_rank_max, telemetry/real_tokens_per_rank_mean
    telemetry/rank_imbalance         max / mean of the ranks' real tokens (1.0 = balanced)
    telemetry/peak_memory_mb         the largest rank's `TrainingTelemetry.peak_memory_bytes()`
    telemetry/mfu                    6 * parameters * real tokens / seconds / ranks / peak FLOP/s

How it counts: a forward pre-hook on the model (added at `on_train_begin`, removed at
`on_train_end`) reads each training forward's batch, so it works with any collator, dataloader
workers and Trainer subclass (TRL's too). Processed tokens are `input_ids.numel()`; real tokens
are `attention_mask.sum()` when the batch has a mask, otherwise (packed batches, as
`PackedCollator` emits) each row up to its last target label (`labels != -100`): the filler after
the last document has no targets. A row that ends in masked-out tokens (a document whose end has
no loss) counts those as filler. Without labels or mask every token is real. Counts stay on the
device until a log step, where one all-gather of a few numbers per rank is the only collective.

MFU (on CUDA, or anywhere `peak_flops` is given): parameters are the model's (frozen ones
included: their forward and input gradients cost the same 6 FLOPs per parameter and token, less
the 2 of weight gradients LoRA skips, so it is
the usual upper-bound convention); peak FLOP/s is `peak_flops` if given, else dense bf16 from
`PEAK_BF16_FLOPS` by device name (NVIDIA's data sheets, no sparsity); an unknown GPU gets no MFU.

The figures go into the `logs` dict of `on_log`, so into `state.log_history` (trainer_state.json)
and to every callback after this one. transformers puts the `report_to` integrations
(TensorBoard, W&B, ...) before the callbacks passed to `Trainer(callbacks=...)`; for them to see
the figures, add the callback first: `TelemetryCallback().add_to(trainer)`.
"""

import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from fused_train.training.telemetry import TrainingTelemetry
from fused_train.training.token_count import warn_if_tokens_not_averaged

# Dense bf16 tensor FLOP/s (NVIDIA data sheets, SXM parts, no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class TelemetryCallback(TrainerCallback):
    def __init__(self, peak_flops: float | None = None, clock=time.perf_counter):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be a positive FLOP/s figure or None, got {peak_flops!r}")
        self.peak_flops = peak_flops
        self.clock = clock
        self._hook = None

    def add_to(self, trainer):
        """Put this callback before the Trainer's others (its logging integrations among them)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        collator = getattr(train_dataloader, "collate_fn", None)
        warn_if_tokens_not_averaged(args, getattr(collator, "data_collator", collator))
        self._telemetry = TrainingTelemetry(args.device, warmup_steps=0)
        self._parameters = sum(p.numel() for p in model.parameters())
        self._start_window(args.device)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._hook is None or logs is None or "loss" not in logs:
            return
        figures = self._figures(args.device)
        logs.update(figures)
        if state.log_history:
            state.log_history[-1].update(figures)

    def _start_window(self, device):
        self._started = self.clock()
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)

    def _count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or not isinstance(input_ids, torch.Tensor):
            return
        mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
        if mask is not None:
            real = mask.sum()
        elif labels is not None and labels.dim() == 2:
            targets = labels != -100
            positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
            real = (targets * positions).amax(dim=1).sum()
        else:
            real = torch.tensor(input_ids.numel())
        processed = torch.tensor(input_ids.numel(), device=self._counts.device)
        self._counts += torch.stack([real.to(self._counts.device), processed])

    def _figures(self, device) -> dict:
        seconds = self.clock() - self._started
        peak = self._telemetry.peak_memory_bytes()
        local = torch.tensor([*self._counts.tolist(), seconds, peak], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            local = local.to("cpu" if dist.get_backend() == "gloo" else device)
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            ranks = torch.stack(gathered).cpu()
        else:
            ranks = local[None]
        real, processed = ranks[:, 0], ranks[:, 1]
        seconds = float(ranks[:, 2].max())
        figures = {
            "telemetry/real_tokens_per_s": float(real.sum()) / seconds,
            "telemetry/padding_fraction": 1 - float(real.sum()) / max(float(processed.sum()), 1.0),
            "telemetry/real_tokens_per_rank_max": float(real.max()),
            "telemetry/real_tokens_per_rank_mean": float(real.mean()),
            "telemetry/rank_imbalance": float(real.max() / real.mean()) if real.sum() > 0 else 1.0,
            "telemetry/peak_memory_mb": float(ranks[:, 3].max()) / 2**20,
        }
        peak_flops = self.peak_flops or self._device_peak_flops(device)
        if peak_flops:
            flops = 6 * self._parameters * float(real.sum()) / seconds / len(ranks)
            figures["telemetry/mfu"] = flops / peak_flops
        self._start_window(device)
        return figures

    @staticmethod
    def _device_peak_flops(device) -> float | None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
