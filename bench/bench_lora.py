"""Fused LoRA linear vs peft's LoRA layer vs the frozen base matmul alone, forward and forward+backward.

Providers, side by side on the same random inputs:
- `base`:  `x·Wᵀ` alone (forward), plus `dx = dy·W` (backward; W frozen, so no dW);
- `peft`:  peft's `lora.Linear` (adapters in float32, as `get_peft_model` keeps them by default);
- `fused`: `fused_train.lora_linear` (Triton on the GPU; on CPU its PyTorch reference runs, since
  the Triton interpreter would time Python, so CPU figures only compare base and peft-style math);
- `fused_int8`, `fused_int4`: the same over the base weight quantized as `quantize_base(bits=8/4)`
  stores it (the kernel dequantizes W tile by tile; on CPU the reference dequantizes it whole).
Reports ms (median), TFLOP/s of the base matmul work, peak memory (GPU), the frozen weight's bytes
per format, and the ratios fused/base, peft/fused, fused_int8/base and fused_int4/base; writes JSON
and a PNG chart under bench/results/. On a GPU, each row also times every way `fused`'s two GEMMs can run
(TMA or pointer kernel at each config, or cuBLAS over our seed), side by side (`gemm_ways_ms`,
forward and dx; the first is the one `gemm_ways`' rule runs). It also profiles `base`
and `fused` at the acceptance shape (torch.profiler), forward+backward and forward alone: the time
of each kernel, and their sum against the timed step, which says whether the difference is in the
kernels or between them (launch gaps). Last, the host time of one
forward+backward at a tiny shape (16 tokens, 256×256, r=16), where the kernels' own time is
negligible: what each provider costs the CPU per layer. On a GPU, wall time over many steps; on a
CPU, the fused path's Triton launchers are stubbed out (empty outputs), so the figure is the
Python/autograd glue alone.

    python bench/bench_lora.py            # 7B-class shapes on a GPU, reduced shapes on CPU
    python bench/bench_lora.py --quick    # the shape of the acceptance: 4096×4096, r=16, 8k tokens
"""

import argparse
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from tqdm import tqdm

import fused_train.ops.lora
from fused_train.hf.quantize import Int8Linear
from fused_train.kernels import lora_gemm as gemm_kernels
from fused_train.kernels.lora_gemm_ref import quantize_int4
from fused_train.ops.lora import lora_linear

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import pyplot  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (tokens, in_features, out_features, rank): attention and MLP projections of 7B-class models.
GPU_SHAPES = [
    (tokens, fan_in, fan_out, rank)
    for tokens in (4096, 8192, 16384)
    for fan_in, fan_out in ((4096, 4096), (4096, 14336), (14336, 4096))
    for rank in (8, 16, 64)
]
QUICK_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16)]
CPU_SHAPES = [(256, 512, 512, 16), (256, 512, 1376, 16)]


def _time_ms(fn, device):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    samples = []
    for _ in range(10):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _providers(tokens, fan_in, fan_out, rank, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(tokens, fan_in, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, fan_out, device=device, dtype=dtype)
    base = torch.nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    layer = LoraLinear(base, "default", LoraConfig(r=rank, lora_alpha=2 * rank), r=rank, lora_alpha=2 * rank)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    int8 = Int8Linear.from_linear(base)
    packed, scale, offset = quantize_int4(base.weight)
    forwards = {
        "base": lambda: x @ base.weight.t(),
        "peft": lambda: layer(x),
        "fused": lambda: lora_linear(x, base.weight, lora_a, lora_b, scaling),
        "fused_int8": lambda: lora_linear(x, int8.weight, lora_a, lora_b, scaling, weight_scale=int8.weight_scale),
        "fused_int4": lambda: lora_linear(x, packed, lora_a, lora_b, scaling, weight_scale=scale, weight_offset=offset),
    }
    weight_mb = {
        "base": base.weight.nbytes / 2**20,
        "fused_int8": (int8.weight.nbytes + int8.weight_scale.nbytes) / 2**20,
        "fused_int4": (packed.nbytes + scale.nbytes + offset.nbytes) / 2**20,
    }
    return forwards, weight_mb, grad_y, [x, lora_a, lora_b]


def _gemm_ways_ms(tokens, fan_in, fan_out, rank, dtype, device):
    """ms of each way `fused`'s two GEMMs (forward and dx, as `lora_linear` launches them) can run,
    side by side, the way `gemm_ways` picks first. On a GPU only: on CPU the reference runs."""
    torch.manual_seed(0)
    weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype) / fan_in**0.5
    x, grad_y = torch.randn(tokens, fan_in, device=device, dtype=dtype), torch.randn(tokens, fan_out, device=device, dtype=dtype)
    lora_s, lora_b = torch.randn(tokens, rank, device=device), torch.randn(fan_out, rank, device=device)
    grad_s, lora_a = torch.randn(tokens, rank, device=device), torch.randn(rank, fan_in, device=device)
    keep = (torch.rand(tokens, fan_in, device=device) > 0.1).view(torch.uint8)
    gemms = {
        "fwd": (x, weight, True, None, None, lora_s, lora_b.t(), 2.0, None, None, 1.0, dtype),
        "dx": (grad_y, weight, False, None, None, grad_s, lora_a, 1.0, None, keep, 1 / 0.9, dtype),
    }
    found = {}
    for kind, args in gemms.items():
        out = torch.empty(tokens, args[6].shape[1], device=device, dtype=dtype)
        found[kind] = {
            " ".join(way): round(_time_ms(lambda way=way: gemm_kernels.lora_gemm(*args, way=way), device), 4)
            for way in gemm_kernels.gemm_ways_of(args[0], weight, out)
        }
    return found


def _fwd_bwd_step(forward, grad_y, leaves):
    """One forward+backward of `forward`, its leaves' gradients dropped after (none accumulate)."""

    def step():
        forward().backward(grad_y)
        for leaf in leaves:
            leaf.grad = None

    return step


def _forward_step(forward):
    def step():
        with torch.no_grad():
            forward()

    return step


def _measure(forward, grad_y, leaves, mode, device):
    run = _forward_step(forward) if mode == "fwd" else _fwd_bwd_step(forward, grad_y, leaves)

    peak_mb = None
    if device == "cuda":
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    return _time_ms(run, device), peak_mb


def _kernel_times(step, iterations):
    """Device µs per `step` of each kernel it launches (summed over its launches), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        # torch >= 2.4 names it device_time_total; older releases cuda_time_total.
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0 and event.key not in kernels:
            kernels[event.key] = round(total / iterations, 2)
    return dict(sorted(kernels.items(), key=lambda item: -item[1]))


def kernel_breakdown(forward, grad_y, leaves, iterations=10):
    """Per-kernel device time of `forward`: µs per forward+backward, and per forward alone. The
    profile sums a kernel's launches, so the GEMM kernel, launched by the forward and by dx, needs
    the forward alone to be told apart: its dx share is the difference."""
    fwd_bwd = _kernel_times(_fwd_bwd_step(forward, grad_y, leaves), iterations)
    fwd = _kernel_times(_forward_step(forward), iterations)
    return dict(
        kernels_us=fwd_bwd, sum_us=round(sum(fwd_bwd.values()), 2),
        forward_kernels_us=fwd, forward_sum_us=round(sum(fwd.values()), 2), iterations=iterations,
    )  # fmt: skip


def _stub_fwd(x, weight, weight_scale, weight_offset, lora_a, *args):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


def _stub_bwd(grad_y, x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, *args):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def host_overhead(device, dtype, rounds=7, iterations=100):
    """Host µs per forward+backward at a tiny shape, for base, peft and fused (see the docstring).

    Providers take turns over `rounds` rounds of `iterations` steps; each reports its best round
    (timeit's rule: slower rounds measure the machine's other load, not the code)."""
    forwards, _, grad_y, leaves = _providers(16, 256, 256, 16, dtype, device)
    stubs = {} if device == "cuda" else dict(
        triton_runs_on=lambda *tensors: True, lora_linear_fwd=_stub_fwd, lora_linear_bwd=_stub_bwd
    )  # fmt: skip
    names = ("base", "peft", "fused")
    best = dict.fromkeys(names, float("inf"))
    with mock.patch.multiple(fused_train.ops.lora, **stubs):
        for _ in range(rounds):
            for name in names:
                step = _fwd_bwd_step(forwards[name], grad_y, leaves)
                for _ in range(10):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(iterations):
                        step()
                    torch.cuda.synchronize()
                    seconds = (time.perf_counter() - start) / iterations
                else:
                    samples = []
                    for _ in range(iterations):
                        start = time.perf_counter()
                        step()
                        samples.append(time.perf_counter() - start)
                    seconds = statistics.median(samples)
                best[name] = min(best[name], seconds * 1e6)
    return dict(
        **{f"{name}_us": us for name, us in best.items()},
        shape=dict(tokens=16, fan_in=256, fan_out=256, rank=16, dtype=str(dtype).removeprefix("torch.")),
        method=(
            f"best of {rounds} rounds of {iterations} steps, providers taking turns; "
            + ("wall time per step (kernels negligible at this shape)" if device == "cuda" else
               "median step time; fused path with its Triton launchers stubbed out: the Python/autograd glue alone")
        ),
    )  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the acceptance shapes")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if device == "cpu":
        shapes = CPU_SHAPES
        print("CPU: reduced shapes; 'fused' runs lora_linear's PyTorch reference (no Triton off the GPU).")
    else:
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES

    rows, breakdown = [], None
    for tokens, fan_in, fan_out, rank in tqdm(shapes, desc="bench_lora"):
        forwards, weight_mb, grad_y, leaves = _providers(tokens, fan_in, fan_out, rank, dtype, device)
        gemm_ways_ms = _gemm_ways_ms(tokens, fan_in, fan_out, rank, dtype, device) if device == "cuda" else {}
        for mode in ("fwd", "fwd+bwd"):
            # base matmul work: x·Wᵀ forward, and dy·W in the backward
            flop = 2 * tokens * fan_in * fan_out * (1 if mode == "fwd" else 2)
            row = dict(tokens=tokens, fan_in=fan_in, fan_out=fan_out, rank=rank, mode=mode, dtype=args.dtype)
            row |= {f"{name}_weight_mb": mb for name, mb in weight_mb.items()}
            for name, forward in forwards.items():
                ms, peak_mb = _measure(forward, grad_y, leaves, mode, device)
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flop / ms / 1e9
                row[f"{name}_peak_mb"] = peak_mb
            row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
            row["peft_over_fused"] = row["peft_ms"] / row["fused_ms"]
            row["fused_int8_over_base"] = row["fused_int8_ms"] / row["base_ms"]
            row["fused_int4_over_base"] = row["fused_int4_ms"] / row["base_ms"]
            row["gemm_ways_ms"] = gemm_ways_ms
            rows.append(row)
        if device == "cuda" and (tokens, fan_in, fan_out, rank) == QUICK_SHAPES[0]:
            try:
                breakdown = {}
                for name in ("base", "fused"):
                    breakdown[name] = kernel_breakdown(forwards[name], grad_y, leaves)
            except Exception as error:  # the profile is a diagnosis: it must not cost the run its timings
                breakdown = {"error": f"{type(error).__name__}: {error}"}
                print(f"kernel breakdown failed: {breakdown['error']}")
            else:
                for name in breakdown:
                    breakdown[name]["timed_step_us"] = round(rows[-1][f"{name}_ms"] * 1e3, 2)
        del forwards, weight_mb, grad_y, leaves

    host = host_overhead(device, dtype)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_lora_{device}{'_quick' if args.quick else ''}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with open(stem + ".json", "w") as f:
        summary = [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
             if not k.endswith(("_tflops", "_mb"))}
            for r in rows
            if r["mode"] == "fwd+bwd"
        ]  # fmt: skip
        json.dump(dict(device=device_name, torch=torch.__version__, summary=summary, rows=rows,
                       fwd_bwd_kernel_breakdown=breakdown, host_overhead=host), f, indent=1)
    _chart(rows, stem + ".png", device_name)

    header = (
        f"{'tokens':>6} {'in':>6} {'out':>6} {'r':>3} {'mode':>8} {'base ms':>8} {'peft ms':>8} {'fused ms':>8} "
        f"{'fused/base':>10} {'peft/fused':>10} {'int8/base':>9} {'int4/base':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['fan_in']:>6} {r['fan_out']:>6} {r['rank']:>3} {r['mode']:>8} "
            f"{r['base_ms']:>8.3f} {r['peft_ms']:>8.3f} {r['fused_ms']:>8.3f} {r['fused_over_base']:>10.3f} "
            f"{r['peft_over_fused']:>10.3f} {r['fused_int8_over_base']:>9.3f} {r['fused_int4_over_base']:>9.3f}"
        )
        for gemm, timings in r["gemm_ways_ms"].items():
            print(f"    {gemm} GEMM ways (ms): " + ", ".join(f"{way} {ms:.3f}" for way, ms in timings.items()))
    if breakdown and "error" not in breakdown:
        for name, entry in breakdown.items():
            print(f"{name} fwd+bwd: kernels sum {entry['sum_us']:.1f} us of a {entry['timed_step_us']:.1f} us step")
            for kernel, us in list(entry["kernels_us"].items())[:8]:
                forward_us = entry["forward_kernels_us"].get(kernel, 0.0)
                print(f"  {us:9.1f} us ({forward_us:7.1f} in the forward)  {kernel[:90]}")
    print("host time per forward+backward at 16 tokens, 256x256, r=16 ({method}): ".format(**host)
          + ", ".join(f"{name} {host[f'{name}_us']:.1f} us" for name in ("base", "peft", "fused")))
    print(f"wrote {stem}.json and {stem}.png")


def _chart(rows, path, device_name):
    plt = pyplot()

    labels = [f"{r['tokens']}x{r['fan_in']}x{r['fan_out']} r{r['rank']}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    names = ("base", "peft", "fused", "fused_int8", "fused_int4")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(rows))], [r[f"{name}_ms"] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("ms (lower is better)")
    ax.set_title(f"LoRA linear, {rows[0]['dtype']}, {device_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
