"""Memory plan of a distillation config, per stage and per process, without loading any weights.

    aetheris distill --config configs/tiny-aya-distill.yaml --plan [--processes 8] [--gpu-memory 80GB]

Parameter counts come from the real model classes built on the ``meta`` device (the teacher from its
config.json, the student from the config stage 1 derives from it), so they are exact. The rest is
arithmetic over the run settings, one line per thing that holds memory:

* **weights**: the teacher in its dtype; the student's fp32 master weights (under ``train.fsdp`` with N
  processes: 1/N of them, plus the units FSDP gathers whole — the root (embeddings, final norm) during the
  whole forward, and two layers at a time: the one computing and the one prefetched).
* **gradients** (fp32, of the parameters that train; 1/N under FSDP; DDP adds its all-reduce buckets, one
  more copy) and **AdamW** state (two fp32 moments per trained parameter; 1/N under FSDP). The loop's
  fused AdamW step holds no temporaries; under FSDP the default step does (on GPU the multi-tensor step one
  per parameter shard; on CPU the per-tensor step two of the largest shard).
* **logits**: stage 2/3's (B, T, V) tensors peak in the backward pass through the cross-entropy: its fp32
  log-softmax, the gradient arriving at it and the one it passes on (12 bytes per logit), plus, with a
  teacher, the KL's gradient to the student logits (their dtype: 2 bytes under bf16 autocast, 4 in fp32),
  which waits there to be added. The teacher's logits are freed by then, and the KL itself works a few rows
  at a time (``losses.chunked_divergence``). ``benchmarks/throughput.py`` measures these peaks
  (docs/BENCHMARKS.md). A tied embedding's gradient arrives twice (head and lookup), so one (V, D) fp32 sum
  is added.
* **activations** with gradient checkpointing: every layer's input (B, T, D) plus one layer's internals
  (SSM: in_proj, conv, chunked-scan decays and states; MoE: gathered tokens and the SwiGLU widths);
  without checkpointing every layer's internals. Stage 1 also keeps the teacher's L + 1 hidden states.
* **report**: the before/after measurements run outside training (stage 1 also builds a random-init
  student as its KL reference); the stage's figure is the larger of its training and report phases.
* **runtime**: a fixed allowance for the interpreter and libraries (CPU) or the CUDA context (GPU).

Figures are estimates; ``benchmarks/fullwidth.py`` measures peak memory at Tiny Aya's real widths and
reports the largest relative difference to this plan (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from aetheris.model import Aetheris
from aetheris.teacher import decoder_layers, load_teacher_config

GIB = 1 << 30
RUNTIME = {"cpu": int(0.8 * GIB), "gpu": int(1.0 * GIB)}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


class PlanError(ValueError):
    """The plan of a run does not fit the memory the user said the device has."""


@dataclass
class Counts:
    """Parameter counts of one model, from the meta device."""

    total: int
    embed: int          # input embedding (the tied output head included)
    layers: list[int]   # per layer
    root: int           # parameters outside the layers (embeddings, final norm, untied head)
    largest_tensor: int
    largest_layer_tensor: int


def _counts(model: torch.nn.Module, layers) -> Counts:
    params = list(model.parameters())  # shared (tied) tensors appear once
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in params)
    embed = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    in_layers = [p.numel() for layer in layers for p in layer.parameters()]
    return Counts(total, embed, per_layer, total - sum(per_layer), max(p.numel() for p in params), max(in_layers, default=0))


def teacher_counts(teacher_config) -> Counts:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(teacher_config)
    return _counts(model, decoder_layers(model))


def student_counts(scfg) -> Counts:
    with torch.device("meta"):
        model = Aetheris(scfg)
    c = _counts(model, model.layers)
    c.embed = model.embed.weight.numel()
    return c


def _layer_activations(scfg, B: int, T: int, kinds: list[str]) -> list[int]:
    """Bytes one layer keeps for backward (fp32), per layer kind: S (SSM mixer), M (MoE FFN), P (parallel pair)."""
    D, H, P, N, G, F = scfg.d_model, scfg.n_heads, scfg.head_dim, scfg.d_state, scfg.n_groups, scfg.d_ff
    E, K, L = scfg.n_experts, scfg.top_k, scfg.chunk_size
    in_proj = H * P + G * P + G * N + H * N + H          # z, x, B, C, dt
    conv = G * P + G * N + H * N
    ssm = B * T * (D + in_proj + 2 * conv + 3 * H * P) + 2 * B * H * T * L + B * H * (T // L + 1) * P * N
    moe = B * T * (D + E + K * (3 * F + 2 * D))
    size = {"S": ssm, "M": moe, "P": ssm + moe}
    return [4 * size[k] for k in kinds]


def _activations(scfg, B: int, T: int, kinds: list[str]) -> int:
    per_layer = _layer_activations(scfg, B, T, kinds)
    if not per_layer:
        return 0
    if scfg.gradient_checkpointing:
        return len(per_layer) * B * T * scfg.d_model * 4 + max(per_layer)
    return sum(per_layer)


def _teacher_layer_transient(tc, B: int, T: int, tb: int) -> int:
    """One teacher layer's forward under no_grad (eager attention: scores and fp32 softmax; SwiGLU widths)."""
    heads = tc.num_attention_heads
    return B * heads * T * T * (2 * tb + 4) + 3 * B * T * tc.intermediate_size * tb


def _logits(B: int, T: int, V: int, student_bytes: int, with_teacher: bool) -> int:
    """Stage 2/3's (B, T, V) tensors at their peak (see the module docstring): 12 bytes per logit for the
    cross-entropy's backward, plus the KL's gradient in the student logits' dtype (``student_bytes``)."""
    n = B * T * V
    return 12 * n + (student_bytes * n if with_teacher else 0)


def _report_logits(T: int, V: int, tb: int, chunk: int, with_teacher: bool) -> int:
    """The held-out KL report (no grad, one row): student and teacher logits, one chunk's four fp32 softmax tensors."""
    return 4 * T * V + (tb * T * V + 4 * min(chunk, T) * V * 4 if with_teacher else 0)


def plan_distill(cfg, processes: int = 1, device: str = "gpu", teacher_config=None) -> dict:
    """``{stage: {"train": {component: bytes}, "report": {component: bytes}, "peak": bytes}}`` per process."""
    from aetheris.distill import build_student, cache_ready  # local: aetheris.distill's CLI imports this module

    tc = teacher_config or load_teacher_config(cfg.teacher.name)
    scfg, pairs = build_student(cfg, tc)
    t_count, s_count = teacher_counts(tc), student_counts(scfg)
    dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else ("bfloat16" if device == "gpu" else "float32")
    # The student's logits are bf16 under bf16 autocast (train.mixed_precision: bf16, or auto on a GPU).
    student_logit_bytes = {"kl": 0, "sft": 0}
    for stage in student_logit_bytes:
        precision = getattr(cfg, stage).train.mixed_precision
        student_logit_bytes[stage] = 2 if precision == "bf16" or (precision == "auto" and device == "gpu") else 4
    tb = DTYPE_BYTES[dtype]
    V, D = scfg.vocab_size, scfg.d_model
    teacher_w = t_count.total * tb
    student_w = s_count.total * 4
    runtime = RUNTIME[device]
    kinds = ["P"] * len(s_count.layers) if scfg.parallel_pairs else list(scfg.layer_kinds)
    layers_of = (lambda k: [k]) if scfg.parallel_pairs else (lambda k: [2 * k, 2 * k + 1])

    def optimizer_scratch(trained: int, largest: int, shards: int) -> int:
        if shards == 1:
            return 0  # the loop's fused AdamW step keeps no temporaries
        return 4 * trained // shards if device == "gpu" else 2 * 4 * largest // shards

    out = {}
    # Stage 1: pairs (all, or k at a time), teacher-forced. Never sharded; DDP under several processes.
    k = cfg.align.pairs_at_once or len(pairs)
    groups = [pairs[i:i + k] for i in range(0, len(pairs), k)]
    B1, T1 = cfg.align.train.micro_batch_size, cfg.data.seq_len
    trained = max(sum(s_count.layers[i] for pm in g for i in layers_of(pm.pair)) for g in groups)
    largest = max(s_count.layers) if s_count.layers else 0
    train = {"runtime": runtime, "teacher weights": teacher_w, "student weights (fp32)": student_w,
             "gradients": 4 * trained * (2 if processes > 1 else 1), "AdamW moments": 8 * trained,
             "optimizer step scratch": optimizer_scratch(trained, s_count.largest_layer_tensor, 1),
             "teacher hidden states": (tc.num_hidden_layers + 1) * B1 * T1 * D * tb
             + _teacher_layer_transient(tc, B1, T1, tb),
             "activations": _activations(scfg, B1, T1, [kinds[i] for pm in groups[0] for i in layers_of(pm.pair)])}
    report = {"runtime": runtime, "teacher weights": teacher_w, "student weights (fp32)": student_w,
              "random-init reference student": student_w, "logits (1 row)": _report_logits(T1, V, tb, 256, True)}
    out["align"] = _stage(train, report)

    # Stages 2 and 3: every parameter trains; FSDP shards weights, gradients and moments.
    for stage, tcfg, T, teacher_needed, chunk in (
            ("kl", cfg.kl.train, cfg.data.seq_len, not cache_ready(cfg), cfg.kl.chunk),
            ("sft", cfg.sft.train, cfg.sft.seq_len, cfg.sft.beta > 0 or cfg.sft.replay_every > 0, cfg.sft.chunk)):
        B = tcfg.micro_batch_size
        shards = processes if (tcfg.fsdp and processes > 1) else 1
        n = s_count.total
        if shards > 1:
            weights = 4 * (n // shards + s_count.root + 2 * largest)
            grads = 4 * (n // shards + s_count.root)  # the root's gradient is whole until reduce-scattered
        else:
            weights, grads = 4 * n, 4 * n * (2 if processes > 1 else 1)
        train = {"runtime": runtime, "teacher weights": teacher_w if teacher_needed else 0,
                 "student weights (fp32)": weights, "gradients": grads, "AdamW moments": 8 * n // shards,
                 "optimizer step scratch": optimizer_scratch(n, s_count.largest_tensor, shards),
                 "logits and KL chunks": _logits(B, T, V, student_logit_bytes[stage], teacher_needed),
                 "tied-embedding gradient sum": 4 * s_count.embed if scfg.tie_embeddings else 0,
                 "teacher forward": _teacher_layer_transient(tc, B, T, tb) if teacher_needed else 0,
                 "activations": _activations(scfg, B, T, kinds)}
        report = {"runtime": runtime, "teacher weights": teacher_w if teacher_needed else 0,
                  "student weights (fp32)": 4 * n, "logits (1 row)": _report_logits(T, V, tb, chunk, teacher_needed)}
        out[stage] = _stage(train, report)
    out["_setting"] = {"processes": processes, "device": device, "teacher_dtype": dtype,
                       "teacher_params": t_count.total, "student_params": s_count.total, "pairs": len(pairs),
                       "pairs_at_once": cfg.align.pairs_at_once, "fsdp": {"kl": cfg.kl.train.fsdp, "sft": cfg.sft.train.fsdp}}
    return out


def _stage(train: dict, report: dict) -> dict:
    return {"train": train, "report": report, "peak": max(sum(train.values()), sum(report.values()))}


def format_plan(plan: dict, stages=("align", "kl", "sft")) -> str:
    """The plan as a fixed-width table (GiB per process), one column per stage."""
    s = plan["_setting"]
    rows = []
    for stage in stages:
        for name in plan[stage]["train"]:
            if name not in rows:
                rows.append(name)
    width = max(len(r) for r in rows + ["report phase (before/after training)"]) + 2
    head = f"{'GiB per process':<{width}}" + "".join(f"{st:>10}" for st in stages)
    lines = [f"memory plan: {s['processes']} process(es), {s['device']}, teacher {s['teacher_params'] / 1e9:.2f}B params "
             f"in {s['teacher_dtype']}, student {s['student_params'] / 1e9:.2f}B params ({s['pairs']} pairs"
             + (f", {s['pairs_at_once']} at a time in stage 1" if s["pairs_at_once"] else "") + ")", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r:<{width}}" + "".join(f"{plan[st]['train'].get(r, 0) / GIB:>10.2f}" for st in stages))
    lines.append(f"{'training phase':<{width}}" + "".join(f"{sum(plan[st]['train'].values()) / GIB:>10.2f}" for st in stages))
    lines.append(f"{'report phase (before/after training)':<{width}}"
                 + "".join(f"{sum(plan[st]['report'].values()) / GIB:>10.2f}" for st in stages))
    lines.append(f"{'peak':<{width}}" + "".join(f"{plan[st]['peak'] / GIB:>10.2f}" for st in stages))
    return "\n".join(lines)


def parse_memory(text: str) -> int:
    """``80GB``, ``80G``, ``79.6GiB``, ``24000MB`` -> bytes (GB/G/GiB all read as GiB, as GPU makers' "80GB" is)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GgMmTt])(?:i?[Bb])?\s*", text)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: write a size such as 80GB, 40GiB or 24000MB")
    scale = {"m": 1 << 20, "g": GIB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def check_fits(plan: dict, memory: int, stages=("align", "kl", "sft")) -> None:
    """PlanError (one line) naming the first stage whose peak exceeds ``memory`` and what to change."""
    for stage in stages:
        peak = plan[stage]["peak"]
        if peak > memory:
            fix = {"align": "set align.pairs_at_once=1 (one pair's gradients and moments at a time)",
                   "kl": "set kl.train.fsdp=true with more processes or a smaller kl.train.micro_batch_size",
                   "sft": "set sft.train.fsdp=true with more processes or a smaller sft.train.micro_batch_size"}[stage]
            raise PlanError(f"stage {stage} needs {peak / GIB:.1f} GiB per process but --gpu-memory is "
                            f"{memory / GIB:.1f} GiB: {fix} (see aetheris distill --plan)")
