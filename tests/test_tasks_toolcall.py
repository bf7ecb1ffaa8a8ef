"""Tool calling: xSID -> calls, action parsing, BFCL-style argument matching, and a run on a tiny model."""

import json

import pytest

from aetheris.tasks import toolcall as tc
from eval_helpers import save_tiny_cohere2

TOOLS = [{
    "name": "book_flight",
    "description": "Book a flight.",
    "parameters": {"type": "object", "required": ["to", "passengers"], "properties": {
        "to": {"type": "string"},
        "passengers": {"type": "integer"},
        "budget": {"type": "number"},
        "class": {"type": "string", "default": "economy"},
        "stops": {"type": "array", "items": {"type": "string"}},
        "prefs": {"type": "object"},
        "refundable": {"type": "boolean"},
    }},
}]
GOLD = {"name": "book_flight", "arguments": {"to": "New York", "passengers": 2, "budget": 300.0}}


def _ok(args, gold=GOLD):
    return tc.ast_match({"name": "book_flight", "arguments": args}, gold, TOOLS)


def test_bfcl_rules_by_hand():
    assert _ok({"to": "new york", "passengers": 2, "budget": 300})[0]  # string normalised, int for number
    assert _ok({"passengers": 2, "budget": 300.0, "to": "New-York"})[0]  # order-free, '-' dropped
    assert not _ok({"to": "New York", "passengers": 2.0, "budget": 300})[0]  # float is not an integer
    assert not _ok({"to": "New York", "passengers": True, "budget": 300})[0]  # bool is not a number
    assert _ok({"to": "New York", "budget": 300})[1] == "missing required parameter 'passengers'"
    assert _ok({"to": "New York", "passengers": 2})[1] == "expected parameter 'budget' missing"
    assert _ok({"to": "New York", "passengers": 2, "budget": 300, "seat": "A1"})[1] == "unexpected parameter 'seat'"
    # BFCL never reads a schema default: an argument the gold call lacks is unexpected even at its default
    assert _ok({"to": "New York", "passengers": 2, "budget": 300, "class": "Economy"})[1] == "unexpected parameter 'class'"
    assert not _ok({"to": "New York", "passengers": 2, "budget": 300, "class": "business"})[0]
    assert not _ok({"to": "Boston", "passengers": 2, "budget": 300})[0]
    lists = {"name": "book_flight", "arguments": {"to": "X", "passengers": 1, "stops": ["Paris", "Rome"],
                                                  "prefs": {"meal": "veg", "seat": "aisle"}}}
    assert _ok({"to": "x", "passengers": 1, "stops": ["paris", "rome"], "prefs": {"seat": "Aisle", "meal": "veg"}}, lists)[0]
    assert not _ok({"to": "x", "passengers": 1, "stops": ["rome", "paris"], "prefs": {"seat": "aisle", "meal": "veg"}}, lists)[0]
    assert not _ok({"to": "x", "passengers": 1, "stops": ["paris", "rome"], "prefs": {"seat": "aisle"}}, lists)[0]
    assert tc.ast_match({"name": "cancel", "arguments": {}}, GOLD, TOOLS)[1] == "wrong function 'cancel'"
    assert tc.standardize_string("April 1, 2024") == tc.standardize_string("april 1 2024")


def test_parse_call_formats():
    action = '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "book_flight", "parameters": {"to": "Oslo"}}]'
    assert tc.parse_call(action) == {"name": "book_flight", "arguments": {"to": "Oslo"}}
    assert tc.parse_call('Sure! {"name": "f", "arguments": "{\\"a\\": 1}"} done') == {"name": "f", "arguments": {"a": 1}}
    assert tc.parse_call('[{"tool_name": "f", "parameters": {}}, {"tool_name": "g"}]')["name"] == "f"
    assert [c["name"] for c in tc.parse_calls('[{"tool_name": "f", "parameters": {}}, {"tool_name": "g"}]')] == ["f", "g"]
    assert tc.parse_call("no call here [not json") is None
    assert tc.parse_call('{"tool_name": "f", "parameters": {"a": ') is None  # truncated JSON


def test_score_output_metrics():
    ex = {"tools": TOOLS, "expected": GOLD}
    good = '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "book_flight", "parameters": {"to": "new york", "passengers": 2, "budget": 300}}]'
    assert tc.score_output(good, ex) == {"parsed": 1.0, "schema_valid": 1.0, "name": 1.0, "exact": 0.0, "ast": 1.0}
    bad_type = '[{"tool_name": "book_flight", "parameters": {"to": "New York", "passengers": "2", "budget": 300.0}}]'
    assert tc.score_output(bad_type, ex) == {"parsed": 1.0, "schema_valid": 0.0, "name": 1.0, "exact": 0.0, "ast": 0.0}
    exact = json.dumps([{"tool_name": "book_flight", "parameters": GOLD["arguments"]}])
    assert tc.score_output(exact, ex)["exact"] == 1.0
    two = json.dumps([{"tool_name": "book_flight", "parameters": GOLD["arguments"]}] * 2)
    assert tc.score_output(two, ex)["ast"] == 0.0  # BFCL: one call expected, two given
    assert tc.score_output("I cannot help", ex) == {"parsed": 0.0, "schema_valid": 0.0, "name": 0.0, "exact": 0.0, "ast": 0.0}


@pytest.mark.needs_data
def test_xsid_examples_by_hand():
    assert set(tc.XSID_FILES) == set(tc.languages({})) and len(tc.XSID_FILES) == 13
    da = tc.xsid_examples("da")
    ex = next(e for e in da if e["user"].startswith("Tilføj en påmindelse til i dag"))
    assert ex["expected"] == {"name": "set_reminder", "arguments": {"datetime": "i dag klokken 4 om aftenen"}}
    zh = tc.xsid_examples("zh")
    assert zh[2]["expected"] == {"name": "set_reminder", "arguments": {"datetime": "今天下午4点"}}
    assert len(tc.xsid_examples("ja")) == 250
    names = {t["name"] for t in tc.xsid_tools()}
    assert len(names) == 16 and all(e["expected"]["name"] in names for e in da)
    schema = {t["name"]: t for t in tc.xsid_tools()}
    for e in da:  # every expected call is valid against its own schema
        assert tc.ast_match(e["expected"], e["expected"], e["tools"])[0]
        assert set(e["expected"]["arguments"]) <= set(schema[e["expected"]["name"]]["parameters"]["properties"])


def test_prompt_has_tools_and_cohere_turns():
    p = tc.render_prompt(TOOLS, "Fly me to Oslo")
    assert p.startswith("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>") and p.endswith("<|CHATBOT_TOKEN|>")
    assert '"book_flight"' in p and "<|USER_TOKEN|>Fly me to Oslo<|END_OF_TURN_TOKEN|>" in p


@pytest.mark.needs_data
def test_run_on_tiny_model_with_a_generated_file(tiny_tokenizer, tmp_path):
    from aetheris.evaluate import LM

    lm = LM.load(str(save_tiny_cohere2(tmp_path / "m", tiny_tokenizer, seed=5)), batch_size=2)
    gen = tmp_path / "gen.jsonl"
    rows = [{"id": f"yo-{i}", "lang": "yo", "tools": TOOLS, "user": "Ra tikẹti si Eko", "expected": GOLD} for i in range(2)]
    gen.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    options = {"toolcall_file": str(gen)}
    assert "yo" in tc.languages(options)
    yo = tc.run(lm, "yo", options, limit=2)
    assert list(yo) == ["toolcall_gen"] and yo["toolcall_gen"].n == 2
    s = yo["toolcall_gen"]
    assert set(s.extra) == {"parsed_rate", "schema_valid_rate", "name_acc", "exact_acc"}
    assert s.values == [tc.score_output(o, r)["ast"] for o, r in zip(s.outputs, rows)]
    assert "toolcall_gen" not in tc.run(lm, "de", {"toolcall_file": str(gen)}, limit=0)  # (xSID runs in the e2e test)
