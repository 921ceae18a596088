"""The OpenAI wire format of the server (`fused_train.serving.server`): request bodies validated
strictly (an unknown or unsupported parameter is refused, never ignored), their `SamplingParams`,
`usage` counts, and every error as `APIError` in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with its HTTP status."""

from typing import Any

import fastapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fused_train.serving.adapters import UnknownAdapter
from fused_train.serving.requests import MAX_LOGPROBS, EngineStopped, SamplingParams
from fused_train.serving.scheduler import PromptTooLong, QueueFull
from fused_train.serving.structured_output import InvalidResponseFormat

MAX_N = 16  # choices per request: each is an engine request
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256  # a chat reply without max_tokens stops here (finish_reason "length")
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 8 * 2**20  # a request body beyond this gets 413 (`build_app(max_body_bytes=...)`)
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's seed (and vLLM's)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- request bodies


class Body(BaseModel):
    # Unknown fields are refused: a misspelt or unsupported parameter must not be silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage (so far) in every chunk, with include_usage


class SamplingBody(Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    # Accepted and without effect on the output.
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2**24)  # vLLM's (no cap there; ours keeps it finite)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt alone (scored, with logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top logprobs per token (vLLM's limit: 20)
    echo: bool | None = False  # the prompt before the text, and with logprobs, its tokens' logprobs first
    suffix: str | None = None
    best_of: int | None = None


class TextPart(Body):
    type: str
    text: str


class ChatMessage(Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not hold a NUL byte")
    return value


class LoadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    _text = field_validator("lora_name", "lora_path")(_no_nul)


class UnloadAdapterRequest(Body):
    lora_name: str = Field(min_length=1)
    _text = field_validator("lora_name")(_no_nul)


# The values of unsupported parameters that change nothing (what a client sends by default).
NEUTRAL = {
    "suffix": (None, ""), "best_of": (None, 1),
    "tools": (None, []), "tool_choice": (None, "none"),
}  # fmt: skip


def refuse_unsupported(body: SamplingBody) -> None:
    for name, neutral in NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def sampling_params(body: SamplingBody, max_tokens: int | None, default_max_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice: seeds s, s+1, ... so that the n choices differ and each is reproducible."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and not all(stop):
        raise APIError(400, "stop strings must be non-empty", param="stop")
    if body.stop_token_ids is not None and any(t < 0 for t in body.stop_token_ids):
        raise APIError(400, "stop_token_ids must be token ids (>= 0)", param="stop_token_ids")
    echo = bool(getattr(body, "echo", False))
    if max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it needs echo: true (the prompt alone)",
                       param="max_tokens")  # fmt: skip
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})",
                       param="min_tokens")  # fmt: skip
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias must map token ids to biases in [-100, 100], got {key!r}: {value!r}",
                           param="logit_bias")  # fmt: skip
        bias[int(key)] = value
    penalties = dict(presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                     repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                     logit_bias=bias)  # fmt: skip
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    prompt_logprobs = logprobs if echo else None  # vLLM's: echo scores the prompt with the same top k
    return [
        SamplingParams(**penalties, logprobs=logprobs, prompt_logprobs=prompt_logprobs, max_tokens=max_tokens,
                       temperature=body.temperature,
                       top_p=body.top_p, top_k=body.top_k,
                       seed=None if body.seed is None else body.seed + i, stop=stop,
                       stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                       include_stop_str_in_output=body.include_stop_str_in_output,
                       response_format=body.response_format)  # fmt: skip
        for i in range(body.n)
    ]


def usage(outputs, n: int) -> dict:
    # Each prompt counts once, whatever its number of choices.
    prompt = sum(len(output.prompt_token_ids) for output in outputs[::n])
    completion = sum(len(output.token_ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engine_error(error: BaseException, param: str) -> BaseException:
    """The APIError of what `add_request` raised for a request whose prompt is field `param`."""
    if isinstance(error, PromptTooLong):
        return APIError(400, str(error), param=param, code="context_length_exceeded")
    if isinstance(error, UnknownAdapter):  # unloaded since the request was read
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, InvalidResponseFormat):
        return APIError(400, str(error), param="response_format")
    if isinstance(error, ValueError):  # the prompt's token ids (the body's other fields are checked before)
        return APIError(400, str(error), param="logit_bias" if str(error).startswith("logit_bias") else param)
    if isinstance(error, QueueFull):
        return APIError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    # EngineStopped, or the plain RuntimeError of another engine that is shutting down.
    if isinstance(error, (EngineStopped, RuntimeError)):
        return APIError(503, f"the server is shutting down: {error}", type="server_error", code="unavailable")
    return error


async def parse_body(request: fastapi.Request, model: type[Body], max_bytes: int = MAX_BODY_BYTES):
    """The body as `model`, whatever its content type (curl -d sends a form's); 400 naming the field,
    413 beyond `max_bytes` (read no further). Parsed here rather than by FastAPI, whose validation
    errors would be 422s in its own shape."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                         code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as error:
        raise validation_error(error.errors()) from error


def validation_error(errors: list[dict]) -> APIError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")  # fmt: skip
    loc = [str(part) for part in first["loc"] if part != "body"]
    # A union's errors name the member type tried (e.g. "str", "list[int]") after the field.
    param = ".".join(part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int"))
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown parameter {param!r}: this server does not support it", param=param,
                        code="unsupported_parameter")  # fmt: skip
    if first["type"] == "missing":
        return APIError(400, f"{param} is required", param=param)
    if not param:
        return APIError(400, f"the body must be a JSON object: {first['msg']}")
    return APIError(400, f"{param}: {first['msg']}", param=param)
