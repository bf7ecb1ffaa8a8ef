"""XCOPA: the harness's prompt strings per language, and accuracy == the harness formula on a tiny model."""


import pytest

from aetheris.tasks import xcopa
from eval_helpers import harness_continuation_logprob, save_tiny_cohere2


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


@pytest.mark.needs_data
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


@pytest.mark.needs_data
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


@pytest.mark.needs_data
def test_logsoftmax_dtype_scores_bf16_models_the_harness_way(tiny_tokenizer, tmp_path):
    """A bf16 model: ``model`` = log-softmax and sum in the logits' own dtype (lm-eval's HFLM default),
    ``float32`` = both in float32; each equals its formula written out, and the two differ."""
    import torch

    from aetheris.evaluate import LM

    folder = save_tiny_cohere2(tmp_path / "m", tiny_tokenizer, seed=1)
    reqs = [r for doc in xcopa.load("sw", {})[:4] for r in xcopa.requests(doc, "sw")]
    scored = {}
    for mode in ("model", "float32"):
        lm = LM.load(str(folder), device="cpu", dtype="bfloat16", batch_size=1, logsoftmax_dtype=mode)
        assert lm.numerics == {"dtype": "bfloat16", "logsoftmax_dtype": mode}
        scored[mode] = lm.loglikelihood(reqs)
        expected = []
        for ctx, cont in reqs:  # the harness's _encode_pair, then its log_softmax / gather / sum
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
            whole, c_ids = lm.tokenizer(ctx + cont)["input_ids"], lm.tokenizer(ctx)["input_ids"]
            cont_ids = whole[len(c_ids):]
            with torch.no_grad():
                logits = lm.model(torch.tensor([whole[:-1]])).logits[0, -len(cont_ids):]
            assert logits.dtype == torch.bfloat16
            logp = torch.log_softmax(logits if mode == "model" else logits.float(), dim=-1)
            expected.append(float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum()))
        assert scored[mode] == expected
    assert scored["model"] != scored["float32"]
    with pytest.raises(ValueError, match="logsoftmax dtype"):
        LM.load(str(folder), device="cpu", logsoftmax_dtype="float64")
