"""XCOPA: the harness's prompt strings per language, and accuracy == the harness formula on a tiny model."""

import json
import os

import pytest

from aetheris.tasks import xcopa
from eval_helpers import harness_continuation_logprob, save_tiny_cohere2

DATA = os.environ.get("AETHERIS_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="AETHERIS_DATA_DIR not set")


def test_connectors_match_the_harness_table():
    assert xcopa.CONNECTORS["et"] == {"cause": "sest", "effect": "seetõttu"}
    assert xcopa.CONNECTORS["ht"] == {"cause": "poukisa", "effect": "donk sa"}
    assert xcopa.CONNECTORS["sw"] == {"cause": "kwa sababu", "effect": "kwa hiyo"}
    assert xcopa.CONNECTORS["tr"] == {"cause": "çünkü", "effect": "bu yüzden"}
    assert xcopa.CONNECTORS["vi"] == {"cause": "bởi vì", "effect": "vì vậy"}
    assert xcopa.CONNECTORS["zh"] == {"cause": "因为", "effect": "所以"}
    assert len(xcopa.LANGUAGES) == 12 and "nl" in xcopa.LANGUAGES


def test_prompt_strings_by_hand():
    doc = {"premise": "Mies avasi hanan.", "question": "effect", "choice1": "Vesi valui.", "choice2": "X."}
    assert xcopa.context({**doc, "premise": "Tüdruk leidis oma helbestest putuka."}, "et") == \
        "Tüdruk leidis oma helbestest putuka seetõttu"
    # Thai premises have no final period: the harness still drops the last character (a letter)
    th = {"premise": "ตาของฉันแดงและบวม", "question": "cause", "choice1": "ฉันร้องไห้", "choice2": "ฉันหัวเราะ"}
    assert xcopa.context(th, "th") == "ตาของฉันแดงและบว เพราะ"
    assert xcopa.requests(th, "th")[0] == ("ตาของฉันแดงและบว เพราะ", " ฉันร้องไห้")
    it = {"premise": "L'uomo aprì il rubinetto.", "question": "cause", "choice1": "Il bagno era sporco.", "choice2": "Acqua."}
    assert xcopa.requests(it, "it") == [("L'uomo aprì il rubinetto perché", " il bagno era sporco."),
                                        ("L'uomo aprì il rubinetto perché", " acqua.")]
    sw = {"premise": " Nilifungua mlango. ", "question": "effect", "choice1": "Upepo uliingia.", "choice2": "B"}
    assert xcopa.context(sw, "sw") == "Nilifungua mlango kwa hiyo"  # premise is stripped first
    assert xcopa.lowercase_first("İstanbul") == "i̇stanbul"  # Python's lower(), as the harness


@needs_data
def test_fixed_question_copy_is_opt_in():
    (published,) = xcopa.data_files("th", {})
    (fixed,) = xcopa.data_files("th", {"xcopa_fixed_question": True})
    assert published.parent.parent.name == "data" and fixed.parent.parent.name == "data-fixed-question"
    a, b = xcopa.load("th", {}), xcopa.load("th", {"xcopa_fixed_question": True})
    assert len(a) == len(b) == 500
    assert sum(x["question"] != y["question"] for x, y in zip(a, b)) == 250  # SOURCES.md: 250 th test fixes


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer, tmp_path_factory):
    from aetheris.evaluate import LM

    folder = save_tiny_cohere2(tmp_path_factory.mktemp("xcopa_model"), tiny_tokenizer, seed=1)
    return LM.load(str(folder), batch_size=5)


@needs_data
@pytest.mark.parametrize("lang", ["th", "zh", "nl"])
def test_accuracy_equals_harness_formula(tiny_lm, lang):
    limit = 8
    result = xcopa.run(tiny_lm, lang, {}, limit=limit)["xcopa"]
    docs = xcopa.load(lang, {})[:limit]
    # the harness formula, independently: prompt, per-choice sum of log-probs, argmax, accuracy
    conn = {"th": ("เพราะ", "ดังนั้น"), "zh": ("因为", "所以"), "et": ("sest", "seetõttu"), "nl": ("omdat", "dus")}[lang]
    correct = []
    for doc in docs:
        ctx = doc["premise"].strip()[:-1] + " " + (conn[0] if doc["question"] == "cause" else conn[1])
        lls = [harness_continuation_logprob(tiny_lm.model, tiny_lm.tokenizer, ctx,
                                            " " + doc[c][0].lower() + doc[c][1:]) for c in ("choice1", "choice2")]
        correct.append(float((0 if lls[0] >= lls[1] else 1) == doc["label"]))
    assert result.values == correct
    assert result.score == pytest.approx(sum(correct) / limit)
    # batched log-likelihoods equal the unbatched reference
    reqs = xcopa.requests(docs[0], lang)
    ours = tiny_lm.loglikelihood(reqs)
    ref = [harness_continuation_logprob(tiny_lm.model, tiny_lm.tokenizer, c, x) for c, x in reqs]
    assert ours == pytest.approx(ref, abs=1e-4)
