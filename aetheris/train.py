"""The training loop: one explicit loop used to train from scratch and reused by the distillation stages.

    aetheris train --config configs/nano-scratch.yaml [key.sub=value ...] [--resume [CHECKPOINT]]

``train(cfg, ...)`` reads top to bottom:

1. Accelerator (plain ``python``, ``torchrun`` or ``accelerate launch``: DDP/FSDP come from Accelerate),
   seeds, tokenizer (pretrained by name/path, or a byte-level BPE trained on the training split).
2. Data: documents -> held-out split per language -> packed, language-balanced ``PackedStream``.
   Every rank builds the same stream and takes its own slice of each global batch, so the data a
   step sees does not depend on the number of processes (2 ranks == 1 rank with the same global batch).
3. Model, AdamW with the model's no-decay groups, the lr schedule (warmup + cosine or WSD), resume.
4. The loop: ``grad_accum`` micro-batches of ``loss_fn(model, batch) -> (loss, metrics)``, clipping,
   a non-finite check (stops the run, last good checkpoint intact), optimizer step, logging,
   validation loss per language, atomic checkpoints.

A distillation stage plugs in without subclassing: it passes its own ``loss_fn`` (closing over a
teacher), lists the teacher in ``frozen`` (moved to the device, eval mode, no grads), and may pass its
own ``data`` (any object with ``next_batch(n)``, ``state_dict()`` and ``load_state_dict()``). A stage
whose loss is not a plain ``model(...)`` call passes a ``forward_module`` wrapping the model, so the
module DDP wraps is the one whose forward runs (otherwise gradients are not all-reduced).

Checkpoint folder ``<out_dir>/checkpoints/step-0000100/``::

    model/           save_model(): config.json + model.safetensors + tokenizer files (HF-loadable)
    optimizer.pt     optimizer state + torch RNG states (tensors only: loaded with weights_only=True)
    state.json       step, tokens, data position, Python/numpy RNG, the run config
    manifest.json    size and sha256 of every file above, written last

It is written to a temporary folder and renamed into place (atomic on POSIX), so a kill mid-write
leaves only an ignored ``.tmp-*`` folder. Loading checks the manifest; a corrupt or partial
checkpoint is rejected with a message and resuming falls back to the newest good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aetheris import runs
from aetheris.config import AetherisConfig
from aetheris.config_io import ConfigError, apply_overrides, build, load_yaml, to_dict
from aetheris.data import (
    MalformedLog,
    PackedStream,
    load_documents,
    split_heldout,
    tokenize_documents,
    tokenize_until,
    validation_rows,
)
from aetheris.progress import progress_bar
from aetheris.runs import CKPT_PREFIX, Interrupted, list_checkpoints  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class TokenizerConfig:
    name: str | None = None
    """Pretrained tokenizer: hub id or local folder (the teacher's, for distillation). Unset: train a
    byte-level BPE of ``model.vocab_size`` tokens on the training split."""
    bpe_docs_per_language: int = 200
    """Documents per language the BPE is trained on (from the training split only)."""

    def __post_init__(self):
        _check(self, "bpe_docs_per_language", _is_int(self.bpe_docs_per_language) and self.bpe_docs_per_language >= 1,
               "a positive integer")


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: [{"type": "corpus"}])
    """Data sources (see ``aetheris.data.iter_source``): corpus | text | jsonl | parquet | hub."""
    languages: Any = "all"
    """``all`` or a list of language codes from the registry."""
    seq_len: int = 256
    """Tokens per training row."""
    pack: bool = True
    """Pack documents into full rows (with document boundaries); false = one document per row, padded."""
    temperature: float = 1.0
    """Language sampling: p_l ∝ n_l^(1/temperature); 1 = proportional, .inf = uniform."""
    val_fraction: float = 0.05
    """Fraction of documents held out (by document id, the same documents in every language)."""
    val_rows_per_language: int = 4
    """Validation rows (of seq_len tokens) per language; 0 = all held-out text."""
    streaming: bool = False
    """Read sources lazily per language (hub datasets, corpora too big for memory); languages are then
    sampled uniformly (sizes are unknown) and validation uses the first held-out documents."""
    max_document_chars: int = 1_000_000
    """Longer documents (records, lines) are skipped and counted with their ``file:line``: one runaway
    record (a minified blob, a file without newlines) must not take the run's memory and time."""

    def __post_init__(self):
        from aetheris.data import SOURCE_TYPES, resolve_languages

        if not isinstance(self.sources, list) or not all(isinstance(s, dict) for s in self.sources):
            raise ConfigError(f"sources={self.sources!r}: give a list of sources, e.g. [{{type: corpus}}]")
        for spec in self.sources:
            if spec.get("type") not in SOURCE_TYPES:
                raise ConfigError(f"sources: {spec} needs a type, one of {', '.join(SOURCE_TYPES)}")
        if not (self.languages == "all" or isinstance(self.languages, str)
                or (isinstance(self.languages, list) and all(isinstance(c, str) for c in self.languages))):
            raise ConfigError(f"languages={self.languages!r}: give 'all' or a list of language codes, e.g. [en, sw]")
        try:
            resolve_languages(self.languages)
        except ValueError as err:
            raise ConfigError(str(err).removeprefix("data.")) from None
        _check(self, "seq_len", _is_int(self.seq_len) and self.seq_len >= 2, "an integer >= 2")
        _check(self, "temperature", _is_num(self.temperature) and self.temperature > 0,
               "> 0 (1 = proportional, .inf = uniform)")
        _check(self, "val_fraction", _is_num(self.val_fraction) and 0 < self.val_fraction < 1, "in (0, 1)")
        _check(self, "val_rows_per_language", _is_int(self.val_rows_per_language) and self.val_rows_per_language >= 0,
               "an integer >= 0 (0 = all held-out text)")
        _check(self, "max_document_chars", _is_int(self.max_document_chars) and self.max_document_chars >= 1,
               "a positive integer")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    """Where checkpoints, logs and metrics.jsonl go."""
    seed: int = 0
    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Rows per process per forward pass; global batch = micro_batch_size x grad_accum x processes."""
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of ``lr``."""
    schedule: str = "cosine"
    """cosine (warmup + cosine decay) | wsd (warmup, stable, linear decay over ``decay_fraction``) | constant."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = no clipping (the norm is still logged)."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | no."""
    checkpoint_every: int = 500
    keep_last: int = 2
    """Checkpoints of this run kept on disk (older ones are deleted once a newer one is safely written)."""
    eval_every: int = 200
    log_every: int = 10
    tracker: str = "tensorboard"
    """Accelerate tracker (tensorboard, wandb, ...) or none."""
    progress: bool = True
    threads: int = 0
    """torch CPU threads per process; 0 = torch's default."""
    fsdp: bool = False
    """Shard weights, gradients and AdamW state over the processes (torch FSDP2 ``fully_shard``, one unit per
    layer) instead of replicating them (DDP). Checkpoints are gathered collectively into the usual full
    format, so they resume under any process count. Ignored in a single process."""

    def __post_init__(self):
        # Checked here, before any data or weights load, in the key's own words (not torch's, later).
        for name in ("max_steps", "micro_batch_size", "grad_accum", "checkpoint_every", "eval_every", "log_every", "keep_last"):
            _check(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "a positive integer")
        for name in ("warmup_steps", "threads", "seed"):
            _check(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        _check(self, "lr", _is_num(self.lr) and 0 < self.lr < math.inf, "a number > 0")
        _check(self, "min_lr_ratio", _is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _check(self, "decay_fraction", _is_num(self.decay_fraction) and 0 < self.decay_fraction <= 1, "in (0, 1]")
        _check(self, "weight_decay", _is_num(self.weight_decay) and 0 <= self.weight_decay < math.inf, "a number >= 0")
        for name in ("beta1", "beta2"):
            _check(self, name, _is_num(getattr(self, name)) and 0 <= getattr(self, name) < 1, "in [0, 1)")
        _check(self, "eps", _is_num(self.eps) and 0 < self.eps < math.inf, "a number > 0")
        _check(self, "grad_clip", _is_num(self.grad_clip) and 0 <= self.grad_clip < math.inf, "a number >= 0 (0 = no clipping)")
        _check(self, "out_dir", isinstance(self.out_dir, str) and self.out_dir.strip() != "", "a folder path")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule={self.schedule!r}: choose cosine, wsd or constant")
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: choose auto, bf16 or no")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _check(obj, name: str, ok: bool, want: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={getattr(obj, name)!r} must be {want}")


@dataclass
class RunConfig:
    model: AetherisConfig = field(default_factory=AetherisConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from YAML plus ``key.sub=value`` overrides; unknown keys name the nearest valid one."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides), RunConfig)
    return build(RunConfig, raw)


# ----------------------------------------------------------------------------------------------
# Schedule, loss


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    floor = t.lr * t.min_lr_ratio
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(t.decay_fraction * t.max_steps))  # WSD: stable, then linear decay
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return t.lr
    return t.lr + (floor - t.lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy + MoE aux loss: the from-scratch objective (and the loss_fn contract)."""
    out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], attention_mask=batch.get("attention_mask"))
    metrics = {"ce": out.ce_loss.detach(), "aux": out.aux_loss.detach()}
    if out.expert_load is not None:
        metrics["expert_load"] = out.expert_load.detach()
    return out.loss, metrics


@torch.no_grad()
def validation_loss(model, val: dict[str, dict], micro_batch_size: int, device) -> dict[str, float]:
    """Token-weighted mean cross-entropy per language on the held-out rows."""
    was_training = model.training
    model.eval()
    out = {}
    for lang, rows in val.items():
        total, count = 0.0, 0
        for start in range(0, len(rows["input_ids"]), micro_batch_size):
            batch = {k: torch.as_tensor(v[start:start + micro_batch_size], device=device) for k, v in rows.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            ce = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"]).ce_loss
            total, count = total + float(ce) * n, count + n
        out[lang] = total / max(count, 1)
    model.train(was_training)
    return out


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before the optimizer step."""

    exit_code = runs.EXIT_NONFINITE


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, state: dict, keep_last: int,
                    gathered: tuple[dict, dict] | None = None) -> Path:
    """Write ``root/step-XXXXXXX`` atomically (temp folder + rename); prune this run's older ones afterwards.

    ``gathered``: (model state, optimizer state by parameter name) already collected from every process of
    a sharded run (``gather_full_state``); written instead of ``model``'s and ``optimizer``'s own.
    A failed write (disk full, read-only, ...) removes its temp folder and raises ``RunIOError`` naming the
    cause; the checkpoints already on disk are untouched."""
    from aetheris.checkpoint import save_model

    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_model(model, tmp / "model", tokenizer=tokenizer, state_dict=gathered[0] if gathered else None)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        optim = {"optimizer": gathered[1], "keys": "names"} if gathered else {"optimizer": optimizer.state_dict()}
        torch.save({**optim, "rng": rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():  # a step re-saved after resuming from an older checkpoint, or
            runs.reject(final, f"replaced by step {step} of run {state.get('run_id')}")  # a file in the way
        os.replace(tmp, final)
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:  # an interrupt too: no partial folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception) or isinstance(err, runs.RunIOError) or not runs.looks_like_io(err):
            raise
        raise runs.write_failure(err, root, f"checkpoint {final.name}") from err
    runs.prune_checkpoints(root, state.get("run_id"), final, keep_last)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(folder: Path) -> dict:
    """The manifest of a checkpoint whose files are all present and intact; CheckpointError otherwise."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder (something replaced it with a file)")
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete: manifest.json is missing (the write never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder} has an unreadable manifest.json ({err})") from None
    for name, meta in files.items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, expected {meta['bytes']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its checksum")
    return manifest


def find_resume_checkpoint(root: Path, log: Callable[[str], None] = print, reject: bool = False) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; newer ones that do not are reported and skipped
    (``reject``: moved into ``root/rejected/``, never deleted). None when ``root`` holds no checkpoint at all;
    a CheckpointError when it holds some and none verifies (starting over would bury them)."""
    failed = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            failed.append((folder, err))
            continue
        for bad, err in failed:
            moved = f"; moved to {runs.reject(bad, str(err))}" if reject else ""
            log(f"warning: {err}{moved}; falling back to an older checkpoint")
        return folder
    if failed:
        raise CheckpointError(
            f"--resume found {len(failed)} checkpoint(s) under {root} and none verifies ("
            + "; ".join(str(err) for _, err in failed[:3]) + "). Nothing was changed: resume from a named good "
            "checkpoint (--resume PATH), repair or move them, or start over with --overwrite")
    return None


def check_resume_model(checkpoint: Path, model_cfg: AetherisConfig) -> None:
    """Refuse to resume into a model whose config differs from the checkpoint's, naming the keys that differ
    (instead of a tensor size mismatch later). Settings that change no weight (memory, kernels) may change."""
    from aetheris.checkpoint import read_config

    free = {"gradient_checkpointing", "scan_impl", "chunk_size", "max_seq_len", "bos_token_id", "eos_token_id", "pad_token_id"}
    saved, now = read_config(Path(checkpoint) / "model").to_dict(), model_cfg.to_dict()
    diff = [f"model.{k}: checkpoint {saved[k]!r}, this run {now[k]!r}" for k in saved if k not in free and saved[k] != now.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume from {checkpoint}: its model differs from this run's ({'; '.join(diff)}). "
                              "Resume with the checkpoint's model settings, or start a new run (--overwrite or another out_dir)")


def _restore_rng(rng: dict, state: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainData:
    """What the loop consumes: a resumable stream of rows and held-out rows per language."""

    stream: Any  # next_batch(n) -> dict of (n, T) arrays; state_dict(); load_state_dict()
    val: dict[str, dict]
    malformed: MalformedLog = field(default_factory=MalformedLog)


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    last_checkpoint: Path | None
    history: list[dict]  # one record per logged step
    val_history: list[dict]  # {"step": s, "loss": {lang: ce}}
    model: Any = None
    tokenizer: Any = None


def build_tokenizer(cfg: RunConfig, train_docs: dict | None, out_dir: Path, accelerator):
    """Pretrained by name/path, or a BPE trained on the training split (on the main process, shared via disk)."""
    from aetheris.tokenizer import load_tokenizer, train_bpe_tokenizer

    if cfg.tokenizer.name:
        tok = load_tokenizer(cfg.tokenizer.name)
    else:
        folder = out_dir / "tokenizer"
        if accelerator.is_main_process:
            n = cfg.tokenizer.bpe_docs_per_language
            texts = [d.text for lang in sorted(train_docs) for d in train_docs[lang][:n]]
            train_bpe_tokenizer(texts, cfg.model.vocab_size).save_pretrained(folder)
        accelerator.wait_for_everyone()
        tok = load_tokenizer(folder)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but model.vocab_size={cfg.model.vocab_size}: "
            f"set model.vocab_size={len(tok)} (or larger)"
        )
    return tok


def build_data(cfg: RunConfig, tokenizer_for: Callable[[dict], Any], log: Callable[[str], None] = print):
    """Load, split, tokenize and pack. ``tokenizer_for(train_docs)`` returns the tokenizer to use."""
    malformed = MalformedLog()
    if cfg.data.streaming:
        return _build_streaming_data(cfg, tokenizer_for, malformed)
    docs = load_documents(cfg.data.sources, cfg.data.languages, malformed, max_chars=cfg.data.max_document_chars)
    if malformed.total:
        log(malformed.summary())
    train_docs, val_docs = split_heldout(docs, cfg.data.val_fraction, seed=cfg.train.seed)
    tokenizer = tokenizer_for(train_docs)
    train_ids = {lang: tokenize_documents(d, tokenizer) for lang, d in train_docs.items()}
    val_tokens = cfg.data.val_rows_per_language * cfg.data.seq_len or None  # 0 rows = all held-out text
    val_ids = {lang: tokenize_until(d, tokenizer, val_tokens) for lang, d in val_docs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = PackedStream(train_ids, cfg.data.seq_len, temperature=cfg.data.temperature, seed=cfg.train.seed,
                          pack=cfg.data.pack, pad_id=pad)
    val = validation_rows(val_ids, cfg.data.seq_len, cfg.data.val_rows_per_language or None, pad_id=pad)
    return TrainData(stream, val, malformed), tokenizer


def _build_streaming_data(cfg: RunConfig, tokenizer_for, malformed: MalformedLog):
    from itertools import islice

    from aetheris.data import StreamingDocs, resolve_languages

    d = cfg.data
    streams = {lang: StreamingDocs(d.sources, lang, None, d.val_fraction, cfg.train.seed, malformed,
                                   max_chars=d.max_document_chars)
               for lang in resolve_languages(d.languages)}
    sample = {lang: list(islice(s._docs(), cfg.tokenizer.bpe_docs_per_language)) for lang, s in streams.items()}
    tokenizer = tokenizer_for(sample)
    for s in streams.values():
        s.tokenizer = tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    val_docs = {lang: s.heldout(max_docs=max(8, 4 * (d.val_rows_per_language or 8))) for lang, s in streams.items()}
    val_ids = {lang: tokenize_until(v, tokenizer, d.val_rows_per_language * d.seq_len or None) for lang, v in val_docs.items() if v}
    stream = PackedStream(streams, d.seq_len, temperature=d.temperature, seed=cfg.train.seed, pack=d.pack, pad_id=pad)
    val = validation_rows(val_ids, d.seq_len, d.val_rows_per_language or None, pad_id=pad)
    return TrainData(stream, val, malformed), tokenizer


def multi_process_cpu() -> bool:
    """Launched with several processes and no GPU: Accelerate only sets up gloo when told ``cpu=True``
    (on GPUs it picks nccl itself)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rows_per_run(t: TrainConfig, processes: int) -> int:
    """Training rows a run of ``t`` consumes over all its steps and processes."""
    return t.max_steps * t.micro_batch_size * t.grad_accum * processes


def open_run_folder(out_dir: Path, resume, overwrite: bool, accelerator, log: Callable[[str], None]) -> Path | None:
    """Claim ``out_dir`` for this run (``runs.claim_run_folder``: a fresh run refuses another run's checkpoints)
    and return the checkpoint to resume from. Decided on the main process, which alone moves rejected checkpoints
    aside, and shared with the other ranks (an error too, so every rank stops with the same message)."""
    decision: list = [None, None]  # (checkpoint, error)
    if accelerator.is_main_process:
        try:
            runs.check_writable(out_dir / "checkpoints")
            runs.claim_run_folder(out_dir, resume=resume, overwrite=overwrite, log=log)
            if resume is True or resume == "latest":
                decision[0] = find_resume_checkpoint(out_dir / "checkpoints", log=log, reject=True)
                if decision[0] is None:
                    log(f"no checkpoint under {out_dir / 'checkpoints'}: starting from scratch")
            elif resume:
                decision[0] = Path(resume)
                verify_checkpoint(decision[0])
        except (ValueError, OSError) as err:
            decision[1] = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(decision)
    if decision[1] is not None:
        raise decision[1]
    return decision[0]


def make_accelerator(t: TrainConfig, **ddp_options) -> Any:
    """The run's Accelerator: mixed precision and tracker from ``t``; ``ddp_options`` (e.g.
    ``find_unused_parameters=True``) go to DistributedDataParallel when the run has several processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    precision = t.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # Accelerate keeps one process-wide precision and refuses another; the stages of one `aetheris distill`
        # may each choose theirs. Forget the old setting only (the process group stays).
        AcceleratorState._reset_state()
    tracker = None if t.tracker in (None, "", "none") else t.tracker
    handlers = [DistributedDataParallelKwargs(**ddp_options)] if ddp_options else None
    return Accelerator(mixed_precision=precision, log_with=tracker, project_dir=str(Path(t.out_dir)), cpu=multi_process_cpu(),
                       kwargs_handlers=handlers)


# ----------------------------------------------------------------------------------------------
# Sharding (FSDP2)
#
# Accelerate turns FSDP on only for accelerators (on CPU it silently falls back to DDP), so the loop shards
# with torch's own ``fully_shard``: the same code on CPU (gloo) and GPU (nccl). Each layer is one unit
# (its weights are gathered for its forward and backward, then freed); the embeddings and final norm form
# the root unit. Checkpoints gather the full weights and optimizer state collectively (every process takes
# part, process 0 writes), so a checkpoint is the ordinary folder whatever the process count.


def shard_model(model, device) -> None:
    """Shard an ``Aetheris`` in place over the default process group: one FSDP unit per layer + the root."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.tag_no_weight_decay()  # sharding replaced the parameters (DTensors): tags must be set again


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of a sharded model, on process 0's CPU (empty elsewhere).
    Collective: every process must call it. Optimizer state is keyed by parameter name, not index."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, blob: dict, where: Path) -> None:
    """Restore optimizer state saved by index (``optimizer.state_dict()``) or by parameter name (a sharded run's
    gathered state: loads into a sharded or a plain model alike, so such a checkpoint resumes at any process count)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    if blob.get("keys") == "names":
        set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif is_sharded(model):
        raise CheckpointError(f"checkpoint {where} was written without train.fsdp (optimizer state by index): resume "
                              "it with train.fsdp=false, or start the sharded run afresh")
    else:
        optimizer.load_state_dict(blob["optimizer"])


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def unshard_model(model):
    """A plain (unsharded) copy of a sharded ``Aetheris`` with the full weights, on every process (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from aetheris.model import Aetheris

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        plain = Aetheris(model.cfg)
    plain.load_state_dict({k: v.detach().clone() for k, v in full.items()}, assign=True)
    plain.tag_no_weight_decay()
    return plain


def train(
    cfg: RunConfig,
    *,
    loss_fn: Callable[[Any, dict], tuple[torch.Tensor, dict]] = lm_loss,
    model=None,
    tokenizer=None,
    data: TrainData | None = None,
    frozen: dict[str, torch.nn.Module] | None = None,
    resume: str | Path | bool | None = None,
    hooks: Sequence[Callable[[dict], None]] = (),
    stateful: dict[str, Any] | None = None,
    accelerator=None,
    forward_module: torch.nn.Module | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` (default: a fresh ``Aetheris(cfg.model)``) and return what happened.

    ``resume``: True/"latest" = newest good checkpoint in ``out_dir`` (fresh start if there is none at all; an
    error if there are some and none verifies); a path = that checkpoint (an error if it is corrupt). Without
    ``resume``, an ``out_dir`` holding checkpoints is refused unless ``overwrite`` (which deletes them).
    SIGTERM / SIGINT stop the loop after the current step with a checkpoint (``runs.Interrupted``).
    ``hooks`` run after every optimizer step with a dict of the step's numbers (a stage may adjust weights
    there; a test may stop the run).
    ``forward_module``: a module holding ``model`` whose forward computes a stage's own loss (stage 1
    runs teacher-forced pairs); ``loss_fn`` then receives it instead of ``model``. Accelerate prepares
    (DDP-wraps) the module ``loss_fn`` calls, because DDP all-reduces gradients only through the forward
    of the module it wraps; ``model`` is still what is optimised, validated and checkpointed.
    ``accelerator``: one made by ``make_accelerator`` (e.g. with DDP options); default: one from ``cfg.train``.
    ``stateful``: named objects with ``state_dict()`` -> JSON-able dict and ``load_state_dict()`` (a loss's own
    state, e.g. stage 2's group-DRO weights), saved in every checkpoint's state.json and restored on resume.
    """
    from accelerate.utils import set_seed
    t = cfg.train
    out_dir = Path(t.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if t.threads:
        torch.set_num_threads(t.threads)

    # 1. Accelerator and seeds -------------------------------------------------------------------
    if accelerator is None:
        accelerator = make_accelerator(t)
    say = accelerator.print
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(t.seed)

    # The run folder is this run's, and which checkpoint (if any) to resume from: decided before building anything.
    start_ckpt = open_run_folder(out_dir, resume, overwrite, accelerator, say)
    if start_ckpt is not None and model is None:
        check_resume_model(start_ckpt, cfg.model)  # a changed model.d_model is named here, before the data loads

    # 2. Tokenizer and data ----------------------------------------------------------------------
    if tokenizer is None and start_ckpt is not None and not cfg.tokenizer.name:
        from aetheris.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(start_ckpt / "model")  # the run's own BPE, as saved
    if data is None:
        data, tokenizer = build_data(cfg, lambda docs: tokenizer or build_tokenizer(cfg, docs, out_dir, accelerator), say)
    elif tokenizer is None:
        tokenizer = build_tokenizer(cfg, None, out_dir, accelerator) if cfg.tokenizer.name else None

    # 3. Model, optimizer, resume ----------------------------------------------------------------
    if model is None:
        from aetheris.model import Aetheris
        mcfg = dataclasses.replace(cfg.model)
        if tokenizer is not None:
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(mcfg, name) is None:
                    setattr(mcfg, name, getattr(tokenizer, name))
        model = Aetheris(mcfg)
    step, tokens_seen = 0, 0
    history, val_history = [], []
    run_id = uuid.uuid4().hex[:12]  # marks this run's checkpoints: cleanup touches no other run's
    sharded = t.fsdp and world > 1
    if sharded and forward_module is not None:
        raise ConfigError("train.fsdp=true: this stage trains through its own forward module (stage 1's pairs), which "
                          "is not sharded; set train.fsdp=false (stage 1 fits one GPU with align.pairs_at_once=1)")
    if start_ckpt is not None:  # weights before sharding: the checkpoint holds them whole
        from aetheris.checkpoint import load_model
        check_resume_model(start_ckpt, model.cfg)
        saved = load_model(start_ckpt / "model")
        model.load_state_dict(saved.state_dict())
        del saved
    if sharded:
        shard_model(model, accelerator.device)
    # The fused AdamW step updates each tensor in one kernel: no temporaries (the per-tensor step holds two of
    # the largest tensor, 4 GiB for a 262k-vocabulary embedding). Sharded (DTensor) parameters keep the default.
    # A model without its own groups (the demo's transformers Cohere2 teacher) decays every trainable parameter.
    groups = model.param_groups(t.weight_decay) if hasattr(model, "param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=None if sharded else True)
    if start_ckpt is not None:
        blob = torch.load(start_ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        load_optimizer_state(model, optimizer, blob, start_ckpt)
        state = json.loads((start_ckpt / "state.json").read_text())
        step, tokens_seen = state["step"], state["tokens_seen"]
        run_id = state.get("run_id") or run_id
        val_history = state.get("val_history", [])
        data.stream.load_state_dict(state["data"])
        for name, obj in (stateful or {}).items():
            if name not in state.get("stateful", {}):
                raise CheckpointError(f"checkpoint {start_ckpt} holds no state for {name!r}: it was written by a run "
                                      "with other settings; resume with the same config, or start afresh")
            obj.load_state_dict(state["stateful"][name])
        _restore_rng(blob["rng"], state)
        say(f"resumed from {start_ckpt} at step {step}")
    for module in (frozen or {}).values():
        module.eval().requires_grad_(False)
        module.to(accelerator.device)
    if sharded:  # already distributed: Accelerate only wraps the optimizer; autocast comes from the loop
        optimizer = accelerator.prepare(optimizer)
        raw_model = model
    elif forward_module is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(model)
    else:  # the wrapper shares model's parameters: preparing it moves and DDP-wraps them
        if not any(m is model for m in forward_module.modules()):
            raise ValueError("forward_module must hold model as a submodule (it trains model's parameters)")
        raw_model = model
        model, optimizer = accelerator.prepare(forward_module, optimizer)
    params = [p for p in raw_model.parameters() if p.requires_grad]

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("train", config=_flat_hparams(cfg))
    metrics_file = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if metrics_file.exists():  # drop records past the resume point (a killed run logged them)
            kept = [line for line in metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))

    rows_per_step = t.micro_batch_size * t.grad_accum * world
    last_ckpt = start_ckpt

    def checkpoint() -> Path | None:
        nonlocal last_ckpt
        accelerator.wait_for_everyone()
        gathered = gather_full_state(raw_model, optimizer) if sharded else None  # collective
        if accelerator.is_main_process:
            state = {
                "step": step, "tokens_seen": tokens_seen, "data": data.stream.state_dict(),
                "python_rng": random.getstate(), "numpy_rng": _numpy_state(),
                "config": to_dict(cfg), "world_size": world, "val_history": val_history,
                "stateful": {name: obj.state_dict() for name, obj in (stateful or {}).items()},
                "run_id": run_id,
            }
            last_ckpt = save_checkpoint(ckpt_root, step, raw_model, tokenizer, optimizer, state, t.keep_last, gathered)
        accelerator.wait_for_everyone()
        last_ckpt = ckpt_root / f"{CKPT_PREFIX}{step:07d}"  # every rank names it (only the main process wrote it)
        runs.SIGNALS.checkpoint = last_ckpt
        return last_ckpt

    def stop_if_signalled() -> None:
        """SIGTERM / SIGINT arrived (on any rank): checkpoint this step unless it is saved already, and stop."""
        signum = runs.SIGNALS.requested(accelerator)
        if signum is None:
            return
        saved = last_ckpt if last_ckpt is not None and runs.checkpoint_step(last_ckpt) == step else None
        if saved is None and step > 0:
            saved = checkpoint()
        raise Interrupted(signum, saved or last_ckpt, step)

    def evaluate() -> None:
        losses = validation_loss(raw_model, data.val, t.micro_batch_size, accelerator.device)
        mean = sum(losses.values()) / max(len(losses), 1)
        val_history.append({"step": step, "mean": mean, "loss": losses})
        if accelerator.is_main_process:
            accelerator.log({"val/loss": mean, **{f"val/loss_{lang}": v for lang, v in losses.items()}}, step=step)
            worst = max(losses, key=losses.get) if losses else "-"
            say(f"step {step}: validation loss {mean:.4f} (mean over {len(losses)} languages; worst {worst} {losses.get(worst, 0):.3f})")

    # 4. The loop ------------------------------------------------------------------------------------
    if step == 0 and data.val:
        evaluate()
    # A live bar on a terminal; one line per ~10 % of the steps when stderr is a log file (make demo > log).
    bar = progress_bar(total=t.max_steps, initial=step, disable=not (t.progress and accelerator.is_local_main_process),
                       desc="train")
    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    installed = runs.SIGNALS.install()  # the CLI installs them for the whole command; a library call here
    runs.SIGNALS.armed, runs.SIGNALS.step, runs.SIGNALS.checkpoint = True, step, last_ckpt
    try:
        while True:
            stop_if_signalled()  # after the previous step (and its checkpoint); the same decision on every rank
            if step >= t.max_steps:
                break
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = data.stream.next_batch(rows_per_step)  # the same global batch on every rank
            loss_sum = torch.zeros((), device=accelerator.device)
            metric_sums: dict[str, torch.Tensor] = {}
            for micro in range(t.grad_accum):
                block = micro * world + rank  # 1 rank x 2 micro-batches == 2 ranks x 1 micro-batch
                sl = slice(block * t.micro_batch_size, (block + 1) * t.micro_batch_size)
                batch = {k: torch.as_tensor(v[sl], device=accelerator.device) for k, v in rows.items()}
                sync = micro == t.grad_accum - 1
                if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                with nullcontext() if sync or sharded else accelerator.no_sync(model):
                    with accelerator.autocast() if sharded else nullcontext():
                        loss, metrics = loss_fn(model, batch)
                    accelerator.backward(loss / t.grad_accum)
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
            # Mean over micro-batches and ranks; every rank sees the same number, so all stop together.
            loss_mean = accelerator.reduce(loss_sum / t.grad_accum, reduction="mean")
            grad_norm = accelerator.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor when the gradients are sharded
                grad_norm = grad_norm.full_tensor()
            grad_norm = torch.as_tensor(grad_norm).float()
            if not torch.isfinite(loss_mean) or not torch.isfinite(grad_norm):
                what = "loss" if not torch.isfinite(loss_mean) else "gradient norm"
                raise NonFiniteLossError(
                    f"the {what} became {float(loss_mean if what == 'loss' else grad_norm)} at step {step + 1}; "
                    f"the run stopped before updating the weights. Last good checkpoint: {last_ckpt or 'none yet'}. "
                    "Try a lower train.lr, a longer warmup, train.grad_clip=1.0, or mixed_precision=no; "
                    f"then resume with --resume {last_ckpt or ''}".rstrip()
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            runs.SIGNALS.step = step
            step_tokens = int(np.prod(rows["input_ids"].shape))
            tokens_seen += step_tokens
            window_tokens += step_tokens
            record = {"step": step, "loss": float(loss_mean), "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen}
            for k, v in metric_sums.items():
                v = accelerator.reduce(v / t.grad_accum, reduction="mean")
                record[k] = v.tolist() if v.ndim else float(v)
            if step % t.log_every == 0 or step == t.max_steps or step == 1:
                now = time.perf_counter()
                record["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                history.append(record)
                if accelerator.is_main_process:
                    _log_step(accelerator, record)
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            for hook in hooks:
                hook(record)
            if data.val and (step % t.eval_every == 0 or step == t.max_steps):
                evaluate()
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                checkpoint()
    finally:
        runs.SIGNALS.armed = False
        if installed:
            runs.SIGNALS.uninstall()
        bar.close()
        if data.malformed.total:
            say(data.malformed.summary())
        if accelerator.is_main_process and accelerator.log_with:
            accelerator.end_training()
    if sharded:  # callers measure, generate and save the result: give them the whole model (collective)
        raw_model = unshard_model(raw_model)
    return TrainResult(step, out_dir, last_ckpt, history, val_history, raw_model, tokenizer)


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _flat_hparams(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        for k, v in (values or {}).items():
            flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _log_step(accelerator, record: dict) -> None:
    scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, float) and k != "step"}
    load = record.get("expert_load")
    if isinstance(load, list):  # (n_moe_layers, E) fractions of tokens per expert
        for i, layer in enumerate(load):
            for e, frac in enumerate(layer):
                scalars[f"expert_load/layer{i}/expert{e}"] = frac
    accelerator.log(scalars, step=record["step"])


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest good checkpoint in train.out_dir, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a train.out_dir that holds another run's checkpoints (deletes them)")


def run(args) -> int:
    """Failures propagate to ``aetheris.cli``, which prints one line and exits with the documented code."""
    cfg = load_config(args.config, args.overrides)
    runs.claim_run_folder(Path(cfg.train.out_dir), resume=args.resume, overwrite=args.overwrite, dry_run=True)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.val_history:
        first, last = result.val_history[0], result.val_history[-1]
        print(f"validation loss {first['mean']:.4f} (step {first['step']}) -> {last['mean']:.4f} (step {last['step']}); "
              f"checkpoint: {result.last_checkpoint}")
    return 0
