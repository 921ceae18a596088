"""Demo: a tiny Llama trained three ways on the same batches of short documents, on two corpora.

Both corpora are embedded in the package and tokenized by bytes: ids = [BOS=1] + [byte + 3 ...],
pad 0, vocabulary 259.

  docstrings  the Python standard library's docstrings (bench/data/stdlib_docstrings.json.gz),
              16 per step: 175 tokens on average (median 98) once those over 1024 are dropped;
  sentences   sentences of those docstrings, one line each (bench/data/stdlib_sentences.json.gz),
              48 per step, so that the packed row holds tens of documents: 77 tokens on average
              (median 63). Made from the docstrings corpus by `docstring_sentences` (prose
              paragraphs only, unwrapped, cut after . ! or ? before a capital; every third distinct
              sentence, to keep the file small); `write_sentences_corpus()` writes it again.

A step holds about 2,800 real tokens of docstrings or 3,700 of sentences. On each corpus every run
starts from the same random init (same seed), sees the same documents in the same batches and uses
the same optimizer:

  padded      HF's usual dynamic padding: rows right-padded to the batch's longest document,
              attention_mask, labels -100 on padding; stock `sdpa` attention.
  flattening  transformers' `DataCollatorWithFlattening` (one row, position ids restart per
              document) with stock `sdpa`: the anchor a user would otherwise pick.
  packed      `fused_train.PackedCollator(flatten=True)` + `fused_train.patch(model)`: one row,
              position ids restart per document, attention never crossing a document (on a CPU
              in the few SDPA calls that `fused_train.ops.varlen_attention_cpu`'s measured cost model picks).

All three compute the same loss, the mean over every document's next-token targets, so their
per-step losses must agree to float noise; the demo fails (exit status 1) when they do not. Each
run lives in its own process so that its peak memory is its own (on CPU: peak RSS), and the runs
of a corpus take turns step by step so that they share the machine's other load equally. Timing
covers forward + backward + optimizer step, after the warm-up steps; batches are collated before
the loop (collation time is reported apart).

    python bench/demo.py                        # CPU: several minutes; uses CUDA when present
    python bench/demo.py --quick                # a few steps (GPU check script, smoke runs)
    python bench/demo.py --out bench/results    # update the committed figures (default: bench/results/local/)
"""

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    CORPORA, LEARNING_RATE, MODEL, PAD_ID, REPO, collate_padded, cpu_model, load_documents, plan_batches, pyplot,
)  # fmt: skip

RUNS = ("padded", "flattening", "packed")
WARMUP_STEPS = 2
# Per-step losses of the three runs must agree within this (float32; the runs differ only in the
# order of floating-point sums, and that difference grows slowly through the optimizer steps:
# measured ~5e-6 after 60 steps; a document attending to another shows as ~1e-2 or more).
LOSS_TOLERANCE = 1e-4
def make_collator(run: str, max_doc_tokens: int):
    from transformers import DataCollatorWithFlattening

    import fused_train

    if run == "padded":
        return collate_padded
    # Both packers are handed unpadded examples; labels default to the input ids.
    if run == "flattening":
        flatten = DataCollatorWithFlattening(return_tensors="pt")
    else:
        # One row, like the anchor: no filler at all (the default rows leave a few percent,
        # bench/bench_collator.py compares the layouts). max_tokens is the longest document
        # allowed, so no document is split.
        flatten = fused_train.PackedCollator(max_tokens=max_doc_tokens, pad_token_id=PAD_ID, flatten=True)
    return lambda documents: flatten([{"input_ids": doc} for doc in documents])


def batch_size(corpus: str, args) -> int:
    return args.batch_size or CORPORA[corpus].batch_size


class Run:
    """One training run on one corpus: its model, optimizer, pre-collated batches and telemetry."""

    def __init__(self, name: str, corpus: str, args):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        import fused_train
        from fused_train.training.telemetry import TrainingTelemetry

        self.name = name
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        documents, _ = load_documents(args.max_doc_tokens, corpus)
        batches = plan_batches(len(documents), batch_size(corpus, args), args.steps, args.seed)

        torch.manual_seed(args.seed)
        config = LlamaConfig(**MODEL, max_position_embeddings=args.max_doc_tokens)
        self.model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device).train()
        if name == "packed":
            fused_train.patch(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)

        collate = make_collator(name, args.max_doc_tokens)
        start = time.perf_counter()
        inputs = [collate([documents[i] for i in batch]) for batch in batches]
        self.collate_seconds_per_step = (time.perf_counter() - start) / len(batches)
        self.inputs = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in inputs]
        self.real_tokens = [sum(len(documents[i]) for i in batch) for batch in batches]
        self.processed_tokens = [batch["input_ids"].numel() for batch in self.inputs]
        self.losses = []
        self.telemetry = TrainingTelemetry(device, warmup_steps=WARMUP_STEPS)

    def step(self, index: int) -> float:
        """Trains on batch `index`: forward, backward, optimizer step. Returns the loss."""
        with self.telemetry.step(real_tokens=self.real_tokens[index], processed_tokens=self.processed_tokens[index]):
            loss = self.model(**self.inputs[index]).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())
        return self.losses[-1]

    def summary(self) -> dict:
        return {
            "run": self.name,
            "losses": self.losses,
            "real_tokens": self.real_tokens,
            "processed_tokens": self.processed_tokens,
            "step_seconds": self.telemetry.step_seconds,
            "collate_seconds_per_step": self.collate_seconds_per_step,
            **self.telemetry.summary(),
        }


def serve(name: str, corpus: str, args, conn) -> None:
    """Worker process: builds `Run(name, corpus)`, then trains one step per index received until None."""
    run = Run(name, corpus, args)
    conn.send("ready")
    while (index := conn.recv()) is not None:
        conn.send(run.step(index))
    conn.send(run.summary())


class RunInSubprocess:
    """A `Run` in a fresh process of its own, so that its peak memory (RSS on CPU) is its own."""

    def __init__(self, name: str, corpus: str, args):
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve, args=(name, corpus, args, child_conn), daemon=True)
        self.process.start()

    def wait_ready(self) -> None:
        if self.conn.recv() != "ready":
            raise RuntimeError("demo worker failed to start")

    def step(self, index: int) -> float:
        self.conn.send(index)
        return self.conn.recv()

    def summary(self) -> dict:
        self.conn.send(None)
        result = self.conn.recv()
        self.process.join()
        return result


def train_all(args) -> dict:
    """Trains every run of every corpus: `{corpus: {run: summary}}`.

    All runs are built first (each in its own worker unless `--in-process`), so no run's set-up
    overlaps another's timed steps. Then, corpus by corpus, the three runs take turns step by step
    (run A step i, run B step i, ...): each gets the same share of whatever else the machine is
    doing, so the ratios between runs stay fair on a shared machine; a waiting worker sleeps on its
    pipe.
    """
    from tqdm import tqdm

    make = Run if args.in_process else RunInSubprocess
    runs = {corpus: {name: make(name, corpus, args) for name in RUNS} for corpus in args.corpus}
    if not args.in_process:
        for corpus_runs in runs.values():
            for run in corpus_runs.values():
                run.wait_ready()
    results = {}
    with tqdm(total=args.steps * len(RUNS) * len(runs), desc="training padded/flattening/packed in turn",
              unit="step") as bar:  # fmt: skip
        for corpus, corpus_runs in runs.items():
            for index in range(args.steps):
                for name, run in corpus_runs.items():
                    loss = run.step(index)
                    bar.set_postfix_str(f"{corpus} {name} loss {loss:.3f}")
                    bar.update()
            results[corpus] = {name: run.summary() for name, run in corpus_runs.items()}
    return results


def compare(results: dict) -> dict:
    """The ratios the demo claims, and how far apart the runs' losses are step by step."""
    padded, flattening, packed = (results[run] for run in RUNS)
    loss_diffs = {}
    for a, b in (("padded", "packed"), ("flattening", "packed"), ("padded", "flattening")):
        loss_diffs[f"{a}_vs_{b}"] = max(abs(x - y) for x, y in zip(results[a]["losses"], results[b]["losses"]))
    return {
        "packed_over_padded_tokens_per_s": packed["real_tokens_per_s"] / padded["real_tokens_per_s"],
        "padded_tokens_over_real_tokens": sum(padded["processed_tokens"]) / sum(padded["real_tokens"]),
        "packed_over_flattening_tokens_per_s": packed["real_tokens_per_s"] / flattening["real_tokens_per_s"],
        "max_abs_loss_diff": loss_diffs,
    }


def environment(args) -> dict:
    import torch
    import transformers

    if args.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        threads = args.threads or torch.get_num_threads()
        device_name = f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads: {threads}"
    return {
        "device": args.device,
        "device_name": device_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def print_report(report: dict, args) -> None:
    load = report["load_average_1min"]
    print(f"\nTimed: forward + backward + AdamW step, steps {WARMUP_STEPS + 1}..{args.steps} (warm-up excluded).")
    where = "all runs in one process, so not per run" if args.in_process else "one process per run"
    print(f"Memory: peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA; {where}; "
          "'+' is the growth during training.")  # fmt: skip
    print(f"Load average (1 min) before / after: {load['before']:.2f} / {load['after']:.2f}")
    for name, entry in report["corpora"].items():
        corpus, results = entry["corpus"], entry["runs"]
        print(
            f"\n{name}: {corpus['documents_kept']} of {corpus['documents_in_corpus']} {corpus['description']} "
            f"(documents over {corpus['max_doc_tokens']} tokens dropped, none truncated); "
            f"{args.steps} steps x {entry['batch_size']} documents."
        )
        header = (f"{'run':<11} {'real tok/s':>11} {'padding':>8} {'peak MiB':>9} {'(+ MiB)':>8} {'final loss':>11} "
                  f"{'collate ms':>11}")  # fmt: skip
        print(header)
        print("-" * len(header))
        for run in RUNS:
            r = results[run]
            growth = (r["peak_memory_bytes"] - r["memory_at_start_bytes"]) / 2**20
            print(
                f"{run:<11} {r['real_tokens_per_s']:>11.0f} {r['padding_fraction']:>8.1%} "
                f"{r['peak_memory_bytes'] / 2**20:>9.0f} {growth:>+8.0f} {r['losses'][-1]:>11.5f} "
                f"{r['collate_seconds_per_step'] * 1e3:>11.2f}"
            )
    print("\nclaims: packed / padded >= 2.5x, packed / flattening >= 1x, losses equal step by step")
    header = (
        f"{'corpus':<11} {'packed/padded':>14} {'padded/real tokens':>19} {'packed/flattening':>18} "
        f"{'max |loss diff|':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, entry in report["corpora"].items():
        c = entry["comparison"]
        print(
            f"{name:<11} {c['packed_over_padded_tokens_per_s']:>13.2f}x {c['padded_tokens_over_real_tokens']:>18.2f}x "
            f"{c['packed_over_flattening_tokens_per_s']:>17.2f}x {max(c['max_abs_loss_diff'].values()):>16.2e}"
        )


def plot(report: dict, path: Path, title: str) -> None:
    plt = pyplot()

    corpora = report["corpora"]
    fig, axes = plt.subplots(len(corpora), 2, figsize=(12, 4.5 * len(corpora)), squeeze=False)
    styles = {"padded": ("tab:red", "-", 5), "flattening": ("tab:blue", "--", 3), "packed": ("tab:green", ":", 2)}
    for (ax_loss, ax_speed), (name, entry) in zip(axes, corpora.items()):
        results, comparison = entry["runs"], entry["comparison"]
        for run in RUNS:
            r = results[run]
            seen, total = [], 0
            for tokens in r["real_tokens"]:
                total += tokens
                seen.append(total)
            color, style, width = styles[run]
            ax_loss.plot(seen, r["losses"], color=color, linestyle=style, linewidth=width, label=run)
        ax_loss.set_xlabel("real tokens seen")
        ax_loss.set_ylabel("training loss")
        diff = max(comparison["max_abs_loss_diff"].values())
        ax_loss.set_title(f"{name}: loss vs tokens (curves overlap: max |diff| {diff:.1e})")
        ax_loss.legend()
        speeds = [results[run]["real_tokens_per_s"] for run in RUNS]
        bars = ax_speed.bar(RUNS, speeds, color=[styles[run][0] for run in RUNS])
        for bar, run in zip(bars, RUNS):
            ratio = results[run]["real_tokens_per_s"] / results["padded"]["real_tokens_per_s"]
            ax_speed.annotate(
                f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
        # Packing only removes padding if it beats padded by at least padded tokens / real tokens.
        break_even = results["padded"]["real_tokens_per_s"] * comparison["padded_tokens_over_real_tokens"]
        ax_speed.axhline(break_even, color="gray", linestyle="--", linewidth=1)
        ax_speed.annotate(
            f"padded x {comparison['padded_tokens_over_real_tokens']:.2f} (padded / real tokens)",
            (-0.4, break_even),
            xytext=(0, 3),
            textcoords="offset points",
            color="gray",
        )
        ax_speed.set_ylim(0, 1.15 * max(break_even, *speeds))
        ax_speed.set_ylabel("real tokens / s (fwd + bwd + step)")
        ax_speed.set_title(f"{name}: throughput (x = vs padded)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (GPU check script, smoke runs)")
    parser.add_argument("--steps", type=int, help="training steps per corpus (default 60, --quick 8)")
    parser.add_argument(
        "--corpus", nargs="+", choices=list(CORPORA), default=list(CORPORA), help="corpora to train on (default: all)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="documents per step on every corpus (default: "
        + ", ".join(f"{c.batch_size} {c.name}" for c in CORPORA.values())
        + ")",
    )
    parser.add_argument("--max-doc-tokens", type=int, default=1024, help="drop documents longer than this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads per run (default: torch's choice, one per core)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "local",
        help="folder for demo.json and demo.png (default bench/results/local, not tracked by git; "
        "bench/results holds the committed figures)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="all runs in this process (quicker start for smoke tests; peak memory is then not per run)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 60
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    corpora = {name: load_documents(args.max_doc_tokens, name)[1] for name in args.corpus}
    load_before = os.getloadavg()[0]
    results = train_all(args)
    load_after = os.getloadavg()[0]

    settings = {
        "steps": args.steps,
        "max_doc_tokens": args.max_doc_tokens,
        "packed_collator": f"PackedCollator(max_tokens={args.max_doc_tokens}, flatten=True)",
        "seed": args.seed,
        "threads": args.threads,
        "warmup_steps": WARMUP_STEPS,
        "optimizer": f"AdamW(lr={LEARNING_RATE})",
        "model": {"architecture": "LlamaForCausalLM", **MODEL},
        "tokenizer": "bytes: [BOS=1] + [byte + 3], pad 0",
        "timing": "forward + backward + optimizer step; batches collated before the loop; runs take turns step by step",
        "in_process": args.in_process,
    }
    report = {
        "settings": settings,
        "environment": environment(args),
        "load_average_1min": {"before": load_before, "after": load_after},
        "corpora": {
            name: {
                "corpus": corpora[name],
                "batch_size": batch_size(name, args),
                "comparison": compare(results[name]),
                "runs": results[name],
            }
            for name in args.corpus
        },
    }
    print_report(report, args)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(report, indent=1))
    title = f"tiny Llama, {args.steps} steps per corpus, {report['environment']['device_name']}"
    plot(report, args.out / "demo.png", title)
    print(f"\nwrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")

    worst = max(max(e["comparison"]["max_abs_loss_diff"].values()) for e in report["corpora"].values())
    if worst > LOSS_TOLERANCE:
        print(f"FAIL: the runs' losses differ by up to {worst:.2e} (> {LOSS_TOLERANCE:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
