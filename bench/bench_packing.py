"""Benchmark: the C++ packing planner against the pure-Python oracle, and its fill on the demo corpus.

Speed. Every provider plans the same 10^6 document lengths (seed 0) drawn lognormal with median
256 tokens and sigma 1 (mean ~420; short fine-tuning examples and a tail of long ones), rounded
and clipped to [1, 2 * max_tokens], max_tokens 4096, so ~0.3% of the documents are cut into
chunks. Four providers, called as users call them: the oracle (`bench/packing_oracle.py`) on a
Python list; the C++ planner through `fused_train.plan_packing_arrays` on an int64 numpy array
(the plan as two int64 arrays, `row_offsets` and `doc_ids`); through `fused_train.plan_packing`
(the plan as a list of lists of Python ints, built in C++ with the garbage collector paused); and,
for comparison, "C++ lists before": the way `plan_packing` built its lists until then, the
arrays, `tolist()`, sliced per row in Python. All plans must be equal.

Runs keep the garbage collector on, as in a user's process (this one has imported torch and
transformers, as fused_train does): what it costs while a provider builds its objects is the
provider's cost, and a run's clock stops only after one more container is allocated, so that a
collection the run's allocations left due is counted too. Only the plan of the run in progress
is alive; a full collection precedes each provider's turn, and the collections started during its
runs are counted. The providers take turns in every round, so that all see the same load on a
shared machine; each reports its best, median and worst run, wall clock (the headline) and the
thread's CPU time (on a machine shared with other jobs it leaves out the time the process waited
for a core).

Fill. Every document of the demo corpus (the standard library's docstrings, byte-level tokens:
len(utf-8 bytes) + 1 BOS, long ones cut into chunks) is packed at once at max_tokens 2048 and
1024: fill = real tokens / (rows * max_tokens). `ceil(tokens / max_tokens)` rows is the bound
no planner can beat.

    python bench/bench_packing.py          # 10^6 lengths, a minute or so on CPU
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
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, str(REPO))

from bench.common import pyplot  # noqa: E402
from bench.packing_oracle import plan_packing_python  # noqa: E402
from fused_train.training.packing import plan_packing, plan_packing_arrays  # noqa: E402

CORPUS = REPO / "bench" / "data" / "stdlib_docstrings.json.gz"
SPEED_MAX_TOKENS = 4096
FILL_MAX_TOKENS = (2048, 1024)
TARGET_SPEEDUP = 50
TARGET_FILL = 0.98


def synthetic_lengths(num_documents: int, max_tokens: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(mean=math.log(256), sigma=1.0, size=num_documents).round()
    return np.clip(lengths, 1, 2 * max_tokens).astype(np.int64)


def plan_packing_sliced(lengths, max_tokens: int) -> list[list[int]]:
    """How `plan_packing` built its lists before they were built in C++: the arrays, sliced in Python."""
    row_offsets, doc_ids = plan_packing_arrays(lengths, max_tokens)
    docs = doc_ids.tolist()
    offsets = row_offsets.tolist()
    return [docs[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def timed(plan) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one `plan()` call, garbage collector on; the plan is freed after."""
    start_wall, start_cpu = time.perf_counter(), time.thread_time()
    made = plan()
    # Allocating a container runs the collection the plan's allocations made due, if any, on the
    # clock; the plan itself is freed off the clock.
    [made]
    return time.perf_counter() - start_wall, time.thread_time() - start_cpu


PROVIDERS = {
    "python": "Python oracle",
    "cpp_arrays": "C++ arrays",
    "cpp_lists": "C++ lists",
    "cpp_lists_sliced": "C++ lists before",
}


def measure_speed(num_documents: int, rounds: int, cpp_runs_per_round: int) -> dict:
    lengths = synthetic_lengths(num_documents, SPEED_MAX_TOKENS)
    lengths_list = lengths.tolist()
    providers = {
        "python": (lambda: plan_packing_python(lengths_list, SPEED_MAX_TOKENS), 1),
        "cpp_arrays": (lambda: plan_packing_arrays(lengths, SPEED_MAX_TOKENS), cpp_runs_per_round),
        "cpp_lists": (lambda: plan_packing(lengths, SPEED_MAX_TOKENS), cpp_runs_per_round),
        "cpp_lists_sliced": (lambda: plan_packing_sliced(lengths, SPEED_MAX_TOKENS), cpp_runs_per_round),
    }
    num_rows = rows_checked_equal(providers)
    runs_s = {name: [] for name in providers}
    runs_cpu_s = {name: [] for name in providers}
    collections = {name: [0, 0, 0] for name in providers}  # started during its runs, per generation
    running = None

    def count_collection(phase, info):
        if phase == "start" and running is not None:
            collections[running][info["generation"]] += 1

    # Only the plan of the run in progress is alive, so every run sees the heap a user's process
    # has (this one imported torch and transformers), not one swollen by the other providers' plans.
    # A full collection before each provider's turn: its runs pay for no other provider's garbage
    # (the oracle's left full collections due), and for their own as a user's loop would.
    gc.callbacks.append(count_collection)
    total_runs = rounds * sum(runs for _, runs in providers.values())
    try:
        with tqdm(total=total_runs, desc=f"planning {num_documents:,} documents") as progress:
            for _ in range(rounds):
                for name, (plan, runs) in providers.items():
                    gc.collect()
                    for _ in range(runs):
                        running = name
                        seconds, cpu_seconds = timed(plan)
                        running = None
                        runs_s[name].append(seconds)
                        runs_cpu_s[name].append(cpu_seconds)
                        progress.update()
    finally:
        gc.callbacks.remove(count_collection)
    tokens = int(lengths.sum())
    speed = {
        "num_documents": num_documents,
        "documents_cut": int((lengths > SPEED_MAX_TOKENS).sum()),
        "max_tokens": SPEED_MAX_TOKENS,
        "lengths": "lognormal(median 256, sigma 1), rounded, clipped to [1, 2 * max_tokens], seed 0",
        "mean_length": tokens / num_documents,
        "rows": num_rows,
        "fill": tokens / (num_rows * SPEED_MAX_TOKENS),
        "rounds": rounds,
        "cpp_runs_per_round": cpp_runs_per_round,
        "gc_tracked_objects": len(gc.get_objects()),
    }
    for name in providers:
        speed[f"{name}_collections_per_run"] = [count / len(runs_s[name]) for count in collections[name]]
        speed[f"{name}_s"] = min(runs_s[name])
        speed[f"{name}_median_s"] = statistics.median(runs_s[name])
        speed[f"{name}_worst_s"] = max(runs_s[name])
        speed[f"{name}_cpu_s"] = min(runs_cpu_s[name])
    for form in ("arrays", "lists"):
        speed[f"speedup_{form}"] = speed["python_s"] / speed[f"cpp_{form}_s"]
        speed[f"speedup_{form}_cpu"] = speed["python_cpu_s"] / speed[f"cpp_{form}_cpu_s"]
    speed["runs_s"] = runs_s
    return speed


def rows_checked_equal(providers: dict) -> int:
    """The number of rows of the oracle's plan, after checking that every provider returns that plan."""
    rows = providers["python"][0]()
    row_offsets, doc_ids = providers["cpp_arrays"][0]()
    if (
        providers["cpp_lists"][0]() != rows
        or providers["cpp_lists_sliced"][0]() != rows
        or row_offsets.tolist() != np.cumsum([0] + [len(row) for row in rows]).tolist()
        or doc_ids.tolist() != [doc for row in rows for doc in row]
    ):
        raise RuntimeError("the C++ planner and the Python oracle returned different plans")
    return len(rows)


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
    plt = pyplot()

    fig, (ax_time, ax_fill) = plt.subplots(1, 2, figsize=(11, 4.5))
    times = [speed[f"{key}_s"] for key in PROVIDERS]
    worst = [speed[f"{key}_worst_s"] for key in PROVIDERS]
    ax_time.bar(
        [
            f"{name}\n{t * 1e3:.0f} ms\n{times[0] / t:.0f}x"
            for name, t in zip(PROVIDERS.values(), times)
        ],
        times,
        yerr=[[0] * len(times), [w - t for w, t in zip(worst, times)]],
        capsize=4,
        color=["tab:gray", "tab:green", "tab:olive", "tab:orange"],
    )
    medians = [speed[f"{key}_median_s"] for key in PROVIDERS]
    ax_time.plot(range(len(medians)), medians, "k_", markersize=24, label="median run")
    ax_time.legend(loc="upper right")
    ax_time.set_yscale("log")
    ax_time.set_ylim(min(times) / 5, max(worst) * 3)
    ax_time.set_ylabel("seconds (best run, line to the worst; log scale)")
    ax_time.set_title(
        f"planning {speed['num_documents']:,} documents, max_tokens {speed['max_tokens']}\n"
        f"speedup over the oracle (target {TARGET_SPEEDUP}x), garbage collector on"
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
    speed = measure_speed(10**5 if args.quick else 10**6, rounds=4, cpp_runs_per_round=5)
    fill = measure_fill()
    load_after = os.getloadavg()

    print(f"\nplanning {speed['num_documents']:,} documents ({speed['documents_cut']:,} cut), "
          f"max_tokens {speed['max_tokens']}: {speed['rows']:,} rows, fill {100 * speed['fill']:.2f}%")
    print(f"{'provider':<18}{'best ms':>9}{'median':>9}{'worst':>9}{'docs/s':>14}{'speedup':>9}"
          f"{'CPU ms':>9}{'speedup':>9}")
    for key, name in PROVIDERS.items():
        seconds, cpu_seconds = speed[f"{key}_s"], speed[f"{key}_cpu_s"]
        print(f"{name:<18}{1e3 * seconds:>9.1f}{1e3 * speed[f'{key}_median_s']:>9.1f}"
              f"{1e3 * speed[f'{key}_worst_s']:>9.1f}{speed['num_documents'] / seconds:>14,.0f}"
              f"{speed['python_s'] / seconds:>8.1f}x{1e3 * cpu_seconds:>9.1f}"
              f"{speed['python_cpu_s'] / cpu_seconds:>8.1f}x")  # fmt: skip
    print(f"best of {len(speed['runs_s']['python'])} runs (oracle), {len(speed['runs_s']['cpp_lists'])} (C++), "
          f"garbage collector on, {speed['gc_tracked_objects']:,} objects tracked")
    print("garbage collections per run, generations 0/1/2: " + ", ".join(
        f"{name} {'/'.join(f'{count:.1f}' for count in speed[f'{key}_collections_per_run'])}"
        for key, name in PROVIDERS.items()
    ))
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
    summary = [{"metric": f"{key}_ms", "value": round(1e3 * speed[f"{key}_s"], 1)} for key in PROVIDERS] + [
        {"metric": f"{key}_{stat}_ms", "value": round(1e3 * speed[f"{key}_{stat}_s"], 1)}
        for key in ("cpp_lists", "cpp_lists_sliced")
        for stat in ("median", "worst")
    ] + [
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
            "python": platform.python_version(),
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
