"""Which requests run in the next step: pure Python bookkeeping, no torch.

Every step gives each scheduled sequence a number of tokens (`Sequence.num_new`) under one token
budget (`max_batch_tokens`), so prefill chunks and decodes are the same thing (vLLM v1):
1. Running sequences that decode (one token left to feed) go first, oldest first, one token each.
   One that needs a new page and finds none preempts the newest running sequence: its pages are
   released, and it goes back to the head of the waiting queue with everything it generated, to be
   recomputed when pages are free again. A preempted sequence is never lost.
2. Running sequences in the middle of their prefill then get their next chunk (as much of the
   rest of it as the budget leaves), oldest first, preempting as decodes do.
3. Waiting sequences are then admitted in arrival order while the budget, their pages and
   `max_running` allow; the last one admitted may get only a chunk of its prefill, the rest comes in
   the next steps (chunked prefill: a prompt longer than the budget runs; one long prompt does not
   stall the decodes of its steps). One whose pages are not free stops admission (a long prompt is
   not starved by short ones).
4. Adapters: the running sequences hold at most `max_adapters` distinct adapters (the adapter
   pool's device slots). A waiting sequence whose adapter is not among them when no slot is left
   is skipped, so the requests behind it whose adapter is running (or that need no adapter) are
   admitted: a hot adapter does not wait behind a cold one (vLLM's skip of a LoRA that cannot
   join). When an adapter's last running sequence ends its slot is free, and the earliest waiting
   sequence of a cold adapter takes it (the pool evicts its least recently used unleased slot).
   Each admission behind a skipped sequence counts one overtake against it; once a sequence has
   been overtaken `max_overtakes` times, admission stops behind it until it is admitted, as first
   come first served would: the running adapters drain, and no adapter starves.
5. Prefix caching (`prefix_caching=True`): a sequence's full pages are registered with the page
   allocator once their keys and values are written (`computed`), keyed by the adapter and every
   token up to the page's end (`pages.block_key`). An admitted sequence shares the registered pages
   its tokens start with and its prefill starts after them; its last token is always computed, for
   the logits of the next one. A preempted sequence finds its own pages again when it comes back,
   unless they were evicted meanwhile. A sequence with `reads_prefix_cache=False` (one that needs
   the logits of every prompt token: a cached page has none) computes its whole prompt, and still
   registers its pages for the others (vLLM skips the cache for prompt logprobs the same way).
The waiting queue is bounded (`max_waiting`); `add` raises `QueueFull` beyond it.

`add` refuses a sequence whose longest length (prompt + max new tokens) could never fit the cache;
alone in the cache, any admitted sequence can finish, so preemption always makes progress.
"""

from collections import deque
from dataclasses import dataclass, field

from fused_train.serving.pages import PageAllocator, block_key
from fused_train.ops.checks import check_int

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class QueueFull(RuntimeError):
    """The waiting queue holds `max_waiting` sequences already."""


class PromptTooLong(ValueError):
    """A sequence that could never run: prompt + max new tokens exceeds the cache (or the model's
    context length, the engine's check)."""


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: its tokens so far (prompt, then generated ones), how
    many of them have their keys and values in the cache, how many the next step feeds, and its pages."""

    request_id: str
    token_ids: list[int]
    max_total_tokens: int  # prompt + max new tokens: the longest this sequence can grow
    adapter: object = None  # its identity: hashed into its pages' keys (an AdapterVersion in the engine)
    num_cached: int = 0
    num_new: int = 0  # tokens the step it is scheduled in feeds: token_ids[num_cached : num_cached + num_new]
    pages: list[int] = field(default_factory=list)
    status: str = WAITING
    preemptions: int = 0
    overtakes: int = 0  # admissions of later sequences while this one waited for an adapter slot
    block_keys: list[bytes] = field(default_factory=list, repr=False)  # of its full pages, as far as computed
    reads_prefix_cache: bool = True  # False: shares no cached pages, computes every token

    @property
    def num_uncached(self) -> int:
        """Tokens without keys and values in the cache yet: one when decoding."""
        return len(self.token_ids) - self.num_cached

    @property
    def samples(self) -> bool:
        """Whether the step it is scheduled in ends at its last token (so a next token is drawn), not
        inside its prefill."""
        return self.num_cached + self.num_new == len(self.token_ids)


@dataclass
class Step:
    """One step's work: prefills (or chunks of them) first, then decodes (the runner lays out
    tokens in this order)."""

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
                 max_waiting: int, max_overtakes: int = 16, prefix_caching: bool = True):  # fmt: skip
        check_int(max_batch_tokens=max_batch_tokens, max_running=max_running, max_adapters=max_adapters,
                  max_waiting=max_waiting)  # fmt: skip
        if not isinstance(max_overtakes, int) or isinstance(max_overtakes, bool) or max_overtakes < 0:
            raise ValueError(f"max_overtakes must be an int >= 0 (0: first come first served), got {max_overtakes!r}")
        if not isinstance(prefix_caching, bool):
            raise ValueError(f"prefix_caching must be a bool, got {prefix_caching!r}")
        self.pages = pages
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_adapters = max_adapters
        self.max_waiting = max_waiting
        self.max_overtakes = max_overtakes
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        # Tokens of admitted sequences looked up in the prefix cache, and found there (vLLM's counters).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def check(self, seq: Sequence) -> None:
        """Raise ValueError (`PromptTooLong` for lengths) when `seq` could never run (module docstring)."""
        if not seq.token_ids:
            raise ValueError("the prompt is empty: a request needs at least one token")
        capacity = self.pages.num_pages * self.pages.page_size
        if seq.max_total_tokens > capacity:
            raise PromptTooLong(
                f"prompt + max_tokens is {seq.max_total_tokens} tokens ({len(seq.token_ids)} in the prompt), more "
                f"than the KV cache holds ({capacity})"
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
        decodes, prefills, preempted = [], [], []
        scheduled = set()
        for decoding, taken in ((True, decodes), (False, prefills)):
            for seq in [seq for seq in self.running if (seq.num_uncached == 1) == decoding]:
                if not budget:
                    break
                if seq.status != RUNNING:  # preempted in this step
                    continue
                num_new = min(seq.num_uncached, budget)
                while not self.pages.grow(seq.pages, seq.num_cached + num_new):
                    others = [other for other in self.running if other is not seq and other not in scheduled]
                    victim = others[-1] if others else seq
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status == RUNNING:
                    seq.num_new = num_new
                    scheduled.add(seq)
                    taken.append(seq)
                    budget -= num_new
        skipped = []
        adapters = {seq.adapter for seq in self.running if seq.adapter is not None}
        for seq in list(self.waiting):
            if not budget or len(self.running) >= self.max_running or seq in preempted:  # preempted now: next step
                break
            if seq.adapter is not None and seq.adapter not in adapters and len(adapters) >= self.max_adapters:
                if seq.overtakes >= self.max_overtakes:
                    break
                skipped.append(seq)
                continue
            if not self._admit(seq, budget):
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

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Give waiting `seq` its cached pages, and pages for as much of the rest of its prefill as
        `budget` allows; False (and no pages held) when they are not free."""
        shared = []
        reads_cache = self.prefix_caching and seq.reads_prefix_cache
        if reads_cache:
            # Full pages before the last token: that one is computed whatever is cached.
            shared = self.pages.cached(self._block_keys(seq, (len(seq.token_ids) - 1) // self.pages.page_size))
        num_cached = len(shared) * self.pages.page_size
        num_new = min(len(seq.token_ids) - num_cached, budget)
        self.pages.share(seq.pages, shared)
        if not self.pages.grow(seq.pages, num_cached + num_new):
            self.pages.release(seq.pages)
            return False
        seq.num_cached, seq.num_new = num_cached, num_new
        if reads_cache:
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += num_cached
        return True

    def _block_keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of `seq`'s first `num_blocks` full pages (computed once, kept on `seq`)."""
        page_size = self.pages.page_size
        keys = seq.block_keys
        while len(keys) < num_blocks:
            start = len(keys) * page_size
            keys.append(block_key(keys[-1] if keys else None, seq.token_ids[start : start + page_size], seq.adapter))
        return keys[:num_blocks]

    def computed(self, seq: Sequence) -> None:
        """The step `seq` was scheduled in ran: its `num_new` tokens have their keys and values in
        its pages, and the pages they filled are registered in the prefix cache."""
        full_before = seq.num_cached // self.pages.page_size
        seq.num_cached += seq.num_new
        seq.num_new = 0
        if self.prefix_caching:
            full = seq.num_cached // self.pages.page_size
            for index, key in enumerate(self._block_keys(seq, full)[full_before:], full_before):
                self.pages.register(seq.pages[index], key)

    def finish(self, seq: Sequence) -> None:
        """`seq` ended (finished, cancelled or failed): its pages are released at once."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.release(seq.pages)
        seq.num_new = 0
        seq.status = FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.release(seq.pages)
        seq.num_cached = seq.num_new = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
