"""The real-shape benchmarks' arithmetic and smoke paths: bytes and caches equal the real tensors', the
contexts filled by size equal a real prefill's caches, and the toy-width runs produce every JSON key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import realshapes as rs  # noqa: E402


def test_real_shape_bytes_match_the_models_tensors():
    """Tiny Aya and its student built on the meta device in bf16: the byte formulas equal the parameters'."""
    tcfg = rs.teacher_config()
    scfg = rs.student_cfg(tcfg)
    with torch.device("meta"):
        teacher, student = rs.build_teacher(tcfg), rs.build_student(scfg)
    assert rs.param_bytes(teacher) == 2 * 3_349_227_520
    assert scfg.n_layer == 24 and (scfg.n_experts, scfg.top_k) == (4, 1)
    # One expert per MoE layer at batch 1: exactly the active parameters of the config, in bf16.
    assert rs.student_step_bytes(student, [1] * 12, 0) == 2 * scfg.param_counts()["active"]
    assert rs.student_step_bytes(student, [4] * 12, 0) == rs.param_bytes(student) == 2 * scfg.param_counts()["total"]
    # The arithmetic: ~0.38 GB of KV per sequence at 8k, ~0.83 GB at 32k, state ~13 MB.
    assert abs(rs.teacher_kv_bytes(tcfg, 8192, 1) - 0.377e9) < 0.001e9
    assert abs(rs.teacher_kv_bytes(tcfg, 32768, 1) - 0.830e9) < 0.005e9
    assert abs(rs.student_state_bytes(scfg, 1) - 13.0e6) < 0.5e6


@pytest.mark.parametrize("context", [8, 40])  # below and above the toy window of 16
def test_cache_filled_by_size_equals_a_prefill(context):
    """The benchmark's caches (built from tensor sizes) have the shapes and positions of a real prefill's."""
    tcfg = rs.teacher_config(tiny=True)
    scfg = rs.student_cfg(tcfg)
    torch.manual_seed(0)
    teacher, student = rs.build_teacher(tcfg, torch.float32), rs.build_student(scfg, torch.float32)
    prompt = torch.randint(0, tcfg.vocab_size, (2, context))
    with torch.no_grad():
        real = teacher(prompt, use_cache=True).past_key_values
        real_state = student(prompt, logits_to_keep=1).cache
    filled = rs.fill_teacher_cache(teacher, 2, context, torch.float32)
    assert [tuple(layer.keys.shape) for layer in filled.layers] == [tuple(layer.keys.shape) for layer in real.layers]
    assert [layer.get_seq_length() for layer in filled.layers] == [layer.get_seq_length() for layer in real.layers]
    assert rs.cache_tensor_bytes(filled) == rs.cache_tensor_bytes(real) == rs.teacher_kv_bytes(tcfg, context, 2,
                                                                                              torch.float32)
    state = rs.fill_student_cache(student, 2)
    assert state.nbytes() == real_state.nbytes() == rs.student_state_bytes(scfg, 2, torch.float32)


def test_flops_formulas_count_the_matmul_weights():
    """Without attention/scan terms the FLOPs per token are 2 x the matmul weights of the built models."""
    tcfg = rs.teacher_config(tiny=True)
    scfg = rs.student_cfg(tcfg)
    teacher, student = rs.build_teacher(tcfg, torch.float32), rs.build_student(scfg, torch.float32)
    t_matmul = sum(p.numel() for n, p in teacher.model.layers.named_parameters() if p.ndim == 2)
    attn = rs.teacher_flops_per_token(tcfg, 1)  # one token: attends to 1 key per layer
    assert attn - 2 * t_matmul == 4 * tcfg.num_attention_heads * tcfg.head_dim * tcfg.num_hidden_layers
    s_matmul = sum(p.numel() for m in rs.ssm_mixers(student) for p in (m.in_proj.weight, m.out_proj.weight))
    moes = [m for m in student.modules() if m.__class__.__name__ == "MoE"]
    s_matmul += sum(m.router.weight.numel() + scfg.top_k * 3 * scfg.d_model * scfg.d_ff for m in moes)
    scan = scfg.n_heads * (2 * scfg.chunk_size * scfg.d_state + 2 * scfg.chunk_size * scfg.head_dim
                           + 4 * scfg.d_state * scfg.head_dim)
    assert rs.student_flops_per_token(scfg) == 2 * s_matmul + len(moes) * scan


def test_decode_real_shapes_quick_writes_every_key():
    import decode

    torch.set_num_threads(1)
    layouts = ("compiled",) + (("packed", "packed-head") if torch.backends.mkldnn.is_available() else ())
    out = decode.real_shapes(quick=True, rounds=2, decode_layouts=layouts)
    assert "skipped" not in out["decode_layouts"]["compiled"], out["decode_layouts"]["compiled"]
    assert set(out["points"]) | set(out["skipped"]) == {f"b{b}_ctx{c}" for b, c in decode.TINY_POINTS}
    assert out["points"], out["skipped"]
    for p in out["points"].values():
        for key in ("teacher_ms", "student_ms", "teacher_bytes", "student_bytes", "speedup_vs_teacher",
                    "byte_ratio_bound", "student_vs_bandwidth_bound"):
            assert p[key] > 0, key
        assert p["teacher_bytes"] == out["teacher_weight_bytes"] + p["teacher_kv_bytes"]
        for layout in [x.replace("-", "_") for x in layouts]:  # the same bytes over the layout's step time
            assert p[f"student_vs_bandwidth_bound_{layout}"] == p[f"student_ms_{layout}"] / p["student_bound_ms"]
    assert out["min_speedup_over_bound"] == min(p["speedup_over_bound"] for p in out["points"].values())
    assert out["memory_bandwidth_gbs"] > 0 and out["memory_read_bandwidth_gbs"] > 0 and out["student_vs_bandwidth_bound_b1"] > 0
    for layout in layouts:
        key = layout.replace("-", "_")
        assert out[f"student_vs_bandwidth_bound_b1_{key}"] == max(
            p[f"student_vs_bandwidth_bound_{key}"] for p in out["points"].values() if p["batch"] == 1)
        assert out["decode_layouts"][layout]["matvec_ms"] > 0


def test_a_point_that_does_not_fit_is_skipped_with_the_reason(monkeypatch):
    import decode

    monkeypatch.setattr(rs, "mem_available", lambda: 1)  # as if no memory were free
    out = decode.real_shapes(quick=True, rounds=1)
    assert "points" not in out and out["skipped"].startswith("models: needs") and "available" in out["skipped"]


def test_throughput_quick_sections_write_their_keys():
    import throughput

    torch.set_num_threads(1)
    pre = throughput.prefill(quick=True, rounds=1)
    for p in pre["points"].values():
        assert p["flop_ratio_bound"] == p["teacher_flops_per_token"] / p["student_flops_per_token"]
        assert p["speedup_vs_teacher"] > 0 and p["student_tokens_per_s"] > 0
    tr = throughput.train(quick=True, rounds=1)
    assert tr["gemm_peak_gflops"]["bfloat16"] > 0
    assert 0 < tr["student_pair"]["fraction_of_bf16_peak"] and tr["teacher_layer"]["tokens_per_s"] > 0
    kd = throughput.kd(quick=True, rounds=1)
    assert kd["kd_over_ce"] > 0
    for mem in (kd["memory"], kd["memory_narrow"]):
        assert mem["kd_step_peak_bytes"] > 0 and mem["ce_step_peak_bytes"] > 0
        assert mem["plan_kd_step_bytes"] == sum(mem["plan_kd_step_lines"].values()) > 0
    # the narrow pair's step is mostly its (T, V) logits: at least the student's and teacher's logits are live
    narrow = kd["memory_narrow"]
    assert narrow["kd_step_peak_bytes"] > narrow["ce_step_peak_bytes"]
    assert narrow["kd_step_peak_bytes"] >= narrow["seq_len"] * narrow["vocab_size"] * (2 + 2)


def test_allocator_peak_is_the_most_live_bytes_a_function_allocates():
    import throughput

    def fn():
        a, b = torch.empty(1_000_000), torch.empty(250_000)  # 4 MB + 1 MB live
        del a
        c = torch.empty(500_000)                              # 1 MB + 2 MB live
        return b, c

    assert throughput.allocator_peak(fn) == 5_000_000


def test_models_that_only_fit_one_at_a_time_are_timed_in_two_phases(monkeypatch):
    import decode

    tcfg = rs.teacher_config(tiny=True)
    t_bytes = 2 * sum(p.numel() for p in decode._meta_teacher(tcfg).parameters())
    s_bytes = 2 * rs.student_cfg(tcfg).param_counts()["total"]
    assert t_bytes < s_bytes
    # Room for the student, or the teacher with every toy cache, but not for both models.
    monkeypatch.setattr(rs, "mem_available", lambda: int(1.06 * s_bytes))
    torch.set_num_threads(1)
    out = decode.real_shapes(quick=True, rounds=1, only=["b1_ctx8", "b4_ctx32"])
    assert set(out["points"]) == {"b1_ctx8", "b4_ctx32"} and not out["skipped"]
    assert all(p["timed_in_turns"] is False and p["speedup_vs_teacher"] > 0 for p in out["points"].values())


@pytest.mark.parametrize("context", [8, 14, 40])  # below, crossing and above the toy window of 16
def test_static_teacher_cache_steps_like_the_dynamic_cache(context):
    """The benchmark's StaticCache (no per-step copy of the cache) gives the teacher the logits the
    DynamicCache with the same contents gives, step after step, including across the sliding window's edge."""
    tcfg = rs.teacher_config(tiny=True)
    torch.manual_seed(0)
    teacher = rs.build_teacher(tcfg, torch.float32)
    dynamic = rs.fill_teacher_cache(teacher, 2, context, torch.float32)
    static = rs.static_teacher_cache(teacher, dynamic, context, context + 6)
    with torch.no_grad():
        for step in range(4):
            token, pos = torch.tensor([[5 + step], [9]]), torch.full((2, 1), context + step)
            a = teacher(token, past_key_values=dynamic, use_cache=True, position_ids=pos).logits
            b = teacher(token, past_key_values=static, use_cache=True, position_ids=pos).logits
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_decode_layouts_quick_measures_every_kind_and_layout():
    import decode

    torch.set_num_threads(1)
    out = decode.student_layouts(quick=True, n=1)
    for kind in ("in_proj", "out_proj", "expert_gate", "expert_down"):
        assert all(out[kind]["gb_per_s"][layout] > 0 for layout in ("linear", "transposed", "compiled"))
    assert out["pairs"] == 4 and out["memory_bandwidth_gbs"] > 0
