"""mGSM: 250 grade-school maths problems in 11 languages; direct, native CoT and English CoT, as
lm-evaluation-harness 0.4.13 runs them.

Sources: Shi et al. 2022, "Language Models are Multilingual Chain-of-Thought Reasoners"
(github.com/google-research/url-nlp/mgsm: the TSVs and the 8 translated exemplars per language);
lm-evaluation-harness 0.4.13 ``lm_eval/tasks/mgsm`` (``utils.py``'s per-language table, the generated
``direct/``, ``native_cot/``, ``en_cot/`` YAMLs, ``filters/extraction.py``, the ``exact_match`` metric).
The harness reads ``juletxara/mgsm``, whose train split is the 8 exemplars of ``exemplars.json`` and
whose test split is the TSVs; ``tests/test_harness_equivalence.py`` feeds both to the harness's own
task objects and compares every prompt with ours.

Per language the harness has (``PROMPTS``) a question word, a native step-by-step answer prefix, a
direct answer word (English ``Answer:`` for bn, ja, ru, sw, te, th, zh) and a strict regex (English
``The answer is`` for bn). ja/zh question words end in a full-width colon (``問題：``).

Prompt, every mode: exemplars then the test item, ``fewshot_delimiter`` "\\n\\n" after each exemplar.
- test item: ``f"{QUESTION} {question}\\n{ANSWER_WORD}"``;
- exemplar: ``f"{q}\\n{ANSWER_WORD}{delimiter}{target}"`` (``q`` already starts with the question word);
- ``direct``: ANSWER_WORD = the direct word, delimiter "" (``Answer:11``), target = the number;
- ``native_cot``: ANSWER_WORD = the native prefix, delimiter " ", target = the exemplar answer
  without its first ``len(native prefix) + 1`` characters (the harness's ``answer[N:]``, which eats the
  first character of the ja/zh answers, whose colon is full-width and not followed by a space);
- ``en_cot``: as native_cot, but ANSWER_WORD = ``Step-by-Step Answer:`` (the target is still cut at the
  native prefix's length);
- exemplars: the harness's default sampler, ``random.Random(1234).sample(exemplars, k)`` drawn anew for
  each test item in file order (so item i sees a different order than item i+1).
Generation: greedy, at most 256 new tokens, stopped at ``[QUESTION, "</s>", "<|im_end|>"]`` in every
mode (each language's ``generation_kwargs`` replaces the shared ``\\n\\n``/``\\n`` stops); model end
tokens stop as well.
Scores, both reported:
- ``mgsm`` (strict): direct -- the response with surrounding whitespace removed (``remove_whitespace``);
  native_cot -- first match of the language's regex; en_cot -- first match of ``The answer is N``;
- ``mgsm_flexible``: last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``;
each compared to the gold number with ``exact_match(ignore_case, ignore_punctuation)``: lowercase,
delete ASCII punctuation, compare strings. Deleting punctuation normalises thousands separators
(``2,125`` == ``2125``); it also deletes a minus sign and a decimal point (``-5`` == ``5``,
``1.5`` == ``15``) -- kept for comparability (MGSM's gold answers are non-negative integers). Digits must
be ASCII: the regexes do not read native digits (০-৯).
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from pathlib import Path

from aetheris.paths import data_path
from aetheris.tasks import Scores

NAME = "mgsm"
MAX_NEW_TOKENS = 256
END_STRINGS = ("</s>", "<|im_end|>")  # the harness's; model end tokens are stopped on as well
INVALID = "[invalid]"  # the harness RegexFilter's fallback
FLEXIBLE_REGEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
EN_COT_ANSWER = "Step-by-Step Answer:"
EN_COT_REGEX = r"The answer is (\-?[0-9\.\,]+)"
FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed

# lang -> question word, native CoT answer prefix, direct answer word, native strict regex (harness utils.py)
PROMPTS = {
    "bn": ("প্রশ্ন:", "ধাপে ধাপে উত্তর:", "Answer:", r"The answer is (\-?[0-9\.\,]+)"),
    "de": ("Frage:", "Schritt-für-Schritt-Antwort:", "Antwort:", r"Die Antwort lautet (\-?[0-9\.\,]+)"),
    "en": ("Question:", "Step-by-Step Answer:", "Answer:", r"The answer is (\-?[0-9\.\,]+)"),
    "es": ("Pregunta:", "Respuesta paso a paso:", "Respuesta:", r"La respuesta es (\-?[0-9\.\,]+)"),
    "fr": ("Question :", "Réponse étape par étape :", "Réponse :", r"La réponse est (\-?[0-9\.\,]+)"),
    "ja": ("問題：", "ステップごとの答え:", "Answer:", r"答えは(\-?[0-9\.\,]+)です。"),
    "ru": ("Задача:", "Пошаговоерешение:", "Answer:", r"Ответ — (\-?[0-9\.\,]+)"),
    "sw": ("Swali:", "Jibu la Hatua kwa Hatua:", "Answer:", r"Jibu ni (\-?[0-9\.\,]+)"),
    "te": ("ప్రశ్న:", "దశలవారీగా సమాధానం:", "Answer:", r"సమాధానం (\-?[0-9\.\,]+)"),
    "th": ("โจทย์:", "คำตอบทีละขั้นตอน:", "Answer:", r"คำตอบคือ (\-?[0-9\.\,]+)"),
    "zh": ("问题：", "逐步解答:", "Answer:", r"答案是 (\-?[0-9\.\,]+)。"),
}
LANGUAGES = tuple(PROMPTS)
MODES = ("native_cot", "direct", "en_cot")


def languages(options: dict) -> list[str]:
    return list(LANGUAGES)


def data_files(lang: str, options: dict) -> list[Path]:
    files = [data_path("mgsm", f"mgsm_{lang}.tsv", what=f"MGSM {lang} test set")]
    if int(options.get("mgsm_shots", 0)) > 0:
        files.append(data_path("mgsm", "exemplars.json", what="MGSM few-shot exemplars"))
    return files


def load(lang: str) -> list[dict]:
    path = data_path("mgsm", f"mgsm_{lang}.tsv", what=f"MGSM {lang} test set")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    bad = next((i for i, row in enumerate(rows) if len(row) != 2), None)
    if bad is not None:
        raise ValueError(f"{path} line {bad + 1}: expected 2 tab-separated fields (question, answer), "
                         f"found {len(rows[bad])}; restore the file from the MGSM release")
    return [{"id": i, "question": q, "answer": a.strip()} for i, (q, a) in enumerate(rows)]


def load_exemplars(lang: str) -> list[dict]:
    path = data_path("mgsm", "exemplars.json", what="MGSM few-shot exemplars")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    by_index = data["MGSM_EXEMPLARS"][lang]
    numbers = data["EXEMPLAR_NUMBER_ANSWERS"]
    return [{"q": by_index[k]["q"], "a": by_index[k]["a"], "number": numbers[int(k) - 1]}
            for k in sorted(by_index, key=int)]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mGSM mode {mode!r}; choose one of {', '.join(MODES)}")


def answer_word(lang: str, mode: str) -> str:
    _check_mode(mode)
    _, cot, direct, _ = PROMPTS[lang]
    return {"direct": direct, "native_cot": cot, "en_cot": EN_COT_ANSWER}[mode]


def exemplar_target(ex: dict, lang: str, mode: str) -> str:
    """The harness's doc_to_target of a train doc: the number (direct) or ``answer[len(prefix) + 1:]``."""
    if mode == "direct":
        return str(ex["number"])
    return ex["a"][len(PROMPTS[lang][1]) + 1:]


def build_prompt(question: str, lang: str, mode: str = "native_cot", exemplars: list[dict] = ()) -> str:
    word = answer_word(lang, mode)
    delimiter = "" if mode == "direct" else " "  # the harness's target_delimiter per mode
    shots = "".join(f"{ex['q']}\n{word}{delimiter}{exemplar_target(ex, lang, mode)}\n\n" for ex in exemplars)
    return f"{shots}{PROMPTS[lang][0]} {question}\n{word}"


def sample_exemplars(pool: list[dict], shots: int, n_docs: int, seed: int = FEWSHOT_SEED) -> list[list[dict]]:
    """Exemplars for each of the first n_docs test items: the harness's ContextSampler draws
    ``Random(seed).sample(pool, shots)`` once per item, in order, from one generator."""
    if shots <= 0:
        return [[] for _ in range(n_docs)]
    if shots > len(pool):
        raise ValueError(f"mGSM has {len(pool)} exemplars per language; --mgsm-shots {shots} is too many")
    rng = random.Random(seed)
    return [rng.sample(pool, shots) for _ in range(n_docs)]


def stop_strings(lang: str, mode: str = "native_cot") -> list[str]:
    _check_mode(mode)
    return [PROMPTS[lang][0], *END_STRINGS]


# --- extraction and scoring: the harness's RegexFilter + exact_match -----------------------------------


def _regex_filter(response: str, pattern: re.Pattern, group_select: int) -> str:
    matches = pattern.findall(response)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first non-empty one
        match = next((m for m in match if m), None)
        if match is None:
            return INVALID
    return match.strip()


def extract_strict(response: str, lang: str, mode: str = "native_cot") -> str:
    _check_mode(mode)
    if mode == "direct":
        return response.strip()  # the harness's remove_whitespace filter
    return _regex_filter(response, re.compile(PROMPTS[lang][3] if mode == "native_cot" else EN_COT_REGEX), 0)


def extract_flexible(response: str) -> str:
    return _regex_filter(response, FLEXIBLE_REGEX, -1)


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """exact_match(ignore_case=True, ignore_punctuation=True) normalisation: "2,125" -> "2125"."""
    return text.lower().translate(_PUNCT)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    mode = options.get("mgsm_mode", "native_cot")
    shots = int(options.get("mgsm_shots", 0))
    _check_mode(mode)
    docs = load(lang)[:limit]
    shots_per_doc = sample_exemplars(load_exemplars(lang) if shots > 0 else [], shots, len(docs))
    prompts = [build_prompt(d["question"], lang, mode, ex) for d, ex in zip(docs, shots_per_doc)]
    outputs = lm.generate_until(prompts, stop_strings(lang, mode), max_new_tokens=MAX_NEW_TOKENS,
                                desc=f"mgsm {lang}")
    strict = [exact_match(extract_strict(o, lang, mode), d["answer"]) for o, d in zip(outputs, docs)]
    flexible = [exact_match(extract_flexible(o), d["answer"]) for o, d in zip(outputs, docs)]
    ids = [d["id"] for d in docs]
    return {
        "mgsm": Scores("exact_match_strict", True, ids, strict, outputs=outputs),
        "mgsm_flexible": Scores("exact_match_flexible", True, ids, flexible),
    }
