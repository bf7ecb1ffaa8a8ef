"""The stabilised group-DRO update (``distill.FamilyDRO``) and the pure parts of experiments/equity_sampling.py:
arm definitions that the distillation config accepts, and the seed x language aggregation agreeing with
``aetheris.equity``."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aetheris.distill import FamilyDRO, load_distill_config
from aetheris.equity import des
from aetheris.languages import group_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("equity_sampling", ROOT / "experiments" / "equity_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(sums, counts):
    return {"family_kl_sum": list(map(float, sums)), "family_tokens": list(map(float, counts))}


def test_stabilised_dro_steps_every_seen_family_by_its_running_mean():
    dro = FamilyDRO(["a", "b", "c"], step=0.5, ema=0.25)
    dro.update(record([4.0, 0.0, 0.0], [2, 0, 0]))          # only a: its first KL (2.0) sets its mean
    assert dro.mean[0] == pytest.approx(2.0) and dro.seen.tolist() == [True, False, False]
    expected = np.array([np.exp(0.5 * 2.0), 1.0, 1.0])
    np.testing.assert_allclose(dro.q.numpy(), expected / expected.sum(), rtol=1e-6)
    dro.update(record([0.0, 3.0, 0.0], [0, 3, 0]))          # only b (KL 1.0); a, absent, still steps by its mean
    assert dro.mean.tolist() == pytest.approx([2.0, 1.0, 0.0])
    expected = expected * np.array([np.exp(0.5 * 2.0), np.exp(0.5 * 1.0), 1.0])
    np.testing.assert_allclose(dro.q.numpy(), expected / expected.sum(), rtol=1e-6)
    dro.update(record([12.0, 0.0, 0.0], [2, 0, 0]))         # a again (KL 6.0): m_a = 0.75 * 2 + 0.25 * 6 = 3
    assert dro.mean[0] == pytest.approx(3.0)
    expected = expected * np.array([np.exp(0.5 * 3.0), np.exp(0.5 * 1.0), 1.0])
    np.testing.assert_allclose(dro.q.numpy(), expected / expected.sum(), rtol=1e-6)
    # the state (q, running means, seen) round-trips through a checkpoint's JSON; old states (q only) load too
    again = FamilyDRO(["a", "b", "c"], step=0.5, ema=0.25)
    again.load_state_dict(json.loads(json.dumps(dro.state_dict())))
    assert torch.equal(again.q, dro.q) and torch.equal(again.mean, dro.mean) and torch.equal(again.seen, dro.seen)
    old = FamilyDRO(["a", "b", "c"], step=0.5, ema=0.25)
    old.load_state_dict({"q": dro.q.tolist(), "families": ["a", "b", "c"]})
    assert torch.equal(old.q, dro.q) and not old.seen.any()
    with pytest.raises(ValueError, match="dro_ema"):
        FamilyDRO(["a"], step=0.1, ema=1.5)


def test_stabilised_dro_follows_the_worse_family_not_the_more_frequent_one():
    """A family in every batch with KL 0.5 and one in every tenth with KL 1.0: the plain update raises the
    frequent family (every update raises a present family's weight), the stabilised one the worse family."""
    plain, stable = FamilyDRO(["big", "small"], step=0.1), FamilyDRO(["big", "small"], step=0.1, ema=0.1)
    for step in range(100):
        small = step % 10 == 0
        r = record([0.5 * 8, 1.0 * 8 if small else 0.0], [8, 8 if small else 0])
        plain.update(r)
        stable.update(r)
    assert plain.q[0] > plain.q[1]
    assert stable.q[1] > stable.q[0]
    # ema=0 is the plain rule: present families only, by the step's own KL
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for step in range(100):
        q = q * torch.tensor([math.exp(0.1 * 0.5), math.exp(0.1 * 1.0) if step % 10 == 0 else 1.0], dtype=torch.float64)
        q = q / q.sum()
    torch.testing.assert_close(plain.q, q.float(), rtol=1e-5, atol=1e-7)


def test_arms_are_valid_distillation_settings(study):
    """Every arm's overrides load into the distillation config (the KEYS still name real keys) and set the
    sampling they claim; nothing but the sampling differs between arms."""
    arms = study.arms(0.03)
    assert list(arms)[0] == study.BASELINE and {"family-balanced", "group-dro"} <= set(arms)
    assert any(a.startswith("temperature-") for a in arms)
    configs = {name: load_distill_config(ROOT / "configs" / "nano-distill.yaml",
                                         study.merge_overrides(["kl.dro_ema=0.5"], extra))
               for name, extra in arms.items()}
    prop, fam, dro = configs["proportional"], configs["family-balanced"], configs["group-dro"]
    assert (prop.data.language_temperature, prop.kl.balance, prop.kl.dro) == (1.0, "language", False)
    assert math.isinf(fam.data.language_temperature) and fam.kl.balance == "family" and not fam.kl.dro
    assert dro.kl.dro and dro.kl.dro_step == 0.03 and dro.kl.dro_ema == study.DRO_EMA and dro.kl.balance == "language"
    assert configs["temperature-3"].data.language_temperature == 3.0
    for cfg in configs.values():   # the rest is the config's own
        assert cfg.kl.train.max_steps == prop.kl.train.max_steps and cfg.data.seq_len == prop.data.seq_len
    assert study.merge_overrides(["a.b=1", "c=2"], ["a.b=3"]) == ["c=2", "a.b=3"]


def synthetic_drops(seed: int, scale: float = 1.0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    langs = ["en", "de", "fr", "hi", "sw", "yo", "ja", "ko", "zh", "ar", "he", "am"]
    return {c: scale * float(rng.uniform(0.1, 1.0)) for c in langs}


def test_aggregate_agrees_with_equity(study):
    one = {0: synthetic_drops(0)}
    r = study.aggregate(one, n_boot=300)
    assert r["des"] == pytest.approx(des(one[0], "family")) and r["mean_drop"] == pytest.approx(np.mean(list(one[0].values())))
    three = {s: synthetic_drops(s) for s in range(3)}
    r = study.aggregate(three, n_boot=300)
    averaged = {c: np.mean([three[s][c] for s in three]) for c in three[0]}
    assert r["des"] == pytest.approx(des(averaged, "family"))
    assert r["des_per_seed"] == pytest.approx([des(three[s], "family") for s in range(3)])
    assert r["des_ci95"][0] <= r["des_ci95"][1] and r["mean_drop_ci95"][0] <= r["mean_drop"] <= r["mean_drop_ci95"][1]
    # a replicate draws languages within families: with one language per family it cannot change DES
    singles = {0: {"en": 0.2, "sw": 0.9, "ja": 0.4, "ko": 0.1}}
    assert len({group_of(c) for c in singles[0]}) == 4
    r = study.aggregate(singles, n_boot=100)
    assert r["des_ci95"] == pytest.approx([des(singles[0], "family")] * 2)


def test_comparison_against_proportional_is_paired(study):
    base = study.aggregate({s: synthetic_drops(s) for s in range(3)}, n_boot=300)
    same = study.aggregate({s: synthetic_drops(s) for s in range(3)}, n_boot=300)
    half = study.aggregate({s: synthetic_drops(s, 0.5) for s in range(3)}, n_boot=300)
    v = study.against(same, base)
    assert v["des_change"] == pytest.approx(0.0) and v["des_change_ci95"] == pytest.approx([0.0, 0.0])
    assert not v["meets_target"]  # no DES cut
    # halving every drop: the mean halves and the variance quarters in every (paired) replicate
    v = study.against(half, base)
    assert v["mean_drop_change"] == pytest.approx(-0.5) and v["mean_drop_change_ci95"] == pytest.approx([-0.5, -0.5])
    assert v["des_change"] == pytest.approx(-0.75) and v["des_change_ci95"] == pytest.approx([-0.75, -0.75])
    assert v["meets_target"]
    assert study.choose_dro_step({0.01: {"mean": 1.0, "des": 0.3}, 0.1: {"mean": 1.2, "des": 0.1},
                                  0.03: {"mean": 1.04, "des": 0.2}}, {"mean": 1.0, "des": 0.3}) == 0.03
