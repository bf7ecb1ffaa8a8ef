"""Distillation of a teacher transformer into an Aetheris student: ``aetheris distill``.

    aetheris distill --config configs/nano-align.yaml --stages align [key.sub=value ...] [--resume]

Stages (DESIGN §4), run in the order given by ``--stages`` (a comma list over align, kl, sft):

* **align** (stage 1, MambaInLlama weight transfer + MOHAWK/LoLCATs-style alignment):
  1. Load the teacher (frozen, eval) and derive the student's config from it (``transfer.student_config``).
  2. Transfer the weights (``transfer.transfer``); measure the student right after transfer and a
     randomly initialised one: KL(teacher || student) on held-out multilingual rows, and per pair the
     relative error / cosine similarity of its residual update against the teacher's.
  3. Teacher-forced, layer-local training through the shared training loop (``train.train``): pair k
     receives the teacher's hidden state at the input of its group of teacher layers and is trained to
     produce the teacher's hidden state at the group output, loss = normalised MSE
     ``||h_S - h_T||² / ||h_T - h_in||²`` averaged over pairs. All pairs train in one pass (they are
     independent). For the first ``align.mixer_only_fraction`` of the steps only the SSM mixers train;
     then the whole pair (norms, mixer, router, experts; the MoE aux loss joins then).
  4. Measure again; write ``<out_dir>/align_report.json`` and the student to ``<out_dir>/student``.
* **kl**, **sft**: stages 2 and 3 (not in this version; asking for them fails before anything runs).

Packed rows are fed as one sequence to both teacher and student (the teacher cannot reset at document
boundaries, so the student does not either during alignment: both see the same context).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aetheris.config import AetherisConfig
from aetheris.config_io import ConfigError, apply_overrides, build, load_yaml
from aetheris.teacher import DEFAULT_TEACHER, DTYPES
from aetheris.train import DataConfig, RunConfig, TokenizerConfig, TrainConfig

STAGES = ("align", "kl", "sft")
NOT_YET = {"kl": "stage 2 (KL distillation)", "sft": "stage 3 (SFT)"}

# Student settings that make the transferred mixer exactly linear attention (see transfer.py).
EXACT_TRANSFER = {"gate": "sigmoid", "xbc_activation": "identity", "ssm_norm": False}


@dataclass
class TeacherConfig:
    name: str = DEFAULT_TEACHER
    """Hub id or local folder of the teacher (config.json + weights + tokenizer)."""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16 | float64."""


@dataclass
class StudentConfig:
    n_pairs: int | None = None
    """(SSM, MoE) pairs; unset: teacher layers / 3 (12 for Tiny Aya's 36), or 1:1."""
    parallel_pairs: bool = False
    """Each pair reads one normalised input, mirroring Cohere2's parallel block."""
    init_layer: str = "last"
    """Which teacher layer of a group initialises its pair: last | first."""
    options: dict = field(default_factory=lambda: dict(EXACT_TRANSFER))
    """Other AetherisConfig fields (n_experts, top_k, gate, chunk_size, gradient_checkpointing, ...);
    the fields that follow the teacher (width, heads, vocab, norm, ...) cannot be set here."""


@dataclass
class TransferConfig:
    dt_init: str = "mamba2"
    """mamba2 (log-uniform dt, A in [1, 16]) | span (A = -1, dt from each layer's attention span)."""
    expert_noise: float = 0.0
    """Each upcycled expert gets noise * std(w) * N(0, 1) added so the experts can diverge."""
    router_std: float = 1e-3
    seed: int = 0


@dataclass
class AlignConfig:
    mixer_only_fraction: float = 0.5
    """Fraction of train.max_steps that trains the SSM mixers only, before whole pairs train."""
    report_rows_per_language: int = 2
    """Held-out rows per language for the KL and per-layer report (0 = all validation rows)."""


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Unset name: the teacher's own tokenizer (distillation needs the teacher's vocabulary)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/align", lr=1e-3))

    def __post_init__(self):
        if not 0.0 <= self.align.mixer_only_fraction <= 1.0:
            raise ConfigError(f"align.mixer_only_fraction={self.align.mixer_only_fraction} must be in [0, 1]")
        if self.student.init_layer not in ("last", "first"):
            raise ConfigError(f"student.init_layer={self.student.init_layer!r}: choose last or first")
        if self.transfer.dt_init not in ("mamba2", "span"):
            raise ConfigError(f"transfer.dt_init={self.transfer.dt_init!r}: choose mamba2 or span")
        if self.teacher.dtype != "auto" and self.teacher.dtype not in DTYPES:
            raise ConfigError(f"teacher.dtype={self.teacher.dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        fields = {f.name for f in dataclasses.fields(AetherisConfig) if f.init}
        for key in self.student.options:
            if key not in fields:
                import difflib
                near = difflib.get_close_matches(key, sorted(fields), n=1)
                raise ConfigError(f"student.options.{key} is not an AetherisConfig field"
                                  + (f"; did you mean {near[0]!r}?" if near else ""))
        RunConfig(model=AetherisConfig(), tokenizer=self.tokenizer, data=self.data, train=self.train)  # loop checks


def load_distill_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """A distillation config from YAML plus ``key.sub=value`` overrides (``student.options.top_k=2`` too)."""
    import yaml

    raw = load_yaml(path) if path is not None else {}
    prefix = "student.options."
    raw = apply_overrides(raw, [o for o in overrides if not o.startswith(prefix)], DistillConfig)
    for item in (o for o in overrides if o.startswith(prefix)):  # free-form dict: checked in __post_init__
        key, _, text = item.partition("=")
        student = raw.setdefault("student", {}) or {}
        raw["student"] = student
        options = student.get("options")
        student["options"] = dict(EXACT_TRANSFER if options is None else options)
        student["options"][key[len(prefix):].strip()] = yaml.safe_load(text) if text.strip() else None
    return build(DistillConfig, raw)


def parse_stages(text: str) -> list[str]:
    """``"align,kl"`` -> ["align", "kl"]; unknown or not-yet-built stages fail here, before any work."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise ValueError(f"--stages is empty; choose a comma list over {', '.join(STAGES)}")
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r} in --stages; choose from {', '.join(STAGES)}")
        if s in NOT_YET:
            raise NotImplementedError(f"{NOT_YET[s]} ('{s}') is not implemented yet in this version; "
                                      "run --stages align")
    return stages


# ----------------------------------------------------------------------------------------------
# Pair forward, loss and measurements


def pair_forward(student, k: int, h: Tensor) -> tuple[Tensor, Tensor]:
    """Student pair k on a residual stream h (B, T, D) -> (h after the pair, MoE aux loss).

    Honours ``gradient_checkpointing`` as the model's own forward does (one checkpoint per layer).
    """
    from torch.utils.checkpoint import checkpoint

    def call(layer, h):
        if student.cfg.gradient_checkpointing and student.training and torch.is_grad_enabled():
            return checkpoint(layer, h, None, None, use_reentrant=False)
        return layer(h, None, None)

    if student.cfg.parallel_pairs:
        h, aux, _ = call(student.layers[k], h)
        return h, aux
    h, _, _ = call(student.layers[2 * k], h)
    h, aux, _ = call(student.layers[2 * k + 1], h)
    return h, aux


def mixer_parameters(student) -> list[torch.nn.Parameter]:
    from aetheris.model import SSMMixer
    return [p for m in student.modules() if isinstance(m, SSMMixer) for p in m.parameters()]


def normalised_mse(out: Tensor, target: Tensor, h_in: Tensor) -> Tensor:
    """||out - target||² / ||target - h_in||²: the error relative to the size of the teacher's update."""
    out, target, h_in = out.float(), target.float(), h_in.float()
    return (out - target).square().sum() / (target - h_in).square().sum().clamp_min(1e-12)


def make_align_loss(teacher, pairs, mixer_only_steps: int, progress: dict):
    """The loss_fn for ``train.train``: layer-local, teacher-forced normalised MSE over all pairs."""
    from aetheris.teacher import hidden_states

    def align_loss(model, batch: dict) -> tuple[Tensor, dict]:
        student = getattr(model, "module", model)
        mixer_only = progress["step"] < mixer_only_steps
        mixer_ids = {id(p) for p in mixer_parameters(student)}
        for p in student.parameters():  # frozen parts keep grad None, so AdamW leaves them untouched
            p.requires_grad_(not mixer_only or id(p) in mixer_ids)
        states = hidden_states(teacher, batch["input_ids"])
        dtype = next(student.parameters()).dtype
        losses, aux = [], torch.zeros((), device=batch["input_ids"].device)
        for pm in pairs:
            h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
            out, pair_aux = pair_forward(student, pm.pair, h_in)
            losses.append(normalised_mse(out, target, h_in))
            aux = aux + pair_aux
        per_pair = torch.stack(losses)
        loss = per_pair.mean() + (0 if mixer_only else aux)
        return loss, {"nmse": per_pair.mean().detach(), "aux": aux.detach(), "pair_nmse": per_pair.detach(),
                      "mixer_only": torch.tensor(float(mixer_only))}

    return align_loss


def report_rows(val: dict[str, dict], per_language: int) -> dict[str, Tensor]:
    """Held-out rows per language (the first ``per_language``; 0 = all) as (n, T) long tensors."""
    import numpy as np
    out = {}
    for lang, rows in sorted(val.items()):
        ids = np.asarray(rows["input_ids"])
        out[lang] = torch.as_tensor(ids[:per_language] if per_language else ids, dtype=torch.long)
    return out


@torch.no_grad()
def heldout_kl(teacher, student, rows: dict[str, Tensor], pad_id: int | None = None, batch_size: int = 1,
               chunk: int = 256) -> dict:
    """Per-token KL(p_teacher || p_student) in nats: mean over every (non-pad) position, per language and overall.

    Same formula as ``tasks.perplexity.kl_per_sequence`` (which works on evaluation adapters, not raw rows).
    With a 262k vocabulary one position's fp32 distribution is 1 MiB, so the softmaxes run ``chunk``
    positions at a time.
    """
    device = next(student.parameters()).device
    per_lang, total, count = {}, 0.0, 0
    for lang, ids in rows.items():
        s, n = 0.0, 0
        for start in range(0, len(ids), batch_size):
            x = ids[start:start + batch_size].to(device)
            t_logits, s_logits = teacher(input_ids=x).logits, student(x).logits     # (B, T, V)
            for c in range(0, x.shape[1], chunk):
                t = torch.log_softmax(t_logits[:, c:c + chunk].float(), -1)
                q = torch.log_softmax(s_logits[:, c:c + chunk].float(), -1)
                kl = (t.exp() * (t - q)).sum(-1)                                  # (B, chunk)
                xs = x[:, c:c + chunk]
                mask = torch.ones_like(kl, dtype=torch.bool) if pad_id is None else xs != pad_id
                s, n = s + float(kl[mask].sum()), n + int(mask.sum())
        per_lang[lang] = s / max(n, 1)
        total, count = total + s, count + n
    return {"mean": total / max(count, 1), "per_language": per_lang, "tokens": count}


@torch.no_grad()
def pair_report(teacher, student, pairs, rows: dict[str, Tensor], batch_size: int = 8) -> list[dict]:
    """Per pair: relative error and cosine similarity of the student's residual update (out - in) against
    the teacher group's, teacher-forced, plus the normalised MSE the alignment minimises."""
    from aetheris.teacher import hidden_states

    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    acc = [{"err": 0.0, "ref": 0.0, "cos": 0.0, "n": 0} for _ in pairs]
    for ids in rows.values():
        for start in range(0, len(ids), batch_size):
            x = ids[start:start + batch_size].to(device)
            states = hidden_states(teacher, x)
            for a, pm in zip(acc, pairs):
                h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
                out, _ = pair_forward(student, pm.pair, h_in)
                ds, dt = (out - h_in).float(), (target - h_in).float()
                a["err"] += float((ds - dt).square().sum())
                a["ref"] += float(dt.square().sum())
                a["cos"] += float(torch.nn.functional.cosine_similarity(ds, dt, dim=-1).sum())
                a["n"] += ds.shape[0] * ds.shape[1]
    return [{"pair": pm.pair, "teacher_layers": [pm.first, pm.last], "init_layer": pm.init,
             "relative_error": math.sqrt(a["err"] / max(a["ref"], 1e-30)), "nmse": a["err"] / max(a["ref"], 1e-30),
             "cosine": a["cos"] / max(a["n"], 1)} for a, pm in zip(acc, pairs)]


# ----------------------------------------------------------------------------------------------
# Stage 1


def _resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def build_student(cfg: DistillConfig, teacher_config) -> tuple[AetherisConfig, list]:
    """The student config and layer map from the teacher; incompatible settings fail here with field names."""
    from aetheris.transfer import check_compatible, layer_map, student_config

    scfg = student_config(teacher_config, n_pairs=cfg.student.n_pairs, parallel_pairs=cfg.student.parallel_pairs,
                          max_seq_len=max(cfg.data.seq_len, int(getattr(teacher_config, "max_position_embeddings", 0) or 0)),
                          **cfg.student.options)
    pairs = layer_map(teacher_config.num_hidden_layers, scfg.n_layer // 2, cfg.student.init_layer)
    check_compatible(teacher_config, scfg, pairs)
    return scfg, pairs


def run_align(cfg: DistillConfig, *, teacher=None, resume=None, log=print) -> dict:
    """Stage 1 end to end; returns the report (also written to ``<out_dir>/align_report.json``)."""
    from aetheris.checkpoint import save_model
    from aetheris.model import Aetheris
    from aetheris.teacher import load_teacher
    from aetheris.tokenizer import load_tokenizer
    from aetheris.train import build_data, find_resume_checkpoint, train
    from aetheris.transfer import transfer

    out_dir = Path(cfg.train.out_dir)
    # Under torchrun / accelerate launch every process measures on its own GPU; only rank 0 writes files.
    local_rank, main_process = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("RANK", 0)) == 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    # 1. Teacher, student config (fails before any data or weights are touched), tokenizer, data.
    if teacher is None:
        from aetheris.teacher import load_teacher_config
        load_teacher_config(cfg.teacher.name)  # architecture check before reading weights
        teacher = load_teacher(cfg.teacher.name, dtype=_resolve_dtype(cfg.teacher.dtype))
    scfg, pairs = build_student(cfg, teacher.config)
    tokenizer = load_tokenizer(cfg.tokenizer.name or cfg.teacher.name)
    if len(tokenizer) > scfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is {scfg.vocab_size}: "
                         "use the teacher's own tokenizer (leave tokenizer.name unset)")
    run_cfg = RunConfig(model=scfg, tokenizer=cfg.tokenizer, data=cfg.data, train=cfg.train)
    data, tokenizer = build_data(run_cfg, lambda _docs: tokenizer, log)
    rows = report_rows(data.val, cfg.align.report_rows_per_language)
    pad_id = None if cfg.data.pack else tokenizer.pad_token_id

    # 2. Transfer, and the two reference points: random init vs right after transfer.
    torch.manual_seed(cfg.transfer.seed)
    random_student = Aetheris(scfg)
    student = Aetheris(scfg)
    sources = transfer(teacher, student, pairs, dt_init=cfg.transfer.dt_init, expert_noise=cfg.transfer.expert_noise,
                       router_std=cfg.transfer.router_std, seed=cfg.transfer.seed)
    teacher.to(device)
    report: dict[str, Any] = {"teacher": cfg.teacher.name, "student_config": scfg.to_dict(),
                              "layer_map": [dataclasses.asdict(p) for p in pairs],
                              "heldout_rows": {k: len(v) for k, v in rows.items()}}
    report["kl_random_init"] = heldout_kl(teacher, random_student.to(device).eval(), rows, pad_id)
    del random_student
    student.to(device).eval()
    report["kl_after_transfer"] = heldout_kl(teacher, student, rows, pad_id)
    report["layers_after_transfer"] = pair_report(teacher, student, pairs, rows)
    log(f"KL(teacher||student) on held-out text: random init {report['kl_random_init']['mean']:.4f}, "
        f"after transfer {report['kl_after_transfer']['mean']:.4f} nats/token")

    # 3. Layer-local alignment through the shared loop.
    start_step = 0
    if resume:
        ckpt = find_resume_checkpoint(out_dir / "checkpoints", log) if resume in (True, "latest") else Path(resume)
        if ckpt is not None:
            start_step = json.loads((Path(ckpt) / "state.json").read_text())["step"]
    progress = {"step": start_step}
    mixer_only_steps = round(cfg.align.mixer_only_fraction * cfg.train.max_steps)
    loss_fn = make_align_loss(teacher, pairs, mixer_only_steps, progress)
    result = train(run_cfg, loss_fn=loss_fn, model=student, tokenizer=tokenizer, data=data,
                   frozen={"teacher": teacher}, resume=resume,
                   hooks=[lambda record: progress.__setitem__("step", record["step"])])
    student = result.model
    for p in student.parameters():
        p.requires_grad_(True)

    # 4. After alignment.
    student.eval()
    report["kl_after_align"] = heldout_kl(teacher, student, rows, pad_id)
    report["layers_after_align"] = pair_report(teacher, student, pairs, rows)
    report["steps"] = result.step
    report["mixer_only_steps"] = mixer_only_steps
    report["transfer_map"] = sources
    log(f"after alignment: KL {report['kl_after_align']['mean']:.4f} nats/token; per pair relative error "
        + ", ".join(f"{b['relative_error']:.3f}->{a['relative_error']:.3f}"
                    for b, a in zip(report["layers_after_transfer"], report["layers_after_align"])))
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "align_report.json").write_text(json.dumps(report, indent=1, default=str))
        save_model(student.cpu(), out_dir / "student", tokenizer=tokenizer)
    return report


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML distillation config (see configs/*-align.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")
    parser.add_argument("--stages", default="align", help=f"comma list over {', '.join(STAGES)} (default: align)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue alignment from the newest good checkpoint in train.out_dir, or from CHECKPOINT")


def run(args) -> int:
    try:
        stages = parse_stages(args.stages)
    except NotImplementedError as err:
        print(f"aetheris distill: {err}", file=sys.stderr)
        return 2
    cfg = load_distill_config(args.config, args.overrides)
    for stage in stages:
        if stage == "align":
            report = run_align(cfg, resume=args.resume)
            print(f"stage 1 report: {Path(cfg.train.out_dir) / 'align_report.json'} "
                  f"(KL random {report['kl_random_init']['mean']:.4f} / transfer {report['kl_after_transfer']['mean']:.4f}"
                  f" / aligned {report['kl_after_align']['mean']:.4f}); student: {Path(cfg.train.out_dir) / 'student'}")
    return 0
