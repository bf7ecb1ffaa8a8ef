"""Stage 3 of ``aetheris distill``: supervised fine-tuning on chat, with optional KL to the teacher and replay.

Chat-templated conversations (``aetheris.sft``, the data module: local JSONL, hub datasets, xSID and the
generated multilingual tool-calling set, ``aetheris.toolgen``), loss on assistant tokens only: ``CE + β·KL``
to the teacher (β = ``sft.beta``, τ = ``sft.kd_temperature``; the teacher is not loaded when β = 0), the KD
loss of stage 2 (``kd.make_kd_loss``). ``sft.replay_every=k`` makes every k-th step a stage-2 batch
(``ReplayMix``) so that tuning on chat does not erase the languages. Reports tool-call validity (parse,
schema, name, exact, BFCL AST via ``tasks.toolcall.score_output``) on held-out *templates* before and after,
and with replay the held-out KL (``common.heldout_kl``). Loop settings: ``sft.train``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from aetheris.chat import install_chat_template, render_messages
from aetheris.checkpoint import load_model
from aetheris.distill.common import (check_same_vocabulary, device_and_rank, heldout_kl, load_teacher_model,
                                     previous_student, report_rows, write_stage)
from aetheris.distill.config import DistillConfig, SFTConfig
from aetheris.distill.kd import make_kd_loss
from aetheris.sft import build_sft_data, record_messages
from aetheris.tasks.toolcall import toolcall_loss, toolcall_validity
from aetheris.teacher import check_documents_kept_apart
from aetheris.tokenizer import load_tokenizer
from aetheris.toolgen import generate_examples
from aetheris.train import RunConfig, build_data, train


class ReplayMix:
    """Stage 3's stream with replay: every ``every``-th batch comes from ``replay`` (stage-2 rows, marked with a
    ``replay`` key so the loss knows), the others from ``sft``. Each step is one kind, so every step is a single
    forward and a batch keeps one width; all ranks draw the same batch, so all take the same kind of step."""

    def __init__(self, sft, replay, every: int):
        self.sft, self.replay, self.every, self.count = sft, replay, every, 0
        self.sizes = sft.sizes

    def next_batch(self, n: int) -> dict:
        self.count += 1
        if self.count % self.every:
            return self.sft.next_batch(n)
        rows = self.replay.next_batch(n)
        return {**rows, "replay": np.ones(n, dtype=np.int64)}

    def state_dict(self) -> dict:
        return {"count": self.count, "sft": self.sft.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.sft.load_state_dict(state["sft"])
        self.replay.load_state_dict(state["replay"])


def make_sft_loss(teacher, sc: SFTConfig):
    """Stage 3's loss_fn: ``CE + β·KL`` on assistant tokens; on replay batches, stage 2's KL on every token."""
    chat = make_kd_loss(teacher, kind=sc.kind, temperature=sc.kd_temperature, chunk=sc.chunk, w_kl=sc.beta, w_ce=1.0)
    replay = make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=sc.chunk, w_kl=1.0, w_ce=0.0)

    def sft_loss(model, batch: dict) -> tuple[Tensor, dict]:
        if "replay" not in batch:
            return chat(model, batch)
        loss, metrics = replay(model, {k: v for k, v in batch.items() if k != "replay"})
        return loss, {"replay_kl": metrics["kl"], "aux": metrics["aux"]}  # its CE is not the SFT CE: not logged as ce

    return sft_loss


def run_sft(cfg: DistillConfig, *, teacher=None, resume=None, log=print, overwrite: bool = False) -> dict:
    """Stage 3 end to end; returns the report (also ``<sft out_dir>/sft_report.json``) and writes the student."""
    sc = cfg.sft
    out_dir = Path(sc.train.out_dir)
    device, main_process = device_and_rank()
    init = previous_student(cfg, "sft")
    if teacher is None and (sc.beta > 0 or sc.replay_every):
        teacher = load_teacher_model(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.name or cfg.teacher.name)
    install_chat_template(tokenizer)
    student = load_model(init)
    check_same_vocabulary(teacher.config if teacher is not None else None, student, tokenizer, init)
    # Conversations with tool schemas are longer than stage 1/2 rows; the SSM has no position limit, so the
    # student's nominal max_seq_len (a guard for generation) grows to the SFT row length.
    student.cfg.max_seq_len = max(student.cfg.max_seq_len, sc.seq_len)
    run_cfg = RunConfig(model=student.cfg, tokenizer=cfg.tokenizer, data=cfg.data, train=sc.train)
    data = build_sft_data(sc.sources, tokenizer, sc.seq_len, language_temperature=sc.language_temperature,
                          seed=sc.train.seed, log=log)
    kl_rows = None
    if sc.replay_every:  # stage 2's data: replayed during training, and its held-out rows measure forgetting
        lm_data, _ = build_data(run_cfg, lambda _docs: tokenizer, log)
        data = dataclasses.replace(data, stream=ReplayMix(data.stream, lm_data.stream, sc.replay_every))
        kl_rows = report_rows(lm_data.val, cfg.kl.report_rows_per_language)
    if kl_rows is not None and cfg.data.pack:
        check_documents_kept_apart(teacher)  # replayed stage-2 rows are packed
    held_out = generate_examples(sc.eval_languages, split="test", per_language=sc.eval_per_language, seed=sc.train.seed,
                                 tools_offered=sc.eval_tools_offered)
    # The held-out prompts (tool schemas + request) may be longer than the training rows; the guard grows to them.
    longest = max((len(tokenizer.encode(render_messages(record_messages(ex)[:1], ex["tools"]), add_special_tokens=False))
                   for ex in held_out), default=0)
    student.cfg.max_seq_len = max(student.cfg.max_seq_len, longest + sc.max_new_tokens)

    student.to(device).eval()
    report: dict[str, Any] = {"init": str(init), "beta": sc.beta, "train_conversations": data.stream.sizes,
                              "malformed": dict(data.malformed.counts), "heldout_examples": len(held_out)}
    report["toolcall_before"] = toolcall_validity(student, tokenizer, held_out, sc.max_new_tokens)
    report["toolcall_loss_before"] = toolcall_loss(student, tokenizer, held_out)
    if kl_rows is not None:
        teacher.to(device)
        report["replay_every"] = sc.replay_every
        report["kl_before"] = heldout_kl(teacher, student, kl_rows, chunk=sc.chunk)
    loss_fn = make_sft_loss(teacher, sc)
    result = train(run_cfg, loss_fn=loss_fn, model=student, tokenizer=tokenizer, data=data,
                   frozen={"teacher": teacher} if teacher is not None else None, resume=resume, overwrite=overwrite)
    student = result.model.eval()
    report["toolcall_after"] = toolcall_validity(student, tokenizer, held_out, sc.max_new_tokens)
    report["toolcall_loss_after"] = toolcall_loss(student, tokenizer, held_out)
    if kl_rows is not None:
        report["kl_after"] = heldout_kl(teacher, student, kl_rows, chunk=sc.chunk)
        log(f"stage 3: held-out KL(teacher||student) {report['kl_before']['mean']:.4f} -> "
            f"{report['kl_after']['mean']:.4f} nats/token (replay every {sc.replay_every} steps)")
    report["steps"] = result.step
    b, a = report["toolcall_before"]["overall"], report["toolcall_after"]["overall"]
    log("stage 3: tool-call validity on held-out templates " + ", ".join(f"{k} {b[k]:.3f}->{a[k]:.3f}" for k in b)
        + f"; loss of the gold call {report['toolcall_loss_before']:.3f}->{report['toolcall_loss_after']:.3f} nats/token")
    if main_process:
        write_stage(out_dir, "sft", report, student, tokenizer)
    return report
