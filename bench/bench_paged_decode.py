"""Decode attention over a paged int8 KV cache vs the contiguous int8 kernel vs SDPA in the model dtype (bf16).

One decode step of one attention layer: one query token per sequence, every sequence holding
`context` tokens, Llama-3-8B's attention shapes (32 query heads, 8 kv heads, head_dim 128,
bfloat16 q on a GPU). Providers, on the same keys and values:

  paged_int8       `fused_train.ops.paged_kv.paged_decode_attention` over int8 pages of 16 tokens
                   (per-token float32 scales) handed out in shuffled order from one pool, as the
                   serving engine's allocator leaves them after requests come and go;
  paged_model      the same over pages in q's dtype (the engine's kv_dtype="model");
  contiguous_int8  `fused_train.ops.int8_kv.int8_decode_attention` over a contiguous int8 cache
                   [batch, kv heads, context, head_dim] (Int8KVCache's layout, without its ring);
  sdpa             `F.scaled_dot_product_attention(enable_gqa=True)` over a contiguous cache in
                   q's dtype (transformers' sdpa attention on a DynamicCache).

Also `write_int8`: `write_kv_pages` of the step's new token per sequence into the int8 pages.
Reports ms (GPU: triton.testing.do_bench median; CPU: best of a few runs), the bytes each provider
must read (K and V, their scales, the page table, q) and GB/s, against the H200's ~4.8 TB/s peak
and the device-to-device copy bandwidth measured in the same run. Writes
paged_decode_<device>[_quick].json and a PNG beside it under bench/results/ (or --out).

On CPU (no CUDA) the paged and contiguous providers run their PyTorch references (gather or
dequantize, then attention), not the kernels, at smaller shapes: speed figures are for GPU.

    python bench/bench_paged_decode.py            # GPU: batch {32, 64, 128, 256} x context {512, 2k, 8k}
    python bench/bench_paged_decode.py --quick    # GPU check, well under a minute
"""

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fused_train.kernels.int8_kv_quantize_ref import quantize_kv_ref
from fused_train.ops.dispatch import triton_runs_on
from fused_train.ops.int8_kv import int8_decode_attention

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import make_timer, measure_copy_bandwidth, write_report  # noqa: E402
from fused_train.ops.paged_kv import paged_decode_attention, write_kv_pages

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
H200_PEAK_GB_PER_S = 4800.0
GPU_SHAPES = [(batch, context) for batch in (32, 64, 128, 256) for context in (512, 2048, 8192)]
QUICK_SHAPES = [(32, 512), (32, 8192), (128, 2048), (256, 512), (256, 8192)]
CPU_SHAPES = [(4, 512), (32, 512), (4, 2048)]
CPU_QUICK_SHAPES = [(4, 512)]
PROVIDERS = ("paged_int8", "paged_model", "contiguous_int8", "sdpa")


def _to_pages(cache, order):
    """[batch, kv heads, context, ...] -> pool [batch * context / PAGE_SIZE, kv heads, PAGE_SIZE, ...]
    whose page `order[b * pages_per_seq + i]` holds tokens [i * PAGE_SIZE, (i + 1) * PAGE_SIZE) of b."""
    batch, kv_heads, context = cache.shape[:3]
    pages = cache.view(batch, kv_heads, context // PAGE_SIZE, PAGE_SIZE, *cache.shape[3:]).transpose(1, 2)
    pages = pages.reshape(-1, kv_heads, PAGE_SIZE, *cache.shape[3:])
    pool = torch.empty_like(pages)
    pool[order] = pages
    return pool


def build_case(batch, context, dtype, device):
    """Providers (name -> step), the bytes each must read, and the write step."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, NUM_KV_HEADS, context, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    values = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=generator, device=device, dtype=dtype)
    (k_data, k_scale), (v_data, v_scale) = quantize_kv_ref(keys), quantize_kv_ref(values)
    pages_per_seq = context // PAGE_SIZE
    order = torch.randperm(batch * pages_per_seq, generator=generator, device=device)
    page_table = order.view(batch, pages_per_seq).to(torch.int32)
    kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    k_pages, v_pages = _to_pages(k_data, order), _to_pages(v_data, order)
    k_scales, v_scales = _to_pages(k_scale, order), _to_pages(v_scale, order)
    k_model, v_model = _to_pages(keys, order), _to_pages(values, order)
    q_4d = q[:, :, None]

    providers = {
        "paged_int8": lambda: paged_decode_attention(q, k_pages, v_pages, page_table, kv_lens, k_scales=k_scales,
                                                     v_scales=v_scales),
        "paged_model": lambda: paged_decode_attention(q, k_model, v_model, page_table, kv_lens),
        "contiguous_int8": lambda: int8_decode_attention(q_4d, k_data, k_scale, v_data, v_scale, context),
        "sdpa": lambda: F.scaled_dot_product_attention(q_4d, keys, values, enable_gqa=True),
    }
    tokens = batch * NUM_KV_HEADS * context
    int8_bytes = 2 * tokens * (HEAD_DIM + 4)
    model_bytes = 2 * tokens * HEAD_DIM * keys.element_size()
    table_bytes = page_table.nbytes + kv_lens.nbytes
    bytes_read = {"paged_int8": int8_bytes + table_bytes + q.nbytes,
                  "paged_model": model_bytes + table_bytes + q.nbytes,
                  "contiguous_int8": int8_bytes + q.nbytes, "sdpa": model_bytes + q.nbytes}  # fmt: skip

    # The step's new tokens go to the slots just past each sequence's last page: a spare page each.
    spare = torch.zeros(batch, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, dtype=torch.int8, device=device)
    write_pool = [torch.cat([pool, spare]) for pool in (k_pages, v_pages)]
    write_scales = [torch.cat([s, spare[..., 0].float()]) for s in (k_scales, v_scales)]
    slots = (batch * pages_per_seq + torch.arange(batch, device=device)) * PAGE_SIZE
    new = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=generator, device=device, dtype=dtype)

    def write():
        write_kv_pages(new, new, *write_pool, slots, k_scales=write_scales[0], v_scales=write_scales[1])

    return providers, bytes_read, write


def fits(batch, context, dtype, device):
    """Whether every provider's cache and the quantization's float32 temporaries fit in half the GPU."""
    if device != "cuda":
        return True
    model_bytes = 2 * batch * NUM_KV_HEADS * context * HEAD_DIM * torch.finfo(dtype).bits // 8
    # keys/values, their paged copy, 2 int8 copies (~0.5 each), float32 quantization temporaries (2)
    return 5.5 * model_bytes < 0.5 * torch.cuda.get_device_properties(0).total_memory


def run(args, device, dtype, shapes):
    timer = make_timer(device, args.cpu_repeats)
    bandwidth = measure_copy_bandwidth(timer) if device == "cuda" else None
    if bandwidth:
        print(f"measured copy bandwidth (1 GiB device-to-device): {bandwidth:.0f} GB/s")
    rows = []
    for batch, context in tqdm(shapes, desc="paged decode", unit="shape"):
        row = dict(batch=batch, context=context, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                   page_size=PAGE_SIZE, dtype=str(dtype).replace("torch.", ""))
        if not fits(batch, context, dtype, device):
            rows.append(dict(row, status="skipped: would not fit comfortably in half the GPU's memory"))
            continue
        providers, bytes_read, write = build_case(batch, context, dtype, device)
        row["status"] = "ok"
        for name, step in providers.items():
            ms = timer(step)
            row[f"{name}_ms"] = ms
            row[f"{name}_bytes_read"] = bytes_read[name]
            row[f"{name}_gb_per_s"] = bytes_read[name] / ms / 1e6
            row[f"{name}_peak_fraction"] = row[f"{name}_gb_per_s"] / H200_PEAK_GB_PER_S
            if bandwidth:
                row[f"{name}_copy_bandwidth_fraction"] = row[f"{name}_gb_per_s"] / bandwidth
        row["write_int8_ms"] = timer(write)
        row["paged_over_contiguous_int8_time"] = row["paged_int8_ms"] / row["contiguous_int8_ms"]
        row["paged_int8_over_sdpa_time"] = row["paged_int8_ms"] / row["sdpa_ms"]
        rows.append(row)
        del providers, write
        if device == "cuda":
            torch.cuda.empty_cache()
        _write(args, device, rows, bandwidth)  # a run cut short by a time limit keeps its numbers
    return rows, bandwidth


def _stem(args, device):
    return os.path.join(args.out, f"paged_decode_{device}{'_quick' if args.quick else ''}")


def _write(args, device, rows, bandwidth):
    os.makedirs(args.out, exist_ok=True)
    probe = torch.zeros(1, dtype=torch.bfloat16, device=device)
    report = dict(
        environment=dict(torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
                         torch_threads=torch.get_num_threads(),
                         device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
                         command="python bench/bench_paged_decode.py" + (" --quick" if args.quick else "")),
        path="Triton kernels" if triton_runs_on(probe) else
             "CPU: PyTorch references (paged: gather + attention; contiguous: dequantize + attention), not the "
             "kernels: speed figures are for GPU",
        timing=("triton.testing.do_bench median, ms" if device == "cuda" else
                f"time.perf_counter, best of {args.cpu_repeats} after one warm-up, ms"),
        step="one layer's decode attention: one query per sequence over `context` tokens of each; write_int8 is "
             "write_kv_pages of one new token per sequence into the int8 pages",
        bytes_read="K and V (int8 + float32 scale per token and kv head, or q's dtype), the page table and kv_lens "
                   "(paged), q",
        h200_peak_gb_per_s=H200_PEAK_GB_PER_S,
        copy_bandwidth_gb_per_s=bandwidth,
        providers=list(PROVIDERS),
        rows=rows,
    )
    write_report(report, _stem(args, device), _chart)


def _chart(plt, ok, path, report):
    labels = [f"b{r['batch']}\n{r['context'] // 1024 or r['context']}{'k' if r['context'] >= 1024 else ''}" for r in ok]
    fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(ok) + 5), 4.5))
    width = 0.8 / len(PROVIDERS)
    for i, name in enumerate(PROVIDERS):
        xs = [x + (i - (len(PROVIDERS) - 1) / 2) * width for x in range(len(ok))]
        ax_time.bar(xs, [r[f"{name}_ms"] for r in ok], width, label=name)
        ax_bw.bar(xs, [r[f"{name}_gb_per_s"] for r in ok], width, label=name)
    for ax, title in ((ax_time, "ms per decode step (lower is better)"),
                      (ax_bw, "GB/s of bytes read (higher is better)")):  # fmt: skip
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    ax_time.set_yscale("log")
    if report["copy_bandwidth_gb_per_s"]:
        ax_bw.axhline(report["copy_bandwidth_gb_per_s"], color="gray", linestyle="--", label="measured copy")
    ax_time.legend(fontsize=7)
    fig.suptitle(f"paged decode attention, {ok[0]['dtype']}, {report['environment']['device']}; "
                 f"{NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, pages of {PAGE_SIZE}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (the GPU check)")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--cpu-repeats", type=int, default=5, help="CPU: timed runs per provider (the best is kept)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
        print("CPU: small shapes, float32; paged and contiguous providers run their PyTorch references.")
    with torch.inference_mode():
        rows, bandwidth = run(args, device, dtype, shapes)
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{name + ' ms':>18}" for name in PROVIDERS)
          + f" {'paged GB/s':>10} {'peak frac':>9} {'write ms':>8}")  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['batch']:>5} {r['context']:>7} {r['status']}")
            continue
        print(f"{r['batch']:>5} {r['context']:>7} " + " ".join(f"{r[f'{name}_ms']:>18.4f}" for name in PROVIDERS)
              + f" {r['paged_int8_gb_per_s']:>10.0f} {r['paged_int8_peak_fraction']:>9.3f} {r['write_int8_ms']:>8.4f}")
    print(f"wrote {_stem(args, device)}.json and .png")


if __name__ == "__main__":
    main()
