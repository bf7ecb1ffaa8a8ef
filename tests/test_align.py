"""Stage 1 alignment: the distill CLI end to end on the tiny Cohere2 teacher (KL random > transfer > aligned,
per-pair errors fall, report JSON), mixer-only then whole-pair training, stage parsing, configs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, merged_overrides as _merged
from aetheris.distill import build_student, load_distill_config, make_align_loss, parse_stages



def _overrides(teacher_dir, out_dir, *extra):
    return _merged([f"teacher.name={teacher_dir}", f"align.train.out_dir={out_dir}", "align.train.progress=false",
                    "data.languages=[en, sw, hi, zh, ar, yo, fr, ru]",
                    "data.sources=[{type: corpus, max_lines_per_language: 150}]",
                    "align.train.eval_every=1000", "align.train.checkpoint_every=1000", *extra])


def test_distill_align_cli_kl_random_vs_transfer_vs_aligned(teacher_dir, tmp_path):
    from aetheris.checkpoint import load_model
    from aetheris.cli import main

    out = tmp_path / "run"
    rc = main(["distill", "--config", str(ROOT / "configs" / "nano-align.yaml"), "--stages", "align",
               *_overrides(teacher_dir, out, "align.train.max_steps=120", "student.n_pairs=2")])
    assert rc == 0
    report = json.loads((out / "align_report.json").read_text())
    random_kl, transfer_kl, aligned_kl = (report[k]["mean"] for k in ("kl_random_init", "kl_after_transfer", "kl_after_align"))
    assert transfer_kl < 0.5 * random_kl          # the transfer alone already carries most of the teacher
    assert aligned_kl < transfer_kl               # alignment brings it closer again
    assert set(report["kl_after_align"]["per_language"]) == {"en", "sw", "hi", "zh", "ar", "yo", "fr", "ru"}
    assert [p["teacher_layers"] for p in report["layers_after_align"]] == [[0, 1], [2, 3]]
    for before, after in zip(report["layers_after_transfer"], report["layers_after_align"]):
        assert after["relative_error"] < before["relative_error"] and after["cosine"] > before["cosine"]
    assert report["mixer_only_steps"] == 60 and report["steps"] == 120
    student = load_model(out / "student")
    assert student.cfg.n_layer == 4 and student.cfg.logit_scale == 0.5
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").exists()


def test_mixer_only_phase_then_whole_pair(tiny_cohere2_teacher):
    from aetheris.distill import PairAligner, mixer_parameters
    from aetheris.model import Aetheris
    from aetheris.transfer import layer_map, student_config, transfer

    tcfg = tiny_cohere2_teacher.config
    student = Aetheris(student_config(tcfg, n_pairs=4, gate="sigmoid", xbc_activation="identity", ssm_norm=False))
    pairs = layer_map(4, 4)
    transfer(tiny_cohere2_teacher, student, pairs)
    aligner = PairAligner(student, pairs)
    progress = {"step": 0}
    loss_fn = make_align_loss(tiny_cohere2_teacher, mixer_only_steps=5, progress=progress)
    batch = {"input_ids": torch.randint(0, tcfg.vocab_size, (2, 16))}
    mixer_ids = {id(p) for p in mixer_parameters(student)}
    for step, whole in ((0, False), (5, True)):
        student.zero_grad(set_to_none=True)
        progress["step"] = step
        loss, metrics = loss_fn(aligner, batch)
        loss.backward()
        assert metrics["pair_nmse"].shape == (4,) and float(metrics["mixer_only"]) == (not whole)
        # Every parameter stays trainable (DDP's buckets are fixed when it is built); the phase decides
        # which ones the forward lets gradients reach. Grad None means AdamW leaves it untouched.
        assert all(p.requires_grad for p in student.parameters())
        for name, p in student.named_parameters():
            if id(p) in mixer_ids and not name.endswith(("in_proj.weight", "out_proj.weight", "A_log", "dt_bias", "D",
                                                         "conv_weight", "conv_bias")):
                continue
            used = not name.startswith(("embed", "norm_f"))  # the pair loss never touches embeddings or the head
            expect_grad = used and (whole or id(p) in mixer_ids)
            assert (p.grad is not None) == expect_grad, name


def test_mixer_only_phase_computes_the_same_pairs(tiny_cohere2_teacher):
    """Detaching the non-mixer parameters changes which gradients flow, never the function."""
    from aetheris.distill import pair_forward
    from aetheris.model import Aetheris
    from aetheris.transfer import student_config

    for parallel in (False, True):
        torch.manual_seed(0)
        student = Aetheris(student_config(tiny_cohere2_teacher.config, n_pairs=2, parallel_pairs=parallel))
        h = torch.randn(2, 9, tiny_cohere2_teacher.config.hidden_size)
        for k in range(2):
            a, aux_a = pair_forward(student, k, h)
            b, aux_b = pair_forward(student, k, h, mixer_only=True)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(aux_a, aux_b, rtol=0, atol=0)


def test_stages_are_a_comma_list_in_pipeline_order():
    assert parse_stages("align") == ["align"]
    assert parse_stages("sft, align,kl") == ["align", "kl", "sft"]
    with pytest.raises(ValueError, match="unknown stage 'kd'.*align, kl, sft"):
        parse_stages("align,kd")
    with pytest.raises(ValueError, match="twice"):
        parse_stages("kl,kl")


def test_cli_refuses_an_unknown_stage_before_running(capsys, tmp_path):
    from aetheris.cli import main

    rc = main(["distill", "--config", str(tmp_path / "missing.yaml"), "--stages", "align,kd"])
    assert rc == 2 and "unknown stage 'kd'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nano-align.yaml", "tiny-aya-align.yaml"])
def test_align_configs_load_and_validate(name):
    path = ROOT / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first == f"# aetheris distill --config configs/{name} --stages align"
    cfg = load_distill_config(path)
    assert cfg.student.options["gate"] == "sigmoid"
    if name == "tiny-aya-align.yaml":
        assert "accelerate launch" in path.read_text()
        from test_transfer import tiny_aya_config

        scfg, pairs = build_student(cfg, tiny_aya_config())
        assert len(pairs) == 12 and [p.init for p in pairs][:2] == [2, 5]
        counts = scfg.param_counts()
        assert abs(counts["total"] - 3.96e9) < 0.01e9 and abs(counts["active"] - 1.52e9) < 0.01e9


def test_student_fields_that_follow_the_teacher_cannot_be_overridden(tiny_cohere2_teacher):
    cfg = load_distill_config(ROOT / "configs" / "nano-align.yaml", ["student.options.n_heads=8"])
    with pytest.raises(ValueError, match="n_heads"):
        build_student(cfg, tiny_cohere2_teacher.config)
    with pytest.raises(ValueError, match="did you mean 'student.options.n_heads'"):
        load_distill_config(ROOT / "configs" / "nano-align.yaml", ["student.options.n_head=8"])


def test_unsupported_teacher_fails_before_training(tmp_path):
    from transformers import GPT2Config

    from aetheris.distill import run_align
    from aetheris.teacher import TeacherError

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    cfg = load_distill_config(ROOT / "configs" / "nano-align.yaml",
                              [f"teacher.name={tmp_path / 'gpt2'}", f"align.train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(TeacherError, match="supported: Cohere2ForCausalLM"):
        run_align(cfg)
    assert not (tmp_path / "run").exists()


def test_heldout_kl_is_zero_against_itself_and_chunking_does_not_matter(tiny_cohere2_teacher):
    from aetheris.distill import heldout_kl
    from aetheris.model import Aetheris
    from aetheris.transfer import student_config

    rows = {"en": {"input_ids": torch.randint(0, tiny_cohere2_teacher.config.vocab_size, (3, 20))}}

    class AsStudent(torch.nn.Module):  # the teacher wearing the student's call signature
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, **_):
            return self.m(input_ids=x)

    assert heldout_kl(tiny_cohere2_teacher, AsStudent(tiny_cohere2_teacher), rows)["mean"] == pytest.approx(0, abs=1e-6)
    student = Aetheris(student_config(tiny_cohere2_teacher.config, n_pairs=2)).eval()
    a = heldout_kl(tiny_cohere2_teacher, student, rows, batch_size=3, chunk=256)
    b = heldout_kl(tiny_cohere2_teacher, student, rows, batch_size=1, chunk=7)
    assert a["tokens"] == b["tokens"] == 3 * 19 and a["mean"]  # the last position of a row has no label == pytest.approx(b["mean"], rel=1e-5) and a["mean"] > 0


def test_align_resumes_from_its_checkpoint(teacher_dir, tmp_path):
    from aetheris.cli import main

    out = tmp_path / "run"
    base = ["distill", "--config", str(ROOT / "configs" / "nano-align.yaml"), "--stages", "align"]
    common = [*_overrides(teacher_dir, out, "student.n_pairs=2", "align.train.max_steps=10", "align.train.checkpoint_every=5")]
    assert main(base + common) == 0
    assert main(base + [*common[:-2], "align.train.max_steps=14", "align.train.checkpoint_every=7", "--resume"]) == 0
    report = json.loads((out / "align_report.json").read_text())
    assert report["steps"] == 14
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 14


def test_pair_forward_with_gradient_checkpointing_gives_the_same_gradients(tiny_cohere2_teacher):
    import copy

    from aetheris.distill import pair_forward
    from aetheris.model import Aetheris
    from aetheris.transfer import student_config

    torch.manual_seed(0)
    plain = Aetheris(student_config(tiny_cohere2_teacher.config, n_pairs=2)).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.gradient_checkpointing = True
    h = torch.randn(2, 9, tiny_cohere2_teacher.config.hidden_size, dtype=torch.float64)
    for m in (plain, ckpt):
        out, aux = pair_forward(m, 1, h)
        (out.square().sum() + aux).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def _run_align_cli(teacher_dir, out_dir, nproc, *extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(29700 + nproc + os.getpid() % 500)]
    cmd = [*launcher, "-m", "aetheris.cli", "distill", "--config", str(ROOT / "configs" / "nano-align.yaml"),
           "--stages", "align",
           *_overrides(teacher_dir, out_dir, "student.n_pairs=2", "align.train.max_steps=4", "align.mixer_only_fraction=0.5",
                       "align.train.warmup_steps=1", "align.train.log_every=1", "align.train.threads=1", "align.report_rows_per_language=1",
                       "data.languages=[en, sw, hi, zh]", "data.sources=[{type: corpus, max_lines_per_language: 60}]",
                       *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_process_alignment_matches_one_process_with_grad_accumulation(teacher_dir, tmp_path):
    """torchrun (2 ranks, gloo) == 1 process x 2 micro-batches, through both phases (mixer-only, whole pair):
    the pairs run inside the DDP-wrapped module, so their gradients are all-reduced."""
    from safetensors.torch import load_file

    one = _run_align_cli(teacher_dir, tmp_path / "one", 1, "align.train.micro_batch_size=2", "align.train.grad_accum=2")
    two = _run_align_cli(teacher_dir, tmp_path / "two", 2, "align.train.micro_batch_size=2", "align.train.grad_accum=1")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["mixer_only"] for r in one] == [r["mixer_only"] for r in two] == [1.0, 1.0, 0.0, 0.0]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["pair_nmse"] == pytest.approx(a["pair_nmse"], rel=1e-5)
    w1, w2 = (load_file(str(tmp_path / run / "student" / "model.safetensors")) for run in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_student_options_from_yaml_merge_with_the_exact_transfer_defaults(tmp_path):
    from aetheris.config_io import ConfigError
    from aetheris.distill import EXACT_TRANSFER

    path = tmp_path / "partial.yaml"
    path.write_text("student:\n  options:\n    top_k: 2\n")  # names no gate: must not fall back to silu
    cfg = load_distill_config(path)
    assert cfg.student.options == {**EXACT_TRANSFER, "top_k": 2}
    cfg = load_distill_config(None, ["student.options.n_experts=2"])
    assert cfg.student.options == {**EXACT_TRANSFER, "n_experts": 2}
    assert load_distill_config(path, ["student.options.ssm_norm=true"]).student.options["ssm_norm"] is True
    with pytest.raises(ConfigError, match="student.options.gate='silu'.*student.options.gate=sigmoid"):
        load_distill_config(path, ["student.options.gate=silu"])


def test_pairs_one_at_a_time_equal_each_pair_trained_alone(teacher_dir, tiny_cohere2_teacher, tmp_path):
    """align.pairs_at_once=1 == a plain loop that trains each pair by itself (its own AdamW, the same batches,
    lr schedule, clipping and mixer-only phase), and only the group's pairs ever get optimizer state."""
    from aetheris.checkpoint import load_model
    from aetheris.distill import normalised_mse, pair_forward, pair_parameters, run_align
    from aetheris.model import Aetheris
    from aetheris.teacher import hidden_states
    from aetheris.tokenizer import load_tokenizer
    from aetheris.train import RunConfig, build_data, lr_at
    from aetheris.transfer import transfer

    out = tmp_path / "run"
    cfg = load_distill_config(ROOT / "configs" / "nano-align.yaml", _overrides(
        teacher_dir, out, "align.train.max_steps=6", "align.train.warmup_steps=2", "student.n_pairs=2", "align.pairs_at_once=1",
        "align.train.micro_batch_size=4"))
    report = run_align(cfg, teacher=tiny_cohere2_teacher, log=lambda *_: None)
    assert report["steps"] == 6
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("pairs-")) == ["pairs-00-00", "pairs-01-01"]
    got = load_model(out / "student").state_dict()

    # The reference: the same transferred student, each pair trained alone.
    scfg, pairs = build_student(cfg, tiny_cohere2_teacher.config)
    torch.manual_seed(cfg.transfer.seed)
    Aetheris(scfg)  # run_align draws a random-init student first (its KL reference): same RNG sequence
    student = Aetheris(scfg)
    tc = cfg.transfer
    transfer(tiny_cohere2_teacher, student, pairs, dt_init=tc.dt_init, attention_scale=tc.attention_scale,
             expert_noise=tc.expert_noise, router_std=tc.router_std, seed=tc.seed)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    tokenizer = load_tokenizer(teacher_dir)
    t = cfg.align.train
    mixer_only_steps = round(cfg.align.mixer_only_fraction * t.max_steps)
    for pm in pairs:
        data, _ = build_data(RunConfig(model=scfg, tokenizer=cfg.tokenizer, data=cfg.data, train=t), lambda _d: tokenizer,
                             lambda *_: None)
        params = pair_parameters(student, pm.pair)
        for p in student.parameters():
            p.requires_grad_(any(p is q for q in params))
        opt = torch.optim.AdamW(student.param_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        for step in range(t.max_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            ids = torch.as_tensor(data.stream.next_batch(t.micro_batch_size)["input_ids"])
            with torch.no_grad():
                states = hidden_states(tiny_cohere2_teacher, ids)
            mixer_only = step < mixer_only_steps
            h_out, aux = pair_forward(student, pm.pair, states[pm.first], mixer_only=mixer_only)
            loss = normalised_mse(h_out, states[pm.last + 1], states[pm.first]) + (0 if mixer_only else aux)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert opt.state and all(any(p is q for q in params) for p in opt.state)  # AdamW state: this pair's only
    want = student.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [name for name in want if not torch.equal(want[name], start[name])]
    assert any(name.startswith("layers.0.") for name in moved) and any(name.startswith("layers.3.") for name in moved)
    assert not any(name.startswith(("embed", "norm_f")) for name in moved)
