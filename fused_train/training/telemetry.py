"""Training-loop telemetry: real tokens per second, padding waste and peak memory.

Over the timed steps (all steps after the first `warmup_steps`):

    real_tokens_per_s      = sum(real tokens) / sum(step seconds)
    processed_tokens_per_s = sum(processed tokens) / sum(step seconds)

where "real" tokens are the documents' own tokens and "processed" tokens are all the positions the
model computed on (real tokens plus padding or filler). Over all steps, warm-up included:

    padding_fraction = 1 - sum(real tokens) / sum(processed tokens)

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` since the telemetry was created (tensors
only, not the caching allocator's reserve). On CPU there is no allocator counter, so it is the peak
resident set size of the whole process (`ru_maxrss`, Python and libraries included, over the
process's lifetime); `memory_at_start_bytes` is the resident set size when the telemetry was
created, so `peak - start` is what the loop added. Compare CPU peaks only between loops that each
ran in a fresh process.
"""

import resource
import sys
import time
from contextlib import contextmanager

import psutil
import torch


class TrainingTelemetry:
    """Times training steps and counts their tokens; `summary()` gives the figures above.

    Usage:
        telemetry = TrainingTelemetry(device, warmup_steps=1)
        for batch in batches:
            with telemetry.step(real_tokens=..., processed_tokens=...):
                ...  # forward, backward, optimizer step
        telemetry.summary()
    """

    def __init__(self, device: torch.device | str, warmup_steps: int = 1, clock=time.perf_counter):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self.clock = clock
        self.step_seconds: list[float] = []
        self.real_tokens: list[int] = []
        self.processed_tokens: list[int] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.memory_at_start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.memory_at_start_bytes = psutil.Process().memory_info().rss

    @contextmanager
    def step(self, real_tokens: int, processed_tokens: int):
        """Times the body as one step (synchronizing CUDA at both ends) that processed these tokens."""
        if not 0 <= real_tokens <= processed_tokens or processed_tokens < 1:
            raise ValueError(
                f"need 0 <= real_tokens <= processed_tokens and processed_tokens >= 1, got real_tokens={real_tokens}, "
                f"processed_tokens={processed_tokens}"
            )
        self._synchronize()
        start = self.clock()
        yield
        self._synchronize()
        self.step_seconds.append(self.clock() - start)
        self.real_tokens.append(real_tokens)
        self.processed_tokens.append(processed_tokens)

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        return peak if sys.platform == "darwin" else peak * 1024

    def summary(self) -> dict:
        timed = slice(self.warmup_steps, None)
        seconds = sum(self.step_seconds[timed])
        if len(self.step_seconds) <= self.warmup_steps or seconds <= 0:
            raise ValueError(
                f"summary needs at least one timed step after {self.warmup_steps} warm-up step(s), "
                f"got {len(self.step_seconds)} step(s)"
            )
        real, processed = sum(self.real_tokens[timed]), sum(self.processed_tokens[timed])
        return {
            "steps": len(self.step_seconds),
            "timed_steps": len(self.step_seconds) - self.warmup_steps,
            "timed_seconds": seconds,
            "real_tokens_per_s": real / seconds,
            "processed_tokens_per_s": processed / seconds,
            "padding_fraction": 1 - sum(self.real_tokens) / sum(self.processed_tokens),
            "peak_memory_bytes": self.peak_memory_bytes(),
            "memory_at_start_bytes": self.memory_at_start_bytes,
            "memory_measure": (
                "torch.cuda.max_memory_allocated"
                if self.device.type == "cuda"
                else "peak RSS of the process (ru_maxrss)"
            ),
        }

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
