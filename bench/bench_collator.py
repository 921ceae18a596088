"""Benchmark: training throughput of the collator layouts against transformers' flattening, per corpus.

The demo's tiny Llama (`bench/demo.py`'s MODEL, same seed for every provider) runs forward +
backward on the same batches of documents, laid out five ways:

  hf_flattening      transformers' `DataCollatorWithFlattening` (one row, position ids restarting
                     per document) with stock `sdpa`, unpatched: the anchor, one masked SDPA call
                     per layer over the whole row;
  padded             HF's dynamic padding (rows of the batch's longest document, attention_mask),
                     stock `sdpa`;
  packed             `PackedCollator(max_tokens)` as the README's quick start uses it (the default
                     layout: rows spread to the narrowest width in steps of 64) + `fused_train.patch`;
  packed_flatten     `PackedCollator(max_tokens, flatten=True)`: one row, no filler, patched;
  packed_fixed       `PackedCollator(max_tokens, pad_to_max_tokens=True)`: rows of max_tokens
                     (static shapes), patched.

Corpora (byte tokens, `bench/demo.py`'s `load_documents`; documents over max_tokens dropped, so
no layout cuts one and every provider computes the same loss):

  docstrings   the demo's stdlib docstrings, 16 per step (median 98 tokens);
  sentences    the demo's one-line sentences, 48 per step (median 63 tokens): many short documents;
  long         the docstrings of at least 384 tokens (3/8 of max_tokens), 6 per step: few long documents.

The providers take turns step by step (each sees the machine's other load alike); a step's time
is forward + backward (gradients zeroed after, untimed); batches are collated before the loop.
Per provider: the median over the timed steps of real tokens / s, and the median over steps of its
speed over hf_flattening's on the same batch. Losses must agree across providers (same batch, same
weights: only the order of float sums differs); the bench exits 1 when they do not.

    python bench/bench_collator.py                   # several minutes on CPU
    python bench/bench_collator.py --threads 1       # steadier on a machine that other jobs share
    python bench/bench_collator.py --quick           # tiny batches, a few steps (smoke runs)

Writes collator.json and collator.png under --out (default bench/results/local; bench/results
holds the committed figures).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, str(REPO))

from bench.common import MODEL, PAD_ID, collate_padded, cpu_model, load_documents, plan_batches, pyplot  # noqa: E402

PROVIDERS = ("hf_flattening", "padded", "packed", "packed_flatten", "packed_fixed")
ANCHOR = "hf_flattening"
# corpus: (documents per step, shortest document kept as a fraction of max_tokens)
CORPORA = {"docstrings": (16, 0.0), "sentences": (48, 0.0), "long": (6, 0.375)}
LOSS_TOLERANCE = 1e-4


def make_collator(provider: str, max_tokens: int):
    from transformers import DataCollatorWithFlattening

    import fused_train

    if provider == "padded":
        return collate_padded
    collator = {
        "hf_flattening": DataCollatorWithFlattening(return_tensors="pt"),
        "packed": fused_train.PackedCollator(max_tokens, pad_token_id=PAD_ID),
        "packed_flatten": fused_train.PackedCollator(max_tokens, pad_token_id=PAD_ID, flatten=True),
        "packed_fixed": fused_train.PackedCollator(max_tokens, pad_token_id=PAD_ID, pad_to_max_tokens=True),
    }[provider]
    return lambda documents: collator([{"input_ids": doc} for doc in documents])


def make_model(provider: str, max_tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fused_train

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, max_position_embeddings=max_tokens)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train()
    return fused_train.patch(model) if provider.startswith("packed") else model


def corpus_documents(name: str, max_tokens: int) -> list[list[int]]:
    source = "sentences" if name == "sentences" else "docstrings"
    documents, _ = load_documents(max_tokens, source)
    return [doc for doc in documents if len(doc) >= CORPORA[name][1] * max_tokens]


def run_corpus(name: str, args) -> dict:
    documents = corpus_documents(name, args.max_tokens)
    batch_size = args.batch_size or CORPORA[name][0]
    batches = [[documents[i] for i in batch] for batch in plan_batches(len(documents), batch_size, args.steps, 0)]
    real_tokens = [sum(map(len, batch)) for batch in batches]
    providers = {}
    for provider in PROVIDERS:
        collate = make_collator(provider, args.max_tokens)
        inputs = [collate(batch) for batch in batches]
        providers[provider] = dict(model=make_model(provider, args.max_tokens), inputs=inputs, seconds=[], losses=[])
    for step in range(args.steps):
        for provider, run in providers.items():
            start = time.perf_counter()
            loss = run["model"](**run["inputs"][step]).loss
            loss.backward()
            run["seconds"].append(time.perf_counter() - start)
            run["losses"].append(loss.item())
            run["model"].zero_grad(set_to_none=True)
    timed = range(args.warmup, args.steps)
    anchor = providers[ANCHOR]
    results = {}
    for provider, run in providers.items():
        processed = [batch["input_ids"].numel() for batch in run["inputs"]]
        results[provider] = {
            "real_tokens_per_s": statistics.median(real_tokens[i] / run["seconds"][i] for i in timed),
            "over_hf_flattening": statistics.median(anchor["seconds"][i] / run["seconds"][i] for i in timed),
            "processed_over_real_tokens": sum(processed) / sum(real_tokens),
            "shapes": [list(batch["input_ids"].shape) for batch in run["inputs"]],
            "step_seconds": run["seconds"],
            "losses": run["losses"],
            "max_abs_loss_diff_vs_hf_flattening": max(abs(a - b) for a, b in zip(run["losses"], anchor["losses"])),
        }
    return {
        "documents": len(documents),
        "batch_size": batch_size,
        "median_doc_tokens": statistics.median(map(len, documents)),
        "mean_real_tokens_per_step": statistics.mean(real_tokens),
        "providers": results,
    }


def plot(report: dict, path: Path) -> None:
    plt = pyplot()

    corpora = report["corpora"]
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], corpora.items()):
        results = entry["providers"]
        bars = ax.bar(PROVIDERS, [results[p]["real_tokens_per_s"] for p in PROVIDERS])
        for bar, provider in zip(bars, PROVIDERS):
            ratio = results[provider]["over_hf_flattening"]
            ax.annotate(
                f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
        ax.set_title(f"{name}: {entry['batch_size']} docs/step, median {entry['median_doc_tokens']:.0f} tokens")
        ax.set_ylabel("real tokens / s (forward + backward)")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"collator layouts vs hf_flattening (x), tiny Llama, {report['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 documents per step, 3 steps, max_tokens 256")
    parser.add_argument("--steps", type=int, help="steps per corpus (default 12, --quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2, --quick 1)")
    parser.add_argument("--batch-size", type=int, help="documents per step on every corpus (default: per corpus)")
    parser.add_argument("--max-tokens", type=int, help="PackedCollator(max_tokens); longer documents dropped (1024)")
    parser.add_argument("--corpus", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "local")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup = args.steps or 3, 1
        args.batch_size, args.max_tokens = args.batch_size or 3, args.max_tokens or 256
    args.steps, args.max_tokens = args.steps or 12, args.max_tokens or 1024
    if args.steps <= args.warmup:
        parser.error(f"--steps must exceed the {args.warmup} warm-up steps")

    load_before = os.getloadavg()[0]
    corpora = {name: run_corpus(name, args) for name in args.corpus}
    report = {
        "settings": {
            "steps": args.steps, "warmup_steps": args.warmup, "max_tokens": args.max_tokens,
            "timing": "forward + backward per step, providers in turn step by step; medians over the timed steps",
            "model": {"architecture": "LlamaForCausalLM", **MODEL},
        },
        "environment": {
            "device_name": f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads: {torch.get_num_threads()}",
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        },
        "corpora": corpora,
    }  # fmt: skip
    print(f"{'corpus':<11} " + " ".join(f"{p:>15}" for p in PROVIDERS) + "   (real tokens/s, x hf_flattening)")
    for name, entry in corpora.items():
        cells = [
            f"{r['real_tokens_per_s']:>7.0f} {r['over_hf_flattening']:>5.2f}x" for r in entry["providers"].values()
        ]
        print(f"{name:<11} " + " ".join(f"{cell:>15}" for cell in cells))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collator.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "collator.png")
    print(f"wrote {args.out / 'collator.json'} and {args.out / 'collator.png'}")
    worst = max(r["max_abs_loss_diff_vs_hf_flattening"] for e in corpora.values() for r in e["providers"].values())
    if worst > LOSS_TOLERANCE:
        print(f"FAIL: the providers' losses differ by up to {worst:.2e} (> {LOSS_TOLERANCE:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
