"""Rolling quality signals of each served model's requests, and their drift from a reference window.

    monitor = QualityMonitor(window=100)
    monitor.observe("support", output)   # a RequestOutput that ended "stop" or "length"
    monitor.snapshot()["support"]        # {"requests", "mean_logprob", "output_tokens", "finish_reasons", "drift"}

Per model (an adapter by its name, the base model by its served name), over its last `window`
completed requests: the mean of their mean output-token logprobs (`RequestOutput.mean_logprob`: the
model's own log-probability of each token it emitted, before temperature and penalties), their mean
output length, and the share of each finish reason. Cancelled and failed requests, and those that
only score their prompt (max_tokens 0), say nothing of what the model writes and are not counted.

Drift is the two-sample Kolmogorov-Smirnov statistic D = max_x |F_ref(x) - F_now(x)| between the
per-request mean logprobs of a reference window (the first `window` requests after the model was
loaded, then frozen) and of the last `window` requests after it. Why this one: it needs no scale
(adapters' logprobs differ; D is in [0, 1] for all of them, so one alert threshold fits every
adapter), no bins (a population stability index needs bin edges and breaks on empty bins), and it
sees a change of shape as well as of location (a standardized mean difference misses a model that
turns bimodal, confident on some prompts and lost on others, at the same mean). With two windows
of n requests, D above 1.36 * sqrt(2 / n) happens by chance 5% of the time when nothing changed
(0.19 for n = 100), above 1.63 * sqrt(2 / n) 1% of the time (0.23). No torch here.
"""

import bisect
import threading
from collections import Counter, deque

__all__ = ["QualityMonitor", "ks_statistic"]

COMPLETED = ("stop", "length")  # the finish reasons of a request that ran to its end


def ks_statistic(reference, current) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two samples'
    empirical distribution functions (each right-continuous: ties count at their value)."""
    if not reference or not current:
        raise ValueError("ks_statistic needs two non-empty samples")
    a, b = sorted(reference), sorted(current)
    return max(abs(bisect.bisect_right(a, x) / len(a) - bisect.bisect_right(b, x) / len(b)) for x in set(a + b))


class _Signals:
    def __init__(self, window: int):
        self.reference: list[float] = []  # the first `window` mean logprobs, then frozen
        self.recent_logprobs = deque(maxlen=window)  # the last `window` after the reference
        self.recent = deque(maxlen=window)  # (output tokens, finish reason, mean logprob or None)


class QualityMonitor:
    """The signals of each model's last `window` completed requests (see the module docstring);
    thread-safe."""

    def __init__(self, window: int = 100):
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        self.window = window
        self._signals: dict[str, _Signals] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, output) -> None:
        """Count `output` (a RequestOutput, or anything with `finish_reason`, `token_ids` and
        `mean_logprob`) for `model`, if it completed and generated tokens (a request that only
        scores its prompt, max_tokens 0 with echo, says nothing of what the model writes)."""
        if output.finish_reason not in COMPLETED or not output.token_ids:
            return
        mean_logprob = getattr(output, "mean_logprob", None)  # None from an engine that does not compute it
        with self._lock:
            signals = self._signals.get(model)
            if signals is None:
                signals = self._signals[model] = _Signals(self.window)
            signals.recent.append((len(output.token_ids), output.finish_reason, mean_logprob))
            if mean_logprob is None:
                return
            if len(signals.reference) < self.window:
                signals.reference.append(mean_logprob)
            else:
                signals.recent_logprobs.append(mean_logprob)

    def reset(self, model: str) -> None:
        """Forget `model`'s requests (it was unloaded, or loaded anew): its next ones are the reference."""
        with self._lock:
            self._signals.pop(model, None)

    def snapshot(self) -> dict[str, dict]:
        """Per model: `requests` in its window, their `mean_logprob` (None without any) and mean
        `output_tokens`, `finish_reasons` (reason -> share of the window) and `drift` (None until
        the reference and the window after it are both full)."""
        with self._lock:
            signals = {model: (list(s.recent), list(s.reference), list(s.recent_logprobs))
                       for model, s in self._signals.items()}  # fmt: skip
        snapshot = {}
        for model, (recent, reference, recent_logprobs) in sorted(signals.items()):
            logprobs = [logprob for _, _, logprob in recent if logprob is not None]
            reasons = Counter(reason for _, reason, _ in recent)
            full = len(reference) == len(recent_logprobs) == self.window
            snapshot[model] = {
                "requests": len(recent),
                "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None,
                "output_tokens": sum(tokens for tokens, _, _ in recent) / len(recent),
                "finish_reasons": {reason: reasons[reason] / len(recent) for reason in COMPLETED},
                "drift": ks_statistic(reference, recent_logprobs) if full else None,
            }
        return snapshot
