"""Logit bias and vLLM's penalties: `runner.penalize` against a plain per-row reimplementation of
vLLM's formulas, and through the live server (a bias forces a token, a strong penalty changes a
greedy output as the reference predicts, out-of-range values are 400s naming the parameter)."""

import pytest
import torch

from fused_train.serving.runner import penalize
from tests.serving.conftest import SERVER_PACKAGES


def _reference(logits, prompt, output, presence, frequency, repetition, bias):
    """One row, token by token, as vLLM: bias, then repetition over prompt + output, then
    frequency and presence over the output."""
    logits = logits.clone()
    for token, value in bias.items():
        logits[token] += value
    for token in set(prompt) | set(output):
        logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
    for token in set(output):
        logits[token] -= frequency * output.count(token) + presence
    return logits


def test_penalize_equals_the_reference():
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 5, 37
    logits = torch.randn(rows, vocab, generator=generator) * 3
    prompts = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (3, 0, 7, 1, 4)]
    outputs = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (6, 2, 0, 9, 5)]
    presence, frequency, repetition = [0.5, -1.0, 2.0, 0.0, 1.5], [0.3, 0.0, -0.7, 2.0, 1.0], [1.3, 0.6, 1.0, 2.5, 1.1]
    biases = [{1: 5.0, 4: -100.0}, {}, {36: 0.5}, {0: 100.0, 1: -3.0}, {}]
    got = penalize(logits, prompts, outputs, presence, frequency, repetition, biases)
    for row in range(rows):
        expected = _reference(logits[row], prompts[row], outputs[row], presence[row], frequency[row],
                              repetition[row], biases[row])  # fmt: skip
        torch.testing.assert_close(got[row], expected, rtol=1e-6, atol=1e-5)


def _server_tests():
    for package in SERVER_PACKAGES:
        pytest.importorskip(package)


def _reference_greedy(model_dir, prompt_ids, steps, **penalties):
    """Greedy tokens of an unpatched HF forward with `_reference` applied at every step."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    output = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt_ids + output])).logits[0, -1].float()
            output.append(int(_reference(logits, prompt_ids, output, **penalties).argmax()))
    return output


def test_logit_bias_forces_a_token_and_penalties_change_greedy_output(live_server, tiny_model_dir):
    _server_tests()
    client = live_server.client()
    tokenizer = live_server.engine.tokenizer
    forced = tokenizer("z", add_special_tokens=False)["input_ids"][0]
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})  # fmt: skip
    assert out.choices[0].text == "zzzz"
    prompt_ids = tokenizer("The cat")["input_ids"]
    strong = dict(presence=1.5, frequency=2.0, repetition=3.0, bias={})
    plain = _reference_greedy(tiny_model_dir, prompt_ids, 8, presence=0, frequency=0, repetition=1, bias={})
    expected = _reference_greedy(tiny_model_dir, prompt_ids, 8, **strong)
    assert expected != plain, "the penalty must change the reference's output for this test to mean anything"
    penalized = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=8, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.5,
                                          extra_body={"repetition_penalty": 3.0, "ignore_eos": True})  # fmt: skip
    assert penalized.choices[0].text == tokenizer.decode(expected, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("field, value", [("frequency_penalty", 2.5), ("presence_penalty", -3),
                                          ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}),
                                          ("logit_bias", {"99999999": 1}),
                                          ("repetition_penalty", 0)])  # fmt: skip
def test_out_of_range_values_are_refused(live_server, field, value):
    _server_tests()
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        live_server.client().completions.create(model="tiny", prompt="The cat", max_tokens=2,
                                                extra_body={field: value})  # fmt: skip
    assert error.value.body["param"] == field and error.value.body["code"] != "unsupported_parameter"
