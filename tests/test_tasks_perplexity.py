"""Parallel-text perplexity: data for all 70 languages, bits per byte and KL against independent formulas."""

import math

import pytest

from aetheris.languages import CODES
from aetheris.tasks import perplexity
from eval_helpers import save_tiny_cohere2


@pytest.mark.needs_data
def test_every_language_has_text():
    assert perplexity.languages({}) == list(CODES)
    for lang in CODES:
        assert perplexity.data_files(lang, {})[0].exists()
    assert len(perplexity.load("de")) == 1997
    jv, pcm = perplexity.load("jv"), perplexity.load("pcm")
    assert len(jv) == 400 and len(pcm) == 1564
    assert pcm[0].startswith("How dem take see")


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory):
    from aetheris.evaluate import LM

    t = save_tiny_cohere2(tmp_path_factory.mktemp("ppl_teacher"), tiny_tokenizer, seed=3)
    s = save_tiny_cohere2(tmp_path_factory.mktemp("ppl_student"), tiny_tokenizer, seed=4)
    return LM.load(str(t), batch_size=3), LM.load(str(s), batch_size=3)


@pytest.mark.needs_data
def test_bits_per_byte_and_kl_equal_independent_formulas(models):
    import torch
    import torch.nn.functional as F

    teacher, student = models
    res = perplexity.run(student, "sw", {"teacher": teacher}, limit=4)
    sentences = perplexity.select("sw", {}, 4)[1]  # held-out documents only (the default split)
    bits, nbytes, kl_sum, n_tok = 0.0, 0, 0.0, 0
    for text in sentences:
        ids = [student.tokenizer.bos_token_id] + student.tokenizer(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            ls = torch.log_softmax(student.model(x).logits[0, :-1].float(), -1)
            lt = torch.log_softmax(teacher.model(x).logits[0, :-1].float(), -1)
        bits += -float(ls.gather(1, x[0, 1:, None]).sum()) / math.log(2)
        nbytes += len(text.encode("utf-8"))
        kl_sum += float(F.kl_div(ls, lt, log_target=True, reduction="sum"))  # KL(teacher || student)
        n_tok += len(ids) - 1
    assert res["ppl"].score == pytest.approx(bits / nbytes, rel=1e-4)
    assert res["ppl"].higher_is_better is False
    assert res["kl"].score == pytest.approx(kl_sum / n_tok, rel=1e-4)
    assert res["kl"].score > 0.01


@pytest.mark.needs_data
def test_kl_of_a_model_with_itself_is_zero(models):
    teacher, _ = models
    res = perplexity.run(teacher, "pcm", {"teacher": teacher}, limit=3)
    assert res["kl"].score == pytest.approx(0.0, abs=1e-6)


def test_kl_refuses_different_tokenizers(models, tiny_tokenizer):
    from types import SimpleNamespace

    from aetheris.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer(["a tiny corpus for another vocabulary"] * 20, vocab_size=300)
    teacher, student = models
    with pytest.raises(ValueError, match="one tokenizer"):
        perplexity.check_same_tokenizer(SimpleNamespace(tokenizer=other), student)
    perplexity.check_same_tokenizer(teacher, student)  # same tokenizer: fine


@pytest.mark.needs_data
def test_ppl_start_scores_later_sentences_and_keeps_their_indices(models):
    _, student = models
    later = perplexity.run(student, "sw", {"ppl_start": 5, "ppl_split": "all"}, limit=2)["ppl"]
    assert later.ids == [5, 6]  # the sentence indices, so teacher and student pair the same sentences
    # Sentences 5 and 6 scored from index 5 equal sentences 5 and 6 of a run from the start.
    whole = perplexity.run(student, "sw", {"ppl_split": "all"}, limit=7)["ppl"]
    assert later.values == pytest.approx(whole.values[5:7], rel=1e-5)
    assert later.weights == whole.weights[5:7]
    with pytest.raises(ValueError, match="ppl-start"):
        perplexity.run(student, "jv", {"ppl_start": 400}, limit=2)


@pytest.mark.needs_data
def test_scored_sentences_never_overlap_training_rows():
    """Training's own split (load_documents + split_heldout, as train.py builds it) vs the sentences the
    ppl task scores by default: no scored sentence is in any training document, in any of the 70
    languages (jv's NusaX and pcm's MAFAND test files are read by training too)."""
    from aetheris.data import split_heldout
    from aetheris.sources import load_documents

    for seed, fraction in ((0, 0.05), (3, 0.2)):
        train, _ = split_heldout(load_documents([{"type": "corpus"}], "all"), fraction, seed=seed)
        for lang in CODES:
            seen = {line.strip() for doc in train[lang] for line in doc.text.split("\n")}
            ids, scored = perplexity.select(lang, {"ppl_seed": seed, "ppl_val_fraction": fraction})
            assert scored and not seen.intersection(scored), lang
            assert len(scored) < len(perplexity.load(lang))  # held-out documents only
    # the split "all" does score training text: the check below is what stops it for a recorded run
    train, _ = split_heldout(load_documents([{"type": "corpus"}], ["jv", "pcm"]), 0.05, seed=0)
    for lang in ("jv", "pcm"):
        seen = {line.strip() for doc in train[lang] for line in doc.text.split("\n")}
        assert seen.intersection(perplexity.select(lang, {"ppl_split": "all"})[1])


@pytest.mark.needs_data
def test_a_checkpoint_whose_training_overlaps_is_refused(models, tmp_path):
    import json

    _, student = models
    state = tmp_path / "step-0000010" / "state.json"
    (tmp_path / "step-0000010" / "model").mkdir(parents=True)
    config = {"data": {"sources": [{"type": "corpus"}], "languages": ["jv", "pcm"],
                       "val_fraction": 0.1}, "train": {"seed": 7}}
    state.write_text(json.dumps({"step": 10, "config": config}))
    recorded = perplexity.recorded_training(tmp_path / "step-0000010" / "model")
    assert recorded == {"file": str(state), "sources": config["data"]["sources"], "languages": ["jv", "pcm"],
                        "seed": 7, "val_fraction": 0.1}
    for lang, name in (("jv", "test.csv"), ("pcm", "test.pcm")):
        with pytest.raises(ValueError, match=f"{name}: sentence .* is in the training data recorded in .*state.json"):
            perplexity.run(student, lang, {"ppl_split": "all", "ppl_training": recorded}, limit=3)
        # the run's own held-out split passes the check
        ok = perplexity.run(student, lang, {"ppl_seed": 7, "ppl_val_fraction": 0.1, "ppl_training": recorded}, limit=3)
        assert ok["ppl"].n == 3


@pytest.mark.needs_data
def test_eval_cli_uses_the_recorded_split_and_keeps_the_cache_on_a_leak(tiny_tokenizer, tmp_path, capsys):
    import json

    from aetheris.cli import main

    step = tmp_path / "step-0000010"
    model = save_tiny_cohere2(step / "model", tiny_tokenizer, seed=4)
    config = {"data": {"sources": [{"type": "corpus"}], "languages": ["pcm"], "val_fraction": 0.3}, "train": {"seed": 1}}
    (step / "state.json").write_text(json.dumps({"config": config}))
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model), "--output", str(out), "--tasks", "ppl", "--languages", "pcm", "--limit", "3"]
    assert main(args) == 0  # default: the recorded run's held-out split (seed 1, val_fraction 0.3)
    cached = (out / "cache" / "ppl" / "pcm.json").read_bytes()
    ids = json.loads(cached)["results"]["ppl"]["ids"]
    assert ids == perplexity.select("pcm", {"ppl_seed": 1, "ppl_val_fraction": 0.3}, 3)[0]
    assert ids != [0, 1, 2]  # seed 1 trains on the first block of the MAFAND test file ...
    assert main(args + ["--ppl-split", "all", "--overwrite"]) != 0  # ... which "all" would score
    assert "is in the training data recorded in" in capsys.readouterr().err
    assert (out / "cache" / "ppl" / "pcm.json").read_bytes() == cached  # nothing cached is overwritten
