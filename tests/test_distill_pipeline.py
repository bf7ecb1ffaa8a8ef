"""Stages 2 and 3 and the whole pipeline on the tiny Cohere2 teacher: one command runs align -> kl -> sft,
stage 2 lowers held-out KL against the stage-1 student, stage 3 lowers the held-out loss of the gold tool
call against the stage-2 student; missing checkpoints name the stage to run; vocabularies must match;
group-DRO raises the weight of the family the student fits worst; family-balanced sampling."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from aetheris.distill import (
    FamilyDRO,
    check_same_vocabulary,
    family_balanced_probs,
    load_distill_config,
    make_kd_loss,
)

LANGS = ["en", "fr", "sw", "hi", "zh", "ar"]


def _overrides(teacher_dir, run_dir, *extra):
    langs = "[" + ", ".join(LANGS) + "]"
    return [f"teacher.name={teacher_dir}", f"run_dir={run_dir}", f"data.languages={langs}",
            "data.sources=[{type: corpus, max_lines_per_language: 150}]", "student.n_pairs=2",
            "align.train.max_steps=40", "align.train.progress=false", "kl.train.progress=false", "sft.train.progress=false",
            "kl.train.max_steps=80", "kl.train.lr=3e-3", "kl.report_rows_per_language=2",
            f"sft.sources=[{{type: toolgen, languages: {langs}, per_language: 30, tools_offered: 1}}]",
            f"sft.eval_languages={langs}", "sft.eval_tools_offered=1", "sft.seq_len=512",
            "sft.eval_per_language=5", "sft.train.max_steps=400", "sft.train.micro_batch_size=8", "sft.train.lr=5e-3", "sft.train.warmup_steps=20",
            "sft.max_new_tokens=64", *extra]


@pytest.mark.slow  # all three stages end to end (83-129 s measured on 2 cores)
def test_full_pipeline_one_command(teacher_dir, tmp_path):
    from aetheris.checkpoint import load_model
    from aetheris.cli import main

    run = tmp_path / "run"
    rc = main(["distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"), "--stages", "align,kl,sft",
               *_overrides(teacher_dir, run)])
    assert rc == 0
    align = json.loads((run / "align" / "align_report.json").read_text())
    kl = json.loads((run / "kl" / "kl_report.json").read_text())
    sft = json.loads((run / "sft" / "sft_report.json").read_text())
    # Stage 2 starts where stage 1 ended (same student, same held-out rows) and lowers the KL.
    assert kl["kl_before"]["mean"] == pytest.approx(align["kl_after_align"]["mean"], rel=1e-4)
    assert kl["kl_after"]["mean"] < kl["kl_before"]["mean"]
    assert set(kl["equity_after"]["per_family"]) and kl["equity_after"]["des"] >= 0
    # Stage 3 teaches tool calls on templates it never trained on: the held-out loss of the gold call falls
    # well below the stage-2 student's. (Whether this 2-pair student's greedy output then completes a call is
    # a coin flip: 0 to 0.67 parsed across three SFT seeds, 0 on one seed with either exp path of the scan;
    # validity is measured where it emerges, in the demo: 0 -> 0.86.)
    assert sft["toolcall_loss_after"] < 0.5 * sft["toolcall_loss_before"]
    before, after = sft["toolcall_before"]["overall"], sft["toolcall_after"]["overall"]
    assert set(after) == set(before) and all(0 <= v <= 1 for v in after.values())
    assert sft["heldout_examples"] == 5 * len(LANGS)
    for stage in ("align", "kl", "sft"):
        assert (run / stage / "config.json").is_file() and (run / stage / "checkpoints").is_dir()
        assert load_model(run / stage / "student").cfg.vocab_size == 768
    assert "chat_template" in (run / "sft" / "student" / "tokenizer_config.json").read_text() or \
        (run / "sft" / "student" / "chat_template.jinja").exists()


def test_a_stage_without_its_starting_student_names_the_stage_to_run(tmp_path, capsys, teacher_dir):
    from aetheris.cli import main

    rc = main(["distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"), "--stages", "kl",
               f"teacher.name={teacher_dir}", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "run --stages align first" in err and str(tmp_path / "align" / "student") in err
    rc = main(["distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"), "--stages", "sft",
               f"teacher.name={teacher_dir}", f"run_dir={tmp_path}"])
    assert rc == 2 and "run --stages kl first" in capsys.readouterr().err


def test_teacher_student_vocabulary_mismatch_is_an_error(tiny_tokenizer, tmp_path):
    student = SimpleNamespace(cfg=SimpleNamespace(vocab_size=768))
    with pytest.raises(ValueError, match="one vocabulary"):
        check_same_vocabulary(SimpleNamespace(vocab_size=1024), student, tiny_tokenizer, tmp_path)
    from aetheris.tokenizer import train_bpe_tokenizer
    other = train_bpe_tokenizer(["completely different text " * 20, "autre texte"], vocab_size=300)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="identical token ids"):
        check_same_vocabulary(SimpleNamespace(vocab_size=768), student, tiny_tokenizer, tmp_path)


def test_group_dro_raises_the_weight_of_the_worst_family(tiny_cohere2_teacher):
    from aetheris.model import Aetheris
    from aetheris.transfer import student_config

    torch.manual_seed(0)
    student = Aetheris(student_config(tiny_cohere2_teacher.config, n_pairs=2))
    x = torch.randint(5, 700, (4, 24))
    labels = x.clone()
    batch = {"input_ids": x, "labels": labels, "lang_ids": torch.tensor([0, 0, 1, 1])[:, None].expand(4, 24)}
    dro = FamilyDRO(["fam0", "fam1"], step=1.0)
    loss_fn = make_kd_loss(tiny_cohere2_teacher, kind="forward", temperature=1.0, chunk=8, w_kl=1.0, w_ce=0.0,
                           lang_family=torch.tensor([0, 1]), dro=dro)
    loss, metrics = loss_fn(student, batch)
    loss.backward()
    from aetheris.losses import chunked_divergence, per_group_mean, valid_positions
    with torch.no_grad():
        per_pos, _ = chunked_divergence(tiny_cohere2_teacher(input_ids=x).logits, student(x).logits, valid_positions(labels))
        means, _ = per_group_mean(per_pos, valid_positions(labels), batch["lang_ids"], 2)
        aux = student(x, labels=labels).aux_loss
    # this step's loss weights the families by the current (uniform) q ...
    torch.testing.assert_close(loss.detach(), aux + 0.5 * means.sum(), rtol=1e-5, atol=1e-6)
    # ... and the step's per-family statistics then move q towards the worst family: q ∝ q·exp(step·KL_f)
    dro.update({k: v.tolist() for k, v in metrics.items()})
    worst = int(means.argmax())
    assert float(dro.q.sum()) == pytest.approx(1.0) and dro.q[worst] > 0.5 > dro.q[1 - worst]
    torch.testing.assert_close(dro.q, torch.softmax(means, 0), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(loss) and any(p.grad is not None for p in student.parameters())
    # absent families keep their weight; the state round-trips through a checkpoint's JSON
    before = dro.q.clone()
    dro.update({"family_kl_sum": [0.0, 3.0], "family_tokens": [0.0, 2.0]})
    assert dro.q[0] / dro.q[1] == pytest.approx(float(before[0] / (before[1] * np.exp(1.5))), rel=1e-5)
    again = FamilyDRO(["fam0", "fam1"], step=1.0)
    again.load_state_dict(json.loads(json.dumps(dro.state_dict())))
    assert torch.equal(again.q, dro.q)


def test_family_balanced_sampling():
    stream = SimpleNamespace(docs={"fr": [[1] * 90], "es": [[1] * 10], "sw": [[1] * 10]}, languages=["es", "fr", "sw"])
    uniform = family_balanced_probs(stream, float("inf"))   # two families: Indo-European, Niger-Congo
    assert uniform[2] == pytest.approx(0.5) and uniform[1] == pytest.approx(0.5 * 0.9)
    proportional = family_balanced_probs(stream, 1.0)
    np.testing.assert_allclose(proportional, [10 / 110, 90 / 110, 10 / 110])


def test_distill_configs_load():
    for name in ("nano-distill.yaml", "tiny-aya-distill.yaml"):
        path = ROOT / "configs" / name
        cfg = load_distill_config(path)
        assert path.read_text().splitlines()[0].startswith(f"# aetheris distill --config configs/{name}")
        assert cfg.run_dir and cfg.kl.train.out_dir == str(Path(cfg.run_dir) / "kl")
    assert "accelerate launch" in (ROOT / "configs" / "tiny-aya-distill.yaml").read_text()


def test_tiny_aya_config_names_a_source_for_each_of_the_70_languages():
    from aetheris.sources import resolve_languages
    from aetheris.languages import CODES, get_language

    cfg = load_distill_config(ROOT / "configs" / "tiny-aya-distill.yaml")
    assert sorted(resolve_languages(cfg.data.languages)) == sorted(CODES)
    by_language = {}
    for spec in cfg.data.sources:
        assert spec.type == "hub" and spec.split == "train"
        by_language.setdefault(spec.language, []).append(spec)
    assert set(by_language) == set(CODES) and all(len(v) == 1 for v in by_language.values())
    for code, (spec,) in by_language.items():
        if code == "en":
            assert (spec.name, spec.config) == ("HuggingFaceFW/fineweb", "sample-10BT")
        else:
            assert (spec.name, spec.config) == ("HuggingFaceFW/fineweb-2", get_language(code).fineweb2)
