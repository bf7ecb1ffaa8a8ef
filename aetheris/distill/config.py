"""The ``aetheris distill`` config: one dataclass per section, each validating itself, and the YAML loader.

    teacher / student / transfer      what is distilled into what (stage 1 builds the student from the teacher)
    tokenizer / data                  the text every stage reads (stage 3 reads conversations: ``sft.sources``)
    align: {..., train: {...}}        stage 1 and its training loop
    kl:    {..., train: {...}}        stage 2 and its training loop
    sft:   {..., train: {...}}        stage 3 and its training loop

Each stage has its own loop section (``align.train``, ``kl.train``, ``sft.train``, all ``train.TrainConfig``)
with its own defaults (out_dir ``runs/<stage>``; lr 1e-3 / 5e-5 / 2e-5); nothing is shared or merged between
them. ``run_dir`` places the three stages in ``<run_dir>/{align,kl,sft}`` (each ``*.train.out_dir``).

Two temperatures, two names: ``kl.kd_temperature`` / ``sft.kd_temperature`` soften the teacher and student
distributions in the KD loss; ``sft.language_temperature`` (like ``data``'s language temperature) flattens
language sampling. Keys of earlier versions (``train.*`` at the top level, ``kl.temperature``,
``sft.temperature``, ``sft.temperature_sampling``) are refused with the key that replaced them, so an old
config never silently changes meaning.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from aetheris.config import AetherisConfig
from aetheris.config_io import ConfigError, apply_overrides, build, load_yaml
from aetheris.losses import KINDS
from aetheris.sources import SFTSource, ToolgenSource
from aetheris.teacher import DEFAULT_TEACHER, DTYPES
from aetheris.train import DataConfig, RunConfig, TokenizerConfig, TrainConfig

STAGES = ("align", "kl", "sft")

# Student settings that make the transferred mixer exactly linear attention (see transfer.py).
EXACT_TRANSFER = {"gate": "sigmoid", "xbc_activation": "identity", "ssm_norm": False}

# Keys of earlier configs are refused naming the key that replaced them (``RENAMED_KEYS``, see config_io).
KD_TEMPERATURE_RENAMED = ("kd_temperature", "the KD softening temperature; language sampling has its own key")

@dataclass
class TeacherConfig:
    """The teacher: any Hugging Face causal LM (Tiny Aya by default), frozen."""

    name: str = DEFAULT_TEACHER
    """Hub id or local folder of the teacher (config.json + weights + tokenizer)."""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16 | float64."""

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose auto or one of {', '.join(DTYPES)}")

    def torch_dtype(self) -> torch.dtype:
        """The dtype the teacher loads in (``auto``: bfloat16 on a GPU that supports it, else float32)."""
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return DTYPES[self.dtype]


@dataclass
class StudentConfig:
    """The student's shape: derived from the teacher (pairs, width, heads), with other model fields in ``options``."""

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

    def __post_init__(self):
        if self.init_layer not in ("last", "first"):
            raise ConfigError(f"init_layer={self.init_layer!r}: choose last or first")
        # A YAML `student.options:` mapping replaces the default dict as a whole; merge it over the defaults so
        # leaving a key out keeps the exact-transfer setting (a silu gate would kill the transferred mixers).
        self.options = {**EXACT_TRANSFER, **(self.options or {})}
        fields = {f.name for f in dataclasses.fields(AetherisConfig) if f.init}
        for key in self.options:
            if key not in fields:
                near = difflib.get_close_matches(key, sorted(fields), n=1)
                raise ConfigError(f"student.options.{key} is not an AetherisConfig field"
                                  + (f"; did you mean {near[0]!r}?" if near else ""))
        if self.options["gate"] != "sigmoid":
            raise ConfigError(f"student.options.gate={self.options['gate']!r}: the stage-1 transfer zeroes the "
                              "z rows, and silu(0) = 0 would make every transferred mixer output 0; set "
                              "student.options.gate=sigmoid (2·sigmoid(0) = 1 passes them through)")


@dataclass
class TransferConfig:
    """Stage 1's weight transfer: attention -> SSM mixer, MLP -> experts."""

    dt_init: str = "mamba2"
    """mamba2 (log-uniform dt, A in [1, 16]) | span (A = -1, dt from each layer's attention span)."""
    attention_scale: bool = True
    """C <- W_Q · head_dim^-1/2 (the teacher's attention scaling); false: C <- W_Q unscaled."""
    expert_noise: float = 0.0
    """Each upcycled expert gets noise * std(w) * N(0, 1) added so the experts can diverge."""
    router_std: float = 1e-3
    """Std of the random init of each MoE router (small: the upcycled experts start out interchangeable)."""
    seed: int = 0
    """Seeds the transfer's random parts (expert noise, routers, dt init)."""

    def __post_init__(self):
        if self.dt_init not in ("mamba2", "span"):
            raise ConfigError(f"dt_init={self.dt_init!r}: choose mamba2 or span")


@dataclass
class AlignConfig:
    """Stage 1 (align): each (SSM, MoE) pair learns to reproduce its teacher layers' output, teacher-forced."""

    mixer_only_fraction: float = 0.5
    """Fraction of align.train.max_steps that trains the SSM mixers only, before whole pairs train."""
    report_rows_per_language: int = 2
    """Held-out rows per language for the KL and per-layer report (0 = all validation rows)."""
    pairs_at_once: int = 0
    """0: every pair trains in one pass. k >= 1: the pairs train k at a time, one group after another, each
    group for the whole ``align.train.max_steps`` on the same batches (as if trained alone), the teacher's hidden
    states computed once per batch for the group. Only the group's pairs have gradients and AdamW moments,
    which is what lets stage 1 fit one GPU at Tiny Aya scale (``aetheris distill --plan``). Each group
    checkpoints to ``<out_dir>/pairs-FIRST-LAST``; ``--resume`` skips finished groups."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/align", lr=1e-3))
    """Stage 1's training loop."""

    def __post_init__(self):
        if not isinstance(self.pairs_at_once, int) or self.pairs_at_once < 0:
            raise ConfigError(f"pairs_at_once={self.pairs_at_once!r}: 0 trains every pair at once, "
                              "k >= 1 trains k pairs at a time")
        if not 0.0 <= self.mixer_only_fraction <= 1.0:
            raise ConfigError(f"mixer_only_fraction={self.mixer_only_fraction} must be in [0, 1]")
        if self.train.fsdp:  # the loop refuses it too, but only after the teacher and data have loaded
            raise ConfigError("train.fsdp=true: stage 1 trains through its own forward module (PairAligner), which "
                              "is not sharded; set align.train.fsdp=false (stage 1 fits one GPU with "
                              "align.pairs_at_once=1)")


@dataclass
class KLConfig:
    """Stage 2 (kl): end-to-end distillation on text, the student's next-token distribution towards the teacher's."""

    kind: str = "forward"
    """forward KL(p_T || p_S) | reverse KL(p_S || p_T) | jsd."""
    kd_temperature: float = 1.0
    """Softens both distributions in the KD loss; the divergence is scaled by kd_temperature²."""
    w_kl: float = 1.0
    """Weight of the divergence to the teacher."""
    w_ce: float = 0.0
    """Weight of the next-token cross-entropy on the data (0 = pure distillation)."""
    chunk: int = 256
    """Positions per fp32 softmax chunk (memory: chunk x vocab x 4 bytes, recomputed in backward)."""
    balance: str = "language"
    """Sampling: language (p_l ∝ n_l^(1/data.language_temperature)) | family (p_f ∝ n_f^(1/data.language_temperature), then
    proportional within the family)."""
    dro: bool = False
    """Group-DRO over language families: the loss weights families by q_f, q_f ∝ q_f·exp(dro_step·KL_f)."""
    dro_step: float = 0.1
    """Exponentiated-gradient step size of the DRO weights."""
    dro_ema: float = 0.0
    """0: plain group-DRO (each step's per-family KL, families in the step only). In (0, 1]: stabilised --
    per-family running means of the KL at this rate, and every family seen so far steps every step."""
    init: str | None = None
    """Student to start from; unset: ``<align.train.out_dir>/student``."""
    report_rows_per_language: int = 2
    """Held-out rows per language for the before/after KL report (0 = all validation rows)."""
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
    """Stage 2's training loop."""

    RENAMED_KEYS: ClassVar[dict] = {"temperature": KD_TEMPERATURE_RENAMED}

    def __post_init__(self):
        _check_kind(self.kind)
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature={self.kd_temperature} must be > 0")
        if self.balance not in ("language", "family"):
            raise ConfigError(f"balance={self.balance!r}: choose language or family")
        if self.cache and self.kind != "forward":
            raise ConfigError(f"kind={self.kind!r} with kl.cache: a top-k teacher cache supports forward KL only; "
                              "set kl.kind=forward or drop kl.cache (online distillation)")
        if self.cache_k < 1 or self.cache_rows < 0:
            raise ConfigError("cache_k must be >= 1 and kl.cache_rows >= 0 (0 = what kl.train consumes)")
        if self.cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"cache_dtype={self.cache_dtype!r}: choose float16, bfloat16 or float32")


@dataclass
class SFTConfig:
    """Stage 3 (sft): supervised tuning on tool-calling conversations, optionally with KL to the teacher."""

    beta: float = 0.0
    """Weight of KL to the teacher on assistant tokens (0: CE only, and the teacher is not loaded)."""
    kind: str = "forward"
    """Divergence on assistant tokens when beta > 0: forward | reverse | jsd (as kl.kind)."""
    kd_temperature: float = 1.0
    """Softens both distributions in the β·KL term (scaled by kd_temperature², as kl.kd_temperature)."""
    chunk: int = 256
    """Positions per fp32 softmax chunk of the divergence (as kl.chunk)."""
    sources: list[SFTSource] = field(default_factory=lambda: [ToolgenSource()])
    """Conversation sources: ``{type: toolgen, languages: all, per_language: 40, seed: 0}`` (generated
    tool-calling set, train templates), ``{type: jsonl, path: FILE, lang: xx}`` (conversations),
    ``{type: xsid, split: train|validation|test, per_language: N}`` (xSID via tasks.toolcall)."""
    seq_len: int = 512
    """Tokens per conversation row (longer conversations are cut; right padding is never trained)."""
    language_temperature: float = 1.0
    """Language sampling over conversations: p_l ∝ n_l^(1/language_temperature), as for ``data``."""
    eval_per_language: int = 2
    """Held-out (test-template) generated examples per language for the tool-call validity report."""
    eval_languages: Any = "all"
    """Languages of the held-out tool-calling examples: ``all`` or a list of codes."""
    eval_tools_offered: int = 3
    """Tool schemas offered per held-out example (the expected one among them)."""
    max_new_tokens: int = 96
    """Generation cap per held-out example in the tool-call validity report."""
    replay_every: int = 0
    """0 = off; k: every k-th step is a stage-2 batch instead (KL to the teacher on ``data`` rows, as in stage 2),
    so tuning on chat does not erase the languages. Loads the teacher. The report then has held-out KL before/after."""
    init: str | None = None
    """Student to start from; unset: ``<kl.train.out_dir>/student``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/sft", lr=2e-5))
    """Stage 3's training loop."""

    RENAMED_KEYS: ClassVar[dict] = {"temperature": KD_TEMPERATURE_RENAMED,
                                    "temperature_sampling": ("language_temperature", "the language sampling temperature")}

    def __post_init__(self):
        _check_kind(self.kind)
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature={self.kd_temperature} must be > 0")
        if self.replay_every < 0 or self.replay_every == 1:
            raise ConfigError(f"replay_every={self.replay_every}: 0 turns replay off; k >= 2 makes every k-th "
                              "stage-3 step a stage-2 batch (1 would leave no SFT step)")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")


@dataclass
class DistillConfig:
    """An ``aetheris distill`` config: teacher, student, transfer, and the three stages align -> kl -> sft."""

    run_dir: str | None = None
    """One folder for the whole pipeline: stages write to run_dir/{align,kl,sft} (overrides each *.train.out_dir)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Unset name: the teacher's own tokenizer (distillation needs the teacher's vocabulary)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text for stages 1 and 2 (and stage 3's replay): sources, languages and their sampling, row length, held-out split."""
    align: AlignConfig = field(default_factory=AlignConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    RENAMED_KEYS: ClassVar[dict] = {
        "train": ("align.train", "each stage has its own loop section: align.train, kl.train, sft.train")}

    def __post_init__(self):
        if self.run_dir:
            for stage, t in self.stage_train().items():
                t.out_dir = str(Path(self.run_dir) / stage)
        for t in self.stage_train().values():
            RunConfig(model=AetherisConfig(), tokenizer=self.tokenizer, data=self.data, train=t)  # loop checks

    def stage_train(self) -> dict[str, TrainConfig]:
        """Each stage's loop settings, by stage name."""
        return {"align": self.align.train, "kl": self.kl.train, "sft": self.sft.train}


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
    for stage in STAGES:
        node = raw.get(stage)
        node = node.get("train") if isinstance(node, dict) else None
        out_dir = node.get("out_dir") if isinstance(node, dict) else None
        if out_dir is not None and Path(str(out_dir)) != Path(str(run_dir)) / stage:
            key = f"{stage}.train.out_dir"
            raise ConfigError(f"{key}={out_dir} conflicts with run_dir={run_dir} (which puts this stage in "
                              f"{Path(str(run_dir)) / stage}): drop {key}, or set run_dir=null to place each stage "
                              "with its own *.train.out_dir")


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
