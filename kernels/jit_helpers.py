"""The `@triton.jit` helpers and constants that several attention kernels share."""

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
