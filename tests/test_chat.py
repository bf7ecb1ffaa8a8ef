"""The chat template: Python rendering == Jinja rendering (through the tokenizer), render -> parse
round trips for text and (parallel) tool calls, and tokenisation of the special markers."""

from __future__ import annotations

import json

import pytest

from aetheris import chat

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"name": "add", "description": "Add two numbers (a bare function, no OpenAI wrapper).",
     "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}},
]

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello!"}],
    "system + user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "สวัสดีครับ"}],
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "ሰላም "}, {"type": "text", "text": "ዓለም"}]}],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Weather in Paris and in Lomé?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lomé"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "31 °C"}]},
        {"role": "assistant", "content": "Paris: 18 °C; Lomé: 31 °C."},
        {"role": "developer", "content": "A second instruction turn."},
        {"role": "user", "content": "Thanks \"quoted\" {braces}"},
    ],
    "text and calls": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "7", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2.5}'}}]},
    ],
    "empty assistant": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    chat.install_chat_template(tok)
    return tok


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_equals_python(tokenizer, name, with_tools, generation_prompt):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    expected = chat.render_messages(messages, tools=tools, add_generation_prompt=generation_prompt)
    got = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
    assert got == expected


def test_layout():
    text = chat.render_messages(CONVERSATIONS["system + user"], tools=TOOLS)
    assert text == (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>" + chat.TOOL_PREAMBLE
        + "[" + json.dumps(TOOLS[0]["function"], ensure_ascii=False) + ", " + json.dumps(TOOLS[1]) + "]\n```"
        + "\n\nBe brief.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>สวัสดีครับ<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    multi = chat.render_messages(CONVERSATIONS["multi-turn"], add_generation_prompt=False)
    assert ('<|START_ACTION|>[{"tool_call_id": "call_1", "tool_name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"tool_call_id": "call_2", "tool_name": "get_weather", "parameters": {"city": "Lomé"}}]<|END_ACTION|>') in multi
    assert ('<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><|START_TOOL_RESULT|>{"tool_call_id": "call_1", '
            '"content": "18 °C, rain"}<|END_TOOL_RESULT|><|END_OF_TURN_TOKEN|>') in multi


def test_special_markers_are_single_tokens(tokenizer):
    text = chat.render_messages(CONVERSATIONS["multi-turn"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    for marker in (chat.START_TURN, chat.CHATBOT, chat.START_ACTION, chat.END_ACTION, chat.START_TOOL_RESULT):
        assert ids.count(tokenizer.convert_tokens_to_ids(marker)) == text.count(marker)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "Plain text ትግርኛ"},
    {"role": "assistant", "content": ""},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Addis Ababa"}'}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "ไทย"}'}},
        {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": [2, {"c": null}]}'}}]},
    {"role": "assistant", "content": "First text, then a call.", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
])
def test_render_parse_round_trip(tokenizer, message):
    body = chat.render_assistant(message)
    assert chat.parse_assistant(body).message() == message
    # Through the tokenizer, with the turn end the model generates after the body.
    ids = tokenizer(body + chat.END_TURN, add_special_tokens=False)["input_ids"]
    assert chat.parse_assistant(tokenizer.decode(ids, skip_special_tokens=False)).message() == message


def test_parse_edge_cases():
    assert chat.parse_assistant("no markers at all").content == "no markers at all"
    # Truncated response (hit max_tokens before <|END_RESPONSE|>) keeps the text.
    assert chat.parse_assistant("<|START_RESPONSE|>cut off").content == "cut off"
    turn = chat.parse_assistant('<|START_ACTION|>{"tool_call_id": "3", "tool_name": "f", "parameters": {"k": 1}}'
                                "<|END_ACTION|><|END_OF_TURN_TOKEN|>ignored")
    assert turn.content is None and turn.tool_calls[0]["function"] == {"name": "f", "arguments": '{"k": 1}'}
    with pytest.raises(ValueError, match="not valid JSON"):
        chat.parse_assistant("<|START_ACTION|>[{broken<|END_ACTION|>")
    with pytest.raises(ValueError, match="tool_name"):
        chat.parse_assistant('<|START_ACTION|>[{"parameters": {}}]<|END_ACTION|>')


def test_unknown_role_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="unknown message role"):
        chat.render_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(Exception, match="unknown message role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_template_saved_with_tokenizer(tokenizer, tmp_path):
    from aetheris.tokenizer import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == chat.CHAT_TEMPLATE and chat.uses_this_template(loaded)
    messages = CONVERSATIONS["multi-turn"]
    assert loaded.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True) == \
        chat.render_messages(messages, tools=TOOLS)
