"""response_format through the live server: with the untrained tiny model only the grammar's mask
makes its outputs JSON, so 100 of 100 valid outputs prove the mask works."""

import asyncio
import json

import pytest

from tests.serving.conftest import SERVER_PACKAGES

for package in (*SERVER_PACKAGES, "xgrammar", "jsonschema"):
    pytest.importorskip(package)

import httpx  # noqa: E402
import jsonschema  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "ok", "tags"], "additionalProperties": False,
}  # fmt: skip
FORMAT = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
PROMPTS = ["The cat", "A dog", "Hello", "{", "Numbers: 1 2"]


def test_100_outputs_validate_against_the_schema(live_server):
    async def one(client, i):
        options = dict(model="tiny", max_tokens=120, temperature=0.5 + (i % 4) * 0.3, seed=i)
        # The openai client's completions have no response_format argument: vLLM's way, extra_body.
        completion = dict(options, extra_body={"response_format": FORMAT})
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            messages = [{"role": "user", "content": prompt}]
            if i % 4 == 1:
                stream = await client.chat.completions.create(messages=messages, stream=True, response_format=FORMAT,
                                                              **options)  # fmt: skip
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            reply = await client.chat.completions.create(messages=messages, response_format=FORMAT, **options)
            return reply.choices[0].message.content
        if i % 4 == 2:
            stream = await client.completions.create(prompt=prompt, stream=True, **completion)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        return (await client.completions.create(prompt=prompt, **completion)).choices[0].text

    async def run():
        async with live_server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    valid = 0
    for text in asyncio.run(run()):
        jsonschema.validate(json.loads(text), SCHEMA)  # strict JSON: no raw control characters in strings
        valid += 1
    assert valid == 100


def test_json_object_and_invalid_schema(live_server):
    client = live_server.client()
    for seed in range(3):
        out = client.completions.create(model="tiny", prompt="{", max_tokens=200, seed=seed, temperature=0.7,
                                        extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
        if out.choices[0].finish_reason == "stop":
            json.loads(out.choices[0].text)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    for path, extra in (("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                        ("completions", {"prompt": "Hi"})):  # fmt: skip
        response = httpx.post(f"{live_server.url}/v1/{path}", json={"model": "tiny", "response_format": bad, **extra},
                              timeout=30)  # fmt: skip
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("response_format", [FORMAT, {"type": "json_object"}], ids=["json_schema", "json_object"])
def test_strings_admit_no_raw_control_character_nor_surrogate(tiny_model_dir, response_format):
    """Byte by byte into a string: after `"` no control byte may follow (JSON escapes them), and after
    the lead byte ED only 80-9F (ED A0-BF .. encodes a surrogate, invalid UTF-8)."""
    import torch
    import transformers
    import xgrammar

    from fused_train.serving.structured_output import GrammarCompiler, apply_masks

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    byte_token = {text[0]: token for token, text in enumerate(xgrammar.TokenizerInfo.from_huggingface(
        tokenizer).decoded_vocab) if len(text) == 1}  # fmt: skip
    prefix = b'{"name": "' if response_format is FORMAT else b'{"'

    def allowed_bytes_after(text: bytes) -> set[int]:
        matcher = compiler.matcher(compiler.compile(response_format))
        assert all(matcher.accept_token(byte_token[byte]) for byte in text)
        allowed = apply_masks(torch.zeros(1, len(tokenizer)), [matcher])[0] == 0
        return {byte for byte, token in byte_token.items() if allowed[token]}

    in_string = allowed_bytes_after(prefix)
    assert ord("a") in in_string and 0xED in in_string and not in_string & set(range(0x20))
    assert allowed_bytes_after(prefix + b"\xed") == set(range(0x80, 0xA0))


def test_a_grammar_with_no_token_left_fails_its_request_alone():
    """A complete document whose end min_tokens holds back leaves the mask no token: that request
    fails with the reason, and the engine (and a request beside it) goes on."""
    from fused_train.serving import Engine, SamplingParams
    from tests.serving.test_engine import _base, _char_tokenizer

    seven = {"type": "json_schema", "json_schema": {"name": "seven", "schema": {"enum": [7]}}}
    with Engine(_base(), _char_tokenizer(), kv_dtype="model", kv_cache_tokens=256) as engine:
        stuck = engine.add_request("hello", SamplingParams(max_tokens=8, min_tokens=4, response_format=seven))
        plain = engine.add_request("hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        assert plain.result().finish_reason == "length" and len(plain.result().token_ids) == 6
        failed = stuck.result()
        assert failed.finish_reason == "error" and "response_format" in failed.error
        (after,) = engine.generate("hello", SamplingParams(max_tokens=3, response_format=seven))
        assert after.text == "7"
