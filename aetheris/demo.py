"""The embedded default (``make demo``): the whole teacher -> student -> equity story on a laptop CPU.

    python -m aetheris.demo [--config configs/demo.yaml] [--force] [key.sub=value ...]
    aetheris demo --config configs/demo-quick.yaml                     # the 3-minute variant (make demo-quick)

Four steps, each the same code a real run uses (only the config is small), all in one run folder:

1. **teacher** -- a nano Cohere2 (``aetheris.nano_teacher``: Tiny Aya's structure, a BPE trained on the
   70-language corpus, language modelling then tool-calling chat) -> ``RUN/teacher``.
2. **distill** -- ``aetheris distill`` stage by stage (align -> kl -> sft, ``configs/nano-distill.yaml`` plus the
   demo's overrides) -> ``RUN/distill/{align,kl,sft}``; the final student is ``RUN/distill/sft/student``.
3. **eval** -- ``aetheris eval`` on teacher and student, the same tasks, prompts and data: bits per byte on
   held-out parallel text in all 70 languages (+ KL(teacher || student) per token), the generated tool-calling
   set (held-out templates, all 70 languages), XCOPA and mGSM -> ``RUN/eval/{teacher,student}``.
4. **compare** -- ``aetheris compare``: drops, the Degradation Equity Score, bootstrap intervals, plots ->
   ``RUN/report``; then a per-family summary table and the commands to chat with and serve the student.

Each finished step records the settings it ran with (``RUN/<step>/.demo-step.json``); a rerun skips steps
whose settings (and those of every step before them) are unchanged, and redoes the rest. An interrupted step
(``RUN/<step>/.demo-started.json`` without the finished marker) resumes where it stopped when its settings are
unchanged: distillation keeps its finished stages and continues the interrupted one from its last checkpoint
(``aetheris distill --resume``), evaluation keeps the languages already in its cache. ``--force``
(``make demo FORCE=1``) redoes everything.

``--write-docs DIR`` copies a finished run's report into ``DIR/RESULTS.md`` and its plots (``docs/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aetheris.cli import main as cli_main
from aetheris.config_io import add_config_help, apply_overrides, build, load_yaml
from aetheris.nano_teacher import NanoTeacherConfig, train_nano_teacher
from aetheris.toolgen import generate_examples

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
STEPS = ("teacher", "distill", "eval", "compare")
MARKER = ".demo-step.json"
STARTED = ".demo-started.json"


@dataclass
class EvalConfig:
    """What the demo evaluates teacher and student on, and how much of each task."""

    batch_size: int = 16
    """Batch size of the ``aetheris eval`` runs (teacher and student alike)."""
    ppl_start: int = 300
    """First corpus sentence scored: past the teacher's and the student's training lines (``lines_per_language``
    and ``data.sources[0].max_lines_per_language``), so bits per byte and KL are measured on unseen text."""
    ppl_max_sentences: int = 16
    """Sentences per language (70 languages)."""
    toolcall_per_language: int = 4
    """Generated tool-calling requests per language, held-out templates (70 languages)."""
    toolcall_tools_offered: int = 2
    """Tool schemas offered per request (the expected one among them)."""
    toolcall_max_new_tokens: int = 128
    """Generation cap per request: a correct call to these schemas takes 80 nano-BPE tokens at the median and up to
    98 (2,048-token BPE, held-out templates), so 128 leaves slack; a looping model stops here."""
    xcopa_limit: int = 100
    """XCOPA examples per language (12 languages); 0 skips XCOPA."""
    mgsm_limit: int = 8
    """mGSM questions per language (11 languages); 0 skips mGSM."""
    mgsm_mode: str = "direct"
    """mGSM prompting: direct | native_cot | en_cot."""
    mgsm_shots: int = 2
    """Few-shot exemplars before each mGSM question (0-8)."""
    mgsm_languages: list = field(default_factory=list)
    """Empty: all 11."""


@dataclass
class DemoConfig:
    """A ``make demo`` / ``aetheris demo`` config: nano teacher -> distilled student -> evaluation -> equity report."""

    run_dir: str = "runs/demo"
    """The demo's folder: the teacher, the distillation run, the evaluations and the report go under it."""
    teacher: NanoTeacherConfig = field(default_factory=NanoTeacherConfig)
    distill_config: str = "configs/nano-distill.yaml"
    """The distillation config (relative paths are from the repository root)."""
    distill: list = field(default_factory=list)
    """``key.sub=value`` overrides for the distillation config (teacher.name and run_dir are set by the demo)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""

    def __post_init__(self):
        if self.eval.mgsm_mode not in ("direct", "native_cot", "en_cot"):
            raise ValueError(f"eval.mgsm_mode={self.eval.mgsm_mode!r}: choose direct, native_cot or en_cot")
        lines = self.teacher.lines_per_language
        if self.eval.ppl_start < lines:
            raise ValueError(f"eval.ppl_start={self.eval.ppl_start} would score corpus lines the teacher trained on "
                             f"(teacher.lines_per_language={lines}); set eval.ppl_start >= {lines}")
        if not 0 < self.eval.ppl_start + self.eval.ppl_max_sentences <= 400:
            raise ValueError("eval.ppl_start + eval.ppl_max_sentences must stay within the 400 Javanese (NusaX) "
                             f"test sentences, got {self.eval.ppl_start} + {self.eval.ppl_max_sentences}")


def load_demo_config(path: str | Path | None = None, overrides=()) -> DemoConfig:
    raw = load_yaml(path) if path is not None else {}
    return build(DemoConfig, apply_overrides(raw, list(overrides), DemoConfig))


# ---------------------------------------------------------------------------------------------------
# Run folder bookkeeping


class Run:
    """The run folder: step paths, and which steps are already done with the same settings."""

    def __init__(self, cfg: DemoConfig, force: bool = False, log=print):
        self.cfg, self.root, self.log = cfg, Path(cfg.run_dir), log
        self.teacher = self.root / "teacher"
        self.distill = self.root / "distill"
        self.student = self.distill / "sft" / "student"
        self.eval = self.root / "eval"
        self.report = self.root / "report"
        self.seconds: dict[str, float] = {}
        self.load: dict[str, float] = {}
        """1-minute load average of the machine when each step (re)started."""
        self._upstream = ""
        self.redo = force
        self.resuming = False

    def settings(self, step: str) -> dict:
        c = self.cfg
        distill_text = _resolve(c.distill_config).read_text(encoding="utf-8") if step == "distill" else None
        return {"teacher": asdict(c.teacher), "distill": {"config": distill_text, "overrides": list(c.distill)},
                "eval": asdict(c.eval), "compare": {}}[step]

    def folder(self, step: str) -> Path:
        return {"teacher": self.teacher, "distill": self.distill, "eval": self.eval, "compare": self.report}[step]

    def step(self, step: str, work) -> None:
        """Run ``work()`` unless the step finished before with the same settings (and the same steps before it)."""
        key = hashlib.sha256(json.dumps([self._upstream, step, self.settings(step)], sort_keys=True).encode()).hexdigest()
        self._upstream = key
        folder, marker = self.folder(step), self.folder(step) / MARKER
        done = json.loads(marker.read_text()) if marker.exists() else {}
        if not self.redo and done.get("key") == key:
            self.seconds[step] = done.get("seconds", 0.0)
            self.log(f"\n[{step}] done before with the same settings: reusing {folder} (FORCE=1 redoes it)")
            return
        # A step interrupted with these very settings, every step before it reused, picks up where it stopped
        # (distill stages from their last checkpoint, eval from its per-language cache); anything else (--force,
        # other settings, a step before it redone now) starts over in an empty folder.
        started = folder / STARTED
        self.resuming = (not self.redo and started.exists()
                         and json.loads(started.read_text()).get("key") == key)
        self.redo = True  # every later step depends on this one
        if folder.exists() and not self.resuming:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"key": key}))
        self.log(f"\n[{step}] {STEP_TITLES[step]}" + (" (resuming the interrupted run)" if self.resuming else ""))
        self.load[step] = round(os.getloadavg()[0], 2)  # timings mean little without it (a shared machine)
        start = time.perf_counter()
        work()
        self.seconds[step] = round(time.perf_counter() - start, 1)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": key, "seconds": self.seconds[step]}))
        self.log(f"[{step}] finished in {self.seconds[step]:.0f} s")


STEP_TITLES = {
    "teacher": "train a nano Cohere2 teacher from scratch on the 70-language corpus",
    "distill": "distill it into a nano Aetheris student: align -> kl -> sft",
    "eval": "evaluate teacher and student on the same tasks, prompts and data",
    "compare": "compare: per-language drops and the Degradation Equity Score",
}


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def _cli(*argv: str, log=print) -> None:
    """Run one ``aetheris`` command in-process, echoing it, and stop the demo if it fails."""
    log("$ aetheris " + " ".join(_quote(a) for a in argv))
    rc = cli_main(list(argv))
    if rc != 0:
        raise SystemExit(f"demo stopped: `aetheris {argv[0]}` exited with {rc} (see the message above); "
                         "finished steps are kept and reused on the next run")


def _relative(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(ch in arg for ch in " []{}*,") else arg


# ---------------------------------------------------------------------------------------------------
# The four steps


def step_teacher(run: Run) -> None:
    if run.resuming:
        run.log("(the nano teacher saves no mid-training checkpoints -- it trains in minutes -- so it starts over)")
    run.log(f"$ python -m aetheris.nano_teacher {run.teacher}")
    train_nano_teacher(run.teacher, run.cfg.teacher, log=run.log)


def distill_overrides(run: Run) -> list[str]:
    return [f"teacher.name={run.teacher}", f"run_dir={run.distill}", *run.cfg.distill]


def step_distill(run: Run) -> None:
    config = str(_resolve(run.cfg.distill_config))
    for stage in ("align", "kl", "sft"):  # one stage per command, as a user would resume them
        if run.resuming and (run.distill / stage / f"{stage}_report.json").is_file():
            run.log(f"[distill] stage {stage} finished before the interruption: kept")
            continue
        _cli("distill", "--config", config, "--stages", stage, *distill_overrides(run),
             *(["--resume"] if run.resuming else []), log=run.log)


def toolcall_file(run: Run) -> Path:
    """The generated set's held-out templates for all 70 languages, as an ``--toolcall-file``."""
    e = run.cfg.eval
    path = run.eval / "toolgen-test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = generate_examples("all", "test", e.toolcall_per_language, tools_offered=e.toolcall_tools_offered)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in examples), encoding="utf-8")
    return path


def eval_commands(run: Run, model: Path, output: Path, teacher: Path | None) -> list[list[str]]:
    e = run.cfg.eval
    common = ["--model", str(model), "--output", str(output), "--batch-size", str(e.batch_size)]
    # The demo's models trained on the first lines of each language only; --ppl-start skips past them.
    cmds = [["eval", *common, "--tasks", "ppl", "--ppl-split", "all", "--ppl-start", str(e.ppl_start),
             "--ppl-max-sentences", str(e.ppl_max_sentences), *(["--teacher", str(teacher)] if teacher else [])],
            ["eval", *common, "--tasks", "toolcall", "--toolcall-file", str(run.eval / "toolgen-test.jsonl"),
             "--no-toolcall-xsid", "--toolcall-max-new-tokens", str(e.toolcall_max_new_tokens)]]
    if e.xcopa_limit:
        cmds.append(["eval", *common, "--tasks", "xcopa", "--limit", str(e.xcopa_limit)])
    if e.mgsm_limit:
        cmds.append(["eval", *common, "--tasks", "mgsm", "--limit", str(e.mgsm_limit), "--mgsm-mode", e.mgsm_mode,
                     "--mgsm-shots", str(e.mgsm_shots),
                     *(["--languages", ",".join(e.mgsm_languages)] if e.mgsm_languages else [])])
    return cmds


def step_eval(run: Run) -> None:
    toolcall_file(run)
    for role, model in (("teacher", run.teacher), ("student", run.student)):
        teacher = run.teacher if role == "student" else None  # KL(teacher || student) on the student's run
        for cmd in eval_commands(run, model, run.eval / role, teacher):
            _cli(*cmd, log=run.log)


def step_compare(run: Run) -> None:
    _cli("compare", "--teacher", str(run.eval / "teacher"), "--student", str(run.eval / "student"),
         "--output", str(run.report), log=run.log)


# ---------------------------------------------------------------------------------------------------
# Summary


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


TOOL_RATES = ("parsed_rate", "schema_valid_rate", "name_acc", "exact_acc")


def toolcall_rates(run: Run) -> dict[str, dict[str, float]]:
    """Parse / schema / name / exact rates of teacher and student on the generated set (the report's main
    tool-calling score is the stricter BFCL AST match; at nano scale these show where each model stands)."""
    out = {}
    for role in ("teacher", "student"):
        path = run.eval / role / "results.json"
        entry = json.loads(path.read_text(encoding="utf-8"))["tasks"].get("toolcall_gen") if path.exists() else None
        if entry:
            langs = list(entry["languages"].values())
            out[role] = {k: sum(v["extra"].get(k, 0.0) for v in langs) / len(langs) for k in TOOL_RATES}
    return out


def toolcall_families(run: Run, report: dict) -> list[dict]:
    """Per family (worst drop first): the teacher's parse / name / AST-match rates and the student's AST match on
    the generated set, the drop (teacher - student AST) with its 95% interval; the task's mean over languages last.
    Rates are means over the family's languages (``aetheris eval`` results; AST and the interval from the report)."""
    task = report["tasks"].get("toolcall_gen")
    path = run.eval / "teacher" / "results.json"
    if not task or not path.exists():
        return []
    langs = json.loads(path.read_text(encoding="utf-8"))["tasks"]["toolcall_gen"]["languages"]

    def rate(codes, key):
        return sum(langs[c]["extra"].get(key, 0.0) for c in codes) / len(codes)

    rows = [{"family": fam, "languages": v["languages"], "parsed": rate(v["languages"], "parsed_rate"),
             "name": rate(v["languages"], "name_acc"), "teacher": v["teacher"], "student": v["student"],
             "drop": v["mean_drop"], "drop_ci95": v.get("drop_ci95")}
            for fam, v in sorted(task["families"].items(), key=lambda kv: -kv[1]["mean_drop"])]
    every = list(task["languages"])
    rows.append({"family": "all (mean over languages)", "languages": every, "parsed": rate(every, "parsed_rate"),
                 "name": rate(every, "name_acc"),
                 "teacher": sum(v["teacher"] for v in task["languages"].values()) / len(every),
                 "student": sum(v["student"] for v in task["languages"].values()) / len(every),
                 "drop": task["mean_drop"], "drop_ci95": task.get("mean_drop_ci95"),
                 "des": task["des"], "des_ci95": task.get("des_ci95")})
    return rows


def _ci(ci, digits: int = 3) -> str:
    return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]" if ci else "-"


def summary(run: Run) -> str:
    """The per-family table of the 70-language task (bits per byte), the DES of every task, what to run next."""
    report = json.loads((run.report / "report.json").read_text(encoding="utf-8"))
    tasks = report["tasks"]
    lines = []
    main = tasks.get("ppl")
    if main:
        lines += ["", "Bits per byte on held-out parallel text, 70 languages (lower is better; drop = student - teacher):",
                  "", f"  {'family':<24} {'langs':>5} {'teacher':>8} {'student':>8} {'drop':>7}"]
        per_lang = main["languages"]
        for fam, v in sorted(main["families"].items(), key=lambda kv: -kv[1]["mean_drop"]):
            langs = [per_lang[c] for c in v["languages"]]
            t = sum(x["teacher"] for x in langs) / len(langs)
            s = sum(x["student"] for x in langs) / len(langs)
            lines.append(f"  {fam:<24} {len(langs):>5} {t:>8.3f} {s:>8.3f} {v['mean_drop']:>+7.3f}")
    lines += ["", "Degradation Equity Score per task (variance of family mean drops; lower = fairer):", "",
              f"  {'task':<16} {'metric':<18} {'mean drop':>9} {'DES':>10} {'95% CI':>22}  worst family"]
    for name, t in tasks.items():
        ci = t.get("des_ci95")
        ci_s = f"[{_f(ci[0], 5)}, {_f(ci[1], 5)}]" if ci else "-"
        lines.append(f"  {name:<16} {t['metric']:<18} {_f(t['mean_drop']):>9} {_f(t['des'], 5):>10} {ci_s:>22}  "
                     f"{t['worst_family']}")
    families = toolcall_families(run, report)
    if families:
        header = f"  {'family':<26} {'langs':>5} {'parsed':>7} {'name':>6} {'AST':>6} {'student':>8} {'drop':>7} {'95% CI':>16}"
        lines += ["", "Tool calling, generated set (held-out templates, 70 languages): the teacher's rates per family and",
                  "the student's drop in BFCL AST match (teacher - student; 95% interval: examples and languages resampled):",
                  "", header]
        for r in families:
            lines.append(f"  {r['family']:<26} {len(r['languages']):>5} {r['parsed']:>7.3f} {r['name']:>6.3f} "
                         f"{r['teacher']:>6.3f} {r['student']:>8.3f} {r['drop']:>+7.3f} {_ci(r['drop_ci95']):>16}")
        last = families[-1]
        lines.append(f"  tool-calling DES {_f(last['des'], 5)}, 95% CI {_ci(last['des_ci95'], 5)}")
    tool = toolcall_rates(run)
    if tool:
        lines += ["", "Tool calling, generated set (held-out templates, 70 languages), mean over languages:", "",
                  f"  {'':<8} " + " ".join(f"{k.split('_')[0]:>8}" for k in TOOL_RATES)]
        lines += [f"  {role:<8} " + " ".join(f"{tool[role][k]:>8.3f}" for k in TOOL_RATES) for role in tool]
    if report.get("kl"):
        kl = report["kl"]
        lines.append(f"\n  KL(teacher || student), nats/token: mean {sum(kl.values()) / len(kl):.3f} over {len(kl)} languages "
                     f"(highest: {', '.join(f'{c} {v:.2f}' for c, v in sorted(kl.items(), key=lambda kv: -kv[1])[:3])})")
    lines += ["", "Nano models score near chance on XCOPA (50%) and near 0 on mGSM: read those rows as a check that the",
              "pipeline runs, not as findings. Bits per byte, KL and tool calling are where nano-scale drops mean something."]
    return "\n".join(lines)


def next_commands(run: Run) -> str:
    s = run.student
    return "\n".join([
        "", "The student is an ordinary checkpoint folder:",
        f"  aetheris generate --model {s} --chat --prompt 'Habari ya leo?'",
        f"  aetheris serve --model {s}          # OpenAI API at http://127.0.0.1:8000/v1, chat page at /",
        f"  python -c \"import aetheris, transformers; transformers.AutoModelForCausalLM.from_pretrained('{s}')\"",
        f"Report: {run.report / 'report.html'} (everything on one page; also report.md, report.json, PNG plots)",
    ])


def write_docs(run: Run, folder: Path, config: str) -> Path:
    """``folder/RESULTS.md`` (+ plots under ``folder/results/``) from a finished run's report."""
    report_md = (run.report / "report.md").read_text(encoding="utf-8")
    plots = folder / "results"
    plots.mkdir(parents=True, exist_ok=True)
    for png in ("drops_by_language.png", "family_task_heatmap.png"):
        shutil.copyfile(run.report / png, plots / png)
    timing = json.loads((run.root / "timing.json").read_text()) if (run.root / "timing.json").exists() else {}
    teacher = json.loads((run.teacher / "nano_teacher.json").read_text())
    reports = {st: json.loads((run.distill / st / f"{st}_report.json").read_text()) for st in ("align", "kl", "sft")}
    text = [
        "# Results: the embedded demo (nano teacher -> nano student)", "",
        f"Generated by `python -m aetheris.demo --config {config} --write-docs {folder}` (`make results`) on a "
        f"2-core CPU ({torch.get_num_threads()} torch threads). **Scale caveat:** the teacher is a "
        f"{teacher['parameters'] / 1e6:.1f}M-parameter Cohere2 trained for {teacher['config']['steps']} language-modelling "
        f"steps on {teacher['config']['lines_per_language']} lines per language and {teacher['config']['chat_steps']} "
        "steps with tool-calling chat; the student is a nano Aetheris distilled "
        "from it in minutes. These numbers show the pipeline and the report working end to end; they say nothing "
        "about how Tiny Aya compresses. XCOPA and mGSM sit at chance / zero for both models at this size.", "",
        "Bits per byte and KL are measured on corpus sentences past every line either model trained on "
        f"(`--ppl-start {run.cfg.eval.ppl_start}`); tool calling on the generated set's held-out templates.", "",
        "## Pipeline", "",
        f"- Teacher held-out loss {teacher['heldout_loss_before']:.3f} -> {teacher['heldout_loss_after']:.3f} nats/token.",
        f"- Stage 1 (align): held-out KL(teacher || student) random init {reports['align']['kl_random_init']['mean']:.3f}, "
        f"after transfer {reports['align']['kl_after_transfer']['mean']:.3f}, after alignment "
        f"{reports['align']['kl_after_align']['mean']:.3f}.",
        f"- Stage 2 (kl): {reports['kl']['kl_before']['mean']:.3f} -> {reports['kl']['kl_after']['mean']:.3f}.",
        "- Stage 3 (sft): tool-call parse rate {:.2f} -> {:.2f}, name accuracy {:.2f} -> {:.2f} (held-out templates){}.".format(
            reports["sft"]["toolcall_before"]["overall"]["parsed"], reports["sft"]["toolcall_after"]["overall"]["parsed"],
            reports["sft"]["toolcall_before"]["overall"]["name"], reports["sft"]["toolcall_after"]["overall"]["name"],
            "; held-out KL {:.3f} -> {:.3f} with replay every {} steps".format(
                reports["sft"]["kl_before"]["mean"], reports["sft"]["kl_after"]["mean"], reports["sft"]["replay_every"])
            if "kl_after" in reports["sft"] else ""),
    ]
    families = toolcall_families(run, json.loads((run.report / "report.json").read_text(encoding="utf-8")))
    if families:
        text += ["", ("Tool calling per family on the generated set (held-out templates, 70 languages): the teacher's "
                      "parse, function-name and BFCL AST-match rates, the student's AST match and the drop (teacher - "
                      "student) with its 95% bootstrap interval (examples and languages resampled):"), "",
                 "| family | languages | teacher parsed | teacher name | teacher AST | student AST | drop | drop 95% CI |",
                 "|---|---|---|---|---|---|---|---|"]
        text += [f"| {r['family']} | {len(r['languages'])} | {r['parsed']:.3f} | {r['name']:.3f} | {r['teacher']:.3f} | "
                 f"{r['student']:.3f} | {r['drop']:+.3f} | {_ci(r['drop_ci95'])} |" for r in families]
        text += ["", f"Tool-calling DES {_f(families[-1]['des'], 5)}, 95% CI {_ci(families[-1]['des_ci95'], 5)}."]
    tool = toolcall_rates(run)
    if tool:
        text += ["", "Tool calling on the generated set (held-out templates, 70 languages), mean over languages — the "
                 "report below scores the stricter BFCL AST match:", "",
                 "| model | " + " | ".join(TOOL_RATES) + " |", "|---|" + "---|" * len(TOOL_RATES)]
        text += [f"| {role} | " + " | ".join(f"{tool[role][k]:.3f}" for k in TOOL_RATES) + " |" for role in tool]
    if timing:
        text += ["", "Wall time per step (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()) + "."]
    load = json.loads((run.root / "load.json").read_text()) if (run.root / "load.json").exists() else {}
    if load:
        text += [f"Machine load (1-minute load average on {os.cpu_count()} cores) when each step started: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in load.items()) + "."]
    text += ["", "![drops by language](results/drops_by_language.png)", "",
             "![family x task heatmap](results/family_task_heatmap.png)", ""]
    body = report_md.split("\n", 1)[1]  # drop its title; keep every table
    out = folder / "RESULTS.md"
    kept = kept_sections(out.read_text(encoding="utf-8")) if out.exists() else ""
    out.write_text("\n".join(text) + body.replace("\n## ", "\n### ").replace("\n# ", "\n## ") + kept,
                   encoding="utf-8")
    return out


# Sections of RESULTS.md that other commands write (the equity-sampling study): a rewrite of the demo's part
# keeps them, from their heading to the end of the file.
KEPT_HEADINGS = ("## The equity-sampling study",)


def kept_sections(results_md: str) -> str:
    """The tail of an existing RESULTS.md that ``write_docs`` must not drop (from the first ``KEPT_HEADINGS``)."""
    starts = [results_md.find("\n" + h) for h in KEPT_HEADINGS]
    starts = [i for i in starts if i >= 0]
    return results_md[min(starts):] if starts else ""


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (configs/demo.yaml, configs/demo-quick.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. run_dir=/tmp/demo teacher.steps=100")
    parser.add_argument("--force", action="store_true", help="redo every step (default: reuse finished ones)")
    parser.add_argument("--write-docs", metavar="DIR", default=None,
                        help="after the run, write DIR/RESULTS.md and DIR/results/*.png from its report")
    add_config_help(parser, DemoConfig)


def run(args) -> int:
    cfg = load_demo_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    demo = Run(cfg, force=args.force)
    start = time.perf_counter()
    print(f"Aetheris demo: teacher -> student -> equity report, in {demo.root} (config {args.config})")
    demo.step("teacher", lambda: step_teacher(demo))
    demo.step("distill", lambda: step_distill(demo))
    demo.step("eval", lambda: step_eval(demo))
    demo.step("compare", lambda: step_compare(demo))
    (demo.root / "timing.json").write_text(json.dumps(demo.seconds, indent=1))
    if demo.load:
        (demo.root / "load.json").write_text(json.dumps(demo.load, indent=1))
    print(summary(demo))
    print(next_commands(demo))
    if args.write_docs:
        print(f"wrote {write_docs(demo, Path(args.write_docs), _relative(args.config))}")
    print(f"\nDemo finished in {(time.perf_counter() - start) / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in demo.seconds.items())}).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aetheris.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
