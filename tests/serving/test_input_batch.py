"""The runner's persistent step inputs (`InputBatch`): over a scripted run of the real scheduler
(admissions, chunked prefills, shared cached prefixes, decodes across pages, preemptions,
requests ending and their rows reused), every step's tensors equal those built from scratch from
the sequences' token and page lists. No model: milliseconds."""

import random

import pytest
import torch

from fused_train.kernels.paged_decode_attention_ref import paged_attention_plan
from fused_train.serving.input_batch import InputBatch
from fused_train.serving.pages import PageAllocator
from fused_train.serving.scheduler import Scheduler, Sequence

PAGE_SIZE = 8
NUM_KV_HEADS = 2


def _from_scratch(step):
    """The step's inputs from Python lists of every token and page (what the runner built before)."""

    def slot(seq, j):
        return seq.pages[j // PAGE_SIZE] * PAGE_SIZE + j % PAGE_SIZE

    ids, positions, slots, lengths, lengths_k, context_slots, order = [], [], [], [], [], [], []
    for seq in step.prefills:
        start, end = seq.num_cached, seq.num_cached + seq.num_new
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        slots += [slot(seq, j) for j in range(start, end)]
        context_slots += [slot(seq, j) for j in range(start)]
        lengths.append(end - start)
        lengths_k.append(end)
    context_start, fresh_start = 0, len(context_slots)
    for seq, n in zip(step.prefills, lengths):
        order += list(range(context_start, context_start + seq.num_cached)) + list(range(fresh_start, fresh_start + n))
        context_start += seq.num_cached
        fresh_start += n
    for seq in step.decodes:
        ids.append(seq.token_ids[-1])
        positions.append(len(seq.token_ids) - 1)
        slots.append(slot(seq, len(seq.token_ids) - 1))
    max_pages = max((len(seq.pages) for seq in step.decodes), default=1)
    cu, cu_k = [0], [0]
    for n, n_k in zip(lengths, lengths_k):
        cu.append(cu[-1] + n)
        cu_k.append(cu_k[-1] + n_k)
    expected = dict(
        input_ids=ids, position_ids=positions, slots=slots, num_prefill_tokens=cu[-1], cu_seqlens_prefill=cu,
        max_prefill_len=max(lengths, default=0),
        page_table=[seq.pages + [0] * (max_pages - len(seq.pages)) for seq in step.decodes],
        kv_lens=[len(seq.token_ids) for seq in step.decodes],
        last=[end - 1 for end in cu[1:]] + list(range(cu[-1], cu[-1] + len(step.decodes))),
    )  # fmt: skip
    if context_slots:
        expected |= dict(cu_seqlens_prefill_k=cu_k, max_prefill_len_k=max(lengths_k), context_slots=context_slots,
                         prefill_key_order=order)  # fmt: skip
    return expected


def _prepared(batch, step):
    input_ids, position_ids, metadata, last = batch.prepare(step)
    got = dict(input_ids=input_ids[0], position_ids=position_ids[0], last=last)
    for name in ("slots", "num_prefill_tokens", "cu_seqlens_prefill", "max_prefill_len", "page_table", "kv_lens",
                 "cu_seqlens_prefill_k", "max_prefill_len_k", "context_slots", "prefill_key_order"):  # fmt: skip
        value = getattr(metadata, name)
        if value is not None and (name != "max_prefill_len_k" or metadata.context_slots is not None):
            got[name] = value
    assert metadata.page_table.dtype == metadata.kv_lens.dtype == metadata.cu_seqlens_prefill.dtype == torch.int32
    assert input_ids.dtype == position_ids.dtype == metadata.slots.dtype == last.dtype == torch.int64
    assert metadata.page_table.shape == (len(step.decodes), max((len(s.pages) for s in step.decodes), default=1))
    # The slots split once per step for every layer's write.
    assert torch.equal(metadata.slot_pages * PAGE_SIZE + metadata.slot_offsets, metadata.slots)
    assert ((metadata.slot_offsets >= 0) & (metadata.slot_offsets < PAGE_SIZE)).all()
    # The decodes' plan, sliced from the rows' key rows, is the reference's own.
    if step.decodes:
        expected = paged_attention_plan(metadata.page_table, metadata.kv_lens, None, PAGE_SIZE, NUM_KV_HEADS)
        for name, value in expected._asdict().items():
            got_value = getattr(metadata.decode_plan, name)
            assert got_value == value if not isinstance(value, torch.Tensor) else torch.equal(got_value, value), name
    else:
        assert metadata.decode_plan is None
    return {name: value.tolist() if isinstance(value, torch.Tensor) else value for name, value in got.items()}


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_persistent_inputs_equal_inputs_built_from_scratch_at_every_step(prefix_caching):
    rng = random.Random(0)
    # 12 pages of 8 tokens for up to 5 sequences of up to 40 tokens: preemptions; a step budget of
    # 24 tokens: long prompts prefill in chunks; two shared 16-token prefixes: cached pages (with
    # the prefix cache; without it a preempted sequence comes back to other pages).
    scheduler = Scheduler(PageAllocator(12, PAGE_SIZE), max_batch_tokens=24, max_running=5, max_adapters=2,
                          max_waiting=64, prefix_caching=prefix_caching)  # fmt: skip
    # Small: the rows and the table must grow.
    batch = InputBatch(PAGE_SIZE, NUM_KV_HEADS, "cpu", rows=2, pages_per_row=2)
    prefixes = [[rng.randrange(1, 100) for _ in range(16)] for _ in range(2)]
    kinds = set()
    for i in range(24):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 100) for _ in range(rng.randrange(1, 20))]
        scheduler.add(Sequence(f"r{i}", prompt, len(prompt) + rng.randrange(2, 12)))
    for _ in range(400):
        if not scheduler.has_work():
            break
        step = scheduler.schedule()
        assert _prepared(batch, step) == _from_scratch(step)
        kinds |= {"preempted"} if step.preempted else set()
        kinds |= {"context"} if any(seq.num_cached for seq in step.prefills) else set()
        kinds |= {"decode"} if step.decodes else set()
        for seq in step.sequences:
            samples = seq.samples
            scheduler.computed(seq)
            if samples:
                seq.token_ids.append(rng.randrange(1, 100))
                if len(seq.token_ids) == seq.max_total_tokens or rng.random() < 0.05:
                    scheduler.finish(seq)  # its length, or stopped early
    assert not scheduler.has_work()
    assert kinds == {"preempted", "context", "decode"}, kinds  # context: a cached prefix or earlier chunks
    # Grown, and ended or preempted sequences gave their rows back: 5 running fit in 8 rows.
    assert 2 < batch.page_table.shape[0] <= 8 and batch.page_table.shape[1] > 2
