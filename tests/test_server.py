"""The OpenAI-compatible server, driven by the official ``openai`` client against a tiny random Aetheris.

A random model writes gibberish, so the tests are equivalences and guarantees that must hold anyway:
streaming == non-streaming (incl. Thai/Amharic), same seed == same output, n=2, stop strings cut where
the unconstrained text had them, usage == token counts, grammar-constrained tool calls and JSON always
parse and validate, finish_reason semantics, auth, limits, queue, cancellation, fail-fast loading.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from serve_helpers import LiveServer, tiny_checkpoint

from aetheris import chat
from aetheris.serve import Limits, create_app, load_checkpoint

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
HELLO = [{"role": "user", "content": "Hello! Tell me something."}]


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    return tiny_checkpoint(tiny_tokenizer, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def live(checkpoint):
    model, tokenizer = load_checkpoint(str(checkpoint))
    server = LiveServer(create_app(model, tokenizer, model_name=MODEL, limits=Limits(max_tokens=512)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from aetheris.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def collect(stream):
    """Reassemble a chat stream: per-choice text, tool calls, finish reason; plus chunks and usage."""
    out, chunks, usage = {}, [], None
    for chunk in stream:
        chunks.append(chunk)
        if not chunk.choices:
            usage = chunk.usage
            continue
        for c in chunk.choices:
            entry = out.setdefault(c.index, {"role": None, "text": "", "calls": {}, "finish": None, "deltas": []})
            if c.delta.role:
                entry["role"] = c.delta.role
            entry["text"] += c.delta.content or ""
            if c.delta.content:
                entry["deltas"].append(c.delta.content)
            for tc in c.delta.tool_calls or []:
                call = entry["calls"].setdefault(tc.index, {"id": None, "name": None, "arguments": "", "first": tc})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if c.finish_reason:
                entry["finish"] = c.finish_reason
    return out, chunks, usage


def prompt_tokens(tokenizer, messages, tools=None) -> int:
    return len(tokenizer(chat.render_messages(messages, tools=tools), add_special_tokens=False)["input_ids"])


# --- basics ------------------------------------------------------------------------------------------


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_chat_non_streaming(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    # A random model never emits <|END_RESPONSE|>: it runs to the limit; usage counts tokens, not characters.
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, HELLO)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 11}])
def test_streaming_equals_non_streaming(client, sampling):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=24, **sampling)
    whole = client.chat.completions.create(**kwargs)
    parts, chunks, usage = collect(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                  **kwargs))
    assert parts[0]["text"] == whole.choices[0].message.content
    assert parts[0]["finish"] == whole.choices[0].finish_reason
    assert (whole.choices[0].finish_reason == "length") == (whole.usage.completion_tokens == 24)
    # First chunk carries the role; the last chunk has no choices and carries usage; every other chunk has usage None.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_sse_shape(live):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["delta"] == {}
    assert "usage" not in events[0]  # only with stream_options.include_usage


@pytest.mark.parametrize("text", ["สวัสดีครับ วันนี้อากาศดีมาก", "ሰላም ለዓለም፣ እንዴት ነህ?"])
def test_non_latin_streaming_reassembles(client, tokenizer, text):
    # Steer the random model towards the byte pieces of the script (logit_bias), so its output is made
    # of multi-byte characters split across tokens: the case that turns naive streaming into U+FFFD.
    ids = sorted(set(tokenizer(text, add_special_tokens=False)["input_ids"]))
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=40, temperature=1.0,
                  seed=3, logit_bias={str(i): 30 for i in ids}, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].message.content
    parts, _, _ = collect(client.chat.completions.create(stream=True, **kwargs))
    assert parts[0]["text"] == content
    assert any(ch in text for ch in content.replace(" ", ""))  # the script really is in the output
    # Independent check: the tokens' own bytes decode to the same text.
    token_bytes = b"".join(bytes(t.bytes) for t in whole.choices[0].logprobs.content)
    assert token_bytes.decode("utf-8", errors="replace") == content
    # No delta ends inside a character that the next delta completes.
    assert all("\ufffd" not in d or "\ufffd" in content for d in parts[0]["deltas"])


def test_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=20, temperature=1.0)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    c = client.chat.completions.create(seed=4321, **kwargs).choices[0].message.content
    assert a == b and a != c


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 20
    parts, _, usage = collect(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0,
                                                             seed=5, n=2, stream=True,
                                                             stream_options={"include_usage": True}))
    assert [parts[i]["text"] for i in (0, 1)] == [c.message.content for c in r.choices]
    assert parts[0]["role"] == parts[1]["role"] == "assistant" and usage.completion_tokens == 20
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_stop_strings(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=40, temperature=1.0, seed=9)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip() and len(full) > 10
    r = client.chat.completions.create(stop=[stop, "never-appears"], **kwargs)
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    parts, _, _ = collect(client.chat.completions.create(stop=stop, stream=True, **kwargs))
    assert parts[0]["text"] == full[:full.index(stop)] and parts[0]["finish"] == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5  # the <|START_RESPONSE|> opener is not content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy picks the most likely token


# --- tools and JSON ----------------------------------------------------------------------------------


def check_calls(calls, allowed=("get_weather", "add")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_required(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS, tool_choice="required", max_tokens=400, temperature=1.0, seed=seed)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    check_calls(r.choices[0].message.tool_calls)


def test_tool_choice_named_and_none(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, max_tokens=400, temperature=1.0,
                                           seed=seed, tool_choice={"type": "function", "function": {"name": "add"}})
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
        check_calls(r.choices[0].message.tool_calls, allowed=("add",))
    r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_tool_choice_auto_takes_both_branches(client):
    kinds = set()
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="auto",
                                           max_tokens=400, temperature=1.0, seed=seed)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            check_calls(choice.message.tool_calls)
            kinds.add("calls")
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
            kinds.add("text")
    assert kinds == {"calls", "text"}


def test_parallel_calls(client):
    counts = []
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[ADD], tool_choice="required",
                                           max_tokens=400, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls)
        counts.append(len(r.choices[0].message.tool_calls))
        assert len({c.id for c in r.choices[0].message.tool_calls}) == counts[-1]
    assert max(counts) >= 2
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[ADD], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_equal_non_streamed(client):
    kwargs = dict(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=400,
                  temperature=1.0, seed=1)
    whole = client.chat.completions.create(**kwargs).choices[0]
    parts, _, _ = collect(client.chat.completions.create(stream=True, **kwargs))
    streamed = parts[0]
    assert streamed["finish"] == whole.finish_reason == "tool_calls" and streamed["text"] == ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed["calls"].items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for call in streamed["calls"].values():  # the first delta of a call carries id, type and name
        first = call["first"]
        assert first.id and first.type == "function" and first.function.name == call["name"]


def test_tool_conversation_round_trip(client):
    """A second turn with the call and its result in the history renders and generates."""
    first = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice="required",
                                           max_tokens=400, temperature=1.0, seed=2).choices[0].message
    history = HELLO + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "21 °C"} for c in first.tool_calls]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 5 else "stop")


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {
    "type": "integer", "minimum": 0, "maximum": 120}, "langs": {"type": "array", "items": {"enum": ["th", "am", "en"]},
                                                                  "maxItems": 3}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "langs", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt, max_tokens=200,
                                       temperature=1.0, seed=seed)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    parts, _, _ = collect(client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt,
                                                         max_tokens=200, temperature=1.0, seed=seed, stream=True))
    assert parts[0]["text"] == r.choices[0].message.content


def test_json_object_output(client):
    # json_object allows any object: a random model may wander, so only complete outputs are checked to parse.
    done = 0
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                           max_tokens=150, temperature=1.0, seed=seed)
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            done += 1
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert done >= 1


# --- /v1/completions ---------------------------------------------------------------------------------


def test_completions(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=4)
    r = client.completions.create(**kwargs)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert text == r.choices[0].text
    echo = client.completions.create(echo=True, **kwargs)
    assert echo.choices[0].text == "Once upon a time" + r.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=4, temperature=0,
                                     logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 16
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of a prompt agree
    assert len(many.choices[0].logprobs.tokens) == 4 and len(many.choices[0].logprobs.top_logprobs[0]) == 2


# --- service behaviour -------------------------------------------------------------------------------


def test_metrics(live, client):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("aetheris_requests_total", "aetheris_prompt_tokens_total", "aetheris_completion_tokens_total",
                 "aetheris_time_to_first_token_seconds_bucket", "aetheris_tokens_per_second_bucket",
                 "aetheris_queue_depth", "aetheris_errors_total"):
        assert name in text
    assert 'aetheris_requests_total{path="/v1/chat/completions",status="200"}' in text


def test_api_key_and_health_while_loading(checkpoint):
    release = threading.Event()

    def loader():
        release.wait(30)
        return load_checkpoint(str(checkpoint))

    server = LiveServer(create_app(loader=loader, model_name=MODEL, api_key="s3cret"), wait_ready=False)
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/metrics").status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    finally:
        release.set()
        server.stop()


def test_queue_full_and_disconnect_cancels(checkpoint):
    """One request decoding, one waiting: the third gets 429. Dropping the clients frees the worker."""
    model, tokenizer = load_checkpoint(str(checkpoint))
    server = LiveServer(create_app(model, tokenizer, model_name=MODEL,
                                   limits=Limits(max_queue=1, max_batch=1, max_tokens=100_000)))
    stops = {tokenizer.convert_tokens_to_ids(t) for t in (chat.END_RESPONSE, chat.END_TURN)} | {tokenizer.eos_token_id}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 100_000, "stream": True,
            "logit_bias": {str(i): -100 for i in stops}}  # never finishes on its own

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.aiter_lines()
                while "content" not in await anext(lines):  # decoding has started: the queue is empty again
                    pass
                async with http.stream("POST", "/v1/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200
                    await asyncio.sleep(0.3)
                    third = await http.post("/v1/chat/completions", json=body)
                    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            # Both streams are closed by now: the worker must drop them and go idle.
            deadline = time.monotonic() + 15
            while True:
                metrics = (await http.get("/metrics")).text
                if "aetheris_active_sequences 0.0" in metrics and "aetheris_queue_depth 0.0" in metrics:
                    break
                assert time.monotonic() < deadline, "cancelled generations kept running"
                await asyncio.sleep(0.1)
            r = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
            assert r.status_code == 200

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_serve_fails_fast_on_bad_model(tmp_path, capsys, checkpoint):
    from aetheris.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((checkpoint / "config.json").read_text())
    assert main(["serve", "--model", str(tmp_path / "half")]) == 2
    assert "random weights" in capsys.readouterr().err
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["serve", "--model", str(tmp_path / "notmodel")]) == 2
    assert "not an Aetheris" in capsys.readouterr().err


def test_checkpoint_template_is_used_when_different(checkpoint):
    """A tokenizer carrying a different chat template (e.g. a teacher's own) renders the prompt."""
    model, tokenizer = load_checkpoint(str(checkpoint))
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|START_OF_TURN_TOKEN|><|USER_TOKEN|>CUSTOM "
                               "{{ m['content'] }}<|END_OF_TURN_TOKEN|>{% endfor %}"
                               "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
                               "<|START_RESPONSE|>{% endif %}")
    expected = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    expected = expected.removesuffix(chat.START_RESPONSE)  # the server opens the response block itself
    server = LiveServer(create_app(model, tokenizer, model_name=MODEL))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens == len(tokenizer(expected, add_special_tokens=False)["input_ids"])
        assert r.usage.prompt_tokens != prompt_tokens(tokenizer, HELLO)
    finally:
        server.stop()
