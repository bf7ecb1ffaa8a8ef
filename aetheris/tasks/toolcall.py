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

Prompt: Cohere Command-R7B style (DESIGN.md §2): tools as JSON in the system turn, the answer expected
as ``<|START_ACTION|>[{"tool_call_id", "tool_name", "parameters"}]<|END_ACTION|>``, rendered by the
shared chat template (``aetheris.chat``) so evaluation, SFT and the server see one format.

Scores per example (the first call in the output is scored):
- ``parsed``: a JSON call was found (action block, or the first JSON object/array in the text);
- ``schema_valid``: its function exists among the offered tools and its arguments validate
  against that function's JSON schema (``jsonschema``);
- ``name``: function name == expected;
- ``exact``: name and arguments exactly equal (JSON equality);
- ``ast`` (the primary score): BFCL's AST checker rules (gorilla/berkeley-function-call-leaderboard
  ``ast_checker.py``), re-implemented: same name; every required parameter present; no parameter
  outside the schema; type-aware values (an integer is accepted for a ``number``, booleans are not
  numbers); strings compared after BFCL's ``standardize_string`` (drop spaces and ``,./-_*^``,
  lowercase, ``'`` -> ``"``); lists element-wise in order; dicts order-free with the same keys;
  an expected optional parameter may be omitted only when its value is the schema default, and a
  predicted parameter that is not expected is accepted only when it equals the schema default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aetheris.chat import render_messages
from aetheris.paths import data_path
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


def parse_call(text: str) -> dict | None:
    """The first call in a model output as {"name", "arguments"}, or None when nothing parses.
    Accepts a Command-R action list, a single action object, or OpenAI-style {"name", "arguments"}."""
    start = text.find("<|START_ACTION|>")
    body = text[start + len("<|START_ACTION|>"):] if start >= 0 else text
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", body):
        try:
            value, _ = decoder.raw_decode(body, m.start())
        except json.JSONDecodeError:
            continue
        call = value[0] if isinstance(value, list) and value else value
        if not isinstance(call, dict):
            continue
        name = call.get("tool_name", call.get("name"))
        args = call.get("parameters", call.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if isinstance(name, str) and isinstance(args, dict):
            return {"name": name, "arguments": args}
    return None


# --- BFCL-style matching --------------------------------------------------------------------------------


def standardize_string(s: str) -> str:
    """BFCL's normalisation: drop spaces and ``,./-_*^``, lowercase, single -> double quotes."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "float": (int, float),
               "boolean": (bool,), "array": (list,), "tuple": (list,), "object": (dict,), "dict": (dict,)}


def type_ok(value, schema: dict) -> bool:
    expected = schema.get("type")
    if expected is None or expected == "any":
        return True
    types = expected if isinstance(expected, list) else [expected]
    for t in types:
        py = _JSON_TYPES.get(t)
        if py is None:
            return True  # a type we do not know: do not fail the call on it
        if isinstance(value, bool) and bool not in py:
            continue  # True is an int in Python, never a number here
        if isinstance(value, py):
            if t in ("array", "tuple") and "items" in schema:
                return all(type_ok(v, schema["items"]) for v in value)
            return True
    return False


def values_match(pred, gold) -> bool:
    """Type-aware equality: standardized strings, numbers by value, lists in order, dicts order-free."""
    if isinstance(gold, bool) or isinstance(pred, bool):
        return type(pred) is type(gold) and pred == gold
    if isinstance(gold, str):
        return isinstance(pred, str) and standardize_string(pred) == standardize_string(gold)
    if isinstance(gold, (int, float)):
        return isinstance(pred, (int, float)) and float(pred) == float(gold)
    if isinstance(gold, list):
        return isinstance(pred, list) and len(pred) == len(gold) and all(values_match(p, g) for p, g in zip(pred, gold))
    if isinstance(gold, dict):
        return isinstance(pred, dict) and set(pred) == set(gold) and all(values_match(pred[k], gold[k]) for k in gold)
    return pred == gold


def ast_match(call: dict | None, expected: dict, tools: list[dict]) -> tuple[bool, str]:
    """(match, reason) under BFCL's AST rules for one call."""
    if call is None:
        return False, "no call parsed"
    if call["name"] != expected["name"]:
        return False, f"wrong function {call['name']!r}"
    schema = next((normalize_tool(t) for t in tools if normalize_tool(t)["name"] == expected["name"]), None)
    params = (schema or {}).get("parameters", {}) or {}
    props, required = params.get("properties", {}), params.get("required", [])
    args, gold = call["arguments"], expected["arguments"]
    for p in required:
        if p not in args:
            return False, f"missing required parameter {p!r}"
    for p, v in args.items():
        if p not in props:
            return False, f"unexpected parameter {p!r}"
        if not type_ok(v, props[p]):
            return False, f"wrong type for {p!r}"
        if p not in gold:
            if "default" in props[p] and values_match(v, props[p]["default"]):
                continue
            return False, f"parameter {p!r} was not expected"
        if not values_match(v, gold[p]):
            return False, f"wrong value for {p!r}"
    for p, g in gold.items():
        if p not in args and not ("default" in props.get(p, {}) and values_match(g, props[p]["default"])):
            return False, f"expected parameter {p!r} missing"
    return True, "ok"


def schema_valid(call: dict | None, tools: list[dict]) -> bool:
    import jsonschema

    if call is None:
        return False
    schema = next((normalize_tool(t) for t in tools if normalize_tool(t)["name"] == call["name"]), None)
    if schema is None:
        return False
    try:
        jsonschema.validate(call["arguments"], schema.get("parameters") or {"type": "object"})
    except jsonschema.ValidationError:
        return False
    return True


def score_output(text: str, example: dict) -> dict[str, float]:
    call = parse_call(text)
    expected = example["expected"]
    return {
        "parsed": float(call is not None),
        "schema_valid": float(schema_valid(call, example["tools"])),
        "name": float(call is not None and call["name"] == expected["name"]),
        "exact": float(call is not None and call["name"] == expected["name"] and call["arguments"] == expected["arguments"]),
        "ast": float(ast_match(call, expected, example["tools"])[0]),
    }


def _user_text(ex: dict) -> str:
    if "user" in ex:
        return ex["user"]
    return next(m["content"] for m in reversed(ex["messages"]) if m.get("role") == "user")


def _score(lm, examples: list[dict], desc: str, options: dict) -> Scores:
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
        results["toolcall_xsid"] = _score(lm, xsid_examples(lang)[:limit], f"toolcall xsid {lang}", options)
    extra = [ex for ex in _extra_examples(options) if ex["lang"] == lang][:limit]
    if extra:
        results["toolcall_gen"] = _score(lm, extra, f"toolcall gen {lang}", options)
    return results
