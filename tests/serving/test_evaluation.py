"""`fused-train eval` (fused_train.evaluation): its data checks, its metrics against an unpatched
Hugging Face forward, its table and gate, and the command itself failing the gate on a broken adapter."""

import json
import math

import pytest
import torch
import transformers
from peft import PeftModel

from bench.tiny_serving import make_adapters
from fused_train import evaluation
from fused_train.cli import main
from fused_train.serving.loading import open_engine

PROMPTS = ["The value of", "Return the", "A string"]
CHOICES = [" x", " a list of items", " nothing at all here"]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('["a list"]', "an example is a JSON object"),
    ({"prompt": "p", "referense": "r"}, "unknown field(s) ['referense']"),
    ({"reference": "r"}, "field 'prompt' must be a string"),
    ({"prompt": "p", "reference": ""}, "field 'reference' must be a non-empty string"),
    ({"prompt": "p", "choices": ["only one"], "answer": 0}, "field 'choices' must be a list of two or more"),
    ({"prompt": "p", "choices": ["a", "b"]}, "field 'answer' must be the index of the right choice, in [0, 2)"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "field 'answer' must be the index"),
    ({"prompt": "p", "answer": 0}, "field 'answer' needs field 'choices'"),
    ({"prompt": "p"}, "nothing to measure"),
])  # fmt: skip
def test_a_bad_example_is_refused_naming_its_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "data.jsonl", [{"prompt": "fine", "reference": "ok"}, "", line])
    with pytest.raises(ValueError, match=r"data\.jsonl:3: ") as error:
        evaluation.load_examples(path)
    assert message in str(error.value)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no examples"):
        evaluation.load_examples(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="No such file"):
        evaluation.load_examples(tmp_path / "missing.jsonl")


def test_each_row_is_compared_with_its_reference_and_the_gate_reads_each_metrics_direction():
    results = {
        "full": {"base": dict(perplexity=10.0, exact_match=0.5), "good": dict(perplexity=10.2, exact_match=0.5),
                 "bad": dict(perplexity=9.0, exact_match=0.4)},
        "kv_int8": {"base": dict(perplexity=10.4, exact_match=0.5), "good": dict(perplexity=10.2, exact_match=0.0),
                    "bad": dict(perplexity=math.nan, exact_match=0.4)},
    }  # fmt: skip
    changes = {(r["variant"], r["model"], r["metric"]): r for r in evaluation.comparisons(results)}
    assert changes["full", "good", "perplexity"]["reference"] == ["full", "base"]
    assert changes["kv_int8", "good", "perplexity"]["reference"] == ["full", "good"]
    assert changes["full", "good", "perplexity"]["loss_percent"] == pytest.approx(2.0)  # higher perplexity: worse
    assert changes["full", "bad", "perplexity"]["loss_percent"] == pytest.approx(-10.0)
    assert changes["full", "bad", "exact_match"]["loss_percent"] == pytest.approx(20.0)  # lower match: worse
    assert ("full", "base", "perplexity") not in changes
    failures = evaluation.gate(results, 3.0)
    assert len(failures) == 4, failures
    assert failures[0] == "kv_int8/bad: perplexity is nan"
    assert [f.split(":")[0] for f in failures[1:]] == ["full/bad", "kv_int8/base", "kv_int8/good"]
    assert "20.0% worse than full/base's 0.5" in failures[1] and "4.0% worse" in failures[2]
    assert evaluation.gate(results, 100.0) == ["kv_int8/bad: perplexity is nan"]
    table = evaluation.format_table(results).splitlines()
    assert table[0].split() == ["variant", "model", "vs", "perplexity", "exact_match"]
    assert table[1].split() == ["full", "base", "-", "10.0000", "0.5000"]
    assert table[2].split() == ["full", "good", "full/base", "10.2000", "(+2.0%)", "0.5000", "(+0.0%)"]
    assert table[6].split() == ["kv_int8", "bad", "full/bad", "nan", "(n/a)", "0.4000", "(+0.0%)"]


def _hf_model(model_dir, adapter_dir=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def _loglikelihood(model, prompt_ids, continuation_ids):
    ids = torch.tensor([prompt_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def test_metrics_equal_an_unpatched_hf_forward(tiny_model_dir, tiny_adapters, reference_path):
    pytest.importorskip("rouge_score")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {evaluation.BASE: _hf_model(tiny_model_dir), "a": _hf_model(tiny_model_dir, tiny_adapters["a"])}
    # References: the base model's own greedy continuations (exact match 1 for it), then a fixed text.
    references = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = models[evaluation.BASE].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        references.append(tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True))
    examples = [evaluation.Example(i + 1, p, r, tuple(CHOICES), i) for i, (p, r) in enumerate(zip(PROMPTS, references))]
    examples.append(evaluation.Example(4, "Other", " fixed text"))
    engine = open_engine(tiny_model_dir, {"a": tiny_adapters["a"]}, kv_dtype="model", kv_cache_tokens=2048)
    try:
        results = evaluation.score(engine, examples, [evaluation.BASE, "a"], max_tokens=6)
    finally:
        engine.shutdown(drain=False)
    for name, model in models.items():
        nll = tokens = 0
        right = 0
        for example in examples:
            prompt_ids = tokenizer(example.prompt).input_ids
            reference_ids = tokenizer(example.reference, add_special_tokens=False).input_ids
            nll -= _loglikelihood(model, prompt_ids, reference_ids)
            tokens += len(reference_ids)
            if example.choices:
                scores = [_loglikelihood(model, prompt_ids, tokenizer(c, add_special_tokens=False).input_ids)
                          for c in example.choices]  # fmt: skip
                right += scores.index(max(scores)) == example.answer
        assert results[name]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4), name
        assert results[name]["choice_accuracy"] == right / 3, name
    assert results[evaluation.BASE]["exact_match"] == 3 / 4  # its own continuations, not the fixed text
    assert 0 <= results["a"]["rouge_l"] <= 1 and results["a"]["exact_match"] < 3 / 4


def _greedy_texts(model_dir, prompts, max_new_tokens):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = _hf_model(model_dir)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        texts.append(tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_eval_command_prints_the_table_and_fails_the_gate_on_a_broken_adapter(tiny_model_dir, tmp_path, capsys,
                                                                              reference_path):  # fmt: skip
    pytest.importorskip("rouge_score")
    pytest.importorskip("matplotlib")
    # Three adapters that change the model a little, and one whose LoRA B is 1,000x theirs.
    good = make_adapters(tiny_model_dir, tmp_path / "adapters", {"files": 4, "strings": 8, "numbers": 4}, scale=0.001)
    broken = make_adapters(tiny_model_dir, tmp_path / "broken", {"broken": 8}, scale=1.0)
    # References: the base model's greedy continuations (its exact match is 1); the right choice is
    # the shortest (a random model's summed log-likelihood favours it).
    references = _greedy_texts(tiny_model_dir, PROMPTS, 8)
    data = _write(tmp_path / "data.jsonl", [
        dict(prompt=prompt, reference=reference, choices=CHOICES[::-1], answer=2)
        for prompt, reference in zip(PROMPTS, references)
    ])  # fmt: skip
    command = ["eval", "--model", tiny_model_dir, "--data", data, "--fail-if-worse", "10", "--max-tokens", "8",
               "--kv-dtype", "int8", *[f"--adapter={name}={path}" for name, path in good.items()]]  # fmt: skip

    assert main([*command, "--out", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["variant", "model", "vs", "perplexity", "exact_match", "rouge_l",
                                           "choice_accuracy"]  # fmt: skip
    assert [line.split()[:3] for line in out.splitlines()[1:9]] == [
        ["full", "base", "-"], ["full", "files", "full/base"], ["full", "strings", "full/base"],
        ["full", "numbers", "full/base"], ["kv_int8", "base", "full/base"], ["kv_int8", "files", "full/files"],
        ["kv_int8", "strings", "full/strings"], ["kv_int8", "numbers", "full/numbers"],
    ]  # fmt: skip
    assert "every row within 10% of its reference" in out
    report = json.loads((tmp_path / "good" / "eval.json").read_text())
    assert report["results"]["full"]["base"]["exact_match"] == 1

    assert main([*command, f"--adapter=broken={broken['broken']}", "--out", str(tmp_path / "broken_run")]) == 1
    failures = [line for line in capsys.readouterr().err.splitlines() if "FAIL" in line]
    assert failures and all("/broken: " in line for line in failures), failures
    report = json.loads((tmp_path / "broken_run" / "eval.json").read_text())
    assert report["gate"]["failures"] and set(report["results"]) == {"full", "kv_int8"}
    assert report["results"]["full"]["broken"]["exact_match"] < 0.5
    assert (tmp_path / "broken_run" / "eval.png").stat().st_size > 0


def test_eval_command_refuses_bad_options(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "data.jsonl", [{"prompt": "p", "reference": "r"}])
    with pytest.raises(SystemExit, match="fused-train eval: an adapter may not be named 'base'"):
        main(["eval", "--model", tiny_model_dir, "--data", data, "--adapter", f"base={tmp_path}"])
    with pytest.raises(SystemExit, match="--fail-if-worse must be a percentage >= 0"):
        main(["eval", "--model", tiny_model_dir, "--data", data, "--fail-if-worse", "-1"])
    with pytest.raises(SystemExit, match=r"fused-train eval: .*data\.jsonl:1: field 'prompt'"):
        main(["eval", "--model", tiny_model_dir, "--data", _write(tmp_path / "data.jsonl", [{"reference": "r"}])])


def test_evaluate_queues_more_requests_than_a_servers_waiting_cap(tiny_model_dir, reference_path):
    # 345 examples x (a reference + 2 choices): 1,035 requests at once, beyond the Engine's default max_waiting.
    examples = [evaluation.Example(i + 1, "a", "b", ("c", "dd"), 0) for i in range(345)]
    results = evaluation.evaluate(tiny_model_dir, {}, examples, generate=False, kv_cache_tokens=4096)
    assert set(results["full"][evaluation.BASE]) == {"perplexity", "choice_accuracy"}


def test_an_example_beyond_the_context_length_is_refused_naming_its_line(tiny_model_dir, reference_path):
    examples = [evaluation.Example(1, "a", "b"), evaluation.Example(2, "a", "b" * 2048)]  # 2,048 positions
    with pytest.raises(ValueError, match=r"line 2: its reference request takes 2050 tokens, more than .* \(2048\)"):
        evaluation.evaluate(tiny_model_dir, {}, examples, kv_cache_tokens=8192)
