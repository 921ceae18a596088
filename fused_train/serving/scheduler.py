"""Which requests run in the next step: pure Python bookkeeping, no torch.

Every step, first come first served under one token budget (`max_batch_tokens`):
1. Running sequences decode one token each (oldest first). One that needs a new page and finds
   none preempts the newest running sequence: its pages are freed, and it goes back to the head
   of the waiting queue with everything it generated, to be recomputed (one prefill of prompt +
   generated tokens) when pages are free again. A preempted sequence is never lost.
2. Waiting sequences are then admitted in arrival order while their whole prefill fits the
   budget, their pages are free and the batch stays within `max_running` sequences; the first that
   does not fit stops admission (a long prompt is not starved by short ones).
3. Adapters: the running sequences hold at most `max_adapters` distinct adapters (the adapter
   pool's device slots). A waiting sequence whose adapter is not among them when no slot is left
   is skipped, so the requests behind it whose adapter is running (or that need no adapter) are
   admitted: a hot adapter does not wait behind a cold one (vLLM's skip of a LoRA that cannot
   join). When an adapter's last running sequence ends its slot is free, and the earliest waiting
   sequence of a cold adapter takes it (the pool evicts its least recently used unleased slot).
   Each admission behind a skipped sequence counts one overtake against it; once a sequence has
   been overtaken `max_overtakes` times, admission stops behind it until it is admitted, as first
   come first served would: the running adapters drain, and no adapter starves.
The waiting queue is bounded (`max_waiting`); `add` raises `QueueFull` beyond it.

A sequence's prefill is one step (no chunked prefill): `add` refuses a prompt longer than the
budget, and a sequence whose longest length (prompt + max new tokens) could never fit the cache. A
preempted sequence that has outgrown the budget is recomputed in a step of its own.
Alone in the cache, any admitted sequence can finish, so preemption always makes progress.
"""

from collections import deque
from dataclasses import dataclass, field

from fused_train.serving.pages import PageAllocator
from fused_train.ops.checks import check_int

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class QueueFull(RuntimeError):
    """The waiting queue holds `max_waiting` sequences already."""


class PromptTooLong(ValueError):
    """A sequence that could never run: its prompt exceeds one step's budget, or prompt + max new
    tokens exceeds the cache."""


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: its tokens so far (prompt, then generated ones), how
    many of them have their keys and values in the cache, and its pages."""

    request_id: str
    token_ids: list[int]
    max_total_tokens: int  # prompt + max new tokens: the longest this sequence can grow
    adapter: str | None = None
    num_cached: int = 0
    pages: list[int] = field(default_factory=list)
    status: str = WAITING
    preemptions: int = 0
    overtakes: int = 0  # admissions of later sequences while this one waited for an adapter slot

    @property
    def num_new(self) -> int:
        """Tokens this sequence feeds the next step: its whole length after a (re)admission, one
        when decoding."""
        return len(self.token_ids) - self.num_cached


@dataclass
class Step:
    """One step's work: prefills first, then decodes (the runner lays out tokens in this order)."""

    prefills: list[Sequence]
    decodes: list[Sequence]
    preempted: list[Sequence]

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_new for seq in self.sequences)


class Scheduler:
    def __init__(self, pages: PageAllocator, *, max_batch_tokens: int, max_running: int, max_adapters: int,
                 max_waiting: int, max_overtakes: int = 16):  # fmt: skip
        check_int(max_batch_tokens=max_batch_tokens, max_running=max_running, max_adapters=max_adapters,
                  max_waiting=max_waiting)  # fmt: skip
        if not isinstance(max_overtakes, int) or isinstance(max_overtakes, bool) or max_overtakes < 0:
            raise ValueError(f"max_overtakes must be an int >= 0 (0: first come first served), got {max_overtakes!r}")
        self.pages = pages
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_adapters = max_adapters
        self.max_waiting = max_waiting
        self.max_overtakes = max_overtakes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def check(self, seq: Sequence) -> None:
        """Raise ValueError (`PromptTooLong` for lengths) when `seq` could never run (module docstring)."""
        if not seq.token_ids:
            raise ValueError("the prompt is empty: a request needs at least one token")
        if len(seq.token_ids) > self.max_batch_tokens:
            raise PromptTooLong(
                f"the prompt has {len(seq.token_ids)} tokens, more than max_batch_tokens={self.max_batch_tokens} "
                "(a prefill runs in one step)"
            )
        capacity = self.pages.num_pages * self.pages.page_size
        if seq.max_total_tokens > capacity:
            raise PromptTooLong(
                f"prompt + max_tokens is {seq.max_total_tokens} tokens, more than the KV cache holds ({capacity})"
            )

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        seq.status = WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        budget = self.max_batch_tokens
        decodes, preempted = [], []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if budget < seq.num_new:
                break
            while not self.pages.grow(seq.pages, len(seq.token_ids)):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == RUNNING:
                decodes.append(seq)
                budget -= seq.num_new
        prefills, skipped = [], []
        adapters = {seq.adapter for seq in self.running if seq.adapter is not None}
        for seq in list(self.waiting):
            if len(self.running) >= self.max_running or seq in preempted:  # preempted now: it waits for the next
                break
            if seq.adapter is not None and seq.adapter not in adapters and len(adapters) >= self.max_adapters:
                if seq.overtakes >= self.max_overtakes:
                    break
                skipped.append(seq)
                continue
            # A recomputed sequence may have outgrown the budget: it then runs in a step of its own.
            if seq.num_new > budget and (decodes or prefills):
                break
            if not self.pages.grow(seq.pages, len(seq.token_ids)):
                break
            self.waiting.remove(seq)
            seq.status = RUNNING
            seq.overtakes = 0
            self.running.append(seq)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            prefills.append(seq)
            budget -= seq.num_new
            for waiting in skipped:
                waiting.overtakes += 1
            if any(waiting.overtakes >= self.max_overtakes for waiting in skipped):
                break
        return Step(prefills, decodes, preempted)

    def finish(self, seq: Sequence) -> None:
        """`seq` ended (finished, cancelled or failed): its pages are free at once."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.release(seq.pages)
        seq.status = FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.release(seq.pages)
        seq.num_cached = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
