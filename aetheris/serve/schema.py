"""The request bodies of ``/v1/chat/completions`` and ``/v1/completions`` as pydantic models.

FastAPI-style validation: a body is validated by ``ChatRequest`` / ``CompletionRequest`` (types, ranges,
unknown fields) and a ``ValidationError`` becomes FastAPI's ``RequestValidationError``, which the app's one
handler answers in OpenAI's error shape with ``param`` taken from the error's location
(``validation_error``). Fields whose checks need more than a type -- messages, tools and their JSON
schemas, stop strings -- have validators that raise ``ApiError`` naming the exact place
(``messages[2].tool_call_id``, ``tools[0].function.parameters.properties.a``), as OpenAI's errors do.
Checks that need the model (vocabulary, context length, chat markers) happen later, in ``specs``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import torch
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from torch import Tensor

from .. import chat
from .errors import ApiError, bad, printable
from .grammar import SchemaBudget, is_int, is_num, tool_parameters
from .limits import Limits

# Fields OpenAI defines that change behaviour we do not implement: a 400 that says so, never silence.
UNSUPPORTED = {"audio": "audio output is not supported", "functions": "deprecated; use 'tools'",
               "function_call": "deprecated; use 'tool_choice'", "web_search_options": "web search is not supported",
               "reasoning_effort": "this model has no reasoning mode", "verbosity": "not supported by this model"}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"}

# ---------------------------------------------------------------------------------------------------
# Field validators (each error names the exact place in the request)
# ---------------------------------------------------------------------------------------------------


def _text(v, param: str, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise bad(param, "expected a string", "invalid_type")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, "is not valid UTF-8 text (lone surrogate)") from None
    if not allow_empty and not v:
        raise bad(param, "must not be empty")
    return v


def _valid_unicode(body: dict) -> None:
    """Lone surrogates (``"\\ud800"`` is valid JSON, not valid Unicode) anywhere in the body, keys included,
    are a 400 naming where, before any of it reaches a tokenizer, a template or a response."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, v in items:
            p = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
            if isinstance(key, str) and not _encodes(key):
                raise bad(path or "body", f"a key is not valid UTF-8 text (lone surrogate): {printable(key)[:60]}")
            if isinstance(v, str) and not _encodes(v):
                raise bad(p, "is not valid UTF-8 text (lone surrogate)")
            stack.append((v, p))
    raise bad("body", "is not valid UTF-8 text (lone surrogate)")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _content(v, param: str, allow_none: bool = False) -> str | None:
    if v is None:
        if allow_none:
            return None
        raise bad(param, "content is required", "missing_required_parameter")
    if isinstance(v, str):
        return _text(v, param)
    if not isinstance(v, list):
        raise bad(param, "expected a string or a list of content parts", "invalid_type")
    parts = []
    for j, part in enumerate(v):
        p = f"{param}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise bad(p, "expected a content part object with a 'type'", "invalid_type")
        if part["type"] != "text":
            raise ApiError(400, f"Invalid '{p}.type': content parts of type {json.dumps(part['type'])[:40]} are not "
                           "supported; this model reads text only", param=f"{p}.type", code="unsupported_parameter")
        parts.append(_text(part.get("text"), f"{p}.text"))
    return "".join(parts)


def _messages(v) -> list[dict]:
    if not isinstance(v, list):
        raise bad("messages", "expected an array of messages", "invalid_type" if v is not None else
                  "missing_required_parameter")
    if not v:
        raise bad("messages", "empty array; expected at least one message", "empty_array")
    out, call_ids = [], set()
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(p, "expected a message object", "invalid_type")
        for key in m:
            if key not in MESSAGE_KEYS:
                raise ApiError(400, f"Unrecognized argument in {p}: {key}", param=f"{p}.{key}", code="unknown_parameter")
        role = m.get("role")
        if role not in chat.ROLES:
            raise bad(f"{p}.role", f"{json.dumps(role)[:40]} is not one of {', '.join(chat.ROLES)}")
        msg = {"role": role}
        if role == "assistant":
            msg["content"] = _content(m.get("content"), f"{p}.content", allow_none=True)
            calls = m.get("tool_calls")
            if calls is not None:
                msg["tool_calls"] = _assistant_calls(calls, f"{p}.tool_calls")
                call_ids |= {tc["id"] for tc in msg["tool_calls"]}
            if msg["content"] is None and not msg.get("tool_calls"):
                raise bad(f"{p}.content", "an assistant message needs content or tool_calls",
                          "missing_required_parameter")
        else:
            msg["content"] = _content(m.get("content"), f"{p}.content")
        if role == "tool":
            msg["tool_call_id"] = _text(m.get("tool_call_id"), f"{p}.tool_call_id")
            if msg["tool_call_id"] not in call_ids:  # as OpenAI: a result must answer a call made before it
                raise bad(f"{p}.tool_call_id", f"{json.dumps(msg['tool_call_id'])[:80]} matches no tool call of a "
                          "preceding assistant message; a 'tool' message answers one of those calls")
        out.append(msg)
    return out


def _assistant_calls(calls, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(param, "expected an array", "invalid_type")
    out = []
    for j, tc in enumerate(calls):
        p = f"{param}[{j}]"
        if not isinstance(tc, dict) or not isinstance(tc.get("function"), dict):
            raise bad(p, "expected {id, type: 'function', function: {name, arguments}}", "invalid_type")
        name = _text(tc["function"].get("name"), f"{p}.function.name", allow_empty=False)
        args = _text(tc["function"].get("arguments", "{}"), f"{p}.function.arguments")
        try:
            parsed = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            raise bad(f"{p}.function.arguments", "is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise bad(f"{p}.function.arguments", "must be a JSON object")
        out.append({"id": _text(tc.get("id", f"call_{j}"), f"{p}.id"), "type": "function",
                    "function": {"name": name, "arguments": args}})
    return out


def _tools(v, budget: SchemaBudget) -> list[dict]:
    if not isinstance(v, list):
        raise bad("tools", "expected an array of tools", "invalid_type")
    cap = budget.limits.max_tools
    if len(v) > cap:
        raise bad("tools", f"{len(v)} tools; at most {cap} are allowed")
    out, names = [], set()
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad(p, "expected {type: 'function', function: {name, description, parameters}}", "invalid_type")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad(f"{p}.function.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        if name in names:
            raise bad(f"{p}.function.name", f"duplicate tool name {name!r}")
        names.add(name)
        entry = {"name": name, "parameters": tool_parameters(fn.get("parameters"), f"{p}.function.parameters", budget)}
        if fn.get("description") is not None:
            entry["description"] = _text(fn["description"], f"{p}.function.description")
        out.append({"type": "function", "function": entry})
    return out


def _stop(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 4:
        raise bad("stop", "expected a string or an array of at most 4 strings", "invalid_type")
    return [_text(s, "stop", allow_empty=False) for s in stops]


def _served_model(name: str, info: ValidationInfo) -> str:
    served = info.context["model_name"]
    if name != served:
        raise ApiError(404, f"The model '{name[:100]}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")
    return name


def _tools_field(v, info: ValidationInfo) -> list[dict]:
    return [] if v is None else _tools(v, info.context["budget"])


def _zero_penalty(v: float, info: ValidationInfo) -> float:
    if v != 0:
        raise ApiError(400, f"'{info.field_name}' other than 0 is not supported", param=info.field_name,
                       code="unsupported_parameter")
    return v


def _text_only(v):
    if v not in (None, ["text"]):
        raise ApiError(400, "only text output is supported", param="modalities", code="unsupported_parameter")
    return v


def _unsupported(v, info: ValidationInfo):
    if v is not None:
        raise ApiError(400, f"'{info.field_name}' is not supported", param=info.field_name,
                       code="unsupported_parameter")
    return v


def _stream_options(v):
    if v is not None and (not isinstance(v, dict) or any(k not in ("include_usage", "include_obfuscation") for k in v)):
        raise bad("stream_options", "expected {include_usage: boolean}", "invalid_type")
    if v is not None and not isinstance(v.get("include_usage", False), bool):
        raise bad("stream_options.include_usage", "expected a boolean", "invalid_type")
    return v


def _prompts(prompt) -> list[str] | list[list[int]]:
    """A completion prompt -> a list of prompts (strings or token-id lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(is_int(t) for t in p)
                                                   for p in prompt):
        return prompt
    raise bad("prompt", "expected a string, an array of strings, or token ids", "invalid_type"
              if prompt is not None else "missing_required_parameter")


# ---------------------------------------------------------------------------------------------------
# Request models
# ---------------------------------------------------------------------------------------------------

Penalty = Annotated[float, Field(ge=-2.0, le=2.0), AfterValidator(_zero_penalty)]
Unsupported = Annotated[Any, AfterValidator(_unsupported)]


class _Request(BaseModel):
    """Fields both endpoints share. Strict: no coercion ("10" is not 10, true is not 1), no NaN or
    infinity, unknown fields rejected; hint-only OpenAI fields accepted and ignored."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: Annotated[str, AfterValidator(_served_model)] = Field(description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (capped by the server's --max-tokens)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="nucleus mass; 0 means greedy")
    top_k: int = Field(0, ge=0, le=1 << 30, description="sample among the k likeliest tokens; 0 = all")
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: Annotated[Any, AfterValidator(_stop)] = Field(None, description="a string or up to 4 strings")
    n: int = Field(1, ge=1, description="choices per prompt (capped by --max-n)")
    stream: bool = False
    stream_options: Annotated[Any, AfterValidator(_stream_options)] = None
    logit_bias: dict[str, Any] | None = Field(None, description="token id -> bias in [-100, 100]")
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    # OpenAI fields that only hint (storage, billing, tracing, caching, latency): accepted and ignored.
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    prediction: Any = None
    prompt_cache_retention: Any = None

    @model_validator(mode="before")
    @classmethod
    def _first(cls, body):
        """Before any field: fields OpenAI defines that we do not implement, and lone surrogates anywhere."""
        if isinstance(body, dict):
            for key in body:
                if key in UNSUPPORTED:
                    raise ApiError(400, f"'{key}' is not supported: {UNSUPPORTED[key]}", param=key,
                                   code="unsupported_parameter")
            _valid_unicode(body)
        return body

    @model_validator(mode="after")
    def _together(self):
        if self.stream_options is not None and not self.stream:
            raise bad("stream_options", "only allowed when 'stream' is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Request):
    """POST /v1/chat/completions (platform.openai.com/docs/api-reference/chat/create)."""
    messages: Annotated[Any, AfterValidator(_messages)] = Field(description="the conversation, oldest first")
    tools: Annotated[Any, AfterValidator(_tools_field)] = None
    tool_choice: Any = Field(None, description="'none', 'auto', 'required' or {type: 'function', function: {name}}")
    parallel_tool_calls: bool = True
    response_format: Any = Field(None, description="{type: 'text' | 'json_object' | 'json_schema'}")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: Annotated[Any, AfterValidator(_text_only)] = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise bad("top_logprobs", "requires 'logprobs' to be true")
        return self


class CompletionRequest(_Request):
    """POST /v1/completions (platform.openai.com/docs/api-reference/completions/create)."""
    prompt: Annotated[Any, AfterValidator(_prompts)] = Field(
        description="a string, an array of strings, an array of token ids, or an array of those")
    logprobs: int | None = Field(None, ge=0, le=5, description="top log-probabilities per token")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, description="only n (the default) is supported")
    suffix: Unsupported = None

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported",
                           param="echo", code="unsupported_parameter")
        return self


CHAT_FIELDS = set(ChatRequest.model_fields)
COMPLETION_FIELDS = set(CompletionRequest.model_fields)


def parse(model: type[_Request], body: dict, limits: Limits, model_name: str) -> tuple[_Request, SchemaBudget]:
    """Validate a body for the server of ``model_name``; returns the request and the schema budget its tools
    have used (response_format's schema is counted against the same budget later). Type and range errors
    raise RequestValidationError; errors a validator names precisely (404 for another model, a bad tool
    schema, ...) raise ApiError."""
    budget = SchemaBudget(limits)
    try:
        return model.model_validate(body, context={"budget": budget, "model_name": model_name}), budget
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False, include_context=False, include_input=False)) \
            from None


def _param(loc) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_error(errors: list[dict]) -> ApiError:
    """The first of pydantic's errors in OpenAI's shape: param from its location, a code from its type."""
    if not errors:
        return ApiError(400, "Invalid request.", code="invalid_request")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    param, kind, msg = _param(loc), err.get("type", ""), printable(str(err.get("msg", "invalid")), 300)
    if kind == "extra_forbidden":
        where = _param(loc[:-1])
        text = f"Unrecognized request argument supplied: {loc[-1]}" if where == "body" else \
            f"Unrecognized argument in {where}: {loc[-1]}"
        return ApiError(400, text, param=param, code="unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return ApiError(400, f"Invalid '{param}': {msg}", param=param, code=code)


def check_at_most(param: str, value: int, cap: int, what: str = "this server allows") -> int:
    """A bound that comes from the server's Limits rather than from the API."""
    if value > cap:
        raise bad(param, f"{value} is out of range; {what} 1 to {cap}")
    return value


def _logit_bias(v, vocab_size: int, cap: int) -> Tensor | None:
    """logit_bias -> one (V,) vector added to each step's logits (one add, however many entries)."""
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise bad("logit_bias", "expected a map from token id to bias", "invalid_type")
    if len(v) > cap:
        raise bad("logit_bias", f"{len(v)} entries; at most {cap} are allowed")
    bias = torch.zeros(vocab_size)
    for k, b in v.items():
        if not re.fullmatch(r"\d{1,9}", k) or int(k) >= vocab_size:
            raise bad("logit_bias", f"token id {k[:20]!r} is not in [0, {vocab_size})")
        if not is_num(b) or not -100 <= b <= 100:
            raise bad("logit_bias", f"bias for token {k} must be a number between -100 and 100")
        bias[int(k)] = float(b)
    return bias
