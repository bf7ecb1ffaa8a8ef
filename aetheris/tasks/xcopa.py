"""XCOPA (11 languages) + Dutch COPA-NL, scored by log-likelihood exactly as lm-evaluation-harness does.

Sources: Ponti et al. 2020, "XCOPA: A Multilingual Dataset for Causal Commonsense Reasoning"
(github.com/cambridgeltl/xcopa); COPA-NL from github.com/wietsedv/NLP-NL; the harness's
``lm_eval/tasks/xcopa/utils.py`` for the prompt and connectors.

The harness formula, quirks included (docs/EVALUATION.md has the reasoning):
1. context = ``premise.strip()[:-1] + " " + connector[question]`` -- the last character is dropped
   even when it is a letter (all Thai premises, most Tamil ones have no final period);
2. each choice is the choice text with its first character lowercased, joined with one space
   (the harness's ``target_delimiter``);
3. tokens: ``whole = encode(context + " " + choice)``, ``ctx = encode(context)`` with the tokenizer's
   default special tokens (so its BOS is prepended), continuation = ``whole[len(ctx):]``;
4. score of a choice = sum of the continuation tokens' log-probs (no length normalisation);
   prediction = argmax (first on ties); accuracy.

``xcopa/data`` as published is the default; ``xcopa/data-fixed-question`` (the `question` field
corrected for th/tr/sw/id/it) is an opt-in variant: the task name ``xcopa_fixed`` runs it and reports
it as a separate result (COPA-NL's questions are already right, so ``nl`` is the same in both).
COPA-NL's connectors ("omdat"/"dus") are ours: the harness has no Dutch XCOPA task.
"""

from __future__ import annotations

import json
from pathlib import Path

from aetheris.paths import data_path
from aetheris.tasks import Scores

NAME = "xcopa"

# language -> {question: connector}; the harness's table plus Dutch for COPA-NL.
CONNECTORS = {
    "et": {"cause": "sest", "effect": "seetõttu"},
    "ht": {"cause": "poukisa", "effect": "donk sa"},
    "id": {"cause": "karena", "effect": "maka"},
    "it": {"cause": "perché", "effect": "quindi"},
    "qu": {"cause": "imataq", "effect": "chaymi"},
    "sw": {"cause": "kwa sababu", "effect": "kwa hiyo"},
    "ta": {"cause": "காரணமாக", "effect": "எனவே"},
    "th": {"cause": "เพราะ", "effect": "ดังนั้น"},
    "tr": {"cause": "çünkü", "effect": "bu yüzden"},
    "vi": {"cause": "bởi vì", "effect": "vì vậy"},
    "zh": {"cause": "因为", "effect": "所以"},
    "nl": {"cause": "omdat", "effect": "dus"},
}
LANGUAGES = tuple(CONNECTORS)


def languages(options: dict) -> list[str]:
    return list(LANGUAGES)


def data_files(lang: str, options: dict) -> list[Path]:
    if lang == "nl":  # COPA-NL test == XCOPA test items (same ids order); its question field is correct
        return [data_path("xcopa", "extra_copa_nl", "test.jsonl", what="COPA-NL (Dutch XCOPA)")]
    folder = "data-fixed-question" if options.get("xcopa_fixed_question") else "data"
    return [data_path("xcopa", folder, lang, f"test.{lang}.jsonl", what=f"XCOPA {lang} test set")]


def load(lang: str, options: dict) -> list[dict]:
    (path,) = data_files(lang, options)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def context(doc: dict, lang: str) -> str:
    """``premise[:-1] + " " + connector`` -- the harness's doc_to_text."""
    return doc["premise"].strip()[:-1] + " " + CONNECTORS[lang][doc["question"]]


def lowercase_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def requests(doc: dict, lang: str) -> list[tuple[str, str]]:
    """The two (context, continuation) pairs whose log-likelihoods are compared."""
    ctx = context(doc, lang)
    return [(ctx, " " + lowercase_first(doc["choice1"])), (ctx, " " + lowercase_first(doc["choice2"]))]


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    docs = load(lang, options)[:limit]
    reqs = [r for doc in docs for r in requests(doc, lang)]
    lls = lm.loglikelihood(reqs, desc=f"xcopa {lang}")
    values = []
    for i, doc in enumerate(docs):
        ll1, ll2 = lls[2 * i], lls[2 * i + 1]
        pred = 0 if ll1 >= ll2 else 1  # argmax, first on ties (numpy's rule, as the harness)
        values.append(float(pred == int(doc["label"])))
    ids = [doc.get("idx", doc.get("id", i)) for i, doc in enumerate(docs)]
    name = "xcopa_fixed" if options.get("xcopa_fixed_question") else "xcopa"
    return {name: Scores(metric="acc", higher_is_better=True, ids=ids, values=values)}
