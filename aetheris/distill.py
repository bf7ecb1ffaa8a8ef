"""Distillation of a teacher transformer into an Aetheris student: ``aetheris distill``.

    aetheris distill --config configs/nano-distill.yaml [--stages align,kl,sft] [key.sub=value ...] [--resume]

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
     independent), inside the forward of ``PairAligner`` (the module the loop DDP-wraps). For the first
     ``align.mixer_only_fraction`` of the steps only the SSM mixers train; then the whole pair (norms,
     mixer, router, experts; the MoE aux loss joins then).
  4. Measure again; write ``<out_dir>/align_report.json`` and the student to ``<out_dir>/student``.
* **kl** (stage 2): all student parameters train on ``w_kl·τ²·KL(p_T || p_S) + w_ce·CE + MoE aux``, a
  per-token mean over valid positions (``losses.distill_loss``: sequence chunks, reverse KL / JSD options).
  Starts from the previous stage's student (``<run_dir>/align/student``, or ``kl.init``); reports held-out
  KL per language and per family before and after, and the equity score of the KL (variance of the family
  means) to ``kl_report.json``. Sampling can be balanced by language or by family (``data.temperature``,
  ``kl.balance``); ``kl.dro`` turns on group-DRO over language families (weights logged, identical on every
  process: the per-family KL is all-reduced before each exponentiated-gradient step, ``FamilyDRO``).
  With ``kl.cache=FOLDER`` stage 2 trains from an offline teacher cache (``aetheris.teacher_cache``: top-k
  log-probs per position) without loading the teacher; the loss is the top-k approximation of forward KL
  (exact at ``kl.cache_k`` = vocab). A folder that does not exist yet is written first from this config (the
  teacher runs once over exactly the rows the run will consume, then is dropped); an existing one must have
  been built from the same teacher, tokenizer, seq_len, data settings, k and temperature (else a clear error).
* **sft** (stage 3): chat-templated conversations (``aetheris.sft``: local JSONL and the generated
  multilingual tool-calling set, ``aetheris.toolgen``), loss on assistant tokens only: ``CE + β·KL`` to the
  teacher (β = ``sft.beta``; the teacher is not loaded when β = 0). Reports tool-call validity (parse,
  schema, name, exact, BFCL AST via ``tasks.toolcall.score_output``) on held-out *templates* before and after.

With ``run_dir`` set, the stages write to ``<run_dir>/align``, ``<run_dir>/kl`` and ``<run_dir>/sft`` (each:
checkpoints/, config.json, metrics.jsonl, ``<stage>_report.json``, ``student/``), and each stage starts
from the previous stage's ``student/``. A stage whose starting student is missing names the stage to run.

Documents packed into one row: stage 1 feeds the row as one sequence to both teacher and student (both see
the same context). Stages 2 and 3, and every held-out KL, keep them apart: the student resets its state at
each document (``doc_ids``) and the teacher attends within each document only (positions restart per document,
which transformers turns into a block-diagonal mask for the full and the sliding layers,
``teacher.teacher_logits``). A teacher that cannot do this is refused when ``data.pack`` is true
(``teacher.check_documents_kept_apart``). Padding counts in no loss and no MoE statistic (``attention_mask``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aetheris.config import AetherisConfig
from aetheris.config_io import ConfigError, apply_overrides, build, load_yaml
from aetheris.teacher import DEFAULT_TEACHER, DTYPES, check_documents_kept_apart
from aetheris.train import DataConfig, RunConfig, TokenizerConfig, TrainConfig

STAGES = ("align", "kl", "sft")

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
    options: dict = field(default_factory=lambda: dict(EXACT_TRANSFER), metadata={"keys": AetherisConfig})
    """Other AetherisConfig fields (n_experts, top_k, gate, chunk_size, gradient_checkpointing, ...), merged
    over the exact-transfer defaults (gate sigmoid, xbc_activation identity, ssm_norm false); the fields that
    follow the teacher (width, heads, vocab, norm, ...) cannot be set here."""


@dataclass
class TransferConfig:
    dt_init: str = "mamba2"
    """mamba2 (log-uniform dt, A in [1, 16]) | span (A = -1, dt from each layer's attention span)."""
    attention_scale: bool = True
    """C <- W_Q · head_dim^-1/2 (the teacher's attention scaling); false: C <- W_Q unscaled."""
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
    pairs_at_once: int = 0
    """0: every pair trains in one pass. k >= 1: the pairs train k at a time, one group after another, each
    group for the whole ``train.max_steps`` on the same batches (as if trained alone), the teacher's hidden
    states computed once per batch for the group. Only the group's pairs have gradients and AdamW moments,
    which is what lets stage 1 fit one GPU at Tiny Aya scale (``aetheris distill --plan``). Each group
    checkpoints to ``<out_dir>/pairs-FIRST-LAST``; ``--resume`` skips finished groups."""


@dataclass
class KLConfig:
    kind: str = "forward"
    """forward KL(p_T || p_S) | reverse KL(p_S || p_T) | jsd."""
    temperature: float = 1.0
    """Softens both distributions; the divergence is scaled by temperature²."""
    w_kl: float = 1.0
    w_ce: float = 0.0
    """Weight of the next-token cross-entropy on the data (0 = pure distillation)."""
    chunk: int = 256
    """Positions per fp32 softmax chunk (memory: chunk x vocab x 4 bytes, recomputed in backward)."""
    balance: str = "language"
    """Sampling: language (p_l ∝ n_l^(1/data.temperature)) | family (p_f ∝ n_f^(1/data.temperature), then
    proportional within the family)."""
    dro: bool = False
    """Group-DRO over language families: the loss weights families by q_f, q_f ∝ q_f·exp(dro_step·KL_f)."""
    dro_step: float = 0.1
    """Exponentiated-gradient step size of the DRO weights."""
    dro_ema: float = 0.0
    """0: plain group-DRO (each step's per-family KL, families in the step only). In (0, 1]: stabilised --
    per-family running means of the KL at this rate, and every family seen so far steps every step."""
    init: str | None = None
    """Student to start from; unset: ``<align out_dir>/student``."""
    report_rows_per_language: int = 2
    cache: str | None = None
    """Offline teacher cache folder: train from it without loading the teacher (top-k approximation of forward
    KL). Missing: written first from this config (teacher runs once); existing: checked against this config."""
    cache_k: int = 64
    """Top-k teacher log-probs kept per position (k = vocab size: the exact KL)."""
    cache_rows: int = 0
    """Training rows to cache; 0 = what kl.train consumes (max_steps x micro_batch_size x grad_accum x
    processes). A shorter cache is cycled over."""
    cache_dtype: str = "float16"
    """Storage of the cached log-probs: float16 | bfloat16 | float32 (exact)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/kl", lr=5e-5))


@dataclass
class SFTConfig:
    beta: float = 0.0
    """Weight of KL to the teacher on assistant tokens (0: CE only, and the teacher is not loaded)."""
    kind: str = "forward"
    temperature: float = 1.0
    chunk: int = 256
    sources: list = field(default_factory=lambda: [{"type": "toolgen"}])
    """Conversation sources: ``{type: toolgen, languages: all, per_language: 40, seed: 0}`` (generated
    tool-calling set, train templates), ``{type: jsonl, path: FILE, lang: xx}`` (conversations),
    ``{type: xsid, split: train|validation|test, per_language: N}`` (xSID via tasks.toolcall)."""
    seq_len: int = 512
    """Tokens per conversation row (longer conversations are cut; right padding is never trained)."""
    temperature_sampling: float = 1.0
    """Language sampling over conversations, as data.temperature."""
    eval_per_language: int = 2
    """Held-out (test-template) generated examples per language for the tool-call validity report."""
    eval_languages: Any = "all"
    eval_tools_offered: int = 3
    """Tool schemas offered per held-out example (the expected one among them)."""
    max_new_tokens: int = 96
    replay_every: int = 0
    """0 = off; k: every k-th step is a stage-2 batch instead (KL to the teacher on ``data`` rows, as in stage 2),
    so tuning on chat does not erase the languages. Loads the teacher. The report then has held-out KL before/after."""
    init: str | None = None
    """Student to start from; unset: ``<kl out_dir>/student``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/sft", lr=2e-5))


@dataclass
class DistillConfig:
    run_dir: str | None = None
    """One folder for the whole pipeline: stages write to run_dir/{align,kl,sft} (overrides each train.out_dir)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Unset name: the teacher's own tokenizer (distillation needs the teacher's vocabulary)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/align", lr=1e-3))
    """The alignment stage's loop settings (stage 1)."""
    kl: KLConfig = field(default_factory=KLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self):
        from aetheris.losses import KINDS
        if self.run_dir:
            for stage, t in (("align", self.train), ("kl", self.kl.train), ("sft", self.sft.train)):
                t.out_dir = str(Path(self.run_dir) / stage)
        for where, kind in (("kl.kind", self.kl.kind), ("sft.kind", self.sft.kind)):
            if kind not in KINDS:
                raise ConfigError(f"{where}={kind!r}: choose one of {', '.join(KINDS)}")
        if self.kl.balance not in ("language", "family"):
            raise ConfigError(f"kl.balance={self.kl.balance!r}: choose language or family")
        if self.kl.cache and self.kl.kind != "forward":
            raise ConfigError(f"kl.kind={self.kl.kind!r} with kl.cache: a top-k teacher cache supports forward KL only; "
                              "set kl.kind=forward or drop kl.cache (online distillation)")
        if self.kl.cache_k < 1 or self.kl.cache_rows < 0:
            raise ConfigError("kl.cache_k must be >= 1 and kl.cache_rows >= 0 (0 = what kl.train consumes)")
        if self.kl.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"kl.cache_dtype={self.kl.cache_dtype!r}: choose float16, bfloat16 or float32")
        if self.kl.temperature <= 0 or self.sft.temperature <= 0:
            raise ConfigError("kl.temperature and sft.temperature must be > 0")
        if not isinstance(self.align.pairs_at_once, int) or self.align.pairs_at_once < 0:
            raise ConfigError(f"align.pairs_at_once={self.align.pairs_at_once!r}: 0 trains every pair at once, "
                              "k >= 1 trains k pairs at a time")
        if not 0.0 <= self.align.mixer_only_fraction <= 1.0:
            raise ConfigError(f"align.mixer_only_fraction={self.align.mixer_only_fraction} must be in [0, 1]")
        if self.student.init_layer not in ("last", "first"):
            raise ConfigError(f"student.init_layer={self.student.init_layer!r}: choose last or first")
        if self.sft.replay_every < 0 or self.sft.replay_every == 1:
            raise ConfigError(f"sft.replay_every={self.sft.replay_every}: 0 turns replay off; k >= 2 makes every k-th "
                              "stage-3 step a stage-2 batch (1 would leave no SFT step)")
        if self.transfer.dt_init not in ("mamba2", "span"):
            raise ConfigError(f"transfer.dt_init={self.transfer.dt_init!r}: choose mamba2 or span")
        if self.teacher.dtype != "auto" and self.teacher.dtype not in DTYPES:
            raise ConfigError(f"teacher.dtype={self.teacher.dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        # A YAML `student.options:` mapping replaces the default dict as a whole; merge it over the defaults so
        # leaving a key out keeps the exact-transfer setting (a silu gate would kill the transferred mixers).
        self.student.options = {**EXACT_TRANSFER, **(self.student.options or {})}
        fields = {f.name for f in dataclasses.fields(AetherisConfig) if f.init}
        for key in self.student.options:
            if key not in fields:
                import difflib
                near = difflib.get_close_matches(key, sorted(fields), n=1)
                raise ConfigError(f"student.options.{key} is not an AetherisConfig field"
                                  + (f"; did you mean {near[0]!r}?" if near else ""))
        if self.student.options["gate"] != "sigmoid":
            raise ConfigError(f"student.options.gate={self.student.options['gate']!r}: the stage-1 transfer zeroes the "
                              "z rows, and silu(0) = 0 would make every transferred mixer output 0; set "
                              "student.options.gate=sigmoid (2·sigmoid(0) = 1 passes them through)")
        for t in (self.train, self.kl.train, self.sft.train):
            RunConfig(model=AetherisConfig(), tokenizer=self.tokenizer, data=self.data, train=t)  # loop checks


def load_distill_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """A distillation config from YAML plus ``key.sub=value`` overrides (``student.options.top_k=2`` too)."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides), DistillConfig)
    check_out_dirs(raw)
    return build(DistillConfig, raw)


def check_out_dirs(raw: dict) -> None:
    """``run_dir`` places every stage (``<run_dir>/align`` ...); a stage ``out_dir`` set beside it would be
    silently ignored, so the two together are an error unless they agree."""
    run_dir = raw.get("run_dir")
    if not run_dir:
        return
    for keys, stage in ((("train",), "align"), (("kl", "train"), "kl"), (("sft", "train"), "sft")):
        node = raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        out_dir = node.get("out_dir") if isinstance(node, dict) else None
        if out_dir is not None and Path(str(out_dir)) != Path(str(run_dir)) / stage:
            key = ".".join(keys) + ".out_dir"
            raise ConfigError(f"{key}={out_dir} conflicts with run_dir={run_dir} (which puts this stage in "
                              f"{Path(str(run_dir)) / stage}): drop {key}, or set run_dir=null to place each stage "
                              "with its own *.out_dir")


def parse_stages(text: str) -> list[str]:
    """``"align,kl"`` -> ["align", "kl"]; unknown stages fail here, before any work; stages run in pipeline order."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise ValueError(f"--stages is empty; choose a comma list over {', '.join(STAGES)}")
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r} in --stages; choose from {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"--stages {text!r} names a stage twice")
    return sorted(stages, key=STAGES.index)


# ----------------------------------------------------------------------------------------------
# Pair forward, loss and measurements


def pair_forward(student, k: int, h: Tensor, mixer_only: bool = False, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Student pair k on a residual stream h (B, T, D) -> (h after the pair, MoE aux loss).

    ``pad_mask`` (B, T) bool, True at real tokens: padding feeds nothing to the SSM and no MoE statistic.

    ``mixer_only``: the pair's parameters outside its SSM mixer take part detached, so no gradient reaches
    them (the function computed is the same). Honours ``gradient_checkpointing`` as the model's own forward
    does (one checkpoint per layer).
    """
    from torch.func import functional_call
    from torch.utils.checkpoint import checkpoint

    def call(layer, h):
        run = layer
        if mixer_only:
            keep = {id(p) for p in mixer_parameters(layer)}
            params = {name: p if id(p) in keep else p.detach() for name, p in layer.named_parameters()}
            run = lambda *args: functional_call(layer, params, args)  # noqa: E731
        if student.cfg.gradient_checkpointing and student.training and torch.is_grad_enabled():
            return checkpoint(run, h, None, pad_mask, use_reentrant=False)
        return run(h, None, pad_mask)

    if student.cfg.parallel_pairs:
        h, aux, _ = call(student.layers[k], h)
        return h, aux
    h, _, _ = call(student.layers[2 * k], h)
    h, aux, _ = call(student.layers[2 * k + 1], h)
    return h, aux


def pair_parameters(student, k: int) -> list[torch.nn.Parameter]:
    """The parameters of student pair k (its two layers, or its parallel pair)."""
    layers = [student.layers[k]] if student.cfg.parallel_pairs else [student.layers[2 * k], student.layers[2 * k + 1]]
    return [p for layer in layers for p in layer.parameters()]


def mixer_parameters(module) -> list[torch.nn.Parameter]:
    """The parameters of the SSM mixers inside ``module`` (the student, or one of its layers)."""
    from aetheris.model import SSMMixer
    return [p for m in module.modules() if isinstance(m, SSMMixer) for p in m.parameters()]


def normalised_mse(out: Tensor, target: Tensor, h_in: Tensor, mask: Tensor | None = None) -> Tensor:
    """||out - target||² / ||target - h_in||² over the positions where ``mask`` (B, T) is True (all when None):
    the error relative to the size of the teacher's update; padding counts in neither sum."""
    out, target, h_in = out.float(), target.float(), h_in.float()
    w = mask[..., None].float() if mask is not None else 1.0
    return ((out - target).square() * w).sum() / ((target - h_in).square() * w).sum().clamp_min(1e-12)


class PairAligner(torch.nn.Module):
    """Stage 1's training module: every student pair, teacher-forced, and the alignment loss, in ``forward``.

    The training loop prepares (DDP-wraps) this module rather than the bare student, because DDP
    all-reduces the gradients of the parameters used in the forward of the module it wraps: calling the
    student's layers from outside that forward would leave every rank with its own gradients. It holds
    the student (the parameters the optimizer updates and the loop checkpoints) and no teacher: the
    teacher's hidden states come in as input, so DDP never registers or broadcasts the teacher's weights.

    Which parameters train changes during the run: the SSM mixers only, then the whole pair; the
    embeddings and final norm never (the pair losses do not reach them). All parameters stay registered
    with ``requires_grad`` on, and the mixer-only phase uses the rest of each pair detached
    (``pair_forward``). Under several processes DDP must then be built with
    ``find_unused_parameters=True`` (see ``run_align``): it finds the parameters the step did not use,
    and a parameter unused on every rank keeps grad None, so AdamW skips it (no update, no weight decay,
    no optimizer state) exactly as in a single process. Toggling ``requires_grad`` instead breaks DDP:
    its gradient buckets are fixed when it is built, a bucket whose gradients never arrive is never
    reduced, and the next step fails; zeroed gradients would still let AdamW's weight decay shrink the
    "frozen" weights.
    """

    def __init__(self, student, pairs):
        super().__init__()
        self.student = student
        self.pairs = list(pairs)

    def forward(self, states: Sequence[Tensor], mixer_only: bool = False,
                pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher hidden states (``teacher.hidden_states``: L + 1 of (B, T, D)) -> (loss, per-pair
        normalised MSE (n_pairs,), MoE aux loss). The aux loss joins the loss in the whole-pair phase.
        ``pad_mask`` (B, T) bool: real tokens; padding counts in neither the MSE nor the MoE statistics."""
        dtype = self.student.embed.weight.dtype
        losses, aux = [], states[0].new_zeros((), dtype=torch.float32)
        for pm in self.pairs:
            h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
            out, pair_aux = pair_forward(self.student, pm.pair, h_in, mixer_only=mixer_only, pad_mask=pad_mask)
            losses.append(normalised_mse(out, target, h_in, pad_mask))
            aux = aux + pair_aux
        per_pair = torch.stack(losses)
        return per_pair.mean() + (0 if mixer_only else aux), per_pair, aux


def make_align_loss(teacher, mixer_only_steps: int, progress: dict):
    """The loss_fn for ``train.train`` with ``forward_module=PairAligner(...)``: the teacher's hidden states
    (no grad), then the (possibly DDP-wrapped) aligner. The first ``mixer_only_steps`` train the mixers only."""
    from aetheris.teacher import hidden_states

    def align_loss(aligner, batch: dict) -> tuple[Tensor, dict]:
        mixer_only = progress["step"] < mixer_only_steps
        with torch.no_grad():
            states = hidden_states(teacher, batch["input_ids"])
        pad_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        loss, per_pair, aux = aligner(states, mixer_only=mixer_only, pad_mask=pad_mask)
        return loss, {"nmse": per_pair.mean().detach(), "aux": aux.detach(), "pair_nmse": per_pair.detach(),
                      "mixer_only": torch.tensor(float(mixer_only))}

    return align_loss


def report_rows(val: dict[str, dict], per_language: int) -> dict[str, dict[str, Tensor]]:
    """Held-out rows per language (the first ``per_language``; 0 = all): {lang: {input_ids, labels, doc_ids,
    attention_mask}} as (n, T) long tensors (the fields the rows carry)."""
    import numpy as np
    out = {}
    for lang, rows in sorted(val.items()):
        n = per_language or len(rows["input_ids"])
        out[lang] = {key: torch.as_tensor(np.asarray(rows[key])[:n], dtype=torch.long)
                     for key in ("input_ids", "labels", "doc_ids", "attention_mask") if key in rows}
    return out


def _row_batches(rows: dict[str, Tensor], batch_size: int, device):
    """Batches of report rows on ``device``, with their valid positions (those whose next label is real)."""
    from aetheris.losses import valid_positions
    for start in range(0, len(rows["input_ids"]), batch_size):
        b = {key: v[start:start + batch_size].to(device) for key, v in rows.items()}
        labels = b.get("labels", b["input_ids"])
        yield b, valid_positions(labels)


@torch.no_grad()
def heldout_kl(teacher, student, rows: dict[str, dict[str, Tensor]], batch_size: int = 1, chunk: int = 256) -> dict:
    """Per-token KL(p_teacher || p_student) in nats: mean over every position whose next label is real (as the
    training loss counts them: no padding, no position that would predict the first token of the next
    document), per language and overall. Documents packed in a row are kept apart for both models.

    Same formula as ``tasks.perplexity.kl_per_sequence`` (which works on evaluation adapters, not raw rows).
    With a 262k vocabulary one position's fp32 distribution is 1 MiB, so the softmaxes run ``chunk``
    positions at a time.
    """
    from aetheris.losses import chunked_divergence
    from aetheris.teacher import teacher_logits

    device = next(student.parameters()).device
    per_lang, total, count = {}, 0.0, 0
    for lang, lang_rows in rows.items():
        s, n = 0.0, 0
        for b, mask in _row_batches(lang_rows, batch_size, device):
            x, doc_ids = b["input_ids"], b.get("doc_ids")
            t_logits = teacher_logits(teacher, x, doc_ids)
            s_logits = student(x, doc_ids=doc_ids, attention_mask=b.get("attention_mask")).logits     # (B, T, V)
            per_pos, m = chunked_divergence(t_logits, s_logits, mask, chunk=chunk)
            s, n = s + float(per_pos.sum()), n + int(m)
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
    for lang_rows in rows.values():
        for start in range(0, len(lang_rows["input_ids"]), batch_size):
            x = lang_rows["input_ids"][start:start + batch_size].to(device)
            real = lang_rows.get("attention_mask", torch.ones_like(lang_rows["input_ids"]))[start:start + batch_size]
            real = real.to(device).bool()                                      # padding counts nowhere
            states = hidden_states(teacher, x)
            for a, pm in zip(acc, pairs):
                h_in, target = states[pm.first].to(dtype), states[pm.last + 1].to(dtype)
                out, _ = pair_forward(student, pm.pair, h_in, pad_mask=real)
                ds, dt = (out - h_in).float()[real], (target - h_in).float()[real]  # (n_real, D)
                a["err"] += float((ds - dt).square().sum())
                a["ref"] += float(dt.square().sum())
                a["cos"] += float(torch.nn.functional.cosine_similarity(ds, dt, dim=-1).sum())
                a["n"] += ds.shape[0]
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


def run_align(cfg: DistillConfig, *, teacher=None, resume=None, log=print, overwrite: bool = False) -> dict:
    """Stage 1 end to end; returns the report (also written to ``<out_dir>/align_report.json``)."""
    from aetheris.checkpoint import save_model
    from aetheris.model import Aetheris
    from aetheris.teacher import load_teacher
    from aetheris.tokenizer import load_tokenizer
    from aetheris.train import build_data, find_resume_checkpoint, make_accelerator, train
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

    # 2. Transfer, and the two reference points: random init vs right after transfer.
    torch.manual_seed(cfg.transfer.seed)
    random_student = Aetheris(scfg)
    student = Aetheris(scfg)
    tc = cfg.transfer
    sources = transfer(teacher, student, pairs, dt_init=tc.dt_init, attention_scale=tc.attention_scale,
                       expert_noise=tc.expert_noise, router_std=tc.router_std, seed=tc.seed)
    teacher.to(device)
    report: dict[str, Any] = {"teacher": cfg.teacher.name, "student_config": scfg.to_dict(),
                              "layer_map": [dataclasses.asdict(p) for p in pairs],
                              "heldout_rows": {k: len(v) for k, v in rows.items()}}
    report["kl_random_init"] = heldout_kl(teacher, random_student.to(device).eval(), rows)
    del random_student
    student.to(device).eval()
    report["kl_after_transfer"] = heldout_kl(teacher, student, rows)
    report["layers_after_transfer"] = pair_report(teacher, student, pairs, rows)
    log(f"KL(teacher||student) on held-out text: random init {report['kl_random_init']['mean']:.4f}, "
        f"after transfer {report['kl_after_transfer']['mean']:.4f} nats/token")

    # 3. Layer-local alignment through the shared loop: all pairs at once, or k at a time.
    k = cfg.align.pairs_at_once or len(pairs)
    groups = [pairs[i:i + k] for i in range(0, len(pairs), k)]
    stream_start = json.loads(json.dumps(data.stream.state_dict()))  # every group starts from the same batches
    mixer_only_steps = round(cfg.align.mixer_only_fraction * cfg.train.max_steps)
    for group in groups:
        if len(groups) > 1:
            tcfg = dataclasses.replace(cfg.train, out_dir=str(out_dir / f"pairs-{group[0].pair:02d}-{group[-1].pair:02d}"))
            run_cfg = dataclasses.replace(run_cfg, train=tcfg)
            data.stream.load_state_dict(json.loads(json.dumps(stream_start)))
            # Parameters outside the group take no gradient, so AdamW keeps no state for them.
            live = {id(p) for pm in group for p in pair_parameters(student, pm.pair)}
            for p in student.parameters():
                p.requires_grad_(id(p) in live)
            log(f"stage 1: pairs {group[0].pair}-{group[-1].pair} of {len(pairs)} ({len(live)} tensors train)")
        group_dir = Path(run_cfg.train.out_dir)
        start_step = 0
        if resume:
            ckpt = find_resume_checkpoint(group_dir / "checkpoints", log) if resume in (True, "latest") else Path(resume)
            if ckpt is not None:
                start_step = json.loads((Path(ckpt) / "state.json").read_text())["step"]
        progress = {"step": start_step}
        loss_fn = make_align_loss(teacher, mixer_only_steps, progress)
        # The parameters a step trains change with the phase, and the embeddings never train here, so DDP
        # must look for unused parameters every step (see PairAligner).
        result = train(run_cfg, loss_fn=loss_fn, model=student, forward_module=PairAligner(student, group),
                       accelerator=make_accelerator(run_cfg.train, find_unused_parameters=True), tokenizer=tokenizer,
                       data=data, frozen={"teacher": teacher}, resume=resume, overwrite=overwrite,
                       hooks=[lambda record, progress=progress: progress.__setitem__("step", record["step"])])
        student = result.model
    student.requires_grad_(True)

    # 4. After alignment.
    student.eval()
    report["kl_after_align"] = heldout_kl(teacher, student, rows)
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
# Stages 2 and 3: shared pieces


def _device() -> tuple[torch.device, bool]:
    """This process's device and whether it writes files (rank 0), as in run_align."""
    local_rank, main_process = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("RANK", 0)) == 0
    return (torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")), main_process


def previous_student(cfg: DistillConfig, stage: str) -> Path:
    """The student a stage starts from; a missing one names the stage to run first."""
    if stage == "kl":
        path, prev = cfg.kl.init or Path(cfg.train.out_dir) / "student", "align"
    else:
        path, prev = cfg.sft.init or Path(cfg.kl.train.out_dir) / "student", "kl"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stage {stage!r} starts from the {prev} stage's student at {path}, which does not exist: "
                                f"run --stages {prev} first (or set {stage}.init=FOLDER to start from another student)")
    return path


def load_teacher_model(cfg: DistillConfig):
    from aetheris.teacher import load_teacher, load_teacher_config
    load_teacher_config(cfg.teacher.name)  # architecture check before reading weights
    return load_teacher(cfg.teacher.name, dtype=_resolve_dtype(cfg.teacher.dtype))


def check_same_vocabulary(teacher_config, student, tokenizer, student_dir: Path) -> None:
    """Logit distillation compares distributions token id by token id: one vocabulary, one tokenizer (DESIGN §9)."""
    from aetheris.tokenizer import load_tokenizer

    if teacher_config is not None and teacher_config.vocab_size != student.cfg.vocab_size:
        raise ValueError(f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size {student.cfg.vocab_size}: "
                         "logit distillation needs one vocabulary; start from a student built from this teacher (stage 1)")
    if len(tokenizer) > student.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab_size is {student.cfg.vocab_size}")
    if (student_dir / "tokenizer.json").is_file() or (student_dir / "tokenizer_config.json").is_file():
        saved = load_tokenizer(student_dir)
        if saved.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the tokenizer saved with the student in {student_dir} differs from the teacher's "
                             f"({cfg_name(tokenizer)}): teacher and student must see identical token ids")


def cfg_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "teacher tokenizer"


def family_balanced_probs(stream, temperature: float) -> "np.ndarray":
    """Language sampling probabilities balanced by family: p_f ∝ n_f^(1/temperature) over families, then
    proportional to size within a family (n = tokens, or a stream's stand-in weight)."""
    import numpy as np

    from aetheris.data import StreamingDocs, language_weights
    from aetheris.languages import group_of

    sizes = {lang: len(d) if isinstance(d, StreamingDocs) else sum(len(x) for x in d) for lang, d in stream.docs.items()}
    fam_sizes: dict[str, int] = {}
    for lang, n in sizes.items():
        fam_sizes[group_of(lang)] = fam_sizes.get(group_of(lang), 0) + n
    fam_w = language_weights(fam_sizes, temperature)
    probs = np.array([fam_w[group_of(lang)] * sizes[lang] / fam_sizes[group_of(lang)] for lang in stream.languages])
    return probs / probs.sum()


def family_summary(per_language: dict[str, float]) -> dict:
    """Per-family mean of a per-language KL and its equity score (DES: population variance of the family
    means; the teacher's KL to itself is 0, so the KL is the drop)."""
    from aetheris.equity import des, group_means

    fam = group_means(per_language, "family")
    worst = max(fam, key=fam.get) if fam else None
    return {"per_family": fam, "des": des(per_language, "family") if fam else float("nan"), "worst_family": worst,
            "max_min_gap": (max(fam.values()) - min(fam.values())) if fam else float("nan")}


class FamilyDRO:
    """Group-DRO weights over language families (the online algorithm of Sagawa et al. 2020, ICLR).

    The loss of a step weights each family's token-mean KL by ``q_f``. ``KL_f`` is the family's mean over
    the whole global batch: the loss reports per-family KL sums and token counts, and the training loop
    all-reduces every metric across micro-batches and processes before the hooks run, so every process
    takes the same step and holds identical weights (2 processes == 1 process with grad_accum 2). The
    weights used at step s therefore come from steps < s. Saved in checkpoints (``train(stateful=...)``).

    Two update rules, after each optimizer step:

    - ``ema=0`` (plain): ``q_f <- q_f·exp(step·KL_f)`` for the families present in the step, renormalised.
      Every update raises a present family's weight, so a family that is in most batches (a large one
      under proportional sampling) gains weight from being frequent, not from being worse, and a family
      seen in one small batch moves on one noisy estimate.
    - ``ema>0`` (stabilised): each present family updates its running mean ``m_f <- (1-ema)·m_f +
      ema·KL_f`` (its first observation sets it), then **every family seen so far** takes
      ``q_f <- q_f·exp(step·m_f)``, renormalised: each family moves once per step whether or not it was
      sampled, by a smoothed estimate of its KL, so the weights follow which families are worse.
    """

    def __init__(self, families: list[str], step: float, ema: float = 0.0):
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"kl.dro_ema={ema}: the running-mean rate must be in [0, 1] (0 = the plain update)")
        self.families, self.step, self.ema = list(families), step, ema
        self.q = torch.full((len(families),), 1.0 / len(families))
        self.mean = torch.zeros(len(families), dtype=torch.float64)   # running mean KL per family (ema > 0)
        self.seen = torch.zeros(len(families), dtype=torch.bool)

    def update(self, record: dict) -> None:
        """The exponentiated-gradient step from a training record (the hook ``train.train`` calls)."""
        sums = torch.tensor(record["family_kl_sum"], dtype=torch.float64)
        counts = torch.tensor(record["family_tokens"], dtype=torch.float64)
        present = counts > 0
        means = sums / counts.clamp_min(1e-12)
        if self.ema > 0:
            rate = torch.where(self.seen, torch.full_like(means, self.ema), torch.ones_like(means))
            self.mean = torch.where(present, (1 - rate) * self.mean + rate * means, self.mean)
            self.seen = self.seen | present
            means, present = self.mean, self.seen
        q = torch.where(present, self.q.double() * torch.exp(self.step * means), self.q.double())
        self.q = (q / q.sum()).float()

    def state_dict(self) -> dict:
        return {"q": self.q.tolist(), "families": self.families, "mean": self.mean.tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("families", self.families) != self.families:
            raise ValueError(f"the checkpoint's DRO families {state['families']} differ from this run's {self.families}")
        self.q = torch.tensor(state["q"], dtype=torch.float32)
        if "mean" in state:  # checkpoints written before the running means carry q only
            self.mean = torch.tensor(state["mean"], dtype=torch.float64)
            self.seen = torch.tensor(state["seen"], dtype=torch.bool)


def make_kd_loss(teacher, *, kind: str, temperature: float, chunk: int, w_kl: float, w_ce: float,
                 lang_family: Tensor | None = None, dro: FamilyDRO | None = None):
    """The loss_fn for ``train.train`` (stages 2 and 3): ``w_kl·τ²·KL + w_ce·CE + aux`` per valid token.

    ``model`` is the module ``train`` prepared with Accelerate (DDP under several processes); the student's
    forward goes through it so its gradients are all-reduced. The teacher runs under no_grad on the same token
    ids — or, when the batch carries a teacher cache's ``t_values``/``t_ids``/``t_tail``, the KL is the top-k
    approximation against the cache and no teacher is needed (``teacher`` may be None). ``dro`` (a
    ``FamilyDRO``) turns the KL mean into a ``q``-weighted mean of per-family KL means and reports the
    per-family KL sums and token counts its update reads. With neither teacher nor cache the loss is
    ``w_ce·CE + aux`` (SFT without a teacher).
    """
    from aetheris.losses import chunked_divergence, chunked_topk_divergence, per_group_mean, valid_positions
    from aetheris.teacher import teacher_logits

    def kd_loss(model, batch: dict) -> tuple[Tensor, dict]:
        x, labels, doc_ids = batch["input_ids"], batch["labels"], batch.get("doc_ids")
        # Packed documents are kept apart on both sides: the student resets its state at every document
        # (doc_ids), the teacher attends within each document only (``teacher.teacher_logits``).
        out = model(x, labels=labels, doc_ids=doc_ids, attention_mask=batch.get("attention_mask"))
        metrics = {"ce": out.ce_loss.detach(), "aux": out.aux_loss.detach()}
        loss = w_ce * out.ce_loss + out.aux_loss
        cached = "t_values" in batch
        if (teacher is None and not cached) or w_kl == 0:
            return loss, metrics
        mask = valid_positions(labels)
        if cached:
            per_pos, n = chunked_topk_divergence(batch["t_values"], batch["t_ids"], batch["t_tail"], out.logits, mask,
                                                 temperature, chunk)                              # (B, T)
        else:
            with torch.no_grad():
                t_logits = teacher_logits(teacher, x, doc_ids)
            per_pos, n = chunked_divergence(t_logits, out.logits, mask, kind, temperature, chunk)  # (B, T)
        kl = per_pos.sum() / n.clamp_min(1)
        metrics["kl"] = kl.detach()
        if dro is not None:
            fam = lang_family.to(x.device)[batch["lang_ids"]]
            means, counts = per_group_mean(per_pos, mask, fam, dro.q.numel())
            q = dro.q.to(x.device)
            w = q * (counts > 0)
            kl_used = (w / w.sum().clamp_min(1e-12) * means).sum()
            metrics.update(family_kl_sum=(means * counts).detach(), family_tokens=counts.detach(), dro_weights=q.clone())
        else:
            kl_used = kl
        loss = loss + w_kl * temperature ** 2 * kl_used
        return loss, metrics

    return kd_loss


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


def make_sft_loss(teacher, sc: "SFTConfig"):
    """Stage 3's loss_fn: ``CE + β·KL`` on assistant tokens; on replay batches, stage 2's KL on every token."""
    chat = make_kd_loss(teacher, kind=sc.kind, temperature=sc.temperature, chunk=sc.chunk, w_kl=sc.beta, w_ce=1.0)
    replay = make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=sc.chunk, w_kl=1.0, w_ce=0.0)

    def sft_loss(model, batch: dict) -> tuple[Tensor, dict]:
        if "replay" not in batch:
            return chat(model, batch)
        loss, metrics = replay(model, {k: v for k, v in batch.items() if k != "replay"})
        return loss, {"replay_kl": metrics["kl"], "aux": metrics["aux"]}  # its CE is not the SFT CE: not logged as ce

    return sft_loss


# ----------------------------------------------------------------------------------------------
# Stage 2


def cache_ready(cfg: DistillConfig) -> bool:
    """Stage 2 trains from an existing teacher cache (so the teacher need not be loaded)."""
    return bool(cfg.kl.cache) and (Path(cfg.kl.cache) / "cache.json").is_file()


def cache_source(cfg: DistillConfig, teacher_config, tokenizer) -> dict:
    """What a stage-2 teacher cache is built from; a cache is only used by a run whose settings match."""
    from aetheris.config_io import to_dict
    from aetheris.teacher_cache import vocab_hash

    name = cfg.teacher.name
    arch = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "logit_scale")
    return {"teacher": str(Path(name).resolve()) if Path(name).is_dir() else name,
            "teacher_config": {key: getattr(teacher_config, key, None) for key in arch},
            "teacher_dtype": str(_resolve_dtype(cfg.teacher.dtype)).removeprefix("torch."),
            "tokenizer_vocab": vocab_hash(tokenizer), "seq_len": cfg.data.seq_len, "data": to_dict(cfg.data),
            "balance": cfg.kl.balance, "seed": cfg.kl.train.seed,
            "documents": "kept apart"}  # caches written before the teacher kept packed documents apart are refused


@torch.no_grad()
def heldout_kl_cached(student, heldout: dict[str, dict[str, Tensor]], rows: dict[str, dict[str, Tensor]],
                      batch_size: int = 1, chunk: int = 256) -> dict:
    """``heldout_kl`` against a teacher cache's held-out rows: the top-k approximation of KL(teacher || student)
    (exact at k = V), over the same positions. ``rows`` are the run's own report rows (``report_rows``; their
    ids equal the cache's), which carry the labels and document ids."""
    from aetheris.losses import chunked_topk_divergence

    device = next(student.parameters()).device
    per_lang, total, count = {}, 0.0, 0
    for lang, cached in heldout.items():
        s, n = 0.0, 0
        for b, mask in _row_batches({**rows[lang], **cached}, batch_size, device):
            logits = student(b["input_ids"], doc_ids=b.get("doc_ids"), attention_mask=b.get("attention_mask")).logits
            per_pos, m = chunked_topk_divergence(b["t_values"], b["t_ids"], b["t_tail"], logits, mask, chunk=chunk)
            s, n = s + float(per_pos.sum()), n + int(m)
        per_lang[lang] = s / max(n, 1)
        total, count = total + s, count + n
    return {"mean": total / max(count, 1), "per_language": per_lang, "tokens": count}


def prepare_cache(cfg: DistillConfig, teacher, data, tokenizer, teacher_config, rows: dict[str, Tensor], log) -> dict:
    """Write ``kl.cache`` if it does not exist (every process its own shards), then check it against the run:
    recorded settings first, then the held-out rows themselves. Returns the cache's metadata."""
    from accelerate import PartialState

    from aetheris.teacher_cache import CacheMismatchError, check_cache, load_heldout, write_cache
    from aetheris.train import multi_process_cpu, rows_per_run

    kc = cfg.kl
    folder = Path(kc.cache)
    source = cache_source(cfg, teacher_config, tokenizer)
    state = PartialState(cpu=multi_process_cpu())  # the process group train() will reuse
    if not (folder / "cache.json").is_file():  # every process writes its share (write_cache waits for all)
        if teacher is None:
            teacher = load_teacher_model(cfg)
        n = kc.cache_rows or rows_per_run(kc.train, state.num_processes)
        log(f"stage 2: writing the teacher cache {folder} ({n} rows of {cfg.data.seq_len} tokens, top-{kc.cache_k}, "
            f"{kc.cache_dtype}, {state.num_processes} process(es)); later runs with this config reuse it without the teacher")
        device = _device()[0]
        teacher.to(device)
        write_cache(teacher, data.stream, folder, rows=n, k=kc.cache_k, temperature=kc.temperature,
                    dtype=kc.cache_dtype, batch_size=kc.train.micro_batch_size, source=source, heldout=rows,
                    tokenizer_hash=source["tokenizer_vocab"], log=log, rank=state.process_index,
                    world=state.num_processes, barrier=state.wait_for_everyone)
    k = min(kc.cache_k, teacher_config.vocab_size)
    meta = check_cache(folder, {"k": k, "temperature": kc.temperature, "dtype": kc.cache_dtype, **source})
    heldout = load_heldout(folder) or {}
    same = sorted(heldout) == sorted(rows) and all(torch.equal(heldout[lang]["input_ids"], rows[lang]["input_ids"])
                                                   for lang in rows)
    if not same:
        raise CacheMismatchError(f"the teacher cache {folder} holds other held-out rows than this run "
                                 f"(kl.report_rows_per_language={kc.report_rows_per_language}, data settings): point "
                                 "kl.cache at a new folder or delete this one to rebuild it")
    return meta


def run_kl(cfg: DistillConfig, *, teacher=None, resume=None, log=print, hooks=(), overwrite: bool = False) -> dict:
    """Stage 2 end to end; returns the report (also ``<kl out_dir>/kl_report.json``) and writes the student.

    With ``kl.cache`` the teacher is only loaded (here, if not passed) when the cache must be written first.
    """
    from aetheris.checkpoint import load_model, save_model
    from aetheris.languages import group_of
    from aetheris.teacher import load_teacher_config
    from aetheris.teacher_cache import CacheStream, load_heldout
    from aetheris.tokenizer import load_tokenizer
    from aetheris.train import TrainData, build_data, rows_per_run, train

    kc = cfg.kl
    out_dir = Path(kc.train.out_dir)
    device, main_process = _device()
    # 1. Starting student (checked before the teacher is read), teacher, one tokenizer, data.
    init = previous_student(cfg, "kl")
    if teacher is None and not kc.cache:
        teacher = load_teacher_model(cfg)
    teacher_config = teacher.config if teacher is not None else load_teacher_config(cfg.teacher.name)
    tokenizer = load_tokenizer(cfg.tokenizer.name or cfg.teacher.name)
    student = load_model(init)
    check_same_vocabulary(teacher_config, student, tokenizer, init)
    run_cfg = RunConfig(model=student.cfg, tokenizer=cfg.tokenizer, data=cfg.data, train=kc.train)
    data, tokenizer = build_data(run_cfg, lambda _docs: tokenizer, log)
    if kc.balance == "family":
        data.stream.probs = family_balanced_probs(data.stream, cfg.data.temperature)
    languages = data.stream.languages
    families = sorted({group_of(lang) for lang in languages})
    lang_family = torch.tensor([families.index(group_of(lang)) for lang in languages])
    dro = FamilyDRO(families, kc.dro_step, kc.dro_ema) if kc.dro else None
    rows = report_rows(data.val, kc.report_rows_per_language)
    if teacher is not None and cfg.data.pack:
        check_documents_kept_apart(teacher)  # packed rows: the teacher must score each document alone
    report: dict[str, Any] = {"teacher": cfg.teacher.name, "init": str(init), "kind": kc.kind,
                              "temperature": kc.temperature, "balance": kc.balance, "dro": kc.dro,
                              "sampling": dict(zip(languages, map(float, data.stream.probs)))}
    if kc.cache:  # the training rows come from the cache, in the order the stream drew them when it was written
        meta = prepare_cache(cfg, teacher, data, tokenizer, teacher_config, rows, log)
        data = TrainData(CacheStream(kc.cache), data.val, data.malformed)
        needed = rows_per_run(kc.train, int(os.environ.get("WORLD_SIZE", "1")))
        log(f"stage 2: training from the teacher cache {kc.cache} (top-{meta['k']}, {meta['rows']} rows; this run "
            f"consumes {needed}" + (f", so it cycles over the cache {needed / meta['rows']:.1f} times)" if needed > meta["rows"] else ")"))
        heldout = load_heldout(kc.cache)
        teacher = None  # not needed any more: every teacher number comes from the cache
        report["cache"] = {"folder": str(kc.cache), "k": meta["k"], "rows": meta["rows"], "dtype": meta["dtype"],
                           "kl_measure": "top-k approximation (exact at k = vocab size)"}

        def measure(student):
            return heldout_kl_cached(student, heldout, rows, chunk=kc.chunk)
    else:
        def measure(student):
            return heldout_kl(teacher, student, rows, chunk=kc.chunk)

    # 2. Before: the previous stage's student against the teacher on held-out text.
    if teacher is not None:
        teacher.to(device)
    student.to(device).eval()
    report["kl_before"] = measure(student)
    report["equity_before"] = family_summary(report["kl_before"]["per_language"])

    # 3. Train every parameter through the shared loop.
    loss_fn = make_kd_loss(teacher, kind=kc.kind, temperature=kc.temperature, chunk=kc.chunk, w_kl=kc.w_kl,
                           w_ce=kc.w_ce, lang_family=lang_family, dro=dro)
    result = train(run_cfg, loss_fn=loss_fn, model=student, tokenizer=tokenizer, data=data,
                   frozen={"teacher": teacher} if teacher is not None else None, resume=resume, overwrite=overwrite,
                   hooks=[dro.update, *hooks] if dro is not None else hooks,
                   stateful={"dro": dro} if dro is not None else None)
    student = result.model.eval()

    # 4. After, per language and per family; the student for stage 3.
    report["kl_after"] = measure(student)
    report["equity_after"] = family_summary(report["kl_after"]["per_language"])
    report["steps"] = result.step
    if dro is not None:
        report["dro_weights"] = dict(zip(families, map(float, dro.q)))
        report["dro_weights_rank_spread"] = _rank_spread(dro.q)
    log(f"stage 2: held-out KL(teacher||student) {report['kl_before']['mean']:.4f} -> {report['kl_after']['mean']:.4f} "
        f"nats/token; family DES {report['equity_before']['des']:.5f} -> {report['equity_after']['des']:.5f}")
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kl_report.json").write_text(json.dumps(report, indent=1, default=str))
        save_model(student.cpu(), out_dir / "student", tokenizer=tokenizer)
    return report


def _rank_spread(q: Tensor) -> float:
    """Largest difference of a tensor across processes (0 in one process): the DRO weights must agree."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, q.tolist())
    stacked = torch.tensor(everyone)
    return float((stacked.max(0).values - stacked.min(0).values).max())


# ----------------------------------------------------------------------------------------------
# Stage 3


def run_sft(cfg: DistillConfig, *, teacher=None, resume=None, log=print, overwrite: bool = False) -> dict:
    """Stage 3 end to end; returns the report (also ``<sft out_dir>/sft_report.json``) and writes the student."""
    from aetheris.chat import install_chat_template
    from aetheris.checkpoint import load_model, save_model
    from aetheris.sft import build_sft_data, toolcall_loss, toolcall_validity
    from aetheris.tokenizer import load_tokenizer
    from aetheris.toolgen import generate_examples
    from aetheris.train import train

    sc = cfg.sft
    out_dir = Path(sc.train.out_dir)
    device, main_process = _device()
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
    data = build_sft_data(sc.sources, tokenizer, sc.seq_len, temperature=sc.temperature_sampling,
                          seed=sc.train.seed, log=log)
    kl_rows = None
    if sc.replay_every:  # stage 2's data: replayed during training, and its held-out rows measure forgetting
        from aetheris.train import build_data
        lm_data, _ = build_data(run_cfg, lambda _docs: tokenizer, log)
        data = dataclasses.replace(data, stream=ReplayMix(data.stream, lm_data.stream, sc.replay_every))
        kl_rows = report_rows(lm_data.val, cfg.kl.report_rows_per_language)
    if kl_rows is not None and cfg.data.pack:
        check_documents_kept_apart(teacher)  # replayed stage-2 rows are packed
    held_out = generate_examples(sc.eval_languages, split="test", per_language=sc.eval_per_language, seed=sc.train.seed,
                                 tools_offered=sc.eval_tools_offered)
    # The held-out prompts (tool schemas + request) may be longer than the training rows; the guard grows to them.
    from aetheris.chat import render_messages
    from aetheris.sft import record_messages
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
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sft_report.json").write_text(json.dumps(report, indent=1, default=str))
        save_model(student.cpu(), out_dir / "student", tokenizer=tokenizer)
    return report


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML distillation config (see configs/*-align.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")
    parser.add_argument("--stages", default="align,kl,sft",
                        help=f"comma list over {', '.join(STAGES)}, run in pipeline order (default: all three)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue each stage from the newest good checkpoint in its out_dir, or (one stage) from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the stages over in out_dirs that hold another run's checkpoints (deletes them)")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory each stage needs per process (no weights are loaded) and exit")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes the plan assumes (default: WORLD_SIZE, else 1)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="memory per device, e.g. 80GB: a run (or --plan) whose plan exceeds it is refused")
    parser.add_argument("--plan-device", choices=("gpu", "cpu"), default="gpu",
                        help="device the plan assumes (teacher.dtype auto: bf16 on gpu, fp32 on cpu)")


def run(args) -> int:
    """Failures propagate to ``aetheris.cli`` (one line, documented exit code); all are checked before the teacher loads."""
    from aetheris.runs import claim_run_folder

    stages = parse_stages(args.stages)
    cfg = load_distill_config(args.config, args.overrides)
    if len(stages) > 1 and args.resume not in (None, "latest"):
        raise ValueError("--resume CHECKPOINT names one stage's checkpoint; run that stage alone "
                         "(or use --resume without a path)")
    if args.plan or args.gpu_memory:  # a plan that does not fit is a ValueError: one line, exit 2
        from aetheris.plan import check_fits, format_plan, parse_memory, plan_distill
        processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        plan = plan_distill(cfg, processes=processes, device=args.plan_device)
        if args.plan and int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(plan, stages))
        if memory is not None:
            check_fits(plan, memory, stages)
        if args.plan:
            return 0
    if stages[0] != "align":
        previous_student(cfg, stages[0])
    out_dirs = {"align": cfg.train.out_dir, "kl": cfg.kl.train.out_dir, "sft": cfg.sft.train.out_dir}
    for stage in stages:  # a stage must not fail on another run's folder after the teacher has loaded
        claim_run_folder(Path(out_dirs[stage]), resume=args.resume, overwrite=args.overwrite, dry_run=True)
    teacher = None
    for stage in stages:
        if stage == "align":
            teacher = load_teacher_model(cfg)  # loaded once, shared by the stages that follow
            report = run_align(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            print(f"stage 1 report: {Path(cfg.train.out_dir) / 'align_report.json'} "
                  f"(KL random {report['kl_random_init']['mean']:.4f} / transfer {report['kl_after_transfer']['mean']:.4f}"
                  f" / aligned {report['kl_after_align']['mean']:.4f}); student: {Path(cfg.train.out_dir) / 'student'}")
        elif stage == "kl":
            if not cfg.kl.cache:  # with a cache, run_kl loads the teacher only if the cache must be written
                teacher = teacher or load_teacher_model(cfg)
            report = run_kl(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            print(f"stage 2 report: {Path(cfg.kl.train.out_dir) / 'kl_report.json'} (held-out KL "
                  f"{report['kl_before']['mean']:.4f} -> {report['kl_after']['mean']:.4f}); "
                  f"student: {Path(cfg.kl.train.out_dir) / 'student'}")
        else:
            if cfg.sft.beta > 0:
                teacher = teacher or load_teacher_model(cfg)
            report = run_sft(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            b, a = report["toolcall_before"]["overall"], report["toolcall_after"]["overall"]
            print(f"stage 3 report: {Path(cfg.sft.train.out_dir) / 'sft_report.json'} (tool-call parse "
                  f"{b['parsed']:.3f} -> {a['parsed']:.3f}, name {b['name']:.3f} -> {a['name']:.3f}); "
                  f"student: {Path(cfg.sft.train.out_dir) / 'student'}")
    return 0
