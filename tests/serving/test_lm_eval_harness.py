"""lm-evaluation-harness scores the server as it scores the checkpoint (issue 28): bench/lm_eval_tasks' two
tasks (multiple-choice log-likelihood, generate-until) run by lm-eval's `hf` model on the tiny model (with
`peft=` for an adapter) and by its `local-completions` model against the server give the same scores, the
same generations and log-likelihoods within 1e-3. Offline: the tasks and the tokenizer are local files."""

import pytest

from bench.common import BOS_ID
from bench.eval_lm_harness import LOGLIKELIHOOD_TOLERANCE, METRICS, compare, evaluate_hf, evaluate_server
from bench.tiny_serving import EOS_ID
from tests.serving.conftest import MODEL_NAME

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


def test_lm_eval_scores_a_prompt_whose_drawn_token_ends_the_request(serve):
    # lm-eval's log-likelihood request is an echo with max_tokens 1, and it drops the echoed list's last
    # entry as the drawn token's: that entry must be there when the token is the end of sequence too.
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    client = serve(kv_dtype="model").client()
    prompt = [BOS_ID, *range(80, 86)]
    request = dict(model=MODEL_NAME, prompt=[prompt], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    drawn = client.completions.create(**request).model_dump()
    ended = client.completions.create(**request, logit_bias={str(EOS_ID): 100}).model_dump()
    assert ended["choices"][0]["finish_reason"] == "stop" and drawn["choices"][0]["finish_reason"] == "length"
    for response in (drawn, ended):
        assert len(response["choices"][0]["logprobs"]["token_logprobs"]) == len(prompt) + 1
    context_tokens = 3
    assert LocalCompletionsAPI.parse_logprobs(ended, ctxlens=[context_tokens]) == \
        LocalCompletionsAPI.parse_logprobs(drawn, ctxlens=[context_tokens])  # fmt: skip
