"""lm-evaluation-harness scores our server: the same tasks run by its `hf` model on the checkpoint (with
`peft=` for an adapter) and by its `local-completions` model against `fused-train serve`, side by side.

The tasks (bench/lm_eval_tasks/) are made from the embedded sentences corpus: `corpus_choice`, which of
four endings belongs to a sentence (multiple-choice log-likelihood: acc, acc_norm), and `corpus_next_word`,
the sentence's next word generated greedily (generate-until: exact_match). Both clients send the same
prompts token for token (the local tokenizer, BOS prepended): the hf model one at a time, the server four
at a time (its engine batches them as it likes). The server keeps its KV cache in the model's dtype
(`--kv-dtype int8` shows what int8 pages cost), so that its log-likelihoods are the model's own.

    python bench/eval_lm_harness.py                          # the tiny model (random init) and an adapter
    python bench/eval_lm_harness.py --model DIR --adapter NAME=DIR ...
    python bench/eval_lm_harness.py --write-data             # rebuild bench/lm_eval_tasks/corpus.jsonl

The same tasks from lm-eval's command line: `lm_eval --include_path bench/lm_eval_tasks --tasks
corpus_choice,corpus_next_word --model local-completions --model_args base_url=http://HOST:PORT/v1/completions,
model=NAME,tokenizer=MODEL_DIR,tokenizer_backend=huggingface,add_bos_token=True`.
"""

import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench.common import CORPORA, write_report  # noqa: E402

TASKS_DIR = os.path.join(REPO, "bench", "lm_eval_tasks")
TASKS = ("corpus_choice", "corpus_next_word")
METRICS = {"corpus_choice": ("acc", "acc_norm"), "corpus_next_word": ("exact_match",)}
NUM_DOCS = 16
NUM_CHOICES = 4
LOGLIKELIHOOD_TOLERANCE = 1e-3
SERVED_MODEL_NAME = "base"
CONCURRENT_REQUESTS = 4  # lm-eval's num_concurrent against the server


def corpus_documents(num_docs: int = NUM_DOCS, seed: int = 0) -> list[dict]:
    """`num_docs` sentences of the corpus (ASCII, 8 to 16 words, evenly spaced through it), each cut in half:
    `context` (the first half), `choices` (its true ending and those of the next three sentences, in an order
    drawn from `seed`), `label` (the true ending's index) and `next_word` (the ending's first word)."""
    with gzip.open(CORPORA["sentences"].path, "rt", encoding="utf-8") as f:
        sentences = [s for s in json.load(f) if s.isascii() and 8 <= len(s.split()) <= 16]
    chosen = sentences[:: len(sentences) // num_docs][:num_docs]
    halves = [(words[: len(words) // 2], words[len(words) // 2 :]) for words in (s.split() for s in chosen)]
    rng = random.Random(seed)
    documents = []
    for i, (context, ending) in enumerate(halves):
        choices = [" ".join(halves[(i + k) % num_docs][1]) for k in range(NUM_CHOICES)]
        order = rng.sample(range(NUM_CHOICES), NUM_CHOICES)
        documents.append({"context": " ".join(context), "choices": [choices[k] for k in order],
                          "label": order.index(0), "next_word": ending[0]})  # fmt: skip
    return documents


def write_data(path: str = os.path.join(TASKS_DIR, "corpus.jsonl")) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in corpus_documents())


def run_lm_eval(model: str, model_args: dict, tasks=TASKS, limit: int | None = None) -> dict:
    """lm_eval.simple_evaluate of `tasks` (the first `limit` documents) on `model` ("hf" or
    "local-completions"), every sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=1, limit=limit,
                                   task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
                                   log_samples=True, bootstrap_iters=0)  # fmt: skip


def evaluate_hf(model_dir: str, adapter_dir: str | None = None, **options) -> dict:
    """run_lm_eval's `options` with lm-eval's `hf` model on `model_dir` (float32, CPU), `peft=adapter_dir`."""
    model_args = dict(pretrained=model_dir, dtype="float32", device="cpu", add_bos_token=True)
    if adapter_dir is not None:
        model_args["peft"] = adapter_dir
    return run_lm_eval("hf", model_args, **options)


def evaluate_server(completions_url: str, model_name: str, tokenizer_dir: str, **options) -> dict:
    """run_lm_eval's `options` with lm-eval's `local-completions` model on a server's `model_name`."""
    # Token ids as prompts (tokenized_requests): the server scores exactly the tokens lm-eval split.
    model_args = dict(base_url=completions_url, model=model_name, tokenizer=tokenizer_dir,
                      tokenizer_backend="huggingface", tokenized_requests=True, add_bos_token=True,
                      num_concurrent=CONCURRENT_REQUESTS, max_retries=1)  # fmt: skip
    return run_lm_eval("local-completions", model_args, **options)


def compare(hf: dict, served: dict) -> dict:
    """Per task: each metric both ways, and the largest |log-likelihood difference| over every choice of every
    sample with how many of lm-eval's is_greedy flags differ, or how many greedy generations differ.
    Raises ValueError if the two runs sent different requests."""
    report = {}
    for task in TASKS:
        hf_samples = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        served_samples = sorted(served["samples"][task], key=lambda s: s["doc_id"])
        if [s["arguments"] for s in hf_samples] != [s["arguments"] for s in served_samples]:
            raise ValueError(f"{task}: the two runs sent different requests")
        entry = {metric: {"hf": hf["results"][task][f"{metric},none"],
                          "server": served["results"][task][f"{metric},none"]} for metric in METRICS[task]}  # fmt: skip
        entry["samples"] = len(hf_samples)
        if task == "corpus_choice":
            pairs = [(a[0], b[0]) for x, y in zip(hf_samples, served_samples) for a, b in zip(x["resps"], y["resps"])]
            entry["loglikelihoods"] = len(pairs)
            entry["max_abs_loglikelihood_diff"] = max(abs(float(a[0]) - float(b[0])) for a, b in pairs)
            entry["is_greedy_differing"] = sum(bool(a[1]) != bool(b[1]) for a, b in pairs)
        else:
            entry["generations_differing"] = sum(x["resps"] != y["resps"] for x, y in zip(hf_samples, served_samples))
        report[task] = entry
    return report


@contextlib.contextmanager
def serving(model_dir: str, adapters: dict[str, str], kv_dtype: str = "model"):
    """`fused-train serve`'s app over `model_dir` and `adapters` on 127.0.0.1 (a free port); yields its
    /v1/completions URL; stopped on exit."""
    from fused_train.serving.loading import open_engine
    from fused_train.serving.server import build_app, start_server

    engine = open_engine(model_dir, adapters, kv_dtype=kv_dtype, kv_cache_tokens=8192, max_batch_tokens=1024)
    try:
        app = build_app(engine, model_name=SERVED_MODEL_NAME, adapter_paths=adapters)
        with start_server(app) as server:
            yield f"{server.url}/v1/completions"
    finally:
        engine.shutdown(drain=False)


def compare_all(model_dir: str, adapters: dict[str, str], kv_dtype: str = "model") -> dict:
    """compare() for the base model and each adapter, against one server holding them all."""
    reports = {}
    with serving(model_dir, adapters, kv_dtype) as url:
        for name, adapter_dir in {SERVED_MODEL_NAME: None, **adapters}.items():
            reports[name] = compare(evaluate_hf(model_dir, adapter_dir), evaluate_server(url, name, model_dir))
    return reports


def rows_of(reports: dict) -> list[dict]:
    """One row per model, task and metric: both scores and the task's agreement figures."""
    rows = []
    for name, report in reports.items():
        for task, entry in report.items():
            agreement = {key: value for key, value in entry.items() if key not in METRICS[task]}
            for metric in METRICS[task]:
                rows.append({"model": name, "task": task, "metric": metric, **entry[metric], **agreement,
                             "status": "ok"})  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':>10} {'task':>17} {'metric':>11} {'hf':>7} {'server':>7}  agreement")
    for row in rows:
        if "max_abs_loglikelihood_diff" in row:
            agreement = f"max |Δ log-likelihood| {row['max_abs_loglikelihood_diff']:.1e} of {row['loglikelihoods']}"
        else:
            agreement = f"{row['generations_differing']} of {row['samples']} generations differ"
        print(f"{row['model']:>10} {row['task']:>17} {row['metric']:>11} {row['hf']:7.4f} {row['server']:7.4f}  "
              f"{agreement}")  # fmt: skip


def chart(plt, rows, path, report) -> None:
    labels = [f"{row['model']}\n{row['metric']}" for row in rows]
    figure, axes = plt.subplots(figsize=(max(6, len(labels)), 4))
    for offset, side, label in ((-0.2, "hf", "lm-eval hf (peft= for an adapter)"),
                                (0.2, "server", "lm-eval local-completions, fused-train serve")):  # fmt: skip
        axes.bar([i + offset for i in range(len(rows))], [row[side] for row in rows], width=0.4, label=label)
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel("score")
    worst = max(row.get("max_abs_loglikelihood_diff", 0.0) for row in rows)
    axes.set_title(f"lm-eval, corpus tasks: checkpoint vs server (KV {report['kv_dtype']}); "
                   f"max |Δ log-likelihood| {worst:.1e}", fontsize=10)  # fmt: skip
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: the tiny model, random init)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a peft adapter (many)")
    parser.add_argument("--kv-dtype", choices=["model", "int8"], default="model",
                        help="the server's KV cache (int8 moves the log-likelihoods off the checkpoint's)")
    parser.add_argument("--write-data", action="store_true", help="rebuild the tasks' corpus.jsonl and stop")
    parser.add_argument("--label", default="cpu", help="the results' file name: eval_lm_harness_LABEL.json")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    if args.write_data:
        write_data()
        return 0
    if not args.model and args.adapter:
        parser.error("--adapter needs --model (the tiny model comes with its own adapter)")
    with tempfile.TemporaryDirectory(prefix="eval_lm_harness_") as folder:
        if args.model:
            model_dir = args.model
            adapters = dict(spec.split("=", 1) for spec in args.adapter)
        else:
            from bench.tiny_serving import make_adapters, make_model_dir

            model_dir = make_model_dir(os.path.join(folder, "model"))
            adapters = make_adapters(model_dir, os.path.join(folder, "adapters"), {"adapter": 8})
        reports = compare_all(model_dir, adapters, args.kv_dtype)
    rows = rows_of(reports)
    print_table(rows)
    report = {"tasks": list(TASKS), "kv_dtype": args.kv_dtype, "tolerance": LOGLIKELIHOOD_TOLERANCE, "rows": rows}
    write_report(report, os.path.join(args.out, f"eval_lm_harness_{args.label}"), chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
