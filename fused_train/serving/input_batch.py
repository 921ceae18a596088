"""`InputBatch`: the step's input tensors, from buffers kept across steps and updated by what changed.

vLLM v1's persistent batch, for our runner: each running sequence owns a row of a host page table
that lives across steps. A new sequence writes its row once; a step then appends only the pages a
sequence gained (a decode crossing into a new page), and a preempted or ended sequence gives its
row back (an ended one at the next step: requests end on other threads too, the rows are only the
loop thread's). The step's flat tensors (token ids, positions, page slots, the decodes' page table and
lengths, the prefills' offsets and cached context) are computed from those rows with a few
vectorized index operations, not rebuilt from Python lists of every token and page; a decode's
come from one short list per sequence, in a single host tensor.

Where the PyTorch reference runs (a CPU), each row also holds the rows of its keys in the pages
seen as `[-1, head_dim]`, written with its pages, so the decodes' `PagedAttentionPlan` is a slice
of them: a batch-1 step on a CPU pays for every torch call, and building the plan from the page
table took a dozen.

A row is rebuilt from its sequence whenever its bookkeeping does not match it (another sequence of
that id, a preemption since, fewer pages or tokens than the row holds), so a missed `forget`
costs a rebuild, never a wrong slot.
"""

from dataclasses import dataclass

import torch

from fused_train.hf.attention import PagedAttentionMetadata
from fused_train.kernels.paged_decode_attention_ref import PagedAttentionPlan
from fused_train.serving.scheduler import FINISHED, Sequence, Step


def _widened(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with its last dimension grown to `width`, zeros after its entries."""
    grown = tensor.new_zeros(*tensor.shape[:-1], width)
    grown[..., : tensor.shape[-1]] = tensor
    return grown


@dataclass(eq=False)
class _Row:
    index: int  # in the page table
    seq: Sequence
    preemptions: int  # the sequence's count when its row was written
    num_pages: int  # of its pages in the row
    tokens: torch.Tensor  # int64: its token ids when the row was written (what prefills feed)


class InputBatch:
    """Page-table rows of the running sequences, on the host, grown as needed; `prepare(step)`
    gives the step's inputs on `device` (see the module docstring)."""

    def __init__(self, page_size: int, num_kv_heads: int, device, rows: int = 16, pages_per_row: int = 16):
        self.page_size, self.num_kv_heads, self.device = page_size, num_kv_heads, torch.device(device)
        self._on_host = self.device.type == "cpu"
        self.page_table = torch.zeros(rows, pages_per_row, dtype=torch.int32)
        # Where the reference runs: key j of a row's sequence in kv head h is row `(page(j) *
        # num_kv_heads + h) * page_size + j % page_size` of the pages (`paged_attention_plan`'s).
        width = pages_per_row * page_size if self._on_host else 0
        self.key_rows = torch.zeros(rows, num_kv_heads, width, dtype=torch.int64)
        self._page_key_rows = (torch.arange(num_kv_heads)[:, None] * page_size + torch.arange(page_size))[None]
        self._no_prefill = self._device(torch.zeros(1, dtype=torch.int32))
        self._rows: dict[str, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))

    def forget(self, seq: Sequence) -> None:
        """`seq` was preempted or ended: its row is free (`prepare` does it for the step's preempted
        sequences and for ended ones)."""
        row = self._rows.pop(seq.request_id, None)
        if row is not None:
            self._free.append(row.index)

    def _row(self, seq: Sequence) -> _Row:
        """`seq`'s row, brought up to date: its new pages (and tokens) appended."""
        row = self._rows.get(seq.request_id)
        if row is not None and (row.seq is not seq or row.preemptions != seq.preemptions
                                or len(seq.pages) < row.num_pages or len(seq.token_ids) < len(row.tokens)):  # fmt: skip
            self.forget(seq)
            row = None
        if row is None:
            if not self._free:
                rows = self.page_table.shape[0]
                self.page_table = torch.cat([self.page_table, torch.zeros_like(self.page_table)])
                self.key_rows = torch.cat([self.key_rows, torch.zeros_like(self.key_rows)])
                self._free = list(range(2 * rows - 1, rows - 1, -1))
            index = self._free.pop()
            self.page_table[index].zero_()
            tokens = torch.tensor(seq.token_ids, dtype=torch.int64)
            row = self._rows[seq.request_id] = _Row(index, seq, seq.preemptions, 0, tokens)
        num_pages = len(seq.pages)
        if num_pages > row.num_pages:
            width = self.page_table.shape[1]
            if num_pages > width:
                self.page_table = _widened(self.page_table, max(2 * width, num_pages))
                if self._on_host:
                    self.key_rows = _widened(self.key_rows, self.page_table.shape[1] * self.page_size)
            pages = torch.tensor(seq.pages[row.num_pages:], dtype=torch.int64)
            self.page_table[row.index, row.num_pages:num_pages] = pages
            if self._on_host:
                page_size = self.page_size
                key_rows = pages[:, None, None] * (self.num_kv_heads * page_size) + self._page_key_rows
                self.key_rows[row.index, :, row.num_pages * page_size : num_pages * page_size] = (
                    key_rows.transpose(0, 1).reshape(self.num_kv_heads, -1)
                )
            row.num_pages = num_pages
        return row

    def _prefill_tokens(self, seq: Sequence, row: _Row) -> torch.Tensor:
        """The ids `seq` feeds this step. A decode feeds its last token, taken from the sequence:
        only a prefill reads the row's (and a sequence prefills after it decoded only when
        preempted, which writes its row anew)."""
        end = seq.num_cached + seq.num_new
        if end > len(row.tokens):
            row.tokens = torch.tensor(seq.token_ids, dtype=torch.int64)
        return row.tokens[seq.num_cached:end]

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """int64 `page * page_size + offset` of each (row, position)."""
        pages, offsets = self._pages_and_offsets(rows, positions)
        return pages * self.page_size + offsets

    def _pages_and_offsets(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 page and offset of each (row, position)."""
        page_size = self.page_size
        return self.page_table[rows, positions // page_size].long(), positions % page_size

    def prepare(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata, torch.Tensor]:
        """`(input_ids, position_ids, metadata, last)` of `step` on the device: its flat row (each
        prefill's `token_ids[num_cached : num_cached + num_new]` at positions from `num_cached` on,
        then each decode's last token), and the index of each sequence's last token in it."""
        for seq in step.preempted + [row.seq for row in self._rows.values() if row.seq.status == FINISHED]:
            self.forget(seq)
        prefill_rows = [self._row(seq) for seq in step.prefills]
        decode_rows = [self._row(seq) for seq in step.decodes]
        num_decodes, page_size = len(step.decodes), self.page_size
        # A decode feeds its last token, at its last position: (row, length, id, position, page,
        # offset, slot) of each, one tensor.
        decodes = []
        for seq, row in zip(step.decodes, decode_rows):
            position = len(seq.token_ids) - 1
            page, offset = seq.pages[position // page_size], position % page_size
            slot = page * page_size + offset
            decodes.append((row.index, position + 1, seq.token_ids[-1], position, page, offset, slot))
        decode_index, kv_lens, ids, positions, slot_pages, slot_offsets, slots = torch.tensor(
            list(zip(*decodes)) or [[]] * 7, dtype=torch.int64
        )
        last, decode_positions = torch.arange(num_decodes), positions
        num_prefill, max_prefill_len, cu_prefill, context = 0, 0, self._no_prefill, {}
        if step.prefills:
            prefill_ids, prefill_positions, prefill_rows, cu_prefill, context = self._prefills(step, prefill_rows)
            num_prefill, max_prefill_len = len(prefill_ids), int((cu_prefill[1:] - cu_prefill[:-1]).max())
            prefill_pages, prefill_offsets = self._pages_and_offsets(prefill_rows, prefill_positions)
            ids, positions = torch.cat([prefill_ids, ids]), torch.cat([prefill_positions, positions])
            slot_pages = torch.cat([prefill_pages, slot_pages])
            slot_offsets = torch.cat([prefill_offsets, slot_offsets])
            slots = slot_pages * page_size + slot_offsets
            last = torch.cat([cu_prefill[1:] - 1, last + num_prefill])
            cu_prefill = self._device(cu_prefill, torch.int32)
        max_pages = max((row.num_pages for row in decode_rows), default=1)
        page_table = self._device(self.page_table[:, :max_pages].index_select(0, decode_index))
        plan = None
        if num_decodes and self._on_host:  # where the reference runs: its per-step part, once
            plan = self._decode_plan(decode_index, kv_lens, decode_positions, decodes)
        metadata = PagedAttentionMetadata(
            slots=self._device(slots),
            num_prefill_tokens=num_prefill,
            cu_seqlens_prefill=cu_prefill,
            max_prefill_len=max_prefill_len,
            page_table=page_table,
            kv_lens=self._device(kv_lens, torch.int32),
            decode_plan=plan,
            slot_pages=self._device(slot_pages),
            slot_offsets=self._device(slot_offsets),
            **context,
        )
        return self._device(ids)[None], self._device(positions)[None], metadata, self._device(last)

    def _decode_plan(self, decode_index, kv_lens, positions, decodes) -> PagedAttentionPlan:
        """`paged_attention_plan` of the decodes (int64 `decode_index`, `kv_lens` and `positions`;
        `decodes` the rows of `prepare`'s table, as ints), sliced from the rows' key rows. A sequence
        shorter than the longest repeats its key 0 (a slot it wrote: its row's later entries may be
        slots not yet written, or stale), masked, as the reference does."""
        lengths = [decode[1] for decode in decodes]
        num_keys = max(lengths)
        if len(decodes) == 1:
            key_rows = self.key_rows[decodes[0][0], :, :num_keys]
        else:
            key_rows = self.key_rows[:, :, :num_keys].index_select(0, decode_index)
        visible = None
        if min(lengths) < num_keys:
            key_ok = torch.arange(num_keys) < kv_lens[:, None]
            key_rows = torch.where(key_ok[:, None, :], key_rows, key_rows[:, :, :1])
            visible = key_ok[:, None, None, :]
        return PagedAttentionPlan(key_rows.reshape(-1), self.num_kv_heads, num_keys, visible, positions[:, None],
                                  None, None, None)  # fmt: skip

    def _prefills(self, step: Step, rows: list[_Row]):
        """The prefills' token ids, positions and rows (one each per token), their `cu_seqlens` and
        the metadata of their cached context (empty when none has any)."""
        num_prefills = len(step.prefills)
        cached = torch.tensor([seq.num_cached for seq in step.prefills], dtype=torch.int64)
        lengths = torch.tensor([seq.num_new for seq in step.prefills], dtype=torch.int64)
        row_index = torch.tensor([row.index for row in rows], dtype=torch.int64)
        ids = torch.cat([self._prefill_tokens(seq, row) for seq, row in zip(step.prefills, rows)])
        cu = torch.zeros(num_prefills + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu[1:])
        # Sequence b's token t sits at position cached[b] + t.
        token_seq = torch.repeat_interleave(torch.arange(num_prefills), lengths, output_size=len(ids))
        positions = cached[token_seq] + torch.arange(len(ids)) - cu[token_seq]
        num_context = int(cached.sum())
        if not num_context:
            return ids, positions, row_index[token_seq], cu, {}
        # Prefill b's keys: its context (rows of the gathered context), then its fresh keys (rows
        # after all the context), from cat([context, fresh]).
        cu_context = torch.zeros(num_prefills + 1, dtype=torch.int64)
        torch.cumsum(cached, 0, out=cu_context[1:])
        context_seq = torch.repeat_interleave(torch.arange(num_prefills), cached, output_size=num_context)
        context_slots = self._slots(row_index[context_seq], torch.arange(num_context) - cu_context[context_seq])
        lengths_k = cached + lengths
        cu_k = torch.zeros(num_prefills + 1, dtype=torch.int64)
        torch.cumsum(lengths_k, 0, out=cu_k[1:])
        key_seq = torch.repeat_interleave(torch.arange(num_prefills), lengths_k, output_size=int(cu_k[-1]))
        key = torch.arange(int(cu_k[-1])) - cu_k[key_seq]  # the key's index within its prefill
        order = torch.where(key < cached[key_seq], cu_context[key_seq] + key,
                            num_context + cu[key_seq] + key - cached[key_seq])  # fmt: skip
        context = dict(cu_seqlens_prefill_k=self._device(cu_k, torch.int32), max_prefill_len_k=int(lengths_k.max()),
                       context_slots=self._device(context_slots), prefill_key_order=self._device(order))  # fmt: skip
        return ids, positions, row_index[token_seq], cu, context

    def _device(self, tensor: torch.Tensor, dtype=None) -> torch.Tensor:
        if self._on_host and (dtype is None or tensor.dtype == dtype):
            return tensor  # not even a no-op `to`: a batch-1 step on a CPU is made of such calls
        return tensor.to(self.device, dtype, non_blocking=True)
