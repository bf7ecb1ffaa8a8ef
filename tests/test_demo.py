"""The embedded demo end to end (``make demo-quick``'s entry point): nano teacher -> align -> kl -> sft ->
eval -> compare in one run folder; the student it produces loads through ``AutoModelForCausalLM``, chats
through ``aetheris generate --chat`` and answers ``aetheris serve`` requests; finished steps are reused."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import ROOT
from aetheris.demo import MARKER, Run, load_demo_config, main as demo_main, summary, toolcall_families

QUICK = ROOT / "configs" / "demo-quick.yaml"
pytestmark = [pytest.mark.needs_data,
              pytest.mark.xdist_group("demo")]  # one worker builds the run once (make test: --dist loadgroup)
# The tests that read the demo run are slow (make test-slow): building it takes ~2 min on 2 cores.


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert demo_main(["--config", str(QUICK), f"run_dir={run_dir}"]) == 0
    return run_dir


@pytest.mark.slow
def test_the_run_folder_holds_every_step(demo_run):
    teacher = demo_run / "teacher"
    assert (teacher / "config.json").is_file() and (teacher / "model.safetensors").is_file()
    assert json.loads((teacher / "config.json").read_text())["model_type"] == "cohere2"
    assert json.loads((teacher / "nano_teacher.json").read_text())["heldout_loss_after"] < \
        json.loads((teacher / "nano_teacher.json").read_text())["heldout_loss_before"]
    for stage in ("align", "kl", "sft"):
        folder = demo_run / "distill" / stage
        assert list((folder / "checkpoints").glob("step-*/model/model.safetensors")), f"{stage}: no checkpoint"
        assert (folder / "student" / "model.safetensors").is_file()
        assert (folder / f"{stage}_report.json").is_file()
    for role in ("teacher", "student"):
        results = json.loads((demo_run / "eval" / role / "results.json").read_text())
        assert {"ppl", "toolcall_gen", "xcopa", "mgsm"} <= set(results["tasks"])
        assert len(results["tasks"]["ppl"]["languages"]) == 70
        assert len(results["tasks"]["toolcall_gen"]["languages"]) == 70
    kl = json.loads((demo_run / "eval" / "student" / "results.json").read_text())["tasks"]["kl"]
    assert len(kl["languages"]) == 70 and all(v["score"] >= 0 for v in kl["languages"].values())


@pytest.mark.slow
def test_report_has_a_finite_des_for_every_task_and_the_plots(demo_run):
    report = json.loads((demo_run / "report" / "report.json").read_text())
    assert {"ppl", "toolcall_gen", "xcopa", "mgsm"} <= set(report["tasks"])
    for name, task in report["tasks"].items():
        assert math.isfinite(task["des"]) and task["des"] >= 0, name
    # DES is the population variance of the family mean drops written beside it.
    ppl = report["tasks"]["ppl"]
    means = [v["mean_drop"] for v in ppl["families"].values()]
    mu = sum(means) / len(means)
    assert ppl["des"] == pytest.approx(sum((m - mu) ** 2 for m in means) / len(means), rel=1e-9)
    for png in ("drops_by_language.png", "family_task_heatmap.png"):
        assert (demo_run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Degradation Equity" in (demo_run / "report" / "report.md").read_text()


@pytest.mark.slow
def test_the_student_loads_with_auto_model_and_generates(demo_run):
    import transformers

    import aetheris  # noqa: F401  (registers the model type)
    from aetheris.checkpoint import load_model
    from aetheris.generation import generate
    from aetheris.tokenizer import load_tokenizer

    student = demo_run / "distill" / "sft" / "student"
    hf = transformers.AutoModelForCausalLM.from_pretrained(student).eval()
    ours = load_model(student).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits)
    tok = load_tokenizer(student)
    out = generate(ours, tok, ["Habari ya leo?"], max_new_tokens=8, temperature=0.0)[0]
    # Greedy: the first new token is the argmax of the forward pass over the prompt.
    prompt_ids = torch.tensor([tok("Habari ya leo?")["input_ids"]])
    with torch.no_grad():
        first = int(ours(prompt_ids).logits[0, -1].argmax())
    assert out.token_ids[0] == first or (not out.token_ids and out.finish_reason == "stop")


@pytest.mark.slow
def test_generate_chat_cli_answers(demo_run, capsys):
    from aetheris.cli import main

    student = demo_run / "distill" / "sft" / "student"
    assert main(["generate", "--model", str(student), "--chat", "--prompt", "Habari ya leo?", "--max-new-tokens", "6",
                 "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert "tokens]" in out and "<|START_OF_TURN_TOKEN|>" not in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_aetheris_serve_serves_the_student(demo_run):
    import openai

    student = demo_run / "distill" / "sft" / "student"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "aetheris.cli", "serve", "--model", str(student), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "aetheris serve never became healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Habari?"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        # A tool call is grammar-constrained: it parses and names the offered function whatever the weights.
        tools = [{"type": "function", "function": json.loads(json.dumps(t))}
                 for t in json.loads((demo_run / "eval" / "toolgen-test.jsonl").read_text().splitlines()[0])["tools"]]
        call = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Nairobi?"}],
                                              tools=tools, tool_choice="required", max_tokens=64, temperature=0)
        if call.choices[0].finish_reason == "tool_calls":
            fn = call.choices[0].message.tool_calls[0].function
            assert fn.name in {t["function"]["name"] for t in tools}
            json.loads(fn.arguments)
        else:  # the token budget ran out inside the call
            assert call.choices[0].finish_reason == "length"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_rerun_reuses_finished_steps_and_redoes_what_changed(demo_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in [demo_run / "teacher" / "model.safetensors",
                                                 demo_run / "distill" / "sft" / "student" / "model.safetensors"]}
    assert demo_main(["--config", str(QUICK), f"run_dir={demo_run}", "eval.xcopa_limit=2"]) == 0
    out = capsys.readouterr().out
    assert "[teacher] done before" in out and "[distill] done before" in out
    assert "[eval] evaluate" in out and "[compare] compare" in out  # eval settings changed: eval and compare rerun
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    xcopa = json.loads((demo_run / "eval" / "teacher" / "results.json").read_text())["tasks"]["xcopa"]
    assert all(v["n"] == 2 for v in xcopa["languages"].values())


def test_run_steps_skip_redo_and_force(tmp_path):
    cfg = load_demo_config(QUICK, [f"run_dir={tmp_path / 'r'}"])
    calls = []

    def work(step):
        def go():
            Run(cfg).folder(step).mkdir(parents=True, exist_ok=True)
            calls.append(step)
        return go

    def run_all(force=False, config=cfg):
        r = Run(config, force=force, log=lambda *_: None)
        for step in ("teacher", "distill", "eval", "compare"):
            r.step(step, work(step))

    run_all()
    run_all()
    assert calls == ["teacher", "distill", "eval", "compare"]  # the second run reused everything
    changed = load_demo_config(QUICK, [f"run_dir={tmp_path / 'r'}", "teacher.steps=41"])
    run_all(config=changed)  # a teacher change invalidates every later step
    assert calls[4:] == ["teacher", "distill", "eval", "compare"]
    run_all(force=True, config=changed)
    assert calls[8:] == ["teacher", "distill", "eval", "compare"]


def test_bad_demo_settings_say_what_to_change():
    with pytest.raises(ValueError, match="ppl_start"):
        load_demo_config(QUICK, ["eval.ppl_start=10"])  # would score lines the teacher trained on
    with pytest.raises(ValueError, match="mgsm_mode"):
        load_demo_config(QUICK, ["eval.mgsm_mode=cot"])


@pytest.mark.slow
def test_write_docs_builds_the_results_page_from_the_run(demo_run, tmp_path):
    from aetheris.demo import write_docs

    run = Run(load_demo_config(QUICK, [f"run_dir={demo_run}"]))
    page = write_docs(run, tmp_path, "configs/demo-quick.yaml").read_text()
    report = json.loads((demo_run / "report" / "report.json").read_text())
    assert "Scale caveat" in page and "--ppl-start" in page and "Machine load" in page
    assert f"| ppl | bits_per_byte | {report['tasks']['ppl']['mean_drop']:.3f} |" in page  # the report's own table
    for png in ("drops_by_language.png", "family_task_heatmap.png"):
        assert f"results/{png}" in page and (tmp_path / "results" / png).is_file()


def test_a_teacher_that_cannot_fit_its_budget_warns_with_the_expected_time_before_training(tmp_path):
    from aetheris.nano_teacher import train_nano_teacher

    # demo-quick's teacher with a budget no setting can fit: the warning comes before the first training step.
    cfg = load_demo_config(QUICK, ["teacher.steps=2", "teacher.chat_steps=1", "teacher.eval_every=0",
                                   "teacher.budget_seconds=0.001"]).teacher
    lines = []
    train_nano_teacher(tmp_path / "teacher", cfg, log=lines.append)
    warning = next(i for i, line in enumerate(lines) if "WARNING" in line)
    first_step = next(i for i, line in enumerate(lines) if "teacher step" in line)
    assert warning < first_step
    assert "expected training time ~" in lines[warning] and "teacher.budget_seconds" in lines[warning]
    # Within budget: the estimate is still printed, without a warning.
    cfg = load_demo_config(QUICK, ["teacher.steps=2", "teacher.chat_steps=1", "teacher.eval_every=0",
                                   "teacher.budget_seconds=1e9"]).teacher
    lines = []
    train_nano_teacher(tmp_path / "teacher2", cfg, log=lines.append)
    assert any("expected training time ~" in line for line in lines) and not any("WARNING" in line for line in lines)


def test_an_interrupted_demo_resumes_at_the_stage_and_step_it_was_in(demo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    sft = run / "distill" / "sft"
    last = sorted((sft / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    # Killed in stage 3 after its last checkpoint: no stage report, no student, no later step finished.
    for path in (run / "distill" / MARKER, sft / "sft_report.json", run / "eval" / MARKER, run / "report" / MARKER):
        path.unlink()
    shutil.rmtree(sft / "student")
    kept = [run / "teacher" / "model.safetensors", run / "distill" / "align" / "student" / "model.safetensors",
            run / "distill" / "kl" / "student" / "model.safetensors"]
    before = {p: p.stat().st_mtime_ns for p in kept}
    capsys.readouterr()
    assert demo_main(["--config", str(QUICK), f"run_dir={run}"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "[teacher] done before" in out and "[distill] distill it into" in out and "(resuming the interrupted run)" in out
    assert "stage align finished before the interruption" in out and "stage kl finished before the interruption" in out
    assert f"resumed from {last} at step {int(last.name.split('-')[1])}" in out  # stage 3 continued, not restarted
    assert (sft / "student" / "model.safetensors").is_file() and (sft / "sft_report.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (run / "report" / "report.json").is_file() and (run / "report" / MARKER).is_file()


def test_the_summary_shows_the_teachers_tool_call_rates_per_family_and_the_students_drop_with_ci(demo_run):
    run = Run(load_demo_config(QUICK, [f"run_dir={demo_run}"]))
    task = json.loads((demo_run / "report" / "report.json").read_text())["tasks"]["toolcall_gen"]
    teacher = json.loads((demo_run / "eval" / "teacher" / "results.json").read_text())["tasks"]["toolcall_gen"]["languages"]
    rows = toolcall_families(run, json.loads((demo_run / "report" / "report.json").read_text()))
    assert {r["family"] for r in rows[:-1]} == set(task["families"]) and rows[-1]["languages"] == list(task["languages"])
    for r in rows:
        codes = r["languages"]
        # The teacher's rates are the means of its per-language results; AST and the drop come from the report.
        assert r["parsed"] == pytest.approx(sum(teacher[c]["extra"]["parsed_rate"] for c in codes) / len(codes))
        assert r["name"] == pytest.approx(sum(teacher[c]["extra"]["name_acc"] for c in codes) / len(codes))
        assert r["teacher"] == pytest.approx(sum(teacher[c]["score"] for c in codes) / len(codes))
        assert r["drop"] == pytest.approx(r["teacher"] - r["student"])
        lo, hi = r["drop_ci95"]
        assert -1 <= lo <= hi <= 1
    assert rows[-1]["drop"] == pytest.approx(task["mean_drop"]) and rows[-1]["des"] == task["des"]
    text = summary(run)
    table = text[text.index("the teacher's rates per family"):].splitlines()
    for r in rows:
        line = next(line for line in table if line.strip().startswith(r["family"]))
        assert f"{r['parsed']:.3f}" in line and f"{r['teacher']:.3f}" in line and f"{r['drop']:+.3f}" in line
        assert f"[{r['drop_ci95'][0]:.3f}, {r['drop_ci95'][1]:.3f}]" in line
    assert f"tool-calling DES {task['des']:.5f}, 95% CI [{task['des_ci95'][0]:.5f}, {task['des_ci95'][1]:.5f}]" in text


def test_the_teacher_trains_through_the_run_loop_and_stays_below_the_uniform_loss(demo_run):
    teacher = demo_run / "teacher"
    report = json.loads((teacher / "nano_teacher.json").read_text())
    cfg = report["config"]
    # Both phases ran through train.train: its metrics.jsonl holds the losses the report's history records.
    for phase, steps, offset in (("lm", cfg["steps"], 0), ("chat", cfg["chat_steps"], cfg["steps"])):
        logged = [json.loads(line) for line in (teacher / "train" / phase / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == steps
        history = {r["step"]: r for r in report["history"]}
        for r in logged:
            assert r["lm_loss"] == pytest.approx(history[offset + r["step"]]["lm_loss"])
            assert ("chat_loss" in r) == (phase == "chat")
    # Stable language modelling: no held-out loss above the uniform loss ln V after warmup, in any language at the end.
    uniform = math.log(json.loads((teacher / "config.json").read_text())["vocab_size"])
    assert report["uniform_loss"] == pytest.approx(uniform)
    heldout = [r["heldout_loss"] for r in report["history"] if "heldout_loss" in r and r["step"] > cfg["warmup_steps"]]
    assert len(heldout) >= 2 and max(heldout) < uniform
    assert max(report["heldout_loss_per_language"].values()) < uniform


def test_rewriting_results_keeps_the_equity_study_section():
    """``--write-docs`` regenerates the demo's part of RESULTS.md; the study's section (written by
    experiments/equity_sampling.py's run, not by the demo) must survive it, and nothing else is carried over."""
    from aetheris.demo import kept_sections

    old = "# Results\n\nold demo tables\n\n## The equity-sampling study (x)\n\n| arm | DES |\n|---|---|\n"
    assert kept_sections(old) == "\n## The equity-sampling study (x)\n\n| arm | DES |\n|---|---|\n"
    assert kept_sections("# Results\n\nonly the demo\n") == ""
