"""Fused linear cross-entropy vs HF's loss path vs Liger's vs a torch.compile'd chunked loss.

One loss step, forward and backward, from the final hidden states `x` `[T, H]` (requires grad)
and `lm_head.weight` `W` `[V, H]` (trainable, or frozen as under LoRA) to dx (and dW):
- `hf`: HF's path: `logits = x·Wᵀ`, upcast to float32, `F.cross_entropy` (ForCausalLMLoss after its shift);
- `fused`: `fused_train.linear_cross_entropy` (Triton on the GPU; its chunked reference on CPU);
- `liger`: `liger_kernel`'s `LigerFusedLinearCrossEntropyLoss` (the `bench` extra), skipped with the
  reason printed when it is not importable (or on CPU: it is Triton-only);
- `compiled_chunked`: chunks of 1024 tokens, each `x_c·Wᵀ` + cross-entropy under activation
  checkpointing (so no chunk's logits are saved), the whole loop under `torch.compile`.
Each provider runs in a fresh Python per shape, so that one's memory cannot count for another.
Peak memory is over what the inputs hold before the step: on the GPU `max_memory_allocated`, on a
CPU the peak resident set (VmHWM, reset just before the step through /proc/self/clear_refs)
against the resident set before the step, glibc told to map every block from 1 MB up (so freed
tensors leave the resident set). Reports ms
(median) and peak MB per provider, and each provider's ratio to `hf`; writes JSON and a PNG chart
under bench/results/.

    python bench/bench_linear_cross_entropy.py           # GPU: hidden 4096, vocab 32k/128k, 4k-32k tokens, bf16
    python bench/bench_linear_cross_entropy.py --quick   # GPU: the acceptance shape alone, 16k × 4096 × 128256
    python bench/bench_linear_cross_entropy.py           # CPU: 2048 tokens × 1024 × 32000, fp32, memory and time
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import pyplot  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = ("hf", "fused", "liger", "compiled_chunked")
CHUNK_TOKENS = 1024

# (tokens, hidden, vocab, dtype, weight trainable)
GPU_SHAPES = [
    (tokens, 4096, vocab, "bfloat16", trainable)
    for vocab in (32000, 128256)
    for tokens in (4096, 8192, 16384, 32768)
    for trainable in (True, False)
]
QUICK_SHAPES = [(16384, 4096, 128256, "bfloat16", True)]
CPU_SHAPES = [(2048, 1024, 32000, "float32", True), (2048, 1024, 32000, "float32", False)]


def _hf(x, weight, labels):
    return F.cross_entropy(F.linear(x, weight).float(), labels)


def _chunk_loss_sum(x, weight, labels):
    return F.cross_entropy(F.linear(x, weight).float(), labels, reduction="sum")


def _chunked(x, weight, labels):
    total = sum(
        torch.utils.checkpoint.checkpoint(_chunk_loss_sum, xc, weight, yc, use_reentrant=False)
        for xc, yc in zip(x.split(CHUNK_TOKENS), labels.split(CHUNK_TOKENS))
    )
    return total / (labels != -100).sum()


def _build(provider, device):
    """The loss function of `provider`, or a string saying why it cannot run here."""
    if provider == "hf":
        return _hf
    if provider == "fused":
        from fused_train import linear_cross_entropy

        return linear_cross_entropy
    if provider == "compiled_chunked":
        return torch.compile(_chunked)
    if device != "cuda":
        return "liger-kernel is Triton-only: no CPU path"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        return f"liger-kernel is not importable ({error}); pip install -e '.[bench]'"
    liger = LigerFusedLinearCrossEntropyLoss()
    return lambda x, weight, labels: liger(weight, x, labels)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _child(spec):
    """Run one provider at one shape; print `{ms, peak_mb}` or `{skipped}` as JSON."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loss_fn = _build(spec["provider"], device)
    if isinstance(loss_fn, str):
        return dict(skipped=loss_fn)
    tokens, hidden, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    dtype = getattr(torch, spec["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=generator).div_(hidden**0.5)
    weight.requires_grad_(spec["trainable"])
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    labels[::8] = -100
    leaves = [x, weight] if spec["trainable"] else [x]

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn(x, weight, labels).backward()

    step()  # first-call work (compilation, autotuning, thread pools) outside the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        repeats = 10
    else:
        for leaf in leaves:  # the gradients' memory counts in the step, as on the GPU
            leaf.grad = None
        before = _rss_bytes()
        _reset_peak_rss()
        step()
        peak_mb = (_peak_rss_bytes() - before) / 2**20
        repeats = 3
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return dict(ms=statistics.median(times), peak_mb=peak_mb)


def _run_child(spec, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    # glibc keeps freed blocks under its mmap threshold (up to 32 MB) in the heap, where the resident
    # set still counts them; from 1 MB up every block is mapped and unmapped, so RSS follows live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return dict(skipped=f"ran past {timeout} s")
    if done.returncode != 0:
        stderr = done.stderr.strip()
        return dict(skipped=f"failed: {stderr.splitlines()[-1] if stderr else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _chart(rows, path, device_name):
    plt = pyplot()

    labels = [f"{r['tokens']}×{r['hidden']}×{r['vocab']}\n{'W trained' if r['trainable'] else 'W frozen'}"
              for r in rows]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    width = 0.8 / len(PROVIDERS)
    for axis, key, title in ((axes[0], "peak_mb", "peak memory of the loss step (MB)"), (axes[1], "ms", "ms, fwd+bwd")):
        for i, provider in enumerate(PROVIDERS):
            values = [r[provider].get(key, 0) for r in rows]
            axis.bar([j + i * width for j in range(len(rows))], values, width, label=provider)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
        axis.set_title(title)
    axes[0].legend()
    fig.suptitle(f"linear cross-entropy, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU: the acceptance shape alone")
    parser.add_argument("--out", default=None, help="JSON path (a PNG is written beside it)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per provider and shape")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    shapes = (QUICK_SHAPES if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    rows = []
    runs = [(shape, provider) for shape in shapes for provider in PROVIDERS]
    results = {}
    for (tokens, hidden, vocab, dtype, trainable), provider in tqdm(runs, desc="bench_linear_cross_entropy"):
        spec = dict(provider=provider, tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, trainable=trainable)
        results[(tokens, hidden, vocab, dtype, trainable, provider)] = _run_child(spec, args.timeout)
    for tokens, hidden, vocab, dtype, trainable in shapes:
        row = dict(tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, trainable=trainable)
        for provider in PROVIDERS:
            row[provider] = results[(tokens, hidden, vocab, dtype, trainable, provider)]
        hf = row["hf"]
        for provider in PROVIDERS[1:]:
            got = row[provider]
            if "ms" in got and "ms" in hf:
                got["peak_vs_hf"] = got["peak_mb"] / hf["peak_mb"]
                got["ms_vs_hf"] = got["ms"] / hf["ms"]
        if "ms" in row["liger"] and "ms" in row["fused"]:
            row["fused"]["peak_vs_liger"] = row["fused"]["peak_mb"] / row["liger"]["peak_mb"]
            row["fused"]["ms_vs_liger"] = row["fused"]["ms"] / row["liger"]["ms"]
        rows.append(row)
        cells = "  ".join(
            f"{p} {row[p]['ms']:.1f} ms {row[p]['peak_mb']:.0f} MB"
            if "ms" in row[p]
            else f"{p} skipped ({row[p]['skipped']})"
            for p in PROVIDERS
        )
        print(f"{tokens}×{hidden}×{vocab} {dtype} W {'trained' if trainable else 'frozen'}: {cells}")
    stem = args.out[: -len(".json")] if args.out else os.path.join(
        RESULTS, f"linear_cross_entropy_{'gpu' + ('_quick' if args.quick else '') if on_gpu else 'cpu'}"
    )  # fmt: skip
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, rows=rows), f, indent=1)
    _chart(rows, stem + ".png", device_name)
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
