"""The CPU varlen attention's strategies equal the reference, and its choice follows its cost model."""

import itertools

import pytest
import torch

import fused_train
from fused_train.ops import varlen_attention_cpu as cpu_attention
from fused_train.ops.varlen_attention_cpu import SdpaCosts, choose, schedules, varlen_attention_cpu
from fused_train.kernels.varlen_attention_ref import varlen_attention_ref

# lengths_q, lengths_k (None: the same), num_heads, num_kv_heads, kwargs. Odd lengths, one-token
# sequences, repeated lengths (a bucket without padding) and sequences without queries.
CASES = {
    "causal": ([1, 5, 2, 37, 1, 12, 40, 5], None, 2, 2, dict(causal=True)),
    "gqa": ([1, 5, 2, 37, 1, 12, 40, 5], None, 4, 2, dict(causal=True)),
    "q_shorter_than_k": ([3, 1, 9, 1, 0, 4, 2], [10, 4, 9, 2, 3, 4, 7], 4, 1, dict(causal=True)),
    "non_causal": ([5, 17, 1, 5, 3], [8, 17, 2, 5, 1], 2, 2, dict(causal=False)),
    "sliding_window": ([40, 9, 1, 3, 9, 2], None, 4, 2, dict(causal=True, window_size=(6, -1))),
    "window_both_sides": ([21, 13, 1, 2, 13, 4], None, 2, 1, dict(causal=False, window_size=(3, 2))),
}
# Costs under which each strategy is the cheapest for every case above (asserted below): scores
# only (fewest: a call per sequence), calls only (fewest: one call), and calls worth ~50 scores.
COSTS = {
    "documents": SdpaCosts(0.0, 0.0, 1.0),
    "block_diagonal": SdpaCosts(1.0, 0.0, 0.0),
    "buckets": SdpaCosts(50.0, 0.0, 1.0),
}


def offsets(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def inputs(case, dtype=torch.float64):
    lengths_q, lengths_k, num_heads, num_kv_heads, kwargs = CASES[case]
    lengths_k = lengths_k or lengths_q
    generator = torch.Generator().manual_seed(len(case))
    q = torch.randn(sum(lengths_q), num_heads, 16, generator=generator, dtype=dtype)
    k = torch.randn(sum(lengths_k), num_kv_heads, 16, generator=generator, dtype=dtype)
    v = torch.randn(sum(lengths_k), num_kv_heads, 16, generator=generator, dtype=dtype)
    return (q, k, v, offsets(lengths_q), offsets(lengths_k)), kwargs


def out_and_grads(attention, q, k, v, cu_q, cu_k, dout, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, cu_q, cu_k, **kwargs)
    (out * dout).sum().backward()
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("strategy", list(COSTS))
@pytest.mark.parametrize("case", list(CASES))
def test_each_strategy_equals_the_reference_with_gradients(case, strategy):
    (q, k, v, cu_q, cu_k), kwargs = inputs(case)
    chosen = choose(schedules(cu_q.diff().tolist(), cu_k.diff().tolist(), COSTS[strategy]))
    assert chosen.strategy == strategy
    if strategy == "buckets":
        # Both kinds of bucket: several lengths under a mask, and one length without padding.
        assert any(len(g) > 1 and len({int(cu_q.diff()[b]) for b in g}) > 1 for g in chosen.groups)
        assert len(chosen.groups) > 1
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    expected = out_and_grads(varlen_attention_ref, q, k, v, cu_q, cu_k, dout, **kwargs)
    got = out_and_grads(varlen_attention_cpu, q, k, v, cu_q, cu_k, dout, costs=COSTS[strategy], **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_float32_with_measured_costs_equals_the_reference():
    (q, k, v, cu_q, cu_k), kwargs = inputs("gqa", torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    expected = out_and_grads(varlen_attention_ref, q, k, v, cu_q, cu_k, dout, **kwargs)
    got = out_and_grads(varlen_attention_cpu, q, k, v, cu_q, cu_k, dout, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_give_zeros_as_in_the_reference():
    # More queries than keys under a causal mask: the first query rows see no key.
    q = torch.randn(7, 2, 8, dtype=torch.float64)
    k = torch.randn(4, 2, 8, dtype=torch.float64)
    cu_q, cu_k = offsets([5, 2]), offsets([2, 2])
    out = varlen_attention_cpu(q, k, k, cu_q, cu_k, causal=True, costs=COSTS["buckets"])
    torch.testing.assert_close(out, varlen_attention_ref(q, k, k, cu_q, cu_k, causal=True))
    assert out[:3].abs().sum() == 0


def test_plan_is_reused_for_the_same_offsets_and_rebuilt_when_they_change():
    (q, k, v, cu_q, cu_k), kwargs = inputs("causal")
    varlen_attention_cpu(q, k, v, cu_q, cu_k, costs=COSTS["buckets"], **kwargs)
    plan = cpu_attention._last_plan[1]
    varlen_attention_cpu(q, k, v, cu_q, cu_k, costs=COSTS["buckets"], **kwargs)
    assert cpu_attention._last_plan[1] is plan
    # The same tensors, changed in place: sequence 0 now has 3 tokens and sequence 1 has 3.
    cu_q[1] += 2
    cu_k[1] += 2
    out = varlen_attention_cpu(q, k, v, cu_q, cu_k, costs=COSTS["buckets"], **kwargs)
    assert cpu_attention._last_plan[1] is not plan
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu_q, cu_k, **kwargs), atol=1e-12, rtol=1e-12)


def test_plan_is_reused_for_inference_tensors_of_the_same_offsets():
    # A decode step builds new offsets tensors per forward, under inference mode (no version counter).
    (q, k, v, cu_q, cu_k), kwargs = inputs("causal")
    with torch.inference_mode():
        varlen_attention_cpu(q, k, v, cu_q.clone(), cu_k.clone(), costs=COSTS["buckets"], **kwargs)
        plan = cpu_attention._last_plan[1]
        varlen_attention_cpu(q, k, v, cu_q.clone(), cu_k.clone(), costs=COSTS["buckets"], **kwargs)
        assert cpu_attention._last_plan[1] is plan
        changed_q, changed_k = cu_q.clone(), cu_k.clone()
        changed_q[1] += 2
        changed_k[1] += 2
        out = varlen_attention_cpu(q, k, v, changed_q, changed_k, costs=COSTS["buckets"], **kwargs)
        assert cpu_attention._last_plan[1] is not plan
        expected = varlen_attention_ref(q, k, v, changed_q, changed_k, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_inference_mode_tensors():
    with torch.inference_mode():
        (q, k, v, cu_q, cu_k), kwargs = inputs("sliding_window")
        out = varlen_attention_cpu(q, k, v, cu_q, cu_k, costs=COSTS["buckets"], **kwargs)
        again = varlen_attention_cpu(q, k, v, cu_q, cu_k, costs=COSTS["buckets"], **kwargs)
        expected = varlen_attention_ref(q, k, v, cu_q, cu_k, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(again, expected, atol=1e-12, rtol=1e-12)


def brute_force_bucket_seconds(lengths, costs):
    """The cheapest split of the sorted distinct lengths into runs, each one padded call."""
    counts = {n: lengths.count(n) for n in set(lengths)}
    distinct = sorted(counts)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        runs, run = [], [distinct[0]]
        for n, cut in zip(distinct[1:], cuts):
            if cut:
                runs.append(run)
                run = []
            run.append(n)
        runs.append(run)
        seconds = 0.0
        for run in runs:
            count = sum(counts[n] for n in run)
            seconds += costs(1, count * max(run), count * max(run) ** 2)
        best = min(best, seconds)
    return best


@pytest.mark.parametrize("seconds_per_call", [0.0, 30.0, 300.0, 1e5])
def test_choice_follows_the_cost_model(seconds_per_call):
    lengths = [1, 5, 2, 37, 1, 12, 40, 5, 9, 3, 3, 64]
    costs = SdpaCosts(seconds_per_call, 2.0, 1.0)
    found = schedules(lengths, lengths, costs)
    assert found["buckets"].seconds == brute_force_bucket_seconds(lengths, costs)
    assert found["documents"].seconds == sum(costs(1, n, n * n) for n in lengths)
    assert found["block_diagonal"].seconds == costs(1, sum(lengths), sum(lengths) ** 2)
    chosen = choose(found)
    assert chosen.seconds == min(s.seconds for s in found.values())
    assert sorted(b for group in chosen.groups for b in group) == list(range(len(lengths)))
    expected = {0.0: "documents", 30.0: "buckets", 300.0: "buckets", 1e5: "block_diagonal"}[seconds_per_call]
    assert chosen.strategy == expected


def test_deterministic_algorithms_and_unreadable_timings_run_the_reference(monkeypatch):
    (q, k, v, cu_q, cu_k), kwargs = inputs("causal", torch.float32)
    expected = varlen_attention_ref(q, k, v, cu_q, cu_k, **kwargs)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    monkeypatch.setattr(cpu_attention, "_make_plan", None)  # no plan is made: calling it would raise
    assert torch.equal(varlen_attention_cpu(q, k, v, cu_q, cu_k, **kwargs), expected)
    # Every call timed alike, long or short: noise, not arithmetic.
    monkeypatch.setattr(cpu_attention, "_seconds", lambda attentions, backward: [1e-3] * len(attentions))
    assert cpu_attention._measure.__wrapped__(torch.float32, 2, 2, 16, True, 2) is None


def test_measured_costs_are_positive_and_measured_once():
    # One thread: a core of its own even when the machine is shared, so the timings are readable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = cpu_attention.measure_sdpa_costs(torch.float32, 2, 1, 16, backward=True)
        again = cpu_attention.measure_sdpa_costs(torch.float32, 2, 1, 16, backward=True)
    finally:
        torch.set_num_threads(threads)
    assert costs.seconds_per_call > 0 and costs.seconds_per_score > 0
    assert costs.seconds_per_row >= 0 and costs.seconds_per_gathered_row >= 0
    assert again is costs


def test_varlen_attention_takes_this_path_on_cpu_tensors_the_kernel_does_not_run(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return varlen_attention_cpu(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "varlen_attention_cpu", spy)
    (q, k, v, cu_q, cu_k), kwargs = inputs("gqa")  # float64: the kernel takes 16- and 32-bit floats
    out = fused_train.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, **kwargs)
    assert len(calls) == 1
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu_q, cu_k, **kwargs), atol=1e-12, rtol=1e-12)
    # Softcapping and the lse need explicit scores: the reference computes them.
    fused_train.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, softcap=5.0, **kwargs)
    fused_train.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, return_lse=True, **kwargs)
    assert len(calls) == 1
