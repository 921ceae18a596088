"""The scheduler and page allocator alone: pure bookkeeping, no model, milliseconds."""

import pytest

from fused_train.serving.pages import PageAllocator
from fused_train.serving.scheduler import FINISHED, RUNNING, WAITING, QueueFull, Scheduler, Sequence


def _scheduler(num_pages=8, page_size=4, **limits):
    limits = {"max_batch_tokens": 64, "max_running": 8, "max_adapters": 2, "max_waiting": 4, **limits}
    return Scheduler(PageAllocator(num_pages, page_size), **limits)


def _seq(name, prompt_len, max_new=4, adapter=None):
    return Sequence(name, list(range(prompt_len)), prompt_len + max_new, adapter)


def _decode(step):
    """What the engine does after a step: every scheduled sequence is cached and gains a token."""
    for seq in step.sequences:
        seq.num_cached = len(seq.token_ids)
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


def test_first_come_first_served_under_the_token_budget():
    scheduler = _scheduler(max_batch_tokens=10)
    for seq in (_seq("a", 6), _seq("b", 5), _seq("c", 1)):
        scheduler.add(seq)
    step = scheduler.schedule()
    assert [s.request_id for s in step.prefills] == ["a"]  # b does not fit; c may not overtake it
    _decode(step)
    step = scheduler.schedule()
    assert [s.request_id for s in step.decodes] == ["a"]
    assert [s.request_id for s in step.prefills] == ["b", "c"]
    assert step.num_tokens == 1 + 5 + 1


def test_distinct_adapters_per_step_are_capped():
    scheduler = _scheduler(max_adapters=2, max_waiting=8)
    for name, adapter in (("a", "x"), ("b", "y"), ("c", None), ("d", "z"), ("e", "x")):
        scheduler.add(_seq(name, 2, adapter=adapter))
    step = scheduler.schedule()
    assert [s.request_id for s in step.prefills] == ["a", "b", "c"]  # d would be a third adapter


def test_preemption_frees_the_newest_and_requeues_it_first():
    scheduler = _scheduler(num_pages=3, page_size=4)
    old, new = _seq("old", 4, max_new=8), _seq("new", 4, max_new=8)
    scheduler.add(old)
    scheduler.add(new)
    _decode(scheduler.schedule())  # both prefill: one page each
    step = scheduler.schedule()  # both need a second page; only one is free
    assert [s.request_id for s in step.decodes] == ["old"] and step.preempted == [new]
    assert new.status == WAITING and new.pages == [] and new.num_cached == 0 and scheduler.waiting[0] is new
    assert len(new.token_ids) == 5  # what it generated is kept, to be recomputed
    _decode(step)
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
    _decode(scheduler.schedule())  # both prefill: no page left
    step = scheduler.schedule()  # old needs a page: new, not yet scheduled in this step, gives its own
    assert step.decodes == [old] and step.preempted == [new] and len(old.pages) == 2


def test_a_recomputed_sequence_longer_than_the_budget_runs_alone():
    scheduler = _scheduler(max_batch_tokens=4, num_pages=4, page_size=4)
    seq = _seq("a", 4, max_new=8)
    scheduler.add(seq)
    _decode(scheduler.schedule())
    scheduler._preempt(seq)
    step = scheduler.schedule()
    assert step.prefills == [seq] and seq.num_new == 5


def test_bad_sequences_are_refused_and_a_full_queue_raises():
    scheduler = _scheduler(num_pages=2, page_size=4, max_batch_tokens=6, max_waiting=2)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        scheduler.add(_seq("long", 7))
    with pytest.raises(ValueError, match="KV cache holds"):
        scheduler.add(_seq("grows", 4, max_new=5))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(_seq("empty", 0))
    scheduler.add(_seq("a", 1))
    scheduler.add(_seq("b", 1))
    with pytest.raises(QueueFull):
        scheduler.add(_seq("c", 1))
    assert [s.request_id for s in scheduler.waiting] == ["a", "b"]


def test_finish_of_a_waiting_sequence_removes_it():
    scheduler = _scheduler()
    seq = _seq("a", 2)
    scheduler.add(seq)
    scheduler.finish(seq)
    assert seq.status == FINISHED and not scheduler.has_work()
