"""Stage 3 data: assistant-only labels through the one chat template, malformed conversations reported with
their record ids and skipped, a resumable stream, JSONL and xSID sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aetheris.chat import END_ACTION, END_TURN, START_ACTION, START_RESPONSE, render_messages
from aetheris.sft import (
    SFTStream,
    build_sft_data,
    check_conversation,
    encode_conversation,
    load_conversations,
    xsid_conversations,
)
from aetheris.sources import MalformedLog
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


SHAREGPT = [  # ShareGPT-style tool-calling rows, tools as JSON text (as xLAM / Hermes sets store them)
    {"id": "g1", "language": "swh", "tools": json.dumps([TOOLS[0]]), "conversations": [
        {"from": "human", "value": "Hali ya hewa Nairobi kesho?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Nairobi"}}'},
        {"from": "observation", "value": "22 C"},
        {"from": "gpt", "value": "Nyuzi 22."}]},
    {"id": "g2", "language": "fra", "tools": "", "conversations": [
        {"from": "system", "value": "Sois bref."}, {"from": "human", "value": "Bonjour"}, {"from": "gpt", "value": "Salut !"}]},
    {"id": "g3", "language": "eng", "tools": "", "conversations": [
        {"from": "wizard", "value": "?"}, {"from": "gpt", "value": "x"}]},                   # unknown speaker
    {"id": "g4", "language": "eng", "tools": "[{broken", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},                # tools not JSON
]


def test_hub_source_reads_a_saved_dataset_and_maps_sharegpt_and_tool_calls(tmp_path, tiny_tokenizer):
    import datasets

    from aetheris.sft import hub_conversations

    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "sharegpt"))
    log = MalformedLog()
    records = load_conversations({"type": "hub", "path": str(tmp_path / "sharegpt")}, log)
    assert [r["id"] for r in records] == [f"{tmp_path / 'sharegpt'}#g1", f"{tmp_path / 'sharegpt'}#g2"]
    sw, fr = records
    assert sw["lang"] == "sw" and fr["lang"] == "fr" and sw["tools"] == [TOOLS[0]] and "tools" not in fr
    assert [m["role"] for m in sw["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert sw["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Nairobi"}}
    assert [m["role"] for m in fr["messages"]] == ["system", "user", "assistant"]
    assert log.total == 2 and "g3" in log.summary() and "unknown role 'wizard'" in log.summary()
    assert "g4" in log.summary() and "not valid JSON" in log.summary()
    # a mapped record trains like a JSONL one: the call is an assistant (trained) span
    ids, labels = encode_conversation(sw["messages"], sw["tools"], tiny_tokenizer)
    kept = tiny_tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=False)
    assert '"tool_name": "get_weather"' in kept and "Nyuzi 22." in kept and "Hali ya hewa" not in kept
    assert len(hub_conversations({"type": "hub", "path": str(tmp_path / "sharegpt"), "limit": 1}, MalformedLog())) == 1


def test_hub_source_reads_local_json_messages_xlam_and_instruction_columns(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Weather in Lagos?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lagos"}'}}]}],
             "tools": [TOOLS[0]], "lang": "en"}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    xlam = [{"id": 7, "query": "Temps à Paris ?", "tools": json.dumps([TOOLS[0]]),
             "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])}]
    (tmp_path / "xlam.json").write_text(json.dumps(xlam))
    aya = [{"inputs": "Habari?", "targets": "Nzuri.", "language_code": "swh"}]
    (tmp_path / "aya.jsonl").write_text(json.dumps(aya[0]))
    log = MalformedLog()
    chat = load_conversations({"type": "hub", "path": str(tmp_path / "chat.jsonl")}, log)
    call = chat[0]["messages"][1]["tool_calls"][0]
    assert call["id"] == "0" and call["function"]["name"] == "get_weather" and chat[0]["lang"] == "en"
    fn = load_conversations({"type": "hub", "path": str(tmp_path / "xlam.json"), "lang": "fr"}, log)
    assert fn[0]["id"].endswith("#7") and fn[0]["tools"] == [TOOLS[0]]
    assert fn[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    inst = load_conversations({"type": "hub", "path": str(tmp_path / "aya.jsonl")}, log)
    assert inst[0]["lang"] == "sw" and inst[0]["messages"] == [{"role": "user", "content": "Habari?"},
                                                               {"role": "assistant", "content": "Nzuri."}]
    assert log.total == 0


def test_hub_source_offline_says_how_to_pass_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="path: FOLDER"):
        load_conversations({"type": "hub", "name": "nobody/no-such-sft-set"}, MalformedLog())
    with pytest.raises(ValueError, match="unknown config key 'sft.sources\\[0\\].colums'"):
        load_conversations({"type": "hub", "path": "x", "colums": "y"}, MalformedLog())


def test_toolcall_loss_is_the_token_weighted_cross_entropy_of_the_gold_turns(tiny_tokenizer):
    # Our held-out loss == the model's own label-shifted cross-entropy, weighted by each example's
    # assistant-token count (one example alone: exactly its ce_loss).
    import torch

    from aetheris.config import AetherisConfig
    from aetheris.model import Aetheris
    from aetheris.sft import record_messages
    from aetheris.tasks.toolcall import toolcall_loss
    from aetheris.toolgen import generate_examples

    torch.manual_seed(0)
    model = Aetheris(AetherisConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layer=2, n_heads=2, head_dim=16,
                                    d_state=8, n_groups=1, d_ff=64, max_seq_len=1024)).eval()
    examples = generate_examples(["en", "sw"], split="test", per_language=1, tools_offered=1)
    per_example = []
    for ex in examples:
        ids, labels = encode_conversation(record_messages(ex), ex["tools"], tiny_tokenizer)
        with torch.no_grad():
            ce = model(torch.tensor([ids]), labels=torch.tensor([labels])).ce_loss
        per_example.append((float(ce), sum(lab != -100 for lab in labels[1:])))
        assert toolcall_loss(model, tiny_tokenizer, [ex]) == pytest.approx(float(ce), rel=1e-5)
    weighted = sum(ce * n for ce, n in per_example) / sum(n for _, n in per_example)
    assert toolcall_loss(model, tiny_tokenizer, examples) == pytest.approx(weighted, rel=1e-5)
