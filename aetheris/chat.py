"""The Aetheris chat template, in one place: render OpenAI-style messages to a prompt, parse a generated
assistant turn back into text and tool calls, and the same template as a Jinja string for
``tokenizer.chat_template`` (saved with every checkpoint's tokenizer).

Format: Cohere Command-R7B / Tiny Aya style (Cohere's "Command R7B" prompt format, which Tiny Aya uses):

    <BOS_TOKEN>
    <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{tool preamble}{system text}<|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|USER_TOKEN|>{user text}<|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>{text}<|END_RESPONSE|><|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_ACTION|>[{"tool_call_id": "0", "tool_name": "f",
        "parameters": {...}}]<|END_ACTION|><|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><|START_TOOL_RESULT|>{"tool_call_id": "0", "content": "..."}
        <|END_TOOL_RESULT|><|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>          <- generation prompt

The generation prompt stops after ``<|CHATBOT_TOKEN|>`` so the model itself chooses between a text
answer (``<|START_RESPONSE|>``) and tool calls (``<|START_ACTION|>``); the server constrains that choice
(and the JSON of the calls) with a grammar. Messages follow the OpenAI Chat Completions shape
(platform.openai.com/docs/api-reference/chat/create): content is a string or a list of text parts,
assistant ``tool_calls`` carry ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
``arguments`` a JSON string (a dict is accepted too, as in transformers' chat templates).
Tools are OpenAI ``{"type": "function", "function": {name, description, parameters}}`` or bare functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

BOS = "<BOS_TOKEN>"
EOS = "<EOS_TOKEN>"
START_TURN = "<|START_OF_TURN_TOKEN|>"
END_TURN = "<|END_OF_TURN_TOKEN|>"
USER = "<|USER_TOKEN|>"
CHATBOT = "<|CHATBOT_TOKEN|>"
SYSTEM = "<|SYSTEM_TOKEN|>"
START_RESPONSE = "<|START_RESPONSE|>"
END_RESPONSE = "<|END_RESPONSE|>"
START_ACTION = "<|START_ACTION|>"
END_ACTION = "<|END_ACTION|>"
START_TOOL_RESULT = "<|START_TOOL_RESULT|>"
END_TOOL_RESULT = "<|END_TOOL_RESULT|>"

ROLES = ("system", "developer", "user", "assistant", "tool")
GENERATION_PROMPT = START_TURN + CHATBOT

TOOL_PREAMBLE = (
    "# Tools\n"
    "You can call the tools below. To call tools, answer with an action: a JSON list of calls, each "
    '{"tool_call_id": "<id>", "tool_name": "<name>", "parameters": {<arguments>}}. '
    "Otherwise answer with text.\n"
    "## Available Tools\n"
    "```json\n"
)


# ---------------------------------------------------------------------------------------------------
# Rendering (Python)
# ---------------------------------------------------------------------------------------------------

def _dumps(value) -> str:
    """JSON exactly as the Jinja ``tojson`` filter of transformers writes it (json.dumps, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def content_text(content) -> str:
    """A message's content as one string: strings as they are, text parts concatenated, None as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def tool_function(tool: dict) -> dict:
    """The function object of an OpenAI tool ({"type": "function", "function": {...}}) or a bare function."""
    return tool["function"] if "function" in tool else tool


def render_tools(tools: list[dict]) -> str:
    return TOOL_PREAMBLE + "[" + ", ".join(_dumps(tool_function(t)) for t in tools) + "]\n```"


def _arguments_text(arguments) -> str:
    """A call's arguments as JSON text: an OpenAI JSON string verbatim, a dict serialised."""
    return arguments if isinstance(arguments, str) else _dumps(arguments)


def _tool_call_parts(tool_calls: list[dict]) -> list[tuple[str, bool]]:
    calls = [
        '{"tool_call_id": ' + _dumps(tc["id"]) + ', "tool_name": ' + _dumps(tc["function"]["name"])
        + ', "parameters": ' + _arguments_text(tc["function"]["arguments"]) + "}"
        for tc in tool_calls
    ]
    return [(START_ACTION, True), ("[" + ", ".join(calls) + "]", False), (END_ACTION, True)]


def render_tool_calls(tool_calls: list[dict]) -> str:
    return "".join(text for text, _ in _tool_call_parts(tool_calls))


def _assistant_parts(message: dict) -> list[tuple[str, bool]]:
    text = content_text(message.get("content"))
    calls = message.get("tool_calls") or []
    out = []
    if text or not calls:
        out += [(START_RESPONSE, True), (text, False), (END_RESPONSE, True)]
    if calls:
        out += _tool_call_parts(calls)
    return out


def render_assistant(message: dict) -> str:
    """The body of an assistant turn (what the model generates after ``<|CHATBOT_TOKEN|>``)."""
    return "".join(text for text, _ in _assistant_parts(message))


def render_parts(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                 bos: bool = True) -> list[tuple[str, bool]]:
    """The prompt as (text, is_marker) pieces: the template's own control markers apart from the text that
    came from the request (messages, tool calls, tool results, tool definitions). The server tokenises
    request text with special-token matching off, so a user who writes ``<|END_OF_TURN_TOKEN|>`` gets
    those characters, not a forged turn boundary. Joined, the pieces are ``render_messages``' text."""
    out = [(BOS, True)] if bos else []
    rest = list(messages)
    if tools:
        system = render_tools(tools)
        if rest and rest[0]["role"] in ("system", "developer"):
            system += "\n\n" + content_text(rest.pop(0).get("content"))
        out += [(START_TURN + SYSTEM, True), (system, False), (END_TURN, True)]
    for m in rest:
        role = m["role"]
        if role in ("system", "developer"):
            out += [(START_TURN + SYSTEM, True), (content_text(m.get("content")), False), (END_TURN, True)]
        elif role == "user":
            out += [(START_TURN + USER, True), (content_text(m.get("content")), False), (END_TURN, True)]
        elif role == "assistant":
            out += [(START_TURN + CHATBOT, True), *_assistant_parts(m), (END_TURN, True)]
        elif role == "tool":
            result = '{"tool_call_id": ' + _dumps(m.get("tool_call_id", "")) + ', "content": ' \
                + _dumps(content_text(m.get("content"))) + "}"
            out += [(START_TURN + SYSTEM + START_TOOL_RESULT, True), (result, False), (END_TOOL_RESULT + END_TURN, True)]
        else:
            raise ValueError(f"unknown message role {role!r}; expected one of {', '.join(ROLES)}")
    if add_generation_prompt:
        out.append((GENERATION_PROMPT, True))
    return [(text, marker) for text, marker in out if text]


def render_messages(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    bos: bool = True) -> str:
    """Messages (+ tools) -> prompt text. Tokenise it with ``add_special_tokens=False`` (BOS is in the text)."""
    return "".join(text for text, _ in render_parts(messages, tools, add_generation_prompt, bos))


# ---------------------------------------------------------------------------------------------------
# The same template in Jinja (for tokenizer.chat_template; tests hold it equal to render_messages)
# ---------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{%- macro text(c) -%}{%- if c is none -%}{%- elif c is string -%}{{ c }}"
    "{%- else -%}{%- for p in c -%}{{ p['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if bos_token is defined and bos_token %}{{ bos_token }}{% else %}" + BOS + "{% endif -%}"
    "{%- set ns = namespace(skip_first=false) -%}"
    "{%- if tools -%}"
    + START_TURN + SYSTEM + "{{ " + json.dumps(TOOL_PREAMBLE) + " }}["
    "{%- for t in tools -%}{{ (t['function'] if t['function'] is defined else t) | tojson }}"
    "{%- if not loop.last %}, {% endif -%}{%- endfor -%}]\n```"
    "{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- set ns.skip_first = true -%}{{ '\\n\\n' }}{{ text(messages[0]['content']) }}"
    "{%- endif -%}" + END_TURN +
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and ns.skip_first -%}"
    "{%- elif m['role'] in ['system', 'developer'] -%}" + START_TURN + SYSTEM + "{{ text(m['content']) }}" + END_TURN +
    "{%- elif m['role'] == 'user' -%}" + START_TURN + USER + "{{ text(m['content']) }}" + END_TURN +
    "{%- elif m['role'] == 'assistant' -%}" + START_TURN + CHATBOT +
    "{%- set calls = m['tool_calls'] if m['tool_calls'] is defined and m['tool_calls'] else [] -%}"
    "{%- set body = text(m['content'] if m['content'] is defined else none) -%}"
    "{%- if body or not calls -%}" + START_RESPONSE + "{{ body }}" + END_RESPONSE + "{%- endif -%}"
    "{%- if calls -%}" + START_ACTION + "["
    "{%- for tc in calls -%}"
    '{"tool_call_id": {{ tc[\'id\'] | tojson }}, "tool_name": {{ tc[\'function\'][\'name\'] | tojson }}, "parameters": '
    "{%- if tc['function']['arguments'] is string %} {{ tc['function']['arguments'] }}"
    "{%- else %} {{ tc['function']['arguments'] | tojson }}{%- endif -%}}"
    "{%- if not loop.last %}, {% endif -%}"
    "{%- endfor -%}]" + END_ACTION + "{%- endif -%}" + END_TURN +
    "{%- elif m['role'] == 'tool' -%}" + START_TURN + SYSTEM + START_TOOL_RESULT +
    '{"tool_call_id": {{ (m[\'tool_call_id\'] if m[\'tool_call_id\'] is defined else \'\') | tojson }}, '
    '"content": {{ text(m[\'content\']) | tojson }}}' + END_TOOL_RESULT + END_TURN +
    "{%- else -%}{{ raise_exception('unknown message role ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + GENERATION_PROMPT + "{%- endif -%}"
)


def install_chat_template(tokenizer) -> None:
    """Make ``tokenizer.apply_chat_template`` (and the saved tokenizer_config) use this template."""
    tokenizer.chat_template = CHAT_TEMPLATE


def uses_this_template(tokenizer) -> bool:
    """True when the tokenizer's own template is ours or absent, so ``render_messages`` is the right renderer."""
    template = getattr(tokenizer, "chat_template", None)
    return template in (None, "", CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------------
# Parsing a generated assistant turn
# ---------------------------------------------------------------------------------------------------

@dataclass
class AssistantTurn:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape: {"id", "type", "function": {...}}

    def message(self) -> dict:
        out = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start):] if j < 0 else text[i + len(start):j]


def parse_calls(action: str) -> list[dict]:
    """The JSON list inside an action block -> OpenAI tool calls (arguments as JSON text).
    Raises ValueError when the block is not a list of {tool_call_id, tool_name, parameters}."""
    try:
        value = json.loads(action)
    except json.JSONDecodeError as err:
        raise ValueError(f"action block is not valid JSON: {err}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("action block must be a JSON list of calls")
    calls = []
    for i, call in enumerate(value):
        if not isinstance(call, dict) or not isinstance(call.get("tool_name"), str):
            raise ValueError(f"call {i} in the action block has no tool_name")
        params = call.get("parameters", {})
        calls.append({"id": str(call.get("tool_call_id", i)), "type": "function",
                      "function": {"name": call["tool_name"], "arguments": _dumps(params)}})
    return calls


def parse_assistant(text: str) -> AssistantTurn:
    """A generated assistant turn (decoded *with* special tokens) -> content and tool calls.

    Text outside any block (a model that skipped ``<|START_RESPONSE|>``) is the content. An action
    block that does not parse raises ValueError (grammar-constrained generation never produces one).
    """
    for tail in (END_TURN, EOS):
        text = text.split(tail, 1)[0]
    response = _between(text, START_RESPONSE, END_RESPONSE)
    action = _between(text, START_ACTION, END_ACTION)
    if response is not None and action is not None and text.find(START_ACTION) < text.find(START_RESPONSE):
        response = _between(text[text.find(START_ACTION):], START_RESPONSE, END_RESPONSE)
    if response is None and action is None:
        response = text
    elif response is not None and START_ACTION in response:
        response = response.split(START_ACTION, 1)[0]
    calls = parse_calls(action) if action is not None else []
    return AssistantTurn(content=response if (response or not calls) else None, tool_calls=calls)
