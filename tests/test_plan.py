"""The memory plan (``aetheris.plan``, ``aetheris distill --plan``) against reality, where reality is cheap:
parameter bytes == the tensors of the models built for real; gradient and AdamW bytes == what one real
optimizer step holds (all pairs, one pair at a time, every parameter in stage 2); FSDP divides by the
process count; Tiny Aya's parameter count from its config alone; the CLI prints the table and refuses a
run whose plan exceeds --gpu-memory with one line."""

from __future__ import annotations


import pytest
import torch

from aetheris.distill import PairAligner, build_student, load_distill_config, pair_parameters
from aetheris.plan import PlanError, check_fits, parse_memory, plan_distill, student_counts, teacher_counts

from conftest import ROOT


def _cfg(teacher_dir, *extra):
    return load_distill_config(ROOT / "configs" / "nano-distill.yaml", [
        f"teacher.name={teacher_dir}", "teacher.dtype=float32", "student.n_pairs=2", "data.seq_len=32",
        "run_dir=null", *extra])


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adam_bytes(opt) -> int:
    return sum(_bytes(v for v in state.values() if v.ndim) for state in opt.state.values())


def test_parameter_bytes_equal_the_real_models(teacher_dir, tiny_cohere2_teacher):
    cfg = _cfg(teacher_dir)
    plan = plan_distill(cfg, device="cpu", teacher_config=tiny_cohere2_teacher.config)
    assert plan["align"]["train"]["teacher weights"] == _bytes(tiny_cohere2_teacher.parameters())
    from aetheris.model import Aetheris
    scfg, _ = build_student(cfg, tiny_cohere2_teacher.config)
    student = Aetheris(scfg)
    assert plan["kl"]["train"]["student weights (fp32)"] == _bytes(student.parameters())
    counts = student_counts(scfg)
    assert counts.layers == [sum(p.numel() for p in layer.parameters()) for layer in student.layers]
    assert counts.embed == student.embed.weight.numel()


def test_gradient_and_adamw_bytes_equal_one_real_step(teacher_dir, tiny_cohere2_teacher):
    from aetheris.model import Aetheris
    from aetheris.teacher import hidden_states
    from aetheris.transfer import transfer

    tc = tiny_cohere2_teacher.config
    x = torch.randint(0, tc.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    for at_once in (0, 1):
        cfg = _cfg(teacher_dir, f"align.pairs_at_once={at_once}")
        plan = plan_distill(cfg, device="cpu", teacher_config=tc)
        scfg, pairs = build_student(cfg, tc)
        torch.manual_seed(0)
        student = Aetheris(scfg)
        transfer(tiny_cohere2_teacher, student, pairs)
        group = pairs[:1] if at_once else pairs
        live = {id(p) for pm in group for p in pair_parameters(student, pm.pair)}
        for p in student.parameters():
            p.requires_grad_(id(p) in live)
        opt = torch.optim.AdamW(student.param_groups(0.1), lr=1e-3)
        loss, _, _ = PairAligner(student, group)(hidden_states(tiny_cohere2_teacher, x))
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        opt.step()
        assert plan["align"]["train"]["gradients"] == _bytes(grads), at_once  # every expert routed some tokens
        assert plan["align"]["train"]["AdamW moments"] == _adam_bytes(opt), at_once

    # Stage 2: every parameter trains (the tied embedding too).
    cfg = _cfg(teacher_dir)
    student.requires_grad_(True)
    opt = torch.optim.AdamW(student.param_groups(0.1), lr=1e-3)
    student(x, labels=x).loss.backward()
    opt.step()
    plan = plan_distill(cfg, device="cpu", teacher_config=tc)
    assert plan["kl"]["train"]["gradients"] == _bytes(p.grad for p in student.parameters())
    assert plan["kl"]["train"]["AdamW moments"] == _adam_bytes(opt)
    # Under FSDP with 2 processes each holds half the moments and gradients (+ the root unit's gradient whole).
    sharded = plan_distill(_cfg(teacher_dir, "kl.train.fsdp=true"), processes=2, device="cpu", teacher_config=tc)
    assert sharded["kl"]["train"]["AdamW moments"] == plan["kl"]["train"]["AdamW moments"] // 2
    assert sharded["kl"]["peak"] < plan["kl"]["peak"]


def test_tiny_aya_parameter_count_from_its_config_alone():
    from transformers import Cohere2Config

    config = Cohere2Config(vocab_size=262_144, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=128, tie_word_embeddings=True,
                           layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 9)
    assert teacher_counts(config).total == 3_349_227_520  # Tiny Aya's published parameter count


def test_cli_prints_the_plan_and_refuses_what_does_not_fit(teacher_dir, tmp_path, capsys):
    from aetheris.cli import main

    args = ["distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"), "--stages", "align,kl",
            f"teacher.name={teacher_dir}", f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--plan", "--plan-device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "AdamW moments" in out and "peak" in out and "align" in out and "sft" not in out.splitlines()[1]
    assert main([*args, "--plan", "--gpu-memory", "1MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage align needs" in err and "align.pairs_at_once=1" in err
    assert main([*args, "--gpu-memory", "1MB"]) == 2  # a real run is refused before anything is loaded
    assert not (tmp_path / "run").exists()
    assert main([*args, "--gpu-memory", "lots"]) == 2
    assert "80GB" in capsys.readouterr().err


def test_parse_memory_and_check_fits():
    assert parse_memory("80GB") == 80 << 30 and parse_memory("24000MB") == 24000 << 20 and parse_memory("1.5TiB") == 3 << 39
    plan = {"align": {"peak": 10 << 30}}
    check_fits(plan, 11 << 30, stages=["align"])
    with pytest.raises(PlanError, match="stage align needs 10.0 GiB"):
        check_fits(plan, 9 << 30, stages=["align"])


def _allocated_peak(fn) -> int:
    """Most bytes of CPU tensors allocated by ``fn`` that are live at once (torch.profiler's allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("bf16", [True, False])
def test_logits_line_is_the_measured_peak_of_a_kd_step(bf16, with_teacher):
    """A stage-2 step (student forward with CE, chunked KL against bf16 teacher logits, backward; the loss
    built in a function that returns only the loss, as the training loop's loss_fn does) of a narrow student
    whose (B, T, V) logits are nearly all it allocates: the allocator's peak equals the plan's logits line
    plus its gradient lines (the activations of a d_model-16 pair are < 1 %), in bf16 autocast and fp32."""
    from transformers import Cohere2Config

    from aetheris.losses import chunked_divergence, valid_positions
    from aetheris.model import Aetheris
    from aetheris.plan import _logits
    from aetheris.transfer import student_config

    B, T, V = 2, 256, 8192
    tc = Cohere2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, layer_types=["full_attention"], tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    student = Aetheris(student_config(tc, n_pairs=1))
    x = torch.randint(0, V, (B, T))
    t_logits = torch.randn(B, T, V).bfloat16()

    def loss_fn():
        out = student(x, labels=x)
        loss = out.ce_loss + out.aux_loss
        if with_teacher:
            per_pos, n = chunked_divergence(t_logits, out.logits, valid_positions(x), "forward", 1.0, 16)
            loss = loss + per_pos.sum() / n
        return loss

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()

    measured = _allocated_peak(step)
    params = sum(p.numel() for p in student.parameters())
    plan = _logits(B, T, V, 2 if bf16 else 4, with_teacher) + 4 * params + 4 * student.embed.weight.numel()
    assert abs(measured - plan) / plan < 0.03, (measured, plan)
