"""What every distillation stage uses: this process's device, the teacher and the starting student, one
vocabulary check, the held-out report rows and the held-out KL, and writing a stage's results.

The held-out KL (``heldout_kl``) is the one measure of KL(teacher || student) in the stage reports: per
token over the positions whose next label is real, per language, against the teacher model or against a
teacher cache's held-out rows, computed by ``losses.teacher_divergence`` (the function the training loss
and the ``ppl`` task's KL use too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aetheris.checkpoint import save_model
from aetheris.distill.config import DistillConfig
from aetheris.losses import CACHE_KEYS, teacher_divergence, valid_positions
from aetheris.teacher import load_teacher, load_teacher_config, teacher_logits
from aetheris.tokenizer import load_tokenizer


def device_and_rank() -> tuple[torch.device, bool]:
    """This process's device and whether it writes files: under torchrun / accelerate launch every process
    measures on its own GPU; only rank 0 writes."""
    local_rank, main_process = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("RANK", 0)) == 0
    return (torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")), main_process


def load_teacher_model(cfg: DistillConfig):
    """The teacher, frozen, in ``teacher.dtype``; its architecture is checked before any weight is read."""
    load_teacher_config(cfg.teacher.name)
    return load_teacher(cfg.teacher.name, dtype=cfg.teacher.torch_dtype())


def previous_student(cfg: DistillConfig, stage: str) -> Path:
    """The student a stage starts from; a missing one names the stage to run first."""
    if stage == "kl":
        path, prev = cfg.kl.init or Path(cfg.align.train.out_dir) / "student", "align"
    else:
        path, prev = cfg.sft.init or Path(cfg.kl.train.out_dir) / "student", "kl"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage!r} starts from the {prev} stage's student at {path}, which does not exist: "
                                f"run --stages {prev} first (or set {stage}.init=FOLDER to start from another student)")
    return path


def check_same_vocabulary(teacher_config, student, tokenizer, student_dir: Path) -> None:
    """Logit distillation compares distributions token id by token id: one vocabulary, one tokenizer."""
    if teacher_config is not None and teacher_config.vocab_size != student.cfg.vocab_size:
        raise ValueError(f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size {student.cfg.vocab_size}: "
                         "logit distillation needs one vocabulary; start from a student built from this teacher (stage 1)")
    if len(tokenizer) > student.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab_size is {student.cfg.vocab_size}")
    if (student_dir / "tokenizer.json").is_file() or (student_dir / "tokenizer_config.json").is_file():
        saved = load_tokenizer(student_dir)
        if saved.get_vocab() != tokenizer.get_vocab():
            name = getattr(tokenizer, "name_or_path", "") or "teacher tokenizer"
            raise ValueError(f"the tokenizer saved with the student in {student_dir} differs from the teacher's "
                             f"({name}): teacher and student must see identical token ids")


def report_rows(val: dict[str, dict], per_language: int) -> dict[str, dict[str, Tensor]]:
    """Held-out rows per language (the first ``per_language``; 0 = all): {lang: {input_ids, labels, doc_ids,
    attention_mask}} as (n, T) long tensors (the fields the rows carry)."""
    out = {}
    for lang, rows in sorted(val.items()):
        n = per_language or len(rows["input_ids"])
        out[lang] = {key: torch.as_tensor(np.asarray(rows[key])[:n], dtype=torch.long)
                     for key in ("input_ids", "labels", "doc_ids", "attention_mask") if key in rows}
    return out


@torch.no_grad()
def heldout_kl(teacher, student, rows: dict[str, dict[str, Tensor]], batch_size: int = 1, chunk: int = 256,
               cache: dict[str, dict[str, Tensor]] | None = None) -> dict:
    """Per-token KL(p_teacher || p_student) in nats: mean over every position whose next label is real (as the
    training loss counts them: no padding, no position that would predict the first token of the next
    document), per language and overall. Documents packed in a row are kept apart for both models.

    ``cache``: a teacher cache's held-out rows per language (``teacher_cache.load_heldout``; the same rows as
    ``rows``, which carry the labels and document ids): the teacher side comes from it (top-k approximation,
    exact at k = V) and ``teacher`` may be None. With a 262k vocabulary one position's fp32 distribution is
    1 MiB, so the softmaxes run ``chunk`` positions at a time.
    """
    device = next(student.parameters()).device
    per_lang, total, count = {}, 0.0, 0
    for lang, lang_rows in rows.items():
        s, n = 0.0, 0
        lang_rows = {**lang_rows, **cache[lang]} if cache is not None else lang_rows
        for start in range(0, len(lang_rows["input_ids"]), batch_size):
            b = {key: v[start:start + batch_size].to(device) for key, v in lang_rows.items()}
            x, doc_ids = b["input_ids"], b.get("doc_ids")
            mask = valid_positions(b.get("labels", x))
            s_logits = student(x, doc_ids=doc_ids, attention_mask=b.get("attention_mask")).logits     # (B, T, V)
            t = {key: b[key] for key in CACHE_KEYS} if cache is not None else teacher_logits(teacher, x, doc_ids)
            per_pos, m = teacher_divergence(t, s_logits, mask, chunk=chunk)
            s, n = s + float(per_pos.sum()), n + int(m)
        per_lang[lang] = s / max(n, 1)
        total, count = total + s, count + n
    return {"mean": total / max(count, 1), "per_language": per_lang, "tokens": count}


def write_stage(out_dir: Path, stage: str, report: dict, student, tokenizer) -> None:
    """``<out_dir>/<stage>_report.json`` and the student (with its tokenizer) in ``<out_dir>/student``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stage}_report.json").write_text(json.dumps(report, indent=1, default=str))
    save_model(student.cpu(), out_dir / "student", tokenizer=tokenizer)
