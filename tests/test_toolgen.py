"""The generated tool-calling set: all 70 languages, deterministic, split by template, localised values,
expected calls valid against their schemas, and readable by the toolcall task."""

from __future__ import annotations

import json

import pytest

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


def test_frame_dropout_leaves_out_frame_words_and_never_a_value():
    whole = generate_examples(["en", "fr", "sw", "ja"], "train", per_language=30, seed=2)
    dropped = generate_examples(["en", "fr", "sw", "ja"], "train", per_language=30, seed=2, frame_dropout=0.5)
    assert dropped == generate_examples(["en", "fr", "sw", "ja"], "train", per_language=30, seed=2, frame_dropout=0.5)
    shorter = 0
    for a, b in zip(whole, dropped):
        assert b["expected"] == a["expected"] and b["tools"] == a["tools"] and b["template"] == a["template"]
        words_a, words_b = a["user"].split(" "), b["user"].split(" ")
        left = iter(words_a)
        assert all(any(w == v for v in left) for w in words_b)  # the words kept, in their order
        for value in b["expected"]["arguments"].values():
            if isinstance(value, str) and value in a["user"]:
                assert value in b["user"]  # cities and queries survive
        shorter += len(words_b) < len(words_a)
    assert 0.6 * len(whole) < shorter < len(whole)  # at p = 0.5 most requests lose a word, not every one
    assert generate_examples(["en"], "train", 5, frame_dropout=0.0) == generate_examples(["en"], "train", 5)


@pytest.mark.parametrize("split, p, match", [("test", 0.3, "test split"), ("train", 1.0, "frame_dropout"),
                                             ("train", -0.1, "frame_dropout")])
def test_frame_dropout_is_refused_on_the_test_split_and_outside_0_1(split, p, match):
    with pytest.raises(ValueError, match=match):
        generate_examples(["en"], split, 2, frame_dropout=p)


def test_extra_frames_add_english_train_frames_and_leave_the_test_split_alone():
    from aetheris.toolgen import EXTRA_TRAIN_TEMPLATES, templates_for

    for lang in ("en", "sw", "ja"):  # English and two English-frame languages
        plain = {t for _, t in templates_for(lang, "get_time", "train")}
        extra = dict(templates_for(lang, "get_time", "train", extra_frames=True))
        assert set(extra.values()) == plain | set(EXTRA_TRAIN_TEMPLATES["get_time"]) and len(extra) == 6
        test_index = templates_for(lang, "get_time", "test")[0][0]
        assert test_index not in extra  # the extra frames take indices after the test frame's
    assert templates_for("fr", "get_time", "train", extra_frames=True) == templates_for("fr", "get_time", "train")
    examples = generate_examples(["sw"], "train", 200, extra_frames=True)
    used = {ex["template"] for ex in examples}
    assert {f"{f}/{i}" for f in EXTRA_TRAIN_TEMPLATES for i in range(3, 7)} <= used
    test_frames = {t for f in EXTRA_TRAIN_TEMPLATES for _, t in templates_for("en", f, "test")}
    assert not test_frames & {t for ts in EXTRA_TRAIN_TEMPLATES.values() for t in ts}
    with pytest.raises(ValueError, match="test split"):
        generate_examples(["sw"], "test", 2, extra_frames=True)


def test_the_sft_toolgen_source_passes_the_augmentations_and_refuses_bad_ones():
    from aetheris.sft import load_conversations
    from aetheris.sources import MalformedLog, ToolgenSource

    log = MalformedLog()
    spec = {"type": "toolgen", "languages": ["sw"], "per_language": 30, "tools_offered": 2}
    plain = load_conversations(spec, log)
    augmented = load_conversations({**spec, "frame_dropout": 0.5, "extra_frames": True}, log)
    want = generate_examples(["sw"], "train", 30, tools_offered=2, frame_dropout=0.5, extra_frames=True)
    assert [c["messages"][0]["content"] for c in augmented] == [ex["user"] for ex in want]
    assert [c["messages"][0]["content"] for c in augmented] != [c["messages"][0]["content"] for c in plain]
    assert not log.counts  # nothing skipped
    for bad, match in (({"frame_dropout": 1.0}, "frame_dropout"), ({"frame_dropout": "0.3"}, "frame_dropout"),
                       ({"extra_frames": "yes"}, "extra_frames")):
        with pytest.raises(ValueError, match=match):
            ToolgenSource(**bad)
