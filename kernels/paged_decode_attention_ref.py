"""Attention of a step's queries over a paged KV cache (decode, or prefill chunks over earlier pages).

Layout: one pool of pages per layer, `k_pages`/`v_pages` `[num_pages, num_kv_heads, page_size,
head_dim]` (page_size a power of two >= 8), either int8 with `k_scales`/`v_scales` float32
`[num_pages, num_kv_heads, page_size]` (the per-(token, kv head) scale of `int8_kv_quantize_ref`),
or in q's float dtype without scales. Token `j` of sequence `b` lives in page
`page_table[b, j // page_size]` at offset `j % page_size`; `page_table` is int32 `[batch,
max_pages_per_seq]` and its entries past a sequence's last page are never read. `kv_lens` int32
`[batch]` counts each sequence's tokens in its pages, this step's own tokens included; 0 marks an
empty sequence (a padded batch slot, as CUDA-graph padding makes), whose queries see no key and
get zeros, as flash-attn gives rows without keys.

`q` is `[total_q, num_heads, head_dim]`, token-major; `cu_seqlens_q` int32 `[batch + 1]` says that
sequence `b`'s queries are `q[cu[b]:cu[b+1]]` (`n_b` of them, 0 allowed), its last `n_b` tokens,
at positions `p = kv_lens[b] - n_b + t`; None means one query per sequence. Query `p` sees key `j`
when `j <= p` and, with a window (`window_left >= 0`), `j >= p - window_left`. Scores are
`s = q·k * softmax_scale` (default `head_dim ** -0.5`), then `softcap * tanh(s / softcap)` when
`softcap > 0`. `num_heads` is a multiple of `num_kv_heads` (GQA): head `h` reads kv head
`h // (num_heads // num_kv_heads)`.

This module holds the reference and the input checks, without Triton; the kernels are in
`paged_decode_attention.py`.
"""

from typing import NamedTuple

import torch

from .launch import describe

MIN_PAGE_SIZE = 8


class PagedAttentionPlan(NamedTuple):
    """What `paged_decode_attention_ref` derives from the page table and lengths alone, the same for
    every layer of a step: built once per step (`paged_attention_plan`), read by each layer."""

    key_rows: torch.Tensor  # int64 [batch * num_kv_heads * num_keys]: rows of pages.view(-1, head_dim)
    num_kv_heads: int
    num_keys: int  # keys per sequence in the gathered batch: those of the longest
    visible: torch.Tensor | None  # bool [batch, 1, max_queries, keys]: causal and a token of the sequence; None: all
    positions: torch.Tensor  # int64 [batch, max_queries]: each query's position
    rows: torch.Tensor | None  # int64 [batch, max_queries]: q's row of each padded query; None: q as it is
    query_ok: torch.Tensor | None  # bool [batch, max_queries]: padded queries that are real; None: all
    empty: torch.Tensor | None  # bool [batch, 1, 1, 1]: sequences without keys (their queries get zeros); None: none


def paged_attention_plan(page_table, kv_lens, cu_seqlens_q, page_size, num_kv_heads) -> PagedAttentionPlan:
    """The layer-independent part of `paged_decode_attention_ref` (see `PagedAttentionPlan`).

    Key `j` of sequence `b` in kv head `h` is row `(page_table[b, j // page_size] * num_kv_heads + h)
    * page_size + j % page_size` of the pages seen as `[-1, head_dim]` (of the scales seen flat).
    Keys past a sequence's length repeat its key 0, a slot it wrote (unwritten slots may hold NaN,
    which a masked score would still spread), and are masked; a sequence without keys reads page 0."""
    batch = page_table.shape[0]
    device = page_table.device
    kv_lens = kv_lens.long()
    # One read back: the reference runs on CPU tensors, where it costs nothing.
    if cu_seqlens_q is None:
        min_len, max_len = torch.stack(torch.aminmax(kv_lens)).tolist() if batch else (0, 0)
        max_queries = 1
        positions = (kv_lens - 1)[:, None]
    else:
        cu = cu_seqlens_q.long()
        num_queries = cu[1:] - cu[:-1]
        min_len, max_len, max_queries = (
            torch.stack([kv_lens.min(), kv_lens.max(), num_queries.max()]).tolist() if batch else (0, 0, 0)
        )
        query_index = torch.arange(max_queries, device=device)
        positions = (kv_lens - num_queries)[:, None] + query_index[None, :]
    key_index = torch.arange(max_len, device=device)
    key_ok = key_index[None, :] < kv_lens[:, None] if min_len < max_len or max_queries > 1 else None  # [batch, keys]
    keys = key_index[None, :] if key_ok is None else torch.where(key_ok, key_index[None, :], 0)
    pages = page_table.long().gather(1, (keys // page_size).expand(batch, max_len))
    if min_len == 0:  # the page table's entries of a sequence without pages are never read
        pages = torch.where(kv_lens[:, None] > 0, pages, 0)
    head_rows = torch.arange(0, num_kv_heads * page_size, page_size, device=device)
    key_rows = (pages * (num_kv_heads * page_size) + keys % page_size)[:, None, :] + head_rows[None, :, None]
    visible = None
    if max_queries > 1:
        visible = (key_index[None, None, :] <= positions[:, :, None]) & key_ok[:, None, :]
    elif key_ok is not None:  # one query per sequence, at its last position: it sees all its keys
        visible = key_ok[:, None, :]
    rows = query_ok = None
    if cu_seqlens_q is not None:
        # Queries padded to [batch, max_queries]; row t of sequence b is q[cu[b] + t] while t < n_b.
        query_ok = query_index[None, :] < num_queries[:, None]
        rows = torch.where(query_ok, cu[:-1, None] + query_index[None, :], 0)
    empty = (kv_lens == 0)[:, None, None, None] if min_len == 0 else None
    return PagedAttentionPlan(key_rows.view(-1), num_kv_heads, max_len, None if visible is None else visible[:, None],
                              positions, rows, query_ok, empty)  # fmt: skip


def paged_decode_attention_ref(
    q, k_pages, v_pages, page_table, kv_lens, k_scales=None, v_scales=None, cu_seqlens_q=None, softmax_scale=None,
    window_left=-1, softcap=0.0, plan=None,
):  # fmt: skip
    """Plain PyTorch, in float32 (float64 for float64 `q`): the keys and values each sequence has
    gathered once (int8 ones dequantized) into a batch padded to the longest sequence and its
    queries to the most per sequence, then one masked attention for the whole batch (one SDPA call
    without a soft cap). `plan`: `paged_attention_plan` of these page table, lengths and queries
    (built here when None), for a caller that runs many layers over one step."""
    total_q, num_heads, head_dim = q.shape
    batch = page_table.shape[0]
    num_kv_heads, page_size = k_pages.shape[1], k_pages.shape[2]
    group = num_heads // num_kv_heads
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if plan is None:
        plan = paged_attention_plan(page_table, kv_lens, cu_seqlens_q, page_size, num_kv_heads)
    if plan.num_kv_heads != num_kv_heads:
        raise ValueError(f"plan was built for {plan.num_kv_heads} kv heads, k_pages has {num_kv_heads}")
    num_keys = plan.num_keys
    if total_q == 0 or num_keys == 0:
        return torch.zeros_like(q)

    def gather(pages, scales):
        """[batch, num_kv_heads, keys, head_dim] in compute_dtype."""
        shape = (batch, num_kv_heads, num_keys, head_dim)
        gathered = cast_to(pages.reshape(-1, head_dim).index_select(0, plan.key_rows).view(shape), compute_dtype)
        if scales is None:
            return gathered
        row_scales = scales.reshape(-1).index_select(0, plan.key_rows).view(shape[:3] + (1,))
        return gathered * cast_to(row_scales, compute_dtype)

    keys, values = gather(k_pages, k_scales), gather(v_pages, v_scales)
    # [batch, num_heads, max_queries, head_dim]; with one query per sequence, a view of q.
    q_padded = cast_to(q.unsqueeze(2) if plan.rows is None else q[plan.rows].transpose(1, 2), compute_dtype)
    visible = plan.visible
    if window_left >= 0:
        key_index = torch.arange(num_keys, device=q.device)
        in_window = (key_index[None, None, :] >= plan.positions[:, :, None] - window_left)[:, None]
        visible = in_window if visible is None else visible & in_window
    if softcap == 0:
        # softmax(q k^T * scale) v is SDPA's, one fused call.
        attended = torch.nn.functional.scaled_dot_product_attention(
            q_padded, keys, values, attn_mask=visible, scale=scale, enable_gqa=group > 1
        )
    else:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = q_padded @ keys.transpose(2, 3) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ values
    if plan.empty is not None:
        # Queries of sequences without keys see none: zeros (their gathered keys may be NaN).
        attended = attended.masked_fill(plan.empty, 0)
    if plan.rows is None:
        return cast_to(attended.squeeze(2), q.dtype)
    # [batch, max_queries, num_heads, head_dim]; sequences' queries follow each other in q, as the
    # rows of query_ok do.
    return cast_to(attended.transpose(1, 2)[plan.query_ok], q.dtype)


def cast_to(tensor, dtype):
    """`tensor.to(dtype)`, without the call when it has that dtype: the reference runs the serving
    engine's steps on a CPU, where each torch call costs about as much as a small layer's math."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def check_paged_decode_attention_inputs(
    q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left, softcap,
):  # fmt: skip
    """Raise ValueError naming the argument when inputs break the layout in the module docstring.

    Shapes, dtypes and devices are always checked; the values of `cu_seqlens_q`, `kv_lens` and the
    used part of `page_table` only on CPU tensors: reading CUDA tensors back would make the host
    wait for the GPU at every layer of every step (the engine builds them valid)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor [total_q, num_heads, head_dim], got {describe(q)}")
    total_q, num_heads, head_dim = q.shape
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(pages, torch.Tensor) or pages.dim() != 4 or pages.dtype not in (torch.int8, q.dtype):
            raise ValueError(f"{name} must be an int8 or {q.dtype} (q's dtype) tensor [num_pages, num_kv_heads, "
                             f"page_size, head_dim], got {describe(pages)}")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must have one shape and dtype, got {describe(k_pages)} and "
                         f"{describe(v_pages)}")
    num_pages, num_kv_heads, page_size, pages_head_dim = k_pages.shape
    if pages_head_dim != head_dim:
        raise ValueError(f"k_pages' head_dim ({pages_head_dim}) must equal q's ({head_dim})")
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_pages.shape[2]) must be a power of two >= {MIN_PAGE_SIZE}, got {page_size}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads of q ({num_heads}) must be a multiple of num_kv_heads of k_pages ({num_kv_heads})")
    tensors = {"q": q, "k_pages": k_pages, "v_pages": v_pages}
    if k_pages.dtype == torch.int8:
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32
                    or scales.shape != k_pages.shape[:3]):
                raise ValueError(f"{name} must be a float32 tensor {list(k_pages.shape[:3])} (int8 pages without "
                                 f"head_dim), got {describe(scales)}")
            tensors[name] = scales
    elif k_scales is not None or v_scales is not None:
        raise ValueError(f"k_scales and v_scales must be None for {k_pages.dtype} pages (they are for int8 pages)")
    if (not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or page_table.dtype != torch.int32):
        raise ValueError(f"page_table must be an int32 tensor [batch, max_pages_per_seq], got {describe(page_table)}")
    batch, max_pages_per_seq = page_table.shape
    if not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype != torch.int32 or kv_lens.shape != (batch,):
        raise ValueError(f"kv_lens must be an int32 tensor [batch={batch}], got {describe(kv_lens)}")
    tensors |= {"page_table": page_table, "kv_lens": kv_lens}
    if cu_seqlens_q is None:
        if total_q != batch:
            raise ValueError(f"q's total_q ({total_q}) must equal the batch of page_table ({batch}) when cu_seqlens_q "
                             f"is None (one query per sequence)")
    else:
        if (not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dtype != torch.int32
                or cu_seqlens_q.shape != (batch + 1,)):
            raise ValueError(f"cu_seqlens_q must be None or an int32 tensor [batch + 1 = {batch + 1}], got "
                             f"{describe(cu_seqlens_q)}")
        tensors["cu_seqlens_q"] = cu_seqlens_q
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {[str(t.device) for t in tensors.values()]}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be None or a number, got {type(softmax_scale).__name__}")
    if not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be an int >= 0, or -1 for no window, got {window_left!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a number >= 0, got {softcap!r}")
    if q.device.type == "cpu":
        _check_values(total_q, page_table, kv_lens, cu_seqlens_q, num_pages, page_size)


def _check_values(total_q, page_table, kv_lens, cu_seqlens_q, num_pages, page_size):
    batch, max_pages_per_seq = page_table.shape
    if cu_seqlens_q is not None:
        cu = cu_seqlens_q.long()
        if cu[0] != 0 or cu[-1] != total_q or (cu[1:] < cu[:-1]).any():
            raise ValueError(f"cu_seqlens_q must rise from 0 to total_q ({total_q}) without falling, got "
                             f"{cu_seqlens_q.tolist()}")
        num_queries = cu[1:] - cu[:-1]
    else:
        num_queries = torch.ones(batch, dtype=torch.long)
    lens = kv_lens.long()
    capacity = max_pages_per_seq * page_size
    if ((lens < num_queries) & (lens != 0)).any() or (lens > capacity).any():
        raise ValueError(f"kv_lens must be 0 (an empty sequence) or between each sequence's number of queries (its "
                         f"last tokens) and the page table's capacity ({max_pages_per_seq} pages of {page_size} = "
                         f"{capacity}), got kv_lens {kv_lens.tolist()} for {num_queries.tolist()} queries")
    used = torch.arange(max_pages_per_seq)[None, :] < (lens[:, None] + page_size - 1) // page_size
    used_pages = page_table[used]
    if used_pages.numel() and (used_pages.min() < 0 or used_pages.max() >= num_pages):
        raise ValueError(f"page_table's entries for each sequence's pages must be in [0, num_pages={num_pages}), "
                         f"got values from {int(used_pages.min())} to {int(used_pages.max())}")
