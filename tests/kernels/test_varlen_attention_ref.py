"""The reference's fast branch (per-sequence SDPA, the CPU path of patched models) equals its
explicit-scores branch, which the kernel tests compare the kernel against."""

import pytest
import torch

from fused_train.kernels.varlen_attention_ref import varlen_attention_ref

CASES = {
    "causal": ([1, 37, 0, 12], None, 4, 2, dict(causal=True)),
    "q_shorter_than_k": ([3, 1, 9], [10, 4, 9], 4, 1, dict(causal=True)),
    "non_causal": ([5, 17], [8, 17], 2, 2, dict(causal=False)),
    "sliding_window": ([40, 9], None, 4, 2, dict(causal=True, window_size=(6, -1))),
    "window_both_sides": ([21, 13], None, 2, 1, dict(causal=False, window_size=(3, 2))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_branch_equals_explicit_branch(case):
    lengths_q, lengths_k, num_heads, num_kv_heads, kwargs = CASES[case]
    lengths_k = lengths_k or lengths_q
    generator = torch.Generator().manual_seed(len(case))
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lengths_q), num_heads, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), num_kv_heads, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), num_kv_heads, 16, generator=generator, dtype=torch.float64)
    dout = torch.randn(q.shape, generator=generator, dtype=torch.float64)

    def out_and_grads(return_lse):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention_ref(*inputs, cu_q, cu_k, return_lse=return_lse, **kwargs)
        out = out[0] if return_lse else out
        (out * dout).sum().backward()
        return [out] + [t.grad for t in inputs]

    for fast, explicit in zip(out_and_grads(False), out_and_grads(True)):
        torch.testing.assert_close(fast, explicit, atol=1e-10, rtol=1e-10)
