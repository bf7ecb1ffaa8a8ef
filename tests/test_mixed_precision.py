"""bf16 mixed precision on CPU: the model under autocast matches fp32 within bf16's rounding, the carried SSM
state stays fp32 (prefill and decode), and a bf16 teacher beside an autocast student gives the fp32 KD loss.

Tolerances. bf16 keeps 8 significant bits: one rounding is off by at most 2^-9 (0.2%) relative, and a
matmul's output is rounded once (CPU bf16 GEMMs accumulate in fp32). Through the 4 layers of the tiny model
(in_proj, out_proj, expert and lm-head matmuls in bf16; router, scan, softmax and the loss in fp32) the
measured errors, over three seeds and four variants at the default init, were: logits 0.57-0.61% of their
spread (RMS of the difference / RMS of the centred fp32 logits), loss 5e-7 to 3e-5 relative, whole gradient
0.76-0.91% relative (cosine >= 0.99998). The bounds below are about 3x those for logits (2%) and gradient
(3%); the loss bound, 1e-3, leaves room for a routing flip (one moved it by 5e-4 at 5x the init scale). (Top-1 routing is discontinuous: a token whose two best experts are within bf16 noise of each other may
switch expert, so a single expert's gradient can differ by far more; the bounds are on the whole gradient.)
"""

from __future__ import annotations

import pytest
import torch

from aetheris.ssd import ssd_chunked, ssd_reference
from test_model import ids, tiny

LOGITS_RTOL, LOSS_RTOL, GRAD_RTOL = 2e-2, 1e-3, 3e-2


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("variant", [{}, {"parallel_pairs": True}, {"top_k": 2, "gradient_checkpointing": True}])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_and_backward_under_bf16_autocast_match_fp32(variant, seed):
    model = tiny(seed=seed, dtype=torch.float32, **variant).train()
    x = ids(b=2, T=40, seed=seed + 5)
    params = list(model.parameters())
    ref = model(x, labels=x)
    ref_grads = torch.autograd.grad(ref.loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
        grads = torch.autograd.grad(out.loss, params)
    assert out.logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    centred = ref.logits - ref.logits.mean(-1, keepdim=True)
    assert float((out.logits.float() - ref.logits).detach().norm() / centred.detach().norm()) < LOGITS_RTOL
    assert abs(out.loss.item() - ref.loss.item()) < LOSS_RTOL * ref.loss.item()
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 master weights get fp32 gradients
    assert _relative(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])) < GRAD_RTOL
    assert torch.isfinite(out.aux_loss) and out.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("scan", [ssd_chunked, ssd_reference])
def test_the_scan_returns_its_final_state_in_fp32_for_bf16_inputs(scan):
    # The state carried into decoding must not be rounded to bf16 at the end of the prefill: it is the
    # fp32 state of the same (bf16-valued) inputs.
    g = torch.Generator().manual_seed(0)
    b, T, G, R, P, N = 2, 37, 2, 2, 8, 8
    x = torch.randn(b, T, G, P, generator=g).bfloat16()
    dt = (torch.rand(b, T, G * R, generator=g) * 0.1).bfloat16()
    A = -torch.rand(G * R, generator=g) - 0.5
    B = torch.randn(b, T, G, N, generator=g).bfloat16()
    C = torch.randn(b, T, G * R, N, generator=g).bfloat16()
    args = (8,) if scan is ssd_chunked else ()
    y, S = scan(x, dt, A, B, C, *args)
    y32, S32 = scan(x.float(), dt.float(), A, B.float(), C.float(), *args)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(S, S32, rtol=1e-6, atol=1e-6)  # bf16 rounding would be ~4e-3 relative
    assert not torch.equal(S, S.bfloat16().float())  # the state carries more than bf16's bits


def test_bf16_model_carries_an_fp32_state_through_prefill_and_decode():
    model = tiny(dtype=torch.bfloat16)
    x = ids(b=2, T=24)
    full = model(x).logits
    prefix = model(x[:, :10])
    cache = prefix.cache
    assert all(s.ssm.dtype == torch.float32 for s in cache.states)
    logits = [prefix.logits[:, -1]]
    for t in range(10, x.shape[1] - 1):
        logits.append(model.step(x[:, t], cache))
    assert all(s.ssm.dtype == torch.float32 for s in cache.states)
    assert all(s.ssm.dtype == torch.float32 for s in model.empty_cache(2).states)
    decoded = torch.stack(logits, 1)
    assert decoded.dtype == torch.bfloat16
    # Decoding and the full forward round differently in bf16; both stay within bf16 noise of each other.
    ref = full[:, 9:-1].float()
    assert float((decoded.float() - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()) < LOGITS_RTOL


def test_bf16_teacher_beside_an_autocast_student_gives_the_fp32_kd_loss(tiny_cohere2_teacher, tiny_tokenizer):
    import copy

    from aetheris.distill import make_kd_loss
    from aetheris.model import Aetheris
    from aetheris.config import AetherisConfig
    from aetheris.transfer import layer_map, student_config, transfer

    teacher32 = tiny_cohere2_teacher
    teacher16 = copy.deepcopy(teacher32).to(torch.bfloat16)
    scfg = student_config(teacher32.config, n_pairs=2, gate="sigmoid", xbc_activation="identity", ssm_norm=False)
    assert isinstance(scfg, AetherisConfig)
    torch.manual_seed(0)
    student = Aetheris(scfg)
    transfer(teacher32, student, layer_map(teacher32.config.num_hidden_layers, 2), expert_noise=0.1)
    text = "Habari ya asubuhi. The quick brown fox jumps over the lazy dog. Bonjour à tous."
    x = torch.tensor([tiny_tokenizer.encode(text)[:48]] * 2)
    batch = {"input_ids": x, "labels": x.clone(), "doc_ids": torch.zeros_like(x)}
    ref_loss, ref_m = make_kd_loss(teacher32, kind="forward", temperature=1.0, chunk=16, w_kl=1.0, w_ce=0.5)(student, batch)
    loss_fn = make_kd_loss(teacher16, kind="forward", temperature=1.0, chunk=16, w_kl=1.0, w_ce=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = loss_fn(student, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    # Measured: KL 0.16641 (fp32) vs 0.16603 (bf16 teacher, autocast student), 0.23% apart; CE 1.2e-5 apart.
    assert abs(float(metrics["kl"]) - float(ref_m["kl"])) < 2e-2 * float(ref_m["kl"])
    assert abs(float(metrics["ce"]) - float(ref_m["ce"])) < LOSS_RTOL * float(ref_m["ce"])


def _autocast_spy(monkeypatch) -> list:
    """Record, for every SSM mixer forward that builds a graph (training steps), whether bf16 autocast was on
    and the dtype its input projection produced. The real forward still runs."""
    from aetheris.model import SSMMixer

    seen, forward = [], SSMMixer.forward

    def spy(self, u, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"), self.in_proj(u).dtype))
        return forward(self, u, *args, **kwargs)

    monkeypatch.setattr(SSMMixer, "forward", spy)
    return seen


def test_every_distill_stage_trains_under_bf16_with_a_bf16_teacher(teacher_dir, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from aetheris.cli import main

    langs = "[en, sw]"
    common = [f"teacher.name={teacher_dir}", "teacher.dtype=bfloat16", f"run_dir={tmp_path / 'run'}",
              f"data.languages={langs}", "data.sources=[{type: corpus, max_lines_per_language: 60}]", "data.seq_len=32",
              "student.n_pairs=2", "align.report_rows_per_language=1", "kl.report_rows_per_language=1", "sft.beta=0.5",
              f"sft.sources=[{{type: toolgen, languages: {langs}, per_language: 2, tools_offered: 1}}]",
              f"sft.eval_languages={langs}", "sft.eval_tools_offered=1", "sft.seq_len=512", "sft.eval_per_language=1",
              "sft.max_new_tokens=4"]
    for t in ("align.train", "kl.train", "sft.train"):
        common += [f"{t}.max_steps=2", f"{t}.micro_batch_size=2", f"{t}.progress=false", f"{t}.mixed_precision=bf16"]
    config = str(Path(__file__).resolve().parents[1] / "configs" / "nano-distill.yaml")
    for stage in ("align", "kl", "sft"):
        seen = _autocast_spy(monkeypatch)
        assert main(["distill", "--config", config, "--stages", stage, *common]) == 0
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, stage
        records = [json.loads(line) for line in (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
        if stage != "align":
            assert all(r["kl"] > 0 for r in records)  # the bf16 teacher took part


def test_aetheris_train_runs_under_bf16(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from aetheris.cli import main

    tiny_yaml = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml")
    seen = _autocast_spy(monkeypatch)
    assert main(["train", "--config", tiny_yaml, f"train.out_dir={tmp_path / 'bf16'}", "train.mixed_precision=bf16",
                 "train.max_steps=3", "train.eval_every=3"]) == 0
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in records)
    # The next run in the same process may choose another precision (Accelerate keeps one per process).
    seen.clear()
    assert main(["train", "--config", tiny_yaml, f"train.out_dir={tmp_path / 'fp32'}", "train.mixed_precision=no",
                 "train.max_steps=1"]) == 0
    assert seen and set(seen) == {(False, torch.float32)}
