"""lm-evaluation-harness scores the server as it scores the checkpoint (issue 28): bench/lm_eval_tasks' two
tasks (multiple-choice log-likelihood, generate-until) run by lm-eval's `hf` model on the tiny model (with
`peft=` for an adapter) and by its `local-completions` model against the server give the same scores, the
same generations and log-likelihoods within 1e-3. Offline: the tasks and the tokenizer are local files."""

import pytest

from bench.eval_lm_harness import LOGLIKELIHOOD_TOLERANCE, METRICS, compare, evaluate_hf, evaluate_server

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models (its `api` extra)

LIMIT = 4  # documents per task: 16 log-likelihoods and 4 generations of up to 16 tokens


@pytest.mark.parametrize("adapter", [None, "b"])
def test_lm_eval_scores_the_server_as_the_checkpoint(serve, tiny_model_dir, tiny_adapters, adapter, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The model's dtype in the KV cache: the log-likelihoods are the model's own, as the checkpoint's are.
    server = serve(kv_dtype="model")
    hf = evaluate_hf(tiny_model_dir, None if adapter is None else tiny_adapters[adapter], limit=LIMIT)
    served = evaluate_server(f"{server.url}/v1/completions", adapter or server.model_name, tiny_model_dir,
                             limit=LIMIT)  # fmt: skip
    report = compare(hf, served)
    choice, next_word = report["corpus_choice"], report["corpus_next_word"]
    assert choice["samples"] == next_word["samples"] == LIMIT
    assert choice["loglikelihoods"] == 4 * LIMIT
    assert choice["max_abs_loglikelihood_diff"] < LOGLIKELIHOOD_TOLERANCE
    assert choice["is_greedy_differing"] == 0
    assert next_word["generations_differing"] == 0
    for task, metrics in METRICS.items():
        for metric in metrics:
            assert report[task][metric]["hf"] == report[task][metric]["server"], (task, metric)
