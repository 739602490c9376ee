"""The OpenAI request bodies this server accepts, checked field by field, and its error shape.

Every rejection is an :class:`ApiError` whose JSON body is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the offending field.
Fields OpenAI defines but this server does not implement are accepted only at their neutral value
(``logprobs: null``, ``presence_penalty: 0`` ...); any other field is refused by name, so a typo
never passes silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from strataprune.serve.sampling import SamplingParams

#: the most stop strings a request may give (OpenAI's limit)
MAX_STOP = 4
#: a completions request without max_tokens generates this many tokens (OpenAI's default)
DEFAULT_COMPLETION_TOKENS = 16


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN and Infinity are refused (they are not JSON)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


# --------------------------------------------------------------------------- typed field readers
def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {json.dumps(value)[:40]}", "invalid_type")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"{value} is out of range; allowed: an integer {allowed}")
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"expected a number, got {json.dumps(value)[:40]}", "invalid_type")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad(name, f"{value} is out of range; allowed: a number in {bracket}{low:g}, {high:g}]")
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {json.dumps(value)[:40]}", "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", "expected a string or a list of strings", "invalid_type")
    if len(items) > MAX_STOP or any(s == "" for s in items):
        raise bad("stop", f"allowed: up to {MAX_STOP} non-empty strings")
    return list(items)


#: OpenAI fields accepted only at their neutral value (this server does not implement them)
NEUTRAL = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None,),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {
    "prompt",
    "logprobs",
    "echo",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
}
CHAT_FIELDS = COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
}
ROLES = ("system", "user", "assistant", "developer")


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad(name, f"unknown field; allowed: {', '.join(sorted(allowed))}", "unknown_field")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            shown = ", ".join("null" if v is None else json.dumps(v) for v in neutral)
            raise bad(name, f"not supported by this server; allowed: {shown}", "unsupported")


@dataclass
class GenerationRequest:
    """A checked request: the prompt (text or token ids, or chat messages) and how to sample."""

    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None  # None: the endpoint's default (fitted to the context)
    params: SamplingParams
    stream: bool
    model: str | None


def _common(body: dict[str, Any], max_tokens_name: str = "max_tokens") -> tuple[SamplingParams, int | None, bool]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "expected a string", "invalid_type")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad("n", f"{n} completions per request are not supported; allowed: 1")
    max_tokens = _integer(body, max_tokens_name, 1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    stream = _boolean(body, "stream") or False
    ignore_eos = _boolean(body, "ignore_eos") or False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", 'expected an object with at most "include_usage"', "invalid_type")
        _boolean(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "expected a string", "invalid_type")
    params = SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stop(body),
        seed=seed,
        ignore_eos=ignore_eos,
    )
    return params, max_tokens, stream


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    _check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad("prompt", "required", "missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad("prompt", "expected a string, or a non-empty list of token ids (integers >= 0); one prompt per request")
    elif not isinstance(prompt, str):
        raise bad("prompt", "expected a string or a list of token ids", "invalid_type")
    params, max_tokens, stream = _common(body)
    return GenerationRequest(prompt, None, max_tokens, params, stream, body.get("model"))


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    _check_fields(body, CHAT_FIELDS)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "required", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of {role, content} objects", "invalid_type")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "expected an object with role and content", "invalid_type")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(f"{where}.{sorted(extra)[0]}", "unknown field; allowed: role, content, name", "unknown_field")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{json.dumps(role)[:40]}; allowed: {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", 'only {"type": "text", "text": "..."} parts are supported')
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "expected a string or a list of text parts", "invalid_type")
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    params, max_tokens, stream = _common(body, name)
    return GenerationRequest(None, checked, max_tokens, params, stream, body.get("model"))
