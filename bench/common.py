"""What several benches share: one timer, and the device's measured copy bandwidth."""

import time

import torch


def make_timer(device, cpu_repeats):
    """`timer(fn) -> ms`: `triton.testing.do_bench`'s median on a GPU; on a CPU the best of
    `cpu_repeats` runs after one warm-up (slower runs measure the machine's other load)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def best_of(fn):
        fn()
        times = []
        for _ in range(cpu_repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return min(times)

    return best_of


def measure_copy_bandwidth(timer):
    """GB/s of a 1 GiB device-to-device copy (it reads and writes the bytes: 2 * bytes / time)."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6
