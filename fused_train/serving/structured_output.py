"""Structured output: a request's `response_format` as a grammar, and the per-step allowed-token masks.

`GrammarCompiler` turns OpenAI's `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}` into a compiled grammar (`InvalidResponseFormat`, a ValueError, for a
format it cannot hold); each request gets its own `GrammarMatcher` at `add_request`, advanced with
each accepted token. Every step, `apply_masks` writes all grammar rows' allowed tokens into one
bitmask and applies it to the logits in one op before sampling: a token the grammar forbids never
gets sampled, and once the grammar is complete only the end-of-sequence stays allowed. Logit ids
past the tokenizer's vocabulary (padding of the model's embedding) are never allowed.

The engine is xgrammar: of the three measured on the CPU (xgrammar, llguidance, outlines-core;
per-token mask cost and compile time, figures in the README's serving section) it fills a bitmask
fastest, and outlines-core, which compiles a schema to a regular expression, cannot hold
`json_object` (recursive JSON). It is also vLLM's default backend.

Its JSON grammars are compiled from their EBNF text after one rewrite (`_strict_strings`): xgrammar's
string characters admit raw control characters where a length bound applies (`[^"\\\r\n]`) and,
everywhere, the UTF-8 encodings of surrogates (ED A0-BF ..), which no decoder accepts. A model with
byte tokens samples them: 2 of 100 outputs of the untrained tiny model were invalid before.
"""

import json
import re

import torch


class InvalidResponseFormat(ValueError):
    """A `response_format` that is malformed or that the grammar engine cannot compile."""


class GrammarCompiler:
    """Compiles `response_format`s for `tokenizer` (a transformers tokenizer) and logits of
    `vocab_size` columns (the model's, at least the tokenizer's)."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
        except ImportError as error:
            raise InvalidResponseFormat(
                "response_format needs the xgrammar package: pip install 'fused_train[serve]'"
            ) from error

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info)

    def compile(self, response_format: dict):
        """The compiled grammar of `response_format`; InvalidResponseFormat naming what is wrong."""
        if not isinstance(response_format, dict):
            raise InvalidResponseFormat(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "json_object":
            return self._compiler.compile_grammar(_strict_strings(str(self._xgr.Grammar.builtin_json_grammar())))
        if kind != "json_schema":
            raise InvalidResponseFormat(
                f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}')
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidResponseFormat("response_format.json_schema.schema must be a JSON Schema object")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidResponseFormat("response_format.json_schema.strict must be a boolean")
        try:
            grammar = self._xgr.Grammar.from_json_schema(json.dumps(spec["schema"]), any_whitespace=False,
                                                         strict_mode=bool(strict))  # fmt: skip
            return self._compiler.compile_grammar(_strict_strings(str(grammar)))
        except Exception as error:  # xgrammar raises RuntimeError / ValueError with its reason
            raise InvalidResponseFormat(f"response_format.json_schema.schema cannot be compiled: {error}") from error

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)


# A negated character class holding the quote: the characters of a JSON string.
_STRING_CHARACTERS = re.compile(r'\[\^((?:[^\]\\]|\\.)*?\\"(?:[^\]\\]|\\.)*)\]')
_NOT_IN_STRINGS = r"\x00-\x1f\ud800-\udfff"  # control characters (JSON escapes them) and surrogates


def _strict_strings(ebnf: str) -> str:
    """`ebnf` with every string-character class also excluding what JSON strings cannot hold raw."""
    return _STRING_CHARACTERS.sub(lambda match: f"[^{match.group(1)}{_NOT_IN_STRINGS}]", ebnf)


def accept(matcher, token: int) -> bool:
    """Advance `matcher` by the sampled `token`; False when the grammar refuses it, which happens
    only when the mask left no token at all (e.g. min_tokens holding back the end of a complete
    document): the request cannot go on within its response_format."""
    return matcher.is_terminated() or matcher.accept_token(token)


def apply_masks(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """`logits` `[rows, vocab]` with every row's disallowed tokens at -inf (a None matcher: no
    mask): one bitmask filled per grammar row on the host, applied in one op."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    import xgrammar  # only with a response_format: the engine runs without the serve extra

    vocab = logits.shape[-1]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab)
    for index, row in enumerate(rows):
        matchers[row].fill_next_token_bitmask(bitmask, index)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(len(rows), -1)[:, :vocab].bool()
    allowed = allowed.to(logits.device, non_blocking=True)
    selected = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, selected).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, selected, masked)
