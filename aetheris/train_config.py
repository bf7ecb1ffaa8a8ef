"""The training run's config: the ``model``, ``tokenizer``, ``data`` and ``train`` sections of a YAML run config.

    aetheris train --config configs/nano-scratch.yaml train.max_steps=50   # keys: aetheris train --help-config

Each dataclass checks its own values in ``__post_init__`` (before any data or weights load), in the key's own
words; attribute docstrings are the keys' descriptions (``--help-config``). The distillation config reuses
``TokenizerConfig``, ``DataConfig`` and ``TrainConfig`` (one ``TrainConfig`` per stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aetheris.config import AetherisConfig
from aetheris.config_io import ConfigError, apply_overrides, build, load_yaml
from aetheris.sources import CorpusSource, DataSource, resolve_languages


@dataclass
class TokenizerConfig:
    """The tokenizer: a pretrained one, or a byte-level BPE trained on the run's training split."""

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
    sources: list[DataSource] = field(default_factory=lambda: [CorpusSource()])
    """Data sources, each ``{type: ..., key: value}`` (``aetheris.sources``): corpus | text | jsonl | parquet | hub."""
    languages: Any = "all"
    """``all`` or a list of language codes from the registry."""
    seq_len: int = 256
    """Tokens per training row."""
    pack: bool = True
    """Pack documents into full rows (with document boundaries); false = one document per row, padded."""
    language_temperature: float = 1.0
    """Language sampling: p_l ∝ n_l^(1/language_temperature); 1 = proportional, .inf = uniform."""
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

    RENAMED_KEYS: ClassVar[dict] = {"temperature": "language_temperature"}

    def __post_init__(self):
        if not (self.languages == "all" or isinstance(self.languages, str)
                or (isinstance(self.languages, list) and all(isinstance(c, str) for c in self.languages))):
            raise ConfigError(f"languages={self.languages!r}: give 'all' or a list of language codes, e.g. [en, sw]")
        try:
            resolve_languages(self.languages)
        except ValueError as err:
            raise ConfigError(str(err).removeprefix("data.")) from None
        _check(self, "seq_len", _is_int(self.seq_len) and self.seq_len >= 2, "an integer >= 2")
        _check(self, "language_temperature", _is_num(self.language_temperature) and self.language_temperature > 0,
               "> 0 (1 = proportional, .inf = uniform)")
        _check(self, "val_fraction", _is_num(self.val_fraction) and 0 < self.val_fraction < 1, "in (0, 1)")
        _check(self, "val_rows_per_language", _is_int(self.val_rows_per_language) and self.val_rows_per_language >= 0,
               "an integer >= 0 (0 = all held-out text)")
        _check(self, "max_document_chars", _is_int(self.max_document_chars) and self.max_document_chars >= 1,
               "a positive integer")


@dataclass
class TrainConfig:
    """The loop's settings: steps, batch, optimizer, schedule, precision, cadence of logs, validation and checkpoints."""

    out_dir: str = "runs/default"
    """Where checkpoints, logs and metrics.jsonl go."""
    seed: int = 0
    """Seeds torch, Python and numpy, the held-out split and the data order."""
    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Rows per process per forward pass; global batch = micro_batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of ``lr``."""
    schedule: str = "cosine"
    """cosine (warmup + cosine decay) | wsd (warmup, stable, linear decay over ``decay_fraction``) | constant."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps over which lr decays linearly to lr x min_lr_ratio."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices (norms, biases, A_log, D and dt_bias get none)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = no clipping (the norm is still logged)."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | no."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and one at the last step)."""
    keep_last: int = 2
    """Checkpoints of this run kept on disk (older ones are deleted once a newer one is safely written)."""
    eval_every: int = 200
    """Steps between validation-loss evaluations (and one at the start and the last step)."""
    log_every: int = 10
    """Steps between logged records (metrics.jsonl, tracker, progress bar); step 1 and the last are logged too."""
    tracker: str = "tensorboard"
    """Accelerate tracker (tensorboard, wandb, ...) or none."""
    progress: bool = True
    """Show a progress bar (a live bar on a terminal, a line per ~10 % in a log file)."""
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
    """An ``aetheris train`` config: the model, its tokenizer, the data and the loop."""

    model: AetherisConfig = field(default_factory=AetherisConfig)
    """The model to train (``AetherisConfig``); its special token ids default to the tokenizer's."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Training text: sources, languages and their sampling, row length, the held-out split."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from YAML plus ``key.sub=value`` overrides; unknown keys name the nearest valid one."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides), RunConfig)
    return build(RunConfig, raw)
