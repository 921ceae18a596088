"""A prefill after tokens already in pages (a cached prefix, its earlier chunks): its queries attend
to those pages, then to their fresh keys, as one causal attention over the whole sequence would."""

import pytest
import torch

from fused_train.hf.attention import PagedAttentionMetadata, PagedKV, fused_train_attention
from fused_train.kernels.int8_kv_quantize_ref import dequantize_kv_ref, quantize_kv_ref
from fused_train.ops.paged_kv import write_kv_pages
from tests.conftest import DEVICE


def _index(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_prefills_attend_to_their_context_pages_then_their_fresh_keys(kv_dtype):
    generator = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, page_size, num_pages = 4, 2, 16, 8, 12
    contexts, fresh_lengths = [13, 0, 8], [5, 7, 1]  # a context ending mid-page, none, exactly one page
    order = torch.randperm(num_pages, generator=generator).tolist()
    tables = [order[0:3], order[3:4], order[4:6]]  # each sequence's pages, scattered in the pool

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    shape = (num_pages, num_kv_heads, page_size, head_dim)
    page_dtype = torch.int8 if kv_dtype == "int8" else torch.float32
    k_pages = torch.zeros(shape, dtype=page_dtype, device=DEVICE)
    v_pages = torch.zeros(shape, dtype=page_dtype, device=DEVICE)
    scales = [torch.zeros(shape[:3], device=DEVICE) for _ in range(2)] if kv_dtype == "int8" else [None, None]
    keys = [randn(c + n, num_kv_heads, head_dim) for c, n in zip(contexts, fresh_lengths)]
    values = [randn(c + n, num_kv_heads, head_dim) for c, n in zip(contexts, fresh_lengths)]
    queries = randn(sum(fresh_lengths), num_heads, head_dim)

    def slots(b, positions):
        return [tables[b][j // page_size] * page_size + j % page_size for j in positions]

    context_slots, fresh_slots, key_order, cu_q, cu_k = [], [], [], [0], [0]
    total_context = sum(contexts)
    for b, (c, n) in enumerate(zip(contexts, fresh_lengths)):
        key_order += list(range(len(context_slots), len(context_slots) + c))
        key_order += list(range(total_context + len(fresh_slots), total_context + len(fresh_slots) + n))
        context_slots += slots(b, range(c))
        fresh_slots += slots(b, range(c, c + n))
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + c + n)
    fresh_k = torch.cat([k[c:] for k, c in zip(keys, contexts)])
    fresh_v = torch.cat([v[c:] for v, c in zip(values, contexts)])
    # The context was written by earlier steps, the fresh keys by this step's StepCache.update.
    context_k = torch.cat([k[:c] for k, c in zip(keys, contexts)])
    context_v = torch.cat([v[:c] for v, c in zip(values, contexts)])
    write_kv_pages(context_k, context_v, k_pages, v_pages, _index(context_slots), k_scales=scales[0],
                   v_scales=scales[1])  # fmt: skip
    write_kv_pages(fresh_k, fresh_v, k_pages, v_pages, _index(fresh_slots), k_scales=scales[0], v_scales=scales[1])
    metadata = PagedAttentionMetadata(
        slots=_index(fresh_slots), num_prefill_tokens=len(fresh_slots),
        cu_seqlens_prefill=torch.tensor(cu_q, dtype=torch.int32, device=DEVICE), max_prefill_len=max(fresh_lengths),
        page_table=torch.zeros(0, 1, dtype=torch.int32, device=DEVICE),
        kv_lens=torch.zeros(0, dtype=torch.int32, device=DEVICE),
        cu_seqlens_prefill_k=torch.tensor(cu_k, dtype=torch.int32, device=DEVICE),
        max_prefill_len_k=max(c + n for c, n in zip(contexts, fresh_lengths)),
        context_slots=_index(context_slots), prefill_key_order=_index(key_order),
    )  # fmt: skip
    with torch.no_grad():
        out, _ = fused_train_attention(
            torch.nn.Module(), queries.transpose(0, 1)[None], PagedKV(fresh_k, k_pages, scales[0], metadata),
            PagedKV(fresh_v, v_pages, scales[1], metadata), None,
        )  # fmt: skip
    out = out[0]

    for b, (c, n) in enumerate(zip(contexts, fresh_lengths)):
        k, v = keys[b].clone(), values[b].clone()
        if kv_dtype == "int8":  # the context is read back from int8 pages; the fresh keys are exact
            k[:c] = dequantize_kv_ref(*quantize_kv_ref(k[:c]), torch.float32)
            v[:c] = dequantize_kv_ref(*quantize_kv_ref(v[:c]), torch.float32)
        q = queries[cu_q[b] : cu_q[b + 1]]
        group = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
        visible = torch.arange(c + n, device=DEVICE)[None, :] <= c + torch.arange(n, device=DEVICE)[:, None]
        expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        torch.testing.assert_close(out[cu_q[b] : cu_q[b + 1]], expected, atol=2e-5, rtol=1e-4)
