"""Benchmark: the C++ packing planner against the pure-Python oracle, and its fill on the demo corpus.

Speed. Both providers plan the same 10^6 document lengths (seed 0) drawn lognormal with median 256
tokens and sigma 1 (mean ~420; short fine-tuning examples and a tail of long ones), rounded and
clipped to [1, 2 * max_tokens], max_tokens 4096, so ~0.3% of the documents are cut into chunks.
Three providers, called as users call them: the oracle (`bench/packing_oracle.py`) on a Python
list; the C++ planner through `fused_train.packing.plan_packing_arrays` on an int64 numpy array
(the plan as two int64 arrays, `row_offsets` and `doc_ids`); and through
`fused_train.plan_packing` (the same, then turned into a list of lists of Python ints). Each
time is the best of several runs with the garbage collector off (as `timeit` does), the
providers taking turns in every round; all three plans must be equal. Wall-clock time is the
headline; the thread's CPU time is reported beside it, as on a machine shared with other jobs it
leaves out the time the process waited for a core.

Fill. Every document of the demo corpus (the standard library's docstrings, byte-level tokens:
len(utf-8 bytes) + 1 BOS, long ones cut into chunks) is packed at once at max_tokens 2048 and
1024: fill = real tokens / (rows * max_tokens). `ceil(tokens / max_tokens)` rows is the bound
no planner can beat.

    python bench/bench_packing.py          # 10^6 lengths, ~1 minute on CPU
    python bench/bench_packing.py --quick  # 10^5 lengths (GPU check script, smoke runs)

Writes packing.json (its "summary" holds the headline numbers as flat rows) and packing.png
under --out (default bench/results).
"""

import argparse
import gc
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.packing_oracle import plan_packing_python  # noqa: E402
from fused_train.packing import plan_packing, plan_packing_arrays  # noqa: E402

CORPUS = REPO / "fused_train" / "data" / "stdlib_docstrings.json.gz"
SPEED_MAX_TOKENS = 4096
FILL_MAX_TOKENS = (2048, 1024)
TARGET_SPEEDUP = 50
TARGET_FILL = 0.98


def synthetic_lengths(num_documents: int, max_tokens: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(mean=math.log(256), sigma=1.0, size=num_documents).round()
    return np.clip(lengths, 1, 2 * max_tokens).astype(np.int64)


def timed(plan) -> tuple[float, float, object]:
    """Wall-clock and CPU seconds of one `plan()` call, with the garbage collector off, and its plan."""
    gc.disable()
    try:
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        result = plan()
        return time.perf_counter() - start_wall, time.thread_time() - start_cpu, result
    finally:
        gc.enable()


def measure_speed(num_documents: int, rounds: int, cpp_runs_per_round: int) -> dict:
    lengths = synthetic_lengths(num_documents, SPEED_MAX_TOKENS)
    lengths_list = lengths.tolist()
    providers = {
        "python": (lambda: plan_packing_python(lengths_list, SPEED_MAX_TOKENS), 1),
        "cpp_arrays": (lambda: plan_packing_arrays(lengths, SPEED_MAX_TOKENS), cpp_runs_per_round),
        "cpp_lists": (lambda: plan_packing(lengths, SPEED_MAX_TOKENS), cpp_runs_per_round),
    }
    best = dict.fromkeys(providers, math.inf)
    best_cpu = dict.fromkeys(providers, math.inf)
    plans = {}
    # Every round runs every provider, so that all see the same load on a shared machine; the
    # previous plan is freed before each run, so that every run starts from the same memory.
    total_runs = rounds * sum(runs for _, runs in providers.values())
    with tqdm(total=total_runs, desc=f"planning {num_documents:,} documents") as progress:
        for _ in range(rounds):
            for name, (plan, runs) in providers.items():
                for _ in range(runs):
                    plans[name] = None
                    seconds, cpu_seconds, plans[name] = timed(plan)
                    best[name] = min(best[name], seconds)
                    best_cpu[name] = min(best_cpu[name], cpu_seconds)
                    progress.update()
    rows = plans["python"]
    row_offsets, doc_ids = plans["cpp_arrays"]
    if (
        plans["cpp_lists"] != rows
        or row_offsets.tolist() != np.cumsum([0] + [len(row) for row in rows]).tolist()
        or doc_ids.tolist() != [doc for row in rows for doc in row]
    ):
        raise RuntimeError("the C++ planner and the Python oracle returned different plans")
    tokens = int(lengths.sum())
    return {
        "num_documents": num_documents,
        "documents_cut": int((lengths > SPEED_MAX_TOKENS).sum()),
        "max_tokens": SPEED_MAX_TOKENS,
        "lengths": "lognormal(median 256, sigma 1), rounded, clipped to [1, 2 * max_tokens], seed 0",
        "mean_length": tokens / num_documents,
        "rows": len(rows),
        "fill": tokens / (len(rows) * SPEED_MAX_TOKENS),
        "python_s": best["python"],
        "cpp_arrays_s": best["cpp_arrays"],
        "cpp_lists_s": best["cpp_lists"],
        "python_cpu_s": best_cpu["python"],
        "cpp_arrays_cpu_s": best_cpu["cpp_arrays"],
        "cpp_lists_cpu_s": best_cpu["cpp_lists"],
        "rounds": rounds,
        "cpp_runs_per_round": cpp_runs_per_round,
        "speedup_arrays": best["python"] / best["cpp_arrays"],
        "speedup_lists": best["python"] / best["cpp_lists"],
        "speedup_arrays_cpu": best_cpu["python"] / best_cpu["cpp_arrays"],
        "speedup_lists_cpu": best_cpu["python"] / best_cpu["cpp_lists"],
    }


def measure_fill() -> list[dict]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lengths = [len(text.encode("utf-8")) + 1 for text in json.load(f)]
    tokens = sum(lengths)
    results = []
    for max_tokens in FILL_MAX_TOKENS:
        rows = plan_packing(lengths, max_tokens)
        results.append(
            {
                "max_tokens": max_tokens,
                "documents": len(lengths),
                "documents_cut": sum(length > max_tokens for length in lengths),
                "tokens": tokens,
                "rows": len(rows),
                "min_rows": math.ceil(tokens / max_tokens),
                "fill": tokens / (len(rows) * max_tokens),
            }
        )
    return results


def plot(speed: dict, fill: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_fill) = plt.subplots(1, 2, figsize=(10, 4))
    times = [speed["python_s"], speed["cpp_arrays_s"], speed["cpp_lists_s"]]
    bars = ax_time.bar(
        ["Python oracle", "C++ arrays", "C++ lists"], times, color=["tab:gray", "tab:green", "tab:olive"]
    )
    ax_time.bar_label(bars, labels=[f"{t * 1e3:.0f} ms ({times[0] / t:.0f}x)" for t in times])
    ax_time.set_yscale("log")
    ax_time.set_ylim(min(times) / 5, max(times) * 3)
    ax_time.set_ylabel("seconds (best run, log scale)")
    ax_time.set_title(
        f"planning {speed['num_documents']:,} documents, max_tokens {speed['max_tokens']}\n"
        f"speedup over the oracle (target {TARGET_SPEEDUP}x)"
    )
    labels = [f"max_tokens {entry['max_tokens']}" for entry in fill]
    bars = ax_fill.bar(labels, [100 * entry["fill"] for entry in fill], color="tab:blue")
    ax_fill.bar_label(bars, labels=[f"{100 * entry['fill']:.2f}%" for entry in fill])
    ax_fill.axhline(100 * TARGET_FILL, color="tab:red", linestyle="--", label=f"target {100 * TARGET_FILL:.0f}%")
    ax_fill.set_ylim(90, 100.5)
    ax_fill.set_ylabel("real tokens / (rows x max_tokens), %")
    ax_fill.set_title(f"fill on the demo corpus ({fill[0]['documents']:,} docstrings)")
    ax_fill.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^5 documents instead of 10^6")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for packing.json/.png")
    args = parser.parse_args()

    load_before = os.getloadavg()
    speed = measure_speed(10**5 if args.quick else 10**6, rounds=4, cpp_runs_per_round=3)
    fill = measure_fill()
    load_after = os.getloadavg()

    print(f"\nplanning {speed['num_documents']:,} documents ({speed['documents_cut']:,} cut), "
          f"max_tokens {speed['max_tokens']}: {speed['rows']:,} rows, fill {100 * speed['fill']:.2f}%")
    print(f"{'provider':<16}{'wall ms':>10}{'docs/s':>14}{'speedup':>10}{'CPU ms':>10}{'speedup':>10}")
    for name, key in (("Python oracle", "python"), ("C++ arrays", "cpp_arrays"), ("C++ lists", "cpp_lists")):
        seconds, cpu_seconds = speed[f"{key}_s"], speed[f"{key}_cpu_s"]
        print(f"{name:<16}{1e3 * seconds:>10.1f}{speed['num_documents'] / seconds:>14,.0f}"
              f"{speed['python_s'] / seconds:>9.1f}x{1e3 * cpu_seconds:>10.1f}"
              f"{speed['python_cpu_s'] / cpu_seconds:>9.1f}x")
    for form in ("arrays", "lists"):
        verdict = "meets" if speed[f"speedup_{form}"] >= TARGET_SPEEDUP else "MISSES"
        print(f"C++ {form}: {verdict} the {TARGET_SPEEDUP}x target (wall clock)")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs")

    print(f"\nfill on the demo corpus: {fill[0]['documents']:,} documents, {fill[0]['tokens']:,} tokens")
    print(f"{'max_tokens':>10}{'cut':>6}{'rows':>8}{'min rows':>10}{'fill':>9}")
    for entry in fill:
        print(f"{entry['max_tokens']:>10}{entry['documents_cut']:>6}{entry['rows']:>8}{entry['min_rows']:>10}"
              f"{100 * entry['fill']:>8.2f}%")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = [
        {"metric": "python_ms", "value": round(1e3 * speed["python_s"], 1)},
        {"metric": "cpp_arrays_ms", "value": round(1e3 * speed["cpp_arrays_s"], 1)},
        {"metric": "cpp_lists_ms", "value": round(1e3 * speed["cpp_lists_s"], 1)},
        {"metric": "speedup_arrays_vs_python", "value": round(speed["speedup_arrays"], 1), "target": TARGET_SPEEDUP},
        {"metric": "speedup_lists_vs_python", "value": round(speed["speedup_lists"], 1)},
        {"metric": "speedup_arrays_vs_python_cpu_time", "value": round(speed["speedup_arrays_cpu"], 1)},
    ] + [
        {"metric": f"fill_demo_corpus_{entry['max_tokens']}", "value": round(entry["fill"], 4), "target": TARGET_FILL}
        for entry in fill
    ]
    report = {
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        },
        "summary": summary,
        "speed": speed,
        "fill": fill,
    }
    (args.out / "packing.json").write_text(json.dumps(report, indent=1))
    plot(speed, fill, args.out / "packing.png")
    print(f"\nwrote {args.out / 'packing.json'} and {args.out / 'packing.png'}")


if __name__ == "__main__":
    main()
