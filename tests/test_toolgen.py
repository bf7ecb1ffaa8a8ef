"""The generated tool-calling set: all 70 languages, deterministic, split by template, localised values,
expected calls valid against their schemas, and readable by the toolcall task."""

from __future__ import annotations

import json

from aetheris.languages import CODES
from aetheris.tasks.toolcall import _extra_examples, schema_valid
from aetheris.toolgen import TEMPLATES, TOOLS, generate_examples


def test_every_language_and_deterministic():
    a = generate_examples("all", "train", per_language=5, seed=3)
    assert {ex["lang"] for ex in a} == set(CODES) and len(a) == 5 * 70
    assert a == generate_examples("all", "train", per_language=5, seed=3)
    assert a != generate_examples("all", "train", per_language=5, seed=4)


def test_train_and_test_never_share_a_template():
    for lang in ("en", "fr", "ja", "sw"):
        train = generate_examples([lang], "train", per_language=60)
        test = generate_examples([lang], "test", per_language=20)
        assert not {ex["template"] for ex in train} & {ex["template"] for ex in test}
        assert {ex["template"].split("/")[0] for ex in test} == {t["name"] for t in TOOLS}


def test_expected_calls_are_schema_valid_and_values_localised():
    examples = generate_examples(["ja", "ru", "ar", "de"], "test", per_language=10)
    for ex in examples:
        call = ex["expected"]
        assert schema_valid(call, ex["tools"]), ex
        assert len(ex["tools"]) == 3 and call["name"] in {t["name"] for t in ex["tools"]}
        for value in call["arguments"].values():
            if isinstance(value, str) and not value[:4].isdigit() and not value.isupper():  # not dates, ISO codes
                assert value in ex["user"], ex  # cities, queries are copied from the request
    ja = [ex for ex in examples if ex["lang"] == "ja" and ex["expected"]["name"] == "get_weather"]
    assert ja and any("年" in ex["user"] for ex in ja)  # Japanese long date
    assert {ex["native"] for ex in examples} == {True, False} and set(TEMPLATES) >= {"en", "fr", "es", "de"}


def test_records_are_a_toolcall_task_file(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in generate_examples(["hi", "yo"], "test", 3)))
    assert len(_extra_examples({"toolcall_file": str(path)})) == 6
