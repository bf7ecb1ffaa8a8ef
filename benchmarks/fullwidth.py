"""Tiny Aya's real widths end to end on a CPU: transfer, align -> kl -> sft, evaluate, serve, against the plan.

    flock /tmp/aetheris-heavy.lock python benchmarks/fullwidth.py --json bench-results/fullwidth.json
    python benchmarks/fullwidth.py --quick          # reduced vocabulary (16,384), a development check

Builds a ``Cohere2ForCausalLM`` with Tiny Aya's exact configuration except depth (hidden 2048, FFN 11008,
16 heads / 4 KV heads, head_dim 128, vocab 262,144, sliding-window and full-attention layers, tied
embeddings; random init, bf16) and a byte-level BPE of the same vocabulary size trained locally on the
offline 70-language corpus. ``--layers`` teacher layers (default 3: the last three of Tiny Aya's
``[sliding x3, full]`` pattern, so both kinds are present) map to ``layers / 3`` student pairs. Each stage
runs as its own ``aetheris distill`` process (stage 1 with ``align.pairs_at_once=1``), so its peak resident
memory (``wait4``'s ru_maxrss) is its own; the same config goes through ``aetheris.plan`` and the JSON
reports both, with ``max_plan_error`` = the largest |measured - plan| / plan over the stages. Then a few
items of every evaluation task and one chat request through the OpenAI-compatible app.

Per stage: peak RSS, median step time and tokens/s (from the stage's metrics.jsonl, steps after the first).
Needs ~20 GB of RAM at the default size: run it alone (the lock above) and not in the default test tier.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_AYA_PATTERN = ["sliding_attention"] * 3 + ["full_attention"]
LANGUAGES = ["en", "sw"]  # two scripts' worth of text is enough to measure; every report row costs a 262k-logit forward


def tiny_aya_config(layers: int, vocab_size: int = 262_144, tokenizer=None):
    """Tiny Aya's Cohere2Config (its published config.json) with ``layers`` layers: the last ones of its 36-layer pattern."""
    from transformers import Cohere2Config

    pattern = (TINY_AYA_PATTERN * 9)[-layers:]
    return Cohere2Config(
        vocab_size=vocab_size, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, layer_types=pattern, sliding_window=4096,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
        tie_word_embeddings=True, logit_scale=0.125, attn_implementation="eager", dtype="bfloat16",
        pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0, bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None))


def build_teacher(out: Path, layers: int, vocab: int, log) -> Path:
    """Tokenizer (BPE of ``vocab`` tokens on the offline corpus) and a random bf16 teacher in ``out/teacher``."""
    from transformers import Cohere2ForCausalLM

    from aetheris.sources import offline_corpus_documents
    from aetheris.tokenizer import load_tokenizer, train_bpe_tokenizer

    folder = out / "teacher"
    if (folder / "config.json").is_file():
        return folder
    tok_dir = out / f"tokenizer-{vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        start = time.perf_counter()
        texts = [d.text for d in offline_corpus_documents()]
        train_bpe_tokenizer(texts, vocab, min_frequency=1).save_pretrained(tok_dir)
        log(f"tokenizer: {vocab} tokens trained in {time.perf_counter() - start:.0f} s")
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    with torch.device("cpu"):
        teacher = Cohere2ForCausalLM(tiny_aya_config(layers, vocab, tokenizer)).to(torch.bfloat16)
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e9:.3f}B parameters, {layers} layers, bf16")
    del teacher
    return folder


def distill_config(out: Path, teacher: Path, args) -> dict:
    steps = args.steps
    loop = {"max_steps": steps, "micro_batch_size": 1, "warmup_steps": 1, "log_every": 1, "eval_every": 10_000,
            "checkpoint_every": 10_000, "tracker": "none", "progress": False, "mixed_precision": args.precision,
            "threads": args.threads or 0}
    return {
        "run_dir": str(out / "run"),
        "teacher": {"name": str(teacher), "dtype": "bfloat16"},
        "student": {"n_pairs": max(1, args.layers // 3), "options": {
            "gate": "sigmoid", "xbc_activation": "identity", "ssm_norm": False, "n_experts": 4, "top_k": 1,
            "gradient_checkpointing": True}},
        "align": {"pairs_at_once": 1, "report_rows_per_language": 1, "mixer_only_fraction": 0.5,
                  "train": {**loop, "lr": 1e-3}},
        "data": {"sources": [{"type": "corpus", "max_lines_per_language": 400}], "languages": LANGUAGES,
                 "seq_len": args.seq_len, "pack": True, "val_rows_per_language": 1},
        "kl": {"report_rows_per_language": 1, "chunk": 256, "train": {**loop, "lr": 5e-5}},
        "sft": {"beta": 0.5, "seq_len": args.seq_len, "chunk": 256, "eval_per_language": 1,
                "eval_languages": ["en", "sw"], "max_new_tokens": 16,
                "sources": [{"type": "toolgen", "languages": LANGUAGES, "per_language": 4, "seed": 0}],
                "train": {**loop, "lr": 2e-5}},
    }


def run_measured(cmd: list[str], log) -> tuple[float, float, str]:
    """Run ``cmd``; (peak RSS in GiB from wait4, wall seconds, stderr tail). Fails loudly on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed with exit code {code}:\n{output[-4000:]}")
    log(output.strip().splitlines()[-1] if output.strip() else "")
    return usage.ru_maxrss / (1 << 20), wall, output  # ru_maxrss is in KiB on Linux


def step_numbers(metrics: Path) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    later = records[1:] or records  # the first step pays for warm-up
    rates = [r["tokens_per_s"] for r in later if "tokens_per_s" in r]
    tokens_per_step = records[0]["tokens"]
    rate = statistics.median(rates)
    return {"steps": len(records), "tokens_per_step": tokens_per_step, "tokens_per_s": rate,
            "step_s": tokens_per_step / rate}


def serve_one_request(student: Path) -> dict:
    """One chat completion through the OpenAI-compatible app, in-process (no socket)."""
    from fastapi.testclient import TestClient

    from aetheris.checkpoint import load_model
    from aetheris.serve import create_app
    from aetheris.tokenizer import load_tokenizer

    model, tokenizer = load_model(student).eval(), load_tokenizer(student)
    start = time.perf_counter()
    with TestClient(create_app(model, tokenizer)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "aetheris", "messages": [{"role": "user", "content": "Habari ya asubuhi?"}],
            "max_tokens": 8, "temperature": 0})
    body = reply.json()
    return {"status": reply.status_code, "seconds": time.perf_counter() - start,
            "completion_tokens": body.get("usage", {}).get("completion_tokens"),
            "finish_reason": body["choices"][0]["finish_reason"] if reply.status_code == 200 else body}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], clock=False)
    p.add_argument("--layers", type=int, default=3, help="teacher layers (3 per student pair)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 262,144; --quick: 16,384)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    p.add_argument("--precision", default="no", choices=["no", "bf16"], help="train.mixed_precision of every stage")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fullwidth")
    p.add_argument("--serve", action=argparse_bool(), default=True)
    args = p.parse_args()
    vocab = args.vocab or (16_384 if args.quick else 262_144)
    common.setup(args)
    log = lambda msg: print(f"[fullwidth] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out = args.out / f"L{args.layers}-V{vocab}"
    out.mkdir(parents=True, exist_ok=True)

    teacher = build_teacher(out, args.layers, vocab, log)
    raw = distill_config(out, teacher, args)
    cfg_path = out / "distill.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))

    from aetheris.distill import load_distill_config
    from aetheris.plan import GIB, format_plan, plan_distill
    from aetheris.teacher import load_teacher_config

    cfg = load_distill_config(cfg_path)
    plan = plan_distill(cfg, processes=1, device="cpu", teacher_config=load_teacher_config(str(teacher)))
    log("plan:\n" + format_plan(plan))

    # An interrupted run (killed, out of disk) resumes at the stage it was in: finished stages are kept in
    # stages.json together with the setting they were measured under; the unfinished stage starts over.
    done_file = out / "stages.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    stages = done.get("stages", {}) if done.get("config") == raw else {}
    for stage in ("align", "kl", "sft"):
        if stage in stages and (out / "run" / stage / "student").is_dir():
            log(f"{stage}: measured in an earlier run ({stages[stage]['peak_rss_gib']:.2f} GiB), kept")
            continue
        cmd = [sys.executable, "-m", "aetheris.cli", "distill", "--config", str(cfg_path), "--stages", stage,
               "--overwrite"]
        peak, wall, _ = run_measured(cmd, log)
        numbers = step_numbers(out / "run" / stage / "metrics.jsonl")
        planned = plan[stage]["peak"] / GIB
        stages[stage] = {"peak_rss_gib": round(peak, 3), "plan_gib": round(planned, 3),
                         "plan_error": round(abs(peak - planned) / planned, 4), "wall_s": round(wall, 1), **numbers}
        log(f"{stage}: peak RSS {peak:.2f} GiB (plan {planned:.2f}), {numbers['step_s']:.2f} s/step, "
            f"{numbers['tokens_per_s']:.0f} tokens/s")
        done_file.write_text(json.dumps({"config": raw, "stages": stages}, indent=1))

    student = out / "run" / "sft" / "student"
    eval_cmd = [sys.executable, "-m", "aetheris.cli", "eval", "--model", str(student), "--tasks",
                "xcopa,mgsm,toolcall,ppl", "--languages", "en,sw", "--limit", "1", "--mgsm-shots", "0",
                "--toolcall-max-new-tokens", "32", "--output", str(out / "eval"), "--overwrite", "--batch-size", "1"]
    peak, wall, _ = run_measured(eval_cmd, log)
    results = json.loads((out / "eval" / "results.json").read_text())
    evaluation = {"peak_rss_gib": round(peak, 3), "wall_s": round(wall, 1), "items_per_language": 1,
                  "tasks": {task: {lang: {"n": r["n"], task_result["metric"]: r["score"]}
                                   for lang, r in task_result["languages"].items()}
                            for task, task_result in results["tasks"].items()}}
    serve = serve_one_request(student) if args.serve else None

    result = {"setting": {"teacher_layers": args.layers, "vocab": vocab, "seq_len": args.seq_len, "steps": args.steps,
                          "micro_batch_size": 1, "mixed_precision": args.precision, "teacher_dtype": "bfloat16",
                          "pairs_at_once": 1, "gradient_checkpointing": True,
                          "teacher_params": plan["_setting"]["teacher_params"],
                          "student_params": plan["_setting"]["student_params"]},
              "stages": stages, "max_plan_error": max(s["plan_error"] for s in stages.values()),
              "plan_table": format_plan(plan), "plan": {st: plan[st] for st in stages},
              "evaluate": evaluation, "serve": serve}
    common.emit(args, result)


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction


if __name__ == "__main__":
    main()
