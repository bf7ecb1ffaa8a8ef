"""Hostile input: every malformed request gets a 4xx in OpenAI's error shape, and the server keeps serving.

A fixed batch covers the known classes (malformed JSON, invalid UTF-8, wrong types, huge numbers, empty
messages, invalid tool schemas, unknown models and fields, oversized bodies and prompts); then
hypothesis throws schema-shaped random bodies (right field names, arbitrary JSON values) at both
endpoints. After each batch a well-formed request must still succeed.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import LiveServer, tiny_checkpoint

from aetheris.server import CHAT_FIELDS, COMPLETION_FIELDS, Limits, create_app, load_checkpoint

MODEL = "tiny"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def url(tiny_tokenizer, tmp_path_factory):
    folder = tiny_checkpoint(tiny_tokenizer, tmp_path_factory.mktemp("fuzz") / "tiny")
    model, tokenizer = load_checkpoint(str(folder))
    limits = Limits(max_tokens=16, max_prompt_tokens=2000, max_body_bytes=200_000, max_n=4)
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
    assert_openai_error(http.post("/v1/chat/completions", content=b" " * 300_000), 413)
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

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
plausible = {
    "model": st.sampled_from([MODEL, "gpt-4o", ""]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3)
    | json_values,
    "max_tokens": st.integers(min_value=-2, max_value=20) | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
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
    check_response(http.post("/v1/chat/completions", json=body))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies(COMPLETION_FIELDS))
def test_fuzz_completions(http, body):
    check_response(http.post("/v1/completions", json=body))


def test_still_serving_after_fuzz(http):
    assert_still_serving(http)
