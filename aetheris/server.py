"""``aetheris serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for Aetheris checkpoints.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``
(503 while warming up), ``GET /metrics`` (Prometheus). Request and response shapes, SSE chunks and the
error object follow the OpenAI API reference (platform.openai.com/docs/api-reference/chat/create,
/completions/create, /chat-streaming, and "Error codes"); the official ``openai`` client is the test driver.

How a request flows:

1. The handler reads the body (size-capped), validates every field by hand so an error names the
   field (``ApiError`` -> ``{"error": {message, type, param, code}}``), renders the prompt with
   ``aetheris.chat`` (or the checkpoint's own chat template when it has a different one), tokenises
   it, and compiles the grammars it needs with xgrammar (github.com/mlc-ai/xgrammar: TokenizerInfo,
   GrammarCompiler.compile_json_schema / compile_lark, GrammarMatcher, token bitmasks).
2. It puts a ``Job`` on the engine's bounded queue (full -> 429). One worker thread owns the model and
   runs *continuous batching*: each new job is prefilled once with the chunked scan, its recurrent
   state is concatenated onto the running batch, and every step decodes all running sequences with
   one ``model.step`` (O(1) per token, no KV cache); finished or cancelled rows leave the batch.
3. Per sequence, a small state machine constrains the assistant turn: the first token is
   ``<|START_RESPONSE|>`` (text) or ``<|START_ACTION|>`` (tool calls), as ``tool_choice`` allows; text
   is free (or JSON-schema constrained for ``response_format``); an action block is constrained by a
   grammar of ``[{"tool_call_id", "tool_name", "parameters": <that tool's schema>}, ...]`` so every
   call parses and validates. Sampling (``generation.sample``) and UTF-8-safe detokenisation with stop
   strings (``generation.TextState`` / ``Detokenizer``) are the ones ``aetheris generate`` uses.
4. The worker hands per-step deltas to the event loop (``call_soon_threadsafe``); the handler turns
   them into an OpenAI response or SSE chunks. A client that disconnects cancels its job.
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
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                             503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code=code)


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_tokens: int = 2048          # cap on max_tokens (and the default when a request gives none)
    max_prompt_tokens: int = 8192
    max_n: int = 8
    max_queue: int = 64             # requests waiting for the worker; more -> 429
    max_batch: int = 32             # sequences decoded together in one step
    prefill_tokens: int = 16384     # bound on one batched prefill: prompts x longest prompt (padded)
    threads: int = 0                # torch threads of the decode worker; 0 = all cores but one


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
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


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
    out = []
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
            if msg["content"] is None and not msg.get("tool_calls"):
                raise _bad(f"{p}.content", "an assistant message needs content or tool_calls",
                           "missing_required_parameter")
        else:
            msg["content"] = _content(m.get("content"), f"{p}.content")
        if role == "tool":
            msg["tool_call_id"] = _text(m.get("tool_call_id"), f"{p}.tool_call_id")
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


def _schema(schema, param: str) -> dict:
    import jsonschema

    if not isinstance(schema, dict):
        raise _bad(param, "a JSON schema must be an object", "invalid_type")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise _bad(param, f"not a valid JSON schema: {err.message}", "invalid_schema") from None
    return schema


def _tools(v) -> list[dict]:
    if not isinstance(v, list):
        raise _bad("tools", "expected an array of tools", "invalid_type")
    if len(v) > 128:
        raise _bad("tools", f"{len(v)} tools; at most 128 are allowed")
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
        params = fn.get("parameters", {"type": "object", "properties": {}})
        _schema(params, f"{p}.function.parameters")
        if params.get("type", "object") != "object":
            raise _bad(f"{p}.function.parameters", "must describe an object (type: 'object')")
        entry = {"name": name, "parameters": params}
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


def _logit_bias(v, vocab_size: int) -> dict[int, float]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad("logit_bias", "expected a map from token id to bias", "invalid_type")
    out = {}
    for k, b in v.items():
        if not re.fullmatch(r"\d{1,9}", k) or int(k) >= vocab_size:
            raise _bad("logit_bias", f"token id {k[:20]!r} is not in [0, {vocab_size})")
        if not _is_num(b) or not -100 <= b <= 100:
            raise _bad("logit_bias", f"bias for token {k} must be a number between -100 and 100")
        out[int(k)] = float(b)
    return out


# ---------------------------------------------------------------------------------------------------
# Grammars (xgrammar)
# ---------------------------------------------------------------------------------------------------


class Grammars:
    """Compiles the grammars of a request against this tokenizer; masks tokens per sequence."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=256 << 20)
        # Special tokens have their marker text in the vocabulary, so a grammar would accept
        # "<|END_TURN..|>" inside a JSON string; inside constrained spans they are masked out.
        special = set(tokenizer.all_special_ids) | {i for i in tokenizer.added_tokens_decoder if i < vocab_size}
        # Raw control characters are never needed in compact JSON (escapes are), but xgrammar 0.2's
        # maxLength string rule admits them and json.loads rejects them: mask such tokens as well.
        special |= {i for i, b in enumerate(self.info.decoded_vocab[:vocab_size]) if any(c < 0x20 for c in bytes(b))}
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[sorted(special)] = True

    def json(self, schema: dict | None, param: str):
        """response_format: a JSON schema, or any JSON object (json_object) when schema is None."""
        try:
            if schema is None:
                return self.compiler.compile_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False)
            return self.compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as err:  # xgrammar raises RuntimeError / InvalidJSONError for unsupported schemas
            raise _bad(param, f"schema cannot be compiled to a grammar: {str(err).splitlines()[0][:300]}",
                       "invalid_schema") from None

    def tools(self, tools: list[dict], parallel: bool):
        """The action block: a JSON list of calls in ``chat.render_tool_calls``' layout, each call's
        parameters constrained by that tool's schema."""
        xgr = self.xgr
        named, alts = {}, []
        for i, t in enumerate(tools):
            fn = t["function"]
            try:
                named[f"p{i}"] = xgr.Grammar.from_json_schema(fn["parameters"], any_whitespace=False)
            except Exception as err:
                raise _bad(f"tools[{i}].function.parameters", "schema cannot be compiled to a grammar: "
                           f"{str(err).splitlines()[0][:300]}", "invalid_schema") from None
            head = json.dumps('{"tool_call_id": "')
            mid = json.dumps('", "tool_name": ' + json.dumps(fn["name"]) + ', "parameters": ')
            alts.append(f"c{i}: {head} ID {mid} @p{i} \"}}\"")
        start = 'start: "[" call ("," " " call)* "]"' if parallel else 'start: "[" call "]"'
        lark = "\n".join([start, "call: " + " | ".join(f"c{i}" for i in range(len(tools))), *alts,
                          "ID: /[0-9]{1,3}/"])
        return self.compiler.compile_lark(lark, named_grammars=named)

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
    header delta (index, id, type, name) as soon as its name is complete, then its arguments text as it
    grows. Brace depth is tracked outside strings, so the call object's own closing brace is never sent."""

    def __init__(self):
        self.buf = ""
        self.pos = 0
        self.calls: list[dict] = []   # {"id", "name", "arguments"}
        self.depth = -1               # -1: between calls; >= 0: nesting inside the parameters
        self.in_string = self.escape = False

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
            if self.pos > start:
                fragment = self.buf[start:self.pos]
                self.calls[-1]["arguments"] += fragment
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            if not closed:
                return deltas
            self.depth = -1


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
    logit_bias: dict[int, float] = field(default_factory=dict)


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
        self.action = ActionStream()
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
        logits = raw.clone()
        for tok, bias in self.job.spec.logit_bias.items():
            logits[0, tok] += bias
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
        self.grammars = Grammars(tokenizer, vocab)
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
                        job.emit(("error", ApiError(500, f"prefill failed: {err}")))
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
                    s.job.emit(("error", ApiError(500, f"decoding failed: {err}")))
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

    # --- /v1/chat/completions ----------------------------------------------------------------------
    def chat_spec(self, body: dict) -> tuple[Spec, bool, bool]:
        _check_fields(body, CHAT_FIELDS)
        self._model(body)
        messages = _messages(body.get("messages"))
        tools = _tools(body["tools"]) if body.get("tools") is not None else []
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
        tool_grammar = grammars.tools(call_tools, parallel) if ids.start_action in openers else None
        json_grammar = self._response_format(body.get("response_format"))
        # Prompt: this project's template, or the checkpoint's own when it has a different one.
        if chat.uses_this_template(self.tokenizer):
            prompt = chat.render_messages(messages, tools=tools or None)
        else:
            try:
                prompt = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                            tokenize=False)
            except Exception as err:  # noqa: BLE001 - a template that cannot render these messages
                raise _bad("messages", f"the model's chat template cannot render them: {err}") from None
            prompt = prompt.removesuffix(chat.START_RESPONSE)
        prompt_ids = self._tokens(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], "messages")
        spec = Spec(prompts=[prompt_ids], n=n, params=params, chat=True, first_tokens=openers,
                    tool_grammar=tool_grammar, json_grammar=json_grammar,
                    logprobs=(top or 0) if logprobs else None,
                    logit_bias=_logit_bias(body.get("logit_bias"), self.model.cfg.vocab_size))
        return spec, stream, include_usage

    def _response_format(self, fmt):
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "expected {type: 'text' | 'json_object' | 'json_schema'}")
        if fmt["type"] == "text":
            return None
        if fmt["type"] == "json_object":
            return self.engine.grammars.json(None, "response_format")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("response_format.json_schema", "expected {name, schema, strict}", "invalid_type")
        schema = _schema(spec.get("schema", {}), "response_format.json_schema.schema")
        return self.engine.grammars.json(schema, "response_format.json_schema.schema")

    # --- /v1/completions ---------------------------------------------------------------------------
    def completion_spec(self, body: dict) -> tuple[Spec, bool, bool, bool, list[str]]:
        _check_fields(body, COMPLETION_FIELDS)
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
                    logit_bias=_logit_bias(body.get("logit_bias"), vocab))
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

    app = FastAPI(title="Aetheris", lifespan=lifespan)
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
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {server.api_key}".encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        cap = server.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise ApiError(413, f"Request body is larger than {cap} bytes.", code="request_too_large")
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

    async def wait_events(job: Job, request: Request) -> AsyncIterator:
        """The job's events; cancels the job when the client goes away."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
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
            return StreamingResponse(_cancel_on_exit(sse(), job), media_type="text/event-stream",
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
            return StreamingResponse(_cancel_on_exit(sse(), job), media_type="text/event-stream",
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

    return _CountRequests(app, server.metrics)


async def _cancel_on_exit(chunks: AsyncIterator[str], job: Job) -> AsyncIterator[str]:
    """SSE body that cancels its job however the stream ends (done, error, or the client went away)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        job.cancelled = True


class _CountRequests:
    """ASGI wrapper counting responses by path and status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.state = app.state

    def __getattr__(self, name):  # routes, openapi(), etc. of the wrapped FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


# ---------------------------------------------------------------------------------------------------
# CLI: aetheris serve
# ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the 'model' clients send (default: folder name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on max_tokens per request")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-n", type=int, default=d.max_n)
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for decoding (0 = all cores but one)")
    parser.add_argument("--log-level", default="info")


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

    for key in ("max_body_bytes", "max_tokens", "max_prompt_tokens", "max_n", "max_queue", "max_batch", "threads"):
        if getattr(args, key) < (0 if key == "threads" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    # Fail fast: load (strictly) before binding, so a bad checkpoint never becomes a running server.
    model, tokenizer = load_checkpoint(args.model, args.device, args.dtype)
    name = args.served_model_name or Path(args.model).expanduser().resolve().name
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n, max_queue=args.max_queue,
                    max_batch=args.max_batch, threads=args.threads)
    # Grammar tables (TokenizerInfo over the vocabulary) build in the background while /health says 503.
    app = create_app(loader=lambda: (model, tokenizer), model_name=name, api_key=args.api_key, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"aetheris serve: warning: binding {args.host} without --api-key exposes the model to the network")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
