"""Hostile input: every malformed request gets a 4xx in OpenAI's error shape, and the server keeps serving.

A fixed batch covers the known classes (malformed JSON, invalid UTF-8, wrong types, huge numbers, empty
messages, invalid tool schemas, unknown models and fields, oversized bodies and prompts); a generated
barrage crosses the abuse classes with every place they can appear (schema keywords the grammar cannot
enforce, at every depth; recursive, deep and huge schemas; lone surrogates in every field and key;
extreme numbers in every numeric field; forged tool results), at least 300 requests with 0 server
errors and 0 reset connections; then hypothesis throws schema-shaped random bodies (right field names,
arbitrary JSON values) at both endpoints. After each batch a well-formed request must still succeed.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import LiveServer, tiny_checkpoint

from aetheris.serve import Limits, create_app, load_checkpoint
from aetheris.serve.schema import CHAT_FIELDS, COMPLETION_FIELDS

MODEL = "tiny"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def url(tiny_tokenizer, tmp_path_factory):
    folder = tiny_checkpoint(tiny_tokenizer, tmp_path_factory.mktemp("fuzz") / "tiny")
    model, tokenizer = load_checkpoint(str(folder))
    limits = Limits(max_tokens=16, max_prompt_tokens=2000, max_body_bytes=1_000_000, max_n=4)
    server = LiveServer(create_app(model, tokenizer, model_name=MODEL, limits=limits))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def assert_still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200


def chat(**fields):
    return json.dumps({**GOOD, **fields}).encode()


RAW_BAD = {
    "truncated json": b'{"model": "tiny", "messages": [',
    "not json": b"hello there",
    "empty body": b"",
    "array body": b"[1, 2]",
    "null body": b"null",
    "NaN": b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "invalid utf-8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
    "lone surrogate": b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "deep nesting": b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "huge float": b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}',
}

FIELD_BAD = {
    # wrong types
    "messages string": dict(messages="hi"),
    "message not object": dict(messages=[1]),
    "content number": dict(messages=[{"role": "user", "content": 5}]),
    "image part": dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    "unknown role": dict(messages=[{"role": "robot", "content": "x"}]),
    "unknown message key": dict(messages=[{"role": "user", "content": "x", "mood": "happy"}]),
    "tool without id": dict(messages=[{"role": "tool", "content": "x"}]),
    "tool result for no call": dict(messages=[
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "x"}]),
    "bad call arguments": dict(messages=[{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
    "temperature string": dict(temperature="hot"),
    "temperature bool": dict(temperature=True),
    "max_tokens float": dict(max_tokens=1.5),
    "max_tokens string": dict(max_tokens="10"),
    "n zero": dict(n=0),
    "stream string": dict(stream="yes"),
    "stop number": dict(stop=5),
    "stop empty": dict(stop=[""]),
    "too many stops": dict(stop=["a", "b", "c", "d", "e"]),
    "seed float": dict(seed=1.5),
    "top_p too big": dict(top_p=2),
    "logprobs int": dict(logprobs=1),
    "top_logprobs alone": dict(top_logprobs=2),
    "stream_options without stream": dict(stream_options={"include_usage": True}),
    # huge numbers
    "huge max_tokens": dict(max_tokens=10 ** 30),
    "huge n": dict(n=10 ** 20),
    "huge seed": dict(seed=2 ** 70),
    "huge temperature": dict(temperature=1e308),
    "huge logit bias": dict(logit_bias={"5": 1e9}),
    "logit bias out of vocab": dict(logit_bias={"99999999": 1}),
    # empty / missing
    "empty messages": dict(messages=[]),
    "missing messages": dict(messages=None),
    "assistant with nothing": dict(messages=[{"role": "assistant", "content": None}]),
    # invalid tools and formats
    "tools not list": dict(tools="f"),
    "tool without function": dict(tools=[{"type": "function"}]),
    "tool bad name": dict(tools=[{"type": "function", "function": {"name": "has space"}}]),
    "tool bad schema": dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
    "tool non-object schema": dict(tools=[{"type": "function", "function": {"name": "f",
                                                                             "parameters": {"type": "string"}}}]),
    "tool unresolvable ref": dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}]),
    "duplicate tools": dict(tools=[TOOL, TOOL]),
    "tool_choice unknown function": dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
    "tool_choice bad string": dict(tools=[TOOL], tool_choice="sometimes"),
    "tool_choice without tools": dict(tool_choice="required"),
    "response_format xml": dict(response_format={"type": "xml"}),
    "json_schema invalid": dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}),
    "json_schema no name": dict(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
    # unknown / unsupported
    "unknown field": dict(foo=1),
    "deprecated functions": dict(functions=[{"name": "f"}]),
    "penalty": dict(frequency_penalty=0.5),
    "audio modality": dict(modalities=["text", "audio"]),
}


# --- the generated barrage --------------------------------------------------------------------------

UNENFORCEABLE = {"allOf": [{"type": "integer"}], "oneOf": [{"type": "integer"}, {"type": "string"}],
                 "not": {"const": 1}, "if": {"const": 1}, "then": {"const": 2}, "else": {"const": 3},
                 "uniqueItems": True, "dependentRequired": {"a": ["b"]}, "contains": {"const": 1},
                 "x-vendor": 1, "$id": "https://example.com/s", "format": "credit-card", "multipleOf": 0.5}


def tool(parameters, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def nested(depth: int, leaf=None) -> dict:
    schema = leaf or {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def schema_places(sub: dict) -> list[dict]:
    """A subschema planted at the top of a tool, under a property, in items, in anyOf, in $defs."""
    return [{"type": "object", **sub},
            {"type": "object", "properties": {"a": {"type": "integer", **sub}}},
            {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", **sub}}}},
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer", **sub}, {"type": "null"}]}}},
            {"type": "object", "$defs": {"d": {"type": "integer", **sub}}, "properties": {"a": {"$ref": "#/$defs/d"}}}]


def barrage() -> list[tuple[str, str, dict | bytes, int | None]]:
    """(name, endpoint, body, expected status) of hostile requests; None = any 4xx."""
    cases = []

    def add(name, fields, status=400, endpoint="/v1/chat/completions"):
        cases.append((name, endpoint, fields, status))

    for name, raw in RAW_BAD.items():
        add(name, raw)
    for name, fields in FIELD_BAD.items():
        add(name, fields)
    # Schema keywords the grammar cannot enforce, wherever they appear; also in response_format.
    for key, value in UNENFORCEABLE.items():
        for i, params in enumerate(schema_places({key: value})):
            add(f"tool schema {key} @{i}", dict(tools=[tool(params)], tool_choice="required"))
        add(f"response_format {key}", dict(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", key: value}}}}}))
    # Parameters that do not describe an object.
    for params in ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {"$defs": {"s": {"type": "string"}},
                   "$ref": "#/$defs/s"}, {"type": "array"}, {"type": ["object", "null"]}, {"enum": [1, 2]},
                   {"const": {"a": 1}}, {"type": "object", "$ref": "http://example.com/remote.json"}, [1], "object", 5):
        add(f"non-object parameters {json.dumps(params)[:40]}", dict(tools=[tool(params)]))
    # Deep, recursive, huge and malformed schemas.
    for depth in (17, 40, 100, 200):
        add(f"schema depth {depth}", dict(tools=[tool(nested(depth))]))
        add(f"response_format depth {depth}", dict(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": nested(depth)}}))
    deep = '{"type": "object", "properties": {"a": ' * 5000 + "{}" + "}}" * 5000  # past any recursion limit
    add("schema depth 5000", chat(tools=[]).replace(b'"tools": []', b'"tools": [{"type": "function", "function": '
                                                    b'{"name": "f", "parameters": ' + deep.encode() + b"}}]"))
    for n in (257, 1000, 2000, 5000):
        props = {f"p{i}": {"type": "string"} for i in range(n)}
        add(f"{n} properties", dict(tools=[tool({"type": "object", "properties": props})]))
        add(f"{n} properties over tools", dict(tools=[tool({"type": "object", "properties": {f"p{i}": {"type": "string"}
            for i in range(k, min(n, k + 100))}}, f"t{k}") for k in range(0, n, 100)]))
    for n in (1025, 5000):
        add(f"enum of {n}", dict(tools=[tool({"type": "object", "properties": {"a": {"enum": list(range(n))}}})]))
    add("2049 subschemas", dict(tools=[tool({"type": "object", "properties": {"a": {"anyOf": [
        {"const": i} for i in range(2049)]}}})]))
    add("129 tools", dict(tools=[tool({"type": "object"}, f"t{i}") for i in range(129)]))
    for ref in ("#/$defs/missing", "#/properties/zz", "other.json#/a", "#/$defs/a/b/c", 5):
        add(f"ref {ref}", dict(tools=[tool({"type": "object", "$defs": {"a": {"type": "integer"}},
                                           "properties": {"a": {"$ref": ref}}})]))
    add("self-referencing top ref", dict(tools=[tool({"$ref": "#"})]))
    add("deep default", dict(tools=[tool({"type": "object", "properties": {"a": {"type": "array",
                                                                            "default": json.loads("[" * 200 + "]" * 200)}}})]))
    for pattern in ("(?=a)b", "(a)\\1", "\\bword", "\\p{L}", "[", "(?i)x", "x{1,20000}", "[a-z]{1,5000}",
                    "(a{40}){40}", "(" * 3000 + ")" * 3000):
        add(f"pattern {pattern}", dict(tools=[tool({"type": "object", "properties": {"a": {"type": "string",
                                                                                           "pattern": pattern}}})]))
    # Valid JSON schemas xgrammar cannot compile (its errors carry C++ source paths, never shown to clients).
    for sub in ({"type": "array", "minItems": 2}, {"type": "object", "minProperties": 2},
                {"type": "string", "pattern": "a{99999}"}):
        add(f"uncompilable {json.dumps(sub)}", dict(tools=[tool({"type": "object", "properties": {"a": sub},
                                                                  "required": ["a"]})], tool_choice="required"))
    add("patternProperties key x{1,9999}", dict(tools=[tool({"type": "object", "patternProperties": {
        "x{1,9999}": {"type": "integer"}}})]))
    add("120 patterns of size 10 (regex budget)", dict(tools=[tool({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "[a-z]{10}"} for i in range(120)}})]))
    for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        add(f"{bound} 1e300", dict(tools=[tool({"type": "object", "properties": {"a": {"type": "number", bound: 1e300}}})]))
    for bad in ({"type": 5}, {"properties": []}, {"anyOf": []}, {"anyOf": {}}, {"items": 3}, {"required": "a"},
                {"minLength": -1}, {"enum": "ab"}):
        add(f"malformed {json.dumps(bad)}", dict(tools=[tool({"type": "object", "properties": {"a": bad}})]))
    # Lone surrogates in every kind of place (values and keys).
    s = "\ud800"
    for name, fields in {
        "model": dict(model=s), "unknown key": {s: 1}, "hint value": dict(user=s), "metadata key": dict(metadata={s: "x"}),
        "content": dict(messages=[{"role": "user", "content": s}]),
        "content part": dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a" + s}]}]),
        "message key": dict(messages=[{"role": "user", "content": "x", s: 1}]),
        "role": dict(messages=[{"role": s, "content": "x"}]),
        "tool name": dict(tools=[tool({"type": "object"}, "f" + s)]),
        "tool description": dict(tools=[{"type": "function", "function": {"name": "f", "description": s}}]),
        "property name": dict(tools=[tool({"type": "object", "properties": {s: {"type": "string"}}})]),
        "enum value": dict(tools=[tool({"type": "object", "properties": {"a": {"enum": [s]}}})]),
        "stop": dict(stop=[s]), "logit_bias key": dict(logit_bias={s: 1}),
        "tool_choice name": dict(tools=[tool({"type": "object"})], tool_choice={"type": "function", "function": {"name": s}}),
        "call arguments": dict(messages=[{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                                              "function": {"name": "f", "arguments": s}}]}]),
        "tool_call_id": dict(messages=[{"role": "tool", "tool_call_id": s, "content": "x"}]),
        "response_format name": dict(response_format={"type": "json_schema", "json_schema": {"name": s, "schema": {}}}),
    }.items():
        add(f"surrogate in {name}", fields, None)
        add(f"surrogate in {name} (completions)", {**fields, "prompt": "x"}, None, "/v1/completions")
    # Out-of-range and wrongly typed numbers in every numeric field.
    for key in ("temperature", "top_p", "top_k", "n", "max_tokens", "max_completion_tokens", "seed", "top_logprobs",
                "frequency_penalty", "presence_penalty"):
        for value in (-1e308, 1e308, 2 ** 64, -(2 ** 64), 10 ** 400, "1", True, [], {}, -1):
            if key == "seed" and value == -1 or key in ("frequency_penalty", "presence_penalty") and value == -1:
                continue  # valid values
            add(f"{key}={json.dumps(value)}", {key: value, **({"logprobs": True} if key == "top_logprobs" else {})})
    for key in ("temperature", "top_p", "max_tokens", "n", "logprobs"):
        for value in (-1e308, 1e308, 2 ** 64, "1", True, []):
            add(f"completions {key}={json.dumps(value)}", {"prompt": "x", key: value}, 400, "/v1/completions")
    for bias in ({str(i): 1 for i in range(301)}, {"1": float("1e308")}, {"-1": 1}, {"1.5": 1}, {"1": "x"}, [1]):
        add(f"logit_bias {json.dumps(bias)[:30]}", dict(logit_bias=bias))
    for stop in (["x"] * 5, "", [""], [1], {"a": 1}):
        add(f"stop {json.dumps(stop)[:30]}", dict(stop=stop))
    return cases


VALID_EXTREMES = {  # valid requests at the edges of the sampling ranges: each must be a 200
    "tiny temperature": dict(temperature=1e-40), "denormal temperature": dict(temperature=5e-324),
    "tiny top_p": dict(temperature=1.0, top_p=1e-300), "denormal top_p": dict(top_p=5e-324),
    "top_p 1": dict(temperature=2.0, top_p=1.0, seed=3), "max temperature": dict(temperature=2.0, seed=1),
    "huge top_k": dict(temperature=1.0, top_k=2 ** 30), "top_k 1": dict(temperature=1.0, top_k=1),
    "tiny temperature stream": dict(temperature=1e-40, stream=True),
    "tiny top_p stream": dict(temperature=1.0, top_p=1e-300, stream=True),
    "extreme seed": dict(temperature=1.0, seed=-(2 ** 63)), "max seed": dict(temperature=1.0, seed=2 ** 63 - 1),
    "logit bias extremes": dict(temperature=1.0, logit_bias={"5": 100, "6": -100}),
    "tiny temperature n": dict(temperature=1e-30, n=2),
}


def test_barrage_of_hostile_requests(http):
    cases = barrage()
    sent = refused = 0
    for name, endpoint, fields, status in cases:
        body = fields if isinstance(fields, bytes) else json.dumps({**GOOD, **fields}).encode()
        if endpoint == "/v1/completions" and not isinstance(fields, bytes):
            body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2, **fields}).encode()
        try:
            r = http.post(endpoint, content=body, headers={"content-type": "application/json"})
        except httpx.TransportError as err:  # a reset connection: the failure this test exists for
            pytest.fail(f"{name}: connection failed ({err!r})")
        sent += 1
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
        error = assert_openai_error(r, status)
        assert "/project/" not in error["message"] and ".cc:" not in error["message"], (name, error["message"])
        refused += 1
    for name, fields in VALID_EXTREMES.items():
        r = http.post("/v1/chat/completions", content=chat(**fields))
        sent += 1
        assert r.status_code == 200, (name, r.text[:300])
        if fields.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, name
        else:
            # Sampling at temperature 2 may draw an end token first: "stop" is as valid an ending as "length".
            assert all(c["finish_reason"] in ("length", "stop") for c in r.json()["choices"]), (name, r.text[:300])
    assert refused >= 300 and sent == refused + len(VALID_EXTREMES)
    assert_still_serving(http)


def test_unenforceable_keywords_are_named(http):
    for key, value in UNENFORCEABLE.items():
        params = {"type": "object", "properties": {"a": {"type": "integer", key: value}}}
        error = assert_openai_error(http.post("/v1/chat/completions", content=chat(tools=[tool(params)])), 400)
        assert key in error["message"] or key in error["param"], (key, error)
        assert error["param"].startswith("tools[0].function.parameters.properties.a")
    # Tiny temperatures are greedy: the same text as temperature 0.
    greedy = http.post("/v1/chat/completions", content=chat(max_tokens=8)).json()["choices"][0]["message"]["content"]
    for fields in (dict(temperature=1e-40), dict(temperature=1.0, top_p=1e-300)):
        r = http.post("/v1/chat/completions", content=chat(max_tokens=8, **fields))
        assert r.json()["choices"][0]["message"]["content"] == greedy


# Validation by the pydantic request models: each case -> (param, code) of the error, for both endpoints
# where the field exists. Locations inside a field are named the way OpenAI's errors name them.
SCHEMA_CASES = {
    "chat": [
        (dict(temperature=True), "temperature", "invalid_type"),
        (dict(temperature=2.5), "temperature", "invalid_value"),
        (dict(top_k=-1), "top_k", "invalid_value"),
        (dict(top_k=1.5), "top_k", "invalid_type"),
        (dict(max_tokens=0), "max_tokens", "invalid_value"),
        (dict(max_tokens=10 ** 6), "max_tokens", "invalid_value"),  # above the server's cap
        (dict(max_completion_tokens=10 ** 6), "max_completion_tokens", "invalid_value"),
        (dict(n=99), "n", "invalid_value"),
        (dict(seed="1"), "seed", "invalid_type"),
        (dict(parallel_tool_calls="yes"), "parallel_tool_calls", "invalid_type"),
        (dict(logit_bias=[1]), "logit_bias", "invalid_type"),
        (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "invalid_type"),
        (dict(frequency_penalty=3), "frequency_penalty", "invalid_value"),
        (dict(presence_penalty=0.5), "presence_penalty", "unsupported_parameter"),
        (dict(functions=[]), "functions", "unsupported_parameter"),
        (dict(model=5), "model", "invalid_type"),
        (dict(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages[0].content[0].text",
         "invalid_type"),
    ],
    "completions": [
        (dict(echo=1), "echo", "invalid_type"),
        (dict(logprobs=True), "logprobs", "invalid_type"),
        (dict(best_of=0), "best_of", "invalid_value"),
        (dict(messages=[]), "messages", "unknown_parameter"),
        (dict(top_p=-0.1), "top_p", "invalid_value"),
    ],
}


@pytest.mark.parametrize("endpoint", SCHEMA_CASES)
def test_schema_errors_name_the_field_and_kind(http, endpoint):
    base = GOOD if endpoint == "chat" else {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    for fields, param, code in SCHEMA_CASES[endpoint]:
        error = assert_openai_error(http.post(path, json={**base, **fields}), 400)
        assert (error["param"], error["code"]) == (param, code), (fields, error)
    body = {k: v for k, v in base.items() if k != "model"}
    error = assert_openai_error(http.post(path, json=body), 400)
    assert (error["param"], error["code"]) == ("model", "missing_required_parameter")
    assert_still_serving(http)


def test_openapi_documents_the_request_bodies(http):
    paths = http.get("/openapi.json").json()["paths"]
    chat_schema = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    completion_schema = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(chat_schema["properties"]) == CHAT_FIELDS and set(completion_schema["properties"]) == COMPLETION_FIELDS
    assert {"model", "messages"} <= set(chat_schema["required"]) and chat_schema["additionalProperties"] is False
    assert chat_schema["properties"]["temperature"]["maximum"] == 2.0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http):
    for name, raw in RAW_BAD.items():
        r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
    for name, fields in FIELD_BAD.items():
        r = http.post("/v1/chat/completions", content=chat(**fields))
        error = assert_openai_error(r, 400)
        assert error["param"] or error["code"], name
    # The field at fault is named.
    assert assert_openai_error(http.post("/v1/chat/completions", content=chat(temperature="hot")))["param"] == "temperature"
    assert assert_openai_error(http.post("/v1/chat/completions", content=chat(
        tools=[TOOL, {"type": "function", "function": {"name": "g", "parameters": {"type": 5}}}])))["param"] == \
        "tools[1].function.parameters"
    assert assert_openai_error(http.post("/v1/chat/completions", content=chat(foo=1)))["param"] == "foo"
    # Unknown model: 404 model_not_found; oversized body: 413; prompt too long: context_length_exceeded.
    assert assert_openai_error(http.post("/v1/chat/completions", content=chat(model="gpt-4o")), 404)["code"] == \
        "model_not_found"
    assert_openai_error(http.post("/v1/chat/completions", content=chat(model=None)), 400)
    assert_openai_error(http.post("/v1/chat/completions", content=b" " * 1_100_000), 413)
    long = chat(messages=[{"role": "user", "content": "word " * 3000}])
    assert assert_openai_error(http.post("/v1/chat/completions", content=long), 400)["code"] == "context_length_exceeded"
    # Completions endpoint, routes and methods.
    for fields in (dict(prompt=None), dict(prompt=[[]]), dict(prompt=[10 ** 9]), dict(prompt=""), dict(prompt=3),
                   dict(prompt="x", suffix="y"), dict(prompt="x", best_of=3), dict(prompt="x", logprobs=9),
                   dict(prompt="x", echo=True, logprobs=1)):
        body = {"model": MODEL, "max_tokens": 2, **fields}
        assert_openai_error(http.post("/v1/completions", content=json.dumps(body).encode()), 400)
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    assert_openai_error(http.get("/v1/models/gpt-4o"), 404)
    assert_still_serving(http)
    metrics = http.get("/metrics").text
    assert 'aetheris_requests_total{path="/v1/chat/completions",status="400"}' in metrics


# --- property-based: right field names, arbitrary values ---------------------------------------------

# Text with lone surrogates (sent as JSON escapes) and numbers at the edges (denormals, 1e308, 10**400).
hostile_text = st.text(alphabet=st.characters(categories=["Cs", "Lo", "Ll", "Sm"]), max_size=6)
edge_numbers = st.sampled_from([1e-40, 5e-324, 1e-300, 1e308, -1e308, 10 ** 400, 2 ** 63, -(2 ** 63) - 1, 0.0, -0.0])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | hostile_text | edge_numbers,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
plausible = {
    "model": st.sampled_from([MODEL, "gpt-4o", ""]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3)
    | json_values,
    "max_tokens": st.integers(min_value=-2, max_value=20) | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | edge_numbers | json_values,
    "top_p": st.floats(min_value=0, max_value=1) | edge_numbers | json_values,
    "n": st.integers(min_value=-1, max_value=5) | json_values,
    "stream": st.booleans() | json_values,
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z]{1,5}", fullmatch=True), "parameters": json_values})}), max_size=2) | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(min_value=-5, max_value=900), max_size=5) | json_values,
}


def bodies(fields: set[str]):
    keys = sorted(fields)
    values = {k: plausible.get(k, json_values) for k in keys}
    return st.dictionaries(st.sampled_from(keys + ["unknown_field"]), json_values, max_size=4).flatmap(
        lambda extra: st.fixed_dictionaries({}, optional={k: values[k] for k in keys}).map(
            lambda body: {**{k: v for k, v in extra.items() if k != "unknown_field"}, **body}))


def check_response(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies(CHAT_FIELDS))
def test_fuzz_chat(http, body):
    check_response(http.post("/v1/chat/completions", content=json.dumps(body).encode()))  # surrogates as escapes


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies(COMPLETION_FIELDS))
def test_fuzz_completions(http, body):
    check_response(http.post("/v1/completions", content=json.dumps(body).encode()))


def test_still_serving_after_fuzz(http):
    assert_still_serving(http)
