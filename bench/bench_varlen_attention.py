"""Benchmark varlen (packed) causal attention: ours vs per-document SDPA, SDPA with a block-diagonal
mask, FlexAttention with a document mask, and `torch.nn.attention.varlen.varlen_attn` where present.

Reports ms and TFLOP/s of useful work (only the visible query-key pairs: 4·pairs·head_dim·heads for
the forward, 2.5× that for the backward) for fwd, bwd and fwd+bwd, and the peak memory of one
fwd+bwd, for three document-length mixes: all short, long-tail, one long document per row. Writes
`varlen_attention_<device>[_quick].json` (a summary of fwd+bwd TFLOP/s and ours relative to each
provider, then every row) and a PNG chart beside it, under bench/results/ or `--out`.

On CPU the shapes shrink to a smoke test and our Triton kernel is skipped (it would run in the
interpreter); FlexAttention and varlen_attn report themselves unavailable where they are.

    python bench/bench_varlen_attention.py            # full run
    python bench/bench_varlen_attention.py --quick    # the GPU check script's run
"""

import argparse
import inspect
import itertools
import json
import os
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fused_train.ops.dispatch import triton_runs_on
from fused_train.ops.varlen_attention import varlen_attention

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import pyplot  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("fwd", "bwd", "fwd+bwd")


def document_lengths(mix, row_tokens, rows, rng):
    """Document lengths filling `rows` rows of `row_tokens` tokens each (documents never cross rows)."""
    lengths = []
    for _ in range(rows):
        left = row_tokens
        while left > 0:
            if mix == "all_short":
                length = rng.randint(64, 512)
            elif mix == "long_tail":
                length = int(min(row_tokens, max(16, rng.lognormvariate(5.5, 1.2))))
            else:  # one_long
                length = row_tokens
            length = min(length, left)
            lengths.append(length)
            left -= length
    return lengths


def visible_pairs(lengths):
    """Query-key pairs a causal mask lets through: sum of L(L+1)/2 over documents."""
    return sum(length * (length + 1) // 2 for length in lengths)


def _timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]

    return cpu_time


def make_providers(lengths, num_heads, num_kv_heads, head_dim, device):
    """name -> forward(q, k, v) -> out [total, heads, head_dim], or a string saying why it is unavailable."""
    ends = list(itertools.accumulate(lengths))
    cu_seqlens = torch.tensor([0] + ends, dtype=torch.int32, device=device)
    total, max_len = sum(lengths), max(lengths)
    group = num_heads // num_kv_heads
    providers = {}

    probe = torch.empty(0, device=device, dtype=torch.bfloat16)
    if triton_runs_on(probe):
        # As patched models call it: offsets checked once per batch, not read back on every call.
        providers["ours"] = lambda q, k, v: varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True, check_cu_seqlens=False
        )
    else:
        providers["ours"] = "skipped: the Triton kernel would run in the interpreter on CPU"

    bounds = list(zip([0] + ends[:-1], ends))

    def sdpa_per_document(q, k, v):
        outs = []
        for start, end in bounds:
            q_doc, k_doc, v_doc = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(q_doc, k_doc, v_doc, is_causal=True, enable_gqa=group > 1)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    providers["sdpa_per_document"] = sdpa_per_document

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    positions = torch.arange(total, device=device)
    if total <= 8192:
        block_diagonal = (document[:, None] == document[None, :]) & (positions[:, None] >= positions[None, :])

        def sdpa_block_diagonal_mask(q, k, v):
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=block_diagonal, enable_gqa=group > 1,
            )
            return out[0].transpose(0, 1)

        providers["sdpa_block_diagonal_mask"] = sdpa_block_diagonal_mask
    else:
        providers["sdpa_block_diagonal_mask"] = f"skipped: a {total}x{total} mask"

    providers["flex_document_mask"] = _flex_provider(document, total, group, device)
    providers["varlen_attn"] = _varlen_attn_provider(cu_seqlens, max_len, group, device)
    return providers


def _flex_provider(document, total, group, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return f"unavailable: {error}"
    if device != "cuda":
        return "skipped: FlexAttention has no CPU backward"

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    # The BlockMask is built once here; a training loop rebuilds it for every batch.
    block_mask = create_block_mask(document_causal, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention)

    def flex(q, k, v):
        out = compiled(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=block_mask, enable_gqa=group > 1,
        )
        return out[0].transpose(0, 1)

    return flex


def _varlen_attn_provider(cu_seqlens, max_len, group, device):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        return f"unavailable: {error}"
    if device != "cuda":
        return "skipped: varlen_attn is CUDA only"
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    gqa_native = "enable_gqa" in parameters

    def run(q, k, v):
        if group > 1 and not gqa_native:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        extra = {"enable_gqa": True} if group > 1 and gqa_native else {}
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal, **extra)

    return run


def measure(forward, q, k, v, timer, device):
    """ms for fwd, bwd, fwd+bwd and the peak MB of one fwd+bwd."""
    dout = torch.randn_like(q)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    # Warm-up outside the timings: Triton and torch.compile (FlexAttention) compile on first use.
    torch.autograd.grad(forward(*inputs), inputs, dout)
    out = forward(*inputs)
    times = {"fwd": timer(lambda: forward(*inputs))}
    times["bwd"] = timer(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    times["fwd+bwd"] = timer(lambda: torch.autograd.grad(forward(*inputs), inputs, dout))
    peak_mb = None
    if device == "cuda":
        del out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(forward(*inputs), inputs, dout)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return times, peak_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one head_dim, fewer tokens (the GPU check)")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and PNG")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dtype, num_heads, num_kv_heads = torch.bfloat16, 32, 8
        row_tokens, rows = 4096, (2 if args.quick else 4)
        head_dims = (128,) if args.quick else (64, 128)
    else:
        dtype, num_heads, num_kv_heads, row_tokens, rows, head_dims = torch.float32, 2, 1, 256, 2, (32,)
        print("CPU: smoke-test shapes (2 rows of 256 tokens, 2 heads); our Triton kernel is skipped.")
    rng = random.Random(0)
    mixes = ("all_short", "long_tail", "one_long")
    jobs = [(head_dim, mix) for head_dim in head_dims for mix in mixes]
    timer = _timer(device)
    results = []
    with tqdm(total=len(jobs) * 5, desc="varlen attention", unit="run") as bar:
        for head_dim, mix in jobs:
            lengths = document_lengths(mix, row_tokens, rows, rng)
            total = sum(lengths)
            generator = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(total, heads, head_dim, generator=generator).to(device, dtype)
                for heads in (num_heads, num_kv_heads, num_kv_heads)
            )
            fwd_flop = 4 * visible_pairs(lengths) * head_dim * num_heads
            flop = {"fwd": fwd_flop, "bwd": 2.5 * fwd_flop, "fwd+bwd": 3.5 * fwd_flop}
            for name, forward in make_providers(lengths, num_heads, num_kv_heads, head_dim, device).items():
                row = dict(provider=name, mix=mix, head_dim=head_dim, tokens=total, documents=len(lengths),
                           max_len=max(lengths), num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=str(dtype))
                if isinstance(forward, str):
                    row["status"] = forward
                else:
                    try:
                        times, peak_mb = measure(forward, q, k, v, timer, device)
                        row.update(status="ok", peak_mb=peak_mb)
                        for mode in MODES:
                            row[f"{mode}_ms"] = times[mode]
                            row[f"{mode}_tflops"] = flop[mode] / times[mode] / 1e9
                    except Exception as error:  # a baseline that fails on this shape is reported, not fatal
                        row["status"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
                results.append(row)
                bar.update()
            # Written after every mix, so a run cut short by a time limit still leaves its numbers.
            _write(results, device, args)
    _print_table(results)
    print(f"wrote varlen_attention_{device}{'_quick' if args.quick else ''}.json and .png under {args.out}")


def _print_table(results):
    header = f"{'provider':26} {'mix':10} {'d':>4} " + " ".join(f"{m + ' ms':>11} {m + ' TF/s':>13}" for m in MODES)
    print(header + f" {'peak MB':>8}")
    for row in results:
        if row["status"] != "ok":
            print(f"{row['provider']:26} {row['mix']:10} {row['head_dim']:>4} {row['status']}")
            continue
        cells = " ".join(f"{row[m + '_ms']:>11.3f} {row[m + '_tflops']:>13.3g}" for m in MODES)
        peak = f"{row['peak_mb']:>8.0f}" if row["peak_mb"] is not None else f"{'-':>8}"
        print(f"{row['provider']:26} {row['mix']:10} {row['head_dim']:>4} {cells} {peak}")


def _summary(results):
    """Per (head_dim, mix): fwd+bwd TFLOP/s of each provider that ran, and ours relative to each."""
    summary = []
    for head_dim, mix in sorted({(row["head_dim"], row["mix"]) for row in results}):
        ran = {r["provider"]: r["fwd+bwd_tflops"] for r in results
               if (r["head_dim"], r["mix"]) == (head_dim, mix) and r["status"] == "ok"}
        entry = dict(head_dim=head_dim, mix=mix, **{f"{name}_tflops": float(f"{v:.3g}") for name, v in ran.items()})
        if "ours" in ran:
            entry.update({f"ours_vs_{name}": round(ran["ours"] / v, 2) for name, v in ran.items() if name != "ours"})
        summary.append(entry)
    return summary


def _write(results, device, args):
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"varlen_attention_{device}{'_quick' if args.quick else ''}")
    environment = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        command="python bench/bench_varlen_attention.py" + (" --quick" if args.quick else ""),
    )
    try:
        import triton

        environment["triton"] = triton.__version__
    except ImportError:
        pass
    with open(stem + ".json", "w") as f:
        json.dump(dict(environment=environment, summary=_summary(results), results=results), f, indent=1)
    _chart(results, stem + ".png")


def _chart(results, path):
    plt = pyplot()

    ok = [row for row in results if row["status"] == "ok"]
    groups = sorted({(row["head_dim"], row["mix"]) for row in ok})
    providers = sorted({row["provider"] for row in ok})
    if not groups:
        return
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for index, provider in enumerate(providers):
        values = [
            next((r["fwd+bwd_tflops"] for r in ok if r["provider"] == provider and (r["head_dim"], r["mix"]) == group),
                 0.0)
            for group in groups
        ]
        ax.bar([g + index * width for g in range(len(groups))], values, width, label=provider)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{mix}\nd={head_dim}" for head_dim, mix in groups])
    ax.set_ylabel("fwd+bwd TFLOP/s (useful)")
    ax.set_title("Varlen causal attention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
