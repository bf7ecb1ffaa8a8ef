"""Stage 3 with replay: every k-th step is a stage-2 batch (KL to the teacher on corpus rows), so chat tuning
does not erase the languages. The mixed stream alternates and resumes exactly; on the tiny teacher, SFT with
replay ends closer to the teacher on held-out text than the same SFT without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT
from aetheris.distill import ReplayMix, load_distill_config, run_align, run_sft

LANGS = ["en", "sw", "hi", "zh"]


def _streams(tokenizer):
    from aetheris.data import PackedStream
    from aetheris.sft import SFTStream

    lm = PackedStream({"en": [list(range(5, 60))] * 4, "sw": [list(range(60, 100))] * 4}, 16, seed=0)
    chat = SFTStream({"en": [([1, 2, 3, 4], [-100, -100, 3, 4])] * 3, "sw": [([1, 5, 6], [-100, 5, 6])] * 3}, 8, seed=0)
    return chat, lm


def test_replay_mix_alternates_and_resumes_exactly(tiny_tokenizer):
    mix = ReplayMix(*_streams(tiny_tokenizer), every=3)
    kinds = ["replay" in mix.next_batch(2) for _ in range(6)]
    assert kinds == [False, False, True, False, False, True]
    widths = {b["input_ids"].shape[1] for b in (mix.next_batch(2) for _ in range(3))}
    assert widths == {8, 16}  # chat rows and corpus rows keep their own widths (one kind per step)
    state = mix.state_dict()
    ahead = [mix.next_batch(2) for _ in range(4)]
    again = ReplayMix(*_streams(tiny_tokenizer), every=3)
    again.load_state_dict(json.loads(json.dumps(state)))  # the state survives the checkpoint's JSON
    for a, b in zip(ahead, (again.next_batch(2) for _ in range(4))):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_replay_every_one_is_refused():
    with pytest.raises(ValueError, match="replay_every"):
        load_distill_config(ROOT / "configs" / "nano-distill.yaml", ["sft.replay_every=1"])


def test_replay_keeps_the_student_closer_to_the_teacher(teacher_dir, tmp_path):
    langs = "[" + ", ".join(LANGS) + "]"
    chats = tmp_path / "chats.jsonl"  # short conversations: cheap rows that still pull the student off the corpus
    chats.write_text("".join(json.dumps({"id": f"c{i}", "lang": "en", "messages": [
        {"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"ok ok {i} {i} {i}"}]}) + "\n"
        for i in range(40)))
    common = [f"teacher.name={teacher_dir}", f"data.languages={langs}", "student.n_pairs=2",
              "data.sources=[{type: corpus, max_lines_per_language: 40}]", "align.train.max_steps=6",
              "align.train.progress=false", "sft.train.progress=false", "kl.report_rows_per_language=2",
              f"sft.sources=[{{type: jsonl, path: {chats}}}]", "sft.eval_languages=[en]", "sft.eval_tools_offered=1",
              "sft.seq_len=64", "sft.eval_per_language=1", "sft.max_new_tokens=2", "sft.train.max_steps=24",
              "sft.train.lr=1e-2", "sft.train.warmup_steps=2", "sft.train.micro_batch_size=4", "sft.train.log_every=1"]
    cfg = load_distill_config(ROOT / "configs" / "nano-distill.yaml", [*common, f"run_dir={tmp_path / 'a'}"])
    run_align(cfg)
    init = tmp_path / "a" / "align" / "student"
    reports = {}
    for every in (0, 2):
        sft_cfg = load_distill_config(ROOT / "configs" / "nano-distill.yaml",
                                      [*common, f"run_dir={tmp_path / str(every)}", f"sft.init={init}",
                                       f"sft.replay_every={every if every else 3}"])
        if not every:  # the baseline measures KL the same way, on the same rows, but never replays
            sft_cfg.sft.replay_every = 10**6
        reports[every] = run_sft(sft_cfg)
    base, replay = reports[0], reports[2]
    assert base["kl_before"]["mean"] == pytest.approx(replay["kl_before"]["mean"], rel=1e-6)  # same start, same rows
    assert base["kl_after"]["mean"] > base["kl_before"]["mean"]  # chat tuning alone drifts from the teacher
    assert replay["kl_after"]["mean"] < base["kl_after"]["mean"]
    logged = [json.loads(line) for line in (tmp_path / "2" / "sft" / "metrics.jsonl").read_text().splitlines()]
    replay_steps = [r["step"] for r in logged if "replay_kl" in r]
    assert replay_steps == list(range(2, 25, 2))
