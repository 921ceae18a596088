"""Decode-step latency and cache memory: Int8KVCache's int8 path vs DynamicCache + SDPA vs QuantizedCache + SDPA.

One decode step is what differs between caches for one attention layer at decode: appending one new
token per sequence to a cache already holding `context` tokens, and the attention of that token's
queries over the whole cache. Shapes are Llama-3-8B's attention (32 query heads, 8 kv heads,
head_dim 128, bfloat16 on a GPU). Providers, on the same random keys, values and queries:

  ours          `Int8KVLayer` as `Int8KVCache` ships it (int8 data + float32 per-token scales,
                the last 32 tokens also exact in a ring), one step = its `update` (quantize-on-
                append of the new keys and values, ring write) + `int8_decode_attention`;
  dynamic_sdpa  transformers' `DynamicLayer` holding the keys and values in the model's dtype, one
                step = its `update` (a torch.cat of the whole cache) + SDPA (enable_gqa=True, as
                transformers' sdpa attention calls it);
  quantized_<backend>_sdpa
                transformers' `QuantizedCache(backend, config)` layer, one step = its `update`
                (which dequantizes the whole cache) + SDPA. `fp8` needs no extra package; `quanto`
                (optimum-quanto) and `hqq` run only where installed.

Each step starts from the same state (the layer's attributes are restored before it; our append
always writes position `context`), so the context does not grow while timing. On a GPU: ms by
triton.testing.do_bench (median), the extra memory one step allocates, the device's HBM bandwidth
measured in the same run (a large device-to-device copy: 2 * bytes / time), and the decode
kernel's own GB/s (the bytes it must read: int8 K and V, their scales, the ring, q; timed apart) as a
fraction of it. Bytes of each cache at that context. Writes kv_cache_<device>[_quick].json (a flat
"summary" with the ratios and the acceptance targets' pass/miss) and a PNG beside it.

On CPU (no CUDA) a reduced set runs, timed with time.perf_counter (best of several), and "ours" is
the PyTorch reference path (dequantize + attention), not the kernel: speed figures are for GPU;
the memory ratios hold anywhere.

    python bench/bench_kv_cache.py            # GPU: batch {1,4,16,64} x context {1k,4k,16k,32k}
    python bench/bench_kv_cache.py --quick    # GPU check: a few, including batch 16 x 16k
"""

import argparse
import importlib.util
import os
import platform
import sys

import torch
import torch.nn.functional as F
import transformers
import triton
from tqdm import tqdm
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer, QuantizedCache

from fused_train.hf.int8_cache import Int8KVLayer
from fused_train.ops.dispatch import triton_runs_on
from fused_train.ops.int8_kv import int8_decode_attention

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import make_timer, measure_copy_bandwidth, write_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
GPU_BATCHES, GPU_CONTEXTS = (1, 4, 16, 64), (1024, 4096, 16384, 32768)
QUICK_SHAPES = [(1, 4096), (16, 4096), (16, 16384), (64, 16384)]
CPU_SHAPES = [(1, 1024), (1, 4096), (4, 1024), (4, 4096)]
CPU_QUICK_SHAPES = [(1, 1024), (4, 1024)]
# Acceptance targets (GPU, batch 16, context 16k, head_dim 128), and memory everywhere.
TARGET_SHAPE = (16, 16384)
OURS_OVER_DYNAMIC_MAX = 0.7
QUANTIZED_OVER_OURS_MIN = 3.0
KERNEL_BANDWIDTH_FRACTION_MIN = 0.7
MEMORY_RATIO_MAX = 0.53
QUANTIZED_NOTES = {
    "fp8": "float8_e4m3fn with one per-tensor scale per layer for keys and one for values, set at the prefill and "
           "frozen (later tokens are clipped to it); no residual window: every step dequantizes the whole cache",
    "quanto": "optimum-quanto, nbits 4, group 64, residual_length 128: the last < 128 tokens stay in full precision, "
              "every step dequantizes the whole cache, and every 128th step requantizes it all; timed here at an "
              "empty residual (the state right after a requantization)",
    "hqq": "hqq, nbits 4, group 64, residual_length 128 (as quanto); timed at an empty residual",
}


def available_quantized_backends():
    """QuantizedCache backends importable here: fp8 always (transformers >= 5); quanto and hqq if installed."""
    backends = ["fp8"]
    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            backends.append(backend)
    return backends


def _restorer(layer):
    """A function that puts `layer` back in its current state (updates replace attributes, never mutate them)."""
    saved = dict(layer.__dict__)
    return lambda: layer.__dict__.update(saved)


def build_providers(batch, context, dtype, device, backends):
    """name -> step() for one decode step at `context`, plus the kernel alone and each cache's bytes."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    keys, values = randn(batch, NUM_KV_HEADS, context, HEAD_DIM), randn(batch, NUM_KV_HEADS, context, HEAD_DIM)
    new_k, new_v = randn(batch, NUM_KV_HEADS, 1, HEAD_DIM), randn(batch, NUM_KV_HEADS, 1, HEAD_DIM)
    q = randn(batch, NUM_HEADS, 1, HEAD_DIM)
    providers, cache_bytes, notes = {}, {}, {}

    # ours: the layer Int8KVCache uses, filled by a prefill, with room for the new token.
    int8_layer = Int8KVLayer(max_cache_len=context + 1)
    int8_layer.update(keys, values)
    restore_ours = _restorer(int8_layer)
    stepped = int8_layer.update(new_k, new_v)  # the state every timed step reaches

    def attend(k, v):
        return int8_decode_attention(q, k.data, k.scale, v.data, v.scale, k.length, k_recent=k.recent,
                                     v_recent=v.recent, exact_from=k.exact_from)

    def ours():
        restore_ours()
        return attend(*int8_layer.update(new_k, new_v))

    def kernel_alone():
        return attend(*stepped)

    providers["ours"] = ours
    cache_bytes["ours"] = int8_layer.nbytes()
    notes["ours"] = (f"Int8KVLayer: int8 + float32 scale per (token, kv head), the last {int8_layer.residual_length} "
                     "tokens also exact; update (quantize-on-append, ring write) + int8_decode_attention")  # fmt: skip

    # transformers' DynamicLayer, filled with the prompt's keys and values as a prefill does.
    dynamic = DynamicLayer()
    dynamic.update(keys, values)
    restore_dynamic = _restorer(dynamic)

    def dynamic_sdpa():
        restore_dynamic()
        k, v = dynamic.update(new_k, new_v)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    providers["dynamic_sdpa"] = dynamic_sdpa
    cache_bytes["dynamic_sdpa"] = dynamic.keys.nbytes + dynamic.values.nbytes
    notes["dynamic_sdpa"] = (
        f"DynamicLayer ({str(dtype).replace('torch.', '')}); update (torch.cat) + SDPA(enable_gqa=True)"
    )

    config = LlamaConfig(num_hidden_layers=1, hidden_size=NUM_HEADS * HEAD_DIM, num_attention_heads=NUM_HEADS,
                         num_key_value_heads=NUM_KV_HEADS)
    for backend in backends:
        name = f"quantized_{backend}_sdpa"
        try:
            layer = QuantizedCache(backend, config).layers[0]
            layer.update(keys, values)  # the prefill: quantizes the prompt's keys and values
            restore = _restorer(layer)
        except Exception as error:  # an installed backend that fails here is reported, not fatal
            providers[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            continue

        def quantized_sdpa(layer=layer, restore=restore):
            restore()
            k, v = layer.update(new_k, new_v)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        providers[name] = quantized_sdpa
        cache_bytes[name] = _quantized_bytes(layer)
        notes[name] = QUANTIZED_NOTES[backend]
    del keys, values
    # What the decode kernel must read: int8 K and V, their scales, the exact ring, q (its output is as small as q).
    ring_bytes = int8_layer.buffers["k_recent"].nbytes + int8_layer.buffers["v_recent"].nbytes
    int8_tokens = stepped[0].exact_from
    kernel_bytes_read = 2 * batch * NUM_KV_HEADS * int8_tokens * (HEAD_DIM + 4) + ring_bytes + q.nbytes
    return providers, kernel_alone, kernel_bytes_read, cache_bytes, notes


def memory_by_context(dtype, device):
    """Bytes per sequence of one layer, Int8KVLayer (shipped, and int8 only) vs bf16 DynamicLayer,
    after a prefill of each context in GPU_CONTEXTS: the ratio does not depend on the batch, but on
    the context, since the exact ring is a fixed number of tokens."""
    table = []
    for context in GPU_CONTEXTS:
        keys = torch.randn(1, NUM_KV_HEADS, context, HEAD_DIM, device=device, dtype=dtype)
        shipped, int8_only, dynamic = Int8KVLayer(), Int8KVLayer(residual_length=0), DynamicLayer()
        for layer in (shipped, int8_only, dynamic):
            layer.update(keys, keys)
        dynamic_bytes = dynamic.keys.nbytes + dynamic.values.nbytes
        table.append(dict(context=context, ours_bytes=shipped.nbytes(), int8_only_bytes=int8_only.nbytes(),
                          dynamic_bytes=dynamic_bytes, ours_over_dynamic=shipped.nbytes() / dynamic_bytes,
                          int8_only_over_dynamic=int8_only.nbytes() / dynamic_bytes))
    return table


def _quantized_bytes(layer):
    """Bytes of every tensor a quantized layer holds (quantized states, scales, residual)."""
    total = 0
    for value in layer.__dict__.values():
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.nbytes
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif hasattr(item, "__dict__") and not isinstance(item, (type, torch.nn.Module)):
                stack.extend(v for v in vars(item).values() if isinstance(v, (torch.Tensor, tuple, list)))
    return total


def step_extra_memory_mb(step):
    """Memory one step allocates beyond what was allocated before it (GPU), in MiB."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def fits(batch, context, dtype, device):
    """Whether every provider's state and one step's temporaries fit comfortably (half the GPU's memory)."""
    if device != "cuda":
        return True
    bf16_cache = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * torch.finfo(dtype).bits // 8
    # keys/values + our int8 (~0.5) + fp8 (0.5) + a step's cat copy (1) + a dequantized copy (1) + slack
    return 4.5 * bf16_cache < 0.5 * torch.cuda.get_device_properties(0).total_memory


def run(args, device, dtype, shapes, memory, backends):
    timer = make_timer(device, args.cpu_repeats)
    bandwidth = measure_copy_bandwidth(timer) if device == "cuda" else None
    if bandwidth:
        print(f"measured HBM bandwidth (1 GiB device-to-device copy): {bandwidth:.0f} GB/s")
    rows = []
    for batch, context in tqdm(shapes, desc="kv cache decode step", unit="shape"):
        row = dict(batch=batch, context=context, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                   dtype=str(dtype).replace("torch.", ""))
        if not fits(batch, context, dtype, device):
            row["status"] = "skipped: would not fit comfortably in half the GPU's memory"
            rows.append(row)
            continue
        providers, kernel_alone, kernel_bytes, cache_bytes, notes = build_providers(
            batch, context, dtype, device, backends)
        row.update(status="ok", notes=notes)
        for name, step in providers.items():
            if isinstance(step, str):
                row[f"{name}_status"] = step
                continue
            row[f"{name}_ms"] = timer(step)
            row[f"{name}_bytes"] = cache_bytes[name]
            if device == "cuda":
                row[f"{name}_step_extra_mb"] = step_extra_memory_mb(step)
        row["kernel_ms"] = timer(kernel_alone)
        row["kernel_bytes_read"] = kernel_bytes
        row["kernel_gb_per_s"] = kernel_bytes / row["kernel_ms"] / 1e6
        if bandwidth:
            row["kernel_bandwidth_fraction"] = row["kernel_gb_per_s"] / bandwidth
        row["ours_over_dynamic_time"] = row["ours_ms"] / row["dynamic_sdpa_ms"]
        row["ours_over_dynamic_bytes"] = row["ours_bytes"] / row["dynamic_sdpa_bytes"]
        for backend in backends:
            name = f"quantized_{backend}_sdpa"
            if f"{name}_ms" in row:
                row[f"{name}_over_ours_time"] = row[f"{name}_ms"] / row["ours_ms"]
                row[f"{name}_over_dynamic_bytes"] = row[f"{name}_bytes"] / row["dynamic_sdpa_bytes"]
        rows.append(row)
        del providers, kernel_alone
        if device == "cuda":
            torch.cuda.empty_cache()
        _write(args, device, rows, memory, bandwidth, backends)  # a run cut short by a time limit keeps its numbers
    return rows, bandwidth


def targets(rows, memory, device):
    """The acceptance targets: timing ones at batch 16 x 16k on GPU only; memory at 16k everywhere."""
    ok_rows = [r for r in rows if r["status"] == "ok"]
    result = []
    ratio = next(m["ours_over_dynamic"] for m in memory if m["context"] == TARGET_SHAPE[1])
    result.append(dict(target=f"memory ours / bf16 DynamicCache (context {TARGET_SHAPE[1]})", value=ratio,
                       limit=f"<= {MEMORY_RATIO_MAX}", result="pass" if ratio <= MEMORY_RATIO_MAX else "miss"))
    at = next((r for r in ok_rows if (r["batch"], r["context"]) == TARGET_SHAPE), None)
    checks = [
        ("ours / DynamicCache+SDPA time", "ours_over_dynamic_time", f"<= {OURS_OVER_DYNAMIC_MAX}",
         lambda v: v <= OURS_OVER_DYNAMIC_MAX),
        ("QuantizedCache(fp8)+SDPA / ours time", "quantized_fp8_sdpa_over_ours_time", f">= {QUANTIZED_OVER_OURS_MIN}",
         lambda v: v >= QUANTIZED_OVER_OURS_MIN),
        ("decode kernel / measured HBM bandwidth", "kernel_bandwidth_fraction", f">= {KERNEL_BANDWIDTH_FRACTION_MIN}",
         lambda v: v >= KERNEL_BANDWIDTH_FRACTION_MIN),
    ]
    where = f"batch {TARGET_SHAPE[0]}, context {TARGET_SHAPE[1]}"
    for label, key, limit, ok in checks:
        if device != "cuda":
            status, value = "not judged: CPU reference path", None
        elif at is None or key not in at:
            status, value = "not run", None
        else:
            value = at[key]
            status = "pass" if ok(value) else "miss"
        result.append(dict(target=f"{label} ({where})", value=value, limit=limit, result=status))
    return result


def _summary(rows, memory, device):
    summary = []
    for r in rows:
        if r["status"] != "ok":
            summary.append(dict(batch=r["batch"], context=r["context"], status=r["status"]))
            continue
        entry = dict(
            batch=r["batch"], context=r["context"], ours_ms=r["ours_ms"], dynamic_sdpa_ms=r["dynamic_sdpa_ms"],
            quantized_fp8_sdpa_ms=r.get("quantized_fp8_sdpa_ms"), ours_over_dynamic=r["ours_over_dynamic_time"],
            fp8_over_ours=r.get("quantized_fp8_sdpa_over_ours_time"), bytes_ratio=r["ours_over_dynamic_bytes"],
            kernel_gb_s=r["kernel_gb_per_s"],
        )  # fmt: skip
        if "kernel_bandwidth_fraction" in r:
            entry["kernel_bw_frac"] = r["kernel_bandwidth_fraction"]
        summary.append({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in entry.items()})
    for t in targets(rows, memory, device):
        summary.append(dict(target=t["target"], value=float(f"{t['value']:.4g}") if t["value"] is not None else None,
                            limit=t["limit"], result=t["result"]))
    return summary


def _stem(args, device):
    return os.path.join(args.out, f"kv_cache_{device}{'_quick' if args.quick else ''}")


def _environment(args, device):
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
               cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
               command="python bench/bench_kv_cache.py" + (" --quick" if args.quick else ""))
    env["triton"] = triton.__version__
    return env


def _write(args, device, rows, memory, bandwidth, backends):
    os.makedirs(args.out, exist_ok=True)
    probe = torch.zeros(1, dtype=torch.bfloat16, device=device)
    report = dict(
        environment=_environment(args, device),
        path="Triton kernels" if triton_runs_on(probe) else
             "CPU reference path, not the kernel: speed figures are for GPU (memory ratios hold anywhere)",
        timing=("triton.testing.do_bench median, ms" if device == "cuda" else
                f"time.perf_counter, best of {args.cpu_repeats} after one warm-up, ms"),
        step=("one layer's decode step: append one token per sequence to a cache of `context` tokens, then attend "
              "that token's queries over the context + 1 tokens; each step starts from the same state"),
        hbm_bandwidth_gb_per_s=bandwidth,
        hbm_bandwidth_measure="1 GiB device-to-device copy, 2 * bytes / time (do_bench median)" if bandwidth else None,
        quantized_backends=backends,
        quantized_backends_missing=[b for b in ("quanto", "hqq") if b not in backends],
        quantized_notes={b: QUANTIZED_NOTES[b] for b in backends},
        targets=targets(rows, memory, device),
        summary=_summary(rows, memory, device),
        memory_by_context=memory,
        memory_note=("bytes of one layer per sequence after a prefill of `context` tokens; ours holds int8 + float32 "
                     "scales for every token plus its exact ring of 32 tokens in the model's dtype"),
        rows=rows,
    )
    write_report(report, _stem(args, device), _chart)


def _chart(plt, ok, path, report):
    names = [n for n in ("ours", "dynamic_sdpa", "quantized_fp8_sdpa", "quantized_quanto_sdpa", "quantized_hqq_sdpa")
             if any(f"{n}_ms" in r for r in ok)]
    labels = [f"b{r['batch']}\n{r['context'] // 1024}k" for r in ok]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(ok) + 6), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ok))]
        ax_time.bar(xs, [r.get(f"{name}_ms", 0) for r in ok], width, label=name)
        ax_mem.bar(xs, [r.get(f"{name}_bytes", 0) / 2**20 for r in ok], width, label=name)
    ours_x = -(len(names) - 1) / 2 * width  # "ours" is the first bar of each group
    for j, r in enumerate(ok):
        ax_time.annotate(f"{r['ours_over_dynamic_time']:.2f}x", (j + ours_x, r["ours_ms"]), ha="center", va="bottom",
                         fontsize=7)
        ax_mem.annotate(f"{r['ours_over_dynamic_bytes']:.3f}x", (j + ours_x, r["ours_bytes"] / 2**20), ha="center",
                        va="bottom", fontsize=7)
    for ax in (ax_time, ax_mem):
        ax.set_xticks(range(len(ok)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax_time.set_ylabel("ms per decode step, one layer (log)")
    ax_time.set_title("decode step (x = ours / dynamic_sdpa)")
    ax_mem.set_ylabel("cache MiB, one layer (log)")
    ax_mem.set_title("cache memory (x = ours / bf16 dynamic)")
    title = (f"KV cache, {NUM_HEADS}/{NUM_KV_HEADS} heads, d{HEAD_DIM}, {ok[0]['dtype']}, "
             f"{report['environment']['device']}")  # fmt: skip
    if not report["path"].startswith("Triton"):
        title += "\nCPU reference path, not the kernel: speed figures are for GPU"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows, bandwidth, device, backends):
    names = ["ours", "dynamic_sdpa"] + [f"quantized_{b}_sdpa" for b in backends]
    header = (f"{'batch':>5} {'ctx':>6} " + " ".join(f"{n + ' ms':>24}" for n in names)
              + f" {'ours/dyn':>8} {'fp8/ours':>8} {'bytes o/d':>9} {'kern GB/s':>9}"
              + (f" {'bw frac':>7}" if bandwidth else ""))  # fmt: skip
    print(header)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['batch']:>5} {r['context']:>6} {r['status']}")
            continue
        cells = " ".join(f"{r.get(n + '_ms', float('nan')):>24.3f}" for n in names)
        fp8 = r.get("quantized_fp8_sdpa_over_ours_time", float("nan"))
        line = (f"{r['batch']:>5} {r['context']:>6} {cells} {r['ours_over_dynamic_time']:>8.3f} {fp8:>8.2f} "
                f"{r['ours_over_dynamic_bytes']:>9.3f} {r['kernel_gb_per_s']:>9.3g}")
        if bandwidth:
            line += f" {r['kernel_bandwidth_fraction']:>7.1%}"
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes, including batch 16 x 16k (GPU check)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="keys, values and queries (the DynamicCache's dtype)")
    parser.add_argument("--cpu-repeats", type=int, default=5, help="CPU timing: best of this many")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads on CPU (default 1: steady timings on a shared machine)")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = available_quantized_backends()
    if device == "cuda":
        shapes = QUICK_SHAPES if args.quick else [(b, c) for b in GPU_BATCHES for c in GPU_CONTEXTS]
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
        print("CPU reference path, not the kernel: speed figures are for GPU (memory ratios hold anywhere).")
    print(f"QuantizedCache backends here: {backends} (missing: "
          f"{[b for b in ('quanto', 'hqq') if b not in backends] or 'none'})")
    with torch.no_grad():
        memory = memory_by_context(dtype, device)
        rows, bandwidth = run(args, device, dtype, shapes, memory, backends)
    _write(args, device, rows, memory, bandwidth, backends)
    _print_table(rows, bandwidth, device, backends)
    print("memory ours / bf16 DynamicCache by context: "
          + ", ".join(f"{m['context']}: {m['ours_over_dynamic']:.3f} (int8 only {m['int8_only_over_dynamic']:.3f})"
                      for m in memory))
    for t in targets(rows, memory, device):
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['target']:62} {value:>8} {t['limit']:>7}  {t['result'].upper()}")
    print(f"wrote {_stem(args, device)}.json and .png")


if __name__ == "__main__":
    main()
