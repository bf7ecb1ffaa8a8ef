"""mGSM: 250 grade-school maths problems in 11 languages, direct and native chain-of-thought.

Sources: Shi et al. 2022, "Language Models are Multilingual Chain-of-Thought Reasoners"
(github.com/google-research/url-nlp/mgsm: the TSVs and the 8 translated exemplars per language);
lm-evaluation-harness ``lm_eval/tasks/mgsm`` (native_cot / direct YAMLs, ``filters/extraction.py``,
the ``exact_match`` metric) for prompts, stops, answer extraction and scoring.

Prompt (per-language words in ``PROMPTS``):
- test item: ``f"{QUESTION} {question}\\n{ANSWER}"`` (``ANSWER`` = the step-by-step prefix in CoT mode,
  the plain answer word in direct mode);
- k exemplars first, each ``f"{q}\\n{ANSWER} {target}"``, separated by blank lines (the harness's
  ``fewshot_delimiter``/``target_delimiter``). Exemplar questions already start with the question word.
  CoT targets are the exemplar's worked answer without its prefix; direct targets are the number.
Generation: greedy, at most 256 new tokens; CoT stops only at the next question prefix or end tokens
(so the flexible extraction sees the whole output), direct stops at the first newline (harness).
Scores, both reported:
- ``mgsm`` (strict): CoT -- first match of the language's "the answer is N" regex; direct -- the whole
  response with leading whitespace removed;
- ``mgsm_flexible``: last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``;
each compared to the gold number with the harness's ``exact_match(ignore_case, ignore_punctuation)``:
lowercase, delete ASCII punctuation, compare strings. Deleting punctuation is what normalises thousands
separators (``2,125`` == ``2125``); it also deletes a minus sign and a decimal point (``-5`` == ``5``,
``1.5`` == ``15``) -- a harness quirk kept for comparability (MGSM's gold answers are non-negative
integers). Digits must be ASCII: the regexes, like the harness's, do not read native digits (০-৯).

Differences from the harness, on purpose: exemplars are the first k in order (the harness samples them
with a seeded RNG), and a CoT exemplar's prefix is cut at its colon (the harness cuts a fixed
``len(ANSWER)+1`` characters, which eats the first character of the ja/zh exemplars whose colon is
full-width). Zero-shot prompts are identical.
"""

from __future__ import annotations

import csv
import json
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

# lang -> question word, CoT answer prefix, direct answer word, strict answer regex (native CoT)
PROMPTS = {
    "bn": ("প্রশ্ন:", "ধাপে ধাপে উত্তর:", "উত্তর:", r"উত্তর হল (\-?[0-9\.\,]+)"),
    "de": ("Frage:", "Schritt-für-Schritt-Antwort:", "Antwort:", r"Die Antwort lautet (\-?[0-9\.\,]+)"),
    "en": ("Question:", "Step-by-Step Answer:", "Answer:", r"The answer is (\-?[0-9\.\,]+)"),
    "es": ("Pregunta:", "Respuesta paso a paso:", "Respuesta:", r"La respuesta es (\-?[0-9\.\,]+)"),
    "fr": ("Question :", "Réponse étape par étape :", "Réponse :", r"La réponse est (\-?[0-9\.\,]+)"),
    "ja": ("問題:", "ステップごとの答え:", "答え:", r"答えは(\-?[0-9\.\,]+)です。"),
    "ru": ("Задача:", "Пошаговоерешение:", "Ответ:", r"Ответ — (\-?[0-9\.\,]+)"),
    "sw": ("Swali:", "Jibu la Hatua kwa Hatua:", "Jibu:", r"Jibu ni (\-?[0-9\.\,]+)"),
    "te": ("ప్రశ్న:", "దశలవారీగా సమాధానం:", "సమాధానం:", r"సమాధానం (\-?[0-9\.\,]+)"),
    "th": ("โจทย์:", "คำตอบทีละขั้นตอน:", "คำตอบ:", r"คำตอบคือ (\-?[0-9\.\,]+)"),
    "zh": ("问题:", "逐步解答:", "答案:", r"答案是 (\-?[0-9\.\,]+)。"),
}
LANGUAGES = tuple(PROMPTS)
MODES = ("native_cot", "direct")


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
    return [{"id": i, "question": q, "answer": a.strip()} for i, (q, a) in enumerate(rows)]


def load_exemplars(lang: str) -> list[dict]:
    path = data_path("mgsm", "exemplars.json", what="MGSM few-shot exemplars")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    by_index = data["MGSM_EXEMPLARS"][lang]
    numbers = data["EXEMPLAR_NUMBER_ANSWERS"]
    return [{"q": by_index[k]["q"], "a": by_index[k]["a"], "number": numbers[int(k) - 1]}
            for k in sorted(by_index, key=int)]


def _strip_prefix(answer: str) -> str:
    """An exemplar's worked answer without its "Step-by-Step Answer:" prefix (ASCII or full-width colon)."""
    for colon in (":", "："):
        head, sep, rest = answer.partition(colon)
        if sep and len(head) < 40:
            return rest.strip()
    return answer.strip()


def build_prompt(question: str, lang: str, mode: str = "native_cot", exemplars: list[dict] = ()) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mGSM mode {mode!r}; choose one of {', '.join(MODES)}")
    qword, cot, direct, _ = PROMPTS[lang]
    answer_word = cot if mode == "native_cot" else direct
    shots = []
    for ex in exemplars:
        target = _strip_prefix(ex["a"]) if mode == "native_cot" else str(ex["number"])
        shots.append(f"{ex['q']}\n{answer_word} {target}")
    test = f"{qword} {question}\n{answer_word}"
    return "\n\n".join([*shots, test])


def stop_strings(lang: str, mode: str = "native_cot") -> list[str]:
    if mode == "direct":
        return ["\n\n", "\n", *END_STRINGS]
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
    if mode == "direct":
        return response.lstrip()  # the harness's remove_whitespace filter
    return _regex_filter(response, re.compile(PROMPTS[lang][3]), 0)


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
    exemplars = load_exemplars(lang)[:shots] if shots > 0 else []
    if shots > len(exemplars):
        raise ValueError(f"mGSM has {len(exemplars)} exemplars per language; --mgsm-shots {shots} is too many")
    docs = load(lang)[:limit]
    prompts = [build_prompt(d["question"], lang, mode, exemplars) for d in docs]
    outputs = lm.generate_until(prompts, stop_strings(lang, mode), max_new_tokens=MAX_NEW_TOKENS,
                                desc=f"mgsm {lang}")
    strict = [exact_match(extract_strict(o, lang, mode), d["answer"]) for o, d in zip(outputs, docs)]
    flexible = [exact_match(extract_flexible(o), d["answer"]) for o, d in zip(outputs, docs)]
    ids = [d["id"] for d in docs]
    return {
        "mgsm": Scores("exact_match_strict", True, ids, strict, outputs=outputs),
        "mgsm_flexible": Scores("exact_match_flexible", True, ids, flexible),
    }
