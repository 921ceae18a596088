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
  index, two matmuls and an `index_add_` per adapter, row indices prepared before timing);
- `peft`: peft's own mixed batch (`adapter_names=`, one name per request) on the layer wrapped by
  `get_peft_model` with the batch's adapters, unpatched.
Reports ms (GPU: `triton.testing.do_bench`; CPU: the best of 7 runs, in rounds), tokens/s, the path
`multi_lora` took and, per provider, tokens/s against its own single-adapter case of the same
shape; writes JSON and a PNG chart under bench/results/.

End to end (CPU; `--model-only` for this part alone, `--layer-only` without it): the demo's tiny
Llama (bench/demo.py, 4 layers, hidden 128, sdpa) with 8 adapters on all seven projections
(ranks 16, 64, 8, 32 in turn), a batch of 32 requests over them, a prefill of 64 tokens each
and one decode step over that 64-token cache, through
- `peft_mixed`: the peft model, `adapter_names=` (peft's mixed batch, unpatched);
- `peft_patched`: the same model after `fused_train.patch` (its mixed batches through
  `multi_lora_linear`, our attention);
- `pool`: the plain model with the adapters in a `fused_train.serving.AdapterPool`,
  `with pool.activate(pool.slots_for(names, num_tokens)): model(...)`;
- `base_alone`: the plain model without adapters, the floor no provider can beat.
Logits are checked against `peft_mixed` first; the best of 15 runs, and the ratio to `peft_mixed`.

    python bench/bench_multi_lora.py            # 4096×4096 and 4096×14336 on a GPU; small shapes on CPU
    python bench/bench_multi_lora.py --quick    # the GPU acceptance shape only: 4096×4096
    python bench/bench_multi_lora.py --model-only   # the tiny model end to end (CPU)
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import fused_train
from fused_train.kernels.lora_ref import quantize_int8

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import MODEL, pyplot  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")

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
    requests: int  # the batch's requests, each `tokens // requests` contiguous tokens of one slot


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
        requests=requests,
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


class _OneLayer(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype,
                                    device=weight.device)  # fmt: skip
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def _peft(case):
    from peft import LoraConfig, get_peft_model

    model = None
    for slot in torch.unique(case.token_slots).tolist():
        rank = int(case.ranks[slot])
        # lora_alpha / r is peft's scaling: alpha = scaling · rank gives the case's scalings.
        config = LoraConfig(r=rank, lora_alpha=float(case.scalings[slot]) * rank, target_modules=["proj"])
        name = f"adapter{slot}"
        if model is None:
            model = get_peft_model(_OneLayer(case.weight), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        layer = model.base_model.model.proj
        layer.lora_A[name].weight.data.copy_(case.lora_a[slot, :rank])
        layer.lora_B[name].weight.data.copy_(case.lora_b[slot, :, :rank])
    model.eval()
    rows = case.x.view(case.requests, -1, case.x.shape[-1])
    names = [f"adapter{slot}" for slot in case.token_slots.view(case.requests, -1)[:, 0].tolist()]
    return lambda: model(rows, adapter_names=names)


# name -> builder: `builder(case)` returns the step to time.
PROVIDERS = {
    "base": _base, "multi_lora": _multi_lora, "multi_lora_int8": _multi_lora_int8, "loop": _loop, "peft": _peft
}  # fmt: skip


def _time_ms(steps, device, runs=7):
    """ms of each step: `do_bench` on a GPU; on a CPU the best of `runs`, timed in rounds (each step
    in turn), so that a burst of other load hits every provider rather than one."""
    with torch.no_grad():
        if device == "cuda":
            import triton.testing

            return {name: triton.testing.do_bench(step, warmup=25, rep=100) for name, step in steps.items()}
        samples = {name: [] for name in steps}
        for step in steps.values():
            step()
        for _ in range(runs):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                samples[name].append((time.perf_counter() - start) * 1e3)
        # The best run: slower ones measure the machine's other load (CI runners share their cores).
        return {name: min(times) for name, times in samples.items()}


def _path(tokens, device):
    """Which way `multi_lora` runs this batch: a kernel path on the GPU, the reference elsewhere."""
    if device != "cuda":
        return "reference"
    from fused_train.kernels.multi_lora import choose_path

    return choose_path(tokens, SLOTS)


def bench_layers(device, dtype_name, quick):
    """The layer grid: one row per (layer, batch, adapters), every provider's ms and tokens/s."""
    dtype = getattr(torch, dtype_name)
    if device == "cpu":
        layers, batches = CPU_LAYERS, CPU_BATCHES
        print("CPU: small shapes; multi_lora runs its PyTorch reference (no Triton off the GPU).")
    else:
        layers, batches = (GPU_LAYERS[:1] if quick else GPU_LAYERS), GPU_BATCHES
    rows = []
    grid = [(layer, batch, adapters) for layer in layers for batch in batches for adapters in ADAPTER_COUNTS]
    for (fan_in, fan_out), (phase, tokens), adapters in tqdm(grid, desc="bench_multi_lora"):
        case = make_case(phase, tokens, fan_in, fan_out, adapters, dtype, device)
        row = dict(fan_in=fan_in, fan_out=fan_out, phase=phase, tokens=tokens, adapters=adapters, dtype=dtype_name,
                   multi_lora_path=_path(tokens, device))  # fmt: skip
        steps = {name: builder(case) for name, builder in PROVIDERS.items()}
        for name, ms in _time_ms(steps, device).items():
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
        row["peft_over_multi_lora"] = row["peft_ms"] / row["multi_lora_ms"]
    return rows


def print_layers(rows):
    print(f"{'in':>5} {'out':>6} {'phase':>7} {'tokens':>6} {'adapters':>8} "
          + " ".join(f"{name + ' ms':>{max(9, len(name) + 3)}}" for name in PROVIDERS)
          + f" {'multi tok/s':>12} {'multi/single':>12} {'loop/multi':>10} {'peft/multi':>10} {'path':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['fan_in']:>5} {r['fan_out']:>6} {r['phase']:>7} {r['tokens']:>6} {r['adapters']:>8} "
              + " ".join(f"{r[f'{name}_ms']:>{max(9, len(name) + 3)}.3f}" for name in PROVIDERS)
              + f" {r['multi_lora_tokens_per_s']:>12.0f} {r['multi_lora_over_single']:>12.3f}"
              f" {r['loop_over_multi_lora']:>10.3f} {r['peft_over_multi_lora']:>10.3f}"
              f" {r['multi_lora_path']:>9}")  # fmt: skip


E2E_ADAPTERS, E2E_REQUESTS, E2E_PROMPT_TOKENS = 8, 32, 64
E2E_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
E2E_PROVIDERS = ("peft_mixed", "peft_patched", "pool")
# The same model without adapters: what the batch costs with LoRA for free (no provider can beat it).
E2E_FLOOR = "base_alone"


def bench_model(runs=15):
    """The tiny model end to end (module docstring): one row per phase, ms per provider."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from fused_train.serving import AdapterPool

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL, attn_implementation="sdpa")).eval()
    names = [f"adapter{i % E2E_ADAPTERS}" for i in range(E2E_REQUESTS)]
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for i in range(E2E_ADAPTERS):
            torch.manual_seed(1 + i)
            config = LoraConfig(r=RANK_CYCLE[i % len(RANK_CYCLE)], lora_alpha=16, target_modules=E2E_TARGETS,
                                init_lora_weights=False)  # fmt: skip
            paths[f"adapter{i}"] = os.path.join(folder, f"adapter{i}")
            get_peft_model(copy.deepcopy(base), config).save_pretrained(paths[f"adapter{i}"])
        peft_mixed = PeftModel.from_pretrained(copy.deepcopy(base), paths["adapter0"], adapter_name="adapter0")
        for name, path in list(paths.items())[1:]:
            peft_mixed.load_adapter(path, adapter_name=name)
        peft_mixed.eval()
        peft_patched = fused_train.patch(copy.deepcopy(peft_mixed))
        pooled = copy.deepcopy(base)
        pool = AdapterPool(pooled, max_loras=E2E_ADAPTERS, max_cpu_loras=E2E_ADAPTERS, max_rank=R_MAX)
        for name, path in paths.items():
            pool.load(name, path)

    def through_peft(model):
        return lambda ids, cache: model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                                        adapter_names=names).logits  # fmt: skip

    def through_pool(ids, cache):
        with pool.activate(pool.slots_for(names, num_tokens=[ids.shape[1]] * len(names))):
            return pooled(input_ids=ids, past_key_values=cache, use_cache=cache is not None).logits

    def alone(ids, cache):
        return pooled(input_ids=ids, past_key_values=cache, use_cache=cache is not None).logits

    forwards = {"peft_mixed": through_peft(peft_mixed), "peft_patched": through_peft(peft_patched),
                "pool": through_pool, E2E_FLOOR: alone}  # fmt: skip
    torch.manual_seed(0)
    prompt = torch.randint(3, MODEL["vocab_size"], (E2E_REQUESTS, E2E_PROMPT_TOKENS))
    next_ids = torch.randint(3, MODEL["vocab_size"], (E2E_REQUESTS, 1))
    rows = []
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            row = dict(phase=phase, requests=E2E_REQUESTS, adapters=E2E_ADAPTERS, prompt_tokens=E2E_PROMPT_TOKENS,
                       tokens=E2E_REQUESTS * (E2E_PROMPT_TOKENS if phase == "prefill" else 1))  # fmt: skip
            steps, expected = {}, None
            for name, forward in forwards.items():
                steps[name] = _model_step(forward, phase, prompt, next_ids)
                logits = steps[name]()
                if name == E2E_FLOOR:
                    continue  # no adapters: other logits
                expected = logits if expected is None else expected
                row[f"{name}_max_abs_diff"] = (logits - expected).abs().max().item()
                if row[f"{name}_max_abs_diff"] > 1e-3:
                    raise AssertionError(
                        f"{name} {phase} logits differ from peft_mixed by {row[f'{name}_max_abs_diff']}"
                    )
            # In rounds, each provider in turn: a burst of other load hits all of them, not one.
            samples = {name: [] for name in steps}
            for _ in range(runs):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    samples[name].append((time.perf_counter() - start) * 1e3)
            for name in steps:
                row[f"{name}_ms"] = min(samples[name])
                row[f"{name}_tokens_per_s"] = row["tokens"] / row[f"{name}_ms"] * 1e3
            for name in E2E_PROVIDERS + (E2E_FLOOR,):
                row[f"{name}_speedup_over_peft_mixed"] = row["peft_mixed_ms"] / row[f"{name}_ms"]
            rows.append(row)
    pool.close()
    return rows


def _model_step(forward, phase, prompt, next_ids):
    import transformers

    if phase == "prefill":
        return lambda: forward(prompt, None)
    cache = transformers.DynamicCache()
    forward(prompt, cache)

    def step():
        logits = forward(next_ids, cache)
        cache.crop(-1)  # drop the step's token: the same 64-token cache for every run
        return logits

    return step


def print_model(rows):
    print(f"tiny Llama ({E2E_REQUESTS} requests over {E2E_ADAPTERS} adapters, {E2E_PROMPT_TOKENS}-token prompts):")
    names = E2E_PROVIDERS + (E2E_FLOOR,)
    print(f"{'phase':>8} " + " ".join(f"{name + ' ms':>16}" for name in names)
          + " " + " ".join(f"{name + '/peft':>18}" for name in names[1:]))  # fmt: skip
    for r in rows:
        print(f"{r['phase']:>8} " + " ".join(f"{r[f'{name}_ms']:>16.2f}" for name in names) + " "
              + " ".join(f"{r[f'{name}_speedup_over_peft_mixed']:>17.2f}x" for name in names[1:]))  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU: the 4096×4096 layer only")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--layer-only", action="store_true", help="skip the tiny model end to end")
    part.add_argument("--model-only", action="store_true", help="only the tiny model end to end (CPU)")
    parser.add_argument("--runs", type=int, default=15, help="tiny model: timed runs per provider (the best counts)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    # The tiny model measures Python and small-op overheads: a CPU figure (the issue's); skipped on a GPU.
    run_model = not args.layer_only and device == "cpu"
    rows = [] if args.model_only else bench_layers(device, args.dtype, args.quick)
    model_rows = bench_model(args.runs) if run_model or args.model_only else []

    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else "_model" if args.model_only else ""
    stem = os.path.join(args.out, f"multi_lora_{device}{suffix}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with open(stem + ".json", "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, threads=torch.get_num_threads(), slots=SLOTS,
                       r_max=R_MAX, rank_cycle=RANK_CYCLE, providers=list(PROVIDERS), rows=rows,
                       end_to_end_providers=list(E2E_PROVIDERS), end_to_end=model_rows), f, indent=1)  # fmt: skip
    if rows:
        _chart(rows, stem + ".png", device_name)
        print_layers(rows)
    if model_rows:
        print_model(model_rows)
    print(f"wrote {stem}.json" + (f" and {stem}.png" if rows else ""))


def _chart(rows, path, device_name):
    """Tokens/s of each provider against the number of distinct adapters, one panel per layer and batch."""
    plt = pyplot()

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
