"""Tiny Aya's shapes beyond decode: prefill, training throughput and the KD step, against the teacher and the GEMM peak.

Three sections (``--only`` picks some), each timed in turns (interleaved rounds, medians of per-round ratios):

- ``prefill``: tokens/s of the teacher (bf16, transformers ``Cohere2``) and its 12-pair student (bf16) on a
  batch-1 prompt of 2k and 8k tokens. Measured per layer at full width and scaled by the layer count: one
  sliding-window teacher layer, one full-attention teacher layer and one student (SSM, MoE) pair are timed
  in turns; the teacher is 27 sliding + 9 full layers, the student 12 pairs. Embedding and LM head are left
  out (a prefill keeps one position's logits: < 0.1 % of the FLOPs). Target: the student's tokens/s over
  the teacher's >= 0.85 x the ratio of forward FLOPs per token (``realshapes.*_flops_per_token``).
- ``train``: forward+backward of one student pair (d_model 2048, SSM mixer + 4-expert top-1 MoE, aux loss)
  and of one teacher layer at seq_len 2048, fp32 weights under bf16 autocast (as the distill stages train):
  tokens/s and GFLOP/s (3 x forward FLOPs) against this machine's measured GEMM peak, bf16 and fp32.
  Target: the student pair >= 50 % of the bf16 peak.
- ``kd``: the stage-2 step at the 262,144-token vocabulary at reduced depth (teacher: one [sliding x3,
  full] period of Tiny Aya, bf16; student: one pair, fp32 under bf16 autocast) through the project's own
  loss (``distill.make_kd_loss``: teacher forward, student forward+backward, chunked KL + CE), against the
  same step with cross-entropy only (teacher forward still run, so the ratio is what the KL adds).
  Target <= 1.15. Peak memory (``allocator_peak``: the live bytes of the tensors a step allocates, from the
  profiler's allocator events) of both steps against ``aetheris/plan.py``'s lines for the same models, at this
  depth and for a narrow pair (d_model 64) where the (T, V) logits and the KL are nearly the whole step.

    python benchmarks/throughput.py --json bench-results/throughput-real.json [--only prefill,train,kd]
    python benchmarks/throughput.py --quick      # toy widths, seconds (the test runs this)
    python benchmarks/throughput.py --only kd --threads 1 --clock cpu [--no-memory]   # on a shared machine
"""

from __future__ import annotations

import statistics

import realshapes as rs
import torch
from common import emit, interleaved_seconds, median_ratio, median_seconds, parser, setup

from aetheris.model import Block

TEACHER_SLIDING, TEACHER_FULL = 27, 9  # Tiny Aya's 36 layers
STUDENT_PAIRS = 12


def gemm_peak_gflops(dtype: torch.dtype, n: int) -> float:
    """Median GFLOP/s of an (n x n) @ (n x 2n) matmul: the rate the GEMM kernels reach on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, 2 * n, dtype=dtype)
    return 2 * n * n * 2 * n / median_seconds(lambda: a @ b, repeats=5) / 1e9


def teacher_layer(tcfg, kind: str, dtype: torch.dtype):
    """A one-layer Cohere2Model of Tiny Aya's width (layer type ``kind``), vocabulary cut to 256 (unused:
    inputs go in as embeddings)."""
    from transformers import Cohere2Config, Cohere2Model

    d = tcfg.to_dict()
    d.update(num_hidden_layers=1, layer_types=[kind], vocab_size=256)
    cfg = Cohere2Config(**d)
    cfg._attn_implementation = "sdpa"
    with rs.default_dtype(dtype):
        return Cohere2Model(cfg).eval()


def student_pair(scfg, dtype: torch.dtype) -> torch.nn.ModuleList:
    with rs.default_dtype(dtype):
        return torch.nn.ModuleList([Block(scfg, "S"), Block(scfg, "M")])


def run_pair(pair, h):
    aux = 0
    for block in pair:
        h, a, _ = block(h, None, None)
        aux = aux + a
    return h, aux


# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def prefill(quick: bool, rounds: int) -> dict:
    tcfg = rs.teacher_config(tiny=quick)
    scfg = rs.student_cfg(tcfg)
    dtype = torch.bfloat16
    sliding, full = teacher_layer(tcfg, "sliding_attention", dtype), teacher_layer(tcfg, "full_attention", dtype)
    pair = student_pair(scfg, dtype).eval()
    n_sliding, n_full = (TEACHER_SLIDING, TEACHER_FULL) if not quick else (tcfg.layer_types.count("sliding_attention"),
                                                                          tcfg.layer_types.count("full_attention"))
    n_pairs = scfg.layer_kinds.count("M")
    out = {"method": f"per layer at full width, scaled: teacher = {n_sliding} sliding + {n_full} full layers, "
                     f"student = {n_pairs} pairs; embedding and LM head left out", "points": {}}
    for T in ((64, 256) if quick else (2048, 8192)):
        h = torch.randn(1, T, tcfg.hidden_size, dtype=dtype)
        times = interleaved_seconds({"sliding": lambda: sliding(inputs_embeds=h, use_cache=False),
                                     "full": lambda: full(inputs_embeds=h, use_cache=False),
                                     "pair": lambda: run_pair(pair, h)}, rounds)
        teacher_s = [n_sliding * s + n_full * f for s, f in zip(times["sliding"], times["full"])]
        student_s = [n_pairs * p for p in times["pair"]]
        t_flops, s_flops = rs.teacher_flops_per_token(tcfg, T), rs.student_flops_per_token(scfg)
        speedup = median_ratio(teacher_s, student_s)
        out["points"][T] = {
            "teacher_tokens_per_s": T / statistics.median(teacher_s),
            "student_tokens_per_s": T / statistics.median(student_s),
            "teacher_flops_per_token": t_flops, "student_flops_per_token": s_flops,
            "teacher_gflops": t_flops * T / statistics.median(teacher_s) / 1e9,
            "student_gflops": s_flops * T / statistics.median(student_s) / 1e9,
            "speedup_vs_teacher": speedup, "flop_ratio_bound": t_flops / s_flops,
            "speedup_over_bound": speedup / (t_flops / s_flops),
        }
        print(f"prefill {T}: {out['points'][T]}", flush=True)
    out["min_speedup_over_bound"] = min(p["speedup_over_bound"] for p in out["points"].values())
    return out


def train(quick: bool, rounds: int) -> dict:
    tcfg = rs.teacher_config(tiny=quick)
    scfg = rs.student_cfg(tcfg)
    T = 128 if quick else 2048
    peak = {"bfloat16": gemm_peak_gflops(torch.bfloat16, 256 if quick else 2048),
            "float32": gemm_peak_gflops(torch.float32, 256 if quick else 2048)}
    pair = student_pair(scfg, torch.float32).train()
    layer = teacher_layer(tcfg, "sliding_attention", torch.float32).train()
    h = torch.randn(1, T, tcfg.hidden_size)

    def student_step():
        x = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = run_pair(pair, x)
            loss = y.float().square().mean() + aux
        loss.backward()

    def teacher_step():
        x = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(inputs_embeds=x, use_cache=False).last_hidden_state
            loss = y.float().square().mean()
        loss.backward()

    times = interleaved_seconds({"student_pair": student_step, "teacher_layer": teacher_step}, rounds)
    n_pairs = scfg.layer_kinds.count("M")
    flops = {"student_pair": 3 * rs.student_flops_per_token(scfg) / n_pairs * T,
             "teacher_layer": 3 * rs.teacher_flops_per_token(_one_layer(tcfg), T) * T}
    out = {"seq_len": T, "precision": "fp32 weights, bf16 autocast", "gemm_peak_gflops": peak, "flops_rule":
           "3 x forward FLOPs (backward = 2 x forward for the matmuls)"}
    for name, ts in times.items():
        s = statistics.median(ts)
        out[name] = {"ms": s * 1e3, "tokens_per_s": T / s, "gflops": flops[name] / s / 1e9,
                     "fraction_of_bf16_peak": flops[name] / s / 1e9 / peak["bfloat16"],
                     "fraction_of_fp32_peak": flops[name] / s / 1e9 / peak["float32"]}
    print(f"train: {out}", flush=True)
    return out


def _one_layer(tcfg):
    from transformers import Cohere2Config

    d = tcfg.to_dict()
    d.update(num_hidden_layers=1, layer_types=["sliding_attention"])
    return Cohere2Config(**d)


# ---------------------------------------------------------------------------------------------------

def allocator_peak(fn) -> int:
    """Peak bytes of the CPU tensors ``fn`` allocates that are live at once: the running sum of the allocation
    and free events that torch.profiler (``profile_memory``) records from PyTorch's CPU allocator. Tensors that
    existed before (the weights) are not counted; buffers oneDNN allocates itself are not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def kd_plan_lines(tcfg, scfg, T: int, chunk: int, with_teacher: bool, bf16: bool = True) -> dict:
    """What ``aetheris/plan.py`` says one stage-2 step (batch 1, ``T`` tokens) allocates on top of the weights,
    line by line, for these two models: the lines a step allocates and frees (the AdamW moments and the
    optimizer step are not part of the timed step and are left out)."""
    from aetheris import plan

    s_count = plan.student_counts(scfg)
    kinds = ["P"] * len(s_count.layers) if scfg.parallel_pairs else list(scfg.layer_kinds)
    return {"logits and KL chunks": plan._logits(1, T, scfg.vocab_size, 2 if bf16 else 4, with_teacher),
            "gradients": 4 * s_count.total,
            "tied-embedding gradient sum": 4 * s_count.embed if scfg.tie_embeddings else 0,
            "teacher forward": plan._teacher_layer_transient(tcfg, 1, T, 2) if with_teacher else 0,
            "activations": plan._activations(scfg, 1, T, kinds)}


def kd_models(tcfg, scfg):
    teacher = rs.build_teacher(tcfg, torch.bfloat16)
    student = rs.build_student(scfg, torch.float32).train()
    return teacher, student


def kd_step(teacher, student, x, chunk: int, with_kl: bool, bf16: bool = True):
    """One stage-2 step through the project's loss (``distill.make_kd_loss``); ``with_kl=False`` is the same
    step with cross-entropy only, the teacher forward still run (so a ratio isolates what the KL adds)."""
    from aetheris.distill import make_kd_loss
    from aetheris.teacher import teacher_logits

    loss_fn = make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=chunk, w_kl=1.0 if with_kl else 0.0,
                           w_ce=1.0)
    batch = {"input_ids": x, "labels": x.clone()}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if not with_kl:
                with torch.no_grad():
                    teacher_logits(teacher, x, None)
            loss, _ = loss_fn(student, batch)
        loss.backward()
        student.zero_grad(set_to_none=True)
    return run


def kd_memory(tcfg, scfg, T: int, chunk: int, bf16: bool = True) -> dict:
    """Allocator peaks of the KD step and the CE-only step against the plan's lines for the same models
    (``bf16``: the student under bf16 autocast, as ``mixed_precision: bf16`` trains; else fp32 throughout)."""
    teacher, student = kd_models(tcfg, scfg)
    x = torch.randint(0, tcfg.vocab_size, (1, T))
    peaks = {name: allocator_peak(kd_step(teacher, student, x, chunk, with_kl=(name == "kd"), bf16=bf16))
             for name in ("ce", "kd")}
    plan_kd, plan_ce = kd_plan_lines(tcfg, scfg, T, chunk, True, bf16), kd_plan_lines(tcfg, scfg, T, chunk, False, bf16)
    kl_measured, kl_plan = peaks["kd"] - peaks["ce"], sum(plan_kd.values()) - sum(plan_ce.values())
    return {"d_model": scfg.d_model, "vocab_size": scfg.vocab_size, "seq_len": T, "kl_chunk": chunk,
            "student_precision": "bf16 autocast" if bf16 else "fp32",
            "teacher_layers": tcfg.num_hidden_layers, "student_layers": scfg.n_layer,
            "kd_step_peak_bytes": peaks["kd"], "ce_step_peak_bytes": peaks["ce"],
            "plan_kd_step_lines": plan_kd, "plan_kd_step_bytes": sum(plan_kd.values()),
            "kd_peak_over_plan": peaks["kd"] / sum(plan_kd.values()),
            "ce_peak_over_plan": peaks["ce"] / sum(plan_ce.values()),
            "kl_added_bytes": kl_measured, "plan_kl_added_bytes": kl_plan,
            "kl_added_over_plan": kl_measured / kl_plan if kl_plan else None}


def kd(quick: bool, rounds: int, memory: bool = True) -> dict:
    tcfg = rs.teacher_config(tiny=quick, layers=4)  # one [sliding x3, full] period
    scfg = rs.student_cfg(tcfg, n_pairs=1)
    T, chunk = (64, 16) if quick else (512, 256)
    teacher, student = kd_models(tcfg, scfg)
    x = torch.randint(0, tcfg.vocab_size, (1, T))
    times = interleaved_seconds({"kd": kd_step(teacher, student, x, chunk, True),
                                 "ce": kd_step(teacher, student, x, chunk, False)}, rounds)
    out = {"seq_len": T, "vocab_size": tcfg.vocab_size, "kl_chunk": chunk,
           "teacher_layers": tcfg.num_hidden_layers, "student_pairs": 1,
           "kd_step_ms": statistics.median(times["kd"]) * 1e3, "ce_step_ms": statistics.median(times["ce"]) * 1e3,
           "kd_over_ce": median_ratio(times["kd"], times["ce"])}
    print(f"kd: {out}", flush=True)
    del teacher, student
    if not memory:
        return out
    # Peak memory (untimed: the profiler's memory events slow the step): the same reduced-depth step, and a
    # narrow pair of models (d_model 64, one teacher layer) at the same vocabulary, where the (T, V) logits and
    # the KL are nearly all of the step.
    out["memory"] = kd_memory(tcfg, scfg, T, chunk)
    narrow = rs.teacher_config(tiny=True, layers=1)
    narrow.vocab_size = tcfg.vocab_size if not quick else 4096
    out["memory_narrow"] = kd_memory(narrow, rs.student_cfg(narrow, n_pairs=1), T, chunk)
    print(f"kd memory: {out['memory']}\nkd memory (narrow): {out['memory_narrow']}", flush=True)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="prefill,train,kd", help="comma-separated sections: prefill, train, kd")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per section (default 2, after a warm-up round)")
    p.add_argument("--no-memory", action="store_true", help="kd: time the steps only, skip the peak-memory runs")
    args = p.parse_args()
    setup(args)
    rounds = args.rounds or 2
    sections = {"prefill": prefill, "train": train, "kd": kd}
    results = {}
    for name in args.only.split(","):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(sections)}")
        extra = {"memory": not args.no_memory} if name == "kd" else {}
        results[name] = sections[name](args.quick, rounds, **extra)
    emit(args, results)


if __name__ == "__main__":
    main()
