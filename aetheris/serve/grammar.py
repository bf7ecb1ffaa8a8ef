"""JSON schemas the grammar can enforce, and the grammars themselves (xgrammar).

A schema is vetted here before any library sees it (only keywords the grammar enforces, local ``$ref``,
bounded size, depth, regex size and numeric bounds: ``Limits``), then compiled with xgrammar
(github.com/mlc-ai/xgrammar: TokenizerInfo, GrammarCompiler.compile_json_schema / compile_lark,
GrammarMatcher, token bitmasks) against the served tokenizer.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from re import _constants as c  # the regex parser's opcodes, to size a parsed pattern

import jsonschema
import torch
import xgrammar as xgr
from torch import Tensor

from .errors import ApiError, bad, library_message, printable
from .limits import Limits


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))  # (isfinite overflows on ints past 1e308)


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
        raise bad(param, f"$ref {json.dumps(ref)[:80]} is not supported; only local references such as "
                  "'#/$defs/name' are", "invalid_schema")
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise bad(param, f"$ref {json.dumps(ref)[:80]} points to nothing in this schema", "invalid_schema")
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
            raise bad(path, "a JSON schema must be an object (or true/false)", "invalid_schema")
        if depth > limits.max_schema_depth:
            raise bad(path, f"the schema is nested more than {limits.max_schema_depth} levels deep",
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
                    raise bad(f"{path}.{key}", "must be an object of subschemas", "invalid_schema")
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
                    raise bad(f"{path}.{key}", "must be a non-empty array of subschemas", "invalid_schema")
                stack += [(sub, f"{path}.{key}[{i}]", depth + 1) for i, sub in enumerate(node[key])]
        for key in ("enum", "const", "default", "examples"):
            if key in node:
                if key in ("enum", "const"):
                    budget.add(path, "enum", len(node[key]) if key == "enum" and isinstance(node[key], list) else 1)
                if _json_depth(node[key], limits.max_schema_depth) > limits.max_schema_depth:
                    raise bad(f"{path}.{key}", f"nested more than {limits.max_schema_depth} levels deep",
                              "schema_too_deep")
        if "$ref" in node:
            _resolve_ref(root, node["$ref"], f"{path}.$ref")
        if isinstance(node.get("pattern"), str):
            _check_pattern(node["pattern"], f"{path}.pattern", budget)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if is_num(node.get(key)) and abs(node[key]) > limits.max_schema_number:
                raise bad(f"{path}.{key}", f"bounds beyond ±{limits.max_schema_number:g} are not supported",
                          "schema_too_large")
        if "format" in node and node["format"] not in SCHEMA_FORMATS:
            raise ApiError(400, f"Invalid '{path}.format': {json.dumps(node['format'])[:60]} cannot be enforced by "
                           f"the grammar; supported formats: {', '.join(sorted(SCHEMA_FORMATS))}.",
                           param=f"{path}.format", code="unsupported_schema_keyword")
        if "multipleOf" in node and (node.get("type") != "integer" or not is_int(node["multipleOf"])):
            raise bad(f"{path}.multipleOf", "only enforced as an integer multiple on integers (type: 'integer')",
                      "unsupported_schema_keyword")


def _check_pattern(pattern: str, param: str, budget: SchemaBudget) -> None:
    """A regex the grammar can enforce, counted against the request's regex budget: xgrammar expands
    bounded repetitions copy by copy (``x{1,20000}`` compiled for 224 s), so its size is counted that way."""
    try:
        re.compile(pattern)
        size = _regex_size(re._parser.parse(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise bad(param, f"not a valid regular expression ({printable(str(err), 200)})", "invalid_schema") from None
    if _REGEX_UNSUPPORTED.search(pattern):
        raise bad(param, "lookaround, backreferences, word boundaries and \\p{..} classes cannot be enforced by "
                  "the grammar", "unsupported_schema_keyword")
    budget.add(param, "regex", size)


def _regex_size(items) -> int:
    """Literal and class items, with each bounded repetition's body counted once per copy."""
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


def check_json_schema(schema, param: str, budget: SchemaBudget) -> dict:
    """A JSON schema the grammar can enforce (vetted, then checked as a schema by jsonschema)."""
    if not isinstance(schema, dict):
        raise bad(param, "a JSON schema must be an object", "invalid_type")
    _check_schema(schema, param, budget)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise bad(param, f"not a valid JSON schema: {printable(err.message, 300)}", "invalid_schema") from None
    except RecursionError:
        raise bad(param, "not a valid JSON schema (nested too deeply)", "invalid_schema") from None
    return schema


def tool_parameters(params, param: str, budget: SchemaBudget) -> dict:
    """A tool's parameters schema, which must describe an object (a call's arguments are a JSON object)."""
    if params is None:
        return {"type": "object", "properties": {}}
    check_json_schema(params, param, budget)
    target, seen = params, set()
    while isinstance(target, dict) and "$ref" in target and id(target) not in seen:
        seen.add(id(target))
        target = _resolve_ref(params, target["$ref"], f"{param}.$ref")
    kind = target.get("type") if isinstance(target, dict) else None
    if kind in ("object", ["object"]):
        return params
    if target is params and kind is None and not {"anyOf", "enum", "const"} & params.keys():
        return {**params, "type": "object"}  # {} or {"properties": ...}: the object is implied
    raise bad(param, "must describe an object: give the top level \"type\": \"object\" (a call's arguments are "
              f"a JSON object), found {json.dumps(kind) if kind is not None else 'no object type'}", "invalid_schema")


class Grammars:
    """Compiles the grammars of a request against this tokenizer; masks tokens per sequence."""

    def __init__(self, tokenizer, vocab_size: int, limits: Limits | None = None, metrics=None):
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
            raise bad(param, f"schema cannot be compiled to a grammar: {library_message(err)}",
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
        def build():
            named, alts = {}, []
            for i, t in enumerate(tools):
                fn = t["function"]
                try:
                    named[f"p{i}"] = xgr.Grammar.from_json_schema(fn["parameters"], any_whitespace=False)
                except Exception as err:  # noqa: BLE001
                    raise bad(f"tools[{i}].function.parameters", "schema cannot be compiled to a grammar: "
                              f"{library_message(err)}", "invalid_schema") from None
                head = json.dumps('{"tool_call_id": "')
                mid = json.dumps('", "tool_name": ' + json.dumps(fn["name"]) + ', "parameters": ')
                alts.append(f"c{i}: {head} ID {mid} @p{i} \"}}\"")
            start = 'start: "[" call ("," " " call)* "]"' if parallel else 'start: "[" call "]"'
            lark = "\n".join([start, "call: " + " | ".join(f"c{i}" for i in range(len(tools))), *alts,
                              "ID: /[0-9]{1,3}/"])
            return self.compiler.compile_lark(lark, named_grammars=named)
        return self._compile(build, "tools")

    def matcher(self, compiled, stop_token: int):
        return xgr.GrammarMatcher(compiled, override_stop_tokens=[stop_token])

    def mask(self, matcher, logits: Tensor, allow: int) -> None:
        """In place: -inf where the grammar forbids a token, and on special tokens other than ``allow``."""
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
        special = self.special.clone()
        special[allow] = False
        logits[:, special] = float("-inf")
