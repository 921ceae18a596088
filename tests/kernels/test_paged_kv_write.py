"""Writes into a paged KV cache (Triton kernel and PyTorch reference) vs `quantize_kv_ref` bit for
bit (int8 pages) or the cast tokens (float pages); every slot not written keeps its sentinel.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py), whose blocks of 4
tokens make short writes cross several blocks.
"""

import pytest
import torch

from fused_train.kernels.int8_kv_quantize_ref import quantize_kv_ref
from fused_train.kernels.paged_kv_write_ref import write_kv_pages_ref
from fused_train.ops.paged_kv import write_kv_pages, write_kv_pages_op
from tests.conftest import DEVICE
from tests.kernels.conftest import assert_bad_input_named

SENTINEL_DATA, SENTINEL_SCALE = 77, -3.0


def _pool(num_pages, num_kv_heads, page_size, head_dim, pages_dtype):
    """Pages (and scales, for int8) full of sentinels."""
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    pages = [torch.full(shape, SENTINEL_DATA, dtype=pages_dtype, device=DEVICE) for _ in range(2)]
    if pages_dtype != torch.int8:
        return pages, [None, None]
    return pages, [torch.full(shape[:3], SENTINEL_SCALE, device=DEVICE) for _ in range(2)]


def _write_and_check(new_dtype, pages_dtype, num_tokens, num_kv_heads, head_dim, page_size, seed, write=write_kv_pages,
                     transposed=False):
    """Write random tokens at shuffled slots of a pool of sentinels (the target slots poisoned
    first) and check the written slots and the untouched ones."""
    generator = torch.Generator().manual_seed(seed)
    num_pages = -(-num_tokens // page_size) + 2
    slots = torch.randperm(num_pages * page_size, generator=generator)[:num_tokens].to(DEVICE)
    # Magnitudes spread over many binades, so that scales and quotients hit many roundings.
    shape = (num_tokens, num_kv_heads, head_dim)
    k_new, v_new = (torch.randn(shape, generator=generator) * torch.rand(*shape[:2], 1, generator=generator) * 40
                    for _ in range(2))  # fmt: skip
    if transposed:  # [heads, tokens, head_dim] memory, as a projection's view may be: only head_dim is contiguous
        k_new, v_new = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k_new, v_new))
    k_new, v_new = k_new.to(DEVICE, new_dtype), v_new.to(DEVICE, new_dtype)
    (k_pages, v_pages), (k_scales, v_scales) = _pool(num_pages, num_kv_heads, page_size, head_dim, pages_dtype)
    pages, offsets = slots // page_size, slots % page_size
    for pool, scales in ((k_pages, k_scales), (v_pages, v_scales)):
        pool[pages, :, offsets] = -128 if pages_dtype == torch.int8 else float("nan")
        if scales is not None:
            scales[pages, :, offsets] = float("nan")
    write(k_new, v_new, k_pages, v_pages, slots, k_scales=k_scales, v_scales=v_scales)
    written = torch.zeros(num_pages, page_size, dtype=torch.bool, device=DEVICE)
    written[pages, offsets] = True
    for new, pool, scales in ((k_new, k_pages, k_scales), (v_new, v_pages, v_scales)):
        if scales is None:
            assert torch.equal(pool[pages, :, offsets], new.to(pages_dtype))
        else:
            data, scale = quantize_kv_ref(new)
            assert torch.equal(pool[pages, :, offsets], data) and torch.equal(scales[pages, :, offsets], scale)
            assert (scales.permute(0, 2, 1)[~written] == SENTINEL_SCALE).all()
        assert (pool.permute(0, 2, 1, 3)[~written] == SENTINEL_DATA).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_int8_pages_match_quantize_ref_bit_for_bit(dtype):
    _write_and_check(dtype, torch.int8, 11, 2, 80, 8, seed=1)


@pytest.mark.parametrize("new_dtype,pages_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=["bf16_into_bf16", "fp32_cast_into_fp16"])  # fmt: skip
def test_float_pages_hold_the_cast_tokens(new_dtype, pages_dtype):
    _write_and_check(new_dtype, pages_dtype, 9, 3, 32, 16, seed=2)


def test_transposed_tokens_and_a_longer_write():
    _write_and_check(torch.bfloat16, torch.int8, 37, 2, 64, 32, seed=3, transposed=True)


@pytest.mark.parametrize("pages_dtype", [torch.int8, torch.bfloat16], ids=["int8_pages", "bf16_pages"])
def test_reference_matches(pages_dtype):
    _write_and_check(torch.float32, pages_dtype, 13, 2, 32, 8, seed=4, write=write_kv_pages_ref)


@pytest.mark.parametrize("pages_dtype", [torch.int8, torch.bfloat16], ids=["int8_pages", "bf16_pages"])
def test_reference_writes_at_precomputed_slot_pages_and_offsets(pages_dtype):
    """The serving runner's path: the step's slots split into pages and offsets once, for every
    layer's write; junk slots prove that the split given is what the write uses."""

    def write(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales):
        page_size = k_pages.shape[2]
        write_kv_pages_ref(k_new, v_new, k_pages, v_pages, torch.full_like(slots, -1), k_scales, v_scales,
                           slot_pages=slots // page_size, slot_offsets=slots % page_size)  # fmt: skip

    _write_and_check(torch.float32, pages_dtype, 13, 2, 32, 8, seed=5, write=write)


def test_no_tokens_write_nothing():
    (k_pages, v_pages), (k_scales, v_scales) = _pool(2, 2, 8, 16, torch.int8)
    empty = torch.zeros(0, 2, 16, device=DEVICE)
    write_kv_pages(empty, empty, k_pages, v_pages, torch.zeros(0, dtype=torch.int64, device=DEVICE), k_scales=k_scales,
                   v_scales=v_scales)
    assert (k_pages == SENTINEL_DATA).all() and (v_scales == SENTINEL_SCALE).all()


def _valid_args():
    (k_pages, v_pages), (k_scales, v_scales) = _pool(3, 2, 8, 16, torch.int8)
    new = torch.randn(4, 2, 16, device=DEVICE)
    return dict(k_new=new, v_new=new.clone(), k_pages=k_pages, v_pages=v_pages,
                slots=torch.tensor([3, 17, 8, 0], device=DEVICE), k_scales=k_scales, v_scales=v_scales)


BAD_INPUTS = {
    "k_new_2d": (lambda a: a.update(k_new=a["k_new"][0]), "k_new"),
    "v_new_int": (lambda a: a.update(v_new=a["v_new"].int()), "v_new"),
    "v_new_other_shape": (lambda a: a.update(v_new=a["v_new"][:3]), "v_new"),
    "head_dim_mismatch": (lambda a: a.update(k_new=a["k_new"][..., :8], v_new=a["v_new"][..., :8]), "head_dim"),
    "k_new_strided_head_dim": (lambda a: a.update(k_new=a["k_new"].repeat(1, 1, 2)[..., ::2]), "k_new"),
    "pages_not_contiguous": (lambda a: a.update(v_pages=a["v_pages"].transpose(1, 2).contiguous().transpose(1, 2)),
                             "v_pages"),
    "page_size_12": (lambda a: a.update(**{n: torch.zeros(3, 2, 12, 16, dtype=torch.int8, device=DEVICE)
                                           for n in ("k_pages", "v_pages")},
                                        **{n: torch.zeros(3, 2, 12, device=DEVICE) for n in ("k_scales", "v_scales")}),
                     "page_size"),
    "scales_missing": (lambda a: a.update(v_scales=None), "v_scales"),
    "scales_for_float_pages": (lambda a: a.update(k_pages=a["k_pages"].float(), v_pages=a["v_pages"].float()),
                               "k_scales"),
    "slots_int32": (lambda a: a.update(slots=a["slots"].int()), "slots"),
    "slots_past_the_pool": (lambda a: a.update(slots=torch.tensor([3, 24, 8, 0], device=DEVICE)), "slots"),
    "negative_slot": (lambda a: a.update(slots=torch.tensor([3, -1, 8, 0], device=DEVICE)), "slots"),
    "repeated_slot": (lambda a: a.update(slots=torch.tensor([3, 8, 8, 0], device=DEVICE)), "slots"),
    "mixed_devices": (lambda a: a.update(slots=a["slots"].to("meta")), "device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    assert_bad_input_named(write_kv_pages, _valid_args(), *BAD_INPUTS[case])


def test_op_passes_opcheck():
    args = _valid_args()
    torch.library.opcheck(write_kv_pages_op, tuple(args.values()))
    float_args = args | dict(k_pages=args["k_pages"].half(), v_pages=args["v_pages"].half(), k_scales=None,
                             v_scales=None)
    torch.library.opcheck(write_kv_pages_op, tuple(float_args.values()))
