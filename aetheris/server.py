"""``aetheris serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for Aetheris checkpoints.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``
(503 while warming up), ``GET /metrics`` (Prometheus). Request and response shapes, SSE chunks and the
error object follow the OpenAI API reference (platform.openai.com/docs/api-reference/chat/create,
/completions/create, /chat-streaming, and "Error codes"); the official ``openai`` client is the test driver.

How a request flows:

1. The handler reads the body (size-capped, within a deadline), validates every field by hand so an
   error names the field (``ApiError`` -> ``{"error": {message, type, param, code}}``), checks JSON
   schemas for keywords the grammar enforces and for size (``Limits``), renders the prompt with
   ``aetheris.chat`` (or the checkpoint's own chat template when it has a different one) and tokenises
   it -- request text with special-token matching off, so only the template's markers are control
   tokens -- and only then compiles the grammars it needs with xgrammar (github.com/mlc-ai/xgrammar:
   TokenizerInfo, GrammarCompiler.compile_json_schema / compile_lark, GrammarMatcher, token bitmasks).
2. It puts a ``Job`` on the engine's bounded queue (full -> 429). One worker thread owns the model and
   runs *continuous batching*: each new job is prefilled once with the chunked scan, its recurrent
   state is concatenated onto the running batch, and every step decodes all running sequences with
   one ``model.step`` (O(1) per token, no KV cache); finished or cancelled rows leave the batch.
3. Per sequence, a small state machine constrains the assistant turn: the first token is
   ``<|START_RESPONSE|>`` (text) or ``<|START_ACTION|>`` (tool calls), as ``tool_choice`` allows; text
   is free (or JSON-schema constrained for ``response_format``); an action block is constrained by a
   grammar of ``[{"tool_call_id", "tool_name", "parameters": <that tool's schema>}, ...]`` so every
   call parses and validates (and is validated with jsonschema before it is returned). Sampling
   (``generation.sample``) and UTF-8-safe detokenisation with stop strings (``generation.TextState`` /
   ``Detokenizer``) are the ones ``aetheris generate`` uses.
4. The worker hands per-step deltas to the event loop (``call_soon_threadsafe``); the handler turns
   them into an OpenAI response or SSE chunks. Each waiting request polls its connection on a timer:
   a client that disconnects cancels its job. An outer ASGI wrapper (``_Gate``) caps requests in
   flight and answers anything that escaped in OpenAI's error shape; ``uvicorn_config`` adds header,
   body and keep-alive deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here
from torch import Tensor

from . import chat
from .generation import SamplingParams, TextState, sample
from .model import AetherisCache

# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        # Messages quote the request (a model name, an unknown key): lone surrogates there cannot be
        # encoded as UTF-8, so they are written as escapes (``\\ud800``) rather than failing the response.
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str | None, limit: int = 2000) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


_SOURCE_LOCATION = re.compile(r"\[[0-9:.]+\]\s*|\S*\.(?:cc|cpp|h|hpp|py):\d+:?\s*")


def _library_message(err: BaseException) -> str:
    """A library's error as one line for a client: no timestamps or source paths (``/project/cpp/x.cc:12:``)."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [err.__class__.__name__]
    return _SOURCE_LOCATION.sub("", lines[0]).strip()[:300]


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code=code)


@dataclass
class Limits:
    """Every cap of the server (SERVING.md, "Limits and security", lists them with their flags)."""
    max_body_bytes: int = 4 << 20
    max_tokens: int = 2048          # cap on max_tokens (and the default when a request gives none)
    max_prompt_tokens: int = 8192
    max_prompt_bytes: int = 256 << 10  # rendered prompt, checked before tokenising (32 bytes per token of 8192)
    max_n: int = 8
    max_queue: int = 64             # requests waiting for the worker; more -> 429
    max_batch: int = 32             # sequences decoded together in one step
    prefill_tokens: int = 16384     # bound on one batched prefill: prompts x longest prompt (padded)
    threads: int = 0                # torch threads of the decode worker; 0 = all cores but one
    max_tools: int = 128
    # JSON schemas (tools and response_format of one request together): grammar compilation grows
    # superlinearly with the number of optional properties, so these bound its time.
    max_schema_properties: int = 256
    max_schema_enum: int = 1024     # enum and const values
    max_schema_depth: int = 16      # nested subschemas
    max_schema_nodes: int = 2048    # subschemas in all
    max_schema_regex: int = 1024    # regex size (bounded repetitions multiplied out) of all patterns together
    max_schema_number: float = 1e15  # |minimum|, |maximum|, ... (wider float ranges compile slowly)
    max_logit_bias: int = 300       # logit_bias entries
    compile_slots: int = 2          # grammar compilations running at once (others wait)
    compile_wait_s: float = 10.0    # longest wait for a compile slot before a 503
    max_connections: int = 256      # HTTP requests in flight; more -> 503
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this
    body_timeout_s: float = 30.0    # and its body within this (slow clients: 408)
    keep_alive_s: float = 5.0       # idle keep-alive connections close after this
    max_header_bytes: int = 16 << 10


# ---------------------------------------------------------------------------------------------------
# Request validation (hand-written so each error names the field, as OpenAI's do)
# ---------------------------------------------------------------------------------------------------

# OpenAI request fields that only hint (storage, billing, tracing, caching, latency); accepted and ignored.
HINTS = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction",
         "prompt_cache_retention"}
CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "stream",
               "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "n", "logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
               "modalities"} | HINTS
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                     "stream", "stream_options", "logprobs", "echo", "logit_bias", "frequency_penalty",
                     "presence_penalty", "best_of", "suffix"} | HINTS
# Fields OpenAI defines that change behaviour we do not implement: a 400 that says so, never silence.
UNSUPPORTED = {"audio": "audio output is not supported", "functions": "deprecated; use 'tools'",
               "function_call": "deprecated; use 'tool_choice'", "web_search_options": "web search is not supported",
               "reasoning_effort": "this model has no reasoning mode", "verbosity": "not supported by this model"}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))  # (isfinite overflows on ints past 1e308)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if not (_is_int(v) if integer else _is_num(v)):
        raise _bad(key, f"expected {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", "invalid_type")
    if not lo <= v <= hi:
        raise _bad(key, f"{v} is out of range; must be between {lo:g} and {hi:g}")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, "expected a boolean", "invalid_type")
    return v


def _text(v, param: str, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise _bad(param, "expected a string", "invalid_type")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(param, "is not valid UTF-8 text (lone surrogate)") from None
    if not allow_empty and not v:
        raise _bad(param, "must not be empty")
    return v


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key in UNSUPPORTED:
            raise ApiError(400, f"'{key}' is not supported: {UNSUPPORTED[key]}", param=key, code="unsupported_parameter")
        if key not in allowed:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"'{key}' other than 0 is not supported", param=key, code="unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise ApiError(400, "only text output is supported", param="modalities", code="unsupported_parameter")


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
                raise _bad(path or "body", f"a key is not valid UTF-8 text (lone surrogate): {_printable(key)[:60]}")
            if isinstance(v, str) and not _encodes(v):
                raise _bad(p, "is not valid UTF-8 text (lone surrogate)")
            stack.append((v, p))
    raise _bad("body", "is not valid UTF-8 text (lone surrogate)")


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
        raise _bad(param, "content is required", "missing_required_parameter")
    if isinstance(v, str):
        return _text(v, param)
    if not isinstance(v, list):
        raise _bad(param, "expected a string or a list of content parts", "invalid_type")
    parts = []
    for j, part in enumerate(v):
        p = f"{param}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise _bad(p, "expected a content part object with a 'type'", "invalid_type")
        if part["type"] != "text":
            raise ApiError(400, f"Invalid '{p}.type': content parts of type {json.dumps(part['type'])[:40]} are not "
                           "supported; this model reads text only", param=f"{p}.type", code="unsupported_parameter")
        parts.append(_text(part.get("text"), f"{p}.text"))
    return "".join(parts)


def _messages(v) -> list[dict]:
    if not isinstance(v, list):
        raise _bad("messages", "expected an array of messages", "invalid_type" if v is not None else
                   "missing_required_parameter")
    if not v:
        raise _bad("messages", "empty array; expected at least one message", "empty_array")
    out, call_ids = [], set()
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(p, "expected a message object", "invalid_type")
        for key in m:
            if key not in MESSAGE_KEYS:
                raise ApiError(400, f"Unrecognized argument in {p}: {key}", param=f"{p}.{key}", code="unknown_parameter")
        role = m.get("role")
        if role not in chat.ROLES:
            raise _bad(f"{p}.role", f"{json.dumps(role)[:40]} is not one of {', '.join(chat.ROLES)}")
        msg = {"role": role}
        if role == "assistant":
            msg["content"] = _content(m.get("content"), f"{p}.content", allow_none=True)
            calls = m.get("tool_calls")
            if calls is not None:
                msg["tool_calls"] = _assistant_calls(calls, f"{p}.tool_calls")
                call_ids |= {tc["id"] for tc in msg["tool_calls"]}
            if msg["content"] is None and not msg.get("tool_calls"):
                raise _bad(f"{p}.content", "an assistant message needs content or tool_calls",
                           "missing_required_parameter")
        else:
            msg["content"] = _content(m.get("content"), f"{p}.content")
        if role == "tool":
            msg["tool_call_id"] = _text(m.get("tool_call_id"), f"{p}.tool_call_id")
            if msg["tool_call_id"] not in call_ids:  # as OpenAI: a result must answer a call made before it
                raise _bad(f"{p}.tool_call_id", f"{json.dumps(msg['tool_call_id'])[:80]} matches no tool call of a "
                           "preceding assistant message; a 'tool' message answers one of those calls")
        out.append(msg)
    return out


def _assistant_calls(calls, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise _bad(param, "expected an array", "invalid_type")
    out = []
    for j, tc in enumerate(calls):
        p = f"{param}[{j}]"
        if not isinstance(tc, dict) or not isinstance(tc.get("function"), dict):
            raise _bad(p, "expected {id, type: 'function', function: {name, arguments}}", "invalid_type")
        name = _text(tc["function"].get("name"), f"{p}.function.name", allow_empty=False)
        args = _text(tc["function"].get("arguments", "{}"), f"{p}.function.arguments")
        try:
            parsed = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            raise _bad(f"{p}.function.arguments", "is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise _bad(f"{p}.function.arguments", "must be a JSON object")
        out.append({"id": _text(tc.get("id", f"call_{j}"), f"{p}.id"), "type": "function",
                    "function": {"name": name, "arguments": args}})
    return out


# Keywords xgrammar turns into grammar rules (checked one by one in tests/test_server_abuse.py: the grammar
# rejects an instance that violates each), plus annotations that constrain nothing. Anything else (allOf,
# oneOf, not, if/then/else, uniqueItems, dependentRequired, contains, ...) would be accepted by the grammar
# and silently violated by the calls, so it is refused with a 400 naming the keyword.
SCHEMA_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "deprecated", "readOnly",
                      "writeOnly", "$defs", "definitions"}
SCHEMA_KEYWORDS = SCHEMA_ANNOTATIONS | {
    "type", "enum", "const", "anyOf", "$ref",
    "properties", "required", "additionalProperties", "unevaluatedProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf"}
SCHEMA_HINTS = {"oneOf": "use anyOf", "allOf": "merge the subschemas into one", "not": "list the allowed values instead",
                "if": "use anyOf of the cases", "then": "use anyOf of the cases", "else": "use anyOf of the cases",
                "uniqueItems": "check uniqueness in your tool", "dependentRequired": "use anyOf of the cases"}
SCHEMA_FORMATS = {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
                  "uuid"}
# Regex features xgrammar ignores or cannot compile (lookaround, backreferences, word boundaries, \p{..}).
_REGEX_UNSUPPORTED = re.compile(r"\(\?(?!:)|\\[bBpPk1-9]")


class SchemaBudget:
    """Size of the schemas of one request, against the limits (tools and response_format together)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.properties = self.enum = self.nodes = self.regex = 0

    def add(self, param: str, what: str, count: int) -> None:
        setattr(self, what, getattr(self, what) + count)
        cap = getattr(self.limits, f"max_schema_{what}")
        if getattr(self, what) > cap:
            noun = {"properties": "properties", "enum": "enum/const values", "nodes": "subschemas",
                    "regex": "regex size (pattern characters, bounded repetitions multiplied out)"}[what]
            raise ApiError(400, f"Invalid '{param}': the schemas of this request have more than {cap} {noun}; "
                           "this server compiles at most that many into a grammar. Split or simplify the schema.",
                           param=param, code="schema_too_large")


def _json_depth(value, limit: int) -> int:
    """Nesting depth of a JSON value (iterative, so a hostile value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return deepest


def _resolve_ref(root: dict, ref, param: str):
    """A local reference (``#``, ``#/$defs/name``) -> the subschema; anything else is a 400."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise _bad(param, f"$ref {json.dumps(ref)[:80]} is not supported; only local references such as "
                   "'#/$defs/name' are", "invalid_schema")
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _bad(param, f"$ref {json.dumps(ref)[:80]} points to nothing in this schema", "invalid_schema")
    return node


def _check_schema(root, param: str, budget: SchemaBudget) -> None:
    """Walk a JSON schema (iteratively) before any library sees it: only enforceable keywords, local
    references that resolve, and bounded size and depth."""
    limits = budget.limits
    stack = [(root, param, 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise _bad(path, "a JSON schema must be an object (or true/false)", "invalid_schema")
        if depth > limits.max_schema_depth:
            raise _bad(path, f"the schema is nested more than {limits.max_schema_depth} levels deep",
                       "schema_too_deep")
        budget.add(path, "nodes", 1)
        for key in node:
            if key not in SCHEMA_KEYWORDS:
                hint = SCHEMA_HINTS.get(key, "the grammar cannot enforce it")
                raise ApiError(400, f"Invalid '{path}': the JSON-schema keyword {json.dumps(key)[:60]} is not "
                               f"supported ({hint}); generated output could violate it. Supported keywords: "
                               f"{', '.join(sorted(SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS))}.", param=path,
                               code="unsupported_schema_keyword")
        for key in ("properties", "patternProperties", "$defs", "definitions"):
            if key in node:
                members = node[key]
                if not isinstance(members, dict):
                    raise _bad(f"{path}.{key}", "must be an object of subschemas", "invalid_schema")
                if key == "properties":
                    budget.add(path, "properties", len(members))
                if key == "patternProperties":
                    for name in members:
                        _check_pattern(name, f"{path}.patternProperties", budget)
                stack += [(sub, f"{path}.{key}.{name}", depth + 1) for name, sub in members.items()]
        for key in ("additionalProperties", "unevaluatedProperties", "propertyNames", "items"):
            if key in node:
                stack.append((node[key], f"{path}.{key}", depth + 1))
        for key in ("prefixItems", "anyOf"):
            if key in node:
                if not isinstance(node[key], list) or not node[key]:
                    raise _bad(f"{path}.{key}", "must be a non-empty array of subschemas", "invalid_schema")
                stack += [(sub, f"{path}.{key}[{i}]", depth + 1) for i, sub in enumerate(node[key])]
        for key in ("enum", "const", "default", "examples"):
            if key in node:
                if key in ("enum", "const"):
                    budget.add(path, "enum", len(node[key]) if key == "enum" and isinstance(node[key], list) else 1)
                if _json_depth(node[key], limits.max_schema_depth) > limits.max_schema_depth:
                    raise _bad(f"{path}.{key}", f"nested more than {limits.max_schema_depth} levels deep",
                               "schema_too_deep")
        if "$ref" in node:
            _resolve_ref(root, node["$ref"], f"{path}.$ref")
        if isinstance(node.get("pattern"), str):
            _check_pattern(node["pattern"], f"{path}.pattern", budget)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if _is_num(node.get(key)) and abs(node[key]) > limits.max_schema_number:
                raise _bad(f"{path}.{key}", f"bounds beyond ±{limits.max_schema_number:g} are not supported",
                           "schema_too_large")
        if "format" in node and node["format"] not in SCHEMA_FORMATS:
            raise ApiError(400, f"Invalid '{path}.format': {json.dumps(node['format'])[:60]} cannot be enforced by "
                           f"the grammar; supported formats: {', '.join(sorted(SCHEMA_FORMATS))}.",
                           param=f"{path}.format", code="unsupported_schema_keyword")
        if "multipleOf" in node and (node.get("type") != "integer" or not _is_int(node["multipleOf"])):
            raise _bad(f"{path}.multipleOf", "only enforced as an integer multiple on integers (type: 'integer')",
                       "unsupported_schema_keyword")


def _check_pattern(pattern: str, param: str, budget: SchemaBudget) -> None:
    """A regex the grammar can enforce, counted against the request's regex budget: xgrammar expands
    bounded repetitions copy by copy (``x{1,20000}`` compiled for 224 s), so its size is counted that way."""
    try:
        re.compile(pattern)
        size = _regex_size(re._parser.parse(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise _bad(param, f"not a valid regular expression ({_printable(str(err), 200)})", "invalid_schema") from None
    if _REGEX_UNSUPPORTED.search(pattern):
        raise _bad(param, "lookaround, backreferences, word boundaries and \\p{..} classes cannot be enforced by "
                   "the grammar", "unsupported_schema_keyword")
    budget.add(param, "regex", size)


def _regex_size(items) -> int:
    """Literal and class items, with each bounded repetition's body counted once per copy."""
    from re import _constants as c

    total = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)):
            low, high, body = av
            total += max(high if high != c.MAXREPEAT else low, 1) * _regex_size(body)
        elif op is c.SUBPATTERN:
            total += _regex_size(av[-1])
        elif op is c.BRANCH:
            total += sum(_regex_size(branch) for branch in av[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            total += _regex_size(av[1])
        else:
            total += 1
    return total


def _schema(schema, param: str, budget: SchemaBudget) -> dict:
    import jsonschema

    if not isinstance(schema, dict):
        raise _bad(param, "a JSON schema must be an object", "invalid_type")
    _check_schema(schema, param, budget)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise _bad(param, f"not a valid JSON schema: {_printable(err.message, 300)}", "invalid_schema") from None
    except RecursionError:
        raise _bad(param, "not a valid JSON schema (nested too deeply)", "invalid_schema") from None
    return schema


def _tool_parameters(params, param: str, budget: SchemaBudget) -> dict:
    """A tool's parameters schema, which must describe an object (a call's arguments are a JSON object)."""
    if params is None:
        return {"type": "object", "properties": {}}
    _schema(params, param, budget)
    target, seen = params, set()
    while isinstance(target, dict) and "$ref" in target and id(target) not in seen:
        seen.add(id(target))
        target = _resolve_ref(params, target["$ref"], f"{param}.$ref")
    kind = target.get("type") if isinstance(target, dict) else None
    if kind in ("object", ["object"]):
        return params
    if target is params and kind is None and not {"anyOf", "enum", "const"} & params.keys():
        return {**params, "type": "object"}  # {} or {"properties": ...}: the object is implied
    raise _bad(param, "must describe an object: give the top level \"type\": \"object\" (a call's arguments are "
               f"a JSON object), found {json.dumps(kind) if kind is not None else 'no object type'}", "invalid_schema")


def _tools(v, budget: SchemaBudget) -> list[dict]:
    if not isinstance(v, list):
        raise _bad("tools", "expected an array of tools", "invalid_type")
    cap = budget.limits.max_tools
    if len(v) > cap:
        raise _bad("tools", f"{len(v)} tools; at most {cap} are allowed")
    out, names = [], set()
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise _bad(p, "expected {type: 'function', function: {name, description, parameters}}", "invalid_type")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _bad(f"{p}.function.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        if name in names:
            raise _bad(f"{p}.function.name", f"duplicate tool name {name!r}")
        names.add(name)
        entry = {"name": name, "parameters": _tool_parameters(fn.get("parameters"), f"{p}.function.parameters", budget)}
        if fn.get("description") is not None:
            entry["description"] = _text(fn["description"], f"{p}.function.description")
        out.append({"type": "function", "function": entry})
    return out


def _stop(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 4:
        raise _bad("stop", "expected a string or an array of at most 4 strings", "invalid_type")
    return [_text(s, "stop", allow_empty=False) for s in stops]


def _logit_bias(v, vocab_size: int, cap: int) -> Tensor | None:
    """logit_bias -> one (V,) vector added to each step's logits (one add, however many entries)."""
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise _bad("logit_bias", "expected a map from token id to bias", "invalid_type")
    if len(v) > cap:
        raise _bad("logit_bias", f"{len(v)} entries; at most {cap} are allowed")
    bias = torch.zeros(vocab_size)
    for k, b in v.items():
        if not re.fullmatch(r"\d{1,9}", k) or int(k) >= vocab_size:
            raise _bad("logit_bias", f"token id {k[:20]!r} is not in [0, {vocab_size})")
        if not _is_num(b) or not -100 <= b <= 100:
            raise _bad("logit_bias", f"bias for token {k} must be a number between -100 and 100")
        bias[int(k)] = float(b)
    return bias


# ---------------------------------------------------------------------------------------------------
# Grammars (xgrammar)
# ---------------------------------------------------------------------------------------------------


class Grammars:
    """Compiles the grammars of a request against this tokenizer; masks tokens per sequence."""

    def __init__(self, tokenizer, vocab_size: int, limits: Limits | None = None, metrics: "Metrics | None" = None):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.limits, self.metrics = limits or Limits(), metrics
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=256 << 20)
        # A compilation cannot be interrupted: its time is bounded by the schema caps (Limits), and the
        # number running at once by these slots, so hostile schemas cannot take every request thread.
        self.slots = threading.BoundedSemaphore(self.limits.compile_slots)
        # Special tokens have their marker text in the vocabulary, so a grammar would accept
        # "<|END_TURN..|>" inside a JSON string; inside constrained spans they are masked out.
        special = set(tokenizer.all_special_ids) | {i for i in tokenizer.added_tokens_decoder if i < vocab_size}
        # Raw control characters are never needed in compact JSON (escapes are), but xgrammar 0.2's
        # maxLength string rule admits them and json.loads rejects them: mask such tokens as well.
        special |= {i for i, b in enumerate(self.info.decoded_vocab[:vocab_size]) if any(c < 0x20 for c in bytes(b))}
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[sorted(special)] = True

    def _compile(self, build: Callable[[], object], param: str):
        if not self.slots.acquire(timeout=self.limits.compile_wait_s):
            raise ApiError(503, "The server is busy compiling grammars for other requests; retry shortly.",
                           code="grammar_compiler_busy")
        start = time.perf_counter()
        try:
            return build()
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError / InvalidJSONError for unsupported schemas
            raise _bad(param, f"schema cannot be compiled to a grammar: {_library_message(err)}",
                       "invalid_schema") from None
        finally:
            self.slots.release()
            if self.metrics is not None:
                self.metrics.compile_seconds.observe(time.perf_counter() - start)

    def json(self, schema: dict | None, param: str):
        """response_format: a JSON schema, or any JSON object (json_object) when schema is None."""
        if schema is None:
            return self._compile(lambda: self.compiler.compile_json_schema(
                {"type": "object"}, any_whitespace=False, strict_mode=False), param)
        return self._compile(lambda: self.compiler.compile_json_schema(schema, any_whitespace=False), param)

    def tools(self, tools: list[dict], parallel: bool):
        """The action block: a JSON list of calls in ``chat.render_tool_calls``' layout, each call's
        parameters constrained by that tool's schema."""
        xgr = self.xgr

        def build():
            named, alts = {}, []
            for i, t in enumerate(tools):
                fn = t["function"]
                try:
                    named[f"p{i}"] = xgr.Grammar.from_json_schema(fn["parameters"], any_whitespace=False)
                except Exception as err:  # noqa: BLE001
                    raise _bad(f"tools[{i}].function.parameters", "schema cannot be compiled to a grammar: "
                               f"{_library_message(err)}", "invalid_schema") from None
                head = json.dumps('{"tool_call_id": "')
                mid = json.dumps('", "tool_name": ' + json.dumps(fn["name"]) + ', "parameters": ')
                alts.append(f"c{i}: {head} ID {mid} @p{i} \"}}\"")
            start = 'start: "[" call ("," " " call)* "]"' if parallel else 'start: "[" call "]"'
            lark = "\n".join([start, "call: " + " | ".join(f"c{i}" for i in range(len(tools))), *alts,
                              "ID: /[0-9]{1,3}/"])
            return self.compiler.compile_lark(lark, named_grammars=named)
        return self._compile(build, "tools")

    def matcher(self, compiled, stop_token: int):
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=[stop_token])

    def mask(self, matcher, logits: Tensor, allow: int) -> None:
        """In place: -inf where the grammar forbids a token, and on special tokens other than ``allow``."""
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
        special = self.special.clone()
        special[allow] = False
        logits[:, special] = float("-inf")


# ---------------------------------------------------------------------------------------------------
# Tool-call streaming: turn the growing action text into OpenAI tool-call deltas
# ---------------------------------------------------------------------------------------------------

_CALL_HEAD = re.compile(r'\s*(?:\}\s*)?[\[,]\s*\{\s*"tool_call_id"\s*:\s*"(?:[^"\\]|\\.)*"\s*,\s*"tool_name"\s*:\s*'
                        r'"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*')


class ActionStream:
    """Incremental parser of ``[{"tool_call_id": .., "tool_name": .., "parameters": {..}}, ...]``: a call's
    header delta (index, id, type, name) as soon as its name is complete, then its arguments in one delta
    once they are complete and ``check(name, arguments)`` accepted them (a JSON-schema validation, so no
    argument text reaches a client before it is known valid). Brace depth is tracked outside strings, so
    the call object's own closing brace is never part of the arguments."""

    def __init__(self, check: Callable[[str, str], None] | None = None):
        self.buf = ""
        self.pos = 0
        self.calls: list[dict] = []   # {"id", "name", "arguments"}
        self.depth = -1               # -1: between calls; >= 0: nesting inside the parameters
        self.in_string = self.escape = False
        self.check = check

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        deltas = []
        while True:
            if self.depth < 0:
                m = _CALL_HEAD.match(self.buf, self.pos)
                if not m:
                    return deltas
                call = {"id": "call_" + secrets.token_hex(12), "name": json.loads(f'"{m.group(1)}"'), "arguments": ""}
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                               "function": {"name": call["name"], "arguments": ""}})
                self.pos, self.depth = m.end(), 0
            if self.depth == 0:  # the value has not started: skip the separator's whitespace
                while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                    self.pos += 1
            start, closed = self.pos, False
            while self.pos < len(self.buf) and not closed:
                c = self.buf[self.pos]
                self.pos += 1
                if self.in_string:
                    self.escape, self.in_string = (False, True) if self.escape else (c == "\\", c != '"')
                elif c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    closed = self.depth == 0
            call = self.calls[-1]
            call["arguments"] += self.buf[start:self.pos]
            if not closed:
                return deltas
            if self.check is not None:
                self.check(call["name"], call["arguments"])
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": call["arguments"]}})
            self.depth = -1

    def flush(self) -> list[dict]:
        """The arguments of a call cut off by max_tokens (incomplete, so not validated; finish_reason 'length')."""
        if self.depth < 0 or not self.calls or not self.calls[-1]["arguments"]:
            return []
        return [{"index": len(self.calls) - 1, "function": {"arguments": self.calls[-1]["arguments"]}}]


# ---------------------------------------------------------------------------------------------------
# Jobs and sequences
# ---------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """Everything the worker needs for one request (already validated)."""
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    chat: bool
    first_tokens: list[int] = field(default_factory=list)  # chat: allowed openers of the assistant turn
    tool_grammar: object = None
    json_grammar: object = None
    logprobs: int | None = None
    logit_bias: Tensor | None = None   # (V,) added to every step's logits
    tool_schemas: dict[str, dict] = field(default_factory=dict)

    def check_call(self, name: str, arguments: str) -> None:
        """Validate a generated call against its tool's schema before anything of it is returned."""
        import jsonschema

        schema = self.tool_schemas.get(name)
        try:
            value = json.loads(arguments)
            if schema is None or not isinstance(value, dict):
                raise ValueError("not a JSON object of a known tool")
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema).validate(value)
        except (ValueError, RecursionError, jsonschema.ValidationError) as err:
            raise ApiError(500, f"the model's call of {name!r} does not match the tool's schema "
                           f"({_library_message(err)}); it was not returned", code="invalid_tool_call") from None


@dataclass
class Delta:
    index: int
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class Job:
    def __init__(self, spec: Spec, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_tokens = sum(len(p) for p in spec.prompts)
        self.completion_tokens = 0
        self.open = spec.n * len(spec.prompts)

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # event loop closed (shutdown)
            self.cancelled = True


def _deliver(items: list[tuple[Job, tuple]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class Sequence:
    """One choice being decoded: phase state machine, grammar matcher, text assembly."""

    def __init__(self, job: Job, index: int, ids: "TokenIds", grammars: Grammars | None, tokenizer):
        spec = job.spec
        self.job, self.index, self.ids, self.grammars = job, index, ids, grammars
        self.params = spec.params
        self.phase = "open" if spec.chat else "text"
        self.text = TextState(tokenizer, list(spec.params.stop))
        self.action = ActionStream(spec.check_call)
        self.action_text = TextState(tokenizer, [])
        self.matcher = None
        self.stop_ids = ids.chat_stops if spec.chat else ids.completion_stops
        self.tokens = 0
        self.finish: str | None = None
        self.made_calls = False
        seed = (spec.params.seed + index) % (1 << 63) if spec.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, raw: Tensor) -> int:
        """raw (1, V) -> next token, constrained by the current phase."""
        bias = self.job.spec.logit_bias
        logits = raw + bias if bias is not None else raw.clone()
        if self.phase == "open":
            allowed = torch.full_like(logits, float("-inf"))
            allowed[0, self.job.spec.first_tokens] = logits[0, self.job.spec.first_tokens]
            logits = allowed
        elif self.phase in ("json", "action"):
            self.grammars.mask(self.matcher, logits, self.ids.end_response if self.phase == "json" else self.ids.end_action)
        return int(sample(logits, self.params, self.generator))

    def advance(self, token: int, raw: Tensor) -> Delta:
        """Take the sampled token; return what the client should see."""
        self.tokens += 1
        last = self.tokens >= self.params.max_new_tokens
        delta = Delta(self.index)
        spec = self.job.spec
        if self.phase == "open":
            if token == self.ids.start_action:
                self.phase, self.made_calls = "action", True
                self.matcher = self.grammars.matcher(spec.tool_grammar, self.ids.end_action)
            else:
                self.phase = "json" if spec.json_grammar is not None else "text"
                if self.phase == "json":
                    self.matcher = self.grammars.matcher(spec.json_grammar, self.ids.end_response)
            if last:
                self.finish = "length"
        elif self.phase == "action":
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected token {token} it allowed")
            if token == self.ids.end_action:
                self.finish = "tool_calls"
            else:
                self.action_text.push(token, False, last)
                delta.tool_calls = self.action.feed(self.action_text.ready())
                if last:
                    delta.tool_calls += self.action.flush()
                    self.finish = "length"
        else:
            if self.phase == "json" and not self.matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected token {token} it allowed")
            is_stop = token in self.stop_ids if self.phase == "text" else token == self.ids.end_response
            if spec.logprobs is not None and not is_stop:
                delta.logprobs.append(self.ids.logprob_entry(raw, token, spec.logprobs))
            self.text.push(token, is_stop, last)
            delta.text = self.text.ready()
            self.finish = self.text.finish
        delta.finish_reason = self.finish
        return delta


class TokenIds:
    """Ids of the chat markers in this tokenizer, and per-token bytes for logprobs."""

    def __init__(self, tokenizer, vocab_size: int, token_bytes: list[bytes]):
        def tid(t):
            i = tokenizer.convert_tokens_to_ids(t)
            return i if isinstance(i, int) and i != tokenizer.unk_token_id and 0 <= i < vocab_size else None

        self.start_response, self.end_response = tid(chat.START_RESPONSE), tid(chat.END_RESPONSE)
        self.start_action, self.end_action = tid(chat.START_ACTION), tid(chat.END_ACTION)
        eos = tokenizer.eos_token_id
        self.chat_stops = {i for i in (self.end_response, tid(chat.END_TURN), eos) if i is not None}
        self.completion_stops = {i for i in (eos, tid(chat.END_TURN)) if i is not None}
        self.token_bytes = token_bytes

    def logprob_entry(self, raw: Tensor, token: int, top: int) -> dict:
        lp = torch.log_softmax(raw[0].float(), -1)

        def one(i: int) -> dict:
            b = self.token_bytes[i] if i < len(self.token_bytes) else b""
            return {"token": b.decode("utf-8", errors="replace"), "logprob": float(lp[i]), "bytes": list(b)}

        entry = one(token)
        entry["top_logprobs"] = [one(i) for i in lp.topk(top).indices.tolist()] if top else []
        return entry


# ---------------------------------------------------------------------------------------------------
# Engine: one worker thread, continuous batching over the recurrent state
# ---------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, tokenizer, limits: Limits, metrics: "Metrics"):
        self.model, self.tokenizer, self.limits, self.metrics = model, tokenizer, limits, metrics
        vocab = model.cfg.vocab_size
        self.grammars = Grammars(tokenizer, vocab, limits, metrics)
        self.ids = TokenIds(tokenizer, vocab, [bytes(b) if isinstance(b, bytes) else str(b).encode()
                                               for b in self.grammars.info.decoded_vocab])
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.held: Job | None = None  # taken from the queue, waiting for room in the next prefill
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="aetheris-decode", daemon=True)
        self.threads_before = torch.get_num_threads()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        torch.set_num_threads(self.threads_before)  # the setting is process-wide (matters when embedded)

    def submit(self, job: Job) -> None:
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            self.metrics.errors.labels("queue_full").inc()
            raise ApiError(429, f"The server is busy ({self.limits.max_queue} requests waiting); retry shortly.",
                           code="queue_full") from None
        self.metrics.queue_depth.set(self.pending.qsize())

    def _prefill(self, jobs: list[Job]) -> tuple[list[Sequence], Tensor, AetherisCache]:
        """All newly admitted prompts in one left-padded chunked-scan pass; each prompt's state is then
        repeated for its n choices."""
        prompts = [ids for job in jobs for ids in job.spec.prompts]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        device = self.model.embed.weight.device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.model(input_ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None,
                         logits_to_keep=1)
        seqs, rows, p = [], [], 0
        for job in jobs:
            for k in range(len(job.spec.prompts)):
                rows += [p] * job.spec.n
                seqs += [Sequence(job, k * job.spec.n + j, self.ids, self.grammars, self.tokenizer)
                         for j in range(job.spec.n)]
                p += 1
        rows_t = torch.tensor(rows, device=device)
        return seqs, out.logits[:, -1].float()[rows_t], out.cache.select(rows_t)

    @torch.no_grad()
    def _loop(self) -> None:
        # Leave a core to the event loop: OpenMP threads spinning at their barriers while the HTTP side
        # holds a core and the GIL slow decoding ~50x on a 2-core CPU (measured; see docs/SERVING.md).
        torch.set_num_threads(self.limits.threads or max(1, (os.cpu_count() or 2) - 1))
        seqs: list[Sequence] = []
        logits: Tensor | None = None
        cache: AetherisCache | None = None
        while not self.stopping.is_set():
            # 1. Admit waiting jobs (block briefly when idle) and prefill them together, once.
            # The padded prefill is bounded (rows x longest prompt <= prefill_tokens); a job that would
            # exceed it waits for the next step (``held``), so one long prompt never stalls the batch for long.
            admitted, room, rows, longest = [], self.limits.max_batch - len(seqs), 0, 0
            while room > 0:
                job, self.held = self.held, None
                try:
                    job = job or (self.pending.get(timeout=0.05) if not (seqs or admitted) else self.pending.get_nowait())
                except queue.Empty:
                    break
                if job.cancelled:
                    continue
                new_rows, new_longest = rows + len(job.spec.prompts), max([longest, *map(len, job.spec.prompts)])
                if admitted and new_rows * new_longest > self.limits.prefill_tokens:
                    self.held = job
                    break
                admitted.append(job)
                room, rows, longest = room - job.open, new_rows, new_longest
            self.metrics.queue_depth.set(self.pending.qsize())
            if admitted:
                try:
                    new, new_logits, new_cache = self._prefill(admitted)
                except Exception as err:  # noqa: BLE001 - reported to the clients, the worker keeps serving
                    self.metrics.errors.labels("prefill").inc()
                    for job in admitted:
                        job.emit(("error", ApiError(500, f"prefill failed: {_library_message(err)}")))
                else:
                    seqs += new
                    logits = new_logits if logits is None else torch.cat([logits, new_logits])
                    cache = new_cache if cache is None else cache.cat(new_cache)
            self.metrics.active.set(len(seqs))
            if not seqs:
                continue
            # 2. One token per running sequence (per-row sampling: each has its own seed and constraints).
            tokens, keep, by_job = [], [], {}
            now = time.perf_counter()
            for i, s in enumerate(seqs):
                if s.job.cancelled:
                    continue
                try:
                    tok = s.choose(logits[i:i + 1])
                    delta = s.advance(tok, logits[i:i + 1])
                except Exception as err:  # noqa: BLE001
                    self.metrics.errors.labels("decode").inc()
                    s.job.cancelled = True
                    s.job.emit(("error", err if isinstance(err, ApiError) else
                                ApiError(500, f"decoding failed: {_library_message(err)}")))
                    continue
                job = s.job
                job.completion_tokens += 1
                if job.first_token is None:
                    job.first_token = now
                    self.metrics.ttft.observe(now - job.arrival)
                by_job.setdefault(id(job), (job, []))[1].append(delta)
                if s.finish is None:
                    keep.append(i)
                    tokens.append(tok)
                else:
                    job.open -= 1
            outbox: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop per step, not per job
            for job, deltas in by_job.values():
                outbox.setdefault(job.loop, []).append((job, ("deltas", deltas)))
                if job.open == 0:
                    elapsed = max(time.perf_counter() - (job.first_token or job.arrival), 1e-9)
                    self.metrics.completion_tokens.inc(job.completion_tokens)
                    self.metrics.prompt_tokens.inc(job.prompt_tokens)
                    if job.completion_tokens > 1:
                        self.metrics.tokens_per_second.observe(job.completion_tokens / elapsed)
                    outbox[job.loop].append((job, ("done", {
                        "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                        "total_tokens": job.prompt_tokens + job.completion_tokens})))
            for loop, items in outbox.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # event loop closed (shutdown)
                    for job, _ in items:
                        job.cancelled = True
            # 3. Finished and cancelled rows leave the batch; the rest advance by one recurrent step.
            if len(keep) < len(seqs):
                seqs = [seqs[i] for i in keep]
                if not seqs:
                    logits = cache = None
                    continue
                cache = cache.select(torch.tensor(keep))
            logits = self.model.step(torch.tensor(tokens, dtype=torch.long, device=self.model.embed.weight.device),
                                     cache).float()


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("aetheris_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("aetheris_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("aetheris_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("aetheris_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.tokens_per_second = Histogram("aetheris_tokens_per_second", "per-request decode rate after the first token",
                                           buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)
        self.queue_depth = Gauge("aetheris_queue_depth", "requests waiting for the decode worker", registry=r)
        self.active = Gauge("aetheris_active_sequences", "sequences in the running decode batch", registry=r)
        self.errors = Counter("aetheris_errors", "errors by kind", ["kind"], registry=r)
        self.compile_seconds = Histogram("aetheris_grammar_compile_seconds", "one request's grammar compilation",
                                         buckets=(.001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)


# ---------------------------------------------------------------------------------------------------
# Request -> Spec
# ---------------------------------------------------------------------------------------------------


class Server:
    """State shared by the routes: model, tokenizer, engine, limits, metrics."""

    def __init__(self, model_name: str, limits: Limits, api_key: str | None):
        self.model_name, self.limits, self.api_key = model_name, limits, api_key
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: Exception | None = None
        self.model = self.tokenizer = None
        self.created = int(time.time())
        self.fingerprint = "fp_aetheris"

    # --- loading -----------------------------------------------------------------------------------
    def load(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        config = json.dumps(model.cfg.to_dict(), sort_keys=True).encode()
        self.fingerprint = "fp_" + hashlib.sha256(config).hexdigest()[:10]
        engine = Engine(model, tokenizer, self.limits, self.metrics)
        engine.start()
        self.engine = engine

    def ready(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "The model is still loading; retry shortly.", code="model_loading")
        return self.engine

    # --- shared fields -----------------------------------------------------------------------------
    def _model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise _bad("model", "expected a string", "invalid_type")
        if name != self.model_name:
            raise ApiError(404, f"The model '{name[:100]}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def _sampling(self, body: dict, max_tokens, default_max: int | None = None) -> SamplingParams:
        cap = self.limits.max_tokens
        if max_tokens is None:
            max_tokens = default_max or cap
        elif not _is_int(max_tokens):
            raise _bad("max_tokens", "expected an integer", "invalid_type")
        elif not 1 <= max_tokens <= cap:
            raise _bad("max_tokens", f"{max_tokens} is out of range; this server allows 1 to {cap}")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:  # the smallest nucleus is the top token: greedy
            temperature, top_p = 0.0, 1.0
        return SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                              top_k=_number(body, "top_k", 0, 0, 1 << 30, integer=True),
                              seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                              stop=_stop(body.get("stop")))

    def _stream(self, body: dict) -> tuple[bool, bool]:
        stream = _bool(body, "stream")
        opts = body.get("stream_options")
        if opts is None:
            return stream, False
        if not stream:
            raise _bad("stream_options", "only allowed when 'stream' is true")
        if not isinstance(opts, dict) or any(k not in ("include_usage", "include_obfuscation") for k in opts):
            raise _bad("stream_options", "expected {include_usage: boolean}", "invalid_type")
        return stream, _bool(opts, "include_usage")

    def _tokens(self, prompt_ids: list[int], param: str) -> list[int]:
        cap = min(self.limits.max_prompt_tokens, self.model.cfg.max_seq_len)
        if not prompt_ids:
            raise _bad(param, "the prompt encodes to zero tokens")
        if len(prompt_ids) > cap:
            raise ApiError(400, f"The prompt has {len(prompt_ids)} tokens; this server accepts at most {cap}. "
                           "Shorten the messages.", param=param, code="context_length_exceeded")
        return prompt_ids

    def _prompt_bytes(self, size: int, param: str) -> None:
        """Checked before tokenising, which costs seconds of CPU for megabytes of text."""
        cap = self.limits.max_prompt_bytes
        if size > cap:
            raise ApiError(400, f"The prompt is {size} bytes; this server accepts at most {cap} bytes (and "
                           f"{min(self.limits.max_prompt_tokens, self.model.cfg.max_seq_len)} tokens). "
                           "Shorten the messages.", param=param, code="context_length_exceeded")

    def _encode_chat(self, messages: list[dict], tools: list[dict]) -> list[int]:
        """The prompt's token ids. Only the template's own markers become control tokens: request text
        (contents, tool calls and results, tool definitions) is tokenised with special-token matching
        off, so ``<|END_OF_TURN_TOKEN|>`` typed by a user stays those characters."""
        tok = self.tokenizer
        if chat.uses_this_template(tok):
            parts = chat.render_parts(messages, tools=tools or None)
            self._prompt_bytes(sum(len(text.encode("utf-8")) for text, _ in parts), "messages")
            markers = [text for text, marker in parts if marker]
            texts = [text for text, marker in parts if not marker]
            marker_ids = iter(tok(markers, add_special_tokens=False)["input_ids"]) if markers else iter(())
            text_ids = iter(tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if texts \
                else iter(())
            ids = [i for _, marker in parts for i in next(marker_ids if marker else text_ids)]
            return self._tokens(ids, "messages")
        # A checkpoint's own template renders one string, where request text cannot be told apart from
        # markers: refuse request text that spells a special token instead.
        request_text = json.dumps([messages, tools], ensure_ascii=False)
        for marker in self.special_texts:
            if marker in request_text:
                raise _bad("messages", f"the text contains the control token {marker}, which this model's chat "
                           "template cannot keep apart from its own markers; remove it")
        try:
            prompt = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template that cannot render these messages
            raise _bad("messages", f"the model's chat template cannot render them: {_library_message(err)}") from None
        prompt = prompt.removesuffix(chat.START_RESPONSE)
        self._prompt_bytes(len(prompt.encode("utf-8")), "messages")
        return self._tokens(tok(prompt, add_special_tokens=False)["input_ids"], "messages")

    @property
    def special_texts(self) -> list[str]:
        tok = self.tokenizer
        return sorted({str(t) for t in tok.all_special_tokens} | {str(t) for t in tok.added_tokens_decoder.values()
                                                                   if getattr(t, "special", False)})

    # --- /v1/chat/completions ----------------------------------------------------------------------
    def chat_spec(self, body: dict) -> tuple[Spec, bool, bool]:
        # Order: cheap checks first, then rendering + the prompt's size, and grammar compilation (the
        # expensive part) only for a request that is otherwise acceptable.
        _check_fields(body, CHAT_FIELDS)
        _valid_unicode(body)
        self._model(body)
        messages = _messages(body.get("messages"))
        budget = SchemaBudget(self.limits)
        tools = _tools(body["tools"], budget) if body.get("tools") is not None else []
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            max_tokens, key = body["max_completion_tokens"], "max_completion_tokens"
        else:
            max_tokens, key = body.get("max_tokens"), "max_tokens"
        try:
            params = self._sampling(body, max_tokens)
        except ApiError as err:
            if err.param == "max_tokens" and key != "max_tokens":
                err.param, err.message = key, err.message.replace("'max_tokens'", f"'{key}'")
            raise
        n = _number(body, "n", 1, 1, self.limits.max_n, integer=True)
        stream, include_usage = self._stream(body)
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not logprobs:
            raise _bad("top_logprobs", "requires 'logprobs' to be true")
        logit_bias = _logit_bias(body.get("logit_bias"), self.model.cfg.vocab_size, self.limits.max_logit_bias)
        ids = self.engine.ids
        grammars = self.engine.grammars
        # Tool choice -> which openers the assistant turn may start with.
        choice = body.get("tool_choice")
        if choice is not None and not tools and choice != "none":
            raise _bad("tool_choice", "only allowed when 'tools' are given")
        choice = choice if choice is not None else ("auto" if tools else "none")
        parallel = _bool(body, "parallel_tool_calls", True)
        call_tools = tools
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise _bad("tool_choice", "expected 'none', 'auto', 'required' or {type: 'function', function: {name}}")
            call_tools = [t for t in tools if t["function"]["name"] == name]
            if not call_tools:
                raise _bad("tool_choice", f"function {name[:64]!r} is not among the tools")
            openers, parallel = [ids.start_action], False
        elif choice == "none":
            openers = [ids.start_response]
        elif choice == "auto":
            openers = [ids.start_response, ids.start_action]
        elif choice == "required":
            openers = [ids.start_action]
        else:
            raise _bad("tool_choice", "expected 'none', 'auto', 'required' or {type: 'function', function: {name}}")
        if None in openers:
            raise ApiError(400, "this model's tokenizer lacks the chat markers (<|START_RESPONSE|>, <|START_ACTION|>)",
                           param="messages", code="unsupported_model")
        schema = self._response_format(body.get("response_format"), budget)
        prompt_ids = self._encode_chat(messages, tools)
        tool_grammar = grammars.tools(call_tools, parallel) if ids.start_action in openers else None
        json_grammar = None if schema is False else grammars.json(schema, "response_format.json_schema.schema")
        spec = Spec(prompts=[prompt_ids], n=n, params=params, chat=True, first_tokens=openers,
                    tool_grammar=tool_grammar, json_grammar=json_grammar,
                    logprobs=(top or 0) if logprobs else None, logit_bias=logit_bias,
                    tool_schemas={t["function"]["name"]: t["function"]["parameters"] for t in call_tools})
        return spec, stream, include_usage

    def _response_format(self, fmt, budget: SchemaBudget):
        """False for free text; None for any JSON object; else the JSON schema (checked, not yet compiled)."""
        if fmt is None:
            return False
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "expected {type: 'text' | 'json_object' | 'json_schema'}")
        if fmt["type"] == "text":
            return False
        if fmt["type"] == "json_object":
            return None
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("response_format.json_schema", "expected {name, schema, strict}", "invalid_type")
        return _schema(spec.get("schema", {}), "response_format.json_schema.schema", budget)

    # --- /v1/completions ---------------------------------------------------------------------------
    def completion_spec(self, body: dict) -> tuple[Spec, bool, bool, bool, list[str]]:
        _check_fields(body, COMPLETION_FIELDS)
        _valid_unicode(body)
        self._model(body)
        if body.get("suffix") is not None:
            raise ApiError(400, "'suffix' is not supported", param="suffix", code="unsupported_parameter")
        prompt = body.get("prompt")
        vocab = self.model.cfg.vocab_size
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                         for p in prompt):
            prompts = prompt
        else:
            raise _bad("prompt", "expected a string, an array of strings, or token ids", "invalid_type"
                       if prompt is not None else "missing_required_parameter")
        if len(prompts) > self.limits.max_batch:
            raise _bad("prompt", f"{len(prompts)} prompts; at most {self.limits.max_batch} per request")
        ids, texts = [], []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                _text(p, param, allow_empty=False)
                self._prompt_bytes(len(p.encode("utf-8")), param)
                ids.append(self._tokens(self.tokenizer(p)["input_ids"], param))
                texts.append(p)
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise _bad(param, f"token ids must be in [0, {vocab})")
                ids.append(self._tokens(list(p), param))
                texts.append(self.tokenizer.decode(p, skip_special_tokens=False))
        params = self._sampling(body, body.get("max_tokens"), default_max=16)
        n = _number(body, "n", 1, 1, self.limits.max_n, integer=True)
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise ApiError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported_parameter")
        if len(prompts) * n > self.limits.max_batch:
            raise _bad("n", f"{len(prompts)} prompts x n={n} exceeds {self.limits.max_batch} sequences per request")
        stream, include_usage = self._stream(body)
        logprobs = _number(body, "logprobs", None, 0, 5, integer=True)
        echo = _bool(body, "echo")
        if echo and logprobs is not None:
            raise ApiError(400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported",
                           param="echo", code="unsupported_parameter")
        spec = Spec(prompts=ids, n=n, params=params, chat=False, logprobs=logprobs,
                    logit_bias=_logit_bias(body.get("logit_bias"), vocab, self.limits.max_logit_bias))
        return spec, stream, include_usage, echo, texts


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


def create_app(model=None, tokenizer=None, *, loader: Callable[[], tuple] | None = None, model_name: str = "aetheris",
               api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app. Give ``model`` + ``tokenizer`` (ready at once), or a ``loader`` returning them,
    run in the background at startup while ``/health`` answers 503."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = Server(model_name, limits or Limits(), api_key)

    @asynccontextmanager
    async def lifespan(app):
        def load():
            try:
                m, t = (model, tokenizer) if loader is None else loader()
                server.load(m, t)
            except Exception as err:  # noqa: BLE001
                server.load_error = err
        if loader is None:
            load()
            if server.load_error is not None:
                raise server.load_error
        else:
            threading.Thread(target=load, daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.stop()

    # No slash redirects (a POST answered with 307 is lost on many clients: the trailing slash is
    # dropped by the outer wrapper instead); the docs routes are defined below, behind the API key.
    app = FastAPI(title="Aetheris", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        if err.status >= 400:
            server.metrics.errors.labels(err.code or err.type).inc()
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request, err):
        server.metrics.errors.labels("internal").inc()
        return error_response(ApiError(500, f"internal error: {err.__class__.__name__}"))

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); the key is compared in constant time.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        cap = server.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
        raw = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                raw.extend(chunk)
                if len(raw) > cap:
                    raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
        try:  # a client trickling its body byte by byte must not hold the connection for ever
            await asyncio.wait_for(read(), server.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {server.limits.body_timeout_s:g} s.",
                           code="request_timeout") from None
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(400, f"Request body is not valid UTF-8 (byte {err.start}).", code="invalid_utf8") from None

        def no_constants(name):
            raise ValueError(f"{name} is not valid JSON")
        try:
            body = json.loads(text, parse_constant=no_constants)
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"We could not parse the JSON body of your request ({str(err)[:200]}). "
                           "Send a JSON object.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    async def watch_disconnect(job: Job, request: Request) -> None:
        """Poll the connection on a timer, whatever the request kind: a client that went away (a closed
        stream, an abandoned non-streaming request, one still waiting in the queue) cancels its job."""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                job.cancelled = True
                job.events.put_nowait(("gone", None))
                return

    async def wait_events(job: Job, request: Request) -> AsyncIterator:
        """The job's events until it is done, failed, or its client went away (then it is cancelled)."""
        watcher = asyncio.create_task(watch_disconnect(job, request))
        try:
            while True:
                event = await job.events.get()
                if event[0] == "gone":
                    return
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            watcher.cancel()
            job.cancelled = True

    async def submit(request: Request, build) -> tuple[Job, tuple]:
        authorize(request)
        body = await read_json(request)
        engine = server.ready()
        built = await run_in_threadpool(build, body)  # tokenising and grammar compiling stay off the event loop
        job = Job(built[0], asyncio.get_running_loop())
        engine.submit(job)
        return job, built

    # --- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if server.engine is None:
            detail = f"failed to load: {server.load_error}" if server.load_error else "loading"
            return JSONResponse({"status": detail}, status_code=503)
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        authorize(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        authorize(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Aetheris API")

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        authorize(request)
        if server.engine is not None:
            server.metrics.queue_depth.set(server.engine.pending.qsize())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "aetheris"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        authorize(request)
        if name != server.model_name:
            raise ApiError(404, f"The model '{name[:100]}' does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job, (spec, stream, include_usage) = await submit(request, server.chat_spec)
        rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                "system_fingerprint": server.fingerprint}
        n_choices = spec.n
        if stream:
            async def sse():
                def chunk(choices, usage=None):
                    out = {**head, "choices": choices}
                    if include_usage:
                        out["usage"] = usage
                    return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"
                for i in range(n_choices):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None},
                                  "logprobs": None, "finish_reason": None}])
                async for event in wait_events(job, request):
                    if event[0] == "error":
                        yield "data: " + json.dumps(event[1].body()) + "\n\n"
                        return
                    if event[0] == "done":
                        if include_usage:
                            yield chunk([], event[1])
                        yield "data: [DONE]\n\n"
                        return
                    for d in event[1]:
                        delta = {}
                        if d.text:
                            delta["content"] = d.text
                        if d.tool_calls:
                            delta["tool_calls"] = d.tool_calls
                        if not delta and d.finish_reason is None:
                            continue
                        lp = {"content": d.logprobs, "refusal": None} if spec.logprobs is not None and d.logprobs \
                            else None
                        if delta:
                            yield chunk([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                            lp = None
                        if d.finish_reason is not None:
                            yield chunk([{"index": d.index, "delta": {}, "logprobs": lp,
                                          "finish_reason": d.finish_reason}])
            return StreamingResponse(_cancel_on_exit(sse(), job, server.metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [""] * n_choices
        calls: list[dict[int, dict]] = [{} for _ in range(n_choices)]
        logprobs: list[list] = [[] for _ in range(n_choices)]
        finish = [None] * n_choices
        usage = None
        async for event in wait_events(job, request):
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                usage = event[1]
                break
            for d in event[1]:
                texts[d.index] += d.text
                logprobs[d.index] += d.logprobs
                for tc in d.tool_calls:
                    entry = calls[d.index].setdefault(tc["index"], {"id": None, "type": "function",
                                                                    "function": {"name": "", "arguments": ""}})
                    entry["id"] = tc.get("id", entry["id"])
                    entry["function"]["name"] += tc.get("function", {}).get("name", "")
                    entry["function"]["arguments"] += tc.get("function", {}).get("arguments", "")
                if d.finish_reason is not None:
                    finish[d.index] = d.finish_reason
        if usage is None:  # client went away
            return Response(status_code=499)
        choices = []
        for i in range(n_choices):
            message = {"role": "assistant", "content": texts[i] if (texts[i] or not calls[i]) else None,
                       "refusal": None}
            if calls[i]:
                message["tool_calls"] = [calls[i][k] for k in sorted(calls[i])]
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": logprobs[i], "refusal": None} if spec.logprobs is not None else None,
                            "finish_reason": finish[i]})
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                "system_fingerprint": server.fingerprint, "choices": choices, "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        job, (spec, stream, include_usage, echo, prompt_texts) = await submit(request, server.completion_spec)
        rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "system_fingerprint": server.fingerprint}
        n_choices = spec.n * len(spec.prompts)

        def completion_logprobs(entries: list[dict], offset: int) -> dict:
            tokens, lps, tops, offsets = [], [], [], []
            for e in entries:
                tokens.append(e["token"])
                lps.append(e["logprob"])
                tops.append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
                offsets.append(offset)
                offset += len(e["token"])
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        if stream:
            async def sse():
                def chunk(choices, usage=None):
                    out = {**head, "choices": choices}
                    if include_usage:
                        out["usage"] = usage
                    return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"
                offsets = [0] * n_choices
                if echo:
                    for i in range(n_choices):
                        offsets[i] = len(prompt_texts[i // spec.n])
                        yield chunk([{"index": i, "text": prompt_texts[i // spec.n], "logprobs": None,
                                      "finish_reason": None}])
                async for event in wait_events(job, request):
                    if event[0] == "error":
                        yield "data: " + json.dumps(event[1].body()) + "\n\n"
                        return
                    if event[0] == "done":
                        if include_usage:
                            yield chunk([], event[1])
                        yield "data: [DONE]\n\n"
                        return
                    for d in event[1]:
                        if not d.text and d.finish_reason is None:
                            continue
                        lp = completion_logprobs(d.logprobs, offsets[d.index]) if spec.logprobs is not None else None
                        offsets[d.index] += len(d.text)
                        yield chunk([{"index": d.index, "text": d.text, "logprobs": lp,
                                      "finish_reason": d.finish_reason}])
            return StreamingResponse(_cancel_on_exit(sse(), job, server.metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [prompt_texts[i // spec.n] if echo else "" for i in range(n_choices)]
        entries: list[list] = [[] for _ in range(n_choices)]
        finish = [None] * n_choices
        usage = None
        async for event in wait_events(job, request):
            if event[0] == "error":
                raise event[1]
            if event[0] == "done":
                usage = event[1]
                break
            for d in event[1]:
                texts[d.index] += d.text
                entries[d.index] += d.logprobs
                if d.finish_reason is not None:
                    finish[d.index] = d.finish_reason
        if usage is None:
            return Response(status_code=499)
        choices = [{"index": i, "text": texts[i], "finish_reason": finish[i],
                    "logprobs": completion_logprobs(entries[i], 0) if spec.logprobs is not None else None}
                   for i in range(n_choices)]
        return {**head, "choices": choices, "usage": usage}

    from . import playground

    playground.add_routes(app)  # GET /: the chat playground page, GET /static/{name}: its script and styles

    return _Gate(app, server)


DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there


async def _cancel_on_exit(chunks: AsyncIterator[str], job: Job, metrics: Metrics) -> AsyncIterator[str]:
    """SSE body that cancels its job however the stream ends (done, error, or the client went away); a
    fault after the 200 was sent becomes an error event, so the stream still ends cleanly."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:  # noqa: BLE001
        metrics.errors.labels("internal").inc()
        error = err if isinstance(err, ApiError) else ApiError(500, f"internal error: {err.__class__.__name__}")
        yield "data: " + json.dumps(error.body()) + "\n\n"
    finally:
        job.cancelled = True


class _Gate:
    """Pure ASGI wrapper around the app (so streaming is untouched): drops a trailing slash, caps the
    requests in flight (503 in OpenAI's shape), turns any exception that escaped the app into a 500 in
    OpenAI's shape instead of a reset connection, and counts responses by path and status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.state = app.state
        self.in_flight = 0

    def __getattr__(self, name):  # routes, openapi(), etc. of the wrapped FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": scope.get("raw_path", b"").rstrip(b"/")}
        status, started = 500, False

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def send_error(err: ApiError) -> None:
            body = json.dumps(err.body()).encode()
            await send_status({"type": "http.response.start", "status": err.status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_status({"type": "http.response.body", "body": body})

        self.in_flight += 1
        try:
            if self.in_flight > self.server.limits.max_connections:
                self.server.metrics.errors.labels("too_many_requests").inc()
                await send_error(ApiError(503, f"The server is handling {self.server.limits.max_connections} requests "
                                          "already; retry shortly.", code="server_overloaded"))
                return
            await self.app(scope, receive, send_status)
        except Exception as err:  # noqa: BLE001 - the last line of defence: log it, answer in OpenAI's shape
            import logging

            logging.getLogger("aetheris.serve").error("unhandled error on %s", path, exc_info=err)
            if not started:
                await send_error(ApiError(500, f"internal error: {err.__class__.__name__}"))
        finally:
            self.in_flight -= 1
            label = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.server.metrics.requests.labels(label, str(status)).inc()


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def _h11_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on each request's head: a connection that has not sent
    complete headers within ``header_timeout_s`` of opening (or of its previous response) is closed, so
    slow-header (slowloris) connections cannot pile up. uvicorn's own timeout only covers idle keep-alive."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc):
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self):
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _head_timeout(self):
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutH11


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """uvicorn settings from the app's Limits: header/body deadlines, keep-alive, header size."""
    import uvicorn

    limits = app.state.server.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_h11_protocol(limits.header_timeout_s),
                          timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_graceful_shutdown=5)


# ---------------------------------------------------------------------------------------------------
# CLI: aetheris serve
# ---------------------------------------------------------------------------------------------------


API_KEY_ENV = "AETHERIS_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the 'model' clients send (default: folder name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /metrics and "
                        f"/docs (visible in ps: prefer --api-key-file or ${API_KEY_ENV})")
    parser.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on max_tokens per request")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                        help="rendered prompt size, checked before tokenising")
    parser.add_argument("--max-n", type=int, default=d.max_n)
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    parser.add_argument("--max-schema-properties", type=int, default=d.max_schema_properties,
                        help="JSON-schema properties per request (tools + response_format)")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="HTTP requests in flight before 503")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for decoding (0 = all cores but one)")
    parser.add_argument("--log-level", default="info")


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $AETHERIS_API_KEY; None when none is given."""
    from pathlib import Path

    key = args.api_key
    if key is None and args.api_key_file is not None:
        path = Path(args.api_key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file {args.api_key_file}: no such file")
        key = (path.read_text(encoding="utf-8").splitlines() or [""])[0]
    if key is None:
        key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError("the API key is empty; give a non-empty key (or none to serve without one)")
    return key.strip() if key is not None else None


def load_checkpoint(path: str, device: str = "cpu", dtype: str | None = None):
    """Model + tokenizer from a checkpoint folder; every problem is a clear error (never random weights)."""
    from pathlib import Path

    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder. Pass a checkpoint folder (config.json + "
                                "model.safetensors + tokenizer files), e.g. a distillation run's final/ folder.")
    model = load_model(folder, device=device, dtype=getattr(torch, dtype) if dtype else None)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model only "
                         f"{model.cfg.vocab_size}; they do not belong together")
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pathlib import Path

    for key in ("max_body_bytes", "max_tokens", "max_prompt_tokens", "max_prompt_bytes", "max_n", "max_queue",
                "max_batch", "max_schema_properties", "max_connections", "threads"):
        if getattr(args, key) < (0 if key == "threads" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    api_key = api_key_from(args)
    # Fail fast: load (strictly) before binding, so a bad checkpoint never becomes a running server.
    model, tokenizer = load_checkpoint(args.model, args.device, args.dtype)
    name = args.served_model_name or Path(args.model).expanduser().resolve().name
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_prompt_bytes=args.max_prompt_bytes, max_n=args.max_n,
                    max_queue=args.max_queue, max_batch=args.max_batch,
                    max_schema_properties=args.max_schema_properties, max_connections=args.max_connections,
                    threads=args.threads)
    # Grammar tables (TokenizerInfo over the vocabulary) build in the background while /health says 503.
    app = create_app(loader=lambda: (model, tokenizer), model_name=name, api_key=api_key, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"aetheris serve: warning: binding {args.host} without an API key exposes the model to the network")
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    return 0
