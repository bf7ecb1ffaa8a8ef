"""mGSM: prompts, stops, the harness's answer extraction and exact match, and run() == harness formula."""

import random
import re
import string

import pytest

from aetheris.tasks import mgsm
from eval_helpers import save_tiny_cohere2


# Strings below are copied from lm-evaluation-harness 0.4.13's generated YAMLs (lm_eval/tasks/mgsm/
# {direct,native_cot,en_cot}/*.yaml): doc_to_text, doc_to_target's slice, generation_kwargs.until, regexes.

def test_zero_shot_prompts_pin_the_harness():
    assert mgsm.build_prompt("Wie viel ist 2+2?", "de") == "Frage: Wie viel ist 2+2?\nSchritt-für-Schritt-Antwort:"
    assert mgsm.build_prompt("2+2は？", "ja") == "問題： 2+2は？\nステップごとの答え:"  # full-width colon
    assert mgsm.build_prompt("2+2?", "zh", mode="direct") == "问题： 2+2?\nAnswer:"
    assert mgsm.build_prompt("2+2?", "en", mode="direct") == "Question: 2+2?\nAnswer:"
    assert mgsm.build_prompt("Ni ngapi?", "sw", mode="direct") == "Swali: Ni ngapi?\nAnswer:"  # English word
    assert mgsm.build_prompt("Wie viel?", "de", mode="direct") == "Frage: Wie viel?\nAntwort:"
    assert mgsm.build_prompt("Combien ?", "fr", mode="direct") == "Question : Combien ?\nRéponse :"
    assert mgsm.build_prompt("Wie viel?", "de", mode="en_cot") == "Frage: Wie viel?\nStep-by-Step Answer:"
    for lang in ("bn", "ja", "ru", "sw", "te", "th", "zh"):
        assert mgsm.answer_word(lang, "direct") == "Answer:"
    with pytest.raises(ValueError, match="native_cot, direct, en_cot"):
        mgsm.build_prompt("x", "en", mode="cot")


def test_few_shot_prompt_pins_the_harness():
    ex = [{"q": "Question: Roger has 5 balls. He buys 6. How many?", "a": "Step-by-Step Answer: 5 + 6 = 11. The answer is 11.",
           "number": 11}]
    assert mgsm.build_prompt("Q2?", "en", "native_cot", ex) == (
        "Question: Roger has 5 balls. He buys 6. How many?\nStep-by-Step Answer: 5 + 6 = 11. The answer is 11.\n\n"
        "Question: Q2?\nStep-by-Step Answer:")
    # direct: target_delimiter "" -> "Answer:11"
    assert mgsm.build_prompt("Q2?", "en", "direct", ex) == (
        "Question: Roger has 5 balls. He buys 6. How many?\nAnswer:11\n\nQuestion: Q2?\nAnswer:")
    # ja: answer[11:] eats the first character after the full-width colon (the harness's fixed slice)
    ja = [{"q": "問題：ロジャーは5個", "a": "ステップごとの答え：ロジャーは最初5個。答えは11です。", "number": 11}]
    assert mgsm.build_prompt("次?", "ja", "native_cot", ja) == (
        "問題：ロジャーは5個\nステップごとの答え: ジャーは最初5個。答えは11です。\n\n問題： 次?\nステップごとの答え:")
    # en_cot: English answer word, target still cut at the native prefix's length (de: answer[29:])
    de = [{"q": "Frage: Roger?", "a": "Schritt-für-Schritt-Antwort: 5 + 6 = 11. Die Antwort ist 11.", "number": 11}]
    assert mgsm.build_prompt("Q?", "de", "en_cot", de) == (
        "Frage: Roger?\nStep-by-Step Answer: 5 + 6 = 11. Die Antwort ist 11.\n\nFrage: Q?\nStep-by-Step Answer:")
    slices = {"bn": 17, "de": 29, "en": 21, "es": 23, "fr": 26, "ja": 11, "ru": 18, "sw": 25, "te": 19, "th": 18, "zh": 6}
    for lang, n in slices.items():
        assert mgsm.exemplar_target({"a": "x" * 40}, lang, "native_cot") == "x" * (40 - n)


def test_exemplars_are_sampled_like_the_harness():
    """The harness's ContextSampler: one Random(1234), ``sample(pool, k)`` per test item in order."""
    import random

    pool = [{"q": f"q{i}", "a": "a", "number": i} for i in range(8)]
    rng = random.Random(1234)
    expected = [rng.sample(pool, 3) for _ in range(5)]
    assert mgsm.sample_exemplars(pool, 3, 5) == expected
    assert expected[0] != expected[1]  # a different draw per item
    assert mgsm.sample_exemplars(pool, 0, 2) == [[], []]
    with pytest.raises(ValueError, match="too many"):
        mgsm.sample_exemplars(pool, 9, 1)


@pytest.mark.needs_data
def test_exemplars_and_data_load():
    ex = mgsm.load_exemplars("bn")
    assert len(ex) == 8 and ex[0]["number"] == 11 and ex[0]["q"].startswith("প্রশ্ন:")
    docs = mgsm.load("en")
    assert len(docs) == 250 and docs[0]["answer"] == "18"
    assert any(d["answer"] == "2,125" for d in docs)


def test_stops():
    # each language's generation_kwargs replaces the shared "\n\n"/"\n" stops, in every mode
    for mode in mgsm.MODES:
        assert mgsm.stop_strings("de", mode) == ["Frage:", "</s>", "<|im_end|>"]
        assert mgsm.stop_strings("ja", mode) == ["問題：", "</s>", "<|im_end|>"]
        assert mgsm.stop_strings("zh", mode) == ["问题：", "</s>", "<|im_end|>"]


def test_strict_extraction_per_language():
    assert mgsm.extract_strict("5 + 6 = 11. The answer is 11.", "en") == "11."
    assert mgsm.extract_strict("Die Antwort lautet 2,125.", "de") == "2,125."
    assert mgsm.extract_strict("Die Antwort ist 11.", "de") == mgsm.INVALID  # harness regex wants "lautet"
    assert mgsm.extract_strict("ロジャーは…5+6=11。答えは11です。", "ja") == "11"
    assert mgsm.extract_strict("…ดังนั้น 5 + 6 = 11 คำตอบคือ 11", "th") == "11"
    assert mgsm.extract_strict("2 রিল + 1 রিল = 3 রিল। উত্তর হল 3।", "bn") == mgsm.INVALID  # bn: English regex
    assert mgsm.extract_strict("3 রিল। The answer is 3।", "bn") == "3"
    assert mgsm.extract_strict("Die Antwort lautet 7.", "de", mode="en_cot") == mgsm.INVALID  # en_cot: English
    assert mgsm.extract_strict("The answer is 7.", "de", mode="en_cot") == "7."
    assert mgsm.extract_strict("答案是 -7。", "zh") == "-7"
    assert mgsm.extract_strict("The answer is ১৮।", "bn") == mgsm.INVALID  # native digits are not read (harness)
    assert mgsm.extract_strict("The answer is 4. The answer is 5.", "en") == "4."  # first match
    assert mgsm.extract_strict("  42\n", "en", mode="direct") == "42"  # remove_whitespace strips both ends


def test_flexible_extraction_takes_last_number():
    assert mgsm.extract_flexible("She pays $2,125 in total. The answer is 2,125.") == "2,125."
    assert mgsm.extract_flexible("7 + 2 = 9 টি খেলনা") == "9"
    assert mgsm.extract_flexible("温度是-3度，然后是-12。") == "-12"  # negative in a non-Latin context
    assert mgsm.extract_flexible("合計18ドルです") == "18"
    assert mgsm.extract_flexible("no numbers here") == mgsm.INVALID
    assert mgsm.extract_flexible("5 apples and $40") == "$40"


def test_exact_match_normalises_like_the_harness():
    assert mgsm.exact_match("2,125.", "2,125") == 1.0
    assert mgsm.exact_match("2125", "2,125") == 1.0  # thousands separators normalised
    assert mgsm.exact_match("$40", "40") == 1.0
    assert mgsm.exact_match("-12", "-12") == 1.0
    assert mgsm.exact_match("-12", "12") == 1.0  # harness quirk: '-' is punctuation (gold is never negative)
    assert mgsm.exact_match("18 ", "18") == 0.0  # no strip inside exact_match
    assert mgsm.exact_match(mgsm.INVALID, "18") == 0.0


# ------------------------------------------------------------------------------------------------------
# run() on a tiny model == the harness formula written out independently

_PUNCT = str.maketrans("", "", string.punctuation)


def _harness_score(response: str, pattern: str, group: int, gold: str) -> float:
    found = re.findall(pattern, response)
    if found:
        m = found[group]
        if isinstance(m, tuple):
            m = [x for x in m if x][0]
        pred = m.strip()
    else:
        pred = "[invalid]"
    return float(pred.lower().translate(_PUNCT) == gold.lower().translate(_PUNCT))


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer, tmp_path_factory):
    from aetheris.evaluate import LM

    folder = save_tiny_cohere2(tmp_path_factory.mktemp("mgsm_model"), tiny_tokenizer, seed=2)
    return LM.load(str(folder), batch_size=3)


@pytest.mark.needs_data
def test_run_equals_harness_formula(tiny_lm):
    """Batched, left-padded, stop-early generation == unbatched HF greedy generate cut at the stops;
    scores == the harness's regex filters + exact_match applied to those texts."""
    import torch

    lang, limit = "bn", 3
    res = mgsm.run(tiny_lm, lang, {"mgsm_mode": "native_cot", "mgsm_shots": 1}, limit=limit)
    docs = mgsm.load(lang)[:limit]
    pool = mgsm.load_exemplars(lang)
    rng = random.Random(1234)  # the harness's fewshot seed: one draw per item, in order
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    texts, strict, flexible = [], [], []
    for doc in docs:
        prompt = mgsm.build_prompt(doc["question"], lang, "native_cot", rng.sample(pool, 1))
        ids = torch.tensor([tok(prompt)["input_ids"]])  # default special tokens: BOS first
        assert ids[0, 0].item() == tok.bos_token_id
        gen = model.generate(ids, max_new_tokens=256, do_sample=False, eos_token_id=tiny_lm.end_ids,
                             pad_token_id=tok.pad_token_id)  # unbatched, no stop criteria
        text = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        for stop in ("প্রশ্ন:", "</s>", "<|im_end|>"):
            text = text.split(stop)[0]
        texts.append(text)
        strict.append(_harness_score(text, r"The answer is (\-?[0-9\.\,]+)", 0, doc["answer"]))
        flexible.append(_harness_score(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1, doc["answer"]))
    assert res["mgsm"].outputs == texts
    assert res["mgsm"].values == strict
    assert res["mgsm_flexible"].values == flexible


def test_stop_strings_cut_and_stop_early(tiny_lm):
    from aetheris.evaluate import cut_at_stops

    assert cut_at_stops("12 + 6 = 18.\n\nFrage: next", ["Frage:", "</s>"]) == "12 + 6 = 18.\n\n"
    prompts = ["Question: 1+1?\nAnswer:", "Frage: 2+2?\nAntwort:"]
    full = tiny_lm.generate_until(prompts, [], max_new_tokens=24)
    stop = full[0][5:8] or full[0][:1]  # a string the model really produces
    cut = tiny_lm.generate_until(prompts, [stop], max_new_tokens=24)
    assert cut == [cut_at_stops(f, [stop]) for f in full]
    assert cut[0] != full[0]


def test_a_malformed_tsv_names_the_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "mgsm").mkdir()
    (tmp_path / "mgsm" / "mgsm_en.tsv").write_text("How many?\t3\nbroken line without answer\n", encoding="utf-8")
    monkeypatch.setenv("AETHERIS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"mgsm_en.tsv line 2: expected 2 tab-separated fields"):
        mgsm.load("en")
