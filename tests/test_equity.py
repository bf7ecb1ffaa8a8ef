"""DES, drops, bootstrap intervals and the compare report on small tables computed by hand."""

import json

import numpy as np
import pytest

from aetheris.equity import build_report, des, drop, group_means, plot_drops, plot_heatmap, relative_drop, render_markdown
from aetheris.tasks import Scores, bootstrap_ci

# teacher / student accuracies; families: en, de Indo-European; sw, yo Atlantic-Congo; ja Japonic
TEACHER = {"en": 0.8, "de": 0.7, "sw": 0.6, "yo": 0.5, "ja": 0.9}
STUDENT = {"en": 0.7, "de": 0.7, "sw": 0.3, "yo": 0.4, "ja": 0.5}


def test_drop_sign_follows_metric_direction():
    assert drop(0.8, 0.7) == pytest.approx(0.1)
    assert drop(1.0, 1.25, higher_is_better=False) == pytest.approx(0.25)  # bits per byte: student worse
    assert relative_drop(1.0, 1.25, higher_is_better=False) == pytest.approx(0.25)
    assert relative_drop(0.0, 0.1) is None


def test_des_by_hand():
    drops = {c: TEACHER[c] - STUDENT[c] for c in TEACHER}  # en .1, de 0, sw .3, yo .1, ja .4
    means = group_means(drops, "family")
    assert means == pytest.approx({"Indo-European": 0.05, "Atlantic-Congo": 0.2, "Japonic": 0.4})
    # mean of family means = 0.65/3; squared deviations .16667^2 + .01667^2 + .18333^2 = 0.0616667
    assert des(drops) == pytest.approx(0.0616667 / 3, rel=1e-5)
    # branches: Germanic .05, Bantu (sw) .3, Defoid (yo) .1, Japonic .4 -> mean .2125
    assert des(drops, "branch") == pytest.approx((0.1625**2 + 0.0875**2 + 0.1125**2 + 0.1875**2) / 4)
    assert des({"en": 0.1, "de": 0.3}) == 0.0  # one family: nothing to be unequal about


def _results(scores: dict[str, float], n: int = 20, seed: int = 0) -> dict:
    """results.json with per-example 0/1 values whose mean is exactly the given score."""
    langs = {}
    for code, acc in scores.items():
        k = round(acc * n)
        values = [1.0] * k + [0.0] * (n - k)
        np.random.default_rng(seed).shuffle(values)
        langs[code] = Scores("acc", True, list(range(n)), values).to_dict(n_boot=200)
    return {"model": {"name": "m"}, "tasks": {"xcopa": {"languages": langs}}}


def test_report_by_hand_and_bootstrap_contains_estimate():
    report = build_report(_results(TEACHER), _results(STUDENT, seed=1), n_boot=300)
    t = report["tasks"]["xcopa"]
    assert t["des"] == pytest.approx(0.0616667 / 3, rel=1e-5)
    assert t["worst_family"] == "Japonic"
    assert t["max_min_gap"] == pytest.approx(0.35)
    assert t["families"]["Atlantic-Congo"]["languages"] == ["sw", "yo"]
    assert t["languages"]["ja"]["relative_drop"] == pytest.approx(0.4 / 0.9)
    # relative: IE (.125+0)/2, AC (.5+.2)/2, Japonic .4/.9
    rel = np.array([0.0625, 0.35, 0.4 / 0.9])
    assert t["des_relative"] == pytest.approx(rel.var())
    lo, hi = t["des_ci95"]
    assert lo <= t["des"] <= hi and lo < hi
    assert report["summary"]["worst_family"]["xcopa"] == "Japonic"
    json.dumps(report)  # serialisable
    md = render_markdown(report)
    assert "Japonic" in md and "| xcopa |" in md


def test_mismatched_examples_are_refused():
    t, s = _results(TEACHER), _results(STUDENT)
    s["tasks"]["xcopa"]["languages"]["en"]["ids"] = list(range(1, 21))
    with pytest.raises(ValueError, match="different en examples"):
        build_report(t, s, n_boot=10)


def test_bootstrap_ci_contains_point_estimate_ratio():
    rng = np.random.default_rng(0)
    values, weights = rng.random(50) * 30, rng.integers(20, 80, 50).astype(float)  # bits, bytes
    s = Scores("bits_per_byte", False, list(range(50)), list(values), list(weights))
    lo, hi = bootstrap_ci(s.values, s.weights)
    assert s.score == pytest.approx(values.sum() / weights.sum())
    assert lo < s.score < hi


def test_plots_are_pngs(tmp_path):
    import matplotlib.image

    report = build_report(_results(TEACHER), _results(STUDENT, seed=1), n_boot=50)
    plot_drops(report, tmp_path / "drops.png")
    plot_heatmap(report, tmp_path / "heat.png")
    for name in ("drops.png", "heat.png"):
        img = matplotlib.image.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 100


def test_languages_outside_the_registry_get_a_drop_but_no_family():
    t = _results({**TEACHER, "qu": 0.6, "ht": 0.55})
    s = _results({**STUDENT, "qu": 0.5, "ht": 0.5}, seed=1)
    task = build_report(t, s, n_boot=20)["tasks"]["xcopa"]
    assert task["not_grouped"] == ["qu", "ht"]
    assert task["languages"]["qu"]["drop"] == pytest.approx(0.1) and task["languages"]["qu"]["family"] is None
    assert task["des"] == pytest.approx(0.0616667 / 3, rel=1e-5)  # unchanged


def test_plots_with_ungrouped_languages(tmp_path):
    report = build_report(_results({**TEACHER, "qu": 0.6}), _results({**STUDENT, "qu": 0.5}, seed=1), n_boot=20)
    plot_drops(report, tmp_path / "d.png")
    assert "not grouped" in render_markdown(report)


def _scores(values) -> dict:
    return Scores("acc", True, list(range(len(values))), [float(v) for v in values]).to_dict(n_boot=20)


def test_drop_intervals_signal_and_no_signal_tasks():
    at_chance = {c: 0.5 for c in TEACHER}
    t, s = _results(at_chance, n=40), _results(STUDENT, n=40, seed=1)
    t["tasks"]["mgsm"] = {"languages": {c: _scores([0] * 40) for c in TEACHER}}  # teacher never right: chance
    s["tasks"]["mgsm"] = {"languages": {c: _scores([0] * 39 + [1]) for c in TEACHER}}
    report = build_report(t, s, n_boot=300)
    x = report["tasks"]["xcopa"]
    assert x["signal"] is False and x["chance"] == 0.5 and x["teacher_pooled"] == pytest.approx(0.5)
    for v in x["languages"].values():
        lo, hi = v["drop_ci95"]
        assert lo <= v["drop"] <= hi
    m = report["tasks"]["mgsm"]
    assert m["signal"] is False and m["teacher_pooled"] == 0.0
    assert report["summary"]["no_signal"] == ["xcopa", "mgsm"] and report["summary"]["des_signal"] == {}
    md = render_markdown(report)
    assert "no signal" in md and "drop 95% CI" in md


def test_a_teacher_above_chance_has_signal():
    strong = {c: 0.95 for c in TEACHER}
    report = build_report(_results(strong, n=40), _results(STUDENT, n=40, seed=1), n_boot=300)
    x = report["tasks"]["xcopa"]
    assert x["signal"] is True and x["teacher_pooled_ci95"][0] > 0.5
    assert report["summary"]["des_signal"] == {"xcopa": x["des"]} and report["summary"]["no_signal"] == []


def test_noise_corrected_des_is_unbiased_for_equal_models():
    """Teacher and student of equal skill (independent draws of the same accuracy): the plain DES is
    positive on average (noise), the noise-corrected one averages to about zero."""
    from aetheris.equity import des_noise, paired_drop_replicates

    rng = np.random.default_rng(0)
    codes = ["en", "de", "sw", "yo", "ja", "zh", "ar", "he"]
    plain, corrected = [], []
    for _ in range(40):
        t = {c: {"values": list(rng.random(60) < 0.7)} for c in codes}
        s = {c: {"values": list(rng.random(60) < 0.7)} for c in codes}
        drops = {c: np.mean(t[c]["values"]) - np.mean(s[c]["values"]) for c in codes}
        boot = paired_drop_replicates(t, s, True, 300, rng)
        plain.append(des(drops))
        corrected.append(des(drops) - des_noise(boot))
    assert np.mean(plain) > 0.002
    assert abs(np.mean(corrected)) < 0.25 * np.mean(plain)


def test_des_bootstrap_resamples_languages_within_families():
    """Two Germanic languages with noise-free examples but very different drops: resampling examples
    alone gives a zero-width interval; resampling languages too does not."""
    t = {"tasks": {"xcopa": {"languages": {"en": _scores([1] * 30), "de": _scores([1] * 30), "ja": _scores([1] * 30)}}}}
    s = {"tasks": {"xcopa": {"languages": {"en": _scores([1] * 30), "de": _scores([0] * 30), "ja": _scores([1] * 30)}}}}
    lo, hi = build_report(t, s, n_boot=400)["tasks"]["xcopa"]["des_ci95"]
    assert hi - lo > 0.05  # family means 0, 0.5 or 1 -> DES in {0, 0.0625, 0.25}


def test_family_rows_carry_both_models_scores_and_a_drop_interval():
    """A family's teacher / student score is the mean over its languages; its drop interval resamples the
    languages too, so noise-free languages with equal drops give a zero-width interval at that drop, unequal
    ones a wide one; a one-language family's interval is that language's own."""
    t = {"tasks": {"xcopa": {"languages": {"en": _scores([1] * 30), "de": _scores([1] * 30), "sw": _scores([1] * 30),
                                           "yo": _scores([1] * 30), "ja": _scores([1] * 15 + [0] * 15)}}}}
    s = {"tasks": {"xcopa": {"languages": {"en": _scores([0] * 30), "de": _scores([0] * 30), "sw": _scores([1] * 30),
                                           "yo": _scores([0] * 30), "ja": _scores([0] * 15 + [1] * 15)}}}}
    x = build_report(t, s, n_boot=400)["tasks"]["xcopa"]
    ie, ac, ja = (x["families"][f] for f in ("Indo-European", "Atlantic-Congo", "Japonic"))
    assert (ie["teacher"], ie["student"], ie["mean_drop"]) == (1.0, 0.0, 1.0)
    assert ie["drop_ci95"] == [1.0, 1.0]  # both languages lose everything on every example
    assert (ac["teacher"], ac["student"]) == (1.0, 0.5)
    assert ac["drop_ci95"][0] == 0.0 and ac["drop_ci95"][1] == 1.0  # drops 0 and 1: which language counts matters
    assert ja["drop_ci95"] == x["languages"]["ja"]["drop_ci95"]
    lo, hi = x["mean_drop_ci95"]
    assert lo <= x["mean_drop"] <= hi and lo < hi
    assert "mean drop 95% CI" in render_markdown({"teacher": {}, "student": {}, "summary": {}, "tasks": {"xcopa": x}})
