"""Multilingual tool calling: tool schemas + a user turn -> one function call, scored per BFCL rules.

Data:
- **xSID** (van der Goot et al. 2021, "From Masked Language Modeling to Translation: Non-English
  Auxiliary Tasks Improve Zero-shot Spoken Language Understanding"; github.com/mainlp/xsid v0.7):
  13 languages, intent -> function (``FUNCTIONS``), slot spans -> string arguments. Every example
  offers all 16 functions, so the function must be selected. A slot whose type is not a parameter of
  its intent's function (rare annotation noise, < 1% of spans) is dropped from the expected call; two
  spans of one slot type are joined with a space. Argument values are the spans as written in the
  utterance (the user's language), so the model must copy them, not translate them.
- **a JSONL file** (``--toolcall-file``, e.g. the generated 70-language set): one example per line,
  ``{"id", "lang", "tools": [function schemas], "user": str, "expected": {"name", "arguments"}}``;
  tools as ``{"name", "description", "parameters": JSON schema}`` or OpenAI's ``{"type": "function",
  "function": {...}}``. Reported as ``toolcall_gen``; xSID as ``toolcall_xsid``.

Prompt: Cohere Command-R7B style (the format Tiny Aya was trained on): tools as JSON in the system turn, the answer expected
as ``<|START_ACTION|>[{"tool_call_id", "tool_name", "parameters"}]<|END_ACTION|>``, rendered by the
shared chat template (``aetheris.chat``) so evaluation, SFT and the server see one format.

Scores per example:
- ``parsed``: a JSON call was found (action block, or the first JSON object/array in the text);
- ``schema_valid``: its (first) function exists among the offered tools and its arguments validate
  against that function's JSON schema (``jsonschema``);
- ``name``: function name == expected;
- ``exact``: name and arguments exactly equal (JSON equality);
- ``ast`` (the primary score): BFCL's AST checker (``check_calls`` below): exactly one call, matched
  against BFCL possible answers -- a BFCL record's own, or the single gold call as one allowed value per
  argument (``possible_answers``). ``tests/test_bfcl.py`` holds our verdicts equal to the official
  checker's on BFCL's simple and multiple sets.

For a model in training (distillation stage 3): ``toolcall_validity`` (greedy generation on held-out examples,
the scores above plus exact match of the whole assistant turn) and ``toolcall_loss`` (teacher-forced loss of
the gold call).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import torch

from aetheris.chat import END_ACTION, END_TURN, EOS, render_assistant, render_messages
from aetheris.generation import generate
from aetheris.model import IGNORE_INDEX
from aetheris.paths import data_path
from aetheris.sft import encode_conversation, record_messages
from aetheris.tasks import Scores

NAME = "toolcall"
MAX_NEW_TOKENS = 256
STOPS = ["<|END_ACTION|>", "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|>"]

# xSID language code -> file stem (Norwegian is the Bokmål subset)
XSID_FILES = {"ar": "ar", "da": "da", "de": "de", "en": "en", "id": "id", "it": "it", "ja": "ja", "lt": "lt",
              "nl": "nl", "no": "no-B", "sr": "sr", "tr": "tr", "zh": "zh"}

# intent -> (function name, description, slot types that become its parameters)
FUNCTIONS = {
    "weather/find": ("get_weather", "Look up the weather forecast or current conditions.",
                     ["datetime", "location", "weather/attribute", "condition_description", "condition_temperature"]),
    "alarm/set_alarm": ("set_alarm", "Set an alarm.", ["datetime", "recurring_datetime", "reminder/todo", "reference"]),
    "alarm/cancel_alarm": ("cancel_alarm", "Cancel one or more alarms.", ["reference", "reference-part", "datetime"]),
    "alarm/show_alarms": ("show_alarms", "List the user's alarms.", ["reference", "reference-part", "datetime"]),
    "alarm/snooze_alarm": ("snooze_alarm", "Snooze a ringing alarm.", ["datetime", "reference"]),
    "alarm/time_left_on_alarm": ("time_left_on_alarm", "Tell how much time is left until an alarm.", ["reference"]),
    "alarm/modify_alarm": ("modify_alarm", "Change the time of an existing alarm.", ["datetime"]),
    "reminder/set_reminder": ("set_reminder", "Create a reminder.", ["reminder/todo", "datetime", "recurring_datetime"]),
    "reminder/cancel_reminder": ("cancel_reminder", "Delete one or more reminders.",
                                 ["reference", "reference-part", "reminder/todo", "datetime", "recurring_datetime"]),
    "reminder/show_reminders": ("show_reminders", "List the user's reminders.",
                                ["reference", "reference-part", "reminder/todo", "datetime"]),
    "AddToPlaylist": ("add_to_playlist", "Add a song or artist to a playlist.",
                      ["playlist", "music_item", "reference", "artist", "entity_name"]),
    "BookRestaurant": ("book_restaurant", "Book a table at a restaurant.",
                       ["location", "restaurant_type", "party_size_number", "datetime", "restaurant_name",
                        "party_size_description", "sort", "cuisine", "served_dish", "facility"]),
    "PlayMusic": ("play_music", "Play music.",
                  ["artist", "service", "music_item", "datetime", "sort", "album", "playlist", "track", "genre"]),
    "RateBook": ("rate_book", "Give a rating to a book or other work.",
                 ["rating_value", "rating_unit", "object_name", "best_rating", "object_select", "object_type",
                  "object_part_of_series_type"]),
    "SearchCreativeWork": ("search_creative_work", "Search for a book, song, film, game or other work.",
                           ["object_name", "object_type"]),
    "SearchScreeningEvent": ("search_screening_event", "Find movie showtimes.",
                             ["location", "movie_name", "object_type", "movie_type", "object_location_type", "datetime"]),
}


def param_name(slot: str) -> str:
    """xSID slot type -> parameter name: "reminder/todo" -> "todo", "reference-part" -> "reference_part"."""
    return slot.split("/")[-1].replace("-", "_")


def xsid_tools() -> list[dict]:
    tools = []
    for name, description, slots in FUNCTIONS.values():
        # no per-parameter descriptions: the names speak, and 16 tools already make a long system turn
        props = {param_name(s): {"type": "string"} for s in slots}
        tools.append({"name": name, "description": description,
                      "parameters": {"type": "object", "properties": props, "required": []}})
    return tools


# --- data -------------------------------------------------------------------------------------------------


def _extra_examples(options: dict) -> list[dict]:
    path = options.get("toolcall_file")
    if not path:
        return []
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--toolcall-file {path} does not exist")
    with open(p, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()]
    for i, ex in enumerate(examples):
        missing = {"lang", "tools", "expected"} - set(ex) or ({"user", "messages"}.isdisjoint(ex) and {"user"}) or set()
        if missing:
            raise ValueError(f"{path} line {i + 1}: missing {sorted(missing)}; each line needs id, lang, tools, user, expected")
    return examples


def _with_xsid(options: dict) -> bool:
    return options.get("toolcall_xsid", True) is not False


def languages(options: dict) -> list[str]:
    langs = list(XSID_FILES) if _with_xsid(options) else []
    for ex in _extra_examples(options):
        if ex["lang"] not in langs:
            langs.append(ex["lang"])
    return langs


def data_files(lang: str, options: dict) -> list[Path]:
    files = []
    if lang in XSID_FILES and _with_xsid(options):
        files.append(data_path("toolcall", "xsid-0.7", f"{XSID_FILES[lang]}.test.conll", what=f"xSID {lang} test set"))
    if options.get("toolcall_file"):
        files.append(Path(options["toolcall_file"]))
    return files


def _offsets(text: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Character span of every token, found in order (so "i" in "Tilføj i dag" is the word, not the letter)."""
    spans, cursor = [], 0
    for tok in tokens:
        at = text.find(tok, cursor)
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(tok)))
        cursor = at + len(tok)
    return spans


def parse_conll(path: Path) -> list[dict]:
    """xSID .conll -> [{id, text, intent, slots: [(slot type, surface string)]}]."""
    examples = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        meta, rows = {}, []
        for line in block.split("\n"):
            if line.startswith("# "):
                key, _, value = line[2:].partition(" = ")
                meta[key.strip()] = value
            elif line.strip():
                rows.append(line.split("\t"))
        text = meta.get("text", "")
        offsets = _offsets(text, [r[1] for r in rows])
        spans: list[list] = []  # [slot type, [token indices]]
        for i, row in enumerate(rows):
            tag = row[3] if len(row) > 3 else "O"
            if tag.startswith("I-") and spans and spans[-1][0] == tag[2:] and spans[-1][1][-1] == i - 1:
                spans[-1][1].append(i)
            elif tag != "O":
                spans.append([tag[2:], [i]])
        slots = []
        for slot, idx in spans:
            first, last = offsets[idx[0]], offsets[idx[-1]]
            surface = text[first[0]:last[1]] if first and last else " ".join(rows[i][1] for i in idx)
            slots.append((slot, surface))
        examples.append({"id": meta.get("id", str(len(examples) + 1)), "text": text, "intent": meta.get("intent"),
                         "slots": slots})
    return examples


# xSID ships two splits per language: ``valid`` (300 utterances; train on it, e.g. stage-3 SFT) and ``test``
# (evaluation). The split names accepted here -> the file stem.
XSID_SPLITS = {"test": "test", "validation": "valid", "valid": "valid"}


def xsid_examples(lang: str, split: str = "test") -> list[dict]:
    """One xSID split of one language as tool-call examples: intent -> function, slots -> arguments (a slot
    that occurs twice is joined with a space). Utterances whose intent has no function are skipped."""
    if lang not in XSID_FILES:
        raise ValueError(f"xSID has no language {lang!r}; choose from {', '.join(XSID_FILES)}")
    if split not in XSID_SPLITS:
        raise ValueError(f"xSID split {split!r}: choose test or validation")
    stem = XSID_SPLITS[split]
    path = data_path("toolcall", "xsid-0.7", f"{XSID_FILES[lang]}.{stem}.conll", what=f"xSID {lang} {split} set")
    tools = xsid_tools()
    out = []
    for ex in parse_conll(path):
        if ex["intent"] not in FUNCTIONS:
            continue
        name, _, slots = FUNCTIONS[ex["intent"]]
        args: dict[str, str] = {}
        for slot, value in ex["slots"]:
            if slot in slots:
                key = param_name(slot)
                args[key] = f"{args[key]} {value}" if key in args else value
        out.append({"id": ex["id"], "lang": lang, "tools": tools, "user": ex["text"],
                    "expected": {"name": name, "arguments": args}})
    return out


# --- prompt and parsing ---------------------------------------------------------------------------------


def normalize_tool(tool: dict) -> dict:
    return tool["function"] if tool.get("type") == "function" and "function" in tool else tool


def render_prompt(tools: list[dict], user: str) -> str:
    """The project's chat template (``aetheris.chat``, the same one SFT trains on and the server serves):
    tools in the system turn, the model answers with an action block. BOS comes from the tokenizer."""
    return render_messages([{"role": "user", "content": user}], tools=tools, bos=False)


def _as_call(value) -> dict | None:
    if not isinstance(value, dict):
        return None
    name = value.get("tool_name", value.get("name"))
    args = value.get("parameters", value.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": name, "arguments": args} if isinstance(name, str) and isinstance(args, dict) else None


def parse_calls(text: str) -> list[dict] | None:
    """Every call of the first JSON value in a model output that holds one, as [{"name", "arguments"}],
    or None when nothing parses. Accepts a Command-R action list, a single action object, or
    OpenAI-style {"name", "arguments"}."""
    start = text.find("<|START_ACTION|>")
    body = text[start + len("<|START_ACTION|>"):] if start >= 0 else text
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", body):
        try:
            value, _ = decoder.raw_decode(body, m.start())
        except json.JSONDecodeError:
            continue
        items = value if isinstance(value, list) else [value]
        calls = [_as_call(v) for v in items]
        if calls and calls[0] is not None:
            # an entry that is not a call still counts: BFCL sees a list of calls with a broken one
            return [c if c is not None else {"name": None, "arguments": {}} for c in calls]
    return None


def parse_call(text: str) -> dict | None:
    """The first call in a model output (``parse_calls``), or None."""
    calls = parse_calls(text)
    return calls[0] if calls else None


# --- BFCL-compatible matching ---------------------------------------------------------------------------
#
# BFCL's AST checker (gorilla/berkeley-function-call-leaderboard, ``bfcl_eval/eval_checker/ast_eval/
# ast_checker.py``) compares a call with *possible answers*: per parameter a list of allowed values, ""
# in the list meaning "may be omitted"; a dict parameter's allowed values are dicts of ``{key: [allowed]}``;
# an array of dicts' allowed values are lists of such dicts. Its rules, re-implemented here:
# - exactly one call (simple/multiple categories); the name equals the possible answer's function;
# - every ``required`` parameter present; every given parameter both in the schema and in the possible
#   answer; every possible-answer parameter without "" among its values present;
# - types by the schema's BFCL type (JSON schema's ``number``/``object`` read as ``float``/``dict``), exact
#   Python types (a bool is not an integer, 5.0 is not an integer); an integer passes for a top-level
#   ``float`` (converted), never inside an array; array items are type-checked one level deep against
#   the first list among the allowed values; a value whose type equals the allowed values' own type
#   when that differs from the schema's (e.g. "5" where the answers are strings for an integer) is a
#   "variable" and is compared raw;
# - strings: ``standardize_string`` (drop spaces and ``,./-_*^``, lowercase, ' -> ") then membership;
#   lists: elementwise standardised, order kept, membership among the allowed lists; dicts: every given
#   key allowed and its (standardised) value among that key's allowed values, every missing key
#   optional; lists of dicts: same length and dict by dict in order; anything else: Python ``in`` (so
#   1 == 1.0 == True, as in BFCL).
# The schema's ``default`` is never read.

BFCL_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
              "dict": dict, "any": str}
JSON_SCHEMA_TYPES = {"number": "float", "object": "dict"}  # JSON schema names -> BFCL's


def standardize_string(s: str) -> str:
    """BFCL's normalisation: drop spaces and ``,./-_*^``, lowercase, single -> double quotes."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


def _std(value):
    return standardize_string(value) if type(value) is str else value


def _bfcl_type(schema: dict | None, where: str) -> type:
    name = (schema or {}).get("type")
    name = JSON_SCHEMA_TYPES.get(name, name)
    if name not in BFCL_TYPES:
        raise ValueError(f"{where}: type {name!r} is not one BFCL's checker knows "
                         f"({', '.join(BFCL_TYPES)}; JSON schema's number/object are read as float/dict)")
    return BFCL_TYPES[name]


def _answer_type(allowed) -> type | None:
    """The Python type of the first allowed value that is not the "may be omitted" marker."""
    return next((type(a) for a in allowed if a != ""), None)


def _type_check(value, allowed: list, py: type, item_py: type | None) -> tuple[bool, bool]:
    """(type ok, value is a "variable" to compare raw)."""
    answer_type = _answer_type(allowed)
    variable = answer_type is not None and answer_type is not py
    if type(value) is py:
        if item_py is None:
            return True, variable
        for candidate in allowed:  # one level deep, against the first candidate that fits
            if not isinstance(candidate, list):
                return True, variable
            inner = _answer_type(candidate)
            if all(type(v) is item_py or (inner is not None and type(v) is inner) for v in value):
                return True, variable
        return False, False
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, False


def _dict_ok(value: dict, allowed: list) -> bool:
    for candidate in allowed:
        if candidate == "" or not isinstance(candidate, dict):
            continue
        if all(k in candidate and _std(v) in [_std(a) for a in candidate[k]] for k, v in value.items()) and \
                all(k in value or "" in options for k, options in candidate.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, allowed: list) -> bool:
    for candidate in allowed:
        candidate = list(candidate) if isinstance(candidate, (list, str)) else []
        if len(candidate) == len(value) and all(_dict_ok(v, [c]) for v, c in zip(value, candidate)):
            return True
    return False


def _list_ok(value: list, allowed: list) -> bool:
    got = [_std(v) for v in value]
    return any(isinstance(c, (list, str)) and got == [_std(a) for a in c] for c in allowed)


def check_call(call: dict, possible: dict, tools: list[dict], where: str = "call") -> tuple[bool, str]:
    """One call ``{"name", "arguments"}`` against BFCL possible answers ``{function: {param: [allowed]}}``."""
    (name, answers), = possible.items()
    schema = next((normalize_tool(t) for t in tools if normalize_tool(t)["name"] == name), None)
    if schema is None:
        raise ValueError(f"{where}: the expected function {name!r} is not among the record's tools")
    params = schema.get("parameters") or {}
    props, required = params.get("properties") or {}, params.get("required") or []
    for p, allowed in answers.items():
        if not isinstance(allowed, list):
            raise ValueError(f"{where}: possible answers of {name}.{p} must be a list of allowed values "
                             f"(\"\" = may be omitted), got {type(allowed).__name__}")
    if call["name"] != name:
        return False, f"wrong function {call['name']!r}"
    args = call["arguments"]
    for p in required:
        if p not in args:
            return False, f"missing required parameter {p!r}"
    for p, value in args.items():
        if p not in props or p not in answers:
            return False, f"unexpected parameter {p!r}"
        allowed = answers[p]
        py = _bfcl_type(props[p], f"{where}: {name}.{p}")
        item_py = None
        if py is list and props[p].get("type") in ("array", "tuple") and "items" in props[p]:
            item_py = _bfcl_type(props[p]["items"], f"{where}: {name}.{p} items")
        if py is float and type(value) is int:
            value = float(value)  # Python's int -> float promotion, top level only
        ok, variable = _type_check(value, allowed, py, item_py)
        if not ok:
            return False, f"wrong type for {p!r}"
        if variable:
            fits = value in allowed
        elif py is dict:
            fits = _dict_ok(value, allowed)
        elif py is list and item_py is dict:
            fits = _list_of_dicts_ok(value, allowed)
        elif py is str:
            fits = _std(value) in [_std(a) for a in allowed if type(a) is str]
        elif py is list:
            fits = _list_ok(value, allowed)
        else:
            fits = value in allowed
        if not fits:
            return False, f"wrong value for {p!r}"
    for p, allowed in answers.items():
        if p not in args and "" not in allowed:
            return False, f"expected parameter {p!r} missing"
    return True, "ok"


def check_calls(calls: list[dict] | None, possible: dict, tools: list[dict], where: str = "call") -> tuple[bool, str]:
    """BFCL's simple/multiple rule: exactly one call, matched against the possible answers."""
    if not calls:
        return False, "no call parsed"
    if len(calls) != 1:
        return False, f"{len(calls)} calls where one was expected"
    return check_call(calls[0], possible, tools, where)


def possible_answers(expected: dict, tools: list[dict]) -> dict:
    """A single gold call as BFCL possible answers: every given argument its one allowed value (dicts as
    ``{key: [value]}``, lists of dicts as one list of such dicts); nothing else may be given."""
    schema = next((normalize_tool(t) for t in tools if normalize_tool(t)["name"] == expected["name"]), None)
    props = ((schema or {}).get("parameters") or {}).get("properties") or {}
    answers = {}
    for p, v in expected["arguments"].items():
        if isinstance(v, dict):
            answers[p] = [{k: [x] for k, x in v.items()}]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and \
                (props.get(p, {}).get("items") or {}).get("type") in ("dict", "object"):
            answers[p] = [[{k: [x] for k, x in d.items()} for d in v]]
        else:
            answers[p] = [v]
    return {expected["name"]: answers}


def ast_match(call: dict | None, expected: dict, tools: list[dict]) -> tuple[bool, str]:
    """(match, reason) of one call against one gold call, under BFCL's rules (``check_call``)."""
    if call is None:
        return False, "no call parsed"
    return check_call(call, possible_answers(expected, tools), tools)


_BFCL_TO_JSON_SCHEMA = {"dict": "object", "float": "number", "tuple": "array"}


def _json_schema(schema):
    """BFCL's schema dialect (dict, float, tuple, any) as JSON schema, for ``jsonschema``."""
    if isinstance(schema, list):
        return [_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _json_schema(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _json_schema(v) for name, v in out["properties"].items()}
    if out.get("type") == "any":
        out.pop("type")
    elif out.get("type") in _BFCL_TO_JSON_SCHEMA:
        out["type"] = _BFCL_TO_JSON_SCHEMA[out["type"]]
    return out


def schema_valid(call: dict | None, tools: list[dict]) -> bool:
    if call is None:
        return False
    schema = next((normalize_tool(t) for t in tools if normalize_tool(t)["name"] == call["name"]), None)
    if schema is None:
        return False
    try:
        jsonschema.validate(call["arguments"], _json_schema(schema.get("parameters") or {"type": "object"}))
    except jsonschema.ValidationError:
        return False
    return True


def score_output(text: str, example: dict) -> dict[str, float]:
    calls = parse_calls(text)
    call = calls[0] if calls else None
    expected = example["expected"]
    possible = example.get("possible_answer") or possible_answers(expected, example["tools"])
    return {
        "parsed": float(call is not None),
        "schema_valid": float(schema_valid(call, example["tools"])),
        "name": float(call is not None and call["name"] == expected["name"]),
        "exact": float(call is not None and call["name"] == expected["name"] and call["arguments"] == expected["arguments"]),
        "ast": float(check_calls(calls, possible, example["tools"], example.get("where", "call"))[0]),
    }


def _user_text(ex: dict) -> str:
    if "user" in ex:
        return ex["user"]
    return next(m["content"] for m in reversed(ex["messages"]) if m.get("role") == "user")


def score_examples(lm, examples: list[dict], desc: str, options: dict) -> Scores:
    """Generate one answer per example and score it (``ast`` per example; rates in ``extra``)."""
    prompts = [render_prompt(ex["tools"], _user_text(ex)) for ex in examples]
    cap = int(options.get("toolcall_max_new_tokens") or MAX_NEW_TOKENS)
    outputs = lm.generate_until(prompts, STOPS, max_new_tokens=cap, desc=desc, skip_special_tokens=False)
    rows = [score_output(o, ex) for o, ex in zip(outputs, examples)]
    n = max(len(rows), 1)
    extra = {f"{k}_rate" if k in ("parsed", "schema_valid") else f"{k}_acc": sum(r[k] for r in rows) / n
             for k in ("parsed", "schema_valid", "name", "exact")}
    return Scores("ast_match", True, [ex.get("id", i) for i, ex in enumerate(examples)], [r["ast"] for r in rows],
                  extra=extra, outputs=outputs)


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    results = {}
    if lang in XSID_FILES and _with_xsid(options):
        results["toolcall_xsid"] = score_examples(lm, xsid_examples(lang)[:limit], f"toolcall xsid {lang}", options)
    extra = [ex for ex in _extra_examples(options) if ex["lang"] == lang][:limit]
    if extra:
        results["toolcall_gen"] = score_examples(lm, extra, f"toolcall gen {lang}", options)
    return results


# ----------------------------------------------------------------------------------------------
# A model in training on held-out tool-call examples (the distillation stage 3 report)


def toolcall_loss(model, tokenizer, examples: list[dict]) -> float:
    """Teacher-forced cross-entropy (nats per token) of the gold assistant turn of each example, given its
    prompt, over all examples' assistant tokens.

    The smooth companion of ``toolcall_validity``: a small student's greedy output may still miss the format
    by one token after SFT (its validity then stays 0) while the held-out loss of the right call has fallen.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for ex in examples:
            ids, labels = encode_conversation(record_messages(ex), ex.get("tools"), tokenizer)
            n = sum(lab != IGNORE_INDEX for lab in labels[1:])                 # tokens the shifted loss averages
            if n:
                out = model(torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
                total, count = total + float(out.ce_loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def toolcall_validity(model, tokenizer, examples: list[dict], max_new_tokens: int = 96, batch_size: int = 32) -> dict:
    """Greedy generation after the chat template's generation prompt; mean scores overall and per language."""
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (END_ACTION, END_TURN, EOS)]
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [tokenizer.encode(render_messages(record_messages(ex)[:1], ex["tools"]), add_special_tokens=False)
                       for ex in chunk]
            results = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                               stop_token_ids=stops)
            for ex, res in zip(chunk, results):
                text = tokenizer.decode(res.token_ids, skip_special_tokens=False)
                scores = score_output(text, ex)
                gold = render_assistant(record_messages(ex)[1])
                scores["turn_exact"] = float(text.strip() + END_ACTION == gold or text.strip() == gold)
                rows.append((ex["lang"], scores))
    model.train(was_training)
    keys = ["parsed", "schema_valid", "name", "exact", "ast", "turn_exact"]

    def mean(rs):
        return {k: sum(r[k] for r in rs) / max(len(rs), 1) for k in keys}

    per_lang: dict[str, list] = {}
    for lang, r in rows:
        per_lang.setdefault(lang, []).append(r)
    return {"overall": mean([r for _, r in rows]), "per_language": {lang: mean(rs) for lang, rs in per_lang.items()},
            "n": len(rows)}
