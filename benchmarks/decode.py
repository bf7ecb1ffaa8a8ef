"""Per-token decode latency: Aetheris (fixed-size recurrent state) vs a transformers Cohere2 (KV cache).

Both models have the same width and depth (the student has one (SSM, MoE) pair per teacher layer) and
random weights. For each context length the prompt is prefilled once (untimed), then single-token
decode steps are timed (batch 1, fp32, median). Also reported: cache bytes, and how far the student is
from the weight-streaming bound (active weight bytes / memory bandwidth measured in the same run).

    python benchmarks/decode.py --json bench-results/decode.json [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch
from common import emit, median_seconds, parser, setup

from aetheris.config import AetherisConfig
from aetheris.model import Aetheris


def memory_bandwidth_gbs() -> float:
    """Streaming copy bandwidth (bytes read + written per second) on a 256 MiB buffer."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=7)
    return 2 * src.numel() * 4 / seconds / 1e9


def models(quick: bool):
    from transformers import Cohere2Config, Cohere2ForCausalLM

    D, L, heads, kv, Fh, V = (256, 2, 4, 2, 704, 8192) if quick else (512, 4, 8, 2, 1408, 16384)
    student = Aetheris(AetherisConfig(vocab_size=V, d_model=D, n_layer=2 * L, n_heads=heads, head_dim=D // heads,
                                      d_state=D // heads, n_groups=kv, d_ff=Fh, max_seq_len=1 << 20)).eval()
    teacher_cfg = Cohere2Config(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=heads,
                                num_key_value_heads=kv, intermediate_size=Fh, max_position_embeddings=1 << 15,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                layer_types=["full_attention"] * L, sliding_window=1 << 15)  # all layers attend fully
    teacher = Cohere2ForCausalLM(teacher_cfg).eval()
    return student, teacher


def time_steps(step, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3  # ms, skipping warm-up steps


@torch.no_grad()
def student_ms(model: Aetheris, context: int, n: int) -> tuple[float, int]:
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context))
    cache = model(prompt, logits_to_keep=1).cache
    token = torch.tensor([1])
    return time_steps(lambda: model.step(token, cache), n), cache.nbytes()


@torch.no_grad()
def teacher_ms(model, context: int, n: int) -> tuple[float, int]:
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    token = torch.tensor([[1]])
    pos = [context]

    def step():
        model(token, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos[0]]]))
        pos[0] += 1

    ms = time_steps(step, n)
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return ms, nbytes


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    contexts = [256, 1024] if args.quick else [512, 2048, 8192]
    n = 20 if args.quick else 40
    student, teacher = models(args.quick)
    bandwidth = memory_bandwidth_gbs()
    active_bytes = student.cfg.param_counts()["active"] * 4
    results = {"contexts": contexts, "student_params": student.num_parameters(),
               "teacher_params": sum(p.numel() for p in teacher.parameters()),
               "memory_bandwidth_gbs": bandwidth, "student_active_weight_bytes": active_bytes,
               "student_ms_per_token": {}, "teacher_ms_per_token": {}, "student_cache_bytes": {},
               "teacher_cache_bytes": {}}
    for ctx in contexts:
        s_ms, s_bytes = student_ms(student, ctx, n)
        t_ms, t_bytes = teacher_ms(teacher, ctx, n)
        results["student_ms_per_token"][ctx], results["student_cache_bytes"][ctx] = s_ms, s_bytes
        results["teacher_ms_per_token"][ctx], results["teacher_cache_bytes"][ctx] = t_ms, t_bytes
    first, last = contexts[0], contexts[-1]
    bound_ms = active_bytes / (bandwidth * 1e9) * 1e3
    results.update({
        f"speedup_vs_teacher_at_{last}": results["teacher_ms_per_token"][last] / results["student_ms_per_token"][last],
        "student_flatness": results["student_ms_per_token"][last] / results["student_ms_per_token"][first],
        "weight_streaming_bound_ms": bound_ms,
        "student_vs_bandwidth_bound": results["student_ms_per_token"][last] / bound_ms,
    })
    emit(args, results)


if __name__ == "__main__":
    main()
