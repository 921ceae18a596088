"""One step of the engine on tensors: the step's flat inputs, one forward of the patched model, logits.

The step's sequences (`scheduler.Step`: prefills, then decodes) become one row of tokens: each
prefill's `token_ids[num_cached : num_cached + num_new]` (its prompt, and for a preempted one what
it had generated, after what is cached: a shared prefix, its earlier chunks) at positions from
`num_cached` on, then each decode's last token, with their positions, their page slots
(`PagedAttentionMetadata`, and the slots of each prefill's cached context), and, with an adapter
pool, each token's adapter slot; `input_batch.InputBatch` builds them from page-table rows kept
across steps. The model runs once on that row, through `StepCache`, and the logits of each
sequence's last token come back (and of every token it fed, for the sequences that ask: prompt
logprobs).

`sample_batch` chooses every sequence's next token in one vectorized pass on the logits' device and
hands only the ids to the host; `sample`, one row on the CPU with a `torch.Generator`, is its
reference (and the naive baseline's sampler).
"""

import inspect
import itertools

import torch

from fused_train.serving.adapters import AdapterPool
from fused_train.serving.input_batch import InputBatch
from fused_train.serving.paged_cache import PagedAttentionMetadata, PagedKVCache, StepCache
from fused_train.serving.scheduler import Sequence, Step


class Runner:
    def __init__(self, model, cache: PagedKVCache, pool: AdapterPool | None):
        self.model, self.cache, self.pool = model, cache, pool
        self.device = next(model.parameters()).device
        self.inputs = InputBatch(cache.page_size, cache.num_kv_heads, self.device)
        # transformers 5 renames the forward's past_key_values to cache (the old name is deprecated).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prepare_inputs(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata, torch.Tensor]:
        """`(input_ids, position_ids, metadata, last)`: the step's flat row, and the index of each
        sequence's last token in it (`InputBatch.prepare`, from buffers kept across steps)."""
        return self.inputs.prepare(step)

    def run(self, step: Step, token_slots: torch.Tensor | None = None,
            every_token=frozenset()) -> tuple[torch.Tensor, dict[Sequence, torch.Tensor]]:  # fmt: skip
        """Float32 logits `[sequences, vocab]` of each sequence's next token, on the model's device,
        and for each sequence of the step in `every_token` the logits `[num_new, vocab]` of every
        token it fed (prompt logprobs). `token_slots` (from the pool's `slots_for`, one per token of
        the row) applies adapters."""
        input_ids, position_ids, metadata, last = self.prepare_inputs(step)
        wanted, keep = [], last
        if every_token:
            # The row holds each sequence's num_new tokens in step order (a decode feeds one).
            starts = itertools.accumulate((seq.num_new for seq in step.sequences), initial=0)
            wanted = [(seq, start) for seq, start in zip(step.sequences, starts) if seq in every_token]
            rows = [row for seq, start in wanted for row in range(start, start + seq.num_new)]
            keep = torch.cat([last, torch.tensor(rows, dtype=last.dtype).to(last.device, non_blocking=True)])
        kwargs = {self._cache_kwarg: StepCache(self.cache, metadata, self.model.config)}
        with torch.inference_mode():
            if token_slots is None:
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                 logits_to_keep=keep, **kwargs)  # fmt: skip
            else:
                with self.pool.activate(token_slots):
                    out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                     logits_to_keep=keep, **kwargs)  # fmt: skip
        logits = out.logits[0].float()
        fed, at = {}, len(last)
        for seq, _ in wanted:
            fed[seq], at = logits[at : at + seq.num_new], at + seq.num_new
        return logits[: len(last)], fed


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


_MASK32 = 0xFFFFFFFF


def _mul32(x, constant: int):
    """`x * constant mod 2**32` for `x` in [0, 2**32) (an int or an int64 tensor), by 16-bit halves:
    no int64 overflow."""
    return (x * (constant & 0xFFFF) + (((x * (constant >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x):
    """A 32-bit integer hash (Wellons' lowbias32) of `x` in [0, 2**32): an int, or elementwise an
    int64 tensor (the same function on the host and on the device)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed: int, index: int) -> int:
    """The 32-bit key of a row's noise: a hash of its request's seed (any 64 bits) and token index."""
    return _hash32(_hash32(_hash32(seed & _MASK32) ^ ((seed >> 32) & _MASK32)) ^ (index & _MASK32))


_VOCAB_HASHES: dict[tuple[int, torch.device], torch.Tensor] = {}


def counter_uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), `[rows, vocab]` float32: a pure function of each row's `row_key` (int64
    `keys [rows]`) and the vocabulary id, a counter-based generator: a row draws the same noise
    whatever other rows share its batch, and there is no generator state to keep."""
    ids = _VOCAB_HASHES.get((vocab, keys.device))
    if ids is None:
        ids = _VOCAB_HASHES[vocab, keys.device] = _hash32(torch.arange(1, vocab + 1, device=keys.device))
    bits = _hash32(keys[:, None] ^ ids[None, :])
    return ((bits >> 9).float() + 0.5) * 2.0**-23  # 23 bits: float32 holds each below 1 exactly


def sample_batch(logits: torch.Tensor, temperatures: list[float], top_ps: list[float], top_ks: list[int],
                 seeds: list[int], indices: list[int], banned: list[tuple[int, int]] = ()) -> list[int]:  # fmt: skip
    """The next token id of every row of float32 `logits` `[rows, vocab]`, in one pass on their
    device; what `sample` draws, per row: greedy at temperature 0, else softmax(logits / temperature)
    cut to the `top_k` most likely (0 or -1: all) and to the smallest set whose probability reaches
    `top_p`. The draw is Gumbel-max with `counter_uniforms` of the row's `seeds` (ints, any 64 bits)
    and `indices` (the row's token index): a seeded request draws the same tokens alone or in any
    batch. `banned` (row, token id) pairs are never chosen (min_tokens). One copy to the host."""
    rows, vocab = logits.shape
    device = logits.device
    if banned:
        banned_rows, banned_ids = (torch.tensor(column, device=device) for column in zip(*banned))
        logits = logits.index_put((banned_rows, banned_ids), torch.tensor(float("-inf"), device=device))
    chosen = logits.argmax(-1)
    sampled = [row for row in range(rows) if temperatures[row] > 0]
    if not sampled:
        return chosen.tolist()
    ks = [top_ks[row] if 0 < top_ks[row] < vocab else vocab for row in sampled]
    ps = [float(top_ps[row]) for row in sampled]
    ints = torch.tensor([[row, k, row_key(seeds[row], indices[row])] for row, k in zip(sampled, ks)])
    ints = ints.to(device, non_blocking=True)
    floats = torch.tensor([[temperatures[row], p] for row, p in zip(sampled, ps)], dtype=torch.float32)
    floats = floats.to(device, non_blocking=True)
    selected = ints[:, 0]
    scaled = logits.index_select(0, selected) / floats[:, :1]
    if min(ks) < vocab or min(ps) < 1.0:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        keep = ordered >= ordered.gather(1, ints[:, 1:2] - 1)  # the top k, ties with the k-th kept
        if min(ps) < 1.0:
            probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
            # Keep a token while the mass before it is below top_p: the first token always stays.
            keep &= (torch.cumsum(probs, dim=-1) - probs) < floats[:, 1:2]
        scaled = scaled.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep), float("-inf"))
    gumbel = -torch.log(-torch.log(counter_uniforms(ints[:, 2], vocab)))
    return chosen.index_copy(0, selected, (scaled + gumbel).argmax(-1)).tolist()


def chosen_logprobs(logprobs: torch.Tensor, tokens: list[int]) -> list[float]:
    """Each row's log-probability of its chosen token: `logprobs` `[rows, vocab]` (the step's
    `log_softmax` of its raw logits, one fused op where logsumexp is several: it runs at every
    step, and a batch-1 step on a CPU pays for each op) at the token, on their device; one float
    per row comes to the host."""
    index = torch.tensor(tokens, dtype=torch.int64).to(logprobs.device, non_blocking=True)
    return logprobs.gather(1, index[:, None])[:, 0].tolist()


def penalize(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]], presence: list[float],
             frequency: list[float], repetition: list[float],
             biases: list[dict[int, float]]) -> torch.Tensor:  # fmt: skip
    """`logits` `[rows, vocab]` with each row's logit bias added, then vLLM's penalties, in one pass
    on their device (before temperature): a token of the row's prompt or output has its logit
    divided by `repetition` where positive, multiplied where not; then each token's logit loses
    `frequency` times its count in the output and `presence` once if it is there (output only).
    The counts are a scatter of the rows' token ids, built on the device."""
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.clone()
    bias = [(row, token, value) for row, b in enumerate(biases) for token, value in b.items()]
    if bias:
        row_ids, token_ids, values = zip(*bias)
        index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
        logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)

    def counts(histories):
        flat = torch.tensor([t for h in histories for t in h], dtype=torch.int64, device=device)
        row = torch.repeat_interleave(torch.arange(rows, device=device),
                                      torch.tensor([len(h) for h in histories], device=device))  # fmt: skip
        return torch.zeros(rows, vocab, device=device).index_put_((row, flat), torch.ones(len(flat), device=device),
                                                                  accumulate=True)  # fmt: skip

    output_counts = counts(outputs)
    seen = (counts(prompts) + output_counts) > 0
    scalars = torch.tensor([presence, frequency, repetition], dtype=logits.dtype).to(device, non_blocking=True)
    repeat = scalars[2][:, None]
    penalized = torch.where(logits > 0, logits / repeat, logits * repeat)
    logits = torch.where(seen, penalized, logits)
    return logits - scalars[1][:, None] * output_counts - scalars[0][:, None] * (output_counts > 0)
