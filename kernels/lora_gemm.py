"""The GEMM under the fused LoRA and multi-LoRA layers: a float, int8 or int4 weight, a rank-r seed.

    out = (lora_scale · L·R) ⊙ keep · keep_scale + a · Wk + bias          (`lora_gemm`)

`a` `[M, K]`; `Wk = Wᵀ` (forward, `W` `[N, K]` as stored) or `W` (dx, `[K, N]`); `L` `[M, r]`,
`R` `[r, N]`; `keep` `[M, N]`. The rank-r term seeds the accumulator before the K loop, so it never
exists as a full-size tensor; `r = 0` is a plain GEMM (multi-LoRA's base). Weight formats and the
plain-PyTorch reference are in `lora_gemm_ref`.

Kernels: `_lora_gemm_kernel` (pointers; every weight format, shape and stride) and
`_lora_gemm_tma_kernel` (a 16-bit float `W` on Hopper, its `a` and `W` tiles loaded by TMA, where
`tma_applies`). Matmul inputs are cast to the dtype of `a` (bf16/fp16 MMA, fp32 as tf32 on the
GPU); the accumulator is fp32. Row indices are widened to int64 before they meet the row stride of
`a`, the output, the mask or `W` (each can pass 2³¹ elements); offsets into the rank-r operands
and the int4 scales stay int32.

Ways. A GEMM runs one of these, a rule of its shape, dtypes and device (`gemm_ways`), never a
timing, so every process computes the same GEMM alike (DDP ranks agree to the last bit, and so do
two runs): a Triton kernel at one of GEMM_CONFIGS, or "cublas", the seed (+ bias) written by the
pointer kernel with an empty K loop and cuBLAS adding `a · Wk` onto it in place (`addmm_`, beta 1),
which keeps the fusion's point with the vendor's GEMM. Rounding: the Triton ways round once, the
fp32 sum to out's dtype; the cuBLAS way twice, the seed (+ bias) to out's dtype when it is
written, then the sum cuBLAS forms in fp32 from it. An fp32 seed would round once but cost 12
bytes more per output element (write and read it in fp32, convert after) than the 6 it moves now.
"""

import torch
import triton
import triton.language as tl

from .jit_helpers import dot_dtype, wrapped_block
from .launch import interpreting, on_device_of_first_argument, output_buffer
from .lora_gemm_ref import INT4_GROUP_SIZE

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton releases before host-side tensor descriptors: the pointer kernel only
    TensorDescriptor = None

@triton.jit
def _int4_tile(
    w_ptr, scale_ptr, offset_ptr, k_start, k_left, n_start, cols, N,
    stride_wk, stride_wn, stride_scale,
    W_TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
):  # fmt: skip
    """fp32 tile `Wk[k_start : k_start + BLOCK_K, n_start : n_start + BLOCK_N]` of a packed int4 `W`.

    `W`'s rows hold its input channels two per byte (`quantize_int4`). Forward (`Wk = Wᵀ`) the
    packed axis is k: the tile is read as W's rows `[BLOCK_N, BLOCK_K / 2]`, unpacked along them
    and transposed. Backward (`Wk = W`) it is n: read as `[BLOCK_K, BLOCK_N / 2]` and unpacked.
    """
    if W_TRANSPOSED:
        # One group per tile, so one scale per column. Tiles past K read padding channels (0).
        tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
        halves = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + halves[None, :] * stride_wk)
        group = k_start // GROUP_SIZE
        scale = tl.load(scale_ptr + cols * stride_scale + group).to(tl.float32)
        offset = tl.load(offset_ptr + cols * stride_scale + group).to(tl.float32)
        q = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
        w = tl.trans(q * scale[:, None] + offset[:, None])
    else:
        # Whole groups per tile: scales are loaded per group ([BLOCK_K, groups], not per element,
        # which the pipeline would buffer at BLOCK_K × BLOCK_N × 4 bytes per stage) and broadcast.
        tl.static_assert(BLOCK_N % GROUP_SIZE == 0)
        offs_k = tl.arange(0, BLOCK_K)
        rows = k_start + offs_k
        in_k = offs_k[:, None] < k_left
        # Columns past N wrap inside W's packed width and groups (their results are never stored).
        groups = tl.cdiv(N, GROUP_SIZE)
        halves = (n_start // 2 + tl.arange(0, BLOCK_N // 2)) % (groups * (GROUP_SIZE // 2))
        packed = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wk + halves[None, :] * stride_wn, mask=in_k,
                         other=0)
        tile_groups = (n_start // GROUP_SIZE + tl.arange(0, BLOCK_N // GROUP_SIZE)) % groups
        scale_ptrs = rows[:, None] * stride_scale + tile_groups[None, :]
        scale = tl.load(scale_ptr + scale_ptrs, mask=in_k, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + scale_ptrs, mask=in_k, other=0.0).to(tl.float32)
        q = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N // GROUP_SIZE, GROUP_SIZE))
        w = tl.reshape(q * scale[:, :, None] + offset[:, :, None], (BLOCK_K, BLOCK_N))
    return w


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-block, column-block) of output tile number `tile`, in grouped order: GROUP_M
    row-blocks share each column-block of Wk while it sits in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lora_seed(
    lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m,
    lora_scale, keep_scale,
    HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, compute_dtype: tl.constexpr,
):  # fmt: skip
    """The accumulator's start, `(lora_scale · L[rows] · R[:, cols]) ⊙ keep · keep_scale` in fp32:
    the rank-r term as one extra `tl.dot`, so `[a | lora_scale·L] · [Wk ; R]` is one accumulator."""
    offs_r = tl.arange(0, BLOCK_R)
    lora_left = tl.load(
        lora_left_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        mask=offs_r[None, :] < rank, other=0.0,
    )  # fmt: skip
    lora_right = tl.load(
        lora_right_ptr + offs_r[:, None] * stride_rr + cols[None, :] * stride_rn,
        mask=offs_r[:, None] < rank, other=0.0,
    )  # fmt: skip
    acc = tl.dot((lora_left.to(tl.float32) * lora_scale).to(compute_dtype), lora_right.to(compute_dtype))
    if HAS_KEEP:
        # Dropout acts on the LoRA input only, so in dx its mask multiplies only the LoRA term.
        keep = tl.load(keep_ptr + rows.to(tl.int64)[:, None] * stride_keep_m + cols[None, :])
        acc = tl.where(keep != 0, acc * keep_scale, 0.0)
    return acc


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """`acc` (+ bias) into `out[offs_m, offs_n]`, in out's dtype; rows and columns past M, N are
    not written."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, w_scale_ptr, w_offset_ptr, lora_left_ptr, lora_right_ptr, bias_ptr, keep_ptr, out_ptr,
    M, N, K, rank,
    stride_am, stride_ak, stride_wk, stride_wn, stride_scale,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_keep_m, stride_om,
    lora_scale, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, W_INT8: tl.constexpr, W_INT4: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INT4_GROUP: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[M, N] = (lora_scale · L·R) ⊙ keep · keep_scale + a·Wk + bias, one fp32 accumulator.

    `a` `[M, K]`, `Wk[k, n]` (strides given, so `Wᵀ` needs no copy), `L` `[M, rank]`,
    `R` `[rank, N]`, `keep` `[M, N]`. `W_TRANSPOSED`: `Wk = Wᵀ` (forward) rather than `W` (dx).
    An int8 `W` is scaled per output channel of `W`: per column of `Wk` forward, per row for dx.
    An int4 `W` (packed, strides in bytes) is dequantized tile by tile by `_int4_tile`.
    Every shape, stride and weight format; `_lora_gemm_tma_kernel` runs instead for aligned 16-bit
    float weights on Hopper (`tma_applies`).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, rows = wrapped_block(pid_m, BLOCK_M, M)
    offs_n, cols = wrapped_block(pid_n, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    compute_dtype: tl.constexpr = dot_dtype(a_ptr.dtype.element_ty, UPCAST)

    acc = _lora_seed(
        lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
        stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, lora_scale, keep_scale,
        HAS_KEEP, BLOCK_R, compute_dtype,
    )  # fmt: skip
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if not W_INT4:  # int4 tiles index W themselves (_int4_tile)
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn
    if W_INT8 and W_TRANSPOSED:
        col_scale = tl.load(w_scale_ptr + cols).to(tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if W_INT4:
            w = _int4_tile(
                w_ptr, w_scale_ptr, w_offset_ptr, k * BLOCK_K, k_left, pid_n * BLOCK_N, cols, N,
                stride_wk, stride_wn, stride_scale, W_TRANSPOSED, BLOCK_K, BLOCK_N, INT4_GROUP,
            )  # fmt: skip
        else:
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
            w_ptrs += BLOCK_K * stride_wk
        if W_INT8:
            if W_TRANSPOSED:
                w = w.to(tl.float32) * col_scale[None, :]
            else:
                row_scale = tl.load(w_scale_ptr + k * BLOCK_K + offs_k, mask=offs_k < k_left, other=0.0)
                w = w.to(tl.float32) * row_scale.to(tl.float32)[:, None]
        acc = tl.dot(a.to(compute_dtype), w.to(compute_dtype), acc)
        a_ptrs += BLOCK_K * stride_ak

    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS)


@triton.jit
def _lora_gemm_tma_kernel(
    a_desc, w_desc, lora_left_ptr, lora_right_ptr, bias_ptr, keep_ptr, out_ptr,
    M, N, K, rank,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, stride_om,
    lora_scale, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, W_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """`_lora_gemm_kernel`'s math for a 16-bit float `W`, its tiles read through TMA descriptors.

    Hopper's tensor memory accelerator copies each tile of `a` and `W` to shared memory by itself
    (out-of-bounds elements read as zero), so the warps spend no instructions on addresses or
    masks. `a_desc`: `a` `[M, K]`; `w_desc`: `W` `[N, K]` when `W_TRANSPOSED` (forward), else
    `[K, N]` (dx). The output is stored through pointers: a TMA store would stage the whole tile
    in shared memory, which the 128×256 config has no room for beside its pipeline.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, rows = wrapped_block(pid_m, BLOCK_M, M)
    offs_n, cols = wrapped_block(pid_n, BLOCK_N, N)
    compute_dtype: tl.constexpr = dot_dtype(a_desc.dtype, UPCAST)

    acc = _lora_seed(
        lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
        stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, lora_scale, keep_scale,
        HAS_KEEP, BLOCK_R, compute_dtype,
    )  # fmt: skip
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        if W_TRANSPOSED:
            w = tl.trans(w_desc.load([pid_n * BLOCK_N, k * BLOCK_K]))
        else:
            w = w_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
        acc = tl.dot(a.to(compute_dtype), w.to(compute_dtype), acc)

    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS)


# Configs, each compiled for sm_90 in tests/kernels/test_compile_sm90_lora_gemm.py.
# Main GEMM: the tiles of Triton's Hopper matmul tutorial (wgmma needs BLOCK_M % 64 == 0 and
# 4k warps). 128×256 for large problems; 128×128 when the grid would not fill the GPU, and for an
# int8 or int4 W, whose in-register dequantization does not fit beside a 128×256 accumulator, and
# for fp32 (tf32), whose tiles take twice the shared memory per element (hence also BLOCK_K 32;
# every BLOCK_K divides INT4_GROUP_SIZE, so a forward int4 tile has one scale per column).
GEMM_CONFIGS = {
    "large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "medium": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "medium_fp32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}


def gemm_config_name(M, N, K, dtype, w_quantized):
    """Which of GEMM_CONFIGS the launcher uses for an [M, N] output over K, (`gemm_ways`)."""
    # 128×256 needs a full wave of tiles (132 SMs), 16-divisible sizes (else the loads are not
    # vectorized and the tile spills) and a 16-bit float W; fp32 (tf32) always spills there.
    if dtype == torch.float32:
        return "medium_fp32"
    large = triton.cdiv(M, 128) * triton.cdiv(N, 256) >= 132 and N % 16 == 0 and K % 16 == 0 and not w_quantized
    return "large" if large else "medium"



def tma_applies(a, w, out):
    """Whether `_lora_gemm_tma_kernel` can run: a 16-bit float `W`, Triton's host-side descriptors,
    a Hopper-or-newer GPU (or the interpreter, where the tests run it), and what a descriptor
    requires of every operand: no empty dimension, unit inner stride, 16-byte aligned start and
    row stride."""
    if TensorDescriptor is None or w.dtype not in (torch.float16, torch.bfloat16):
        return False
    # TMA is NVIDIA's, from Hopper (sm_90) on; ROCm builds of torch also call their GPUs "cuda".
    if a.device.type == "cuda" and (torch.version.hip or torch.cuda.get_device_capability(a.device)[0] < 9):
        return False
    return all(
        t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in (a, w, out)
    )


def rank_block(rank):
    """The rank as the kernels pad it: a power of 2, at least 16 (the smallest `tl.dot` the GPU takes)."""
    return max(16, triton.next_power_of_2(rank))


# From this much work (M·N·K) on, a 16-bit float GEMM on an NVIDIA GPU runs the cuBLAS way: at the one
# GPU measurement (bench/results/bench_lora_2026-11-28_h200_quick.json) cuBLAS's GEMM alone beat the
# whole fused forward on the pointer kernel; the TMA kernel is unmeasured (bench_lora times every
# way side by side). Below it a GEMM takes a few µs, and one launch beats two.
CUBLAS_MIN_WORK = 2**32


def gemm_ways(M, N, K, dtype, w_dtype, tma, nvidia_gpu):
    """The ways `lora_gemm` can compute an `[M, N]` output over `K`, the one it runs first.

    From the shape, `a`'s and `W`'s dtypes, whether `tma_applies` and whether the tensors are on an
    NVIDIA GPU (not ROCm, not the interpreter) alone: the same answer in every process. A large
    16-bit float GEMM on an NVIDIA GPU runs "cublas"; every other GEMM its Triton kernel (TMA where
    it applies) at `gemm_config_name`'s config. The others are listed for bench_lora, which times each.
    """
    first = ("tma" if tma else "pointer", gemm_config_name(M, N, K, dtype, w_dtype in (torch.int8, torch.uint8)))
    if not nvidia_gpu or w_dtype not in (torch.float16, torch.bfloat16):
        return [first]
    configs = ("large", "medium") if N % 16 == 0 and K % 16 == 0 else ("medium",)
    kernels = ("tma", "pointer") if tma else ("pointer",)
    triton_ways = [first] + [(kernel, config) for kernel in kernels for config in configs if (kernel, config) != first]
    # The cublas way's config is that of its seed-writing launch.
    cublas = ("cublas", configs[0])
    return [cublas, *triton_ways] if M * N * K >= CUBLAS_MIN_WORK else [*triton_ways, cublas]


def gemm_ways_of(a, w, out):
    """`gemm_ways` for `lora_gemm`'s operands."""
    nvidia_gpu = a.device.type == "cuda" and not torch.version.hip
    return gemm_ways(a.shape[0], out.shape[1], a.shape[1], a.dtype, w.dtype, tma_applies(a, w, out), nvidia_gpu)


@on_device_of_first_argument
def lora_gemm(
    a, w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right, lora_scale, bias, keep_mask, keep_scale,
    out_dtype, way=None,
):  # fmt: skip
    """out = (lora_scale · lora_left · lora_right) ⊙ keep_mask · keep_scale + a · Wk + bias.

    `Wk = Wᵀ` when `w_is_transposed` (forward, `W` is `[N, K]`), else `Wk = W` (`[K, N]`). `w` is
    `W` as stored: float; int8 with `weight_scale` `[out]`; or uint8-packed int4 with
    `weight_scale` and `weight_offset` `[out, groups]` (`quantize_int4`).
    `lora_left` `[M, r]`, `lora_right` `[r, N]` (any strides). Inputs are assumed valid.
    Runs `way`, one of `gemm_ways_of(a, w, out)` (bench_lora times each), by default the first.
    """
    M, K = a.shape
    N = lora_right.shape[1]
    out = output_buffer((M, N), a.device, out_dtype)
    operands = dict(
        a=a, w=w, w_is_transposed=w_is_transposed,
        weight_scale=None if weight_scale is None else weight_scale.contiguous(),
        weight_offset=None if weight_offset is None else weight_offset.contiguous(),
        lora_left=lora_left, lora_right=lora_right, lora_scale=float(lora_scale),
        bias=None if bias is None else bias.contiguous(), keep_mask=keep_mask, keep_scale=float(keep_scale), out=out,
    )  # fmt: skip
    _launch_gemm(gemm_ways_of(a, w, out)[0] if way is None else way, **operands)
    return out


def _launch_gemm(
    way, a, w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right, lora_scale, bias, keep_mask,
    keep_scale, out,
):  # fmt: skip
    """Write `lora_gemm`'s `out` the way `way` = (kernel, config name) says."""
    kernel, config_name = way
    if kernel == "cublas":
        _launch_gemm(
            ("pointer", config_name), a[:, :0], w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right,
            lora_scale, bias, keep_mask, keep_scale, out,
        )  # fmt: skip
        out.addmm_(a, w.t() if w_is_transposed else w)
        return
    M, K = a.shape
    N = out.shape[1]
    rank = lora_left.shape[1]
    config = GEMM_CONFIGS[config_name]
    meta = {k: v for k, v in config.items() if k.startswith(("BLOCK", "GROUP"))}
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    common = dict(
        HAS_BIAS=bias is not None, HAS_KEEP=keep_mask is not None, W_TRANSPOSED=w_is_transposed,
        BLOCK_R=rank_block(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
        **meta,
    )  # fmt: skip
    pointer_operands = (
        lora_left, lora_right, bias if bias is not None else a, keep_mask if keep_mask is not None else a,
    )  # fmt: skip
    pointer_strides = (
        lora_left.stride(0), lora_left.stride(1), lora_right.stride(0), lora_right.stride(1),
        keep_mask.stride(0) if keep_mask is not None else 0,
    )  # fmt: skip
    if kernel == "tma":
        _lora_gemm_tma_kernel[(tiles,)](
            TensorDescriptor.from_tensor(a, [block_m, block_k]),
            TensorDescriptor.from_tensor(w, [block_n, block_k] if w_is_transposed else [block_k, block_n]),
            *pointer_operands, out, M, N, K, rank, *pointer_strides, out.stride(0), lora_scale, keep_scale,
            **common,
        )  # fmt: skip
        return
    w_int8 = w.dtype == torch.int8
    w_int4 = w.dtype == torch.uint8
    stride_wk, stride_wn = (w.stride(1), w.stride(0)) if w_is_transposed else (w.stride(0), w.stride(1))
    _lora_gemm_kernel[(tiles,)](
        a, w, weight_scale if weight_scale is not None else w, weight_offset if w_int4 else w, *pointer_operands, out,
        M, N, K, rank,
        a.stride(0), a.stride(1), stride_wk, stride_wn, weight_scale.stride(0) if w_int4 else 0,
        *pointer_strides, out.stride(0),
        lora_scale, keep_scale,
        W_INT8=w_int8, W_INT4=w_int4, INT4_GROUP=INT4_GROUP_SIZE, **common,
    )  # fmt: skip

