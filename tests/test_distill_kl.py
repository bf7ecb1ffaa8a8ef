"""Stage 2 on the tiny Cohere2 teacher: training from an offline teacher cache with k = V (float32) is online
distillation (same loss trajectory and weights; also with 2 processes); a small-k cache still lowers the held-out KL; a cache built
from other settings is refused; kill + resume from the cache (with group-DRO) == uninterrupted; 2 processes (torchrun, gloo)
== 1 process with grad_accum 2, with identical group-DRO weights on both ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_process_group, merged_overrides as _merged
from aetheris.distill import load_distill_config, run_kl

LANGS = ["en", "fr", "sw", "hi"]


@pytest.fixture(scope="module")
def start_student(teacher_dir, tiny_cohere2_teacher, tiny_tokenizer, tmp_path_factory):
    """The student right after stage-1 weight transfer (no alignment training): stage 2's starting point."""
    from aetheris.checkpoint import save_model
    from aetheris.distill import build_student
    from aetheris.model import Aetheris
    from aetheris.transfer import transfer

    cfg = _cfg(teacher_dir, tmp_path_factory.mktemp("unused"), None)
    scfg, pairs = build_student(cfg, tiny_cohere2_teacher.config)
    torch.manual_seed(0)
    student = Aetheris(scfg)
    transfer(tiny_cohere2_teacher, student, pairs, expert_noise=0.1)
    folder = tmp_path_factory.mktemp("start") / "student"
    save_model(student, folder, tokenizer=tiny_tokenizer)
    return folder


def _overrides(teacher_dir, out, init, *extra):
    langs = "[" + ", ".join(LANGS) + "]"
    return _merged([
        f"teacher.name={teacher_dir}", "run_dir=null", f"kl.train.out_dir={out}", f"kl.init={init}", f"data.languages={langs}",
        "data.sources=[{type: corpus, max_lines_per_language: 60}]", "data.seq_len=32", "student.n_pairs=2",
        "kl.train.max_steps=6", "kl.train.micro_batch_size=4", "kl.train.lr=3e-4", "kl.train.warmup_steps=2",
        "kl.train.log_every=1", "kl.train.eval_every=100", "kl.train.checkpoint_every=3", "kl.train.progress=false",
        "kl.train.tracker=none", "kl.report_rows_per_language=1", "kl.chunk=16", *extra])


def _cfg(teacher_dir, out, init, *extra):
    return load_distill_config(ROOT / "configs" / "nano-distill.yaml",
                               _overrides(teacher_dir, out, init or "unused", *extra))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(out) -> dict:
    from aetheris.checkpoint import load_model
    return load_model(Path(out) / "student").state_dict()


def test_cache_with_k_equal_v_is_online_distillation(teacher_dir, tiny_cohere2_teacher, start_student, tmp_path):
    V = tiny_cohere2_teacher.config.vocab_size
    online = run_kl(_cfg(teacher_dir, tmp_path / "online", start_student), teacher=tiny_cohere2_teacher, log=lambda *_: None)
    cache = tmp_path / "cache"
    cached = run_kl(_cfg(teacher_dir, tmp_path / "cached", start_student, f"kl.cache={cache}", f"kl.cache_k={V}",
                         "kl.cache_dtype=float32"), log=lambda *_: None)  # no teacher passed: loaded only to write
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["rows"] == 6 * 4 and meta["k"] == V and meta["source"]["seq_len"] == 32
    a, b = _metrics(tmp_path / "online"), _metrics(tmp_path / "cached")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-4, abs=1e-6)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    wa, wb = _weights(tmp_path / "online"), _weights(tmp_path / "cached")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4, msg=name)
    # the held-out report from the cache (k = V) is the online one
    assert cached["kl_before"]["mean"] == pytest.approx(online["kl_before"]["mean"], rel=1e-4)
    assert cached["kl_after"]["mean"] == pytest.approx(online["kl_after"]["mean"], rel=1e-3)
    assert cached["kl_after"]["mean"] < cached["kl_before"]["mean"]


def test_small_k_cache_lowers_heldout_kl_and_a_mismatched_cache_is_refused(teacher_dir, tiny_cohere2_teacher,
                                                                           start_student, tmp_path):
    from aetheris.checkpoint import load_model
    from aetheris.distill import heldout_kl
    from aetheris.teacher_cache import CacheMismatchError, load_heldout

    cache = tmp_path / "cache"
    extra = (f"kl.cache={cache}", "kl.cache_k=8", "kl.train.max_steps=12")
    report = run_kl(_cfg(teacher_dir, tmp_path / "k8", start_student, *extra), log=lambda *_: None)
    assert json.loads((cache / "cache.json").read_text())["k"] == 8
    assert report["cache"]["k"] == 8
    # judged by the full KL against the real teacher on the held-out rows, not only by the cache's lower bound
    keys = ("input_ids", "labels", "doc_ids", "attention_mask")
    rows = {lang: {key: v[key] for key in keys} for lang, v in load_heldout(cache).items()}
    before = heldout_kl(tiny_cohere2_teacher, load_model(start_student).eval(), rows)["mean"]
    after = heldout_kl(tiny_cohere2_teacher, load_model(tmp_path / "k8" / "student").eval(), rows)["mean"]
    assert after < before
    assert report["kl_after"]["mean"] < report["kl_before"]["mean"] <= before + 1e-6  # top-k is a lower bound
    # other settings than those the cache was built from: a clear error naming each one
    for override, field in (("kl.kd_temperature=2.0", "temperature"), ("data.seq_len=48", "seq_len"),
                            ("kl.cache_k=16", "k: cache 8 != run 16")):
        with pytest.raises(CacheMismatchError, match=field):
            run_kl(_cfg(teacher_dir, tmp_path / "bad", start_student, *extra, override), log=lambda *_: None)


class Killed(Exception):
    pass


def test_kill_and_resume_from_the_cache_gives_the_same_weights(teacher_dir, start_student, tmp_path):
    def kill_at(record):
        if record["step"] == 4:
            raise Killed

    # group-DRO on, one document per row (several families per batch): its weights must resume too
    extra = (f"kl.cache={tmp_path / 'cache'}", "kl.cache_k=16", "kl.dro=true", "kl.dro_step=1.0", "data.pack=false")
    full = _cfg(teacher_dir, tmp_path / "full", start_student, *extra)
    run_kl(full, log=lambda *_: None)
    cfg = _cfg(teacher_dir, tmp_path / "resumed", start_student, *extra)
    with pytest.raises(Killed):
        run_kl(cfg, hooks=[kill_at], log=lambda *_: None)  # dies after the step-3 checkpoint
    run_kl(cfg, resume=True, log=lambda *_: None)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    full_losses = {r["step"]: (r["loss"], r["dro_weights"]) for r in _metrics(tmp_path / "full")}
    assert {r["step"]: (r["loss"], r["dro_weights"]) for r in _metrics(tmp_path / "resumed")} == full_losses
    assert len({tuple(w) for _, w in full_losses.values()}) > 2  # the weights moved and mattered


def _torchrun_kl(out, nproc, teacher_dir, start_student, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "aetheris.cli", "distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"),
           "--stages", "kl", *_overrides(teacher_dir, out, start_student, "kl.train.threads=1", "kl.dro=true",
                                         "kl.dro_step=1.0", "data.pack=false", *extra)]
    proc = run_process_group(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _metrics(out), json.loads((Path(out) / "kl_report.json").read_text())


def test_two_process_torchrun_stage2_with_dro_matches_one_process(teacher_dir, start_student, tmp_path):
    one, rep1 = _torchrun_kl(tmp_path / "one", 1, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                             "kl.train.grad_accum=2")
    two, rep2 = _torchrun_kl(tmp_path / "two", 2, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                             "kl.train.grad_accum=1")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["dro_weights"] == pytest.approx(a["dro_weights"], rel=1e-5)
    # one document per row (data.pack=false): the ranks see different families, so unsynchronised weights would differ
    assert any(sum(c > 0 for c in r["family_tokens"]) >= 2 for r in one)
    assert one[-1]["dro_weights"] != one[0]["dro_weights"]  # the weights did move
    assert rep2["dro_weights_rank_spread"] == 0.0  # both ranks hold identical weights
    assert rep2["dro_weights"] == pytest.approx(rep1["dro_weights"], rel=1e-5)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_process_run_writes_the_cache_and_matches_online(teacher_dir, start_student, tmp_path):
    # a 2-process run from a teacher cache that does not exist yet: each process writes its shards (k = V,
    # float32), process 0 publishes the manifest, then both train from it without the teacher == the 1-process
    # online run
    one, _ = _torchrun_kl(tmp_path / "one", 1, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                          "kl.train.grad_accum=2")
    V = json.loads((Path(teacher_dir) / "config.json").read_text())["vocab_size"]
    cached, _ = _torchrun_kl(tmp_path / "two-cached", 2, teacher_dir, start_student, "kl.train.micro_batch_size=2",
                             "kl.train.grad_accum=1", f"kl.cache={tmp_path / 'cache'}", f"kl.cache_k={V}",
                             "kl.cache_dtype=float32")
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["rows"] == 6 * 2 * 2
    for a, b in zip(one, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["dro_weights"] == pytest.approx(a["dro_weights"], rel=1e-4)
