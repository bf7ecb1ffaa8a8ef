"""The nano teacher's data options: copying rows in the LM stream (and a phase of only those), and the chat format
in the tokenizer."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from aetheris.data import PackedStream, split_heldout
from aetheris.demo import load_demo_config
from aetheris.nano_teacher import (
    NanoTeacherConfig,
    TeacherBatches,
    expected_seconds,
    random_value_examples,
    teacher_tokenizer,
    train_nano_teacher,
)
from aetheris.sources import load_documents
from aetheris.tasks.toolcall import render_prompt
from aetheris.toolgen import generate_examples

ROOT = Path(__file__).resolve().parents[1]


def _stream(seed=0):
    rng = np.random.default_rng(0)
    docs = {lang: [list(rng.integers(5, 500, size=int(n))) for n in rng.integers(20, 90, size=12)]
            for lang in ("en", "fr", "sw")}
    return PackedStream(docs, 16, seed=seed, pack=True, pad_id=0)


def test_copying_rows_repeat_their_first_half_and_the_rest_are_untouched():
    plain, copying = TeacherBatches(_stream()), TeacherBatches(_stream(), copy_fraction=0.5, seed=3)
    chosen = 0
    for _ in range(6):
        a, b = plain.next_batch(8), copying.next_batch(8)
        same = (a["input_ids"] == b["input_ids"]).all(1)
        for i in np.nonzero(~same)[0]:  # a copying row: [first half, first half], labels alike
            np.testing.assert_array_equal(b["input_ids"][i, 8:], a["input_ids"][i, :8])
            np.testing.assert_array_equal(b["labels"][i, 8:], a["labels"][i, :8])
            np.testing.assert_array_equal(b["input_ids"][i, :8], a["input_ids"][i, :8])
        np.testing.assert_array_equal(b["labels"][same], a["labels"][same])
        chosen += int((~same).sum())
    assert 12 <= chosen <= 36  # about half of 48 rows


def test_a_restored_stream_draws_the_same_copying_rows():
    first = TeacherBatches(_stream(), copy_fraction=0.5, seed=1)
    first.next_batch(8)
    state = first.state_dict()
    expected = [first.next_batch(8) for _ in range(3)]
    resumed = TeacherBatches(_stream(), copy_fraction=0.5, seed=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch(8)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["labels"], want["labels"])


def test_the_chat_format_in_the_tokenizer_shortens_tool_prompts():
    docs, _ = split_heldout(load_documents([{"type": "corpus", "max_lines_per_language": 20}],
                                           ["en", "fr", "ja", "ar", "sw", "hi"]), 0.05)
    examples = generate_examples(["en", "ja", "sw"], "test", 5, tools_offered=2)

    def prompt_tokens(copies):
        tok = teacher_tokenizer(docs, NanoTeacherConfig(vocab_size=1024, tokenizer_format_copies=copies))
        return np.mean([len(tok(render_prompt(e["tools"], e["user"]))["input_ids"]) for e in examples])

    assert prompt_tokens(30) < 0.7 * prompt_tokens(0)


def test_a_copying_phase_stream_makes_every_row_a_copying_row():
    plain, copying = TeacherBatches(_stream()), TeacherBatches(_stream(), copy_fraction=1.0)
    for _ in range(3):
        a, b = plain.next_batch(8), copying.next_batch(8)
        np.testing.assert_array_equal(b["input_ids"][:, 8:], a["input_ids"][:, :8])
        np.testing.assert_array_equal(b["labels"][:, 8:], a["labels"][:, :8])


def test_random_values_replace_a_city_or_query_in_the_request_and_the_call_alike():
    examples = generate_examples(["en", "ja", "sw"], "train", 20, tools_offered=2)
    lines = {"en": ["The quick brown fox, jumps."], "ja": ["吾輩は猫である。名前はまだ無い。"], "sw": ["Habari ya asubuhi"]}
    mixed = random_value_examples(examples, lines, 0.5, seed=1)
    assert mixed == random_value_examples(examples, lines, 0.5, seed=1)  # deterministic
    changed = 0
    for old, new in zip(examples, mixed):
        assert new["expected"]["name"] == old["expected"]["name"] and new["tools"] == old["tools"]
        if new == old:
            continue
        changed += 1
        for key, value in new["expected"]["arguments"].items():
            if key in ("city", "query"):
                assert value in new["user"] and old["expected"]["arguments"][key] not in new["user"]
                assert all(w in lines[new["lang"]][0] and w.strip(",.。") == w for w in value.split())  # its words
            else:
                assert value == old["expected"]["arguments"][key]
    copyable = sum(any(k in ("city", "query") for k in e["expected"]["arguments"]) for e in examples)
    assert 0.25 * copyable <= changed <= 0.75 * copyable
    assert random_value_examples(examples, lines, 0.0) == examples


def test_the_copying_phase_runs_first_at_its_own_lr_and_is_in_the_time_estimate(tmp_path):
    cfg = load_demo_config(ROOT / "configs" / "demo-quick.yaml",
                           ["teacher.copy_steps=3", "teacher.copy_lr=7e-3", "teacher.steps=2", "teacher.chat_steps=1",
                            "teacher.warmup_steps=1", "teacher.eval_every=0", "teacher.toolcall_random_values=1.0",
                            "teacher.toolcall_frame_dropout=0.5"]).teacher
    lines = []
    train_nano_teacher(tmp_path, cfg, log=lines.append)
    history = json.loads((tmp_path / "nano_teacher.json").read_text())["history"]
    assert [(r["step"], r["phase"]) for r in history] == [(1, "copy"), (2, "copy"), (3, "copy"), (4, "lm"), (5, "lm"),
                                                          (6, "chat")]
    assert history[0]["lr"] == pytest.approx(7e-3) and history[3]["lr"] == pytest.approx(cfg.lr)  # peaks after warmup 1
    assert (tmp_path / "train" / "copy" / "metrics.jsonl").is_file()
    assert any("3 copying + 2 + 1 steps" in line for line in lines)
    trained = [json.loads(line) for line in (tmp_path / "toolcall_train.jsonl").read_text().splitlines()]
    assert len(trained) == 70 * cfg.toolcall_per_language  # the chat phase read the random-value conversations
    whole = generate_examples("all", "train", cfg.toolcall_per_language, cfg.seed, cfg.toolcall_tools_offered)
    currency = [(t, w) for t, w in zip(trained, whole) if w["expected"]["name"] == "convert_currency"]  # no random value
    assert currency and sum(len(t["user"]) < len(w["user"]) for t, w in currency) > len(currency) / 2  # frames cut
    # Each copying step costs an LM step: the estimate grows by exactly that.
    base = NanoTeacherConfig(steps=200, chat_steps=50)
    assert expected_seconds(NanoTeacherConfig(steps=200, chat_steps=50, copy_steps=100), 0.5, 3.0) == \
        pytest.approx(expected_seconds(base, 0.5, 3.0) + 100 * 0.5)


@pytest.mark.parametrize("key, value", [("copy_fraction", 1.5), ("tokenizer_format_copies", -1), ("copy_steps", -1),
                                        ("copy_lr", 0.0), ("chat_lr", -1e-3), ("toolcall_random_values", 2.0),
                                        ("toolcall_frame_dropout", 1.0)])
def test_bad_data_options_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        NanoTeacherConfig(**{key: value})


def _recipes():
    spec = importlib.util.spec_from_file_location("teacher_recipes", ROOT / "experiments" / "teacher_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_copy_ceiling_counts_only_arguments_written_in_the_request():
    recoverable = _recipes().recoverable
    assert recoverable("東京", "What time is it in 東京?") and recoverable("Sao Paulo", "Hora em São-Paulo? sao paulo")
    assert recoverable(15000, "Convert 15 000 рублей") and recoverable(1200, "১,২০০ টাকা")  # separators, Bengali digits
    assert recoverable("2026-03-05", "Weather in ソウル on 2026年3月5日?")
    assert not recoverable("2026-03-05", "Weather in Berlin on 5 Machi 2026?")  # the month name must be known
    assert not recoverable("JPY", "How much is 5 日本円?") and recoverable("JPY", "How much is 5 JPY?")
    assert not recoverable("USD", "5 US Dollar into Euro") and not recoverable("EUR", "5 US Dollar into Euro")
    examples = [{"lang": "ja", "user": "What time is it in 東京?", "expected": {"name": "get_time", "arguments": {"city": "東京"}}},
                {"lang": "ja", "user": "Convert 5 日本円 to ユーロ.", "expected": {"name": "convert_currency", "arguments":
                 {"amount": 5, "from_currency": "JPY", "to_currency": "EUR"}}},
                {"lang": "en", "user": "Convert 5 JPY to EUR.", "expected": {"name": "convert_currency", "arguments":
                 {"amount": 5, "from_currency": "JPY", "to_currency": "EUR"}}}]
    ceiling = _recipes().copy_ceiling(examples)
    assert ceiling["ast"] == pytest.approx((0.5 + 1.0) / 2)  # mean over languages
    assert ceiling["per_function"] == {"convert_currency": 0.5, "get_time": 1.0}


def test_argument_copies_count_only_arguments_a_copier_could_get_right():
    examples = [{"lang": "en", "user": "Weather in Berlin on 2026-03-05?", "expected": {"name": "get_weather", "arguments":
                 {"city": "Berlin", "date": "2026-03-05"}}},
                {"lang": "en", "user": "Convert 250 yen to zloty.", "expected": {"name": "convert_currency", "arguments":
                 {"amount": 250, "from_currency": "JPY", "to_currency": "PLN"}}},
                {"lang": "fr", "user": "Quelle heure est-il à Paris ?", "expected": {"name": "get_time", "arguments":
                 {"city": "Paris"}}}]
    call = '<|START_ACTION|>[{{"tool_call_id": "0", "tool_name": "{}", "parameters": {}}}]<|END_ACTION|>'
    outputs = [call.format("get_weather", '{"city": "berlin", "date": "2026-01-01"}'),  # city right (normalised)
               call.format("get_time", '{"amount": 250, "from_currency": "USD"}'),  # the number right, wrong name
               "no call at all"]
    copies = _recipes().argument_copies(outputs, examples)
    # en: the city (date and currency names are not copies); fr: its city missed -> strings (1 + 0) / 2 languages
    assert copies == {"string": pytest.approx(0.5), "number": pytest.approx(1.0)}


def test_the_copy_probe_separates_a_copier_from_a_model_that_cannot_copy():
    import torch

    class Copier(torch.nn.Module):
        """Predicts the token ``half`` positions back when there is one (a perfect in-context copier), else uniform."""

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 50)
            logits[:, 4:].scatter_(2, input_ids[:, 1:-3].unsqueeze(-1), 30.0)  # position t predicts input t - 3 = t + 1 - 4
            return type("Out", (), {"logits": logits})

    rows = np.array([list(range(10, 14)) * 2, list(range(20, 24)) * 2])  # half = 4: [a, a]
    probe = _recipes().copy_probe(Copier(), rows)
    assert probe["second_half"] < 0.01 < np.log(50) - 0.01 < probe["first_half"]


def test_name_outcomes_split_greedy_names_by_whether_the_tool_was_offered():
    tools = [{"name": "get_time"}, {"name": "web_search"}]
    examples = [{"tools": tools, "expected": {"name": "get_time"}}] * 4
    call = '<|START_ACTION|>[{{"tool_call_id": "0", "tool_name": "{}", "parameters": {{}}}}]<|END_ACTION|>'
    outputs = [call.format("get_time"), call.format("web_search"), call.format("book_hotel"), "no call"]
    assert _recipes().name_outcomes(outputs, examples) == {"right": 0.25, "other_offered": 0.25, "not_offered": 0.25,
                                                          "unparsed": 0.25}


def test_name_choice_picks_the_offered_name_the_model_finds_likeliest(tiny_cohere2_teacher, tiny_tokenizer):
    import torch

    from aetheris.toolgen import generate_examples

    examples = generate_examples(["en", "sw"], "test", 3, tools_offered=2)
    opening = '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "'
    right = {"en": [], "sw": []}
    for ex in examples:  # the same choice from transformers' own loss on the name's tokens
        prompt = render_prompt(ex["tools"], ex["user"]) + opening
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        nll = {}
        for tool in ex["tools"]:
            cont = tiny_tokenizer(prompt + tool["name"], add_special_tokens=False)["input_ids"][len(ids):]
            with torch.no_grad():
                loss = tiny_cohere2_teacher(input_ids=torch.tensor([ids + cont]),
                                            labels=torch.tensor([[-100] * len(ids) + cont])).loss
            nll[tool["name"]] = float(loss) * len(cont)
        right[ex["lang"]].append(min(nll, key=nll.get) == ex["expected"]["name"])
    choice = _recipes().name_choice(tiny_cohere2_teacher, tiny_tokenizer, examples)
    assert choice["name"] == pytest.approx((np.mean(right["en"]) + np.mean(right["sw"])) / 2)
    same_request = [{**ex, "user": examples[0]["user"]} for ex in examples]  # shuffling identical requests: no change
    assert _recipes().name_choice(tiny_cohere2_teacher, tiny_tokenizer, same_request, shuffled=True) == \
        _recipes().name_choice(tiny_cohere2_teacher, tiny_tokenizer, same_request)
