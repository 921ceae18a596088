"""`fused-train eval`: the quality of a model and each of its LoRA adapters through the `Engine`, and the gate.

Data: a JSONL file, one example per line, with these fields (no others):

    {"prompt": "The value of", "reference": " x is 3."}                          # perplexity, exact match, ROUGE-L
    {"prompt": "2 + 2 =", "choices": [" 3", " 4", " 5"], "answer": 1}            # choice accuracy
    {"prompt": "...", "reference": "...", "choices": [...], "answer": 0}          # both

`prompt` is a string (encoded with the tokenizer's special tokens, as the engine encodes a text
prompt); `reference` a non-empty string, the text that should follow the prompt; `choices` two or
more non-empty strings that could follow it, `answer` the index of the right one. A reference and
each choice are encoded alone (no special tokens) and appended to the prompt's ids, so a
continuation's tokens are the same whatever the prompt.

Metrics, each over the examples that have the fields it needs:

    perplexity       exp(mean negative log-likelihood of the reference tokens given the prompt),
                     the mean over all reference tokens of all examples (lower is better);
    exact_match      greedy generation from the prompt, as many tokens as the reference has (or
                     `max_tokens`), stopped at the end of sequence: the share of examples whose text,
                     stripped of surrounding whitespace, equals the stripped reference;
    rouge_l          the mean ROUGE-L F-measure (rouge-score's `rougeL`, its default tokenizer) of
                     the same generations against the references;
    choice_accuracy  the share of examples whose `answer` has the highest summed log-likelihood of
                     its tokens given the prompt (the first of equal ones; lm-eval's `acc`).

Log-likelihoods come from the engine's prompt logprobs (`SamplingParams(prompt_logprobs=0)`: a
prefill of prompt + continuation); generation is greedy. Every request of every model (the base
and each adapter) of a variant goes to the engine in one `Engine.generate`: the batches mix adapters.

Variants: the same model opened another way, one change each, an `Engine` apiece:

    full       the model's dtype everywhere: KV cache pages in the model's dtype, float base weights;
    kv_int8    int8 KV cache pages (the server's default);
    base_int8  base_int4: every linear layer of the decoder stored int8 / int4 (`quantize_base`).

The int8 KV cache holds the keys of earlier steps: a prefill within one step attends to its own
exact keys, so kv_int8 changes perplexity and choice accuracy only where a prompt is longer than
the engine's `max_batch_tokens` (prefilled in chunks); the generated metrics read it at every token.

Each row has one reference row: a variant's row is compared with the same model's in `full`; in
`full`, an adapter's row is compared with the base model's. The gate (`gate(results, percent)`)
fails a row that is worse than its reference by more than `percent` percent (relative) on any
metric, and one whose value is not finite.
"""

import json
import math
import os
from dataclasses import dataclass

BASE = "base"  # the base model's row: no adapter
REFERENCE_VARIANT = "full"
VARIANTS = {  # name -> open_engine options
    "full": dict(kv_dtype="model"),
    "kv_int8": dict(kv_dtype="int8"),
    "base_int8": dict(kv_dtype="model", quantize_base=8),
    "base_int4": dict(kv_dtype="model", quantize_base=4),
}
METRICS = ("perplexity", "exact_match", "rouge_l", "choice_accuracy")
LOWER_IS_BETTER = frozenset({"perplexity"})
FIELDS = ("prompt", "reference", "choices", "answer")


@dataclass(frozen=True)
class Example:
    line: int  # in the data file, from 1
    prompt: str
    reference: str | None = None
    choices: tuple[str, ...] | None = None
    answer: int | None = None


def load_examples(path) -> list[Example]:
    """The examples of the JSONL file at `path` (blank lines skipped); ValueError naming the line and
    the field of the first bad one."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise ValueError(f"data file {path!r}: {error.strerror}") from error
    examples = []
    for number, text in enumerate(lines, 1):
        if text.strip():
            examples.append(_example(text, f"{path}:{number}", number))
    if not examples:
        raise ValueError(f"data file {path!r} holds no examples")
    return examples


def _example(text: str, where: str, number: int) -> Example:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where}: an example is a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; the fields are {', '.join(FIELDS)}")
    prompt, reference, choices, answer = (record.get(name) for name in FIELDS)
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' must be a string, got {prompt!r}")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ValueError(f"{where}: field 'reference' must be a non-empty string, got {reference!r}")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: field 'choices' must be a list of two or more non-empty strings, "
                             f"got {choices!r}")  # fmt: skip
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field 'answer' must be the index of the right choice, in [0, {len(choices)}), "
                             f"got {answer!r}")  # fmt: skip
        choices = tuple(choices)
    elif answer is not None:
        raise ValueError(f"{where}: field 'answer' needs field 'choices'")
    if reference is None and choices is None:
        raise ValueError(f"{where}: nothing to measure: give field 'reference', or 'choices' and 'answer'")
    return Example(number, prompt, reference, choices, answer)


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError("ROUGE-L needs rouge-score: pip install 'fused_train[eval]'") from error
    return rouge_scorer.RougeScorer(["rougeL"])


@dataclass
class _Request:
    model: str
    example: Example
    kind: str  # "reference" (its log-likelihood), "generation", or "choice"
    prompt_ids: list[int]
    continuation_ids: list[int]  # scored ("reference", "choice") or the reference ("generation")


def score(engine, examples, models, max_tokens: int | None = None, generate: bool = True) -> dict[str, dict]:
    """model -> metric -> value, for each of `models` (`BASE` or a loaded adapter's name) on
    `examples`, every request in one `engine.generate`; metrics without examples are left out.
    `max_tokens` None: each generation runs as many tokens as its reference has; `generate` False:
    no generations, so only the log-likelihood metrics (perplexity, choice accuracy)."""
    from fused_train.serving import SamplingParams

    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("evaluation needs the engine's tokenizer (texts in, texts out)")

    def continuation(text, example, field):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"line {example.line}: field {field!r} encodes to no tokens: {text!r}")
        return ids

    requests = []
    for example in examples:
        prompt_ids = list(tokenizer(example.prompt)["input_ids"])
        if not prompt_ids:
            raise ValueError(f"line {example.line}: field 'prompt' encodes to no tokens, so its continuation's "
                             "first token has no log-likelihood (the tokenizer adds no BOS)")  # fmt: skip
        reference_ids = None if example.reference is None else continuation(example.reference, example, "reference")
        choice_ids = [continuation(choice, example, "choices") for choice in example.choices or ()]
        for model in models:
            if reference_ids is not None:
                requests.append(_Request(model, example, "reference", prompt_ids, reference_ids))
                if generate:
                    requests.append(_Request(model, example, "generation", prompt_ids, reference_ids))
            # In the order of the choices: their log-likelihoods are collected in it.
            requests += [_Request(model, example, "choice", prompt_ids, ids) for ids in choice_ids]
    # Scoring a text: a prefill of prompt + text for its prompt logprobs, no token drawn.
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    params = [scoring if r.kind != "generation" else
              SamplingParams(max_tokens=max_tokens or len(r.continuation_ids), temperature=0) for r in requests]
    prompts = [r.prompt_ids + r.continuation_ids if r.kind != "generation" else r.prompt_ids for r in requests]
    adapters = [None if r.model == BASE else r.model for r in requests]
    for request, prompt, param in zip(requests, prompts, params):
        if engine.max_model_len is not None and len(prompt) + param.max_tokens > engine.max_model_len:
            raise ValueError(f"line {request.example.line}: its {request.kind} request takes "
                             f"{len(prompt) + param.max_tokens} tokens, more than the model's context length "
                             f"({engine.max_model_len})")  # fmt: skip
    outputs = engine.generate(prompts, params, adapters)

    scorer = _rouge_scorer() if any(r.kind == "generation" for r in requests) else None
    sums = {model: dict(nll=0.0, tokens=0, exact=0, rouge=0.0, generations=0, choices={}) for model in models}
    for request, output in zip(requests, outputs):
        if output.finish_reason == "error":
            raise RuntimeError(f"model {request.model!r}, line {request.example.line}: the engine failed the "
                               f"{request.kind} request: {output.error}")  # fmt: skip
        total = sums[request.model]
        if request.kind == "generation":
            reference = request.example.reference
            total["exact"] += output.text.strip() == reference.strip()
            total["rouge"] += scorer.score(reference, output.text)["rougeL"].fmeasure
            total["generations"] += 1
            continue
        scored = output.prompt_logprobs[len(request.prompt_ids):]
        loglikelihood = sum(logprob for logprob, _ in scored)
        if request.kind == "reference":
            total["nll"] -= loglikelihood
            total["tokens"] += len(scored)
        else:
            total["choices"].setdefault(request.example.line, []).append(loglikelihood)

    answers = {example.line: example.answer for example in examples if example.choices}
    results = {}
    for model, total in sums.items():
        metrics = {}
        if total["tokens"]:
            metrics["perplexity"] = math.exp(total["nll"] / total["tokens"])
        if total["generations"]:
            metrics["exact_match"] = total["exact"] / total["generations"]
            metrics["rouge_l"] = total["rouge"] / total["generations"]
        if answers:
            picked = {line: max(range(len(ll)), key=ll.__getitem__) for line, ll in total["choices"].items()}
            right = sum(picked[line] == answer for line, answer in answers.items())
            metrics["choice_accuracy"] = right / len(answers)
        results[model] = metrics
    return results


def evaluate(model_path, adapters: dict, examples, variants=(REFERENCE_VARIANT,), *, max_tokens=None, generate=True,
             device=None, dtype="auto", **engine_options) -> dict:  # fmt: skip
    """variant -> model -> metric -> value: `score` of the base model and every adapter (name ->
    peft adapter directory) under each variant of `VARIANTS`, each variant an engine of its own."""
    from fused_train.serving.loading import open_engine

    if BASE in adapters:
        raise ValueError(f"an adapter may not be named {BASE!r}: that is the base model's row")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the variants are {list(VARIANTS)}")
    # Every request is queued at once (one batched run); the server's default cap on waiting ones is lifted.
    requests = (1 + len(adapters)) * sum(2 * (e.reference is not None) + len(e.choices or ()) for e in examples)
    engine_options = dict(max_waiting=max(1024, requests), **engine_options)
    results = {}
    for variant in variants:
        engine = open_engine(model_path, adapters, device=device, dtype=dtype, max_loras=max(1, len(adapters)),
                             **VARIANTS[variant], **engine_options)  # fmt: skip
        try:
            results[variant] = score(engine, examples, [BASE, *adapters], max_tokens, generate)
        finally:
            engine.shutdown(drain=False)
    return results


def reference_of(variant: str, model: str) -> tuple[str, str] | None:
    """The (variant, model) row that the row of `model` under `variant` is compared with (module docstring)."""
    if variant != REFERENCE_VARIANT:
        return REFERENCE_VARIANT, model
    if model != BASE:
        return REFERENCE_VARIANT, BASE
    return None


def relative_change(value: float, reference: float) -> float | None:
    """value / reference - 1; None where the reference is 0 (or either is not finite)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return None
    return value / reference - 1


def comparisons(results: dict) -> list[dict]:
    """Every row's metrics against its reference row's: the change (relative) and the loss in
    percent (positive: worse, by each metric's direction)."""
    rows = []
    for variant, models in results.items():
        for model, metrics in models.items():
            reference = reference_of(variant, model)
            if reference is None or reference[0] not in results:
                continue
            for metric, value in metrics.items():
                reference_value = results[reference[0]][reference[1]][metric]
                change = relative_change(value, reference_value)
                loss = None if change is None else 100 * (change if metric in LOWER_IS_BETTER else -change)
                rows.append(dict(variant=variant, model=model, metric=metric, value=value, reference=list(reference),
                                 reference_value=reference_value, change=change, loss_percent=loss))  # fmt: skip
    return rows


def gate(results: dict, percent: float) -> list[str]:
    """What fails the gate: each row worse than its reference by more than `percent` percent on a
    metric, or with a value that is not finite (module docstring); empty when all pass."""
    failures = []
    for variant, models in results.items():
        for model, metrics in models.items():
            for metric, value in metrics.items():
                if not math.isfinite(value):
                    failures.append(f"{variant}/{model}: {metric} is {value}")
    for row in comparisons(results):
        if row["loss_percent"] is not None and row["loss_percent"] > percent:
            failures.append(
                f"{row['variant']}/{row['model']}: {row['metric']} {row['value']:.4g} is {row['loss_percent']:.1f}% "
                f"worse than {'/'.join(row['reference'])}'s {row['reference_value']:.4g} (more than {percent:g}%)"
            )
    return failures


def _metrics_present(results: dict) -> list[str]:
    """The metrics that some row of `results` has, in `METRICS` order."""
    return [m for m in METRICS if any(m in row for models in results.values() for row in models.values())]


def format_table(results: dict) -> str:
    """The results as a text table: a row per variant and model, each value with its change against
    the row's reference (`comparisons`; in the "vs" column: which)."""
    metrics = _metrics_present(results)
    compared = {(row["variant"], row["model"], row["metric"]): row for row in comparisons(results)}
    header = ["variant", "model", "vs", *metrics]
    lines = []
    for variant, models in results.items():
        for model, values in models.items():
            reference = reference_of(variant, model)
            cells = [variant, model, "/".join(reference) if reference and reference[0] in results else "-"]
            for metric in metrics:
                cell = f"{values[metric]:.4f}"
                row = compared.get((variant, model, metric))
                if row is not None:
                    cell += " (n/a)" if row["change"] is None else f" ({row['change']:+.1%})"
                cells.append(cell)
            lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])  # fmt: skip


def plot(results: dict, path) -> None:
    """A bar chart per metric: a group of bars per model, a bar per variant."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the chart needs matplotlib: pip install 'fused_train[eval]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics_present(results)
    models = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(results)
    for ax, metric in zip(axes[0], metrics):
        for i, (variant, rows) in enumerate(results.items()):
            ax.bar([j + (i - (len(results) - 1) / 2) * width for j in range(len(models))],
                   [rows[model][metric] for model in models], width, label=variant)  # fmt: skip
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(bottom=0)  # every metric is >= 0
        ax.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
