"""Many LoRA adapters in one batch: one layer, decode and prefill, 1 to 32 distinct adapters.

A batch's requests each take one adapter from a pool of 32 slots (ranks 16, 64, 8, 32 in turn,
zero-padded to r_max 64; adapter 0 is rank 16); request `i` takes adapter `i % adapters`, so the
batch arrives unsorted. Decode: one token per request, batches of 32 to 256. Prefill: 8192
tokens, 32 requests of 256 tokens (CPU: smaller). Providers (`PROVIDERS`, a dict of builders
`case -> step`), side by side on the same inputs:
- `base`: `x·Wᵀ` alone, what no adapter costs;
- `multi_lora`: `fused_train.multi_lora_linear` (Triton on the GPU; on a CPU its PyTorch reference);
- `multi_lora_int8`: the same over the int8 base (`quantize_int8`);
- `loop`: the base matmul, then each distinct adapter of the batch applied to its rows (an
  index, two matmuls and an `index_add_` per adapter, row indices prepared before timing).
Reports ms (GPU: `triton.testing.do_bench`; CPU: the best of 7 runs), tokens/s, the path
`multi_lora` took and, per provider, tokens/s against its own single-adapter case of the same
shape; writes JSON and a PNG chart under bench/results/.

    python bench/bench_multi_lora.py            # 4096×4096 and 4096×14336 on a GPU; small shapes on CPU
    python bench/bench_multi_lora.py --quick    # the GPU acceptance shape only: 4096×4096
"""

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import fused_train
from fused_train.kernels.lora_ref import quantize_int8

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SLOTS, R_MAX = 32, 64
RANK_CYCLE = (16, 64, 8, 32)
ADAPTER_COUNTS = (1, 8, 32)
PREFILL_REQUESTS = 32
# (in, out) of the layers; (name, tokens) of the batches.
GPU_LAYERS = [(4096, 4096), (4096, 14336)]
GPU_BATCHES = [("decode", 32), ("decode", 64), ("decode", 128), ("decode", 256), ("prefill", 8192)]
CPU_LAYERS = [(512, 512), (512, 1376)]
CPU_BATCHES = [("decode", 32), ("decode", 256), ("prefill", 1024)]


@dataclass
class Case:
    """One batch through one layer: every provider reads its tensors from here."""

    x: torch.Tensor
    weight: torch.Tensor
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    token_slots: torch.Tensor
    scalings: torch.Tensor
    ranks: torch.Tensor


def make_case(phase, tokens, fan_in, fan_out, adapters, dtype, device):
    torch.manual_seed(0)
    ranks = torch.tensor([RANK_CYCLE[s % len(RANK_CYCLE)] for s in range(SLOTS)], dtype=torch.int32, device=device)
    in_rank = torch.arange(R_MAX, device=device) < ranks[:, None]
    lora_a = torch.randn(SLOTS, R_MAX, fan_in, device=device) / fan_in**0.5 * in_rank[:, :, None]
    lora_b = torch.randn(SLOTS, fan_out, R_MAX, device=device) * 0.02 * in_rank[:, None, :]
    requests = tokens if phase == "decode" else PREFILL_REQUESTS
    request_slots = torch.arange(requests, dtype=torch.int32, device=device) % adapters
    weight = torch.randn(fan_out, fan_in, device=device) / fan_in**0.5
    weight_int8, weight_scale = quantize_int8(weight)
    return Case(
        x=torch.randn(tokens, fan_in, dtype=dtype, device=device),
        weight=weight.to(dtype),
        weight_int8=weight_int8,
        weight_scale=weight_scale,
        lora_a=lora_a.to(dtype),
        lora_b=lora_b.to(dtype),
        token_slots=request_slots.repeat_interleave(tokens // requests),
        scalings=2.0 / ranks.float(),
        ranks=ranks,
    )


def _base(case):
    return lambda: case.x @ case.weight.t()


def _multi_lora(case):
    # Slots were checked when the batch was formed: the hot loop skips the read back, as a server would.
    return lambda: fused_train.multi_lora_linear(
        case.x, case.weight, case.lora_a, case.lora_b, case.token_slots, case.scalings, case.ranks, check_values=False
    )


def _multi_lora_int8(case):
    return lambda: fused_train.multi_lora_linear(
        case.x, case.weight_int8, case.lora_a, case.lora_b, case.token_slots, case.scalings, case.ranks,
        weight_scale=case.weight_scale, check_values=False,
    )  # fmt: skip


def _loop(case):
    groups = []
    for slot in torch.unique(case.token_slots).tolist():
        rank = int(case.ranks[slot])
        rows = (case.token_slots == slot).nonzero()[:, 0]
        groups.append((rows, case.lora_a[slot, :rank], case.lora_b[slot, :, :rank], float(case.scalings[slot])))

    def step():
        y = case.x @ case.weight.t()
        for rows, lora_a, lora_b, scaling in groups:
            y.index_add_(0, rows, (case.x[rows] @ lora_a.t()) @ lora_b.t(), alpha=scaling)
        return y

    return step


# name -> builder: `builder(case)` returns the step to time. More providers (peft's mixed batch,
# the adapter pool end to end) are added here.
PROVIDERS = {"base": _base, "multi_lora": _multi_lora, "multi_lora_int8": _multi_lora_int8, "loop": _loop}


def _time_ms(fn, device):
    with torch.no_grad():
        if device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100)
        fn()
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        # The best run: slower ones measure the machine's other load (CI runners share their cores).
        return min(samples)


def _path(tokens, device):
    """Which way `multi_lora` runs this batch: a kernel path on the GPU, the reference elsewhere."""
    if device != "cuda":
        return "reference"
    from fused_train.kernels.multi_lora import choose_path

    return choose_path(tokens, SLOTS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU: the 4096×4096 layer only")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if device == "cpu":
        layers, batches = CPU_LAYERS, CPU_BATCHES
        print("CPU: small shapes; multi_lora runs its PyTorch reference (no Triton off the GPU).")
    else:
        layers, batches = (GPU_LAYERS[:1] if args.quick else GPU_LAYERS), GPU_BATCHES

    rows = []
    grid = [(layer, batch, adapters) for layer in layers for batch in batches for adapters in ADAPTER_COUNTS]
    for (fan_in, fan_out), (phase, tokens), adapters in tqdm(grid, desc="bench_multi_lora"):
        case = make_case(phase, tokens, fan_in, fan_out, adapters, dtype, device)
        row = dict(fan_in=fan_in, fan_out=fan_out, phase=phase, tokens=tokens, adapters=adapters, dtype=args.dtype,
                   multi_lora_path=_path(tokens, device))  # fmt: skip
        for name, builder in PROVIDERS.items():
            ms = _time_ms(builder(case), device)
            row[f"{name}_ms"] = ms
            row[f"{name}_tokens_per_s"] = tokens / ms * 1e3
        rows.append(row)
        del case
    for row in rows:
        single = next(r for r in rows if r["adapters"] == 1 and
                      all(r[k] == row[k] for k in ("fan_in", "fan_out", "phase", "tokens")))  # fmt: skip
        for name in PROVIDERS:
            row[f"{name}_over_single"] = row[f"{name}_tokens_per_s"] / single[f"{name}_tokens_per_s"]
        row["multi_lora_over_base"] = row["multi_lora_ms"] / row["base_ms"]
        row["loop_over_multi_lora"] = row["loop_ms"] / row["multi_lora_ms"]

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"multi_lora_{device}{'_quick' if args.quick else ''}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with open(stem + ".json", "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, slots=SLOTS, r_max=R_MAX, rank_cycle=RANK_CYCLE,
                       providers=list(PROVIDERS), rows=rows), f, indent=1)  # fmt: skip
    _chart(rows, stem + ".png", device_name)

    print(f"{'in':>5} {'out':>6} {'phase':>7} {'tokens':>6} {'adapters':>8} "
          + " ".join(f"{name + ' ms':>{max(9, len(name) + 3)}}" for name in PROVIDERS)
          + f" {'multi tok/s':>12} {'multi/single':>12} {'loop/multi':>10} {'path':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['fan_in']:>5} {r['fan_out']:>6} {r['phase']:>7} {r['tokens']:>6} {r['adapters']:>8} "
              + " ".join(f"{r[f'{name}_ms']:>{max(9, len(name) + 3)}.3f}" for name in PROVIDERS)
              + f" {r['multi_lora_tokens_per_s']:>12.0f} {r['multi_lora_over_single']:>12.3f}"
              f" {r['loop_over_multi_lora']:>10.3f} {r['multi_lora_path']:>9}")  # fmt: skip
    print(f"wrote {stem}.json and {stem}.png")


def _chart(rows, path, device_name):
    """Tokens/s of each provider against the number of distinct adapters, one panel per layer and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["fan_in"], r["fan_out"], r["phase"], r["tokens"]) for r in rows},
                    key=lambda p: (p[0], p[1], p[2] != "decode", p[3]))  # fmt: skip
    columns = min(len(panels), 5)
    fig_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(fig_rows, columns, figsize=(3.2 * columns, 2.8 * fig_rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        mine = [r for r in rows if (r["fan_in"], r["fan_out"], r["phase"], r["tokens"]) == panel]
        for name in PROVIDERS:
            ax.plot([r["adapters"] for r in mine], [r[f"{name}_tokens_per_s"] for r in mine], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ADAPTER_COUNTS, [str(n) for n in ADAPTER_COUNTS])
        ax.set_title(f"{panel[0]}x{panel[1]} {panel[2]} {panel[3]}", fontsize=8)
        ax.set_xlabel("distinct adapters", fontsize=7)
        ax.set_ylabel("tokens/s", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"multi-LoRA linear, {rows[0]['dtype']}, {device_name} (higher is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
