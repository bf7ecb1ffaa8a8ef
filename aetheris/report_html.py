"""The equity report as one self-contained HTML file (``report.html``, written by ``aetheris compare``).

Everything is inside the file -- styles inline, plots as ``data:`` PNG URIs, no script, nothing fetched
-- so it can be attached to an email and opened anywhere. It shows what ``report.json`` holds: the
summary per task (DES with its interval, relative and branch DES, worst family, gap), per task a
family table and a per-language drill-down (teacher, student, drop, with intervals where the report
has them), KL per language, and notes on rows that carry no signal.

``report.json`` grows over time (new intervals, flags); this module reads every field defensively and
renders what exists, so an older or newer report still renders. Every number in a table cell carries
its exact value in ``data-value`` (the tests compare those with ``report.json``), and every string from
the report is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

# Per-task fields shown in the summary table, in order; any other numeric field is listed under the task.
SUMMARY_FIELDS = ("mean_drop", "des", "des_ci95", "des_relative", "des_branch", "worst_family", "max_min_gap")
KNOWN_TASK_FIELDS = set(SUMMARY_FIELDS) | {"metric", "higher_is_better", "languages", "families", "branches",
                                          "n_families", "not_grouped", "worst_family_mean_drop", "mean_relative_drop"}
NO_SIGNAL_KEYS = ("no_signal", "no_signal_reason", "signal", "signal_note", "note", "notes")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d232b; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #d7dde4; }
h3 { font-size: 1rem; margin-bottom: .3rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d7dde4; padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f6f8; } td.num { text-align: right; white-space: nowrap; }
tr.worst td { background: #fdecea; } tr.nosignal td { color: #8a94a0; }
.ci { color: #5d6875; font-size: .85em; }
.note { background: #fff7e0; border-left: 4px solid #e0b400; padding: .4rem .8rem; margin: .5rem 0; }
.meta { color: #5d6875; } img { max-width: 100%; border: 1px solid #d7dde4; }
details { margin: .4rem 0 1rem; } summary { cursor: pointer; font-weight: 600; }
code { background: #f4f6f8; padding: 0 .2rem; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x, digits: int = 3) -> str:
    """A table cell for a number: the rounded value shown, the exact value in data-value."""
    if not _finite(x):
        return '<td class="num">-</td>'
    return f'<td class="num" data-value="{x!r}">{x:.{digits}f}</td>'


def _interval(ci, digits: int = 3) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(v) for v in ci):
        return f'<span class="ci" data-ci="{ci[0]!r},{ci[1]!r}">[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]</span>'
    return ""


def _num_ci(x, ci, digits: int = 3) -> str:
    """A number with its 95% interval under it (when the report has one)."""
    if not _finite(x):
        return '<td class="num">-</td>'
    extra = _interval(ci, digits)
    return f'<td class="num" data-value="{x!r}">{x:.{digits}f}{"<br>" + extra if extra else ""}</td>'


def no_signal_notes(name: str, task: dict) -> list[str]:
    """Why a task's numbers carry no signal: the report's own flag and reason when it has them, and
    -- checked here -- every language scoring the same for teacher and student (nothing to compare)."""
    notes = []
    flag = task.get("no_signal")
    if flag is None and task.get("signal") is False:
        flag = True
    if flag:
        reason = next((task[k] for k in ("no_signal_reason", "signal_note", "note") if isinstance(task.get(k), str)), None)
        notes.append(f"{name}: no signal{': ' + reason if reason else ''} (kept out of the headline DES where the "
                     "report says so).")
    for extra in task.get("notes", []) if isinstance(task.get("notes"), list) else []:
        notes.append(f"{name}: {extra}")
    langs = task.get("languages") or {}
    scores = {(v.get("teacher"), v.get("student")) for v in langs.values() if isinstance(v, dict)}
    if len(langs) > 1 and len(scores) == 1:
        t, s = next(iter(scores))
        if t == s:
            notes.append(f"{name}: teacher and student both score {t} on every language, so every drop is 0 "
                         "and DES = 0 says nothing about equity.")
    return notes


def _summary(report: dict) -> list[str]:
    tasks = report.get("tasks") or {}
    out = ["<h2>Summary</h2>",
           "<p>Drop = teacher &minus; student (student &minus; teacher for lower-is-better metrics such as bits per "
           "byte): positive means the student is worse. <b>DES</b> = population variance of the family mean drops "
           "(lower = fairer); intervals are bootstrap 95%.</p>",
           '<table id="summary"><thead><tr><th>task</th><th>metric</th><th>mean drop</th><th>DES [95% CI]</th>'
           "<th>DES (relative)</th><th>DES (branch)</th><th>worst family</th><th>max&minus;min gap</th></tr></thead><tbody>"]
    for name, t in tasks.items():
        quiet = bool(no_signal_notes(name, t))
        direction = "higher" if t.get("higher_is_better", True) else "lower"
        out.append(f'<tr data-task="{_e(name)}"{" class=nosignal" if quiet else ""}><td>{_e(name)}</td>'
                   f'<td>{_e(t.get("metric", "?"))} <span class="ci">({direction} is better)</span></td>'
                   f'{_num(t.get("mean_drop"))}{_num_ci(t.get("des"), t.get("des_ci95"), 5)}'
                   f'{_num(t.get("des_relative"), 5)}{_num(t.get("des_branch"), 5)}'
                   f'<td>{_e(t.get("worst_family", "-"))}</td>{_num(t.get("max_min_gap"))}</tr>')
    out.append("</tbody></table>")
    worst = (report.get("summary") or {}).get("worst_family_overall")
    if worst:
        out.append(f"<p><b>Family that loses most overall</b> (mean relative drop across tasks): {_e(worst)}.</p>")
    return out


def _task_section(name: str, t: dict) -> list[str]:
    metric = t.get("metric", "?")
    direction = "higher" if t.get("higher_is_better", True) else "lower"
    out = [f'<h2 id="task-{_e(name)}">{_e(name)} <span class="meta">({_e(metric)}, {direction} is better)</span></h2>']
    for note in no_signal_notes(name, t):
        out.append(f'<p class="note">{_e(note)}</p>')
    extra = {k: v for k, v in t.items() if k not in KNOWN_TASK_FIELDS and _finite(v)}
    if extra:
        out.append("<p class=meta>" + "; ".join(f"{_e(k)} = <span data-field=\"{_e(k)}\" data-value=\"{v!r}\">"
                                                 f"{v:.5g}</span>" for k, v in extra.items()) + "</p>")
    families = t.get("families") or {}
    worst = t.get("worst_family")
    out.append(f'<h3>Families</h3><table class="families" data-task="{_e(name)}"><thead><tr><th>family</th>'
               "<th>languages</th><th>mean drop</th><th>mean relative drop</th></tr></thead><tbody>")
    order = sorted(families.items(), key=lambda kv: -kv[1].get("mean_drop", 0) if _finite(kv[1].get("mean_drop")) else 0)
    for fam, v in order:
        langs = v.get("languages") or []
        ci = next((v[k] for k in ("mean_drop_ci95", "ci95", "drop_ci95") if k in v), None)
        out.append(f'<tr data-family="{_e(fam)}"{" class=worst" if fam == worst else ""}><td>{_e(fam)}</td>'
                   f'<td>{_e(", ".join(map(str, langs)))} <span class="ci">({len(langs)})</span></td>'
                   f'{_num_ci(v.get("mean_drop"), ci)}{_num(v.get("mean_relative_drop"))}</tr>')
    out.append("</tbody></table>")
    languages = t.get("languages") or {}
    out.append(f"<details><summary>Per language ({len(languages)})</summary>"
               f'<table class="languages" data-task="{_e(name)}"><thead><tr><th>language</th><th>family / branch</th>'
               "<th>n</th><th>teacher</th><th>student</th><th>drop</th><th>relative drop</th></tr></thead><tbody>")
    for code, v in sorted(languages.items(), key=lambda kv: (str(kv[1].get("family") or "~"), kv[0])):
        family = v.get("family") or "not grouped (not a Tiny Aya language)"
        branch = v.get("branch")
        drop_ci = next((v[k] for k in ("drop_ci95", "drop_ci") if k in v), None)
        out.append(f'<tr data-lang="{_e(code)}"><td>{_e(code)} <span class="meta">{_e(v.get("name", ""))}</span></td>'
                   f'<td>{_e(family)}{" / " + _e(branch) if branch and branch != family else ""}</td>'
                   f'{_num(v.get("n"), 0)}{_num_ci(v.get("teacher"), v.get("teacher_ci95"))}'
                   f'{_num_ci(v.get("student"), v.get("student_ci95"))}{_num_ci(v.get("drop"), drop_ci)}'
                   f'{_num(v.get("relative_drop"))}</tr>')
    out.append("</tbody></table></details>")
    return out


def _plots(folder: Path) -> list[str]:
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        return []
    out = ["<h2>Plots</h2>"]
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        out.append(f'<figure><img alt="{_e(png.stem)}" src="data:image/png;base64,{data}">'
                   f"<figcaption class=meta>{_e(png.name)}</figcaption></figure>")
    return out


def render_html(report: dict, plots_from: Path | None = None) -> str:
    """The report as one HTML document; PNGs in ``plots_from`` are embedded as data URIs."""
    teacher = (report.get("teacher") or {}).get("name", "?")
    student = (report.get("student") or {}).get("name", "?")
    body = ["<h1>Teacher vs student: Degradation Equity Report</h1>",
            f'<p class="meta">Teacher: <code id="teacher">{_e(teacher)}</code> &middot; '
            f'Student: <code id="student">{_e(student)}</code></p>']
    definitions = report.get("definitions") or {}
    if definitions:
        body.append("<details><summary>Definitions</summary><ul>" + "".join(
            f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in definitions.items()) + "</ul></details>")
    body += _summary(report)
    notes = [n for name, t in (report.get("tasks") or {}).items() for n in no_signal_notes(name, t)]
    if notes:
        body.append("<h3>Rows without signal</h3>" + "".join(f'<p class="note">{_e(n)}</p>' for n in notes))
    if plots_from is not None:
        body += _plots(Path(plots_from))
    for name, t in (report.get("tasks") or {}).items():
        body += _task_section(name, t)
    kl = report.get("kl")
    if isinstance(kl, dict) and kl:
        body.append('<h2>KL(teacher &#8214; student) per token, nats</h2><details><summary>Per language '
                    f'({len(kl)})</summary><table id="kl"><thead><tr><th>language</th><th>KL</th></tr></thead><tbody>')
        body += [f'<tr data-lang="{_e(code)}"><td>{_e(code)}</td>{_num(v, 4)}</tr>'
                 for code, v in sorted(kl.items(), key=lambda kv: -kv[1] if _finite(kv[1]) else 0)]
        body.append("</tbody></table></details>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>Aetheris equity report</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: dict, folder: str | Path) -> Path:
    """``folder/report.html`` from ``report``, embedding the PNG plots already in ``folder``."""
    folder = Path(folder)
    path = folder / "report.html"
    path.write_text(render_html(report, plots_from=folder), encoding="utf-8")
    return path
