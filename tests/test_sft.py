"""Stage 3 data: assistant-only labels through the one chat template, malformed conversations reported with
their record ids and skipped, a resumable stream, JSONL and xSID sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aetheris.chat import END_ACTION, END_TURN, START_ACTION, START_RESPONSE, render_messages
from aetheris.data import MalformedLog
from aetheris.sft import (
    SFTStream,
    build_sft_data,
    check_conversation,
    encode_conversation,
    load_conversations,
    xsid_conversations,
)
from aetheris.toolgen import TOOLS

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Nairobi tomorrow?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Nairobi", "date": "2026-01-02"}'}}]},
    {"role": "tool", "tool_call_id": "0", "content": "22 C, sunny"},
    {"role": "assistant", "content": "22 °C and sunny."},
]


def test_ids_equal_the_whole_rendered_text_and_only_assistant_tokens_are_labelled(tiny_tokenizer):
    ids, labels = encode_conversation(CONV, TOOLS, tiny_tokenizer)
    whole = tiny_tokenizer.encode(render_messages(CONV, TOOLS, add_generation_prompt=False), add_special_tokens=False)
    assert ids == whole
    kept = tiny_tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=False)
    assert kept == (START_ACTION + '[{"tool_call_id": "0", "tool_name": "get_weather", "parameters": '
                    '{"city": "Nairobi", "date": "2026-01-02"}}]' + END_ACTION + END_TURN
                    + START_RESPONSE + "22 °C and sunny.<|END_RESPONSE|>" + END_TURN)
    for label, i in zip(labels, ids):
        assert label in (-100, i)
    text_of_ignored = tiny_tokenizer.decode([i for i, lab in zip(ids, labels) if lab == -100], skip_special_tokens=False)
    assert "Nairobi tomorrow" in text_of_ignored and "22 C, sunny" in text_of_ignored and "Be brief" in text_of_ignored


@pytest.mark.parametrize("record, reason", [
    ({"id": "a", "messages": []}, "no messages"),
    ({"id": "b", "messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"id": "c", "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"id": "d", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "not valid JSON"),
])
def test_malformed_conversations_are_named(record, reason):
    assert reason in check_conversation(record)


def test_jsonl_source_reports_bad_records_with_ids_and_keeps_good_ones(tmp_path):
    path = tmp_path / "conv.jsonl"
    good = {"id": "ok-1", "lang": "sw", "messages": [{"role": "user", "content": "Habari?"},
                                                     {"role": "assistant", "content": "Nzuri."}]}
    lines = [json.dumps(good), "{broken", json.dumps({"id": "bad-2", "lang": "sw", "messages": [{"role": "user", "content": "x"}]}),
             json.dumps({"id": "bad-3", "lang": "sw", "messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"id": "bad-4", "messages": good["messages"]})]
    path.write_text("\n".join(lines) + "\n")
    log = MalformedLog()
    records = load_conversations({"type": "jsonl", "path": str(path)}, log)
    assert [r["id"] for r in records] == ["ok-1"]
    assert log.total == 4
    summary = log.summary()
    for where in ("conv.jsonl:2", "record bad-2", "record bad-3", "record bad-4"):
        assert where in summary


def test_stream_rows_resume_exactly_and_padding_is_never_trained(tiny_tokenizer):
    data = build_sft_data([{"type": "toolgen", "languages": ["en", "ja", "sw"], "per_language": 12}], tiny_tokenizer,
                          seq_len=1024, log=lambda _: None)
    stream = data.stream
    assert set(stream.languages) == {"en", "ja", "sw"} and set(data.val) == {"en", "ja", "sw"}
    stream.next_batch(5)
    state = json.loads(json.dumps(stream.state_dict()))
    a = stream.next_batch(4)
    stream.load_state_dict(state)
    b = stream.next_batch(4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    pad = a["input_ids"] == tiny_tokenizer.pad_token_id
    assert (a["labels"][pad] == -100).all() and (a["doc_ids"][pad] == 1).all()
    assert ((a["labels"] != -100).sum(1) > 0).all()


def test_xsid_validation_split_becomes_tool_call_records():
    records = xsid_conversations("validation", ["en", "ja"], per_language=20)
    assert records and {r["lang"] for r in records} == {"en", "ja"}
    log = MalformedLog()
    assert all(check_conversation({"messages": [{"role": "user", "content": r["user"]},
                                                {"role": "assistant", "tool_calls": [{"function": {
                                                    "name": r["expected"]["name"], "arguments": r["expected"]["arguments"]}}]}]})
               is None for r in records)
    assert log.total == 0


def test_stream_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="no SFT conversations"):
        SFTStream({}, 16)


def test_xsid_records_use_the_toolcall_task_mapping_on_the_requested_split():
    from aetheris.tasks import toolcall

    records = xsid_conversations("validation", ["da"])
    valid, test = toolcall.xsid_examples("da", "validation"), toolcall.xsid_examples("da", "test")
    assert [(r["user"], r["expected"]) for r in records] == [(e["user"], e["expected"]) for e in valid]
    assert len({e["user"] for e in valid} & {e["user"] for e in test}) < len(valid) // 10  # another split
    with pytest.raises(ValueError, match="choose test or validation"):
        toolcall.xsid_examples("da", "train")
