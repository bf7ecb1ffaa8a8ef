"""Per-token decode latency: Aetheris (fixed-size recurrent state) vs a transformers Cohere2 (KV cache).

Both models have the same width and depth and random weights: the student has one (SSM, MoE) pair per
teacher layer, d_model equal, the active expert as wide as the teacher's MLP, its SSM heads/groups equal
to the teacher's query/kv heads (GQA 4:1, as Tiny Aya). The teacher keeps Tiny Aya's attention layout
(``[sliding, sliding, sliding, full]`` per 4 layers, window 4096); a second teacher with the same weights
and every layer full attention is timed too (an upper bound on what attention costs a teacher).

For each context length the prompt is prefilled once at batch 1 (untimed), then single-token decode
steps are timed (fp32, median) at batch 1 and at batch 8 (the batch-1 cache repeated 8 times: decode
cost depends on the cache's size, not its contents). Also reported: cache bytes, how far the student is
from the weight-streaming bound (active weight bytes / memory bandwidth measured in the same run) and
from its weight matmuls timed alone (what is left is per-token Python/dispatch work), and the
bandwidth-bound speedup (bytes the teacher must read per step / bytes the student must read).

    python benchmarks/decode.py --json bench-results/decode.json [--quick] [--threads N] [--clock cpu]

``--real-shapes`` times Tiny Aya itself instead (see ``real_shapes``): its exact config through transformers'
``Cohere2ForCausalLM`` against the 12-pair student derived from it, both bf16 with random weights:

    python benchmarks/decode.py --real-shapes --json bench-results/decode-real.json   # ~16 GB of memory
    python benchmarks/decode.py --real-shapes --quick                                  # toy widths, seconds

``--decode-layouts compiled,packed,packed-head`` (with ``--real-shapes``) then times the student again with the
teacher in turns at every point timed in turns, layout after layout (in that order): ``compiled`` runs its
batch-1 products through the compiled matvec (``aetheris.model.compile_for_decode``; ``nn.Linear``'s layout, no
copy), ``packed`` packs its weights (``aetheris.model.pack_for_decode``: oneDNN's prepacked layout) and
``packed-head`` adds a packed copy of the tied head.
"""

from __future__ import annotations

import copy
import gc
import inspect
import statistics

import torch
import realshapes as rs
from common import clock, emit, interleaved_seconds, median_ratio, median_seconds, parser, setup

from aetheris import kernels
from aetheris.config import AetherisConfig
from aetheris.model import Aetheris, MoE, PackedLinear, SSMMixer, apply_decode_layout

BATCH = 8  # the second batch size timed besides 1


def memory_bandwidth_gbs() -> float:
    """Streaming copy bandwidth (bytes read + written per second) on a 256 MiB buffer."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=7)
    return 2 * src.numel() * 4 / seconds / 1e9


def read_bandwidth_gbs() -> float:
    """Streaming read bandwidth (bytes read per second): summing a 256 MiB buffer, which reads it and writes
    nothing, as a matvec streams its weights. The copy above counts read + written bytes."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).uniform_()
    return src.numel() * 4 / median_seconds(lambda: src.sum(), repeats=7) / 1e9


@torch.no_grad()
def matvec_ms(model: Aetheris, n: int, linear=None) -> float:
    """The weight matmuls of one batch-1 step alone (projections, router, top-k experts, logits), without
    anything else the step does: the floor for this step on this machine with these kernels. ``linear``: the
    product (``F.linear``, or ``kernels.decode_linear`` for the compiled layout, whose blocked expert weights go
    through ``kernels.blocked_linear``; the router always ``F.linear``)."""
    import torch.nn.functional as F

    linear = linear or F.linear
    products = []  # (weight, the product it goes through)
    for m in model.modules():
        if isinstance(m, SSMMixer):
            products += [(m.in_proj.weight, linear), (m.out_proj.weight, linear)]
        elif isinstance(m, MoE):
            products.append((m.router.weight, F.linear))
            for e in range(m.cfg.top_k):
                products += [(m.w_gate[e], linear), (m.w_up[e], linear)]
                products.append((m.down_blocks[e], kernels.blocked_linear) if m.down_blocks is not None
                                else (m.w_down[e], linear))
    products.append((model.embed.weight if model.lm_head is None else model.lm_head.weight, linear))
    inputs = [torch.randn(1, kernels.in_features(w), dtype=w.dtype) for w, _ in products]
    return time_steps(lambda: [mul(x, w) for x, (w, mul) in zip(inputs, products)], n)


@torch.no_grad()
def packed_matvec_ms(model: Aetheris, n: int) -> float:
    """``matvec_ms`` for a model packed by ``pack_for_decode``: the same products through the packed weights
    (the router and an unpacked tied head through ``F.linear``, as the packed step runs them)."""
    import torch.nn.functional as F

    products = []  # (weight, the product it goes through)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            products.append((m.packed, kernels.packed_linear))
        elif isinstance(m, MoE):
            products.append((m.router.weight, F.linear))
            products += [(p, kernels.packed_linear) for e in range(m.cfg.top_k) for p in m.packed_experts[e]]
    if model.lm_head is None:
        products.append((model.embed.weight, F.linear) if model.packed_head is None
                        else (model.packed_head, kernels.packed_linear))
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w, _ in products]
    return time_steps(lambda: [mul(x, w) for x, (w, mul) in zip(inputs, products)], n)


def rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


@torch.no_grad()
def matvec_layouts(model: Aetheris, n: int = 5) -> dict:
    """GB/s of batch-1 matvecs over the student's weights, per weight kind, in four layouts: ``nn.Linear``'s
    (out, in) through ``F.linear`` (what the model runs), a transposed (in, out) copy (``x @ w.T``), the compiled
    matvec on ``nn.Linear``'s layout (``kernels.decode_linear``), and oneDNN's prepacked weight
    (``mkldnn._linear_pointwise``, what inductor's freezing uses). One pass reads
    the kind's matrix of every layer, so each comes from memory, not cache."""
    kinds = {"in_proj": [m.in_proj.weight for m in model.modules() if isinstance(m, SSMMixer)],
             "out_proj": [m.out_proj.weight for m in model.modules() if isinstance(m, SSMMixer)],
             "expert_gate": [m.w_gate[0] for m in model.modules() if isinstance(m, MoE)],
             "expert_down": [m.w_down[0] for m in model.modules() if isinstance(m, MoE)]}
    return layout_rates(kinds, n)


@torch.no_grad()
def layout_rates(kinds: dict[str, list[torch.Tensor]], n: int = 5) -> dict:
    """``matvec_layouts`` over given weights: {kind: {"shape", "gb_per_s": {layout: GB/s}}}."""
    import torch.nn.functional as F

    out = {}
    for kind, ws in kinds.items():
        x = torch.randn(1, ws[0].shape[1], dtype=ws[0].dtype)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        rates = {"linear": nbytes / median_seconds(lambda: [F.linear(x, w) for w in ws], repeats=n) / 1e9}
        wt = [w.t().contiguous() for w in ws]
        rates["transposed"] = nbytes / median_seconds(lambda: [x @ w for w in wt], repeats=n) / 1e9
        wt.clear()  # free the copies before packing (the lambda above keeps the list itself alive)
        if kernels.compiled_matvec_unsupported(ws[0]) is None:
            rates["compiled"] = nbytes / median_seconds(lambda: [kernels.decode_linear(x, w) for w in ws],
                                                        repeats=n) / 1e9
        if torch.backends.mkldnn.is_available():
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
            rates["mkldnn_packed"] = nbytes / median_seconds(
                lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed],
                repeats=n) / 1e9
            packed.clear()
        out[kind] = {"shape": list(ws[0].shape), "gb_per_s": rates}
    return out


def student_layouts(quick: bool, n: int = 5) -> dict:
    """``--layouts``: the layouts of ``matvec_layouts`` on random bf16 weights of the real student's shapes (one
    matrix per pair and kind, 12 pairs), without building the model (~2.2 GB instead of 7.9 GB)."""
    scfg = rs.student_cfg(rs.teacher_config(tiny=quick))
    with torch.device("meta"):
        mixer = rs.ssm_mixers(Aetheris(scfg))[0]
    pairs, D, Fh = scfg.layer_kinds.count("M"), scfg.d_model, scfg.d_ff
    shapes = {"in_proj": tuple(mixer.in_proj.weight.shape), "out_proj": tuple(mixer.out_proj.weight.shape),
              "expert_gate": (Fh, D), "expert_down": (D, Fh)}
    out = {"memory_bandwidth_gbs": memory_bandwidth_gbs(), "pairs": pairs}
    for kind, shape in shapes.items():  # one kind at a time keeps the peak to one kind's matrices
        out.update(layout_rates({kind: [torch.randn(shape).bfloat16() for _ in range(pairs)]}, n))
    out["memory_bandwidth_gbs_end"] = memory_bandwidth_gbs()
    return out


def models(quick: bool):
    """Student, teacher with Tiny Aya's attention layout, and the same teacher with full attention everywhere."""
    from transformers import Cohere2Config, Cohere2ForCausalLM

    D, L, heads, kv, Fh, V = (256, 2, 4, 1, 704, 8192) if quick else (512, 4, 8, 2, 1408, 16384)
    student = Aetheris(AetherisConfig(vocab_size=V, d_model=D, n_layer=2 * L, n_heads=heads, head_dim=D // heads,
                                      d_state=D // heads, n_groups=kv, d_ff=Fh, max_seq_len=1 << 20)).eval()
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=heads,
                  num_key_value_heads=kv, intermediate_size=Fh, max_position_embeddings=1 << 15,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    pattern = ["sliding_attention"] * 3 + ["full_attention"]  # Tiny Aya: [sliding x3, full] x 9, window 4096
    teacher = Cohere2ForCausalLM(Cohere2Config(**common, layer_types=[pattern[i % 4] for i in range(L)],
                                               sliding_window=4096)).eval()
    full = Cohere2ForCausalLM(Cohere2Config(**common, layer_types=["full_attention"] * L,
                                            sliding_window=1 << 15)).eval()
    full.load_state_dict(teacher.state_dict())
    return student, teacher, full


def time_steps(step, n: int) -> float:
    times = []
    for _ in range(n):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times[2:]) * 1e3  # ms, skipping warm-up steps


@torch.no_grad()
def student_ms(model: Aetheris, context: int, n: int) -> dict:
    """ms per decode step at batch 1 and BATCH, and the batch-1 cache bytes."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context))
    cache = model(prompt, logits_to_keep=1).cache
    batched = cache.select(torch.zeros(BATCH, dtype=torch.long))
    out = {"cache_bytes": cache.nbytes()}
    for b, c in ((1, cache), (BATCH, batched)):
        # A different token per row, so the rows of the repeated cache route to different experts
        # (identical rows would all use one expert per layer and read fewer weights than a real batch).
        token = torch.arange(1, b + 1)
        out[b] = time_steps(lambda: model.step(token, c), n)
    # Experts the batch's last step used per MoE layer (batch > 1 goes through the sorted dispatch, which
    # records the load).
    out["experts_used_batch"] = [int((m.last_load > 0).sum()) for m in model.modules()
                                 if isinstance(m, MoE) and m.last_load is not None]
    return out


@torch.no_grad()
def teacher_ms(model, context: int, n: int) -> dict:
    # Newer transformers 5.x name the cache argument/output `cache` (`past_key_values` is deprecated there).
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    cache = model(prompt, use_cache=True, logits_to_keep=1)[kw]
    batched = copy.deepcopy(cache)
    batched.batch_repeat_interleave(BATCH)
    out = {"cache_bytes": sum(t.numel() * t.element_size() for layer in cache.layers
                              for t in (layer.keys, layer.values))}
    for b, c in ((1, cache), (BATCH, batched)):
        token = torch.arange(1, b + 1)[:, None]
        pos = [context]

        def step():
            model(token, **{kw: c}, use_cache=True, logits_to_keep=1,
                  position_ids=torch.full((b, 1), pos[0]))
            pos[0] += 1

        out[b] = time_steps(step, n)
    return out


# ---------------------------------------------------------------------------------------------------
# --real-shapes: Tiny Aya vs its 12-pair student
# ---------------------------------------------------------------------------------------------------

REAL_POINTS = [(1, 2048), (1, 8192), (1, 32768), (16, 2048), (16, 8192)]  # (batch, context)
TINY_POINTS = [(1, 8), (1, 32), (1, 64), (4, 8), (4, 32)]                # toy window 16: same regimes


@torch.no_grad()
def real_shapes(quick: bool, rounds: int, only: list[str] | None = None, teacher_cache: str = "static",
                decode_layouts: tuple[str, ...] = ()) -> dict:
    """Decode steps of Tiny Aya (bf16, transformers) and its student (bf16, ``Aetheris.step``), timed in turns
    at each (batch, context) point.

    The teacher's cache is a transformers ``StaticCache`` (``teacher_cache="static"``, the default: the new
    token is written in place) or a ``DynamicCache`` ("dynamic": every step ``torch.cat``s each layer's whole
    cache into a new tensor, so the teacher's time includes copying its cache once per step).

    Contexts are filled by size, not by a prefill: the teacher's cache gets random K/V tensors of the length
    each layer holds after ``context`` tokens (``realshapes.fill_teacher_cache``), the student's fixed-size
    state random values. Decode cost depends on the cache's size, not its contents. Bytes per step: the
    teacher reads all its weights plus its KV cache; the student its non-expert weights, the experts its
    rows were routed to in the timed steps, and its state. The bound is bytes / the copy bandwidth measured
    in this run. A point whose caches do not fit the available memory is skipped with the reason.

    ``decode_layouts`` ("compiled", "packed", "packed-head", in that order): afterwards the student is put in
    each layout in place (``compile_for_decode``, ``pack_for_decode``) and timed again with the teacher in turns
    at each point timed in turns; per point ``student_ms_<layout>``, ``speedup_vs_teacher_<layout>`` and
    ``student_vs_bandwidth_bound_<layout>`` (the same bytes per step: neither layout adds a weight the step
    reads), at the top level ``student_vs_bandwidth_bound_b1_<layout>`` and under ``decode_layouts`` the
    layout's matvecs alone and the resident memory it added.
    """
    tcfg = rs.teacher_config(tiny=quick)
    scfg = rs.student_cfg(tcfg)
    dtype = torch.bfloat16
    out = {"dtype": "bfloat16", "rounds": rounds, "teacher_config": {k: getattr(tcfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "sliding_window")},
           "student_config": {k: getattr(scfg, k) for k in ("n_layer", "d_model", "n_heads", "head_dim", "d_state",
                                                          "n_groups", "d_ff", "n_experts", "top_k")},
           "teacher_cache": teacher_cache,
           "context_fill": f"teacher: {teacher_cache} cache holding random K/V tensors of each layer's length; "
                           "student: its fixed-size state with random values (no prefill run)"}
    counts = scfg.param_counts()
    t_weights = 2 * sum(p.numel() for p in _meta_teacher(tcfg).parameters())
    s_weights = 2 * counts["total"]
    both = rs.fits(t_weights + s_weights, margin=1.05) is None
    if not both:
        # Not both at once: each alone, in two phases (students first, then teachers), not in turns.
        reason = rs.fits(max(t_weights, s_weights), margin=1.05)
        if reason:
            out["skipped"] = f"models: {reason}"
            return out
    student = rs.build_student(scfg, dtype)
    out["student_weight_bytes"] = rs.param_bytes(student)
    out["student_active_weight_bytes"] = 2 * counts["active"]
    out["teacher_weight_bytes"] = t_weights
    bandwidth = memory_bandwidth_gbs()
    out["memory_bandwidth_gbs"] = bandwidth
    out["memory_read_bandwidth_gbs"] = read_bandwidth_gbs()
    out["student_matvec_ms"] = matvec_ms(student, 8)
    out["student_matvec_layouts"] = matvec_layouts(student)
    teacher = rs.build_teacher(tcfg, dtype) if both else None
    assert teacher is None or rs.param_bytes(teacher) == t_weights
    points, skipped, deferred = {}, {}, []

    def student_step(batch: int):
        s_cache = rs.fill_student_cache(student, batch)
        # A different token per row: at batch > 1 the rows route to different experts as in a real batch.
        token = torch.arange(1, batch + 1)
        moes = [m for m in student.modules() if isinstance(m, MoE)]
        used: list[list[int]] = []

        def step():
            student.step(token, s_cache)
            # Batch 1 runs its top-k experts directly (no load recorded); larger batches record the load.
            used.append([scfg.top_k] * len(moes) if batch == 1 else [int((m.last_load > 0).sum()) for m in moes])
        return step, used, s_cache.nbytes()

    def teacher_step(batch: int, context: int):
        kw = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
        t_cache = rs.fill_teacher_cache(teacher, batch, context, dtype)
        if teacher_cache == "static":  # room for the warm-up and timed steps
            t_cache = rs.static_teacher_cache(teacher, t_cache, context, context + rounds + 8, consume=True)
        token, pos = torch.arange(1, batch + 1)[:, None], [context]

        def step():
            teacher(token, **{kw: t_cache}, use_cache=True, logits_to_keep=1,
                    position_ids=torch.full((batch, 1), pos[0]))
            pos[0] += 1
        return step, rs.cache_tensor_bytes(t_cache)

    def student_bytes(used, s_state_bytes):
        experts_used = max(used[1:], key=sum)  # the most any timed step read (warm-up left out)
        return rs.student_step_bytes(student, experts_used, s_state_bytes), experts_used

    def record(name, batch, context, t_times, s_times, t_cache_bytes, s_bytes, experts_used, s_state_bytes,
               in_turns):
        t_bytes = t_weights + t_cache_bytes
        t_ms, s_ms = statistics.median(t_times) * 1e3, statistics.median(s_times) * 1e3
        bound_ms = s_bytes / (bandwidth * 1e9) * 1e3
        speedup = median_ratio(t_times, s_times) if in_turns else t_ms / s_ms
        points[name] = {
            "batch": batch, "context": context, "teacher_ms": t_ms, "student_ms": s_ms, "timed_in_turns": in_turns,
            "teacher_bytes": t_bytes, "student_bytes": s_bytes, "teacher_kv_bytes": t_cache_bytes,
            "student_state_bytes": s_state_bytes, "student_experts_used_per_layer": experts_used,
            "speedup_vs_teacher": speedup, "byte_ratio_bound": t_bytes / s_bytes,
            "speedup_over_bound": speedup / (t_bytes / s_bytes),
            "student_bound_ms": bound_ms, "student_vs_bandwidth_bound": s_ms / bound_ms,
            "teacher_vs_bandwidth_bound": t_ms / (t_bytes / (bandwidth * 1e9) * 1e3),
        }
        print(f"{name}: teacher {t_ms:.0f} ms, student {s_ms:.0f} ms, speedup {speedup:.2f} "
              f"(bytes bound {t_bytes / s_bytes:.2f}){'' if in_turns else ' (not in turns)'}", flush=True)

    for batch, context in (TINY_POINTS if quick else REAL_POINTS):
        name = f"b{batch}_ctx{context}"
        if only and name not in only:
            continue
        # The cache (plus the copy DynamicCache's torch.cat makes each step), plus the student's state.
        copies = 2 if teacher_cache == "dynamic" else 1
        need = copies * rs.teacher_kv_bytes(tcfg, context, batch) + rs.student_state_bytes(scfg, batch)
        if teacher is not None and not rs.fits(need):
            t_step, t_cache_bytes = teacher_step(batch, context)
            s_step, used, s_state_bytes = student_step(batch)
            times = interleaved_seconds({"teacher": t_step, "student": s_step}, rounds)
            record(name, batch, context, times["teacher"], times["student"], t_cache_bytes,
                   *student_bytes(used, s_state_bytes), s_state_bytes, True)
            del t_step, s_step
        elif not rs.fits(int(1.1 * need) + (t_weights if teacher is None else 0) - s_weights, margin=1.0):
            deferred.append((name, batch, context))  # fits once the student is gone
        else:
            reason = rs.fits(need + t_weights)
            skipped[name] = f"batch {batch}, context {context}: teacher and its cache {reason}"
            print(f"skipping {skipped[name]}", flush=True)
    def time_layout(layout: str) -> dict:
        """Put the student in ``layout`` and time it again, with the teacher in turns, at the in-turns points."""
        gc.collect()
        before = rss_bytes()
        reason = apply_decode_layout(student, layout)
        if reason is not None:
            print(f"decode layout {layout} skipped: {reason}", flush=True)
            return {"skipped": reason}
        gc.collect()
        info = {"rss_added_bytes": rss_bytes() - before,
                "matvec_ms": (matvec_ms(student, 8, kernels.decode_linear) if layout == "compiled"
                              else packed_matvec_ms(student, 8))}
        info["matvec_vs_bandwidth_bound"] = info["matvec_ms"] / (
            out["student_active_weight_bytes"] / (bandwidth * 1e9) * 1e3)
        key = layout.replace("-", "_")
        for name, p in points.items():
            if not p["timed_in_turns"]:
                continue
            t_step, _ = teacher_step(p["batch"], p["context"])
            s_step, _, _ = student_step(p["batch"])
            times = interleaved_seconds({"teacher": t_step, "student": s_step}, rounds)
            s_ms = statistics.median(times["student"]) * 1e3
            p[f"student_ms_{key}"] = s_ms
            p[f"speedup_vs_teacher_{key}"] = median_ratio(times["teacher"], times["student"])
            p[f"student_vs_bandwidth_bound_{key}"] = s_ms / p["student_bound_ms"]
            print(f"{name} ({layout}): teacher {statistics.median(times['teacher']) * 1e3:.0f} ms, student "
                  f"{s_ms:.0f} ms, student / its bound {s_ms / p['student_bound_ms']:.2f}", flush=True)
            del t_step, s_step
        return info

    if deferred:
        # Phase 1: the student alone at each deferred point; phase 2: the teacher alone (students freed).
        student_times = {}
        for name, batch, context in deferred:
            s_step, used, s_state_bytes = student_step(batch)
            s_times = interleaved_seconds({"student": s_step}, rounds)["student"]
            student_times[name] = (s_times, *student_bytes(used, s_state_bytes), s_state_bytes)
            del s_step
    if decode_layouts and teacher is not None:
        out["decode_layouts"] = {layout: time_layout(layout) for layout in decode_layouts}
    if deferred:
        student = None
        gc.collect()
        if teacher is None:
            teacher = rs.build_teacher(tcfg, dtype)
        for name, batch, context in deferred:
            t_step, t_cache_bytes = teacher_step(batch, context)
            t_times = interleaved_seconds({"t": t_step}, rounds)["t"]
            s_times, s_bytes, experts_used, s_state_bytes = student_times[name]
            record(name, batch, context, t_times, s_times, t_cache_bytes, s_bytes, experts_used, s_state_bytes, False)
            del t_step
    out["memory_bandwidth_gbs_end"] = memory_bandwidth_gbs()
    out["memory_read_bandwidth_gbs_end"] = read_bandwidth_gbs()
    out["points"], out["skipped"] = points, skipped
    if points:
        out["min_speedup_over_bound"] = min(p["speedup_over_bound"] for p in points.values())
        b1 = [p["student_vs_bandwidth_bound"] for p in points.values() if p["batch"] == 1]
        out["student_vs_bandwidth_bound_b1"] = max(b1) if b1 else None
        for layout in decode_layouts:
            key = f"student_vs_bandwidth_bound_{layout.replace('-', '_')}"
            b1 = [p[key] for p in points.values() if p["batch"] == 1 and key in p]
            out[f"student_vs_bandwidth_bound_b1_{layout.replace('-', '_')}"] = max(b1) if b1 else None
        out["student_matvec_vs_bandwidth_bound"] = out["student_matvec_ms"] / (
            out["student_active_weight_bytes"] / (bandwidth * 1e9) * 1e3)
    return out


def _meta_teacher(tcfg):
    """The teacher on the meta device: its parameter count without allocating it."""
    with torch.device("meta"):
        return rs.build_teacher(tcfg)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--real-shapes", action="store_true",
                   help="Tiny Aya's config vs its 12-pair student, bf16 (with --quick: the same at toy width)")
    p.add_argument("--rounds", type=int, default=None, help="--real-shapes: timed rounds per point")
    p.add_argument("--points", default=None, help="--real-shapes: only these points, e.g. b1_ctx2048,b16_ctx8192")
    p.add_argument("--teacher-cache", choices=["static", "dynamic"], default="static",
                   help="--real-shapes: the teacher's transformers cache: static (written in place; default) or "
                        "dynamic (DynamicCache, which copies every layer's cache at each step)")
    p.add_argument("--decode-layouts", default="",
                   help="--real-shapes: then time the student again in these decode layouts, e.g. "
                        "compiled,packed,packed-head")
    p.add_argument("--layouts", action="store_true",
                   help="batch-1 matvec GB/s of the real student's weight shapes in four layouts, and the copy bandwidth")
    args = p.parse_args()
    setup(args)
    if args.layouts:
        emit(args, {"layouts": student_layouts(args.quick)})
        return
    if args.real_shapes:
        layouts = tuple(x for x in args.decode_layouts.split(",") if x)
        order = ("compiled", "packed", "packed-head")
        if any(x not in order for x in layouts) or list(layouts) != sorted(layouts, key=order.index):
            p.error(f"--decode-layouts {args.decode_layouts}: give some of compiled, packed, packed-head, in that "
                    "order (packing is done in place, after the compiled layout is timed)")
        emit(args, real_shapes(args.quick, args.rounds or (3 if args.quick else 5),
                              args.points.split(",") if args.points else None, args.teacher_cache, layouts))
        return
    contexts = [256, 1024] if args.quick else [512, 2048, 8192]
    n = 20 if args.quick else 40
    student, teacher, full = models(args.quick)
    bandwidth = memory_bandwidth_gbs()
    counts = student.cfg.param_counts()
    active_bytes = counts["active"] * 4
    expert_bytes = 3 * student.cfg.d_model * student.cfg.d_ff * 4 * student.cfg.layer_kinds.count("M")
    teacher_weight_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    results = {"contexts": contexts, "batch_sizes": [1, BATCH], "student_params": student.num_parameters(),
               "teacher_params": sum(p.numel() for p in teacher.parameters()),
               "teacher_layer_types": teacher.config.layer_types, "teacher_sliding_window": teacher.config.sliding_window,
               "memory_bandwidth_gbs": bandwidth, "student_active_weight_bytes": active_bytes,
               "teacher_weight_bytes": teacher_weight_bytes}
    per = {name: {} for name in ("student", "teacher", "teacher_full_attention")}
    results["student_matvec_ms"] = matvec_ms(student, 2 * n)
    for ctx in contexts:
        per["student"][ctx] = student_ms(student, ctx, n)
        per["teacher"][ctx] = teacher_ms(teacher, ctx, n)
        per["teacher_full_attention"][ctx] = teacher_ms(full, ctx, n)
    for name, by_ctx in per.items():
        results[f"{name}_ms_per_token"] = {ctx: r[1] for ctx, r in by_ctx.items()}             # batch 1
        results[f"{name}_ms_per_step_batch{BATCH}"] = {ctx: r[BATCH] for ctx, r in by_ctx.items()}
        results[f"{name}_cache_bytes"] = {ctx: r["cache_bytes"] for ctx, r in by_ctx.items()}  # batch 1
    results[f"student_experts_used_per_layer_batch{BATCH}"] = {ctx: r["experts_used_batch"]
                                                             for ctx, r in per["student"].items()}
    first, last = contexts[0], contexts[-1]
    bound_ms = active_bytes / (bandwidth * 1e9) * 1e3

    def ratio(name: str, key: str) -> float:
        return results[f"{name}_{key}"][last] / results[f"student_{key}"][last]

    def bound(batch: int, teacher_name: str) -> float:
        """Bytes read per step, teacher / student: weights once plus every row's cache (the student's
        batch may touch up to min(E, batch*K) experts per layer, counted in full)."""
        experts = min(student.cfg.n_experts, batch * student.cfg.top_k)
        student_bytes = active_bytes + (experts - student.cfg.top_k) * expert_bytes + batch * per["student"][last]["cache_bytes"]
        teacher_bytes = teacher_weight_bytes + batch * per[teacher_name][last]["cache_bytes"]
        return teacher_bytes / student_bytes

    results.update({
        f"speedup_vs_teacher_at_{last}": ratio("teacher", "ms_per_token"),
        f"speedup_vs_full_attention_teacher_at_{last}": ratio("teacher_full_attention", "ms_per_token"),
        f"batch{BATCH}_speedup_vs_teacher_at_{last}": ratio("teacher", f"ms_per_step_batch{BATCH}"),
        f"batch{BATCH}_speedup_vs_full_attention_teacher_at_{last}":
            ratio("teacher_full_attention", f"ms_per_step_batch{BATCH}"),
        f"bandwidth_bound_speedup_at_{last}": {
            b: {"teacher": bound(b, "teacher"), "teacher_full_attention": bound(b, "teacher_full_attention")}
            for b in (1, BATCH)},
        "student_flatness": results["student_ms_per_token"][last] / results["student_ms_per_token"][first],
        "weight_streaming_bound_ms": bound_ms,
        "student_vs_bandwidth_bound": results["student_ms_per_token"][last] / bound_ms,
        "student_vs_matvec_only": results["student_ms_per_token"][last] / results["student_matvec_ms"],
        "matvec_only_vs_bandwidth_bound": results["student_matvec_ms"] / bound_ms,
    })
    emit(args, results)


if __name__ == "__main__":
    main()
