"""One step of the engine on tensors: the step's flat inputs, one forward of the patched model, logits.

The step's sequences (`scheduler.Step`: prefills, then decodes) become one row of tokens: each
prefill's whole sequence (prompt, and for a preempted one what it had generated), then each
decode's last token, with their positions, their page slots (`PagedLayout`), and, with an adapter
pool, each token's adapter slot. The model runs once on that row, through `StepCache`, and the
logits of each sequence's last token come back.
"""

import inspect

import torch

from fused_train.serving.adapters import AdapterPool
from fused_train.serving.paged_cache import PagedKVCache, PagedLayout, StepCache
from fused_train.serving.scheduler import Step


class Runner:
    def __init__(self, model, cache: PagedKVCache, pool: AdapterPool | None):
        self.model, self.cache, self.pool = model, cache, pool
        self.device = next(model.parameters()).device
        # transformers 5 renames the forward's past_key_values to cache (the old name is deprecated).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def layout(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, PagedLayout, torch.Tensor]:
        """`(input_ids, position_ids, layout, last)`: the step's flat row, and the index of each
        sequence's last token in it."""
        page_size = self.cache.page_size
        ids, positions, slots, lengths = [], [], [], []
        for seq in step.prefills:
            n = len(seq.token_ids)
            ids.extend(seq.token_ids)
            positions.extend(range(n))
            slots.extend(seq.pages[j // page_size] * page_size + j % page_size for j in range(n))
            lengths.append(n)
        for seq in step.decodes:
            j = len(seq.token_ids) - 1
            ids.append(seq.token_ids[-1])
            positions.append(j)
            slots.append(seq.pages[j // page_size] * page_size + j % page_size)
        max_pages = max((len(seq.pages) for seq in step.decodes), default=1)
        page_table = [seq.pages + [0] * (max_pages - len(seq.pages)) for seq in step.decodes]
        cu_prefill = [0]
        for n in lengths:
            cu_prefill.append(cu_prefill[-1] + n)
        num_prefill = cu_prefill[-1]
        last = [end - 1 for end in cu_prefill[1:]] + list(range(num_prefill, num_prefill + len(step.decodes)))

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        layout = PagedLayout(
            slots=tensor(slots, torch.int64),
            num_prefill_tokens=num_prefill,
            cu_seqlens_prefill=tensor(cu_prefill, torch.int32),
            max_prefill_len=max(lengths, default=0),
            page_table=tensor(page_table, torch.int32).view(len(step.decodes), max_pages),
            kv_lens=tensor([len(seq.token_ids) for seq in step.decodes], torch.int32),
        )
        return tensor(ids, torch.int64)[None], tensor(positions, torch.int64)[None], layout, tensor(last, torch.int64)

    def run(self, step: Step, token_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits `[sequences, vocab]` of each sequence's next token, on the model's device.
        `token_slots` (from the pool's `slots_for`, one per token of the row) applies adapters."""
        input_ids, position_ids, layout, last = self.layout(step)
        kwargs = {self._cache_kwarg: StepCache(self.cache, layout, self.model.config)}
        with torch.inference_mode():
            if token_slots is None:
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                 logits_to_keep=last, **kwargs)  # fmt: skip
            else:
                with self.pool.activate(token_slots):
                    out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                     logits_to_keep=last, **kwargs)  # fmt: skip
        return out.logits[0].float()


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator) -> int:
    """One token id from float32 `logits` `[vocab]` (on the CPU): greedy at temperature 0, else
    softmax(logits / temperature) cut to the `top_k` most likely (0: all) and to the smallest set
    whose probability reaches `top_p`, drawn with `generator` (the request's own: a seeded
    request draws the same tokens whatever else shares its batches)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p: the first token always stays.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
