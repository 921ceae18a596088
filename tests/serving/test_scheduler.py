"""The scheduler and page allocator alone: pure bookkeeping, no model, milliseconds."""

import random

import pytest

from fused_train.serving.pages import PageAllocator, block_key
from fused_train.serving.scheduler import FINISHED, RUNNING, WAITING, QueueFull, Scheduler, Sequence


def _scheduler(num_pages=8, page_size=4, **limits):
    limits = {"max_batch_tokens": 64, "max_running": 8, "max_adapters": 2, "max_waiting": 4, **limits}
    return Scheduler(PageAllocator(num_pages, page_size), **limits)


def _seq(name, prompt_len, max_new=4, adapter=None):
    return Sequence(name, list(range(prompt_len)), prompt_len + max_new, adapter)


def _decode(scheduler, step):
    """What the engine does after a step: every scheduled sequence's tokens are computed, and one
    whose step reached its last token gains a token."""
    for seq in step.sequences:
        samples = seq.samples
        scheduler.computed(seq)
        if samples:
            seq.token_ids.append(0)


def test_pages_round_up_to_one_page_and_are_all_returned():
    pages = PageAllocator(4, 16)
    held = []
    assert pages.grow(held, 1) and len(held) == 1
    assert pages.grow(held, 16) and len(held) == 1
    assert pages.grow(held, 17) and len(held) == 2
    assert not pages.grow(held, 100) and len(held) == 2  # all or nothing
    pages.release(held)
    assert held == [] and pages.free_pages == 4


def test_first_come_first_served_under_the_token_budget_the_last_admitted_in_chunks():
    scheduler = _scheduler(max_batch_tokens=10)
    for seq in (_seq("a", 6), _seq("b", 5), _seq("c", 1)):
        scheduler.add(seq)
    a, b, c = scheduler.waiting
    step = scheduler.schedule()
    assert step.prefills == [a, b] and (a.num_new, b.num_new) == (6, 4)  # b gets what the budget leaves
    assert (a.samples, b.samples) == (True, False)
    _decode(scheduler, step)
    assert b.num_cached == 4 and len(b.token_ids) == 5  # no token drawn inside a prefill
    step = scheduler.schedule()
    assert step.decodes == [a, b] and step.prefills == [c]  # b's last prompt token is a decode's work
    assert step.num_tokens == 1 + 1 + 1


def test_distinct_adapters_per_step_are_capped():
    scheduler = _scheduler(max_adapters=2, max_waiting=8)
    for name, adapter in (("a", "x"), ("b", "y"), ("c", None), ("d", "z"), ("e", "x")):
        scheduler.add(_seq(name, 2, adapter=adapter))
    step = scheduler.schedule()
    assert [s.request_id for s in step.prefills] == ["a", "b", "c", "e"]  # d would be a third adapter; e's is in
    assert [s.request_id for s in scheduler.waiting] == ["d"]


def test_preemption_frees_the_newest_and_requeues_it_first():
    scheduler = _scheduler(num_pages=3, page_size=4, prefix_caching=False)
    old, new = _seq("old", 4, max_new=8), _seq("new", 4, max_new=8)
    scheduler.add(old)
    scheduler.add(new)
    _decode(scheduler, scheduler.schedule())  # both prefill: one page each
    step = scheduler.schedule()  # both need a second page; only one is free
    assert [s.request_id for s in step.decodes] == ["old"] and step.preempted == [new]
    assert new.status == WAITING and new.pages == [] and new.num_cached == 0 and scheduler.waiting[0] is new
    assert len(new.token_ids) == 5  # what it generated is kept, to be recomputed
    _decode(scheduler, step)
    scheduler.finish(old)
    step = scheduler.schedule()
    assert step.prefills == [new] and new.num_new == 5 and new.status == RUNNING
    scheduler.finish(new)
    assert scheduler.pages.free_pages == 3 and not scheduler.has_work()


def test_an_older_sequence_takes_the_pages_of_a_newer_one():
    scheduler = _scheduler(num_pages=2, page_size=4)
    old, new = _seq("old", 4), _seq("new", 4)
    scheduler.add(old)
    scheduler.add(new)
    _decode(scheduler, scheduler.schedule())  # both prefill: no page left
    step = scheduler.schedule()  # old needs a page: new, not yet scheduled in this step, gives its own
    assert step.decodes == [old] and step.preempted == [new] and len(old.pages) == 2


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_while_decodes_go_on():
    scheduler = _scheduler(max_batch_tokens=4, num_pages=8, page_size=4)
    short, long = _seq("short", 2, max_new=8), _seq("long", 11, max_new=2)
    scheduler.add(short)
    _decode(scheduler, scheduler.schedule())
    scheduler.add(long)
    chunks = []
    while long.num_cached < 11:
        step = scheduler.schedule()
        assert step.decodes == [short] and step.num_tokens <= 4  # the decode first, in every step
        chunks.append((long.num_cached, long.num_new))
        _decode(scheduler, step)
    assert chunks == [(0, 3), (3, 3), (6, 3), (9, 2)]
    assert len(long.pages) == 3 and long.num_cached == 11 and len(long.token_ids) == 12


def test_bad_sequences_are_refused_and_a_full_queue_raises():
    scheduler = _scheduler(num_pages=2, page_size=4, max_batch_tokens=6, max_waiting=2)
    with pytest.raises(ValueError, match="KV cache holds"):
        scheduler.add(_seq("grows", 4, max_new=5))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(_seq("empty", 0))
    scheduler.add(_seq("a", 7, max_new=1))  # longer than the budget: prefilled in chunks
    scheduler.add(_seq("b", 1))
    with pytest.raises(QueueFull):
        scheduler.add(_seq("c", 1))
    assert [s.request_id for s in scheduler.waiting] == ["a", "b"]


def test_pages_are_shared_reference_counted_and_kept_cached_until_evicted_lru():
    pages = PageAllocator(4, 4)
    first, second = [], []
    assert pages.grow(first, 8) and first == [0, 1]
    keys = [block_key(None, [1, 2, 3, 4], None)]
    keys.append(block_key(keys[0], [5, 6, 7, 8], None))
    assert pages.cached(keys) == []
    pages.register(0, keys[0])
    pages.register(1, keys[1])
    pages.share(second, pages.cached(keys))
    assert second == [0, 1] and pages.refs(0) == 2 and pages.used_pages == 2
    pages.release(first)
    assert pages.refs(0) == 1 and pages.used_pages == 2
    pages.release(second)  # nobody holds them; they stay cached, and count as free
    assert pages.free_pages == 4 and pages.cached_pages == 2 and pages.cached(keys) == [0, 1]
    third = []
    assert pages.grow(third, 8) and third == [2, 3]  # never-cached pages first
    assert pages.cached(keys) == [0, 1]
    assert pages.grow(third, 12) and third[-1] == 1  # then the least recently released: the tail page
    assert pages.cached(keys) == [0] and pages.cached_pages == 1
    pages.release(third)
    assert pages.free_pages == 4


def test_keys_chain_the_whole_prefix_and_the_adapter():
    key = block_key(None, [1, 2], "a")
    assert key == block_key(None, [1, 2], "a")
    assert key != block_key(None, [1, 2], "b") and key != block_key(None, [1, 3], "a")
    assert block_key(key, [3, 4], "a") != block_key(block_key(None, [9, 9], "a"), [3, 4], "a")


def test_a_shared_prefix_is_computed_once():
    scheduler = _scheduler(num_pages=16, page_size=4)
    system = list(range(100, 108))  # two full pages
    first = Sequence("first", system + [1, 2], 14)
    scheduler.add(first)
    _decode(scheduler, scheduler.schedule())
    second, other_adapter = Sequence("second", system + [3], 13), Sequence("other", system + [3], 13, "x")
    scheduler.add(second)
    scheduler.add(other_adapter)
    step = scheduler.schedule()
    assert step.prefills == [second, other_adapter]
    assert second.pages[:2] == first.pages[:2] and (second.num_cached, second.num_new) == (8, 1)
    assert not set(other_adapter.pages) & set(first.pages) and other_adapter.num_cached == 0
    assert scheduler.pages.used_pages == 3 + 1 + 3
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (10 + 9 + 9, 8)
    # A prompt of exactly the cached pages still computes its last token.
    again = Sequence("again", system, 12)
    scheduler.add(again)
    _decode(scheduler, step)
    step = scheduler.schedule()
    assert again in step.prefills and (again.num_cached, again.num_new) == (4, 4)
    for seq in (first, second, other_adapter, again):
        scheduler.finish(seq)
    assert scheduler.pages.free_pages == 16


def test_a_preempted_sequence_finds_its_own_cached_pages_again():
    scheduler = _scheduler(num_pages=4, page_size=4)
    old, new = _seq("old", 4, max_new=8), Sequence("new", list(range(50, 59)), 12)
    scheduler.add(old)
    scheduler.add(new)
    _decode(scheduler, scheduler.schedule())  # old: one page; new: three, two of them full
    step = scheduler.schedule()  # old needs a second page: new is preempted
    assert step.preempted == [new] and scheduler.pages.cached_pages == 3
    own = list(scheduler.pages.cached(new.block_keys))
    _decode(scheduler, step)
    scheduler.finish(old)
    step = scheduler.schedule()
    assert step.prefills == [new] and new.pages[:2] == own and (new.num_cached, new.num_new) == (8, 2)
    scheduler.finish(new)
    assert scheduler.pages.free_pages == 4


def test_finish_of_a_waiting_sequence_removes_it():
    scheduler = _scheduler()
    seq = _seq("a", 2)
    scheduler.add(seq)
    scheduler.finish(seq)
    assert seq.status == FINISHED and not scheduler.has_work()


def _run(scheduler, arrivals, max_steps=500):
    """Step the scheduler as the engine does (every scheduled sequence gains a token; one at its
    `max_total_tokens` ends), adding `arrivals[step]` (a list of sequences) before each step: the
    scripted clock is the step number. Returns {request_id: (arrival, admission, end)} steps."""
    times, admitted = {}, {}
    for step_number in range(max_steps):
        for seq in arrivals.get(step_number, []):
            scheduler.add(seq)
            times[seq.request_id] = step_number
        if not scheduler.has_work() and step_number > max(arrivals, default=0):
            break
        step = scheduler.schedule()
        for seq in step.prefills:
            admitted.setdefault(seq.request_id, step_number)
        _decode(scheduler, step)
        for seq in step.sequences:
            if len(seq.token_ids) >= seq.max_total_tokens:
                scheduler.finish(seq)
                times[seq.request_id] = (times[seq.request_id], admitted[seq.request_id], step_number)
    assert not scheduler.has_work(), "requests still waiting or running"
    return times


def test_requests_of_running_adapters_overtake_one_waiting_for_a_slot():
    # The head-of-line case: long requests hold both slots (a, b); c waits for one; three short
    # requests for a then arrive. They run now, not after a long request ends.
    scheduler = _scheduler(num_pages=64, max_adapters=2, max_waiting=8)
    long_a, long_b = _seq("long_a", 4, max_new=40, adapter="a"), _seq("long_b", 4, max_new=40, adapter="b")
    cold = _seq("c", 4, adapter="c")
    shorts = [_seq(f"short{i}", 4, max_new=2, adapter="a") for i in range(3)]
    times = _run(scheduler, {0: [long_a, long_b], 1: [cold, *shorts]})
    for short in shorts:
        assert times[short.request_id] == (1, 1, 2)
    assert times["c"][1] == times["long_a"][2] + 1  # the slot a long request frees goes to c
    assert scheduler.pages.free_pages == 64


def test_no_request_is_overtaken_more_than_max_overtakes_times():
    scheduler = _scheduler(num_pages=64, max_adapters=2, max_waiting=16, max_overtakes=3)
    arrivals = {0: [_seq("long_a", 4, max_new=30, adapter="a"), _seq("long_b", 4, max_new=30, adapter="b")],
                1: [_seq("c", 4, adapter="c")]}  # fmt: skip
    for i in range(10):  # a short request for a at every step
        arrivals[2 + i] = [_seq(f"a{i}", 4, max_new=2, adapter="a")]
    times = _run(scheduler, arrivals)
    admitted_before_c = sorted(name for name, (_, admission, _) in times.items() if admission < times["c"][1])
    assert admitted_before_c == ["a0", "a1", "a2", "long_a", "long_b"]  # then admission stops behind c
    for i in range(3, 10):  # and goes on, first come first served, once c is in
        assert times[f"a{i}"][1] >= times["c"][1]
    assert times["c"][1] == times["long_a"][2] + 1


def test_no_adapter_starves_under_adversarial_arrivals():
    # The two hot adapters always have running requests (one more arrives at every step) and hold
    # both slots; a cold adapter's request arrives every ten steps. With overtakes bounded at 4 every
    # cold request gets in (the overtakes, then the drain of a hot adapter's running requests) and
    # the hot ones wait less than first come first served lets them. Pages are short: preemption too.
    def waits(max_overtakes):
        scheduler = _scheduler(num_pages=20, max_adapters=2, max_waiting=256, max_overtakes=max_overtakes)
        rng = random.Random(0)
        arrivals = {}
        for step in range(120):
            hot = "ab"[step % 2]
            arrivals[step] = [_seq(f"{hot}{step}", rng.randint(1, 6), max_new=rng.randint(1, 12), adapter=hot)]
            if step % 10 == 3:
                arrivals[step].append(_seq(f"cold{step}", 3, max_new=12, adapter=f"cold{step}"))
        times = _run(scheduler, arrivals, max_steps=2000)
        assert len(times) == 120 + 12 and scheduler.pages.free_pages == 20
        cold = [admission - arrival for name, (arrival, admission, _) in times.items() if name.startswith("cold")]
        hot = [admission - arrival for name, (arrival, admission, _) in times.items() if not name.startswith("cold")]
        return max(cold), sum(hot) / len(hot), scheduler.num_preemptions

    fcfs_cold, fcfs_hot, _ = waits(max_overtakes=0)
    cold, hot, preemptions = waits(max_overtakes=4)
    assert preemptions > 0
    assert cold <= 45 and cold < fcfs_cold / 2, (cold, fcfs_cold)
    assert hot < fcfs_hot / 2, (hot, fcfs_hot)
