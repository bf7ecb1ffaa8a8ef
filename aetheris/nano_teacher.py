"""The embedded default's teacher: a nano Cohere2 trained from scratch on this CPU (``make demo``, step 1).

    python -m aetheris.nano_teacher runs/nano-teacher [key=value ...]      # e.g. steps=600 hidden_size=192

Tiny Aya's structure scaled down -- transformers' own ``Cohere2ForCausalLM`` (parallel block: one bias-free
LayerNorm feeding attention and MLP; GQA; ``[sliding x3, full]`` layers with RoPE on the sliding ones only;
tied embeddings; ``logit_scale``) -- with a byte-level BPE carrying the Cohere special tokens, trained on the
training split of the 70-language offline corpus. So the student downstream meets the same code path, the
same tokenizer contract and the same chat template as with the real teacher; only the sizes differ.

Training, in two phases (pretraining, then instruction tuning, as Tiny Aya was made), each a ``train.train`` run
(the loop every Aetheris run uses: warmup + cosine schedule, clipping, the non-finite stop, progress lines,
``metrics.jsonl`` under ``OUT/train/<phase>/``) with ``cohere2_loss`` as its ``loss_fn``:

1. ``steps`` of language modelling on packed corpus rows (``data.load_documents`` -> ``split_heldout`` ->
   ``PackedStream``, the student's own data path, languages sampled ``p_l ∝ n_l^(1/language_temperature)``), each corpus
   line its own document so a batch mixes many languages. The held-out documents are the ones distillation holds
   out too (same seed, same split), and corpus lines past ``lines_per_language`` are never read, so evaluation
   can score text the teacher never saw.
   With ``copy_steps``, a phase 0 runs before it: language modelling on copying rows only (every row its first
   half written twice, at ``copy_lr``), so a copy circuit forms before the natural text and the chat.
2. ``chat_steps`` that add ``toolcall_batch_size`` chat-templated tool-calling conversations to every batch
   (their loss weighted ``chat_weight`` against the LM loss, which keeps the languages from being forgotten) from
   the generated set's *train* templates (``toolgen`` through ``sft.encode_conversation``: loss on assistant tokens only;
   with ``toolcall_random_values``, some of them with a city or query that can only be copied; with
   ``toolcall_frame_dropout``, requests missing some of their frame's words; with ``toolcall_extra_frames``, six
   English train frames per function instead of two).
   Tiny Aya is instruction-tuned and calls tools; a teacher that never saw a tool call would make the student's
   tool-calling "drop" meaningless. Held-out templates stay unseen.

Writes ``config.json``, ``model.safetensors``, the tokenizer (with the chat template) and
``nano_teacher.json`` (the settings, the uniform loss ln V, per-step losses with the held-out loss every
``eval_every`` steps, and the held-out loss per language at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Cohere2Config, Cohere2ForCausalLM

from aetheris.config_io import add_config_help, apply_overrides, build
from aetheris.data import (
    Document,
    PackedStream,
    split_heldout,
    tokenize_documents,
    validation_rows,
)
from aetheris.sft import build_sft_data
from aetheris.sources import load_documents
from aetheris.tasks.toolcall import render_prompt
from aetheris.tokenizer import train_bpe_tokenizer
from aetheris.toolgen import TOOLS, generate_examples
from aetheris.train import RunConfig, TrainConfig, TrainData, train


@dataclass
class NanoTeacherConfig:
    """The nano teacher: a Cohere2 model of Tiny Aya's structure at nano sizes, and its two training phases."""

    vocab_size: int = 2048
    """BPE vocabulary trained on the corpus (the student inherits it)."""
    hidden_size: int = 128
    """Residual width (= num_attention_heads x head_dim)."""
    intermediate_size: int = 256
    """Hidden width of the SwiGLU MLP."""
    num_hidden_layers: int = 6
    """Layers, in Tiny Aya's pattern [sliding x3, full]."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """GQA, like Tiny Aya's 16 heads / 4 kv heads."""
    head_dim: int = 32
    """Channels per attention head."""
    sliding_window: int = 64
    """Attention window of the sliding-window layers."""
    logit_scale: float = 0.5
    """Logits are multiplied by this (as Cohere2's config)."""
    lines_per_language: int = 200
    """Corpus lines read per language (the first ones); the rest stay unseen for evaluation."""
    seq_len: int = 64
    """Tokens per packed language-modelling row."""
    language_temperature: float = 3.0
    """Language sampling temperature (as ``data.language_temperature`` in the run configs)."""
    steps: int = 300
    """Phase 1 steps (language modelling on the corpus rows)."""
    batch_size: int = 16
    """Language-modelling rows per step (both phases)."""
    lr: float = 2.0e-3
    """Phase 1 peak learning rate (AdamW; linear warmup, cosine decay to 10 %)."""
    copy_steps: int = 0
    """Phase 0 steps, before phase 1: language modelling on copying rows only (each row its first half written
    twice, ``batch_size`` rows a step), so a copy circuit (induction heads) forms before any natural text or chat;
    0 = no such phase."""
    copy_lr: float = 1.0e-2
    """Phase 0 peak learning rate: on copying rows, 1e-2 reached half the training loss of 2e-3 in as many steps."""
    warmup_steps: int = 20
    """Linear warmup steps, of each phase."""
    chat_steps: int = 100
    """Phase 2 steps (LM rows + tool-calling conversations); 0 = a base model only."""
    chat_lr: float = 2.0e-3
    """Phase 2 peak learning rate (its own warmup and cosine decay)."""
    toolcall_batch_size: int = 4
    """Tool-calling conversations per step in that phase (added to the LM rows)."""
    chat_weight: float = 0.5
    """Phase 2's loss: ``chat_weight`` x chat loss + (1 - chat_weight) x LM loss."""
    toolcall_per_language: int = 20
    """Generated tool-calling conversations per language (train templates)."""
    toolcall_tools_offered: int = 3
    """Tool schemas in each system turn (the expected one among them); each adds ~200 nano-BPE tokens."""
    toolcall_random_values: float = 0.0
    """Share of the generated conversations whose city or search query is replaced, in the request and the call
    alike, by a random span of that language's training corpus (``random_value_examples``): the generator draws
    from 18 cities and 10 languages, which a model can recall instead of reading; a random span can only be
    copied. 0 = the generated values only."""
    toolcall_frame_dropout: float = 0.0
    """Probability that a word of a training request's frame (never a value) is left out (``toolgen``'s
    ``frame_dropout``): with two frames per function a nano model names the function by recognising the frame, and
    the held-out frames are new; without some of its words the request's values have to decide. 0 = whole frames."""
    toolcall_extra_frames: bool = False
    """Train on ``toolgen.EXTRA_TRAIN_TEMPLATES`` too: six English train frames per function instead of two, for
    English and the 66 languages that use the English frame (the held-out frames are unchanged)."""
    toolcall_seq_len: int = 1024
    """Longest tool-calling conversation row (longer ones are cut)."""
    tokenizer_format_copies: int = 0
    """Copies of each tool's rendered system turn (the chat format with one schema) added to the BPE's training
    texts, as real tokenizers also learn code and JSON; 0 = corpus only. 30 shortens a two-tool prompt from ~485 to
    ~256 tokens at a 0.6 % cost in corpus bytes per token (measured on the demo's corpus)."""
    tokenizer_isolate_spaces: bool = False
    """Whitespace as tokens of its own in the BPE (``tokenizer.train_bpe_tokenizer``): a city is the same tokens in
    the request and in the call's JSON, so it can be copied by token identity."""
    copy_fraction: float = 0.0
    """Share of the language-modelling rows (both phases) made of their first half written twice: a synthetic
    copying task that grows induction heads, which copying arguments from a request into a call needs."""
    eval_every: int = 50
    """Held-out LM loss every this many steps (in the report's ``history``; 0 = only before and after)."""
    seed: int = 0
    """Seeds the held-out split, the data order, the weights and the generated conversations."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    budget_seconds: float = 0.0
    """Expected training time this setting should fit (the demo's share); above it, a warning with the estimate
    is printed before training starts. 0 = no check."""

    def __post_init__(self):
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(f"hidden_size={self.hidden_size} must equal num_attention_heads x head_dim "
                             f"({self.num_attention_heads} x {self.head_dim}); change one of them")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if not 0 <= self.toolcall_random_values <= 1:
            raise ValueError(f"toolcall_random_values={self.toolcall_random_values} must be in [0, 1] (a share of "
                             "the generated conversations)")
        if not 0 <= self.toolcall_frame_dropout < 1:
            raise ValueError(f"toolcall_frame_dropout={self.toolcall_frame_dropout} must be in [0, 1) (the "
                             "probability of leaving out a frame word)")
        if not 0 <= self.copy_fraction <= 1:
            raise ValueError(f"copy_fraction={self.copy_fraction} must be in [0, 1] (a share of the LM rows)")
        if self.tokenizer_format_copies < 0:
            raise ValueError(f"tokenizer_format_copies={self.tokenizer_format_copies} must be >= 0")
        if not 0 < self.chat_weight <= 1:
            raise ValueError(f"chat_weight={self.chat_weight} must be in (0, 1] (the chat loss's share in phase 2)")
        if self.copy_steps < 0:
            raise ValueError(f"copy_steps={self.copy_steps} must be >= 0 (0 = no copying phase before the LM phase)")
        for name in ("lr", "copy_lr", "chat_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive learning rate (e.g. 2e-3)")
        if self.chat_steps < 0:
            raise ValueError(f"chat_steps={self.chat_steps} must be >= 0 (0 = no tool-calling phase)")
        for name in ("steps", "batch_size", "seq_len", "lines_per_language", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")


def cohere2_config(cfg: NanoTeacherConfig, tokenizer):
    """The scaled-down Tiny Aya config: every structural choice of the real one, nano sizes."""

    pattern = ["sliding_attention"] * 3 + ["full_attention"]  # Tiny Aya: [sliding x3, full] x 9
    return Cohere2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, logit_scale=cfg.logit_scale,
        layer_types=[pattern[i % 4] for i in range(cfg.num_hidden_layers)], sliding_window=cfg.sliding_window,
        max_position_embeddings=max(2048, cfg.toolcall_seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def _trim(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Drop the all-padding tail columns of right-padded chat rows (a 1024-wide batch is mostly padding)."""
    used = (batch["labels"] != -100) | (batch["input_ids"] != pad_id)
    width = int(used.any(0).nonzero()[0].max()) + 1
    return {k: batch[k][:, :width] for k in ("input_ids", "labels")}


def cohere2_loss(model, batch: dict[str, torch.Tensor], chat_weight: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The teacher's ``loss_fn`` for ``train.train``: next-token cross-entropy of a Cohere2 LM batch, and in the
    chat phase ``chat_weight`` x the chat batch's (assistant tokens only) + the rest x the LM batch's, so languages
    are not forgotten.

    transformers shifts labels inside the loss (labels aligned with input_ids, -100 = not trained): the same
    convention as aetheris.data and aetheris.sft."""
    lm = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    metrics = {"lm_loss": lm.detach()}
    if "chat_input_ids" not in batch:
        return lm, metrics
    chat = model(input_ids=batch["chat_input_ids"], labels=batch["chat_labels"]).loss
    metrics["chat_loss"] = chat.detach()
    return chat_weight * chat + (1 - chat_weight) * lm, metrics


class TeacherBatches:
    """The loop's stream (``next_batch`` / ``state_dict`` / ``load_state_dict``): ``n`` packed LM rows, a share
    ``copy_fraction`` of them turned into copying rows (first half written twice), and, in the chat phase,
    ``chat_rows`` conversations under ``chat_input_ids`` / ``chat_labels`` (trimmed to the longest)."""

    def __init__(self, lm, chat=None, chat_rows: int = 0, pad_id: int = 0, copy_fraction: float = 0.0, seed: int = 0):
        self.lm, self.chat, self.chat_rows, self.pad_id = lm, chat, chat_rows, pad_id
        self.copy_fraction, self.seed, self.batches = copy_fraction, seed, 0

    def next_batch(self, n: int) -> dict[str, np.ndarray]:
        rows = self.lm.next_batch(n)
        batch = {"input_ids": rows["input_ids"], "labels": rows["labels"]}  # (n, seq_len)
        if self.copy_fraction:
            batch = self._copying_rows(batch)
        if self.chat is not None:
            chat = _trim(self.chat.next_batch(self.chat_rows), self.pad_id)  # (chat_rows, longest conversation)
            batch |= {"chat_input_ids": chat["input_ids"], "chat_labels": chat["labels"]}
        self.batches += 1
        return batch

    def _copying_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows chosen with probability ``copy_fraction`` (seeded by the batch index, so a resumed stream draws the
        same ones) become ``[a, a]`` for their first half ``a``: the second half is predictable only by copying."""
        ids, labels = batch["input_ids"].copy(), batch["labels"].copy()
        half = ids.shape[1] // 2
        chosen = np.random.default_rng([self.seed, self.batches]).random(len(ids)) < self.copy_fraction
        ids[chosen, half:2 * half] = ids[chosen, :half]
        labels[chosen, half:2 * half] = labels[chosen, :half]
        return {"input_ids": ids, "labels": labels}

    def state_dict(self) -> dict:
        return {"lm": self.lm.state_dict(), "chat": self.chat.state_dict() if self.chat is not None else None,
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.lm.load_state_dict(state["lm"])
        if self.chat is not None:
            self.chat.load_state_dict(state["chat"])
        self.batches = state.get("batches", 0)


def expected_seconds(cfg: NanoTeacherConfig, lm_step: float, chat_step: float) -> float:
    """The training loop's wall time from one step's: every phase runs ``batch_size`` LM rows a step (copying rows
    cost what natural ones do), and each chat step adds its conversations on top."""
    return (cfg.copy_steps + cfg.steps + cfg.chat_steps) * lm_step + cfg.chat_steps * chat_step


def estimate_seconds(model, cfg: NanoTeacherConfig, seq_len: int, chat=None) -> float:
    """Expected wall time of the training loop (``expected_seconds``): one language-modelling step and one chat
    step timed on throwaway random tokens of the real shapes (forward + backward; the gradients are discarded, no
    weight changes). Chat rows are as wide as the 90th-percentile conversation (batches are trimmed to their
    longest row)."""
    gen = torch.Generator().manual_seed(0)

    def step_seconds(rows: int, width: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()  # the first call pays one-off setup
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    lm, chat_step = step_seconds(cfg.batch_size, seq_len), 0.0
    if chat is not None and cfg.chat_steps:
        width = int(np.percentile([len(ids) for rows in chat.rows.values() for ids, _ in rows], 90))
        chat_step = step_seconds(cfg.toolcall_batch_size, width)
    return expected_seconds(cfg, lm, chat_step)


@torch.no_grad()
def heldout_loss(model, val: dict[str, dict]) -> dict[str, float]:
    """Mean next-token cross-entropy per language on the held-out rows."""
    was_training = model.training
    model.eval()
    out = {}
    for lang, rows in sorted(val.items()):
        out[lang] = float(model(input_ids=torch.as_tensor(rows["input_ids"]), labels=torch.as_tensor(rows["labels"])).loss)
    model.train(was_training)
    return out


def line_documents(docs: dict[str, list]) -> dict[str, list]:
    """Each corpus line as its own document. A corpus document is a whole article (~1,700 characters), so packed
    64-token rows continuing it made every batch one language (one script per step pushed the languages least
    recently seen above the uniform loss); one line per document mixes ~30 languages into a 16-row batch."""

    return {lang: [Document(line, d.lang, f"{d.doc_id}:{i}") for d in ds
                   for i, line in enumerate(d.text.split("\n")) if line.strip()]
            for lang, ds in docs.items()}


COPIED_ARGUMENTS = ("city", "query")
"""Arguments written verbatim in every generated request (dates, amounts and currencies are localised)."""


def _strip_punctuation(text: str) -> str:
    """``text`` without the punctuation (any script's) at its ends."""
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[start:end]


def _random_span(lines: list[str], rng: random.Random) -> str:
    """One or two consecutive words of a random corpus line (2-6 characters of a longer run, for scripts written
    without spaces)."""
    for _ in range(100):
        words = [w for w in map(_strip_punctuation, rng.choice(lines).split()) if w]
        if words:
            break
    else:
        raise ValueError("no word in the corpus lines of a language: check the corpus")
    start = rng.randrange(len(words))
    word = words[start]
    if len(word) <= 12:
        return " ".join(words[start:start + rng.choice((1, 2))])
    size = rng.randrange(2, 7)  # a whole unspaced sentence: a name-sized piece of it
    begin = rng.randrange(len(word) - size + 1)
    return _strip_punctuation(word[begin:begin + size]) or word[:6]


def random_value_examples(examples: list[dict], lines: dict[str, list[str]], share: float, seed: int = 0) -> list[dict]:
    """The generated examples with, in a share ``share`` of them, each ``COPIED_ARGUMENTS`` value written in the
    request replaced (request and call alike) by a random span of the same language's corpus ``lines``."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        args = ex["expected"]["arguments"]
        keys = [k for k in COPIED_ARGUMENTS if isinstance(args.get(k), str) and args[k] in ex["user"]]
        if not keys or rng.random() >= share:
            out.append(ex)
            continue
        user, args = ex["user"], dict(args)
        for key in keys:
            value = _random_span(lines[ex["lang"]], rng)
            user, args[key] = user.replace(args[key], value), value
        out.append({**ex, "user": user, "expected": {**ex["expected"], "arguments": args}})
    return out


def teacher_tokenizer(train_docs: dict[str, list], cfg: NanoTeacherConfig):
    """The byte-level BPE on the training documents, plus ``tokenizer_format_copies`` copies of each tool's system
    turn: without them the chat format's JSON costs ~190 tokens per schema, most of every chat step's compute."""
    format_texts = [render_prompt([tool], "") for tool in TOOLS] * cfg.tokenizer_format_copies
    return train_bpe_tokenizer([d.text for lang in sorted(train_docs) for d in train_docs[lang]] + format_texts,
                               cfg.vocab_size, isolate_spaces=cfg.tokenizer_isolate_spaces)


def phase_config(cfg: NanoTeacherConfig, out: Path, phase: str):
    """The loop's settings for one phase (``train.TrainConfig``): warmup + cosine to 10 % of the peak, AdamW
    (0.9, 0.95) without weight decay, gradients clipped at 1; a checkpoint only at the end (the teacher trains
    in minutes and starts over when interrupted)."""

    steps, lr = {"copy": (cfg.copy_steps, cfg.copy_lr), "lm": (cfg.steps, cfg.lr), "chat": (cfg.chat_steps, cfg.chat_lr)}[phase]
    return RunConfig(train=TrainConfig(
        out_dir=str(out / "train" / phase), seed=cfg.seed, max_steps=steps, micro_batch_size=cfg.batch_size, lr=lr,
        min_lr_ratio=0.1, schedule="cosine", warmup_steps=min(cfg.warmup_steps, steps), weight_decay=0.0,
        grad_clip=1.0, mixed_precision="no", checkpoint_every=steps, keep_last=1, eval_every=steps,
        log_every=max(1, min(10, steps)), tracker="none", progress=True, threads=cfg.threads))


def train_nano_teacher(out: str | Path, cfg: NanoTeacherConfig | None = None, log=print):
    """Train the nano teacher and save it (model + tokenizer + report) to ``out``; returns (model, tokenizer)."""


    cfg = cfg or NanoTeacherConfig()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()

    # 1. Data and tokenizer: the training split only; the BPE never sees held-out documents.
    docs = load_documents([{"type": "corpus", "max_lines_per_language": cfg.lines_per_language}], "all")
    train_docs, val_docs = split_heldout(docs, 0.05, seed=cfg.seed)
    tokenizer = teacher_tokenizer(train_docs, cfg)
    pad = tokenizer.pad_token_id
    stream = PackedStream({lang: tokenize_documents(d, tokenizer) for lang, d in line_documents(train_docs).items()},
                          cfg.seq_len, language_temperature=cfg.language_temperature, seed=cfg.seed, pack=True, pad_id=pad)
    val = validation_rows({lang: tokenize_documents(d, tokenizer) for lang, d in val_docs.items()}, cfg.seq_len, 2,
                          pad_id=pad)
    chat = None
    if cfg.chat_steps:
        source = {"type": "toolgen", "languages": "all", "per_language": cfg.toolcall_per_language,
                  "tools_offered": cfg.toolcall_tools_offered, "seed": cfg.seed,
                  "frame_dropout": cfg.toolcall_frame_dropout, "extra_frames": cfg.toolcall_extra_frames}
        if cfg.toolcall_random_values:  # the same conversations, some with random values, through a jsonl source
            examples = random_value_examples(
                generate_examples("all", "train", cfg.toolcall_per_language, cfg.seed, cfg.toolcall_tools_offered,
                                  frame_dropout=cfg.toolcall_frame_dropout, extra_frames=cfg.toolcall_extra_frames),
                {lang: [line for d in ds for line in d.text.split("\n") if line.strip()] for lang, ds in train_docs.items()},
                cfg.toolcall_random_values, cfg.seed)
            out.mkdir(parents=True, exist_ok=True)
            path = out / "toolcall_train.jsonl"
            path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
            source = {"type": "jsonl", "path": str(path)}
        chat = build_sft_data([source], tokenizer, cfg.toolcall_seq_len, seed=cfg.seed, log=log, val_per_language=0).stream

    # 2. Model.
    torch.manual_seed(cfg.seed)
    model = Cohere2ForCausalLM(cohere2_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"nano teacher: Cohere2ForCausalLM, {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
        f"vocab {len(tokenizer)}; " + (f"{cfg.copy_steps} steps on copying rows, " if cfg.copy_steps else "")
        + f"{cfg.steps} language-modelling steps, then {cfg.chat_steps} with tool-calling chat")
    expected = estimate_seconds(model, cfg, stream.seq_len, chat)
    over = cfg.budget_seconds and expected > cfg.budget_seconds
    counts = (f"{cfg.copy_steps} copying + " if cfg.copy_steps else "") + f"{cfg.steps} + {cfg.chat_steps} steps"
    log(("nano teacher: WARNING: " if over else "nano teacher: ") + f"expected training time ~{expected / 60:.1f} min "
        f"on this machine now ({counts}, timed on one step of each kind)"
        + (f", over the budget of {cfg.budget_seconds / 60:.1f} min (teacher.budget_seconds): lower teacher.steps, "
           "teacher.chat_steps, teacher.copy_steps or teacher.toolcall_batch_size, or raise the budget if this machine is busy" if over else ""))

    # 3. The phases through the run loop (train.train: schedule, clipping, non-finite stop, progress, metrics.jsonl
    # under out/train/<phase>/), each with its own warmup + cosine; the held-out loss per language is measured
    # every eval_every steps by a hook (the loop's own validation speaks Aetheris' doc_ids).
    before = heldout_loss(model, val)
    history: list[dict] = []
    phases = [("copy", TeacherBatches(stream, pad_id=pad, copy_fraction=1.0, seed=cfg.seed))] if cfg.copy_steps else []
    phases.append(("lm", TeacherBatches(stream, pad_id=pad, copy_fraction=cfg.copy_fraction, seed=cfg.seed)))
    if cfg.chat_steps:
        phases.append(("chat", TeacherBatches(stream, chat, cfg.toolcall_batch_size, pad, cfg.copy_fraction, cfg.seed)))
    for phase, batches in phases:
        run_cfg = phase_config(cfg, out, phase)
        offset = len(history)  # steps of the phases before: the report numbers steps over the whole run
        total = run_cfg.train.max_steps

        def record(r: dict, offset=offset, total=total, phase=phase) -> None:
            row = {"step": offset + r["step"], "phase": phase, "lm_loss": r["lm_loss"], "lr": r["lr"]}
            if "chat_loss" in r:
                row["chat_loss"] = r["chat_loss"]
            if cfg.eval_every and r["step"] % cfg.eval_every == 0 or r["step"] == total:
                row["heldout_loss"] = float(np.mean(list(heldout_loss(model, val).values())))
            history.append(row)
            if "heldout_loss" in row or r["step"] % 50 == 0:
                log("  teacher step {step}: lm loss {lm_loss:.3f}".format(**row)
                    + (f", chat loss {row['chat_loss']:.3f}" if "chat_loss" in row else "")
                    + (f", held-out loss {row['heldout_loss']:.3f}" if "heldout_loss" in row else ""))

        train(run_cfg, loss_fn=functools.partial(cohere2_loss, chat_weight=cfg.chat_weight), model=model, tokenizer=tokenizer, data=TrainData(batches, {}),
              hooks=[record], overwrite=True)
        # Its end-of-phase checkpoint is a copy of what is saved below, not resumable (train's resume restores
        # Aetheris models): dropped, metrics.jsonl and config.json kept.
        shutil.rmtree(Path(run_cfg.train.out_dir) / "checkpoints", ignore_errors=True)
    after = heldout_loss(model, val)
    model.eval()

    # 4. Save: an ordinary HF folder, so `teacher.name` (and AutoModelForCausalLM) can point at it.
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"config": asdict(cfg), "parameters": n_params, "seconds": round(time.perf_counter() - start, 1),
              "uniform_loss": math.log(len(tokenizer)),
              "heldout_loss_before": float(np.mean(list(before.values()))),
              "heldout_loss_after": float(np.mean(list(after.values()))),
              "heldout_loss_per_language": after, "history": history}
    (out / "nano_teacher.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    log(f"nano teacher: held-out loss {report['heldout_loss_before']:.3f} -> {report['heldout_loss_after']:.3f} "
        f"(mean over {len(after)} languages), {report['seconds']:.0f} s -> {out}")
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:


    p = argparse.ArgumentParser(prog="python -m aetheris.nano_teacher", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="runs/nano-teacher")
    p.add_argument("overrides", nargs="*", help="NanoTeacherConfig fields as key=value (e.g. steps=600)")
    add_config_help(p, NanoTeacherConfig)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = build(NanoTeacherConfig, apply_overrides({}, a.overrides, NanoTeacherConfig))
    train_nano_teacher(a.out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
