"""Varlen attention on a CPU in few SDPA calls, where the Triton kernel cannot run.

`varlen_attention_ref` makes one `scaled_dot_product_attention` call per sequence. On a CPU a call
costs a fixed overhead (dispatch, autograd node, the threads' fork and join; in the forward and
again in the backward) besides its arithmetic, so a packed row of many short documents spends much
of its attention time on overheads. This module computes the same attention in one of three ways:

  documents       one call per sequence, `is_causal` where the mask is plain causal: no padding,
                  no gathers, most calls.
  buckets         sequences sorted by length and cut into groups, one padded
                  `[n, heads, length, head_dim]` call per group under an additive mask (key padding,
                  causality, windows); a group of one length needs no padding and keeps `is_causal`.
  block_diagonal  the whole row as one sequence under a block-diagonal mask: one call,
                  `total_q * total_k` scores, no gathers.

Which is fastest depends on the lengths and on the machine, so it is chosen per call by a cost
model with three constants measured on this machine:

    seconds = calls * seconds_per_call + rows * seconds_per_row + scores * seconds_per_score

where `rows` are the query rows the calls process (padding included) and `scores` the
(sequence, query, key) entries they compute: `count * len_q * len_k` per call. The row term holds
what a kernel spends per block of queries (its small matmuls' set-up, the softmax bookkeeping);
without it, sequences of tens of tokens cost 2-3x what the other two terms predict. `is_causal`
is counted as computing every score: the CPU flash kernel skips only whole key blocks of 512
above the diagonal, so for short sequences it computes them all. The constants are measured once
per process for each dtype, head counts, head_dim, thread count and pass (forward, or forward and
backward) by timing SDPA calls, each constant from the call it dominates (`measure_sdpa_costs`):
1 token (all overhead), 512 tokens (scores), 64 sequences of 16 tokens (rows), and the last again
through a padded bucket (its gathers). The cut points of the buckets
minimise the same cost (dynamic programming over the sorted lengths). A plan is built once per
`cu_seqlens` pair and reused while the same, unchanged tensors come back (a patched model passes
them to every layer).

Every strategy computes SDPA over exactly the keys the reference lets each query see, and autograd
differentiates it; only the order of floating-point sums differs. Padded query rows see every key
of their row, so they stay finite, and are dropped; padded keys are masked out.
"""

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from fused_train.kernels.varlen_attention_ref import varlen_attention_ref

# In order of preference when estimated costs are equal: fewer index copies first.
STRATEGIES = ("documents", "block_diagonal", "buckets")
# Calibration calls (sequences, tokens each): all overhead; 93% scores; 60% rows (at the costs of
# a 2-core x86 CPU). Each constant is read off the call it dominates, in that order, so that
# timing noise in one call cannot turn another constant negative as a joint fit can; long enough
# that each term stands out of the noise, short enough to take milliseconds.
_CALIBRATION_SHAPES = ((1, 1), (1, 512), (64, 16))
# Timings are minima over repeats: on a shared machine noise only ever adds time.
_CALIBRATION_REPEATS = 5


@dataclass(frozen=True)
class SdpaCosts:
    """The cost model's constants, in seconds."""

    seconds_per_call: float
    seconds_per_row: float
    seconds_per_score: float
    seconds_per_gathered_row: float = 0.0

    def __call__(self, calls: int, rows: int, scores: int, gathered_rows: int = 0) -> float:
        return (
            calls * self.seconds_per_call
            + rows * self.seconds_per_row
            + scores * self.seconds_per_score
            + gathered_rows * self.seconds_per_gathered_row
        )


def measure_sdpa_costs(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, backward: bool
) -> SdpaCosts | None:
    """The cost of SDPA calls of this shape on this machine, at torch's current thread count, or
    None when the timings were too noisy to read (then the reference's way runs).

    Measured the first time it is asked for (0.1-0.3 s on a 2-core CPU), then remembered for the process.
    """
    return _measure(dtype, num_heads, num_kv_heads, head_dim, backward, torch.get_num_threads())


@lru_cache(maxsize=None)
def _measure(dtype, num_heads, num_kv_heads, head_dim, backward, threads):
    def random(*shape):
        return torch.randn(shape, dtype=dtype, requires_grad=backward)

    def sdpa(count, tokens):
        q = random(count, num_heads, tokens, head_dim)
        k, v = random(count, num_kv_heads, tokens, head_dim), random(count, num_kv_heads, tokens, head_dim)
        mask = torch.zeros(count, 1, tokens, tokens, dtype=dtype)
        gqa = num_heads != num_kv_heads
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def bucket(count, tokens):
        # One padded bucket of `count` sequences, the last one token short (so it has a mask).
        lengths = [tokens] * (count - 1) + [tokens - 1]
        schedule = Schedule("buckets", (tuple(range(count)),), 0.0)
        plan = _build_plan(schedule, lengths, lengths, True, (-1, -1), dtype, torch.device("cpu"))
        q = random(sum(lengths), num_heads, head_dim)
        k, v = random(sum(lengths), num_kv_heads, head_dim), random(sum(lengths), num_kv_heads, head_dim)
        return lambda: _run(plan, q, k, v, 1.0)

    with torch.enable_grad() if backward else torch.no_grad():
        calls = [sdpa(n, t) for n, t in _CALIBRATION_SHAPES] + [bucket(*_CALIBRATION_SHAPES[-1])]
        base, time_scores, time_rows, time_bucket = _seconds(calls, backward)
    (_, long), (count, short) = _CALIBRATION_SHAPES[1:]
    # Beyond the 1-token call: the long call's time is its scores' (its rows add a few percent,
    # which only errs against the all-scores block-diagonal call), the short calls' what their
    # scores leave, the bucket's what the same call leaves.
    if time_scores < 2 * base:
        # The long call's arithmetic does not stand out of the call overhead: the timings are
        # noise (e.g. torch's threads waiting for cores that other processes hold).
        return None
    per_score = (time_scores - base) / (long * long - 1)
    per_row = max(time_rows - base - (count * short * short - 1) * per_score, 0.0) / (count * short - 1)
    per_gathered_row = max(time_bucket - time_rows, 0.0) / (count * short)
    return SdpaCosts(base, per_row, per_score, per_gathered_row)


def _seconds(attentions, backward):
    """The least time each of `attentions` took (forward, and backward if asked), over rounds that
    time each in turn, so that a burst of other load hits all of them rather than one."""
    best = [math.inf] * len(attentions)
    # One untimed round first: the first call of a shape allocates the kernel's buffers.
    for _ in range(_CALIBRATION_REPEATS + 1):
        for i, attention in enumerate(attentions):
            start = time.perf_counter()
            out = attention()
            if backward:
                out.sum().backward()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Schedule:
    """One strategy's groups of sequences (each group one SDPA call, `groups[i]` its sequence
    indices) and its estimated cost."""

    strategy: str
    groups: tuple[tuple[int, ...], ...]
    seconds: float


def schedules(lengths_q, lengths_k, costs: SdpaCosts) -> dict[str, Schedule]:
    """Every strategy's schedule for sequences of these lengths; sequences without queries need no call."""
    docs = [b for b, n in enumerate(lengths_q) if n > 0]
    documents = Schedule(
        "documents", tuple((b,) for b in docs), sum(costs(1, lengths_q[b], lengths_q[b] * lengths_k[b]) for b in docs)
    )
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    block = Schedule("block_diagonal", (tuple(docs),), costs(1, total_q, total_q * total_k) if docs else 0.0)
    return {"documents": documents, "block_diagonal": block, "buckets": _buckets(lengths_q, lengths_k, docs, costs)}


def choose(all_schedules: dict[str, Schedule]) -> Schedule:
    """The cheapest schedule; at equal cost the first of `STRATEGIES`."""
    return min((all_schedules[name] for name in STRATEGIES), key=lambda s: s.seconds)


def _buckets(lengths_q, lengths_k, docs, costs) -> Schedule:
    # Groups are runs of the sequences sorted by (len_k, len_q); one length pair never splits. Over
    # the m distinct pairs, best[j] is the cheapest way to run the first j: O(m^2), pruned below.
    by_pair = {}
    for b in docs:
        by_pair.setdefault((lengths_k[b], lengths_q[b]), []).append(b)
    pairs = sorted(by_pair)
    best, cut = [0.0] + [math.inf] * len(pairs), [0] * (len(pairs) + 1)
    for j in range(1, len(pairs) + 1):
        count, max_q, max_k = 0, 0, pairs[j - 1][0]
        for i in range(j - 1, -1, -1):
            count += len(by_pair[pairs[i]])
            max_q = max(max_q, pairs[i][1])
            padded = costs(1, count * max_q, count * max_q * max_k, count * max_q)
            if padded >= best[j]:
                # Taking in shorter pairs only adds sequences: no wider group can be cheaper.
                break
            if best[i] + padded < best[j]:
                best[j], cut[j] = best[i] + padded, i
    groups, j = [], len(pairs)
    while j > 0:
        groups.append(tuple(b for pair in pairs[cut[j] : j] for b in by_pair[pair]))
        j = cut[j]
    return Schedule("buckets", tuple(reversed(groups)), best[-1])


def _plain(causal, window_size):
    """'causal' or 'full' when a sequence with as many keys as queries needs no mask, else None."""
    if tuple(window_size) != (-1, -1):
        return None
    return "causal" if causal else "full"


@dataclass(frozen=True)
class _Call:
    count: int
    len_q: int
    len_k: int
    mask: torch.Tensor | None  # additive, [count, 1, len_q, len_k]; None: `is_causal` or no mask
    is_causal: bool


@dataclass(frozen=True)
class _Plan:
    calls: tuple[_Call, ...]
    # Rows of the (gathered) q, k each call takes, in order; k may end with rows no call reads.
    sizes_q: tuple[int, ...]
    sizes_k: tuple[int, ...]
    # Buckets only (else None: q, k, v split as they are): the rows of q and k gathered into the
    # calls' padded inputs, and for each row of q and k its own (unpadded) place among them.
    rows_q: torch.Tensor | None = None
    rows_k: torch.Tensor | None = None
    place_q: torch.Tensor | None = None
    place_k: torch.Tensor | None = None


def varlen_attention_cpu(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, softmax_scale=None, window_size=(-1, -1), costs=None
):
    """`varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size)`
    (no softcap, no lse) in the strategy that the cost model finds cheapest, with the constants
    measured here (`measure_sdpa_costs`) or the given `costs`.

    Inputs are checked by the caller (`fused_train.ops.varlen_attention.varlen_attention`). The reference
    itself runs without `costs` under `torch.use_deterministic_algorithms(True)` (a strategy chosen
    from timings could differ from one run to the next), when the timings could not be read, and when some
    query row sees no key (it outputs zeros, where SDPA would give NaN).
    """
    window_size = tuple(int(w) for w in window_size)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    plan = _REFERENCE
    if costs is None and not torch.are_deterministic_algorithms_enabled():
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        costs = measure_sdpa_costs(compute_dtype, num_heads, num_kv_heads, head_dim, backward)
    if costs is not None:
        key = (causal, window_size, costs, compute_dtype, q.device)
        plan = _cached_plan(cu_seqlens_q, cu_seqlens_k, key)
        if plan is None:
            plan = _make_plan(cu_seqlens_q, cu_seqlens_k, causal, window_size, costs, compute_dtype, q.device)
            _store_plan(cu_seqlens_q, cu_seqlens_k, key, plan)
    if plan is _REFERENCE:
        return varlen_attention_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale, window_size=window_size
        )
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    return _run(plan, q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), scale).to(q.dtype)


def _make_plan(cu_seqlens_q, cu_seqlens_k, causal, window_size, costs, dtype, device):
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    pairs = zip(lengths_q, lengths_k)
    if sum(lengths_q) == 0 or not all(_every_row_sees_a_key(n_q, n_k, causal, window_size) for n_q, n_k in pairs):
        return _REFERENCE
    schedule = choose(schedules(lengths_q, lengths_k, costs))
    return _build_plan(schedule, lengths_q, lengths_k, causal, window_size, dtype, device)


def _every_row_sees_a_key(len_q, len_k, causal, window_size):
    # Row i's last visible key is i + (len_k - len_q) + right, so every row sees one when row 0
    # does (a window's left side never empties a row). Sequences without queries have no rows.
    right = _right(causal, window_size)
    return len_q == 0 or (len_k > 0 and (right < 0 or len_k - len_q + right >= 0))


def _right(causal, window_size):
    right = window_size[1]
    return (0 if right < 0 else min(right, 0)) if causal else right


# The plan that says: run the reference.
_REFERENCE = "reference"
# The last plan, stored as one (key, plan) tuple in one assignment: threads never pair one's key
# with another's plan. One entry is enough: a forward passes the same offsets to every layer.
# The key holds the offsets' values (this path runs on CPU tensors, where reading them is a copy
# of a few ints): a tensor changed in place, or an inference tensor (no version counter), is
# never taken for the one it was.
_last_plan = (None, None)


def _cached_plan(cu_seqlens_q, cu_seqlens_k, key):
    cached_key, plan = _last_plan
    if cached_key == _plan_key(cu_seqlens_q, cu_seqlens_k, key):
        return plan
    return None


def _store_plan(cu_seqlens_q, cu_seqlens_k, key, plan):
    global _last_plan
    _last_plan = (_plan_key(cu_seqlens_q, cu_seqlens_k, key), plan)


def _plan_key(cu_seqlens_q, cu_seqlens_k, key):
    return (tuple(cu_seqlens_q.tolist()), tuple(cu_seqlens_k.tolist()), key)


def _build_plan(schedule, lengths_q, lengths_k, causal, window_size, dtype, device) -> _Plan:
    if schedule.strategy == "documents":
        # Every sequence in its place, those without queries included, so q, k, v split as they are.
        calls = tuple(
            _make_call([n_q], [n_k], causal, window_size, dtype, device) for n_q, n_k in zip(lengths_q, lengths_k)
        )
        return _Plan(calls, tuple(lengths_q), tuple(lengths_k))
    if schedule.strategy == "block_diagonal":
        total_q, total_k = sum(lengths_q), sum(lengths_k)
        mask = _block_diagonal_mask(lengths_q, lengths_k, causal, window_size, dtype, device)
        call = _Call(1, total_q, total_k, mask, False)
        return _Plan((call,), (total_q,), (total_k,))
    calls = tuple(
        _make_call([lengths_q[b] for b in group], [lengths_k[b] for b in group], causal, window_size, dtype, device)
        for group in schedule.groups
    )
    rows_q, place_q = _padded_rows(schedule.groups, [c.len_q for c in calls], lengths_q, device)
    # The keys of sequences without queries go last, read by no call, so that every row of k has
    # a place (its gradient is zero).
    without_queries = tuple(b for b, n in enumerate(lengths_q) if n == 0)
    rows_k, place_k = _padded_rows(
        schedule.groups + (without_queries,), [c.len_k for c in calls] + [0], lengths_k, device
    )
    sizes_k = tuple(c.count * c.len_k for c in calls) + (len(rows_k) - sum(c.count * c.len_k for c in calls),)
    return _Plan(calls, tuple(c.count * c.len_q for c in calls), sizes_k, rows_q, rows_k, place_q, place_k)


def _padded_rows(groups, widths, lengths, device):
    """The rows that lay the sequences of each group side by side, each padded to its group's width
    (0: unpadded, one after another), and the place of each row among them."""
    lengths_t = torch.tensor(lengths, device=device)
    starts = lengths_t.cumsum(0) - lengths_t
    rows, places, offset = [], torch.empty(sum(lengths), dtype=torch.long, device=device), 0
    for group, width in zip(groups, widths):
        if not group:
            continue
        index = torch.tensor(group, device=device)
        n = lengths_t[index]
        slot = torch.repeat_interleave(torch.arange(len(group), device=device), n)
        position = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        if width == 0:
            rows.append(starts[index][slot] + position)
            places[starts[index][slot] + position] = offset + torch.arange(len(position), device=device)
            offset += len(position)
            continue
        # Padding repeats the sequence's last row: any real row will do, padding is masked or dropped.
        padded = torch.minimum(torch.arange(width, device=device), (n - 1)[:, None])
        rows.append((starts[index][:, None] + padded).flatten())
        places[starts[index][slot] + position] = offset + slot * width + position
        offset += len(group) * width
    return torch.cat(rows), places


def _make_call(lengths_q, lengths_k, causal, window_size, dtype, device) -> _Call:
    count, len_q, len_k = len(lengths_q), max(lengths_q), max(lengths_k)
    plain = _plain(causal, window_size)
    uniform = len(set(lengths_q)) == 1 and len(set(lengths_k)) == 1
    if uniform and (plain == "full" or (plain == "causal" and len_q == len_k)):
        return _Call(count, len_q, len_k, None, plain == "causal")
    n_q = torch.tensor(lengths_q, device=device)[:, None, None]
    n_k = torch.tensor(lengths_k, device=device)[:, None, None]
    rows = torch.arange(len_q, device=device)[None, :, None]
    cols = torch.arange(len_k, device=device)[None, None, :]
    visible = _visible(rows, cols, n_q, n_k, causal, window_size) & (cols < n_k)
    visible |= rows >= n_q
    return _Call(count, len_q, len_k, _additive(visible, dtype)[:, None], False)


def _block_diagonal_mask(lengths_q, lengths_k, causal, window_size, dtype, device):
    def tokens(lengths):
        lengths = torch.tensor(lengths, device=device)
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        position = torch.arange(int(lengths.sum()), device=device) - (lengths.cumsum(0) - lengths)[sequence]
        return sequence, position, lengths

    sequence_q, position_q, n_q = tokens(lengths_q)
    sequence_k, position_k, n_k = tokens(lengths_k)
    len_q, len_k = n_q[sequence_q][:, None], n_k[sequence_k][None, :]
    visible = _visible(position_q[:, None], position_k[None, :], len_q, len_k, causal, window_size)
    visible &= sequence_q[:, None] == sequence_k[None, :]
    return _additive(visible, dtype)[None, None]


def _visible(rows, cols, len_q, len_k, causal, window_size):
    """Key `cols` visible from query `rows` of a sequence (fused_train.kernels.varlen_attention's rule)."""
    diagonal = rows + (len_k - len_q)
    left, right = window_size[0], _right(causal, window_size)
    shape = torch.broadcast_shapes(rows.shape, cols.shape, len_q.shape, len_k.shape)
    visible = torch.ones(shape, dtype=torch.bool, device=rows.device)
    if right >= 0:
        visible &= cols <= diagonal + right
    if left >= 0:
        visible &= cols >= diagonal - left
    return visible


def _additive(visible, dtype):
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class _GatherPadded(torch.autograd.Function):
    """`x.index_select(0, rows)`, where `rows` lists every row of x, some again as padding; the
    gradient of row r is read at `place[r]` alone, since padding gets a zero gradient (padded
    queries' outputs are dropped, padded keys masked out). index_select's own backward is a
    scatter-add, several times slower on a CPU than this gather."""

    @staticmethod
    def forward(ctx, x, rows, place):
        ctx.save_for_backward(place)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (place,) = ctx.saved_tensors
        return grad.index_select(0, place), None, None


class _Unpad(torch.autograd.Function):
    """`x.index_select(0, place)` where `place` lists a row at most once: the gradient goes back to
    those rows by a copy (zeros elsewhere) rather than index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x, place):
        ctx.save_for_backward(place)
        ctx.padded_rows = x.shape[0]
        return x.index_select(0, place)

    @staticmethod
    def backward(ctx, grad):
        (place,) = ctx.saved_tensors
        return grad.new_zeros((ctx.padded_rows, *grad.shape[1:])).index_copy_(0, place, grad), None


def _run(plan: _Plan, q, k, v, scale):
    num_heads, head_dim = q.shape[1], q.shape[2]
    if plan.rows_q is not None:
        q = _GatherPadded.apply(q, plan.rows_q, plan.place_q)
        k = _GatherPadded.apply(k, plan.rows_k, plan.place_k)
        v = _GatherPadded.apply(v, plan.rows_k, plan.place_k)
    outs = []
    # zip stops at the last call: k's trailing rows, if any, are read by none.
    for call, q_call, k_call, v_call in zip(
        plan.calls, q.split(plan.sizes_q), k.split(plan.sizes_k), v.split(plan.sizes_k)
    ):
        if call.len_q == 0:
            outs.append(q_call)
            continue
        # [count, heads, tokens, head_dim] views of token-major rows, as the reference passes them.
        out = F.scaled_dot_product_attention(
            q_call.reshape(call.count, call.len_q, num_heads, head_dim).transpose(1, 2),
            k_call.reshape(call.count, call.len_k, -1, head_dim).transpose(1, 2),
            v_call.reshape(call.count, call.len_k, -1, head_dim).transpose(1, 2),
            attn_mask=call.mask,
            is_causal=call.is_causal,
            scale=scale,
            enable_gqa=num_heads != k.shape[1],
        )
        outs.append(out.transpose(1, 2).reshape(call.count * call.len_q, num_heads, head_dim))
    out = torch.cat(outs)
    return out if plan.place_q is None else _Unpad.apply(out, plan.place_q)
