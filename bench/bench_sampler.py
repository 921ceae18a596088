"""Per-rank token balance of `PackedBatchSampler` vs the default distributed sampler, and a 2-rank gloo epoch.

Planned (no processes): the embedded docstrings corpus (`bench/demo.py`'s `load_documents`,
documents of at most 1024 tokens) dealt to 2, 8 and 64 ranks by
  default  `DistributedSampler` (shuffled) with 32 documents per rank per step, what the HF
           `Trainer` does with `per_device_train_batch_size=32`;
  packed   `PackedBatchSampler` with `tokens_per_step` = 32 x the mean document length (about the
           default's tokens per rank per step).
A step lasts as long as its slowest rank, so per step we take slowest / mean rank tokens, and
report its mean over the steps, its worst step, the time-weighted figure (sum over steps of the
slowest rank's tokens / sum of the mean rank's: the epoch's time over the time with no waiting)
and the epoch totals (slowest rank's tokens over the epoch / mean rank's), averaged over epochs.

`--gloo` also trains one epoch of the first `--documents` documents on 2 CPU processes (gloo, DDP,
the demo's tiny Llama patched by `fused_train.patch`, `PackedCollator(flatten=True)`, one thread
per rank) with each sampler, and reports the wall time per epoch and its ratio.

    python bench/bench_sampler.py                       # planned only: seconds
    python bench/bench_sampler.py --gloo                # + the 2-rank epochs: minutes of CPU
    python bench/bench_sampler.py --gloo --out bench/results   # update the committed figures
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MODEL, PAD_ID, load_documents, pyplot  # noqa: E402
from fused_train import PackedBatchSampler, PackedCollator  # noqa: E402

DOCS_PER_RANK = 32
MAX_DOC_TOKENS = 1024


def default_plan(num_documents: int, num_replicas: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Per step, per rank, the documents that DistributedSampler + batches of 32 give each rank."""
    ranks = []
    for rank in range(num_replicas):
        sampler = torch.utils.data.DistributedSampler(
            range(num_documents), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)
        ranks.append([indices[i : i + DOCS_PER_RANK] for i in range(0, len(indices), DOCS_PER_RANK)])
    return [list(step) for step in zip(*ranks)]


def balance(plan, lengths: np.ndarray) -> dict:
    loads = np.array([[lengths[batch].sum() for batch in step] for step in plan], dtype=np.float64)
    per_step = loads.max(axis=1) / loads.mean(axis=1)
    totals = loads.sum(axis=0)
    return {
        "steps": len(plan),
        "mean_step_slowest_over_mean": float(per_step.mean()),
        "worst_step_slowest_over_mean": float(per_step.max()),
        "time_weighted_slowest_over_mean": float(loads.max(axis=1).sum() / loads.mean(axis=1).sum()),
        "epoch_total_slowest_over_mean": float(totals.max() / totals.mean()),
    }


def mean_over_epochs(figures: list[dict]) -> dict:
    return {key: float(np.mean([f[key] for f in figures])) for key in figures[0]}


def planned(lengths: np.ndarray, world_sizes, epochs: int, tokens_per_step: int) -> dict:
    results = {}
    for num_replicas in world_sizes:
        default, packed = [], []
        for epoch in range(epochs):
            default.append(balance(default_plan(len(lengths), num_replicas, 0, epoch), lengths))
            sampler = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas)
            sampler.set_epoch(epoch)
            packed.append(balance(sampler.epoch_plan(), lengths))
        results[str(num_replicas)] = {"default": mean_over_epochs(default), "packed": mean_over_epochs(packed)}
    return results


def gloo_worker(rank: int, world_size: int, port: int, which: str, documents, tokens_per_step: int, queue) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import fused_train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, max_position_embeddings=max(MAX_DOC_TOKENS, tokens_per_step))
    model = fused_train.patch(LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train())
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dataset = [{"input_ids": doc} for doc in documents]
    if which == "default":
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=DOCS_PER_RANK, sampler=sampler,
            collate_fn=PackedCollator(MAX_DOC_TOKENS, pad_token_id=PAD_ID, flatten=True),
        )  # fmt: skip
    else:
        sampler = PackedBatchSampler([len(doc) for doc in documents], tokens_per_step)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler,
            collate_fn=PackedCollator(tokens_per_step, pad_token_id=PAD_ID, flatten=True),
        )  # fmt: skip
    step_tokens = []
    torch.distributed.barrier()
    start = time.perf_counter()
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens.append(int(batch["input_ids"].numel()))
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    queue.put({"rank": rank, "seconds": seconds, "step_tokens": step_tokens})
    torch.distributed.destroy_process_group()


def gloo_epoch(which: str, documents, tokens_per_step: int, port: int) -> dict:
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    torch.multiprocessing.start_processes(
        gloo_worker, args=(2, port, which, documents, tokens_per_step, queue), nprocs=2, start_method="spawn"
    )
    ranks = sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])
    loads = np.array([r["step_tokens"] for r in ranks], dtype=np.float64).T
    return {
        "epoch_seconds": max(r["seconds"] for r in ranks),
        "steps": len(loads),
        "tokens_per_rank": loads.sum(axis=0).astype(int).tolist(),
        "time_weighted_slowest_over_mean": float(loads.max(axis=1).sum() / loads.mean(axis=1).sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/local", help="folder of sampler_balance.json/.png")
    parser.add_argument("--epochs", type=int, default=5, help="epochs averaged in the planned figures")
    parser.add_argument("--gloo", action="store_true", help="also time one epoch on 2 gloo ranks per sampler")
    parser.add_argument("--documents", type=int, default=1024, help="documents of the gloo epoch (the corpus's first)")
    parser.add_argument("--quick", action="store_true", help="2 and 8 ranks, 1 epoch (smoke runs)")
    args = parser.parse_args(argv)

    documents, corpus = load_documents(MAX_DOC_TOKENS)
    lengths = np.array([len(doc) for doc in documents], dtype=np.int64)
    tokens_per_step = int(round(DOCS_PER_RANK * lengths.mean()))
    world_sizes = (2, 8) if args.quick else (2, 8, 64)
    report = {
        "corpus": corpus,
        "docs_per_rank_per_step_default": DOCS_PER_RANK,
        "tokens_per_step_packed": tokens_per_step,
        "epochs_averaged": 1 if args.quick else args.epochs,
        "planned": planned(lengths, world_sizes, 1 if args.quick else args.epochs, tokens_per_step),
    }
    print(f"{'ranks':>5} {'sampler':>8} {'steps':>6} {'mean step':>10} {'worst step':>11} {'time-weighted':>14} "
          f"{'epoch total':>12}")  # fmt: skip
    for ranks, figures in report["planned"].items():
        for which, f in figures.items():
            print(
                f"{ranks:>5} {which:>8} {f['steps']:>6.0f} {f['mean_step_slowest_over_mean']:>10.4f} "
                f"{f['worst_step_slowest_over_mean']:>11.4f} {f['time_weighted_slowest_over_mean']:>14.4f} "
                f"{f['epoch_total_slowest_over_mean']:>12.4f}"
            )
    if args.gloo:
        subset = documents[: args.documents]
        gloo = {"documents": len(subset), "tokens": sum(map(len, subset)), "threads_per_rank": 1}
        for port, which in enumerate(("default", "packed"), start=29561):
            gloo[which] = gloo_epoch(which, subset, tokens_per_step, port)
            print(
                f"gloo 2 ranks {which}: {gloo[which]['epoch_seconds']:.1f} s per epoch, {gloo[which]['steps']} steps, "
                f"slowest / mean rank tokens {gloo[which]['time_weighted_slowest_over_mean']:.3f} (time-weighted)",
                flush=True,
            )
        gloo["default_over_packed_epoch_seconds"] = gloo["default"]["epoch_seconds"] / gloo["packed"]["epoch_seconds"]
        print(f"default / packed epoch time: {gloo['default_over_packed_epoch_seconds']:.2f}x")
        report["gloo_2_ranks"] = gloo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_balance.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out / "sampler_balance.png")
    return 0


def chart(report: dict, path: Path) -> None:
    plt = pyplot()

    ranks = list(report["planned"])
    x = np.arange(len(ranks))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, which in ((-0.2, "default"), (0.2, "packed")):
        values = [report["planned"][r][which]["time_weighted_slowest_over_mean"] for r in ranks]
        bars = ax.bar(x + offset, values, 0.4, label=which)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, [f"{r} ranks" for r in ranks])
    ax.set_ylim(0.9, None)
    ax.set_ylabel("slowest rank / mean rank tokens")
    ax.set_title("Per-step token imbalance (time-weighted), docstrings corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
