"""Paged decode attention (Triton kernel and PyTorch reference) vs a float64 loop over each
sequence's keys, read token by token through the page table.

Every pool is shared by the batch's sequences, its pages handed out in shuffled order, with spare
pages; slots no sequence has written hold NaN (float pages) or NaN scales (int8 pages), and the
page table's entries past each sequence's last page are out of range, so that a read of anything
but a sequence's own keys fails the comparison. Without CUDA the kernels run in Triton's
interpreter (tests/conftest.py), whose block of 16 keys makes short sequences cross several
blocks, splits and, at page size 8, pages within a block.
"""

import math

import pytest
import torch

from fused_train.kernels import paged_decode_attention as kernel_module
from fused_train.kernels.int8_kv_quantize_ref import quantize_kv_ref
from fused_train.kernels.paged_decode_attention_ref import paged_attention_plan, paged_decode_attention_ref
from fused_train.ops.paged_kv import paged_decode_attention, paged_decode_attention_op
from tests.conftest import DEVICE
from tests.kernels.conftest import assert_bad_input_named

ON_GPU = DEVICE == "cuda"
# Max error relative to the expected output's largest magnitude, as for the contiguous int8 kernel.
TOLERANCE = {torch.float32: 1e-2 if ON_GPU else 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}


def _pool(lengths, num_kv_heads, head_dim, page_size, pages_dtype, seed, spare_pages=3):
    """Pages holding each sequence's `lengths[b]` tokens in shuffled pages of one pool: `(k_pages,
    v_pages, k_scales, v_scales, page_table)`, the scales None for float pages."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + spare_pages
    order = torch.randperm(num_pages, generator=generator).tolist()
    # Junk entries past each sequence's pages: out of the pool on both sides.
    page_table = torch.full((len(lengths), max(pages_per_seq) + 1), num_pages + 1000, dtype=torch.int32)
    page_table[::2, -1] = -5
    written = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for b, (n, count) in enumerate(zip(lengths, pages_per_seq)):
        page_table[b, :count] = torch.tensor([order.pop() for _ in range(count)], dtype=torch.int32)
        positions = torch.arange(n)
        written[page_table[b, positions // page_size].long(), positions % page_size] = True
    k = torch.randn(num_pages, num_kv_heads, page_size, head_dim, generator=generator) * 2
    v = torch.randn(num_pages, num_kv_heads, page_size, head_dim, generator=generator)
    unwritten = ~written[:, None, :].expand(num_pages, num_kv_heads, page_size)
    if pages_dtype == torch.int8:
        (k_pages, k_scales), (v_pages, v_scales) = quantize_kv_ref(k), quantize_kv_ref(v)
        k_scales[unwritten], v_scales[unwritten] = math.nan, math.nan
        tensors = (k_pages, v_pages, k_scales, v_scales, page_table)
    else:
        k[unwritten], v[unwritten] = math.nan, math.nan
        tensors = (k.to(pages_dtype), v.to(pages_dtype), None, None, page_table)
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _expected(q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, num_queries, softmax_scale=None,
              window_left=-1, softcap=0.0):
    """float64: each sequence's keys read one by one through the page table, then plain attention."""
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k_pages.shape[1]
    page_size = k_pages.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float64)
    first = 0
    for b, (n, count) in enumerate(zip(lengths, num_queries)):
        positions = torch.arange(n)
        pages, offsets = page_table[b].cpu().long()[positions // page_size], positions % page_size
        keys, values = k_pages.cpu()[pages, :, offsets].double(), v_pages.cpu()[pages, :, offsets].double()
        if k_scales is not None:
            keys = keys * k_scales.cpu()[pages, :, offsets].double()[..., None]
            values = values * v_scales.cpu()[pages, :, offsets].double()[..., None]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [n, heads, head_dim]
        queries = q[first : first + count].cpu().double()
        scores = torch.einsum("thd,jhd->htj", queries, keys) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        query_positions = (n - count + torch.arange(count))[:, None]
        visible = positions[None, :] <= query_positions
        if window_left >= 0:
            visible &= positions[None, :] >= query_positions - window_left
        probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
        out[first : first + count] = torch.einsum("htj,jhd->thd", probs, values)
        first += count
    return out


def _assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.abs().max().item() or 1.0
    error = (actual.cpu().double() - expected).abs().max().item() / scale
    assert error <= TOLERANCE[dtype], f"relative max error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _case(lengths, num_queries, num_heads, num_kv_heads, head_dim, page_size=16, dtype=torch.float32,
          pages_dtype=torch.int8, seed=0):
    """q and the pool for sequences of `lengths` tokens whose last `num_queries` (None: one each) query."""
    pool = _pool(lengths, num_kv_heads, head_dim, page_size, pages_dtype if pages_dtype == torch.int8 else dtype, seed)
    counts = [1] * len(lengths) if num_queries is None else num_queries
    generator = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(counts), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    kv_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cu = None if num_queries is None else torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()],
                                                       dtype=torch.int32, device=DEVICE)
    return q, pool, kv_lens, cu, counts


def _check(lengths, num_queries, num_heads, num_kv_heads, head_dim, page_size=16, dtype=torch.float32,
           pages_dtype=torch.int8, seed=0, attention=paged_decode_attention, **kwargs):
    q, (k_pages, v_pages, k_scales, v_scales, page_table), kv_lens, cu, counts = _case(
        lengths, num_queries, num_heads, num_kv_heads, head_dim, page_size, dtype, pages_dtype, seed)
    out = attention(q, k_pages, v_pages, page_table, kv_lens, k_scales=k_scales, v_scales=v_scales, cu_seqlens_q=cu,
                    **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k in ("softmax_scale", "window_left", "softcap")}
    expected = _expected(q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, counts, **kwargs)
    _assert_close(out, expected, dtype)


CASES = {
    # name: (lengths, queries per sequence or None for decode, num_heads, num_kv_heads, head_dim, page_size, kwargs)
    "decode_ragged_off_the_page": ([1, 37, 16, 70], None, 4, 2, 32, 16, {}),
    "decode_page_size_8_gqa_4": ([9, 61, 24], None, 8, 2, 32, 8, {}),
    "decode_mqa_32_heads": ([45, 3], None, 32, 1, 16, 32, {}),
    "decode_window_softcap": ([90, 33], None, 4, 2, 32, 16, dict(window_left=20, softcap=5.0, softmax_scale=0.3)),
    "decode_head_dim_80": ([50, 18], None, 4, 1, 80, 16, {}),
    "chunks_with_an_empty_sequence": ([40, 7, 26, 12], [9, 0, 26, 1], 4, 2, 32, 8, {}),
    "chunk_over_64_rows_window": ([60, 21], [20, 3], 8, 2, 32, 16, dict(window_left=17)),
}


@pytest.mark.parametrize("pages_dtype", [torch.int8, "float"], ids=["int8_pages", "float_pages"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_loop_reference(case, pages_dtype, poisoned_outputs):
    lengths, num_queries, num_heads, num_kv_heads, head_dim, page_size, kwargs = CASES[case]
    _check(lengths, num_queries, num_heads, num_kv_heads, head_dim, page_size, pages_dtype=pages_dtype,
           seed=list(CASES).index(case), **kwargs)


@pytest.mark.parametrize("pages_dtype", [torch.int8, "float"], ids=["int8_pages", "float_pages"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_loop_reference(dtype, pages_dtype, poisoned_outputs):
    _check([77, 5, 30], [3, 1, 0], 8, 2, 64, 16, dtype=dtype, pages_dtype=pages_dtype, seed=7)


def test_forced_splits_match_loop_reference(poisoned_outputs):
    """One split (written straight to out), several, and more splits than key blocks (some empty)."""
    for num_splits in (1, 3, 9):
        _check([90, 20, 40], [2, 1, 3], 4, 2, 32, 16, seed=5, attention=kernel_module.paged_decode_attention,
               num_splits=num_splits)


def test_several_row_blocks_per_decoding_sequence(poisoned_outputs):
    """32 query heads of one kv head in blocks of 16 rows: two per sequence, with and without cu_seqlens_q."""
    for num_queries in (None, [1, 1]):
        _check([45, 3], num_queries, 32, 1, 16, 16, seed=11, attention=kernel_module.paged_decode_attention,
               config=(16, 16, 4, 1))


SHIPPED_CONFIGS = [(torch.float32, torch.float32, 128), (torch.bfloat16, torch.int8, 64),
                   (torch.float16, torch.float16, 80)]


@pytest.mark.parametrize("dtype,pages_dtype,head_dim", SHIPPED_CONFIGS,
                         ids=[f"{t}_{p}_{d}" for t, p, d in SHIPPED_CONFIGS])  # fmt: skip
def test_shipped_gpu_configs_match_loop_reference(dtype, pages_dtype, head_dim, poisoned_outputs):
    """The launcher with the GPU table's block sizes (the interpreter otherwise uses 16 keys)."""
    config = kernel_module.CONFIGS[kernel_module.config_key(dtype, pages_dtype, head_dim)]
    _check([120, 20], [1, 20], 4, 2, head_dim, 16, dtype=dtype, pages_dtype=pages_dtype, seed=head_dim,
           attention=kernel_module.paged_decode_attention, num_splits=2, config=config)


@pytest.mark.parametrize("pages_dtype", [torch.int8, "float"], ids=["int8_pages", "float_pages"])
def test_reference_matches_loop_reference(pages_dtype):
    """The CPU path (paged_decode_attention_ref, run where Triton cannot) in float64 and float32."""
    attention = lambda *args, **kwargs: paged_decode_attention_ref(*args, **kwargs)  # noqa: E731
    for dtype in (torch.float64, torch.float32):
        _check([40, 7, 26, 12], [9, 0, 26, 1], 4, 2, 32, 8, dtype=dtype, pages_dtype=pages_dtype, seed=3,
               attention=attention, window_left=11, softcap=4.0)
    _check([1, 37, 16, 70], None, 4, 2, 32, 16, pages_dtype=pages_dtype, seed=4, attention=attention)


@pytest.mark.parametrize("num_queries", [None, [3, 1, 0, 2]], ids=["decode", "chunks"])
def test_reference_plan_built_once_serves_every_layer(num_queries):
    """The serving runner's path: one `paged_attention_plan` per step, read by every layer's
    reference call (here two layers, int8 and float pages of one page table); the decodes' case of
    sequences of one length takes attention without a mask."""
    lengths = [37, 37, 37, 37] if num_queries is None else [37, 9, 20, 30]
    plan = None
    for pages_dtype in (torch.int8, "float"):  # one seed: one page table
        q, (k_pages, v_pages, k_scales, v_scales, page_table), kv_lens, cu, counts = _case(
            lengths, num_queries, 4, 2, 32, 8, pages_dtype=pages_dtype, seed=21)
        if plan is None:
            plan = paged_attention_plan(page_table, kv_lens, cu, 8, 2)
            assert (plan.visible is None) == (num_queries is None)
        out = paged_decode_attention_ref(q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu, plan=plan)
        expected = _expected(q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, counts)
        _assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("pages_dtype", [torch.int8, "float"], ids=["int8_pages", "float_pages"])
def test_empty_sequences_give_zeros(pages_dtype, poisoned_outputs):
    """kv_lens 0 (padded batch slots): zeros from the kernel at one split and several (whose combine
    merges only splits that saw no key), from the reference and through the op, beside real rows."""
    for num_queries in (None, [1, 2, 0, 3]):
        case = _case([0, 37, 0, 20], num_queries, 4, 2, 32, 8, pages_dtype=pages_dtype, seed=13)
        q, (k_pages, v_pages, k_scales, v_scales, page_table), kv_lens, cu, counts = case
        expected = _expected(q, k_pages, v_pages, k_scales, v_scales, page_table, [0, 37, 0, 20], counts)
        assert expected.abs().sum() > 0
        tensors = (q, k_pages, v_pages, page_table, kv_lens)
        runs = [kernel_module.paged_decode_attention(*tensors, k_scales=k_scales, v_scales=v_scales, cu_seqlens_q=cu,
                                                     num_splits=num_splits) for num_splits in (1, 3)]
        runs += [attention(*tensors, k_scales=k_scales, v_scales=v_scales, cu_seqlens_q=cu)
                 for attention in (paged_decode_attention_ref, paged_decode_attention)]
        for out in runs:
            _assert_close(out, expected, torch.float32)


def test_no_queries_give_an_empty_out():
    q, (k_pages, v_pages, _, _, page_table), kv_lens, _, _ = _case([5, 9], None, 4, 2, 32, 8, pages_dtype="float")
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q[:0], k_pages, v_pages, page_table, kv_lens, cu_seqlens_q=cu)
    assert out.shape == (0, 4, 32)


def _valid_args():
    q, (k_pages, v_pages, k_scales, v_scales, page_table), kv_lens, cu, _ = _case([20, 9], [2, 1], 4, 2, 32, 8)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table, kv_lens=kv_lens, k_scales=k_scales,
                v_scales=v_scales, cu_seqlens_q=cu)


def _set(**changes):
    return lambda args: args.update({name: change(args) for name, change in changes.items()})


BAD_INPUTS = {
    "q_2d": (_set(q=lambda a: a["q"][:, 0]), "q"),
    "k_pages_float64": (_set(k_pages=lambda a: a["k_pages"].double()), "k_pages"),
    "v_pages_other_shape": (_set(v_pages=lambda a: a["v_pages"][:, :1]), "v_pages"),
    "k_scales_missing": (_set(k_scales=lambda a: None), "k_scales"),
    "v_scales_shape": (_set(v_scales=lambda a: a["v_scales"][:, :, :4]), "v_scales"),
    "scales_for_float_pages": (_set(k_pages=lambda a: a["k_pages"].float(), v_pages=lambda a: a["v_pages"].float()),
                               "k_scales"),
    "page_size_4": (_set(**{name: (lambda a, name=name: a[name][:, :, :4])
                            for name in ("k_pages", "v_pages", "k_scales", "v_scales")}), "page_size"),
    "head_dim_mismatch": (_set(q=lambda a: a["q"][..., :16]), "head_dim"),
    "heads_not_divisible": (_set(q=lambda a: a["q"][:, :3]), "num_heads"),
    "page_table_int64": (_set(page_table=lambda a: a["page_table"].long()), "page_table"),
    "kv_lens_shape": (_set(kv_lens=lambda a: a["kv_lens"][:1]), "kv_lens"),
    "cu_seqlens_q_length": (_set(cu_seqlens_q=lambda a: a["cu_seqlens_q"][:2]), "cu_seqlens_q"),
    "cu_seqlens_q_short_of_total_q": (_set(cu_seqlens_q=lambda a: a["cu_seqlens_q"] - (a["cu_seqlens_q"] == 3).int()),
                                      "cu_seqlens_q"),
    "cu_seqlens_q_falls": (_set(cu_seqlens_q=lambda a: torch.tensor([0, 4, 3], dtype=torch.int32, device=DEVICE)),
                           "cu_seqlens_q"),
    "no_cu_seqlens_q_for_3_queries": (_set(cu_seqlens_q=lambda a: None), "total_q"),
    "kv_len_below_its_queries": (_set(kv_lens=lambda a: torch.tensor([1, 9], dtype=torch.int32, device=DEVICE)),
                                 "kv_lens"),
    "kv_len_past_the_page_table": (_set(kv_lens=lambda a: torch.tensor([20, 40], dtype=torch.int32, device=DEVICE)),
                                   "kv_lens"),
    "page_out_of_the_pool": (_set(page_table=lambda a: torch.where(a["page_table"] == a["page_table"][0, 0], 99,
                                                                   a["page_table"])), "page_table"),
    "window_left_-2": (lambda a: a.update(window_left=-2), "window_left"),
    "negative_softcap": (lambda a: a.update(softcap=-1.0), "softcap"),
    "mixed_devices": (_set(kv_lens=lambda a: a["kv_lens"].to("meta")), "device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    assert_bad_input_named(paged_decode_attention, _valid_args(), *BAD_INPUTS[case])


def test_op_passes_opcheck():
    args = _valid_args()
    torch.library.opcheck(paged_decode_attention_op, (*args.values(), None, 5, 0.0))
    float_args = _valid_args() | dict(k_scales=None, v_scales=None)
    float_args["k_pages"], float_args["v_pages"] = (torch.randn(args["k_pages"].shape, device=DEVICE) for _ in range(2))
    torch.library.opcheck(paged_decode_attention_op, (*float_args.values(), 0.5, -1, 2.0))


def test_torch_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    args = _valid_args()

    def attention_sum(q):
        return paged_decode_attention(q, *list(args.values())[1:5], k_scales=args["k_scales"],
                                      v_scales=args["v_scales"], cu_seqlens_q=args["cu_seqlens_q"], softcap=3.0).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_sum, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(args["q"]), attention_sum(args["q"]))
    assert counter.frame_count == 1
