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
  Target <= 1.15. The KL chunking's extra peak memory is measured (process RSS sampled during the step,
  minus the CE step's) and compared with the arithmetic in ``kd_memory_plan``.

    python benchmarks/throughput.py --json bench-results/throughput-real.json [--only prefill,train,kd]
    python benchmarks/throughput.py --quick      # toy widths, seconds (the test runs this)
"""

from __future__ import annotations

import statistics
import threading
import time

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

class PeakRSS:
    """Largest resident set size of this process while the block runs, sampled every millisecond (big
    tensors are mmap'd by glibc and returned when freed, so RSS follows them)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def kd_memory_plan(T: int, V: int, chunk: int) -> dict:
    """What the KL adds to a CE step's peak, in bytes, from the code (``losses.chunked_divergence``):
    the teacher's logits (T x V, bf16, kept for the whole step) and, for the chunk being computed, its fp32
    teacher and student log-softmaxes plus the exp and difference temporaries (4 fp32 chunk-sized tensors;
    recomputed in backward, where the gradient adds about as many). The config comment in
    configs/tiny-aya-distill.yaml counts one fp32 chunk (chunk x V x 4 B)."""
    chunk_bytes = min(chunk, T) * V * 4
    return {"teacher_logits": T * V * 2, "chunk_fp32": chunk_bytes, "chunk_working_set": 4 * chunk_bytes,
            "total": T * V * 2 + 4 * chunk_bytes}


def kd(quick: bool, rounds: int) -> dict:
    from aetheris.distill import make_kd_loss

    tcfg = rs.teacher_config(tiny=quick, layers=4)  # one [sliding x3, full] period
    scfg = rs.student_cfg(tcfg, n_pairs=1)
    T, chunk = (64, 16) if quick else (512, 256)
    teacher = rs.build_teacher(tcfg, torch.bfloat16)
    student = rs.build_student(scfg, torch.float32).train()
    x = torch.randint(0, tcfg.vocab_size, (1, T))
    batch = {"input_ids": x, "labels": x.clone()}
    losses = {"kd": make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=chunk, w_kl=1.0, w_ce=1.0),
              "ce": make_kd_loss(teacher, kind="forward", temperature=1.0, chunk=chunk, w_kl=0.0, w_ce=1.0)}
    peaks = {}

    def step(name):
        def run():
            from aetheris.teacher import teacher_logits

            with PeakRSS() as m:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    if name == "ce":  # the teacher forward still runs: the ratio isolates the KL
                        with torch.no_grad():
                            teacher_logits(teacher, x, None)
                    loss, _ = losses[name](student, batch)
                loss.backward()
            student.zero_grad(set_to_none=True)
            peaks.setdefault(name, []).append(m.growth)
        return run

    times = interleaved_seconds({"kd": step("kd"), "ce": step("ce")}, rounds)
    plan = kd_memory_plan(T, tcfg.vocab_size, chunk)
    kl_peak = statistics.median(peaks["kd"]) - statistics.median(peaks["ce"])
    out = {"seq_len": T, "vocab_size": tcfg.vocab_size, "kl_chunk": chunk,
           "teacher_layers": tcfg.num_hidden_layers, "student_pairs": 1,
           "kd_step_ms": statistics.median(times["kd"]) * 1e3, "ce_step_ms": statistics.median(times["ce"]) * 1e3,
           "kd_over_ce": median_ratio(times["kd"], times["ce"]),
           "peak_rss_growth_kd": statistics.median(peaks["kd"]), "peak_rss_growth_ce": statistics.median(peaks["ce"]),
           "kl_peak_bytes": kl_peak, "kl_memory_plan": plan, "kl_peak_over_plan": kl_peak / plan["total"]}
    print(f"kd: {out}", flush=True)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], clock=False)
    p.add_argument("--only", default="prefill,train,kd", help="comma-separated sections: prefill, train, kd")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per section (default 2, after a warm-up round)")
    args = p.parse_args()
    setup(args)
    rounds = args.rounds or 2
    sections = {"prefill": prefill, "train": train, "kd": kd}
    results = {}
    for name in args.only.split(","):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(sections)}")
        results[name] = sections[name](args.quick, rounds)
    emit(args, results)


if __name__ == "__main__":
    main()
