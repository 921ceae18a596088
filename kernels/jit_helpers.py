"""The `@triton.jit` helpers and constants that several kernels share."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# An unbounded window side: farther than any sequence or cache, yet the kernels' int32 index math
# (row + diagonal ± window, p - window_left) cannot overflow for fewer than 2**30 tokens.
UNBOUNDED = tl.constexpr(1 << 30)


@triton.jit
def tanh(x):
    # Portable across the compiler and the interpreter; saturates to ±1 instead of overflowing.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.constexpr_function
def dot_dtype(dtype, upcast):
    """The dtype a kernel casts `tl.dot` inputs to: `dtype` (its input's, for the tensor cores), or
    float32 when `upcast` (the interpreter computes bf16 arithmetic wrongly: `launch.interpreting`)."""
    return tl.float32 if upcast else dtype


@triton.jit
def wrapped_block(block, BLOCK: tl.constexpr, size):
    """The indices of block number `block` along an axis of `size`, and the same wrapped into it:
    indices past the edge wrap onto valid ones, so loads through them need no mask; only the
    store (through the first) is masked."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    return offs, offs % size
