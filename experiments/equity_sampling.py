"""Which stage-2 sampling makes the nano student's losses fairest across language families, at equal compute?

    python experiments/equity_sampling.py --teacher runs/equity-teacher --out runs/equity-sampling \\
        [--demo-config configs/demo.yaml] [--seeds 0 1 2] [--dro-steps 0.01 0.03 0.1] [--lock /tmp/aetheris-cpu.lock]
    python experiments/equity_sampling.py --out runs/equity-sampling --summarize-only --plot docs/images/equity_sampling.png

Every arm starts from ONE aligned student (stage 1 runs once, ``OUT/align``) and runs the demo's stages 2 and 3
(``--demo-config``'s ``distill`` overrides on its ``distill_config``: same steps, rows and sequence length for
every arm), changing only how stage 2 samples its rows (``ARMS``): proportional (p_l ∝ n_l), language temperature
sampling, family-balanced sampling, and stabilised group-DRO over families (``aetheris.distill.FamilyDRO`` with
per-family running means; its step size is tuned first on a seed the comparison does not use). Each arm x seed
is then measured like the demo measures its student, against the same teacher:

- bits per byte and KL(teacher || student) per language on held-out corpus sentences (``--rows-per-language``
  of them per language, past every line either model trained on), after stage 2 and after stage 3;
- tool calls (function-name accuracy and parse rate) on the generated set's held-out templates, all 70
  languages, after stage 3 (what the demo ships).

Drops are student minus teacher (bits per byte), the KL itself (the teacher's KL to itself is 0) and teacher
minus student (tool-call rates). Per arm: the mean drop over languages and the DES (``aetheris.equity.des``:
population variance of family mean drops) of the per-language drops averaged over seeds, each with a bootstrap
95 % interval that resamples seeds and languages (``aetheris.equity.bootstrap_des`` for DES), and the change
against proportional sampling on the same bootstrap draws (paired). Target: DES at least 30 % lower than
proportional with the mean drop at most 5 % higher.

Resumable: each finished unit (``OUT/units/ARM/sSEED/unit.json``) is skipped on a rerun. With ``--lock`` the
script takes that lock file (``flock``) for a few units at a time (``--hold-seconds``), so other jobs interleave;
do not wrap the whole script in ``flock`` as well. Writes ``OUT/equity_sampling.json``, ``OUT/equity_sampling.md`` and the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Every config key the study sets, in one place.
KEYS = {
    "language_temperature": "data.language_temperature",
    "balance": "kl.balance",
    "dro": "kl.dro",
    "dro_step": "kl.dro_step",
    "dro_ema": "kl.dro_ema",
    "teacher": "teacher.name",
    "run_dir": "run_dir",
    "align_out": "align.train.out_dir",
    "align_threads": "align.train.threads",
    "align_progress": "align.train.progress",
    "kl_init": "kl.init",
    "kl_out": "kl.train.out_dir",
    "kl_seed": "kl.train.seed",
    "kl_threads": "kl.train.threads",
    "kl_progress": "kl.train.progress",
    "sft_init": "sft.init",
    "sft_out": "sft.train.out_dir",
    "sft_seed": "sft.train.seed",
    "sft_threads": "sft.train.threads",
    "sft_progress": "sft.train.progress",
    "sft_eval_languages": "sft.eval_languages",
    "sft_eval_per_language": "sft.eval_per_language",
}

DRO_EMA = 0.1          # running-mean rate of the stabilised DRO (about the last 10 steps)
TUNE_SEED = 100        # the DRO step is chosen on this seed; the comparison uses others
BASELINE = "proportional"
TARGET_DES_CUT = 0.30  # DES at least 30 % below proportional ...
TARGET_MEAN_SLACK = 0.05  # ... with the mean drop at most 5 % above it
METRICS = {  # name -> (title, unit); the drop is always "positive = the student is worse"
    "bpb": ("bits per byte", "student - teacher, bits/byte"),
    "kl": ("KL(teacher || student)", "nats/token"),
    "tool_name": ("tool calls: function name", "teacher - student accuracy"),
    "tool_parsed": ("tool calls: parsed", "teacher - student rate"),
    "tool_ast": ("tool calls: AST match", "teacher - student rate"),
}
STAGE_METRICS = {"final": tuple(METRICS), "kl": ("bpb", "kl")}  # after stage 3 every metric; after stage 2 no tool calls


def ov(name: str, value) -> str:
    """One ``key=value`` override by the study's name for the key (``KEYS``)."""
    if isinstance(value, float) and math.isinf(value):
        value = ".inf"
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"{KEYS[name]}={value}"


def arms(dro_step: float, temperatures=(3.0, math.inf)) -> dict[str, list[str]]:
    """Arm name -> the overrides that set its stage-2 sampling (everything else is the demo's)."""
    proportional = [ov("language_temperature", 1.0), ov("balance", "language"), ov("dro", False)]
    out = {BASELINE: proportional}
    for t in temperatures:
        out[f"temperature-{'inf' if math.isinf(t) else f'{t:g}'}"] = [
            ov("language_temperature", t), ov("balance", "language"), ov("dro", False)]
    # p_f ∝ n_f^(1/T) over families with T = inf: every family equally often, proportional within it
    out["family-balanced"] = [ov("language_temperature", math.inf), ov("balance", "family"), ov("dro", False)]
    out["group-dro"] = dro_arm(dro_step)
    return out


def dro_arm(step: float) -> list[str]:
    """Proportional sampling + stabilised group-DRO over families with exponentiated-gradient step ``step``."""
    return [ov("language_temperature", 1.0), ov("balance", "language"), ov("dro", True), ov("dro_step", step),
            ov("dro_ema", DRO_EMA)]


def merge_overrides(*lists: list[str]) -> list[str]:
    """``key=value`` lists merged in order, a later value of a key replacing an earlier one (the config
    loader refuses a key set twice)."""
    merged: dict[str, str] = {}
    for items in lists:
        for item in items:
            merged.pop(item.split("=", 1)[0].strip(), None)
            merged[item.split("=", 1)[0].strip()] = item
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------
# Aggregation (pure: tested in tests/test_equity_sampling.py)


def per_language_drops(teacher: dict, student: dict) -> dict[str, dict[str, float]]:
    """Metric -> language -> drop, from two ``results.json`` dicts (student with the ppl task's KL)."""
    from aetheris.equity import drop

    t, s = teacher["tasks"], student["tasks"]
    out: dict[str, dict[str, float]] = {}
    if "ppl" in t and "ppl" in s:
        out["bpb"] = {c: drop(v["score"], s["ppl"]["languages"][c]["score"], higher_is_better=False)
                      for c, v in t["ppl"]["languages"].items() if c in s["ppl"]["languages"]}
    if "kl" in s:
        out["kl"] = {c: v["score"] for c, v in s["kl"]["languages"].items()}
    if "toolcall_gen" in t and "toolcall_gen" in s:
        tl, sl = t["toolcall_gen"]["languages"], s["toolcall_gen"]["languages"]
        for name, key in (("tool_name", "name_acc"), ("tool_parsed", "parsed_rate")):
            out[name] = {c: drop(v["extra"][key], sl[c]["extra"][key]) for c, v in tl.items() if c in sl}
        out["tool_ast"] = {c: drop(v["score"], sl[c]["score"]) for c, v in tl.items() if c in sl}
    return out


def aggregate(drops_by_seed: dict[int, dict[str, float]], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean drop and DES of one arm over seeds and languages, with bootstrap 95 % intervals.

    Point estimates use each language's drop averaged over the seeds. A bootstrap replicate resamples the
    seeds (with replacement; every language takes the same draw), then ``equity.bootstrap_des`` resamples the
    languages within each family for DES, and the mean drop resamples languages over all of them. The same
    ``seed`` with the same seeds and languages gives the same draws for every arm, so replicate-wise ratios
    between arms are paired (``against``)."""
    from aetheris.equity import bootstrap_des, des

    seeds = sorted(drops_by_seed)
    langs = sorted(set.intersection(*(set(drops_by_seed[s]) for s in seeds)))
    d = np.array([[drops_by_seed[s][c] for c in langs] for s in seeds], dtype=float)   # (S, L)
    per_language = dict(zip(langs, d.mean(0).tolist()))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    reps = d[pick].mean(1)                                                               # (n_boot, L)
    des_reps = bootstrap_des({c: reps[:, j] for j, c in enumerate(langs)}, "family", rng)
    lang_pick = rng.integers(0, len(langs), size=(n_boot, len(langs)))
    mean_reps = reps[np.arange(n_boot)[:, None], lang_pick].mean(1)
    return {
        "seeds": seeds, "n_languages": len(langs),
        "mean_drop": float(d.mean()), "mean_drop_ci95": _ci(mean_reps),
        "des": des(per_language, "family"), "des_ci95": _ci(des_reps),
        "des_per_seed": [des(dict(zip(langs, row)), "family") for row in d.tolist()],
        "mean_drop_per_seed": d.mean(1).tolist(),
        "per_language": per_language,
        "_mean_reps": mean_reps, "_des_reps": des_reps,
    }


def against(arm: dict, base: dict) -> dict:
    """Relative change of an arm's mean drop and DES against the baseline's, paired over bootstrap draws."""
    out = {}
    for key, reps in (("mean_drop", "_mean_reps"), ("des", "_des_reps")):
        change = arm[key] / base[key] - 1 if base[key] else float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = arm[reps] / base[reps] - 1
        ratio = ratio[np.isfinite(ratio)]
        out[f"{key}_change"] = change
        out[f"{key}_change_ci95"] = _ci(ratio) if ratio.size else None
    out["meets_target"] = bool(out["des_change"] <= -TARGET_DES_CUT and out["mean_drop_change"] <= TARGET_MEAN_SLACK)
    return out


def _ci(x: np.ndarray) -> list[float]:
    return [float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))]


def choose_dro_step(tuning: dict[float, dict], base: dict) -> float:
    """The DRO step of lowest KL DES among those whose mean KL is within the target's slack of proportional
    (all steps if none is); ``tuning`` maps step -> {"mean": .., "des": ..}, ``base`` the same for proportional."""
    ok = {s: r for s, r in tuning.items() if r["mean"] <= base["mean"] * (1 + TARGET_MEAN_SLACK)} or tuning
    return min(ok, key=lambda s: ok[s]["des"])


# ---------------------------------------------------------------------------------------------------
# Running the units


class CpuLock:
    """A lock file (``flock``) held across a few units of work at a time: taken before a unit when not held,
    let go after the unit that brings the hold past ``hold_seconds``, so other jobs' experiments interleave
    between chunks of this study. No path: no locking."""

    def __init__(self, path: str | None, hold_seconds: float):
        self.path, self.hold_seconds, self.fh, self.since = path, hold_seconds, None, 0.0

    @contextlib.contextmanager
    def unit(self):
        if self.path and self.fh is None:
            self.fh = open(self.path, "a")
            t0 = time.perf_counter()
            fcntl.flock(self.fh, fcntl.LOCK_EX)
            self.since = time.perf_counter()
            if self.since - t0 > 1:
                print(f"(waited {self.since - t0:.0f} s for {self.path})", flush=True)
        try:
            yield
        finally:
            if self.fh is not None and time.perf_counter() - self.since >= self.hold_seconds:
                self.release()

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class Study:
    def __init__(self, args):
        from aetheris.demo import load_demo_config

        self.args = args
        self.out = Path(args.out)
        self.demo = load_demo_config(args.demo_config)
        self.distill_config = str(ROOT / self.demo.distill_config)
        self.teacher = str(Path(args.teacher).resolve()) if args.teacher else None
        self.base = [*self.demo.distill, *args.overrides]   # the demo's stage settings, then the user's
        self.eval_options = {
            "ppl_split": "all", "ppl_start": self.demo.eval.ppl_start, "ppl_max_sentences": args.rows_per_language,
            "toolcall_xsid": False, "toolcall_max_new_tokens": self.demo.eval.toolcall_max_new_tokens,
            "toolcall_file": str((self.out / "toolgen-test.jsonl").resolve()),
        }
        self._teacher_lm = None
        self.lock = CpuLock(args.lock, args.hold_seconds)

    def config(self, *overrides: str):
        from aetheris.distill import load_distill_config

        return load_distill_config(self.distill_config, merge_overrides(
            self.base, [ov("teacher", self.teacher), ov("run_dir", "null"), *overrides]))

    # -- the shared start: stage 1 once, the teacher's scores once
    def prepare(self) -> None:
        from aetheris.distill import run_align
        from aetheris.toolgen import generate_examples

        self.out.mkdir(parents=True, exist_ok=True)
        tool_file = Path(self.eval_options["toolcall_file"])
        if not tool_file.exists():
            examples = generate_examples("all", "test", self.args.toolcalls_per_language,
                                         tools_offered=self.demo.eval.toolcall_tools_offered)
            tool_file.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in examples), encoding="utf-8")
        align = self.out / "align"
        if not (align / "align_report.json").is_file():
            with self.lock.unit():
                t0 = time.perf_counter()
                run_align(self.config(ov("align_out", align), ov("align_threads", 1), ov("align_progress", False)),
                          overwrite=True)
                (align / "seconds.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
        if not (self.out / "teacher-eval" / "results.json").is_file():
            with self.lock.unit():
                self.evaluate(Path(self.teacher), self.out / "teacher-eval", ["ppl", "toolcall"], teacher=False)

    def teacher_lm(self):
        from aetheris.evaluate import LM

        if self._teacher_lm is None:
            self._teacher_lm = LM.load(self.teacher, device="cpu", batch_size=self.demo.eval.batch_size)
        return self._teacher_lm

    def evaluate(self, model: Path, output: Path, tasks: list[str], teacher: bool = True) -> dict:
        from aetheris.evaluate import LM, evaluate

        lm = self.teacher_lm() if not teacher else LM.load(str(model), device="cpu", batch_size=self.demo.eval.batch_size)
        return evaluate(lm, tasks, output, options=self.eval_options, teacher=self.teacher_lm() if teacher else None)

    # -- one arm x seed, in two parts: stage 2 (+ its evaluation), then stage 3 (+ the final evaluation)
    def unit(self, arm: str, overrides: list[str], seed: int, part: str = "kl") -> dict:
        from aetheris.distill import run_kl, run_sft

        folder = self.out / "units" / arm / f"s{seed}"
        done = folder / f"unit-{part}.json"
        if done.is_file():
            return json.loads(done.read_text())
        with self.lock.unit():
            print(f"== {arm} seed {seed}: stage {'2' if part == 'kl' else '3'}", flush=True)
            t0 = time.perf_counter()
            if part == "kl":
                kl = run_kl(self.config(*overrides, ov("kl_init", self.out / "align" / "student"),
                                        ov("kl_out", folder / "kl"), ov("kl_seed", seed), ov("kl_threads", 1),
                                        ov("kl_progress", False)), overwrite=True)
                t1 = time.perf_counter()
                self.evaluate(folder / "kl" / "student", folder / "eval-kl", ["ppl"])
                record = {"kl_report_after": kl["kl_after"]["mean"], "dro_weights": kl.get("dro_weights")}
            else:
                run_sft(self.config(*overrides, ov("sft_init", folder / "kl" / "student"), ov("sft_out", folder / "sft"),
                                    ov("sft_seed", seed), ov("sft_threads", 1), ov("sft_progress", False),
                                    ov("sft_eval_languages", "[en]"), ov("sft_eval_per_language", 1)), overwrite=True)
                t1 = time.perf_counter()
                self.evaluate(folder / "sft" / "student", folder / "eval-final", ["ppl", "toolcall"])
            t2 = time.perf_counter()
            shutil.rmtree(folder / part / "checkpoints", ignore_errors=True)  # the student and report stay
            record = {"arm": arm, "seed": seed, "overrides": overrides, **(record if part == "kl" else {}),
                      "seconds": {"train": round(t1 - t0, 1), "eval": round(t2 - t1, 1)}}
            done.write_text(json.dumps(record, indent=1))
            print(f"== {arm} seed {seed}: stage {'2' if part == 'kl' else '3'} done, train {t1 - t0:.0f} s, "
                  f"eval {t2 - t1:.0f} s", flush=True)
            return record

    def drops(self, arm: str, seed: int, stage: str) -> dict[str, dict[str, float]]:
        teacher = json.loads((self.out / "teacher-eval" / "results.json").read_text(encoding="utf-8"))
        student = json.loads((self.out / "units" / arm / f"s{seed}" / f"eval-{stage}" / "results.json").read_text())
        return per_language_drops(teacher, student)

    def tune_dro(self) -> float:
        """Stage 2 only, on TUNE_SEED: proportional and each DRO step; KL after stage 2 decides (choose_dro_step)."""
        from aetheris.equity import des

        if self.args.dro_step is not None:
            return self.args.dro_step
        self.unit(f"tune-{BASELINE}", arms(0.0)[BASELINE], TUNE_SEED)
        for step in self.args.dro_steps:
            self.unit(f"tune-dro-{step:g}", dro_arm(step), TUNE_SEED)

        def score(name):
            kl = self.drops(name, TUNE_SEED, "kl")["kl"]
            return {"mean": float(np.mean(list(kl.values()))), "des": des(kl, "family")}
        base = score(f"tune-{BASELINE}")
        tuning = {step: score(f"tune-dro-{step:g}") for step in self.args.dro_steps}
        chosen = choose_dro_step(tuning, base)
        (self.out / "dro_tuning.json").write_text(json.dumps(
            {"seed": TUNE_SEED, "ema": DRO_EMA, "proportional": base, "steps": {f"{s:g}": r for s, r in tuning.items()},
             "chosen": chosen, "rule": "lowest KL DES with mean KL within 5 % of proportional"}, indent=1))
        return chosen


def stage2_winner(study: Study, names: list[str], seeds: list[int]) -> str:
    """The arm whose stage-2 KL comes closest to the target: meets it with the lowest DES, else the lowest DES
    among the arms within the mean-drop slack, else the lowest DES."""
    base = aggregate({s: study.drops(BASELINE, s, "kl")["kl"] for s in seeds})
    scored = {}
    for arm in names:
        if arm != BASELINE:
            agg = aggregate({s: study.drops(arm, s, "kl")["kl"] for s in seeds})
            scored[arm] = (agg["des"], against(agg, base))
    pools = ([a for a, (_, v) in scored.items() if v["meets_target"]],
             [a for a, (_, v) in scored.items() if v["mean_drop_change"] <= TARGET_MEAN_SLACK], list(scored))
    pool = next(p for p in pools if p)
    return min(pool, key=lambda a: scored[a][0])


# ---------------------------------------------------------------------------------------------------
# Summary: JSON, Markdown, plot


def summarize(study: Study, arm_names: list[str], seeds: list[int], n_boot: int) -> dict:
    result = {"arms": {arm: {} for arm in arm_names}, "target": {"des_cut": TARGET_DES_CUT, "mean_slack": TARGET_MEAN_SLACK},
              "seeds": seeds, "rows_per_language": study.args.rows_per_language}
    for stage, metrics in STAGE_METRICS.items():
        per_arm = {}
        part = "sft" if stage == "final" else "kl"
        for arm in arm_names:
            have = [s for s in seeds if (study.out / "units" / arm / f"s{s}" / f"unit-{part}.json").is_file()]
            if have:
                per_arm[arm] = {m: aggregate({s: study.drops(arm, s, stage)[m] for s in have}, n_boot) for m in metrics}
        for arm, by_metric in per_arm.items():
            entry = result["arms"].setdefault(arm, {})
            for m, agg in by_metric.items():
                row = {k: v for k, v in agg.items() if not k.startswith("_")}
                if arm != BASELINE and BASELINE in per_arm and per_arm[BASELINE][m]["seeds"] == agg["seeds"]:
                    row["vs_proportional"] = against(agg, per_arm[BASELINE][m])
                entry.setdefault(stage, {})[m] = row
    result["arms"] = {arm: entry for arm, entry in result["arms"].items() if entry}
    for arm in result["arms"]:
        for part in ("kl", "sft"):
            units = [json.loads(f.read_text()) for s in seeds
                     if (f := study.out / "units" / arm / f"s{s}" / f"unit-{part}.json").is_file()]
            if units:
                result["arms"][arm]["overrides"] = units[0]["overrides"]
                result["arms"][arm][f"seconds_{part}"] = float(np.mean([sum(u["seconds"].values()) for u in units]))
                if units[0].get("dro_weights"):
                    result["arms"][arm]["dro_weights_first_seed"] = units[0]["dro_weights"]
    tuning = study.out / "dro_tuning.json"
    if tuning.is_file():
        result["dro_tuning"] = json.loads(tuning.read_text())
    return result


def _fmt_ci(x, ci, digits) -> str:
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def markdown(result: dict) -> str:
    lines = []
    titles = {"final": "after stage 3 (the student the demo ships)", "kl": "after stage 2 (where the sampling acts)"}
    for stage, metrics in STAGE_METRICS.items():
        title = titles[stage]
        lines += [f"**{title}** — mean drop and DES (population variance of family mean drops), bootstrap 95 % "
                  "intervals over seeds and languages; change against proportional on the same draws:", ""]
        lines += ["| arm | metric | mean drop | DES | mean drop vs prop. | DES vs prop. | target |", "|---|---|---|---|---|---|---|"]
        for arm, entry in result["arms"].items():
            for m in metrics:
                r = entry.get(stage, {}).get(m)
                if r is None:
                    continue
                v = r.get("vs_proportional")
                digits = 5 if m == "kl" or m == "bpb" else 4
                change = (lambda key: f"{v[key]:+.0%} [{v[key + '_ci95'][0]:+.0%}, {v[key + '_ci95'][1]:+.0%}]"
                          if v and v.get(key + "_ci95") else "—")
                lines.append(f"| {arm} | {METRICS[m][0]} | {_fmt_ci(r['mean_drop'], r['mean_drop_ci95'], 4)} | "
                             f"{_fmt_ci(r['des'], r['des_ci95'], digits)} | {change('mean_drop_change')} | "
                             f"{change('des_change')} | {verdict(arm, r, v)} |")
        lines.append("")
    return "\n".join(lines)


def verdict(arm: str, row: dict, v: dict | None) -> str:
    if arm == BASELINE or v is None:
        return "—"
    met = "**met**" if v["meets_target"] else "no"
    return met + (" (1 seed)" if len(row["seeds"]) < 2 else "")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("kl", "bpb"), ("kl", "kl"), ("final", "kl"), ("final", "tool_name")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    colors = plt.get_cmap("tab10")
    handles = {}
    for ax, (stage, m) in zip(axes.flat, metrics):
        for i, (arm, entry) in enumerate(result["arms"].items()):
            r = entry.get(stage, {}).get(m)
            if r is None:
                continue
            x, y = r["mean_drop"], r["des"]
            xe = [[x - r["mean_drop_ci95"][0]], [r["mean_drop_ci95"][1] - x]]
            ye = [[y - r["des_ci95"][0]], [r["des_ci95"][1] - y]]
            handles[arm] = ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color=colors(i), capsize=3, label=arm)
        ax.set_title(f"{METRICS[m][0]}, {'after stage 3' if stage == 'final' else 'after stage 2'}", fontsize=9)
        ax.set_xlabel(f"mean drop ({METRICS[m][1]})", fontsize=8)
        ax.set_ylabel("DES (variance of family mean drops)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Stage-2 sampling: mean drop vs DES (lower-left is better; 95 % bootstrap intervals over seeds and languages)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="the teacher folder (e.g. a demo run's RUN/teacher); needed unless --summarize-only")
    p.add_argument("--out", default="runs/equity-sampling")
    p.add_argument("--demo-config", default=str(ROOT / "configs" / "demo.yaml"),
                   help="whose distill overrides (stage settings) and eval settings the study uses")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (default: all)")
    p.add_argument("--final-arms", nargs="+", default=None,
                   help="run stage 3 and the tool-call evaluation for these arms only (default: every arm); auto: "
                        "proportional and the stage-2 winner (stage2_winner)")
    p.add_argument("--dro-steps", type=float, nargs="+", default=[0.01, 0.03, 0.1],
                   help="DRO step sizes tried on the tuning seed")
    p.add_argument("--dro-step", type=float, default=None, help="skip tuning and use this DRO step")
    p.add_argument("--rows-per-language", type=int, default=8, help="held-out sentences per language (bits per byte, KL)")
    p.add_argument("--toolcalls-per-language", type=int, default=2, help="held-out tool-call requests per language")
    p.add_argument("--lock", default=None, help="a lock file taken (flock) around each unit, e.g. /tmp/aetheris-cpu.lock")
    p.add_argument("--hold-seconds", type=float, default=240,
                   help="with --lock: keep the lock across units for about this long, then let others take a turn")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--plot", default=None, help="PNG path of the plot (default OUT/equity_sampling.png)")
    p.add_argument("--summarize-only", action="store_true", help="write the summary from the finished units only")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra distillation overrides for every stage")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    study = Study(args)
    start = time.perf_counter()
    if args.summarize_only:
        tuning = study.out / "dro_tuning.json"
        step = args.dro_step if args.dro_step is not None else (
            json.loads(tuning.read_text())["chosen"] if tuning.is_file() else 0.0)
    else:
        if not args.teacher:
            p.error("--teacher is needed to run the study")
        study.prepare()
        step = study.tune_dro()
    chosen = arms(step)
    names = args.arms or list(chosen)
    for bad in (set(names) | set(args.final_arms or ())) - set(chosen) - {"auto"}:
        p.error(f"unknown arm {bad!r}; choose from {', '.join(chosen)}")
    if not args.summarize_only:
        # stage 2 for every arm and seed first (where the sampling acts), then stage 3 (tool calls), seed by
        # seed: a study stopped early still compares every arm on the seeds it finished
        for seed in args.seeds:
            for arm in names:
                study.unit(arm, chosen[arm], seed, "kl")
        final = args.final_arms or names
        if final == ["auto"]:
            final = [BASELINE, stage2_winner(study, names, args.seeds)]
            print(f"stage 3 for {', '.join(final)} (proportional and the stage-2 winner)", flush=True)
        for seed in args.seeds:
            for arm in final:
                study.unit(arm, chosen[arm], seed, "sft")
        study.lock.release()
    result = summarize(study, names, args.seeds, args.n_boot)
    result["dro_step"] = step
    result["command"] = "python experiments/equity_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    (study.out / "equity_sampling.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (study.out / "equity_sampling.md").write_text(md)
    plot(result, Path(args.plot) if args.plot else study.out / "equity_sampling.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
