"""report.html (aetheris/report_html.py), written by `aetheris compare`: one self-contained file that carries
report.json's numbers. The browser test opens the file the CLI wrote in headless Chromium (skipped when
it is absent): it renders, logs no console error, shows its inline plots, and every number in its
tables equals the one in report.json."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from browser_helpers import chromium, console_errors, save_screenshot

from aetheris.cli import main
from aetheris.equity import build_report
from aetheris.report_html import no_signal_notes, render_html
from aetheris.tasks import Scores

# Accuracy per language (xcopa-like), bits per byte (ppl-like, lower is better), and a task at zero.
ACC_T = {"en": 0.8, "de": 0.7, "sw": 0.6, "yo": 0.5, "ja": 0.9, "th": 0.65}
ACC_S = {"en": 0.7, "de": 0.7, "sw": 0.3, "yo": 0.4, "ja": 0.5, "th": 0.55}
NASTY = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def _task(scores: dict[str, float], higher_is_better: bool, seed: int, n: int = 20) -> dict:
    rng = np.random.default_rng(seed)
    langs = {}
    for code, score in scores.items():
        if higher_is_better:  # 0/1 values whose mean is the score
            k = round(score * n)
            values, weights = [1.0] * k + [0.0] * (n - k), None
            rng.shuffle(values)
            langs[code] = Scores("acc", True, list(range(n)), values).to_dict(n_boot=100)
        else:  # bits and bytes per document whose ratio is near the score
            weights = list(rng.integers(40, 80, n).astype(float))
            values = [w * score * (1 + 0.1 * rng.standard_normal()) for w in weights]
            langs[code] = Scores("bits_per_byte", False, list(range(n)), values, weights).to_dict(n_boot=100)
    return {"languages": langs}


def _results(role: str, name: str) -> dict:
    acc = ACC_T if role == "teacher" else ACC_S
    bpb = {c: 4.0 + 0.1 * i + (0.3 * (i % 3) if role == "student" else 0) for i, c in enumerate(sorted(ACC_T))}
    tasks = {"xcopa": _task(acc, True, seed=1 if role == "teacher" else 2),
             "ppl": _task(bpb, False, seed=3),
             "mgsm": _task({c: 0.0 for c in ACC_T}, True, seed=4)}
    if role == "student":
        tasks["kl"] = {"languages": {c: {"score": 0.1 + 0.01 * i} for i, c in enumerate(ACC_T)}}
    return {"model": {"name": name}, "tasks": tasks}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """`aetheris compare` on two results.json files (the student's name carries markup)."""
    root = tmp_path_factory.mktemp("compare")
    for role, name in (("teacher", "nano-teacher"), ("student", NASTY)):
        (root / role).mkdir()
        (root / role / "results.json").write_text(json.dumps(_results(role, name)), encoding="utf-8")
    assert main(["compare", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                 "--output", str(root / "report"), "--n-boot", "100"]) == 0
    return root / "report"


def test_compare_writes_one_self_contained_file(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    # Self-contained: no script, nothing fetched; the plots are inline PNGs.
    assert "<script" not in page and not re.search(r"(src|href)=\"(?!data:)", page)
    assert page.count('src="data:image/png;base64,') == 2
    # Strings from the report are escaped: the student's name is text, not markup.
    assert NASTY not in page and "&lt;img src=x onerror=" in page
    assert "mgsm: teacher and student both score 0.0 on every language" in page


def test_fields_added_later_are_rendered_and_missing_ones_tolerated():
    report = build_report(_results("teacher", "t"), _results("student", "s"), n_boot=50)
    task = report["tasks"]["xcopa"]
    # What a later report may carry: per-language drop intervals, a no-signal flag, a corrected DES.
    task["languages"]["ja"]["drop_ci95"] = [0.1234, 0.6789]
    task["no_signal"], task["no_signal_reason"] = True, "the teacher is not distinguishable from chance (0.5)"
    task["des_noise_corrected"] = 0.004321
    page = render_html(report)
    assert 'data-ci="0.1234,0.6789"' in page
    assert "xcopa: no signal: the teacher is not distinguishable from chance (0.5)" in page
    assert 'data-field="des_noise_corrected" data-value="0.004321"' in page
    # ...and an old, sparse report (no intervals, no branches, no summary) still renders.
    for entry in report["tasks"].values():
        for key in ("des_ci95", "branches", "des_branch", "not_grouped"):
            entry.pop(key, None)
    del report["summary"], report["kl"]
    assert "<table" in render_html(report)


def test_no_signal_notes_need_a_reason():
    langs = {c: {"teacher": 0.5, "student": 0.5} for c in ("en", "de")}
    assert no_signal_notes("xcopa", {"languages": langs})  # identical everywhere: nothing to compare
    langs["de"]["student"] = 0.4
    assert no_signal_notes("xcopa", {"languages": langs}) == []
    assert no_signal_notes("xcopa", {"languages": langs, "signal": False})


def shown(x):
    """What a table cell holds for a report.json value: the number, or nothing for None / NaN."""
    return x if x is not None and math.isfinite(x) else None


def _cells(driver, selector: str) -> list[dict]:
    """data-value of every numeric cell of the matching rows, with the row's data attributes."""
    return driver.execute_script("""
        return [...document.querySelectorAll(arguments[0])].map(tr => ({
          row: Object.assign({}, tr.dataset),
          values: [...tr.querySelectorAll('td')].map(td => td.dataset.value === undefined ? null : Number(td.dataset.value)),
          ci: [...tr.querySelectorAll('[data-ci]')].map(s => s.dataset.ci.split(',').map(Number)),
        }));""", selector)


def test_report_renders_in_chromium_with_report_json_numbers(report_dir):
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    with chromium() as driver:
        driver.get((report_dir / "report.html").as_uri())
        assert driver.title == "Aetheris equity report"
        assert not console_errors(driver)
        assert driver.execute_script("return window.__pwned") is None
        assert driver.find_element("id", "student").text == NASTY
        # The inline plots decoded to real images.
        sizes = driver.execute_script("return [...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(sizes) == 2 and all(w > 100 for w in sizes)
        summary = {r["row"]["task"]: r for r in _cells(driver, "#summary tbody tr")}
        assert set(summary) == set(report["tasks"])
        for name, t in report["tasks"].items():
            # task, metric, mean drop, DES, DES relative, DES branch, worst family, gap (None: a text cell)
            assert summary[name]["values"] == [None, None, *map(shown, (t["mean_drop"], t["des"], t["des_relative"],
                                                                        t["des_branch"])), None, shown(t["max_min_gap"])]
            assert summary[name]["ci"] == [t["des_ci95"]]
            families = {r["row"]["family"]: r["values"] for r in _cells(driver, f'table.families[data-task="{name}"] tbody tr')}
            assert families == {f: [None, None, shown(v["mean_drop"]), shown(v["mean_relative_drop"])]
                                for f, v in t["families"].items()}
            rows = {r["row"]["lang"]: r for r in _cells(driver, f'table.languages[data-task="{name}"] tbody tr')}
            assert set(rows) == set(t["languages"])
            for code, v in t["languages"].items():
                assert rows[code]["values"][2:] == [shown(v[k]) for k in ("n", "teacher", "student", "drop", "relative_drop")]
                assert rows[code]["ci"] == [c for c in (v["teacher_ci95"], v["student_ci95"], v.get("drop_ci95")) if c]
        kl = {r["row"]["lang"]: r["values"][1] for r in _cells(driver, "#kl tbody tr")}
        assert kl == report["kl"]
        driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        save_screenshot(driver, "report", full_page=True)
        assert not console_errors(driver)
