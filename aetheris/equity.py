"""Teacher vs student: per-language drops and the Degradation Equity Score (``aetheris compare``).

Definitions (docs/EVALUATION.md explains them with examples):

- drop per language ``d_l = score_T(l) - score_S(l)`` for higher-is-better metrics and
  ``score_S(l) - score_T(l)`` for lower-is-better ones (bits per byte), so a positive drop always
  means the student is worse; relative drop ``d_l / |score_T(l)|``;
- ``D_f`` = mean drop over the languages of family ``f`` (families from ``aetheris.languages``;
  creoles and isolates are their own families, see that module);
- **DES** = population variance (ddof 0) of the ``D_f`` across families -- 0 when every family pays
  the same, larger when some pay more. Reported with the languages per family, ``des_relative`` (the
  same on relative drops), ``des_branch`` (finer grouping), the worst family, the max-min gap of
  ``D_f`` and a paired bootstrap 95% interval of DES that resamples languages within each family and
  examples within each language (teacher and student on the same resampled items);
- **des_corrected**: DES minus the part that per-language sampling noise adds on average. With
  ``s_f^2`` the sampling variance of family mean ``D_f`` (``sum of var(d_l) / n_f^2``, each ``var(d_l)``
  the bootstrap variance of that language's drop), ``E[DES] = true DES + (F-1)/F^2 * sum_f s_f^2``, so
  ``des_corrected = des - (F-1)/F^2 * sum_f s_f^2``; it can come out negative when noise explains all
  of the spread;
- **significance**: per language the drop's paired-bootstrap 95% interval (``drop_ci95``); per task
  whether the teacher beats chance (XCOPA 0.5, mGSM / tool calling 0): the lower end of the 95%
  interval of its score pooled over all examples must exceed chance. A task without that signal is
  marked ``"signal": false`` ("no signal"): its drops are noise, so it stays out of the headline
  numbers (``summary.des_signal``, ``summary.mean_des_relative``, the family ranking across tasks)
  and is drawn greyed in the plots.

``aetheris compare --teacher DIR_T --student DIR_S --output DIR`` reads the two ``results.json`` files
that ``aetheris eval`` wrote and writes ``report.json``, ``report.md`` and PNG plots (per-language drop
bars coloured by family; family x task heatmap of mean drop).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from aetheris.languages import get_language, group_of
from aetheris.report_html import write_report


def in_registry(code: str) -> bool:
    """XCOPA's ht and qu are not Tiny Aya languages: they get a drop but no family and no part in DES."""
    try:
        get_language(code)
        return True
    except ValueError:
        return False

N_BOOT = 1000

# Score a model gets without any skill, by result-name prefix (None: no chance level, e.g. bits per byte).
CHANCE = {"xcopa": 0.5, "mgsm": 0.0, "toolcall": 0.0, "bfcl": 0.0}


def chance_level(task: str) -> float | None:
    return next((v for prefix, v in CHANCE.items() if task.startswith(prefix)), None)


# ---------------------------------------------------------------------------------------------------
# Drops and the score itself (pure functions, tested on hand-computed tables)


def drop(teacher: float, student: float, higher_is_better: bool = True) -> float:
    return (teacher - student) if higher_is_better else (student - teacher)


def relative_drop(teacher: float, student: float, higher_is_better: bool = True) -> float | None:
    if teacher == 0 or not math.isfinite(teacher):
        return None
    return drop(teacher, student, higher_is_better) / abs(teacher)


def group_means(drops: dict[str, float], level: str = "family") -> dict[str, float]:
    """Group label -> mean drop over the group's languages (languages with a None drop are skipped)."""
    members: dict[str, list[float]] = {}
    for code, d in drops.items():
        if d is None:
            continue
        members.setdefault(group_of(code, level), []).append(d)
    return {g: float(np.mean(v)) for g, v in members.items()}


def des(drops: dict[str, float], level: str = "family") -> float:
    """Degradation Equity Score: population variance of the group mean drops."""
    means = list(group_means(drops, level).values())
    return float(np.var(means)) if means else float("nan")


def _ratio_stats(entry: dict, idx: np.ndarray) -> np.ndarray:
    """``sum(values) / sum(weights)`` for each resample of example indices idx (n_boot, n)."""
    v = np.asarray(entry["values"], float)
    w = np.asarray(entry["weights"], float) if entry.get("weights") is not None else np.ones_like(v)
    return v[idx].sum(1) / w[idx].sum(1)


def paired_drop_replicates(teacher: dict, student: dict, higher_is_better: bool, n_boot: int,
                           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Language -> (n_boot,) bootstrap drops, teacher and student on the same resampled examples."""
    out = {}
    for code in sorted(teacher):
        n = len(teacher[code]["values"])
        idx = rng.integers(0, n, size=(n_boot, n))
        t_stat, s_stat = _ratio_stats(teacher[code], idx), _ratio_stats(student[code], idx)
        out[code] = (t_stat - s_stat) if higher_is_better else (s_stat - t_stat)
    return out


def bootstrap_des(drops_boot: dict[str, np.ndarray], level: str, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) DES replicates: in each, every family's languages are resampled with replacement and
    each language contributes its drop from the same replicate of the example resampling."""
    groups: dict[str, list[np.ndarray]] = {}
    for code, reps in drops_boot.items():
        groups.setdefault(group_of(code, level), []).append(reps)
    means = []
    for reps in groups.values():
        m = np.stack(reps)                                            # (n_f, n_boot)
        n_f, n_boot = m.shape
        pick = rng.integers(0, n_f, size=(n_f, n_boot))               # languages drawn per replicate
        means.append(m[pick, np.arange(n_boot)].mean(0))              # (n_boot,)
    return np.stack(means).var(axis=0)


def des_noise(drops_boot: dict[str, np.ndarray], level: str = "family") -> float:
    """Expected DES from sampling noise alone: (F-1)/F^2 * sum_f var(D_f), var(D_f) = sum var(d_l) / n_f^2."""
    groups: dict[str, list[float]] = {}
    for code, reps in drops_boot.items():
        groups.setdefault(group_of(code, level), []).append(float(np.var(reps, ddof=1)))
    F = len(groups)
    if F < 2:
        return 0.0
    return (F - 1) / F**2 * sum(sum(v) / len(v) ** 2 for v in groups.values())


def teacher_signal(task: str, teacher_langs: dict, n_boot: int, seed: int) -> dict:
    """Is the teacher distinguishable from chance on this task? Its score pooled over every example of
    every language, with a bootstrap 95% interval; signal = the interval's lower end is above chance."""
    chance = chance_level(task)
    values = np.concatenate([np.asarray(v["values"], float) for v in teacher_langs.values()])
    weights = np.concatenate([np.asarray(v["weights"], float) if v.get("weights") is not None
                              else np.ones(len(v["values"])) for v in teacher_langs.values()])
    pooled = float(values.sum() / weights.sum())
    if chance is None or n_boot <= 0:
        return {"chance": chance, "teacher_pooled": pooled, "teacher_pooled_ci95": None, "signal": True}
    idx = np.random.default_rng(seed).integers(0, values.size, size=(n_boot, values.size))
    stats = values[idx].sum(1) / weights[idx].sum(1)
    lo, hi = float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))
    return {"chance": chance, "teacher_pooled": pooled, "teacher_pooled_ci95": [lo, hi], "signal": lo > chance}


def compare_task(teacher: dict, student: dict, n_boot: int = N_BOOT, seed: int = 0, name: str = "") -> dict:
    """The report entry of one task (result ``name``) from the two ``results.json`` task entries."""
    t_langs, s_langs = teacher["languages"], student["languages"]
    common = [c for c in t_langs if c in s_langs]
    if not common:
        raise ValueError("teacher and student results share no language for this task")
    hib = bool(t_langs[common[0]]["higher_is_better"])
    for code in common:
        if list(t_langs[code]["ids"]) != list(s_langs[code]["ids"]):
            raise ValueError(
                f"teacher and student were evaluated on different {code} examples (different --limit or data); "
                "re-run eval with the same settings for both"
            )
    per_language = {}
    drops, rel = {}, {}
    outside = [c for c in common if not in_registry(c)]
    for code in common:
        t, s = t_langs[code]["score"], s_langs[code]["score"]
        lang = get_language(code) if code not in outside else None
        per_language[code] = {
            "name": lang.name if lang else code,
            "family": lang.family if lang else None,
            "branch": lang.branch if lang else None,
            "n": t_langs[code]["n"],
            "teacher": t,
            "student": s,
            "teacher_ci95": t_langs[code].get("ci95"),
            "student_ci95": s_langs[code].get("ci95"),
            "drop": drop(t, s, hib),
            "relative_drop": relative_drop(t, s, hib),
        }
        if lang is not None:
            drops[code], rel[code] = per_language[code]["drop"], per_language[code]["relative_drop"]
    common = [c for c in common if c not in outside]
    if not common:
        raise ValueError("none of the compared languages is in the language registry")

    def grouping(level: str) -> dict:
        means = group_means(drops, level)
        rel_means = group_means(rel, level)
        members: dict[str, list[str]] = {}
        for code in common:
            members.setdefault(group_of(code, level), []).append(code)
        return {
            g: {"languages": members[g], "n_languages": len(members[g]), "mean_drop": means[g],
                "mean_relative_drop": rel_means.get(g),
                "teacher": float(np.mean([per_language[c]["teacher"] for c in members[g]])),
                "student": float(np.mean([per_language[c]["student"] for c in members[g]]))}
            for g in members
        }

    families = grouping("family")
    fam_means = {g: v["mean_drop"] for g, v in families.items()}
    worst = max(fam_means, key=fam_means.get)
    des_ci, des_corrected, mean_drop_ci = None, None, None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        every = [c for c in t_langs if c in s_langs]
        boot = paired_drop_replicates({c: t_langs[c] for c in every}, {c: s_langs[c] for c in every}, hib, n_boot, rng)
        for code in every:
            reps = boot[code]
            per_language[code]["drop_ci95"] = [float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))]
        grouped = {c: boot[c] for c in common}
        stats = bootstrap_des(grouped, "family", rng)
        des_ci = [float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))]
        des_corrected = des(drops, "family") - des_noise(grouped, "family")
        # A family's and the task's mean drop: the same paired example resampling, its languages resampled too
        # (within each family), so the interval covers which languages stand for the family as well.
        for v in families.values():
            m = np.stack([boot[c] for c in v["languages"]])  # (n_f, n_boot)
            pick = rng.integers(0, len(m), size=m.shape)  # languages drawn per replicate
            reps = m[pick, np.arange(m.shape[1])].mean(0)  # (n_boot,)
            v["drop_ci95"] = [float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))]
        all_reps = np.stack([boot[c] for c in common])  # (n_languages, n_boot)
        pick = rng.integers(0, len(all_reps), size=all_reps.shape)
        task_reps = all_reps[pick, np.arange(all_reps.shape[1])].mean(0)
        mean_drop_ci = [float(np.quantile(task_reps, 0.025)), float(np.quantile(task_reps, 0.975))]
    signal = teacher_signal(name, {c: t_langs[c] for c in t_langs if c in s_langs}, n_boot, seed)
    return {
        "metric": t_langs[common[0]]["metric"],
        "higher_is_better": hib,
        "languages": per_language,
        "families": families,
        "branches": grouping("branch"),
        "n_families": len(families),
        "not_grouped": outside,
        "des": des(drops, "family"),
        "des_ci95": des_ci,
        "des_corrected": des_corrected,
        **signal,
        "des_relative": des({c: r for c, r in rel.items() if r is not None}, "family"),
        "des_branch": des(drops, "branch"),
        "worst_family": worst,
        "worst_family_mean_drop": fam_means[worst],
        "max_min_gap": max(fam_means.values()) - min(fam_means.values()),
        "mean_drop": float(np.mean(list(drops.values()))),
        "mean_drop_ci95": mean_drop_ci,
        "mean_relative_drop": _mean_or_none([r for r in rel.values() if r is not None]),
    }


def _mean_or_none(values):
    return float(np.mean(values)) if values else None


def summarize(tasks: dict[str, dict]) -> dict:
    """Across tasks: relative drops make accuracy and bits-per-byte comparable."""
    family_rel: dict[str, list[float]] = {}
    with_signal = {name: e for name, e in tasks.items() if e.get("signal", True)}
    for entry in with_signal.values():
        for fam, v in entry["families"].items():
            if v["mean_relative_drop"] is not None:
                family_rel.setdefault(fam, []).append(v["mean_relative_drop"])
    family_mean_rel = {f: float(np.mean(v)) for f, v in family_rel.items()}
    return {
        "tasks": list(tasks),
        "des": {name: e["des"] for name, e in tasks.items()},
        "des_relative": {name: e["des_relative"] for name, e in tasks.items()},
        "des_signal": {name: e["des"] for name, e in with_signal.items()},
        "des_corrected": {name: e.get("des_corrected") for name, e in with_signal.items()},
        "no_signal": [name for name in tasks if name not in with_signal],
        "worst_family": {name: e["worst_family"] for name, e in tasks.items()},
        "mean_relative_drop": {name: e["mean_relative_drop"] for name, e in tasks.items()},
        "family_mean_relative_drop": family_mean_rel,
        "worst_family_overall": max(family_mean_rel, key=family_mean_rel.get) if family_mean_rel else None,
        "mean_des_relative": _mean_or_none([e["des_relative"] for e in with_signal.values()
                                            if e["des_relative"] is not None and math.isfinite(e["des_relative"])]),
    }


def build_report(teacher_results: dict, student_results: dict, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    t_tasks, s_tasks = teacher_results["tasks"], student_results["tasks"]
    common = [t for t in t_tasks if t in s_tasks and t != "kl"]
    if not common:
        raise ValueError(
            f"the teacher results have tasks {sorted(t_tasks)} and the student results {sorted(s_tasks)}: "
            "nothing to compare; run `aetheris eval` with the same --tasks for both"
        )
    tasks = {name: compare_task(t_tasks[name], s_tasks[name], n_boot, seed, name) for name in common}
    report = {
        "teacher": teacher_results.get("model", {}),
        "student": student_results.get("model", {}),
        "definitions": {
            "drop": "teacher - student (student - teacher for lower-is-better metrics); positive = student worse",
            "des": "population variance of family mean drops (lower = fairer)",
            "des_corrected": "des minus its expected value under per-language sampling noise, (F-1)/F^2 * sum_f var(D_f)",
            "des_ci95": "paired bootstrap: languages resampled within families, examples within languages",
            "signal": "teacher's pooled score has a 95% bootstrap interval above chance (XCOPA 0.5, mGSM/tool calling 0); "
                      "tasks without it are 'no signal' and stay out of the headline numbers",
            "grouping": "aetheris.languages: creoles (pcm) are their own family 'Creole'; each isolate is its own family",
        },
        "tasks": tasks,
        "summary": summarize(tasks),
    }
    if "kl" in s_tasks:  # KL(teacher||student) is measured on the student run only
        report["kl"] = {code: v["score"] for code, v in s_tasks["kl"]["languages"].items()}
    return report


# ---------------------------------------------------------------------------------------------------
# Markdown and plots


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    lines = ["# Teacher vs student: Degradation Equity Report", ""]
    lines.append(f"Teacher: `{report['teacher'].get('name', '?')}`  ")
    lines.append(f"Student: `{report['student'].get('name', '?')}`")
    lines += ["", "Drop = teacher - student (positive = the student is worse; for bits per byte, student - teacher). "
              "DES = population variance of the family mean drops (lower = fairer). "
              "Nigerian Pidgin is grouped as its own family (Creole); isolates are their own families.", ""]
    lines += ["## Summary", "", "| task | metric | mean drop | mean drop 95% CI | DES | DES 95% CI | DES (relative) | DES (branch) | "
              "worst family | max-min gap | DES noise-corrected | teacher vs chance |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        ci = t["des_ci95"]
        ci_s = f"[{_fmt(ci[0], 5)}, {_fmt(ci[1], 5)}]" if ci else "-"
        mci = t.get("mean_drop_ci95")
        mci_s = f"[{_fmt(mci[0])}, {_fmt(mci[1])}]" if mci else "-"
        lines.append(f"| {name} | {t['metric']} | {_fmt(t['mean_drop'])} | {mci_s} | {_fmt(t['des'], 5)} | {ci_s} | "
                     f"{_fmt(t['des_relative'], 5)} | {_fmt(t['des_branch'], 5)} | {t['worst_family']} | "
                     f"{_fmt(t['max_min_gap'])} | {_fmt(t.get('des_corrected'), 5)} | {_signal_text(t)} |")
    quiet = report["summary"].get("no_signal") or []
    if quiet:
        lines += ["", f"**No signal: {', '.join(quiet)}** -- the teacher is not distinguishable from chance, so these "
                  "drops are noise; they are left out of the headline DES, the family ranking and the heatmap."]
    worst = report["summary"].get("worst_family_overall")
    if worst:
        lines += ["", f"**Family that loses most overall (mean relative drop across tasks): {worst}.**"]
    for name, t in report["tasks"].items():
        lines += ["", f"## {name} ({t['metric']}, {'higher' if t['higher_is_better'] else 'lower'} is better)", "",
                  "| family | languages | teacher | student | mean drop | drop 95% CI | mean relative drop |",
                  "|---|---|---|---|---|---|---|"]
        for fam, v in sorted(t["families"].items(), key=lambda kv: -kv[1]["mean_drop"]):
            ci = v.get("drop_ci95")
            ci_s = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
            lines.append(f"| {fam} | {', '.join(v['languages'])} | {_fmt(v.get('teacher'))} | {_fmt(v.get('student'))} | "
                         f"{_fmt(v['mean_drop'])} | {ci_s} | {_fmt(v['mean_relative_drop'])} |")
        lines += ["", "| language | family | n | teacher | student | drop | drop 95% CI | relative drop |",
                  "|---|---|---|---|---|---|---|---|"]
        for code, v in t["languages"].items():
            ci = v.get("drop_ci95")
            ci_s = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
            lines.append(f"| {code} ({v['name']}) | {v['family'] or '- (not grouped)'} | {v['n']} | {_fmt(v['teacher'])} | "
                         f"{_fmt(v['student'])} | {_fmt(v['drop'])} | {ci_s} | {_fmt(v['relative_drop'])} |")
    if "kl" in report:
        lines += ["", "## KL(teacher || student) per token, nats", "", "| language | KL |", "|---|---|"]
        lines += [f"| {code} | {_fmt(v, 4)} |" for code, v in report["kl"].items()]
    return "\n".join(lines) + "\n"


def _signal_text(t: dict) -> str:
    if t.get("chance") is None:
        return "n/a"
    ci = t.get("teacher_pooled_ci95")
    ci_s = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
    return f"{_fmt(t['teacher_pooled'])}{ci_s} vs {t['chance']:g}" + ("" if t.get("signal", True) else " **no signal**")


def _family_colors(families: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {fam: cmap(i % 20) for i, fam in enumerate(sorted(set(families)))}


def plot_drops(report: dict, path: Path) -> None:
    """One panel per task: per-language drop bars coloured by family."""
    import matplotlib  # here, not at the top: pyplot must follow use("Agg"), and ~0.5 s only plotting pays

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tasks = report["tasks"]

    def fam(v):
        return v["family"] or "(not a Tiny Aya language)"

    all_fams = [fam(v) for t in tasks.values() for v in t["languages"].values()]
    colors = _family_colors(all_fams)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 0.28 * max(len(t["languages"]) for t in tasks.values()) + 3),
                                                      3.2 * len(tasks)), squeeze=False)
    for ax, (name, t) in zip(axes[:, 0], tasks.items()):
        items = sorted(t["languages"].items(), key=lambda kv: (fam(kv[1]), kv[0]))
        signal = t.get("signal", True)
        heights = [v["drop"] for _, v in items]
        err = None
        if all(v.get("drop_ci95") for _, v in items):  # 95% intervals as asymmetric error bars
            err = np.array([[v["drop"] - v["drop_ci95"][0], v["drop_ci95"][1] - v["drop"]] for _, v in items]).T.clip(0)
        ax.bar(range(len(items)), heights, yerr=err, ecolor="0.4", error_kw={"linewidth": 0.6},
               color=[colors[fam(v)] if signal else "0.8" for _, v in items])
        ax.set_xticks(range(len(items)), [c for c, _ in items], rotation=90, fontsize=7)
        ax.axhline(0, color="black", linewidth=0.6)
        title = f"{name}: drop per language ({t['metric']}); DES = {t['des']:.4g}"
        if t.get("des_corrected") is not None:
            title += f", noise-corrected {t['des_corrected']:.4g}"
        if not signal:
            title = f"{name}: NO SIGNAL (teacher at chance) -- drops are noise"
        ax.set_title(title, fontsize=9, color="black" if signal else "0.45")
        ax.set_ylabel("drop")
    used = sorted(set(all_fams))
    fig.legend(handles=[Patch(color=colors[f], label=f) for f in used], loc="upper center",
               ncol=min(5, len(used)), fontsize=7, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(report: dict, path: Path) -> None:
    """Family x task mean drop. Colours are scaled per task (column) so accuracy and bits per byte
    share one picture; the numbers printed in the cells are the raw mean drops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Tasks without signal are left out (their drops are noise); all of them if none has signal.
    tasks = [n for n, t in report["tasks"].items() if t.get("signal", True)] or list(report["tasks"])
    fams = sorted({f for n in tasks for f in report["tasks"][n]["families"]})
    raw = np.full((len(fams), len(tasks)), np.nan)
    for j, name in enumerate(tasks):
        for i, fam in enumerate(fams):
            if fam in report["tasks"][name]["families"]:
                raw[i, j] = report["tasks"][name]["families"][fam]["mean_drop"]
    scaled = np.full_like(raw, np.nan)
    for j in range(len(tasks)):
        col = raw[:, j]
        m = np.nanmax(np.abs(col)) if np.isfinite(col).any() else 0
        scaled[:, j] = col / m if m > 0 else 0 * col
    fig, ax = plt.subplots(figsize=(4 + 1.3 * len(tasks), 1.2 + 0.4 * len(fams)))
    im = ax.imshow(np.ma.masked_invalid(scaled), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(fams)), fams)
    for i in range(len(fams)):
        for j in range(len(tasks)):
            if np.isfinite(raw[i, j]):
                ax.text(j, i, f"{raw[i, j]:.3g}", ha="center", va="center", fontsize=7)
    ax.set_title("mean drop per family\n(red = student loses more; colour scaled per task)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# CLI


def load_results(folder: str | Path, role: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{role} results not found: {path} does not exist. "
                                f"Run `aetheris eval --model ... --output {folder}` first.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True, help="folder with the teacher's results.json (from `aetheris eval`)")
    parser.add_argument("--student", required=True, help="folder with the student's results.json")
    parser.add_argument("--output", required=True, help="folder for report.json, report.md and the PNG plots")
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples for the DES interval")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    teacher = load_results(args.teacher, "teacher")
    student = load_results(args.student, "student")
    report = build_report(teacher, student, n_boot=args.n_boot, seed=args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    plot_drops(report, out / "drops_by_language.png")
    plot_heatmap(report, out / "family_task_heatmap.png")
    print(f"wrote {write_report(report, out)}")  # report.html: the above in one self-contained file
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, drops_by_language.png, family_task_heatmap.png")
    for name, t in report["tasks"].items():
        if not t.get("signal", True):
            print(f"  {name:>14}: no signal (teacher {_fmt(t['teacher_pooled'])} vs chance {t['chance']:g}); DES not reported")
            continue
        print(f"  {name:>14}: DES {t['des']:.5g} (noise-corrected {_fmt(t.get('des_corrected'), 5)}, relative "
              f"{_fmt(t['des_relative'], 5)}), worst family {t['worst_family']}")
    return 0
